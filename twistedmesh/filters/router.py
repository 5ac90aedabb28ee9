"""
The router: the terminal HTTP filter. It matches the request against the listener's route table, then
redirects, answers directly, or proxies to a host of the route's cluster over a pooled upstream
connection, with the route's timeout and retry policy.

One L{RouterFilter} per stream carries one upstream attempt at a time; it is also the pool's waiter and the
upstream connection's exchange, so a proxied request costs one object here, not a Deferred chain.

Response flags and details follow Envoy's: C{NR} C{route_not_found}, C{UH} C{no_healthy_upstream},
C{UF} C{upstream_reset_before_response_started{connection_failure}}, C{UT} C{upstream_response_timeout},
C{UC}/C{UR} for upstream resets, C{URX} when retries ran out; an upstream's answer that ends without
incident has no flag and details C{via_upstream}.

gRPC (docs/grpc.md): a gRPC request's C{grpc-timeout} is its timeout, capped by the route's; a timeout
answers it C{DEADLINE_EXCEEDED}; C{retry.grpc_on} retries on the C{grpc-status} of a trailers-only response.
"""

from __future__ import annotations

from typing import List, Optional

from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from ..http import h1
from ..http.grpc import DEADLINE_EXCEEDED, RETRY_ON_STATUSES, encodeTimeout, isGRPC, parseTimeout
from ..http.stream import HTTPFilter, Stream
from ..interfaces import IHTTPFilterFactory
from ..upstream.lb import requestHashKey

# The pool's failure reasons as Envoy's %RESPONSE_CODE_DETAILS% name them.
_RESET_REASONS = {"upstream_reset": "connection_termination", "protocol_error": "protocol_error"}
_BACKOFF_BASE = 0.025  # Envoy's: fully jittered exponential back-off from 25 ms, capped at 10x
# retry.grpc_on's names by the gRPC status they stand for.
_GRPC_RETRY_NAMES = {code: name for name, code in RETRY_ON_STATUSES.items()}


def _allows(on, codes, why: str, status: int) -> bool:
    """
    Whether a route's C{retry.on} list allows a retry for C{why} (C{"connect-failure"}, C{"reset"},
    C{"refused-stream"}, C{"per-try-timeout"}, or C{"status"} with the upstream's C{status}).
    """
    if why == "status":
        return (("5xx" in on and status >= 500)
                or ("gateway-error" in on and status in (502, 503, 504))
                or ("retriable-4xx" in on and status == 409)
                or ("retriable-status-codes" in on and status in codes))
    if why == "connect-failure":
        return "connect-failure" in on or "5xx" in on or "gateway-error" in on or "reset" in on
    if why == "reset":
        return "reset" in on or "5xx" in on or "gateway-error" in on
    if why == "refused-stream":
        # An HTTP/2 stream the upstream refused (or never processed, past its GOAWAY): safe to retry.
        return "refused-stream" in on or "reset" in on or "5xx" in on or "gateway-error" in on
    if why == "per-try-timeout":
        return "5xx" in on or "gateway-error" in on
    return False


def _grpcStatus(headers: list) -> int:
    """
    The C{grpc-status} in a response's headers (a trailers-only gRPC response), or -1.
    """
    for name, value in headers:
        if name == b"grpc-status":
            value = value.strip()
            return int(value) if value.isdigit() and len(value) <= 3 else -1
    return -1


class _Shared:
    """
    What every stream's router of one listener shares: resolved once at config load. C{clusters} is the
    service's live mapping of the clusters in effect (reloads and CDS change it in place): each stream looks
    its cluster up in it once and keeps that object to the end, retries included.
    """

    __slots__ = ("table", "clusters", "clock", "random", "log")

    def __init__(self, table, clusters, clock, random) -> None:
        self.table = table
        self.clusters = clusters
        self.clock = clock
        self.random = random


class _Attempt:
    """
    The pool's waiter for one attempt. A retry starts a new attempt while an old connect may still be
    pending; only the current attempt's answer reaches the router, a stale connection goes back to its
    pool.
    """

    __slots__ = ("router", "pending")

    def __init__(self, router: "RouterFilter") -> None:
        self.router = router
        self.pending = None  # the breaker's pending count this attempt holds a place in, while waiting

    def _unpend(self) -> None:
        pending = self.pending
        if pending is not None:
            self.pending = None
            pending.add(-1)

    def poolReady(self, conn) -> None:
        self._unpend()
        router = self.router
        if router.attempt is self and not router.finished:
            router.attempt = None
            router.poolReady(conn)
        else:
            conn.pool.release(conn)

    def poolFailed(self, reason: str, timedOut: bool) -> None:
        self._unpend()
        router = self.router
        if router.attempt is self and not router.finished:
            router.attempt = None
            router.poolFailed(reason, timedOut)


class RouterFilter(HTTPFilter):
    """
    Routes one stream (see the module docstring). Also implements the pool's waiter
    (C{poolReady}/C{poolFailed}) and the upstream connection's exchange (C{upstream*}).
    """

    log = Logger()

    __slots__ = ("shared", "stream", "route", "cluster", "host", "conn", "head", "chunked", "hasBody",
                 "buffered", "bufferedBytes", "replayable", "requestDone", "trailers", "timer", "tryTimer",
                 "retriesLeft", "attempts", "responseStarted", "finished", "retryTimer", "pausedForConnect",
                 "attempt", "limitExceeded", "idleTimer", "hashKey", "counted", "rqStart", "retrying",
                 "declared", "sent", "bodyOn")

    def __init__(self, shared: _Shared) -> None:
        self.shared = shared
        self.stream: Optional[Stream] = None
        self.route = None
        self.cluster = None
        self.host = None
        self.conn = None
        self.head = b""
        self.chunked = False
        self.hasBody = False
        self.buffered: List[bytes] = []
        self.bufferedBytes = 0
        self.replayable = True
        self.requestDone = False
        self.trailers = None
        self.timer = None
        self.tryTimer = None
        self.retryTimer = None
        self.retriesLeft = 0
        self.attempts = 0
        self.responseStarted = False
        self.finished = False
        self.pausedForConnect = False
        self.attempt: Optional[_Attempt] = None
        self.limitExceeded = False  # a retry the policy allowed was refused for want of retries (URX)
        self.idleTimer = None  # the route's idle_timeout: no body bytes either way for that long
        self.counted = False  # holds a place in the cluster's max_requests circuit breaker
        self.rqStart = 0.0  # when the current attempt went upstream, for upstream_rq_time
        self.bodyOn = None  # the upstream connection our request body producer is registered with
        self.retrying = False  # holds a place in its max_retries circuit breaker
        self.hashKey = None  # what ring_hash / maglev hash for this request (kept for retries)

    # -- request hooks ------------------------------------------------------------------------------------

    def requestHeaders(self, stream: Stream) -> object:
        self.stream = stream
        shared = self.shared
        route = shared.table.match(stream) if shared.table is not None else None
        if route is None:
            return stream.respond(404, b"", flag="NR", details="route_not_found")
        self.route = route
        stream.route = route
        if not route.forwards:
            direct = route.directResponse
            if direct is not None:
                return stream.respond(direct.status, direct.body, details="direct_response")
            return stream.respond(route.redirectStatus, b"", [(b"location", route.redirectLocation(stream))],
                                  details="redirect")
        clusterName = route.pickCluster(shared.random)
        cluster = shared.clusters.get(clusterName)
        if cluster is None:  # with CDS, a cluster the control plane has not provided (yet)
            return stream.respond(503, b"", flag="NC", details="cluster_not_found")
        self.cluster = cluster
        stream.upstreamCluster = cluster
        breaker = cluster.breaker
        if breaker.requests.full():
            return self._overflow()
        breaker.requests.add(1)
        self.counted = True
        route.rewrite(stream)
        if cluster.hashPolicy is not None:
            self.hashKey = requestHashKey(cluster.hashPolicy, stream)
        timeout = route.timeout
        # One pass for the two fields the router reads (the first of each, as getRequestHeader would).
        length = deadline = None
        for name, value in stream.requestHeaders:
            if name == b"content-length":
                if length is None:
                    length = value
            elif name == b"grpc-timeout":
                if deadline is None:
                    deadline = value
        if deadline is not None:
            # Before the head is encoded: the upstream may have to be told a shorter deadline.
            timeout = self._grpcTimeout(stream, deadline, timeout)
        self.head, self.chunked, self.hasBody = self._encodeHead(stream, length)
        self.requestDone = not self.hasBody
        retry = route.retry
        self.retriesLeft = retry.num if retry.on or retry.grpc_on else 0
        if route.idleTimeout:
            self.idleTimer = shared.clock.callLater(route.idleTimeout, self._idle)
        if timeout:
            self.timer = shared.clock.callLater(timeout, self._timedOut)
        self._attempt()
        return None

    def _grpcTimeout(self, stream: Stream, value: bytes, routeTimeout: Optional[float]) -> Optional[float]:
        """
        The timeout of a request with a C{grpc-timeout} header: the client's deadline, capped by the route's
        C{timeout} when it has one (Envoy's C{max_grpc_timeout}); the route's own when the request is not
        gRPC or the value is malformed. When the cap shortens the deadline, the header sent upstream says so,
        so the server does not work for a caller the proxy will have answered already.
        """
        if not isGRPC(stream.getRequestHeader(b"content-type")):
            return routeTimeout
        asked = parseTimeout(value)
        if asked is None:
            return routeTimeout
        if routeTimeout is None or asked <= routeTimeout:
            return asked
        headers = stream.requestHeaders
        for i, (name, _) in enumerate(headers):
            if name == b"grpc-timeout":
                headers[i] = (name, encodeTimeout(routeTimeout))
        return routeTimeout

    def _encodeHead(self, stream: Stream, length: Optional[bytes]):
        # Framing comes from what the client declared (chunked, or a content-length: C{length}, the request's
        # first content-length field), never from how much of the body happens to have arrived by now: a body
        # that is all queued behind a paused filter must still be framed, or its bytes would be read upstream
        # as the next request.
        self.declared = -1
        self.sent = 0
        if stream.chunked:
            hasBody = chunked = True
        else:
            chunked = False
            hasBody = length is not None and length != b"0"
            if hasBody:
                self.declared = int(length)
        if self.cluster.http2:
            # An HTTP/2 upstream takes the fields themselves (h2 encodes them), pseudo-headers first.
            return self.cluster.pools.requestFields(stream), chunked, hasBody
        # The connection manager already added the forwarding headers; Host goes first, as clients send it.
        return (h1.encodeRequestHead(stream.method, stream.path, stream.requestHeaders, chunked, stream.authority),
                chunked, hasBody)

    def requestData(self, stream: Stream, data: bytes, end: bool) -> object:
        if self.idleTimer is not None:
            self.idleTimer.reset(self.route.idleTimeout)
        conn = self.conn
        if data:
            if not self.chunked:
                # A filter that changed the body's length without fixing content-length (or removed it)
                # must not make the upstream read the surplus as another request.
                self.sent += len(data)
                if self.sent > self.declared:
                    return self._framingError()
            if self.replayable:
                self.bufferedBytes += len(data)
                if not self.retriesLeft or self.bufferedBytes > self.route.retry.replay_buffer:
                    self.replayable = False  # too big to replay: no retry once any of it is sent
            if conn is None or self.replayable:
                # Not connected yet (reading is paused meanwhile, so this stays small), or kept for a retry.
                self.buffered.append(data)
            if conn is not None:
                conn.writeBody(data, self.chunked)
        if end:
            if not self.chunked and self.hasBody and self.sent != self.declared:
                return self._framingError()
            self.requestDone = True
            if conn is not None:
                self._unregisterBody()
                conn.endBody(self.chunked)
        return None

    def _framingError(self):
        """
        The body does not match the framing sent upstream: that connection can never be trusted again.
        """
        self.stream.log.error("request body on {path} does not match its content-length (a filter changed "
                              "the body without fixing the header?)", path=self.stream.path)
        self._abandon()
        if self.responseStarted:
            self._done()
            self.stream.reset("request_body_framing_error")
            return None
        self._done()
        self.cluster.byClass[5].value += 1
        return self.stream.respond(500, b"request body does not match its content-length\n",
                                   details="request_body_framing_error")

    def requestTrailers(self, stream: Stream, trailers) -> object:
        self.trailers = trailers
        self.requestDone = True
        conn = self.conn
        if conn is not None:
            self._unregisterBody()
            conn.endBody(self.chunked, trailers)
        return None

    # -- attempts -----------------------------------------------------------------------------------------

    def _attempt(self) -> None:
        self.attempts += 1
        if not self.requestDone and not self.pausedForConnect:
            # Until a connection is ready there is nowhere to put the body: stop reading it.
            self.pausedForConnect = True
            self.stream.codec.pauseRequest(self.stream)
        host = self.cluster.pick(self.host, self.hashKey)
        if host is None:
            self.cluster.upstream_cx_none_healthy.value += 1
            self._fail(503, "UH", "no_healthy_upstream", b"no healthy upstream")
            return
        self.host = host
        self.stream.upstreamHost = host
        retry = self.route.retry
        if retry.per_try_timeout:
            self.tryTimer = self.shared.clock.callLater(retry.per_try_timeout, self._tryTimedOut)
        self.attempt = attempt = _Attempt(self)
        pool = self.cluster.pools.forHost(host)
        pending = self.cluster.breaker.pending
        if not pool.idle and pending.full():
            self._overflow()
            return
        pool.acquire(attempt)
        if self.attempt is attempt:
            # Not handed a connection at once: waiting for one to connect (or to free up).
            attempt.pending = pending
            pending.add(1)

    def poolReady(self, conn) -> None:
        """
        The current attempt's connection is ready (called through its L{_Attempt}).
        """
        self.conn = conn
        outlier = self.cluster.outlier
        if outlier is not None:
            outlier.onConnectSuccess(self.host)
        # Envoy counts upstream requests per request attached to an upstream connection: each retry
        # counts, a request that never got a connection (UH, UF) does not.
        cluster = self.cluster
        cluster.upstream_rq_total.value += 1
        cluster.upstream_rq_active.value += 1
        self.rqStart = self.shared.clock.seconds()
        conn.pool.host.rq_active += 1  # what least_request balances on
        stream = self.stream
        up = getattr(conn, "output", None)  # an HTTP/1.1 upstream connection
        if up is not None:
            # See twistedmesh.http.output: while a read of either connection is handled, the writes it causes
            # on the other are collected and sent once it is handled.
            down = getattr(stream.codec, "output", None)  # an HTTP/1.1 downstream
            conn.peerOutput = down
            if down is not None:
                down.hold(up)
        conn.begin(self, stream.method, self.head, self.hasBody)
        stream.codec.registerResponseProducer(conn.transport)
        for data in self.buffered:
            conn.writeBody(data, self.chunked)
        if not self.replayable:
            self.buffered = []
        if self.requestDone:
            if self.hasBody:
                conn.endBody(self.chunked, self.trailers)
        else:
            conn.transport.registerProducer(stream.codec.bodyProducer, True)
            self.bodyOn = conn
        if self.pausedForConnect:
            self.pausedForConnect = False
            stream.codec.resumeRequest(stream)

    def poolFailed(self, reason: str, timedOut: bool) -> None:
        """
        The current attempt could not connect (called through its L{_Attempt}).
        """
        self._cancelTryTimer()
        self.host.rq_error += 1
        self.stream.state["upstreamTransportFailureReason"] = reason
        outlier = self.cluster.outlier
        if outlier is not None and reason != "pool closed":  # a pool closed at shutdown says nothing of the host
            outlier.onLocalFailure(self.host, "connect")
        if self._retry("connect-failure"):
            return
        self._fail(503, "UF", "upstream_reset_before_response_started{connection_failure}",
                   b"upstream connect error or disconnect/reset before headers. reset reason: connection failure")

    def _retry(self, why: str, status: int = 0) -> bool:
        """
        Start another attempt if the route's policy allows it for C{why}; return whether it did.
        """
        retry = self.route.retry
        if why == "grpc":
            # status is the response's grpc-status here.
            if _GRPC_RETRY_NAMES.get(status) not in retry.grpc_on:
                return False
        elif not retry.on or not _allows(retry.on, retry.retriable_status_codes, why, status):
            return False
        if self.retriesLeft <= 0:
            self.limitExceeded = True  # Envoy's URX: the policy would retry, the limit says no
            return False
        if not self.replayable or self.responseStarted or self.cluster.pools.closed:
            return False
        if not self.retrying:
            if not self.cluster.breaker.retryAllowed():
                return False
            self.retrying = True
        self.retriesLeft -= 1
        self.cluster.upstream_rq_retry.value += 1
        if self.attempt is not None:
            self.attempt._unpend()  # its connect, if it lands, goes back to the pool
        self.attempt = None
        self._abandon()
        n = self.attempts
        cap = _BACKOFF_BASE * 10
        delay = self.shared.random.uniform(0, min(_BACKOFF_BASE * (2 ** (n - 1)), cap))
        self.retryTimer = self.shared.clock.callLater(delay, self._retryNow)
        return True

    def _retryNow(self) -> None:
        self.retryTimer = None
        if not self.finished:
            self._attempt()

    # -- upstream exchange --------------------------------------------------------------------------------

    def upstreamHead(self, status: int, headers: list, hasBody: bool) -> None:
        if self.finished:
            return
        # Every upstream answer counts, retried or not (Envoy charges each response).
        self.cluster.byClass[status // 100].value += 1
        outlier = self.cluster.outlier
        if outlier is not None:
            # Before the retry decision, so that a retry already avoids a host this answer ejected.
            outlier.onResponse(self.host, status)
        if self._retry("status", status) or (self.route.retry.grpc_on and
                                             self._retry("grpc", _grpcStatus(headers))):
            self._cancelTryTimer()
            self.host.rq_error += 1
            return
        self._cancelTryTimer()
        self.responseStarted = True
        stream = self.stream
        stream.state["responseStartTime"] = self.shared.clock.seconds()  # %RESPONSE_DURATION%
        if self.limitExceeded:
            stream.responseFlags.append("URX")
        stream.status = status
        stream.responseHeaders = h1.stripHopByHop(headers)
        if status == 101 and stream.upgrade is not None:
            # The upstream accepts the upgrade: the client must see it accept, hop-by-hop or not.
            for name, value in headers:
                if name == b"upgrade":
                    stream.responseHeaders = stream.responseHeaders + [(b"connection", b"upgrade"), (name, value)]
                    break
        if status >= 500:
            self.host.rq_error += 1
        # A 101 is no end: the tunnel follows (upstreamUpgraded).
        stream.sendResponseHeaders(not hasBody and status != 101)

    def upstreamData(self, data: bytes) -> None:
        if self.idleTimer is not None:
            self.idleTimer.reset(self.route.idleTimeout)
        if not self.finished:
            self.stream.sendResponseData(data, False)

    def upstreamEnd(self, trailers) -> None:
        conn = self._detach()
        if self.finished or not self.responseStarted:
            return
        self._done()
        self.cluster.upstream_rq_time.record((self.shared.clock.seconds() - self.rqStart) * 1000.0)
        if conn is not None:
            self._unregister(conn)
        stream = self.stream
        if trailers:
            stream.sendResponseTrailers(trailers)
        elif not stream.responseEnded:
            stream.sendResponseData(b"", True)

    def upstreamUpgraded(self, conn, data: bytes) -> None:
        """
        The upstream switched protocols: the stream becomes a tunnel, outside timeouts and retries.
        """
        self._detach()
        self._releaseBody(conn)
        if self.finished:
            conn.abandon()
            return
        self._done()
        stream = self.stream
        if stream.upgrade is None:
            # A 101 nobody asked for: the bytes after it cannot be HTTP any more.
            conn.abandon()
            stream.reset("upstream_unrequested_upgrade")
            return
        stream.codec.startTunnel(stream, conn, data)

    def upstreamFailed(self, reason: str, headersReceived: bool) -> None:
        conn = self._detach()
        if self.finished:
            return
        if conn is not None:
            self._unregister(conn)
        self._cancelTryTimer()
        self.host.rq_error += 1
        outlier = self.cluster.outlier
        if outlier is not None:
            outlier.onLocalFailure(self.host, "reset")
        if self.responseStarted:
            self._done()
            self.stream.responseFlags.append("UR")
            envoyReason = _RESET_REASONS.get(reason.partition(":")[0], reason)
            self.stream.reset("upstream_reset_after_response_started{" + envoyReason + "}")
            return
        if reason == "tls_handshake_failed":
            # Envoy's view: the connection to the upstream failed, and TLS is why.
            self.stream.state["upstreamTransportFailureReason"] = "TLS_error"
            if self._retry("connect-failure"):
                return
            self._fail(503, "UF", "upstream_reset_before_response_started{connection_failure,TLS_error}",
                       b"upstream connect error or disconnect/reset before headers. reset reason: "
                       b"connection failure, transport failure reason: TLS_error")
            return
        # An HTTP/2 upstream's RST_STREAM (reasons "remote_...") is Envoy's UR; a closed connection UC.
        remote = reason[:7] == "remote_"
        if self._retry("refused-stream" if reason == "remote_refused_stream_reset" else "reset"):
            return
        envoyReason = _RESET_REASONS.get(reason.partition(":")[0], reason)
        self._fail(503, "UR" if remote else "UC", "upstream_reset_before_response_started{" + envoyReason + "}",
                   b"upstream connect error or disconnect/reset before headers. reset reason: " +
                   envoyReason.encode("utf-8", "replace"))

    # -- timeouts, failure, completion --------------------------------------------------------------------

    def _timedOut(self) -> None:
        self.timer = None
        self.cluster.upstream_rq_timeout.value += 1
        outlier = self.cluster.outlier
        if outlier is not None and self.conn is not None and not self.responseStarted:
            outlier.onLocalFailure(self.host, "timeout")
        self._abandon()
        if self.responseStarted:
            self._done()
            self.stream.responseFlags.append("UT")
            self.stream.reset("upstream_response_timeout")
        else:
            self._fail(504, "UT", "upstream_response_timeout", b"upstream request timeout", DEADLINE_EXCEEDED)

    def _idle(self) -> None:
        # Envoy's stream idle timeout: 408 while nothing was answered yet, a reset after that.
        self.idleTimer = None
        self._abandon()
        if self.responseStarted:
            self._done()
            self.stream.responseFlags.append("SI")
            self.stream.reset("stream_idle_timeout")
        else:
            self._fail(408, "SI", "stream_idle_timeout", b"stream timeout")

    def _tryTimedOut(self) -> None:
        self.tryTimer = None
        self.cluster.upstream_rq_per_try_timeout.value += 1
        outlier = self.cluster.outlier
        if outlier is not None and self.conn is not None:
            outlier.onLocalFailure(self.host, "timeout")
        if self._retry("per-try-timeout"):
            return
        self._abandon()
        self._fail(504, "UT", "upstream_per_try_timeout", b"upstream request timeout", DEADLINE_EXCEEDED)

    def _fail(self, status: int, flag: str, details: str, body: bytes, grpcStatus: Optional[int] = None) -> None:
        # grpcStatus: what a gRPC client gets instead of the one status maps to (a timeout is
        # DEADLINE_EXCEEDED, as in Envoy, not the UNAVAILABLE of a 504, which invites a retry).
        self._done()
        self.cluster.byClass[status // 100].value += 1
        flags = self.stream.responseFlags
        flags.append(flag)
        if self.limitExceeded:
            flags.append("URX")
        self.stream.respond(status, body + b"\n", details=details, grpcStatus=grpcStatus)

    def _done(self) -> None:
        if self.finished:
            return
        self.finished = True
        attempt, self.attempt = self.attempt, None
        if attempt is not None:
            # Still waiting for a connection: give up the pending slot and the place in the pool's queue.
            attempt._unpend()
            pool = self.cluster.pools.pools.get(self.host)
            if pool is not None:
                pool.cancel(attempt)
        breaker = self.cluster.breaker
        if self.counted:
            self.counted = False
            breaker.requests.add(-1)
        if self.retrying:
            self.retrying = False
            breaker.retries.add(-1)
        if self.pausedForConnect:
            self.pausedForConnect = False
            self.stream.codec.resumeRequest(self.stream)
        self._cancelTryTimer()
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.idleTimer is not None and self.idleTimer.active():
            self.idleTimer.cancel()
        self.idleTimer = None
        if self.retryTimer is not None and self.retryTimer.active():
            self.retryTimer.cancel()
        self.retryTimer = None

    def _cancelTryTimer(self) -> None:
        if self.tryTimer is not None and self.tryTimer.active():
            self.tryTimer.cancel()
        self.tryTimer = None

    def _detach(self):
        """
        Take the current attempt's connection off this router (counting the upstream request out).
        """
        conn, self.conn = self.conn, None
        if conn is not None:
            self.cluster.upstream_rq_active.value -= 1
            conn.pool.host.rq_active -= 1
        return conn

    def _overflow(self):
        """
        A circuit breaker is open: answer at once, as Envoy does, rather than queue behind a struggling
        upstream.
        """
        self.cluster.breaker.upstream_rq_pending_overflow.value += 1
        self._done()
        self.cluster.byClass[5].value += 1
        return self.stream.respond(
            503, b"upstream connect error or disconnect/reset before headers. reset reason: overflow\n",
            [(b"x-envoy-overloaded", b"true")], flag="UO",
            details="upstream_reset_before_response_started{overflow}")

    def _abandon(self) -> None:
        """
        Give up the current attempt's connection mid-exchange: it is closed, never reused.
        """
        conn = self._detach()
        if conn is not None:
            self._unregister(conn)
            conn.abandon()

    def _unregisterBody(self) -> None:
        conn = self.conn
        if conn is not None:
            self._releaseBody(conn)

    def _releaseBody(self, conn) -> None:
        # Only ours: a connection already handed to the next exchange carries that exchange's producer.
        # (Our own record, not transport.producer, which Twisted's TLS transport does not keep.)
        body = self.stream.codec.bodyProducer
        if self.bodyOn is conn:
            self.bodyOn = None
            conn.transport.unregisterProducer()
            # Unregistering does not resume a producer the upstream had paused: do it, or the downstream
            # stays paused for good.
            body.resumeProducing()

    def _unregister(self, conn) -> None:
        self._releaseBody(conn)
        self.stream.codec.unregisterResponseProducer()

    def streamComplete(self, stream: Stream) -> None:
        if self.stream is None:
            return
        if self.responseStarted and not stream.responseCodeDetails:
            # Envoy's %RESPONSE_CODE_DETAILS% for an answer from the upstream that nothing else explains.
            stream.responseCodeDetails = "via_upstream"
        # The downstream went away (or was reset) mid-exchange: that connection's state is unknown.
        self._abandon()
        if not self.finished and self.cluster is not None:
            self._done()


@implementer(IPlugin, IHTTPFilterFactory)
class RouterFactory:
    """
    The C{router} plugin: the terminal filter of an HTTP listener's chain. It has no options of its own;
    its routes come from the listener's C{routes =} table (C{[route:TABLE/NAME]} sections).
    """

    name = "router"

    def configure(self, options, context):
        """
        Resolve the listener's route table once; every stream gets a L{RouterFilter} sharing it.
        """
        table = getattr(context, "routes", None)
        if table is None:
            options.error(None, "the router needs the listener to name a route table: routes = TABLE")
        shared = _Shared(table, context.clusters, context.reactor, context.random)

        def make(stream) -> RouterFilter:
            return RouterFilter(shared)

        return make
