"""
Circuit breakers: per-cluster limits on connections, pending requests, requests and retries, with Envoy's
defaults and stat names. Past a limit the router answers at once (503, flag C{UO},
C{x-envoy-overloaded: true}) instead of letting a struggling upstream's queue grow without bound.

The counts are plain integers changed where the work starts and ends; the gauges operators watch
(C{circuit_breakers.default.rq_open}, C{remaining_rq}, ...) are kept in step on each change.
"""

from __future__ import annotations

from ..config import BreakerConfig
from ..observability.stats import StatsScope


class _Limit:
    """
    One limited count with its two gauges: C{<name>_open} (1 at the limit) and C{remaining_<short>}.
    """

    __slots__ = ("count", "limit", "open", "remaining")

    def __init__(self, limit: int, scope: StatsScope, openName: str, remainingName: str) -> None:
        self.count = 0
        self.limit = limit
        self.open = scope.gauge(openName)
        self.remaining = scope.gauge(remainingName)
        self.remaining.value = limit

    def full(self) -> bool:
        return self.count >= self.limit

    def add(self, n: int) -> None:
        count = self.count = self.count + n
        self.open.value = 1 if count >= self.limit else 0
        self.remaining.value = max(self.limit - count, 0)


class _PendingLimit(_Limit):
    """
    The pending-request limit, which also keeps the cluster's C{upstream_rq_pending_active} gauge and
    C{upstream_rq_pending_total} counter (requests that had to wait for a connection).
    """

    __slots__ = ("active", "total")

    def __init__(self, limit: int, scope: StatsScope, cluster: StatsScope) -> None:
        _Limit.__init__(self, limit, scope, "rq_pending_open", "remaining_pending")
        self.active = cluster.gauge("upstream_rq_pending_active")
        self.total = cluster.counter("upstream_rq_pending_total")

    def add(self, n: int) -> None:
        _Limit.add(self, n)
        self.active.value = self.count
        if n > 0:
            self.total.value += n


class CircuitBreaker:
    """
    The default-priority circuit breakers of one cluster (see the module docstring).
    """

    def __init__(self, config: BreakerConfig, scope: StatsScope) -> None:
        self.config = config
        breakers = scope.scope("circuit_breakers").scope("default")
        self.connections = _Limit(config.max_connections, breakers, "cx_open", "remaining_cx")
        self.pending = _PendingLimit(config.max_pending_requests, breakers, scope)
        self.requests = _Limit(config.max_requests, breakers, "rq_open", "remaining_rq")
        self.retries = _Limit(config.max_retries, breakers, "rq_retry_open", "remaining_retries")
        self.upstream_rq_pending_overflow = scope.counter("upstream_rq_pending_overflow")
        self.upstream_cx_overflow = scope.counter("upstream_cx_overflow")
        self.upstream_rq_retry_overflow = scope.counter("upstream_rq_retry_overflow")

    def retryAllowed(self) -> bool:
        """
        Whether one more retry may start now (counting it if so); else count the overflow.
        """
        retries = self.retries
        config = self.config
        if config.budget_percent is not None:
            retries.limit = max(int(self.requests.count * config.budget_percent / 100),
                                config.min_retry_concurrency)
        if retries.full():
            self.upstream_rq_retry_overflow.value += 1
            return False
        retries.add(1)
        return True
