"""
Tests for the network filter chain (L{twistedmesh.listener.chain}), the TCP listener factory
(L{twistedmesh.listener.tcp}) and C{tcp_proxy} (L{twistedmesh.listener.tcp_proxy}): unit tests on memory
transports and a L{Clock}, then integration tests on loopback.
"""

from __future__ import annotations

import hashlib
import random
from typing import List, Optional, Tuple

from twisted.internet import reactor as globalReactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IHalfCloseableProtocol, INegotiated, IPushProducer, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.plugin import getPlugins
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import directlyProvides, implementer
from zope.interface.verify import verifyObject

from twistedmesh.config import ClusterConfig, HostConfig, ListenerConfig, Options
from twistedmesh.interfaces import INetworkConnection, INetworkFilterFactory
from twistedmesh.listener.chain import STOP, NetworkConnection, NetworkFilter
from twistedmesh.listener.tcp import TCPListenerFactory
from twistedmesh.listener.tcp_proxy import TCPProxyFactory
from twistedmesh.observability.stats import StatsStore
from twistedmesh.plugins import FilterContext
from twistedmesh.upstream.cluster import Cluster

def done() -> Failure:
    """
    The reason of a cleanly closed connection.
    """
    return Failure(ConnectionDone())


# -- memory doubles


@implementer(ITCPTransport)
class FakeTCPTransport(StringTransport):
    """
    A L{StringTransport} with the TCP bits the proxy uses: half-close and C{TCP_NODELAY}.
    """

    def __init__(self) -> None:
        super().__init__()
        self.noDelay = False
        self.writeClosed = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.noDelay = enabled

    def loseWriteConnection(self) -> None:
        self.writeClosed = True


class FakeEndpoint:
    """
    A client endpoint whose connection attempts the test completes or fails by hand.
    """

    def __init__(self) -> None:
        self.attempts: List[Tuple[Factory, Deferred]] = []
        self.cancelled = 0

    def _cancel(self, d: Deferred) -> None:
        self.cancelled += 1

    def connect(self, factory: Factory) -> Deferred:
        d = Deferred(self._cancel)
        self.attempts.append((factory, d))
        return d

    def succeed(self) -> Tuple[Protocol, FakeTCPTransport]:
        """
        Complete the latest attempt the way an endpoint does: connectionMade, then the Deferred.
        """
        factory, d = self.attempts[-1]
        proto = factory.buildProtocol(None)
        transport = FakeTCPTransport()
        proto.makeConnection(transport)
        d.callback(proto)
        return proto, transport

    def fail(self) -> None:
        """
        Refuse the latest attempt.
        """
        self.attempts[-1][1].errback(Failure(ConnectionRefusedError()))


class Recorder(NetworkFilter):
    """
    Records every hook call into a shared list, tagged with its name.
    """

    def __init__(self, name: str, log: list, conn: INetworkConnection) -> None:
        self.name = name
        self.log = log
        self.conn = conn

    def connectionMade(self, conn):
        self.log.append((self.name, "made"))

    def dataReceived(self, conn, data):
        self.log.append((self.name, "received", data))

    def dataWritten(self, conn, data):
        self.log.append((self.name, "written", data))

    def readConnectionLost(self, conn):
        self.log.append((self.name, "eof"))

    def connectionLost(self, conn, reason):
        self.log.append((self.name, "lost"))


def recorder(name: str, log: list):
    return lambda conn: Recorder(name, log, conn)


def makeConnection(*makers) -> Tuple[NetworkConnection, FakeTCPTransport]:
    conn = NetworkConnection("test", list(makers), Clock())
    transport = FakeTCPTransport()
    conn.makeConnection(transport)
    return conn, transport


# -- the chain


class ChainTests(SynchronousTestCase):
    """
    Tests for L{NetworkConnection}'s filter chain semantics.
    """

    def test_dataFirstToLast(self) -> None:
        """
        connectionMade and dataReceived reach the filters first to last.
        """
        log: list = []
        conn, _ = makeConnection(recorder("a", log), recorder("b", log))
        conn.dataReceived(b"x")
        self.assertEqual(log, [("a", "made"), ("b", "made"), ("a", "received", b"x"), ("b", "received", b"x")])

    def test_bytesReplacement(self) -> None:
        """
        A dataReceived hook returning bytes passes the replacement to the next filter.
        """
        log: list = []

        class Upper(NetworkFilter):
            def dataReceived(self, conn, data):
                return data.upper()

        conn, _ = makeConnection(lambda c: Upper(), recorder("b", log))
        conn.dataReceived(b"abc")
        self.assertEqual(log[-1], ("b", "received", b"ABC"))

    def test_deferredPausesChainAndReading(self) -> None:
        """
        A Deferred from dataReceived holds later filters and pauses the downstream read; data arriving
        meanwhile waits in order and goes on (with the Deferred's replacement) when it fires.
        """
        log: list = []
        waits: List[Deferred] = []

        class Hold(NetworkFilter):
            def dataReceived(self, conn, data):
                if data == b"first":
                    waits.append(Deferred())
                    return waits[-1]
                return None

        conn, transport = makeConnection(lambda c: Hold(), recorder("b", log))
        conn.dataReceived(b"first")
        conn.dataReceived(b"second")
        self.assertEqual([e for e in log if e[1] == "received"], [])
        self.assertEqual(transport.producerState, "paused")
        waits[0].callback(b"FIRST")
        self.assertEqual(
            [e for e in log if e[1] == "received"], [("b", "received", b"FIRST"), ("b", "received", b"second")]
        )
        self.assertEqual(transport.producerState, "producing")

    def test_deferredFromConnectionMadeHoldsData(self) -> None:
        """
        Data that arrives while a connectionMade Deferred is pending reaches no filter until it fires,
        and a half-close waits behind that data.
        """
        log: list = []
        d = Deferred()

        class SlowStart(NetworkFilter):
            def connectionMade(self, conn):
                return d

        conn, transport = makeConnection(lambda c: SlowStart(), recorder("b", log))
        conn.dataReceived(b"early")
        conn.readConnectionLost()
        self.assertEqual(log, [])
        d.callback(None)
        self.assertEqual(log, [("b", "made"), ("b", "received", b"early"), ("b", "eof")])

    def test_failedDeferredCloses(self) -> None:
        """
        A Deferred that fails closes the connection.
        """
        d = Deferred()

        class Boom(NetworkFilter):
            def dataReceived(self, conn, data):
                return d

        conn, transport = makeConnection(lambda c: Boom())
        conn.dataReceived(b"x")
        d.errback(RuntimeError("authz down"))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(conn.closeReason, "filter_error")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_stopClosesAndEndsChain(self) -> None:
        """
        A hook returning C{conn.close(...)} closes the downstream and ends the chain; later data is dropped.
        """
        log: list = []

        class Deny(NetworkFilter):
            def dataReceived(self, conn, data):
                return conn.close("rbac_access_denied")

        conn, transport = makeConnection(lambda c: Deny(), recorder("b", log))
        conn.dataReceived(b"x")
        conn.dataReceived(b"y")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(conn.closeReason, "rbac_access_denied")
        self.assertEqual([e for e in log if e[1] == "received"], [])

    def test_closeReturnsStop(self) -> None:
        """
        C{close} returns L{STOP}, from the connection and from a filter's handle.
        """
        handles = []
        conn, _ = makeConnection(lambda c: handles.append(c) or NetworkFilter())
        self.assertIs(handles[0].close("x"), STOP)
        self.assertIs(conn.close("y"), STOP)

    def test_dataWrittenLastToFirstFromCaller(self) -> None:
        """
        A filter's write runs the dataWritten hooks of the filters before it, last to first, with
        replacements; a write on the connection itself runs every filter's.
        """
        log: list = []
        handles = []

        class Tag(Recorder):
            def dataWritten(self, conn, data):
                super().dataWritten(conn, data)
                return data + self.name.encode()

        def tag(name):
            def make(conn):
                handles.append(conn)
                return Tag(name, log, conn)
            return make

        conn, transport = makeConnection(tag("a"), tag("b"), tag("c"))
        del log[:]
        handles[2].write(b"<")
        self.assertEqual(log, [("b", "written", b"<"), ("a", "written", b"<b")])
        self.assertEqual(transport.value(), b"<ba")
        del log[:]
        transport.clear()
        conn.write(b">")
        self.assertEqual([e[0] for e in log], ["c", "b", "a"])
        self.assertEqual(transport.value(), b">cba")

    def test_connectionLostOncePerFilter(self) -> None:
        """
        connectionLost reaches every filter exactly once, even those whose connectionMade a STOP skipped.
        """
        log: list = []

        class Deny(Recorder):
            def connectionMade(self, conn):
                super().connectionMade(conn)
                return conn.close("denied")

        conn, _ = makeConnection(lambda c: Deny("a", log, c), recorder("b", log))
        conn.connectionLost(done())
        conn.connectionLost(done())
        self.assertEqual(log, [("a", "made"), ("a", "lost"), ("b", "lost")])

    def test_connectionLostCancelsHeldDeferred(self) -> None:
        """
        A Deferred holding the chain is cancelled when the connection goes, and nothing runs after.
        """
        log: list = []
        cancelled = []
        d = Deferred(cancelled.append)

        class Hold(NetworkFilter):
            def dataReceived(self, conn, data):
                return d

        conn, _ = makeConnection(lambda c: Hold(), recorder("b", log))
        conn.dataReceived(b"x")
        conn.connectionLost(done())
        self.assertEqual(cancelled, [d])
        self.assertEqual([e for e in log if e[1] == "received"], [])

    def test_passThroughHooksSkipped(self) -> None:
        """
        Hooks a L{NetworkFilter} subclass does not override are not in the chain's lists.
        """

        class OnlyLost(NetworkFilter):
            def connectionLost(self, conn, reason):
                pass

        conn, _ = makeConnection(lambda c: OnlyLost(), lambda c: NetworkFilter())
        self.assertEqual((len(conn._made), len(conn._received), len(conn._lost)), (0, 0, 1))

    def test_halfCloseWithoutHandlerCloses(self) -> None:
        """
        A half-close closes the connection when no filter handles half-closes.
        """
        conn, transport = makeConnection(lambda c: NetworkFilter())
        conn.readConnectionLost()
        self.assertTrue(transport.disconnecting)

    def test_flowControlAndChainPausesIndependent(self) -> None:
        """
        Resuming flow control while a filter holds the chain does not resume reading.
        """
        d = Deferred()

        class Hold(NetworkFilter):
            def dataReceived(self, conn, data):
                return d

        conn, transport = makeConnection(lambda c: Hold())
        conn.pauseProducing()
        conn.dataReceived(b"x")
        conn.resumeProducing()
        self.assertEqual(transport.producerState, "paused")
        d.callback(None)
        self.assertEqual(transport.producerState, "producing")

    def test_providesInterfaces(self) -> None:
        """
        The connection and the handles provide L{INetworkConnection}; the connection is half-closeable.
        """
        handles = []
        conn, _ = makeConnection(lambda c: handles.append(c) or NetworkFilter())
        verifyObject(INetworkConnection, conn)
        verifyObject(INetworkConnection, handles[0])
        verifyObject(IPushProducer, handles[0])
        self.assertTrue(IHalfCloseableProtocol.providedBy(conn))


# -- the listener factory


def listenerConfig(**kw) -> ListenerConfig:
    return ListenerConfig(name="db", endpoint="tcp:0", protocol="tcp", filters=("tcp_proxy",), cluster="pg", **kw)


class ListenerFactoryTests(SynchronousTestCase):
    """
    Tests for L{TCPListenerFactory}.
    """

    def test_statsAndDrain(self) -> None:
        """
        Accepted connections are counted, tracked, get TCP_NODELAY, and whenDrained fires after the last.
        """
        stats = StatsStore()
        factory = TCPListenerFactory(listenerConfig(), [lambda c: NetworkFilter()], stats, Clock())
        protos = []
        for _ in range(2):
            proto = factory.buildProtocol(None)
            transport = FakeTCPTransport()
            proto.makeConnection(transport)
            protos.append(proto)
        self.assertTrue(transport.noDelay)
        self.assertEqual(stats.get("listener.db.downstream_cx_total").value, 2)
        self.assertEqual(stats.get("listener.db.downstream_cx_active").value, 2)
        self.assertEqual(factory.connections, set(protos))
        drained = factory.whenDrained()
        protos[0].connectionLost(done())
        self.assertNoResult(drained)
        protos[1].connectionLost(done())
        self.successResultOf(drained)
        self.assertEqual(stats.get("listener.db.downstream_cx_active").value, 0)
        self.assertEqual(stats.get("listener.db.downstream_cx_total").value, 2)
        self.successResultOf(factory.whenDrained())

    def test_abortAll(self) -> None:
        """
        abortAll aborts every live connection.
        """
        factory = TCPListenerFactory(listenerConfig(), [], StatsStore(), Clock())
        transports = []
        for _ in range(2):
            proto = factory.buildProtocol(None)
            transports.append(FakeTCPTransport())
            proto.makeConnection(transports[-1])
        factory.abortAll()
        self.assertEqual([t.disconnected for t in transports], [True, True])


# -- tcp_proxy on memory transports


class ProxyHarness:
    """
    A cluster of fake hosts, a tcp_proxy configured on it, and a listener factory with that chain.
    """

    def __init__(self, testCase, hosts: int = 1, options: Optional[dict] = None, before=(), **listenerKw) -> None:
        self.clock = Clock()
        self.stats = StatsStore()
        config = ClusterConfig("pg", tuple(HostConfig(f"tcp:127.0.0.1:{5432 + i}") for i in range(hosts)))
        self.cluster = Cluster(config, self.clock, self.stats)
        self.endpoints = []
        for host in self.cluster.hosts:
            host.client = FakeEndpoint()
            self.endpoints.append(host.client)
        self.listener = listenerConfig(**listenerKw)
        context = FilterContext(self.clock, self.stats, {"pg": self.cluster}, self.listener)
        errors: list = []
        maker = TCPProxyFactory().configure(Options("mesh.ini", "filter:tcp_proxy", options or {}, errors), context)
        testCase.assertEqual(errors, [])
        self.factory = TCPListenerFactory(self.listener, list(before) + [maker], self.stats, self.clock)

    def accept(self) -> Tuple[NetworkConnection, FakeTCPTransport]:
        conn = self.factory.buildProtocol(None)
        transport = FakeTCPTransport()
        conn.makeConnection(transport)
        return conn, transport

    def stat(self, name: str) -> int:
        return self.stats.get(f"cluster.pg.{name}").value


class TCPProxyTests(SynchronousTestCase):
    """
    Tests for L{TCPProxyFilter} with fake endpoints and a L{Clock}.
    """

    def connected(self, **kw):
        h = ProxyHarness(self, **kw)
        conn, down = h.accept()
        upProto, up = h.endpoints[0].succeed()
        return h, conn, down, upProto, up

    def test_relayBothWays(self) -> None:
        """
        Bytes go downstream to upstream and back; bytes read before the connect are sent first; the
        downstream reads only once connected.
        """
        h = ProxyHarness(self)
        conn, down = h.accept()
        self.assertEqual(down.producerState, "paused")
        conn.dataReceived(b"early ")
        upProto, up = h.endpoints[0].succeed()
        self.assertEqual(down.producerState, "producing")
        conn.dataReceived(b"late")
        self.assertEqual(up.value(), b"early late")
        upProto.dataReceived(b"reply")
        self.assertEqual(down.value(), b"reply")
        self.assertTrue(up.noDelay)

    def test_stats(self) -> None:
        """
        Connections and bytes are counted on the cluster and on the host.
        """
        h, conn, down, upProto, up = self.connected()
        conn.dataReceived(b"12345")
        upProto.dataReceived(b"123")
        host = h.cluster.hosts[0]
        self.assertEqual(
            [h.stat(n) for n in ("upstream_cx_total", "upstream_cx_active", "upstream_cx_tx_bytes_total", "upstream_cx_rx_bytes_total")],
            [1, 1, 5, 3],
        )
        self.assertEqual((host.cx_total, host.cx_active), (1, 1))
        upProto.connectionLost(done())
        self.assertEqual((h.stat("upstream_cx_active"), host.cx_active), (0, 0))
        self.assertEqual(h.stat("upstream_cx_total"), 1)

    def test_producersRegistered(self) -> None:
        """
        Each side is the other's streaming producer, so a full upstream buffer pauses the downstream read.
        """
        h, conn, down, upProto, up = self.connected()
        self.assertIs(down.producer, up)
        self.assertTrue(down.streaming)
        self.assertTrue(up.streaming)
        up.producer.pauseProducing()
        self.assertEqual(down.producerState, "paused")
        up.producer.resumeProducing()
        self.assertEqual(down.producerState, "producing")

    def test_filterWritesGoThroughEarlierFilters(self) -> None:
        """
        Upstream bytes pass through the dataWritten hooks of the filters before tcp_proxy.
        """

        class Upper(NetworkFilter):
            def dataWritten(self, conn, data):
                return data.upper()

        h = ProxyHarness(self, before=[lambda c: Upper()])
        conn, down = h.accept()
        upProto, up = h.endpoints[0].succeed()
        upProto.dataReceived(b"ok")
        self.assertEqual(down.value(), b"OK")

    def test_downstreamHalfClose(self) -> None:
        """
        A downstream FIN half-closes the upstream; the reply still flows; the upstream FIN then closes both.
        """
        h, conn, down, upProto, up = self.connected()
        conn.readConnectionLost()
        self.assertTrue(up.writeClosed)
        self.assertFalse(up.disconnecting)
        upProto.dataReceived(b"tail")
        self.assertEqual(down.value(), b"tail")
        upProto.readConnectionLost()
        self.assertTrue(down.writeClosed)
        self.assertTrue(down.disconnecting)
        self.assertTrue(up.disconnecting)

    def test_upstreamHalfClose(self) -> None:
        """
        An upstream FIN half-closes the downstream; downstream bytes still flow; its FIN then closes both.
        """
        h, conn, down, upProto, up = self.connected()
        upProto.readConnectionLost()
        self.assertTrue(down.writeClosed)
        self.assertIsNone(down.producer)
        self.assertFalse(down.disconnecting)
        conn.dataReceived(b"more")
        self.assertEqual(up.value(), b"more")
        conn.readConnectionLost()
        self.assertTrue(up.writeClosed)
        self.assertTrue(down.disconnecting)
        self.assertTrue(up.disconnecting)

    def test_noFINUnderTLS(self) -> None:
        """
        An upstream FIN is not passed to a TLS downstream (it would cut the TLS stream), which stays open.
        """
        h = ProxyHarness(self)
        conn = h.factory.buildProtocol(None)
        down = FakeTCPTransport()
        directlyProvides(down, INegotiated, ITCPTransport)
        conn.makeConnection(down)
        upProto, up = h.endpoints[0].succeed()
        upProto.readConnectionLost()
        self.assertFalse(down.writeClosed)
        self.assertFalse(down.disconnecting)

    def test_halfCloseBeforeConnect(self) -> None:
        """
        A downstream FIN before the upstream connects is passed on after the buffered bytes.
        """
        h = ProxyHarness(self)
        conn, down = h.accept()
        conn.dataReceived(b"request")
        conn.readConnectionLost()
        upProto, up = h.endpoints[0].succeed()
        self.assertEqual(up.value(), b"request")
        self.assertTrue(up.writeClosed)

    def test_retryNextHost(self) -> None:
        """
        A refused connect is retried on the other host, and counted as a connect failure.
        """
        h = ProxyHarness(self, hosts=2, max_connect_attempts=2)
        conn, down = h.accept()
        first = [bool(e.attempts) for e in h.endpoints].index(True)
        h.endpoints[first].fail()
        second = h.endpoints[1 - first]
        self.assertEqual(len(second.attempts), 1)
        self.assertFalse(down.disconnecting)
        upProto, up = second.succeed()
        conn.dataReceived(b"x")
        self.assertEqual(up.value(), b"x")
        self.assertEqual(h.stat("upstream_cx_connect_fail"), 1)
        self.assertEqual([host.cx_connect_fail for host in h.cluster.hosts].count(1), 1)
        self.assertEqual(h.stat("upstream_cx_total"), 1)

    def test_allAttemptsFail(self) -> None:
        """
        When every attempt fails the downstream is closed.
        """
        h = ProxyHarness(self, hosts=2, max_connect_attempts=2)
        conn, down = h.accept()
        for _ in range(2):
            [e for e in h.endpoints if e.attempts and not e.attempts[-1][1].called][0].fail()
        self.assertTrue(down.disconnecting)
        self.assertEqual(conn.closeReason, "upstream_connect_failed")
        self.assertEqual(h.stat("upstream_cx_connect_fail"), 2)
        self.assertEqual(h.stat("upstream_cx_total"), 0)

    def test_connectTimeout(self) -> None:
        """
        An attempt that takes longer than the connect timeout is cancelled and counted, then the
        downstream is closed.
        """
        h = ProxyHarness(self, options={"connect_timeout": "2s"})
        conn, down = h.accept()
        h.clock.advance(1.9)
        self.assertFalse(down.disconnecting)
        h.clock.advance(0.1)
        self.assertEqual(h.endpoints[0].cancelled, 1)
        self.assertEqual(h.stat("upstream_cx_connect_timeout"), 1)
        self.assertEqual(h.stat("upstream_cx_connect_fail"), 1)
        self.assertTrue(down.disconnecting)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_connectTimeoutDefaultsToCluster(self) -> None:
        """
        Without options or a listener value, the connect timeout is the cluster's.
        """
        h = ProxyHarness(self)
        h.accept()
        [call] = h.clock.getDelayedCalls()
        self.assertEqual(call.getTime(), h.cluster.connectTimeout)

    def test_idleTimeout(self) -> None:
        """
        Bytes either way restart the idle timer; a full idle period aborts both sides.
        """
        h, conn, down, upProto, up = self.connected(idle_timeout=10.0)
        h.clock.advance(9)
        conn.dataReceived(b"x")
        h.clock.advance(9)
        upProto.dataReceived(b"y")
        h.clock.advance(9)
        self.assertFalse(down.disconnecting)
        h.clock.advance(1)
        self.assertTrue(down.disconnected)
        self.assertTrue(up.disconnected)
        self.assertEqual(conn.closeReason, "idle_timeout")

    def test_noHealthyHost(self) -> None:
        """
        With no healthy host the downstream is closed and counted, without an attempt.
        """
        h = ProxyHarness(self)
        h.cluster.hosts[0].healthy = False
        conn, down = h.accept()
        self.assertTrue(down.disconnecting)
        self.assertEqual(h.stat("upstream_cx_none_healthy"), 1)
        self.assertEqual(h.endpoints[0].attempts, [])

    def test_upstreamLostClosesDownstream(self) -> None:
        """
        When the upstream goes, the downstream is closed after its pending writes (producer unregistered).
        """
        h, conn, down, upProto, up = self.connected()
        upProto.connectionLost(done())
        self.assertTrue(down.disconnecting)
        self.assertFalse(down.disconnected)
        self.assertIsNone(down.producer)

    def test_downstreamLostClosesUpstream(self) -> None:
        """
        When the downstream goes, the upstream is closed and the idle timer stopped.
        """
        h, conn, down, upProto, up = self.connected()
        conn.connectionLost(done())
        self.assertTrue(up.disconnecting)
        self.assertIsNone(up.producer)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_downstreamLostWhileConnecting(self) -> None:
        """
        When the downstream goes during the connect, the attempt is cancelled and not counted as failed.
        """
        h = ProxyHarness(self)
        conn, down = h.accept()
        conn.connectionLost(done())
        self.assertEqual(h.endpoints[0].cancelled, 1)
        self.assertEqual(h.stat("upstream_cx_connect_fail"), 0)
        self.assertEqual(h.clock.getDelayedCalls(), [])


class ConfigureTests(SynchronousTestCase):
    """
    Tests for L{TCPProxyFactory.configure} and its registration.
    """

    def configure(self, items: dict, **listenerKw) -> list:
        clock = Clock()
        stats = StatsStore()
        cluster = Cluster(ClusterConfig("pg", (HostConfig("tcp:127.0.0.1:5432"),)), clock, stats)
        context = FilterContext(clock, stats, {"pg": cluster}, listenerConfig(**listenerKw))
        errors: list = []
        options = Options("mesh.ini", "filter:tcp_proxy", items, errors)
        self.maker = TCPProxyFactory().configure(options, context)
        options.finish()
        return errors

    def test_unknownCluster(self) -> None:
        """
        A cluster name that names no cluster is an error on the C{cluster} key, with a suggestion.
        """
        [error] = self.configure({"cluster": "pgx"})
        self.assertEqual(error.key, "cluster")
        self.assertIn("pg", error.why)

    def test_badValues(self) -> None:
        """
        Bad durations and a zero attempt count are errors.
        """
        errors = self.configure({"idle_timeout": "soon", "max_connect_attempts": "0"})
        self.assertEqual(sorted(e.key for e in errors), ["idle_timeout", "max_connect_attempts"])

    def test_listenerDefaults(self) -> None:
        """
        Unset options take the listener's values.
        """
        self.assertEqual(self.configure({}, idle_timeout=7.0, connect_timeout=3.0, max_connect_attempts=4), [])
        proxy = self.maker(None)
        self.assertEqual((proxy.idleTimeout, proxy.connectTimeout, proxy.maxConnectAttempts), (7.0, 3.0, 4))
        self.assertEqual(proxy.cluster.name, "pg")

    def test_plugin(self) -> None:
        """
        C{tcp_proxy} is found as an L{INetworkFilterFactory} plugin.
        """
        [plugin] = [p for p in getPlugins(INetworkFilterFactory) if p.name == "tcp_proxy"]
        self.assertIsInstance(plugin, TCPProxyFactory)
        verifyObject(INetworkFilterFactory, plugin)


# -- integration on loopback


LOOPBACK = "tcp:0:interface=127.0.0.1"


@implementer(IHalfCloseableProtocol)
class Echo(Protocol):
    """
    Echoes bytes with backpressure (its transport is its own producer) and closes after the peer's FIN.
    """

    def connectionMade(self) -> None:
        self.transport.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        # A registered, paused producer would hold the close back forever.
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason) -> None:
        self.factory.lost.append(reason)
        waiting, self.factory.waiting = self.factory.waiting, []
        for d in waiting:
            d.callback(None)


class EchoFactory(Factory):
    protocol = Echo

    def __init__(self) -> None:
        self.lost: list = []
        self.waiting: List[Deferred] = []

    def whenOneLost(self) -> Deferred:
        if self.lost:
            return succeed(None)
        d = Deferred()
        self.waiting.append(d)
        return d


@implementer(IPushProducer)
class Client(Protocol):
    """
    Sends C{total} bytes (with a push producer), half-closes, reads everything back slowly (pausing for
    C{pause} seconds after every C{every} bytes) and hashes both streams.
    """

    def __init__(self, total: int, every: int = 0, pause: float = 0.0) -> None:
        self.total = total
        self.every = every
        self.pause = pause
        self.block = random.Random(7).randbytes(1 << 20)
        self.sent = 0
        self.received = 0
        self.nextPause = every
        self.sentHash = hashlib.sha256()
        self.receivedHash = hashlib.sha256()
        self.paused = False
        self.done: Deferred = Deferred()
        self.lostReason = None

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        chunk = 1 << 16
        while not self.paused and self.sent < self.total:
            start = self.sent % len(self.block)
            data = self.block[start:start + min(chunk, self.total - self.sent)]
            self.sent += len(data)
            self.sentHash.update(data)
            self.transport.write(data)
        if self.sent >= self.total and self.transport.producer is self:
            self.transport.unregisterProducer()
            self.transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.receivedHash.update(data)
        if self.every and self.received >= self.nextPause:
            self.nextPause += self.every
            self.transport.pauseProducing()
            globalReactor.callLater(self.pause, self.transport.resumeProducing)

    def connectionLost(self, reason) -> None:
        self.lostReason = reason
        self.done.callback(None)


class RecordingListenerFactory(TCPListenerFactory):
    """
    Measures, after every write to a downstream transport, how many bytes it holds back.
    """

    maxBuffered = 0
    sawPause = False

    def connectionOpened(self, conn) -> None:
        super().connectionOpened(conn)
        transport = conn.transport
        write = type(transport).write

        def measuringWrite(data):
            write(transport, data)
            self.maxBuffered = max(
                self.maxBuffered, len(transport.dataBuffer) - transport.offset + transport._tempDataLen
            )
            self.sawPause = self.sawPause or transport.producerPaused

        transport.write = measuringWrite


class LoopbackTests(TestCase):
    """
    The proxy on real loopback sockets.
    """

    timeout = 30

    @inlineCallbacks
    def proxyTo(self, upstreamPort: int, factoryClass=TCPListenerFactory):
        """
        Start a proxy listener towards C{upstreamPort}; return (listener factory, port, cluster, stats).
        """
        stats = StatsStore()
        cluster = Cluster(ClusterConfig("echo", (HostConfig(f"tcp:127.0.0.1:{upstreamPort}"),)), globalReactor, stats)
        listener = ListenerConfig(name="edge", endpoint=LOOPBACK, protocol="tcp", filters=("tcp_proxy",), cluster="echo")
        context = FilterContext(globalReactor, stats, {"echo": cluster}, listener)
        errors: list = []
        maker = TCPProxyFactory().configure(Options("mesh.ini", "filter:tcp_proxy", {}, errors), context)
        self.assertEqual(errors, [])
        factory = factoryClass(listener, [maker], stats, globalReactor)
        port = yield serverFromString(globalReactor, LOOPBACK).listen(factory)
        self.addCleanup(port.stopListening)
        return factory, port, cluster, stats

    @inlineCallbacks
    def echoServer(self):
        echo = EchoFactory()
        port = yield serverFromString(globalReactor, LOOPBACK).listen(echo)
        self.addCleanup(port.stopListening)
        return echo, port.getHost().port

    @inlineCallbacks
    def test_echo(self) -> None:
        """
        A client's bytes reach a real echo server through the proxy and come back; everything closes.
        """
        echo, echoPort = yield self.echoServer()
        factory, port, cluster, stats = yield self.proxyTo(echoPort)
        client = Client(5)
        yield connectProtocol(TCP4ClientEndpoint(globalReactor, "127.0.0.1", port.getHost().port), client)
        yield client.done
        yield factory.whenDrained()
        yield echo.whenOneLost()
        self.assertEqual(client.received, 5)
        self.assertEqual(client.receivedHash.digest(), client.sentHash.digest())
        self.assertEqual(cluster.upstream_cx_total.value, 1)
        self.assertEqual(cluster.upstream_cx_active.value, 0)
        self.assertEqual(stats.get("listener.edge.downstream_cx_active").value, 0)

    @inlineCallbacks
    def test_bigTransferSlowReaderBounded(self) -> None:
        """
        64 MiB go through the proxy and back intact to a slow reader while the proxy's downstream buffer
        stays bounded, because the upstream is paused.
        """
        total = 64 << 20
        echo, echoPort = yield self.echoServer()
        factory, port, cluster, stats = yield self.proxyTo(echoPort, RecordingListenerFactory)
        client = Client(total, every=8 << 20, pause=0.05)
        yield connectProtocol(TCP4ClientEndpoint(globalReactor, "127.0.0.1", port.getHost().port), client)
        yield client.done
        yield factory.whenDrained()
        yield echo.whenOneLost()
        self.assertEqual(client.received, total)
        self.assertEqual(client.receivedHash.digest(), client.sentHash.digest())
        self.assertTrue(factory.sawPause)
        self.assertLess(factory.maxBuffered, 1 << 20)
        self.assertEqual(cluster.upstream_cx_tx_bytes_total.value, total)
        self.assertEqual(cluster.upstream_cx_rx_bytes_total.value, total)

    @inlineCallbacks
    def test_upstreamRefused(self) -> None:
        """
        An upstream that refuses closes the downstream promptly and counts one connect failure.
        """
        closed = yield serverFromString(globalReactor, LOOPBACK).listen(Factory.forProtocol(Protocol))
        closedPort = closed.getHost().port
        yield closed.stopListening()
        factory, port, cluster, stats = yield self.proxyTo(closedPort)
        client = Client(0)
        started = globalReactor.seconds()
        yield connectProtocol(TCP4ClientEndpoint(globalReactor, "127.0.0.1", port.getHost().port), client)
        yield client.done
        yield factory.whenDrained()
        self.assertLess(globalReactor.seconds() - started, 2.0)
        self.assertEqual(stats.get("cluster.echo.upstream_cx_connect_fail").value, 1)
        self.assertEqual(client.received, 0)
