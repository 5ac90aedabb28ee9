"""
Upstream HTTP/1.1: a client connection that carries one exchange at a time, and a keep-alive pool of them
per host.

Like Twisted's C{HTTP11ClientProtocol} and C{HTTPConnectionPool}, the connection tells the pool when it is
reusable, and it is reusable only after a complete, clean exchange: request fully written, response fully
read, both sides willing to keep the connection. Unlike them, there is no C{Agent}, no Deferred per
request and no header objects: the router hands over a ready-made head and gets parser callbacks.

Connection states::

    CONNECTING ─connect─▶ IDLE ─begin()─▶ BUSY ─response and request done, keep-alive─▶ IDLE (pooled)
                                             └─error, early close, no keep-alive──────▶ CLOSED
"""

from __future__ import annotations

from typing import Dict, List, Optional

from twisted.internet import protocol
from twisted.logger import Logger

from ..http import h1


class Exchange:
    """
    What an L{UpstreamConnection} reports to while it carries a request: the router's attempt implements
    these methods.
    """

    def upstreamHead(self, status: int, headers: list, hasBody: bool) -> None:
        """
        The final response head arrived (1xx heads are not reported).
        """

    def upstreamData(self, data: bytes) -> None:
        """
        A chunk of the response body.
        """

    def upstreamEnd(self, trailers: Optional[list]) -> None:
        """
        The response is complete.
        """

    def upstreamFailed(self, reason: str, headersReceived: bool) -> None:
        """
        The connection failed or closed before the response was complete (C{reason} is a short
        description for logs and response-code details).
        """


class UpstreamConnection(protocol.Protocol):
    """
    One connection to an upstream host, speaking HTTP/1.1, carrying one exchange at a time.
    """

    log = Logger()

    def __init__(self, pool: "HostPool") -> None:
        self.pool = pool
        self.exchange: Optional[Exchange] = None
        self.parser: Optional[h1.ResponseParser] = None
        self.requestDone = False
        self.responseDone = False
        self.keepAlive = True
        self.closed = False
        self.headersReceived = False
        self.idleTimer = None

    def connectionMade(self) -> None:
        transport = self.transport
        if hasattr(transport, "setTcpNoDelay"):
            transport.setTcpNoDelay(True)
        self.parser = h1.ResponseParser(self)

    # -- the router's side --------------------------------------------------------------------------------

    def begin(self, exchange: Exchange, method: bytes, head: bytes, body: bool) -> None:
        """
        Start an exchange: write C{head} (a complete request head); C{body} says whether body chunks will
        follow through L{writeBody} / L{endBody}.
        """
        self.exchange = exchange
        self.requestDone = not body
        self.responseDone = False
        self.headersReceived = False
        self.keepAlive = True
        self.parser.expectResponse(method)
        self.pool.rq_total(self)
        self.transport.write(head)

    def writeBody(self, data: bytes, chunked: bool) -> None:
        """
        Send a piece of the request body (chunk-encoded when C{chunked}).
        """
        if chunked:
            self.transport.writeSequence(h1.encodeChunk(data))
        else:
            self.transport.write(data)

    def endBody(self, chunked: bool, trailers: Optional[list] = None) -> None:
        """
        The request body is complete.
        """
        if chunked:
            self.transport.write(h1.encodeLastChunk(trailers))
        self.requestDone = True
        self._maybeDone()

    def abandon(self) -> None:
        """
        The router gives up on the exchange (timeout, downstream gone): the connection cannot be reused.
        """
        self.exchange = None
        self.keepAlive = False
        if not self.closed:
            self.transport.abortConnection()

    # -- parser callbacks ---------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.exchange is None:
            # Bytes nobody asked for: the connection's framing can no longer be trusted.
            self.keepAlive = False
            self.transport.abortConnection()
            return
        self.parser.feed(data)

    def responseInformational(self, status: int, headers: list) -> None:
        """
        A 1xx response that is not the final one: not forwarded (the proxy answers 100-continue itself).
        """

    def responseHead(self, status: int, reason: bytes, version, headers: list, keepAlive: bool, hasBody: bool,
                     chunked: bool) -> None:
        self.headersReceived = True
        if not keepAlive:
            self.keepAlive = False
        exchange = self.exchange
        if exchange is not None:
            exchange.upstreamHead(status, headers, hasBody)

    def responseData(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.upstreamData(data)

    def responseEnd(self, trailers) -> None:
        self.responseDone = True
        exchange = self.exchange
        if not self.requestDone:
            # Answered before the request body was all sent (an early error reply, say): the rest of the
            # body would be read as garbage by the next exchange, so this connection ends here.
            self.keepAlive = False
        self._maybeDone()
        if exchange is not None:
            exchange.upstreamEnd(trailers)

    def protocolError(self, reason: str) -> None:
        self.keepAlive = False
        exchange, self.exchange = self.exchange, None
        if not self.closed:
            self.transport.abortConnection()
        if exchange is not None:
            exchange.upstreamFailed("protocol_error: " + reason, self.headersReceived)

    def _maybeDone(self) -> None:
        if self.requestDone and self.responseDone and self.exchange is not None:
            self.exchange = None
            if self.keepAlive:
                self.pool.release(self)
            else:
                self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        self.closed = True
        if self.parser is not None and self.exchange is not None and not self.responseDone:
            # A response read until close ends here; any other framing was cut short.
            self.parser.feedEOF()
        exchange, self.exchange = self.exchange, None
        self.pool.lost(self)
        if exchange is not None and not self.responseDone:
            exchange.upstreamFailed("upstream_reset", self.headersReceived)


class _ConnectionFactory(protocol.Factory):
    noisy = False

    def __init__(self, pool: "HostPool") -> None:
        self.pool = pool

    def buildProtocol(self, addr) -> UpstreamConnection:
        return UpstreamConnection(self.pool)


class PoolWaiter:
    """
    What L{HostPool.acquire} reports to.
    """

    def poolReady(self, conn: UpstreamConnection) -> None:
        """
        C{conn} is connected and idle: call its L{UpstreamConnection.begin} now.
        """

    def poolFailed(self, reason: str, timedOut: bool) -> None:
        """
        No connection could be made.
        """


class HostPool:
    """
    Keep-alive connections to one host: reuses the most recently used idle connection (its TCP window is
    warm), keeps at most C{maxIdle} of them, and closes those idle for C{idleTimeout} (on the injected
    clock).
    """

    log = Logger()

    def __init__(self, host, cluster, clock, connectTimeout: float, maxIdle: int = 64,
                 idleTimeout: float = 60.0) -> None:
        self.host = host
        self.cluster = cluster
        self.clock = clock
        self.connectTimeout = connectTimeout
        self.maxIdle = maxIdle
        self.idleTimeout = idleTimeout
        self.idle: List[UpstreamConnection] = []
        self.factory = _ConnectionFactory(self)
        self.connections = set()

    def acquire(self, waiter: PoolWaiter) -> None:
        """
        Hand C{waiter} a connection: at once (synchronously) when one is idle, otherwise when a new one
        connects, or report the failure.
        """
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                waiter.poolReady(conn)
                return
        self._connect(waiter)

    def _connect(self, waiter: PoolWaiter) -> None:
        host, cluster = self.host, self.cluster
        d = host.client.connect(self.factory)
        timedOut = []

        def timeout() -> None:
            timedOut.append(True)
            d.cancel()

        timer = self.clock.callLater(self.connectTimeout, timeout) if self.connectTimeout else None

        def connected(conn: UpstreamConnection) -> None:
            if timer is not None and timer.active():
                timer.cancel()
            self.connections.add(conn)
            host.cx_total += 1
            host.cx_active += 1
            cluster.upstream_cx_total.value += 1
            cluster.upstream_cx_active.value += 1
            cluster.upstream_cx_http1_total.value += 1
            waiter.poolReady(conn)

        def failed(failure) -> None:
            if timer is not None and timer.active():
                timer.cancel()
            host.cx_connect_fail += 1
            cluster.upstream_cx_connect_fail.value += 1
            if timedOut:
                cluster.upstream_cx_connect_timeout.value += 1
            waiter.poolFailed(failure.getErrorMessage(), bool(timedOut))

        d.addCallbacks(connected, failed)

    def rq_total(self, conn: UpstreamConnection) -> None:
        self.host.rq_total += 1

    def release(self, conn: UpstreamConnection) -> None:
        """
        C{conn} finished an exchange cleanly: keep it for the next one, or close it if the pool is full.
        """
        if conn.closed:
            return
        if len(self.idle) >= self.maxIdle:
            conn.transport.loseConnection()
            return
        self.idle.append(conn)
        timer = conn.idleTimer
        if timer is None:
            conn.idleTimer = self.clock.callLater(self.idleTimeout, self._expire, conn)
        else:
            timer.reset(self.idleTimeout)

    def _expire(self, conn: UpstreamConnection) -> None:
        conn.idleTimer = None
        if conn in self.idle:
            self.idle.remove(conn)
            conn.transport.loseConnection()
        elif not conn.closed and conn.exchange is not None:
            # Busy again since: check again later.
            conn.idleTimer = self.clock.callLater(self.idleTimeout, self._expire, conn)

    def lost(self, conn: UpstreamConnection) -> None:
        """
        C{conn} closed, for whatever reason.
        """
        if conn in self.connections:
            self.connections.discard(conn)
            self.host.cx_active -= 1
            self.cluster.upstream_cx_active.value -= 1
        if conn in self.idle:
            self.idle.remove(conn)
        if conn.idleTimer is not None and conn.idleTimer.active():
            conn.idleTimer.cancel()
        conn.idleTimer = None

    def closeAll(self) -> None:
        """
        Close every connection (service shutdown).
        """
        for conn in list(self.connections):
            conn.transport.abortConnection()


class ClusterPools:
    """
    The HTTP/1.1 pools of a cluster, one per host, made when first needed.
    """

    def __init__(self, cluster, clock, maxIdle: int = 64, idleTimeout: float = 60.0) -> None:
        self.cluster = cluster
        self.clock = clock
        self.maxIdle = maxIdle
        self.idleTimeout = idleTimeout
        self.pools: Dict[object, HostPool] = {}

    def forHost(self, host) -> HostPool:
        """
        The pool of C{host}.
        """
        pool = self.pools.get(host)
        if pool is None:
            pool = self.pools[host] = HostPool(host, self.cluster, self.clock, self.cluster.connectTimeout,
                                               self.maxIdle, self.idleTimeout)
        return pool

    def closeAll(self) -> None:
        """
        Close every connection of every host.
        """
        for pool in self.pools.values():
            pool.closeAll()
