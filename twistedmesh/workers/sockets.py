"""
Listening sockets shared by worker processes: an endpoint string as an address, sockets made by hand with
or without C{SO_REUSEPORT}, and server endpoints that adopt them into a reactor.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor
from zope.interface import implementer


@dataclass(frozen=True)
class SocketAddress:
    """
    Where a TCP listener listens: the family, host and port, and its accept backlog.
    """

    family: int
    host: str
    port: int
    backlog: int

    def withPort(self, port: int) -> "SocketAddress":
        """
        The same address with another port (the one the system picked for port 0).
        """
        return SocketAddress(self.family, self.host, port, self.backlog)

    def toJSON(self) -> list:
        """
        The address as data for a worker's spec (JSON).
        """
        return [self.family, self.host, self.port, self.backlog]

    @classmethod
    def fromJSON(cls, data: list) -> "SocketAddress":
        """
        The address L{toJSON} made.
        """
        return cls(int(data[0]), str(data[1]), int(data[2]), int(data[3]))


def parseAddress(endpoint: str) -> SocketAddress:
    """
    The address of a C{tcp:} or C{tcp6:} server endpoint string, read by letting Twisted's own parser
    listen on a memory reactor (so every option it takes is understood as it understands it).

    @raise ValueError: for another kind of endpoint.
    """
    reactor = MemoryReactor()
    serverFromString(reactor, endpoint).listen(Factory())
    if not reactor.tcpServers:
        raise ValueError(f"{endpoint!r} is not a TCP endpoint")
    port, _, backlog, interface = reactor.tcpServers[0]
    if endpoint.strip().startswith("tcp6:") or ":" in interface:
        return SocketAddress(socket.AF_INET6, interface or "::", port, backlog)
    return SocketAddress(socket.AF_INET, interface or "0.0.0.0", port, backlog)


def makeSocket(address: SocketAddress, reusePort: bool, listen: bool) -> socket.socket:
    """
    A non-blocking TCP socket bound to C{address}, with C{SO_REUSEADDR} (as Twisted's own listeners) and,
    with C{reusePort}, C{SO_REUSEPORT}; listening if C{listen}.

    @raise CannotListenError: if it cannot be bound (address in use, say).
    """
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reusePort:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address.host, address.port))
        if listen:
            sock.listen(address.backlog)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise CannotListenError(address.host, address.port, e)
    return sock


@implementer(IStreamServerEndpoint)
class InheritedEndpoint:
    """
    An endpoint on a listening socket this process inherited (file descriptor C{fd}). Each L{listen}
    adopts a duplicate, so the inherited descriptor stays open for a later listen (after a reload) and
    closing a port closes only its duplicate.
    """

    def __init__(self, reactor, fd: int, family: int) -> None:
        self.reactor = reactor
        self.fd = fd
        self.family = family

    def listen(self, factory) -> defer.Deferred:
        """
        Accept connections from the inherited socket with C{factory}.
        """
        return defer.execute(self.reactor.adoptStreamPort, self.fd, self.family, factory)


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """
    An endpoint that makes its own socket with C{SO_REUSEPORT} on C{address}: every worker's socket on the
    same address joins one group, over which the kernel spreads incoming connections.
    """

    def __init__(self, reactor, address: SocketAddress) -> None:
        self.reactor = reactor
        self.address = address

    def listen(self, factory) -> defer.Deferred:
        """
        Bind, listen and accept with C{factory}.
        """

        def listen():
            sock = makeSocket(self.address, reusePort=True, listen=True)
            try:
                return self.reactor.adoptStreamPort(sock.fileno(), self.address.family, factory)
            finally:
                sock.close()  # the port holds a duplicate

        return defer.execute(listen)


def closeFD(fd: int) -> None:
    """
    Close a descriptor, ignoring one already closed.
    """
    try:
        os.close(fd)
    except OSError:
        pass
