"""
The C{tracing.*} keys: the C{[mesh]} group that chooses where spans go, and a listener's own
C{tracing.sample_rate}.

Tracing is on for an HTTP listener when the C{[mesh]} section has any C{tracing.*} key or the listener sets
C{tracing.sample_rate}; then the listener propagates trace context (see
L{twistedmesh.observability.tracing}). Spans are exported only when C{[mesh] tracing.provider} is set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlsplit

from .options import Options

PROVIDERS = ("zipkin", "otlp")
#: Where each provider's collector takes spans, when C{tracing.collector} names no path.
DEFAULT_PATHS = {"zipkin": "/api/v2/spans", "otlp": "/v1/traces"}


@dataclass(frozen=True)
class TracingConfig:
    """
    The C{[mesh]} section's C{tracing.*} keys.

    @ivar provider: C{"zipkin"} (Zipkin v2 JSON) or C{"otlp"} (OTLP/HTTP with JSON), or None to
        propagate trace context without exporting spans.
    @ivar collector: the full URL spans are posted to (the provider's usual path added when none is given).
    @ivar sample_rate: the percentage of requests without an incoming sampling decision that are sampled.
    """

    provider: Optional[str] = None
    collector: Optional[str] = None
    service_name: str = "twistedmesh"
    node_id: Optional[str] = None  # the spans' node_id tag; None: the service name
    sample_rate: float = 100.0
    batch_size: int = 512
    queue_size: int = 2048
    flush_interval: float = 5.0
    timeout: float = 5.0


def collectorURL(raw: str, provider: Optional[str]) -> str:
    """
    Check a collector URL (C{http} or C{https}, with a host) and add the provider's path when it has none.

    @raise ValueError: with a message for the user.
    """
    raw = raw.strip()
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 (reading it checks it: a port out of range raises ValueError)
    except ValueError:
        raise ValueError(f"{raw!r} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{raw!r} is not an http:// or https:// URL with a host")
    if parts.path in ("", "/") and provider in DEFAULT_PATHS:
        return raw.rstrip("/") + DEFAULT_PATHS[provider]
    return raw


def parseMeshTracing(o: Options) -> Optional[TracingConfig]:
    """
    The C{[mesh]} section's C{tracing.*} keys, or None when there is none.
    """
    present = [key for key in o.keys() if key.startswith("tracing.")]
    if not present:
        return None
    d = TracingConfig()
    provider = o.string("tracing.provider", None, choices=PROVIDERS)
    collector = o._get("tracing.collector", None, lambda raw: collectorURL(raw, provider))
    if provider is not None and not o._items.get("tracing.collector", "").strip():
        o.error("tracing.collector", f"is required with tracing.provider = {provider}: the URL spans go to")
    config = TracingConfig(
        provider=provider,
        collector=collector,
        service_name=o.string("tracing.service_name", d.service_name),
        node_id=o.string("tracing.node_id", None),
        sample_rate=o.percentage("tracing.sample_rate", d.sample_rate),
        batch_size=o.integer("tracing.batch_size", d.batch_size, minimum=1),
        queue_size=o.integer("tracing.queue_size", d.queue_size, minimum=1),
        flush_interval=o.positiveDuration("tracing.flush_interval", d.flush_interval),
        timeout=o.positiveDuration("tracing.timeout", d.timeout),
    )
    if "tracing.provider" not in o._items:
        # Without a provider only the sampling rate means anything: say so rather than ignore the rest.
        for key in present:
            if key in o._known and key not in ("tracing.sample_rate", "tracing.provider"):
                o.error(key, "has no effect without tracing.provider (zipkin or otlp)")
    if config.batch_size > config.queue_size:
        o.error("tracing.batch_size", f"{config.batch_size} is more than tracing.queue_size "
                                      f"({config.queue_size}): a batch could never fill")
    return config


def parseListenerTracing(o: Options, protocol: Optional[str]) -> Optional[float]:
    """
    A listener's C{tracing.sample_rate} (a percentage), or None when it has none.
    """
    rate = o.percentage("tracing.sample_rate", None)
    if rate is not None and protocol != "http":
        o.error("tracing.sample_rate", "only HTTP listeners trace requests (protocol = http)")
        return None
    return rate


def listenerSampleRate(mesh: Optional[TracingConfig], listenerRate: Optional[float]) -> Optional[float]:
    """
    The probability (0 to 1) with which a listener samples a request that brings no sampling decision, or
    None when the listener does not trace at all.
    """
    if listenerRate is not None:
        return listenerRate / 100.0
    if mesh is None:
        return None
    return mesh.sample_rate / 100.0
