"""
Tests for the network filters C{tcp_fault} (L{twistedmesh.filters.tcp_fault}) and the network
C{local_ratelimit} (L{twistedmesh.filters.tcp_ratelimit}): unit tests on memory transports, a L{Clock} and
a seeded L{random.Random}, then one loopback test each through a real L{MeshService} to a built-in TCP echo.
"""

from __future__ import annotations

import os
import random
from typing import Dict, List

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twistedmesh.config import ClusterConfig, ConfigError, HostConfig, ListenerConfig, Options, loadFile, loadString
from twistedmesh.filters.tcp_fault import TCPFaultFactory
from twistedmesh.filters.tcp_ratelimit import TCPLocalRateLimitFactory
from twistedmesh.interfaces import IHTTPFilterFactory, INetworkFilterFactory
from twistedmesh.listener.tcp import TCPListenerFactory
from twistedmesh.listener.tcp_proxy import TCPProxyFactory
from twistedmesh.observability.stats import StatsStore
from twistedmesh.plugins import FilterContext, factoriesFor
from twistedmesh.service import MeshService
from twistedmesh.upstream.cluster import Cluster

from .test_tcp_proxy import FakeEndpoint, FakeTCPTransport

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Harness:
    """
    A listener C{db} whose chain is one configured filter then C{tcp_proxy} to a cluster of one fake host.
    """

    def __init__(self, factory, items: Dict[str, str], seed: int = 1) -> None:
        self.clock = Clock()
        self.stats = StatsStore()
        self.errors: List[ConfigError] = []
        self.cluster = Cluster(ClusterConfig("pg", (HostConfig("tcp:127.0.0.1:5432"),)), self.clock, self.stats)
        self.endpoint = self.cluster.hosts[0].client = FakeEndpoint()
        listener = ListenerConfig(name="db", endpoint="tcp:0", protocol="tcp", filters=("f", "tcp_proxy"),
                                  cluster="pg")
        context = FilterContext(self.clock, self.stats, {"pg": self.cluster}, listener, random.Random(seed))
        options = Options("t.ini", "filter:f", items, self.errors)
        maker = factory.configure(options, context)
        options.finish()
        proxy = TCPProxyFactory().configure(Options("t.ini", "filter:tcp_proxy", {}, self.errors), context)
        self.factory = TCPListenerFactory(listener, [maker, proxy], self.stats, self.clock)

    def accept(self):
        """
        Accept one downstream connection; return its protocol and transport.
        """
        conn = self.factory.buildProtocol(None)
        transport = FakeTCPTransport()
        conn.makeConnection(transport)
        return conn, transport

    def stat(self, name: str) -> int:
        """
        The value of C{listener.db.<name>}.
        """
        return self.stats.get("listener.db." + name).value


def fault(items: Dict[str, str], seed: int = 1) -> Harness:
    return Harness(TCPFaultFactory(), items, seed)


def limit(items: Dict[str, str]) -> Harness:
    return Harness(TCPLocalRateLimitFactory(), items)


class TCPFaultDelayTests(SynchronousTestCase):
    """
    C{delay} holds the connection before C{tcp_proxy} connects upstream.
    """

    def test_upstreamConnectDelayed(self) -> None:
        """
        The upstream connect starts only when the clock reaches the delay; bytes sent meanwhile follow.
        """
        h = fault({"delay": "2s"})
        self.assertEqual(h.errors, [])
        conn, down = h.accept()
        conn.dataReceived(b"early")
        h.clock.advance(1.999)
        self.assertEqual(h.endpoint.attempts, [])
        h.clock.advance(0.001)
        self.assertEqual(len(h.endpoint.attempts), 1)
        _, up = h.endpoint.succeed()
        self.assertEqual(up.value(), b"early")
        self.assertEqual(h.stat("tcp_fault.delays_injected"), 1)

    def test_percentage(self) -> None:
        """
        With C{delay.percentage = 25} and seed 5, exactly 31 of 100 connections are held.
        """
        h = fault({"delay": "1s", "delay.percentage": "25"}, seed=5)
        for _ in range(100):
            h.accept()
        self.assertEqual(len(h.endpoint.attempts), 100 - h.stat("tcp_fault.delays_injected"))
        self.assertEqual(h.stat("tcp_fault.delays_injected"), 31)

    def test_timerCancelledOnClose(self) -> None:
        """
        A connection that goes away while held leaves no timer and never connects upstream.
        """
        h = fault({"delay": "5s"})
        conn, down = h.accept()
        conn.connectionLost(None)
        self.assertEqual(h.clock.getDelayedCalls(), [])
        h.clock.advance(10)
        self.assertEqual(h.endpoint.attempts, [])


class TCPFaultResetTests(SynchronousTestCase):
    """
    C{reset_after_bytes} aborts a connection after that many bytes either way.
    """

    def connected(self, items: Dict[str, str], seed: int = 1):
        h = fault(items, seed)
        conn, down = h.accept()
        upProto, up = h.endpoint.succeed()
        return h, conn, down, upProto, up

    def test_resetAfterBytesBothWays(self) -> None:
        """
        Bytes up to the limit pass (counted in both directions), the rest is dropped, and the downstream is
        aborted on the next turn.
        """
        h, conn, down, upProto, up = self.connected({"reset_after_bytes": "10"})
        conn.dataReceived(b"abcd")
        upProto.dataReceived(b"1234")
        conn.dataReceived(b"efghij")
        self.assertEqual(up.value(), b"abcdef")
        self.assertEqual(down.value(), b"1234")
        upProto.dataReceived(b"late")
        self.assertEqual(down.value(), b"1234")
        self.assertFalse(down.disconnected)
        h.clock.advance(0)
        self.assertTrue(down.disconnected)
        self.assertEqual(conn.closeReason, "tcp_fault_reset")
        self.assertEqual(h.stat("tcp_fault.resets_injected"), 1)

    def test_underLimitUntouched(self) -> None:
        """
        A connection under the limit is relayed and never reset.
        """
        h, conn, down, upProto, up = self.connected({"reset_after_bytes": "100"})
        conn.dataReceived(b"x" * 99)
        h.clock.advance(1)
        self.assertEqual(up.value(), b"x" * 99)
        self.assertFalse(down.disconnected)
        self.assertEqual(h.stat("tcp_fault.resets_injected"), 0)

    def test_percentage(self) -> None:
        """
        With C{reset.percentage = 0} no connection is reset.
        """
        h, conn, down, upProto, up = self.connected({"reset_after_bytes": "1", "reset.percentage": "0"})
        conn.dataReceived(b"hello")
        h.clock.advance(0)
        self.assertEqual(up.value(), b"hello")
        self.assertFalse(down.disconnected)


class TCPFaultConfigTests(SynchronousTestCase):
    """
    Bad C{tcp_fault} options are errors naming the key.
    """

    def test_errors(self) -> None:
        """
        No fault, a zero delay, a negative byte count and a percentage without its fault are errors.
        """
        self.assertEqual([(e.key, e.why) for e in fault({}).errors],
                         [(None, "injects no fault: set delay or reset_after_bytes")])
        keys = [e.key for e in fault({"delay": "0s", "reset_after_bytes": "-1", "reset.percentage": "5"}).errors]
        self.assertEqual(sorted(keys), ["delay", "reset_after_bytes"])
        keys = [e.key for e in fault({"delay": "1s", "reset.percentage": "5"}).errors]
        self.assertEqual(keys, ["reset.percentage"])


class TCPRateLimitTests(SynchronousTestCase):
    """
    The network C{local_ratelimit} limits the rate of new connections.
    """

    def test_overLimitClosed(self) -> None:
        """
        Past C{max_tokens} a connection is closed at once without an upstream connect, and counted.
        """
        h = limit({"max_tokens": "2", "fill_interval": "1s"})
        self.assertEqual(h.errors, [])
        accepted = [h.accept() for _ in range(3)]
        self.assertEqual(len(h.endpoint.attempts), 2)
        conn, down = accepted[2]
        self.assertTrue(down.disconnecting)
        self.assertEqual(conn.closeReason, "local_rate_limited")
        self.assertEqual(h.stat("local_rate_limit.rate_limited"), 1)

    def test_refill(self) -> None:
        """
        C{tokens_per_fill} tokens come back every C{fill_interval}, lazily, on the clock.
        """
        h = limit({"max_tokens": "3", "tokens_per_fill": "2", "fill_interval": "1s"})
        for _ in range(4):
            h.accept()
        self.assertEqual(h.stat("local_rate_limit.rate_limited"), 1)
        h.clock.advance(1)
        for _ in range(3):
            h.accept()
        self.assertEqual(len(h.endpoint.attempts), 5)
        self.assertEqual(h.stat("local_rate_limit.rate_limited"), 2)

    def test_configErrors(self) -> None:
        """
        C{max_tokens} and C{fill_interval} are required, and the interval is 50ms at least.
        """
        self.assertEqual(sorted(e.key for e in limit({}).errors), ["fill_interval", "max_tokens"])
        self.assertEqual([e.key for e in limit({"max_tokens": "1", "fill_interval": "10ms"}).errors],
                         ["fill_interval"])


class PluginTests(SynchronousTestCase):
    """
    Both filters are registered as network filter plugins.
    """

    def test_found(self) -> None:
        """
        A tcp listener finds C{tcp_fault} and the network C{local_ratelimit}; an HTTP listener still finds
        the HTTP C{local_ratelimit} under the same name.
        """
        errors: list = []
        network = factoriesFor("tcp", errors, "t.ini")
        http = factoriesFor("http", errors, "t.ini")
        self.assertEqual(errors, [])
        self.assertIsInstance(network["tcp_fault"], TCPFaultFactory)
        self.assertIsInstance(network["local_ratelimit"], TCPLocalRateLimitFactory)
        self.assertTrue(IHTTPFilterFactory.providedBy(http["local_ratelimit"]))
        self.assertNotIsInstance(http["local_ratelimit"], TCPLocalRateLimitFactory)
        self.assertIn("tcp_fault", [p.name for p in getPlugins(INetworkFilterFactory)])

    def test_exampleConfig(self) -> None:
        """
        C{etc/examples/tcp-filters.ini} loads and builds a service (without listening).
        """
        service = MeshService(loadFile(os.path.join(ROOT, "etc", "examples", "tcp-filters.ini")),
                              MemoryReactorClock())
        self.assertEqual(sorted(service.listeners), ["limited", "slow"])


class Collect(Protocol):
    """
    Sends C{payload} once connected and collects what comes back until the connection is lost.
    """

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.received = b""
        self.done: Deferred = Deferred()
        self.reason = None

    def connectionMade(self) -> None:
        self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.reason = reason
        self.done.callback(None)


class LoopbackTests(TestCase):
    """
    The filters in a real proxy in front of the built-in TCP echo.
    """

    timeout = 20

    @inlineCallbacks
    def proxy(self, filterSection: str):
        """
        Start an echo and a proxy whose listener C{edge} runs C{f, tcp_proxy}; return the proxy and its port.
        """
        echo = MeshService(loadString("[mesh]\nadmin = off\n[echo:e]\nendpoint = tcp:0:interface=127.0.0.1\n"
                                      "protocol = tcp\n"), reactor)
        echo.startService()
        self.addCleanup(echo.stopService)
        yield echo.whenLive
        echoPort = echo.echoes["e"].port.getHost().port
        proxy = MeshService(loadString(f"""
[mesh]
admin = off
[listener:edge]
endpoint = tcp:0:interface=127.0.0.1
protocol = tcp
filters = f, tcp_proxy
cluster = echo
{filterSection}
[cluster:echo]
endpoints = tcp:127.0.0.1:{echoPort}
""", "test.ini"), reactor, seed=1)
        proxy.startService()
        self.addCleanup(proxy.stopService)
        yield proxy.whenLive
        return proxy, proxy.listeners["edge"].port.getHost().port

    def connect(self, port: int, payload: bytes) -> Deferred:
        client = Collect(payload)
        return connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client).addCallback(lambda _: client)

    @inlineCallbacks
    def test_tcpFaultDelayAndReset(self) -> None:
        """
        A connection is held for the delay, gets back exactly the byte budget's share of its echo, and is
        reset.
        """
        proxy, port = yield self.proxy("[filter:f]\ntype = tcp_fault\ndelay = 200ms\nreset_after_bytes = 8\n")
        started = reactor.seconds()
        client = yield self.connect(port, b"0123456789")
        yield client.done
        self.assertGreaterEqual(reactor.seconds() - started, 0.2)
        # 8 bytes in all: 8 go up, then nothing is left for the echo.
        self.assertEqual(client.received, b"")
        self.assertEqual(proxy.stats.get("listener.edge.tcp_fault.delays_injected").value, 1)
        self.assertEqual(proxy.stats.get("listener.edge.tcp_fault.resets_injected").value, 1)
        yield deferLater(reactor, 0.05, lambda: None)

    @inlineCallbacks
    def test_rateLimit(self) -> None:
        """
        With one token, the first connection is echoed and the second is closed without a byte.
        """
        proxy, port = yield self.proxy("[filter:f]\ntype = local_ratelimit\nmax_tokens = 1\nfill_interval = 1h\n")
        first = yield self.connect(port, b"hello")
        second = yield self.connect(port, b"again")
        yield second.done
        self.assertEqual(second.received, b"")
        for _ in range(100):
            if first.received == b"hello":
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(first.received, b"hello")
        first.transport.loseConnection()
        yield first.done
        self.assertEqual(proxy.stats.get("listener.edge.local_rate_limit.rate_limited").value, 1)
        yield deferLater(reactor, 0.05, lambda: None)
