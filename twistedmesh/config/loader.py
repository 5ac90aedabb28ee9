"""
INI text to a validated L{Config}: stdlib configparser with interpolation off, every error collected.
"""

from __future__ import annotations

import configparser
import dataclasses
import os
import re
from types import MappingProxyType
from typing import Collection, Dict, List, Optional, Tuple

from .accesslog import parseAccessLog
from .discovery import discoveryType, parseDiscovery, parseXDS
from .outlier import parseOutlier
from .errors import ConfigError, ConfigErrors, suggest
from .model import (
    BreakerConfig,
    DEFAULT_ADMIN,
    ClusterConfig,
    Config,
    EchoConfig,
    FilterConfig,
    HostConfig,
    HTTP2ClusterConfig,
    HTTP2ListenerConfig,
    ListenerConfig,
    MeshConfig,
)
from .health import parseHealth
from .lb import parseLB
from .options import REQUIRED, Options, checkClientEndpoint
from .tls import TLSConfig, checkClientTLS, checkServerTLS, parseTLS
from .tracing import parseListenerTracing, parseMeshTracing

#: How worker processes share a listener's port; the first is the default (docs/workers.md says why).
WORKERS_SHARING = ("reuseport", "inherit")
SECTION_KINDS = ("mesh", "listener", "route", "cluster", "filter", "echo", "tls")
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_ROUTE_NAME = re.compile(r"^[A-Za-z0-9_-]+/[A-Za-z0-9_-]+$")
_EPHEMERAL = re.compile(r"^tcp6?:0(:|$)")  # port 0: the system picks a free port each time
_DEFAULT_FILTERS = {"tcp": ("tcp_proxy",), "http": ("router",)}


def readText(path: str) -> str:
    """
    The text of the configuration file at C{path}.

    @raise ConfigErrors: saying why the file cannot be read.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ConfigErrors([ConfigError(path, None, None, f"cannot read the file: {e.strerror}")]) from None


def loadFile(path: str) -> Config:
    """
    Read and validate the configuration file at C{path}.

    @raise ConfigErrors: with every error found.
    """
    return loadString(readText(path), path)


def loadString(text: str, file: str = "<string>") -> Config:
    """
    Validate configuration C{text}; C{file} names it in errors.

    @raise ConfigErrors: with every error found.
    """
    errors: List[ConfigError] = []
    parser = configparser.ConfigParser(
        interpolation=None, strict=True, inline_comment_prefixes=(";", "#"), default_section="\x00"
    )
    parser.optionxform = str  # keep keys as written, so a wrong case is reported, not silently accepted
    try:
        parser.read_string(text, source=file)
    except configparser.DuplicateSectionError as e:
        raise ConfigErrors([ConfigError(file, e.section, None, f"duplicate section (line {e.lineno})")])
    except configparser.DuplicateOptionError as e:
        raise ConfigErrors([ConfigError(file, e.section, e.option, f"duplicate key (line {e.lineno})")])
    except configparser.Error as e:
        raise ConfigErrors([ConfigError(file, None, None, f"not a valid INI file: {e.message}")])

    sections: Dict[str, Dict[str, Options]] = {kind: {} for kind in SECTION_KINDS}
    for title in parser.sections():
        kind, _, name = title.partition(":")
        kind, name = kind.strip(), name.strip()
        if kind not in SECTION_KINDS:
            errors.append(ConfigError(file, title, None, f"unknown section kind `{kind}`{suggest(kind, SECTION_KINDS)}"))
            continue
        if kind == "mesh":
            if name:
                errors.append(ConfigError(file, title, None, "the mesh section takes no name: write [mesh]"))
                continue
        elif kind == "route":
            if not _ROUTE_NAME.match(name):
                errors.append(ConfigError(
                    file, title, None, "a route is named TABLE/NAME, each of letters, digits, _ and -: [route:main/api]"
                ))
                continue
        elif not _NAME.match(name):
            errors.append(
                ConfigError(file, title, None, f"a {kind} needs a name of letters, digits, _ and -: [{kind}:NAME]")
            )
            continue
        sections[kind][name] = Options(file, title, dict(parser.items(title)), errors)

    meshOptions = sections["mesh"].get("") or Options(file, "mesh", {}, errors)
    tls = {name: parseTLS(name, o) for name, o in sections["tls"].items()}
    mesh = _mesh(meshOptions, tls)
    clusters = {name: _cluster(name, o, tls) for name, o in sections["cluster"].items()}
    mesh = dataclasses.replace(mesh, xds=parseXDS(meshOptions, clusters))
    filters = {name: _filter(name, o) for name, o in sections["filter"].items()}
    echoes = {name: _echo(name, o) for name, o in sections["echo"].items()}
    # With CDS, a route may name a cluster the control plane is to provide (docs/discovery.md).
    routes = _routes(sections["route"], _ClustersWithCDS(clusters) if mesh.xds is not None and mesh.xds.cds
                     else clusters)
    listeners = {name: _listener(name, o, clusters, routes, tls) for name, o in sections["listener"].items()}
    for group in sections.values():
        for o in group.values():
            o.finish()
    _checkEndpointsUnique(file, sections, listeners, echoes, mesh, errors)
    if mesh.workers > 1:
        # Worker processes share a listener's TCP port (SO_REUSEPORT or an inherited socket): nothing else.
        for n, l in listeners.items():
            if l.endpoint is not None and not re.match(r"^tcp6?:", l.endpoint):
                errors.append(ConfigError(file, sections["listener"][n].section, "endpoint",
                                          "must be a tcp: or tcp6: endpoint when [mesh] workers > 1"))
    if errors:
        # Report in file order, the order a user fixes them in.
        order = {title: i for i, title in enumerate(parser.sections())}
        errors.sort(key=lambda e: order.get(e.section, -1))
        raise ConfigErrors(errors)
    return Config(
        file=file,
        mesh=mesh,
        listeners=MappingProxyType(listeners),
        clusters=MappingProxyType(clusters),
        filters=MappingProxyType(filters),
        echoes=MappingProxyType(echoes),
        routes=MappingProxyType(routes),
        tls=MappingProxyType(tls),
    )


def _mesh(o: Options, tls: Dict[str, TLSConfig]) -> MeshConfig:
    admin = o.serverEndpoint("admin", DEFAULT_ADMIN)
    if "admin" in o and o._items["admin"].strip().lower() == "off":
        admin = None
        o.errors[:] = [e for e in o.errors if not (e.section == o.section and e.key == "admin")]
    # `admin_tls = NAME`: the admin endpoint behind [tls:NAME] (with client_ca, only operators' certificates).
    adminTLS = o.string("admin_tls", None)
    if adminTLS is not None:
        if adminTLS not in tls:
            o.error("admin_tls", f"names no [tls:{adminTLS}] section{suggest(adminTLS, tls)}")
            adminTLS = None
        elif admin is None:
            o.error("admin_tls", "has no effect with admin = off")
        else:
            checkServerTLS(tls[adminTLS], o, key="admin_tls", alpnSpoken=("http/1.1", "http/1.0"))
    return MeshConfig(
        admin=admin,
        admin_tls=adminTLS,
        admin_allowed_hosts=_adminAllowedHosts(o),
        drain_timeout=o.duration("drain_timeout", 10.0),
        workers=_workers(o),
        workers_sharing=o.string("workers.sharing", WORKERS_SHARING[0], choices=WORKERS_SHARING),
        tracing=parseMeshTracing(o),
    )


_HOST_NAME = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$")


def _adminAllowedHosts(o: Options) -> Tuple[str, ...]:
    # The names a browser may reach the admin by, besides IP addresses and localhost (see the admin's
    # hostRefusal: the defence against DNS rebinding). Names only: the port of Host is not checked.
    names = []
    for item in o.list("admin.allowed_hosts"):
        name = item.lower().rstrip(".")
        if len(name) > 253 or not _HOST_NAME.match(name):
            o.error("admin.allowed_hosts", f"must be host names without a port (IP addresses and localhost "
                                           f"are always allowed), not {item!r}")
            continue
        names.append(name)
    return tuple(names)


def _workers(o: Options) -> int:
    # `auto`: one worker per core this process may run on (its CPU affinity, not the machine's count).
    if "workers" in o and o._items["workers"].strip().lower() == "auto":
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            return os.cpu_count() or 1
    return o.integer("workers", 1, minimum=1)


def _cluster(name: str, o: Options, tls: Dict[str, TLSConfig]) -> ClusterConfig:
    hosts: List[HostConfig] = []
    discovery = discoveryType(o)
    raw = o.string("endpoints", None if discovery == "xds" else REQUIRED)
    for line in (raw or "").replace(",", "\n").splitlines():
        line = line.strip()
        if not line:
            continue
        endpoint, *params = line.split()
        weight = 1
        for param in params:
            key, _, value = param.partition("=")
            if key != "weight":
                o.error("endpoints", f"unknown endpoint parameter {key!r} in {line!r}{suggest(key, ['weight'])}")
                continue
            try:
                weight = int(value)
                if not 1 <= weight <= 1000:
                    raise ValueError
            except ValueError:
                o.error("endpoints", f"weight must be a whole number from 1 to 1000, not {value!r}")
        try:
            checkClientEndpoint(endpoint)
        except ValueError as e:
            o.error("endpoints", str(e))
            continue
        hosts.append(HostConfig(endpoint, weight))
    if raw is not None and not hosts and not any(e.key == "endpoints" and e.section == o.section for e in o.errors):
        o.error("endpoints", "names no endpoint")
    lb = parseLB(o)
    protocol = o.string("protocol", "http1", choices=("http1", "http2", "tcp"))
    return ClusterConfig(
        tls=_tlsReference(o, tls, checkClientTLS),
        name=name,
        endpoints=tuple(hosts),
        lb_policy=lb.policy,
        lb=lb,
        health=parseHealth(o, name),
        protocol=protocol,
        http2=_http2(o, protocol),
        connect_timeout=o.duration("connect_timeout", 5.0),
        breaker=_breaker(o),
        outlier=parseOutlier(o),
        discovery=parseDiscovery(o, discovery, hosts),
    )


def _http2(o: Options, protocol: str) -> HTTP2ClusterConfig:
    """
    The C{http2.*} keys of a cluster; they mean something only with C{protocol = http2}.
    """
    d = HTTP2ClusterConfig()
    if protocol != "http2":
        for key in o.keys():
            if key.startswith("http2.") and key in o:  # (`in` marks it known: one error, not two)
                o.error(key, "applies only to clusters with protocol = http2")
        return d
    streamWindow = o.size("http2.initial_stream_window_size", d.initial_stream_window_size)
    connectionWindow = o.size("http2.initial_connection_window_size", d.initial_connection_window_size)
    # RFC 9113 section 6.9: windows run from the 65,535-byte initial value up to 2^31-1.
    for key, value in (("http2.initial_stream_window_size", streamWindow),
                       ("http2.initial_connection_window_size", connectionWindow)):
        if value is not None and not 65535 <= value <= 2 ** 31 - 1:
            o.error(key, f"must be from 65535 bytes to 2GiB-1, not {value}")
    interval = o.duration("http2.keepalive_interval", None)
    timeout = o.duration("http2.keepalive_timeout", d.keepalive_timeout)
    if interval is not None and interval <= 0:
        o.error("http2.keepalive_interval", "must be more than 0 (leave it out to send no PINGs)")
    if timeout is not None and timeout <= 0:
        o.error("http2.keepalive_timeout", "must be more than 0")
    return HTTP2ClusterConfig(
        max_concurrent_streams=o.integer("http2.max_concurrent_streams", d.max_concurrent_streams, minimum=1),
        initial_stream_window_size=streamWindow or d.initial_stream_window_size,
        initial_connection_window_size=connectionWindow or d.initial_connection_window_size,
        keepalive_interval=interval or None,
        keepalive_timeout=timeout or d.keepalive_timeout,
    )


def _breaker(o: Options) -> BreakerConfig:
    d = BreakerConfig()
    return BreakerConfig(
        max_connections=o.integer("breaker.max_connections", d.max_connections, minimum=1),
        max_pending_requests=o.integer("breaker.max_pending_requests", d.max_pending_requests),
        max_requests=o.integer("breaker.max_requests", d.max_requests, minimum=1),
        max_retries=o.integer("breaker.max_retries", d.max_retries),
        budget_percent=o.percentage("breaker.budget_percent", None),
        min_retry_concurrency=o.integer("breaker.min_retry_concurrency", d.min_retry_concurrency),
    )


def _filter(name: str, o: Options) -> FilterConfig:
    ftype = o.string("type", name)
    items = {k: v for k, v in o._items.items() if k != "type"}
    # The plugin reads (and so marks known) its own keys when the service is built.
    o._known.update(items)
    return FilterConfig(name=name, type=ftype, items=MappingProxyType(items), section=o.section)


def _echo(name: str, o: Options) -> EchoConfig:
    return EchoConfig(
        name=name,
        endpoint=o.serverEndpoint("endpoint"),
        protocol=o.string("protocol", "http", choices=("http", "tcp")),
    )


class _ClustersWithCDS(Collection):
    """
    The cluster names a route may give when C{[mesh] xds.cds} is on: the file's, and any other, which the
    control plane may provide (until it does, the route answers 503 C{cluster_not_found}). Iterating gives
    the file's, for "did you mean" suggestions.
    """

    def __init__(self, clusters: Dict[str, ClusterConfig]) -> None:
        self.clusters = clusters

    def __contains__(self, name: object) -> bool:
        return True

    def __iter__(self):
        return iter(self.clusters)

    def __len__(self) -> int:
        return len(self.clusters)


def _routes(sections: Dict[str, Options], clusters: Collection[str]) -> Dict[str, tuple]:
    """
    The route tables: each table's routes in file order.
    """
    from .routes import parseRoute

    tables: Dict[str, list] = {}
    for full, o in sections.items():
        table, _, name = full.partition("/")
        tables.setdefault(table, []).append(parseRoute(table, name, o, clusters))
    return {table: tuple(routes) for table, routes in tables.items()}


def _listener(name: str, o: Options, clusters: Dict[str, ClusterConfig], routes: Dict[str, tuple],
              tls: Dict[str, TLSConfig]) -> ListenerConfig:
    protocol = o.string("protocol", "tcp", choices=("tcp", "http"))
    filters = o.list("filters", _DEFAULT_FILTERS.get(protocol or "tcp"))
    cluster = o.string("cluster", None)
    if cluster is not None and cluster not in clusters:
        o.error("cluster", f"names no [cluster:{cluster}] section{suggest(cluster, clusters)}")
    if protocol == "tcp" and "tcp_proxy" in filters and cluster is None and "cluster" not in o._items:
        o.error("cluster", "is required: tcp_proxy needs a cluster to send the bytes to")
    if filters and len(set(filters)) != len(filters):
        o.error("filters", "names a filter more than once")
    table = None
    if protocol == "http":
        table = o.string("routes", None)
        if table is None and "router" in filters:
            o.error("routes", "is required: the router needs a route table ([route:TABLE/NAME] sections)")
        elif table is not None and table not in routes:
            o.error("routes", f"names no route table: no [route:{table}/...] section{suggest(table, routes)}")
        if filters and filters[-1] != "router" and "router" in filters:
            o.error("filters", "router must be the last filter: it answers every request")
    elif "routes" in o._items:
        o.error("routes", "only HTTP listeners have routes (protocol = http)")
    # An HTTP listener must not agree by ALPN to a protocol its codecs cannot speak.
    http2 = _listenerHTTP2(o) if protocol == "http" else HTTP2ListenerConfig()
    spoken = None
    if protocol == "http":
        spoken = ("h2", "http/1.1", "http/1.0") if http2.enabled else ("http/1.1", "http/1.0")
    tlsName = _tlsReference(o, tls, lambda t, o: checkServerTLS(t, o, alpnSpoken=spoken))
    return ListenerConfig(
        tls=tlsName,
        name=name,
        endpoint=o.serverEndpoint("endpoint"),
        protocol=protocol or "tcp",
        filters=filters,
        cluster=cluster,
        idle_timeout=o.duration("idle_timeout", 3600.0),
        connect_timeout=o.duration("connect_timeout", None),
        max_connect_attempts=o.integer("max_connect_attempts", 1, minimum=1),
        routes=table,
        max_request_headers_size=o.size("max_request_headers_size", 60 * 1024),
        max_request_headers_count=o.integer("max_request_headers_count", 100, minimum=1),
        request_headers_timeout=o.duration("request_headers_timeout", 0.0),
        max_requests_per_connection=o.integer("max_requests_per_connection", 0),
        access_log=parseAccessLog(o, protocol),
        forward_client_cert=o.string("forward_client_cert", "sanitize",
                                     choices=("sanitize", "forward", "append", "sanitize_set")),
        http2=http2,
        tracing_sample_rate=parseListenerTracing(o, protocol),
    )


def _listenerHTTP2(o: Options) -> HTTP2ListenerConfig:
    """
    The C{http2} switch and C{http2.*} keys of an HTTP listener, each checked against its range: RFC 9113's
    for the SETTINGS (with Envoy's 65,535-byte floor for windows), Envoy's for the rest.
    """
    d = HTTP2ListenerConfig()

    def ranged(key: str, value, low: int, high: int, default, unit: str = ""):
        if value is not None and not low <= value <= high:
            o.error(key, f"must be from {low}{unit} to {high}{unit}, not {value}{unit}")
            return default
        return default if value is None else value

    most = 2 ** 31 - 1
    return HTTP2ListenerConfig(
        enabled=o.boolean("http2", True),
        max_concurrent_streams=ranged("http2.max_concurrent_streams", o.integer(
            "http2.max_concurrent_streams", d.max_concurrent_streams), 1, most, d.max_concurrent_streams),
        initial_stream_window_size=ranged("http2.initial_stream_window_size", o.size(
            "http2.initial_stream_window_size", d.initial_stream_window_size), 65535, most,
            d.initial_stream_window_size, " bytes"),
        initial_connection_window_size=ranged("http2.initial_connection_window_size", o.size(
            "http2.initial_connection_window_size", d.initial_connection_window_size), 65535, most,
            d.initial_connection_window_size, " bytes"),
        max_frame_size=ranged("http2.max_frame_size", o.size("http2.max_frame_size", d.max_frame_size),
                              16384, 16777215, d.max_frame_size, " bytes"),
        max_header_list_size=ranged("http2.max_header_list_size", o.size("http2.max_header_list_size", None),
                                    1024, 8 << 20, None, " bytes"),
        max_outbound_control_frames=o.integer("http2.max_outbound_control_frames",
                                              d.max_outbound_control_frames, minimum=1),
        max_consecutive_inbound_frames_with_empty_payload=o.integer(
            "http2.max_consecutive_inbound_frames_with_empty_payload",
            d.max_consecutive_inbound_frames_with_empty_payload),
        max_inbound_priority_frames_per_stream=o.integer("http2.max_inbound_priority_frames_per_stream",
                                                         d.max_inbound_priority_frames_per_stream),
        max_inbound_window_update_frames_per_data_frame_sent=o.integer(
            "http2.max_inbound_window_update_frames_per_data_frame_sent",
            d.max_inbound_window_update_frames_per_data_frame_sent, minimum=1),
        premature_reset_total_stream_count=o.integer("http2.premature_reset_total_stream_count",
                                                     d.premature_reset_total_stream_count, minimum=1),
        premature_reset_min_stream_lifetime=o.duration("http2.premature_reset_min_stream_lifetime",
                                                       d.premature_reset_min_stream_lifetime),
    )


def _checkEndpointsUnique(file, sections, listeners, echoes, mesh, errors) -> None:
    """
    Two sections listening on the same endpoint string cannot both start: say so now.
    """
    seen: Dict[str, Tuple[str, str]] = {}
    candidates: List[Tuple[str, Optional[str]]] = [("mesh", mesh.admin)]
    candidates += [(sections["listener"][n].section, l.endpoint) for n, l in listeners.items()]
    candidates += [(sections["echo"][n].section, e.endpoint) for n, e in echoes.items()]
    for section, endpoint in candidates:
        if endpoint is None or _EPHEMERAL.match(endpoint):
            continue
        if endpoint in seen:
            errors.append(ConfigError(file, section, "endpoint" if section != "mesh" else "admin",
                                      f"{endpoint!r} is already used by [{seen[endpoint]}]"))
        else:
            seen[endpoint] = section


def _tlsReference(o: Options, tls: Dict[str, TLSConfig], check) -> Optional[str]:
    """
    The C{tls = NAME} key of a listener or cluster: a C{[tls:NAME]} section, checked for that use.
    """
    name = o.string("tls", None)
    if name is None:
        return None
    if name not in tls:
        o.error("tls", f"names no [tls:{name}] section{suggest(name, tls)}")
        return None
    check(tls[name], o)
    return name
