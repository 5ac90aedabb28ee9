"""
Clusters and their hosts: named groups of upstream endpoints with a load balancer and per-host stats.
"""

from __future__ import annotations

from random import Random
from types import MappingProxyType
from typing import Dict, Mapping, Optional, Set, Tuple

from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IStreamClientEndpoint

from ..config import ClusterConfig
from ..config.tls import TLSConfig
from ..tls import ClientTLS, endpointHost
from ..config.lb import LBConfig
from ..observability.stats import StatsStore
from .breaker import CircuitBreaker
from .outlier import OutlierDetector
from .http1 import ClusterPools
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
    C{cluster.<name>.}).
    """

    def __init__(self, config: ClusterConfig, reactor, stats: StatsStore, random: Optional[Random] = None,
                 tls: Optional[TLSConfig] = None) -> None:
        self.config = config
        self.name = config.name
        self.connectTimeout = config.connect_timeout
        self.stats = scope = stats.scope("cluster", config.name)
        # Upstream TLS: one ClientTLS per cluster; each host's endpoint gets TLS on top, with a context built
        # here, once per server name.
        self.tls = ClientTLS(tls, reactor) if tls is not None else None
        self.hosts: Tuple[Host, ...] = tuple(
            Host(h.endpoint, self._client(reactor, h.endpoint), h.weight) for h in config.endpoints
        )
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
        self.upstream_rq_total = scope.counter("upstream_rq_total")
        self.upstream_rq_active = scope.gauge("upstream_rq_active")
        self.upstream_rq_retry = scope.counter("upstream_rq_retry")
        self.upstream_rq_timeout = scope.counter("upstream_rq_timeout")
        self.upstream_rq_per_try_timeout = scope.counter("upstream_rq_per_try_timeout")
        self.byClass = (None,) + tuple(scope.counter(f"upstream_rq_{n}xx") for n in range(1, 6))
        self.upstream_rq_time = scope.histogram("upstream_rq_time")
        self.upstream_cx_length_ms = scope.histogram("upstream_cx_length_ms")
        # HTTP/1.1 keep-alive pools, one per host, made on first use.
        self.breaker = CircuitBreaker(config.breaker, scope)
        self.pools = ClusterPools(self, reactor)
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

    def _client(self, reactor, endpoint: str) -> IStreamClientEndpoint:
        """
        The client endpoint of one host: C{endpoint} parsed, with TLS on top when the cluster has C{tls}.
        """
        client = clientFromString(reactor, endpoint)
        if self.tls is None:
            return client
        return self.tls.wrapEndpoint(client, endpointHost(endpoint))

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
    tls: Mapping[str, TLSConfig] = MappingProxyType({}),
) -> Dict[str, Cluster]:
    """
    One L{Cluster} per config section; C{random} (the service's) drives the load balancers.
    """
    return {name: Cluster(c, reactor, stats, random, tls[c.tls] if c.tls else None) for name, c in configs.items()}
