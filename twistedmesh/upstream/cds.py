"""
xDS over REST-JSON: cluster discovery (CDS), polled from the control plane with the EDS client's state
machine (L{twistedmesh.upstream.xds.XDSStream}), see docs/discovery.md.

L{parseCluster} validates one v3 C{envoy.config.cluster.v3.Cluster} and maps the subset honoured onto a
L{ClusterConfig}, the very object a C{[cluster:NAME]} section gives: a cluster from the control plane is
then built, diffed, kept, rebuilt and drained exactly as a cluster of the file is on a reload. Anything
of a known field that cannot be honoured (TLS, another cluster type, a second health check) rejects the
whole update; unknown fields are logged once and ignored.

L{CDSSubscription} is the CDS side of the state machine: it asks for every cluster (an empty
C{resource_names}, the state of the world) and hands each accepted set to the service, which swaps it in
through the reload machinery or refuses it (then the update is NACKed and the previous clusters stay). Its
stats are Envoy's, under C{cluster_manager.cds.}.
"""

from __future__ import annotations

import dataclasses
import re
from hashlib import blake2b
from typing import Any, Callable, Dict, Optional, Tuple

from ..config.discovery import DiscoveryConfig
from ..config.health import HealthConfig
from ..config.lb import MAX_RING_SIZE, LBConfig
from ..config.model import BreakerConfig, ClusterConfig, HostConfig, HTTP2ClusterConfig
from ..config.outlier import DEFAULT_MAX_EJECTION_TIME, OutlierConfig
from ..observability.stats import StatsScope
from .xds import (
    _FIELD_NAME, InvalidResource, Response, XDSType, _Fields, _kind, _uint, parseAssignment, parseDuration,
)

__all__ = ["CDS_TYPE_URL", "CDS_PATH", "CDSSubscription", "parseCluster", "CLUSTER_NAME"]

#: The type URL of a CDS resource (and of a CDS request and response).
CDS_TYPE_URL = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
#: The REST path of CDS.
CDS_PATH = "/v3/discovery:clusters"
#: The names a cluster from the control plane may have: the file's, plus dots (stats keep them whole).
CLUSTER_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
#: The typed_extension_protocol_options key of the HTTP protocol options.
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

_TYPES = {"STATIC": 0, "STRICT_DNS": 1, "LOGICAL_DNS": 2, "EDS": 3, "ORIGINAL_DST": 4}
_DISCOVERY = {"STATIC": None, "STRICT_DNS": "strict_dns", "LOGICAL_DNS": "logical_dns", "EDS": "xds"}
_POLICIES = {"ROUND_ROBIN": 0, "LEAST_REQUEST": 1, "RING_HASH": 2, "RANDOM": 3, "MAGLEV": 5,
             "CLUSTER_PROVIDED": 6, "LOAD_BALANCING_POLICY_CONFIG": 7}
_HONOURED_POLICIES = ("ROUND_ROBIN", "LEAST_REQUEST", "RING_HASH", "RANDOM", "MAGLEV")
_FAMILIES = {"AUTO": 0, "V4_ONLY": 1, "V6_ONLY": 2, "V4_PREFERRED": 3, "ALL": 4}
_PRIORITIES = {"DEFAULT": 0, "HIGH": 1}
_PATH = re.compile(r"^/[\x21-\x7e]*$")
_HOST = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=:\[\]%-]+$")
_WINDOW = (65535, 2 ** 31 - 1)  # RFC 9113 section 6.9


def _enum(value: Any, path: str, names: Dict[str, int]) -> str:
    """
    A proto3 JSON enum: its name, or its number.
    """
    if isinstance(value, str):
        if value not in names:
            raise InvalidResource(f"{path}: {value!r} is not one of {', '.join(names)}")
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        for name, number in names.items():
            if number == value:
                return name
    raise InvalidResource(f"{path}: {value!r} is not one of {', '.join(names)}")


def _bool(value: Any, path: str) -> bool:
    """
    A proto3 JSON boolean, bare or wrapped (C{BoolValue}).
    """
    if isinstance(value, dict) and set(value) <= {"value"}:
        value = value.get("value", False)
    if not isinstance(value, bool):
        raise InvalidResource(f"{path}: expected a boolean, not {_kind(value)}")
    return value


def _number(value: Any, path: str, low: float, high: Optional[float] = None) -> float:
    """
    A proto3 JSON double (bare, as a string or wrapped) from C{low} to C{high}.
    """
    if isinstance(value, dict) and set(value) <= {"value"}:
        value = value.get("value", 0.0)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise InvalidResource(f"{path}: {value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise InvalidResource(f"{path}: expected a number, not {_kind(value)}")
    if value < low or (high is not None and value > high):
        raise InvalidResource(f"{path}: {value} is not from {low:g} to {high:g}" if high is not None
                              else f"{path}: {value} is less than {low:g}")
    return float(value)


def _duration(value: Any, path: str, positive: bool = True) -> float:
    seconds = parseDuration(value, path)
    if positive and seconds <= 0:
        raise InvalidResource(f"{path}: must be more than 0s")
    return seconds


def _list(value: Any, path: str) -> list:
    if not isinstance(value, list):
        raise InvalidResource(f"{path}: expected a list, not {_kind(value)}")
    return value


def parseCluster(value: Any, path: str, unknown: Callable[[str], None]) -> ClusterConfig:
    """
    Validate one CDS resource (an Any tagged with L{CDS_TYPE_URL}, or the bare message) and map it onto a
    L{ClusterConfig} (the subset honoured is in docs/discovery.md).

    @raise InvalidResource: the resource is invalid or asks for what is not supported.
    """
    if isinstance(value, dict) and "@type" in value and value["@type"] != CDS_TYPE_URL:
        raise InvalidResource(f"{path}: resource of type {value['@type']!r}, expected {CDS_TYPE_URL}")
    c = _Fields(value, path, unknown)
    name = c.get("name")
    if not isinstance(name, str) or not CLUSTER_NAME.match(name):
        raise InvalidResource(f"{path}.name: {name!r} is not a cluster name (1 to 128 letters, digits, _ - .)")
    path = f"{path}({name})"  # errors name the cluster: the control plane's operator knows it by name
    if c.get("cluster_type") is not None:
        raise InvalidResource(f"{path}.cluster_type: custom cluster types are not supported")
    kind = _enum(c.get("type", "STATIC"), path + ".type", _TYPES)
    if kind not in _DISCOVERY:
        raise InvalidResource(f"{path}.type: {kind} is not supported (STATIC, STRICT_DNS, LOGICAL_DNS or EDS)")
    for key in ("transport_socket", "transport_socket_matches"):
        if c.get(key) is not None and not _plaintext(c.get(key)):
            raise InvalidResource(f"{path}.{key}: upstream TLS is not supported for clusters from the "
                                  f"control plane (declare such a cluster in the file, with tls = NAME)")
    connectTimeout = _duration(c.get("connect_timeout", "5s"), path + ".connect_timeout")
    discovery = _discovery(c, kind, name, path, unknown)
    endpoints = _endpoints(c, kind, name, path, unknown)
    if kind == "LOGICAL_DNS" and len(endpoints) != 1:
        raise InvalidResource(f"{path}.load_assignment: a LOGICAL_DNS cluster has exactly one endpoint, "
                              f"not {len(endpoints)}")
    if kind == "STRICT_DNS" and not endpoints:
        raise InvalidResource(f"{path}.load_assignment: a STRICT_DNS cluster needs an endpoint to resolve")
    lb = _lb(c, path, unknown)
    protocol, http2 = _protocol(c, path, unknown)
    config = ClusterConfig(
        name=name,
        endpoints=endpoints,
        lb_policy=lb.policy,
        lb=lb,
        protocol=protocol,
        http2=http2,
        connect_timeout=connectTimeout,
        breaker=_breaker(c.get("circuit_breakers"), path + ".circuit_breakers", unknown),
        outlier=_outlier(c.get("outlier_detection"), path + ".outlier_detection", unknown),
        health=_health(c.get("health_checks"), name, path + ".health_checks", unknown),
        discovery=discovery,
    )
    c.done()
    return config


def _plaintext(value: Any) -> bool:
    """
    Whether a C{transport_socket} (or the list of C{transport_socket_matches}) asks for no TLS: absent,
    empty, or the raw buffer socket.
    """
    if isinstance(value, list):
        return all(_plaintext(m.get("transport_socket") if isinstance(m, dict) else m) for m in value)
    if value is None or value == {}:
        return True
    return isinstance(value, dict) and value.get("name") in ("envoy.transport_sockets.raw_buffer", "raw_buffer")


def _discovery(c: _Fields, kind: str, name: str, path: str, unknown) -> Optional[DiscoveryConfig]:
    eds = c.get("eds_cluster_config")
    serviceName = None
    if eds is not None:
        fields = _Fields(eds, path + ".eds_cluster_config", unknown)
        # eds_config says where EDS is: for this proxy, always its one control plane.
        if fields.get("eds_config") is not None and not isinstance(fields.get("eds_config"), dict):
            raise InvalidResource(f"{path}.eds_cluster_config.eds_config: expected an object")
        serviceName = fields.get("service_name")
        if serviceName is not None and (not isinstance(serviceName, str) or not serviceName):
            raise InvalidResource(f"{path}.eds_cluster_config.service_name: expected a name")
        fields.done()
    refresh = _duration(c.get("dns_refresh_rate", "5s"), path + ".dns_refresh_rate")
    failureRefresh = refresh
    if c.get("dns_failure_refresh_rate") is not None:
        rate = _Fields(c.get("dns_failure_refresh_rate"), path + ".dns_failure_refresh_rate", unknown)
        failureRefresh = _duration(rate.get("base_interval", "5s"), path + ".dns_failure_refresh_rate.base_interval")
        if rate.get("max_interval") is not None:
            _duration(rate.get("max_interval"), path + ".dns_failure_refresh_rate.max_interval")
        rate.done()
    respectTTL = _bool(c.get("respect_dns_ttl", False), path + ".respect_dns_ttl")
    family = _enum(c.get("dns_lookup_family", "AUTO"), path + ".dns_lookup_family", _FAMILIES)
    discovery = _DISCOVERY[kind]
    if discovery is None:
        return None
    return DiscoveryConfig(type=discovery, dns_refresh_rate=refresh, dns_failure_refresh_rate=failureRefresh,
                           respect_dns_ttl=respectTTL, dns_lookup_family=family.lower(),
                           service_name=serviceName if discovery == "xds" else None)


def _endpoints(c: _Fields, kind: str, name: str, path: str, unknown) -> Tuple[HostConfig, ...]:
    value = c.get("load_assignment")
    if value is None:
        return ()
    if isinstance(value, dict) and "cluster_name" not in value and "clusterName" not in value:
        value = dict(value, cluster_name=name)  # implied by the cluster it is in
    assignment = parseAssignment(value, path + ".load_assignment", unknown, names=kind in ("STRICT_DNS", "LOGICAL_DNS"))
    if kind == "EDS":
        return ()  # as in Envoy: an EDS cluster's endpoints come from EDS
    return tuple(HostConfig(h.endpoint, h.weight) for h in assignment.hosts)


def _lb(c: _Fields, path: str, unknown) -> LBConfig:
    policy = _enum(c.get("lb_policy", "ROUND_ROBIN"), path + ".lb_policy", _POLICIES)
    if policy not in _HONOURED_POLICIES:
        raise InvalidResource(f"{path}.lb_policy: {policy} is not supported ({', '.join(_HONOURED_POLICIES)})")
    d = LBConfig()
    extra: Dict[str, Any] = {}
    if c.get("least_request_lb_config") is not None:
        lr = _Fields(c.get("least_request_lb_config"), path + ".least_request_lb_config", unknown)
        if lr.get("choice_count") is not None:
            extra["choice_count"] = _uint(lr.get("choice_count"), lr.path + ".choice_count", 2)
        if lr.get("active_request_bias") is not None:
            bias = _Fields(lr.get("active_request_bias"), lr.path + ".active_request_bias", unknown)
            bias.get("runtime_key")  # no runtime here: the default is the value
            extra["active_request_bias"] = _number(bias.get("default_value", 1.0), bias.path + ".default_value", 0.0)
            bias.done()
        lr.done()
    if c.get("ring_hash_lb_config") is not None:
        rh = _Fields(c.get("ring_hash_lb_config"), path + ".ring_hash_lb_config", unknown)
        low = _uint(rh.get("minimum_ring_size", d.minimum_ring_size), rh.path + ".minimum_ring_size", 1, MAX_RING_SIZE)
        high = _uint(rh.get("maximum_ring_size", d.maximum_ring_size), rh.path + ".maximum_ring_size", 1, MAX_RING_SIZE)
        if low > high:
            raise InvalidResource(f"{rh.path}: minimum_ring_size {low} is more than maximum_ring_size {high}")
        rh.get("hash_function")  # the ring's hash is this proxy's own (keys map alike on every proxy of it)
        extra.update(minimum_ring_size=low, maximum_ring_size=high)
        rh.done()
    if c.get("maglev_lb_config") is not None:
        mg = _Fields(c.get("maglev_lb_config"), path + ".maglev_lb_config", unknown)
        if mg.get("table_size") is not None and _uint(mg.get("table_size"), mg.path + ".table_size") != 65537:
            raise InvalidResource(f"{mg.path}.table_size: only the default, 65537, is supported")
        mg.done()
    if c.get("common_lb_config") is not None:
        common = _Fields(c.get("common_lb_config"), path + ".common_lb_config", unknown)
        if common.get("healthy_panic_threshold") is not None:
            extra["healthy_panic_threshold"] = _number(common.get("healthy_panic_threshold"),
                                                       common.path + ".healthy_panic_threshold", 0.0, 100.0)
        common.done()
    # Envoy keeps the hash policy on the route; without one a ring_hash or maglev pick is random, as there.
    return LBConfig(policy=policy.lower(), **extra)


def _protocol(c: _Fields, path: str, unknown) -> Tuple[str, HTTP2ClusterConfig]:
    options = None
    http1 = c.get("http_protocol_options") is not None  # deprecated in Envoy, still sent by some
    if c.get("http2_protocol_options") is not None:
        options = (c.get("http2_protocol_options"), path + ".http2_protocol_options")
    typed = c.get("typed_extension_protocol_options")
    if typed is not None:
        if not isinstance(typed, dict):
            raise InvalidResource(f"{path}.typed_extension_protocol_options: expected an object")
        for key, item in typed.items():
            # Keys are extension names, not field names: another extension is reported by its name only
            # when it looks like one (the control plane's arbitrary text is not put in a path).
            if key != HTTP_OPTIONS:
                name = key if _FIELD_NAME.match(key) else "another extension"
                unknown(f"{path}.typed_extension_protocol_options[{name}]")
                continue
            ipath = f"{path}.typed_extension_protocol_options[{HTTP_OPTIONS}]"
            fields = _Fields(item, ipath, unknown)
            for mode in ("auto_config", "use_downstream_protocol_config"):
                if fields.get(mode) is not None:
                    raise InvalidResource(f"{ipath}.{mode}: not supported: give explicit_http_config")
            fields.get("common_http_protocol_options")  # idle timeouts and the like: not honoured
            explicit = fields.get("explicit_http_config")
            if explicit is not None:
                ex = _Fields(explicit, ipath + ".explicit_http_config", unknown)
                if ex.get("http3_protocol_options") is not None:
                    raise InvalidResource(f"{ex.path}.http3_protocol_options: HTTP/3 is not supported")
                if ex.get("http2_protocol_options") is not None:
                    options = (ex.get("http2_protocol_options"), ex.path + ".http2_protocol_options")
                elif ex.get("http_protocol_options") is not None:
                    http1 = True
                ex.done()
            fields.done()
    if options is None:
        return "http1", HTTP2ClusterConfig()
    if http1 and typed is None:
        raise InvalidResource(f"{path}: http_protocol_options and http2_protocol_options conflict")
    value, opath = options
    h2 = _Fields(value, opath, unknown)
    d = HTTP2ClusterConfig()
    interval, timeout = None, d.keepalive_timeout
    if h2.get("connection_keepalive") is not None:
        keepalive = _Fields(h2.get("connection_keepalive"), opath + ".connection_keepalive", unknown)
        if keepalive.get("interval") is not None:
            interval = _duration(keepalive.get("interval"), keepalive.path + ".interval")
        if keepalive.get("timeout") is not None:
            timeout = _duration(keepalive.get("timeout"), keepalive.path + ".timeout")
        keepalive.done()
    config = HTTP2ClusterConfig(
        max_concurrent_streams=_uint(h2.get("max_concurrent_streams", d.max_concurrent_streams),
                                     opath + ".max_concurrent_streams", 1, 2 ** 31 - 1),
        initial_stream_window_size=_uint(h2.get("initial_stream_window_size", d.initial_stream_window_size),
                                         opath + ".initial_stream_window_size", *_WINDOW),
        initial_connection_window_size=_uint(h2.get("initial_connection_window_size",
                                                    d.initial_connection_window_size),
                                             opath + ".initial_connection_window_size", *_WINDOW),
        keepalive_interval=interval,
        keepalive_timeout=timeout,
    )
    h2.done()
    return "http2", config


def _breaker(value: Any, path: str, unknown) -> BreakerConfig:
    d = BreakerConfig()
    if value is None:
        return d
    fields = _Fields(value, path, unknown)
    chosen = None
    for i, item in enumerate(_list(fields.get("thresholds", []), path + ".thresholds")):
        tpath = f"{path}.thresholds[{i}]"
        t = _Fields(item, tpath, unknown)
        priority = _enum(t.get("priority", "DEFAULT"), tpath + ".priority", _PRIORITIES)
        config = BreakerConfig(
            max_connections=_uint(t.get("max_connections", d.max_connections), tpath + ".max_connections", 1),
            max_pending_requests=_uint(t.get("max_pending_requests", d.max_pending_requests),
                                       tpath + ".max_pending_requests"),
            max_requests=_uint(t.get("max_requests", d.max_requests), tpath + ".max_requests", 1),
            max_retries=_uint(t.get("max_retries", d.max_retries), tpath + ".max_retries"),
        )
        t.get("track_remaining")
        if t.get("retry_budget") is not None:
            budget = _Fields(t.get("retry_budget"), tpath + ".retry_budget", unknown)
            percent = 20.0  # Envoy's default budget_percent
            if budget.get("budget_percent") is not None:
                percent = _number(budget.get("budget_percent"), budget.path + ".budget_percent", 0.0, 100.0)
            config = dataclasses.replace(config, budget_percent=percent, min_retry_concurrency=_uint(
                budget.get("min_retry_concurrency", d.min_retry_concurrency), budget.path + ".min_retry_concurrency"))
            budget.done()
        t.done()
        # Requests here have no priority: the DEFAULT thresholds are the cluster's, HIGH ones only validated.
        if priority == "DEFAULT":
            if chosen is not None:
                raise InvalidResource(f"{tpath}: a second set of DEFAULT thresholds")
            chosen = config
    fields.done()
    return chosen if chosen is not None else d


def _outlier(value: Any, path: str, unknown) -> Optional[OutlierConfig]:
    """
    C{outlier_detection}: the fields of L{OutlierConfig} carry Envoy's names, so they are read by name.
    """
    if value is None:
        return None
    fields = _Fields(value, path, unknown)
    given: Dict[str, Any] = {}
    for f in dataclasses.fields(OutlierConfig):
        raw = fields.get(f.name)
        if raw is None:
            continue
        fpath = f"{path}.{f.name}"
        if f.type == "bool":
            given[f.name] = _bool(raw, fpath)
        elif f.type == "float":  # the durations
            given[f.name] = _duration(raw, fpath, positive=f.name != "max_ejection_time_jitter")
        elif "percent" in f.name or f.name.startswith("enforcing_"):
            given[f.name] = _uint(raw, fpath, 0, 100)
        else:
            given[f.name] = _uint(raw, fpath)
    fields.done()
    base = given.get("base_ejection_time", OutlierConfig.base_ejection_time)
    if "max_ejection_time" not in given:
        given["max_ejection_time"] = max(DEFAULT_MAX_EJECTION_TIME, base)
    elif given["max_ejection_time"] < base:
        raise InvalidResource(f"{path}.max_ejection_time: shorter than base_ejection_time ({base:g}s)")
    return OutlierConfig(**given)


def _health(value: Any, name: str, path: str, unknown) -> Optional[HealthConfig]:
    if value is None:
        return None
    checks = _list(value, path)
    if not checks:
        return None
    if len(checks) > 1:
        raise InvalidResource(f"{path}: only one health check per cluster is supported, not {len(checks)}")
    path += "[0]"
    hc = _Fields(checks[0], path, unknown)
    for key in ("timeout", "interval", "unhealthy_threshold", "healthy_threshold"):
        if hc.get(key) is None:
            raise InvalidResource(f"{path}.{key} is required")
    interval = _duration(hc.get("interval"), path + ".interval")
    given: Dict[str, Any] = dict(
        timeout=_duration(hc.get("timeout"), path + ".timeout"),
        interval=interval,
        unhealthy_threshold=_uint(hc.get("unhealthy_threshold"), path + ".unhealthy_threshold", 1),
        healthy_threshold=_uint(hc.get("healthy_threshold"), path + ".healthy_threshold", 1),
        unhealthy_interval=interval,
        host=name,
    )
    for key in ("interval_jitter", "unhealthy_interval", "no_traffic_interval", "initial_jitter"):
        if hc.get(key) is not None:
            given[key] = _duration(hc.get(key), f"{path}.{key}", positive=key in ("unhealthy_interval",
                                                                                 "no_traffic_interval"))
    if hc.get("interval_jitter_percent") is not None:
        given["interval_jitter_percent"] = float(_uint(hc.get("interval_jitter_percent"),
                                                       path + ".interval_jitter_percent", 0, 100))
    for other in ("grpc_health_check", "custom_health_check"):
        if hc.get(other) is not None:
            raise InvalidResource(f"{path}.{other}: not supported (http_health_check or tcp_health_check)")
    http, tcp = hc.get("http_health_check"), hc.get("tcp_health_check")
    if (http is None) == (tcp is None):
        raise InvalidResource(f"{path}: give one of http_health_check and tcp_health_check (others are "
                              f"not supported)")
    if http is not None:
        h = _Fields(http, path + ".http_health_check", unknown)
        checkPath = h.get("path")
        if not isinstance(checkPath, str) or not _PATH.match(checkPath):
            raise InvalidResource(f"{h.path}.path: {checkPath!r} is not a path (it starts with /)")
        given.update(type="http", path=checkPath)
        if h.get("host") is not None:
            if not isinstance(h.get("host"), str) or not _HOST.match(h.get("host")):
                raise InvalidResource(f"{h.path}.host: {h.get('host')!r} is not a host name")
            given["host"] = h.get("host")
        if h.get("expected_statuses") is not None:
            ranges = []
            for i, r in enumerate(_list(h.get("expected_statuses"), h.path + ".expected_statuses")):
                rpath = f"{h.path}.expected_statuses[{i}]"
                rf = _Fields(r, rpath, unknown)
                # Int64Range: end exclusive.
                start = _uint(rf.get("start", 0), rpath + ".start", 100, 599)
                end = _uint(rf.get("end", 0), rpath + ".end", 101, 600)
                if end <= start:
                    raise InvalidResource(f"{rpath}: the range is empty (end is exclusive)")
                ranges.append((start, end - 1))
                rf.done()
            if ranges:
                given["expected_statuses"] = tuple(ranges)
        h.done()
    else:
        t = _Fields(tcp, path + ".tcp_health_check", unknown)
        given["type"] = "tcp"
        if t.get("send") is not None:
            given["send"] = _payload(t.get("send"), t.path + ".send", unknown)
        receive = _list(t.get("receive", []), t.path + ".receive")
        if len(receive) > 1:
            raise InvalidResource(f"{t.path}.receive: only one payload is supported")
        if receive:
            given["receive"] = _payload(receive[0], t.path + ".receive[0]", unknown)
        t.done()
    hc.done()
    return HealthConfig(**given)


def _payload(value: Any, path: str, unknown) -> bytes:
    fields = _Fields(value, path, unknown)
    text = fields.get("text")
    if fields.get("binary") is not None:
        raise InvalidResource(f"{path}.binary: give the payload as hex text")
    try:
        payload = bytes.fromhex(text) if isinstance(text, str) else b""
    except ValueError:
        raise InvalidResource(f"{path}.text: {text!r} is not hex") from None
    if not payload:
        raise InvalidResource(f"{path}.text: an empty payload")
    fields.done()
    return payload


class CDSSubscription(XDSType):
    """
    CDS as one L{XDSType}: every cluster of the control plane (a wildcard request), each accepted set
    handed to C{apply}.

    @ivar version: the C{version_info} of the last set applied, C{""} before one.
    @ivar clusters: the last set applied, by name (in the response's order).
    """

    typeURL = CDS_TYPE_URL
    path = CDS_PATH
    #: A resend of the set in effect costs no parse and no build.
    skipUnchanged = True

    def __init__(self, stats: StatsScope, apply: Callable[[Dict[str, ClusterConfig], str], None],
                 maxClusters: Optional[int] = None, answered: Optional[Callable[[], None]] = None) -> None:
        """
        @param stats: the C{cluster_manager.cds.} scope.
        @param apply: swaps a validated set in (C{apply(clusters, version)}), or raises L{InvalidResource}
            to refuse it whole.
        @param maxClusters: a response with more clusters is rejected (C{[mesh] xds.max_clusters}).
        @param answered: called after each response accepted or rejected (the control plane answered;
            the service waits for the first before it serves).
        """
        self.apply = apply
        self.maxResources = maxClusters
        self.answered = answered
        self.version = ""
        self.clusters: Dict[str, ClusterConfig] = {}
        self.update_attempt = stats.counter("update_attempt")
        self.update_success = stats.counter("update_success")
        self.update_failure = stats.counter("update_failure")
        self.update_rejected = stats.counter("update_rejected")
        #: Envoy's: a hash of the version applied last (the text is in /config_dump).
        self.versionHash = stats.gauge("version")

    def parseResource(self, value: Any, path: str, unknown: Callable[[str], None]) -> ClusterConfig:
        return parseCluster(value, path, unknown)

    def attempted(self) -> None:
        self.update_attempt.value += 1

    def accept(self, response: Response, token: Any) -> None:
        self.apply(dict(response.resources), response.version)
        self.clusters = dict(response.resources)
        self.version = response.version
        self.versionHash.value = int.from_bytes(blake2b(response.version.encode(), digest_size=6).digest(), "big")
        self.update_success.value += 1
        if self.answered is not None:
            self.answered()

    def unchanged(self, version: str, token: Any) -> None:
        # Accepted (ACKed), as Envoy counts a resend that changes nothing.
        self.update_success.value += 1

    def rejected(self, why: str, token: Any) -> None:
        self.update_rejected.value += 1
        if self.answered is not None:
            self.answered()  # as Envoy: a rejected first answer does not hold the start up either

    def failed(self, why: str, token: Any) -> None:
        self.update_failure.value += 1

