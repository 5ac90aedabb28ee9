"""
A tunnel: what an HTTP/1.1 connection becomes after the upstream accepts an C{Upgrade} (a WebSocket,
say) with C{101 Switching Protocols}. From then on bytes flow both ways unparsed, the two transports
registered as each other's producers (a slow reader on either side pauses the other side's reading), and
when either side closes, so does the other. The stream completes when the downstream connection ends.
"""

from __future__ import annotations

from twisted.logger import Logger


class Tunnel:
    """
    Joins a downstream L{twistedmesh.http.server.HTTPConnection} and an upstream
    L{twistedmesh.upstream.http1.UpstreamConnection} after a 101.
    """

    log = Logger()

    __slots__ = ("downstream", "upstream", "stream", "closed")

    def __init__(self, downstream, upstream, stream) -> None:
        self.downstream = downstream
        self.upstream = upstream
        self.stream = stream
        self.closed = False

    def start(self, fromUpstream: bytes, fromDownstream: bytes) -> None:
        """
        Join the transports. C{fromUpstream} and C{fromDownstream} are bytes each side sent after the
        HTTP exchange, already read (they came with the 101, or before it).
        """
        down = self.downstream.transport
        up = self.upstream.transport
        # The HTTP exchange's producers are gone by now (the codec and router unregister theirs).
        up.registerProducer(down, True)
        down.registerProducer(up, True)
        if fromUpstream:
            self.toDownstream(fromUpstream)
        if fromDownstream:
            self.toUpstream(fromDownstream)

    def toUpstream(self, data: bytes) -> None:
        """
        Bytes from the client.
        """
        self.stream.bytesReceived += len(data)
        self.upstream.transport.write(data)

    def toDownstream(self, data: bytes) -> None:
        """
        Bytes from the upstream.
        """
        self.stream.bytesSent += len(data)
        self.downstream.transport.write(data)

    def downstreamLost(self) -> None:
        """
        The client's connection is gone: close the upstream's.
        """
        if not self.closed:
            self.closed = True
            self._unregister(self.upstream.transport)
            self.upstream.transport.loseConnection()

    def upstreamLost(self) -> None:
        """
        The upstream's connection is gone: close the client's (after what is already written).
        """
        if not self.closed:
            self.closed = True
            self._unregister(self.downstream.transport)
            self.downstream.transport.loseConnection()

    @staticmethod
    def _unregister(transport) -> None:
        # A paused producer left registered would keep Twisted from ever closing the transport. Both were
        # registered in start(); unregistering twice is harmless.
        transport.unregisterProducer()
