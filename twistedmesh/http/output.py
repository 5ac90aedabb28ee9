"""
How the HTTP/1.1 connections (downstream and upstream) write: coalesced within one read, then sent at once.

A Twisted transport buffers every C{write()} and sends it when the reactor next reports the socket
writable: per write, an C{epoll_ctl} to watch for writability, a trip round the reactor loop, and another
C{epoll_ctl} to stop watching. A proxied request makes two such writes (the request upstream, the response
downstream), and a response head and its body arrive as separate writes. L{Output} removes that cost on
the hot path:

- B{Corked} while a read is being handled (the connection's own C{dataReceived}, or the upstream read
  that carries its response): writes are only collected.
- When the read is handled (L{Output.uncork}), what was collected goes out in one system call, straight
  from the protocol (C{send}, or C{sendmsg} for several pieces: no joining, so no copy of a body), when
  Twisted's own buffer for the socket is empty. Whatever the kernel does not take, and every write that
  cannot go straight out (TLS, a transport that is not Twisted's TCP one, a socket Twisted is still
  writing from, a closing connection), goes through the transport's C{write} as before, after anything
  already buffered there: bytes are never reordered.
- Outside a read (a timer, a Deferred firing, a connection just made), a write goes to the transport
  directly, as it always did; except a whole message that nothing follows at once (L{Output.writeWhole}:
  a request without a body, say on a connection just made or from an HTTP/2 downstream), which is sent
  straight away when it can be.

Every byte still passes through the transport's producer machinery when it cannot be sent at once, so a
slow peer pauses its producer exactly as before; what is held while corked is bounded by one read.
"""

from __future__ import annotations

from typing import List, Sequence

from twisted.internet import tcp

# Twisted's TCP transports, whose write buffer and socket we can see (checked, not assumed: another
# Twisted could lay them out differently, and then every write simply goes through write()).
_DIRECT = frozenset(
    cls for cls in (tcp.Server, tcp.Client)
    if all(hasattr(cls, name) for name in ("dataBuffer", "disconnecting", "_writeDisconnecting", "_aborting",
                                            "connected"))
)
_MAX_PIECES = 64  # more pieces than this are joined (sendmsg takes at most IOV_MAX buffers)


def _direct(transport) -> bool:
    """
    Whether bytes for C{transport}, one of Twisted's TCP transports, may be sent on its socket now,
    bypassing its buffer: open, not closing, no TLS, nothing buffered.
    """
    return (transport.connected and not transport.dataBuffer and not getattr(transport, "_tempDataLen", 1)
            and not transport.disconnecting and not transport._writeDisconnecting and not transport._aborting
            and not getattr(transport, "TLS", False))


def sendNow(transport, pieces: Sequence[bytes]) -> None:
    """
    Write C{pieces}, in order, with one system call when the socket takes them all (see the module
    docstring); the rest goes through the transport's buffer.
    """
    if transport.__class__ in _DIRECT and _direct(transport):
        try:
            if len(pieces) == 1:
                sent = transport.socket.send(pieces[0])
            else:
                if len(pieces) > _MAX_PIECES:
                    pieces = [b"".join(pieces)]
                sent = transport.socket.sendmsg(pieces)
        except OSError:
            # A full socket (EAGAIN) or a broken one: the transport's own write finds out which, and a
            # broken connection is reported by the reactor as usual.
            sent = 0
        if sent:
            for i, piece in enumerate(pieces):
                n = len(piece)
                if sent < n:
                    pieces = [piece[sent:], *pieces[i + 1:]]  # a partial send: copy only the remainder
                    break
                sent -= n
            else:
                return
    if len(pieces) == 1:
        transport.write(pieces[0])
    else:
        transport.writeSequence(pieces)


class Output:
    """
    The writes of one connection (see the module docstring).

    @ivar corks: how many reads in progress hold this output; writes are collected while above 0.
    @ivar pending: what was collected, in order.
    @ivar held: other outputs this one keeps corked until it is uncorked itself (an upstream connection
        written to while its downstream's read is handled).
    """

    __slots__ = ("transport", "corks", "pending", "held")

    def __init__(self, transport) -> None:
        self.transport = transport
        self.corks = 0
        self.pending: List[bytes] = []
        self.held: List["Output"] = []

    def write(self, data: bytes) -> None:
        """
        Write C{data} (collected while corked).
        """
        if self.corks:
            self.pending.append(data)
        else:
            self.transport.write(data)

    def writeWhole(self, data: bytes) -> None:
        """
        Write C{data}, a whole message that nothing follows at once (a request without a body): collected
        while corked, else sent now, straight to the socket when it can be (see L{sendNow}).
        """
        if self.corks:
            self.pending.append(data)
        else:
            sendNow(self.transport, (data,))

    def writeSequence(self, pieces: Sequence[bytes]) -> None:
        """
        Write C{pieces}, in order, without joining them.
        """
        if self.corks:
            self.pending.extend(pieces)
        else:
            self.transport.writeSequence(pieces)

    def cork(self) -> None:
        """
        A read is being handled: collect writes until the matching L{uncork}.
        """
        self.corks += 1

    def uncork(self) -> None:
        """
        The read is handled: when no other holds this output, send what was collected, then release the
        outputs held.
        """
        corks = self.corks = self.corks - 1
        if not corks:
            pending = self.pending
            try:
                if pending:
                    self.pending = []
                    sendNow(self.transport, pending)
            finally:
                # Whatever the send did (a transport raising on a str, say), the outputs this one held
                # must not stay corked: their connections would never write again.
                if self.held:
                    held, self.held = self.held, []
                    for output in held:
                        output.uncork()

    def hold(self, other: "Output") -> None:
        """
        Keep C{other} corked until this output is uncorked, if it is corked now (nothing otherwise).
        """
        if self.corks and other is not self:
            other.corks += 1
            self.held.append(other)

    def discard(self) -> None:
        """
        Drop what was collected: the connection is being aborted, which drops whatever it buffered.
        """
        self.pending = []

    def flush(self) -> None:
        """
        Send what was collected now (before the connection is closed, or handed to something that
        writes to the transport directly).
        """
        pending = self.pending
        if pending:
            self.pending = []
            sendNow(self.transport, pending)
