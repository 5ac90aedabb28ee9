"""
The configuration of dynamic discovery (see docs/discovery.md): a cluster's C{discovery} and C{dns_*} keys,
and the C{[mesh]} section's C{xds.*} keys naming the control plane.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .errors import suggest
from .options import Options

#: The values of a cluster's C{discovery} key (Envoy's cluster types, plus C{xds} for EDS).
DISCOVERY_TYPES = ("static", "strict_dns", "logical_dns", "xds")
#: C{dns_lookup_family} values (Envoy's): which address records make hosts.
LOOKUP_FAMILIES = ("v4_only", "v6_only", "v4_preferred", "auto", "all")
#: Endpoint kinds a DNS cluster can resolve: the host part of a C{tcp:} string.
_DNS_KINDS = ("tcp",)


@dataclass(frozen=True)
class DiscoveryConfig:
    """
    How a cluster finds its hosts (C{discovery} other than C{static}).

    @ivar type: C{strict_dns}, C{logical_dns} or C{xds}.
    @ivar dns_refresh_rate: seconds between resolutions (Envoy's default, 5 s).
    @ivar dns_failure_refresh_rate: seconds before retrying a failed resolution.
    @ivar respect_dns_ttl: re-resolve after the answers' smallest TTL instead (never sooner than 1 s).
    @ivar dns_lookup_family: which address records count (see L{LOOKUP_FAMILIES}).
    @ivar dns_timeout: how long one resolution may take before it counts as failed.
    @ivar service_name: the EDS resource name (C{xds}); the cluster's name when not set.
    """

    type: str
    dns_refresh_rate: float = 5.0
    dns_failure_refresh_rate: float = 5.0
    respect_dns_ttl: bool = False
    dns_lookup_family: str = "v4_only"
    dns_timeout: float = 5.0
    service_name: Optional[str] = None


@dataclass(frozen=True)
class XDSConfig:
    """
    The C{[mesh]} C{xds.*} keys: where the control plane is and who this proxy is to it.

    @ivar cluster: the static cluster the control plane's endpoints are in.
    @ivar refresh_delay: seconds between polls (plus up to C{jitter} of it, drawn per poll).
    @ivar jitter: the largest extra share of C{refresh_delay} added to each wait (0.1: up to 10%).
    @ivar timeout: how long one request may take.
    @ivar node_id: the C{node.id} of every request.
    @ivar node_cluster: the C{node.cluster} of every request.
    @ivar path_prefix: put before C{/v3/discovery:endpoints} and C{/v3/discovery:clusters} (a control plane
        behind a path).
    @ivar host: the C{host} header (defaults to the cluster's name).
    @ivar cds: poll cluster discovery (CDS) too: the control plane adds, changes and removes clusters.
    @ivar max_clusters: a CDS response with more clusters than this is rejected (NACK).
    @ivar initial_fetch_timeout: with C{cds}, how long the service waits for the first CDS answer before
        it serves (C{0}: it does not wait).
    """

    cluster: str
    refresh_delay: float = 1.0
    jitter: float = 0.1
    timeout: float = 5.0
    node_id: str = "twistedmesh"
    node_cluster: str = "twistedmesh"
    path_prefix: str = ""
    host: Optional[str] = None
    cds: bool = False
    max_clusters: int = 10000
    initial_fetch_timeout: float = 15.0


def discoveryType(o: Options) -> str:
    """
    A cluster's C{discovery} key (read before its endpoints: an xDS cluster has none).
    """
    return o.string("discovery", "static", choices=DISCOVERY_TYPES) or "static"


def parseDiscovery(o: Options, kind: str, endpoints) -> Optional[DiscoveryConfig]:
    """
    A cluster's discovery keys, or C{None} for C{static} (then no C{dns_*} key may be set).

    @param kind: the cluster's L{discoveryType}.
    @param endpoints: the cluster's parsed L{HostConfig}s, checked against the discovery type.
    """
    dnsKeys = ("dns_refresh_rate", "dns_failure_refresh_rate", "respect_dns_ttl", "dns_lookup_family",
               "dns_timeout")
    refresh = o.positiveDuration("dns_refresh_rate", 5.0)
    config = DiscoveryConfig(
        type=kind,
        dns_refresh_rate=refresh,
        dns_failure_refresh_rate=o.positiveDuration("dns_failure_refresh_rate", refresh),
        respect_dns_ttl=o.boolean("respect_dns_ttl", False),
        dns_lookup_family=o.string("dns_lookup_family", "v4_only", choices=LOOKUP_FAMILIES),
        dns_timeout=o.positiveDuration("dns_timeout", 5.0),
        service_name=o.string("service_name", None),
    )
    if config.type not in ("strict_dns", "logical_dns"):
        for key in dnsKeys:
            if key in o._items:
                o.error(key, f"only DNS clusters resolve names (discovery = strict_dns or logical_dns), "
                             f"not discovery = {config.type}")
    if config.type != "xds" and config.service_name is not None:
        o.error("service_name", "only xDS clusters have an EDS service name (discovery = xds)")
    if config.type == "static":
        return None
    if config.type == "xds":
        if "endpoints" in o._items:
            o.error("endpoints", "an xDS cluster takes its endpoints from the control plane: remove the key")
        return config
    for host in endpoints:
        kind = host.endpoint.split(":", 1)[0]
        if kind not in _DNS_KINDS:
            o.error("endpoints", f"a DNS cluster resolves tcp: endpoints only, not {host.endpoint!r} "
                                 f"(for TLS use the cluster's tls key)")
    if config.type == "logical_dns" and len(endpoints) > 1:
        o.error("endpoints", "a logical_dns cluster has exactly one endpoint (use strict_dns for several)")
    return config


def parseXDS(o: Options, clusters) -> Optional[XDSConfig]:
    """
    The C{[mesh]} C{xds.*} keys, or C{None} without C{xds.cluster}.

    @param clusters: the clusters by name: C{xds.cluster} must name a static one.
    """
    name = o.string("xds.cluster", None)
    keys = ("xds.refresh_delay", "xds.jitter", "xds.timeout", "xds.node_id", "xds.node_cluster",
            "xds.path_prefix", "xds.host", "xds.cds", "xds.max_clusters", "xds.initial_fetch_timeout")
    d = XDSConfig(cluster="")
    config = XDSConfig(
        cluster=name or "",
        refresh_delay=o.positiveDuration("xds.refresh_delay", d.refresh_delay),
        jitter=(o.percentage("xds.jitter", 10.0) or 0.0) / 100.0,
        timeout=o.positiveDuration("xds.timeout", d.timeout),
        node_id=o.string("xds.node_id", d.node_id),
        node_cluster=o.string("xds.node_cluster", d.node_cluster),
        path_prefix=(o.string("xds.path_prefix", "") or "").rstrip("/"),
        host=o.string("xds.host", None),
        cds=bool(o.boolean("xds.cds", False)),
        max_clusters=o.integer("xds.max_clusters", d.max_clusters, minimum=1) or d.max_clusters,
        initial_fetch_timeout=o.duration("xds.initial_fetch_timeout", d.initial_fetch_timeout) or 0.0,
    )
    if name is None:
        for key in keys:
            if key in o._items:
                o.error(key, "has no effect without xds.cluster")
        if any(c.discovery is not None and c.discovery.type == "xds" for c in clusters.values()):
            o.error("xds.cluster", "is required: a cluster has discovery = xds")
        return None
    target = clusters.get(name)
    if target is None:
        o.error("xds.cluster", f"names no [cluster:{name}] section{suggest(name, clusters)}")
    elif target.discovery is not None:
        o.error("xds.cluster", f"[cluster:{name}] must be static: the control plane cannot be found through "
                               f"itself")
    elif target.protocol != "http1":
        o.error("xds.cluster", f"[cluster:{name}] must speak HTTP/1.1 (protocol = http1): REST-JSON polling")
    if not config.cds:
        for key in ("xds.max_clusters", "xds.initial_fetch_timeout"):
            if key in o._items:
                o.error(key, "has no effect without xds.cds = true")
    if config.path_prefix and not config.path_prefix.startswith("/"):
        o.error("xds.path_prefix", "must start with /")
    return config
