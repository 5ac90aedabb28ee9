"""
Tests for spans and their export: L{twistedmesh.observability.tracing.SpanRecorder} (what a finished stream
becomes), L{twistedmesh.observability.export} (batching, the bounded queue, failures, the Zipkin and OTLP
JSON), the C{tracing.*} configuration, and two chained proxies reporting to a collector on loopback.
"""

from __future__ import annotations

import json
import random
from typing import List

import treq
from twisted.internet import defer, error, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger
from twisted.trial import unittest
from twisted.web import resource, server

from twistedmesh.config import ConfigErrors, loadString
from twistedmesh.config.tracing import TracingConfig, collectorURL, listenerSampleRate
from twistedmesh.http.stream import HTTPFilter
from twistedmesh.observability.export import (
    MAX_IN_FLIGHT,
    SpanExporter,
    buildExporter,
    encodeOTLP,
    encodeZipkin,
    treqPost,
)
from twistedmesh.observability.stats import StatsStore
from twistedmesh.observability.tracing import Span, SpanRecorder
from twistedmesh.service import MeshService

from .support import freePort, port, proxyConfig, requireCurlHTTP2, startEcho, startService, waitFor

from .test_h2 import h2
from .test_server import connect

TRACE = b"0af7651916cd43dd8448eb211c80319c"
SPAN = b"b7ad6b7169203331"
TP = b"00-" + TRACE + b"-" + SPAN + b"-01"


class Spans(list):
    """
    Stands in for an exporter: keeps what it is given.
    """

    add = list.append


class Answering(HTTPFilter):
    """
    Answers at once with the status the request's path names (C{/503} → 503), like a router would.
    """

    def requestHeaders(self, stream):
        stream.upstreamCluster = type("C", (), {"name": "api"})()
        stream.upstreamHost = type("H", (), {"endpoint": "tcp:127.0.0.1:9001"})()
        return stream.respond(int(stream.path[1:]), b"answer")


class Held(HTTPFilter):
    """
    Never answers: the test does, through the streams it records.
    """

    streams: List = []

    def requestHeaders(self, stream):
        Held.streams.append(stream)


def tags(span: Span) -> dict:
    return dict(span.tags)


class RecorderTests(unittest.TestCase):
    """
    L{SpanRecorder} in the HTTP/1.1 and HTTP/2 connection managers (memory transports, a L{Clock}).
    """

    def h1(self, maker=Answering, rate=1.0, accessLog=None):
        # Wired as the service wires a listener: the access logger and the span recorder side by side.
        spans = Spans()
        recorder = SpanRecorder(spans, nodeId="edge-1")
        proto, t, clock, stats = connect(maker, traceSampleRate=rate, accessLog=accessLog, spans=recorder)
        return proto, t, clock, spans

    def test_okSpan(self):
        """
        A sampled 200 gives one SERVER span: the incoming span is its parent, its id is the parent id sent
        upstream, and it carries Envoy's tags; no error tag.
        """
        proto, t, clock, spans = self.h1()
        proto.dataReceived(b"GET /200 HTTP/1.1\r\nHost: api.example\r\nUser-Agent: curl/8\r\n"
                           b"X-Request-Id: rid-1\r\ntraceparent: " + TP + b"\r\n\r\n")
        [span] = spans
        self.assertEqual((span.traceId, span.parentId), (TRACE, SPAN))
        self.assertEqual(len(span.spanId), 16)
        self.assertNotEqual(span.spanId, SPAN)
        self.assertEqual(tags(span), {
            "component": "proxy", "node_id": "edge-1", "http.method": "GET",
            "http.url": "http://api.example/200", "http.protocol": "HTTP/1.1", "http.status_code": "200",
            "response_flags": "-", "upstream_cluster": "api", "upstream_address": "127.0.0.1:9001",
            "peer.address": "10.1.2.3:5555", "guid:x-request-id": "rid-1", "user_agent": "curl/8",
            "request_size": "0", "response_size": str(len(b"answer")),
        })
        self.assertFalse(span.error)
        self.assertEqual(span.remote, ("10.1.2.3", 5555))
        self.assertEqual(span.name, "ingress")

    def test_longTagsCut(self):
        """
        C{http.url} and C{user_agent}, which a client chooses, are cut at MAX_TAG_LENGTH characters.
        """
        from twistedmesh.observability.tracing import MAX_TAG_LENGTH
        Held.streams = []
        proto, t, clock, spans = self.h1(Held)
        proto.dataReceived(b"GET /" + b"p" * 5000 + b" HTTP/1.1\r\nHost: api.example\r\nUser-Agent: " + b"u" * 5000
                           + b"\r\n\r\n")
        Held.streams[0].respond(200)
        [span] = spans
        found = tags(span)
        self.assertEqual(found["http.url"], ("http://api.example/" + "p" * 5000)[:MAX_TAG_LENGTH])
        self.assertEqual(found["user_agent"], "u" * MAX_TAG_LENGTH)

    def test_nonUTF8URL(self):
        """
        Bytes that are not UTF-8 in the URL's parts are written as C{\\xNN}, each part on its own: a
        truncated character at the end of the authority does not join the path's bytes.
        """
        Held.streams = []
        proto, t, clock, spans = self.h1(Held)
        proto.dataReceived(b"GET /caf%C3%A9 HTTP/1.1\r\nHost: x\r\nUser-Agent: \xc3\xa9\xff\r\n\r\n")
        [stream] = Held.streams
        stream.authority = b"h\xc3"
        stream.path = b"\xa9/\xc3\xa9"
        stream.respond(200)
        [span] = spans
        self.assertEqual(tags(span)["http.url"], "http://h\\xc3\\xa9/\u00e9")
        self.assertEqual(tags(span)["user_agent"], "\u00e9\\xff")

    def test_peers(self):
        """
        The downstream peer, as C{peer.address} and the span's C{remote}: IPv6 in brackets, a UNIX socket
        by its path (no remote), none at all without a tag.
        """
        from twisted.internet.address import IPv6Address, UNIXAddress
        Held.streams = []
        proto, t, clock, spans = self.h1(Held)
        for peer in (IPv6Address("TCP", "::1", 8080), UNIXAddress(b"/run/mesh.sock"), None):
            proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            stream = Held.streams[-1]
            stream.downstreamAddress = peer
            stream.respond(200)
        ipv6, unix, none = spans
        self.assertEqual((tags(ipv6)["peer.address"], ipv6.remote), ("[::1]:8080", ("::1", 8080)))
        self.assertEqual((tags(unix)["peer.address"], unix.remote), ("/run/mesh.sock", None))
        self.assertEqual(("peer.address" in tags(none), none.remote), (False, None))
        self.assertEqual([k for k, v in none.tags], [
            "component", "node_id", "http.method", "http.url", "http.protocol", "http.status_code",
            "response_flags", "upstream_cluster", "guid:x-request-id", "user_agent", "request_size",
            "response_size"])

    def test_parentIdIsWhatWentUpstream(self):
        """
        The span's id is the one the upstream sees as its parent in C{traceparent}.
        """
        Held.streams = []
        proto, t, clock, spans = self.h1(Held)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        [stream] = Held.streams
        upstream = stream.getRequestHeader(b"traceparent").split(b"-")
        stream.respond(204)
        [span] = spans
        self.assertEqual((upstream[1], upstream[2]), (span.traceId, span.spanId))
        self.assertIsNone(span.parentId)

    def test_timesFromClock(self):
        """
        Start and duration come from the injected clock.
        """
        Held.streams = []
        proto, t, clock, spans = self.h1(Held)
        clock.advance(1000)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        clock.advance(0.25)
        Held.streams[0].respond(200, b"late")
        [span] = spans
        self.assertEqual((span.start, span.duration), (1000.0, 0.25))

    def test_5xxIsError(self):
        """
        A 503 is tagged C{error: true}.
        """
        proto, t, clock, spans = self.h1()
        proto.dataReceived(b"GET /503 HTTP/1.1\r\nHost: x\r\n\r\n")
        [span] = spans
        self.assertTrue(span.error)
        self.assertEqual((tags(span)["error"], tags(span)["http.status_code"]), ("true", "503"))

    def test_resetIsError(self):
        """
        A response cut short by a reset is an error, whatever its status said.
        """
        Held.streams = []
        proto, t, clock, spans = self.h1(Held)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        stream = Held.streams[0]
        stream.status = 200
        stream.responseHeaders = [(b"content-length", b"10")]
        stream.sendResponseHeaders()
        stream.reset("upstream_reset_after_response_started{remote_reset}")
        [span] = spans
        self.assertEqual((tags(span)["http.status_code"], tags(span)["error"]), ("200", "true"))

    def test_downstreamDisconnectIsError(self):
        """
        A client that goes away before its answer leaves an error span with Envoy's C{DC} flag.
        """
        Held.streams = []
        proto, t, clock, spans = self.h1(Held)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        proto.connectionLost(error.ConnectionLost())
        [span] = spans
        self.assertEqual((tags(span)["response_flags"], tags(span)["error"]), ("DC", "true"))

    def test_unsampled(self):
        """
        No span for a request the client said is not sampled, nor for one the rate leaves out.
        """
        proto, t, clock, spans = self.h1(rate=1.0)
        proto.dataReceived(b"GET /200 HTTP/1.1\r\nHost: x\r\ntraceparent: " + TP[:-2] + b"00\r\n\r\n")
        proto, t, clock, spans2 = self.h1(rate=0.0)
        proto.dataReceived(b"GET /200 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual((spans, spans2), ([], []))

    def test_rate(self):
        """
        Without incoming decisions, about C{rate} of the requests are sampled (a seeded random).
        """
        spans = Spans()
        proto, t, clock, stats = connect(Answering, traceSampleRate=0.25, random=random.Random(5),
                                         accessLog=SpanRecorder(spans))
        proto.dataReceived(b"GET /200 HTTP/1.1\r\nHost: x\r\n\r\n" * 400)
        self.assertEqual(t.value().count(b"HTTP/1.1 200"), 400)
        self.assertTrue(70 <= len(spans) <= 130, len(spans))

    def test_incomingSampledWins(self):
        """
        An incoming sampled decision (B3 here) is honoured even at a rate of 0.
        """
        proto, t, clock, spans = self.h1(rate=0.0)
        proto.dataReceived(b"GET /200 HTTP/1.1\r\nHost: x\r\nx-b3-traceid: " + TRACE + b"\r\nx-b3-spanid: " + SPAN
                           + b"\r\nx-b3-sampled: 1\r\n\r\n")
        [span] = spans
        self.assertEqual((span.traceId, span.parentId), (TRACE, SPAN))

    def test_malformedStartsNewTrace(self):
        """
        A malformed C{traceparent} starts a new trace (sampled by the rate), without an error.
        """
        proto, t, clock, spans = self.h1()
        proto.dataReceived(b"GET /200 HTTP/1.1\r\nHost: x\r\ntraceparent: 00-zz-" + SPAN + b"-01\r\n\r\n")
        [span] = spans
        self.assertIsNone(span.parentId)
        self.assertNotEqual(span.traceId, TRACE)
        self.assertEqual(len(span.traceId), 32)
        self.assertNotIn("error", tags(span))
        self.assertIn(b"HTTP/1.1 200", t.value())

    def test_accessLogStillLogged(self):
        """
        Every stream, sampled or not, still reaches the listener's access logger.
        """
        logged = []

        class AccessLog:
            def log(self, stream, endTime):
                logged.append(stream.path)

        proto, t, clock, spans = self.h1(rate=0.0, accessLog=AccessLog())
        proto.dataReceived(b"GET /200 HTTP/1.1\r\nHost: x\r\n\r\nGET /204 HTTP/1.1\r\nHost: x\r\n"
                           b"traceparent: " + TP + b"\r\n\r\n")
        self.assertEqual(logged, [b"/200", b"/204"])
        self.assertEqual(len(spans), 1)

    def test_unsampledCostsNoCall(self):
        """
        The connection managers (HTTP/1.1 and HTTP/2) check the sampling decision themselves: the recorder
        hears of sampled streams only. A recorder standing where the access logger stands (the older
        wiring) still records sampled spans and passes every stream on.
        """
        recorded = []

        class Recorder(SpanRecorder):
            def record(self, stream, trace, endTime):
                recorded.append(stream.path)
                SpanRecorder.record(self, stream, trace, endTime)

        spans = Spans()
        proto, t, clock, stats = connect(Answering, traceSampleRate=0.0, spans=Recorder(spans))
        proto.dataReceived(b"GET /200 HTTP/1.1\r\nHost: x\r\n\r\nGET /204 HTTP/1.1\r\nHost: x\r\n"
                           b"traceparent: " + TP + b"\r\n\r\n")
        peer, h2proto, clock, stats = h2(lambda s: Answering(), traceSampleRate=0.0, spans=Recorder(spans))
        for path, extra in [(b"/200", []), (b"/502", [(b"traceparent", TP)])]:
            peer.request([(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"x"), (b":path", path)]
                         + extra)
        self.assertEqual(recorded, [b"/204", b"/502"])
        self.assertEqual(len(spans), 2)
        logged = []

        class AccessLog:
            def log(self, stream, endTime):
                logged.append(stream.path)

        older = Spans()
        proto, t, clock, stats = connect(Answering, traceSampleRate=0.0, accessLog=SpanRecorder(older, AccessLog()))
        proto.dataReceived(b"GET /200 HTTP/1.1\r\nHost: x\r\n\r\nGET /204 HTTP/1.1\r\nHost: x\r\n"
                           b"traceparent: " + TP + b"\r\n\r\n")
        self.assertEqual((logged, len(older)), ([b"/200", b"/204"], 1))

    def test_brokenExporterDoesNotRaise(self):
        """
        An exporter that raises costs the span, not the connection.
        """

        class Broken:
            def add(self, span):
                raise RuntimeError("boom")

        for wiring in ("spans", "accessLog"):  # beside the access logger, or in its place
            proto, t, clock, stats = connect(Answering, traceSampleRate=1.0, **{wiring: SpanRecorder(Broken())})
            proto.dataReceived(b"GET /200 HTTP/1.1\r\nHost: x\r\n\r\nGET /200 HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertEqual(t.value().count(b"HTTP/1.1 200"), 2)
            self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_h2(self):
        """
        The HTTP/2 connection manager records the same span, with C{http.protocol: HTTP/2}.
        """
        spans = Spans()
        peer, proto, clock, stats = h2(lambda s: Answering(), traceSampleRate=1.0, spans=SpanRecorder(spans))
        peer.request([(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"x"), (b":path", b"/502"),
                      (b"traceparent", TP)])
        [span] = spans
        self.assertEqual((span.traceId, span.parentId, span.error), (TRACE, SPAN, True))
        self.assertEqual((tags(span)["http.protocol"], tags(span)["http.url"]), ("HTTP/2", "https://x/502"))

    def test_requestIdIsTraceId(self):
        """
        A request that brings neither an x-request-id nor a trace gets both from one draw, in HTTP/1.1 and
        HTTP/2: the request id's digits are the trace id, so the access log's request id finds the trace.
        A request id the client sent is kept, and the trace is then drawn apart.
        """
        proto, t, clock, spans = self.h1()
        proto.dataReceived(b"GET /200 HTTP/1.1\r\nHost: x\r\n\r\n"
                           b"GET /200 HTTP/1.1\r\nHost: x\r\nx-request-id: from-client\r\n\r\n")
        first, second = spans
        self.assertEqual(tags(first)["guid:x-request-id"].replace("-", "").encode("ascii"), first.traceId)
        self.assertEqual(tags(second)["guid:x-request-id"], "from-client")
        self.assertEqual(len(second.traceId), 32)

        # The access log says so too: %TRACE_ID% is the request id's digits, sampled or not.
        from twisted.internet import reactor as globalReactor
        from twisted.internet.task import Clock

        from twistedmesh.config.accesslog import AccessLogConfig
        from twistedmesh.observability.accesslog import AccessLogger, MemorySink

        sink = MemorySink()
        logger = AccessLogger(AccessLogConfig(path="stdout", format="%REQ(X-REQUEST-ID)% %TRACE_ID%"), Clock(),
                              globalReactor, sink=sink)
        proto, t, clock, stats = connect(Answering, traceSampleRate=0.0, accessLog=logger, spans=SpanRecorder(Spans()))
        proto.dataReceived(b"GET /200 HTTP/1.1\r\nHost: x\r\n\r\n")
        [line] = sink.lines
        requestId, traceId = line.split()
        self.assertEqual(requestId.replace(b"-", b""), traceId)

        h2spans = Spans()
        peer, proto, clock, stats = h2(lambda s: Answering(), traceSampleRate=1.0, spans=SpanRecorder(h2spans))
        peer.request([(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"x"), (b":path", b"/200")])
        [only] = h2spans
        self.assertEqual(tags(only)["guid:x-request-id"].replace("-", "").encode("ascii"), only.traceId)


def span(n: int = 1, parent: bool = True, trace: bytes = TRACE, error: bool = False) -> Span:
    return Span(trace, b"%016x" % n, SPAN if parent else None, "main/api", 1700000000.5, 0.0125,
                [("http.method", "GET"), ("http.status_code", "503" if error else "200")], error,
                ("10.1.2.3", 5555))


class Collector:
    """
    A memory stand-in for the collector's HTTP client: records each post and answers it when told.
    """

    def __init__(self):
        self.posts: List = []  # (url, body, Deferred)

    def __call__(self, url, body):
        d = defer.Deferred()
        self.posts.append((url, body, d))
        return d

    def spans(self, i: int) -> list:
        return json.loads(self.posts[i][1])


def exporter(provider="zipkin", **kw):
    clock = Clock()
    stats = StatsStore()
    post = Collector()
    exp = SpanExporter(provider, "http://c/api/v2/spans", "mesh", clock, stats, post, **kw)
    return exp, post, clock, stats


def count(stats, name: str, provider: str = "zipkin") -> int:
    return stats.get(f"tracing.{provider}.{name}").value


class ExporterTests(unittest.TestCase):
    """
    L{SpanExporter}: batching, the timer, the bounded queue, failures, close.
    """

    def test_batchBySize(self):
        """
        A batch goes as soon as it fills; a partial one waits.
        """
        exp, post, clock, stats = exporter(batchSize=3, flushInterval=5)
        for i in range(1, 6):
            exp.add(span(i))
        self.assertEqual(len(post.posts), 1)
        self.assertEqual([s["id"] for s in post.spans(0)], ["%016x" % i for i in (1, 2, 3)])
        self.assertEqual(len(exp.queue), 2)
        post.posts[0][2].callback(202)
        self.assertEqual((count(stats, "reports_sent"), count(stats, "spans_sent")), (1, 3))

    def test_batchByTimer(self):
        """
        A partial batch goes C{flush_interval} after its first span was queued.
        """
        exp, post, clock, stats = exporter(batchSize=10, flushInterval=5)
        exp.add(span(1))
        clock.advance(3)
        exp.add(span(2))
        clock.advance(1.9)
        self.assertEqual(post.posts, [])
        clock.advance(0.1)
        self.assertEqual(len(post.spans(0)), 2)
        self.assertEqual(count(stats, "timer_flushed"), 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_queueOverflowCounted(self):
        """
        While reports are outstanding, spans queue up to C{queue_size}; more are dropped and counted. An
        answer lets the next batch go.
        """
        exp, post, clock, stats = exporter(batchSize=2, queueSize=4, flushInterval=5)
        for i in range(2 * MAX_IN_FLIGHT + 4 + 3):
            exp.add(span(i + 1))
        self.assertEqual(len(post.posts), MAX_IN_FLIGHT)
        self.assertEqual(len(exp.queue), 4)
        self.assertEqual(count(stats, "spans_dropped"), 3)
        post.posts[0][2].callback(200)
        self.assertEqual(len(post.posts), MAX_IN_FLIGHT + 1)
        self.assertEqual(len(exp.queue), 2)

    def test_timerHeldBackByInFlight(self):
        """
        A timer flush that finds the in-flight limit reached leaves the spans queued for the next answer.
        """
        exp, post, clock, stats = exporter(batchSize=2, flushInterval=5)
        for i in range(2 * MAX_IN_FLIGHT + 1):
            exp.add(span(i + 1))
        clock.advance(5)
        self.assertEqual(len(post.posts), MAX_IN_FLIGHT)
        post.posts[0][2].callback(200)
        clock.advance(5)
        self.assertEqual(len(post.posts), MAX_IN_FLIGHT + 1)
        self.assertEqual(len(exp.queue), 0)

    def test_collectorFailureCountedNotRetried(self):
        """
        A report that fails is counted with its spans and never sent again; later spans still go.
        """
        exp, post, clock, stats = exporter(batchSize=2, flushInterval=5)
        exp.add(span(1))
        exp.add(span(2))
        post.posts[0][2].errback(error.ConnectionRefusedError())
        clock.advance(3600)
        self.assertEqual(len(post.posts), 1)
        self.assertEqual((count(stats, "reports_failed"), count(stats, "spans_dropped")), (1, 2))
        exp.add(span(3))
        exp.add(span(4))
        self.assertEqual(len(post.posts), 2)
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_warnsOncePerOutage(self):
        """
        A collector that keeps failing is warned about once, and once more after it recovered and failed again.
        """
        events = []
        exp, post, clock, stats = exporter(batchSize=1)
        exp.log = Logger(observer=events.append)
        for i in range(3):
            exp.add(span(i + 1))
            post.posts[-1][2].errback(error.ConnectionRefusedError())
        exp.add(span(4))
        post.posts[-1][2].callback(200)
        exp.add(span(5))
        post.posts[-1][2].callback(503)
        self.assertEqual([e["log_level"].name for e in events], ["warn", "info", "warn"])
        self.assertEqual(count(stats, "reports_failed"), 3)

    def test_collectorRefusesCounted(self):
        """
        A non-2xx answer counts as a dropped report.
        """
        exp, post, clock, stats = exporter(batchSize=1)
        exp.add(span(1))
        post.posts[0][2].callback(500)
        self.assertEqual((count(stats, "reports_dropped"), count(stats, "spans_dropped"),
                          count(stats, "spans_sent")), (1, 1, 0))

    def test_postRaising(self):
        """
        A post function that raises is counted; C{add} does not raise.
        """
        stats = StatsStore()

        def post(url, body):
            raise ValueError("bad url")

        exp = SpanExporter("otlp", "http://c/v1/traces", "mesh", Clock(), stats, post, batchSize=1)
        exp.add(span(1))
        self.assertEqual(count(stats, "reports_dropped", "otlp"), 1)
        self.assertEqual(exp.inFlight, 0)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_closeFlushes(self):
        """
        C{close} sends what is queued, in batches, stops the timer, and fires once every report is answered;
        spans after it are dropped.
        """
        closed = []
        exp, post, clock, stats = exporter(batchSize=2, flushInterval=5)
        exp.closePool = lambda: closed.append(True)
        for i in range(2 * MAX_IN_FLIGHT + 1):
            exp.add(span(i + 1))
        self.assertEqual(len(post.posts), MAX_IN_FLIGHT)
        d = exp.close()
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertNoResult(d)
        post.posts[0][2].callback(200)
        self.assertEqual(len(post.posts), MAX_IN_FLIGHT + 1)  # the partial batch went too
        for _, _, pending in post.posts[1:]:
            pending.callback(200)
        self.successResultOf(d)
        self.assertEqual(closed, [True])
        self.assertEqual(count(stats, "spans_sent"), 2 * MAX_IN_FLIGHT + 1)
        exp.add(span(99))
        self.assertEqual(count(stats, "spans_dropped"), 1)

    def test_closeIdle(self):
        """
        Closing an exporter with nothing to send fires at once.
        """
        exp, post, clock, stats = exporter()
        self.successResultOf(exp.close())
        self.assertEqual(post.posts, [])


class EncodingTests(unittest.TestCase):
    """
    The JSON each collector is sent.
    """

    def test_zipkin(self):
        """
        Zipkin v2: a list of spans with hex ids, microseconds, kind SERVER, endpoints and string tags.
        """
        [child, root] = json.loads(encodeZipkin([span(1), span(2, parent=False, error=True)], "edge"))
        self.assertEqual(child, {
            "traceId": TRACE.decode(), "id": "0000000000000001", "parentId": SPAN.decode(), "name": "main/api",
            "kind": "SERVER", "timestamp": 1700000000500000, "duration": 12500,
            "localEndpoint": {"serviceName": "edge"}, "remoteEndpoint": {"ipv4": "10.1.2.3", "port": 5555},
            "tags": {"http.method": "GET", "http.status_code": "200"},
        })
        self.assertNotIn("parentId", root)
        self.assertEqual(root["tags"]["http.status_code"], "503")

    def test_zipkinRepeatedTag(self):
        """
        Zipkin's tags are a map: a tag given twice is written once, with its last value (OTLP's attributes
        are a list and keep both).
        """
        s = span(1)
        s.tags = [("http.method", "GET"), ("http.status_code", "200"), ("http.method", "POST")]
        text = encodeZipkin([s], "edge")
        self.assertEqual(text.count(b'"http.method"'), 1)
        [out] = json.loads(text)
        self.assertEqual(out["tags"], {"http.method": "POST", "http.status_code": "200"})
        self.assertEqual(encodeOTLP([s], "edge").count(b'"http.method"'), 2)

    def test_zipkinShortDuration(self):
        """
        A span shorter than a microsecond still reports a duration of 1, as Zipkin requires.
        """
        s = span(1)
        s.duration = 0.0
        s.remote = ("::1", 80)
        [out] = json.loads(encodeZipkin([s], "edge"))
        self.assertEqual((out["duration"], out["remoteEndpoint"]), (1, {"ipv6": "::1", "port": 80}))

    def test_otlp(self):
        """
        OTLP/JSON: resourceSpans → scopeSpans → spans, hex ids (a 64-bit trace id padded), nanoseconds as
        strings, kind 2 (SERVER), string attributes, status 2 (ERROR) for a failed request.
        """
        body = json.loads(encodeOTLP([span(1), span(2, parent=False, trace=b"463ac35c9f6413ad", error=True)],
                                     "edge"))
        [resource] = body["resourceSpans"]
        self.assertEqual(resource["resource"], {"attributes": [{"key": "service.name",
                                                                "value": {"stringValue": "edge"}}]})
        [scope] = resource["scopeSpans"]
        self.assertEqual(scope["scope"], {"name": "twistedmesh"})
        child, root = scope["spans"]
        self.assertEqual(child, {
            "traceId": TRACE.decode(), "spanId": "0000000000000001", "parentSpanId": SPAN.decode(),
            "name": "main/api", "kind": 2, "startTimeUnixNano": "1700000000500000000",
            "endTimeUnixNano": "1700000000512500000",
            "attributes": [{"key": "http.method", "value": {"stringValue": "GET"}},
                           {"key": "http.status_code", "value": {"stringValue": "200"}}],
        })
        self.assertEqual(root["traceId"], "0000000000000000463ac35c9f6413ad")
        self.assertNotIn("parentSpanId", root)
        self.assertEqual(root["status"], {"code": 2})
        self.assertNotIn("status", child)

    def test_sameBytesAsJSONDumps(self):
        """
        The encoders write their JSON as text: byte for byte what json.dumps() (compact, ASCII-only) gives
        for the span model, for every kind of span, strings that need escaping included.
        """
        odd = 'q"uo\\te \x01\n caf\u00e9 \u2603 \U0001f600 100%s {key}%'
        debug = span(3, parent=False, trace=b"463ac35c9f6413ad")
        debug.debug = True
        debug.remote = ("::1", 8080)
        debug.duration = 0.0
        bare = span(4, error=True)
        bare.remote = None
        bare.name = odd
        bare.tags = [(odd, odd), ("user_agent", "")]
        spans = [span(1), span(2, parent=False, error=True), debug, bare]
        # More tag keys than the encoders keep escaped (256), and no tags at all.
        for i in range(300):
            extra = span(5 + i)
            extra.tags = [("k%d" % i, "v%d" % i), ("http.method", "GET")]
            spans.append(extra)
        spans[-1].tags = []
        for serviceName in ("edge", odd):
            self.assertEqual(encodeZipkin(spans, serviceName), _dumps([_zipkinModel(s, serviceName) for s in spans]))
            self.assertEqual(encodeOTLP(spans, serviceName), _dumps({"resourceSpans": [{
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": serviceName}}]},
                "scopeSpans": [{"scope": {"name": "twistedmesh"}, "spans": [_otlpModel(s) for s in spans]}],
            }]}))
        self.assertEqual(json.loads(encodeZipkin([bare], "edge"))[0]["tags"][odd], odd)
        self.assertEqual(encodeZipkin([], "edge"), b"[]")


def _dumps(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("ascii")


def _zipkinModel(span: Span, serviceName: str) -> dict:
    """
    A span in Zipkin's v2 model, as a dict (what the encoder's text must match).
    """
    out = {
        "traceId": span.traceId.decode(), "id": span.spanId.decode(), "name": span.name, "kind": "SERVER",
        "timestamp": int(round(span.start * 1_000_000)), "duration": max(1, int(round(span.duration * 1_000_000))),
        "localEndpoint": {"serviceName": serviceName}, "tags": dict(span.tags),
    }
    if span.parentId is not None:
        out["parentId"] = span.parentId.decode()
    if span.remote is not None:
        ip, port = span.remote
        out["remoteEndpoint"] = {"ipv6" if ":" in ip else "ipv4": ip, "port": port}
    if span.debug:
        out["debug"] = True
    return out


def _otlpModel(span: Span) -> dict:
    """
    A span in OTLP's JSON model, as a dict (what the encoder's text must match).
    """
    start = int(round(span.start * 1_000_000_000))
    out = {
        "traceId": span.traceId.decode().rjust(32, "0"), "spanId": span.spanId.decode(), "name": span.name,
        "kind": 2, "startTimeUnixNano": str(start),
        "endTimeUnixNano": str(start + int(round(span.duration * 1_000_000_000))),
        "attributes": [{"key": k, "value": {"stringValue": v}} for k, v in span.tags],
    }
    if span.parentId is not None:
        out["parentSpanId"] = span.parentId.decode()
    if span.error:
        out["status"] = {"code": 2}
    return out


def mesh(extra: str = "", listener: str = "") -> str:
    """
    A config with C{extra} lines in C{[mesh]} and C{listener} lines in its one listener's section, C{web}.
    """
    return proxyConfig("c", "[cluster:c]\nendpoints = tcp:127.0.0.1:1\n", mesh=f"admin = off\n{extra}\n",
                       listener="web", options=listener)


class ConfigTests(unittest.TestCase):
    """
    The C{tracing.*} keys.
    """

    def errors(self, text: str) -> str:
        return str(self.assertRaises(ConfigErrors, loadString, text, "t.ini"))

    def test_full(self):
        """
        Every mesh key is read; a collector URL without a path gets the provider's.
        """
        config = loadString(mesh("tracing.provider = otlp\ntracing.collector = http://otel:4318\n"
                                 "tracing.service_name = edge\ntracing.node_id = edge-1\ntracing.sample_rate = 12.5\n"
                                 "tracing.batch_size = 10\ntracing.queue_size = 100\ntracing.flush_interval = 250ms\n"
                                 "tracing.timeout = 2s"))
        self.assertEqual(config.mesh.tracing, TracingConfig(
            provider="otlp", collector="http://otel:4318/v1/traces", service_name="edge", node_id="edge-1",
            sample_rate=12.5, batch_size=10, queue_size=100, flush_interval=0.25, timeout=2.0))
        self.assertEqual(listenerSampleRate(config.mesh.tracing, config.listeners["web"].tracing_sample_rate),
                         0.125)

    def test_collectorPaths(self):
        """
        A URL's own path is kept; Zipkin's default path is C{/api/v2/spans}.
        """
        self.assertEqual(collectorURL("http://z:9411/", "zipkin"), "http://z:9411/api/v2/spans")
        self.assertEqual(collectorURL("https://z/custom", "zipkin"), "https://z/custom")

    def test_listenerOverride(self):
        """
        A listener's C{tracing.sample_rate} wins; without one, the mesh's (100 by default); without any
        tracing key, no tracing.
        """
        config = loadString(mesh("tracing.provider = zipkin\ntracing.collector = http://z:9411",
                                 "tracing.sample_rate = 1%"))
        self.assertEqual(config.listeners["web"].tracing_sample_rate, 1.0)
        self.assertEqual(listenerSampleRate(config.mesh.tracing, 1.0), 0.01)
        self.assertEqual(listenerSampleRate(config.mesh.tracing, None), 1.0)
        self.assertIsNone(listenerSampleRate(None, None))
        self.assertIsNone(loadString(mesh()).mesh.tracing)

    def test_errors(self):
        """
        Bad values and combinations are reported with file, section and key.
        """
        self.assertIn("[mesh] tracing.collector: is required with tracing.provider = zipkin",
                      self.errors(mesh("tracing.provider = zipkin")))
        self.assertIn("tracing.provider: 'jaeger' is not one of zipkin, otlp",
                      self.errors(mesh("tracing.provider = jaeger\ntracing.collector = http://j")))
        self.assertIn("tracing.collector: 'ftp://z' is not an http:// or https:// URL with a host",
                      self.errors(mesh("tracing.provider = zipkin\ntracing.collector = ftp://z")))
        self.assertIn("tracing.collector: 'http://z:99999' is not a valid URL",
                      self.errors(mesh("tracing.provider = zipkin\ntracing.collector = http://z:99999")))
        self.assertIn("tracing.batch_size: 10 is more than tracing.queue_size (5)",
                      self.errors(mesh("tracing.provider = zipkin\ntracing.collector = http://z\n"
                                       "tracing.batch_size = 10\ntracing.queue_size = 5")))
        self.assertIn("tracing.service_name: has no effect without tracing.provider",
                      self.errors(mesh("tracing.service_name = x")))
        self.assertIn("tracing.flush_interval: must be more than 0",
                      self.errors(mesh("tracing.provider = zipkin\ntracing.collector = http://z\n"
                                       "tracing.flush_interval = 0s")))

    def test_example(self):
        """
        C{etc/examples/tracing.ini} builds a service with a Zipkin exporter; its inner listener samples a
        tenth, and both listeners record spans.
        """
        import os

        from twisted.internet.testing import MemoryReactorClock

        from twistedmesh.config import loadFile

        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        service = MeshService(loadFile(os.path.join(here, "etc", "examples", "tracing.ini")), MemoryReactorClock())
        self.assertEqual((service.spanExporter.provider, service.spanExporter.url),
                         ("zipkin", "http://127.0.0.1:9411/api/v2/spans"))
        edge, inner = (service.listeners[n].factory.settings for n in ("edge", "inner"))
        self.assertEqual((edge.traceSampleRate, inner.traceSampleRate), (1.0, 0.1))
        self.assertIs(edge.spans.exporter, service.spanExporter)
        self.assertIs(inner.spans.exporter, service.spanExporter)
        from twistedmesh.observability.accesslog import AccessLogger
        self.assertIsInstance(edge.accessLog, AccessLogger)  # called directly, not through the recorder

    def test_tcpListener(self):
        """
        Only HTTP listeners take C{tracing.sample_rate}.
        """
        text = "[mesh]\nadmin = off\n[listener:t]\nendpoint = tcp:0\ncluster = c\ntracing.sample_rate = 5\n" \
               "[cluster:c]\nendpoints = tcp:127.0.0.1:1\n"
        self.assertIn("[listener:t] tracing.sample_rate: only HTTP listeners trace", self.errors(text))

    def test_oldKeyGone(self):
        """
        The former C{trace_sampling} key is unknown now.
        """
        self.assertIn("trace_sampling: unknown key", self.errors(mesh(listener="trace_sampling = 5")))

    def test_sampleRateOnlyPropagates(self):
        """
        C{[mesh] tracing.sample_rate} alone turns propagation on everywhere, with no exporter.
        """
        config = loadString(mesh("tracing.sample_rate = 50"))
        self.assertIsNone(buildExporter(config.mesh.tracing, Clock(), StatsStore()))
        service = MeshService(config, Clock())
        settings = service.listeners["web"].factory.settings
        self.assertEqual(settings.traceSampleRate, 0.5)
        self.assertNotIsInstance(settings.accessLog, SpanRecorder)


class CollectorResource(resource.Resource):
    """
    A trace collector: keeps the JSON of each POST by path and answers 202.
    """

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.reports: List = []
        self.waiting: List = []

    def render_POST(self, request):
        self.reports.append((request.path, request.getHeader(b"content-type"), json.loads(request.content.read())))
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(None)
        request.setResponseCode(202)
        return b""

    def nextReport(self) -> defer.Deferred:
        d = defer.Deferred()
        self.waiting.append(d)
        return d


class IntegrationTests(unittest.TestCase):
    """
    client → proxy A (Zipkin) → proxy B (OTLP) → echo upstream, on loopback, reporting to one collector.
    """

    @defer.inlineCallbacks
    def startCollector(self):
        collector = CollectorResource()
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server.Site(collector))
        self.addCleanup(port.stopListening)
        return collector, port.getHost().port

    @defer.inlineCallbacks
    def service(self, text: str, stop: bool = True):
        """
        Start a L{MeshService} from C{text}, stopped when the test ends unless the test stops it itself
        (C{stop} false); fire with it once it is live.
        """
        service = startService(self, text, seed=None, stop=MeshService.stopService if stop else lambda s: None)
        yield service.whenLive
        return service

    def proxy(self, name: str, provider: str, collector: str, upstream: int, extra: str = "") -> str:
        """
        The config of a proxy C{name} tracing to C{collector} with C{provider} (C{extra} more lines of
        C{[mesh]}), its listener C{in} sending everything to C{upstream}.
        """
        cluster = f"[cluster:next]\nendpoints = tcp:127.0.0.1:{upstream}\n"
        return proxyConfig("next", cluster, listener="in", mesh=f"""\
admin = off
tracing.provider = {provider}
tracing.collector = {collector}
tracing.service_name = {name}
{extra}
""")

    @defer.inlineCallbacks
    def test_twoProxies(self):
        """
        A traces a new request (Zipkin, sent as its batch of one fills), B continues it (OTLP, sent when B
        stops): one trace id everywhere, B's span a child of A's, the echo's parent B's span.
        """
        collector, cport = yield self.startCollector()
        echoPort = yield startEcho(self)
        b = yield self.service(self.proxy("proxy-b", "otlp", f"http://127.0.0.1:{cport}", echoPort,
                                          "tracing.flush_interval = 1h"), stop=False)
        bPort = port(b.listeners["in"])
        a = yield self.service(self.proxy("proxy-a", "zipkin", f"http://127.0.0.1:{cport}/api/v2/spans", bPort,
                                          "tracing.batch_size = 1"))
        aPort = port(a.listeners["in"])

        zipkinSent = collector.nextReport()
        response = yield treq.get(f"http://127.0.0.1:{aPort}/hello", persistent=False, timeout=5)
        echoed = yield response.text()
        self.assertEqual(response.code, 200)
        yield zipkinSent
        [(path, contentType, [aSpan])] = collector.reports
        self.assertEqual((path, contentType), (b"/api/v2/spans", b"application/json"))
        self.assertNotIn("parentId", aSpan)
        self.assertEqual((aSpan["kind"], aSpan["localEndpoint"]), ("SERVER", {"serviceName": "proxy-a"}))
        self.assertEqual(aSpan["tags"]["upstream_address"], f"127.0.0.1:{bPort}")
        self.assertEqual(aSpan["tags"]["http.status_code"], "200")
        sent = a.stats.get("tracing.zipkin.spans_sent")
        yield waitFor(lambda: sent.value == 1, 5, "the collector's answer to reach A")

        self.assertEqual(collector.reports[1:], [])  # B holds its span until its timer or its stop
        yield b.stopService()
        [(path, contentType, body)] = collector.reports[1:]
        self.assertEqual(path, b"/v1/traces")
        [resourceSpans] = body["resourceSpans"]
        self.assertEqual(resourceSpans["resource"]["attributes"][0]["value"]["stringValue"], "proxy-b")
        [bSpan] = resourceSpans["scopeSpans"][0]["spans"]
        self.assertEqual(bSpan["traceId"], aSpan["traceId"])
        self.assertEqual(bSpan["parentSpanId"], aSpan["id"])
        self.assertNotEqual(bSpan["spanId"], aSpan["id"])
        self.assertEqual(bSpan["kind"], 2)
        self.assertIn({"key": "upstream_address", "value": {"stringValue": f"127.0.0.1:{echoPort}"}},
                      bSpan["attributes"])
        self.assertLessEqual(int(bSpan["startTimeUnixNano"]), int(bSpan["endTimeUnixNano"]))
        # What the echo upstream saw: the same trace, with B's span as the parent.
        self.assertIn(f"traceparent: 00-{aSpan['traceId']}-{bSpan['spanId']}-01", echoed)

    @defer.inlineCallbacks
    def test_curlHTTP2(self):
        """
        curl speaking HTTP/2 (prior knowledge) with a B3 context: the proxy's OTLP span continues the B3
        trace, says HTTP/2, and the upstream gets B3 headers naming the span as parent.
        """
        curl = yield requireCurlHTTP2()
        collector, cport = yield self.startCollector()
        echoPort = yield startEcho(self)
        a = yield self.service(self.proxy("proxy-a", "otlp", f"http://127.0.0.1:{cport}", echoPort,
                                          "tracing.batch_size = 1\ntracing.sample_rate = 0"))
        aPort = port(a.listeners["in"])
        reported = collector.nextReport()
        out, err, code = yield getProcessOutputAndValue(curl, [
            "-sS", "--http2-prior-knowledge", "-H", f"b3: {TRACE.decode()}-{SPAN.decode()}-1",
            f"http://127.0.0.1:{aPort}/h2?q=1"])
        self.assertEqual(code, 0, err)
        yield reported
        [(path, _, body)] = collector.reports
        [span] = body["resourceSpans"][0]["scopeSpans"][0]["spans"]
        attributes = {a["key"]: a["value"]["stringValue"] for a in span["attributes"]}
        self.assertEqual((span["traceId"], span["parentSpanId"]), (TRACE.decode(), SPAN.decode()))
        self.assertEqual((attributes["http.protocol"], attributes["http.url"], attributes["http.status_code"]),
                         ("HTTP/2", f"http://127.0.0.1:{aPort}/h2?q=1", "200"))
        self.assertIn(f"b3: {TRACE.decode()}-{span['spanId']}-1-{SPAN.decode()}".encode(), out)

    @defer.inlineCallbacks
    def test_incomingContextAndFailingCollector(self):
        """
        A client's sampled context is continued; a collector that refuses connections is counted as failed
        reports and the requests are answered all the same.
        """
        collector, cport = yield self.startCollector()
        deadPort = freePort()
        echoPort = yield startEcho(self)
        a = yield self.service(self.proxy("proxy-a", "zipkin", f"http://127.0.0.1:{deadPort}", echoPort,
                                          "tracing.batch_size = 1\ntracing.sample_rate = 0"))
        aPort = port(a.listeners["in"])
        for i in range(3):
            response = yield treq.get(f"http://127.0.0.1:{aPort}/x", headers={"traceparent": TP.decode()},
                                      persistent=False, timeout=5)
            self.assertIn(f"traceparent: 00-{TRACE.decode()}-".encode(), (yield response.content()))
            self.assertEqual(response.code, 200)
        failed = a.stats.get("tracing.zipkin.reports_failed")
        yield waitFor(lambda: failed.value == 3, 5, "three failed reports")
        self.assertEqual(a.stats.get("tracing.zipkin.spans_sent").value, 0)
        self.assertEqual(collector.reports, [])


class _BadCollector(Protocol):
    """
    Answers a report with a 200 head and then either stalls mid-body or sends a body without end.
    """

    def __init__(self, endless: bool) -> None:
        self.endless = endless
        self.head = b""

    def dataReceived(self, data: bytes) -> None:
        if self.head is None:
            return
        self.head += data
        if b"\r\n\r\n" not in self.head:
            return
        self.head = None
        if self.endless:
            self.transport.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            self.transport.registerProducer(_Endless(self.transport), True)
        else:
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nab")


class _Endless:
    def __init__(self, transport) -> None:
        self.transport = transport
        self.paused = False
        reactor.callLater(0, self.resumeProducing)

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.transport.connected:
            self.transport.write(b"4000\r\n" + b"x" * 0x4000 + b"\r\n")
            if not self.paused:
                reactor.callLater(0, self.resumeProducing)
                return

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.paused = True


class CollectorAnswerTests(unittest.TestCase):
    """
    The whole report exchange is bounded: a collector that stalls in its answer's body, or sends one that
    never ends, cannot hold a report slot (and the exporter's close()) for ever, nor make the proxy read
    without end.
    """

    @defer.inlineCallbacks
    def post(self, endless: bool):
        factory = Factory.forProtocol(lambda: _BadCollector(endless))
        listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(listening.stopListening)
        post, closePool = treqPost(reactor, 0.5)
        self.addCleanup(closePool)
        url = f"http://127.0.0.1:{listening.getHost().port}/api/v2/spans"
        # A failure comes back as its exception, a success as the status code.
        result = yield post(url, b"[]").addErrback(lambda f: f.value)
        return result

    @defer.inlineCallbacks
    def test_stalledBody(self):
        """
        A 200 head, then nothing: the post fails with a timeout instead of waiting for the rest.
        """
        result = yield self.post(endless=False)
        self.assertIsInstance(result, defer.TimeoutError)

    @defer.inlineCallbacks
    def test_endlessBody(self):
        """
        A body without end: the connection is closed once more than MAX_ANSWER_BODY came, and the status
        counts.
        """
        result = yield self.post(endless=True)
        self.assertEqual(result, 200)

    test_stalledBody.timeout = test_endlessBody.timeout = 10  # type: ignore[attr-defined]
