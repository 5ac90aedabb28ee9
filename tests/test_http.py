"""
The HTTP/1.1 data plane end to end: L{MeshService} with an HTTP listener on loopback, real upstreams,
real clients (raw sockets, treq, curl where installed).
"""

from __future__ import annotations

import hashlib
import os
import shutil

import treq
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest
from twisted.web import resource, server

from twistedmesh.config import loadString
from twistedmesh.service import MeshService


class Origin(resource.Resource):
    """
    A test upstream: C{/size/N} sends N bytes, C{/slow} never answers, C{/die} sends half a response and
    closes, C{/status/N} answers N, anything else echoes method, path and body length.
    """

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.requests = []

    def render(self, request):
        self.requests.append(request)
        parts = request.path.split(b"/")
        if request.path.startswith(b"/size/"):
            n = int(parts[2])
            request.setHeader(b"content-length", b"%d" % n)
            block = b"x" * 65536
            remaining = n
            while remaining > 0:
                request.write(block[:remaining])
                remaining -= len(block)
            return b""
        if request.path == b"/slow":
            return server.NOT_DONE_YET
        if request.path == b"/die":
            request.setHeader(b"content-length", b"1000")
            request.write(b"partial")
            # Long enough for the head and the first bytes to leave, then a reset.
            reactor.callLater(0.05, request.transport.abortConnection)
            return server.NOT_DONE_YET
        if request.path.startswith(b"/status/"):
            request.setResponseCode(int(parts[2]))
            return b"status body"
        body = request.content.read()
        request.setHeader(b"x-origin", b"yes")
        return b"%s %s %d %s" % (request.method, request.uri, len(body), hashlib.md5(body).hexdigest().encode())


class CountingSite(server.Site):
    """
    A Site that counts the connections it accepts (to prove keep-alive reuse) and can wait until all of
    them are closed (so that each test leaves the reactor clean).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.connections = 0
        self.open = {}

    def buildProtocol(self, addr):
        self.connections += 1
        proto = super().buildProtocol(addr)
        closed = self.open[proto] = defer.Deferred()
        lost = proto.connectionLost

        def connectionLost(reason):
            lost(reason)
            del self.open[proto]
            closed.callback(None)

        proto.connectionLost = connectionLost
        return proto

    def allClosed(self):
        return defer.DeferredList(list(self.open.values()))


class RawClient(protocol.Protocol):
    """
    Sends raw bytes and collects everything until the server closes.
    """

    def __init__(self, payload: bytes):
        self.payload = payload
        self.chunks = []
        self.closed = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.payload)

    def dataReceived(self, data):
        self.chunks.append(data)

    def connectionLost(self, reason):
        self.closed.callback(b"".join(self.chunks))


class HTTPTestBase(unittest.TestCase):
    timeout = 20

    """
    Starts an origin and a proxy in front of it.
    """

    routes = """
[route:main/direct]
path = /hello
direct_response.status = 200
direct_response.body = hello from the proxy
[route:main/quick]
prefix = /quick/
prefix_rewrite = /
cluster = origin
timeout = 300ms
[route:main/all]
prefix = /
cluster = origin
"""

    @defer.inlineCallbacks
    def setUp(self):
        self.origin = Origin()
        self.site = CountingSite(self.origin)
        self.site.log = lambda request: None
        self.originPort = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.site)
        self.addCleanup(self.site.allClosed)
        self.addCleanup(self.originPort.stopListening)
        self.service = self.startProxy(self.originPort.getHost().port)
        yield self.service.whenLive
        self.port = self.service.listeners["web"].port.getHost().port
        self.url = f"http://127.0.0.1:{self.port}"

    def startProxy(self, originPort: int, extra: str = "") -> MeshService:
        service = MeshService(loadString(f"""
[mesh]
admin = off
drain_timeout = 1s
[listener:web]
endpoint = tcp:0:interface=127.0.0.1
protocol = http
routes = main
{extra}
{self.routes}
[cluster:origin]
endpoints = tcp:127.0.0.1:{originPort}
connect_timeout = 1s
""", "test.ini"), reactor, seed=7)
        service.startService()
        self.addCleanup(self._stop, service)
        return service

    def _stop(self, service):
        d = service.stopService()
        for cluster in service.clusters.values():
            cluster.pools.closeAll()
        # Let the aborted upstream connections finish closing before trial checks the reactor.
        return d.addCallback(lambda _: deferLater(reactor, 0.01, lambda: None))

    def stat(self, name):
        return self.service.stats.get(name).value

    def raw(self, payload: bytes) -> defer.Deferred:
        client = RawClient(payload)
        d = connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), client)
        return d.addCallback(lambda _: client.closed)


class ProxyTests(HTTPTestBase):
    """
    Requests through the proxy.
    """

    @defer.inlineCallbacks
    def test_get(self):
        """
        A GET reaches the origin with forwarding headers and the answer comes back.
        """
        response = yield treq.get(self.url + "/a/b?c=d", persistent=False)
        body = yield response.content()
        self.assertEqual(response.code, 200)
        self.assertTrue(body.startswith(b"GET /a/b?c=d 0 "), body)
        self.assertEqual(response.headers.getRawHeaders("x-origin"), ["yes"])
        seen = self.origin.requests[0]
        self.assertEqual(seen.getHeader(b"x-forwarded-for"), b"127.0.0.1")
        self.assertEqual(seen.getHeader(b"x-forwarded-proto"), b"http")
        self.assertEqual(len(seen.getHeader(b"x-request-id")), 36)
        self.assertEqual(self.stat("http.web.downstream_rq_2xx"), 1)
        self.assertEqual(self.stat("cluster.origin.upstream_rq_2xx"), 1)

    @defer.inlineCallbacks
    def test_keepAliveReuse(self):
        """
        Sequential requests on one downstream connection reuse one upstream connection.
        """
        payload = b"".join(b"GET /n%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(4))
        payload += b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        data = yield self.raw(payload)
        self.assertEqual(data.count(b"HTTP/1.1 200 OK"), 5)
        # Pipelined requests are answered in order.
        positions = [data.index(b"GET /n%d " % i) for i in range(4)] + [data.index(b"GET /last ")]
        self.assertEqual(positions, sorted(positions))
        self.assertEqual(self.site.connections, 1)
        self.assertEqual(self.stat("cluster.origin.upstream_cx_total"), 1)

    @defer.inlineCallbacks
    def test_postBody(self):
        """
        A request body with a Content-Length reaches the origin intact.
        """
        body = os.urandom(300000)
        response = yield treq.post(self.url + "/upload", data=body, persistent=False)
        text = yield response.content()
        self.assertEqual(text, b"POST /upload 300000 " + hashlib.md5(body).hexdigest().encode())

    @defer.inlineCallbacks
    def test_chunkedUpload(self):
        """
        A chunked request body is forwarded (re-chunked) and arrives whole.
        """
        payload = (b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                   b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        data = yield self.raw(payload)
        self.assertIn(b"POST /up 11 " + hashlib.md5(b"hello world").hexdigest().encode(), data)

    @defer.inlineCallbacks
    def test_expectContinue(self):
        """
        The proxy answers C{Expect: 100-continue} itself, then forwards the body.
        """
        payload = (b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n"
                   b"Connection: close\r\n\r\nabc")
        data = yield self.raw(payload)
        self.assertTrue(data.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"), data[:80])
        self.assertIsNone(self.origin.requests[0].getHeader(b"expect"))

    @defer.inlineCallbacks
    def test_head(self):
        """
        A HEAD response carries the length but no body, and the connection stays usable.
        """
        data = yield self.raw(b"HEAD /size/5000 HTTP/1.1\r\nHost: x\r\n\r\nGET /size/3 HTTP/1.1\r\nHost: x\r\n"
                              b"Connection: close\r\n\r\n")
        first, _, rest = data.partition(b"\r\n\r\n")
        self.assertIn(b"content-length: 5000", first.lower())
        self.assertTrue(rest.startswith(b"HTTP/1.1 200 OK"), rest[:40])
        self.assertTrue(rest.endswith(b"\r\n\r\nxxx"), rest[-40:])

    @defer.inlineCallbacks
    def test_http10(self):
        """
        An HTTP/1.0 client gets its answer and a close.
        """
        data = yield self.raw(b"GET /old HTTP/1.0\r\n\r\n")
        self.assertTrue(data.startswith(b"HTTP/1.1 200 OK"), data[:40])
        self.assertIn(b"GET /old 0", data)

    @defer.inlineCallbacks
    def test_directResponseAndRewrite(self):
        """
        A direct-response route answers from the proxy; a prefix rewrite changes the upstream path.
        """
        response = yield treq.get(self.url + "/hello", persistent=False)
        self.assertEqual((response.code, (yield response.content())), (200, b"hello from the proxy"))
        response = yield treq.get(self.url + "/quick/x", persistent=False)
        self.assertTrue((yield response.content()).startswith(b"GET /x 0"))

    @defer.inlineCallbacks
    def test_noRoute(self):
        """
        A request no route matches is a 404 with the NR flag.
        """
        self.routes = "[route:main/only]\npath = /only\ncluster = origin\n"
        service = self.startProxy(self.originPort.getHost().port, "")
        yield service.whenLive
        port = service.listeners["web"].port.getHost().port
        response = yield treq.get(f"http://127.0.0.1:{port}/", persistent=False)
        yield response.content()
        self.assertEqual(response.code, 404)

    @defer.inlineCallbacks
    def test_largeDownload(self):
        """
        A 20 MiB response streams through intact.
        """
        response = yield treq.get(self.url + "/size/%d" % (20 << 20), persistent=False)
        body = yield response.content()
        self.assertEqual(len(body), 20 << 20)

    test_largeDownload.timeout = 60

    @defer.inlineCallbacks
    def test_upstreamTimeout(self):
        """
        An upstream that does not answer within the route timeout gets a 504 with the UT flag.
        """
        response = yield treq.get(self.url + "/quick/slow", persistent=False)
        self.assertEqual(response.code, 504)
        self.assertEqual((yield response.content()), b"upstream request timeout\n")
        self.assertEqual(self.stat("cluster.origin.upstream_rq_timeout"), 1)

    @defer.inlineCallbacks
    def test_upstreamDiesMidResponse(self):
        """
        An upstream that dies after the head closes the downstream connection: the truncated body never
        looks complete.
        """
        data = yield self.raw(b"GET /die HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertIn(b"200", head.split(b"\r\n")[0])
        self.assertLess(len(body), 1000)
        self.assertEqual(self.stat("http.web.downstream_rq_tx_reset"), 1)

    @defer.inlineCallbacks
    def test_upstreamRefused(self):
        """
        An upstream that refuses connections is a 503 with the UF flag.
        """
        port = self.originPort.getHost().port
        yield self.originPort.stopListening()
        service = self.startProxy(port)
        yield service.whenLive
        proxyPort = service.listeners["web"].port.getHost().port
        response = yield treq.get(f"http://127.0.0.1:{proxyPort}/x", persistent=False)
        self.assertEqual(response.code, 503)
        self.assertIn(b"connection failure", (yield response.content()))
        self.assertEqual(service.stats.get("cluster.origin.upstream_cx_connect_fail").value, 1)

    @defer.inlineCallbacks
    def test_malformedRequest(self):
        """
        A malformed request gets 400 and a close.
        """
        data = yield self.raw(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab")
        self.assertTrue(data.startswith(b"HTTP/1.1 400 Bad Request\r\n"), data[:60])
        self.assertIn(b"connection: close", data.lower())
        self.assertEqual(self.origin.requests, [])

    @defer.inlineCallbacks
    def test_goodRequestBeforeBadOneAnswered(self):
        """
        A good pipelined request is answered before the bad one after it closes the connection.
        """
        data = yield self.raw(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n")
        self.assertTrue(data.startswith(b"HTTP/1.1 200 OK"), data[:40])
        self.assertEqual([r.path for r in self.origin.requests], [b"/ok"])

    @defer.inlineCallbacks
    def test_curlChunkedUpload(self):
        """
        curl's chunked upload of 1 MiB arrives intact.
        """
        curl = shutil.which("curl")
        if curl is None:
            raise unittest.SkipTest("curl is not installed")
        path = self.mktemp()
        body = os.urandom(1 << 20)
        with open(path, "wb") as f:
            f.write(body)
        out, err, code = yield getProcessOutputAndValue(
            curl, ["-sS", "-H", "Transfer-Encoding: chunked", "--data-binary", "@" + path, self.url + "/curl"]
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(out, b"POST /curl %d " % len(body) + hashlib.md5(body).hexdigest().encode())


class WebSocketOrigin(protocol.Protocol):
    """
    A minimal RFC 6455 server: accepts the upgrade, then answers each (masked, unfragmented, short) text
    frame with an unmasked frame carrying the same text upper-cased.
    """

    def connectionMade(self):
        self.buffer = b""
        self.upgraded = False

    def dataReceived(self, data):
        import base64

        self.buffer += data
        if not self.upgraded:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            key = [line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:")][0]
            accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
            self.upgraded = True
            self.buffer = rest
        while len(self.buffer) >= 6:
            length = self.buffer[1] & 0x7F
            if len(self.buffer) < 6 + length:
                return
            mask, payload = self.buffer[2:6], self.buffer[6:6 + length]
            self.buffer = self.buffer[6 + length:]
            text = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)).upper()
            self.transport.write(bytes([0x81, len(text)]) + text)


def maskedFrame(text: bytes) -> bytes:
    """
    A client's masked text frame.
    """
    mask = b"\x01\x02\x03\x04"
    return bytes([0x81, 0x80 | len(text)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(text))


class WebSocketClient(protocol.Protocol):
    """
    Upgrades, sends two frames, collects the answers, and closes.
    """

    def __init__(self):
        self.received = b""
        self.done = defer.Deferred()
        self.closed = defer.Deferred()

    def connectionMade(self):
        self.transport.write(b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")

    def dataReceived(self, data):
        self.received += data
        if b"\r\n\r\n" in self.received and not hasattr(self, "sent"):
            self.sent = True
            self.transport.write(maskedFrame(b"hello") + maskedFrame(b"mesh"))
        if self.received.endswith(b"\x81\x04MESH"):
            self.done.callback(self.received)
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.closed.callback(None)


class WebSocketTests(HTTPTestBase):
    """
    Upgrades become tunnels.
    """

    @defer.inlineCallbacks
    def setUp(self):
        factory = protocol.Factory.forProtocol(WebSocketOrigin)
        self.wsPort = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(self.wsPort.stopListening)
        self.service = self.startProxy(self.wsPort.getHost().port)
        yield self.service.whenLive
        self.port = self.service.listeners["web"].port.getHost().port

    @defer.inlineCallbacks
    def test_webSocketEcho(self):
        """
        A WebSocket handshake goes through with its upgrade headers, and frames flow both ways.
        """
        client = WebSocketClient()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), client)
        received = yield client.done
        head, _, frames = received.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 101 Switching Protocols"), head)
        self.assertIn(b"upgrade: websocket", head.lower())
        self.assertIn(b"connection: upgrade", head.lower())
        self.assertIn(b"sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=", head.lower())
        self.assertEqual(frames, b"\x81\x05HELLO\x81\x04MESH")
        yield client.closed
        yield self.service.listeners["web"].factory.whenDrained()
        self.assertEqual(self.service.stats.get("http.web.downstream_rq_1xx").value, 1)
        self.assertEqual(self.service.stats.get("http.web.downstream_rq_active").value, 0)


class SlowReader(protocol.Protocol):
    """
    Sends a request, then reads only when told to; counts the bytes it got.
    """

    def __init__(self, request: bytes):
        self.request = request
        self.received = 0
        self.digest = hashlib.md5()
        self.headerDone = False
        self.closed = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.request)

    def dataReceived(self, data):
        if not self.headerDone:
            head, sep, data = data.partition(b"\r\n\r\n")
            self.headerDone = bool(sep)
        self.received += len(data)

    def connectionLost(self, reason):
        self.closed.callback(self.received)


class BackpressureTests(HTTPTestBase):
    """
    A slow client pauses the upstream: the proxy never holds more than a bounded amount of a body.
    """

    timeout = 60

    @defer.inlineCallbacks
    def test_slowClientDownload(self):
        """
        While a client reads nothing, the proxy stops reading the upstream; the 64 MiB body then arrives
        whole, and the proxy's buffer stayed bounded throughout.
        """
        size = 64 << 20
        client = SlowReader(b"GET /size/%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % size)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), client)
        client.transport.pauseProducing()
        factory = self.service.listeners["web"].factory
        peak = 0
        for _ in range(20):
            yield deferLater(reactor, 0.05, lambda: None)
            for conn in factory.connections:
                t = conn.transport
                peak = max(peak, len(t.dataBuffer) + t._tempDataLen)
        # Without backpressure the whole 64 MiB would sit in the proxy within a second.
        self.assertLess(peak, 8 << 20)
        client.transport.resumeProducing()
        received = yield client.closed
        self.assertEqual(received, size)


class StallingOrigin(protocol.Protocol):
    """
    Stops reading right after the first bytes of a request until resumed; then counts the body and
    answers with its length.
    """

    instances = None

    def connectionMade(self):
        self.count = 0
        self.head = b""
        StallingOrigin.instances.append(self)

    def dataReceived(self, data):
        if not self.head:
            head, _, data = data.partition(b"\r\n\r\n")
            self.head = head
            self.length = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
            self.transport.pauseProducing()
        self.count += len(data)
        if self.count >= self.length:
            body = b"%d" % self.count
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


class UploadBackpressureTests(HTTPTestBase):
    """
    A slow upstream pauses the client's upload.
    """

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        StallingOrigin.instances = []
        factory = protocol.Factory.forProtocol(StallingOrigin)
        self.originPort = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(self.originPort.stopListening)
        self.service = self.startProxy(self.originPort.getHost().port)
        yield self.service.whenLive
        self.port = self.service.listeners["web"].port.getHost().port

    @defer.inlineCallbacks
    def test_slowUpstreamUpload(self):
        """
        While the upstream reads nothing, the proxy stops reading the client; the 64 MiB upload then
        arrives whole, and the proxy's buffers stayed bounded.
        """
        size = 64 << 20

        class Uploader(protocol.Protocol):
            def connectionMade(self):
                self.transport.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
                self.transport.write(b"u" * size)

            def dataReceived(self, data):
                self.answer = getattr(self, "answer", b"") + data
                if self.answer.endswith(b"%d" % size):
                    self.transport.loseConnection()

            def connectionLost(self, reason):
                self.closed.callback(getattr(self, "answer", b""))

        client = Uploader()
        client.closed = defer.Deferred()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), client)
        cluster = self.service.clusters["origin"]
        peak = 0
        for _ in range(20):
            yield deferLater(reactor, 0.05, lambda: None)
            for pool in cluster.pools.pools.values():
                for conn in pool.connections:
                    t = conn.transport
                    peak = max(peak, len(t.dataBuffer) + t._tempDataLen)
        self.assertLess(peak, 8 << 20)
        for origin in StallingOrigin.instances:
            origin.transport.resumeProducing()
        answer = yield client.closed
        self.assertTrue(answer.endswith(b"\r\n\r\n%d" % size), answer[-100:])


class AccessLogTests(HTTPTestBase):
    """
    A listener's access log, through the whole service.
    """

    @defer.inlineCallbacks
    def test_lineWrittenPerRequest(self):
        """
        Each request gets one line in the listener's access log, written by the time the service stops.
        """
        path = os.path.abspath(self.mktemp())
        service = self.startProxy(self.originPort.getHost().port,
                                  f"access_log = {path}\naccess_log.format = %RESPONSE_CODE% %REQ(:PATH)% "
                                  f"%RESPONSE_FLAGS% %UPSTREAM_CLUSTER%")
        yield service.whenLive
        port = service.listeners["web"].port.getHost().port
        for p in ("/a", "/quick/slow"):
            response = yield treq.get(f"http://127.0.0.1:{port}{p}", persistent=False)
            yield response.content()
        yield self._stop(service)
        with open(path) as f:
            self.assertEqual(f.read(), "200 /a - origin\n504 /slow UT origin\n")
