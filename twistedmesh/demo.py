"""
The built-in demo upstream, enabled by an C{[echo:NAME]} section: something for the shipped config to proxy
to with nothing else running. Not on the hot path of anything but demos and tests.
"""

from __future__ import annotations

from twisted.internet import protocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from zope.interface import implementer
from twisted.web import resource, server

from .config import EchoConfig


@implementer(IHalfCloseableProtocol)
class Echo(protocol.Protocol):
    """
    Writes back every byte it receives; a half-closed peer gets the rest of its echo and then a close.
    """

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()


class EchoFactory(protocol.Factory):
    """
    The C{protocol = tcp} echo service.
    """

    protocol = Echo
    noisy = False


class EchoResource(resource.Resource):
    """
    Answers every request with 200 and a plain-text account of what it received: request line, headers
    and body. Handy for seeing what the proxy added, removed or rewrote.
    """

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def render(self, request: server.Request) -> bytes:
        lines = [b"%s %s %s" % (request.method, request.uri, request.clientproto)]
        for name, values in request.requestHeaders.getAllRawHeaders():
            for value in values:
                lines.append(name.lower() + b": " + value)
        body = request.content.read() if request.content is not None else b""
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"x-echo-server", self.name.encode("ascii"))
        return b"\n".join(lines) + b"\n\n" + body


def makeEchoFactory(config: EchoConfig) -> protocol.Factory:
    """
    The factory for an C{[echo:NAME]} section's protocol.
    """
    if config.protocol == "tcp":
        return EchoFactory()
    site = server.Site(EchoResource(config.name))
    site.log = lambda request: None  # a demo upstream need not log every request
    return site
