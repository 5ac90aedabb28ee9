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

A connection goes back to the pool as soon as its response ends, before the exchange hears
C{upstreamEnd}, so that an exchange started from that callback (the next pipelined request of the same
downstream connection) reuses it at once. But the parser may still hold bytes of that same read after
the end of the response: they arrived before the new request was written, so they must never be taken
as its response. An exchange begun during that read therefore announces its response to the parser only
once the read is fully parsed (L{UpstreamConnection.begin} defers C{expectResponse}); until then any byte
is unsolicited, a protocol error that fails the new exchange and closes the connection.

Once a connection is not reusable (C{keepAlive} false) it never becomes so again; once C{closing} is set,
the pool never hands it out.
"""

from __future__ import annotations

from collections import deque
from typing import Deque, Dict, List, Optional, Set

from twisted.internet import protocol
from twisted.internet.interfaces import IHandshakeListener, ISSLTransport
from twisted.logger import Logger
from zope.interface import implementer

from ..http import h1
from ..http.output import Output
from .accounting import PoolAccounting


class Exchange:
    """
    What an L{UpstreamConnection} reports to while it carries a request: the router's attempt implements
    these methods. Exactly one of L{upstreamEnd} or L{upstreamFailed} ends every exchange, unless the
    exchange was abandoned first (then neither is called).
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
        The response is complete (C{trailers}: the trailer fields of a chunked body, or C{None}).
        """

    def upstreamUpgraded(self, conn: "UpstreamConnection", data: bytes) -> None:
        """
        The response was a 101: C{conn} now belongs to the exchange as a raw tunnel (C{data}: tunnel bytes
        that came with the head). It is never returned to the pool.
        """

    def upstreamFailed(self, reason: str, headersReceived: bool) -> None:
        """
        The connection failed or closed before the response was complete (C{reason} is a short
        description for logs and response-code details: C{"upstream_reset"} when the upstream closed,
        C{"protocol_error: ..."} when it broke HTTP/1.1).
        """


@implementer(IHandshakeListener)
class UpstreamConnection(protocol.Protocol):
    """
    One connection to an upstream host, speaking HTTP/1.1, carrying one exchange at a time.

    @ivar exchange: the exchange in progress, or C{None}.
    @ivar requestDone: the request of the current exchange has been written completely.
    @ivar keepAlive: the connection may carry another exchange; once false, it stays false.
    @ivar closing: the transport was asked to close (or has closed): never hand this connection out.
    @ivar closed: C{connectionLost} has run.
    @ivar endedInRead: a response ended during the current C{dataReceived} (see the module docstring).
    @ivar pendingMethod: the method of an exchange begun while C{endedInRead}, whose response the parser
        is told to expect once the read is parsed.
    @ivar idleTimer: the pool's expiry timer, left running while the connection is busy so that a
        connection reused within C{idleTimeout} costs one C{reset()} per release, not a cancel and a new
        call; when it fires on a busy connection it just goes away.
    """

    log = Logger()

    def __init__(self, pool: "HostPool") -> None:
        self.pool = pool
        self.exchange: Optional[Exchange] = None
        self.parser: Optional[h1.ResponseParser] = None
        self.requestDone = True
        self.keepAlive = True
        self.closing = False
        self.closed = False
        self.headersReceived = False
        self.endedInRead = False
        self.switching = False  # the response being read is a 101
        self.upgraded = False  # ... and it has ended: hand the connection to a tunnel
        self.tunnel = None  # the Tunnel this connection belongs to after a 101
        self.pendingMethod: Optional[bytes] = None
        self.idleTimer = None
        self.output: Optional[Output] = None  # where requests are written (see twistedmesh.http.output)
        # The downstream's output, corked while a read of ours is handled so that a response head, its body
        # and its end leave in one system call; set by the router for each exchange.
        self.peerOutput: Optional[Output] = None

    def connectionMade(self) -> None:
        transport = self.transport
        if hasattr(transport, "setTcpNoDelay"):
            transport.setTcpNoDelay(True)
        self.output = Output(transport)
        self.parser = h1.ResponseParser(self)
        self.pool.connectionMade(self)

    # -- the router's side --------------------------------------------------------------------------------

    def begin(self, exchange: Exchange, method: bytes, head: bytes, body: bool) -> None:
        """
        Start an exchange: write C{head} (a complete request head); C{body} says whether body chunks will
        follow through L{writeBody} / L{endBody}.
        """
        self.exchange = exchange
        self.requestDone = not body
        self.headersReceived = False
        self.switching = False
        if self.endedInRead:
            self.pendingMethod = method  # see the module docstring
        else:
            self.parser.expectResponse(method)
        self.pool.host.rq_total += 1
        if body:
            self.output.write(head)
        else:
            self.output.writeWhole(head)

    def writeBody(self, data: bytes, chunked: bool) -> None:
        """
        Send a piece of the request body (chunk-encoded when C{chunked}).
        """
        if chunked:
            self.output.writeSequence(h1.encodeChunk(data))
        else:
            self.output.write(data)

    def endBody(self, chunked: bool, trailers: Optional[list] = None) -> None:
        """
        The request body is complete (C{trailers} are sent only when C{chunked}).
        """
        if chunked:
            self.output.write(h1.encodeLastChunk(trailers))
        self.requestDone = True

    def abandon(self) -> None:
        """
        The router gives up on the exchange (timeout, retry, downstream gone): the connection is aborted
        and no more exchange callbacks are made.
        """
        self.exchange = None
        self.peerOutput = None
        self._close(True)

    def _close(self, abort: bool) -> None:
        """
        Make this connection unusable and close it (once).
        """
        self.keepAlive = False
        if not self.closing:
            self.closing = True
            output = self.output
            if output is not None:
                # What was written goes before a close; an abort drops it, as the transport drops its buffer.
                if abort:
                    output.discard()
                else:
                    output.flush()
            if abort:
                self.transport.abortConnection()
            else:
                self.transport.loseConnection()

    # -- transport and parser callbacks -------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.toDownstream(data)
            return
        if self.exchange is None:
            # Bytes nobody asked for: the connection's framing can no longer be trusted.
            self._close(True)
            return
        peer = self.peerOutput
        if peer is None:
            self.parser.feed(data)
        else:
            peer.corks += 1
            try:
                self.parser.feed(data)
            finally:
                peer.uncork()
        if self.upgraded:
            # A 101 ended the HTTP exchange: the rest of this read (and everything after) is the tunnel's.
            self.upgraded = False
            self.peerOutput = None
            self.output.flush()  # the tunnel writes to the transport directly
            exchange, self.exchange = self.exchange, None
            if exchange is not None:
                exchange.upstreamUpgraded(self, self.parser.upgradeData or b"")
            return
        if self.endedInRead:
            # Every byte of this read is parsed: a response begun during it may now be expected.
            self.endedInRead = False
            method = self.pendingMethod
            if method is not None:
                self.pendingMethod = None
                if not self.closing:
                    self.parser.expectResponse(method)

    def responseInformational(self, status: int, headers: list) -> None:
        """
        A 1xx response that is not the final one: not forwarded (the proxy answers 100-continue itself).
        """

    def responseHead(self, status: int, reason: bytes, version, headers: list, keepAlive: bool, hasBody: bool,
                     chunked: bool) -> None:
        self.headersReceived = True
        self.switching = status == 101
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
        exchange = self.exchange
        if exchange is None:
            return  # abandoned during this read
        if self.switching:
            # A 101: not the end of anything; dataReceived hands the connection over once feed returns.
            self.upgraded = True
            return
        self.exchange = None
        self.peerOutput = None
        self.endedInRead = True
        if self.requestDone and self.keepAlive:
            self.pool.release(self)
        else:
            # Not reusable. Answered before the request body was all sent (an early error reply, say): the
            # rest of the body would be read as garbage by the next exchange, so this connection ends here.
            self._close(False)
        exchange.upstreamEnd(trailers)

    def protocolError(self, reason: str) -> None:
        exchange, self.exchange = self.exchange, None
        self.peerOutput = None
        if self.closed:
            # Called by feedEOF from connectionLost: a close in the middle of (or before) the response.
            reason = "upstream_reset"
        else:
            reason = "protocol_error: " + reason
            self._close(True)
        if exchange is not None:
            exchange.upstreamFailed(reason, self.headersReceived)

    handshaken = False  # the TLS handshake completed (only meaningful on a TLS transport)

    def handshakeCompleted(self) -> None:
        """
        The TLS handshake with the upstream succeeded (TLS clusters only).
        """
        self.handshaken = True

    def connectionLost(self, reason) -> None:
        self.closed = self.closing = True
        self.keepAlive = False
        self.peerOutput = None
        self.pool.lost(self)
        if self.tunnel is not None:
            self.tunnel.upstreamLost()
            return
        if self.exchange is not None and not self.handshaken and ISSLTransport.providedBy(self.transport):
            # The TLS handshake failed (untrusted certificate, wrong identity...): a connection failure,
            # as Envoy reports it, not a reset of a request the upstream never saw.
            exchange, self.exchange = self.exchange, None
            exchange.upstreamFailed("tls_handshake_failed", False)
            return
        if self.exchange is not None:
            # A response read until close ends here (upstreamEnd); any other framing was cut short
            # (protocolError, reported as upstream_reset).
            self.parser.feedEOF()
            exchange, self.exchange = self.exchange, None
            if exchange is not None:
                # The parser was past reporting anything (a handler raised, or the protocol was switched).
                exchange.upstreamFailed("upstream_reset", self.headersReceived)


class _ConnectionFactory(protocol.Factory):
    noisy = False

    def __init__(self, pool: "HostPool") -> None:
        self.pool = pool

    def buildProtocol(self, addr) -> UpstreamConnection:
        return UpstreamConnection(self.pool)


class PoolWaiter:
    """
    What L{HostPool.acquire} reports to: exactly one of the two methods is called, once.
    """

    def poolReady(self, conn: UpstreamConnection) -> None:
        """
        C{conn} is connected and idle: call its L{UpstreamConnection.begin} now (or give it back with
        L{HostPool.release}).
        """

    def poolFailed(self, reason: str, timedOut: bool) -> None:
        """
        No connection could be made (C{timedOut}: not within the cluster's connect timeout).
        """


class HostPool(PoolAccounting):
    """
    Keep-alive connections to one host: reuses the most recently used idle connection (its TCP window is
    warm), keeps at most C{maxIdle} of them, and closes those idle for C{idleTimeout} (on the injected
    clock).

    @ivar idle: the idle connections, most recently released last.
    @ivar connections: every connected connection (idle or busy).
    @ivar connecting: the Deferreds of connection attempts in progress.
    """

    log = Logger()
    protocolCounter = "upstream_cx_http1_total"

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
        # Waiters queued because the cluster is at its max_connections circuit breaker: served, in order,
        # by the next connection released or closed on this host.
        self.waiting: Deque[PoolWaiter] = deque()
        self.connections: Set[UpstreamConnection] = set()
        self.connecting: Set[object] = set()

    def acquire(self, waiter: PoolWaiter) -> None:
        """
        Hand C{waiter} a connection: at once (synchronously) when one is idle, otherwise when a new one
        connects, or report the failure.
        """
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closing:
                waiter.poolReady(conn)
                return
        breaker = getattr(self.cluster, "breaker", None)
        if breaker is not None and breaker.connections.full():
            breaker.upstream_cx_overflow.value += 1
            self.waiting.append(waiter)
            return
        self._connect(waiter)

    def cancel(self, waiter: PoolWaiter) -> None:
        """
        C{waiter} no longer wants a connection: drop it from the queue at the connection limit (a connect
        already under way for it lands in the idle list when it completes).
        """
        try:
            self.waiting.remove(waiter)
        except ValueError:
            pass

    def _connect(self, waiter: PoolWaiter) -> None:
        host, connecting = self.host, self.connecting
        timedOut = []
        d = host.client.connect(self.factory)
        connecting.add(d)

        def timeout() -> None:
            timedOut.append(True)
            d.cancel()

        timer = self.clock.callLater(self.connectTimeout, timeout) if self.connectTimeout else None

        def connected(conn: UpstreamConnection) -> None:
            connecting.discard(d)
            if timer is not None and timer.active():
                timer.cancel()
            if conn.closing:
                # Closed before the endpoint reported it (connectionMade counted it; lost uncounted it).
                waiter.poolFailed("upstream_reset", False)
                return
            waiter.poolReady(conn)

        def failed(failure) -> None:
            connecting.discard(d)
            if timer is not None and timer.active():
                timer.cancel()
            waiter.poolFailed(self._countConnectFailure(failure, bool(timedOut)), bool(timedOut))

        d.addCallbacks(connected, failed)
        d.addErrback(self._waiterFailed)

    def _waiterFailed(self, failure) -> None:
        self.log.failure("pool waiter of {host} failed", failure, host=self.host)

    def release(self, conn: UpstreamConnection) -> None:
        """
        C{conn} finished an exchange cleanly (or a waiter did not need it): keep it for the next one, or
        close it if the pool is full.
        """
        if conn.closing:
            return
        if self.waiting:
            # Someone is queued behind the connection limit: this connection is theirs.
            self.waiting.popleft().poolReady(conn)
            return
        idle = self.idle
        if len(idle) >= self.maxIdle:
            conn._close(False)
            return
        # A slow downstream may have paused this transport (the router makes it the downstream's producer,
        # and unregistering a producer does not resume it): an idle connection must read, to see the
        # upstream close it. Twisted's HTTP11ClientProtocol does the same before going quiescent.
        conn.transport.resumeProducing()
        idle.append(conn)
        if self.idleTimeout:
            timer = conn.idleTimer
            if timer is None:
                conn.idleTimer = self.clock.callLater(self.idleTimeout, self._expire, conn)
            else:
                timer.reset(self.idleTimeout)

    def _expire(self, conn: UpstreamConnection) -> None:
        # A connection busy again since its release is left alone: its next release arms a new timer.
        conn.idleTimer = None
        if conn in self.idle:
            self.idle.remove(conn)
            conn._close(False)

    def lost(self, conn: UpstreamConnection) -> None:
        """
        C{conn} closed, for whatever reason.
        """
        if self._countLost(conn) and self.waiting:
            breaker = getattr(self.cluster, "breaker", None)
            if breaker is not None and not breaker.connections.full():
                # A slot is free: connect for the first waiter in line.
                self._connect(self.waiting.popleft())
        if conn in self.idle:
            self.idle.remove(conn)
        timer = conn.idleTimer
        if timer is not None:
            conn.idleTimer = None
            if timer.active():
                timer.cancel()

    def drain(self) -> None:
        """
        Retire this pool (its host was removed, or its cluster replaced): idle connections close now, each
        busy one when its exchange ends (the pool keeps no idle connection from now on).
        """
        self.maxIdle = 0
        idle, self.idle = self.idle, []
        for conn in idle:
            conn._close(False)

    def closeAll(self) -> None:
        """
        Close every connection and cancel every connection attempt (service shutdown): their waiters get
        C{poolFailed}.
        """
        for d in list(self.connecting):
            d.cancel()
        waiting, self.waiting = self.waiting, deque()
        for waiter in waiting:
            waiter.poolFailed("pool closed", False)
        del self.idle[:]
        for conn in list(self.connections):
            conn._close(True)


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
        self.closed = False  # set at shutdown: routers must not retry into closing pools

    def forHost(self, host) -> HostPool:
        """
        The pool of C{host}.
        """
        pool = self.pools.get(host)
        if pool is None:
            pool = self.pools[host] = HostPool(host, self.cluster, self.clock, self.cluster.connectTimeout,
                                               self.maxIdle, self.idleTimeout)
        return pool

    def drain(self) -> None:
        """
        Retire every host's pool (see L{HostPool.drain}); pools made later keep no idle connection either.
        """
        self.maxIdle = 0
        for pool in list(self.pools.values()):
            pool.drain()

    def closeAll(self) -> None:
        """
        Close every connection of every host.
        """
        self.closed = True
        for pool in self.pools.values():
            pool.closeAll()
