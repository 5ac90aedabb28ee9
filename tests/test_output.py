"""
Tests for L{twistedmesh.http.output}: writes collected while a read is handled and sent in one system call,
straight from the protocol when Twisted's buffer is empty, never reordered; and through real sockets, that
a proxied exchange leaves neither connection watched for writability.
"""

from __future__ import annotations

import socket
from typing import List

from twisted.internet import defer, protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twistedmesh.config import loadString
from twistedmesh.http.output import Output, sendNow
from twistedmesh.service import MeshService
from twistedmesh.upstream.http1 import UpstreamConnection

from .support import port, startEcho, startService, stopProxy


class CountingTransport(StringTransport):
    """
    A L{StringTransport} that records every call that hands it bytes.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls: List[List[bytes]] = []

    def write(self, data: bytes) -> None:
        self.calls.append([data])
        super().write(data)

    def writeSequence(self, seq) -> None:
        seq = list(seq)
        self.calls.append(seq)
        StringTransport.write(self, b"".join(seq))


class OutputTests(SynchronousTestCase):
    """
    L{Output} on a memory transport.
    """

    def test_uncorked(self) -> None:
        """
        Outside a read, each write goes to the transport at once.
        """
        t = CountingTransport()
        out = Output(t)
        out.write(b"a")
        out.writeSequence((b"b", b"c"))
        self.assertEqual(t.calls, [[b"a"], [b"b", b"c"]])

    def test_corked(self) -> None:
        """
        While corked, writes are collected; uncorking sends them all in one call, in order, unjoined.
        """
        t = CountingTransport()
        out = Output(t)
        out.cork()
        out.write(b"head")
        out.writeSequence((b"5\r\n", b"hello", b"\r\n"))
        self.assertEqual(t.calls, [])
        out.uncork()
        self.assertEqual(t.calls, [[b"head", b"5\r\n", b"hello", b"\r\n"]])
        self.assertEqual(out.pending, [])

    def test_nested(self) -> None:
        """
        Only the last uncork of nested corks sends.
        """
        t = CountingTransport()
        out = Output(t)
        out.cork()
        out.cork()
        out.write(b"x")
        out.uncork()
        self.assertEqual(t.value(), b"")
        out.uncork()
        self.assertEqual(t.calls, [[b"x"]])

    def test_hold(self) -> None:
        """
        An output held by a corked one stays corked until that one is uncorked, then sends.
        """
        downT, upT = CountingTransport(), CountingTransport()
        down, up = Output(downT), Output(upT)
        down.cork()
        down.hold(up)
        up.write(b"request")
        down.write(b"response")
        self.assertEqual((downT.value(), upT.value()), (b"", b""))
        down.uncork()
        self.assertEqual((downT.calls, upT.calls), ([[b"response"]], [[b"request"]]))
        self.assertEqual((down.corks, up.corks, down.held), (0, 0, []))

    def test_heldReleasedWhenSendRaises(self) -> None:
        """
        If sending what the holder collected raises, the outputs it held are uncorked all the same (and
        send what they collected): one broken write must not silence another connection.
        """

        class Broken(CountingTransport):
            def writeSequence(self, seq) -> None:
                raise TypeError("data must not be str")

            write = writeSequence

        upT = CountingTransport()
        down, up = Output(Broken()), Output(upT)
        down.cork()
        down.hold(up)
        up.write(b"request")
        down.write(b"response")
        self.assertRaises(TypeError, down.uncork)
        self.assertEqual((up.corks, upT.calls), (0, [[b"request"]]))

    def test_holdUncorked(self) -> None:
        """
        Holding does nothing when the holder is not corked: the other output keeps writing at once.
        """
        down, upT = Output(StringTransport()), CountingTransport()
        up = Output(upT)
        down.hold(up)
        up.write(b"request")
        self.assertEqual(upT.calls, [[b"request"]])

    def test_writeWhole(self) -> None:
        """
        A whole message is collected while corked, and written at once otherwise.
        """
        t = CountingTransport()
        out = Output(t)
        out.writeWhole(b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(t.calls, [[b"GET / HTTP/1.1\r\n\r\n"]])
        out.cork()
        out.writeWhole(b"again")
        self.assertEqual(len(t.calls), 1)
        out.uncork()
        self.assertEqual(t.calls[1], [b"again"])

    def test_flush(self) -> None:
        """
        flush() sends what was collected now, and the output stays corked.
        """
        t = CountingTransport()
        out = Output(t)
        out.cork()
        out.write(b"a")
        out.flush()
        out.write(b"b")
        self.assertEqual(t.calls, [[b"a"]])
        out.uncork()
        self.assertEqual(t.value(), b"ab")


class _Sink(protocol.Protocol):
    """
    Collects what it reads; C{until(n)} fires once it has C{n} bytes.
    """

    def __init__(self) -> None:
        self.data = bytearray()
        self.waiting = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self._check()

    def until(self, n: int) -> defer.Deferred:
        self.waiting = (n, defer.Deferred())
        d = self.waiting[1]
        self._check()
        return d

    def _check(self) -> None:
        if self.waiting is not None and len(self.data) >= self.waiting[0]:
            d, self.waiting = self.waiting[1], None
            d.callback(bytes(self.data))


class SendNowTests(TestCase):
    """
    L{sendNow} on real TCP connections over loopback.
    """

    @defer.inlineCallbacks
    def setUp(self):
        accepted = defer.Deferred()

        class Server(protocol.Protocol):
            def connectionMade(self):
                accepted.callback(self)

        factory = protocol.Factory.forProtocol(Server)
        listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(listening.stopListening)
        self.client = _Sink()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", listening.getHost().port), self.client)
        self.server = yield accepted
        self.transport = self.server.transport
        self.addCleanup(self.client.transport.abortConnection)
        self.addCleanup(self.transport.abortConnection)

    @defer.inlineCallbacks
    def test_direct(self):
        """
        With nothing buffered, the pieces go out on the socket at once: nothing is left in the transport and
        the reactor is not asked to watch it for writability.
        """
        sendNow(self.transport, [b"HTTP/1.1 200 OK\r\n\r\n", b"body"])
        self.assertEqual((self.transport.dataBuffer, self.transport._tempDataLen), (b"", 0))
        self.assertNotIn(self.transport, reactor.getWriters())
        data = yield self.client.until(23)
        self.assertEqual(data, b"HTTP/1.1 200 OK\r\n\r\nbody")

    @defer.inlineCallbacks
    def test_writeWholeDirect(self):
        """
        Output.writeWhole outside a read goes straight to the socket too.
        """
        Output(self.transport).writeWhole(b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual((self.transport.dataBuffer, self.transport._tempDataLen), (b"", 0))
        self.assertNotIn(self.transport, reactor.getWriters())
        data = yield self.client.until(18)
        self.assertEqual(data, b"GET / HTTP/1.1\r\n\r\n")

    @defer.inlineCallbacks
    def test_afterBuffered(self):
        """
        Bytes already in the transport's buffer go first: then the pieces are buffered behind them.
        """
        self.transport.write(b"first ")
        sendNow(self.transport, [b"second"])
        data = yield self.client.until(12)
        self.assertEqual(data, b"first second")

    @defer.inlineCallbacks
    def test_partial(self):
        """
        What the kernel does not take is buffered by the transport (and the reactor watches it), in order,
        behind what was sent.
        """
        self.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.client.transport.pauseProducing()
        pieces = [bytes([65 + i % 26]) * 300_000 for i in range(4)]
        sendNow(self.transport, pieces)
        self.assertTrue(self.transport._tempDataLen or self.transport.dataBuffer)
        self.assertIn(self.transport, reactor.getWriters())
        self.client.transport.resumeProducing()
        data = yield self.client.until(1_200_000)
        self.assertEqual(data, b"".join(pieces))

    @defer.inlineCallbacks
    def test_closing(self):
        """
        A closing transport gets the bytes through its buffer, and sends them before it closes.
        """
        self.transport.loseConnection()
        sendNow(self.transport, [b"last", b" words"])
        data = yield self.client.until(10)
        self.assertEqual(data, b"last words")

    def test_otherTransport(self):
        """
        A transport that is not Twisted's TCP one (TLS, or a memory one) gets one writeSequence.
        """
        t = CountingTransport()
        sendNow(t, [b"a", b"b"])
        self.assertEqual(t.calls, [[b"a", b"b"]])


CONFIG = """
[mesh]
admin = off
[listener:web]
endpoint = tcp:0
protocol = http
routes = main
[route:main/all]
prefix = /
cluster = origin
[cluster:origin]
endpoints = tcp:127.0.0.1:1
"""

REQUEST = b"GET /x HTTP/1.1\r\nHost: example\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"  # as the proxy writes it


class ProxyWritesTests(SynchronousTestCase):
    """
    The connection manager and the upstream connection write through L{Output}, on memory transports.
    """

    def setUp(self) -> None:
        service = MeshService(loadString(CONFIG), MemoryReactorClock())
        self.down = service.listeners["web"].factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        self.downT = CountingTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
        self.down.makeConnection(self.downT)
        cluster = service.clusters["origin"]
        pool = cluster.pools.forHost(cluster.hosts[0])
        self.up = UpstreamConnection(pool)
        self.upT = CountingTransport()
        self.up.makeConnection(self.upT)
        pool.connections.add(self.up)
        pool.release(self.up)

    def test_oneWriteEachWay(self) -> None:
        """
        A request becomes one write upstream; a response head, body and end read at once become one write
        downstream.
        """
        self.down.dataReceived(REQUEST)
        self.assertEqual(len(self.upT.calls), 1)
        self.assertTrue(b"".join(self.upT.calls[0]).startswith(b"GET /x HTTP/1.1\r\nhost: example\r\n"))
        self.up.dataReceived(RESPONSE)
        self.assertEqual(len(self.downT.calls), 1)
        self.assertEqual(b"".join(self.downT.calls[0]), RESPONSE)

    def test_bodyWithRequest(self) -> None:
        """
        A request head and its body read at once go upstream in one write.
        """
        self.down.dataReceived(b"POST /x HTTP/1.1\r\nHost: example\r\nContent-Length: 4\r\n\r\nabcd")
        self.assertEqual(len(self.upT.calls), 1)
        self.assertTrue(b"".join(self.upT.calls[0]).endswith(b"\r\n\r\nabcd"))

    def test_headWithoutBody(self) -> None:
        """
        A response head whose body is not in the same read is not held back for it.
        """
        self.down.dataReceived(REQUEST)
        self.up.dataReceived(RESPONSE[:-5])
        self.assertEqual(self.downT.value(), RESPONSE[:-5])
        self.up.dataReceived(b"hello")
        self.assertEqual(self.downT.value(), RESPONSE)
        self.assertEqual(len(self.downT.calls), 2)

    def test_pipelinedAnswers(self) -> None:
        """
        Two pipelined requests: the second goes upstream in the read that ends the first response, and the
        downstream gets each answer in one write.
        """
        self.down.dataReceived(REQUEST + REQUEST)
        self.assertEqual(len(self.upT.calls), 1)
        self.up.dataReceived(RESPONSE)
        self.assertEqual(len(self.upT.calls), 2)
        self.up.dataReceived(RESPONSE)
        self.assertEqual(self.downT.value(), RESPONSE + RESPONSE)
        self.assertEqual(len(self.downT.calls), 2)


class _Client(protocol.Protocol):
    """
    A keep-alive HTTP/1.1 client for one response at a time (Content-Length bodies).
    """

    def __init__(self) -> None:
        self.buffer = b""
        self.waiting = None

    def get(self, path: bytes) -> defer.Deferred:
        self.waiting = defer.Deferred()
        self.transport.write(b"GET " + path + b" HTTP/1.1\r\nHost: test\r\n\r\n")
        return self.waiting

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        head, sep, rest = self.buffer.partition(b"\r\n\r\n")
        if not sep:
            return
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(rest) >= length and self.waiting is not None:
            self.buffer = rest[length:]
            d, self.waiting = self.waiting, None
            d.callback((head, rest[:length]))


class LoopbackTests(TestCase):
    """
    Through real sockets: the proxy writes to both connections without asking the reactor to watch them.
    """

    @defer.inlineCallbacks
    def test_noWriteWatch(self):
        """
        Over several keep-alive exchanges, neither the downstream nor the upstream transport is ever
        registered for writability: every request and response left in one direct send.
        """
        echo = yield startEcho(self)
        service = startService(self, f"""
[mesh]
admin = off
drain_timeout = 100ms
[listener:web]
endpoint = tcp:0:interface=127.0.0.1
protocol = http
routes = main
[route:main/all]
prefix = /
cluster = echo
[cluster:echo]
endpoints = tcp:127.0.0.1:{echo}
""", stop=stopProxy)
        yield service.whenLive
        client = _Client()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port(service.listeners["web"])), client)
        self.addCleanup(client.transport.abortConnection)
        head, body = yield client.get(b"/first")  # makes the upstream connection
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        yield deferLater(reactor, 0.01, lambda: None)  # let the reactor finish that first write
        (down,) = service.listeners["web"].factory.connections
        (pool,) = service.clusters["echo"].pools.pools.values()
        (up,) = pool.connections
        watched = []
        for transport in (down.transport, up.transport):
            transport.startWriting = lambda t=transport: watched.append(t)
        for i in range(5):
            head, body = yield client.get(b"/again/%d" % i)
            self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
            self.assertIn(b"/again/%d" % i, body)
        self.assertEqual(watched, [])
