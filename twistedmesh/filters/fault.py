"""
The C{fault} filter: Envoy's HTTP fault injection. It delays requests and aborts them with a chosen status,
for a configured share of the traffic, to test how callers cope with a slow or failing service.

    [filter:chaos]
    type = fault
    delay.fixed = 2s
    delay.percentage = 10
    abort.http_status = 503
    abort.percentage = 5
    max_active_faults = 100

A delayed request is held (the filter's C{requestHeaders} returns a Deferred that a C{callLater} fires)
and then goes on; the response flag C{DI} is set. An aborted request is answered by the proxy with the
status and the body C{fault filter abort} (flag C{FI}, details C{fault_filter_abort}). As in Envoy, the
delay comes first and the abort is decided when it ends, so one request may get both.

For gRPC requests (C{content-type: application/grpc...}), C{abort.grpc_status = N} (instead of
C{abort.http_status}; the two exclude each other, as in Envoy) answers HTTP 200 with a trailers-only gRPC
reply: C{content-type: application/grpc}, C{grpc-status: N}, C{grpc-message: fault filter abort} and no
body. Requests that are not gRPC are not aborted by it. (An C{abort.http_status} abort of a gRPC request is
trailers-only too, as every local reply to one is, with the gRPC status its HTTP status maps to.)

C{response_rate_limit.kbps = K} (with C{response_rate_limit.percentage}) throttles the response body of
the chosen requests to K KiB/s: each chunk is held (the filter's C{responseData} returns a Deferred) for
the time its bytes take at that rate, counted in C{response_rl_injected}. A chunk is paced whole: the
granularity is the size of the chunks the upstream connection delivers (at most 64 KiB a read), and each
chunk is held at most C{_MAX_CHUNK_HOLD} seconds (a larger chunk is sent at that bound, so a huge chunk
at a tiny rate cannot hold the stream for hours).

With C{headers_control = true} the client chooses: C{x-envoy-fault-delay-request} (milliseconds) and
C{x-envoy-fault-abort-request} (a status) replace the configured delay and status for that request, and
C{x-envoy-fault-delay-request-percentage} / C{x-envoy-fault-abort-request-percentage} its percentage,
capped at the configured one (default 100). C{x-envoy-fault-abort-grpc-request} (a gRPC status) asks
for a gRPC abort, and C{x-envoy-fault-throughput-response} (KiB/s) for a response rate limit, with
C{x-envoy-fault-throughput-response-percentage}. Only enable it where clients are trusted.

Randomness comes from the injected C{context.random} and time from C{context.reactor}, so tests are exact.
Each stream gets its own L{FaultFilter} (it holds the stream's delay timer, which C{streamComplete}
cancels when the stream ends first); what the streams share lives in one L{FaultSettings}.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Optional

from twisted.internet.defer import Deferred
from twisted.plugin import IPlugin
from zope.interface import implementer

from ..config import Options
from ..http.grpc import isGRPC
from ..http.stream import HTTPFilter, Stream
from ..interfaces import IFilterContext, IHTTPFilterFactory

__all__ = ["FaultFactory", "FaultFilter", "FaultSettings"]

DELAY_HEADER = b"x-envoy-fault-delay-request"
DELAY_PERCENTAGE_HEADER = b"x-envoy-fault-delay-request-percentage"
ABORT_HEADER = b"x-envoy-fault-abort-request"
ABORT_PERCENTAGE_HEADER = b"x-envoy-fault-abort-request-percentage"
GRPC_ABORT_HEADER = b"x-envoy-fault-abort-grpc-request"
THROUGHPUT_HEADER = b"x-envoy-fault-throughput-response"
THROUGHPUT_PERCENTAGE_HEADER = b"x-envoy-fault-throughput-response-percentage"
# The longest a rate-limited response chunk is held: bounds the hold of one chunk whatever its size.
_MAX_CHUNK_HOLD = 60.0
_BODY = b"fault filter abort"
_LABEL = re.compile(r"^[A-Za-z0-9_-]+$")
# A header's milliseconds or status: a bounded run of digits (int() of a huge digit string is slow, and
# past 4300 digits raises).
_MAX_DIGITS = 10


class FaultSettings:
    """
    What every stream's L{FaultFilter} of one configured section shares: the checked options, the clock,
    the random source, the stats and the count of active faults.

    @ivar delay: the configured delay in seconds, or C{None}.
    @ivar delayPercentage: the share of requests to delay, 0 to 100.
    @ivar abortStatus: the configured abort status, or C{None}.
    @ivar abortPercentage: the share of requests to abort, 0 to 100.
    @ivar grpcStatus: the configured gRPC abort status (for gRPC requests), or C{None}.
    @ivar rateKbps: the configured response rate limit in KiB/s, or C{None}.
    @ivar ratePercentage: the share of responses to rate-limit, 0 to 100.
    @ivar headersControl: whether the C{x-envoy-fault-*} request headers are obeyed.
    @ivar maxActive: at most this many streams with a fault at once, or C{None} for no limit.
    @ivar active: streams of this section with a fault now (the C{active_faults} gauge counts those of
        every fault filter of the listener).
    """

    def __init__(self, clock, random, delay: Optional[float], delayPercentage: float,
                 abortStatus: Optional[int], abortPercentage: float, headersControl: bool,
                 maxActive: Optional[int], scope, grpcStatus: Optional[int] = None,
                 rateKbps: Optional[int] = None, ratePercentage: float = 100.0) -> None:
        self.clock = clock
        self.random = random
        self.delay = delay
        self.delayPercentage = delayPercentage
        self.abortStatus = abortStatus
        self.abortPercentage = abortPercentage
        self.grpcStatus = grpcStatus
        self.rateKbps = rateKbps
        self.ratePercentage = ratePercentage
        self.headersControl = headersControl
        self.maxActive = maxActive
        self.active = 0
        self.delaysInjected = scope.counter("delays_injected")
        self.abortsInjected = scope.counter("aborts_injected")
        self.faultsOverflow = scope.counter("faults_overflow")
        self.responseRateLimited = scope.counter("response_rl_injected")
        self.activeFaults = scope.gauge("active_faults")

    def roll(self, percentage: float) -> bool:
        """
        Whether this request is in the C{percentage} (0 to 100) of requests that get a fault.
        """
        # 0 and 100 need no draw: they are exact, and the hot path of a 0% filter stays cheap.
        if percentage >= 100.0:
            return True
        if percentage <= 0.0:
            return False
        return self.random.random() * 100.0 < percentage


def _headerNumber(value: Optional[bytes]) -> Optional[int]:
    """
    A header's value as a whole number, or C{None} when absent or not a plain run of digits.
    """
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit() or len(value) > _MAX_DIGITS:
        return None
    return int(value)


def _headerPercentage(value: Optional[bytes], cap: float) -> float:
    """
    The percentage a C{x-envoy-fault-*-percentage} header asks for, capped at the configured C{cap}; C{cap}
    itself when the header is absent or not a number from 0 up.
    """
    if value is None:
        return cap
    try:
        asked = float(value.strip())
    except ValueError:
        return cap
    if not asked >= 0.0:  # also refuses NaN
        return cap
    return min(asked, cap)


class FaultFilter(HTTPFilter):
    """
    Injects the configured (or requested) delay and abort into one stream.

    @ivar timer: the pending delay's L{IDelayedCall}, or C{None}.
    @ivar active: whether this stream holds one of the section's active faults.
    @ivar rate: this stream's response rate limit in bytes per second, or C{None}.
    """

    __slots__ = ("settings", "timer", "active", "rate")

    def __init__(self, settings: FaultSettings) -> None:
        self.settings = settings
        self.timer = None
        self.active = False
        self.rate: Optional[float] = None

    def __repr__(self) -> str:
        return f"<FaultFilter active={self.active}>"

    def requestHeaders(self, stream: Stream) -> object:
        """
        Delay the request (returning a Deferred the delay's timer fires), abort it, or let it go on.
        """
        s = self.settings
        delay, delayPercentage = s.delay, s.delayPercentage
        abort, abortPercentage = s.abortStatus, s.abortPercentage
        grpc = s.grpcStatus
        kbps, ratePercentage = s.rateKbps, s.ratePercentage
        if s.headersControl:
            ms = _headerNumber(stream.getRequestHeader(DELAY_HEADER))
            if ms is not None:
                # 0 ms asks for no delay at all.
                delay = ms / 1000.0 if ms else None
                delayPercentage = _headerPercentage(stream.getRequestHeader(DELAY_PERCENTAGE_HEADER),
                                                    s.delayPercentage)
            status = _headerNumber(stream.getRequestHeader(ABORT_HEADER))
            if status is not None and 200 <= status <= 599:
                abort = status
                abortPercentage = _headerPercentage(stream.getRequestHeader(ABORT_PERCENTAGE_HEADER),
                                                    s.abortPercentage)
            grpcHeader = _headerNumber(stream.getRequestHeader(GRPC_ABORT_HEADER))
            if grpcHeader is not None:
                grpc = grpcHeader
                abortPercentage = _headerPercentage(stream.getRequestHeader(ABORT_PERCENTAGE_HEADER),
                                                    s.abortPercentage)
            asked = _headerNumber(stream.getRequestHeader(THROUGHPUT_HEADER))
            if asked:  # 0 or absent: no header-driven limit
                kbps = asked
                ratePercentage = _headerPercentage(stream.getRequestHeader(THROUGHPUT_PERCENTAGE_HEADER),
                                                   s.ratePercentage)
        if grpc is not None and _isGRPC(stream):
            # A gRPC request is answered with its gRPC status; an HTTP status would break its client.
            abort = ("grpc", grpc)
        if kbps is not None and s.roll(ratePercentage) and self._activate():
            s.responseRateLimited.value += 1
            self.rate = kbps * 1024.0
        if delay is not None and s.roll(delayPercentage):
            if not self._activate():
                return None
            s.delaysInjected.value += 1
            stream.responseFlags.append("DI")
            d: Deferred = Deferred()
            self.timer = s.clock.callLater(delay, d.callback, None)
            # Added before the stream adds its own callbacks, so the abort decision runs first when the
            # delay ends; if it raises, the stream answers 500 like for any failing filter Deferred.
            d.addCallback(self._delayed, stream, abort, abortPercentage)
            return d
        return self._maybeAbort(stream, abort, abortPercentage)

    def _delayed(self, _: None, stream: Stream, abort: Optional[int], abortPercentage: float) -> object:
        """
        The delay is over: abort now if this request is one to abort, else go on.
        """
        self.timer = None
        return self._maybeAbort(stream, abort, abortPercentage)

    def _maybeAbort(self, stream: Stream, abort: object, abortPercentage: float) -> object:
        """
        Answer with C{abort} (an HTTP status, or C{("grpc", status)}) for C{abortPercentage} of requests;
        C{None} for the others.
        """
        s = self.settings
        if abort is None or not s.roll(abortPercentage):
            return None
        if not self._activate():
            return None
        s.abortsInjected.value += 1
        if abort.__class__ is tuple:
            # The stream makes a reply to a gRPC request trailers-only; this one carries our status.
            return stream.respond(200, _BODY, flag="FI", details="fault_filter_abort", grpcStatus=abort[1])
        return stream.respond(abort, _BODY, flag="FI", details="fault_filter_abort")

    def responseData(self, stream: Stream, data: bytes, end: bool) -> object:
        """
        Under a response rate limit, hold C{data} for the time its bytes take at the rate.
        """
        rate = self.rate
        if rate is None or not data:
            return None
        d: Deferred = Deferred()
        self.timer = self.settings.clock.callLater(min(len(data) / rate, _MAX_CHUNK_HOLD), self._released, d)
        return d

    def _released(self, d: Deferred) -> None:
        """
        A rate-limited chunk's time is up: let it go on.
        """
        self.timer = None
        d.callback(None)

    def _activate(self) -> bool:
        """
        Count this stream as having a fault (once, whatever it gets), unless C{max_active_faults} streams
        already have one: then count an overflow and return C{False}.
        """
        if self.active:
            return True
        s = self.settings
        if s.maxActive is not None and s.active >= s.maxActive:
            s.faultsOverflow.value += 1
            return False
        self.active = True
        s.active += 1
        s.activeFaults.value += 1
        return True

    def streamComplete(self, stream: Stream) -> None:
        """
        Cancel a delay (or a rate-limited chunk's hold) still pending (the client went away, say) and release the stream's active fault.
        """
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            # The Deferred the stream waits on is never fired: the stream is over and ignores it anyway.
            timer.cancel()
        if self.active:
            self.active = False
            s = self.settings
            s.active -= 1
            s.activeFaults.value -= 1


def _isGRPC(stream: Stream) -> bool:
    """
    Whether C{stream}'s request is gRPC (see L{twistedmesh.http.grpc.isGRPC}).
    """
    return isGRPC(stream.getRequestHeader(b"content-type"))


def _percentage(options: Options, key: str) -> float:
    """
    Option C{key} as a percentage from 0 to 100 (a trailing C{%} allowed); 100 when not written.
    """
    raw = options.string(key, None)
    if raw is None:
        return 100.0
    text = raw[:-1].strip() if raw.endswith("%") else raw
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 100.0:  # also refuses NaN
        options.error(key, f"{raw!r} is not a percentage from 0 to 100")
        return 100.0
    return value


@implementer(IPlugin, IHTTPFilterFactory)
class FaultFactory:
    """
    The C{fault} plugin (see the module docstring and docs/traffic.md).

    Options: C{delay.fixed} (a duration), C{delay.percentage} (0 to 100, default 100), C{abort.http_status}
    (200 to 599) or C{abort.grpc_status} (0 up), C{abort.percentage} (default 100),
    C{response_rate_limit.kbps} (KiB/s, 1 up), C{response_rate_limit.percentage} (default 100),
    C{headers_control} (default false), C{max_active_faults} (default: no limit), C{stat_prefix} (default
    C{fault}). At least one of C{delay.fixed}, C{abort.http_status}, C{abort.grpc_status},
    C{response_rate_limit.kbps} and C{headers_control} is required.
    """

    name = "fault"

    def configure(self, options: Options, context: IFilterContext) -> Callable[[Stream], FaultFilter]:
        """
        Check the options and make the counters once.

        @return: a maker giving each stream a new L{FaultFilter} (it holds the stream's delay timer).
        """
        delay = options.duration("delay.fixed", None)
        delayPercentage = _percentage(options, "delay.percentage")
        status = options.integer("abort.http_status", None, minimum=200)
        grpcStatus = options.integer("abort.grpc_status", None, minimum=0)
        abortPercentage = _percentage(options, "abort.percentage")
        kbps = options.integer("response_rate_limit.kbps", None, minimum=1)
        ratePercentage = _percentage(options, "response_rate_limit.percentage")
        headersControl = bool(options.boolean("headers_control", False))
        maxActive = options.integer("max_active_faults", None, minimum=0)
        prefix = options.string("stat_prefix", "fault")
        if delay is not None and delay <= 0:
            options.error("delay.fixed", "must be more than 0")
            delay = None
        if status is not None and status > 599:
            options.error("abort.http_status", f"{status} is not a status from 200 to 599")
            status = None
        if "abort.http_status" in options and "abort.grpc_status" in options:
            options.error("abort.grpc_status", "set abort.http_status or abort.grpc_status, not both")
        if not headersControl:
            for key, needs in (("delay.percentage", "delay.fixed"),
                               ("response_rate_limit.percentage", "response_rate_limit.kbps")):
                if key in options and needs not in options:
                    options.error(key, f"has no effect without {needs} (or headers_control = true)")
            if ("abort.percentage" in options and "abort.http_status" not in options
                    and "abort.grpc_status" not in options):
                options.error("abort.percentage", "has no effect without abort.http_status or abort.grpc_status "
                                                  "(or headers_control = true)")
        if not (headersControl or any(k in options for k in ("delay.fixed", "abort.http_status",
                                                               "abort.grpc_status", "response_rate_limit.kbps"))):
            options.error(None, "injects no fault: set delay.fixed, abort.http_status, abort.grpc_status, "
                                "response_rate_limit.kbps or headers_control = true")
        if prefix is not None and not _LABEL.match(prefix):
            options.error("stat_prefix", f"{prefix!r} may hold only letters, digits, _ and -: it becomes part "
                                         "of stat names")
            prefix = "fault"
        scope = context.stats.scope("http", context.listener.name).scope(prefix or "fault")
        settings = FaultSettings(context.reactor, context.random, delay, delayPercentage, status,
                                 abortPercentage, headersControl, maxActive, scope, grpcStatus, kbps,
                                 ratePercentage)

        def make(stream: Stream) -> FaultFilter:
            """
            A new filter for C{stream}.
            """
            return FaultFilter(settings)

        return make
