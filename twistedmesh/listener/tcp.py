"""
The factory of a C{protocol = tcp} listener: one L{NetworkConnection} per accepted connection, the
listener's stats, and the bookkeeping that draining and shutdown need.
"""

from __future__ import annotations

from typing import Callable, List, Sequence, Set

from twisted.internet import protocol
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.logger import Logger

from ..config import ListenerConfig
from ..interfaces import INetworkConnection, INetworkFilter
from ..observability.stats import StatsStore
from ..observability.accesslog import TCPAccessRecord
from .chain import NetworkConnection


class ListenerFactory(protocol.Factory):
    """
    What every listener's factory does whatever its protocol: count connections with Envoy's listener
    stats, set C{TCP_NODELAY}, and keep the live connections for draining and shutdown. Its protocols call
    L{connectionOpened} and L{connectionClosed}.

    @ivar connections: the live connections.
    @ivar downstream_cx_total: the counter C{listener.<name>.downstream_cx_total}.
    @ivar downstream_cx_active: the gauge C{listener.<name>.downstream_cx_active}.
    """

    log = Logger()
    # One "Starting factory" line per listener is noise next to our own logs.
    noisy = False

    def __init__(self, name: str, stats: StatsStore, clock: IReactorTime) -> None:
        scope = stats.scope("listener", name)
        self.clock = clock
        self.downstream_cx_length_ms = scope.histogram("downstream_cx_length_ms")
        self.downstream_cx_total = scope.counter("downstream_cx_total")
        self.downstream_cx_active = scope.gauge("downstream_cx_active")
        self.connections: Set[protocol.Protocol] = set()
        self._drainWaiters: List[Deferred] = []

    def connectionOpened(self, conn: protocol.Protocol) -> None:
        """
        C{conn} was accepted (called by the connection): count it and set C{TCP_NODELAY}.
        """
        # Proxied bytes must not wait for Nagle's algorithm; TLS transports pass this on to the socket.
        setNoDelay = getattr(conn.transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            setNoDelay(True)
        self.connections.add(conn)
        conn.openedAt = self.clock.seconds()
        self.downstream_cx_total.value += 1
        self.downstream_cx_active.value += 1

    def connectionClosed(self, conn: protocol.Protocol) -> None:
        """
        C{conn} is gone (called by the connection): forget it, and fire L{whenDrained} if it was the last.
        """
        if conn not in self.connections:
            return
        self.downstream_cx_length_ms.record((self.clock.seconds() - conn.openedAt) * 1000.0)
        self.connections.discard(conn)
        self.downstream_cx_active.value -= 1
        if not self.connections and self._drainWaiters:
            waiters, self._drainWaiters = self._drainWaiters, []
            for d in waiters:
                d.callback(None)

    def whenDrained(self) -> Deferred:
        """
        A L{Deferred} that fires with C{None} when no connection is left (at once if none is). Cancelling it
        only stops the wait.
        """
        if not self.connections:
            return succeed(None)
        d = Deferred(self._drainWaiters.remove)
        self._drainWaiters.append(d)
        return d

    def handOver(self, conn: protocol.Protocol, successor: "ListenerFactory") -> None:
        """
        Make C{conn} a connection of C{successor}, the factory a reload put in this one's place on the same
        listener (see L{twistedmesh.listener.http.HTTPListenerFactory.adoptIdle}): it stays counted once (the
        stats are the listener's, shared by both), and this factory's L{whenDrained} no longer waits for it.
        """
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        successor.connections.add(conn)
        conn.factory = successor
        if not self.connections and self._drainWaiters:
            waiters, self._drainWaiters = self._drainWaiters, []
            for d in waiters:
                d.callback(None)

    def drain(self) -> None:
        """
        Ask every live connection that knows how (HTTP ones) to finish what it has and close; TCP
        connections are left to end by themselves.
        """
        for conn in list(self.connections):
            drain = getattr(conn, "drain", None)
            if drain is not None:
                drain()

    def abortAll(self) -> None:
        """
        Abort every live connection, dropping whatever is buffered (the end of a drain that took too long).
        """
        for conn in list(self.connections):
            conn.transport.abortConnection()


class TCPListenerFactory(ListenerFactory):
    """
    Builds the L{NetworkConnection}s of one C{protocol = tcp} listener.

    @ivar config: the listener's config.
    """

    def __init__(
        self,
        config: ListenerConfig,
        makers: Sequence[Callable[[INetworkConnection], INetworkFilter]],
        stats: StatsStore,
        clock: IReactorTime,
        accessLog=None,
    ) -> None:
        """
        @param config: the listener's config.
        @param makers: the network filter makers, first to last (L{twistedmesh.plugins.buildChain}).
        @param stats: where the listener's stats live.
        @param clock: the clock handed to every connection (and so to its filters).
        @param accessLog: an L{twistedmesh.observability.accesslog.AccessLogger} writing one line per
            connection, or C{None}.
        """
        super().__init__(config.name, stats, clock)
        self.config = config
        self.makers = list(makers)
        self.accessLog = accessLog

    def buildProtocol(self, addr: IAddress) -> NetworkConnection:
        """
        A new L{NetworkConnection} running this listener's filter chain.
        """
        conn = NetworkConnection(self.config.name, self.makers, self.clock)
        conn.factory = self
        if self.accessLog is not None:
            conn.record = TCPAccessRecord(self.config.name, addr, self.clock.seconds())
        return conn

    def connectionClosed(self, conn: NetworkConnection) -> None:
        """
        As for every listener; and the connection's access-log line.
        """
        super().connectionClosed(conn)
        record = conn.record
        if record is not None:
            record.terminationDetails = conn.closeReason or ""
            self.accessLog.logTCP(record, self.clock.seconds())
