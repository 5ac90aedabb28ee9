"""
Upstream HTTP/2: multiplexed client connections to a cluster's hosts (C{protocol = http2}), and a pool of
them per host with the same shape as the HTTP/1.1 pool (L{twistedmesh.upstream.http1}), so the router
drives either without knowing which it has.

A thin protocol around h2's sans-IO engine, like the downstream codec (L{twistedmesh.http.h2server}):
bytes go to C{H2Connection.receive_data}, events come back and are dispatched, and what the engine queued
is flushed once per read (or once per call from the router outside a read). Plaintext connections speak
h2c with prior knowledge; a TLS cluster offers ALPN C{h2} (the cluster sets it up).

What the router holds is not a connection but one L{H2Stream}: a slot on a connection, reserved when the
pool hands it out, opened by L{H2Stream.begin} and gone when the exchange ends. It has the HTTP/1.1
connection's methods (C{begin}, C{writeBody}, C{endBody}, C{abandon}, C{pool}), and its C{transport} is
itself: the producer the downstream pauses and the consumer the request body is written to, for this one
stream.

Concurrency
===========

A connection carries at most C{min(http2.max_concurrent_streams, the peer's SETTINGS_MAX_CONCURRENT_STREAMS)}
streams. Until the peer's first SETTINGS arrive we do not know its limit, so a new connection takes one
stream (the request that made us connect, which is not delayed) and the others wait for the SETTINGS, one
round trip; then the waiters are served and, when the connection is full, the pool connects again within
the cluster's C{breaker.max_connections}. Streams are packed onto the oldest connection with room, so
load makes few busy connections rather than many idle ones; a connection with no stream for the idle
timeout is closed with GOAWAY.

GOAWAY and resets
=================

A GOAWAY from the peer stops new streams on that connection; streams above its last-stream-id were never
processed and fail as refused (C{remote_refused_stream_reset}, retriable under C{retry.on =
refused-stream} or C{reset}); the others finish, then the connection closes. A RST_STREAM from the peer
fails its exchange (C{remote_reset}, or C{remote_refused_stream_reset} for REFUSED_STREAM); the router
turns that into a 503 before the response head and a downstream reset after it. An exchange the router
abandons (timeout, retry, the client went away) is reset with CANCEL; the connection carries on.

Flow control is the backpressure, both ways
===========================================

B{Response bodies.} A DATA frame is handed to the exchange, then acknowledged to the peer. The connection
window (which every stream shares) reopens at once; the stream's own window only if the downstream did not
pause this stream meanwhile: while it is paused, the stream's bytes are held and acknowledged when it
resumes. So the upstream can have at most one stream window (64 KiB by default) of a stream in flight
beyond what the downstream accepted, and a slow client holds back its own stream alone: were the
connection window held too, a handful of clients that stop reading (16 at the defaults: 16 x 64 KiB is
the 1 MiB connection window) would stall every other stream multiplexed on that connection.

B{Request bodies.} A chunk is sent only as far as the peer's stream and connection windows (and its
frame size) allow; the rest waits on the stream and the downstream body producer is paused at once, so
a stream holds at most about one downstream read beyond the peer's window. A WINDOW_UPDATE (or a larger
SETTINGS_INITIAL_WINDOW_SIZE) sends what fits and resumes the producer once nothing waits. The
connection is the producer of its socket too: when the peer does not read (the transport's buffer is
full), every stream's request body producer is paused.

Keep-alive
==========

With C{http2.keepalive_interval}, a connection sends a PING that often; if nothing at all comes back from
the peer within C{http2.keepalive_timeout}, the connection is considered dead and closed (its streams
fail as resets), counted in C{cluster.<name>.http2.keepalive_timeout}.
"""

from __future__ import annotations

from collections import deque
from typing import Deque, Dict, List, Optional, Set

from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import H2Error, ProtocolError
from h2.settings import SettingCodes
from hpack import NeverIndexedHeaderTuple
from twisted.internet import protocol
from twisted.internet.interfaces import IConsumer, IHandshakeListener, IPushProducer, ISSLTransport
from twisted.logger import Logger
from zope.interface import implementer

from ..config.model import HTTP2ClusterConfig
from ..http import h2common
from ..http.h2common import badField, finalStatus, withoutConnectionFields
from .accounting import PoolAccounting

_CANCEL = ErrorCodes.CANCEL
_REFUSED = ErrorCodes.REFUSED_STREAM
_NO_ERROR = ErrorCodes.NO_ERROR
_PING = b"twmeshka"  # the opaque 8 bytes of our keep-alive PINGs

#: Failure reasons an exchange hears (besides the HTTP/1.1 pool's C{upstream_reset} and
#: C{tls_handshake_failed}), named as Envoy's response-code details name them.
REMOTE_RESET = "remote_reset"
REFUSED_STREAM = "remote_refused_stream_reset"


def requestFields(stream, scheme: bytes) -> list:
    """
    The HTTP/2 header block of C{stream}'s request: C{:method}, C{:scheme} (the upstream connection's:
    C{scheme}), C{:authority} (the stream's authority, from Host or the client's C{:authority}) and
    C{:path}, then the request's fields without the connection-specific ones.

    C{x-request-id}, unique to each request, goes as a never-indexed literal: indexed, every request's id
    would take a place in the connection's HPACK table that no later request can use, pushing out the
    fields that do repeat (and making each lookup in the table longer). It costs the same bytes either way.
    """
    fields = [(b":method", stream.method), (b":scheme", scheme), (b":authority", stream.authority),
              (b":path", stream.path)]
    fields += withoutConnectionFields(stream.requestHeaders)
    for i in range(len(fields) - 1, 3, -1):
        field = fields[i]
        if field[0] == b"x-request-id":
            fields[i] = NeverIndexedHeaderTuple(b"x-request-id", field[1])
            break
    return fields


@implementer(IPushProducer, IConsumer)
class H2Stream:
    """
    One exchange on an L{H2UpstreamConnection}: what the pool hands the router in place of a connection
    (see the module docstring).

    @ivar sid: the stream id, once L{begin} opened it (0 before).
    @ivar paused: the downstream paused this stream's response: its DATA is held, not acknowledged.
    @ivar heldAck: flow-controlled bytes received while paused.
    @ivar producer: the request body's producer (registered by the router), or C{None}.
    @ivar pending: request body waiting for the peer's window, or C{None}.
    @ivar finished: the stream is over (ended, reset or abandoned) and its slot is free.
    """

    __slots__ = ("conn", "pool", "sid", "exchange", "paused", "heldAck", "producer", "producerPaused",
                 "pending", "pendingEnd", "pendingTrailers", "requestDone", "headersReceived", "finished")

    def __init__(self, conn: "H2UpstreamConnection") -> None:
        self.conn = conn
        self.pool = conn.pool
        self.sid = 0
        self.exchange = None
        self.paused = False
        self.heldAck = 0
        self.producer = None
        self.producerPaused = False
        self.pending: Optional[Deque[memoryview]] = None
        self.pendingEnd = False
        self.pendingTrailers: Optional[list] = None
        self.requestDone = False
        self.headersReceived = False
        self.finished = False

    @property
    def transport(self) -> "H2Stream":
        """
        The stream's producer (response) and consumer (request body) for the router: this object.
        """
        return self

    # -- the router's side (as L{twistedmesh.upstream.http1.UpstreamConnection}) ---------------------------------

    def begin(self, exchange, method: bytes, head: list, body: bool) -> None:
        """
        Open the stream: send C{head} (the header block from L{requestFields}); C{body} says whether body
        chunks follow through L{writeBody} / L{endBody}.
        """
        conn = self.conn
        conn.reserved -= 1
        self.exchange = exchange
        self.requestDone = not body
        self.pool.host.rq_total += 1
        h2c = conn.h2
        try:
            sid = self.sid = h2c.get_next_available_stream_id()
            h2c.send_headers(sid, head, end_stream=not body)
        except (H2Error, ValueError, TypeError) as e:
            # A field h2 cannot encode: this exchange fails (reported once the router's call returns, as a
            # connection's failures always are), and the connection is unharmed.
            conn.log.failure("HTTP/2 upstream {host}: cannot send request headers", host=self.pool.host)
            self.finished = True
            conn.pool.clock.callLater(0, self._failLater, "protocol_error: " + str(e))
            conn._slotFreed()
            return
        conn.streams[sid] = self
        conn._flush()

    def _failLater(self, reason: str) -> None:
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.upstreamFailed(reason, False)

    def writeBody(self, data: bytes, chunked: bool = False) -> None:
        """
        Send a piece of the request body as far as the peer's windows allow; the rest waits (and the body
        producer is paused). C{chunked} is HTTP/1.1's and means nothing here.
        """
        if self.finished or not data:
            return
        if self.pending:
            self.pending.append(memoryview(data))
            return
        self._send(data, False)
        self.conn._flush()

    def endBody(self, chunked: bool = False, trailers: Optional[list] = None) -> None:
        """
        The request body is complete: END_STREAM, with C{trailers} as a trailing HEADERS frame if any.
        """
        if self.finished or self.requestDone:
            return
        self.requestDone = True
        fields = withoutConnectionFields(trailers) if trailers else None
        if self.pending:
            self.pendingEnd = True
            self.pendingTrailers = fields
            return
        self._sendEnd(fields)
        self.conn._flush()

    def abandon(self) -> None:
        """
        The router gives up on the exchange: RST_STREAM(CANCEL), no more callbacks; the connection stays.
        """
        self.exchange = None
        if self.finished:
            return
        conn = self.conn
        if self.sid and not conn.closing:
            conn.pool.stats.tx_reset.value += 1
            try:
                conn.h2.reset_stream(self.sid, _CANCEL)
            except H2Error:
                pass  # already closed on the wire
        self._finish()
        conn._flush()

    # -- the downstream pauses the response (IPushProducer) ---------------------------------------------------

    def pauseProducing(self) -> None:
        """
        The downstream cannot take more of the response: stop acknowledging this stream's DATA.
        """
        self.paused = True

    def resumeProducing(self) -> None:
        """
        The downstream caught up: acknowledge what was held, so the peer may send again.
        """
        self.paused = False
        if self.heldAck:
            self._releaseAck()
            self.conn._flush()

    def stopProducing(self) -> None:
        """
        The downstream is going away; the router abandons the exchange (L{abandon}).
        """

    def _releaseAck(self) -> None:
        held, self.heldAck = self.heldAck, 0
        conn = self.conn
        if not conn.closing:
            # Only the stream's window was held (the connection's reopened as the data came).
            h2common.acknowledgeStream(conn.h2, self.sid, held)

    # -- the request body's producer (IConsumer) -----------------------------------------------------------------

    def registerProducer(self, producer, streaming: bool) -> None:
        """
        C{producer} makes the request body: paused whenever the peer's window or socket has no room.
        """
        self.producer = producer
        self.producerPaused = False
        self._updateProducer()

    def unregisterProducer(self) -> None:
        """
        The body is complete (or the exchange over): forget the producer (the router resumes it).
        """
        self.producer = None

    def write(self, data: bytes) -> None:
        """
        L{IConsumer.write}: the same as L{writeBody}.
        """
        self.writeBody(data)

    def _updateProducer(self) -> None:
        producer = self.producer
        if producer is None:
            return
        blocked = bool(self.pending) or self.conn.writeBlocked
        if blocked and not self.producerPaused:
            self.producerPaused = True
            producer.pauseProducing()
        elif not blocked and self.producerPaused:
            self.producerPaused = False
            producer.resumeProducing()

    # -- sending under flow control ------------------------------------------------------------------------------

    def _send(self, data, end: bool) -> None:
        h2c = self.conn.h2
        sid = self.sid
        size = len(data)
        window = h2c.local_flow_control_window(sid)
        maxFrame = h2c.max_outbound_frame_size
        if size <= window and size <= maxFrame:
            h2c.send_data(sid, data, end_stream=end)  # the common case: one frame, the bytes as they are
            return
        rest = h2common.sendInFrames(h2c, sid, data, window, maxFrame, end)[0]
        if rest is not None:
            self.pending = deque((rest,))
            self.pendingEnd = end
            self.conn.blocked[sid] = self
            self._updateProducer()

    def _sendEnd(self, fields: Optional[list]) -> None:
        """
        END_STREAM, with C{fields} as trailers if there are any.
        """
        h2common.endStream(self.conn.h2, self.sid, fields)

    def _drain(self) -> None:
        """
        The peer opened a window: send what waits and fits.
        """
        pending = self.pending
        if not pending or self.finished:
            return
        h2c = self.conn.h2
        sid = self.sid
        h2common.drainInFrames(h2c, sid, pending, self.pendingEnd and not self.pendingTrailers)
        if pending:
            return
        self.pending = None
        self.conn.blocked.pop(sid, None)
        if self.pendingTrailers:
            trailers, self.pendingTrailers = self.pendingTrailers, None
            h2c.send_headers(sid, trailers, end_stream=True)
        self._updateProducer()

    # -- the end -------------------------------------------------------------------------------------------------

    def _finish(self) -> None:
        """
        The stream is over: free its slot, and reopen the connection window for anything held.
        """
        if self.finished:
            return
        self.finished = True
        conn = self.conn
        conn.streams.pop(self.sid, None)
        conn.blocked.pop(self.sid, None)
        self.pending = None
        # Bytes held for the stream's window alone: the stream is over, there is no window to reopen.
        self.heldAck = 0
        conn._slotFreed()


@implementer(IPushProducer, IHandshakeListener)
class H2UpstreamConnection(protocol.Protocol):
    """
    One HTTP/2 connection to an upstream host (see the module docstring). It is its transport's producer:
    the transport pauses it when the peer stops reading.

    @ivar streams: the open streams by id.
    @ivar reserved: streams handed out by the pool and not yet begun.
    @ivar settled: the peer's first SETTINGS arrived (until then the connection takes one stream).
    @ivar goingAway: a GOAWAY arrived (or we are closing idle): no new streams.
    @ivar closing: the transport was asked to close, or has closed: nothing more goes to h2.
    @ivar blocked: streams whose request body waits for the peer's window, in the order they blocked.
    @ivar writeBlocked: the transport's buffer is full.
    """

    log = Logger()

    def __init__(self, pool: "H2HostPool") -> None:
        self.pool = pool
        self.h2: Optional[H2Connection] = None
        self.streams: Dict[int, H2Stream] = {}
        self.blocked: Dict[int, H2Stream] = {}
        self.reserved = 0
        self.settled = False
        self.goingAway = False
        self.closing = False
        self.closed = False
        self.dispatching = False
        self.writeBlocked = False
        self.handshaken = False
        self.idleTimer = None
        self.pingTimer = None
        self.pingTimeout = None
        self.connectedAt = 0.0

    # -- capacity (for the pool) ----------------------------------------------------------------------------------

    def capacity(self) -> int:
        """
        How many more streams this connection may take now.
        """
        if self.goingAway or self.closing:
            return 0
        if not self.settled:
            return 1 - len(self.streams) - self.reserved
        peer = self.h2.remote_settings.max_concurrent_streams
        limit = self.pool.maxStreams
        if peer < limit:
            limit = peer
        return limit - len(self.streams) - self.reserved

    def reserve(self) -> H2Stream:
        """
        Take a slot (the caller checked L{capacity}) for a stream the router begins or gives back.
        """
        self.reserved += 1
        return H2Stream(self)

    # -- connection lifecycle -------------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport
        if hasattr(transport, "setTcpNoDelay"):
            transport.setTcpNoDelay(True)
        settings: HTTP2ClusterConfig = self.pool.settings
        # Inbound fields are checked as they are translated (_responseReceived): an upstream's bytes go to our
        # clients, and a malformed response is a stream error.
        h2c = self.h2 = H2Connection(h2common.engineConfiguration(clientSide=True, checkInbound=False))
        h2c.incoming_buffer = h2common.FrameBuffer(server=False)  # an oversized frame is refused from its header
        h2common.startConnection(h2c, {
            SettingCodes.ENABLE_PUSH: 0,
            SettingCodes.INITIAL_WINDOW_SIZE: settings.initial_stream_window_size,
        }, settings.initial_connection_window_size)
        transport.registerProducer(self, True)
        self._flush()
        self.pool.connectionMade(self)
        if settings.keepalive_interval:
            self.pingTimer = self.pool.clock.callLater(settings.keepalive_interval, self._ping)

    def handshakeCompleted(self) -> None:
        """
        The TLS handshake with the upstream succeeded (TLS clusters only). A host that picked another
        protocol by ALPN cannot be spoken to in HTTP/2: the connection fails (a host that picked none is
        assumed to speak it, as Envoy does).
        """
        self.handshaken = True
        negotiated = getattr(self.transport, "negotiatedProtocol", None)
        if negotiated is not None and negotiated != b"h2":
            self.pool.stats.protocol_error.value += 1
            self.log.info("HTTP/2 upstream {host} negotiated {protocol!r} by ALPN, not h2: closing",
                          host=self.pool.host, protocol=negotiated)
            self._close(True, "protocol_error: ALPN negotiated %s, not h2" % negotiated.decode("ascii", "replace"))

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        timeout = self.pingTimeout
        if timeout is not None:
            # Anything from the peer proves it alive.
            self.pingTimeout = None
            if timeout.active():
                timeout.cancel()
            self.pingTimer = self.pool.clock.callLater(self.pool.settings.keepalive_interval, self._ping)
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as e:
            # h2 queued a GOAWAY naming the error: send it, and fail every stream.
            self.pool.stats.protocol_error.value += 1
            self.log.info("HTTP/2 protocol error from upstream {host}: {error}", host=self.pool.host, error=e)
            self._close(False, "protocol_error: " + (str(e) or e.__class__.__name__))
            return
        self.dispatching = True
        settledNow = False
        try:
            for event in events:
                if self.closing:
                    break
                kind = event.__class__
                if kind is DataReceived:
                    self._dataReceived(event)
                elif kind is ResponseReceived:
                    self._responseReceived(event)
                elif kind is StreamEnded:
                    self._streamEnded(event.stream_id, None)
                elif kind is WindowUpdated:
                    self._windowUpdated(event.stream_id)
                elif kind is TrailersReceived:
                    self._trailersReceived(event)
                elif kind is StreamReset:
                    self._streamReset(event)
                elif kind is RemoteSettingsChanged:
                    changed = event.changed_settings
                    if SettingCodes.INITIAL_WINDOW_SIZE in changed:
                        self._windowUpdated(0)
                    if not self.settled or SettingCodes.MAX_CONCURRENT_STREAMS in changed:
                        self.settled = settledNow = True
                elif kind is ConnectionTerminated:
                    self._goAwayReceived(event)
                # PING ACKs, SETTINGS ACKs, informational (1xx) heads, PRIORITY and unknown frames need
                # nothing: h2 answers what must be answered, and a 1xx is not forwarded (as for HTTP/1.1).
        finally:
            self.dispatching = False
        self._flush()
        if settledNow:
            pool = self.pool
            # What the host allows is what its next connection will likely allow too; at least one stream,
            # so that a host announcing 0 makes us wait for it rather than connect for every waiter at once.
            pool.expected = max(1, min(self.h2.remote_settings.max_concurrent_streams, pool.maxStreams))
            pool._serve()

    def connectionLost(self, reason) -> None:
        self.closed = self.closing = True
        self.goingAway = True
        for name in ("idleTimer", "pingTimer", "pingTimeout"):
            timer = getattr(self, name)
            setattr(self, name, None)
            if timer is not None and timer.active():
                timer.cancel()
        self.pool.lost(self)
        if not self.handshaken and ISSLTransport.providedBy(self.transport):
            why = "tls_handshake_failed"  # a connection failure, as Envoy reports it, not a reset
        else:
            why = "upstream_reset"
        self._failAll(why)

    def _failAll(self, reason: str) -> None:
        """
        Every open stream fails with C{reason}.
        """
        streams = list(self.streams.values())
        self.streams.clear()
        self.blocked.clear()
        for s in streams:
            s.finished = True
            s.pending = None
            exchange, s.exchange = s.exchange, None
            if exchange is not None:
                exchange.upstreamFailed(reason, s.headersReceived)

    def _close(self, abort: bool, reason: str) -> None:
        """
        Close the connection (once), flushing what h2 queued (a GOAWAY, say); fail open streams with
        C{reason}.
        """
        if self.closing:
            return
        self.closing = self.goingAway = True
        data = None if self.closed else self.h2.data_to_send()
        # The streams hear the reason first (connectionLost, which may run at once, would say "reset").
        self._failAll(reason)
        if not self.closed:
            if data:
                self.transport.write(data)
            if abort:
                self.transport.abortConnection()
            else:
                self.transport.loseConnection()

    # -- the transport's producer: the peer's reading paces request bodies -----------------------------------

    def pauseProducing(self) -> None:
        """
        The peer is not reading: pause every stream's request body.
        """
        if not self.writeBlocked:
            self.writeBlocked = True
            for s in list(self.streams.values()):
                s._updateProducer()

    def resumeProducing(self) -> None:
        """
        The peer caught up: resume the request bodies that have window.
        """
        if self.writeBlocked:
            self.writeBlocked = False
            for s in list(self.streams.values()):
                s._updateProducer()

    def stopProducing(self) -> None:
        """
        The transport is closing; L{connectionLost} cleans up.
        """

    # -- events --------------------------------------------------------------------------------------------------

    def _responseReceived(self, event: ResponseReceived) -> None:
        s = self.streams.get(event.stream_id)
        if s is None:
            return
        # The fields are checked here, in the one pass made over them anyway (h2's own inbound checks are
        # off: they would end the whole connection, where RFC 9113 section 8.1.1 wants this stream reset).
        status = 0
        headers = []
        for field in event.headers:
            name, value = field
            if name[:1] == b":":
                # :status alone, once, before the fields; a final status is exactly three ASCII digits from
                # 200 to 599 (h2 hands 1xx heads over apart, and they are skipped).
                if name != b":status" or status or headers:
                    self._malformedResponse(s, "invalid pseudo-header")
                    return
                status = finalStatus(value)
                if not status:
                    break
            elif badField(name, value):
                self._malformedResponse(s, "invalid header field")
                return
            else:
                headers.append(field)
        if not status:
            self._malformedResponse(s, "invalid :status")
            return
        s.headersReceived = True
        exchange = s.exchange
        if exchange is not None:
            exchange.upstreamHead(status, headers, event.stream_ended is None)

    def _trailersReceived(self, event: TrailersReceived) -> None:
        """
        The response ended with trailers: checked as the head is (no pseudo-header, every field valid).
        """
        s = self.streams.get(event.stream_id)
        if s is None:
            return
        for name, value in event.headers:
            if name[:1] == b":" or badField(name, value):
                self._malformedResponse(s, "invalid trailer field")
                return
        self._streamEnded(event.stream_id, event.headers)

    def _malformedResponse(self, s: H2Stream, why: str) -> None:
        """
        The upstream's response on C{s} is malformed: RST_STREAM(PROTOCOL_ERROR) for that stream alone (RFC
        9113 section 8.1.1), and its exchange fails as a protocol error before the response head, as an
        HTTP/1.1 upstream's bad status line does (a 503 for the client).
        """
        self.pool.stats.tx_reset.value += 1
        try:
            self.h2.reset_stream(s.sid, ErrorCodes.PROTOCOL_ERROR)
        except H2Error:
            pass  # closed on the wire already (its END_STREAM or the peer's reset came with the head)
        exchange, s.exchange = s.exchange, None
        s._finish()
        if exchange is not None:
            exchange.upstreamFailed("protocol_error: " + why, s.headersReceived)

    def _dataReceived(self, event: DataReceived) -> None:
        sid = event.stream_id
        length = event.flow_controlled_length
        s = self.streams.get(sid)
        if s is None or s.exchange is None:
            if length:
                self.h2.acknowledge_received_data(length, sid)
            return
        s.exchange.upstreamData(event.data)
        if not length or self.closing:
            return
        if s.paused and not s.finished:
            # See the module docstring: the connection window reopens at once (the stream's window bounds
            # what this stream may cost us); the stream's own waits until the downstream resumes.
            h2common.acknowledgeConnection(self.h2, length)
            s.heldAck += length
        else:
            self.h2.acknowledge_received_data(length, sid)

    def _streamEnded(self, sid: int, trailers: Optional[list]) -> None:
        """
        The response ended (with C{trailers}, or C{None}). A request still being sent is cancelled: the
        upstream has answered without the rest.
        """
        s = self.streams.get(sid)
        if s is None:
            return
        if not s.requestDone or s.pending:
            self.pool.stats.tx_reset.value += 1
            try:
                self.h2.reset_stream(sid, _CANCEL)
            except H2Error:
                pass
        exchange, s.exchange = s.exchange, None
        s._finish()
        if exchange is not None:
            exchange.upstreamEnd(trailers or None)

    def _streamReset(self, event: StreamReset) -> None:
        s = self.streams.get(event.stream_id)
        if s is None:
            return
        if event.remote_reset:
            self.pool.stats.rx_reset.value += 1
            reason = REFUSED_STREAM if event.error_code == _REFUSED else REMOTE_RESET
        else:
            # h2 reset it itself: the upstream broke the protocol on this stream (a malformed head, say).
            reason = "protocol_error: stream error %s" % (getattr(event.error_code, "name", event.error_code),)
        exchange, s.exchange = s.exchange, None
        s._finish()
        if exchange is not None:
            exchange.upstreamFailed(reason, s.headersReceived)

    def _windowUpdated(self, sid: int) -> None:
        blocked = self.blocked
        if not blocked:
            return
        h2common.serveBlocked(self.h2, blocked, sid, H2Stream._drain)

    def _goAwayReceived(self, event: ConnectionTerminated) -> None:
        """
        GOAWAY: no new streams here; those above the last stream id were never processed and fail as
        refused (safe to retry); the others may finish.
        """
        self.goingAway = True
        self.pool.stats.goaway.value += 1
        last = event.last_stream_id if event.last_stream_id is not None else 0
        # The streams the peer still answers must get their window updates and request bodies.
        h2common.reopenAfterGoAway(self.h2)
        for sid in sorted(self.streams):
            if sid > last:
                s = self.streams[sid]
                exchange, s.exchange = s.exchange, None
                s._finish()
                if exchange is not None:
                    exchange.upstreamFailed(REFUSED_STREAM, False)
        self.pool._goingAway(self)
        if not self.streams:
            self._close(False, "upstream_reset")

    # -- keep-alive ----------------------------------------------------------------------------------------------

    def _ping(self) -> None:
        self.pingTimer = None
        if self.closing:
            return
        self.h2.ping(_PING)
        self._flush()
        self.pingTimeout = self.pool.clock.callLater(self.pool.settings.keepalive_timeout, self._pingTimedOut)

    def _pingTimedOut(self) -> None:
        self.pingTimeout = None
        self.pool.stats.keepalive_timeout.value += 1
        self.log.info("HTTP/2 upstream {host} did not answer a PING: closing", host=self.pool.host)
        self._close(True, "upstream_reset")

    # -- slots, idling, flushing -----------------------------------------------------------------------------

    def _slotFreed(self) -> None:
        """
        A stream ended (or a reservation was given back): serve a waiter, close a connection that is
        going away and done, or start the idle timer.
        """
        if self.closing:
            return
        if self.streams or self.reserved:
            if self.pool.waiting:
                self.pool._serve()
            return
        if self.goingAway:
            self._close(False, "upstream_reset")
            return
        if self.pool.waiting:
            self.pool._serve()
            if self.streams or self.reserved:
                return
        if self.pool.draining:
            self._idle()  # a retired pool keeps no idle connection
            return
        # The idle timer is left running while streams come and go (one reset per idle moment, not a cancel
        # and a new call per stream); when it fires on a busy connection it just goes away.
        timeout = self.pool.idleTimeout
        if timeout:
            timer = self.idleTimer
            if timer is None:
                self.idleTimer = self.pool.clock.callLater(timeout, self._idle)
            else:
                timer.reset(timeout)

    def _idle(self) -> None:
        """
        The idle timeout, or a retired pool letting go of an idle connection: GOAWAY and close.
        """
        timer, self.idleTimer = self.idleTimer, None
        if timer is not None and timer.active():
            timer.cancel()  # called by the pool rather than by the timer
        if self.streams or self.reserved or self.closing:
            return
        self.goingAway = True
        self.pool._goingAway(self)
        self.h2.close_connection(_NO_ERROR)
        self._close(False, "upstream_reset")

    def _flush(self) -> None:
        """
        Write what h2 has queued, unless a read is being dispatched (it flushes once at its end).
        """
        if self.dispatching or self.closing:
            return
        data = self.h2.data_to_send()
        if data:
            self.transport.write(data)


class _ConnectionFactory(protocol.Factory):
    noisy = False

    def __init__(self, pool: "H2HostPool") -> None:
        self.pool = pool

    def buildProtocol(self, addr) -> H2UpstreamConnection:
        return H2UpstreamConnection(self.pool)


class _H2Stats:
    """
    A cluster's HTTP/2 counters (Envoy's names, under C{cluster.<name>.}).
    """

    def __init__(self, scope) -> None:
        h2scope = scope.scope("http2")
        self.rx_reset = h2scope.counter("rx_reset")
        self.tx_reset = h2scope.counter("tx_reset")
        self.goaway = scope.counter("upstream_cx_close_notify")
        self.keepalive_timeout = h2scope.counter("keepalive_timeout")
        self.protocol_error = scope.counter("upstream_cx_protocol_error")


class H2HostPool(PoolAccounting):
    """
    The HTTP/2 connections to one host, with the HTTP/1.1 pool's interface (C{acquire}, C{cancel},
    C{release}, C{idle}, C{closeAll}): what it hands out is an L{H2Stream}. Connections are counted as the
    HTTP/1.1 pool counts them (L{PoolAccounting}).

    @ivar connections: every connected connection.
    @ivar ready: the connected connections that take new streams, oldest first.
    @ivar connecting: the Deferreds of connection attempts in progress.
    @ivar waiting: waiters with no stream yet, in order.
    """

    log = Logger()
    protocolCounter = "upstream_cx_http2_total"

    def __init__(self, host, cluster, clock, connectTimeout: float, settings: HTTP2ClusterConfig,
                 stats: _H2Stats, idleTimeout: float = 60.0) -> None:
        self.host = host
        self.cluster = cluster
        self.clock = clock
        self.connectTimeout = connectTimeout
        self.settings = settings
        self.maxStreams = settings.max_concurrent_streams
        #: The streams a connection being made is expected to take: the cap, or the host's last limit.
        self.expected = self.maxStreams
        self.stats = stats
        self.idleTimeout = idleTimeout
        self.factory = _ConnectionFactory(self)
        self.connections: Set[H2UpstreamConnection] = set()
        self.ready: List[H2UpstreamConnection] = []
        self.connecting: Set[object] = set()
        self.waiting: Deque[object] = deque()
        #: Retired (L{drain}): no connection is kept once it has no stream.
        self.draining = False
        #: Connection attempts that drain cancelled (nobody waited for them).
        self.dropped: Set[object] = set()

    @property
    def idle(self) -> bool:
        """
        Whether a stream can be had at once (L{acquire} would answer synchronously).
        """
        for conn in self.ready:
            if conn.capacity() > 0:
                return True
        return False

    def acquire(self, waiter) -> None:
        """
        Hand C{waiter} a stream (C{poolReady}): at once when a connection has room, otherwise when one
        does (a new one connects, the peer's SETTINGS arrive, a stream ends); or report the failure
        (C{poolFailed}).
        """
        for conn in self.ready:
            if conn.capacity() > 0:
                waiter.poolReady(conn.reserve())
                return
        self.waiting.append(waiter)
        self._connectIfNeeded(True)

    def cancel(self, waiter) -> None:
        """
        C{waiter} no longer wants a stream.
        """
        try:
            self.waiting.remove(waiter)
        except ValueError:
            pass

    def release(self, stream: H2Stream) -> None:
        """
        A stream handed out was not used (its waiter had moved on): free its slot.
        """
        if stream.sid or stream.finished:
            return
        stream.finished = True
        conn = stream.conn
        conn.reserved -= 1
        conn._slotFreed()

    def _serve(self) -> None:
        """
        Hand streams to waiters while a connection has room; connect for the rest.
        """
        waiting = self.waiting
        for conn in list(self.ready):
            while waiting and conn.capacity() > 0:
                waiting.popleft().poolReady(conn.reserve())
            if not waiting:
                return
        self._connectIfNeeded(False)

    def _connectIfNeeded(self, countOverflow: bool) -> None:
        """
        Connect while the waiters outnumber what the connections under way will take (each what the
        host allowed last, up to the stream cap), within C{breaker.max_connections}.
        """
        breaker = getattr(self.cluster, "breaker", None)
        # A connection still waiting for the peer's SETTINGS will take more streams soon: count it as coming.
        # So does one whose peer allows no stream at all (SETTINGS_MAX_CONCURRENT_STREAMS = 0): it waits for
        # a SETTINGS change or a GOAWAY, and a host that says 0 is not answered with a connection storm.
        coming = len(self.connecting)
        for conn in self.ready:
            if not conn.settled or conn.h2.remote_settings.max_concurrent_streams == 0:
                coming += 1
        waiting = len(self.waiting)
        # Never more connections under way than waiters, whatever the host allowed last.
        while waiting > coming * self.expected and coming < waiting:
            coming += 1
            if breaker is not None and breaker.connections.full():
                if countOverflow:
                    breaker.upstream_cx_overflow.value += 1
                return
            self._connect()

    def _connect(self) -> None:
        host, cluster, connecting = self.host, self.cluster, self.connecting
        timedOut = []
        d = host.client.connect(self.factory)
        connecting.add(d)
        # A slot of the connection limit is held from now (counted by connectionMade once connected) so that
        # a burst does not start more attempts than max_connections allows.
        breaker = getattr(cluster, "breaker", None)
        if breaker is not None:
            breaker.connections.add(1)

        def timeout() -> None:
            timedOut.append(True)
            d.cancel()

        timer = self.clock.callLater(self.connectTimeout, timeout) if self.connectTimeout else None

        def done() -> None:
            connecting.discard(d)
            if breaker is not None:
                breaker.connections.add(-1)
            if timer is not None and timer.active():
                timer.cancel()

        def connected(conn: H2UpstreamConnection) -> None:
            done()
            self._serve()
            if self.draining and not conn.streams and not conn.reserved:
                conn._idle()  # retired meanwhile, and nobody waits for it

        def failed(failure) -> None:
            done()
            if d in self.dropped:
                self.dropped.discard(d)  # cancelled by drain: not a failure of the host's
                return
            reason = self._countConnectFailure(failure, bool(timedOut))
            # The waiters this attempt was for: those the attempts still under way will not take.
            excess = min(len(self.waiting) - len(connecting) * self.expected, self.expected)
            for _ in range(max(excess, 0)):
                self.waiting.popleft().poolFailed(reason, bool(timedOut))

        d.addCallbacks(connected, failed)
        d.addErrback(self._waiterFailed)

    def _waiterFailed(self, failure) -> None:
        self.log.failure("pool waiter of {host} failed", failure, host=self.host)

    def connectionMade(self, conn: H2UpstreamConnection) -> None:
        """
        C{conn} connected: count it (L{lost} uncounts it) and offer it for streams.
        """
        PoolAccounting.connectionMade(self, conn)
        self.ready.append(conn)

    def _goingAway(self, conn: H2UpstreamConnection) -> None:
        """
        C{conn} takes no new streams: connect for whoever waits.
        """
        if conn in self.ready:
            self.ready.remove(conn)
        if self.waiting:
            self._serve()

    def lost(self, conn: H2UpstreamConnection) -> None:
        """
        C{conn} closed, for whatever reason.
        """
        if conn in self.ready:
            self.ready.remove(conn)
        self._countLost(conn)
        if self.waiting:
            self._connectIfNeeded(False)

    def drain(self) -> None:
        """
        Retire this pool (its host was removed, or its cluster replaced): no new streams on the connections
        it has; an idle one goes now (GOAWAY, close), a busy one when its last stream ends. From now on no
        connection is kept once it has no stream, and connection attempts nobody waits for are cancelled.
        Requests already waiting are still served (on a connection that closes after them), so a reload
        fails none of them.
        """
        self.draining = True
        for conn in list(self.connections):
            if conn.closing:
                continue
            if conn.streams or conn.reserved:
                conn.goingAway = True
                self._goingAway(conn)
            else:
                conn._idle()
        if not self.waiting:
            for d in list(self.connecting):
                self.dropped.add(d)
                d.cancel()

    def closeAll(self) -> None:
        """
        Close every connection and cancel every attempt (service shutdown): waiters get C{poolFailed}.
        """
        waiting, self.waiting = self.waiting, deque()
        for d in list(self.connecting):
            d.cancel()
        for waiter in waiting:
            waiter.poolFailed("pool closed", False)
        del self.ready[:]
        for conn in list(self.connections):
            conn._close(True, "upstream_reset")


class H2ClusterPools:
    """
    The HTTP/2 pools of a cluster, one per host, made when first needed (the HTTP/1.1
    C{ClusterPools}' interface).
    """

    def __init__(self, cluster, clock, settings: HTTP2ClusterConfig, scheme: bytes = b"http",
                 idleTimeout: float = 60.0) -> None:
        self.cluster = cluster
        self.clock = clock
        self.settings = settings
        self.scheme = scheme
        self.idleTimeout = idleTimeout
        self.stats = _H2Stats(cluster.stats)
        self.pools: Dict[object, H2HostPool] = {}
        self.closed = False  # set at shutdown: routers must not retry into closing pools
        self.draining = False  # set by drain: pools made later are retired from the start

    def requestFields(self, stream) -> list:
        """
        The header block for C{stream}'s request (see L{requestFields}).
        """
        return requestFields(stream, self.scheme)

    def forHost(self, host) -> H2HostPool:
        """
        The pool of C{host}.
        """
        pool = self.pools.get(host)
        if pool is None:
            pool = self.pools[host] = H2HostPool(host, self.cluster, self.clock, self.cluster.connectTimeout,
                                                 self.settings, self.stats, self.idleTimeout)
            pool.draining = self.draining
        return pool

    def drain(self) -> None:
        """
        Retire every host's pool (see L{H2HostPool.drain}); pools made later keep no idle connection either.
        """
        self.draining = True
        for pool in list(self.pools.values()):
            pool.drain()

    def closeAll(self) -> None:
        """
        Close every connection of every host.
        """
        self.closed = True
        for pool in self.pools.values():
            pool.closeAll()
