"""
Unit tests of the HTTP/1.1 connection manager (L{twistedmesh.http.server}) on memory transports and a
Clock: framing of responses, keep-alive rules, limits and timeouts. The upstream is played by a filter
that answers locally, so nothing here touches the router or a socket.
"""

import random
import uuid

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from twistedmesh.http.server import HTTPSettings, newRequestId
from twistedmesh.listener.http import HTTPListenerFactory
from twistedmesh.http.stream import HTTPFilter
from twistedmesh.observability.stats import StatsStore


class Answer(HTTPFilter):
    """
    Answers every request once its body has ended: 200 with the method, path and body length.
    """

    def __init__(self):
        self.body = b""

    def requestHeaders(self, stream):
        if stream.requestEnded:
            return self.answer(stream)

    def requestData(self, stream, data, end):
        self.body += data
        if end:
            return self.answer(stream)

    def answer(self, stream):
        body = b"%s %s %d" % (stream.method, stream.path, len(self.body))
        return stream.respond(200, body)


class Hold(HTTPFilter):
    """
    Never answers: the test answers through the stream it records.
    """

    streams = None

    def requestHeaders(self, stream):
        Hold.streams.append(stream)


def connect(maker=Answer, **settings):
    """
    A connection manager on a memory transport; returns (protocol, transport, clock, stats).
    """
    clock = Clock()
    stats = StatsStore()
    factory = HTTPListenerFactory(HTTPSettings("web", [lambda stream: maker()], stats, clock, **settings), stats)
    proto = factory.buildProtocol(None)
    proto.factory = factory
    transport = StringTransport(peerAddress=IPv4Address("TCP", "10.1.2.3", 5555))
    proto.makeConnection(transport)
    return proto, transport, clock, stats


class FramingTests(unittest.TestCase):
    """
    How responses are framed and when connections stay open.
    """

    def test_keepAliveAndPipelining(self):
        """
        Pipelined requests are answered in order on one connection, each with a Content-Length.
        """
        proto, t, clock, stats = connect()
        proto.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        out = t.value()
        self.assertEqual(out.count(b"HTTP/1.1 200 OK\r\n"), 2)
        self.assertLess(out.index(b"GET /a 0"), out.index(b"POST /b 3"))
        self.assertIn(b"content-length: 8\r\n", out)
        self.assertFalse(t.disconnecting)
        self.assertEqual(stats.get("http.web.downstream_rq_2xx").value, 2)
        self.assertEqual(stats.get("http.web.downstream_rq_active").value, 0)

    def test_connectionClose(self):
        """
        C{Connection: close} is honoured: the answer says so and the connection closes.
        """
        proto, t, clock, stats = connect()
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertIn(b"connection: close\r\n", t.value())
        self.assertTrue(t.disconnecting)

    def test_http10KeepAlive(self):
        """
        An HTTP/1.0 client asking for keep-alive gets it, and one that does not is closed.
        """
        proto, t, clock, stats = connect()
        proto.dataReceived(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        self.assertIn(b"connection: keep-alive\r\n", t.value())
        self.assertFalse(t.disconnecting)
        proto.dataReceived(b"GET / HTTP/1.0\r\n\r\n")
        self.assertTrue(t.disconnecting)

    def test_chunkedResponse(self):
        """
        A streamed response without a length is chunked for an HTTP/1.1 client, with trailers.
        """
        Hold.streams = []
        proto, t, clock, stats = connect(Hold)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        [stream] = Hold.streams
        stream.status = 200
        stream.responseHeaders = []
        stream.sendResponseHeaders()
        stream.sendResponseData(b"hello", False)
        stream.sendResponseTrailers([(b"grpc-status", b"0")])
        self.assertEqual(t.value(), b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                                    b"5\r\nhello\r\n0\r\ngrpc-status: 0\r\n\r\n")

    def test_http10StreamedResponseCloses(self):
        """
        A streamed response without a length to an HTTP/1.0 client ends with the connection.
        """
        Hold.streams = []
        proto, t, clock, stats = connect(Hold)
        proto.dataReceived(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        [stream] = Hold.streams
        stream.status = 200
        stream.responseHeaders = []
        stream.sendResponseHeaders()
        stream.sendResponseData(b"body", True)
        self.assertNotIn(b"transfer-encoding", t.value())
        self.assertTrue(t.value().endswith(b"\r\n\r\nbody"))
        self.assertTrue(t.disconnecting)

    def test_headNoBody(self):
        """
        The answer to HEAD has no body bytes even when the answer carries one.
        """
        proto, t, clock, stats = connect()
        proto.dataReceived(b"HEAD /x HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(t.value().endswith(b"\r\n\r\n"), t.value())

    def test_forwardingHeaders(self):
        """
        The connection manager appends the peer to x-forwarded-for, sets x-forwarded-proto, adds an
        x-request-id, and strips hop-by-hop fields.
        """
        Hold.streams = []
        proto, t, clock, stats = connect(Hold)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-Proto: https\r\n"
                           b"Connection: x-drop\r\nX-Drop: 1\r\nKeep-Alive: 5\r\n\r\n")
        [stream] = Hold.streams
        names = [n for n, _ in stream.requestHeaders]
        self.assertEqual(stream.authority, b"h")
        self.assertIn((b"x-forwarded-for", b"1.1.1.1, 10.1.2.3"), stream.requestHeaders)
        self.assertIn((b"x-forwarded-proto", b"http"), stream.requestHeaders)
        self.assertNotIn(b"x-drop", names)
        self.assertNotIn(b"keep-alive", names)
        self.assertEqual(names.count(b"x-request-id"), 1)

    def test_requestIdIsUUID4(self):
        """
        A generated x-request-id is a version 4 UUID in its canonical form, drawn from the injected random
        (the same seed gives the same ids), with every bit but the version and variant random.
        """
        seen = set()
        ors, ands = 0, (1 << 128) - 1
        for seed in range(2000):
            value = newRequestId(random.Random(seed))
            self.assertEqual(value, newRequestId(random.Random(seed)))
            parsed = uuid.UUID(value.decode("ascii"))
            self.assertEqual((parsed.version, parsed.variant), (4, uuid.RFC_4122))
            self.assertEqual(str(parsed).encode("ascii"), value)
            seen.add(value)
            ors, ands = ors | parsed.int, ands & parsed.int
        self.assertEqual(len(seen), 2000)
        # Over 2000 draws each random bit has been both 0 and 1; the fixed bits are the version and variant.
        self.assertEqual(ors ^ ands, ((1 << 128) - 1) ^ (0xF << 76) ^ (0x3 << 62))

    def test_maxRequestsPerConnection(self):
        """
        The last request allowed on a connection is answered with C{connection: close}.
        """
        proto, t, clock, stats = connect(maxRequestsPerConnection=2)
        proto.dataReceived(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertFalse(t.disconnecting)
        proto.dataReceived(b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(t.value().endswith(b"GET /2 0"))
        self.assertIn(b"connection: close", t.value().split(b"GET /1 0")[1])
        self.assertTrue(t.disconnecting)


class LimitTests(unittest.TestCase):
    """
    Bad and oversized requests.
    """

    def test_malformedIs400AndClose(self):
        """
        A malformed request gets 400 with the standard phrase (not the parser's words) and a close.
        """
        proto, t, clock, stats = connect()
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n")
        self.assertTrue(t.value().startswith(b"HTTP/1.1 400 Bad Request\r\n"))
        self.assertTrue(t.value().endswith(b"\r\n\r\nBad Request\n"))
        self.assertTrue(t.disconnecting)
        self.assertEqual(stats.get("http.web.downstream_cx_protocol_error").value, 1)
        self.assertEqual(stats.get("http.web.downstream_rq_4xx").value, 1)

    def test_headersTooLarge(self):
        """
        A head over C{max_request_headers_size} gets 431.
        """
        proto, t, clock, stats = connect(maxHeaderBytes=100)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200 + b"\r\n\r\n")
        self.assertTrue(t.value().startswith(b"HTTP/1.1 431 "), t.value()[:40])

    def test_tooManyHeaders(self):
        """
        More fields than C{max_request_headers_count} gets 431.
        """
        proto, t, clock, stats = connect(maxHeaders=3)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n")
        self.assertTrue(t.value().startswith(b"HTTP/1.1 431 "), t.value()[:40])

    def test_badChunkMidBody(self):
        """
        A malformed chunk in the body of the request being served ends it with 400 and a close.
        """
        Hold.streams = []
        proto, t, clock, stats = connect(Hold)
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n")
        [stream] = Hold.streams
        self.assertEqual(stream.status, 400)
        self.assertTrue(stream.completed)
        self.assertTrue(t.disconnecting)

    def test_goodThenBad(self):
        """
        A good request pipelined before a bad one is answered; the bad one is answered 400 only if no
        response is under way, and the connection closes.
        """
        proto, t, clock, stats = connect()
        proto.dataReceived(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\n\r\n")
        self.assertIn(b"GET /ok 0", t.value())
        self.assertIn(b"HTTP/1.1 400 Bad Request", t.value())
        self.assertTrue(t.disconnecting)

    def test_requestHeadersTimeout(self):
        """
        A head not complete within C{request_headers_timeout} gets 408 and a close.
        """
        proto, t, clock, stats = connect(requestHeadersTimeout=5.0)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n")
        clock.advance(4.9)
        self.assertEqual(t.value(), b"")
        clock.advance(0.2)
        self.assertTrue(t.value().startswith(b"HTTP/1.1 408 Request Timeout\r\n"), t.value()[:40])
        self.assertTrue(t.disconnecting)
        self.assertEqual(stats.get("http.web.downstream_rq_timeout").value, 1)

    def test_requestHeadersTimeoutPerRequest(self):
        """
        The head timeout runs per request, not per connection: a slow stream of quick requests is fine.
        """
        proto, t, clock, stats = connect(requestHeadersTimeout=5.0)
        for i in range(3):
            proto.dataReceived(b"GET / HTTP/1.1\r\n")
            clock.advance(3)
            proto.dataReceived(b"Host: x\r\n\r\n")
            clock.advance(3)
        self.assertEqual(t.value().count(b"200 OK"), 3)
        self.assertFalse(t.disconnecting)

    def test_idleTimeout(self):
        """
        A connection with no request for C{idle_timeout} is closed.
        """
        proto, t, clock, stats = connect(idleTimeout=30.0)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        clock.advance(29)
        self.assertFalse(t.disconnecting)
        clock.advance(2)
        self.assertTrue(t.disconnecting)
        self.assertEqual(stats.get("http.web.downstream_cx_idle_timeout").value, 1)

    def test_connectRefused(self):
        """
        CONNECT is answered 405 and the connection closed.
        """
        proto, t, clock, stats = connect()
        proto.dataReceived(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        self.assertTrue(t.value().startswith(b"HTTP/1.1 405 "), t.value()[:40])
        self.assertTrue(t.disconnecting)


class PipelineErrorTests(unittest.TestCase):
    """
    A malformed request in a pipeline ends the connection after the good ones before it.
    """

    def test_goodPipelinedAnsweredBeforeBad(self):
        """
        Requests parsed before a malformed one are all answered; the last answer says close.
        """
        Hold.streams = []
        proto, t, clock, stats = connect(Hold)
        proto.dataReceived(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n"
                           b"GET /3 HTTP/1.1\r\n\r\n")
        for expected in (b"/1", b"/2"):
            stream = Hold.streams[-1]
            self.assertEqual(stream.path, expected)
            stream.status = 200
            stream.responseHeaders = [(b"content-length", b"0")]
            stream.sendResponseHeaders(True)
        self.assertEqual(len(Hold.streams), 2)
        out = t.value()
        self.assertEqual(out.count(b"HTTP/1.1 200 OK"), 2)
        self.assertNotIn(b"connection: close", out.split(b"\r\n\r\n")[0])
        self.assertTrue(out.endswith(b"connection: close\r\n\r\n"), out)
        self.assertTrue(t.disconnecting)
        self.assertEqual(stats.get("http.web.downstream_rq_active").value, 0)


class DrainTests(unittest.TestCase):
    """
    Draining closes idle keep-alive connections at once and busy ones after their answer.
    """

    def test_idleClosesAtOnce(self):
        """
        An idle keep-alive connection closes as soon as the listener drains.
        """
        proto, t, clock, stats = connect()
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertFalse(t.disconnecting)
        proto.factory.drain()
        self.assertTrue(t.disconnecting)

    def test_busyClosesAfterAnswer(self):
        """
        A connection with a request in progress answers it with C{connection: close}, then closes.
        """
        Hold.streams = []
        proto, t, clock, stats = connect(Hold)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        proto.factory.drain()
        self.assertFalse(t.disconnecting)
        [stream] = Hold.streams
        stream.status = 204
        stream.sendResponseHeaders(True)
        self.assertIn(b"connection: close", t.value())
        self.assertTrue(t.disconnecting)

    def test_declinedUpgradeCloses(self):
        """
        An upgrade the upstream declines (no 101) is answered and the connection closed.
        """
        Hold.streams = []
        proto, t, clock, stats = connect(Hold)
        proto.dataReceived(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        [stream] = Hold.streams
        self.assertEqual(stream.upgrade, b"websocket")
        self.assertIn((b"upgrade", b"websocket"), stream.requestHeaders)
        stream.status = 404
        stream.responseHeaders = [(b"content-length", b"0")]
        stream.sendResponseHeaders(True)
        self.assertIn(b"connection: close", t.value())
        self.assertTrue(t.disconnecting)


class PipelineOrderTests(unittest.TestCase):
    """
    Interim and refusal answers of pipelined requests wait for their turn.
    """

    def test_pipelinedExpectContinue(self):
        """
        A pipelined request's C{100 Continue} is sent when its turn comes, never inside an earlier answer.
        """
        Hold.streams = []
        proto, t, clock, stats = connect(Hold)
        proto.dataReceived(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n"
                           b"POST /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
        self.assertNotIn(b"100 Continue", t.value())
        [first] = Hold.streams
        first.status = 200
        first.responseHeaders = [(b"content-length", b"2")]
        first.sendResponseHeaders()
        first.sendResponseData(b"ok", True)
        self.assertTrue(t.value().endswith(b"\r\n\r\nokHTTP/1.1 100 Continue\r\n\r\n"), t.value())
        self.assertEqual(Hold.streams[1].path, b"/2")

    def test_pipelinedConnect(self):
        """
        A CONNECT pipelined behind another request is refused after that request's answer, not before.
        """
        Hold.streams = []
        proto, t, clock, stats = connect(Hold)
        proto.dataReceived(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nCONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n")
        self.assertEqual(t.value(), b"")
        [first] = Hold.streams
        first.status = 204
        first.sendResponseHeaders(True)
        out = t.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 204 No Content\r\n"), out)
        self.assertIn(b"HTTP/1.1 405 ", out)
        self.assertTrue(t.disconnecting)


class FilterFailureTests(unittest.TestCase):
    """
    A failing filter ends its own request, not the connection's reading.
    """

    def test_errbackResumesReading(self):
        """
        After a filter's Deferred fails (500), the keep-alive connection reads and answers the next request.
        """
        from twisted.internet.defer import Deferred

        held = []

        class Fails(HTTPFilter):
            def requestHeaders(self, stream):
                if stream.path == b"/bad":
                    d = Deferred()
                    held.append(d)
                    return d
                return stream.respond(200, b"fine")

        proto, t, clock, stats = connect(Fails)
        proto.dataReceived(b"GET /bad HTTP/1.1\r\nHost: x\r\n\r\n")
        held[0].errback(ValueError("backend down"))
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertIn(b"HTTP/1.1 500 ", t.value())
        self.assertEqual(proto.pauses, 0)
        self.assertEqual(t.producerState, "producing")
        proto.dataReceived(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(t.value().endswith(b"fine"))


class ResponseGateTests(unittest.TestCase):
    """
    The active response's producer is paused while the client is slow or a filter holds the response.
    """

    def test_filterHoldOutlastsTransport(self):
        """
        A transport that drains does not resume an upstream a response filter still holds.
        """
        from twisted.internet.testing import StringTransport as Upstream

        Hold.streams = []
        proto, t, clock, stats = connect(Hold)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        [stream] = Hold.streams
        upstream = Upstream()
        proto.registerResponseProducer(upstream)
        proto.pauseResponse(stream)
        self.assertEqual(upstream.producerState, "paused")
        proto.responseGate.pauseProducing()  # the downstream transport's buffer filled...
        proto.responseGate.resumeProducing()  # ...and drained
        self.assertEqual(upstream.producerState, "paused")
        proto.resumeResponse(stream)
        self.assertEqual(upstream.producerState, "producing")
        proto.responseGate.pauseProducing()
        proto.unregisterResponseProducer()
        self.assertEqual(upstream.producerState, "producing", "a detached upstream is left reading")


class LastRequestTests(unittest.TestCase):
    """
    Requests pipelined behind the last one a connection may answer are ignored, not counted.
    """

    def test_behindMaxRequests(self):
        """
        With C{max_requests_per_connection = 1}, a second pipelined request is neither answered nor counted.
        """
        proto, t, clock, stats = connect(maxRequestsPerConnection=1)
        proto.dataReceived(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(t.value().count(b"HTTP/1.1 200"), 1)
        self.assertEqual(stats.get("http.web.downstream_rq_total").value, 1)
        self.assertEqual(stats.get("http.web.downstream_rq_active").value, 0)
        self.assertTrue(t.disconnecting)


class TracePropagationTests(unittest.TestCase):
    """
    With C{tracing.sample_rate} set, the connection manager propagates trace context to the upstream.
    """

    def test_childSpanForUpstream(self):
        """
        An incoming traceparent reaches the filters (and so the upstream) with the proxy's own span as parent.
        """
        Hold.streams = []
        proto, t, clock, stats = connect(Hold, traceSampleRate=0.01)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n"
                           b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n")
        [stream] = Hold.streams
        value = stream.getRequestHeader(b"traceparent")
        version, traceId, parent, flags = value.split(b"-")
        self.assertEqual((version, traceId, flags), (b"00", b"0af7651916cd43dd8448eb211c80319c", b"01"))
        self.assertNotEqual(parent, b"b7ad6b7169203331")
        self.assertEqual(stream.state["trace"].parentId, b"b7ad6b7169203331")

    def test_offByDefault(self):
        """
        Without C{tracing.sample_rate}, no trace header is added.
        """
        Hold.streams = []
        proto, t, clock, stats = connect(Hold)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        [stream] = Hold.streams
        self.assertIsNone(stream.getRequestHeader(b"traceparent"))
