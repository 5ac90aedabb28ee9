"""
Unit tests for L{twistedmesh.filters.router}: the router's traffic management (route timeout, per-try
timeout, retries and their back-off, replay of the request body, response flags and details, stats) on
a whole L{MeshService} driven without sockets.

Every test runs on a L{MemoryReactorClock}: the downstream client is an L{HTTPConnection} on a memory
transport, and every upstream host's endpoint is replaced by a L{FakeEndpoint} whose connection attempts
the test completes (with an L{UpstreamConnection} on a memory transport) or fails, in the order the router
made them. Closes are reported the way a real reactor reports them: on a later turn (C{clock.advance(0)}).
"""

from __future__ import annotations

import random
from typing import List, Optional, Tuple

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twistedmesh.config import loadString
from twistedmesh.http import server
from twistedmesh.http.stream import Stream
from twistedmesh.service import MeshService
from twistedmesh.upstream.http1 import UpstreamConnection

ROUTES = """
[route:main/idle]
prefix = /idle/
cluster = origin
idle_timeout = 2s
[route:main/redirect]
path = /old
redirect = https://example.com/new
[route:main/direct]
path = /hello
direct_response.status = 200
direct_response.body = hello from the proxy
[route:main/quick]
prefix = /quick/
cluster = origin
timeout = 1s
[route:main/try]
prefix = /try/
cluster = origin
timeout = 10s
retry.on = 5xx
retry.num = 1
retry.per_try_timeout = 500ms
[route:main/trycf]
prefix = /trycf/
cluster = origin
retry.on = connect-failure
retry.per_try_timeout = 500ms
[route:main/5xx]
prefix = /5xx/
cluster = origin
retry.on = 5xx
retry.num = 1
[route:main/two]
prefix = /two/
cluster = origin
retry.on = 5xx
retry.num = 2
[route:main/codes]
prefix = /codes/
cluster = origin
retry.on = retriable-status-codes
retry.retriable_status_codes = 409, 418
[route:main/gw]
prefix = /gw/
cluster = origin
retry.on = gateway-error
[route:main/small]
prefix = /small/
cluster = origin
retry.on = 5xx
retry.replay_buffer = 16
[route:main/tight]
prefix = /tight/
cluster = origin
timeout = 10ms
retry.on = connect-failure
[route:main/cf]
prefix = /cf/
cluster = origin
retry.on = connect-failure
[route:main/all]
prefix = /
cluster = origin
"""


def config(hosts: int, weights: Tuple[int, ...] = ()) -> str:
    """
    The proxy's configuration: HTTP listeners with L{ROUTES} and a cluster of C{hosts} hosts (of
    C{weights}, default 1).
    """
    weights = weights or (1,) * hosts
    endpoints = ", ".join(f"tcp:10.0.0.{i + 1}:80 weight={weights[i]}" for i in range(hosts))
    return f"""
[mesh]
admin = off
[listener:web]
endpoint = tcp:0
protocol = http
routes = main
[listener:one]
endpoint = tcp:0
protocol = http
routes = main
max_requests_per_connection = 1
{ROUTES}
[cluster:origin]
endpoints = {endpoints}
connect_timeout = 5s
"""


def ok(body: bytes = b"ok", status: bytes = b"200 OK") -> bytes:
    """
    An upstream response with a Content-Length body.
    """
    return b"HTTP/1.1 %s\r\ncontent-length: %d\r\n\r\n%s" % (status, len(body), body)


# -- doubles


class MemoryTransport(StringTransport):
    """
    A L{StringTransport} that reports its close to its protocol on a later turn of the clock, as a real
    reactor does, and remembers whether the close was an abort.
    """

    def __init__(self, clock: MemoryReactorClock, protocol, **kwargs) -> None:
        super().__init__(**kwargs)
        self.clock = clock
        self.protocol = protocol
        self.aborted = False
        self._lostScheduled = False

    def _scheduleLost(self, reason) -> None:
        if not self._lostScheduled:
            self._lostScheduled = True
            self.clock.callLater(0, self.protocol.connectionLost, Failure(reason))

    def loseConnection(self) -> None:
        self.disconnecting = True
        self._scheduleLost(ConnectionDone())

    def abortConnection(self) -> None:
        self.aborted = True
        self.disconnecting = self.disconnected = True
        self._scheduleLost(ConnectionAborted())

    def closedByPeer(self, reason=None) -> None:
        """
        The other side closed: report it now.
        """
        self._lostScheduled = True
        self.disconnecting = self.disconnected = True
        self.protocol.connectionLost(Failure(reason or ConnectionDone()))


class RecordingStream(Stream):
    """
    A L{Stream} that remembers itself and its router (the last filter, which L{Stream.complete} drops)
    in C{made}, so that a test can look at streams that have already completed.
    """

    made: List["RecordingStream"] = []

    def __init__(self, codec, makers, *args, **kwargs) -> None:
        super().__init__(codec, makers, *args, **kwargs)
        self.router = self.filters[-1] if self.filters else None
        self.made.append(self)


class FakeEndpoint:
    """
    A host's client endpoint: every C{connect} is recorded, in order, in the test's C{connects} list as
    C{(host, factory, deferred)}.
    """

    def __init__(self, test: "RouterTestBase", host) -> None:
        self.test = test
        self.host = host

    def connect(self, factory) -> Deferred:
        d: Deferred = Deferred()
        self.test.connects.append((self.host, factory, d))
        return d


class Response:
    """
    One response as the downstream client read it.
    """

    def __init__(self, status: int, headers: List[Tuple[bytes, bytes]], body: bytes, complete: bool) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.complete = complete

    def header(self, name: bytes) -> Optional[bytes]:
        for k, v in self.headers:
            if k == name:
                return v
        return None


def parseResponses(data: bytes) -> List[Response]:
    """
    The HTTP/1.1 responses in C{data} (Content-Length or chunked bodies; the last may be truncated).
    """
    responses = []
    while data:
        head, sep, data = data.partition(b"\r\n\r\n")
        if not sep:
            raise AssertionError(f"incomplete response head: {head!r}")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.strip().lower(), value.strip()))
        r = Response(status, headers, b"", True)
        length = r.header(b"content-length")
        if r.header(b"transfer-encoding") == b"chunked":
            body = b""
            while True:
                size, sep, rest = data.partition(b"\r\n")
                if not sep:
                    r.complete = False
                    data = b""
                    break
                n = int(size, 16)
                if n == 0:
                    data = rest[2:] if rest.startswith(b"\r\n") else rest
                    r.complete = rest.startswith(b"\r\n")
                    break
                if len(rest) < n + 2:
                    body += rest[:n]
                    r.complete = False
                    data = b""
                    break
                body += rest[:n]
                data = rest[n + 2:]
            r.body = body
        elif length is not None:
            n = int(length)
            r.body, data = data[:n], data[n:]
            r.complete = len(r.body) == n
        responses.append(r)
    return responses


class Client:
    """
    A downstream connection to the proxy's listener, on a L{MemoryTransport}.
    """

    def __init__(self, test: "RouterTestBase", listener: str = "web") -> None:
        peer = IPv4Address("TCP", "192.0.2.7", 50000)
        self.protocol = test.service.listeners[listener].factory.buildProtocol(peer)
        self.transport = MemoryTransport(test.clock, self.protocol, peerAddress=peer)
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    @property
    def streams(self) -> List[RecordingStream]:
        """
        The streams of this connection, in request order.
        """
        return [s for s in RecordingStream.made if s.codec is self.protocol]

    @property
    def stream(self) -> RecordingStream:
        """
        The connection's first stream.
        """
        return self.streams[0]

    def responses(self) -> List[Response]:
        return parseResponses(self.transport.value())

    def response(self) -> Response:
        responses = self.responses()
        if len(responses) != 1:
            raise AssertionError(f"expected one response, got {self.transport.value()!r}")
        return responses[0]

    @property
    def router(self):
        return self.stream.router


# -- base


class RouterTestBase(SynchronousTestCase):
    """
    A proxy with L{ROUTES} in front of a cluster C{origin} of C{hosts} hosts that connect through
    L{FakeEndpoint}s.
    """

    hosts = 2
    weights: Tuple[int, ...] = ()

    def setUp(self) -> None:
        self.patch(server, "Stream", RecordingStream)
        self.patch(RecordingStream, "made", [])
        self.clock = MemoryReactorClock()
        self.service = MeshService(loadString(config(self.hosts, self.weights), "test.ini"), self.clock, seed=1)
        self.cluster = self.service.clusters["origin"]
        self.connects: List[tuple] = []
        for host in self.cluster.hosts:
            host.client = FakeEndpoint(self, host)

    def stat(self, name: str) -> int:
        return self.service.stats.get(name).value

    def cstat(self, name: str) -> int:
        return self.stat("cluster.origin." + name)

    def hstat(self, name: str) -> int:
        return self.stat("http.web." + name)

    def get(self, path: bytes, extra: bytes = b"") -> Client:
        client = Client(self)
        client.send(b"GET %s HTTP/1.1\r\nHost: example.com\r\n%s\r\n" % (path, extra))
        return client

    def connect(self, index: int = -1) -> Tuple[UpstreamConnection, MemoryTransport]:
        """
        Complete connection attempt C{index} (in the order made): the upstream connection and its
        transport.
        """
        host, factory, d = self.connects[index]
        conn = factory.buildProtocol(None)
        transport = MemoryTransport(self.clock, conn)
        conn.makeConnection(transport)
        d.callback(conn)
        return conn, transport

    def refuse(self, index: int = -1) -> None:
        """
        Fail connection attempt C{index}.
        """
        self.connects[index][2].errback(ConnectionRefusedError("refused"))

    def hostOf(self, index: int):
        return self.connects[index][0]

    def assertAbandoned(self, conn: UpstreamConnection, transport: MemoryTransport) -> None:
        """
        C{conn} was aborted and will never be handed out again.
        """
        self.assertTrue(transport.aborted, "the upstream connection was not aborted")
        self.assertTrue(conn.closing)
        self.assertNotIn(conn, conn.pool.idle)

    def backoffDelay(self, router) -> float:
        """
        The delay of the router's pending retry.
        """
        self.assertIsNotNone(router.retryTimer, "no retry is scheduled")
        return router.retryTimer.getTime() - self.clock.seconds()

    def assertBackoff(self, router, expected: float) -> None:
        """
        The router's pending retry is due in exactly C{expected} seconds.
        """
        self.assertIsNotNone(router.retryTimer, "no retry is scheduled")
        self.assertEqual(router.retryTimer.getTime(), self.clock.seconds() + expected)


# -- route timeout


class RouteTimeoutTests(RouterTestBase):
    """
    The route's C{timeout} bounds the whole exchange.
    """

    hosts = 1

    def test_timeoutBeforeResponse(self) -> None:
        """
        An upstream that does not answer within the route timeout gets a 504 with flag UT and details
        C{upstream_response_timeout}; the upstream connection is aborted, not reused.
        """
        client = self.get(b"/quick/x")
        conn, upT = self.connect()
        self.assertTrue(upT.value().startswith(b"GET /quick/x HTTP/1.1\r\n"))
        self.clock.advance(0.999)
        self.assertEqual(client.transport.value(), b"")
        self.clock.advance(0.001)
        r = client.response()
        self.assertEqual((r.status, r.body), (504, b"upstream request timeout\n"))
        self.assertEqual(client.stream.responseFlags, ["UT"])
        self.assertEqual(client.stream.responseCodeDetails, "upstream_response_timeout")
        self.assertEqual(self.cstat("upstream_rq_timeout"), 1)
        self.assertEqual(self.cstat("upstream_rq_active"), 0)
        self.assertEqual(self.cstat("upstream_rq_5xx"), 1)
        self.assertAbandoned(conn, upT)
        self.clock.advance(0)
        self.assertEqual(self.cluster.pools.forHost(self.cluster.hosts[0]).idle, [])
        # The client's request was complete: its connection stays open.
        self.assertFalse(client.transport.disconnecting)

    def test_connectionReusableAfterTimeout(self) -> None:
        """
        After a 504 the downstream connection carries the next request (the aborted upstream is no
        longer its response producer).
        """
        client = self.get(b"/quick/x")
        self.connect()
        self.clock.advance(1)
        client.transport.clear()
        client.send(b"GET /quick/y HTTP/1.1\r\nHost: example.com\r\n\r\n")
        conn, upT = self.connect()
        self.assertTrue(upT.value().startswith(b"GET /quick/y HTTP/1.1\r\n"))
        conn.dataReceived(ok(b"second"))
        self.assertEqual(client.response().body, b"second")

    def test_timeoutWhileConnecting(self) -> None:
        """
        A route timeout while the connect is pending answers 504; the connection that lands later goes
        idle into its host's pool with nothing written on it.
        """
        client = self.get(b"/quick/x")
        self.clock.advance(1)
        self.assertEqual(client.response().status, 504)
        conn, upT = self.connect()
        self.assertEqual(upT.value(), b"")
        self.assertEqual(conn.pool.idle, [conn])
        self.assertEqual(conn.pool.host, self.cluster.hosts[0])

    def test_timeoutAfterHeadResetsDownstream(self) -> None:
        """
        A route timeout after the response head was forwarded aborts the downstream connection: the
        truncated body never looks complete.
        """
        client = self.get(b"/quick/x")
        conn, upT = self.connect()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
        self.clock.advance(1)
        self.assertTrue(client.transport.aborted, "the downstream connection was not aborted")
        r = client.response()
        self.assertEqual((r.status, r.body, r.complete), (200, b"abc", False))
        self.assertIn("UT", client.stream.responseFlags)
        self.assertEqual(client.stream.responseCodeDetails, "upstream_response_timeout")
        self.assertEqual(self.cstat("upstream_rq_timeout"), 1)
        self.assertEqual(self.hstat("downstream_rq_tx_reset"), 1)
        self.assertAbandoned(conn, upT)

    def test_timeoutAfterHeadChunked(self) -> None:
        """
        A chunked response cut by the route timeout never gets its last chunk downstream.
        """
        client = self.get(b"/quick/x")
        conn, upT = self.connect()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
        self.clock.advance(1)
        self.assertTrue(client.transport.aborted)
        self.assertFalse(client.transport.value().endswith(b"0\r\n\r\n"))
        self.assertFalse(client.response().complete)

    def test_resetStreamLeavesNoActiveRequest(self) -> None:
        """
        A stream reset by the route timeout (after its head) is counted out of C{downstream_rq_active}
        once its connection is gone.
        """
        client = self.get(b"/quick/x")
        conn, upT = self.connect()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
        self.assertEqual(self.hstat("downstream_rq_active"), 1)
        self.clock.advance(1)
        self.clock.advance(0)  # the abort is reported
        self.assertTrue(client.stream.completed)
        self.assertEqual(self.hstat("downstream_rq_active"), 0)
        self.assertEqual(self.cstat("upstream_rq_active"), 0)


    def test_timeoutDuringBackoffCancelsRetry(self) -> None:
        """
        A route timeout during a retry's back-off answers 504 UT and cancels the retry.
        """
        self.patch(self.service.random, "uniform", lambda low, high: high)  # the longest back-off: 25 ms
        client = self.get(b"/tight/x")
        self.refuse()
        self.assertEqual(self.backoffDelay(client.router), 0.025)
        self.clock.advance(0.01)
        self.assertEqual(client.response().status, 504)
        self.assertEqual(client.stream.responseFlags, ["UT"])
        self.assertIsNone(client.router.retryTimer)
        self.clock.advance(1)
        self.assertEqual(len(self.connects), 1)
        self.assertEqual(self.cstat("upstream_rq_active"), 0)


# -- per-try timeout and back-off


class IdleTimeoutTests(RouterTestBase):
    """
    The route's C{idle_timeout} bounds the silence in an exchange, not its length.
    """

    hosts = 1

    def test_idleBeforeResponse(self) -> None:
        """
        An upstream silent for C{idle_timeout} before answering gets a 408 with flag SI.
        """
        client = self.get(b"/idle/x")
        conn, upT = self.connect()
        self.clock.advance(1.999)
        self.assertEqual(client.transport.value(), b"")
        self.clock.advance(0.001)
        r = client.response()
        self.assertEqual(r.status, 408)
        self.assertEqual(client.stream.responseFlags, ["SI"])
        self.assertEqual(client.stream.responseCodeDetails, "stream_idle_timeout")
        self.assertAbandoned(conn, upT)
        self.clock.advance(0)

    def test_activityResetsIdle(self) -> None:
        """
        Body bytes keep the exchange alive past the idle timeout; silence after the head resets it.
        """
        client = self.get(b"/idle/x")
        conn, upT = self.connect()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        for _ in range(5):
            self.clock.advance(1.5)
            conn.dataReceived(b"x" * 10)
        self.assertFalse(client.transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(client.transport.disconnecting)
        self.assertEqual(client.stream.responseCodeDetails, "stream_idle_timeout")
        self.clock.advance(0)


class PerTryTimeoutTests(RouterTestBase):
    """
    C{retry.per_try_timeout} bounds each attempt; a retry follows a jittered back-off.

    Host A weighs 3 and host B 1, so that a retry lands on B only because the router excludes the host
    that failed (round robin alone would pick A twice).
    """

    weights = (3, 1)

    def test_perTryTimeoutRetriesOnOtherHost(self) -> None:
        """
        A per-try timeout with a retry left starts a second attempt, on the other host, after a
        back-off drawn from the service's seeded random within [0, 25 ms].
        """
        client = self.get(b"/try/x")
        connA, tA = self.connect()
        self.assertTrue(tA.value().startswith(b"GET /try/x HTTP/1.1\r\n"))
        expected = random.Random()
        expected.setstate(self.service.random.getstate())
        self.clock.advance(0.5)
        self.assertEqual(self.cstat("upstream_rq_per_try_timeout"), 1)
        self.assertEqual(self.cstat("upstream_rq_retry"), 1)
        self.assertAbandoned(connA, tA)
        delay = expected.uniform(0, 0.025)
        self.assertBackoff(client.router, delay)
        self.assertTrue(0 <= delay <= 0.025, delay)
        self.assertEqual(len(self.connects), 1)
        self.clock.advance(delay)
        self.assertEqual(len(self.connects), 2)
        self.assertEqual([self.hostOf(0), self.hostOf(1)], list(self.cluster.hosts))
        connB, tB = self.connect()
        self.assertTrue(tB.value().startswith(b"GET /try/x HTTP/1.1\r\n"))
        connB.dataReceived(ok(b"from b"))
        r = client.response()
        self.assertEqual((r.status, r.body), (200, b"from b"))
        self.assertEqual(client.stream.responseFlags, [])
        self.assertEqual(connB.pool.idle, [connB])

    def test_secondBackoffBound(self) -> None:
        """
        The second retry's back-off is drawn from [0, 50 ms]: the interval doubles per retry, as Envoy's
        C{JitteredExponentialBackOffStrategy} does (25 ms, 50 ms, 100 ms, ... capped at 250 ms).
        """
        client = self.get(b"/two/x")
        self.connect()[0].dataReceived(ok(b"", b"503 Service Unavailable"))
        self.clock.advance(self.backoffDelay(client.router))
        expected = random.Random()
        expected.setstate(self.service.random.getstate())
        self.connect()[0].dataReceived(ok(b"", b"503 Service Unavailable"))
        self.assertBackoff(client.router, expected.uniform(0, 0.05))

    def test_perTryTimeoutNotRetriable(self) -> None:
        """
        A per-try timeout the policy does not retry (C{connect-failure} only) is a 504 with flag UT and
        details C{upstream_per_try_timeout}.
        """
        client = self.get(b"/trycf/x")
        conn, t = self.connect()
        self.clock.advance(0.5)
        r = client.response()
        self.assertEqual(r.status, 504)
        self.assertEqual(client.stream.responseFlags, ["UT"])
        self.assertEqual(client.stream.responseCodeDetails, "upstream_per_try_timeout")
        self.assertEqual(self.cstat("upstream_rq_retry"), 0)
        self.assertEqual(len(self.connects), 1)
        self.assertAbandoned(conn, t)

    def test_staleConnectGoesBackToItsPool(self) -> None:
        """
        A connect of a timed-out attempt that lands after the retry's is given to its own host's pool,
        unused: the request is sent once, on the retry's connection.
        """
        client = self.get(b"/try/x")
        self.clock.advance(0.5)  # the first connect (host A) is still pending
        self.clock.advance(self.backoffDelay(client.router))
        self.assertEqual(len(self.connects), 2)
        connB, tB = self.connect(1)
        self.assertTrue(tB.value().startswith(b"GET /try/x HTTP/1.1\r\n"))
        connA, tA = self.connect(0)
        self.assertEqual(tA.value(), b"")
        self.assertIs(connA.pool.host, self.cluster.hosts[0])
        self.assertEqual(connA.pool.idle, [connA])
        self.assertNotIn(connA, connB.pool.idle)
        connB.dataReceived(ok(b"b"))
        self.assertEqual(client.response().body, b"b")
        self.assertEqual(self.cluster.hosts[0].rq_total, 0)
        self.assertEqual(self.cluster.hosts[1].rq_total, 1)

    def test_staleConnectDuringBackoff(self) -> None:
        """
        A connect of a timed-out attempt that lands during the retry's back-off is not used by the retry.
        """
        client = self.get(b"/try/x")
        self.clock.advance(0.5)
        connA, tA = self.connect(0)
        self.assertEqual(tA.value(), b"")
        self.assertEqual(connA.pool.idle, [connA])
        self.clock.advance(self.backoffDelay(client.router))
        self.assertIs(self.hostOf(1), self.cluster.hosts[1])
        self.assertEqual(tA.value(), b"")


# -- retries on the response status


class StatusRetryTests(RouterTestBase):
    """
    C{retry.on} conditions on the upstream's status, and what the client gets when retries run out.
    """

    def test_5xxThenSuccess(self) -> None:
        """
        With C{retry.on = 5xx}, a 503 from host A is retried on host B, whose 200 reaches the client;
        A's connection is not reused.
        """
        client = self.get(b"/5xx/x")
        connA, tA = self.connect()
        connA.dataReceived(ok(b"busy", b"503 Service Unavailable"))
        self.assertEqual(client.transport.value(), b"")
        self.assertEqual(self.cstat("upstream_rq_retry"), 1)
        self.assertAbandoned(connA, tA)
        self.clock.advance(self.backoffDelay(client.router))
        self.assertIs(self.hostOf(-1), self.cluster.hosts[1])
        connB, tB = self.connect()
        self.assertTrue(tB.value().startswith(b"GET /5xx/x HTTP/1.1\r\n"))
        connB.dataReceived(ok(b"fine"))
        r = client.response()
        self.assertEqual((r.status, r.body), (200, b"fine"))
        self.assertEqual(self.cstat("upstream_rq_2xx"), 1)
        self.assertEqual(self.hstat("downstream_rq_2xx"), 1)
        self.assertEqual(self.cstat("upstream_rq_active"), 0)

    def test_5xxExhaustedForwardsLastResponse(self) -> None:
        """
        With C{retry.num = 1} and two 503s, the client gets the last upstream 503, body and all (as
        Envoy forwards the last response when retries are exhausted).
        """
        client = self.get(b"/5xx/x")
        self.connect()[0].dataReceived(ok(b"first", b"503 Service Unavailable"))
        self.clock.advance(self.backoffDelay(client.router))
        connB, tB = self.connect()
        connB.dataReceived(ok(b"second", b"503 Service Unavailable"))
        r = client.response()
        self.assertEqual((r.status, r.body), (503, b"second"))
        self.assertEqual(len(self.connects), 2)
        self.assertEqual(self.cstat("upstream_rq_retry"), 1)
        # Each upstream answer counts (as Envoy charges every response); the client got one.
        self.assertEqual(self.cstat("upstream_rq_5xx"), 2)
        self.assertEqual(self.hstat("downstream_rq_5xx"), 1)
        # A complete forwarded response: B's connection is reusable.
        self.assertEqual(connB.pool.idle, [connB])

    def test_5xxExhaustedFlagsURX(self) -> None:
        """
        A retriable response forwarded because the retries ran out carries flag URX (Envoy's
        C{UpstreamRetryLimitExceeded}).
        """
        client = self.get(b"/5xx/x")
        self.connect()[0].dataReceived(ok(b"", b"503 Service Unavailable"))
        self.clock.advance(self.backoffDelay(client.router))
        self.connect()[0].dataReceived(ok(b"", b"503 Service Unavailable"))
        self.assertEqual(client.response().status, 503)
        self.assertIn("URX", client.stream.responseFlags)

    def test_retriableStatusCodes(self) -> None:
        """
        With C{retriable-status-codes} and C{409, 418}, a 418 is retried.
        """
        client = self.get(b"/codes/x")
        self.connect()[0].dataReceived(ok(b"teapot", b"418 I'm a teapot"))
        self.clock.advance(self.backoffDelay(client.router))
        self.connect()[0].dataReceived(ok(b"fine"))
        self.assertEqual(client.response().status, 200)
        self.assertEqual(self.cstat("upstream_rq_retry"), 1)

    def test_retriableStatusCodesOnlyThose(self) -> None:
        """
        With C{retriable-status-codes} and C{409, 418}, a 503 is forwarded, not retried.
        """
        client = self.get(b"/codes/x")
        self.connect()[0].dataReceived(ok(b"busy", b"503 Service Unavailable"))
        r = client.response()
        self.assertEqual((r.status, r.body), (503, b"busy"))
        self.assertEqual(len(self.connects), 1)
        self.assertEqual(self.cstat("upstream_rq_retry"), 0)
        self.assertEqual(client.stream.responseFlags, [])

    def test_gatewayErrorRetries502(self) -> None:
        """
        C{gateway-error} retries a 502.
        """
        client = self.get(b"/gw/x")
        self.connect()[0].dataReceived(ok(b"", b"502 Bad Gateway"))
        self.clock.advance(self.backoffDelay(client.router))
        self.connect()[0].dataReceived(ok(b"fine"))
        self.assertEqual(client.response().status, 200)

    def test_gatewayErrorNot500(self) -> None:
        """
        C{gateway-error} forwards a 500 without retrying.
        """
        client = self.get(b"/gw/x")
        self.connect()[0].dataReceived(ok(b"oops", b"500 Internal Server Error"))
        r = client.response()
        self.assertEqual((r.status, r.body), (500, b"oops"))
        self.assertEqual(len(self.connects), 1)
        self.assertIsNone(client.router.retryTimer)

    def test_noRetryPolicy(self) -> None:
        """
        A route without C{retry.on} forwards a 503 at once.
        """
        client = self.get(b"/x")
        self.connect()[0].dataReceived(ok(b"busy", b"503 Service Unavailable"))
        self.assertEqual(client.response().status, 503)
        self.assertEqual(len(self.connects), 1)


# -- request body replay


class ReplayTests(RouterTestBase):
    """
    A retry replays the request body it kept (up to C{retry.replay_buffer}).
    """

    def test_bodyReplayedInFull(self) -> None:
        """
        A body within the replay buffer, sent in two reads (one before the connection, one after), is
        sent whole on the retry.
        """
        client = Client(self)
        client.send(b"POST /5xx/x HTTP/1.1\r\nHost: example.com\r\nContent-Length: 11\r\n\r\nhello")
        connA, tA = self.connect()
        client.send(b" world")
        self.assertTrue(tA.value().endswith(b"\r\n\r\nhello world"), tA.value())
        connA.dataReceived(ok(b"", b"503 Service Unavailable"))
        self.clock.advance(self.backoffDelay(client.router))
        connB, tB = self.connect()
        self.assertTrue(tB.value().startswith(b"POST /5xx/x HTTP/1.1\r\n"))
        self.assertTrue(tB.value().endswith(b"\r\n\r\nhello world"), tB.value())
        self.assertEqual(tB.value().count(b"hello"), 1)
        connB.dataReceived(ok(b"stored", b"201 Created"))
        self.assertEqual(client.response().status, 201)

    def test_earlyResponseMidBodyRetried(self) -> None:
        """
        A 503 that arrives while the body is still being uploaded is retried: the part already read is
        replayed, the rest follows on the new connection, and the client's reading ends unpaused.
        """
        client = Client(self)
        client.send(b"POST /5xx/x HTTP/1.1\r\nHost: example.com\r\nContent-Length: 10\r\n\r\nhello")
        connA, tA = self.connect()
        self.assertIs(tA.producer, client.protocol.bodyProducer)
        connA.dataReceived(ok(b"", b"503 Service Unavailable"))
        self.assertIsNone(tA.producer)
        self.clock.advance(self.backoffDelay(client.router))
        connB, tB = self.connect()
        client.send(b"world")
        self.assertTrue(tB.value().endswith(b"\r\n\r\nhelloworld"), tB.value())
        self.assertIsNone(tB.producer)
        connB.dataReceived(ok(b"done"))
        self.assertEqual(client.response().body, b"done")
        self.assertEqual(client.protocol.pauses, 0)
        self.assertEqual(connB.pool.idle, [connB])

    def test_chunkedBodyReplayedWithTrailers(self) -> None:
        """
        A chunked body and its trailers are replayed on the retry, re-chunked and terminated.
        """
        client = Client(self)
        client.send(b"POST /5xx/x HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5\r\nhello\r\n0\r\nx-sum: 1\r\n\r\n")
        self.connect()[0].dataReceived(ok(b"", b"503 Service Unavailable"))
        self.clock.advance(self.backoffDelay(client.router))
        connB, tB = self.connect()
        _, _, body = tB.value().partition(b"\r\n\r\n")
        self.assertEqual(body, b"5\r\nhello\r\n0\r\nx-sum: 1\r\n\r\n")

    def test_bodyOverReplayBufferNotRetried(self) -> None:
        """
        A body larger than C{retry.replay_buffer} (16 bytes here) is not retried: the 503 is forwarded.
        """
        client = Client(self)
        body = b"x" * 32
        client.send(b"POST /small/x HTTP/1.1\r\nHost: example.com\r\nContent-Length: 32\r\n\r\n" + body)
        connA, tA = self.connect()
        self.assertTrue(tA.value().endswith(body))
        connA.dataReceived(ok(b"busy", b"503 Service Unavailable"))
        r = client.response()
        self.assertEqual((r.status, r.body), (503, b"busy"))
        self.assertEqual(len(self.connects), 1)
        self.assertEqual(self.cstat("upstream_rq_retry"), 0)

    def test_bodyWithinSmallReplayBufferRetried(self) -> None:
        """
        A body that fits C{retry.replay_buffer} on the same route is retried (the limit, not the route,
        stops the previous test's retry).
        """
        client = Client(self)
        client.send(b"POST /small/x HTTP/1.1\r\nHost: example.com\r\nContent-Length: 16\r\n\r\n" + b"y" * 16)
        self.connect()[0].dataReceived(ok(b"", b"503 Service Unavailable"))
        self.clock.advance(self.backoffDelay(client.router))
        self.assertTrue(self.connect()[1].value().endswith(b"y" * 16))


# -- connect failures, resets, no healthy host


class ConnectFailureTests(RouterTestBase):
    """
    Failures before any response: connect failure, upstream reset, no healthy host.
    """

    def test_connectFailureRetried(self) -> None:
        """
        With C{retry.on = connect-failure}, a failed connect is retried on the other host.
        """
        client = self.get(b"/cf/x")
        self.refuse()
        self.assertEqual(self.cstat("upstream_rq_retry"), 1)
        self.clock.advance(self.backoffDelay(client.router))
        self.assertIs(self.hostOf(1), self.cluster.hosts[1])
        self.connect()[0].dataReceived(ok(b"fine"))
        r = client.response()
        self.assertEqual((r.status, r.body), (200, b"fine"))
        self.assertEqual(client.stream.responseFlags, [])

    def test_connectFailureExhausted(self) -> None:
        """
        When the retried connect fails too, the client gets a 503 with flags UF and URX.
        """
        client = self.get(b"/cf/x")
        self.refuse()
        self.clock.advance(self.backoffDelay(client.router))
        self.refuse()
        r = client.response()
        self.assertEqual(r.status, 503)
        self.assertEqual(client.stream.responseCodeDetails,
                         "upstream_reset_before_response_started{connection_failure}")
        self.assertIn("UF", client.stream.responseFlags)
        self.assertIn("URX", client.stream.responseFlags)

    def test_connectFailureWithoutRetry(self) -> None:
        """
        Without a retry policy a failed connect is a 503 with flag UF and details
        C{upstream_reset_before_response_started{connection_failure}}.
        """
        client = self.get(b"/x")
        self.refuse()
        r = client.response()
        self.assertEqual(r.status, 503)
        self.assertIn(b"connection failure", r.body)
        self.assertEqual(client.stream.responseFlags, ["UF"])
        self.assertEqual(client.stream.responseCodeDetails,
                         "upstream_reset_before_response_started{connection_failure}")
        self.assertEqual(self.cstat("upstream_cx_connect_fail"), 1)
        self.assertEqual(self.cstat("upstream_rq_5xx"), 1)
        self.assertEqual(self.cstat("upstream_rq_active"), 0)
        self.assertEqual(len(self.connects), 1)

    def test_resetBeforeHeaders(self) -> None:
        """
        An upstream that closes before the response head is a 503 with flag UC and details
        C{upstream_reset_before_response_started{connection_termination}}.
        """
        client = self.get(b"/x")
        conn, t = self.connect()
        t.closedByPeer()
        r = client.response()
        self.assertEqual(r.status, 503)
        self.assertEqual(client.stream.responseFlags, ["UC"])
        self.assertEqual(client.stream.responseCodeDetails,
                         "upstream_reset_before_response_started{connection_termination}")

    def test_resetBeforeHeadersRetried(self) -> None:
        """
        With C{retry.on = 5xx} an upstream reset before the head is retried.
        """
        client = self.get(b"/5xx/x")
        self.connect()[1].closedByPeer()
        self.clock.advance(self.backoffDelay(client.router))
        self.connect()[0].dataReceived(ok(b"fine"))
        self.assertEqual(client.response().status, 200)

    def test_protocolErrorBeforeHeaders(self) -> None:
        """
        An upstream that breaks HTTP/1.1 before the head is a 503 with flag UC and details
        C{upstream_reset_before_response_started{protocol_error}}; its connection is aborted.
        """
        client = self.get(b"/x")
        conn, t = self.connect()
        conn.dataReceived(b"NOT HTTP AT ALL\r\n\r\n")
        r = client.response()
        self.assertEqual(r.status, 503)
        self.assertEqual(client.stream.responseFlags, ["UC"])
        self.assertEqual(client.stream.responseCodeDetails,
                         "upstream_reset_before_response_started{protocol_error}")
        self.assertTrue(t.aborted)

    def test_resetAfterHeaders(self) -> None:
        """
        An upstream that closes mid-body resets the downstream (flag UR, details
        C{upstream_reset_after_response_started{connection_termination}}).
        """
        client = self.get(b"/5xx/x")
        conn, t = self.connect()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
        t.closedByPeer()
        self.assertTrue(client.transport.aborted)
        self.assertFalse(client.response().complete)
        self.assertEqual(client.stream.responseFlags, ["UR"])
        self.assertEqual(client.stream.responseCodeDetails,
                         "upstream_reset_after_response_started{connection_termination}")
        self.assertEqual(self.cstat("upstream_rq_retry"), 0)

    def test_noHealthyUpstream(self) -> None:
        """
        With every host unhealthy the client gets a 503 with flag UH and details C{no_healthy_upstream},
        and no connection is attempted.
        """
        for host in self.cluster.hosts:
            host.healthy = False
        client = self.get(b"/x")
        r = client.response()
        self.assertEqual((r.status, r.body), (503, b"no healthy upstream\n"))
        self.assertEqual(client.stream.responseFlags, ["UH"])
        self.assertEqual(client.stream.responseCodeDetails, "no_healthy_upstream")
        self.assertEqual(self.connects, [])
        self.assertEqual(self.cstat("upstream_cx_none_healthy"), 1)
        self.assertEqual(self.cstat("upstream_rq_active"), 0)

    def test_unhealthyHostSkipped(self) -> None:
        """
        An unhealthy host is not picked while a healthy one is left.
        """
        self.cluster.hosts[0].healthy = False
        self.get(b"/x")
        self.assertIs(self.hostOf(0), self.cluster.hosts[1])


# -- local answers


class LocalAnswerTests(RouterTestBase):
    """
    Routes the proxy answers by itself.
    """

    def test_redirect(self) -> None:
        """
        A redirect route answers 301 with its Location and contacts no upstream.
        """
        client = self.get(b"/old")
        r = client.response()
        self.assertEqual(r.status, 301)
        self.assertEqual(r.header(b"location"), b"https://example.com/new")
        self.assertEqual(client.stream.responseCodeDetails, "redirect")
        self.assertEqual(self.connects, [])
        self.assertEqual(self.hstat("downstream_rq_3xx"), 1)

    def test_directResponse(self) -> None:
        """
        A direct-response route answers with its status and body.
        """
        client = self.get(b"/hello")
        r = client.response()
        self.assertEqual((r.status, r.body), (200, b"hello from the proxy"))
        self.assertEqual(client.stream.responseCodeDetails, "direct_response")
        self.assertEqual(self.connects, [])
        self.assertEqual(self.cstat("upstream_rq_total"), 0)


# -- the downstream going away


class DownstreamCloseTests(RouterTestBase):
    """
    A client that goes away mid-exchange.
    """

    def test_closeMidExchangeAbandonsUpstream(self) -> None:
        """
        The client closing while the upstream answers abandons the upstream connection (never pooled) and
        leaves C{upstream_rq_active} at 0.
        """
        client = self.get(b"/x")
        conn, t = self.connect()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
        self.assertEqual(self.cstat("upstream_rq_active"), 1)
        client.transport.closedByPeer()
        self.assertAbandoned(conn, t)
        self.assertEqual(self.cstat("upstream_rq_active"), 0)
        self.assertEqual(self.hstat("downstream_rq_active"), 0)
        self.assertEqual(self.hstat("downstream_rq_rx_reset"), 1)
        self.assertIn("DC", client.stream.responseFlags)
        conn.dataReceived(b"defghij")  # the rest arrives before the abort lands: nowhere to go
        self.clock.advance(0)
        self.assertNotIn(conn, conn.pool.idle)

    def test_closeWhileConnecting(self) -> None:
        """
        The client closing before the connect lands ends the stream; the connection that lands goes
        idle into the pool unused.
        """
        client = self.get(b"/x")
        client.transport.closedByPeer()
        self.assertEqual(self.cstat("upstream_rq_active"), 0)
        conn, t = self.connect()
        self.assertEqual(t.value(), b"")
        self.assertEqual(conn.pool.idle, [conn])

    def test_closeDuringBackoff(self) -> None:
        """
        The client closing during a retry's back-off cancels the retry.
        """
        client = self.get(b"/5xx/x")
        self.connect()[0].dataReceived(ok(b"", b"503 Service Unavailable"))
        timer = client.router.retryTimer
        client.transport.closedByPeer()
        self.assertFalse(timer.active())
        self.clock.advance(1)
        self.assertEqual(len(self.connects), 1)
        self.assertEqual(self.cstat("upstream_rq_active"), 0)


# -- stats


class StatsTests(RouterTestBase):
    """
    Cluster and listener counters for proxied requests.
    """

    hosts = 1

    def test_successCounters(self) -> None:
        """
        A proxied 200 counts one upstream and one downstream request, both 2xx, none left active, and
        the upstream connection goes back to the pool.
        """
        client = self.get(b"/x")
        # Still connecting: pending, not yet an active upstream request (as Envoy counts it).
        self.assertEqual((self.cstat("upstream_rq_active"), self.hstat("downstream_rq_active")), (0, 1))
        conn, t = self.connect()
        self.assertEqual(self.cstat("upstream_rq_active"), 1)
        conn.dataReceived(ok(b"fine"))
        self.assertEqual(client.response().body, b"fine")
        self.assertEqual(
            [self.cstat(n) for n in ("upstream_rq_total", "upstream_rq_2xx", "upstream_rq_5xx",
                                     "upstream_rq_active")],
            [1, 1, 0, 0])
        self.assertEqual(
            [self.hstat(n) for n in ("downstream_rq_total", "downstream_rq_2xx", "downstream_rq_5xx",
                                     "downstream_rq_active")],
            [1, 1, 0, 0])
        self.assertEqual(conn.pool.idle, [conn])

    def test_5xxCounters(self) -> None:
        """
        A forwarded 500 counts as 5xx upstream and downstream.
        """
        self.get(b"/x")
        self.connect()[0].dataReceived(ok(b"", b"500 Internal Server Error"))
        self.assertEqual((self.cstat("upstream_rq_5xx"), self.hstat("downstream_rq_5xx")), (1, 1))
        self.assertEqual(self.cstat("upstream_rq_2xx"), 0)

    def test_keepAliveReuse(self) -> None:
        """
        A second request on the same client connection reuses the pooled upstream connection.
        """
        client = self.get(b"/x")
        conn, t = self.connect()
        conn.dataReceived(ok(b"one"))
        t.clear()
        client.send(b"GET /y HTTP/1.1\r\nHost: example.com\r\n\r\n")
        self.assertTrue(t.value().startswith(b"GET /y HTTP/1.1\r\n"))
        conn.dataReceived(ok(b"two"))
        self.assertEqual([r.body for r in client.responses()], [b"one", b"two"])
        self.assertEqual(len(self.connects), 1)
        self.assertEqual(self.cstat("upstream_rq_total"), 2)

    def test_retryCountsEachUpstreamRequest(self) -> None:
        """
        Each attempt sent upstream counts in C{upstream_rq_total}, as Envoy's connection pools count it.
        """
        client = self.get(b"/5xx/x")
        self.connect()[0].dataReceived(ok(b"", b"503 Service Unavailable"))
        self.clock.advance(self.backoffDelay(client.router))
        self.connect()[0].dataReceived(ok(b"fine"))
        self.assertEqual(self.cstat("upstream_rq_total"), 2)


    def test_maxRequestsPerConnectionDropsPipelined(self) -> None:
        """
        With C{max_requests_per_connection = 1}, a pipelined second request is never forwarded nor
        answered, and is not left counted in C{downstream_rq_active} when the connection closes.
        """
        client = Client(self, "one")
        client.send(b"GET /x HTTP/1.1\r\nHost: example.com\r\n\r\n"
                    b"GET /y HTTP/1.1\r\nHost: example.com\r\n\r\n")
        self.connect()[0].dataReceived(ok(b"one"))
        r = client.response()
        self.assertEqual((r.body, r.header(b"connection")), (b"one", b"close"))
        self.clock.advance(0)  # the close is reported
        self.assertEqual(len(self.connects), 1)
        self.assertEqual(self.stat("http.one.downstream_rq_active"), 0)

    def test_maxRequestsPerConnectionAfterLocalReply(self) -> None:
        """
        With C{max_requests_per_connection = 1}, a request pipelined after one answered at once (a
        direct response) is not answered after the C{connection: close} response.
        """
        client = Client(self, "one")
        client.send(b"GET /hello HTTP/1.1\r\nHost: example.com\r\n\r\n"
                    b"GET /hello HTTP/1.1\r\nHost: example.com\r\n\r\n")
        self.assertEqual(len(client.responses()), 1)
        self.clock.advance(0)
        self.assertEqual(self.stat("http.one.downstream_rq_active"), 0)

    def test_pipelinedRequestDroppedByCloseIsNotActive(self) -> None:
        """
        A pipelined request dropped because the one before it closes the connection is not left counted
        in C{downstream_rq_active}.
        """
        client = Client(self)
        client.send(b"GET /hello HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n"
                    b"GET /hello HTTP/1.1\r\nHost: example.com\r\n\r\n")
        self.assertEqual(len(client.responses()), 1)
        self.clock.advance(0)
        self.assertEqual(self.hstat("downstream_rq_active"), 0)


class FramingTests(RouterTestBase):
    """
    The upstream request is framed by what the client declared, whatever reached the router when.
    """

    hosts = 1

    def test_chunkedBodyQueuedBehindPausedFilter(self):
        """
        A chunked body that arrived entirely while an earlier filter held the request is still sent chunked,
        so its bytes can never be read upstream as another request.
        """
        from twisted.internet.defer import Deferred

        from twistedmesh.http.stream import HTTPFilter

        gate = Deferred()

        class Gate(HTTPFilter):
            def requestHeaders(self, stream):
                return gate

        settings = self.service.listeners["web"].factory.settings
        self.patch(settings, "makers", [lambda s: Gate()] + list(settings.makers))
        client = Client(self)
        smuggled = b"GET /admin HTTP/1.1\r\nHost: internal\r\n\r\n"
        client.send(b"POST /x HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"%x\r\n%s\r\n0\r\n\r\n" % (len(smuggled), smuggled))
        gate.callback(None)
        conn, t = self.connect()
        head, _, body = t.value().partition(b"\r\n\r\n")
        self.assertIn(b"transfer-encoding: chunked", head.lower())
        self.assertEqual(body, b"%x\r\n%s\r\n0\r\n\r\n" % (len(smuggled), smuggled))
        conn.dataReceived(ok(b"fine"))
        self.assertEqual(client.response().body, b"fine")
        self.clock.advance(0)

    def test_bodyLongerThanContentLength(self):
        """
        A filter that lengthens a body without fixing its content-length gets a 500, and the upstream
        connection is dropped rather than desynchronised.
        """
        from twistedmesh.http.stream import HTTPFilter

        class Double(HTTPFilter):
            def requestData(self, stream, data, end):
                return data + data

        settings = self.service.listeners["web"].factory.settings
        self.patch(settings, "makers", [lambda s: Double()] + list(settings.makers))
        client = Client(self)
        client.send(b"POST /x HTTP/1.1\r\nHost: example.com\r\nContent-Length: 4\r\n\r\n")
        conn, t = self.connect()
        client.send(b"abcd")
        self.assertEqual(client.response().status, 500)
        self.assertAbandoned(conn, t)
        self.clock.advance(0)

    def test_invalidUpstreamStatus(self):
        """
        An upstream status outside 100-599 is a protocol error (503), not an exception in the reactor.
        """
        client = self.get(b"/x")
        conn, t = self.connect()
        conn.dataReceived(b"HTTP/1.1 999 Odd\r\ncontent-length: 0\r\n\r\n")
        self.assertEqual(client.response().status, 503)
        self.clock.advance(0)
