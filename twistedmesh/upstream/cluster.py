"""
Clusters and their hosts: named groups of upstream endpoints with a load balancer and per-host stats.
"""

from __future__ import annotations

import dataclasses
from random import Random
from types import MappingProxyType
from typing import Dict, Iterable, Mapping, Optional, Set, Tuple

from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger

from ..config import ClusterConfig
from ..config.discovery import XDSConfig
from ..config.model import HostConfig
from ..config.tls import TLSConfig
from ..tls import ClientTLS, endpointHost
from ..config.lb import LBConfig
from ..observability.stats import StatsStore
from .breaker import CircuitBreaker
from .discovery import DiscoveredHost, makeDiscovery
from .outlier import OutlierDetector
from .http1 import ClusterPools
from .http2 import H2ClusterPools
from .health import HealthChecker
from .lb import POLICIES


class Host:
    """
    One upstream endpoint of a cluster.

    @ivar endpoint: the client endpoint string, as configured (also the host's name in stats and logs).
    @ivar client: the L{IStreamClientEndpoint} parsed from it once.
    @ivar weight: the load-balancing weight.
    @ivar healthy: C{False} while health checking or outlier detection says not to use it: exactly when
        C{healthFlags} is not empty. Change it through L{setHealthFlag}.
    @ivar healthFlags: Envoy's reasons a host is not used (C{"failed_active_hc"},
        C{"failed_outlier_check"}, C{"pending_active_hc"}), for the admin C{/clusters} page.
    @ivar healthReason: a sentence saying why C{healthy} is what it is, for the same page.
    """

    # Per-host figures are plain integers (Envoy shows them on /clusters, not in /stats): the cheapest
    # possible increment on the hot path.
    STATS = ("cx_total", "cx_active", "cx_connect_fail", "rq_total", "rq_active", "rq_error")

    def __init__(self, endpoint: str, client: IStreamClientEndpoint, weight: int) -> None:
        self.endpoint = endpoint
        self.client = client
        self.weight = weight
        self.healthy = True
        self.healthFlags: Set[str] = set()
        self.healthReason = "no health checking configured"
        self.cx_total = 0
        self.cx_active = 0
        self.cx_connect_fail = 0
        self.rq_total = 0
        self.rq_active = 0
        self.rq_error = 0

    def setHealthFlag(self, flag: str, on: bool, reason: str = "") -> bool:
        """
        Set or clear one reason not to use this host (active health checking and outlier detection each
        own their flag, so one cannot undo the other's verdict).

        @return: whether C{healthy} changed (then the caller tells the cluster: L{Cluster.healthChanged}).
        """
        flags = self.healthFlags
        if on:
            flags.add(flag)
        else:
            flags.discard(flag)
        if reason:
            self.healthReason = reason
        healthy = not flags
        changed = healthy != self.healthy
        self.healthy = healthy
        return changed

    def __repr__(self) -> str:
        return f"<Host {self.endpoint} weight={self.weight}>"


class Cluster:
    """
    A named set of L{Host}s, a load balancer over them, and the cluster's stats (Envoy's names, under
    C{cluster.<name>.}). The set is fixed for a static cluster and changes through L{updateHosts} for a
    discovered one.
    """

    log = Logger()

    def __init__(self, config: ClusterConfig, reactor, stats: StatsStore, random: Optional[Random] = None,
                 tls: Optional[TLSConfig] = None) -> None:
        self.config = config
        self.name = config.name
        self.connectTimeout = config.connect_timeout
        self.stats = scope = stats.scope("cluster", config.name)
        #: The cluster speaks HTTP/2 to its hosts (the router hands its pools header lists, not heads).
        self.http2 = config.protocol == "http2"
        if self.http2 and tls is not None and not tls.alpn:
            # HTTP/2 over TLS is negotiated by ALPN: offer h2 unless the section says what to offer.
            tls = dataclasses.replace(tls, alpn=("h2",))
        # Upstream TLS: one ClientTLS per cluster; each host's endpoint gets TLS on top, with a context built
        # here, once per server name.
        self.tls = ClientTLS(tls, reactor) if tls is not None else None
        self.reactor = reactor
        # A discovered cluster (DNS, xDS) starts empty: its hosts arrive with the first update.
        self.hosts: Tuple[Host, ...] = () if config.discovery is not None else tuple(
            self._makeHost(h) for h in config.endpoints
        )
        #: Where the hosts come from when they change at run time (upstream/discovery.py), or None.
        self.discovery = None
        lbConfig = config.lb if config.lb is not None else LBConfig(policy=config.lb_policy)
        #: What the router (or tcp_proxy) hashes for ring_hash and maglev, or None.
        self.hashPolicy = lbConfig.hash_policy
        self.lb_healthy_panic = scope.counter("lb_healthy_panic")
        self.lb = POLICIES[lbConfig.policy](self.hosts, random, lbConfig, panic=self.lb_healthy_panic)
        self.upstream_cx_total = scope.counter("upstream_cx_total")
        self.upstream_cx_active = scope.gauge("upstream_cx_active")
        self.upstream_cx_connect_fail = scope.counter("upstream_cx_connect_fail")
        self.upstream_cx_connect_timeout = scope.counter("upstream_cx_connect_timeout")
        self.upstream_cx_rx_bytes_total = scope.counter("upstream_cx_rx_bytes_total")
        self.upstream_cx_tx_bytes_total = scope.counter("upstream_cx_tx_bytes_total")
        self.upstream_cx_none_healthy = scope.counter("upstream_cx_none_healthy")
        self.upstream_cx_http1_total = scope.counter("upstream_cx_http1_total")
        self.upstream_cx_http2_total = scope.counter("upstream_cx_http2_total")
        self.upstream_rq_total = scope.counter("upstream_rq_total")
        self.upstream_rq_active = scope.gauge("upstream_rq_active")
        self.upstream_rq_retry = scope.counter("upstream_rq_retry")
        self.upstream_rq_timeout = scope.counter("upstream_rq_timeout")
        self.upstream_rq_per_try_timeout = scope.counter("upstream_rq_per_try_timeout")
        self.byClass = (None,) + tuple(scope.counter(f"upstream_rq_{n}xx") for n in range(1, 6))
        self.upstream_rq_time = scope.histogram("upstream_rq_time")
        self.upstream_cx_length_ms = scope.histogram("upstream_cx_length_ms")
        # Connection pools (HTTP/1.1 keep-alive, or HTTP/2 multiplexed), one per host, made on first use.
        self.breaker = CircuitBreaker(config.breaker, scope)
        self.pools = (H2ClusterPools(self, reactor, config.http2, b"https" if tls is not None else b"http")
                      if self.http2 else ClusterPools(self, reactor))
        self.membership_change = scope.counter("membership_change")
        self.membership_total = scope.gauge("membership_total")
        self.membership_healthy = scope.gauge("membership_healthy")
        self.membership_total.value = len(self.hosts)
        self.membership_healthy.value = sum(1 for h in self.hosts if h.healthy)
        # Passive outlier detection (docs/outlier-detection.md), on the reactor's clock and the load
        # balancer's random; None without outlier.* keys. Made last: it reads the hosts and the stats scope.
        self.outlier: Optional[OutlierDetector] = (
            OutlierDetector(self, config.outlier, reactor, self.lb.random) if config.outlier is not None else None
        )
        #: Active health checking (started and stopped by the service), or None when not configured.
        self.healthChecker: Optional[HealthChecker] = None
        if config.health is not None:
            self.healthChecker = HealthChecker(self, config.health, reactor,
                                               random if random is not None else Random())

    def clientFor(self, reactor, endpoint: str, serverName: Optional[str] = None) -> IStreamClientEndpoint:
        """
        The client endpoint of one host: C{endpoint} parsed, with TLS on top when the cluster has C{tls}
        (for C{serverName}, else the endpoint's host: a resolved address keeps its DNS name's SNI and
        certificate check).
        """
        client = clientFromString(reactor, endpoint)
        if self.tls is None:
            return client
        return self.tls.wrapEndpoint(client, serverName or endpointHost(endpoint))

    def _makeHost(self, config: "HostConfig | DiscoveredHost") -> Host:
        # A discovered host may connect to another endpoint than the one it is named by (a logical DNS host
        # named by its DNS name connects to an address) and keep the TLS server name it was resolved from.
        connect = getattr(config, "connect", None) or config.endpoint
        serverName = getattr(config, "server_name", None)
        return Host(config.endpoint, self.clientFor(self.reactor, connect, serverName), config.weight)

    def updateHosts(self, configs: "Iterable[HostConfig | DiscoveredHost]") -> bool:
        """
        Replace the cluster's hosts with C{configs} (a discovery source's latest answer), by endpoint string:
        a host whose endpoint stays keeps its L{Host} (its health, outlier state, pool and figures) and takes
        the new weight; new endpoints become new hosts (pending their first health check when active health
        checking runs, as in Envoy); hosts that left are forgotten by health checking and outlier detection,
        their idle connections closed while requests in flight on them finish. The load balancer rebuilds
        once. An endpoint listed twice counts once (the first).

        @return: whether anything changed (membership or a weight).
        """
        wanted: Dict[str, "HostConfig | DiscoveredHost"] = {}
        for c in configs:
            wanted.setdefault(c.endpoint, c)
        # Hosts that stay keep their place and new ones go last, so that an answer listing the same hosts in
        # another order (DNS servers rotate them) changes nothing.
        kept = []
        removed = []
        reweighted = False
        for host in self.hosts:
            c = wanted.pop(host.endpoint, None)
            if c is None:
                removed.append(host)
                continue
            if host.weight != c.weight:
                host.weight = c.weight
                reweighted = True
            kept.append(host)
        added = [self._makeHost(c) for c in wanted.values()]
        kept.extend(added)
        if not added and not removed:
            if reweighted:
                self.lb.rebuild()
            return reweighted
        self.hosts = tuple(kept)
        self.membership_change.value += 1
        self.membership_total.value = len(kept)
        if self.healthChecker is not None:
            self.healthChecker.hostsChanged(added, removed)
        if self.outlier is not None:
            self.outlier.hostsChanged(added, removed)
        for host in removed:
            pool = self.pools.pools.pop(host, None)
            if pool is not None:
                pool.drain()  # idle connections close now, busy ones when their request ends
        self.log.info("cluster {name}: {added} host(s) added, {removed} removed, {total} in all",
                      name=self.name, added=len(added), removed=len(removed), total=len(kept))
        self.membership_healthy.value = sum(1 for h in kept if h.healthy)
        self.lb.rebuild(kept)
        return True

    def start(self) -> None:
        """
        Start finding hosts (a discovery source, if any). The service calls it when it starts.
        """
        if self.discovery is not None:
            self.discovery.start()

    def stop(self) -> None:
        """
        Stop finding hosts. The service calls it when it stops; the hosts stay as they are.
        """
        if self.discovery is not None:
            self.discovery.stop()

    def pick(self, exclude: "Host | None" = None, hashKey: "bytes | None" = None) -> "Host | None":
        """
        A host for a new connection (see L{twistedmesh.interfaces.ILoadBalancer.pick}).
        """
        return self.lb.pick(exclude, hashKey)

    def healthChanged(self) -> None:
        """
        Some host's C{healthy} changed: update the gauge and the load balancer's snapshot. Health checking
        and outlier detection call this after setting C{host.healthy}.
        """
        self.membership_healthy.value = sum(1 for h in self.hosts if h.healthy)
        self.lb.rebuild()


def buildClusters(
    configs: Dict[str, ClusterConfig], reactor, stats: StatsStore, random: Optional[Random] = None,
    tls: Mapping[str, TLSConfig] = MappingProxyType({}), xds: Optional[XDSConfig] = None, resolver=None,
    existing: Mapping[str, "Cluster"] = MappingProxyType({}), xdsClient=None,
) -> Dict[str, Cluster]:
    """
    One L{Cluster} per config section; C{random} (the service's) drives the load balancers. A cluster
    with C{discovery} gets its source (L{Cluster.discovery}): DNS through C{resolver} (an
    L{twisted.internet.interfaces.IResolver}; twisted.names' system resolver if C{None}), xDS through one
    client of the control plane C{xds} names, shared by every xDS cluster built here (the control plane's
    cluster may be one of C{existing}, the running clusters a reload keeps), or through C{xdsClient}
    when given (the service's, which outlives a reload).
    """
    clusters = {name: Cluster(c, reactor, stats, random, tls[c.tls] if c.tls else None)
                for name, c in configs.items()}
    rand = random if random is not None else Random()
    if xdsClient is None and xds is not None and any(c.discovery is not None and c.discovery.type == "xds"
                                                     for c in configs.values()):
        from .xds import XDSClient

        controlPlane = clusters.get(xds.cluster) or existing[xds.cluster]
        xdsClient = XDSClient(xds, controlPlane, reactor, rand)
    for cluster in clusters.values():
        cluster.discovery = makeDiscovery(cluster, reactor, rand, resolver, xdsClient)
    return clusters
