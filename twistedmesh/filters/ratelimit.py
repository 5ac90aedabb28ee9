"""
The C{local_ratelimit} filter: Envoy's local (in-process, no rate-limit service) token-bucket rate limiter.

    [filter:limit]
    type = local_ratelimit
    max_tokens = 100
    tokens_per_fill = 10
    fill_interval = 1s
    ; one bucket per distinct x-user value, instead of the global one
    descriptor.1.key = header:x-user
    descriptor.1.max_tokens = 10
    descriptor.1.fill_interval = 1s

Each request takes one token. A bucket holds at most C{max_tokens}, starts full, and gains
C{tokens_per_fill} every C{fill_interval}; a request that finds its bucket empty gets a 429 (response flag
C{RL}, details C{local_rate_limited}), unless C{shadow = true}.

Refilling is lazy: nothing runs between requests. A bucket remembers when it was last filled; a request
adds C{floor(elapsed / fill_interval) * tokens_per_fill} (capped at C{max_tokens}) and moves that time on
by whole intervals, which gives exactly the tokens a timer firing every C{fill_interval} since the bucket
was made would have given, without a timer per bucket. The time comes from the injected reactor, so tests
drive it with a L{twisted.internet.task.Clock}.

Descriptors (C{descriptor.<N>.key} = C{header:NAME}, C{remote_address} or C{path}) give each distinct value
of their key its own bucket with its own limits. A request with a value for one or more descriptors is
limited by those buckets only (it is refused if any is empty, and then takes no token from any); a request
with no value for any descriptor uses the global bucket. Descriptor buckets are kept in a bounded LRU
(C{max_buckets}), since their keys come from clients.

Every bucket belongs to the configured filter, so all streams of the listener share them: the maker gives
every stream the same L{LocalRateLimitFilter}. (C{configure} runs once per listener, so two listeners
naming one section have separate buckets.)
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import OrderedDict
from typing import Callable, FrozenSet, List, Optional, Tuple

from twisted.plugin import IPlugin
from zope.interface import implementer

from ..config import Options, suggest
from ..http.stream import HTTPFilter, Stream
from ..interfaces import IFilterContext, IHTTPFilterFactory

__all__ = ["LocalRateLimitFactory", "LocalRateLimitFilter", "TokenBucket", "BucketLimits"]

# Envoy refuses a fill_interval under 50ms; we keep its limit so that configs move between the two.
_MIN_FILL_INTERVAL = 0.05
# Lazy refill divides elapsed float seconds by the interval: 0.3 / 0.1 is 2.9999999999999996, which would
# lose a fill that a timer would have given. A nanosecond of slack absorbs that rounding.
_EPSILON = 1e-9
# Descriptor values come from clients and can be as long as a header may be (60 KiB by default). Longer
# ones are keyed by a 16-byte digest instead, so that max_buckets bounds memory, not just entries.
_MAX_KEY_BYTES = 128
_LABEL = re.compile(r"^[A-Za-z0-9_-]+$")
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")
_KEY_KINDS = ("header:NAME", "remote_address", "path")
_HEADER, _REMOTE_ADDRESS, _PATH = 0, 1, 2
_BODY = b"local_rate_limited"


class BucketLimits:
    """
    The fixed shape of a token bucket: its capacity and refill rate.

    @ivar maxTokens: the most tokens the bucket holds (and how many it starts with).
    @ivar tokensPerFill: tokens added every C{fillInterval}.
    @ivar fillInterval: seconds between fills.
    """

    __slots__ = ("maxTokens", "tokensPerFill", "fillInterval", "limitHeader")

    def __init__(self, maxTokens: int, tokensPerFill: int, fillInterval: float) -> None:
        self.maxTokens = maxTokens
        self.tokensPerFill = tokensPerFill
        self.fillInterval = fillInterval
        self.limitHeader = b"%d" % maxTokens

    def __repr__(self) -> str:
        return f"<BucketLimits {self.maxTokens} max, +{self.tokensPerFill} every {self.fillInterval}s>"


class TokenBucket:
    """
    One token bucket, refilled lazily from the time its caller passes in (see the module docstring).

    @ivar limits: its L{BucketLimits}.
    @ivar tokens: the tokens left after the last L{refill}.
    @ivar lastFill: when the bucket was last filled (or made), in the clock's seconds.
    """

    __slots__ = ("limits", "tokens", "lastFill")

    def __init__(self, limits: BucketLimits, now: float) -> None:
        self.limits = limits
        self.tokens = limits.maxTokens
        self.lastFill = now

    def refill(self, now: float) -> None:
        """
        Add the tokens of every whole C{fillInterval} since C{lastFill}, up to C{maxTokens}.
        """
        elapsed = now - self.lastFill
        if elapsed < 0:
            # The wall clock went back (reactor.seconds() is not monotonic): restart the interval from
            # now rather than give no tokens until the clock catches up again.
            self.lastFill = now
            return
        interval = self.limits.fillInterval
        fills = int((elapsed + _EPSILON) // interval)
        if fills:
            limits = self.limits
            self.tokens = min(limits.maxTokens, self.tokens + fills * limits.tokensPerFill)
            # Advance by whole intervals, not to now, so the phase of the fills is kept.
            self.lastFill += fills * interval

    def resetIn(self, now: float) -> int:
        """
        Whole seconds (rounded up) until the next fill, for C{x-ratelimit-reset}.
        """
        return max(0, math.ceil(self.lastFill + self.limits.fillInterval - now - _EPSILON))

    def __repr__(self) -> str:
        return f"<TokenBucket {self.tokens}/{self.limits.maxTokens}>"


class _Descriptor:
    """
    One C{descriptor.<N>} section of options: where its value comes from, and its buckets' limits.
    """

    __slots__ = ("label", "kind", "header", "limits")

    def __init__(self, label: str, kind: int, header: Optional[bytes], limits: BucketLimits) -> None:
        self.label = label
        self.kind = kind
        self.header = header
        self.limits = limits

    def value(self, stream: Stream) -> Optional[object]:
        """
        This descriptor's value for C{stream}, or C{None} when the request has none.
        """
        kind = self.kind
        if kind == _HEADER:
            value = stream.getRequestHeader(self.header)  # type: ignore[arg-type]
        elif kind == _PATH:
            path = stream.path
            i = path.find(b"?")
            # Without the query: otherwise `?x=1`, `?x=2`, ... would each get a fresh, full bucket.
            value = path[:i] if i >= 0 else path
        else:
            host = getattr(stream.downstreamAddress, "host", None)
            return host  # a str; None for a UNIX socket peer, which then uses the global bucket
        if value is not None and len(value) > _MAX_KEY_BYTES:
            value = hashlib.blake2b(value, digest_size=16).digest()
        return value


class LocalRateLimitFilter(HTTPFilter):
    """
    Takes a token per request from the request's bucket, refusing it with 429 when the bucket is empty.

    One instance serves every stream of a listener: the buckets are the listener's, and what the filter
    learns about a stream (the C{x-ratelimit-*} values) goes into C{stream.state}.

    @ivar bucket: the global L{TokenBucket}.
    @ivar buckets: the descriptor buckets, keyed by C{(descriptor index, value)}, least recently used first.
    """

    def __init__(self, clock, limits: BucketLimits, descriptors: Tuple[_Descriptor, ...], maxBuckets: int,
                 shadow: bool, xHeaders: bool, table, routes: Optional[FrozenSet[object]], stats,
                 stateKey: str) -> None:
        self.clock = clock
        self.bucket = TokenBucket(limits, clock.seconds())
        self.descriptors = descriptors
        self.maxBuckets = maxBuckets
        # An OrderedDict rather than a dict: move_to_end() on a hit and popitem(last=False) on overflow are
        # both O(1), which makes it a least-recently-used cache. The bound matters because descriptor values
        # come from clients: without it, a client sending a new x-user (or path) on every request would
        # grow the map without limit.
        self.buckets: "OrderedDict[Tuple[int, object], TokenBucket]" = OrderedDict()
        self.shadow = shadow
        self.xHeaders = xHeaders
        self.table = table
        self.routes = routes
        self.enabled, self.ok, self.rateLimited, self.enforced = stats
        self.stateKey = stateKey

    def __repr__(self) -> str:
        return f"<LocalRateLimitFilter {self.bucket!r} descriptors={len(self.descriptors)}>"

    def _bucketsFor(self, stream: Stream, now: float) -> List[TokenBucket]:
        """
        The descriptor buckets C{stream} has values for (made full if new), or the global bucket alone.
        """
        found: List[TokenBucket] = []
        buckets = self.buckets
        for index, descriptor in enumerate(self.descriptors):
            value = descriptor.value(stream)
            if value is None:
                continue
            key = (index, value)
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = TokenBucket(descriptor.limits, now)
                if len(buckets) > self.maxBuckets:
                    buckets.popitem(last=False)
            else:
                buckets.move_to_end(key)
            found.append(bucket)
        if not found:
            found.append(self.bucket)
        return found

    def requestHeaders(self, stream: Stream) -> object:
        """
        Take a token from the request's bucket(s), or answer 429 when one is empty (in shadow mode, count
        it and let the request through).
        """
        if self.routes is not None and self.table.match(stream) not in self.routes:
            return None
        self.enabled.value += 1
        now = self.clock.seconds()
        buckets = self._bucketsFor(stream, now)
        empty = None
        for bucket in buckets:
            bucket.refill(now)
            if empty is None and bucket.tokens < 1:
                empty = bucket
        if empty is None:
            # Take tokens only once every bucket allowed it: a refused request costs nothing.
            for bucket in buckets:
                bucket.tokens -= 1
            self.ok.value += 1
            if self.xHeaders:
                stream.state[self.stateKey] = self._headers(min(buckets, key=_tokens), now)
            return None
        self.rateLimited.value += 1
        if self.shadow:
            if self.xHeaders:
                stream.state[self.stateKey] = self._headers(empty, now)
            return None
        self.enforced.value += 1
        headers = self._headers(empty, now) if self.xHeaders else ()
        return stream.respond(429, _BODY, headers, flag="RL", details="local_rate_limited")

    def responseHeaders(self, stream: Stream) -> None:
        """
        With C{enable_x_ratelimit_headers}, add the C{x-ratelimit-*} fields noted for this request.
        """
        if self.xHeaders:
            headers = stream.state.get(self.stateKey)
            if headers is not None:
                stream.responseHeaders.extend(headers)

    @staticmethod
    def _headers(bucket: TokenBucket, now: float) -> Tuple[Tuple[bytes, bytes], ...]:
        """
        The C{x-ratelimit-limit}, C{-remaining} and C{-reset} fields describing C{bucket}.
        """
        return (
            (b"x-ratelimit-limit", bucket.limits.limitHeader),
            (b"x-ratelimit-remaining", b"%d" % bucket.tokens),
            (b"x-ratelimit-reset", b"%d" % bucket.resetIn(now)),
        )


def _tokens(bucket: TokenBucket) -> int:
    """
    Sort key: the bucket's tokens (the one with fewest left is the one a client should hear about).
    """
    return bucket.tokens


def _limits(options: Options, prefix: str) -> BucketLimits:
    """
    Read C{<prefix>max_tokens}, C{<prefix>tokens_per_fill} and C{<prefix>fill_interval}; errors are recorded
    and replaced by harmless values so that checking goes on.
    """
    maxTokens = options.integer(prefix + "max_tokens", minimum=1)
    perFill = options.integer(prefix + "tokens_per_fill", 1, minimum=1)
    interval = options.duration(prefix + "fill_interval")
    if interval is not None and interval < _MIN_FILL_INTERVAL - _EPSILON:
        options.error(prefix + "fill_interval", f"{interval * 1000:g}ms is less than 50ms (Envoy's minimum)")
        interval = None
    return BucketLimits(maxTokens or 1, perFill or 1, interval or 1.0)


def _descriptorKey(options: Options, key: str) -> Optional[Tuple[int, Optional[bytes]]]:
    """
    Parse a C{descriptor.<N>.key} value into C{(kind, header name or None)}, or record why not.
    """
    spec = options.string(key)
    if spec is None:
        return None
    if spec == "remote_address":
        return _REMOTE_ADDRESS, None
    if spec == "path":
        return _PATH, None
    kind, colon, name = spec.partition(":")
    if kind.strip() != "header" or not colon:
        options.error(key, f"{spec!r} is not one of {', '.join(_KEY_KINDS)}"
                           f"{suggest(spec, ('remote_address', 'path', 'header:'))}")
        return None
    name = name.strip().lower()
    if not name:
        options.error(key, "names no header: write header:NAME")
        return None
    if name == "host" or name.startswith(":"):
        options.error(key, f"`{name}` is not a header field here: the request's authority and path are "
                           "kept apart from its headers (use `path` for the path)")
        return None
    bad = sorted({c for c in name if c not in _TCHAR})
    if bad:
        options.error(key, f"{name!r} is not a valid header name (it may not contain "
                           f"{', '.join(repr(c) for c in bad)})")
        return None
    return _HEADER, name.encode("ascii")


def _descriptorLabels(options: Options, usage: str) -> List[str]:
    """
    The N of every C{descriptor.<N>.*} key, in the order each first appears; a malformed key is reported
    with C{usage} (the keys a group takes).
    """
    labels: List[str] = []
    for key in options.keys():
        if not key.startswith("descriptor."):
            continue
        label, dot, rest = key[len("descriptor."):].partition(".")
        if not dot or not rest or not _LABEL.match(label):
            options.string(key, None)  # known now: this error is the one to report, not "unknown key"
            options.error(key, f"write {usage} (N: letters, digits, _ or -)")
            continue
        if label not in labels:
            labels.append(label)
    return labels


def _descriptors(options: Options) -> Tuple[_Descriptor, ...]:
    """
    Read every C{descriptor.<N>.*} group, in the order their first key appears in the section.
    """
    labels = _descriptorLabels(options, "descriptor.N.key, descriptor.N.max_tokens, descriptor.N.tokens_per_fill "
                                        "and descriptor.N.fill_interval")
    descriptors: List[_Descriptor] = []
    seen: List[Tuple[int, Optional[bytes]]] = []
    for label in labels:
        prefix = f"descriptor.{label}."
        parsed = _descriptorKey(options, prefix + "key")
        limits = _limits(options, prefix)
        if parsed is None:
            continue
        if parsed in seen:
            options.error(prefix + "key", "is the same as an earlier descriptor's key")
            continue
        seen.append(parsed)
        descriptors.append(_Descriptor(label, parsed[0], parsed[1], limits))
    return tuple(descriptors)


def _routes(options: Options, context: IFilterContext) -> Tuple[object, Optional[FrozenSet[object]]]:
    """
    Resolve C{routes = TABLE/NAME, ...} to the listener's L{twistedmesh.http.routes.Route} objects.

    @return: the listener's route table and the set of routes, or C{(None, None)} when the option is not
        written (the limiter then applies to every request).
    """
    names = options.list("routes")
    if not names:
        return None, None
    # IFilterContext does not promise `routes` (FilterContext has it), so read it defensively.
    table = getattr(context, "routes", None)
    if table is None:
        options.error("routes", "the listener names no route table (routes = TABLE), so no route can match")
        return None, None
    known = {f"{route.table}/{route.name}": route for route in table.routes}
    chosen = []
    for name in names:
        route = known.get(name)
        if route is None:
            options.error("routes", f"names no route {name!r} of this listener's table (write TABLE/NAME)"
                                    f"{suggest(name, known)}")
        else:
            chosen.append(route)
    return table, frozenset(chosen)


@implementer(IPlugin, IHTTPFilterFactory)
class LocalRateLimitFactory:
    """
    The C{local_ratelimit} plugin (see the module docstring and docs/traffic.md).

    Options: C{max_tokens} (required), C{tokens_per_fill} (default 1), C{fill_interval} (required, at least
    50ms); C{descriptor.<N>.key}, C{.max_tokens}, C{.tokens_per_fill}, C{.fill_interval}; C{max_buckets}
    (default 10000); C{shadow} (default false); C{enable_x_ratelimit_headers} (default false);
    C{routes} (TABLE/NAME list; default: every request); C{stat_prefix} (default C{local_rate_limit}).
    """

    name = "local_ratelimit"

    def configure(self, options: Options, context: IFilterContext) -> Callable[[Stream], LocalRateLimitFilter]:
        """
        Check the options, make the global bucket (full) and the counters, once.

        @return: a maker giving every stream the listener's one L{LocalRateLimitFilter}.
        """
        limits = _limits(options, "")
        descriptors = _descriptors(options)
        maxBuckets = options.integer("max_buckets", 10000, minimum=1)
        shadow = options.boolean("shadow", False)
        xHeaders = options.boolean("enable_x_ratelimit_headers", False)
        table, routes = _routes(options, context)
        prefix = options.string("stat_prefix", "local_rate_limit")
        if prefix is not None and not _LABEL.match(prefix):
            options.error("stat_prefix", f"{prefix!r} may hold only letters, digits, _ and -: it becomes part "
                                         "of stat names")
            prefix = "local_rate_limit"
        scope = context.stats.scope("http", context.listener.name).scope(prefix or "local_rate_limit")
        stats = tuple(scope.counter(name) for name in ("enabled", "ok", "rate_limited", "enforced"))
        shared = LocalRateLimitFilter(
            context.reactor, limits, descriptors, maxBuckets or 10000, bool(shadow), bool(xHeaders), table,
            routes, stats, f"local_ratelimit:{options.section}",
        )

        def make(stream: Stream) -> LocalRateLimitFilter:
            """
            The filter for C{stream}: the listener's shared one, which holds the buckets.
            """
            return shared

        return make
