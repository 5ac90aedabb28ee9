"""
The HTTP/1.1 connection manager: one downstream connection on a C{protocol = http} listener.

Bytes go to the sans-IO parser (L{twistedmesh.http.h1.RequestParser}); each request becomes a L{Stream}
that runs the listener's HTTP filter chain. Responses are written in request order: HTTP/1.1 has no other
way to tell them apart. While one stream is being answered, later pipelined requests wait (parsed, with
their bodies queued) and the socket is not read, so the queue is bounded by one read's worth of bytes.

Backpressure: reading is paused for as many reasons as are in force (a filter holding the request, a slow
upstream, a pipelined request waiting) and resumes when none is; a slow downstream reader pauses the
producer the router registers for the response (the upstream connection).
"""

from __future__ import annotations

import random as _random
from collections import deque
from typing import Callable, Deque, List, Optional, Sequence

from twisted.internet import protocol
from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.logger import Logger
from zope.interface import implementer

from . import h1
from ..observability.tracing import TRACE_FIELDS, newRequestId, propagate
from .output import Output
from .stream import Stream
from .xfcc import XFCC_ADDS, forwardedClientCert


_NO_BODY_STATUSES = frozenset((204, 304))
# The request fields the connection manager itself looks at (requestHead); all others pass untouched. The
# trace context fields are only noted, so that propagate() need not look for them again.
_MANAGED = frozenset([b"host", b"x-forwarded-client-cert", b"x-forwarded-for", b"x-forwarded-proto", b"expect",
                      b"x-request-id"]) | TRACE_FIELDS


class HTTPSettings:
    """
    A listener's HTTP settings, resolved once at config load.
    """

    __slots__ = ("name", "makers", "maxHeaderBytes", "maxHeaders", "idleTimeout", "requestHeadersTimeout",
                 "maxRequestsPerConnection", "stats", "clock", "random", "accessLog", "forwardClientCert",
                 "traceSampleRate", "spans")

    def __init__(self, name: str, makers: Sequence[Callable], stats, clock, maxHeaderBytes: int = 60 * 1024,
                 maxHeaders: int = 100, idleTimeout: float = 3600.0, requestHeadersTimeout: float = 0.0,
                 maxRequestsPerConnection: int = 0, random=None, accessLog=None,
                 forwardClientCert: str = "sanitize", traceSampleRate: Optional[float] = None,
                 spans=None) -> None:
        self.traceSampleRate = traceSampleRate  # 0 to 1; None: no trace-context propagation
        self.forwardClientCert = forwardClientCert  # x-forwarded-client-cert: see twistedmesh.http.xfcc
        self.random = random if random is not None else _random.Random()
        # Told of each finished stream, log(stream, endTime): the listener's AccessLogger.
        self.accessLog = accessLog
        # Told of each finished sampled stream, record(stream, trace, endTime): a tracing SpanRecorder. The
        # connection manager checks the sampling itself, so an unsampled request costs no call.
        self.spans = spans
        self.name = name
        self.makers = makers
        self.stats = stats
        self.clock = clock
        self.maxHeaderBytes = maxHeaderBytes
        self.maxHeaders = maxHeaders
        self.idleTimeout = idleTimeout
        self.requestHeadersTimeout = requestHeadersTimeout
        self.maxRequestsPerConnection = maxRequestsPerConnection


class HTTPStats:
    """
    The listener's Envoy stats (C{http.<listener>.*}), resolved once.
    """

    def __init__(self, scope) -> None:
        self.downstream_rq_total = scope.counter("downstream_rq_total")
        self.downstream_rq_active = scope.gauge("downstream_rq_active")
        self.downstream_rq_1xx = scope.counter("downstream_rq_1xx")
        self.downstream_rq_2xx = scope.counter("downstream_rq_2xx")
        self.downstream_rq_3xx = scope.counter("downstream_rq_3xx")
        self.downstream_rq_4xx = scope.counter("downstream_rq_4xx")
        self.downstream_rq_5xx = scope.counter("downstream_rq_5xx")
        self.downstream_rq_http1_total = scope.counter("downstream_rq_http1_total")
        self.downstream_rq_rx_reset = scope.counter("downstream_rq_rx_reset")
        self.downstream_rq_tx_reset = scope.counter("downstream_rq_tx_reset")
        self.downstream_rq_timeout = scope.counter("downstream_rq_timeout")
        self.downstream_cx_protocol_error = scope.counter("downstream_cx_protocol_error")
        self.downstream_cx_idle_timeout = scope.counter("downstream_cx_idle_timeout")
        self.downstream_rq_time = scope.histogram("downstream_rq_time")
        self.byClass = (None, self.downstream_rq_1xx, self.downstream_rq_2xx, self.downstream_rq_3xx,
                        self.downstream_rq_4xx, self.downstream_rq_5xx)


@implementer(IPushProducer)
class _RequestBodyProducer:
    """
    What the router registers with the upstream transport as the producer of the request body: pausing it
    pauses reading the downstream socket (one of several reasons the manager counts).
    """

    __slots__ = ("conn", "paused")

    def __init__(self, conn: "HTTPConnection") -> None:
        self.conn = conn
        self.paused = False

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            self.conn._pause()

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            self.conn._resume()

    def stopProducing(self) -> None:
        self.resumeProducing()


@implementer(IPushProducer)
class _ResponseGate:
    """
    What the downstream transport sees as the producer of the active response: the upstream connection,
    paused while the transport's buffer is full I{or} while a response filter holds the response (a slow
    filter must not make the proxy queue the upstream's whole body). Resumed only when neither holds.
    """

    __slots__ = ("target", "transportPaused", "held", "applied", "registered")

    def __init__(self) -> None:
        self.registered = False  # registered with the downstream transport
        self.target = None
        self.transportPaused = False
        self.held = 0
        self.applied = False  # whether we have the target paused

    def attach(self, target) -> None:
        self.target = target
        self.transportPaused = False
        self.held = 0
        self.applied = False

    def detach(self) -> None:
        target, self.target = self.target, None
        if target is not None and self.applied:
            # It may go back to its pool, where it must read to notice the upstream closing it.
            self.applied = False
            target.resumeProducing()

    def _sync(self) -> None:
        target = self.target
        if target is None:
            return
        want = self.transportPaused or self.held > 0
        if want != self.applied:
            self.applied = want
            if want:
                target.pauseProducing()
            else:
                target.resumeProducing()

    def pauseProducing(self) -> None:
        self.transportPaused = True
        self._sync()

    def resumeProducing(self) -> None:
        self.transportPaused = False
        self._sync()

    def stopProducing(self) -> None:
        target = self.target
        if target is not None:
            target.stopProducing()


class _Pending:
    """
    A pipelined request parsed while an earlier one is still being answered.
    """

    __slots__ = ("stream", "events", "sendContinue", "connect")

    def __init__(self, stream: Stream, sendContinue: bool, connect: bool) -> None:
        self.stream = stream
        self.events: List[tuple] = []
        self.sendContinue = sendContinue  # answer its Expect: 100-continue when its turn comes
        self.connect = connect  # a CONNECT, refused when its turn comes


class HTTPConnection(protocol.Protocol):
    """
    One downstream HTTP/1.1 connection (see the module docstring).
    """

    log = Logger()

    def __init__(self, settings: HTTPSettings, httpStats: HTTPStats) -> None:
        self.settings = settings
        self.httpStats = httpStats
        self.parser: Optional[h1.RequestParser] = None
        self.active: Optional[Stream] = None  # the stream whose response is being written
        self.receiving: Optional[object] = None  # where request events go: a Stream or a _Pending
        self.pending: Deque[_Pending] = deque()
        self.pauses = 0
        self.requests = 0
        self.closing = False  # close after the active response
        self.disconnected = False
        self.idleTimer = None
        self.headersTimer = None
        self.bodyProducer = _RequestBodyProducer(self)
        self.responseGate = _ResponseGate()
        self.awaitingHead = True  # no request head is in progress: the next byte starts one
        self.finishing = False  # answer what is queued, then close (draining, or after a malformed request)
        self.lastRequest = False  # the last request this connection answers has been parsed
        self.tunnel = None  # after a 101: the Tunnel that now owns both connections
        self.early: Optional[List[bytes]] = None  # bytes after an upgrade request, before the 101
        self._head = False
        self._chunked = False
        self._responseBodyAllowed = True
        # Where responses are written: corked while a read is handled (see twistedmesh.http.output).
        self.output: Optional[Output] = None

    # -- connection lifecycle ---------------------------------------------------------------------------------

    factory = None  # the listener's factory, told when the connection opens and closes

    def connectionMade(self) -> None:
        if self.factory is not None:
            self.factory.connectionOpened(self)
        self.parser = h1.RequestParser(self, self.settings.maxHeaderBytes, self.settings.maxHeaders)
        self.output = Output(self.transport)
        self.peer = self.transport.getPeer()
        # A UNIX-socket peer has no address to forward: then x-forwarded-for is left as the client sent it.
        self.peerHost = getattr(self.peer, "host", "").encode("ascii")
        self.scheme = b"https" if ISSLTransport.providedBy(self.transport) else b"http"
        self._armIdle()

    def dataReceived(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.toUpstream(data)
            return
        if self.idleTimer is not None:
            self.idleTimer.reset(self.settings.idleTimeout)
        early = self.early
        if early is not None:
            # Waiting for the upstream's answer to an upgrade: hold these for the tunnel, read no more.
            early.append(data)
            return
        if self.headersTimer is None and self.awaitingHead and self.settings.requestHeadersTimeout:
            # The first bytes of a request: its head must be complete within request_headers_timeout.
            self.headersTimer = self.settings.clock.callLater(self.settings.requestHeadersTimeout,
                                                              self._headersTimedOut)
        parser = self.parser
        # Whatever this read makes us write (answers, and through Output.hold the requests upstream) goes
        # out once it is handled, each connection's bytes in one system call.
        output = self.output
        output.corks += 1
        try:
            parser.feed(data)
        finally:
            output.uncork()
        if parser.upgradeData is not None and self.early is None and not self.closing:
            self.early = [parser.upgradeData] if parser.upgradeData else []
            self._pause()

    def connectionLost(self, reason) -> None:
        self.disconnected = True
        self._cancelTimers()
        if self.tunnel is not None:
            self.tunnel.downstreamLost()
        for stream in [self.active] + [p.stream for p in self.pending]:
            if stream is not None and not stream.completed:
                if not stream.responseEnded:
                    self.httpStats.downstream_rq_rx_reset.value += 1
                    stream.responseFlags.append("DC")
                    stream.responseCodeDetails = stream.responseCodeDetails or "downstream_remote_disconnect"
                self._finishStream(stream)
        self.pending.clear()
        self.active = None
        if self.factory is not None:
            self.factory.connectionClosed(self)

    # -- parser callbacks -----------------------------------------------------------------------------------

    def requestHead(self, method: bytes, target: bytes, version: bytes, headers, keepAlive: bool, hasBody: bool,
                    chunked: bool, upgrade: bool, expectContinue: bool) -> None:
        settings = self.settings
        self.awaitingHead = False
        if self.headersTimer is not None:
            self.headersTimer.cancel()
            self.headersTimer = None
        if self.closing or self.lastRequest:
            # Pipelined behind a response that closes the connection (or behind the last request
            # max_requests_per_connection allows): never answered, so never counted or routed (its body
            # and end are dropped: requestData/requestEnd ignore a None target).
            self.receiving = None
            return
        self.requests += 1
        stats = self.httpStats
        stats.downstream_rq_total.value += 1
        stats.downstream_rq_http1_total.value += 1
        stats.downstream_rq_active.value += 1
        stream = Stream(self, settings.makers, settings.name, self.peer, settings.clock.seconds())
        stream.method = method
        stream.path = target
        stream.version = version
        stream.keepAlive = keepAlive
        # What Envoy's connection manager does before any filter runs: take Host out as the authority,
        # drop hop-by-hop fields, append the peer to x-forwarded-for, set x-forwarded-proto, make sure
        # there is an x-request-id. One pass over the fields.
        authority = b""
        kept = []
        peerHost = self.peerHost
        xff = False
        requestId = False
        traced = False  # whether any trace context field came in
        xfcc = None  # incoming x-forwarded-client-cert values, when there are any
        for field in h1.stripHopByHop(headers):
            name = field[0]
            if name not in _MANAGED:
                kept.append(field)  # most fields: one set lookup, and the parser's tuple kept as it is
                continue
            value = field[1]
            if name == b"host":
                authority = value
            elif name == b"x-forwarded-client-cert":
                if xfcc is None:
                    xfcc = []
                xfcc.append(value)
            elif name == b"x-forwarded-for":
                if not xff:
                    if peerHost:
                        value = value + b", " + peerHost
                    xff = True
                kept.append((name, value))
            elif name == b"x-forwarded-proto" or (name == b"expect" and expectContinue):
                # Ours replaces what the client claimed; an expectation we answer (below) is not passed on.
                continue
            else:
                if name == b"x-request-id":
                    requestId = True
                elif name in TRACE_FIELDS:
                    traced = True
                kept.append(field)
        if not xff and peerHost:
            kept.append((b"x-forwarded-for", peerHost))
        kept.append((b"x-forwarded-proto", self.scheme))
        if xfcc is not None or settings.forwardClientCert in XFCC_ADDS:
            kept.extend(forwardedClientCert(self, settings.forwardClientCert, xfcc))
        stream.scheme = self.scheme
        if settings.traceSampleRate is None:
            if not requestId:
                kept.append((b"x-request-id", newRequestId(settings.random)))
        else:
            # A missing x-request-id is made by propagate: from the new trace's own draw when no trace came in.
            stream.state["trace"] = propagate(kept, settings.random, settings.traceSampleRate, traced, requestId)
        connect = False
        if upgrade:
            if method == b"CONNECT":
                connect = True
            # Hop-by-hop, but the upstream must see the upgrade offer; the connection is the tunnel's or,
            # if the upstream declines, closes after its answer (the parser stops at an upgrade request).
            for name, value in headers:
                if name == b"upgrade":
                    stream.upgrade = value
                    kept.append((b"connection", b"upgrade"))
                    kept.append((b"upgrade", value))
                    break
            stream.keepAlive = False
        stream.authority = authority
        stream.requestHeaders = kept
        stream.chunked = chunked
        if not hasBody:
            stream.requestEnded = True
        # As Envoy does by default: the proxy itself invites the body (when the request's turn comes: a 100
        # in the middle of an earlier response would corrupt it), and the upstream never sees the
        # expectation (it would answer 100 to a client that already sent the body).
        sendContinue = hasBody and expectContinue and version == b"1.1"
        if connect:
            stream.keepAlive = False
        if settings.maxRequestsPerConnection and self.requests >= settings.maxRequestsPerConnection:
            stream.keepAlive = False
            self.lastRequest = True
        if self.active is None:
            self.active = stream
            self.receiving = stream
            self._startResponseState(stream)
            self._begin(stream, sendContinue, connect)
        else:
            pending = _Pending(stream, sendContinue, connect)
            self.pending.append(pending)
            self.receiving = pending
            if len(self.pending) == 1:
                self._pause()

    def requestData(self, data: bytes) -> None:
        target = self.receiving
        if target.__class__ is _Pending:
            target.events.append((1, data))
        elif target is not None and not target.completed:
            target.receiveRequestData(data, False)

    def requestEnd(self, trailers) -> None:
        self.awaitingHead = True
        target = self.receiving
        self.receiving = None
        if target.__class__ is _Pending:
            target.events.append((2, trailers))
        elif target is not None and not target.completed:
            self._endRequest(target, trailers)

    def _endRequest(self, stream: Stream, trailers) -> None:
        if trailers:
            stream.receiveRequestTrailers(trailers)
        else:
            stream.receiveRequestData(b"", True)

    def _begin(self, stream: Stream, sendContinue: bool, connect: bool) -> None:
        """
        C{stream} is the one being answered now: start its filter chain (or refuse it).
        """
        if connect:
            stream.respond(405, b"CONNECT is not supported\n", details="connect_not_supported")
            return
        if sendContinue:
            self.output.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        stream.receiveRequestHeaders()

    def startTunnel(self, stream: Stream, upstream, fromUpstream: bytes) -> None:
        """
        The upstream answered this stream's upgrade with a 101 (already written): from now on the
        connection is a raw tunnel to C{upstream}.
        """
        from .tunnel import Tunnel

        self.unregisterResponseProducer()
        self.output.flush()  # the 101 goes before the tunnel's first bytes, which skip Output
        tunnel = self.tunnel = upstream.tunnel = Tunnel(self, upstream, stream)
        stream.responseEnded = True  # the HTTP part is over; a close from now on is no reset
        early, self.early = self.early or [], None
        self._cancelTimers()
        tunnel.start(fromUpstream, b"".join(early))
        if self.pauses:
            self.pauses = 0
            self.transport.resumeProducing()

    def protocolError(self, status: int, reason: str) -> None:
        """
        The request bytes are malformed or over a limit: answer C{status} (when no response is under way)
        and close; earlier pipelined requests that were answered are unaffected.
        """
        self.httpStats.downstream_cx_protocol_error.value += 1
        self.closing = True
        # The parser's reason is for logs; the client gets the status's own phrase.
        body = h1.REASON_PHRASES.get(status, b"Bad Request") + b"\n"
        details = "http1.codec_error{" + reason.replace(" ", "_") + "}"
        if self.active is None:
            stream = Stream(self, [], self.settings.name, self.peer, self.settings.clock.seconds())
            stream.keepAlive = False
            self.httpStats.downstream_rq_total.value += 1
            self.httpStats.downstream_rq_active.value += 1
            self.active = stream
            self._startResponseState(stream)
            stream.respond(status, body, flag="DPE", details=details)
        else:
            # Requests already parsed are answered; the malformed one (and anything after it) never is.
            self.closing = False
            self.finishing = True
            self._pause()
            target = self.receiving
            self.receiving = None
            if target.__class__ is _Pending:
                # A pipelined request whose own body broke: it was never started, so just drop it.
                self.pending.remove(target)
                self._finishStream(target.stream)
            elif target is self.active and not target.requestEnded:
                # The active request's own body is malformed: it cannot be completed upstream.
                self._dropPending()
                target.keepAlive = False
                target.respond(status, body, flag="DPE", details=details)

    def drain(self) -> None:
        """
        The listener is draining: close now if idle, else answer what was already received (the last answer
        says C{connection: close}) and close.
        """
        self.finishing = True
        if self.active is None and not self.disconnected and self.tunnel is None:
            self.output.flush()
            self.transport.loseConnection()

    # -- what the Stream asks of its codec --------------------------------------------------------------------

    def pauseRequest(self, stream: Stream) -> None:
        self._pause()

    def resumeRequest(self, stream: Stream) -> None:
        self._resume()

    def localReplyStarted(self, stream: Stream, body: bytes) -> None:
        if not stream.requestEnded:
            # The rest of the request body would be read as the next request: close after this reply.
            stream.keepAlive = False

    def _startResponseState(self, stream: Stream) -> None:
        self._head = stream.method == b"HEAD"

    def writeHeaders(self, stream: Stream, end: bool) -> None:
        status = stream.status
        if self.finishing and not self.pending:
            stream.keepAlive = False  # the last answer before the connection closes says so
        keepAlive = stream.keepAlive and not self.closing
        headers = stream.responseHeaders
        bodyAllowed = status not in _NO_BODY_STATUSES and status >= 200 and not self._head
        chunked = False
        if status >= 200 and status not in _NO_BODY_STATUSES:
            for name, _ in headers:
                if name == b"content-length":
                    break
            else:
                if end:
                    if not self._head:
                        headers = headers + [(b"content-length", b"0")]
                elif stream.version == b"1.1":
                    chunked = True
                else:
                    keepAlive = False  # an HTTP/1.0 body without a length ends at close
        if not keepAlive:
            stream.keepAlive = False
        self._chunked = chunked and not self._head
        self._responseBodyAllowed = bodyAllowed
        if status == 101:
            keepAlive = True  # the head carries "connection: upgrade" itself; never "close"
        self.output.write(h1.encodeResponseHead(status, None, headers, chunked, keepAlive, stream.version))
        if end:
            self._responseDone(stream)

    def writeData(self, stream: Stream, data: bytes, end: bool) -> None:
        if data and self._responseBodyAllowed:
            if self._chunked:
                self.output.writeSequence(h1.encodeChunk(data))
            else:
                self.output.write(data)
        if end:
            if self._chunked:
                self.output.write(h1.encodeLastChunk())
            self._responseDone(stream)

    def writeTrailers(self, stream: Stream, trailers) -> None:
        if self._chunked:
            self.output.write(h1.encodeLastChunk(trailers))
        self._responseDone(stream)

    def resetStream(self, stream: Stream, reason: str) -> None:
        self.httpStats.downstream_rq_tx_reset.value += 1
        self.closing = True
        self._dropPending()
        if not self.disconnected:
            # A half-sent response must not look complete: abort, don't close gracefully (dropping what the
            # transport, or our output, still buffers).
            self.output.discard()
            self.transport.abortConnection()
        # Count it out like any finished stream (Stream.reset's own complete() is then a no-op).
        self._finishStream(stream)
        if self.active is stream:
            self.active = None

    def registerResponseProducer(self, producer) -> None:
        """
        The router's upstream connection produces the active response: a slow downstream pauses it.
        """
        if not self.disconnected:
            gate = self.responseGate
            if gate.registered:
                self.transport.unregisterProducer()
            gate.attach(producer)
            self.transport.registerProducer(gate, True)
            gate.registered = True

    def unregisterResponseProducer(self) -> None:
        # Our own flag, not transport.producer: Twisted's TLS transport keeps its producer elsewhere, and a
        # producer left registered there keeps the TLS connection from ever closing.
        gate = self.responseGate
        if gate.registered:
            gate.registered = False
            if not self.disconnected:
                self.transport.unregisterProducer()
        gate.detach()

    def pauseResponse(self, stream: Stream) -> None:
        """
        A response filter holds the response: stop reading the upstream until it lets go.
        """
        self.responseGate.held += 1
        self.responseGate._sync()

    def resumeResponse(self, stream: Stream) -> None:
        gate = self.responseGate
        if gate.held > 0:
            gate.held -= 1
            gate._sync()

    # -- completion and the next pipelined request ------------------------------------------------------------

    def _responseDone(self, stream: Stream) -> None:
        keepAlive = stream.keepAlive and not self.closing
        self._finishStream(stream)
        if self.active is stream:
            self.active = None
        if not keepAlive:
            self.closing = True
            self._dropPending()
            self.output.flush()
            self.transport.loseConnection()
            return
        if self.pending:
            self._next()

    def _dropPending(self) -> None:
        """
        The connection closes before the pipelined requests waiting behind the active one are answered:
        count them out of C{downstream_rq_active} and complete their streams.
        """
        pending, self.pending = self.pending, deque()
        for p in pending:
            self._finishStream(p.stream)

    def _finishStream(self, stream: Stream) -> None:
        if stream.completed:
            return
        stats = self.httpStats
        stats.downstream_rq_active.value -= 1
        status = stream.status
        if 100 <= status < 600:
            stats.byClass[status // 100].value += 1
        stream.complete()
        settings = self.settings
        now = settings.clock.seconds()
        stats.downstream_rq_time.record((now - stream.startTime) * 1000.0)
        if settings.accessLog is not None:
            settings.accessLog.log(stream, now)
        if settings.spans is not None:
            trace = stream.state.get("trace")
            if trace is not None and trace.sampled:
                settings.spans.record(stream, trace, now)

    def _next(self) -> None:
        pending = self.pending.popleft()
        stream = pending.stream
        self.active = stream
        if self.receiving is pending:
            self.receiving = stream
        self._startResponseState(stream)
        if not self.pending:
            self._resume()
        self._begin(stream, pending.sendContinue and not stream.requestEnded, pending.connect)
        for kind, payload in pending.events:
            if stream.completed:
                break
            if kind == 1:
                stream.receiveRequestData(payload, False)
            else:
                self._endRequest(stream, payload)

    # -- pausing, timers -----------------------------------------------------------------------------------

    def _pause(self) -> None:
        self.pauses += 1
        if self.pauses == 1 and not self.disconnected:
            self.transport.pauseProducing()

    def _resume(self) -> None:
        if self.pauses > 0:
            self.pauses -= 1
            if self.pauses == 0 and not self.disconnected:
                self.transport.resumeProducing()

    def _armIdle(self) -> None:
        timeout = self.settings.idleTimeout
        if timeout:
            self.idleTimer = self.settings.clock.callLater(timeout, self._idle)

    def _idle(self) -> None:
        self.idleTimer = None
        if self.active is None:
            self.httpStats.downstream_cx_idle_timeout.value += 1
            self.output.flush()
            self.transport.loseConnection()
        else:
            self._armIdle()

    def _headersTimedOut(self) -> None:
        self.headersTimer = None
        self.httpStats.downstream_rq_timeout.value += 1
        self.protocolError(408, "request headers not received within request_headers_timeout")

    def _cancelTimers(self) -> None:
        if self.idleTimer is not None and self.idleTimer.active():
            self.idleTimer.cancel()
        self.idleTimer = None
        if self.headersTimer is not None and self.headersTimer.active():
            self.headersTimer.cancel()
        self.headersTimer = None
