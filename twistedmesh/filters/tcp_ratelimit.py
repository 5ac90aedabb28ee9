"""
C{local_ratelimit} for C{protocol = tcp} listeners: Envoy's network local rate limit, a token bucket on
new connections.

    [filter:conn-limit]
    type = local_ratelimit
    max_tokens = 100
    tokens_per_fill = 10
    fill_interval = 1s

Each accepted connection takes a token; one that finds the bucket empty is closed at once (reason
C{local_rate_limited}, before the rest of the chain, so C{tcp_proxy} never connects upstream) and counted
in C{listener.<name>.local_rate_limit.rate_limited}. The bucket is the HTTP filter's
L{twistedmesh.filters.ratelimit.TokenBucket}, refilled lazily from the reactor's clock, shared by every
connection of the listener.

The plugin has the same name as the HTTP C{local_ratelimit}: plugins are looked up per interface
(L{twistedmesh.plugins.factoriesFor}), so a C{protocol = tcp} listener gets this one and an HTTP listener
the other.
"""

from __future__ import annotations

from typing import Callable

from twisted.plugin import IPlugin
from zope.interface import implementer

from ..config import Options
from ..interfaces import IFilterContext, INetworkConnection, INetworkFilter, INetworkFilterFactory
from ..listener.chain import NetworkFilter
from .ratelimit import TokenBucket, _limits

__all__ = ["TCPLocalRateLimitFactory", "TCPLocalRateLimitFilter"]


class TCPLocalRateLimitFilter(NetworkFilter):
    """
    Takes a token per connection from the listener's bucket; closes the connection when it is empty.
    One instance serves every connection of the listener.
    """

    def __init__(self, clock, bucket: TokenBucket, rateLimited) -> None:
        self.clock = clock
        self.bucket = bucket
        self.rateLimited = rateLimited

    def connectionMade(self, conn: INetworkConnection) -> object:
        """
        Take a token, or close the connection (L{STOP}) when none is left.
        """
        bucket = self.bucket
        bucket.refill(self.clock.seconds())
        if bucket.tokens > 0:
            bucket.tokens -= 1
            return None
        self.rateLimited.value += 1
        return conn.close("local_rate_limited")


@implementer(IPlugin, INetworkFilterFactory)
class TCPLocalRateLimitFactory:
    """
    The network C{local_ratelimit} plugin. Options: C{max_tokens} (required, 1 up), C{tokens_per_fill}
    (default 1), C{fill_interval} (required, 50ms up).
    """

    name = "local_ratelimit"

    def configure(self, options: Options, context: IFilterContext) -> Callable[[INetworkConnection], INetworkFilter]:
        """
        Check the options and make the (full) bucket once.
        """
        limits = _limits(options, "")
        clock = context.reactor
        scope = context.stats.scope("listener", context.listener.name).scope("local_rate_limit")
        shared = TCPLocalRateLimitFilter(clock, TokenBucket(limits, clock.seconds()), scope.counter("rate_limited"))

        def make(conn: INetworkConnection) -> TCPLocalRateLimitFilter:
            return shared

        return make
