"""
The frozen configuration objects the loader produces. Everything downstream of the loader reads these;
nothing reads the INI text again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Optional, Tuple

from .health import HealthConfig
from .lb import LBConfig

from .accesslog import AccessLogConfig
from .discovery import DiscoveryConfig, XDSConfig
from .outlier import OutlierConfig
from .tls import TLSConfig
from .tracing import TracingConfig

DEFAULT_ADMIN = "tcp:9901:interface=127.0.0.1"


@dataclass(frozen=True)
class MeshConfig:
    """
    The C{[mesh]} section: process-wide settings.
    """

    admin: Optional[str] = DEFAULT_ADMIN
    admin_tls: Optional[str] = None  # a [tls:NAME] section the admin endpoint is served over
    # admin.allowed_hosts: the names (lowercased, no trailing dot) the admin answers to in Host, besides IP
    # addresses and localhost.
    admin_allowed_hosts: Tuple[str, ...] = ()
    drain_timeout: float = 10.0
    workers: int = 1  # worker processes (`auto` in the file: one per core available to the process)
    workers_sharing: str = "reuseport"  # how workers share a listener's port: reuseport | inherit
    xds: Optional[XDSConfig] = None  # the xds.* keys: where the control plane is; None: no xDS
    tracing: Optional[TracingConfig] = None  # the tracing.* keys (config/tracing.py); None: none written


@dataclass(frozen=True)
class HostConfig:
    """
    One static endpoint of a cluster: a Twisted client endpoint string and its weight.
    """

    endpoint: str
    weight: int = 1


@dataclass(frozen=True)
class BreakerConfig:
    """
    A cluster's C{breaker.*} keys (Envoy's defaults). With C{budget_percent}, the retry limit is that share
    of the active requests, but at least C{min_retry_concurrency} (Envoy's retry budget), instead of
    C{max_retries}.
    """

    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 3
    budget_percent: Optional[float] = None
    min_retry_concurrency: int = 3


@dataclass(frozen=True)
class HTTP2ClusterConfig:
    """
    A C{protocol = http2} cluster's C{http2.*} keys: the cap on streams per connection (the peer's
    SETTINGS_MAX_CONCURRENT_STREAMS lowers it), the receive windows we announce, and PING keep-alive
    (off without an interval).
    """

    max_concurrent_streams: int = 100
    initial_stream_window_size: int = 64 * 1024
    initial_connection_window_size: int = 1024 * 1024
    keepalive_interval: Optional[float] = None
    keepalive_timeout: float = 20.0


@dataclass(frozen=True)
class ClusterConfig:
    """
    A C{[cluster:NAME]} section.
    """

    name: str
    endpoints: Tuple[HostConfig, ...]
    lb_policy: str = "round_robin"
    protocol: str = "http1"
    connect_timeout: float = 5.0
    tls: Optional[str] = None
    lb: Optional[LBConfig] = None  # every load-balancing option; None: LBConfig(policy=lb_policy)
    health: Optional[HealthConfig] = None  # active health checking (config/health.py); None: off
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    outlier: Optional[OutlierConfig] = None  # the outlier.* keys; None: no outlier detection
    http2: HTTP2ClusterConfig = field(default_factory=HTTP2ClusterConfig)  # protocol = http2 only
    discovery: Optional[DiscoveryConfig] = None  # discovery = strict_dns | logical_dns | xds; None: static


@dataclass(frozen=True)
class FilterConfig:
    """
    A C{[filter:NAME]} section, or a filter named in a chain without a section of its own (then C{items}
    is empty). C{items} holds the raw keys; the plugin validates them when the service is built.
    """

    name: str
    type: str
    items: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    section: Optional[str] = None


@dataclass(frozen=True)
class HTTP2ListenerConfig:
    """
    An HTTP listener's C{http2} switch and C{http2.*} keys: the SETTINGS it announces to clients and its
    abuse limits (twistedmesh/http/h2server.py C{HTTP2Settings} says what each does). The defaults are
    Envoy's edge recommendations and flood defaults; C{max_header_list_size} C{None} is the listener's
    C{max_request_headers_size}.
    """

    enabled: bool = True
    max_concurrent_streams: int = 100
    initial_stream_window_size: int = 64 * 1024
    initial_connection_window_size: int = 1024 * 1024
    max_frame_size: int = 16384
    max_header_list_size: Optional[int] = None
    max_outbound_control_frames: int = 1000
    max_consecutive_inbound_frames_with_empty_payload: int = 1
    max_inbound_priority_frames_per_stream: int = 100
    max_inbound_window_update_frames_per_data_frame_sent: int = 10
    premature_reset_total_stream_count: int = 500
    premature_reset_min_stream_lifetime: float = 1.0


@dataclass(frozen=True)
class ListenerConfig:
    """
    A C{[listener:NAME]} section.
    """

    name: str
    endpoint: str
    protocol: str
    filters: Tuple[str, ...]
    cluster: Optional[str] = None
    idle_timeout: float = 3600.0
    connect_timeout: Optional[float] = None
    max_connect_attempts: int = 1
    routes: Optional[str] = None
    max_request_headers_size: int = 60 * 1024
    max_request_headers_count: int = 100
    request_headers_timeout: float = 0.0
    max_requests_per_connection: int = 0
    access_log: Optional[AccessLogConfig] = None
    tls: Optional[str] = None
    forward_client_cert: str = "sanitize"
    http2: HTTP2ListenerConfig = field(default_factory=HTTP2ListenerConfig)  # protocol = http only
    tracing_sample_rate: Optional[float] = None  # percent: overrides [mesh] tracing.sample_rate


@dataclass(frozen=True)
class EchoConfig:
    """
    An C{[echo:NAME]} section: the built-in demo upstream. C{protocol = tcp} echoes bytes back;
    C{protocol = http} answers every request with 200 and a description of the request.
    """

    name: str
    endpoint: str
    protocol: str = "http"


@dataclass(frozen=True)
class Config:
    """
    A whole, validated configuration file.
    """

    file: str
    mesh: MeshConfig
    listeners: Mapping[str, ListenerConfig]
    clusters: Mapping[str, ClusterConfig]
    filters: Mapping[str, FilterConfig]
    echoes: Mapping[str, EchoConfig]
    routes: Mapping[str, Tuple[object, ...]] = field(default_factory=lambda: MappingProxyType({}))
    tls: Mapping[str, TLSConfig] = field(default_factory=lambda: MappingProxyType({}))
