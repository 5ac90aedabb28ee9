"""
Tests for L{twistedmesh.upstream.http1}: the upstream HTTP/1.1 connection and its keep-alive pool.

Unit tests drive connections on memory transports through a fake endpoint whose connect Deferred the test
fires, with a L{MemoryReactorClock} for the connect and idle timers; one integration test runs exchanges
against a real C{twisted.web} server on loopback.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from twisted.internet import reactor as globalReactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransportWithDisconnection
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from twistedmesh.config import ClusterConfig, HostConfig
from twistedmesh.http.h1 import encodeRequestHead
from twistedmesh.observability.stats import StatsStore
from twistedmesh.upstream.cluster import Cluster
from twistedmesh.upstream.http1 import HostPool, UpstreamConnection

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi"


def head(method: bytes = b"GET", chunked: bool = False) -> bytes:
    """
    A request head for C{/}.
    """
    return encodeRequestHead(method, b"/", [(b"host", b"upstream")], chunked)


# -- doubles


class Recorder:
    """
    A pool waiter and an exchange at once (as the router is): records every callback as a tuple.
    """

    def __init__(self) -> None:
        self.events: List[tuple] = []
        self.conn: Optional[UpstreamConnection] = None

    def poolReady(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        self.events.append(("ready", conn))

    def poolFailed(self, reason: str, timedOut: bool) -> None:
        self.events.append(("failed", reason, timedOut))

    def upstreamHead(self, status: int, headers: list, hasBody: bool) -> None:
        self.events.append(("head", status, headers, hasBody))

    def upstreamData(self, data: bytes) -> None:
        self.events.append(("data", data))

    def upstreamEnd(self, trailers) -> None:
        self.events.append(("end", trailers))

    def upstreamFailed(self, reason: str, headersReceived: bool) -> None:
        self.events.append(("reset", reason, headersReceived))


class FakeEndpoint:
    """
    A client endpoint whose connection attempts the test completes (L{succeed}) or fails by hand.
    """

    def __init__(self) -> None:
        self.attempts: List[Tuple[object, Deferred]] = []

    def connect(self, factory) -> Deferred:
        d: Deferred = Deferred()
        self.attempts.append((factory, d))
        return d

    def succeed(self, index: int = -1) -> Tuple[UpstreamConnection, StringTransportWithDisconnection]:
        """
        Complete attempt C{index}: build the protocol, connect it to a memory transport, fire the Deferred.
        """
        factory, d = self.attempts[index]
        conn = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransportWithDisconnection()
        transport.protocol = conn
        conn.makeConnection(transport)
        d.callback(conn)
        return conn, transport


class PoolTestBase(SynchronousTestCase):
    """
    A one-host cluster whose host connects through a L{FakeEndpoint}.
    """

    connectTimeout = 5.0

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.stats = StatsStore()
        config = ClusterConfig("c", (HostConfig("tcp:127.0.0.1:1"),), connect_timeout=self.connectTimeout)
        self.cluster = Cluster(config, self.clock, self.stats)
        self.host = self.cluster.hosts[0]
        self.endpoint = FakeEndpoint()
        self.host.client = self.endpoint
        self.pool: HostPool = self.cluster.pools.forHost(self.host)

    def stat(self, name: str) -> int:
        return self.stats.get("cluster.c." + name).value

    def connect(self) -> Tuple[UpstreamConnection, StringTransportWithDisconnection]:
        """
        Acquire through a new connection; return it and its transport.
        """
        waiter = Recorder()
        self.pool.acquire(waiter)
        conn, transport = self.endpoint.succeed()
        self.assertEqual(waiter.events, [("ready", conn)])
        return conn, transport

    def begin(self, conn: UpstreamConnection, method: bytes = b"GET", body: bool = False,
              chunked: bool = False) -> Recorder:
        """
        Start an exchange on C{conn}; return its recorder.
        """
        exchange = Recorder()
        conn.begin(exchange, method, head(method, chunked), body)
        return exchange

    def pooledConnection(self) -> Tuple[UpstreamConnection, StringTransportWithDisconnection]:
        """
        A connection that completed one clean exchange and is idle in the pool.
        """
        conn, transport = self.connect()
        self.begin(conn)
        conn.dataReceived(OK)
        self.assertEqual(self.pool.idle, [conn])
        transport.clear()
        return conn, transport

    def assertNotReused(self, conn: UpstreamConnection) -> None:
        """
        C{conn} is closed and out of the pool: the next acquire makes a new connection.
        """
        self.assertTrue(conn.closing)
        self.assertNotIn(conn, self.pool.idle)
        attempts = len(self.endpoint.attempts)
        waiter = Recorder()
        self.pool.acquire(waiter)
        self.assertEqual(waiter.events, [])
        self.assertEqual(len(self.endpoint.attempts), attempts + 1)


# -- reuse


class ReuseTests(PoolTestBase):
    """
    A connection goes back to the pool only after a complete, clean exchange.
    """

    def test_reusedAfterCleanResponse(self) -> None:
        """
        After a complete keep-alive response the next acquire gets the same connection synchronously,
        without connecting again.
        """
        conn, transport = self.connect()
        exchange = self.begin(conn)
        self.assertEqual(transport.value(), b"GET / HTTP/1.1\r\nhost: upstream\r\n\r\n")
        conn.dataReceived(OK)
        self.assertEqual(exchange.events, [
            ("head", 200, [(b"content-length", b"2")], True), ("data", b"hi"), ("end", None)])
        waiter = Recorder()
        self.pool.acquire(waiter)
        self.assertEqual(waiter.events, [("ready", conn)])
        self.assertEqual(len(self.endpoint.attempts), 1)
        self.assertFalse(transport.disconnecting or transport.disconnected)

    def test_secondExchangeOnReusedConnection(self) -> None:
        """
        A reused connection carries a second exchange, reported to the second exchange only.
        """
        conn, transport = self.pooledConnection()
        self.pool.acquire(Recorder())
        second = self.begin(conn, b"POST", body=True)
        conn.writeBody(b"xy", False)
        conn.endBody(False)
        self.assertEqual(transport.value(), head(b"POST") + b"xy")
        conn.dataReceived(b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n")
        self.assertEqual(second.events, [("head", 201, [(b"content-length", b"0")], False), ("end", None)])
        self.assertEqual(self.pool.idle, [conn])

    def test_responseSplitAcrossReads(self) -> None:
        """
        A response that arrives in several reads ends the exchange once, and only then is the connection
        pooled.
        """
        conn, _ = self.connect()
        exchange = self.begin(conn)
        conn.dataReceived(OK[:10])
        conn.dataReceived(OK[10:-1])
        self.assertEqual(self.pool.idle, [])
        conn.dataReceived(OK[-1:])
        self.assertEqual(exchange.events[-1], ("end", None))
        self.assertEqual(self.pool.idle, [conn])

    def startNextFromEnd(self, exchange: Recorder, method: bytes = b"GET") -> Recorder:
        """
        Make C{exchange} acquire a connection and begin a C{method} request from its C{upstreamEnd}, as the
        router does for the next pipelined request; return the recorder of that request.
        """
        next = Recorder()

        def poolReady(conn) -> None:
            Recorder.poolReady(next, conn)
            conn.begin(next, method, head(method), False)

        next.poolReady = poolReady
        exchange.upstreamEnd = lambda trailers: self.pool.acquire(next)
        return next

    def test_reusedFromUpstreamEnd(self) -> None:
        """
        An exchange begun from C{upstreamEnd} (the next pipelined request) gets the same connection at
        once, and its response, in a later read, is parsed as the response to its method (here HEAD).
        """
        conn, transport = self.connect()
        next = self.startNextFromEnd(self.begin(conn), b"HEAD")
        conn.dataReceived(OK)
        self.assertEqual(next.events, [("ready", conn)])
        self.assertEqual(len(self.endpoint.attempts), 1)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n")
        self.assertEqual(next.events[1:], [("head", 200, [(b"content-length", b"3")], False), ("end", None)])
        self.assertEqual(self.pool.idle, [conn])

    def test_bytesAfterResponseNotTakenForNext(self) -> None:
        """
        Bytes that follow a response in the same read are never the response of an exchange begun from
        C{upstreamEnd} (they arrived before its request was sent): that exchange fails with a protocol
        error and the connection is aborted.
        """
        conn, transport = self.connect()
        next = self.startNextFromEnd(self.begin(conn))
        conn.dataReceived(OK + b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nstale")
        self.assertEqual(next.events, [
            ("ready", conn), ("reset", "protocol_error: unsolicited data from upstream", False)])
        self.assertTrue(transport.disconnected)
        self.assertNotReused(conn)

    def test_partialBytesAfterResponseNotTakenForNext(self) -> None:
        """
        Even a fragment of a head after a response, in the same read, fails an exchange begun from
        C{upstreamEnd} rather than being completed by the next read.
        """
        conn, transport = self.connect()
        next = self.startNextFromEnd(self.begin(conn))
        conn.dataReceived(OK + b"HTTP/1.1 2")
        self.assertEqual(next.events[1:], [("reset", "protocol_error: unsolicited data from upstream", False)])
        self.assertNotReused(conn)

    def test_headResponseBodyNotTakenForNext(self) -> None:
        """
        A body wrongly sent after a response to HEAD, in the same read, is not the response of the next
        exchange.
        """
        conn, transport = self.connect()
        next = self.startNextFromEnd(self.begin(conn, b"HEAD"))
        conn.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
        self.assertEqual(next.events[1:], [("reset", "protocol_error: unsolicited data from upstream", False)])
        self.assertNotReused(conn)

    def test_bytesAfterResponseWithoutNextExchange(self) -> None:
        """
        Bytes that follow a response in the same read, with no exchange begun since, close the connection
        (it was already pooled) so that it is not handed out.
        """
        conn, transport = self.connect()
        exchange = self.begin(conn)
        conn.dataReceived(OK + b"junk")
        self.assertEqual(exchange.events[-1], ("end", None))
        self.assertTrue(transport.disconnected)
        self.assertNotReused(conn)

    def test_waiterGivesBackUnusedConnection(self) -> None:
        """
        A waiter that no longer needs a new connection gives it back with release(), and the next waiter
        gets it without connecting.
        """
        waiter = Recorder()
        self.pool.acquire(waiter)
        conn, _ = self.endpoint.succeed()
        self.pool.release(conn)
        again = Recorder()
        self.pool.acquire(again)
        self.assertEqual(again.events, [("ready", conn)])
        self.assertEqual(len(self.endpoint.attempts), 1)

    def test_mostRecentlyUsedFirst(self) -> None:
        """
        Of several idle connections, the most recently released one is handed out first.
        """
        first, second = Recorder(), Recorder()
        self.pool.acquire(first)
        self.pool.acquire(second)
        a, _ = self.endpoint.succeed(0)
        b, _ = self.endpoint.succeed(1)
        self.pool.release(a)
        self.pool.release(b)
        waiter = Recorder()
        self.pool.acquire(waiter)
        self.assertIs(waiter.conn, b)

    def test_notReusedAfterProtocolError(self) -> None:
        """
        A malformed response fails the exchange with a protocol error and aborts the connection.
        """
        conn, transport = self.connect()
        exchange = self.begin(conn)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n")
        self.assertEqual(len(exchange.events), 1)
        kind, reason, headersReceived = exchange.events[0]
        self.assertEqual(kind, "reset")
        self.assertTrue(reason.startswith("protocol_error: "), reason)
        self.assertFalse(headersReceived)
        self.assertTrue(transport.disconnected)
        self.assertNotReused(conn)

    def test_notReusedAfterCloseBeforeResponse(self) -> None:
        """
        An upstream that closes before answering fails the exchange with upstream_reset, headers not
        received.
        """
        conn, transport = self.connect()
        exchange = self.begin(conn)
        transport.loseConnection()
        self.assertEqual(exchange.events, [("reset", "upstream_reset", False)])
        self.assertNotReused(conn)

    def test_closeMidResponse(self) -> None:
        """
        An upstream that closes in the middle of a body fails the exchange with upstream_reset, headers
        received, and nothing else is reported.
        """
        conn, transport = self.connect()
        exchange = self.begin(conn)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhal")
        transport.loseConnection()
        self.assertEqual(exchange.events, [
            ("head", 200, [(b"content-length", b"10")], True), ("data", b"hal"),
            ("reset", "upstream_reset", True)])
        self.assertNotReused(conn)

    def test_closeMidChunkedResponse(self) -> None:
        """
        An upstream that closes before the last chunk fails the exchange with upstream_reset.
        """
        conn, transport = self.connect()
        exchange = self.begin(conn)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n")
        transport.loseConnection()
        self.assertEqual(exchange.events[-1], ("reset", "upstream_reset", True))
        self.assertEqual([e[0] for e in exchange.events], ["head", "data", "reset"])

    def test_connectionCloseFromUpstream(self) -> None:
        """
        A response with C{Connection: close} completes the exchange, then the connection is closed, not
        pooled.
        """
        conn, transport = self.connect()
        exchange = self.begin(conn)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nhi")
        self.assertEqual(exchange.events[-1], ("end", None))
        self.assertFalse(transport.connected)
        self.assertNotReused(conn)

    def test_http10WithoutKeepAlive(self) -> None:
        """
        An HTTP/1.0 response without C{Connection: keep-alive} completes the exchange and closes the
        connection.
        """
        conn, transport = self.connect()
        exchange = self.begin(conn)
        conn.dataReceived(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nhi")
        self.assertEqual(exchange.events[-1], ("end", None))
        self.assertFalse(transport.connected)
        self.assertNotReused(conn)

    def test_http10WithKeepAlive(self) -> None:
        """
        An HTTP/1.0 response with C{Connection: keep-alive} and a length leaves the connection reusable.
        """
        conn, transport = self.connect()
        self.begin(conn)
        conn.dataReceived(b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nhi")
        self.assertEqual(self.pool.idle, [conn])
        self.assertTrue(transport.connected)

    def test_responseBeforeRequestBodySent(self) -> None:
        """
        A response that completes before the request body was all sent ends the exchange and closes the
        connection (the rest of the body would be read as the next request).
        """
        conn, transport = self.connect()
        exchange = self.begin(conn, b"POST", body=True)
        conn.writeBody(b"part", False)
        conn.dataReceived(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n")
        self.assertEqual(exchange.events, [
            ("head", 413, [(b"content-length", b"0")], False), ("end", None)])
        self.assertFalse(transport.connected)
        self.assertNotReused(conn)

    def test_readUntilCloseBody(self) -> None:
        """
        A body without length or chunking is read until the upstream closes, which ends the exchange
        normally; the connection is never pooled.
        """
        conn, transport = self.connect()
        exchange = self.begin(conn)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nsome")
        conn.dataReceived(b" more")
        self.assertEqual(self.pool.idle, [])
        transport.loseConnection()
        self.assertEqual(exchange.events, [
            ("head", 200, [], True), ("data", b"some"), ("data", b" more"), ("end", None)])
        self.assertNotReused(conn)

    def test_abandon(self) -> None:
        """
        An abandoned exchange aborts the connection and hears nothing more from it.
        """
        conn, transport = self.connect()
        exchange = self.begin(conn)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhal")
        conn.abandon()
        self.assertTrue(transport.disconnected)
        self.assertEqual([e[0] for e in exchange.events], ["head", "data"])
        self.assertNotReused(conn)

    def test_abandonDuringRead(self) -> None:
        """
        An exchange abandoned from C{upstreamHead} (as a retry on status does) hears nothing more of that
        read, even a complete response, and the connection is not pooled.
        """
        conn, transport = self.connect()
        exchange = self.begin(conn)
        exchange.upstreamHead = lambda status, headers, hasBody: conn.abandon()
        conn.dataReceived(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\n\r\nno")
        self.assertEqual(exchange.events, [])
        self.assertTrue(transport.disconnected)
        self.assertNotReused(conn)

    def test_unsolicitedBytesOnIdleConnection(self) -> None:
        """
        Bytes arriving on an idle connection abort it and take it out of the pool.
        """
        conn, transport = self.pooledConnection()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\n")
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.pool.idle, [])
        self.assertNotReused(conn)

    def test_unsolicitedBytesBeforeCloseIsNoticed(self) -> None:
        """
        A connection aborted for unsolicited bytes is not handed out even while its transport has not yet
        reported the close (a real TCP abort reports it on the next reactor turn).
        """
        conn, transport = self.pooledConnection()
        transport.abortConnection = lambda: None  # the close is reported later
        conn.dataReceived(b"junk")
        waiter = Recorder()
        self.pool.acquire(waiter)
        self.assertEqual(waiter.events, [])
        self.assertEqual(len(self.endpoint.attempts), 2)

    def test_idleConnectionClosedByUpstream(self) -> None:
        """
        An idle connection the upstream closes leaves the pool quietly.
        """
        conn, transport = self.pooledConnection()
        transport.loseConnection()
        self.assertEqual(self.pool.idle, [])
        self.assertEqual(self.stat("upstream_cx_active"), 0)
        self.assertNotReused(conn)

    def test_pausedTransportResumedWhenPooled(self) -> None:
        """
        A transport paused by downstream backpressure during the response reads again once pooled, so an
        idle connection notices the upstream closing it.
        """
        conn, transport = self.connect()
        self.begin(conn)
        transport.pauseProducing()
        conn.dataReceived(OK)
        self.assertEqual(self.pool.idle, [conn])
        self.assertEqual(transport.producerState, "producing")


# -- what goes on the wire, what is reported


class ExchangeTests(PoolTestBase):
    """
    Request encoding and response reporting of one exchange.
    """

    def test_chunkedRequestBody(self) -> None:
        """
        A chunked request body is framed on the wire: each piece a chunk (an empty piece nothing), then the
        last chunk with the trailers.
        """
        conn, transport = self.connect()
        self.begin(conn, b"POST", body=True, chunked=True)
        transport.clear()
        conn.writeBody(b"hello", True)
        conn.writeBody(b"", True)
        conn.writeBody(b"0123456789abcdef", True)
        conn.endBody(True, [(b"x-checksum", b"1")])
        self.assertEqual(transport.value(),
                         b"5\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nx-checksum: 1\r\n\r\n")

    def test_chunkedRequestBodyWithoutTrailers(self) -> None:
        """
        Ending a chunked body without trailers writes the bare last chunk; the connection is then reusable.
        """
        conn, transport = self.connect()
        self.begin(conn, b"POST", body=True, chunked=True)
        transport.clear()
        conn.writeBody(b"abc", True)
        conn.endBody(True)
        self.assertEqual(transport.value(), b"3\r\nabc\r\n0\r\n\r\n")
        conn.dataReceived(OK)
        self.assertEqual(self.pool.idle, [conn])

    def test_lengthRequestBody(self) -> None:
        """
        A body with a Content-Length goes on the wire as it is, and ending it writes nothing.
        """
        conn, transport = self.connect()
        self.begin(conn, b"PUT", body=True)
        transport.clear()
        conn.writeBody(b"abc", False)
        conn.endBody(False)
        self.assertEqual(transport.value(), b"abc")

    def test_headResponse(self) -> None:
        """
        A response to HEAD has no body whatever its Content-Length says, and the connection is reusable
        right after its head.
        """
        conn, _ = self.connect()
        exchange = self.begin(conn, b"HEAD")
        conn.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n")
        self.assertEqual(exchange.events, [
            ("head", 200, [(b"content-length", b"10")], False), ("end", None)])
        self.assertEqual(self.pool.idle, [conn])

    def test_responseTrailers(self) -> None:
        """
        The trailers of a chunked response reach C{upstreamEnd}.
        """
        conn, _ = self.connect()
        exchange = self.begin(conn)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                          b"2\r\nhi\r\n0\r\ngrpc-status: 0\r\nx-t: a\r\n\r\n")
        self.assertEqual(exchange.events, [
            ("head", 200, [(b"transfer-encoding", b"chunked")], True), ("data", b"hi"),
            ("end", [(b"grpc-status", b"0"), (b"x-t", b"a")])])
        self.assertEqual(self.pool.idle, [conn])

    def test_informationalNotReported(self) -> None:
        """
        A 100 Continue before the final response is not reported as the head.
        """
        conn, _ = self.connect()
        exchange = self.begin(conn, b"POST", body=True)
        conn.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertEqual(exchange.events, [])
        conn.endBody(False)
        conn.dataReceived(OK)
        self.assertEqual(exchange.events, [
            ("head", 200, [(b"content-length", b"2")], True), ("data", b"hi"), ("end", None)])
        self.assertEqual(self.pool.idle, [conn])

    def test_noContentResponse(self) -> None:
        """
        A 204 has no body and leaves the connection reusable.
        """
        conn, _ = self.connect()
        exchange = self.begin(conn)
        conn.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(exchange.events, [("head", 204, [], False), ("end", None)])
        self.assertEqual(self.pool.idle, [conn])

    def test_tcpNoDelay(self) -> None:
        """
        A new connection turns Nagle's algorithm off when its transport can.
        """
        calls = []
        transport = StringTransportWithDisconnection()
        transport.setTcpNoDelay = calls.append
        conn = UpstreamConnection(self.pool)
        transport.protocol = conn
        conn.makeConnection(transport)
        self.assertEqual(calls, [True])


# -- connecting


class ConnectTests(PoolTestBase):
    """
    New connections: timeouts, failures, stats.
    """

    def test_connectTimeout(self) -> None:
        """
        A connect that does not finish within the cluster's connect timeout is cancelled: the waiter gets
        C{poolFailed(timedOut=True)} and the timeout and failure are counted.
        """
        waiter = Recorder()
        self.pool.acquire(waiter)
        self.clock.advance(self.connectTimeout - 0.01)
        self.assertEqual(waiter.events, [])
        self.clock.advance(0.01)
        self.assertEqual(waiter.events, [("failed", "connect timeout", True)])
        self.assertEqual(self.stat("upstream_cx_connect_timeout"), 1)
        self.assertEqual(self.stat("upstream_cx_connect_fail"), 1)
        self.assertEqual(self.host.cx_connect_fail, 1)
        self.assertEqual(self.pool.connecting, set())

    def test_connectFailure(self) -> None:
        """
        A refused connect reports C{poolFailed(timedOut=False)}, counts a connect failure but no timeout,
        and cancels the timeout.
        """
        waiter = Recorder()
        self.pool.acquire(waiter)
        self.endpoint.attempts[0][1].errback(Failure(ConnectionRefusedError()))
        self.assertEqual(len(waiter.events), 1)
        kind, reason, timedOut = waiter.events[0]
        self.assertEqual((kind, timedOut), ("failed", False))
        self.assertIn("refused", reason)
        self.assertEqual(self.stat("upstream_cx_connect_fail"), 1)
        self.assertEqual(self.stat("upstream_cx_connect_timeout"), 0)
        self.assertEqual(self.host.cx_connect_fail, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connectInTimeCancelsTimer(self) -> None:
        """
        A connect that succeeds cancels its timeout: nothing happens when it would have fired.
        """
        conn, transport = self.connect()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(self.connectTimeout * 2)
        self.assertTrue(transport.connected)
        self.assertEqual(self.stat("upstream_cx_connect_fail"), 0)

    def test_closedBeforeConnectReported(self) -> None:
        """
        A connection that closes before the endpoint's Deferred fires is reported as a failure, not handed
        out, and leaves nothing counted as active.
        """
        waiter = Recorder()
        self.pool.acquire(waiter)
        factory, d = self.endpoint.attempts[0]
        conn = factory.buildProtocol(None)
        transport = StringTransportWithDisconnection()
        transport.protocol = conn
        conn.makeConnection(transport)
        transport.loseConnection()
        d.callback(conn)
        self.assertEqual(waiter.events, [("failed", "upstream_reset", False)])
        self.assertEqual(self.stat("upstream_cx_active"), 0)
        self.assertEqual(self.pool.idle, [])

    def test_noConnectTimeout(self) -> None:
        """
        A connect timeout of zero means no timeout.
        """
        self.pool.connectTimeout = 0
        waiter = Recorder()
        self.pool.acquire(waiter)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connectionStats(self) -> None:
        """
        Connections are counted in the cluster (total, active up and down, HTTP/1 total) and the host
        (total, active), requests per host.
        """
        a, ta = self.connect()
        b, tb = self.connect()
        self.assertEqual((self.stat("upstream_cx_total"), self.stat("upstream_cx_active"),
                          self.stat("upstream_cx_http1_total")), (2, 2, 2))
        self.assertEqual((self.host.cx_total, self.host.cx_active), (2, 2))
        self.begin(a)
        a.dataReceived(OK)
        self.pool.acquire(Recorder())
        self.begin(a)
        self.begin(b)
        self.assertEqual(self.host.rq_total, 3)
        ta.loseConnection()
        self.assertEqual(self.stat("upstream_cx_active"), 1)
        self.assertEqual(self.host.cx_active, 1)
        tb.abortConnection()
        self.assertEqual((self.stat("upstream_cx_total"), self.stat("upstream_cx_active")), (2, 0))
        self.assertEqual((self.host.cx_total, self.host.cx_active), (2, 0))

    def test_waiterErrorLogged(self) -> None:
        """
        A waiter that raises in C{poolReady} has its error logged, not left in an unhandled Deferred.
        """
        class Broken(Recorder):
            def poolReady(self, conn) -> None:
                raise ZeroDivisionError()

        self.pool.acquire(Broken())
        self.endpoint.succeed()
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_closeAll(self) -> None:
        """
        closeAll aborts idle and busy connections and cancels connection attempts: the busy exchange is
        reset, the connecting waiter fails, and nothing is left active.
        """
        idle, idleTransport = self.pooledConnection()
        self.pool.acquire(Recorder())
        busy, busyTransport = self.connect()
        exchange = self.begin(busy)
        waiter = Recorder()
        self.pool.acquire(waiter)
        self.cluster.pools.closeAll()
        self.assertTrue(idleTransport.disconnected)
        self.assertTrue(busyTransport.disconnected)
        self.assertEqual(exchange.events, [("reset", "upstream_reset", False)])
        self.assertEqual([e[:1] for e in waiter.events], [("failed",)])
        self.assertEqual(self.pool.idle, [])
        self.assertEqual(self.stat("upstream_cx_active"), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_poolPerHost(self) -> None:
        """
        ClusterPools makes one pool per host, once.
        """
        pools = self.cluster.pools
        self.assertIs(pools.forHost(self.host), self.pool)
        self.assertEqual(self.pool.connectTimeout, self.connectTimeout)


# -- idle connections


class IdleTests(PoolTestBase):
    """
    The bound on idle connections and their expiry.
    """

    def test_maxIdle(self) -> None:
        """
        Connections released beyond C{maxIdle} are closed, not kept.
        """
        self.pool.maxIdle = 1
        waiters = [Recorder(), Recorder()]
        for w in waiters:
            self.pool.acquire(w)
        (a, ta), (b, tb) = self.endpoint.succeed(0), self.endpoint.succeed(1)
        for conn in (a, b):
            self.begin(conn)
            conn.dataReceived(OK)
        self.assertEqual(self.pool.idle, [a])
        self.assertTrue(ta.connected)
        self.assertFalse(tb.connected)
        self.assertEqual(self.stat("upstream_cx_active"), 1)

    def test_idleExpiry(self) -> None:
        """
        A connection idle for C{idleTimeout} is closed and leaves the pool.
        """
        conn, transport = self.pooledConnection()
        timeout = self.pool.idleTimeout
        self.clock.advance(timeout - 0.01)
        self.assertTrue(transport.connected)
        self.clock.advance(0.01)
        self.assertFalse(transport.connected)
        self.assertEqual(self.pool.idle, [])
        self.assertEqual(self.stat("upstream_cx_active"), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_busyConnectionNotExpired(self) -> None:
        """
        A connection busy when its idle timer fires stays open, and expires a full C{idleTimeout} after it
        is released again.
        """
        conn, transport = self.pooledConnection()
        timeout = self.pool.idleTimeout
        self.clock.advance(timeout / 2)
        self.pool.acquire(Recorder())
        exchange = self.begin(conn)
        self.clock.advance(timeout)  # the timer fires while busy
        self.assertTrue(transport.connected)
        conn.dataReceived(OK)
        self.assertEqual(exchange.events[-1], ("end", None))
        self.clock.advance(timeout - 0.01)
        self.assertTrue(transport.connected)
        self.clock.advance(0.01)
        self.assertFalse(transport.connected)

    def test_reuseRestartsIdleTimer(self) -> None:
        """
        A connection reused before expiring gets the full C{idleTimeout} again from its last release.
        """
        conn, transport = self.pooledConnection()
        timeout = self.pool.idleTimeout
        self.clock.advance(timeout - 1)
        self.pool.acquire(Recorder())
        self.begin(conn)
        conn.dataReceived(OK)
        self.clock.advance(timeout - 1)
        self.assertTrue(transport.connected)
        self.assertEqual(self.pool.idle, [conn])
        self.clock.advance(1)
        self.assertFalse(transport.connected)

    def test_closedConnectionCancelsIdleTimer(self) -> None:
        """
        A pooled connection that closes leaves no timer behind.
        """
        conn, transport = self.pooledConnection()
        transport.loseConnection()
        self.assertEqual(self.clock.getDelayedCalls(), [])


# -- loopback


class _Hello(Resource):
    isLeaf = True

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"hello " + request.path


class _CountingSite(Site):
    """
    A Site that keeps every connection it accepted, each with a Deferred fired when it closes.
    """

    def __init__(self, resource) -> None:
        super().__init__(resource)
        self.channels: List[object] = []

    def buildProtocol(self, addr):
        channel = super().buildProtocol(addr)
        self.channels.append(channel)
        channel.gone = gone = Deferred()
        original = channel.connectionLost

        def connectionLost(reason) -> None:
            original(reason)
            gone.callback(None)

        channel.connectionLost = connectionLost
        return channel


class _Fetch(Recorder):
    """
    A GET of C{path}: begins as soon as the pool is ready; C{done} fires (on a later reactor turn, as the
    next downstream request would arrive) with the recorder when the exchange ends.
    """

    def __init__(self, path: bytes) -> None:
        super().__init__()
        self.path = path
        self.done: Deferred = Deferred()

    def poolReady(self, conn) -> None:
        super().poolReady(conn)
        conn.begin(self, b"GET", encodeRequestHead(b"GET", self.path, [(b"host", b"localhost")]), False)

    def poolFailed(self, reason: str, timedOut: bool) -> None:
        self.done.errback(Exception(reason))

    def upstreamEnd(self, trailers) -> None:
        super().upstreamEnd(trailers)
        globalReactor.callLater(0, self.done.callback, self)

    def upstreamFailed(self, reason: str, headersReceived: bool) -> None:
        self.done.errback(Exception(reason))


class LoopbackTests(TestCase):
    """
    The pool against a real Twisted HTTP/1.1 server on loopback.
    """

    @inlineCallbacks
    def test_sequentialExchangesShareOneConnection(self):
        """
        Five sequential exchanges to a twisted.web server travel over one pooled connection.
        """
        site = _CountingSite(_Hello())
        port = yield TCP4ServerEndpoint(globalReactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        config = ClusterConfig("origin", (HostConfig(f"tcp:127.0.0.1:{port.getHost().port}"),))
        cluster = Cluster(config, globalReactor, StatsStore())
        pool = cluster.pools.forHost(cluster.hosts[0])
        conns = []
        for i in range(5):
            fetch = _Fetch(b"/n%d" % (i,))
            pool.acquire(fetch)
            yield fetch.done
            conns.append(fetch.conn)
            self.assertEqual(fetch.events[1][:2], ("head", 200))
            self.assertEqual(b"".join(e[1] for e in fetch.events if e[0] == "data"), b"hello /n%d" % (i,))
            self.assertEqual(fetch.events[-1], ("end", None))
        self.assertEqual(len(site.channels), 1)
        self.assertEqual(len(set(conns)), 1)
        self.assertEqual(cluster.upstream_cx_total.value, 1)
        self.assertEqual(cluster.hosts[0].rq_total, 5)
        self.assertEqual(pool.idle, conns[:1])

        conn = conns[0]
        clientGone: Deferred = Deferred()
        original = conn.connectionLost

        def connectionLost(reason) -> None:
            original(reason)
            clientGone.callback(None)

        conn.connectionLost = connectionLost
        cluster.pools.closeAll()
        yield clientGone
        yield site.channels[0].gone
        self.assertEqual(cluster.upstream_cx_active.value, 0)
