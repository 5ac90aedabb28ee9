"""
The connection accounting every host pool keeps, whatever protocol it speaks (L{twistedmesh.upstream.http1}'s
C{HostPool}, L{twistedmesh.upstream.http2}'s C{H2HostPool}): the host's connection counts, the cluster's
C{upstream_cx_*} counters, gauges and connection-length histogram, and the slots of its C{max_connections}
circuit breaker. Kept in one place so that both pools count a connection exactly alike, and in step: every
connection counted in is counted out once.
"""

from __future__ import annotations

from typing import Set

from twisted.python.failure import Failure


class PoolAccounting:
    """
    Mixin for a host's connection pool. The pool has C{host}, C{cluster}, C{clock} (L{IReactorTime}) and
    C{connections} (the set of its connected connections); each connection gets a C{connectedAt} time.

    @cvar protocolCounter: the name of the cluster's counter of connections made in the pool's protocol
        (C{upstream_cx_http1_total}, C{upstream_cx_http2_total}).
    """

    protocolCounter: str
    connections: Set[object]

    def connectionMade(self, conn) -> None:
        """
        C{conn} connected: count it (in the host, the cluster and the breaker's connections) until
        L{_countLost} counts it out.
        """
        self.connections.add(conn)
        conn.connectedAt = self.clock.seconds()
        host, cluster = self.host, self.cluster
        breaker = getattr(cluster, "breaker", None)
        if breaker is not None:
            breaker.connections.add(1)
        host.cx_total += 1
        host.cx_active += 1
        cluster.upstream_cx_total.value += 1
        cluster.upstream_cx_active.value += 1
        getattr(cluster, self.protocolCounter).value += 1

    def _countLost(self, conn) -> bool:
        """
        C{conn} closed: count it out (recording how long it lived), if L{connectionMade} counted it in.

        @return: whether it had been counted, and so freed a slot of the breaker's C{max_connections}.
        """
        if conn not in self.connections:
            return False
        cluster = self.cluster
        length = getattr(cluster, "upstream_cx_length_ms", None)
        if length is not None:
            length.record((self.clock.seconds() - conn.connectedAt) * 1000.0)
        self.connections.discard(conn)
        self.host.cx_active -= 1
        cluster.upstream_cx_active.value -= 1
        breaker = getattr(cluster, "breaker", None)
        if breaker is not None:
            breaker.connections.add(-1)
        return True

    def _countConnectFailure(self, failure: Failure, timedOut: bool) -> str:
        """
        A connection attempt failed (C{timedOut}: the cluster's connect timeout cancelled it): count it.

        @return: the reason its waiters are given (C{poolFailed}).
        """
        self.host.cx_connect_fail += 1
        cluster = self.cluster
        cluster.upstream_cx_connect_fail.value += 1
        if timedOut:
            cluster.upstream_cx_connect_timeout.value += 1
            return "connect timeout"
        return failure.getErrorMessage()
