"""
C{tcp_proxy}: the terminal network filter. It connects each downstream connection to a host of a cluster
and relays bytes both ways.

The shape is L{twisted.protocols.portforward}'s: the downstream is paused until the upstream is connected,
then each side is registered as the other's streaming producer, so a slow reader on either side pauses the
reading of the other and nothing buffers without bound. Two differences: the downstream producer is the
L{ConnectionHandle} (so that flow control and a filter holding the chain do not resume each other's
pauses), and a side's producer is unregistered before the side is closed or half-closed (a transport with
a paused producer registered would otherwise wait for it forever before closing).
"""

from __future__ import annotations

from typing import Callable, List, Optional

from twisted.internet import protocol
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import (
    IAddress,
    IHalfCloseableProtocol,
    INegotiated,
    IReactorTime,
    ISSLTransport,
    ITCPTransport,
    ITransport,
)
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from ..config import Options, suggest
from ..interfaces import IFilterContext, INetworkConnection, INetworkFilter, INetworkFilterFactory
from ..upstream.cluster import Cluster, Host
from ..upstream.lb import addressHashKey
from .chain import NetworkFilter


def _canHalfClose(transport: ITransport) -> bool:
    """
    Whether C{loseWriteConnection} on C{transport} sends a clean FIN. A TLS transport claims
    L{ITCPTransport} too (it copies the interfaces of the socket below it), but its C{loseWriteConnection}
    would reach the socket and cut the TLS stream without a close_notify.
    """
    return ITCPTransport.providedBy(transport) and not (
        INegotiated.providedBy(transport) or ISSLTransport.providedBy(transport)
    )


@implementer(IPlugin, INetworkFilterFactory)
class TCPProxyFactory:
    """
    The C{tcp_proxy} plugin. Options (each defaulting to the listener's key of the same name):

      - C{cluster}: the cluster to connect to;
      - C{connect_timeout}: how long one connection attempt may take (default: the cluster's);
      - C{max_connect_attempts}: attempts per downstream connection, each on another host when possible;
      - C{idle_timeout}: close both sides after this long without a byte either way (C{0}: never).
    """

    name = "tcp_proxy"

    def configure(
        self, options: Options, context: IFilterContext
    ) -> Callable[[INetworkConnection], INetworkFilter]:
        """
        Validate the options once; return the maker of one L{TCPProxyFilter} per connection.
        """
        listener = context.listener
        clusterName = options.string("cluster", listener.cluster)
        # The live mapping of the clusters in effect: each connection takes the cluster of that name then,
        # so a reload or CDS update that replaces the cluster does not have to rebuild the listener.
        clusters = context.clusters
        names = getattr(context, "clusterNames", None)
        names = names if names is not None else clusters
        if clusterName is None:
            options.error("cluster", "is required: name the cluster to send the bytes to (here or on the listener)")
        elif clusterName not in names:
            options.error("cluster", f"no cluster named `{clusterName}`{suggest(clusterName, names)}")
        idleTimeout = options.duration("idle_timeout", listener.idle_timeout)
        # None: the cluster's connect_timeout (of the cluster in effect when the connection starts).
        connectTimeout = options.duration("connect_timeout", listener.connect_timeout)
        maxAttempts = options.integer("max_connect_attempts", listener.max_connect_attempts, minimum=1)
        reactor = context.reactor

        def makeFilter(conn: INetworkConnection) -> TCPProxyFilter:
            cluster = clusters.get(clusterName)  # type: ignore[arg-type]
            timeout = connectTimeout if connectTimeout is not None else (
                cluster.connectTimeout if cluster is not None else 5.0)
            return TCPProxyFilter(conn, cluster, reactor, timeout, idleTimeout, maxAttempts)

        return makeFilter


@implementer(IHalfCloseableProtocol)
class _Upstream(protocol.Protocol):
    """
    The upstream side of one proxied connection; everything it hears goes to its L{TCPProxyFilter}.
    """

    def __init__(self, proxy: "TCPProxyFilter") -> None:
        self.proxy = proxy

    def dataReceived(self, data: bytes) -> None:
        proxy = self.proxy
        proxy.cluster.upstream_cx_rx_bytes_total.value += len(data)
        idle = proxy._idle
        if idle is not None:
            idle.reset(proxy.idleTimeout)
        proxy.conn.write(data)

    def readConnectionLost(self) -> None:
        self.proxy._upstreamReadLost()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.proxy._upstreamLost(reason)


class _UpstreamFactory(protocol.Factory):
    noisy = False

    def __init__(self, proxy: "TCPProxyFilter") -> None:
        self.proxy = proxy

    def buildProtocol(self, addr: IAddress) -> _Upstream:
        return _Upstream(self.proxy)


class TCPProxyFilter(NetworkFilter):
    """
    Relays one downstream connection to a host of C{cluster} (see the module docstring).

    @ivar host: the host connected to (or being connected to), or C{None}.
    @ivar upstream: the upstream transport once connected, C{None} before and after.
    """

    log = Logger()

    def __init__(
        self,
        conn: INetworkConnection,
        cluster: Optional[Cluster],
        reactor: IReactorTime,
        connectTimeout: float,
        idleTimeout: float,
        maxConnectAttempts: int,
    ) -> None:
        self.conn = conn
        self.cluster = cluster
        self.reactor = reactor
        self.connectTimeout = connectTimeout
        self.idleTimeout = idleTimeout
        self.maxConnectAttempts = maxConnectAttempts
        self.host: Optional[Host] = None
        self.upstream: Optional[ITransport] = None
        self._attempts = 0
        self._connecting: Optional[Deferred] = None
        self._connectTimer: Optional[DelayedCall] = None
        self._timedOut = False
        # Downstream bytes that arrive before the upstream connects: at most what was read before the pause.
        self._pending: Optional[List[bytes]] = []
        self._idle: Optional[DelayedCall] = None
        self._downstreamEOF = False
        self._upstreamEOF = False
        self._downstreamGone = False
        # Which transport has the other side registered as its producer.
        self._upstreamHasProducer = False
        self._downstreamHasProducer = False
        self._hashKey: Optional[bytes] = None  # source_ip for ring_hash / maglev clusters

    # -- downstream events (filter hooks)

    def connectionMade(self, conn: INetworkConnection) -> object:
        """
        Pause the downstream and connect to a host.
        """
        if self.cluster is None:
            return conn.close("no_cluster")
        # Nowhere to send bytes yet: don't read them.
        conn.pauseProducing()
        policy = self.cluster.hashPolicy
        if policy is not None and policy.kind == "source_ip":  # headers and cookies mean nothing at L4
            self._hashKey = addressHashKey(conn.transport.getPeer())
        self._connect(None)
        return None

    def dataReceived(self, conn: INetworkConnection, data: bytes) -> object:
        """
        Send C{data} upstream, or keep it until the upstream connects.
        """
        upstream = self.upstream
        if upstream is not None:
            self.cluster.upstream_cx_tx_bytes_total.value += len(data)
            idle = self._idle
            if idle is not None:
                idle.reset(self.idleTimeout)
            upstream.write(data)
        elif self._pending is not None:
            self._pending.append(data)
        return None

    def readConnectionLost(self, conn: INetworkConnection) -> None:
        """
        The downstream peer half-closed: half-close the upstream (now, or once connected).
        """
        self._downstreamEOF = True
        if self.upstream is not None:
            self._halfCloseUpstream()

    def connectionLost(self, conn: INetworkConnection, reason: Failure) -> None:
        """
        The downstream is gone: stop connecting, or close the upstream after its pending writes.
        """
        self._downstreamGone = True
        self._downstreamHasProducer = False
        self._pending = None
        self._cancelIdle()
        connecting = self._connecting
        if connecting is not None:
            self._connecting = None
            connecting.cancel()
        upstream = self.upstream
        if upstream is not None:
            self._unregisterUpstreamProducer()
            upstream.loseConnection()

    # -- connecting

    def _connect(self, exclude: Optional[Host]) -> None:
        cluster = self.cluster
        host = cluster.pick(exclude, self._hashKey)
        record = self.conn.connection.record
        if host is None:
            cluster.upstream_cx_none_healthy.value += 1
            if record is not None:
                record.responseFlags.append("UH")
            self.conn.close("no_healthy_upstream")
            return
        self._attempts += 1
        self.host = host
        if record is not None:
            record.upstreamHost = host
            record.upstreamCluster = cluster
        self._timedOut = False
        d = maybeDeferred(host.client.connect, _UpstreamFactory(self))
        self._connecting = d
        # Set before the callbacks: the endpoint may have answered already.
        self._connectTimer = self.reactor.callLater(self.connectTimeout, self._connectTimedOut, d)
        d.addCallbacks(self._connected, self._connectFailed, callbackArgs=(host,), errbackArgs=(host,))
        d.addErrback(self._bug)

    def _stopConnectTimer(self) -> None:
        timer = self._connectTimer
        self._connectTimer = None
        if timer is not None and timer.active():
            timer.cancel()

    def _connectTimedOut(self, d: Deferred) -> None:
        self._connectTimer = None
        if self._connecting is d:
            self._timedOut = True
            d.cancel()

    def _connectFailed(self, reason: Failure, host: Host) -> None:
        self._connecting = None
        self._stopConnectTimer()
        if self._downstreamGone:
            # We cancelled the attempt ourselves: not the upstream's failure.
            return None
        cluster = self.cluster
        cluster.upstream_cx_connect_fail.value += 1
        host.cx_connect_fail += 1
        outlier = getattr(cluster, "outlier", None)
        if outlier is not None:
            outlier.onLocalFailure(host, "connect")
        if self._timedOut:
            cluster.upstream_cx_connect_timeout.value += 1
        self.log.debug(
            "connecting to {host} for listener {listener} failed (attempt {attempt} of {attempts}): {reason}",
            host=host.endpoint, listener=self.conn.listener, attempt=self._attempts,
            attempts=self.maxConnectAttempts, reason=reason.getErrorMessage(),
        )
        if self._attempts < self.maxConnectAttempts:
            self._connect(host)
        else:
            record = self.conn.connection.record
            if record is not None:
                record.responseFlags.append("UF")
            self.conn.close("upstream_connect_failed")
        return None

    def _connected(self, upstreamProtocol: _Upstream, host: Host) -> None:
        self._connecting = None
        self._stopConnectTimer()
        transport = upstreamProtocol.transport
        if self._downstreamGone:
            transport.loseConnection()
            return None
        self.upstream = transport
        self._upstreamSince = self.reactor.seconds()
        outlier = getattr(self.cluster, "outlier", None)
        if outlier is not None:
            outlier.onConnectSuccess(host, final=True)
        setNoDelay = getattr(transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            setNoDelay(True)
        cluster = self.cluster
        cluster.upstream_cx_total.value += 1
        cluster.upstream_cx_active.value += 1
        host.cx_total += 1
        host.cx_active += 1
        pending, self._pending = self._pending, None
        if pending:
            cluster.upstream_cx_tx_bytes_total.value += sum(len(chunk) for chunk in pending)
            transport.writeSequence(pending)
        conn = self.conn
        # Each side is the other's streaming producer: a full write buffer on one pauses reading on the
        # other (Twisted calls pauseProducing/resumeProducing for us).
        transport.registerProducer(conn, True)
        self._upstreamHasProducer = True
        conn.transport.registerProducer(transport, True)
        self._downstreamHasProducer = True
        if self.idleTimeout:
            self._idle = self.reactor.callLater(self.idleTimeout, self._idleTimedOut)
        if self._downstreamEOF:
            self._halfCloseUpstream()
        else:
            conn.resumeProducing()
        return None

    def _bug(self, reason: Failure) -> None:
        self.log.failure("tcp_proxy of listener {listener} failed", reason, listener=self.conn.listener)
        self.conn.close("internal_error")

    # -- upstream events

    def _upstreamReadLost(self) -> None:
        # The upstream will send no more: it no longer produces for the downstream, so unregister it (else a
        # paused registration would hold the FIN back) and pass the half-close on.
        self._upstreamEOF = True
        if self._downstreamGone:
            return
        self._unregisterDownstreamProducer()
        # Where a FIN cannot be sent (TLS), the side stays open until it closes or idles out.
        if _canHalfClose(self.conn.transport):
            self.conn.transport.loseWriteConnection()
        if self._downstreamEOF:
            self._closeBoth()

    def _upstreamLost(self, reason: Failure) -> None:
        upstream = self.upstream
        if upstream is None:
            return
        self.upstream = None
        self._upstreamHasProducer = False
        self.cluster.upstream_cx_length_ms.record((self.reactor.seconds() - self._upstreamSince) * 1000.0)
        self.cluster.upstream_cx_active.value -= 1
        self.host.cx_active -= 1
        self._cancelIdle()
        if not self._downstreamGone:
            self._unregisterDownstreamProducer()
            self.conn.close("upstream_closed")

    # -- closing

    def _halfCloseUpstream(self) -> None:
        self._unregisterUpstreamProducer()
        if _canHalfClose(self.upstream):
            self.upstream.loseWriteConnection()
        if self._upstreamEOF:
            self._closeBoth()

    def _closeBoth(self) -> None:
        # Both peers have half-closed: nothing more can flow.
        self._unregisterUpstreamProducer()
        self._unregisterDownstreamProducer()
        self.conn.close("both_half_closed")
        if self.upstream is not None:
            self.upstream.loseConnection()

    def _idleTimedOut(self) -> None:
        self._idle = None
        self.log.debug("listener {listener}: idle for {timeout}s, closing", listener=self.conn.listener, timeout=self.idleTimeout)
        # Like Envoy, drop what is still buffered: a peer that reads nothing must not keep us waiting.
        self._unregisterUpstreamProducer()
        self._unregisterDownstreamProducer()
        if self.upstream is not None:
            self.upstream.abortConnection()
        self.conn.close("idle_timeout")
        self.conn.transport.abortConnection()

    def _cancelIdle(self) -> None:
        idle = self._idle
        self._idle = None
        if idle is not None and idle.active():
            idle.cancel()

    def _unregisterUpstreamProducer(self) -> None:
        if self._upstreamHasProducer:
            self._upstreamHasProducer = False
            self.upstream.unregisterProducer()

    def _unregisterDownstreamProducer(self) -> None:
        if self._downstreamHasProducer:
            self._downstreamHasProducer = False
            self.conn.transport.unregisterProducer()
