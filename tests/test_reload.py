"""
Hot reload and draining: the configuration diff (L{twistedmesh.reload}), L{MeshService.reload} and
L{MeshService.drain} on memory transports and a L{MemoryReactorClock}, the admin C{POST /reload} and
C{POST /drain_listeners}, and the whole thing on loopback under load, and in C{twistd} on SIGHUP.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import treq
from twisted.internet import defer, error, protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.test.requesthelper import DummyRequest

from twistedmesh.admin.resource import AdminResource
from twistedmesh.config import loadFile, loadString
from twistedmesh.reload import diffConfigs
from twistedmesh.service import MeshService

from .support import Exchange as _Once  # sends one request: answered at the first bytes, done at the close
from .support import freePort, startTwistd

BASE = """
[mesh]
admin = tcp:9901:interface=127.0.0.1

[listener:web]
endpoint = tcp:10000:interface=127.0.0.1
protocol = http
routes = main

[listener:db]
endpoint = tcp:10001:interface=127.0.0.1
cluster = pg

[route:main/all]
prefix = /
cluster = api

[cluster:api]
endpoints = tcp:127.0.0.1:9001

[cluster:pg]
endpoints = tcp:127.0.0.1:5432
protocol = tcp

[cluster:spare]
endpoints = tcp:127.0.0.1:9100

[filter:limits]
type = local_ratelimit
max_tokens = 10

[echo:e]
endpoint = tcp:9500:interface=127.0.0.1
"""


def diff(old: str, new: str):
    return diffConfigs(loadString(old, "old.ini"), loadString(new, "new.ini"))


class DiffTests(unittest.TestCase):
    """
    L{diffConfigs}: each kind of section kept, modified, added or removed, and what a listener depends on.
    """

    def test_identical(self) -> None:
        """The same file again: everything is kept, nothing changed."""
        d = diff(BASE, BASE)
        self.assertEqual(d.listeners.kept, ("web", "db"))
        self.assertEqual(d.clusters.kept, ("api", "pg", "spare"))
        self.assertEqual(d.echoes.kept, ("e",))
        self.assertEqual(d.filters.kept, ("limits",))
        self.assertEqual(d.routes.kept, ("main",))
        for changes in (d.listeners, d.clusters, d.echoes, d.filters, d.routes):
            self.assertFalse(changes.changed)
        self.assertFalse(d.admin)

    def test_clusterModifiedKeepsListeners(self) -> None:
        """A cluster whose hosts changed is modified; the listener routing to it is kept (it finds the new
        cluster in the live mapping)."""
        d = diff(BASE, BASE.replace("tcp:127.0.0.1:9001", "tcp:127.0.0.1:9002"))
        self.assertEqual(d.clusters.modified, ("api",))
        self.assertEqual(d.clusters.kept, ("pg", "spare"))
        self.assertEqual(d.listeners.kept, ("web", "db"))
        self.assertFalse(d.listeners.changed)

    def test_unusedClusterChangeKeepsListeners(self) -> None:
        """A cluster no listener uses changes: every listener is kept."""
        d = diff(BASE, BASE.replace("tcp:127.0.0.1:9100", "tcp:127.0.0.1:9101"))
        self.assertEqual(d.clusters.modified, ("spare",))
        self.assertEqual(d.listeners.kept, ("web", "db"))

    def test_tcpListenerKeptWhenItsClusterChanges(self) -> None:
        """A tcp listener's C{cluster =} is not a dependency either: the cluster changes, the listener stays."""
        d = diff(BASE, BASE.replace("protocol = tcp\n", "protocol = tcp\nconnect_timeout = 1s\n"))
        self.assertEqual(d.clusters.modified, ("pg",))
        self.assertEqual(d.listeners.kept, ("web", "db"))

    def test_clusterAddedAndRemoved(self) -> None:
        """A new section is added, a missing one removed."""
        d = diff(BASE, BASE.replace("[cluster:spare]", "[cluster:other]"))
        self.assertEqual((d.clusters.added, d.clusters.removed), (("other",), ("spare",)))
        self.assertEqual(d.listeners.kept, ("web", "db"))

    def test_clusterTLSSection(self) -> None:
        """A change inside the C{[tls:NAME]} a cluster names modifies the cluster."""
        tls = "\n[tls:up]\nsni = {name}\n"
        withTLS = BASE.replace("[cluster:spare]\n", "[cluster:spare]\ntls = up\n")
        old = withTLS + tls.format(name="a.example")
        d = diff(old, withTLS + tls.format(name="b.example"))
        self.assertEqual(d.clusters.modified, ("spare",))
        self.assertEqual(diff(old, old).clusters.modified, ())

    def test_listenerEndpointMovedIsRemoveAndAdd(self) -> None:
        """A listener on another endpoint is removed and added (a new socket), not modified."""
        d = diff(BASE, BASE.replace("tcp:10000:", "tcp:10002:"))
        self.assertEqual((d.listeners.removed, d.listeners.added, d.listeners.modified), (("web",), ("web",), ()))
        self.assertEqual(d.listeners.kept, ("db",))

    def test_listenerSettingModified(self) -> None:
        """A listener's own key changed: modified, same socket."""
        d = diff(BASE, BASE.replace("routes = main\n", "routes = main\nidle_timeout = 5s\n"))
        self.assertEqual(d.listeners.modified, ("web",))

    def test_listenerAddedAndRemoved(self) -> None:
        """A listener section appears and one goes."""
        d = diff(BASE, BASE.replace("[listener:db]", "[listener:pg]"))
        self.assertEqual((d.listeners.added, d.listeners.removed), (("pg",), ("db",)))

    def test_routeTableModified(self) -> None:
        """A route changed: the table is modified and so is the listener using it."""
        d = diff(BASE, BASE.replace("prefix = /\n", "prefix = /api/\n"))
        self.assertEqual(d.routes.modified, ("main",))
        self.assertEqual(d.listeners.modified, ("web",))
        self.assertEqual(d.listeners.kept, ("db",))

    def test_routeToOtherCluster(self) -> None:
        """A route now sending to another (unchanged) cluster modifies the listener, not the clusters."""
        d = diff(BASE, BASE.replace("cluster = api", "cluster = spare"))
        self.assertEqual(d.clusters.kept, ("api", "pg", "spare"))
        self.assertEqual(d.listeners.modified, ("web",))

    def test_filterSection(self) -> None:
        """A filter section changed modifies the listeners whose chain names it, only."""
        old = BASE.replace("routes = main\n", "routes = main\nfilters = limits, router\n")
        d = diff(old, old.replace("max_tokens = 10", "max_tokens = 20"))
        self.assertEqual(d.filters.modified, ("limits",))
        self.assertEqual(d.listeners.modified, ("web",))
        self.assertEqual(d.listeners.kept, ("db",))
        unused = diff(BASE, BASE.replace("max_tokens = 10", "max_tokens = 20"))
        self.assertEqual(unused.filters.modified, ("limits",))
        self.assertEqual(unused.listeners.kept, ("web", "db"))

    def test_filterNamingCluster(self) -> None:
        """A filter option naming a cluster does not make the listener depend on that cluster (filters look
        clusters up in the live mapping); a change of the filter's own section does."""
        old = BASE.replace("routes = main\n", "routes = main\nfilters = authz, router\n") + (
            "\n[filter:authz]\ntype = ext_authz\ncluster = spare\n")
        d = diff(old, old.replace("tcp:127.0.0.1:9100", "tcp:127.0.0.1:9101"))
        self.assertEqual(d.clusters.modified, ("spare",))
        self.assertEqual(d.listeners.kept, ("web", "db"))
        d = diff(old, old.replace("cluster = spare\n", "cluster = api\n"))
        self.assertEqual(d.listeners.modified, ("web",))

    def test_echoes(self) -> None:
        """An echo's protocol changed is modified; on another endpoint it is removed and added."""
        d = diff(BASE, BASE.replace("tcp:9500:interface=127.0.0.1", "tcp:9500:interface=127.0.0.1\nprotocol = tcp"))
        self.assertEqual(d.echoes.modified, ("e",))
        d = diff(BASE, BASE.replace("tcp:9500:", "tcp:9501:"))
        self.assertEqual((d.echoes.removed, d.echoes.added), (("e",), ("e",)))

    def test_admin(self) -> None:
        """The admin endpoint changes only with its own keys."""
        self.assertTrue(diff(BASE, BASE.replace("tcp:9901:", "tcp:9902:")).admin)
        self.assertFalse(diff(BASE, BASE.replace("tcp:9001", "tcp:9002")).admin)

    def test_summary(self) -> None:
        """The diff as JSON data names what changed and counts what was kept."""
        summary = diff(BASE, BASE.replace("[cluster:spare]", "[cluster:other]")).summary()
        self.assertEqual(summary["clusters"], {"kept": 2, "modified": [], "added": ["other"], "removed": ["spare"]})
        self.assertEqual(summary["listeners"]["kept"], 2)
        json.dumps(summary)


MEMORY = """
[mesh]
admin = tcp:0:interface=127.0.0.1
drain_timeout = 30s

[listener:web]
endpoint = tcp:0:interface=127.0.0.1
protocol = http
routes = main

[listener:db]
endpoint = tcp:0:interface=127.0.0.1
cluster = pg

[route:main/all]
prefix = /
{route}

[cluster:up]
endpoints = tcp:127.0.0.1:7001
{up}

[cluster:pg]
endpoints = tcp:127.0.0.1:5432
protocol = tcp
"""

OLD_ROUTE = "cluster = up"
NEW_ROUTE = "direct_response.status = 200\ndirect_response.body = new"


class _Downstream:
    """
    One downstream connection to a listener, on a L{StringTransport}.
    """

    def __init__(self, service: MeshService, name: str = "web") -> None:
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.conn = service.listeners[name].front.buildProtocol(None)
        self.conn.makeConnection(self.transport)

    def get(self, path: str) -> None:
        self.conn.dataReceived(b"GET " + path.encode() + b" HTTP/1.1\r\nhost: x\r\n\r\n")

    def take(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def lose(self) -> None:
        self.conn.connectionLost(Failure(error.ConnectionDone()))


class ReloadTests(unittest.TestCase):
    """
    L{MeshService.reload} on a L{MemoryReactorClock}: nothing touches the network; connections are memory
    transports.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.path = os.path.join(self.mktemp())
        self.write()
        self.service = MeshService(loadFile(self.path), self.clock, seed=1)
        self.service.startService()

    def write(self, route: str = OLD_ROUTE, up: str = "", extra: str = "") -> None:
        with open(self.path, "w") as f:
            f.write(MEMORY.format(route=route, up=up) + extra)

    def reload(self):
        results = []
        self.service.reload().addCallback(results.append)
        self.assertEqual(len(results), 1)
        return results[0]

    def upstream(self):
        """
        Complete the newest upstream connection attempt with a memory transport: (protocol, transport).
        """
        factory = self.clock.tcpClients[-1][2]
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def admin(self, path: str, method: bytes = b"GET") -> DummyRequest:
        resource = AdminResource(self.service, self.clock)
        request = DummyRequest([s.encode() for s in path.lstrip("/").split("/")])
        request.method = method
        body = resource.render(request)
        if isinstance(body, bytes):
            request.write(body)
            request.finish()
        return request

    def test_badConfigKeepsServing(self) -> None:
        """A file that does not load changes nothing, and is reported, counted and shown by /config_dump."""
        factory = self.service.listeners["web"].factory
        config = self.service.config
        self.write(extra="\n[listener:bad]\nendpoint = tcp:0\ncluster = nope\n")
        result = self.reload()
        self.assertFalse(result.ok)
        self.assertFalse(result.applied)
        self.assertIn("[listener:bad] cluster: names no [cluster:nope] section", "\n".join(result.errors))
        self.assertIs(self.service.config, config)
        self.assertIs(self.service.listeners["web"].factory, factory)
        self.assertEqual(self.service.stats.counter("server.reload.failure").value, 1)
        self.assertEqual(self.service.stats.counter("server.reload.success").value, 0)
        dump = json.loads(b"".join(self.admin("/config_dump").written))
        self.assertEqual(dump["last_reload"]["ok"], False)
        self.assertIn("[cluster:nope]", dump["last_reload"]["errors"][0])
        ready = self.admin("/ready")
        self.assertEqual((ready.responseCode, b"".join(ready.written)), (200, b"LIVE\n"))

    def test_buildErrorKeepsServing(self) -> None:
        """A file that loads but does not build (a filter's bad option) changes nothing either."""
        self.write(extra="\n[filter:limits]\ntype = local_ratelimit\nmax_tokenz = 3\n")
        text = open(self.path).read().replace("routes = main\n", "routes = main\nfilters = limits, router\n", 1)
        with open(self.path, "w") as f:
            f.write(text)
        makers = self.service.filterMakers
        result = self.reload()
        self.assertFalse(result.applied)
        self.assertIn("[filter:limits] max_tokenz", "\n".join(result.errors))
        self.assertEqual(self.service.filterMakers, makers)

    def test_unchangedKeepsEverything(self) -> None:
        """The same file again: same ports, factories, clusters, makers; counted as a success."""
        ports = {n: l.port for n, l in self.service.listeners.items()}
        factories = {n: l.factory for n, l in self.service.listeners.items()}
        clusters = dict(self.service.clusters)
        admin = self.service.admin
        result = self.reload()
        self.assertTrue(result.ok)
        self.assertEqual({n: l.port for n, l in self.service.listeners.items()}, ports)
        for name, listening in self.service.listeners.items():
            self.assertIs(listening.factory, factories[name])
        for name, cluster in self.service.clusters.items():
            self.assertIs(cluster, clusters[name])
        self.assertIs(self.service.admin, admin)
        self.assertEqual(self.service.stats.counter("server.reload.success").value, 1)
        self.assertEqual(self.service.stats.root.scope("listener_manager").counter("listener_modified").value, 0)

    def test_keptClusterKeepsState(self) -> None:
        """An unchanged cluster is the same object: pool, host health flags, stats go on."""
        up = self.service.clusters["up"]
        host = up.hosts[0]
        host.setHealthFlag("failed_active_hc", True, "test")
        pool = up.pools.forHost(host)
        up.upstream_rq_total.value = 41
        self.write(route=NEW_ROUTE)
        self.assertTrue(self.reload().ok)
        self.assertIs(self.service.clusters["up"], up)
        self.assertIs(up.pools.forHost(host), pool)
        self.assertEqual(host.healthFlags, {"failed_active_hc"})
        self.assertIs(self.service.stats.scope("cluster", "up").counter("upstream_rq_total"), up.upstream_rq_total)
        self.assertEqual(up.upstream_rq_total.value, 41)

    def test_modifiedClusterRebuiltAndRetired(self) -> None:
        """A changed cluster is a new object; the old one's idle connections close and its checker stops."""
        old = self.service.clusters["up"]
        down = _Downstream(self.service)
        down.get("/warm")
        proto, transport = self.upstream()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        self.assertIn(b"ok", down.take())
        self.assertFalse(transport.disconnecting)  # idle in the old cluster's pool
        self.write(up="connect_timeout = 2s")
        result = self.reload()
        self.assertTrue(result.ok)
        self.assertEqual(result.diff.clusters.modified, ("up",))
        self.assertIsNot(self.service.clusters["up"], old)
        self.assertTrue(transport.disconnecting)
        manager = self.service.stats.root.scope("cluster_manager")
        self.assertEqual(manager.counter("cluster_modified").value, 1)
        self.assertEqual(manager.counter("cluster_added").value, 2)  # at startup

    def test_clusterChangeKeepsListeners(self) -> None:
        """A reload that changes the clusters only keeps every listener (no drain, no connection: close): a
        request in flight finishes on the old cluster, the next one on the same connection goes to the new
        one; a TCP listener's new connections too."""
        web, db = self.service._built["web"], self.service._built["db"]
        down = _Downstream(self.service)
        down.get("/one")
        self.assertEqual(self.clock.tcpClients[-1][:2], ("127.0.0.1", 7001))
        proto, _ = self.upstream()
        self.write(up="connect_timeout = 2s")
        with open(self.path) as f:
            text = f.read().replace("tcp:127.0.0.1:7001", "tcp:127.0.0.1:7002").replace(
                "tcp:127.0.0.1:5432", "tcp:127.0.0.1:5433")
        with open(self.path, "w") as f:
            f.write(text)
        result = self.reload()
        self.assertEqual(result.diff.clusters.modified, ("up", "pg"))
        self.assertEqual(result.diff.listeners.kept, ("web", "db"))
        self.assertIs(self.service._built["web"], web)
        self.assertIs(self.service._built["db"], db)
        self.assertEqual(self.service.stats.get("listener_manager.total_listeners_draining").value, 0)
        proto.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nold")
        answer = down.take()
        self.assertIn(b"old", answer)
        self.assertNotIn(b"connection: close", answer.lower())
        down.get("/two")
        self.assertEqual(self.clock.tcpClients[-1][:2], ("127.0.0.1", 7002))
        _Downstream(self.service, "db")
        self.assertEqual(self.clock.tcpClients[-1][:2], ("127.0.0.1", 5433))

    def test_removedClusterStatsDropped(self) -> None:
        """A cluster the new file removes loses its stats once it has drained (here at once: idle); a
        cluster kept keeps them."""
        self.service.clusters["pg"].upstream_cx_total.value = 3
        with open(self.path) as f:
            text = f.read()
        without = text.replace("[listener:db]\nendpoint = tcp:0:interface=127.0.0.1\ncluster = pg\n", "").replace(
            "[cluster:pg]\nendpoints = tcp:127.0.0.1:5432\nprotocol = tcp\n", "")
        self.assertNotIn("pg", without)
        with open(self.path, "w") as f:
            f.write(without)
        result = self.reload()
        self.assertTrue(result.ok, result.errors)
        self.assertEqual(result.diff.clusters.removed, ("pg",))
        names = [s.name for s in self.service.stats]
        self.assertFalse([n for n in names if n.startswith("cluster.pg.")])
        self.assertIn("cluster.up.upstream_rq_total", names)

    def test_keptTCPProxyClusterMustStay(self) -> None:
        """A kept listener is not configured again, yet a reload removing the cluster its tcp_proxy filter
        names is refused, naming the filter section, as a rebuild would be."""
        extra = ("\n[listener:raw]\nendpoint = tcp:0:interface=127.0.0.1\nprotocol = tcp\nfilters = proxy\n"
                 "\n[filter:proxy]\ntype = tcp_proxy\ncluster = spare\n"
                 "\n[cluster:spare]\nendpoints = tcp:127.0.0.1:6000\n")
        self.write(extra=extra)
        self.assertTrue(self.reload().ok)
        self.write(extra=extra.replace("[cluster:spare]\nendpoints = tcp:127.0.0.1:6000\n", ""))
        result = self.reload()
        self.assertFalse(result.applied)
        self.assertIn("[filter:proxy] cluster", " ".join(result.errors).replace("section ", ""))
        self.assertIn("spare", self.service.clusters)

    def test_inFlightStreamFinishesOnOldConfig(self) -> None:
        """
        A stream in flight at the reload finishes on the route and cluster it started with, on a connection
        then drained; an idle keep-alive connection and a new one take the new route; the old filter makers
        are closed once the old connection is gone; the listening socket is the same throughout.
        """
        listening = self.service.listeners["web"]
        port = listening.port
        oldCluster = self.service.clusters["up"]
        [oldMaker] = self.service._built["web"].makers
        closed = []
        oldMaker.close = lambda: closed.append(True)
        idle = _Downstream(self.service)
        idle.get("/first")
        proto, transport = self.upstream()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nold")
        self.assertTrue(idle.take().endswith(b"old"))
        busy = _Downstream(self.service)
        busy.get("/slow")  # reuses the idle upstream connection: the request is in flight
        self.assertIn(b"GET /slow", transport.value())

        self.write(route=NEW_ROUTE, up="connect_timeout = 2s")
        result = self.reload()
        self.assertTrue(result.ok, result.errors)
        self.assertIs(listening.port, port)
        self.assertEqual(result.diff.listeners.modified, ("web",))
        self.assertEqual(result.diff.listeners.kept, ("db",))

        fresh = _Downstream(self.service)
        fresh.get("/x")
        self.assertTrue(fresh.take().endswith(b"new"))
        idle.get("/again")
        again = idle.take()
        self.assertTrue(again.endswith(b"new"))
        self.assertNotIn(b"connection: close", again.lower())

        proto.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nstill-ok")
        answer = busy.take()
        self.assertTrue(answer.endswith(b"still-ok"))
        self.assertIn(b"connection: close", answer.lower())
        self.assertTrue(busy.transport.disconnecting)
        self.assertIs(busy.conn.factory.settings.makers[0], oldMaker)
        self.assertIsNot(self.service.clusters["up"], oldCluster)
        self.assertTrue(transport.disconnecting)  # released to the retired cluster's pool, which keeps none
        self.assertEqual(closed, [])
        busy.lose()
        self.assertEqual(closed, [True])
        gauge = self.service.stats.root.scope("listener_manager").gauge("total_listeners_draining")
        self.assertEqual(gauge.value, 0)

    def test_http2InFlightStreamFinishesOnOldConfig(self) -> None:
        """
        An HTTP/2 connection of a replaced listener gets GOAWAY; its open stream finishes on the old route,
        while a new connection uses the new one.
        """
        from .test_h2 import Peer, head

        old = _Downstream(self.service)
        peer = Peer(old.conn, old.transport)
        sid = peer.request(head(b"/slow"))
        proto, transport = self.upstream()
        self.assertIn(b"GET /slow", transport.value())
        self.write(route=NEW_ROUTE)
        self.assertTrue(self.reload().ok)
        peer.pump()
        self.assertEqual([g.error_code for g in peer.goaway()], [0])
        # h2's client state machine closes on any GOAWAY; the stream it names is still to be answered.
        peer.client.state_machine.state = peer.client.state_machine.state.CLIENT_OPEN
        fresh = _Downstream(self.service)
        other = Peer(fresh.conn, fresh.transport)
        newSid = other.request(head(b"/x"))
        self.assertEqual(bytes(other.responses[newSid].data), b"new")
        proto.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nstill-ok")
        peer.pump()
        self.assertEqual((peer.responses[sid].status, bytes(peer.responses[sid].data)), (200, b"still-ok"))
        self.assertTrue(peer.responses[sid].ended)
        self.assertTrue(old.transport.disconnecting)

    def test_retiredListenerAbortedAfterDrainTimeout(self) -> None:
        """Connections of a replaced listener still open after drain_timeout are aborted."""
        busy = _Downstream(self.service)
        busy.get("/slow")
        self.upstream()  # connected; the answer never comes (the route's timeout is 15s)
        self.write(route=NEW_ROUTE)
        with open(self.path) as f:
            text = f.read().replace("drain_timeout = 30s", "drain_timeout = 5s")
        with open(self.path, "w") as f:
            f.write(text)
        self.assertTrue(self.reload().ok)
        self.clock.advance(4.9)
        self.assertFalse(busy.transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(busy.transport.disconnecting)

    def test_listenerRemovedAndAdded(self) -> None:
        """A removed listener stops listening and drains; an added one listens; counted as Envoy does."""
        db = self.service.listeners["db"]
        text = open(self.path).read().replace("[listener:db]", "[listener:db2]")
        with open(self.path, "w") as f:
            f.write(text)
        result = self.reload()
        self.assertTrue(result.ok, result.errors)
        self.assertNotIn("db", self.service.listeners)
        self.assertIsNone(db.port)
        self.assertIsNone(db.parent)
        self.assertIsNotNone(self.service.listeners["db2"].port)
        manager = self.service.stats.root.scope("listener_manager")
        self.assertEqual((manager.counter("listener_added").value, manager.counter("listener_removed").value),
                         (3, 1))

    def test_endpointMovedGetsNewSocket(self) -> None:
        """A listener on another endpoint gets a new socket, the old one closed."""
        old = self.service.listeners["web"]
        text = open(self.path).read().replace("endpoint = tcp:0:interface=127.0.0.1\nprotocol = http",
                                              "endpoint = tcp:0:interface=127.0.0.2\nprotocol = http")
        with open(self.path, "w") as f:
            f.write(text)
        self.assertTrue(self.reload().ok)
        self.assertIsNot(self.service.listeners["web"], old)
        self.assertIsNone(old.port)
        self.assertIsNone(old.parent)
        self.assertIsNotNone(self.service.listeners["web"].port)
        self.assertEqual(self.clock.tcpServers[-1][3], "127.0.0.2")

    def test_echoes(self) -> None:
        """An echo is added, switched to another protocol on the same socket, and removed."""
        self.write(extra="\n[echo:e]\nendpoint = tcp:0:interface=127.0.0.1\n")
        self.assertEqual(self.reload().diff.echoes.added, ("e",))
        echo = self.service.echoes["e"]
        port, factory = echo.port, echo.factory
        self.assertIsNotNone(port)
        self.write(extra="\n[echo:e]\nendpoint = tcp:0:interface=127.0.0.1\nprotocol = tcp\n")
        self.assertEqual(self.reload().diff.echoes.modified, ("e",))
        self.assertIs(self.service.echoes["e"], echo)
        self.assertIs(echo.port, port)
        self.assertIsNot(echo.factory, factory)
        self.write()
        self.assertEqual(self.reload().diff.echoes.removed, ("e",))
        self.assertEqual(self.service.echoes, {})
        self.assertIsNone(echo.port)

    def test_adminKeptUnlessMoved(self) -> None:
        """The admin endpoint is kept across reloads unless its endpoint changes."""
        admin = self.service.admin
        self.write(route=NEW_ROUTE)
        self.reload()
        self.assertIs(self.service.admin, admin)
        text = open(self.path).read().replace("admin = tcp:0:interface=127.0.0.1", "admin = tcp:0:interface=127.0.0.3")
        with open(self.path, "w") as f:
            f.write(text)
        self.assertTrue(self.reload().ok)
        self.assertIsNot(self.service.admin, admin)
        self.assertIsNone(admin.port)
        self.assertIsNotNone(self.service.admin.port)
        self.assertEqual(self.clock.tcpServers[-1][3], "127.0.0.3")

    def test_adminPostReload(self) -> None:
        """C{POST /reload} answers with the result as JSON: 200 when applied, 400 with the errors when not."""
        self.write(route=NEW_ROUTE)
        request = self.admin("/reload", b"POST")
        self.assertEqual(request.responseCode, 200)
        body = json.loads(b"".join(request.written))
        self.assertEqual((body["ok"], body["changes"]["listeners"]["modified"]), (True, ["web"]))
        self.write(extra="[cluster:up]\nendpoints = nonsense\n")
        request = self.admin("/reload", b"POST")
        self.assertEqual(request.responseCode, 400)
        self.assertFalse(json.loads(b"".join(request.written))["applied"])
        self.assertEqual(self.admin("/reload").responseCode, 405)

    def test_drainListeners(self) -> None:
        """
        C{POST /drain_listeners?graceful}: listeners stop accepting, idle connections close, busy ones finish
        first, /ready says DRAINING, reloads are refused.
        """
        web = self.service.listeners["web"]
        idle = _Downstream(self.service)
        busy = _Downstream(self.service)
        busy.get("/slow")
        resource = AdminResource(self.service, self.clock)
        request = DummyRequest([b"drain_listeners"])
        request.method = b"POST"
        request.addArg(b"graceful", b"")
        self.assertEqual(resource.render(request), b"OK\n")
        self.assertIsNone(web.port)
        self.assertTrue(idle.transport.disconnecting)
        self.assertFalse(busy.transport.disconnecting)
        ready = self.admin("/ready")
        self.assertEqual((ready.responseCode, b"".join(ready.written)), (503, b"DRAINING\n"))
        result = self.reload()
        self.assertEqual((result.ok, result.errors), (False, ("the server is draining",)))
        proto, transport = self.upstream()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        self.assertIn(b"connection: close", busy.take().lower())
        self.assertTrue(busy.transport.disconnecting)

    def test_drainNotGraceful(self) -> None:
        """Without C{graceful}, listeners stop accepting and connections are left alone."""
        idle = _Downstream(self.service)
        done = []
        self.service.drain(graceful=False).addCallback(done.append)
        self.assertIsNone(self.service.listeners["web"].port)
        self.assertFalse(idle.transport.disconnecting)
        self.assertEqual(done, [])
        idle.lose()
        self.assertEqual(done, [None])


# -- on loopback, under load --------------------------------------------------------------------------------


class _Client(protocol.Protocol):
    """
    A keep-alive HTTP/1.1 client that sends its next request as soon as the previous answer is in, and
    reconnects when the proxy closes the connection after an answer.
    """

    def __init__(self, load: "_Load") -> None:
        self.load = load
        self.buffer = b""
        self.sentAt: Optional[int] = None  # the load's generation when the request in progress was sent
        self.answers = 0

    def connectionMade(self) -> None:
        self.send()

    def send(self) -> None:
        if self.load.stopping:
            self.transport.loseConnection()
            return
        self.sentAt = self.load.generation
        self.load.sent += 1
        self.transport.write(b"GET /load HTTP/1.1\r\nhost: test\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            lines = head.split(b"\r\n")
            headers = dict(line.lower().split(b": ", 1) for line in lines[1:])
            length = int(headers.get(b"content-length", b"-1"))
            if length < 0 or len(rest) < length:
                return
            self.buffer = rest[length:]
            self.answers += 1
            close = headers.get(b"connection") == b"close"
            self.load.answered(self, lines[0], headers.get(b"x-echo-server", b""))
            self.sentAt = None
            if close:
                self.transport.loseConnection()
                return
            self.send()

    def connectionLost(self, reason) -> None:
        self.load.lost(self)


class _Load:
    """
    A bounded load on one proxy port: C{n} clients in a loop, each keeping one request in flight.

    @ivar failures: requests that got a partial, broken or non-200 answer.
    @ivar unanswered: requests written on a keep-alive connection that the proxy closed before reading
        them (the race every keep-alive client has; it retries them on a new connection, as RFC 9112
        allows for an idempotent request).
    """

    def __init__(self, port: int, n: int = 4) -> None:
        self.port = port
        self.n = n
        self.generation = 0
        self.sent = 0
        self.ok = 0
        self.failures: List[str] = []
        self.unanswered = 0
        self.refused = 0
        self.servers: Dict[int, List[bytes]] = {}
        self.stopping = False
        self.active = 0
        self.finished = defer.Deferred()

    def start(self) -> None:
        for _ in range(self.n):
            self.connect()

    def connect(self) -> None:
        if self.stopping:
            return
        self.active += 1
        d = connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), _Client(self))

        def refused(f) -> None:
            f.trap(error.ConnectionRefusedError)
            self.refused += 1
            self._gone()

        d.addErrback(refused).addErrback(lambda f: self.failures.append(f"connect: {f.getErrorMessage()}"))

    def answered(self, client: _Client, status: bytes, server: bytes) -> None:
        if not status.startswith(b"HTTP/1.1 200"):
            self.failures.append(status.decode())
            return
        self.ok += 1
        self.servers.setdefault(client.sentAt, []).append(server)

    def lost(self, client: _Client) -> None:
        if client.sentAt is not None:
            if client.buffer or client.answers == 0:
                self.failures.append(f"connection lost with a request in flight ({len(client.buffer)} bytes in)")
            else:
                self.unanswered += 1
        self._gone()
        if client.sentAt is not None or not self.stopping:
            self.connect()

    def _gone(self) -> None:
        self.active -= 1
        if self.active == 0 and self.stopping and not self.finished.called:
            self.finished.callback(None)

    def stop(self) -> defer.Deferred:
        self.stopping = True
        if self.active == 0 and not self.finished.called:
            self.finished.callback(None)
        return self.finished


PROXY = """
[mesh]
admin = tcp:0:interface=127.0.0.1
drain_timeout = 5s

[listener:web]
endpoint = tcp:0:interface=127.0.0.1
protocol = http
routes = main

[route:main/all]
prefix = /
cluster = {cluster}

[cluster:a]
endpoints = tcp:127.0.0.1:{a}

[cluster:b]
endpoints = tcp:127.0.0.1:{b}
"""


class LoopbackTests(unittest.TestCase):
    """
    A proxy in this process on loopback, its upstreams two echo services, and a load of keep-alive clients.
    """

    def setUp(self) -> None:
        self.echo = MeshService(loadString("""
[mesh]
admin = off
[echo:a]
endpoint = tcp:0:interface=127.0.0.1
[echo:b]
endpoint = tcp:0:interface=127.0.0.1
"""), reactor)
        self.echo.startService()
        self.addCleanup(self.echo.stopService)
        self.ports = {name: l.port.getHost().port for name, l in self.echo.echoes.items()}
        self.path = os.path.join(self.mktemp())
        self.write("a")
        self.proxy = MeshService(loadFile(self.path), reactor, seed=1)
        self.proxy.startService()
        self.addCleanup(self.proxy.stopService)
        self.port = self.proxy.listeners["web"].port.getHost().port
        self.adminPort = self.proxy.admin.port.getHost().port

    def write(self, cluster: str) -> None:
        with open(self.path, "w") as f:
            f.write(PROXY.format(cluster=cluster, **self.ports))

    @defer.inlineCallbacks
    def test_reloadUnderLoad(self):
        """
        Five reloads (admin POST and the SIGHUP path alternately) switching the route between clusters while
        keep-alive clients keep requests in flight: no request fails, the listening socket is never closed,
        and requests sent after the last reload reach the new cluster.
        """
        port = self.proxy.listeners["web"].port
        load = _Load(self.port, 4)
        load.start()
        yield deferLater(reactor, 0.2, lambda: None)
        for i, cluster in enumerate("babab"):
            self.write(cluster)
            if i % 2 == 0:
                response = yield treq.post(f"http://127.0.0.1:{self.adminPort}/reload", persistent=False)
                result = yield response.json()
                self.assertEqual((response.code, result["ok"]), (200, True), result)
            else:
                result = yield self.proxy.reload()
                self.assertTrue(result.ok, result.errors)
            load.generation = i + 1
            yield deferLater(reactor, 0.15, lambda: None)
        yield deferLater(reactor, 0.2, lambda: None)
        yield load.stop()
        self.assertEqual(load.failures, [])
        self.assertIs(self.proxy.listeners["web"].port, port)
        self.assertGreater(load.ok, 20)
        self.assertEqual(load.unanswered, 0)
        self.assertEqual(set(load.servers[5]), {b"b"})
        self.assertIn(b"a", load.servers[0])  # before the first reload completed: the old route
        self.assertEqual(self.proxy.stats.counter("server.reload.success").value, 5)
        stats = self.proxy.stats.scope("http", "web")
        self.assertEqual(stats.counter("downstream_rq_total").value, load.ok)
        self.assertEqual(stats.counter("downstream_rq_5xx").value, 0)

    @defer.inlineCallbacks
    def test_tlsAddedOnSameSocket(self):
        """
        A listener that turns to TLS keeps its socket: new connections do the TLS handshake with the new
        certificate, and a plaintext keep-alive connection from before is closed rather than taken over.
        """
        from twisted.internet.endpoints import wrapClientTLS
        from twisted.internet.ssl import optionsForClientTLS

        from .test_tls import PKI

        pki = PKI(self.mktemp())
        cert, key, _ = pki.issue("server", dns=["localhost"], ips=["127.0.0.1"])
        port = self.proxy.listeners["web"].port
        plain = _Once(b"GET /before HTTP/1.1\r\nhost: x\r\n\r\n")
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), plain)
        yield plain.answered
        with open(self.path) as f:
            text = f.read().replace("routes = main\n", "routes = main\ntls = edge\n", 1)
        with open(self.path, "w") as f:
            f.write(text + f"\n[tls:edge]\ncertificate = {cert}\nprivate_key = {key}\n")
        result = yield self.proxy.reload()
        self.assertTrue(result.ok, result.errors)
        self.assertEqual(result.diff.listeners.modified, ("web",))
        self.assertIs(self.proxy.listeners["web"].port, port)
        yield plain.done  # the old plaintext connection was idle: closed by the drain
        secure = _Once(b"GET /after HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        endpoint = wrapClientTLS(optionsForClientTLS("localhost", trustRoot=pki.twistedCA()),
                                 TCP4ClientEndpoint(reactor, "127.0.0.1", self.port))
        yield connectProtocol(endpoint, secure)
        answer = yield secure.done
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)
        self.assertIn(b"x-echo-server: a", answer.lower())

    @defer.inlineCallbacks
    def test_tlsChangedIdleNotAdopted(self):
        """
        A TLS listener whose section changes (here: another certificate; as well a new client_ca): an idle
        keep-alive connection accepted under the old TLS settings is closed, not served by the new build.
        """
        from twisted.internet.endpoints import wrapClientTLS
        from twisted.internet.ssl import optionsForClientTLS

        from .test_tls import PKI

        pki = PKI(self.mktemp())
        cert, key, _ = pki.issue("server", dns=["localhost"], ips=["127.0.0.1"])
        cert2, key2, _ = pki.issue("server2", dns=["localhost"], ips=["127.0.0.1"])
        with open(self.path) as f:
            base = f.read().replace("routes = main\n", "routes = main\ntls = edge\n", 1)
        with open(self.path, "w") as f:
            f.write(base + f"\n[tls:edge]\ncertificate = {cert}\nprivate_key = {key}\n")
        result = yield self.proxy.reload()
        self.assertTrue(result.ok, result.errors)

        def connect(request):
            once = _Once(request)
            endpoint = wrapClientTLS(optionsForClientTLS("localhost", trustRoot=pki.twistedCA()),
                                     TCP4ClientEndpoint(reactor, "127.0.0.1", self.port))
            return connectProtocol(endpoint, once).addCallback(lambda _: once)

        idle = yield connect(b"GET /before HTTP/1.1\r\nhost: x\r\n\r\n")
        yield idle.answered
        with open(self.path, "w") as f:
            f.write(base + f"\n[tls:edge]\ncertificate = {cert2}\nprivate_key = {key2}\n")
        result = yield self.proxy.reload()
        self.assertTrue(result.ok, result.errors)
        self.assertEqual(result.diff.listeners.modified, ("web",))
        yield idle.done  # closed by the old build's drain, not adopted
        again = yield connect(b"GET /after HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        answer = yield again.done
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)

    test_tlsChangedIdleNotAdopted.timeout = 30  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_newListenerCannotListen(self):
        """
        An added listener whose address is taken: the rest of the new configuration is in effect, and the
        reload says which listener could not listen.
        """
        taken = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(protocol.Factory())
        self.addCleanup(taken.stopListening)
        with open(self.path, "a") as f:
            f.write(f"\n[listener:late]\nendpoint = tcp:{taken.getHost().port}:interface=127.0.0.1\n"
                    "protocol = http\nroutes = main\n")
        result = yield self.proxy.reload()
        self.assertEqual((result.ok, result.applied), (False, True))
        self.assertEqual(len(result.errors), 1)
        self.assertIn("listener late cannot listen", result.errors[0])
        self.assertIn("late", self.proxy.config.listeners)
        self.assertEqual(self.proxy.stats.counter("server.reload.failure").value, 1)

    @defer.inlineCallbacks
    def drainUnderLoad(self, drain):
        load = _Load(self.port, 4)
        load.start()
        yield deferLater(reactor, 0.3, lambda: None)
        drained = drain()
        yield drained
        yield load.stop()
        self.assertEqual(load.failures, [])
        self.assertGreater(load.ok, 10)
        # Every request the proxy read was answered: the clients got as many answers as it counted requests.
        stats = self.proxy.stats.scope("http", "web")
        self.assertEqual(stats.counter("downstream_rq_total").value, load.ok)
        self.assertEqual(stats.counter("downstream_rq_rx_reset").value, 0)
        self.assertEqual(self.proxy.stats.scope("listener", "web").gauge("downstream_cx_active").value, 0)
        with self.assertRaises(error.ConnectionRefusedError):
            yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), protocol.Protocol())

    def test_drainListenersUnderLoad(self):
        """
        C{POST /drain_listeners?graceful} under load: every request the proxy accepted is answered, then new
        connections are refused, and /ready says DRAINING.
        """
        @defer.inlineCallbacks
        def drain():
            response = yield treq.post(f"http://127.0.0.1:{self.adminPort}/drain_listeners?graceful",
                                       persistent=False)
            self.assertEqual(response.code, 200)
            yield response.content()
            ready = yield treq.get(f"http://127.0.0.1:{self.adminPort}/ready", persistent=False)
            self.assertEqual((ready.code, (yield ready.content())), (503, b"DRAINING\n"))
            yield self.proxy.drain()

        return self.drainUnderLoad(drain)

    def test_stopUnderLoad(self):
        """
        Stopping the service (what SIGTERM does) under load: every accepted request completes; then nothing
        accepts.
        """
        return self.drainUnderLoad(self.proxy.stopService)


class TwistdReloadTests(unittest.TestCase):
    """
    The real C{twistd -n twistedmesh} reloading on SIGHUP.
    """

    @defer.inlineCallbacks
    def test_sighup(self):
        """
        SIGHUP reloads the file: a route change takes effect; a broken file is reported by /config_dump
        while the previous configuration keeps serving; SIGTERM still exits 0.
        """
        admin, edge, a, b = (freePort() for _ in range(4))
        template = f"""
[mesh]
admin = tcp:{admin}:interface=127.0.0.1
drain_timeout = 2s
[listener:edge]
endpoint = tcp:{edge}:interface=127.0.0.1
protocol = http
routes = main
[route:main/all]
prefix = /
cluster = {{cluster}}
[cluster:a]
endpoints = tcp:127.0.0.1:{a}
[cluster:b]
endpoints = tcp:127.0.0.1:{b}
[echo:a]
endpoint = tcp:{a}:interface=127.0.0.1
[echo:b]
endpoint = tcp:{b}:interface=127.0.0.1
"""

        twistd, path = startTwistd(self, template.format(cluster="a"))

        def write(text: str) -> None:
            with open(path, "w") as f:
                f.write(text)


        @defer.inlineCallbacks
        def served(expected: bytes, attempts: int = 100):
            for _ in range(attempts):  # up to ~20 s
                if twistd.ended.called:
                    break
                try:
                    response = yield treq.get(f"http://127.0.0.1:{edge}/x", timeout=5, persistent=False)
                    yield response.content()
                    if response.headers.getRawHeaders(b"x-echo-server") == [expected]:
                        return True
                except Exception:
                    pass
                yield deferLater(reactor, 0.2, lambda: None)
            return False

        self.assertTrue((yield served(b"a")), twistd.output())
        write(template.format(cluster="b"))
        twistd.transport.signalProcess("HUP")
        self.assertTrue((yield served(b"b")), twistd.output())
        write(template.format(cluster="nope"))
        twistd.transport.signalProcess("HUP")
        dump = None
        for _ in range(100):
            response = yield treq.get(f"http://127.0.0.1:{admin}/config_dump", persistent=False)
            dump = yield response.json()
            if dump["last_reload"] is not None and not dump["last_reload"]["ok"]:
                break
            yield deferLater(reactor, 0.1, lambda: None)
        self.assertIn("[cluster:nope]", dump["last_reload"]["errors"][0])
        self.assertTrue((yield served(b"b", 1)))
        twistd.transport.signalProcess("TERM")
        code = yield twistd.ended
        self.assertEqual(code, 0, twistd.output())
        self.assertIn("reloaded", twistd.output())
