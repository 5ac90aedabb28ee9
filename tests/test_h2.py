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
from h2.events import ConnectionTerminated, DataReceived, StreamEnded, WindowUpdated
from h2.settings import SettingCodes, Settings
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from twisted.internet import defer, protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from twistedmesh.config import loadString
from twistedmesh.config.errors import ConfigErrors
from twistedmesh.http.h2server import HTTP2Settings
from twistedmesh.http.server import HTTPSettings
from twistedmesh.http.stream import HTTPFilter
from twistedmesh.listener.http import PREFACE, HTTPListenerFactory, http2Settings
from twistedmesh.observability.stats import StatsStore

from .support import Producer, Response, connectH2, head, peakBuffered, startEcho, startService, stopProxy, waitFor
from .test_http import HTTPTestBase, StallingOrigin
from .test_server import Answer

GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"example.com")]


# -- unit harness ---------------------------------------------------------------------------------------------


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


class Peer:
    """
    h2's client connection speaking to a server protocol over a memory transport. C{pump} moves bytes
    both ways until both are quiet. With C{autoAck}, received data is acknowledged as it arrives.
    """

    def __init__(self, proto, transport, window: Optional[int] = None, autoAck: bool = True, lax: bool = False):
        """
        With C{lax}, the client sends whatever fields it is given (to test malformed requests).
        """
        self.proto = proto
        self.transport = transport
        self.client = H2Connection(H2Configuration(client_side=True, header_encoding=None,
                                                   validate_outbound_headers=not lax,
                                                   normalize_outbound_headers=not lax))
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
        if sid:
            self.responses.setdefault(sid, Response()).record(event)
            if self.autoAck and isinstance(event, DataReceived):
                self.client.acknowledge_received_data(event.flow_controlled_length, sid)

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

    def openAndReset(self, peer, n: int) -> None:
        """
        Open C{n} streams and reset each at once.
        """
        for i in range(n):
            sid = peer.client.get_next_available_stream_id()
            peer.client.send_headers(sid, head(), end_stream=True)
            peer.client.reset_stream(sid, ErrorCodes.CANCEL)
            peer.pump()

    def test_rapidReset(self):
        """
        Before the 500-stream floor, a client whose premature resets alone pass half the floor (251) gets
        GOAWAY(ENHANCE_YOUR_CALM) and is closed: the verdict at the floor could no longer change.
        """
        peer, proto, clock, stats = h2(lambda s: Hold())
        self.openAndReset(peer, 250)
        self.assertFalse(proto.transport.disconnecting)
        self.assertEqual(peer.goaway(), [])
        self.openAndReset(peer, 1)
        [goaway] = peer.goaway()
        self.assertEqual(goaway.error_code, ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertTrue(proto.transport.disconnecting)
        self.assertEqual(stat(stats, "downstream_rq_too_many_premature_resets"), 1)
        self.assertEqual(stat(stats, "http2.rx_reset"), 251)
        self.assertEqual(stat(stats, "http2.goaway_sent"), 1)
        # A client that does not read the GOAWAY does not keep the connection: aborted after 1 s.
        self.assertFalse(proto.transport.disconnected)
        clock.advance(1)
        self.assertTrue(proto.transport.disconnected)

    def test_rapidResetPastFloor(self):
        """
        Past the floor, the rule is more than half of the closed streams: after 260 answered streams, the
        260th premature reset (half of 520) is tolerated, the 261st is not.
        """
        peer, proto, clock, stats = h2()
        for i in range(260):
            peer.request(head())
        self.openAndReset(peer, 260)
        self.assertEqual(peer.goaway(), [])
        self.openAndReset(peer, 1)
        self.assertEqual([g.error_code for g in peer.goaway()], [ErrorCodes.ENHANCE_YOUR_CALM])
        self.assertTrue(proto.transport.disconnecting)

    def test_rapidResetConfigured(self):
        """
        The floor and the premature lifetime are the listener's: with a floor of 10, after 4 resets past the
        lifetime (which do not count), the 6th instant reset closes the connection.
        """
        peer, proto, clock, stats = h2(lambda s: Hold(), http2=HTTP2Settings(
            prematureResetTotalStreamCount=10, prematureResetMinStreamLifetime=0.5))
        for i in range(4):
            sid = peer.request(head())
            clock.advance(0.6)
            peer.client.reset_stream(sid, ErrorCodes.CANCEL)
            peer.pump()
        self.assertEqual(peer.goaway(), [])
        self.openAndReset(peer, 5)
        self.assertEqual(peer.goaway(), [])
        self.openAndReset(peer, 1)
        self.assertEqual([g.error_code for g in peer.goaway()], [ErrorCodes.ENHANCE_YOUR_CALM])

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

    def test_refusedAndResetInOneRead(self):
        """
        A stream opened after our GOAWAY and reset by the client in the same read needs no refusal: the
        stream still being answered is unharmed.
        """
        peer, proto, clock, stats = h2(lambda s: Hold())
        sid = peer.request(head())
        proto.factory.drain()
        peer.pump()
        peer.client.state_machine.state = peer.client.state_machine.state.CLIENT_OPEN
        late = peer.client.get_next_available_stream_id()
        peer.client.send_headers(late, head(b"/late"), end_stream=True)
        peer.client.reset_stream(late, ErrorCodes.CANCEL)
        peer.pump()
        self.assertEqual(stat(stats, "http2.tx_reset"), 0)
        self.assertFalse(proto.transport.disconnecting)
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
        clock.advance(1)
        self.assertTrue(proto.transport.disconnected)

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
        # A client that stops reading does not keep the closing connection open.
        self.assertFalse(proto.transport.disconnected)
        clock.advance(1)
        self.assertTrue(proto.transport.disconnected)

    def test_gracefulCloseWaitsForAReader(self):
        """
        A closing connection whose client still reads (the transport's buffer shrinks) gets another period
        each time; one whose client stopped is aborted a period later.
        """
        peer, proto, clock, stats = h2(maxRequestsPerConnection=1)
        proto.transport.dataBuffer = b"x" * 3000  # what a TCP transport still has to write
        peer.request(head(b"/1"))
        self.assertTrue(proto.transport.disconnecting)
        for left in (2000, 1000):
            proto.transport.dataBuffer = b"x" * left
            clock.advance(1)
            self.assertFalse(proto.transport.disconnected)
        clock.advance(1)
        self.assertTrue(proto.transport.disconnected)

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
        clock.advance(1)
        self.assertTrue(proto.transport.disconnected)


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


class AbuseTests(unittest.TestCase):
    """
    Each flood limit closes the connection with GOAWAY(ENHANCE_YOUR_CALM) within bounded memory, moves its
    counter, and does not leave the connection open for a client that stops reading.
    """

    def setUp(self):
        Hold.streams = []

    def assertCalmedDown(self, peer, proto, stats, counter: str) -> None:
        """
        The connection got GOAWAY(ENHANCE_YOUR_CALM) and is closing, C{counter} moved once, and a client
        that does not read is dropped after the delayed-close timeout.
        """
        events = peer.client.receive_data(proto.transport.value()) if proto.transport.value() else []
        goaways = [e for e in peer.events + events if isinstance(e, ConnectionTerminated)]
        self.assertEqual([g.error_code for g in goaways], [ErrorCodes.ENHANCE_YOUR_CALM])
        self.assertTrue(proto.transport.disconnecting)
        self.assertEqual(stat(stats, "http2." + counter), 1)
        self.assertEqual(stat(stats, "downstream_cx_protocol_error"), 0)
        self.assertFalse(proto.transport.disconnected)
        proto.http2.settings.clock.advance(1)
        self.assertTrue(proto.transport.disconnected)

    def test_continuationFlood(self):
        """
        A HEADERS frame followed by CONTINUATION frames that never end the block is cut off once the block
        passes its bound (twice the header list limit, 120 KiB): the compressed bytes held never exceed it.
        """
        peer, proto, clock, stats = h2(lambda s: Hold())
        h2c = proto.http2.h2
        limit = proto.http2.inbound.blockLimit
        self.assertEqual(limit, 120 * 1024)
        proto.dataReceived(HeadersFrame(1, data=b"\x82" * 16384).serialize())  # no END_HEADERS
        held = sent = 0
        while not proto.transport.disconnecting and sent < 1000:
            proto.dataReceived(ContinuationFrame(1, data=b"\x82" * 16384).serialize())
            sent += 1
            held = max(held, sum(len(f.data) for f in h2c.incoming_buffer._headers_buffer))
        self.assertLessEqual(held, limit)
        self.assertEqual(sent, limit // 16384)  # the frame that would pass the bound was refused
        self.assertEqual(Hold.streams, [])
        self.assertCalmedDown(peer, proto, stats, "header_overflow")

    def test_continuationFrameCount(self):
        """
        Tiny CONTINUATION frames are bounded by count as well (64 per block).
        """
        peer, proto, clock, stats = h2()
        proto.dataReceived(HeadersFrame(1, data=b"\x82").serialize())
        for i in range(100):
            proto.dataReceived(ContinuationFrame(1, data=b"\x84").serialize())
        self.assertCalmedDown(peer, proto, stats, "header_overflow")

    def test_continuationNormal(self):
        """
        A header block split over a few CONTINUATION frames is a request like any other.
        """
        peer, proto, clock, stats = h2()
        peer.client.send_headers(1, head(b"/split"), end_stream=True)
        block = peer.client.data_to_send()[9:]  # one HEADERS frame (no padding, no priority): its block
        proto.dataReceived(HeadersFrame(1, data=block[:3], flags=["END_STREAM"]).serialize()
                           + ContinuationFrame(1, data=block[3:6]).serialize()
                           + ContinuationFrame(1, data=block[6:], flags=["END_HEADERS"]).serialize())
        peer.pump()
        self.assertEqual(peer.responses[1].data, b"GET /split 0")

    def test_hpackBomb(self):
        """
        A small header block that decodes to far more than the limit (one large field in the dynamic table,
        then referenced a hundred times) is a connection error, counted as a header overflow.
        """
        peer, proto, clock, stats = h2()
        peer.client.send_headers(1, head(extra=[(b"x-big", b"b" * 4000)] * 100), end_stream=True)
        wire = peer.client.data_to_send()
        self.assertLess(len(wire), 8000)
        proto.dataReceived(wire)
        self.assertCalmedDown(peer, proto, stats, "header_overflow")

    def test_pingFlood(self):
        """
        1000 PINGs in one read are answered; 1001 (more acknowledgements queued than the limit) close the
        connection.
        """
        ping = PingFrame(0, opaque_data=b"12345678").serialize()
        peer, proto, clock, stats = h2()
        proto.dataReceived(ping * 1000)
        self.assertFalse(proto.transport.disconnecting)
        proto.dataReceived(ping * 1000)  # the client read the answers to the first batch: fine again
        self.assertFalse(proto.transport.disconnecting)
        peer, proto, clock, stats = h2()
        proto.dataReceived(ping * 1001)
        self.assertCalmedDown(peer, proto, stats, "outbound_control_flood")

    def test_pingFloodWhileNotReading(self):
        """
        While the client's socket is full, acknowledgements queued over several reads add up.
        """
        ping = PingFrame(0, opaque_data=b"12345678").serialize()
        peer, proto, clock, stats = h2()
        proto.http2.pauseProducing()  # the transport says: the client is not reading
        proto.dataReceived(ping * 600)
        self.assertFalse(proto.transport.disconnecting)
        proto.dataReceived(ping * 600)
        self.assertTrue(proto.transport.disconnecting)
        self.assertEqual(stat(stats, "http2.outbound_control_flood"), 1)

    def test_settingsFlood(self):
        """
        SETTINGS frames are acknowledged, so a flood of them is an outbound control flood too.
        """
        peer, proto, clock, stats = h2(http2=HTTP2Settings(maxOutboundControlFrames=50))
        proto.dataReceived(SettingsFrame(0, settings={SettingCodes.ENABLE_PUSH: 0}).serialize() * 51)
        self.assertCalmedDown(peer, proto, stats, "outbound_control_flood")

    def test_resetStreamsFlood(self):
        """
        Frames on streams the client reset make h2 answer RST_STREAM each time: counted the same way.
        """
        peer, proto, clock, stats = h2(lambda s: Hold(), http2=HTTP2Settings(maxOutboundControlFrames=20))
        sid = peer.request(head(b"/up", b"POST"), end=False)
        peer.client.reset_stream(sid, ErrorCodes.CANCEL)
        peer.pump()
        proto.dataReceived(DataFrame(sid, data=b"x").serialize() * 21)
        self.assertCalmedDown(peer, proto, stats, "outbound_control_flood")

    def test_emptyDataFlood(self):
        """
        One empty DATA frame without END_STREAM is tolerated; two in a row close the connection. A frame
        with a payload in between starts the count again.
        """
        peer, proto, clock, stats = h2(lambda s: Hold())
        sid = peer.request(head(b"/up", b"POST"), end=False)
        empty = DataFrame(sid).serialize()
        proto.dataReceived(empty + DataFrame(sid, data=b"x").serialize() + empty)
        self.assertFalse(proto.transport.disconnecting)
        proto.dataReceived(empty)
        self.assertCalmedDown(peer, proto, stats, "inbound_empty_frames_flood")
        self.assertEqual(b"".join(Hold.streams[0].state["hold"].body), b"x")

    def test_emptyContinuationFlood(self):
        """
        Empty HEADERS and CONTINUATION frames count as empty frames too.
        """
        peer, proto, clock, stats = h2()
        proto.dataReceived(HeadersFrame(1, data=b"\x82").serialize() + ContinuationFrame(1).serialize() * 2)
        self.assertCalmedDown(peer, proto, stats, "inbound_empty_frames_flood")

    def test_priorityFlood(self):
        """
        PRIORITY frames are allowed 100 per stream opened (plus 100): the 101st on a fresh connection closes it.
        """
        peer, proto, clock, stats = h2()
        priority = PriorityFrame(1, depends_on=0, stream_weight=16).serialize()
        proto.dataReceived(priority * 100)
        self.assertFalse(proto.transport.disconnecting)
        proto.dataReceived(priority)
        self.assertCalmedDown(peer, proto, stats, "inbound_priority_frames_flood")

    def test_windowUpdateFlood(self):
        """
        WINDOW_UPDATE frames are allowed as Envoy allows them: 5 + 2 x (streams opened + 10 x DATA frames
        sent) over the connection's life.
        """
        peer, proto, clock, stats = h2()
        update = WindowUpdateFrame(0, window_increment=1).serialize()
        proto.dataReceived(update * 5)
        self.assertFalse(proto.transport.disconnecting)
        peer.request(head())  # a stream opened, one DATA frame sent: 5 + 2 x (1 + 10) = 27 in all
        proto.dataReceived(update * 22)
        self.assertFalse(proto.transport.disconnecting)
        proto.dataReceived(update)
        self.assertCalmedDown(peer, proto, stats, "inbound_window_update_frames_flood")

    def test_windowUpdatesForHeadOnlyAnswers(self):
        """
        A client that widens every stream's window, answered with HEADERS alone (no DATA frame at all), is
        not taken for a flood: each stream opened allows two WINDOW_UPDATE frames.
        """
        peer, proto, clock, stats = h2(lambda s: Hold())
        for i in range(50):
            sid = peer.client.get_next_available_stream_id()
            peer.client.send_headers(sid, head(b"/%d" % i), end_stream=True)
            peer.client.increment_flow_control_window(1 << 20, sid)
            peer.client.increment_flow_control_window(1 << 16)
            peer.pump()
            Hold.streams[-1].respond(204, b"")
            peer.pump()
        self.assertEqual(proto.http2.inbound.dataFramesSent, 0)
        self.assertEqual(peer.goaway(), [])
        self.assertFalse(proto.transport.disconnecting)
        self.assertEqual(stat(stats, "http2.inbound_window_update_frames_flood"), 0)

    def test_oversizedFrame(self):
        """
        A frame larger than our SETTINGS_MAX_FRAME_SIZE is a FRAME_SIZE_ERROR; a larger configured size
        admits it.
        """
        peer, proto, clock, stats = h2(lambda s: Hold())
        sid = peer.request(head(b"/up", b"POST"), end=False)
        proto.dataReceived(DataFrame(sid, data=b"x" * 20000).serialize())
        self.assertTrue(proto.transport.disconnecting)
        self.assertEqual(stat(stats, "downstream_cx_protocol_error"), 1)
        Hold.streams = []
        peer, proto, clock, stats = h2(lambda s: Hold(), http2=HTTP2Settings(maxFrameSize=32768))
        self.assertEqual(peer.client.remote_settings.max_frame_size, 32768)
        sid = peer.request(head(b"/up", b"POST"), end=False)
        proto.dataReceived(DataFrame(sid, data=b"x" * 20000).serialize())
        self.assertFalse(proto.transport.disconnecting)
        self.assertEqual(len(b"".join(Hold.streams[0].state["hold"].body)), 20000)


    def test_oversizedFrameHeader(self):
        """
        A frame announcing more than our SETTINGS_MAX_FRAME_SIZE is refused at its 9-byte header, before
        its payload is buffered: GOAWAY(FRAME_SIZE_ERROR), the connection closes (aborted a second later if
        the client does not read), and what follows is never held.
        """
        peer, proto, clock, stats = h2()
        header = (0xFFFFFF).to_bytes(3, "big") + b"\x00\x00" + (1).to_bytes(4, "big")
        proto.dataReceived(header)
        for i in range(4):
            proto.dataReceived(b"x" * 65536)
        self.assertLessEqual(len(proto.http2.inbound._data), 9)
        self.assertTrue(proto.transport.disconnecting)
        events = peer.client.receive_data(proto.transport.value())
        self.assertEqual([e.error_code for e in events if isinstance(e, ConnectionTerminated)],
                         [ErrorCodes.FRAME_SIZE_ERROR])
        self.assertEqual(stat(stats, "downstream_cx_protocol_error"), 1)
        clock.advance(1)
        self.assertTrue(proto.transport.disconnected)


class MalformedRequestTests(unittest.TestCase):
    """
    A malformed request (RFC 9113 section 8.1.1) is a stream error, RST_STREAM(PROTOCOL_ERROR): the
    connection and its other streams carry on.
    """

    def setUp(self):
        Hold.streams = []

    def assertMalformed(self, fields, details: str = "http2.violation.of.messaging.rule") -> None:
        """
        C{fields} on a lax client's stream get RST_STREAM(PROTOCOL_ERROR), the stream completes flagged
        DPE with C{details}, no filter sees it, and the next request on the connection is answered.
        """
        logged = []

        class Log:
            def log(self, stream, now):
                logged.append((stream.responseFlags, stream.responseCodeDetails))

        proto, transport, clock, stats = serve(lambda s: Hold(), accessLog=Log())
        peer = Peer(proto, transport, lax=True)
        sid = peer.request(fields)
        self.assertEqual(peer.responses[sid].reset, ErrorCodes.PROTOCOL_ERROR)
        self.assertEqual(Hold.streams, [])
        self.assertEqual(logged, [(["DPE"], details)])
        self.assertEqual(stat(stats, "http2.rx_messaging_error"), 1)
        self.assertEqual(stat(stats, "http2.tx_reset"), 1)
        self.assertEqual(stat(stats, "downstream_rq_active"), 0)
        later = peer.request(head(b"/next"))
        self.assertIsNone(getattr(peer.responses.get(later), "reset", None))
        self.assertEqual(len(Hold.streams), 1)
        self.assertEqual(peer.goaway(), [])
        self.assertFalse(proto.transport.disconnecting)

    def test_connectionSpecific(self):
        """
        Connection-specific fields (RFC 9113 section 8.2.2) are malformed in a request.
        """
        for name in (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"):
            Hold.streams = []
            self.assertMalformed(head(extra=[(name, b"x")]), "http2.invalid.header.field")

    def test_te(self):
        """
        C{te} other than C{trailers} is malformed; C{te: trailers} is forwarded.
        """
        self.assertMalformed(head(extra=[(b"te", b"gzip")]), "http2.invalid.header.field")
        peer, proto, clock, stats = h2(lambda s: Hold())
        peer.request(head(extra=[(b"te", b"trailers")]))
        self.assertIn((b"te", b"trailers"), Hold.streams[-1].requestHeaders)

    def test_uppercaseName(self):
        """
        A field name with uppercase letters is malformed in HTTP/2.
        """
        self.assertMalformed(head(extra=[(b"X-Upper", b"1")]), "http2.invalid.header.field")

    def test_invalidValue(self):
        """
        CR, LF or NUL in a value, or whitespace around it, is malformed (never smuggled to an HTTP/1.1
        upstream).
        """
        for value in (b"a\r\nx-injected: 1", b"a\x00b", b" padded", b"padded\t"):
            Hold.streams = []
            self.assertMalformed(head(extra=[(b"x-v", value)]), "http2.invalid.header.field")

    def test_invalidContentLength(self):
        """
        A content-length that is not all digits, or two that disagree, is malformed: a stream error, even
        with the body in the same read, none of which reaches a filter; equal copies are a request.
        """
        for values in ([b"1x"], [b""], [b"-1"], [b" 5"], [b"5", b"6"]):
            Hold.streams = []
            self.assertMalformed(head(b"/up", b"POST", extra=[(b"content-length", v) for v in values]),
                                 "http2.invalid.header.field")
        Hold.streams = []
        proto, transport, clock, stats = serve(lambda s: Hold())
        peer = Peer(proto, transport, lax=True)
        sid = peer.client.get_next_available_stream_id()
        peer.client.send_headers(sid, head(b"/up", b"POST", extra=[(b"content-length", b"4x")]))
        peer.client.send_data(sid, b"body", end_stream=True)
        peer.pump()
        self.assertEqual(peer.responses[sid].reset, ErrorCodes.PROTOCOL_ERROR)
        self.assertEqual(Hold.streams, [])
        self.assertEqual(peer.goaway(), [])
        sid = peer.request(head(b"/up", b"POST", extra=[(b"content-length", b"4"), (b"content-length", b"04")]),
                           b"body")
        self.assertEqual(b"".join(Hold.streams[0].state["hold"].body), b"body")
        self.assertIsNone(getattr(peer.responses.get(sid), "reset", None))

    def test_missingPseudoHeaders(self):
        """
        Without :method, :scheme or :path (or with an empty :path) the request is malformed.
        """
        full = head()
        for missing in (b":method", b":scheme", b":path"):
            Hold.streams = []
            self.assertMalformed([f for f in full if f[0] != missing])
        Hold.streams = []
        self.assertMalformed([(b":path", b"") if f[0] == b":path" else f for f in full])

    def test_badPseudoHeaders(self):
        """
        A repeated, unknown or response pseudo-header, or one after a regular field, is malformed.
        """
        for fields in (head() + [(b":path", b"/again")], head() + [(b":protocol", b"websocket")],
                       head() + [(b":status", b"200")], [(b"x-first", b"1")] + head()):
            Hold.streams = []
            self.assertMalformed(fields)

    def test_authority(self):
        """
        Neither :authority nor Host is malformed; so are the two disagreeing. Host alone stands in for
        :authority, and never reaches the filters as a field.
        """
        bare = [f for f in head() if f[0] != b":authority"]
        self.assertMalformed(bare)
        Hold.streams = []
        self.assertMalformed(head(extra=[(b"host", b"other.example")]))
        Hold.streams = []
        peer, proto, clock, stats = h2(lambda s: Hold())
        peer.request(bare + [(b"host", b"via-host.example")])
        [stream] = Hold.streams
        self.assertEqual(stream.authority, b"via-host.example")
        self.assertNotIn(b"host", [name for name, _ in stream.requestHeaders])

    def test_badTrailers(self):
        """
        A pseudo-header or an invalid field in the request's trailers is malformed too.
        """
        peer, proto, clock, stats = serve(lambda s: Hold())[0], None, None, None
        proto, transport, clock, stats = serve(lambda s: Hold())
        peer = Peer(proto, transport, lax=True)
        sid = peer.request(head(b"/up", b"POST"), b"body", end=False)
        peer.client.send_headers(sid, [(b":path", b"/x")], end_stream=True)
        peer.pump()
        self.assertEqual(peer.responses[sid].reset, ErrorCodes.PROTOCOL_ERROR)
        self.assertEqual(Hold.streams[0].responseFlags, ["DPE"])
        self.assertEqual(stat(stats, "http2.rx_messaging_error"), 1)
        self.assertFalse(proto.transport.disconnecting)

    def test_cookieCrumbs(self):
        """
        Cookie crumbs are joined with "; " into one field where the first was, for the filters and an
        HTTP/1.1 upstream (RFC 9113 section 8.2.3).
        """
        peer, proto, clock, stats = h2(lambda s: Hold())
        peer.request(head(extra=[(b"cookie", b"a=1"), (b"x-mid", b"m"), (b"cookie", b"b=2"),
                                 (b"cookie", b"c=3")]))
        fields = Hold.streams[0].requestHeaders
        self.assertEqual([f for f in fields if f[0] in (b"cookie", b"x-mid")],
                         [(b"cookie", b"a=1; b=2; c=3"), (b"x-mid", b"m")])

    def test_malformedAndResetInOneRead(self):
        """
        A malformed request whose RST_STREAM from the client arrives in the same read is over without our
        reset (the stream is closed on the wire already), and the connection's other streams carry on.
        """
        proto, transport, clock, stats = serve(lambda s: Hold())
        peer = Peer(proto, transport, lax=True)
        good = peer.request(head(b"/held"))
        bad = peer.client.get_next_available_stream_id()
        peer.client.send_headers(bad, head(extra=[(b"Bad-Name", b"x")]), end_stream=True)
        peer.client.reset_stream(bad, ErrorCodes.CANCEL)
        peer.pump()
        self.assertEqual(stat(stats, "http2.rx_messaging_error"), 1)
        self.assertEqual(stat(stats, "http2.tx_reset"), 0)
        self.assertEqual(stat(stats, "http2.rx_reset"), 1)
        self.assertFalse(proto.transport.disconnecting)
        Hold.streams[0].respond(200, b"still here")
        peer.pump()
        self.assertEqual((good, peer.responses[good].data), (1, b"still here"))
        self.assertEqual(stat(stats, "downstream_rq_active"), 0)

    def test_malformedFloodIsRapidReset(self):
        """
        Malformed requests make us reset streams at the client's will: they count as premature resets.
        """
        proto, transport, clock, stats = serve(lambda s: Hold())
        peer = Peer(proto, transport, lax=True)
        for i in range(251):
            peer.request(head(extra=[(b"connection", b"close")]))
        self.assertEqual([g.error_code for g in peer.goaway()], [ErrorCodes.ENHANCE_YOUR_CALM])
        self.assertEqual(stat(stats, "downstream_rq_too_many_premature_resets"), 1)


class SettingsTests(unittest.TestCase):
    """
    The listener's C{http2.*} keys: validated when the config loads, announced in SETTINGS.
    """

    base = """
[listener:web]
endpoint = tcp:0:interface=127.0.0.1
protocol = http
filters = router
routes = main
{keys}
[route:main/all]
prefix = /
direct_response.status = 200
"""

    def load(self, keys: str):
        return loadString(self.base.format(keys=keys), "mesh.ini")

    def test_defaults(self):
        """
        Without keys, Envoy's edge values, and HTTP/2 on.
        """
        c = self.load("").listeners["web"].http2
        self.assertEqual((c.enabled, c.max_concurrent_streams, c.initial_stream_window_size,
                          c.initial_connection_window_size, c.max_frame_size, c.max_header_list_size,
                          c.max_outbound_control_frames, c.max_consecutive_inbound_frames_with_empty_payload,
                          c.max_inbound_priority_frames_per_stream,
                          c.max_inbound_window_update_frames_per_data_frame_sent,
                          c.premature_reset_total_stream_count, c.premature_reset_min_stream_lifetime),
                         (True, 100, 65536, 1 << 20, 16384, None, 1000, 1, 100, 10, 500, 1.0))

    def test_keysReachTheWire(self):
        """
        Configured values are what the client is told in SETTINGS and what the connection enforces.
        """
        config = self.load("http2.max_concurrent_streams = 7\nhttp2.initial_stream_window_size = 128KiB\n"
                           "http2.initial_connection_window_size = 4MiB\nhttp2.max_frame_size = 65536\n"
                           "http2.max_header_list_size = 16KiB\nhttp2.max_outbound_control_frames = 5\n"
                           "http2.premature_reset_min_stream_lifetime = 250ms\n")
        limits = http2Settings(config.listeners["web"].http2)
        self.assertEqual((limits.maxOutboundControlFrames, limits.prematureResetMinStreamLifetime), (5, 0.25))
        peer, proto, clock, stats = h2(http2=limits)
        remote = peer.client.remote_settings
        self.assertEqual((remote.max_concurrent_streams, remote.initial_window_size, remote.max_frame_size,
                          remote.max_header_list_size), (7, 128 * 1024, 65536, 16 * 1024))
        self.assertEqual(peer.client.outbound_flow_control_window, 4 << 20)
        sid = peer.request(head(extra=[(b"x-big", b"b" * 17000)]))
        self.assertEqual(peer.responses[sid].status, 431)

    def test_outOfRange(self):
        """
        Values outside RFC 9113's ranges (or Envoy's) are errors naming the file, section and key.
        """
        cases = {
            "http2.initial_stream_window_size = 2GiB": "http2.initial_stream_window_size",
            "http2.initial_connection_window_size = 1000": "http2.initial_connection_window_size",
            "http2.max_frame_size = 8KiB": "http2.max_frame_size",
            "http2.max_frame_size = 16MiB": "http2.max_frame_size",
            "http2.max_concurrent_streams = 0": "http2.max_concurrent_streams",
            "http2.max_header_list_size = 100": "http2.max_header_list_size",
            "http2.max_outbound_control_frames = 0": "http2.max_outbound_control_frames",
            "http2.max_inbound_window_update_frames_per_data_frame_sent = 0":
                "http2.max_inbound_window_update_frames_per_data_frame_sent",
            "http2.premature_reset_min_stream_lifetime = soon": "http2.premature_reset_min_stream_lifetime",
            "http2.max_concurent_streams = 5": "http2.max_concurent_streams",
            "http2 = maybe": "http2",
        }
        for line, key in cases.items():
            e = self.assertRaises(ConfigErrors, self.load, line)
            text = str(e)
            self.assertIn("mesh.ini", text, line)
            self.assertIn("[listener:web]", text, line)
            self.assertIn(key, text, line)
        self.assertIn("from 16384 bytes to 16777215 bytes",
                      str(self.assertRaises(ConfigErrors, self.load, "http2.max_frame_size = 8KiB")))
        self.assertIn("2147483647", str(self.assertRaises(ConfigErrors, self.load,
                                                           "http2.initial_stream_window_size = 2GiB")))

    def test_tcpListener(self):
        """
        The keys belong to HTTP listeners: on a TCP listener they are unknown.
        """
        e = self.assertRaises(ConfigErrors, loadString, """
[listener:raw]
endpoint = tcp:0:interface=127.0.0.1
protocol = tcp
cluster = c
http2.max_concurrent_streams = 5
[cluster:c]
endpoints = tcp:127.0.0.1:1
""", "mesh.ini")
        self.assertIn("http2.max_concurrent_streams", str(e))

    def test_off(self):
        """
        C{http2 = off} serves HTTP/1.1 only: the preface is not recognised.
        """
        config = self.load("http2 = off")
        self.assertIs(http2Settings(config.listeners["web"].http2), False)
        proto, transport, clock, stats = serve(http2=http2Settings(config.listeners["web"].http2))
        proto.dataReceived(PREFACE)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 4"), transport.value())


class AcknowledgementOrderTests(unittest.TestCase):
    """
    Request data is acknowledged to the client only after the upstream side accepted it.
    """

    def test_ackAfterUpstreamAccepted(self):
        """
        The WINDOW_UPDATE for a chunk is queued only after the chunk was written upstream; a write that
        fills the upstream's buffer (it pauses the body producer) holds the acknowledgement until the
        upstream drains.
        """
        order = []

        class Upstream(HTTPFilter):
            """
            Plays the router: writes each chunk to an upstream transport that pauses the producer once
            its buffer passes 40000 bytes.
            """

            def requestHeaders(self, stream):
                self.buffered = 0
                self.producer = stream.codec.bodyProducer
                Hold.streams.append(stream)

            def requestData(self, stream, data, end):
                self.buffered += len(data)
                order.append(("upstream", len(data)))
                if self.buffered > 40000:
                    self.producer.pauseProducing()

        Hold.streams = []
        peer, proto, clock, stats = h2(lambda s: Upstream())
        h2c = proto.http2.h2
        acknowledge = h2c.acknowledge_received_data

        def spy(n, sid):
            order.append(("ack", n))
            return acknowledge(n, sid)

        h2c.acknowledge_received_data = spy
        sid = peer.request(head(b"/up", b"POST"), end=False)
        peer.send(sid, b"a" * 16384)
        peer.send(sid, b"b" * 16384)
        peer.send(sid, b"c" * 16384)
        self.assertEqual(order, [("upstream", 16384), ("ack", 16384), ("upstream", 16384), ("ack", 16384),
                                 ("upstream", 16384)])
        # Two chunks acknowledged (h2 sends one WINDOW_UPDATE per half window), the third held.
        self.assertEqual(peer.client.local_flow_control_window(sid), 65536 - 3 * 16384 + 2 * 16384)
        filt = Hold.streams[0]
        filt.codec.bodyProducer.resumeProducing()
        peer.pump()
        self.assertEqual(order[-1], ("ack", 16384))
        self.assertEqual(sum(n for kind, n in order if kind == "ack"), 3 * 16384)


# -- integration: the real thing on loopback ---------------------------------------------------------------------


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

    def client(self, port: Optional[int] = None, window: Optional[int] = None) -> defer.Deferred:
        """
        An HTTP/2 client connected to the proxy (closed at cleanup).
        """
        return connectH2(self, port or self.port, window)

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
        yield waitFor(lambda: ScriptedOrigin.connections and ScriptedOrigin.connections[0].requests, 10,
                      "the request at the origin", 0.01)
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

    @defer.inlineCallbacks
    def test_nghttpTrailers(self):
        """
        nghttp (h2c, verbose) sees the upstream's trailers as a trailing HEADERS frame with END_STREAM.
        """
        nghttp = shutil.which("nghttp")
        if nghttp is None:
            raise unittest.SkipTest("nghttp is not installed (Debian package nghttp2-client)")
        out, err, code = yield getProcessOutputAndValue(
            nghttp, ["-v", "-H", "te: trailers", self.url + "/raw/trailers"])
        self.assertEqual(code, 0, err)
        self.assertRegex(out, rb"recv \(stream_id=\d+\) grpc-status: 0\n.*recv \(stream_id=\d+\) grpc-message: done\n"
                              rb".*recv HEADERS frame <length=\d+, flags=0x05, stream_id=\d+>")  # END_STREAM|END_HEADERS
        self.assertIn(b"hello", out)

    @defer.inlineCallbacks
    def test_upstreamDiesAfterHeaders(self):
        """
        An upstream that dies after the response started: the client gets RST_STREAM(INTERNAL_ERROR), never
        a clean end, and the connection carries on.
        """
        client = yield self.client()
        r = yield client.request(b"/die")
        self.assertEqual(r.status, 200)
        self.assertEqual(r.reset, ErrorCodes.INTERNAL_ERROR)
        self.assertFalse(r.ended)
        again = yield client.request(b"/after")
        self.assertTrue(again.ended)
        self.assertEqual(self.stat("http.web.http2.tx_reset"), 1)

    @defer.inlineCallbacks
    def test_resetReasonLogged(self):
        """
        RST_STREAM from the client abandons the upstream request, and the access log (written at
        C{streamComplete}) says why: flag DR, details http2.remote_reset.
        """
        path = os.path.abspath(self.mktemp())
        service = self.startProxy(self.originPort.getHost().port,
                                  f"access_log = {path}\naccess_log.format = %REQ(:PATH)% %RESPONSE_FLAGS% "
                                  f"%RESPONSE_CODE_DETAILS%")
        yield service.whenLive
        client = yield self.client(service.listeners["web"].port.getHost().port)
        d = client.request(b"/raw/slow")
        yield waitFor(lambda: ScriptedOrigin.connections and ScriptedOrigin.connections[0].requests, 10,
                      "the request at the origin", 0.01)
        client.reset(d.sid)
        yield ScriptedOrigin.connections[0].lost
        yield self._stop(service)
        with open(path) as f:
            self.assertEqual(f.read(), "/slow DR http2.remote_reset\n")  # (the path as rewritten)

    @defer.inlineCallbacks
    def test_drainSendsGoAway(self):
        """
        Draining the listener sends GOAWAY(NO_ERROR) naming the last stream; that stream is still answered
        (here by the route's timeout) and the connection closes after it.
        """
        client = yield self.client()
        d = client.request(b"/quick/slow")
        yield waitFor(lambda: self.origin.requests, 10, "the request at the origin", 0.01)
        self.service.listeners["web"].factory.drain()
        yield waitFor(lambda: client.goaways, 10, "a GOAWAY", 0.01)
        [goaway] = client.goaways
        self.assertEqual((goaway.error_code, goaway.last_stream_id), (0, d.sid))
        self.assertFalse(client.closed.called)
        r = yield d
        self.assertEqual(r.status, 504)
        self.assertTrue(r.ended)
        yield client.closed

    @defer.inlineCallbacks
    def test_slowClientHundredMiB(self):
        """
        A 100 MiB response to a client that opened huge windows but stops reading: the proxy stops reading
        the upstream (the socket is the backpressure once flow control is not), its buffers stay bounded,
        and the body then arrives whole.
        """
        size = 100 << 20
        client = yield self.client(window=2 ** 31 - 1)
        d = client.request(b"/size/%d" % size)
        client.transport.pauseProducing()
        factory = self.service.listeners["web"].factory
        peak = yield peakBuffered(
            lambda: factory.connections,
            lambda conn: sum(len(c) for codec in conn.http2.streams.values() for c in codec.pending or ()))
        # Without backpressure the proxy would hold most of the 100 MiB within a second.
        self.assertLess(peak, 8 << 20)
        client.transport.resumeProducing()
        r = yield d
        self.assertEqual(len(r.data), size)
        self.assertTrue(r.ended)


    @defer.inlineCallbacks
    def test_rapidResetClosesSocket(self):
        """
        Over a real socket, a rapid-reset client gets GOAWAY(ENHANCE_YOUR_CALM) and its TCP connection is
        closed by the proxy.
        """
        client = yield self.client()
        conn = client.conn
        for i in range(300):
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, head(b"/raw/slow"), end_stream=True)
            conn.reset_stream(sid, ErrorCodes.CANCEL)
        client.flush()
        yield client.closed
        self.assertEqual([g.error_code for g in client.goaways], [ErrorCodes.ENHANCE_YOUR_CALM])
        self.assertEqual(self.stat("http.web.downstream_rq_too_many_premature_resets"), 1)

    @defer.inlineCallbacks
    def test_emptyFramesCloseSocket(self):
        """
        Over a real socket, empty DATA frames get GOAWAY(ENHANCE_YOUR_CALM) and the connection closed.
        """
        client = yield self.client()
        client.conn.send_headers(1, head(b"/raw/slow", b"POST"))  # the body is still to come
        client.flush()
        client.transport.write(DataFrame(1).serialize() * 2)
        yield client.closed
        self.assertEqual([g.error_code for g in client.goaways], [ErrorCodes.ENHANCE_YOUR_CALM])
        self.assertEqual(self.stat("http.web.http2.inbound_empty_frames_flood"), 1)


class UploadTests(HTTPTestBase):
    """
    A 100 MiB HTTP/2 upload to an upstream that stops reading: the proxy's windows hold the client back.
    """

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        StallingOrigin.instances = []
        factory = protocol.Factory.forProtocol(StallingOrigin)
        self.originPort = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(self.originPort.stopListening)
        # Larger windows than the defaults (fewer round trips for 100 MiB), still far below the body.
        self.service = self.startProxy(self.originPort.getHost().port,
                                       "http2.initial_stream_window_size = 1MiB\n"
                                       "http2.initial_connection_window_size = 2MiB")
        yield self.service.whenLive
        self.port = self.service.listeners["web"].port.getHost().port

    @defer.inlineCallbacks
    def test_stalledUpstreamHundredMiB(self):
        """
        While the upstream reads nothing, the proxy acknowledges nothing more: the proxy's buffers (and the
        bytes the client got to send) stay bounded; once the upstream reads, the 100 MiB arrive whole.
        """
        size = 100 << 20
        client = yield connectH2(self, self.port)
        d = client.request(b"/up", b"POST", b"u" * size, [(b"content-length", b"%d" % size)])
        pools = self.service.clusters["origin"].pools.pools
        peak = yield peakBuffered(lambda: [conn for pool in pools.values() for conn in pool.connections])
        self.assertLess(peak, 8 << 20)
        sent = size - len(client.bodies.get(d.sid, b""))
        self.assertLess(sent, 16 << 20)  # the windows held the client back
        for origin in StallingOrigin.instances:
            origin.transport.resumeProducing()
        r = yield d
        self.assertEqual(r.data, b"%d" % size)


class EchoTests(unittest.TestCase):
    """
    HTTP/2 clients through the proxy to the demo echo upstream (C{[echo:NAME]}), with real tools.
    """

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        echoPort = yield startEcho(self)
        self.proxy = startService(self, f"""
[mesh]
admin = off
drain_timeout = 1s
[listener:edge]
endpoint = tcp:0:interface=127.0.0.1
protocol = http
routes = main
http2.max_concurrent_streams = 50
http2.initial_stream_window_size = 256KiB
[route:main/all]
prefix = /
cluster = echo
[cluster:echo]
endpoints = tcp:127.0.0.1:{echoPort}
""", seed=3, stop=stopProxy)
        yield self.proxy.whenLive
        self.url = f"http://127.0.0.1:{self.proxy.listeners['edge'].port.getHost().port}"

    def stat(self, name: str) -> int:
        return self.proxy.stats.get(name).value

    @defer.inlineCallbacks
    def test_h2load(self):
        """
        A bounded h2load run (500 requests, 4 connections, 10 streams each) through the proxy to the echo:
        every request succeeds, and the HTTP/2 stats count them.
        """
        h2load = shutil.which("h2load")
        if h2load is None:
            raise unittest.SkipTest("h2load is not installed (Debian package nghttp2-client)")
        out, err, code = yield getProcessOutputAndValue(
            h2load, ["-n", "500", "-c", "4", "-m", "10", self.url + "/load"])
        self.assertEqual(code, 0, err)
        match = re.search(rb"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed",
                          out)
        self.assertIsNotNone(match, out)
        self.assertEqual((match.group(4), match.group(5)), (b"500", b"0"), out)
        self.assertIn(b"status codes: 500 2xx", out)
        self.assertEqual(self.stat("http.edge.downstream_rq_http2_total"), 500)
        self.assertEqual(self.stat("http.edge.downstream_cx_http2_total"), 4)

    @defer.inlineCallbacks
    def test_curl(self):
        """
        curl with prior knowledge reaches the echo over HTTP/2 and sees its own request described; the
        proxy announced the configured SETTINGS (nghttp -v shows them when installed).
        """
        curl = shutil.which("curl")
        if curl is None:
            raise unittest.SkipTest("curl is not installed")
        out, err, code = yield getProcessOutputAndValue(
            curl, ["-sS", "--http2-prior-knowledge", "-w", "\\n%{http_version}", "-H", "cookie: a=1",
                   "-H", "cookie: b=2", self.url + "/echo/me"])
        self.assertEqual(code, 0, err)
        self.assertTrue(out.endswith(b"\n2"), out)
        self.assertIn(b"/echo/me", out)
        self.assertEqual(self.stat("http.edge.downstream_cx_http2_active"), 0)
        nghttp = shutil.which("nghttp")
        if nghttp is None:
            return
        out, err, code = yield getProcessOutputAndValue(nghttp, ["-v", self.url + "/s"])
        self.assertEqual(code, 0, err)
        self.assertIn(b"[SETTINGS_MAX_CONCURRENT_STREAMS(0x03):50]", out)
        self.assertIn(b"[SETTINGS_INITIAL_WINDOW_SIZE(0x04):262144]", out)



class TLSTests(unittest.TestCase):
    """
    ALPN on a TLS listener picks HTTP/2 or HTTP/1.1, with real certificates made for the test.
    """

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        from .test_tls import standardPKI

        self.pki = standardPKI(self.mktemp())
        self.proxy = startService(self, f"""
[mesh]
admin = off
[listener:secure]
endpoint = tcp:0:interface=127.0.0.1
protocol = http
tls = secure
routes = main
[tls:secure]
certificate = {self.pki.path("server.pem")}
private_key = {self.pki.path("server.key")}
alpn = h2, http/1.1
[route:main/all]
prefix = /
direct_response.status = 200
direct_response.body = over tls
""", seed=5)
        yield self.proxy.whenLive
        self.url = f"https://localhost:{self.proxy.listeners['secure'].port.getHost().port}/tls"

    @defer.inlineCallbacks
    def test_curlALPN(self):
        """
        curl offering h2 gets HTTP/2 (ALPN); forced to HTTP/1.1 it gets HTTP/1.1 on the same listener.
        """
        curl = shutil.which("curl")
        if curl is None:
            raise unittest.SkipTest("curl is not installed")
        for flag, version in (("--http2", b"2"), ("--http1.1", b"1.1")):
            out, err, code = yield getProcessOutputAndValue(
                curl, ["-sS", flag, "--cacert", self.pki.ca, "-w", "\\n%{http_version}", self.url])
            self.assertEqual(code, 0, err)
            self.assertEqual(out, b"over tls\n" + version)
        stats = self.proxy.stats
        self.assertEqual(stats.get("http.secure.downstream_cx_http2_total").value, 1)
        self.assertEqual(stats.get("http.secure.downstream_rq_http2_total").value, 1)
        self.assertEqual(stats.get("http.secure.downstream_rq_http1_total").value, 1)
