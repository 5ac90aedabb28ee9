"""
L{Stream}: one HTTP request/response exchange, and the HTTP filter chain that runs over it.

The codec (HTTP/1.1 or HTTP/2) turns wire events into calls on the stream (L{Stream.receiveRequestHeaders},
L{Stream.receiveRequestData}, ...). The stream runs request hooks first to last; the last filter (the
router) sends the request upstream and, when the answer comes, calls L{Stream.sendResponseHeaders} and
friends, which run response hooks last to first and then hand the result to the codec. A filter can stop
either direction with a local reply (L{Stream.respond}) or pause it by returning a Deferred.

Pausing: while a hook's Deferred is pending, later events of that direction wait in a queue, in order,
and the codec is asked to stop reading (so the queue stays small); when the Deferred fires, iteration goes
on from the next filter and the queue drains.

The hot path (a chain whose hooks all return None) is a loop over a list per event: no allocation, no
Deferred.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..tls import peerIdentity as _peerIdentity
from . import grpc as _grpc

Headers = List[Tuple[bytes, bytes]]

_REQUEST_HEADERS, _REQUEST_DATA, _REQUEST_TRAILERS = 0, 1, 2
_RESPONSE_HEADERS, _RESPONSE_DATA, _RESPONSE_TRAILERS = 0, 1, 2
_UNSTATED = object()  # a codec without a peerIdentity attribute of its own


class LocalReply:
    """
    What L{Stream.respond} returns: a hook returns it to say "stop here, the reply is on its way".
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "LOCAL_REPLY"


LOCAL_REPLY = LocalReply()


class HTTPFilter:
    """
    A filter that passes everything through. Subclass it and override only the hooks you need; the
    contract of each hook is in L{twistedmesh.interfaces.IHTTPFilter}.
    """

    __slots__ = ()  # so that subclasses with __slots__ of their own have no per-instance dict

    def requestHeaders(self, stream: "Stream") -> object:
        """
        The request head is in C{stream}; change it in place. Return None, a Deferred, or a local reply.
        """
        return None

    def requestData(self, stream: "Stream", data: bytes, end: bool) -> object:
        """
        A chunk of request body; return None, replacement bytes, a Deferred, or a local reply.
        """
        return None

    def requestTrailers(self, stream: "Stream", trailers: Headers) -> object:
        """
        The request's trailers (change the list in place); return None, a Deferred, or a local reply.
        """
        return None

    def responseHeaders(self, stream: "Stream") -> object:
        """
        The response head is in C{stream}; change it in place. Return None or a Deferred.
        """
        return None

    def responseData(self, stream: "Stream", data: bytes, end: bool) -> object:
        """
        A chunk of response body; return None, replacement bytes, or a Deferred.
        """
        return None

    def responseTrailers(self, stream: "Stream", trailers: Headers) -> object:
        """
        The response's trailers (change the list in place); return None or a Deferred.
        """
        return None

    def streamComplete(self, stream: "Stream") -> None:
        """
        The exchange is over, however it ended: called exactly once per stream.
        """
        return None


class Stream:
    """
    One request and its response.

    Request side, set by the codec and changed by filters: C{method}, C{path} (the request target),
    C{authority} (the Host header's value), C{scheme}, C{requestHeaders} (ordered C{(name, value)} pairs,
    lowercase names, without Host or hop-by-hop headers).

    Response side, set by whoever answers (router or local reply): C{status}, C{responseHeaders}.

    Facts for filters, logs and stats: C{listener} (name), C{downstreamAddress} (an L{IAddress}),
    C{startTime}, C{responseFlags} (Envoy's short codes, such as C{"NR"}, C{"UF"}), C{responseCodeDetails},
    C{upstreamHost}, C{upstreamCluster}, C{route}, C{bytesReceived}, C{bytesSent}, C{state} (a dict for
    filters, per stream).
    """

    log = Logger()

    __slots__ = (
        "method", "path", "authority", "scheme", "version", "requestHeaders", "requestEnded", "keepAlive",
        "chunked", "upgrade",
        "status", "responseHeaders", "responseStarted", "responseEnded",
        "listener", "downstreamAddress", "startTime", "responseFlags", "responseCodeDetails",
        "upstreamHost", "upstreamCluster", "route", "bytesReceived", "bytesSent", "state",
        "codec", "filters", "_reqQueue", "_reqPaused", "_respQueue", "_respPaused", "_respLimit",
        "_completed", "_replying", "_reqIndex", "_buffering", "_waiting",
    )

    def __init__(self, codec, makers: Sequence, listener: str, downstreamAddress, startTime: float) -> None:
        """
        @param codec: what the stream writes its response to: the HTTP/1.1 connection, or for HTTP/2 the
            stream's own L{twistedmesh.http.h2server._StreamCodec}.
        @param makers: the listener's filter makers, first to last: each is called with this stream and
            returns its filter (a new one, or a shared stateless one).
        """
        self.codec = codec
        self.listener = listener
        self.downstreamAddress = downstreamAddress
        self.startTime = startTime
        self.method = b""
        self.path = b""
        self.authority = b""
        self.scheme = b"http"
        self.version = b"1.1"
        self.requestHeaders: Headers = []
        self.requestEnded = False
        self.keepAlive = True
        self.chunked = False
        self.upgrade = None  # the Upgrade header's value when the client offers one (a WebSocket, say)
        self.status = 0
        self.responseHeaders: Headers = []
        self.responseStarted = False
        self.responseEnded = False
        self.responseFlags: List[str] = []
        self.responseCodeDetails = ""
        self.upstreamHost = None
        self.upstreamCluster = None
        self.route = None
        self.bytesReceived = 0
        self.bytesSent = 0
        self.state: dict = {}
        self._reqQueue: list = []
        self._reqPaused = False
        self._respQueue: list = []
        self._respPaused = False
        # Response hooks run over filters[:_respLimit], last to first: the filters before the one that
        # produced the response (the router, last, or whichever filter replied locally). _reqIndex is the
        # filter whose request hook ran last, so a local reply knows where it came from.
        self.filters = filters = [make(self) for make in makers]
        self._respLimit = self._reqIndex = len(filters) - 1
        self._completed = False
        self._replying = False
        self._buffering = None  # [limit, size so far, unused, Deferred] while bufferRequestBody waits
        self._waiting = None  # the Deferred a request hook paused the chain on

    @property
    def peerIdentity(self):
        """
        The L{twistedmesh.tls.PeerIdentity} the client proved with its TLS certificate, or C{None} (plaintext,
        or TLS without a client certificate). Worked out once per connection (L{twistedmesh.tls.peerIdentity}
        keeps it on the connection's TLS transport); a codec (or a test's) may also state it as its own
        C{peerIdentity} attribute.
        """
        codec = self.codec
        stated = getattr(codec, "peerIdentity", _UNSTATED)
        if stated is not _UNSTATED:
            return stated
        transport = getattr(codec, "transport", None)
        if transport is None:
            transport = getattr(getattr(codec, "conn", None), "transport", None)
        if transport is None:
            return None
        return _peerIdentity(transport)

    # -- header helpers for filters ---------------------------------------------------------------------

    def getRequestHeader(self, name: bytes) -> Optional[bytes]:
        """
        The first value of request header C{name} (lowercase), or C{None}.
        """
        for k, v in self.requestHeaders:
            if k == name:
                return v
        return None

    def getResponseHeader(self, name: bytes) -> Optional[bytes]:
        """
        The first value of response header C{name} (lowercase), or C{None}.
        """
        for k, v in self.responseHeaders:
            if k == name:
                return v
        return None

    # -- request direction: codec → filters ----------------------------------------------------------------

    def receiveRequestHeaders(self) -> None:
        """
        The codec filled in the request line and headers: run C{requestHeaders} hooks.
        """
        self._request(_REQUEST_HEADERS, 0, None, False)

    def receiveRequestData(self, data: bytes, end: bool) -> None:
        """
        A chunk of request body arrived (C{end}: it is the last).
        """
        self.bytesReceived += len(data)
        if end:
            self.requestEnded = True
        if self._reqPaused or self._reqQueue:
            self._reqQueue.append((_REQUEST_DATA, 0, data, end))
            buffering = self._buffering
            if buffering is not None:
                buffering[1] += len(data)
                if buffering[1] > buffering[0]:
                    self._bodyTooLarge()
                elif end:
                    self._bodyBuffered()
            return
        self._request(_REQUEST_DATA, 0, data, end)

    def receiveRequestTrailers(self, trailers: Headers) -> None:
        """
        The request ended with trailers.
        """
        self.requestEnded = True
        if self._reqPaused or self._reqQueue:
            self._reqQueue.append((_REQUEST_TRAILERS, 0, trailers, True))
            if self._buffering is not None:
                self._bodyBuffered()
            return
        self._request(_REQUEST_TRAILERS, 0, trailers, True)

    def _request(self, kind: int, start: int, payload, end: bool) -> None:
        try:
            self._requestLoop(kind, start, payload, end)
        except Exception:
            # A hook that raises is a bug in that filter: answer 500 rather than drop the connection.
            self._filterFailed(Failure(), self.filters[self._reqIndex])

    def _requestLoop(self, kind: int, start: int, payload, end: bool) -> None:
        filters = self.filters
        n = len(filters)
        i = start
        while i < n:
            if self._replying or self._completed:
                return
            f = filters[i]
            self._reqIndex = i
            if kind == _REQUEST_DATA:
                result = f.requestData(self, payload, end)
                if result.__class__ is bytes:
                    payload = result
                    i += 1
                    continue
            elif kind == _REQUEST_HEADERS:
                result = f.requestHeaders(self)
            else:
                result = f.requestTrailers(self, payload)
            if result is None:
                i += 1
                continue
            if result is LOCAL_REPLY:
                return
            if isinstance(result, Deferred):
                self._pauseRequest(kind, i, payload, end, result)
                return
            self._filterMisbehaved(f, result)
            return

    def _pauseRequest(self, kind, index, payload, end, d: Deferred) -> None:
        self._reqPaused = True
        # A filter waiting for the whole body must go on receiving it: only other pauses stop reading.
        reading = self._buffering is not None and self._buffering[3] is d
        if not reading:
            self.codec.pauseRequest(self)

        self._waiting = d

        def resumed(result):
            self._waiting = None
            self._reqPaused = False
            if not reading:
                self.codec.resumeRequest(self)
            if self._replying or self._completed:
                return
            nextPayload = payload
            if result is LOCAL_REPLY:
                return
            if result.__class__ is bytes:
                if kind == _REQUEST_DATA:
                    nextPayload = result
                # else: the body from bufferRequestBody, passed through: nothing to replace.
            elif result is not None:
                self._filterMisbehaved(self.filters[index], result)
                return
            self._request(kind, index + 1, nextPayload, end)
            self._drainRequestQueue()

        f = self.filters[index]

        def failed(failure):
            # The pause ends however the Deferred does, or the connection would never be read again.
            self._waiting = None
            self._reqPaused = False
            if not reading:
                self.codec.resumeRequest(self)
            if not self._completed:
                self._filterFailed(failure, f)

        d.addCallbacks(resumed, failed)

    def _drainRequestQueue(self) -> None:
        queue = self._reqQueue
        while queue and not self._reqPaused and not self._replying and not self._completed:
            kind, start, payload, end = queue.pop(0)
            self._request(kind, start, payload, end)

    def bufferRequestBody(self, limit: int) -> Deferred:
        """
        Collect the whole request body, for a filter that must see all of it (to sign or inspect it):
        return the result from a request hook. The chain waits at that filter while the body keeps
        arriving; the Deferred fires with the body (C{bytes}) once it is complete, and then the chain goes on
        (the filters after this one still see the body in its original chunks). A body over C{limit} bytes
        is answered C{413} instead.
        """
        d = Deferred()
        size = sum(len(p) for k, _, p, _ in self._reqQueue if k == _REQUEST_DATA)
        self._buffering = [limit, size, None, d]
        if self.requestEnded:
            self._bodyBuffered()
        elif size > limit:
            self._bodyTooLarge()
        return d

    def _bodyBuffered(self) -> None:
        buffering, self._buffering = self._buffering, None
        body = b"".join(p for k, _, p, _ in self._reqQueue if k == _REQUEST_DATA)
        # Run the chain on once the current event is queued and the caller's stack has unwound.
        buffering[3].callback(body)

    def _bodyTooLarge(self) -> None:
        self._buffering = None
        self.respond(413, b"Payload Too Large\n", details="request_payload_too_large")

    # -- response direction: router / local reply → filters → codec ------------------------------------------

    def sendResponseHeaders(self, end: bool = False) -> None:
        """
        C{status} and C{responseHeaders} are set (by the terminal filter): run C{responseHeaders} hooks,
        last to first over the filters before it, and send the head downstream.
        """
        if self.responseStarted:
            raise RuntimeError("response headers sent twice")
        self.responseStarted = True
        self._response(_RESPONSE_HEADERS, self._respLimit - 1, None, end)

    def sendResponseData(self, data: bytes, end: bool) -> None:
        """
        A chunk of response body for the downstream (C{end}: it is the last).
        """
        if self._respPaused or self._respQueue:
            self._respQueue.append((_RESPONSE_DATA, self._respLimit - 1, data, end))
            return
        self._response(_RESPONSE_DATA, self._respLimit - 1, data, end)

    def sendResponseTrailers(self, trailers: Headers) -> None:
        """
        The response ends with trailers.
        """
        if self._respPaused or self._respQueue:
            self._respQueue.append((_RESPONSE_TRAILERS, self._respLimit - 1, trailers, True))
            return
        self._response(_RESPONSE_TRAILERS, self._respLimit - 1, trailers, True)

    def _response(self, kind: int, start: int, payload, end: bool) -> None:
        if self._completed:
            return
        try:
            self._responseLoop(kind, start, payload, end)
        except Exception:
            self._filterFailed(Failure(), None)

    def _responseLoop(self, kind: int, start: int, payload, end: bool) -> None:
        filters = self.filters
        i = start
        while i >= 0:
            if self._completed:
                return
            f = filters[i]
            if kind == _RESPONSE_DATA:
                result = f.responseData(self, payload, end)
                if result.__class__ is bytes:
                    payload = result
                    i -= 1
                    continue
            elif kind == _RESPONSE_HEADERS:
                result = f.responseHeaders(self)
            else:
                result = f.responseTrailers(self, payload)
            if result is None:
                i -= 1
                continue
            if isinstance(result, Deferred):
                self._pauseResponse(kind, i, payload, end, result)
                return
            self._filterMisbehaved(f, result)
            return
        codec = self.codec
        if kind == _RESPONSE_DATA:
            self.bytesSent += len(payload)
            if end:
                self.responseEnded = True
            codec.writeData(self, payload, end)
        elif kind == _RESPONSE_HEADERS:
            if end:
                self.responseEnded = True
            codec.writeHeaders(self, end)
        else:
            self.responseEnded = True
            self.state["responseTrailers"] = payload  # for %TRAILER(...)% (gRPC's status lives here)
            codec.writeTrailers(self, payload)

    def _pauseResponse(self, kind, index, payload, end, d: Deferred) -> None:
        self._respPaused = True
        # Later response events wait in _respQueue: stop the upstream meanwhile, so that queue stays small.
        self.codec.pauseResponse(self)
        held = [True]

        def release() -> None:
            if held:
                held.pop()
                self._respPaused = False
                self.codec.resumeResponse(self)

        def resumed(result):
            release()
            if self._completed:
                return
            nextPayload = payload
            if kind == _RESPONSE_DATA and result.__class__ is bytes:
                nextPayload = result
            elif result is not None:
                self._filterMisbehaved(self.filters[index], result)
                return
            self._response(kind, index - 1, nextPayload, end)
            queue = self._respQueue
            while queue and not self._respPaused and not self._completed:
                k, s, p, e = queue.pop(0)
                self._response(k, s, p, e)

        f = self.filters[index]

        def failed(failure):
            release()
            if not self._completed:
                self._filterFailed(failure, f)

        d.addCallbacks(resumed, failed)

    # -- local replies, resets, completion -------------------------------------------------------------------

    def respond(self, status: int, body: bytes = b"", headers: Sequence[Tuple[bytes, bytes]] = (),
                flag: Optional[str] = None, details: str = "", grpcStatus: Optional[int] = None) -> LocalReply:
        """
        Answer the request from the proxy itself (a "local reply"): C{status}, C{body} and C{headers}
        (C{content-type} defaults to text/plain). Request processing stops; the reply runs through the
        response hooks of the filters before the one replying, last to first. C{flag} is an Envoy response flag
        (C{"NR"}, C{"UF"}, ...) and C{details} the C{%RESPONSE_CODE_DETAILS%} string.

        A gRPC request (see L{twistedmesh.http.grpc.isGRPC}) gets the reply as gRPC: HTTP 200, no body, and
        C{grpc-status} (C{grpcStatus} if given, else the one C{status} maps to) with C{grpc-message} (the
        body) in the headers, which end the stream (a trailers-only response). C{status} then only chooses
        the gRPC status: the access log shows the 200 sent, C{details} and C{flag} say why.

        If the response has already started, the stream is reset instead (a half-sent response must not
        look complete).

        @return: L{LOCAL_REPLY}, which a hook returns to end the chain.
        """
        if flag is not None:
            self.responseFlags.append(flag)
        if details:
            self.responseCodeDetails = details
        if self._completed:
            return LOCAL_REPLY
        if self.responseStarted:
            self.reset(details or "local_reply_after_response_started")
            return LOCAL_REPLY
        self._replying = True
        self._reqQueue.clear()
        hdrs: Headers
        if _grpc.isGRPC(self.getRequestHeader(b"content-type")):
            # A gRPC client reads the outcome from grpc-status, and takes a non-200 or a body it cannot
            # decode as a protocol error: the reply is made trailers-only (no content-length either, as
            # Envoy sends it; the HTTP/1.1 codec frames an empty reply itself).
            hdrs = _grpc.localReplyHeaders(status, body, headers, grpcStatus)
            status, body = 200, b""
        else:
            hdrs = list(headers)
            if body or status not in (204, 304):
                if not any(k == b"content-type" for k, _ in hdrs):
                    hdrs.append((b"content-type", b"text/plain"))
                hdrs.append((b"content-length", b"%d" % len(body)))
        self.status = status
        self.responseHeaders = hdrs
        self.codec.localReplyStarted(self, body)
        self._respLimit = self._reqIndex
        self.responseStarted = True
        self._response(_RESPONSE_HEADERS, self._respLimit - 1, None, not body)
        if body:
            self.sendResponseData(body, True)
        return LOCAL_REPLY

    def reset(self, reason: str) -> None:
        """
        Abort the exchange (an upstream reset after the response started, say): the codec closes what it
        must (for HTTP/1.1, the connection) and the stream completes.
        """
        if self._completed:
            return
        if not self.responseCodeDetails:
            self.responseCodeDetails = reason
        self.codec.resetStream(self, reason)
        self.complete()

    def complete(self) -> None:
        """
        The exchange is over (response fully sent, or reset, or the connection went away): call every
        filter's C{streamComplete} exactly once.
        """
        if self._completed:
            return
        self._completed = True
        waiting, self._waiting = self._waiting, None
        if waiting is not None and not waiting.called:
            # Nobody will act on it now; cancelling releases the pause it holds on the connection.
            waiting.cancel()
        filters = self.filters
        for f in filters:
            try:
                f.streamComplete(self)
            except Exception:
                self.log.failure("streamComplete of {filter} failed", filter=f)
        # Filters usually point back at their stream: dropping them here breaks the cycle, so the
        # exchange is freed at once by reference counting instead of waiting for the cyclic GC.
        self.filters = ()

    @property
    def completed(self) -> bool:
        """
        Whether L{complete} has run.
        """
        return self._completed

    def _filterMisbehaved(self, f, result) -> None:
        self.log.error("HTTP filter {filter} returned {result!r}; expected None, bytes, a Deferred or "
                       "stream.respond(...)", filter=f, result=result)
        self.respond(500, b"internal error in a filter\n", details="filter_returned_invalid_value")

    def _filterFailed(self, failure: Failure, f) -> None:
        self.log.failure("HTTP filter {filter} failed", failure, filter=f)
        if not self._completed:
            self.respond(500, b"internal error in a filter\n", details="filter_failed")
