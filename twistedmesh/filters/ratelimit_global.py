"""
The C{ratelimit} filter: Envoy's global rate limiting, with limits shared by every proxy instance through
Redis, counted in fixed windows per descriptor value the way lyft/ratelimit (Envoy's reference rate limit
service) counts them.

    [filter:global_limit]
    type = ratelimit
    redis = tcp:127.0.0.1:6379
    domain = edge
    descriptor.user.key = header:x-user
    descriptor.user.requests_per_unit = 100
    descriptor.user.unit = minute

For each descriptor the request has a value for, the counter is the Redis key
C{{domain}_{descriptorKey}_{value}_{windowStart}}, where C{windowStart} is the current time (from the
injected clock) rounded down to a whole C{unit}. One pipeline, C{INCRBY key 1} and C{EXPIRE key unit} per
descriptor, goes to Redis per request (one round trip, whatever the number of descriptors); when any count
is over its C{requests_per_unit}, the request is answered 429 (flag C{RL}, C{x-envoy-ratelimited: true}).
Since every instance increments the same keys, the limit holds for the whole fleet.

The request waits (its C{requestHeaders} hook returns a Deferred) until Redis answers or C{timeout} (20ms,
Envoy's default) passes. When Redis cannot be reached, answers an error or is too slow, the request is let
through (C{failure_mode_allowed}) unless C{failure_mode_deny = true}: then it gets Envoy's answer, a 500
with flag C{RLSE}.

Descriptor keys and the value they count: C{header:NAME} (the header's value; a request without it is not
counted for that descriptor), C{remote_address} (the client's IP address), C{path} (the path without its
query) and C{generic:VALUE} (VALUE, for every request: one counter for the whole domain, like Envoy's
C{generic_key} action). In the Redis key, C{descriptorKey} is C{header:NAME}, C{remote_address}, C{path} or
C{generic_key}. A request with no value for any descriptor is let through without asking Redis.

All streams of a listener share one filter and one L{twistedmesh.redis.RedisClient}: one persistent
connection, made on the first request, reconnecting with backoff (see L{twistedmesh.redis}).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from ..config import Options, suggest
from ..http.stream import HTTPFilter, Stream
from ..interfaces import IFilterContext, IHTTPFilterFactory
from ..redis import RedisClient
from .ratelimit import _HEADER, _LABEL, _REMOTE_ADDRESS, _Descriptor, _descriptorKey, _descriptorLabels

__all__ = ["GlobalRateLimitFactory", "GlobalRateLimitFilter", "UNITS"]

UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_GENERIC = 3
_KEY_KINDS = ("header:NAME", "remote_address", "path", "generic:VALUE")
_CONNECT_TIMEOUT = 1.0
_RATE_LIMITED_HEADERS = ((b"x-envoy-ratelimited", b"true"),)
_ERROR_BODY = b"rate limit service error\n"


class GlobalDescriptor(_Descriptor):
    """
    One C{descriptor.<N>} group: where its value comes from (as for C{local_ratelimit}), the key naming it in
    Redis, and its fixed-window limit.

    @ivar keyName: the C{descriptorKey} part of the Redis key (bytes).
    @ivar generic: the value of a C{generic:VALUE} descriptor, else C{None}.
    @ivar requestsPerUnit: the most requests counted per window.
    @ivar unit: the window's length in seconds.
    """

    __slots__ = ("keyName", "generic", "requestsPerUnit", "unit")

    def __init__(self, label: str, kind: int, header: Optional[bytes], keyName: bytes, generic: Optional[bytes],
                 requestsPerUnit: int, unit: int) -> None:
        super().__init__(label, kind, header, None)  # type: ignore[arg-type]
        self.keyName = keyName
        self.generic = generic
        self.requestsPerUnit = requestsPerUnit
        self.unit = unit

    def value(self, stream: Stream) -> Optional[object]:
        """
        This descriptor's value for C{stream} (see L{_Descriptor.value}); a generic one always has its own.
        """
        if self.kind == _GENERIC:
            return self.generic
        return super().value(stream)

    def __repr__(self) -> str:
        return f"<GlobalDescriptor {self.keyName!r} {self.requestsPerUnit}/{self.unit}s>"


class _Check:
    """
    One request's question to Redis: the Deferred the stream waits on, and the timer that ends the wait.
    """

    __slots__ = ("waiting", "timer")

    def __init__(self) -> None:
        self.waiting: Deferred = Deferred(self._cancel)
        self.timer: Optional[IDelayedCall] = None

    def _cancel(self, _: Deferred) -> None:
        """
        The stream ended while waiting: stop the timer (a late Redis answer is then ignored).
        """
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def finish(self, outcome: object) -> None:
        """
        Fire the Deferred with C{outcome}, once: Redis's answer or the timeout, whichever is first.
        """
        if self.waiting.called:
            return
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self.waiting.callback(outcome)

    def failed(self, failure: Failure) -> None:
        """
        Redis failed (no connection, an error reply): finish with a L{_Failed} holding why. (A L{Failure}
        given to C{callback} would run the stream's errback instead of the decision.)
        """
        self.finish(_Failed(failure))


class _Failed:
    """
    The outcome of a check that Redis failed.

    @ivar failure: why.
    """

    __slots__ = ("failure",)

    def __init__(self, failure: Failure) -> None:
        self.failure = failure


class _Timeout:
    """
    The outcome of a check that Redis did not answer in time.
    """

    def __repr__(self) -> str:
        return "TIMEOUT"


_TIMED_OUT = _Timeout()


class GlobalRateLimitFilter(HTTPFilter):
    """
    Counts each request in Redis, one counter per descriptor value and window, and refuses it with 429
    when a counter is over its limit. One instance serves every stream of a listener.

    @ivar client: the listener's L{RedisClient}.
    """

    log = Logger()

    def __init__(self, clock, client: RedisClient, domain: bytes, descriptors: Tuple[GlobalDescriptor, ...],
                 timeout: float, failureModeDeny: bool, stats) -> None:
        self.clock = clock
        self.client = client
        self.domain = domain
        self.descriptors = descriptors
        self.timeout = timeout
        self.failureModeDeny = failureModeDeny
        self.ok, self.overLimit, self.error, self.failureModeAllowed = stats

    def __repr__(self) -> str:
        return f"<GlobalRateLimitFilter {self.domain!r} descriptors={len(self.descriptors)} {self.client!r}>"

    def keys(self, stream: Stream, now: float) -> List[Tuple[bytes, GlobalDescriptor]]:
        """
        The Redis key of every descriptor C{stream} has a value for, with that descriptor.
        """
        found = []
        for descriptor in self.descriptors:
            value = descriptor.value(stream)
            if value is None:
                continue
            if isinstance(value, str):
                value = value.encode("utf-8")
            unit = descriptor.unit
            windowStart = int(now // unit) * unit
            key = b"%s_%s_%s_%d" % (self.domain, descriptor.keyName, value, windowStart)
            found.append((key, descriptor))
        return found

    def requestHeaders(self, stream: Stream) -> object:
        """
        Ask Redis to count the request; hold it until Redis answers or C{timeout} passes.
        """
        keys = self.keys(stream, self.clock.seconds())
        if not keys:
            return None
        commands = []
        for key, descriptor in keys:
            commands.append((b"INCRBY", key, b"1"))
            commands.append((b"EXPIRE", key, b"%d" % descriptor.unit))
        answer = self.client.execute(commands)
        if answer.called:
            # Failed at once (no connection to Redis): decide now. The stream must not get a Deferred that
            # has already replied (and so completed the stream) before the stream could pause on it.
            box: List[object] = []
            answer.addCallbacks(box.append, lambda failure: box.append(_Failed(failure)))
            return self._decide(box[0], stream, keys)
        check = _Check()
        check.timer = self.clock.callLater(self.timeout, check.finish, _TIMED_OUT)
        answer.addCallbacks(check.finish, check.failed)
        # Added before the stream adds its own callbacks, so the decision (which may reply) runs first.
        check.waiting.addCallback(self._decide, stream, keys)
        return check.waiting

    def _decide(self, outcome: object, stream: Stream, keys: Sequence[Tuple[bytes, GlobalDescriptor]]) -> object:
        """
        Redis answered (C{outcome} is its list of replies), failed (a L{Failure}) or timed out: let the
        request go on (C{None}) or answer it.
        """
        if isinstance(outcome, list):
            for i, (_, descriptor) in enumerate(keys):
                count = outcome[2 * i]
                if isinstance(count, int) and count > descriptor.requestsPerUnit:
                    self.overLimit.value += 1
                    return stream.respond(429, b"", _RATE_LIMITED_HEADERS, flag="RL",
                                          details="request_rate_limited")
            self.ok.value += 1
            return None
        self.error.value += 1
        if isinstance(outcome, _Failed):
            # Per request, so debug: the client logs connection trouble once per attempt, and the error stat counts.
            self.log.debug("rate limit check failed: {why}", why=outcome.failure.getErrorMessage())
        if self.failureModeDeny:
            return stream.respond(500, _ERROR_BODY, flag="RLSE", details="rate_limiter_error")
        self.failureModeAllowed.value += 1
        return None


def _descriptorKind(options: Options, key: str) -> Optional[Tuple[int, Optional[bytes], bytes, Optional[bytes]]]:
    """
    Parse a C{descriptor.<N>.key} value into C{(kind, header name, Redis key name, generic value)}, or record
    why not (header names are checked as for C{local_ratelimit}).
    """
    spec = options.string(key)
    if spec is None:
        return None
    kind, colon, rest = spec.partition(":")
    kind = kind.strip()
    if kind == "generic" and colon:
        value = rest.strip()
        if not value:
            options.error(key, "names no value: write generic:VALUE")
            return None
        return _GENERIC, None, b"generic_key", value.encode("utf-8")
    if spec not in ("remote_address", "path") and not (kind == "header" and colon):
        options.error(key, f"{spec!r} is not one of {', '.join(_KEY_KINDS)}"
                           f"{suggest(spec, ('remote_address', 'path', 'header:', 'generic:'))}")
        return None
    parsed = _descriptorKey(options, key)
    if parsed is None:
        return None
    found, header = parsed
    if found == _HEADER:
        return _HEADER, header, b"header:" + header, None  # type: ignore[operator]
    return found, None, b"remote_address" if found == _REMOTE_ADDRESS else b"path", None


def _descriptors(options: Options) -> Tuple[GlobalDescriptor, ...]:
    """
    Read every C{descriptor.<N>.*} group, in the order their first key appears; at least one is required.
    """
    labels = _descriptorLabels(options, "descriptor.N.key, descriptor.N.requests_per_unit and descriptor.N.unit")
    if not labels:
        options.error("descriptor.N.key", "at least one descriptor is required (descriptor.N.key, "
                                          "descriptor.N.requests_per_unit, descriptor.N.unit)")
    descriptors: List[GlobalDescriptor] = []
    seen: List[Tuple[int, Optional[bytes], Optional[bytes]]] = []
    for label in labels:
        prefix = f"descriptor.{label}."
        parsed = _descriptorKind(options, prefix + "key")
        limit = options.integer(prefix + "requests_per_unit", minimum=0)
        unit = options.string(prefix + "unit", choices=tuple(UNITS))
        if parsed is None or limit is None or unit is None:
            continue
        kind, header, keyName, generic = parsed
        if (kind, header, generic) in seen:
            options.error(prefix + "key", "is the same as an earlier descriptor's key")
            continue
        seen.append((kind, header, generic))
        descriptors.append(GlobalDescriptor(label, kind, header, keyName, generic, limit, UNITS[unit]))
    return tuple(descriptors)


@implementer(IPlugin, IHTTPFilterFactory)
class GlobalRateLimitFactory:
    """
    The C{ratelimit} plugin (see the module docstring and docs/traffic.md).

    Options: C{redis} (a Twisted client endpoint string; required), C{domain} (required), C{descriptor.<N>.key},
    C{.requests_per_unit}, C{.unit} (at least one descriptor), C{timeout} (default 20ms),
    C{failure_mode_deny} (default false), C{stat_prefix} (default C{ratelimit}).
    """

    name = "ratelimit"

    def configure(self, options: Options, context: IFilterContext) -> Callable[[Stream], GlobalRateLimitFilter]:
        """
        Check the options and make the listener's Redis client (which connects on the first request).

        @return: a maker giving every stream the listener's one L{GlobalRateLimitFilter}.
        """
        reactor = context.reactor
        endpointString = options.string("redis")
        endpoint = None
        if endpointString is not None:
            try:
                endpoint = clientFromString(reactor, endpointString)
            except (ValueError, TypeError, KeyError) as e:
                options.error("redis", f"{endpointString!r} is not a client endpoint (like tcp:127.0.0.1:6379): "
                                       f"{e}")
        domain = options.string("domain")
        if domain is not None and (not domain or any(c.isspace() for c in domain)):
            options.error("domain", f"{domain!r} may not contain spaces")
        descriptors = _descriptors(options)
        timeout = options.positiveDuration("timeout", 0.02)
        deny = options.boolean("failure_mode_deny", False)
        prefix = options.string("stat_prefix", "ratelimit")
        if prefix is not None and not _LABEL.match(prefix):
            options.error("stat_prefix", f"{prefix!r} may hold only letters, digits, _ and -: it becomes part "
                                         "of stat names")
            prefix = "ratelimit"
        scope = context.stats.scope("http", context.listener.name).scope(prefix or "ratelimit")
        stats = tuple(scope.counter(name) for name in ("ok", "over_limit", "error", "failure_mode_allowed"))
        client = RedisClient(endpoint, reactor, connectTimeout=_CONNECT_TIMEOUT)  # type: ignore[arg-type]
        shared = GlobalRateLimitFilter(reactor, client, (domain or "").encode("utf-8"), descriptors,
                                       timeout or 0.02, bool(deny), stats)

        def make(stream: Stream) -> GlobalRateLimitFilter:
            """
            The filter for C{stream}: the listener's shared one, which holds the Redis connection.
            """
            return shared

        # The service calls this when it stops (see IHTTPFilterFactory.configure).
        make.close = client.close  # type: ignore[attr-defined]
        return make
