"""
Dynamic discovery: where a cluster's hosts come from when they are not a fixed list (see docs/discovery.md).

A discovery source (L{IDiscovery}) is started and stopped with its cluster and hands each new answer to
L{Cluster.updateHosts}, which diffs it against the current hosts. The sources are DNS (L{dns}: C{strict_dns},
C{logical_dns}) and xDS over REST-JSON (L{xds}: EDS). They share the update stats (Envoy's names, under
C{cluster.<name>.}): C{update_attempt}, C{update_success}, C{update_failure}, C{update_empty} (an answer
with no host, kept out) and C{update_no_rebuild} (an answer that changed nothing); C{Cluster} counts
C{membership_change} and keeps the C{membership_total} and C{membership_healthy} gauges.
"""

from __future__ import annotations

from dataclasses import dataclass
from random import Random
from typing import TYPE_CHECKING, Optional

from zope.interface import Interface

from ..observability.stats import StatsScope

if TYPE_CHECKING:
    from .cluster import Cluster

__all__ = ["IDiscovery", "DiscoveredHost", "UpdateStats", "makeDiscovery"]


class IDiscovery(Interface):
    """
    A source of a cluster's hosts that change at run time.
    """

    def start() -> None:
        """
        Begin discovering: the first answer is asked for at once, and each answer is handed to the
        cluster's C{updateHosts}. Calling it while started does nothing.
        """

    def stop() -> None:
        """
        Stop discovering: cancel timers and requests in flight. The cluster keeps the hosts it has.
        """


@dataclass(frozen=True)
class DiscoveredHost:
    """
    One host in a discovery answer, as L{Cluster.updateHosts} takes it.

    @ivar endpoint: the host's name and identity: the client endpoint string (C{tcp:host=10.0.0.7:port=80}).
    @ivar weight: the load-balancing weight.
    @ivar server_name: the TLS server name (SNI and certificate check) when the cluster has C{tls}, if not
        the endpoint's host: the DNS name an address was resolved from.
    @ivar connect: the endpoint string to connect to, if not C{endpoint} (a logical DNS host is named by
        its DNS name and connects to the address it resolved to).
    """

    endpoint: str
    weight: int = 1
    server_name: Optional[str] = None
    connect: Optional[str] = None


class UpdateStats:
    """
    The update counters every discovery source keeps (see the module docstring).
    """

    def __init__(self, scope: StatsScope) -> None:
        self.update_attempt = scope.counter("update_attempt")
        self.update_success = scope.counter("update_success")
        self.update_failure = scope.counter("update_failure")
        self.update_empty = scope.counter("update_empty")
        self.update_no_rebuild = scope.counter("update_no_rebuild")


def makeDiscovery(cluster: "Cluster", reactor, random: Random, resolver=None, xds=None) -> Optional[IDiscovery]:
    """
    The discovery source of C{cluster} from its config, or C{None} for a static cluster.

    @param resolver: the L{twisted.internet.interfaces.IResolver} DNS clusters use (twisted.names'
        system resolver, made when first needed, if C{None}).
    @param xds: the L{xds.XDSClient} of the service, for C{discovery = xds}.
    """
    config = cluster.config.discovery
    if config is None:
        return None
    if config.type in ("strict_dns", "logical_dns"):
        from .dns import DNSDiscovery

        return DNSDiscovery(cluster, config, reactor, random, resolver)
    if config.type == "xds":
        if xds is None:
            raise ValueError(f"cluster {cluster.name} has discovery = xds but [mesh] has no xds.cluster")
        return xds.subscribe(cluster)
    raise ValueError(f"unknown discovery type {config.type!r}")
