"""
The downstream HTTP/2 codec (L{twistedmesh.http.h2server}) and protocol detection
(L{twistedmesh.listener.http}).

Unit tests drive a listener's connection on a memory transport with h2's own client connection, so every
frame is real HTTP/2; filters play the upstream. Integration tests run L{MeshService} on loopback with real
upstreams, an h2 client over TCP, and curl and h2load where installed.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from typing import Dict, List, Optional

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.settings import SettingCodes, Settings
from twisted.internet import defer, protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from twistedmesh.http.server import HTTPSettings
from twistedmesh.http.stream import HTTPFilter
from twistedmesh.listener.http import PREFACE, HTTPListenerFactory
from twistedmesh.observability.stats import StatsStore

from .test_http import HTTPTestBase

GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"example.com")]


def head(path: bytes = b"/", method: bytes = b"GET", extra=()) -> list:
    """
    A request head: pseudo-headers first, then C{extra} fields.
    """
    return [(b":method", method), (b":path", path), (b":scheme", b"http"), (b":authority", b"example.com")] + \
        list(extra)


# -- unit harness ---------------------------------------------------------------------------------------------


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
        return stream.respond(200, b"%s %s %d" % (stream.method, stream.path, len(self.body)))


class Hold(HTTPFilter):
    """
    Never answers: the test answers through the stream it records, and sees the body it got.
    """

    streams: List = []

    def __init__(self):
        self.body = []
        self.trailers = None
        self.completed = 0

    def requestHeaders(self, stream):
        stream.state["hold"] = self
        Hold.streams.append(stream)

    def requestData(self, stream, data, end):
        self.body.append(data)

    def requestTrailers(self, stream, trailers):
        self.trailers = trailers

    def streamComplete(self, stream):
        self.completed += 1


class Pausing(HTTPFilter):
    """
    Holds every request at its headers until the test fires C{Pausing.deferreds[i]}; then passes on.
    """

    deferreds: List = []

    def requestHeaders(self, stream):
        d = defer.Deferred()
        Pausing.deferreds.append(d)
        return d


class Producer:
    """
    Stands in for an upstream transport: records whether it is paused.
    """

    def __init__(self):
        self.paused = False
        self.pauses = 0

    def pauseProducing(self):
        self.paused = True
        self.pauses += 1

    def resumeProducing(self):
        self.paused = False

    def stopProducing(self):
        pass


def serve(*makers, **settings):
    """
    A listener's connection on a memory transport, not yet spoken to; returns (protocol, transport,
    clock, stats).
    """
    clock = Clock()
    stats = StatsStore()
    http2 = settings.pop("http2", True)
    factory = HTTPListenerFactory(HTTPSettings("web", list(makers or [lambda s: Answer()]), stats, clock,
                                               **settings), stats, http2)
    proto = factory.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "10.1.2.3", 5555))
    proto.makeConnection(transport)
    return proto, transport, clock, stats


class Response:
    """
    What a client saw on one stream.
    """

    def __init__(self):
        self.headers = None
        self.data = b""
        self.trailers = None
        self.ended = False
        self.reset = None

    @property
    def status(self) -> int:
        """
        The C{:status}, as an int.
        """
        return int(dict(self.headers)[b":status"])


class Peer:
    """
    h2's client connection speaking to a server protocol over a memory transport. C{pump} moves bytes
    both ways until both are quiet. With C{autoAck}, received data is acknowledged as it arrives.
    """

    def __init__(self, proto, transport, window: Optional[int] = None, autoAck: bool = True):
        self.proto = proto
        self.transport = transport
        self.client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        if window is not None:
            self.client.local_settings = Settings(client=True, initial_values={
                SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.autoAck = autoAck
        self.responses: Dict[int, Response] = {}
        self.events = []
        self.client.initiate_connection()
        self.pump()

    def pump(self) -> None:
        """
        Move bytes both ways until neither side has anything to say.
        """
        while True:
            out = self.client.data_to_send()
            if out:
                self.proto.dataReceived(out)
            inbound = self.transport.value()
            self.transport.clear()
            if inbound:
                for event in self.client.receive_data(inbound):
                    self.handle(event)
            if not out and not inbound:
                return

    def handle(self, event) -> None:
        """
        Record a client event on its stream's L{Response}.
        """
        self.events.append(event)
        sid = getattr(event, "stream_id", None)
        r = self.responses.setdefault(sid, Response()) if sid else None
        if isinstance(event, ResponseReceived):
            r.headers = event.headers
        elif isinstance(event, DataReceived):
            r.data += event.data
            if self.autoAck:
                self.client.acknowledge_received_data(event.flow_controlled_length, sid)
        elif isinstance(event, TrailersReceived):
            r.trailers = event.headers
        elif isinstance(event, StreamEnded):
            r.ended = True
        elif isinstance(event, StreamReset):
            r.reset = event.error_code

    def request(self, fields, body: Optional[bytes] = None, end: bool = True) -> int:
        """
        Open a stream with C{fields} (and C{body}); return its id once the server has had its say.
        """
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, fields, end_stream=body is None and end)
        if body is not None:
            self.send(sid, body, end)
        self.pump()
        return sid

    def send(self, sid: int, body: bytes, end: bool = False) -> None:
        """
        Send C{body} on stream C{sid} in frames of the peer's largest size (no more than the window allows).
        """
        size = self.client.max_outbound_frame_size
        for i in range(0, len(body), size):
            self.client.send_data(sid, body[i:i + size], end_stream=end and i + size >= len(body))
        self.pump()

    def goaway(self):
        """
        The GOAWAYs the client received.
        """
        return [e for e in self.events if isinstance(e, ConnectionTerminated)]


def h2(*makers, **settings):
    """
    A server connection and a client that has sent its preface.
    """
    proto, transport, clock, stats = serve(*makers, **settings)
    return Peer(proto, transport), proto, clock, stats


def stat(stats, name: str) -> int:
    """
    The value of the listener's stat C{http.web.<name>}.
    """
    return stats.get("http.web." + name).value


class RequestTests(unittest.TestCase):
    """
    Requests become Streams running the listener's filters, as HTTP/1.1 ones do.
    """

    def setUp(self):
        Hold.streams = []
        Pausing.deferreds = []

    def test_localReply(self):
        """
        A GET is answered by a filter's local reply, and counted as an HTTP/2 request.
        """
        peer, proto, clock, stats = h2()
        sid = peer.request(head(b"/x"))
        r = peer.responses[sid]
        self.assertEqual((r.status, r.data, r.ended), (200, b"GET /x 0", True))
        self.assertIn((b"content-length", b"8"), r.headers)
        self.assertEqual(stat(stats, "downstream_rq_http2_total"), 1)
        self.assertEqual(stat(stats, "downstream_rq_2xx"), 1)
        self.assertEqual(stat(stats, "downstream_rq_active"), 0)
        self.assertEqual(stat(stats, "downstream_cx_http2_active"), 1)

    def test_requestHead(self):
        """
        Pseudo-headers become method, path, scheme and authority; the forwarding headers are set as for
        HTTP/1.1; cookie crumbs are joined; C{te: trailers} is kept; Host is not a field.
        """
        peer, proto, clock, stats = h2(lambda s: Hold())
        peer.request([(b":method", b"POST"), (b":path", b"/p?q=1"), (b":scheme", b"https"),
                      (b":authority", b"api.example.com"), (b"cookie", b"a=1"), (b"x-forwarded-for", b"1.1.1.1"),
                      (b"x-forwarded-proto", b"https"), (b"cookie", b"b=2"), (b"te", b"trailers")], b"body")
        [stream] = Hold.streams
        self.assertEqual((stream.method, stream.path, stream.scheme, stream.authority, stream.version),
                         (b"POST", b"/p?q=1", b"https", b"api.example.com", b"2"))
        fields = [(bytes(n), bytes(v)) for n, v in stream.requestHeaders]
        self.assertIn((b"x-forwarded-for", b"1.1.1.1, 10.1.2.3"), fields)
        self.assertIn((b"x-forwarded-proto", b"http"), fields)
        self.assertIn((b"cookie", b"a=1; b=2"), fields)
        self.assertIn((b"te", b"trailers"), fields)
        names = [n for n, _ in fields]
        self.assertEqual(names.count(b"x-request-id"), 1)
        self.assertNotIn(b"host", names)
        self.assertFalse(any(n.startswith(b":") for n in names))
        # No content-length: an HTTP/1.1 upstream gets the body chunked.
        self.assertTrue(stream.chunked)
        self.assertEqual(stream.state["hold"].body, [b"body"])
        self.assertTrue(stream.requestEnded)

    def test_concurrentStreams(self):
        """
        Several streams on one connection are answered independently, in whatever order answers come.
        """
        peer, proto, clock, stats = h2(lambda s: Hold())
        sids = [peer.request(head(b"/%d" % i)) for i in range(3)]
        self.assertEqual(len(Hold.streams), 3)
        for stream in reversed(Hold.streams):
            stream.status = 200
            stream.responseHeaders = [(b"x-path", stream.path)]
            stream.sendResponseHeaders()
            stream.sendResponseData(b"for " + stream.path, True)
            peer.pump()
            # The stream just answered is complete; the ones not answered yet are still open.
            self.assertTrue(stream.completed)
        for i, sid in enumerate(sids):
            r = peer.responses[sid]
            self.assertEqual((r.status, r.data, r.ended), (200, b"for /%d" % i, True))
            self.assertIn((b"x-path", b"/%d" % i), r.headers)
        order = [e.stream_id for e in peer.events if isinstance(e, StreamEnded)]
        self.assertEqual(order, list(reversed(sids)))

    def test_trailers(self):
        """
        Response trailers (gRPC's C{grpc-status}) end the stream as a HEADERS frame; request trailers reach
        the filters.
        """
        peer, proto, clock, stats = h2(lambda s: Hold())
        sid = peer.client.get_next_available_stream_id()
        peer.client.send_headers(sid, head(b"/svc/Method", b"POST", [(b"te", b"trailers")]))
        peer.client.send_data(sid, b"\x00\x00\x00\x00\x00")
        peer.client.send_headers(sid, [(b"x-req-trailer", b"1")], end_stream=True)
        peer.pump()
        [stream] = Hold.streams
        self.assertEqual([(bytes(n), bytes(v)) for n, v in stream.state["hold"].trailers], [(b"x-req-trailer", b"1")])
        stream.status = 200
        stream.responseHeaders = [(b"content-type", b"application/grpc")]
        stream.sendResponseHeaders()
        stream.sendResponseData(b"\x00\x00\x00\x00\x00", False)
        stream.sendResponseTrailers([(b"grpc-status", b"0"), (b"grpc-message", b"ok")])
        peer.pump()
        r = peer.responses[sid]
        self.assertEqual(r.trailers, [(b"grpc-status", b"0"), (b"grpc-message", b"ok")])
        self.assertTrue(r.ended)
        self.assertTrue(stream.completed)

    def test_connectionSpecificResponseFields(self):
        """
        Fields HTTP/2 forbids are dropped from a response; C{te} only survives as C{trailers}.
        """
        peer, proto, clock, stats = h2(lambda s: Hold())
        sid = peer.request(head())
        [stream] = Hold.streams
        stream.status = 200
        stream.responseHeaders = [(b"connection", b"close"), (b"keep-alive", b"5"), (b"transfer-encoding", b"chunked"),
                                  (b"upgrade", b"h2c"), (b"proxy-connection", b"x"), (b"x-kept", b"1")]
        stream.sendResponseHeaders(True)
        peer.pump()
        r = peer.responses[sid]
        self.assertEqual(r.headers, [(b":status", b"200"), (b"x-kept", b"1")])
        self.assertTrue(r.ended)

    def test_head(self):
        """
        The answer to HEAD carries its length but no DATA bytes.
        """
        peer, proto, clock, stats = h2()
        sid = peer.request(head(b"/h", b"HEAD"))
        r = peer.responses[sid]
        self.assertEqual((r.status, r.data, r.ended), (200, b"", True))
        self.assertIn((b"content-length", b"9"), r.headers)

    def test_headersTooLarge(self):
        """
        A header list over the listener's limit gets 431 on that stream only; the connection carries on.
        """
        peer, proto, clock, stats = h2(maxHeaderBytes=1000)
        sid = peer.request(head(extra=[(b"x-big", b"a" * 2000)]))
        self.assertEqual(peer.responses[sid].status, 431)
        sid = peer.request(head(b"/ok"))
        self.assertEqual(peer.responses[sid].status, 200)

    def test_tooManyHeaders(self):
        """
        More fields than C{max_request_headers_count} gets 431.
        """
        peer, proto, clock, stats = h2(maxHeaders=3)
        sid = peer.request(head(extra=[(b"x-%d" % i, b"1") for i in range(4)]))
        self.assertEqual(peer.responses[sid].status, 431)

    def test_connectRefused(self):
        """
        CONNECT is answered 405 on its stream; the connection stays open.
        """
        peer, proto, clock, stats = h2()
        sid = peer.request([(b":method", b"CONNECT"), (b":authority", b"example.com:443")], end=False)
        self.assertEqual(peer.responses[sid].status, 405)
        self.assertFalse(proto.transport.disconnecting)

    def test_accessLogAndComplete(self):
        """
        A finished stream is logged once with protocol HTTP/2, after every filter's streamComplete.
        """
        logged = []

        class Log:
            def log(self, stream, now):
                logged.append((stream.version, stream.status, stream.completed))

        peer, proto, clock, stats = h2(accessLog=Log())
        peer.request(head())
        self.assertEqual(logged, [(b"2", 200, True)])


class FlowControlTests(unittest.TestCase):
    """
    Flow-control windows are the backpressure in both directions.
    """

    def setUp(self):
        Hold.streams = []
        Pausing.deferreds = []

    def test_pausedFilterHoldsWindow(self):
        """
        While a filter holds the request, its data is not acknowledged: the client's window stays shut
        until the filter resumes.
        """
        peer, proto, clock, stats = h2(lambda s: Pausing(), lambda s: Hold())
        sid = peer.request(head(b"/up", b"POST"), b"u" * 60000, end=False)
        self.assertEqual(peer.client.local_flow_control_window(sid), 65536 - 60000)
        self.assertEqual([e for e in peer.events if isinstance(e, WindowUpdated) and e.stream_id == sid], [])
        Pausing.deferreds[0].callback(None)
        peer.pump()
        self.assertEqual(peer.client.local_flow_control_window(sid), 65536)
        self.assertEqual(b"".join(Hold.streams[0].state["hold"].body), b"u" * 60000)

    def test_unpausedAcksAtOnce(self):
        """
        Without a pause, request data is acknowledged as soon as the stream took it (h2 sends a
        WINDOW_UPDATE per half window acknowledged).
        """
        peer, proto, clock, stats = h2(lambda s: Hold())
        sid = peer.request(head(b"/up", b"POST"), b"u" * 60000, end=False)
        self.assertGreaterEqual(peer.client.local_flow_control_window(sid), 65536 - 32768)

    def test_upstreamBufferHoldsWindow(self):
        """
        When the upstream transport pauses the stream's body producer, acknowledgements wait for it to
        resume; the router's producer is the stream's own.
        """
        peer, proto, clock, stats = h2(lambda s: Hold())
        sid = peer.request(head(b"/up", b"POST"), b"a" * 1000, end=False)
        [stream] = Hold.streams
        producer = stream.codec.bodyProducer
        producer.pauseProducing()
        peer.send(sid, b"b" * 40000)
        self.assertEqual(peer.client.local_flow_control_window(sid), 65536 - 41000)
        producer.resumeProducing()
        peer.pump()
        self.assertEqual(peer.client.local_flow_control_window(sid), 65536)
        # Other streams are not held by this one's pause.
        other = peer.request(head(b"/o", b"POST"), b"c" * 40000, end=False)
        self.assertGreaterEqual(peer.client.local_flow_control_window(other), 65536 - 32768)
        self.assertEqual(len(Hold.streams), 2)

    def test_responseRespectsWindow(self):
        """
        A client with a small window gets response data only as it opens the window; meanwhile the
        upstream is paused, and it resumes once everything queued is sent.
        """
        proto, transport, clock, stats = serve(lambda s: Hold())
        peer = Peer(proto, transport, window=1000, autoAck=False)
        sid = peer.request(head(b"/big"))
        [stream] = Hold.streams
        upstream = Producer()
        stream.codec.registerResponseProducer(upstream)
        stream.status = 200
        stream.responseHeaders = []
        stream.sendResponseHeaders()
        body = os.urandom(100000)
        stream.sendResponseData(body, False)
        peer.pump()
        r = peer.responses[sid]
        self.assertEqual(len(r.data), 1000)
        self.assertTrue(upstream.paused)
        # More from the upstream waits behind it; nothing more reaches the client.
        stream.sendResponseData(b"tail", True)
        peer.pump()
        self.assertEqual(len(r.data), 1000)
        peer.client.increment_flow_control_window(5000, sid)
        peer.pump()
        self.assertEqual(len(r.data), 6000)
        self.assertTrue(upstream.paused)
        peer.client.increment_flow_control_window(200000, sid)
        peer.client.increment_flow_control_window(200000)
        peer.pump()
        self.assertEqual(r.data, body + b"tail")
        self.assertTrue(r.ended)
        self.assertFalse(upstream.paused)
        self.assertTrue(stream.completed)

    def test_connectionWindowShared(self):
        """
        When the connection window opens, the streams waiting for it are all served.
        """
        proto, transport, clock, stats = serve(lambda s: Hold())
        peer = Peer(proto, transport, autoAck=False)
        sids = [peer.request(head(b"/%d" % i)) for i in range(2)]
        for stream in Hold.streams:
            stream.status = 200
            stream.responseHeaders = []
            stream.sendResponseHeaders()
            stream.sendResponseData(b"x" * 40000, True)
        peer.pump()
        got = [len(peer.responses[sid].data) for sid in sids]
        self.assertEqual(sum(got), 65535)  # the connection window, whatever the streams' windows say
        peer.client.increment_flow_control_window(100000)
        peer.pump()
        self.assertEqual([len(peer.responses[sid].data) for sid in sids], [40000, 40000])
        self.assertTrue(all(peer.responses[sid].ended for sid in sids))

    def test_slowClientSocketPausesUpstreams(self):
        """
        When the client stops reading (the transport pauses us), every upstream is paused and the socket
        is not read; both resume when it catches up.
        """
        peer, proto, clock, stats = h2(lambda s: Hold())
        peer.request(head())
        [stream] = Hold.streams
        upstream = Producer()
        stream.codec.registerResponseProducer(upstream)
        proto.http2.pauseProducing()
        self.assertTrue(upstream.paused)
        self.assertEqual(proto.transport.producerState, "paused")
        proto.http2.resumeProducing()
        self.assertFalse(upstream.paused)
        self.assertEqual(proto.transport.producerState, "producing")

    def test_unregisterResumes(self):
        """
        An upstream transport paused for this stream is resumed when the router unregisters it (it may go
        back to its pool).
        """
        proto, transport, clock, stats = serve(lambda s: Hold())
        peer = Peer(proto, transport, window=10, autoAck=False)
        peer.request(head())
        [stream] = Hold.streams
        upstream = Producer()
        stream.codec.registerResponseProducer(upstream)
        stream.status = 200
        stream.sendResponseHeaders()
        stream.sendResponseData(b"x" * 100, False)
        self.assertTrue(upstream.paused)
        stream.codec.unregisterResponseProducer()
        self.assertFalse(upstream.paused)


class ResetTests(unittest.TestCase):
    """
    Resets both ways, and the rapid-reset defence.
    """

    def setUp(self):
        Hold.streams = []

    def test_resetStream(self):
        """
        A stream reset by the proxy (an upstream dying mid-response) is RST_STREAM(INTERNAL_ERROR), never
        a clean end; the connection's other streams carry on.
        """
        peer, proto, clock, stats = h2(lambda s: Hold())
        first = peer.request(head(b"/1"))
        second = peer.request(head(b"/2"))
        a, b = Hold.streams
        a.status = 200
        a.sendResponseHeaders()
        a.sendResponseData(b"partial", False)
        a.reset("upstream_reset_after_response_started{connection_termination}")
        peer.pump()
        self.assertEqual(peer.responses[first].reset, ErrorCodes.INTERNAL_ERROR)
        self.assertFalse(peer.responses[first].ended)
        self.assertEqual(stat(stats, "downstream_rq_tx_reset"), 1)
        b.respond(200, b"fine")
        peer.pump()
        self.assertEqual(peer.responses[second].data, b"fine")
        self.assertFalse(proto.transport.disconnecting)

    def test_clientReset(self):
        """
        RST_STREAM from the client completes the stream (flag DR) and leaves the connection open.
        """
        peer, proto, clock, stats = h2(lambda s: Hold())
        sid = peer.request(head())
        [stream] = Hold.streams
        peer.client.reset_stream(sid, ErrorCodes.CANCEL)
        peer.pump()
        self.assertTrue(stream.completed)
        self.assertEqual(stream.state["hold"].completed, 1)
        self.assertEqual(stream.responseFlags, ["DR"])
        self.assertEqual(stat(stats, "downstream_rq_rx_reset"), 1)
        self.assertEqual(stat(stats, "downstream_rq_active"), 0)
        # Writes the router might still make for it go nowhere.
        stream.status = 200
        self.assertFalse(proto.transport.disconnecting)

    def test_replyBeforeRequestEnds(self):
        """
        A local reply before the request body has ended is followed by RST_STREAM(NO_ERROR), so the client
        stops sending; the connection carries on.
        """
        class Early(HTTPFilter):
            def requestHeaders(self, stream):
                return stream.respond(403, b"no")

        peer, proto, clock, stats = h2(lambda s: Early())
        sid = peer.request(head(b"/up", b"POST"), b"x" * 100, end=False)
        r = peer.responses[sid]
        self.assertEqual((r.status, r.data, r.ended, r.reset), (403, b"no", True, ErrorCodes.NO_ERROR))
        sid = peer.request(head(b"/again"))
        self.assertEqual(peer.responses[sid].status, 403)

    def test_rapidReset(self):
        """
        A client that opens and at once resets more than half of its streams past 500 gets
        GOAWAY(ENHANCE_YOUR_CALM) and is closed.
        """
        peer, proto, clock, stats = h2(lambda s: Hold())
        for i in range(499):
            sid = peer.client.get_next_available_stream_id()
            peer.client.send_headers(sid, head(), end_stream=True)
            peer.client.reset_stream(sid, ErrorCodes.CANCEL)
            peer.pump()
        self.assertFalse(proto.transport.disconnecting)
        self.assertEqual(peer.goaway(), [])
        sid = peer.client.get_next_available_stream_id()
        peer.client.send_headers(sid, head(), end_stream=True)
        peer.client.reset_stream(sid, ErrorCodes.CANCEL)
        peer.pump()
        [goaway] = peer.goaway()
        self.assertEqual(goaway.error_code, ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertTrue(proto.transport.disconnecting)
        self.assertEqual(stat(stats, "downstream_rq_too_many_premature_resets"), 1)

    def test_slowResetsAreNotPremature(self):
        """
        Streams reset after living longer than a second do not count toward the rapid-reset limit.
        """
        peer, proto, clock, stats = h2(lambda s: Hold())
        for i in range(600):
            sid = peer.client.get_next_available_stream_id()
            peer.client.send_headers(sid, head(), end_stream=True)
            peer.pump()
            clock.advance(1.5)
            peer.client.reset_stream(sid, ErrorCodes.CANCEL)
            peer.pump()
        self.assertEqual(peer.goaway(), [])
        self.assertFalse(proto.transport.disconnecting)

    def test_connectionLost(self):
        """
        Streams in flight when the connection goes are completed, flagged DC.
        """
        peer, proto, clock, stats = h2(lambda s: Hold())
        peer.request(head())
        [stream] = Hold.streams
        proto.connectionLost(None)
        self.assertTrue(stream.completed)
        self.assertEqual(stream.responseFlags, ["DC"])
        self.assertEqual(stat(stats, "downstream_rq_active"), 0)
        self.assertEqual(stat(stats, "downstream_cx_http2_active"), 0)
        self.assertEqual(stats.get("listener.web.downstream_cx_active").value, 0)

    def test_protocolError(self):
        """
        Bytes that break HTTP/2 get GOAWAY(PROTOCOL_ERROR) and a close.
        """
        peer, proto, clock, stats = h2()
        proto.dataReceived(b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00")  # WINDOW_UPDATE by 0
        events = peer.client.receive_data(proto.transport.value())
        self.assertTrue(any(isinstance(e, ConnectionTerminated) and e.error_code != 0 for e in events), events)
        self.assertTrue(proto.transport.disconnecting)
        self.assertEqual(stat(stats, "downstream_cx_protocol_error"), 1)


class GoAwayTests(unittest.TestCase):
    """
    Graceful closes: draining, the connection's request limit, idle, and the client's GOAWAY.
    """

    def setUp(self):
        Hold.streams = []

    def test_drain(self):
        """
        Draining sends GOAWAY(NO_ERROR) naming the last stream; that stream is still answered, a later one
        is refused, and the connection closes after the answer.
        """
        peer, proto, clock, stats = h2(lambda s: Hold())
        sid = peer.request(head())
        proto.factory.drain()
        peer.pump()
        [goaway] = peer.goaway()
        self.assertEqual((goaway.error_code, goaway.last_stream_id), (0, sid))
        self.assertFalse(proto.transport.disconnecting)
        # The client ignores the GOAWAY (it was in flight): refused, safe to retry elsewhere.
        peer.client.state_machine.state = peer.client.state_machine.state.CLIENT_OPEN
        late = peer.request(head(b"/late"))
        self.assertEqual(peer.responses[late].reset, ErrorCodes.REFUSED_STREAM)
        Hold.streams[0].respond(200, b"last")
        peer.pump()
        self.assertEqual(peer.responses[sid].data, b"last")
        self.assertTrue(proto.transport.disconnecting)

    def test_drainIdle(self):
        """
        An idle HTTP/2 connection closes as soon as the listener drains.
        """
        peer, proto, clock, stats = h2()
        proto.factory.drain()
        self.assertTrue(proto.transport.disconnecting)

    def test_maxRequestsPerConnection(self):
        """
        The last request allowed on a connection is answered, with a GOAWAY, then the connection closes.
        """
        peer, proto, clock, stats = h2(maxRequestsPerConnection=2)
        peer.request(head(b"/1"))
        self.assertFalse(proto.transport.disconnecting)
        sid = peer.request(head(b"/2"))
        self.assertEqual(peer.responses[sid].data, b"GET /2 0")
        self.assertEqual(peer.goaway()[0].last_stream_id, sid)
        self.assertTrue(proto.transport.disconnecting)

    def test_idleTimeout(self):
        """
        A connection with no stream for C{idle_timeout} gets GOAWAY and is closed.
        """
        peer, proto, clock, stats = h2(idleTimeout=30.0)
        peer.request(head())
        clock.advance(29)
        self.assertFalse(proto.transport.disconnecting)
        clock.advance(2)
        peer.pump()
        self.assertTrue(proto.transport.disconnecting)
        self.assertEqual(peer.goaway()[0].error_code, 0)
        self.assertEqual(stat(stats, "downstream_cx_idle_timeout"), 1)

    def test_clientGoAwayFinishesStreams(self):
        """
        After the client's graceful GOAWAY, its open streams are still answered; then the connection closes.
        """
        peer, proto, clock, stats = h2(lambda s: Hold())
        peer.request(head())
        peer.client.close_connection()
        peer.pump()
        self.assertFalse(proto.transport.disconnecting)
        Hold.streams[0].respond(200, b"bye")
        # (h2's client takes no frame after its own GOAWAY, so the bytes are checked as they are.)
        out = proto.transport.value()
        self.assertIn(b"bye", out)
        self.assertTrue(proto.transport.disconnecting)


class DetectionTests(unittest.TestCase):
    """
    One listener speaks both: the HTTP/2 preface picks HTTP/2, anything else HTTP/1.1.
    """

    def test_prefaceByteByByte(self):
        """
        A preface arriving one byte per read still selects HTTP/2.
        """
        proto, transport, clock, stats = serve()
        client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        client.initiate_connection()
        client.send_headers(1, head(b"/slow"), end_stream=True)
        data = client.data_to_send()
        for i in range(len(data)):
            proto.dataReceived(data[i:i + 1])
        self.assertIsNotNone(proto.http2)
        events = client.receive_data(transport.value())
        self.assertIn(b"GET /slow 0", [e.data for e in events if isinstance(e, DataReceived)])

    def test_http1(self):
        """
        An HTTP/1.1 request, even one whose first byte matches the preface's, is served as HTTP/1.1.
        """
        proto, transport, clock, stats = serve()
        proto.dataReceived(b"P")
        self.assertEqual(transport.value(), b"")
        proto.dataReceived(b"OST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nab")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK\r\n"), transport.value())
        self.assertTrue(transport.value().endswith(b"POST /x 2"))
        self.assertIsNone(proto.http2)
        self.assertEqual(stat(stats, "downstream_rq_http1_total"), 1)

    def test_http1Only(self):
        """
        A listener built without HTTP/2 never looks for the preface.
        """
        proto, transport, clock, stats = serve(http2=False)
        proto.dataReceived(PREFACE)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 4"), transport.value())

    def test_alpn(self):
        """
        With TLS, ALPN's C{h2} picks HTTP/2 when the handshake completes, before any byte arrives.
        """
        proto, transport, clock, stats = serve()
        transport.negotiatedProtocol = b"h2"
        proto.handshakeCompleted()
        self.assertIsNotNone(proto.http2)
        client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        client.initiate_connection()
        events = client.receive_data(transport.value())  # the server's SETTINGS came first
        self.assertTrue(events)
        client.send_headers(1, head(b"/tls"), end_stream=True)
        transport.clear()
        proto.dataReceived(client.data_to_send())
        events = client.receive_data(transport.value())
        self.assertIn(b"GET /tls 0", [e.data for e in events if isinstance(e, DataReceived)])

    def test_alpnHTTP1(self):
        """
        ALPN's C{http/1.1} is HTTP/1.1 without sniffing.
        """
        proto, transport, clock, stats = serve()
        transport.negotiatedProtocol = b"http/1.1"
        proto.handshakeCompleted()
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK"))


# -- integration: the real thing on loopback ---------------------------------------------------------------------


class H2ClientProtocol(protocol.Protocol):
    """
    A minimal HTTP/2 client over TCP: requests return Deferreds firing with a L{Response}; request bodies
    are sent as the server's windows allow.
    """

    def __init__(self):
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.responses: Dict[int, Response] = {}
        self.waiting: Dict[int, defer.Deferred] = {}
        self.bodies: Dict[int, bytes] = {}
        self.closed = defer.Deferred()

    def connectionMade(self):
        """
        Send the preface.
        """
        self.conn.initiate_connection()
        self.flush()

    def flush(self):
        """
        Write what h2 queued.
        """
        data = self.conn.data_to_send()
        if data:
            self.transport.write(data)

    def request(self, path: bytes, method: bytes = b"GET", body: Optional[bytes] = None, extra=()) -> defer.Deferred:
        """
        Start a request; the Deferred (with the stream id as C{sid}) fires with its L{Response}.
        """
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, head(path, method, extra), end_stream=body is None)
        self.responses[sid] = Response()
        d = self.waiting[sid] = defer.Deferred()
        if body is not None:
            self.bodies[sid] = body
            self.sendBodies()
        self.flush()
        d.sid = sid
        return d

    def reset(self, sid: int) -> None:
        """
        Cancel stream C{sid}.
        """
        self.conn.reset_stream(sid, ErrorCodes.CANCEL)
        self.flush()

    def sendBodies(self):
        """
        Send what the windows allow of the bodies still to send.
        """
        for sid, body in list(self.bodies.items()):
            while body:
                n = min(len(body), self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
                if n <= 0:
                    break
                self.conn.send_data(sid, body[:n], end_stream=n == len(body))
                body = body[n:]
            if body:
                self.bodies[sid] = body
            else:
                del self.bodies[sid]

    def dataReceived(self, data):
        """
        Dispatch the server's frames.
        """
        for event in self.conn.receive_data(data):
            sid = getattr(event, "stream_id", None)
            r = self.responses.get(sid)
            if isinstance(event, ResponseReceived):
                r.headers = event.headers
            elif isinstance(event, DataReceived):
                r.data += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, sid)
            elif isinstance(event, TrailersReceived):
                r.trailers = event.headers
            elif isinstance(event, StreamEnded):
                r.ended = True
                self.waiting.pop(sid).callback(r)
            elif isinstance(event, StreamReset) and sid in self.waiting:
                r.reset = event.error_code
                self.waiting.pop(sid).callback(r)
            elif isinstance(event, WindowUpdated):
                self.sendBodies()
        self.flush()

    def connectionLost(self, reason):
        """
        Fire C{closed}.
        """
        self.closed.callback(None)


class ScriptedOrigin(protocol.Protocol):
    """
    A raw HTTP/1.1 upstream for one request per connection: C{/trailers} answers chunked with gRPC-style
    trailers, C{/slow} never answers. Records its connections and when each closes.
    """

    connections: List = []

    def connectionMade(self):
        """
        Count the connection.
        """
        self.buffer = b""
        self.lost = defer.Deferred()
        self.requests = []
        ScriptedOrigin.connections.append(self)

    def dataReceived(self, data):
        """
        Read the request (and skip its chunked body); answer C{/trailers}.
        """
        self.buffer += data
        if self.requests and not self.bodyDone:
            # The one request's chunked body: read to its end, unparsed.
            if b"0\r\n\r\n" not in self.buffer:
                return
            self.buffer = self.buffer.partition(b"0\r\n\r\n")[2]
            self.bodyDone = True
        if not self.requests and b"\r\n\r\n" in self.buffer:
            requestHead, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            self.requests.append(requestHead)
            self.bodyDone = b"transfer-encoding: chunked" not in requestHead.lower()
            target = requestHead.split(b" ")[1]
            if target == b"/trailers":
                self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\n"
                                     b"transfer-encoding: chunked\r\ntrailer: grpc-status\r\n\r\n"
                                     b"5\r\nhello\r\n0\r\ngrpc-status: 0\r\ngrpc-message: done\r\n\r\n")

    def connectionLost(self, reason):
        """
        Fire C{lost}.
        """
        self.lost.callback(None)


class IntegrationTests(HTTPTestBase):
    """
    HTTP/2 clients through L{MeshService} to real upstreams, on one listener that also serves HTTP/1.1.
    """

    timeout = 60

    routes = HTTPTestBase.routes.replace("[route:main/all]", """[route:main/raw]
prefix = /raw/
prefix_rewrite = /
cluster = raw
[route:main/all]""")

    @defer.inlineCallbacks
    def setUp(self):
        ScriptedOrigin.connections = []
        self.rawPort = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            protocol.Factory.forProtocol(ScriptedOrigin))
        self.addCleanup(self.rawPort.stopListening)
        yield super().setUp()

    def startProxy(self, originPort: int, extra: str = ""):
        """
        The proxy of L{HTTPTestBase}, with a C{raw} cluster for the scripted origin.
        """
        extra += f"\n[cluster:raw]\nendpoints = tcp:127.0.0.1:{self.rawPort.getHost().port}\nconnect_timeout = 1s\n"
        return super().startProxy(originPort, extra)

    @defer.inlineCallbacks
    def client(self) -> defer.Deferred:
        """
        An HTTP/2 client connected to the proxy (closed at cleanup).
        """
        client = H2ClientProtocol()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), client)
        self.addCleanup(lambda: client.closed)
        self.addCleanup(client.transport.loseConnection)
        return client

    @defer.inlineCallbacks
    def test_proxiedRequests(self):
        """
        Concurrent GETs and a 300 KB POST on one HTTP/2 connection reach the origin over HTTP/1.1 and come
        back whole, with the forwarding headers set.
        """
        client = yield self.client()
        body = os.urandom(300000)
        gets = [client.request(b"/a/%d" % i) for i in range(5)]
        post = client.request(b"/upload", b"POST", body)
        responses = yield defer.gatherResults(gets + [post])
        for i, r in enumerate(responses[:5]):
            self.assertEqual(r.status, 200)
            self.assertTrue(r.data.startswith(b"GET /a/%d 0 " % i), r.data)
            self.assertIn((b"x-origin", b"yes"), r.headers)
        self.assertEqual(responses[5].data, b"POST /upload 300000 " + hashlib.md5(body).hexdigest().encode())
        seen = self.origin.requests[0]
        self.assertEqual(seen.getHeader(b"x-forwarded-for"), b"127.0.0.1")
        self.assertEqual(seen.getHeader(b"host"), b"example.com")
        self.assertEqual(self.stat("http.web.downstream_rq_http2_total"), 6)

    @defer.inlineCallbacks
    def test_largeDownload(self):
        """
        A 20 MiB response streams through within the client's windows.
        """
        client = yield self.client()
        r = yield client.request(b"/size/%d" % (20 << 20))
        self.assertEqual(len(r.data), 20 << 20)
        self.assertTrue(r.ended)

    @defer.inlineCallbacks
    def test_upstreamTrailers(self):
        """
        An HTTP/1.1 upstream's chunked trailers reach the HTTP/2 client as trailers.
        """
        client = yield self.client()
        r = yield client.request(b"/raw/trailers", b"POST", b"\x00\x00\x00\x00\x00", [(b"te", b"trailers")])
        self.assertEqual(r.data, b"hello")
        self.assertEqual(r.trailers, [(b"grpc-status", b"0"), (b"grpc-message", b"done")])
        [origin] = ScriptedOrigin.connections
        self.assertIn(b"te: trailers", origin.requests[0].lower())

    @defer.inlineCallbacks
    def test_resetCancelsUpstream(self):
        """
        RST_STREAM from the client abandons the upstream request: its connection is closed.
        """
        client = yield self.client()
        d = client.request(b"/raw/slow")
        for _ in range(100):
            if ScriptedOrigin.connections and ScriptedOrigin.connections[0].requests:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        [origin] = ScriptedOrigin.connections
        client.reset(d.sid)
        yield origin.lost
        self.assertEqual(self.stat("http.web.downstream_rq_rx_reset"), 1)
        self.assertEqual(self.stat("cluster.raw.upstream_rq_active"), 0)

    @defer.inlineCallbacks
    def test_http1OnSameListener(self):
        """
        HTTP/1.1 still works on the listener that speaks HTTP/2.
        """
        data = yield self.raw(b"GET /h1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(data.startswith(b"HTTP/1.1 200 OK"), data[:40])
        self.assertIn(b"GET /h1 0", data)

    @defer.inlineCallbacks
    def test_curl(self):
        """
        curl with prior knowledge (h2c) gets its answer over HTTP/2.
        """
        curl = shutil.which("curl")
        if curl is None:
            raise unittest.SkipTest("curl is not installed")
        out, err, code = yield getProcessOutputAndValue(curl, ["-V"])
        if b"HTTP2" not in out:
            raise unittest.SkipTest("this curl has no HTTP/2")
        out, err, code = yield getProcessOutputAndValue(
            curl, ["-sS", "--http2-prior-knowledge", "-w", "\\n%{http_version}", "--data-binary", "hello",
                   self.url + "/curl"])
        self.assertEqual(code, 0, err)
        self.assertEqual(out, b"POST /curl 5 " + hashlib.md5(b"hello").hexdigest().encode() + b"\n2")

    @defer.inlineCallbacks
    def test_h2load(self):
        """
        A small bounded h2load run (200 requests, 2 connections, 10 streams each) all succeed, proxied and
        direct.
        """
        h2load = shutil.which("h2load")
        if h2load is None:
            raise unittest.SkipTest("h2load is not installed")
        for path in ("/hello", "/proxied"):
            out, err, code = yield getProcessOutputAndValue(
                h2load, ["-n", "200", "-c", "2", "-m", "10", self.url + path])
            self.assertEqual(code, 0, err)
            match = re.search(rb"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded", out)
            self.assertIsNotNone(match, out)
            self.assertEqual(match.group(4), b"200", out)
            self.assertIn(b"status codes: 200 2xx", out)
