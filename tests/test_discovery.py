"""
Tests for dynamic host sets: L{Cluster.updateHosts} and how the load balancers, health checking, outlier
detection, pools and stats follow it; and the discovery keys of the config loader.
"""

from random import Random
from typing import List

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from twistedmesh.config import ConfigErrors, HostConfig, loadString
from twistedmesh.observability.stats import StatsStore
from twistedmesh.upstream.cluster import Cluster, buildClusters
from twistedmesh.upstream.discovery import DiscoveredHost
from twistedmesh.upstream.health import FAILED_ACTIVE_HC, PENDING_ACTIVE_HC
from twistedmesh.upstream.lb import POLICIES


def _config(extra: str = "", endpoints: str = "tcp:10.0.0.1:80\n    tcp:10.0.0.2:80"):
    text = f"[mesh]\nadmin = off\n[cluster:api]\nendpoints =\n    {endpoints}\n{extra}\n"
    return loadString(text, "mesh.ini")


def _cluster(extra: str = "", reactor=None, seed: int = 1) -> Cluster:
    config = _config(extra)
    return Cluster(config.clusters["api"], reactor or MemoryReactorClock(), StatsStore(), Random(seed))


def _hosts(*specs) -> List[HostConfig]:
    """
    Host configs from C{"10.0.0.N"} or C{("10.0.0.N", weight)} specs.
    """
    out = []
    for spec in specs:
        address, weight = (spec, 1) if isinstance(spec, str) else spec
        out.append(HostConfig(f"tcp:{address}:80", weight))
    return out


class _Conn:
    """
    What a pool reads of a connection, recording how it was closed.
    """

    class transport:
        @staticmethod
        def resumeProducing() -> None:
            pass

    def __init__(self) -> None:
        self.closing = False
        self.closed = None
        self.idleTimer = None

    def _close(self, abort: bool) -> None:
        self.closing = True
        self.closed = "abort" if abort else "close"


class _H2Conn:
    """
    What draining reads of an HTTP/2 connection.
    """

    def __init__(self) -> None:
        self.closing = False
        self.goingAway = False
        self.streams = {}
        self.reserved = 0
        self.idled = False

    def _idle(self) -> None:
        self.idled = True


class UpdateHostsTests(SynchronousTestCase):
    """
    L{Cluster.updateHosts} diffs by endpoint string.
    """

    def test_keptAddedRemoved(self) -> None:
        """A host that stays keeps its object (and figures); a new one is appended; a gone one is dropped."""
        cluster = _cluster()
        first, second = cluster.hosts
        second.rq_total = 7
        self.assertTrue(cluster.updateHosts(_hosts("10.0.0.2", "10.0.0.3")))
        self.assertIs(cluster.hosts[0], second)
        self.assertEqual(cluster.hosts[0].rq_total, 7)
        self.assertEqual([h.endpoint for h in cluster.hosts], ["tcp:10.0.0.2:80", "tcp:10.0.0.3:80"])
        self.assertNotIn(first, cluster.hosts)
        self.assertEqual(cluster.membership_change.value, 1)
        self.assertEqual(cluster.membership_total.value, 2)
        self.assertEqual(cluster.membership_healthy.value, 2)

    def test_sameSetOtherOrder(self) -> None:
        """The same hosts in another order (a rotating DNS answer) change nothing, not even the order."""
        cluster = _cluster()
        before = cluster.hosts
        self.assertFalse(cluster.updateHosts(_hosts("10.0.0.2", "10.0.0.1")))
        self.assertEqual(cluster.hosts, before)
        self.assertEqual(cluster.membership_change.value, 0)

    def test_duplicates(self) -> None:
        """An endpoint listed twice makes one host, with the first listing's weight."""
        cluster = _cluster()
        cluster.updateHosts(_hosts(("10.0.0.3", 4), ("10.0.0.3", 9)))
        self.assertEqual([(h.endpoint, h.weight) for h in cluster.hosts], [("tcp:10.0.0.3:80", 4)])

    def test_weights(self) -> None:
        """A new weight is taken by the kept host and the balancer rebuilds over it."""
        cluster = _cluster()
        first, second = cluster.hosts
        self.assertTrue(cluster.updateHosts(_hosts(("10.0.0.1", 3), "10.0.0.2")))
        self.assertIs(cluster.hosts[0], first)
        self.assertEqual(first.weight, 3)
        self.assertEqual(cluster.membership_change.value, 0)
        picks = [cluster.pick() for _ in range(400)]
        self.assertEqual(picks.count(first), 300)
        self.assertEqual(picks.count(second), 100)

    def test_empty(self) -> None:
        """Every host may go: the cluster then picks none."""
        cluster = _cluster()
        self.assertTrue(cluster.updateHosts([]))
        self.assertEqual(cluster.hosts, ())
        self.assertIsNone(cluster.pick())
        self.assertEqual(cluster.membership_total.value, 0)

    def test_everyPolicyFollows(self) -> None:
        """Each load-balancing policy picks exactly the new set after an update (rings and tables rebuilt)."""
        for policy in POLICIES:
            hashing = "\nhash_policy = header:x-user" if policy in ("ring_hash", "maglev") else ""
            cluster = _cluster(f"lb_policy = {policy}{hashing}")
            cluster.updateHosts(_hosts("10.0.0.2", "10.0.0.3", "10.0.0.4"))
            picked = {cluster.pick(hashKey=str(i).encode()).endpoint for i in range(600)}
            self.assertEqual(picked, {"tcp:10.0.0.2:80", "tcp:10.0.0.3:80", "tcp:10.0.0.4:80"}, policy)
            cluster.updateHosts(_hosts("10.0.0.4"))
            picked = {cluster.pick(hashKey=str(i).encode()).endpoint for i in range(50)}
            self.assertEqual(picked, {"tcp:10.0.0.4:80"}, policy)

    def test_ringKeysStay(self) -> None:
        """With ring hash, adding a host moves only the keys it takes: the others keep their host."""
        cluster = _cluster("lb_policy = ring_hash\nhash_policy = header:x-user")
        keys = [str(i).encode() for i in range(300)]
        before = {k: cluster.pick(hashKey=k) for k in keys}
        cluster.updateHosts(_hosts("10.0.0.1", "10.0.0.2", "10.0.0.3"))
        new = cluster.hosts[2]
        for k in keys:
            after = cluster.pick(hashKey=k)
            self.assertIn(after, (before[k], new))

    def test_discoveredHostServerName(self) -> None:
        """A discovered host may connect elsewhere than its name says (a logical DNS host)."""
        cluster = _cluster()
        cluster.updateHosts([DiscoveredHost("tcp:api.internal:80", 2, "api.internal", "tcp:host=10.9.9.9:port=80")])
        (host,) = cluster.hosts
        self.assertEqual(host.endpoint, "tcp:api.internal:80")
        self.assertEqual(host.client._host, "10.9.9.9")
        self.assertEqual(host.weight, 2)


class HealthFollowsTests(SynchronousTestCase):
    """
    Active health checking follows the host set.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.cluster = _cluster("health.path = /healthz\nhealth.interval = 5s", self.reactor)
        self.checker = self.cluster.healthChecker
        self.checker.start()

    def test_addedPending(self) -> None:
        """A new host starts unhealthy, pending its first check, which is scheduled at once."""
        self.cluster.updateHosts(_hosts("10.0.0.1", "10.0.0.2", "10.0.0.3"))
        new = self.cluster.hosts[2]
        self.assertFalse(new.healthy)
        self.assertEqual(new.healthFlags, {FAILED_ACTIVE_HC, PENDING_ACTIVE_HC})
        self.assertIn(new, self.checker.checkers)
        connects = len(self.reactor.tcpClients)
        self.reactor.advance(0)
        self.assertEqual([c[0] for c in self.reactor.tcpClients[connects:]].count("10.0.0.3"), 1)

    def test_removedForgotten(self) -> None:
        """A removed host's checks stop: its timer is cancelled and the checker drops it."""
        gone = self.cluster.hosts[0]
        checker = self.checker.checkers[gone]
        self.cluster.updateHosts(_hosts("10.0.0.2"))
        self.assertNotIn(gone, self.checker.checkers)
        self.assertIsNone(checker.timer)
        self.assertEqual(self.checker.healthy.value, 0)  # the one left is still pending

    def test_notRunning(self) -> None:
        """Before the checker starts, a new host is pending too, and start() checks it like the others."""
        self.checker.stop()
        self.cluster.updateHosts(_hosts("10.0.0.9"))
        self.assertNotIn(self.cluster.hosts[0], self.checker.checkers)
        self.assertIn(PENDING_ACTIVE_HC, self.cluster.hosts[0].healthFlags)


class OutlierFollowsTests(SynchronousTestCase):
    """
    Outlier detection follows the host set.
    """

    def test_removedEjected(self) -> None:
        """An ejected host that goes is forgotten and no longer counts as an active ejection."""
        cluster = _cluster("outlier.consecutive_5xx = 2\noutlier.max_ejection_percent = 100")
        outlier = cluster.outlier
        bad = cluster.hosts[0]
        outlier.onResponse(bad, 503)
        outlier.onResponse(bad, 503)
        self.assertEqual(outlier.ejections_active.value, 1)
        cluster.updateHosts(_hosts("10.0.0.2", "10.0.0.3"))
        self.assertIsNone(outlier.stateOf(bad))
        self.assertEqual(outlier.ejections_active.value, 0)
        new = cluster.hosts[1]
        self.assertIsNotNone(outlier.stateOf(new))
        outlier.onResponse(new, 503)
        outlier.onResponse(new, 503)
        self.assertFalse(new.healthy)


class PoolFollowsTests(SynchronousTestCase):
    """
    A removed host's pool is drained.
    """

    def test_idleClosedBusyFinishes(self) -> None:
        """Idle connections close at once; a busy one closes when its request ends, not before."""
        cluster = _cluster()
        gone = cluster.hosts[0]
        pool = cluster.pools.forHost(gone)
        idle, busy = _Conn(), _Conn()
        pool.release(idle)
        self.assertEqual(pool.idle, [idle])
        cluster.updateHosts(_hosts("10.0.0.2"))
        self.assertEqual(idle.closed, "close")
        self.assertIsNone(busy.closed)
        self.assertNotIn(gone, cluster.pools.pools)
        pool.release(busy)  # its request finished
        self.assertEqual(busy.closed, "close")
        self.assertEqual(pool.idle, [])

    def test_http2(self) -> None:
        """HTTP/2: an idle connection goes away at once; a busy one takes no new stream and goes when done."""
        cluster = _cluster("protocol = http2")
        gone = cluster.hosts[0]
        pool = cluster.pools.forHost(gone)
        idle, busy = _H2Conn(), _H2Conn()
        busy.streams = {1: object()}
        pool.connections.update((idle, busy))
        pool.ready.extend((idle, busy))
        cluster.updateHosts(_hosts("10.0.0.2"))
        self.assertTrue(idle.idled)
        self.assertFalse(busy.idled)
        self.assertTrue(busy.goingAway)
        self.assertEqual(pool.ready, [idle])  # idle's own _idle() takes it out (faked here)

    def test_retiredClusterHTTP2(self) -> None:
        """
        A cluster a reload retires drains its HTTP/2 pools the same way (the pool's own C{drain()}).
        """
        from twistedmesh.reload import drainCluster
        cluster = _cluster("protocol = http2")
        pool = cluster.pools.forHost(cluster.hosts[0])
        idle, busy = _H2Conn(), _H2Conn()
        busy.streams = {1: object()}
        pool.connections.update((idle, busy))
        pool.ready.extend((idle, busy))
        drainCluster(cluster)
        self.assertTrue(idle.idled)
        self.assertTrue(busy.goingAway)
        self.assertEqual(pool.ready, [idle])

    def test_retiredClusterHTTP1(self) -> None:
        """
        A retired HTTP/1.1 cluster closes idle connections now and keeps none released later.
        """
        from twistedmesh.reload import drainCluster
        cluster = _cluster()
        pool = cluster.pools.forHost(cluster.hosts[0])
        idle, busy = _Conn(), _Conn()
        pool.release(idle)
        drainCluster(cluster)
        self.assertEqual(idle.closed, "close")
        pool.release(busy)
        self.assertEqual(busy.closed, "close")
        later = cluster.pools.forHost(cluster.hosts[1])
        self.assertEqual(later.maxIdle, 0)

    def test_keptPoolUntouched(self) -> None:
        """A host that stays keeps its pool and idle connections."""
        cluster = _cluster()
        kept = cluster.hosts[1]
        pool = cluster.pools.forHost(kept)
        conn = _Conn()
        pool.release(conn)
        cluster.updateHosts(_hosts("10.0.0.2", "10.0.0.5"))
        self.assertIs(cluster.pools.forHost(kept), pool)
        self.assertEqual(pool.idle, [conn])
        self.assertIsNone(conn.closed)


class DiscoveryConfigTests(SynchronousTestCase):
    """
    The C{discovery}, C{dns_*} and C{[mesh] xds.*} keys.
    """

    def errors(self, text: str) -> List[str]:
        try:
            loadString(text, "mesh.ini")
        except ConfigErrors as e:
            return [str(error) for error in e.errors]
        return []

    def test_defaults(self) -> None:
        """A cluster is static by default; strict_dns takes Envoy's 5 s refresh rate."""
        config = _config()
        self.assertIsNone(config.clusters["api"].discovery)
        config = _config("discovery = strict_dns", "tcp:api.internal:8080")
        d = config.clusters["api"].discovery
        self.assertEqual((d.type, d.dns_refresh_rate, d.respect_dns_ttl, d.dns_lookup_family),
                         ("strict_dns", 5.0, False, "v4_only"))
        self.assertEqual(d.dns_failure_refresh_rate, 5.0)

    def test_dnsKeysOnStatic(self) -> None:
        """dns_* keys on a static cluster are an error naming the key."""
        errors = self.errors("[cluster:api]\nendpoints = tcp:10.0.0.1:80\ndns_refresh_rate = 1s\n")
        self.assertEqual(len(errors), 1)
        self.assertIn("[cluster:api]", errors[0])
        self.assertIn("dns_refresh_rate", errors[0])

    def test_logicalOneEndpoint(self) -> None:
        """logical_dns takes exactly one endpoint."""
        errors = self.errors("[cluster:api]\ndiscovery = logical_dns\nendpoints = tcp:a:80, tcp:b:80\n")
        self.assertTrue(any("exactly one endpoint" in e for e in errors), errors)

    def test_dnsTcpOnly(self) -> None:
        """A DNS cluster resolves tcp: endpoints only."""
        errors = self.errors("[cluster:api]\ndiscovery = strict_dns\nendpoints = unix:/tmp/x.sock\n")
        self.assertTrue(any("tcp: endpoints only" in e for e in errors), errors)

    def test_badDiscovery(self) -> None:
        """An unknown discovery type is an error with a suggestion."""
        errors = self.errors("[cluster:api]\ndiscovery = strict-dns\nendpoints = tcp:a:80\n")
        self.assertTrue(any("strict_dns" in e and "discovery" in e for e in errors), errors)

    def test_xds(self) -> None:
        """An xDS cluster has no endpoints and needs [mesh] xds.cluster naming a static HTTP/1.1 cluster."""
        config = loadString(
            "[mesh]\nadmin = off\nxds.cluster = cp\nxds.refresh_delay = 2s\nxds.node_id = n1\n"
            "[cluster:cp]\nendpoints = tcp:127.0.0.1:18000\n[cluster:api]\ndiscovery = xds\n", "mesh.ini")
        self.assertEqual(config.clusters["api"].discovery.type, "xds")
        self.assertEqual((config.mesh.xds.cluster, config.mesh.xds.refresh_delay, config.mesh.xds.node_id),
                         ("cp", 2.0, "n1"))
        errors = self.errors("[cluster:api]\ndiscovery = xds\n")
        self.assertTrue(any("xds.cluster" in e and "is required" in e for e in errors), errors)
        errors = self.errors("[mesh]\nxds.cluster = nope\n[cluster:api]\ndiscovery = xds\n")
        self.assertTrue(any("names no [cluster:nope]" in e for e in errors), errors)
        errors = self.errors("[mesh]\nxds.cluster = api\n[cluster:api]\ndiscovery = xds\n")
        self.assertTrue(any("must be static" in e for e in errors), errors)
        errors = self.errors("[mesh]\nxds.cluster = cp\n[cluster:cp]\nendpoints = tcp:127.0.0.1:1\n"
                             "[cluster:api]\ndiscovery = xds\nendpoints = tcp:127.0.0.1:2\n")
        self.assertTrue(any("takes its endpoints from the control plane" in e for e in errors), errors)

    def test_buildClusters(self) -> None:
        """buildClusters gives each discovered cluster its source, and a discovered cluster starts empty."""
        config = loadString(
            "[mesh]\nadmin = off\nxds.cluster = cp\n[cluster:cp]\nendpoints = tcp:127.0.0.1:18000\n"
            "[cluster:api]\ndiscovery = xds\n[cluster:web]\ndiscovery = strict_dns\n"
            "endpoints = tcp:web.internal:80\n", "mesh.ini")
        clusters = buildClusters(config.clusters, MemoryReactorClock(), StatsStore(), Random(0),
                                 xds=config.mesh.xds)
        self.assertIsNone(clusters["cp"].discovery)
        self.assertEqual(type(clusters["api"].discovery).__name__, "EDSSubscription")
        self.assertEqual(type(clusters["web"].discovery).__name__, "DNSDiscovery")
        self.assertEqual(clusters["api"].hosts, ())
        self.assertEqual(clusters["web"].hosts, ())
