"""
The network filter chain of a C{protocol = tcp} listener.

L{NetworkConnection} is the downstream L{Protocol}. When a connection is accepted it asks each filter maker
for a filter and gives it a L{ConnectionHandle}: the connection as that filter sees it (L{INetworkConnection}),
which knows the filter's place in the chain, so that C{handle.write(data)} runs the C{dataWritten} hooks of
the filters before it (last to first) wherever and whenever it is called.

The hooks are looked up once per connection and kept as lists of callables already bound to their handles;
a filter derived from L{NetworkFilter} that does not override a hook is left out of that hook's list. When
every hook returns C{None}, a chunk of downstream data costs one loop over one list.

Reading is paused for two independent reasons, tracked apart so that neither undoes the other: a filter's
L{Deferred} holding the chain, and flow control (L{NetworkConnection} is an L{IPushProducer}: the terminal
filter registers it with the upstream transport, so a full upstream buffer pauses the downstream read).
"""

from __future__ import annotations

from collections import deque
from functools import partial
from typing import Callable, Deque, List, Optional, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..interfaces import INetworkConnection, INetworkFilter

__all__ = ["STOP", "NetworkFilter", "ConnectionHandle", "NetworkConnection"]


class _Stop:
    """
    The type of L{STOP}: a constant, so it holds no state.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "STOP"


STOP = _Stop()
"""
Returned by a filter hook (usually as C{return conn.close(reason)}) to end the chain for this event.
"""


class _NoData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<no data>"


# Marks an event without data (connectionMade) while it runs through the chain.
_NO_DATA = _NoData()


@implementer(INetworkFilter)
class NetworkFilter:
    """
    A base for network filters: every hook passes through. A subclass overrides only the hooks it needs;
    the chain does not call the others at all.

    Besides the hooks of L{INetworkFilter}, a filter may define C{readConnectionLost(conn)}: the downstream
    peer half-closed its side (sent a FIN), after every byte it sent went through the chain. A relaying
    filter (C{tcp_proxy}) passes the FIN on. When no filter of a chain defines it, a half-close closes the
    connection, as Twisted does for a protocol that is not L{IHalfCloseableProtocol}.
    """

    def connectionMade(self, conn: INetworkConnection) -> object:
        """
        A downstream connection was accepted: continue.
        """
        return None

    def dataReceived(self, conn: INetworkConnection, data: bytes) -> object:
        """
        Pass C{data} on unchanged.
        """
        return None

    def dataWritten(self, conn: INetworkConnection, data: bytes) -> object:
        """
        Pass C{data} on unchanged.
        """
        return None

    def readConnectionLost(self, conn: INetworkConnection) -> None:
        """
        The downstream peer will send no more bytes: nothing to do.
        """

    def connectionLost(self, conn: INetworkConnection, reason: Failure) -> None:
        """
        The connection is gone: nothing to clean up.
        """


def _hook(flt: object, name: str) -> Optional[Callable]:
    """
    C{flt}'s bound C{name} hook, or C{None} when it is missing or is L{NetworkFilter}'s pass-through.
    """
    method = getattr(flt, name, None)
    if method is None:
        return None
    if getattr(type(flt), name, None) is getattr(NetworkFilter, name) and name not in getattr(flt, "__dict__", ()):
        return None
    return method


@implementer(INetworkConnection, IPushProducer)
class ConnectionHandle:
    """
    One filter's view of a L{NetworkConnection} (see L{INetworkConnection}). Writes start at the filter's
    own place: they run the C{dataWritten} hooks of the filters before it, last to first.

    It is also the connection's L{IPushProducer} (pausing the downstream read for flow control), so that a
    relaying filter can register it with the transport it writes downstream bytes to.

    @ivar connection: the L{NetworkConnection}.
    """

    __slots__ = ("connection", "listener", "transport", "clock", "state", "_written")

    def __init__(self, connection: "NetworkConnection", written: Sequence[Callable[[bytes], object]]) -> None:
        self.connection = connection
        self.listener = connection.listener
        self.transport = connection.transport
        self.clock = connection.clock
        self.state = connection.state
        # The dataWritten hooks between this position and the socket, last filter first, bound to their
        # own handles.
        self._written = written

    def write(self, data: bytes) -> None:
        """
        Send C{data} downstream through the C{dataWritten} hooks of the filters before this one.
        """
        for hook in self._written:
            result = hook(data)
            if result is not None:
                if result.__class__ is bytes:
                    data = result
                elif result is STOP:
                    return
                else:
                    # A Deferred cannot hold a write: the upstream is paused by backpressure instead.
                    self.connection._misbehaved(hook, result)
                    return
        record = self.connection.record
        if record is not None:
            record.bytesSent += len(data)
        self.transport.write(data)

    def close(self, reason: str = "") -> object:
        """
        Close the downstream connection (see L{INetworkConnection.close}).

        @return: L{STOP}.
        """
        return self.connection.close(reason)

    def pauseProducing(self) -> None:
        """
        Stop reading from the downstream peer (flow control).
        """
        self.connection.pauseProducing()

    def resumeProducing(self) -> None:
        """
        Read from the downstream peer again, unless a filter holds the chain.
        """
        self.connection.resumeProducing()

    def stopProducing(self) -> None:
        """
        The consumer of the downstream bytes is gone: stop reading.
        """
        self.connection.stopProducing()


@implementer(INetworkConnection, IHalfCloseableProtocol, IPushProducer)
class NetworkConnection(Protocol):
    """
    The downstream protocol of a C{protocol = tcp} listener: runs the network filter chain.

    Hook results (see L{INetworkFilter}): C{None} continues with the same data, C{bytes} continues with the
    replacement, L{STOP} ends the chain for this event, and a L{Deferred} holds the chain and pauses the
    downstream read until it fires with one of the others; data that arrives meanwhile waits in order, and a
    half-close waits behind it. A Deferred that fails closes the connection. C{connectionLost} reaches every
    filter exactly once, whatever happened before.

    If the protocol's C{factory} is set (by L{twistedmesh.listener.tcp.TCPListenerFactory}), it is told
    C{connectionOpened(self)} and C{connectionClosed(self)}.

    As an L{INetworkConnection}, the connection writes from the end of the chain (through every filter's
    C{dataWritten}); the filters themselves get L{ConnectionHandle}s.

    @ivar filters: the connection's filters, first to last.
    @ivar closeReason: the C{reason} given to the first L{close}, or C{None}.
    """

    log = Logger()
    factory = None

    def __init__(
        self,
        listener: str,
        makers: Sequence[Callable[[INetworkConnection], INetworkFilter]],
        clock: IReactorTime,
    ) -> None:
        """
        @param listener: the listener's name.
        @param makers: the filter makers, first to last (see L{twistedmesh.plugins.buildChain}).
        @param clock: the clock filters use for their timers.
        """
        self.listener = listener
        self.clock = clock
        self.state: dict = {}
        self.filters: List[INetworkFilter] = []
        self.closeReason: Optional[str] = None
        # The access-log record of this connection when the listener logs (filled as it goes), else None.
        self.record = None
        self._makers = makers
        self._tail: Optional[ConnectionHandle] = None
        self._made: List[Callable] = []
        self._received: List[Callable] = []
        self._readLost: List[Callable] = []
        self._lost: List[Callable] = []
        self._backlog: Deque[bytes] = deque()
        self._waitingOn: Optional[Deferred] = None
        self._eofPending = False
        self._flowPaused = False
        self._readingPaused = False
        self._closing = False
        self._gone = False

    # -- building the chain

    def _build(self) -> None:
        written: List[Callable] = []
        for maker in self._makers:
            handle = ConnectionHandle(self, written[::-1])
            flt = maker(handle)
            self.filters.append(flt)
            for name, hooks in (
                ("connectionMade", self._made),
                ("dataReceived", self._received),
                ("dataWritten", written),
                ("readConnectionLost", self._readLost),
                ("connectionLost", self._lost),
            ):
                method = _hook(flt, name)
                if method is not None:
                    hooks.append(partial(method, handle))
        self._tail = ConnectionHandle(self, written[::-1])

    # -- IProtocol

    def connectionMade(self) -> None:
        """
        Build the filters and run their C{connectionMade} hooks, first to last.
        """
        factory = self.factory
        if factory is not None:
            factory.connectionOpened(self)
        try:
            self._build()
        except Exception:
            # A maker that raises is a bug in a plugin: drop this connection, keep the listener.
            self.log.failure("building the filter chain of listener {listener} failed", listener=self.listener)
            self.close("filter_error")
            return
        if self._run(self._made, 0, _NO_DATA):
            self._chainFree()

    def dataReceived(self, data: bytes) -> None:
        """
        Run C{data} through the filters' C{dataReceived} hooks, first to last.
        """
        record = self.record
        if record is not None:
            record.bytesReceived += len(data)
        if self._waitingOn is not None or self._closing:
            if not self._closing:
                self._backlog.append(data)
            return
        hooks = self._received
        for hook in hooks:
            result = hook(data)
            if result is not None:
                if result.__class__ is bytes:
                    data = result
                else:
                    self._settle(result, hook, hooks, hooks.index(hook) + 1, data)
                    return

    def readConnectionLost(self) -> None:
        """
        The downstream peer half-closed: tell the filters once the data before it went through.
        """
        if self._closing:
            return
        if self._waitingOn is not None:
            self._eofPending = True
            return
        self._deliverEOF()

    def writeConnectionLost(self) -> None:
        """
        Our half-close towards the downstream peer is done; nothing to do until the peer closes too.
        """

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Tell every filter, once, and the factory.
        """
        if self._gone:
            return
        self._gone = self._closing = True
        self._backlog.clear()
        waiting = self._waitingOn
        if waiting is not None:
            # Whatever the filter was waiting for no longer matters; _waited ignores the outcome.
            self._waitingOn = None
            waiting.cancel()
        for hook in self._lost:
            try:
                hook(reason)
            except Exception:
                # One filter's bug must not keep the next from cleaning up.
                self.log.failure("connectionLost hook {hook} failed", hook=hook)
        factory = self.factory
        if factory is not None:
            factory.connectionClosed(self)

    # -- INetworkConnection

    def write(self, data: bytes) -> None:
        """
        Send C{data} downstream through every filter's C{dataWritten} hook, last to first.
        """
        if self._tail is None:
            if self.record is not None:
                self.record.bytesSent += len(data)
            self.transport.write(data)
        else:
            self._tail.write(data)

    def close(self, reason: str = "") -> object:
        """
        Close the downstream connection after what was written is sent; data received afterwards is dropped.

        @return: L{STOP}.
        """
        if not self._closing:
            self._closing = True
            self.closeReason = reason
            self._backlog.clear()
            self.log.debug("closing a connection of listener {listener}: {reason}", listener=self.listener, reason=reason)
            self.transport.loseConnection()
        return STOP

    # -- IPushProducer (flow control, for the consumer of the downstream bytes)

    def pauseProducing(self) -> None:
        """
        Stop reading from the downstream peer.
        """
        self._flowPaused = True
        self._updateReading()

    def resumeProducing(self) -> None:
        """
        Read again, unless a filter holds the chain.
        """
        self._flowPaused = False
        self._updateReading()

    def stopProducing(self) -> None:
        """
        The consumer is gone for good: stop reading (whoever owns the consumer closes the connection).
        """
        self.pauseProducing()

    # -- running the chain (the paths off the hot one)

    def _run(self, hooks: List[Callable], i: int, data: object) -> bool:
        """
        Run C{hooks[i:]} with C{data}. Return C{False} when a Deferred holds the chain, else C{True}.
        """
        n = len(hooks)
        while i < n:
            hook = hooks[i]
            i += 1
            result = hook() if data is _NO_DATA else hook(data)
            if result is None:
                continue
            if result.__class__ is bytes:
                if data is not _NO_DATA:
                    data = result
                continue
            return self._settle(result, hook, hooks, i, data)
        return True

    def _settle(self, result: object, hook: Callable, hooks: List[Callable], i: int, data: object) -> bool:
        """
        Act on a hook's result that is neither C{None} nor bytes; C{hooks[i:]} are still to run.
        """
        if result is STOP:
            return True
        if isinstance(result, Deferred):
            self._waitingOn = result
            self._updateReading()
            result.addCallbacks(self._waited, self._waitFailed, callbackArgs=(result, hooks, i, data), errbackArgs=(result,))
            return False
        self._misbehaved(hook, result)
        return True

    def _waited(self, result: object, d: Deferred, hooks: List[Callable], i: int, data: object) -> None:
        if self._waitingOn is not d:
            return None
        self._waitingOn = None
        if self._closing:
            return None
        if result is None or result.__class__ is bytes:
            if result is not None and data is not _NO_DATA:
                data = result
            if not self._run(hooks, i, data):
                return None
        elif result is not STOP:
            self._misbehaved(d, result)
            return None
        self._chainFree()
        return None

    def _waitFailed(self, failure: Failure, d: Deferred) -> None:
        if self._waitingOn is not d:
            return None
        self._waitingOn = None
        self.log.failure("a network filter of listener {listener} failed", failure, listener=self.listener)
        self.close("filter_error")
        return None

    def _chainFree(self) -> None:
        """
        Nothing holds the chain: feed it what arrived meanwhile, in order, then read again.
        """
        backlog = self._backlog
        while backlog and not self._closing:
            if not self._run(self._received, 0, backlog.popleft()):
                return
        if self._eofPending and not self._closing:
            self._eofPending = False
            self._deliverEOF()
        self._updateReading()

    def _deliverEOF(self) -> None:
        hooks = self._readLost
        if not hooks:
            self.close("downstream_half_closed")
            return
        for hook in hooks:
            hook()

    def _updateReading(self) -> None:
        paused = self._flowPaused or self._waitingOn is not None
        if paused is self._readingPaused or self._closing:
            return
        self._readingPaused = paused
        if paused:
            self.transport.pauseProducing()
        else:
            self.transport.resumeProducing()

    def _misbehaved(self, hook: object, result: object) -> None:
        self.log.error(
            "network filter hook {hook} of listener {listener} returned {result!r}: not None, bytes, a Deferred "
            "or STOP (and a Deferred is not allowed from dataWritten)",
            hook=hook, listener=self.listener, result=result,
        )
        self.close("filter_error")
