"""
The factory of a C{protocol = http} listener: an HTTP connection manager per accepted connection, speaking
HTTP/1.1 or HTTP/2 as the client does.

Which one is decided once per connection, before any request is parsed:

  - over TLS, by ALPN: C{h2} is HTTP/2, C{http/1.1} is HTTP/1.1 (the transport's C{negotiatedProtocol},
    known when the handshake completes, before any application byte);
  - otherwise (plaintext, or TLS without ALPN), by the first bytes: the HTTP/2 connection preface
    C{PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n} means HTTP/2 with prior knowledge (h2c); anything else is
    HTTP/1.1. No HTTP/1.1 request starts with those 24 bytes, so the first byte that differs decides at
    once; only a prefix of the preface (a client that sent C{P}, say) waits for more.

The protocol the factory builds is an L{HTTPConnection} (so HTTP/1.1 costs nothing extra once decided);
for HTTP/2 it hands the transport to an L{HTTP2Connection} and passes every byte on. It stays the object
the listener counts, drains and aborts either way.
"""

from __future__ import annotations

from typing import Optional, Union

from twisted.internet.interfaces import IAddress, IHandshakeListener
from zope.interface import implementer

from ..config.model import HTTP2ListenerConfig
from ..http.h2server import HTTP2Connection, HTTP2Settings, HTTP2Stats
from ..http.server import HTTPConnection, HTTPSettings, HTTPStats
from ..observability.stats import StatsStore
from .tcp import ListenerFactory

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@implementer(IHandshakeListener)
class DetectingHTTPConnection(HTTPConnection):
    """
    An HTTP/1.1 connection manager that first checks whether the client speaks HTTP/2 (see the module
    docstring) and, if so, becomes a shell around an L{HTTP2Connection}.

    @ivar http2: the L{HTTP2Connection} doing the work, once the client turned out to speak HTTP/2.
    """

    def __init__(self, settings: HTTPSettings, httpStats: HTTPStats, h2Settings: HTTP2Settings,
                 h2Stats: HTTP2Stats) -> None:
        super().__init__(settings, httpStats)
        self.h2Settings = h2Settings
        self.h2Stats = h2Stats
        self.http2: Optional[HTTP2Connection] = None
        self.decided = False  # the protocol is chosen (dataReceived is then the chosen one's)
        self._sniffed = b""

    def handshakeCompleted(self) -> None:
        """
        The TLS handshake is done: ALPN's answer, if any, decides the protocol now, so an HTTP/2 client gets
        our SETTINGS without waiting for its first bytes.
        """
        if self.decided:
            return
        negotiated = getattr(self.transport, "negotiatedProtocol", None)
        if negotiated == b"h2":
            self._switchToHTTP2(b"")
        elif negotiated is not None:
            self._useHTTP1(b"")

    def dataReceived(self, data: bytes) -> None:
        """
        The first bytes (this method is replaced by the chosen protocol's own once decided).
        """
        negotiated = getattr(self.transport, "negotiatedProtocol", None)
        if negotiated is not None:
            # TLS with ALPN (a transport without handshake notifications): its answer decides.
            if negotiated == b"h2":
                self._switchToHTTP2(data)
            else:
                self._useHTTP1(data)
            return
        sniffed = self._sniffed + data if self._sniffed else data
        n = len(sniffed)
        if n > 24:
            n = 24
        if sniffed[:n] != PREFACE[:n]:
            self._useHTTP1(sniffed)
        elif n == 24:
            self._switchToHTTP2(sniffed)
        else:
            self._sniffed = sniffed  # a prefix of the preface: wait for the rest

    def _useHTTP1(self, data: bytes) -> None:
        # From now on the reactor calls HTTPConnection.dataReceived directly: no per-read cost remains.
        self._sniffed = b""
        self.decided = True
        self.dataReceived = super().dataReceived
        if data:
            self.dataReceived(data)

    def _switchToHTTP2(self, data: bytes) -> None:
        self._sniffed = b""
        self.decided = True
        self._cancelTimers()  # HTTP/1.1's idle and header timers; HTTP/2 keeps its own
        h2 = self.http2 = HTTP2Connection(self.settings, self.httpStats, self.h2Settings, self.h2Stats)
        h2.makeConnection(self.transport)  # factory None: this object is what the listener counts
        self.dataReceived = h2.dataReceived
        if data:
            h2.dataReceived(data)

    def connectionLost(self, reason) -> None:
        # The bound method kept in the instance points back at an object of this connection: drop it, so
        # the connection is freed by reference counting.
        self.__dict__.pop("dataReceived", None)
        h2 = self.http2
        if h2 is not None:
            h2.connectionLost(reason)
        super().connectionLost(reason)

    def drain(self) -> None:
        """
        As for HTTP/1.1, or a graceful GOAWAY for HTTP/2.
        """
        if self.http2 is not None:
            self.http2.drain()
        else:
            super().drain()


def http2Settings(config: HTTP2ListenerConfig) -> Union[HTTP2Settings, bool]:
    """
    A listener's C{http2*} keys as the limits its factory takes: C{False} when HTTP/2 is switched off.
    """
    if not config.enabled:
        return False
    return HTTP2Settings(
        maxConcurrentStreams=config.max_concurrent_streams,
        initialStreamWindowSize=config.initial_stream_window_size,
        initialConnectionWindowSize=config.initial_connection_window_size,
        maxFrameSize=config.max_frame_size,
        maxHeaderListSize=config.max_header_list_size,
        maxOutboundControlFrames=config.max_outbound_control_frames,
        maxConsecutiveInboundFramesWithEmptyPayload=config.max_consecutive_inbound_frames_with_empty_payload,
        maxInboundPriorityFramesPerStream=config.max_inbound_priority_frames_per_stream,
        maxInboundWindowUpdateFramesPerDataFrameSent=config.max_inbound_window_update_frames_per_data_frame_sent,
        prematureResetTotalStreamCount=config.premature_reset_total_stream_count,
        prematureResetMinStreamLifetime=config.premature_reset_min_stream_lifetime,
    )


class HTTPListenerFactory(ListenerFactory):
    """
    Builds the connection managers of one C{protocol = http} listener; C{http.<name>.*} stats are shared by
    all of them.

    @ivar http2: the listener's HTTP/2 limits, or C{None} when it speaks HTTP/1.1 only.
    """

    def __init__(self, settings: HTTPSettings, stats: StatsStore,
                 http2: Union[HTTP2Settings, bool] = True) -> None:
        """
        @param http2: the listener's HTTP/2 limits; C{True} for the defaults, C{False} for HTTP/1.1 only.
        """
        super().__init__(settings.name, stats, settings.clock)
        self.settings = settings
        scope = stats.scope("http", settings.name)
        self.httpStats = HTTPStats(scope)
        if http2 is True:
            http2 = HTTP2Settings()
        self.http2: Optional[HTTP2Settings] = http2 or None
        self.http2Stats = HTTP2Stats(scope) if self.http2 is not None else None

    def buildProtocol(self, addr: IAddress) -> HTTPConnection:
        """
        A new connection manager: one that detects HTTP/2, unless the listener speaks HTTP/1.1 only.
        """
        if self.http2 is None:
            conn = HTTPConnection(self.settings, self.httpStats)
        else:
            conn = DetectingHTTPConnection(self.settings, self.httpStats, self.http2, self.http2Stats)
        conn.factory = self
        return conn

    def adoptIdle(self, previous: "HTTPListenerFactory") -> int:
        """
        Take over the idle HTTP/1.1 connections of C{previous}, the factory this one replaces on the same
        listening socket after a reload: their next request runs on this factory's settings (routes,
        filters, access log), and the keep-alive connection is not closed under a client that may be
        sending on it at that very moment. A connection with a request in progress, an HTTP/2 connection
        or a tunnel stays with C{previous} (to be drained: its streams finish on the configuration they
        started with). The parser's header limits are the connection's and stay as they were.

        @return: how many connections were taken over.
        """
        taken = 0
        for conn in list(previous.connections):
            if not _idleHTTP1(conn) or (self.http2 is None and not getattr(conn, "decided", True)):
                continue
            previous.handOver(conn, self)
            conn.settings = self.settings
            conn.httpStats = self.httpStats
            if isinstance(conn, DetectingHTTPConnection):
                conn.h2Settings = self.http2 if self.http2 is not None else conn.h2Settings
                conn.h2Stats = self.http2Stats if self.http2Stats is not None else conn.h2Stats
            taken += 1
        return taken


def _idleHTTP1(conn: HTTPConnection) -> bool:
    """
    Whether C{conn} speaks (or may yet speak) HTTP/1.1 and has no request in progress: nothing being
    answered or queued, no request head complete and unanswered, not closing, not a tunnel.
    """
    return (getattr(conn, "http2", None) is None and conn.active is None and not conn.pending
            and conn.awaitingHead and conn.tunnel is None and conn.early is None and not conn.closing
            and not conn.finishing and not conn.lastRequest and not conn.disconnected)
