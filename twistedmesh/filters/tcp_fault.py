"""
The C{tcp_fault} network filter: fault injection for C{protocol = tcp} listeners.

    [filter:tcp-chaos]
    type = tcp_fault
    delay = 2s
    delay.percentage = 10
    reset_after_bytes = 4096
    reset.percentage = 5

C{delay} holds a chosen connection before the rest of the chain sees it: the filter's C{connectionMade}
returns a Deferred that a C{callLater} fires, so C{tcp_proxy} (placed after it) connects upstream only when
the delay ends, and the downstream's bytes wait meanwhile (the chain pauses reading).

C{reset_after_bytes = N} aborts a chosen downstream connection once N bytes have been relayed, counting
both directions: the bytes up to the N-th go on, the rest are dropped, and the connection is aborted (an
RST, not a FIN) on the next turn of the reactor; C{tcp_proxy} then closes the upstream.

Counters C{listener.<name>.tcp_fault.delays_injected} and C{.resets_injected}. Time comes from the
connection's clock and randomness from the injected C{context.random}, so tests are exact.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.internet.defer import Deferred
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from ..config import Options
from ..interfaces import IFilterContext, INetworkConnection, INetworkFilter, INetworkFilterFactory
from ..listener.chain import STOP, NetworkFilter

__all__ = ["TCPFaultFactory", "TCPFaultFilter", "TCPFaultSettings"]


class TCPFaultSettings:
    """
    What every connection's L{TCPFaultFilter} of one configured section shares.

    @ivar delay: seconds to hold a connection, or C{None}.
    @ivar delayPercentage: the share of connections to delay, 0 to 100.
    @ivar resetAfter: bytes after which to abort a connection, or C{None}.
    @ivar resetPercentage: the share of connections to abort, 0 to 100.
    """

    def __init__(self, random, delay: Optional[float], delayPercentage: float, resetAfter: Optional[int],
                 resetPercentage: float, scope) -> None:
        self.random = random
        self.delay = delay
        self.delayPercentage = delayPercentage
        self.resetAfter = resetAfter
        self.resetPercentage = resetPercentage
        self.delaysInjected = scope.counter("delays_injected")
        self.resetsInjected = scope.counter("resets_injected")

    def roll(self, percentage: float) -> bool:
        """
        Whether this connection is in the C{percentage} (0 to 100) that get the fault.
        """
        if percentage >= 100.0:
            return True
        if percentage <= 0.0:
            return False
        return self.random.random() * 100.0 < percentage


class TCPFaultFilter(NetworkFilter):
    """
    Delays and resets one downstream connection.

    @ivar timer: the pending delay's or reset's L{IDelayedCall}, or C{None}.
    @ivar left: bytes still to relay before the reset, or C{None} when this connection is not reset.
    """

    def __init__(self, settings: TCPFaultSettings) -> None:
        self.settings = settings
        self.timer = None
        self.left: Optional[int] = None

    def connectionMade(self, conn: INetworkConnection) -> object:
        """
        Choose this connection's faults; hold the chain for the delay if it gets one.
        """
        s = self.settings
        if s.resetAfter is not None and s.roll(s.resetPercentage):
            self.left = s.resetAfter
            if s.resetAfter == 0:
                self._trip(conn)
                return STOP
        if s.delay is not None and s.roll(s.delayPercentage):
            s.delaysInjected.value += 1
            d: Deferred = Deferred()
            self.timer = conn.clock.callLater(s.delay, self._delayed, d)
            return d
        return None

    def _delayed(self, d: Deferred) -> None:
        self.timer = None
        d.callback(None)

    def _count(self, conn: INetworkConnection, data: bytes) -> object:
        """
        Count C{data} towards the reset: C{None} while under it, the part up to it, or C{b""} past it.
        """
        left = self.left
        if left is None:
            return None
        if left <= 0:
            return b""
        n = len(data)
        if n < left:
            self.left = left - n
            return None
        self.left = 0
        self._trip(conn)
        return data[:left] if n > left else None

    def _trip(self, conn: INetworkConnection) -> None:
        """
        The byte budget is spent: abort the connection on the next reactor turn (after this chunk went on).
        """
        if self.timer is None:
            self.timer = conn.clock.callLater(0, self._reset, conn)

    def _reset(self, conn: INetworkConnection) -> None:
        self.timer = None
        self.settings.resetsInjected.value += 1
        conn.close("tcp_fault_reset")
        conn.transport.abortConnection()

    def dataReceived(self, conn: INetworkConnection, data: bytes) -> object:
        """
        Count downstream bytes; drop those past the reset.
        """
        result = self._count(conn, data)
        return STOP if result == b"" else result

    def dataWritten(self, conn: INetworkConnection, data: bytes) -> object:
        """
        Count upstream bytes; drop those past the reset.
        """
        return self._count(conn, data)

    def connectionLost(self, conn: INetworkConnection, reason: Failure) -> None:
        """
        Cancel a delay or reset still pending.
        """
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()


def _percentage(options: Options, key: str, needs: str) -> float:
    value = options.percentage(key, 100.0)
    if key in options and needs not in options:
        options.error(key, f"has no effect without {needs}")
    return 100.0 if value is None else float(value)


@implementer(IPlugin, INetworkFilterFactory)
class TCPFaultFactory:
    """
    The C{tcp_fault} plugin (see the module docstring and docs/traffic.md).

    Options: C{delay} (a duration above 0), C{delay.percentage} (default 100), C{reset_after_bytes} (a
    whole number from 0 up), C{reset.percentage} (default 100). At least one of C{delay} and
    C{reset_after_bytes} is required.
    """

    name = "tcp_fault"

    def configure(self, options: Options, context: IFilterContext) -> Callable[[INetworkConnection], INetworkFilter]:
        """
        Check the options and make the counters once; return the maker of one filter per connection.
        """
        delay = options.positiveDuration("delay", None)
        delayPercentage = _percentage(options, "delay.percentage", "delay")
        resetAfter = options.integer("reset_after_bytes", None, minimum=0)
        resetPercentage = _percentage(options, "reset.percentage", "reset_after_bytes")
        if "delay" not in options and "reset_after_bytes" not in options:
            options.error(None, "injects no fault: set delay or reset_after_bytes")
        scope = context.stats.scope("listener", context.listener.name).scope("tcp_fault")
        settings = TCPFaultSettings(context.random, delay, delayPercentage, resetAfter, resetPercentage, scope)

        def make(conn: INetworkConnection) -> TCPFaultFilter:
            return TCPFaultFilter(settings)

        return make
