"""
Tests for L{twistedmesh.upstream.http2}: HTTP/2 to upstream hosts.

Unit tests drive the pool and its connections on memory transports against h2's own server-side
C{H2Connection} as the peer, with a L{MemoryReactorClock} for every timer. Integration tests run the whole
proxy on loopback against a real HTTP/2 origin (a small h2 server written here, and nginx where
installed), with curl and raw HTTP/1.1 clients.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from typing import List, Optional, Tuple

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.connection import ConnectionState
from h2.settings import SettingCodes, Settings
from twisted.internet import defer, protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransportWithDisconnection
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.trial.unittest import SynchronousTestCase

from twistedmesh.config import BreakerConfig, ClusterConfig, HostConfig, loadString
from twistedmesh.config.errors import ConfigErrors
from twistedmesh.config.model import HTTP2ClusterConfig
from twistedmesh.filters.router import _allows
from twistedmesh.http.stream import Stream
from twistedmesh.observability.stats import StatsStore
from twistedmesh.upstream.cluster import Cluster
from twistedmesh.upstream.http2 import (
    REFUSED_STREAM,
    REMOTE_RESET,
    H2HostPool,
    H2Stream,
    H2UpstreamConnection,
    requestFields,
)

from .support import (
    KeepAliveClient,
    Producer,
    Response,
    connectH2,
    head,
    peakBuffered,
    rawExchange,
    startNginx,
    startService,
    stopProxy,
    waitFor,
)

CURL = shutil.which("curl")
HEAD = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"upstream"), (b":path", b"/")]
POST = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"upstream"), (b":path", b"/up")]


class Recorder:
    """
    A pool waiter and an exchange at once (as the router is): records every callback as a tuple.
    """

    def __init__(self) -> None:
        self.events: List[tuple] = []
        self.stream: Optional[H2Stream] = None
        self.data: List[bytes] = []
        self.onData = None

    def poolReady(self, stream: H2Stream) -> None:
        self.stream = stream
        self.events.append(("ready",))

    def poolFailed(self, reason: str, timedOut: bool) -> None:
        self.events.append(("failed", reason, timedOut))

    def upstreamHead(self, status: int, headers: list, hasBody: bool) -> None:
        self.events.append(("head", status, headers, hasBody))

    def upstreamData(self, data: bytes) -> None:
        self.data.append(data)
        if self.onData is not None:
            self.onData(data)

    def upstreamEnd(self, trailers) -> None:
        self.events.append(("end", trailers))

    def upstreamFailed(self, reason: str, headersReceived: bool) -> None:
        self.events.append(("reset", reason, headersReceived))


class Peer:
    """
    The upstream host: h2's server-side connection on the other end of a connection's memory transport.
    """

    def __init__(self, conn: H2UpstreamConnection, transport: StringTransportWithDisconnection,
                 settings: Optional[dict] = None) -> None:
        self.conn = conn
        self.transport = transport
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        if settings:
            self.h2.local_settings = Settings(client=False, initial_values=settings)
        self.h2.initiate_connection()
        self.events: list = []

    def read(self) -> list:
        """
        Take what the connection wrote; return (and keep) the events it made.
        """
        data = self.transport.value()
        self.transport.clear()
        events = self.h2.receive_data(data) if data else []
        self.events.extend(events)
        self.flush()
        return events

    def flush(self) -> None:
        """
        Send what this peer queued to the connection.
        """
        data = self.h2.data_to_send()
        if data:
            self.conn.dataReceived(data)

    @property
    def closed(self) -> bool:
        """
        Whether the connection closed its transport.
        """
        return not self.transport.connected

    def sendData(self, sid: int, data: bytes, end: bool = False) -> None:
        """
        Send C{data} in frames of the default maximum size.
        """
        for i in range(0, len(data), 16384):
            self.h2.send_data(sid, data[i:i + 16384], end_stream=end and i + 16384 >= len(data))
        self.flush()

    def requests(self) -> List[RequestReceived]:
        return [e for e in self.events if isinstance(e, RequestReceived)]

    def respond(self, sid: int, status: int = 200, body: bytes = b"", trailers: Optional[list] = None,
                headers: Tuple = ()) -> None:
        h2c = self.h2
        h2c.send_headers(sid, [(b":status", b"%d" % status)] + list(headers),
                         end_stream=not body and not trailers)
        if body:
            h2c.send_data(sid, body, end_stream=not trailers)
        if trailers:
            h2c.send_headers(sid, trailers, end_stream=True)
        self.flush()


class FakeEndpoint:
    """
    A client endpoint whose connection attempts the test completes or fails by hand.
    """

    def __init__(self) -> None:
        self.attempts: List[Tuple[object, Deferred]] = []

    def connect(self, factory) -> Deferred:
        d: Deferred = Deferred()
        self.attempts.append((factory, d))
        return d

    def succeed(self, index: int = -1, settings: Optional[dict] = None) -> Tuple[H2UpstreamConnection, Peer]:
        """
        Complete attempt C{index} on a memory transport; the peer's preface (SETTINGS) is not sent yet.
        """
        factory, d = self.attempts[index]
        conn = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransportWithDisconnection()
        transport.protocol = conn
        conn.makeConnection(transport)
        peer = Peer(conn, transport, settings)
        d.callback(conn)
        return conn, peer


class PoolTestBase(SynchronousTestCase):
    """
    A one-host HTTP/2 cluster whose host connects through a L{FakeEndpoint}.
    """

    http2 = HTTP2ClusterConfig()
    breaker = BreakerConfig()

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.stats = StatsStore()
        config = ClusterConfig("c", (HostConfig("tcp:127.0.0.1:1"),), protocol="http2", http2=self.http2,
                               breaker=self.breaker)
        self.cluster = Cluster(config, self.clock, self.stats)
        self.host = self.cluster.hosts[0]
        self.endpoint = FakeEndpoint()
        self.host.client = self.endpoint
        self.pool: H2HostPool = self.cluster.pools.forHost(self.host)

    def stat(self, name: str) -> int:
        return self.stats.get("cluster.c." + name).value

    def connect(self, settings: Optional[dict] = None) -> Tuple[Recorder, H2UpstreamConnection, Peer]:
        """
        Acquire through a new connection whose peer then sends its SETTINGS; return the waiter, the
        connection and the peer.
        """
        waiter = Recorder()
        self.pool.acquire(waiter)
        conn, peer = self.endpoint.succeed(settings=settings)
        self.assertEqual(waiter.events, [("ready",)])
        peer.read()  # the preface; answering it sends the peer's SETTINGS
        return waiter, conn, peer

    def begin(self, waiter: Recorder, head=HEAD, body: bool = False) -> H2Stream:
        waiter.stream.begin(waiter, head[0][1], head, body)
        return waiter.stream


class TranslationTests(SynchronousTestCase):
    """
    A request's fields as an HTTP/2 header block.
    """

    def stream(self, headers) -> Stream:
        s = Stream(None, (), "l", None, 0.0)
        s.method, s.path, s.authority = b"POST", b"/a?b", b"example.com"
        s.requestHeaders = headers
        return s

    def test_pseudoHeadersFirst(self):
        """
        :method, :scheme, :authority (from Host) and :path lead, the fields follow in order.
        """
        fields = requestFields(self.stream([(b"accept", b"*/*"), (b"x-a", b"1")]), b"https")
        self.assertEqual(fields, [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"example.com"),
                                  (b":path", b"/a?b"), (b"accept", b"*/*"), (b"x-a", b"1")])

    def test_connectionSpecificDropped(self):
        """
        connection, keep-alive, proxy-connection, transfer-encoding, upgrade and host never go out; te only
        as te: trailers.
        """
        fields = requestFields(self.stream([
            (b"connection", b"upgrade"), (b"keep-alive", b"5"), (b"proxy-connection", b"x"),
            (b"transfer-encoding", b"chunked"), (b"upgrade", b"websocket"), (b"host", b"other"),
            (b"te", b"trailers"), (b"x-b", b"2")]), b"http")
        self.assertEqual(fields[4:], [(b"te", b"trailers"), (b"x-b", b"2")])
        fields = requestFields(self.stream([(b"te", b"gzip")]), b"http")
        self.assertEqual(fields[4:], [])

    def test_requestIdNeverIndexed(self):
        """
        x-request-id goes as a never-indexed literal (it is unique: indexed, it would only crowd the HPACK
        table); an encoder then leaves it out of its table, and every other field is indexed as before.
        """
        from hpack import Encoder, NeverIndexedHeaderTuple
        fields = requestFields(self.stream([(b"x-a", b"1"), (b"x-request-id", b"abc"), (b"x-b", b"2")]), b"http")
        self.assertEqual(fields[4:], [(b"x-a", b"1"), (b"x-request-id", b"abc"), (b"x-b", b"2")])
        self.assertIsInstance(fields[5], NeverIndexedHeaderTuple)
        encoder = Encoder()
        encoder.encode(fields)
        self.assertEqual(sorted(name for name, value in encoder.header_table.dynamic_entries),
                         [b":authority", b":path", b"x-a", b"x-b"])

    def test_refusedStreamRetryPolicy(self):
        """
        A refused stream is retried under refused-stream, reset and 5xx, not under connect-failure alone.
        """
        for on, allowed in ((["refused-stream"], True), (["reset"], True), (["5xx"], True),
                            (["connect-failure"], False)):
            self.assertEqual(_allows(on, (), "refused-stream", 0), allowed, on)


class ExchangeTests(PoolTestBase):
    """
    One exchange and the connection's basics.
    """

    def test_exchangeWithTrailers(self):
        """
        The request goes out as a HEADERS frame; the response's head (without pseudo-headers), data and
        trailers come back to the exchange, in order.
        """
        waiter, conn, peer = self.connect()
        self.begin(waiter)
        peer.read()
        [request] = peer.requests()
        self.assertEqual(request.headers, HEAD)
        self.assertIsNotNone(request.stream_ended)
        peer.respond(1, body=b"hello", trailers=[(b"grpc-status", b"0"), (b"grpc-message", b"ok")],
                     headers=[(b"content-type", b"application/grpc")])
        self.assertEqual(waiter.events[1:], [
            ("head", 200, [(b"content-type", b"application/grpc")], True),
            ("end", [(b"grpc-status", b"0"), (b"grpc-message", b"ok")]),
        ])
        self.assertEqual(waiter.data, [b"hello"])
        self.assertEqual(self.stat("upstream_cx_http2_total"), 1)
        self.assertEqual(self.stat("upstream_cx_total"), 1)
        self.assertEqual(self.stat("upstream_cx_active"), 1)
        self.assertEqual(self.host.rq_total, 1)
        self.assertEqual(conn.streams, {})

    def test_requestBodyAndTrailers(self):
        """
        A request body goes as DATA and its trailers as a trailing HEADERS frame with END_STREAM.
        """
        waiter, conn, peer = self.connect()
        stream = self.begin(waiter, POST, body=True)
        stream.writeBody(b"abc", True)
        stream.endBody(True, [(b"x-checksum", b"1"), (b"connection", b"x")])
        peer.read()
        data = [e.data for e in peer.events if isinstance(e, DataReceived)]
        [trailers] = [e for e in peer.events if isinstance(e, TrailersReceived)]
        self.assertEqual(b"".join(data), b"abc")
        self.assertEqual(trailers.headers, [(b"x-checksum", b"1")])

    def test_headOnlyResponse(self):
        """
        A response that ends with its head reports no body, then its end.
        """
        waiter, conn, peer = self.connect()
        self.begin(waiter)
        peer.read()
        peer.respond(1, status=204)
        self.assertEqual(waiter.events[1:], [("head", 204, [], False), ("end", None)])

    def test_earlyResponseCancelsRequest(self):
        """
        A response that ends before the request body does cancels the rest of the request (RST_STREAM
        CANCEL): nothing more will be sent on it, and its slot is free.
        """
        waiter, conn, peer = self.connect()
        self.begin(waiter, POST, body=True)
        peer.read()
        peer.respond(1, status=413)
        peer.read()
        [reset] = [e for e in peer.events if isinstance(e, StreamReset)]
        self.assertEqual(reset.error_code, ErrorCodes.CANCEL)
        self.assertEqual(waiter.events[-1], ("end", None))
        self.assertEqual(conn.streams, {})
        self.assertEqual(self.stats.get("cluster.c.http2.tx_reset").value, 1)


class ConcurrencyTests(PoolTestBase):
    """
    Streams per connection: SETTINGS_MAX_CONCURRENT_STREAMS, the cluster's cap, more connections.
    """

    def test_waitsForSettings(self):
        """
        Until the peer's SETTINGS arrive a new connection takes one stream; then the others are served on
        it, without a second connection.
        """
        first, second = Recorder(), Recorder()
        self.pool.acquire(first)
        self.pool.acquire(second)
        self.assertEqual(len(self.endpoint.attempts), 1)
        conn, peer = self.endpoint.succeed()
        self.assertEqual(first.events, [("ready",)])
        self.assertEqual(second.events, [])
        self.assertFalse(self.pool.idle)
        peer.read()
        self.assertEqual(second.events, [("ready",)])
        self.assertIs(second.stream.conn, conn)
        self.assertEqual(len(self.endpoint.attempts), 1)

    def test_peerLimitOpensSecondConnection(self):
        """
        With the peer's limit of one stream in use, the next request connects again; when the first stream
        ends, its slot serves the next waiter.
        """
        first, conn, peer = self.connect({SettingCodes.MAX_CONCURRENT_STREAMS: 1})
        self.begin(first)
        second = Recorder()
        self.pool.acquire(second)
        self.assertEqual(second.events, [])
        self.assertEqual(len(self.endpoint.attempts), 2)
        conn2, peer2 = self.endpoint.succeed(settings={SettingCodes.MAX_CONCURRENT_STREAMS: 1})
        self.assertEqual(second.events, [("ready",)])
        self.assertIs(second.stream.conn, conn2)
        self.begin(second)
        third = Recorder()
        self.pool.acquire(third)
        # The second connection may take more once its SETTINGS come: no third connection yet.
        self.assertEqual(len(self.endpoint.attempts), 2)
        peer2.read()
        self.assertEqual(third.events, [])
        self.assertEqual(len(self.endpoint.attempts), 3)
        peer.read()
        peer.respond(1)
        # The first connection's slot is free: the third waiter takes it, without waiting for its connect.
        self.assertEqual(third.events, [("ready",)])
        self.assertIs(third.stream.conn, conn)

    def test_burstAfterSmallLimit(self):
        """
        Once the host said it takes two streams per connection, a burst of waiters opens enough
        connections at once rather than one per round trip.
        """
        first, conn, peer = self.connect({SettingCodes.MAX_CONCURRENT_STREAMS: 2})
        waiters = [Recorder() for _ in range(5)]
        for w in waiters:
            self.pool.acquire(w)
        self.assertEqual([len(w.events) for w in waiters], [1, 0, 0, 0, 0])
        # Four waiting, two streams per connection: two more connections.
        self.assertEqual(len(self.endpoint.attempts), 3)

    def test_peerAllowsNoStream(self):
        """
        A host announcing SETTINGS_MAX_CONCURRENT_STREAMS = 0 is not met with a connection storm: never more
        connections under way than waiters, and a waiter waits for a SETTINGS change.
        """
        zero = {SettingCodes.MAX_CONCURRENT_STREAMS: 0}
        waiter = Recorder()
        self.pool.acquire(waiter)
        conn, peer = self.endpoint.succeed(settings=zero)
        self.pool.release(waiter.stream)
        peer.read()
        self.assertEqual(self.pool.expected, 1)
        waiters = [Recorder() for _ in range(3)]
        for w in waiters:
            self.pool.acquire(w)
        self.assertEqual(len(self.endpoint.attempts), 3)  # the first connection and two more: one per waiter
        peers = [peer]
        for i in (1, 2):
            c, p = self.endpoint.succeed(index=i, settings=zero)
            p.read()
            peers.append(p)
        self.assertEqual(len(self.endpoint.attempts), 3)
        # A new connection takes its first stream before the SETTINGS (the host will refuse it if it must);
        # the third waiter waits for the first connection's limit to change.
        self.assertEqual([w.events for w in waiters], [[("ready",)], [("ready",)], []])
        peer.h2.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 2})
        peer.flush()
        self.assertEqual(waiters[2].events, [("ready",)])
        self.assertIs(waiters[2].stream.conn, conn)
        self.assertEqual(len(self.endpoint.attempts), 3)

    def test_capLimitsStreams(self):
        """
        http2.max_concurrent_streams caps a connection below a generous peer.
        """
        self.pool.maxStreams = 2
        first, conn, peer = self.connect()
        second, third = Recorder(), Recorder()
        self.pool.acquire(second)
        self.pool.acquire(third)
        self.assertEqual(second.events, [("ready",)])
        self.assertEqual(third.events, [])
        self.assertEqual(len(self.endpoint.attempts), 2)

    def test_unusedStreamReleased(self):
        """
        A stream handed to a waiter that no longer wants it goes back: its slot serves the next one.
        """
        first, conn, peer = self.connect({SettingCodes.MAX_CONCURRENT_STREAMS: 1})
        self.pool.release(first.stream)
        self.assertEqual(conn.capacity(), 1)
        self.assertTrue(self.pool.idle)

    def test_connectFailure(self):
        """
        A failed connection attempt fails the waiters it was for.
        """
        first, second = Recorder(), Recorder()
        self.pool.acquire(first)
        self.pool.acquire(second)
        self.endpoint.attempts[0][1].errback(Failure(ConnectionRefusedError()))
        self.assertEqual(first.events[0][0], "failed")
        self.assertEqual(second.events[0][0], "failed")
        self.assertEqual(self.stat("upstream_cx_connect_fail"), 1)

    def test_connectTimeout(self):
        """
        An attempt that does not connect within connect_timeout fails its waiters as timed out.
        """
        waiter = Recorder()
        self.pool.acquire(waiter)
        self.clock.advance(5)
        self.assertEqual(waiter.events, [("failed", "connect timeout", True)])
        self.assertEqual((self.stat("upstream_cx_connect_fail"), self.stat("upstream_cx_connect_timeout")), (1, 1))
        self.assertEqual(self.host.cx_connect_fail, 1)

    def test_connectionCountedInAndOut(self):
        """
        A connection is counted in when it connects (host, cluster, HTTP/2 total, a breaker slot) and out
        once when it closes, with its lifetime recorded; the breaker's slot is free again.
        """
        waiter, conn, peer = self.connect()
        breaker = self.cluster.breaker.connections
        self.assertEqual((self.host.cx_total, self.host.cx_active, breaker.count), (1, 1, 1))
        self.assertEqual((self.stat("upstream_cx_total"), self.stat("upstream_cx_active"),
                          self.stat("upstream_cx_http2_total"), self.stat("upstream_cx_http1_total")), (1, 1, 1, 0))
        self.clock.advance(2.5)
        conn.connectionLost(Failure(ConnectionDone()))
        self.pool.lost(conn)  # a second report of the same loss changes nothing
        self.assertEqual((self.host.cx_total, self.host.cx_active, breaker.count), (1, 0, 0))
        self.assertEqual((self.stat("upstream_cx_total"), self.stat("upstream_cx_active")), (1, 0))
        length = self.cluster.upstream_cx_length_ms
        self.assertEqual((length.count, length.sum), (1, 2500.0))


class BreakerTests(PoolTestBase):
    """
    breaker.max_connections bounds the connections; waiters queue for a free stream.
    """

    breaker = BreakerConfig(max_connections=1)

    def test_queuesAtConnectionLimit(self):
        """
        At the connection limit a waiter queues (upstream_cx_overflow) until a stream ends.
        """
        first, conn, peer = self.connect({SettingCodes.MAX_CONCURRENT_STREAMS: 1})
        self.begin(first)
        second = Recorder()
        self.pool.acquire(second)
        self.assertEqual(len(self.endpoint.attempts), 1)
        self.assertEqual(self.stat("upstream_cx_overflow"), 1)
        peer.read()
        peer.respond(1)
        self.assertEqual(second.events, [("ready",)])
        self.assertIs(second.stream.conn, conn)


class GoAwayTests(PoolTestBase):
    """
    GOAWAY from the peer.
    """

    def test_goAway(self):
        """
        Streams above the last stream id fail as refused; the others finish; no new stream goes to the
        connection, which closes once its last stream is done.
        """
        first, conn, peer = self.connect()
        self.begin(first)
        second = Recorder()
        self.pool.acquire(second)
        self.begin(second)
        peer.read()
        peer.h2.close_connection(last_stream_id=1)
        peer.flush()
        self.assertEqual(second.events[1:], [("reset", REFUSED_STREAM, False)])
        self.assertEqual(first.events, [("ready",)])
        third = Recorder()
        self.pool.acquire(third)
        self.assertEqual(third.events, [])
        self.assertEqual(len(self.endpoint.attempts), 2)
        # Stream 1 is still answered, its DATA acknowledged (h2 would refuse to after a GOAWAY).
        peer.h2.state_machine.state = ConnectionState.SERVER_OPEN
        peer.h2.send_headers(1, [(b":status", b"200")])
        peer.sendData(1, b"x" * 40000)
        peer.read()
        self.assertTrue(any(isinstance(e, WindowUpdated) and e.stream_id == 1 for e in peer.events))
        self.assertFalse(peer.closed)
        peer.h2.end_stream(1)
        peer.flush()
        self.assertEqual(first.events[-1], ("end", None))
        self.assertTrue(peer.closed)
        self.assertEqual(self.stat("upstream_cx_close_notify"), 1)

    def test_goAwayIdle(self):
        """
        A GOAWAY on a connection with no stream closes it at once.
        """
        first, conn, peer = self.connect()
        self.pool.release(first.stream)
        peer.h2.close_connection()
        peer.flush()
        self.assertTrue(peer.closed)
        self.assertFalse(self.pool.idle)


class ResetTests(PoolTestBase):
    """
    RST_STREAM both ways, and connections that go away.
    """

    def test_refusedStream(self):
        """
        REFUSED_STREAM fails the exchange as refused, before any head.
        """
        first, conn, peer = self.connect()
        self.begin(first)
        peer.read()
        peer.h2.reset_stream(1, ErrorCodes.REFUSED_STREAM)
        peer.flush()
        self.assertEqual(first.events[1:], [("reset", REFUSED_STREAM, False)])
        self.assertEqual(self.stats.get("cluster.c.http2.rx_reset").value, 1)
        self.assertEqual(conn.capacity(), 100)

    def test_resetAfterHeaders(self):
        """
        A reset after the response head fails the exchange with the head received: never an end.
        """
        first, conn, peer = self.connect()
        self.begin(first)
        peer.read()
        peer.h2.send_headers(1, [(b":status", b"200")])
        peer.h2.send_data(1, b"part")
        peer.h2.reset_stream(1, ErrorCodes.INTERNAL_ERROR)
        peer.flush()
        self.assertEqual(first.events[1][0], "head")
        self.assertEqual(first.events[2:], [("reset", REMOTE_RESET, True)])

    def test_abandonCancels(self):
        """
        An abandoned exchange is reset with CANCEL and hears nothing more; the connection stays.
        """
        first, conn, peer = self.connect()
        self.begin(first)
        first.stream.abandon()
        peer.read()
        [reset] = [e for e in peer.events if isinstance(e, StreamReset)]
        self.assertEqual((reset.stream_id, reset.error_code), (1, ErrorCodes.CANCEL))
        self.assertFalse(peer.closed)
        self.assertTrue(self.pool.idle)

    def test_connectionLost(self):
        """
        A connection that closes fails its streams as upstream_reset, with whether the head had come.
        """
        first, conn, peer = self.connect()
        self.begin(first)
        second = Recorder()
        self.pool.acquire(second)
        self.begin(second)
        peer.read()
        peer.h2.send_headers(3, [(b":status", b"200")])
        peer.flush()
        peer.transport.loseConnection()
        self.assertEqual(first.events[1:], [("reset", "upstream_reset", False)])
        self.assertEqual(second.events[2:], [("reset", "upstream_reset", True)])
        self.assertEqual(self.stat("upstream_cx_active"), 0)
        self.assertFalse(self.pool.idle)

    def test_alpnMismatch(self):
        """
        A TLS host that negotiated another protocol by ALPN fails the connection's streams as a protocol
        error.
        """
        first, conn, peer = self.connect()
        self.begin(first)
        peer.transport.negotiatedProtocol = b"http/1.1"
        conn.handshakeCompleted()
        self.assertEqual(first.events[1:], [("reset", "protocol_error: ALPN negotiated http/1.1, not h2", False)])
        self.assertTrue(peer.closed)

    def test_invalidStatus(self):
        """
        A final :status that is not three ASCII digits from 200 to 599 resets that stream alone
        (PROTOCOL_ERROR) and fails its exchange as a protocol error before the head (a 503, as a bad
        HTTP/1.1 status line); the other streams of the connection carry on.
        """
        for bad in (b"abc", b"600", b"099", b"0", b"20", b"2000", b"+20", b"2\xd9\xa0"):
            self.setUp()
            first, conn, peer = self.connect()
            self.begin(first)
            second = Recorder()
            self.pool.acquire(second)
            self.begin(second)
            peer.read()
            peer.h2.send_headers(1, [(b":status", bad)])
            peer.flush()
            self.assertEqual(first.events[1:], [("reset", "protocol_error: invalid :status", False)], bad)
            peer.read()
            [reset] = [e for e in peer.events if isinstance(e, StreamReset)]
            self.assertEqual((reset.stream_id, reset.error_code), (1, ErrorCodes.PROTOCOL_ERROR))
            peer.respond(3, 599, b"fine")
            self.assertEqual(second.events[1:], [("head", 599, [], True), ("end", None)])
            self.assertEqual(b"".join(second.data), b"fine")
            self.assertFalse(peer.closed)
            self.assertEqual(self.stat("upstream_cx_protocol_error"), 0)

    def test_malformedResponseFields(self):
        """
        A response head with an invalid field (uppercase, connection-specific, a bad value, a misplaced or
        unknown pseudo-header) resets that stream alone and fails its exchange before the head; a trailer
        block with a pseudo-header or a bad field does so after the head. The connection carries on.
        """
        heads = ([(b":status", b"200"), (b"X-Upper", b"1")], [(b":status", b"200"), (b"connection", b"close")],
                 [(b":status", b"200"), (b"x-a", b" padded")], [(b":status", b"200"), (b":path", b"/")],
                 [(b"x-a", b"1"), (b":status", b"200")], [(b":status", b"200"), (b":status", b"200")])
        for fields in heads + ((),):
            self.setUp()
            first, conn, peer = self.connect()
            peer.h2.config.validate_outbound_headers = peer.h2.config.normalize_outbound_headers = False
            self.begin(first)
            second = Recorder()
            self.pool.acquire(second)
            self.begin(second)
            peer.read()
            if fields:
                peer.h2.send_headers(1, fields)
                peer.flush()
                self.assertEqual(first.events[1][0], "reset", fields)
                self.assertTrue(first.events[1][1].startswith("protocol_error: "))
                self.assertFalse(first.events[1][2])
            else:
                peer.h2.send_headers(1, [(b":status", b"200")])
                peer.h2.send_headers(1, [(b"grpc-status", b"0"), (b":path", b"/")], end_stream=True)
                peer.flush()
                self.assertEqual(first.events[2], ("reset", "protocol_error: invalid trailer field", True))
            peer.read()
            # (A stream both sides ended is over already: nothing to reset.)
            resets = [(e.stream_id, e.error_code) for e in peer.events if isinstance(e, StreamReset)]
            self.assertEqual(resets, [(1, ErrorCodes.PROTOCOL_ERROR)] if fields else [])
            peer.respond(3, 200, b"ok", trailers=[(b"grpc-status", b"0")])
            self.assertEqual(second.events[-1], ("end", [(b"grpc-status", b"0")]))
            self.assertFalse(peer.closed)

    def test_oversizedFrameHeader(self):
        """
        An upstream frame announcing more than our SETTINGS_MAX_FRAME_SIZE fails the connection as a
        protocol error at its header, before its payload is buffered.
        """
        first, conn, peer = self.connect()
        self.begin(first)
        conn.dataReceived((0xFFFFFF).to_bytes(3, "big") + b"\x00\x00" + (1).to_bytes(4, "big"))
        self.assertTrue(first.events[1][1].startswith("protocol_error"))
        self.assertTrue(peer.closed)
        self.assertEqual(self.stat("upstream_cx_protocol_error"), 1)

    def test_protocolError(self):
        """
        Garbage from the peer fails every stream as a protocol error and closes the connection.
        """
        first, conn, peer = self.connect()
        self.begin(first)
        conn.dataReceived(b"\x00\x00\x08\x07\x00\x00\x00\x00\x01garbage!")  # GOAWAY on stream 1
        self.assertEqual(first.events[1][0], "reset")
        self.assertTrue(first.events[1][1].startswith("protocol_error"))
        self.assertTrue(peer.closed)
        self.assertEqual(self.stat("upstream_cx_protocol_error"), 1)


class FlowControlTests(PoolTestBase):
    """
    Flow control as backpressure in both directions.
    """

    def test_responseAcknowledgedOnlyWhenConsumed(self):
        """
        While the downstream has the stream paused, its DATA is not acknowledged (the peer's window
        shrinks); resuming acknowledges it (WINDOW_UPDATE).
        """
        first, conn, peer = self.connect()
        stream = self.begin(first)
        peer.read()
        stream.transport.pauseProducing()
        peer.h2.send_headers(1, [(b":status", b"200")])
        peer.sendData(1, b"x" * 60000)
        peer.read()
        self.assertEqual(peer.h2.local_flow_control_window(1), 65536 - 60000)
        self.assertFalse(any(isinstance(e, WindowUpdated) and e.stream_id == 1 for e in peer.events))
        stream.transport.resumeProducing()
        peer.read()
        self.assertEqual(peer.h2.local_flow_control_window(1), 65536)
        self.assertEqual(b"".join(first.data), b"x" * 60000)

    def test_slowStreamsDoNotStallOthers(self):
        """
        Streams whose downstream stopped reading hold back their own windows, not the connection's: with
        more of them full than the connection window holds (17 x 64 KiB > 1 MiB), another stream on the
        same connection still gets its whole window, and a resumed stream gets its own back.
        """
        first, conn, peer = self.connect()
        waiters = [first]
        self.begin(first)
        for i in range(17):
            w = Recorder()
            self.pool.acquire(w)
            self.begin(w)
            waiters.append(w)
        peer.read()
        slow, other = waiters[:17], waiters[17]
        for w in slow:
            w.stream.pauseProducing()
            peer.h2.send_headers(w.stream.sid, [(b":status", b"200")])
            peer.sendData(w.stream.sid, b"x" * 65536)
            peer.read()
        self.assertEqual([peer.h2.local_flow_control_window(w.stream.sid) for w in slow], [0] * 17)
        self.assertEqual(peer.h2.local_flow_control_window(other.stream.sid), 65536)
        peer.h2.send_headers(other.stream.sid, [(b":status", b"200")])
        peer.sendData(other.stream.sid, b"y" * 65536, end=True)
        self.assertEqual(b"".join(other.data), b"y" * 65536)
        self.assertEqual(other.events[-1], ("end", None))
        slow[0].stream.resumeProducing()
        peer.read()
        self.assertEqual(peer.h2.local_flow_control_window(slow[0].stream.sid), 65536)
        self.assertEqual(peer.h2.local_flow_control_window(slow[1].stream.sid), 0)

    def test_pausedDuringDelivery(self):
        """
        A downstream that pauses while taking a chunk (its buffer filled) holds that chunk's
        acknowledgement.
        """
        first, conn, peer = self.connect()
        stream = self.begin(first)
        peer.read()
        first.onData = lambda data: stream.pauseProducing()
        peer.h2.send_headers(1, [(b":status", b"200")])
        peer.sendData(1, b"x" * 40000)
        peer.read()
        self.assertEqual(stream.heldAck, 40000)
        self.assertEqual(peer.h2.local_flow_control_window(1), 65536 - 40000)

    def test_requestBodyWaitsForWindow(self):
        """
        A request body beyond the peer's window waits and pauses its producer; a WINDOW_UPDATE sends the
        rest, the end after it, and resumes the producer.
        """
        first, conn, peer = self.connect({SettingCodes.INITIAL_WINDOW_SIZE: 10})
        stream = self.begin(first, POST, body=True)
        producer = Producer()
        stream.transport.registerProducer(producer, True)
        self.assertFalse(producer.paused)
        stream.writeBody(b"a" * 25)
        self.assertTrue(producer.paused)
        stream.endBody()
        peer.read()
        received = b"".join(e.data for e in peer.events if isinstance(e, DataReceived))
        self.assertEqual(received, b"a" * 10)
        peer.h2.acknowledge_received_data(10, 1)
        peer.h2.increment_flow_control_window(100, 1)
        peer.flush()
        peer.read()
        received = b"".join(e.data for e in peer.events if isinstance(e, DataReceived))
        self.assertEqual(received, b"a" * 25)
        self.assertTrue(any(isinstance(e, StreamEnded) for e in peer.events))
        self.assertFalse(producer.paused)

    def test_registeredWhileBlocked(self):
        """
        A producer registered after the window ran out (the router writes buffered body first) is paused
        at once.
        """
        first, conn, peer = self.connect({SettingCodes.INITIAL_WINDOW_SIZE: 10})
        stream = self.begin(first, POST, body=True)
        stream.writeBody(b"a" * 25)
        producer = Producer()
        stream.transport.registerProducer(producer, True)
        self.assertTrue(producer.paused)

    def test_socketFullPausesBodies(self):
        """
        When the peer does not read (the transport pauses the connection), request bodies pause.
        """
        first, conn, peer = self.connect()
        stream = self.begin(first, POST, body=True)
        producer = Producer()
        stream.transport.registerProducer(producer, True)
        conn.pauseProducing()
        self.assertTrue(producer.paused)
        conn.resumeProducing()
        self.assertFalse(producer.paused)


class KeepAliveTests(PoolTestBase):
    """
    PING keep-alive.
    """

    http2 = HTTP2ClusterConfig(keepalive_interval=10.0, keepalive_timeout=2.0)

    def test_pingUnanswered(self):
        """
        A PING every interval; a peer silent for the timeout after one is taken for dead: the connection
        closes and its streams fail.
        """
        first, conn, peer = self.connect()
        self.begin(first)
        peer.read()
        self.clock.advance(10)
        # The peer reads the PING but its answer never arrives.
        data = peer.transport.value()
        peer.transport.clear()
        self.assertTrue(any(isinstance(e, PingReceived) for e in peer.h2.receive_data(data)))
        self.clock.advance(2)
        self.assertTrue(peer.closed)
        self.assertEqual(self.stats.get("cluster.c.http2.keepalive_timeout").value, 1)
        self.assertEqual(first.events[1:], [("reset", "upstream_reset", False)])

    def test_pingAnswered(self):
        """
        A peer that answers the PING keeps the connection; the next PING follows an interval later.
        """
        first, conn, peer = self.connect()
        self.clock.advance(10)
        peer.read()  # answers the PING
        self.clock.advance(5)
        self.assertFalse(peer.closed)
        self.clock.advance(5)
        peer.read()
        self.assertEqual(len([e for e in peer.events if isinstance(e, PingReceived)]), 2)
        self.assertFalse(peer.closed)


class IdleTests(PoolTestBase):
    """
    Connections without streams.
    """

    def test_idleClose(self):
        """
        A connection with no stream for the idle timeout is closed with GOAWAY.
        """
        first, conn, peer = self.connect()
        self.begin(first)
        peer.read()
        peer.respond(1)
        self.clock.advance(59)
        self.assertFalse(peer.closed)
        self.clock.advance(1)
        self.assertTrue(peer.closed)
        peer.read()
        self.assertTrue(any(isinstance(e, ConnectionTerminated) for e in peer.events))

    def test_idleCountsFromLastStream(self):
        """
        The idle timeout counts from the moment the last stream ended, not from an earlier idle moment.
        """
        first, conn, peer = self.connect()
        self.begin(first)
        peer.read()
        peer.respond(1)
        self.clock.advance(50)
        second = Recorder()
        self.pool.acquire(second)
        self.begin(second)
        peer.read()
        peer.respond(3)
        self.clock.advance(50)
        self.assertFalse(peer.closed)
        self.clock.advance(10)
        self.assertTrue(peer.closed)

    def test_drainIdle(self):
        """
        A drained pool closes an idle connection at once, its idle timer cancelled rather than left pending.
        """
        first, conn, peer = self.connect()
        self.pool.release(first.stream)
        timer = conn.idleTimer
        self.assertTrue(timer.active())
        self.cluster.pools.drain()
        self.assertTrue(peer.closed)
        self.assertIsNone(conn.idleTimer)
        self.assertFalse(timer.active())

    def test_drainBusy(self):
        """
        A busy connection of a drained pool takes no new stream and closes when its last one ends; a
        request already waiting is served on a new connection that closes after it; an attempt that
        connects after the drain with nobody left to serve closes at once.
        """
        self.pool.maxStreams = 1
        first, conn, peer = self.connect()
        self.begin(first)
        waiter = Recorder()
        self.pool.acquire(waiter)
        self.assertEqual(len(self.endpoint.attempts), 2)
        self.cluster.pools.drain()
        self.assertTrue(conn.goingAway)
        peer.read()
        peer.respond(1)
        self.assertTrue(peer.closed)
        conn2, peer2 = self.endpoint.succeed(index=1)
        self.assertIs(waiter.stream.conn, conn2)
        self.begin(waiter)
        peer2.read()
        peer2.respond(1)
        self.assertEqual(waiter.events[-1], ("end", None))
        self.assertTrue(peer2.closed)
        gone = Recorder()
        self.pool.acquire(gone)
        self.pool.cancel(gone)
        conn3, peer3 = self.endpoint.succeed(index=2)
        self.assertTrue(peer3.closed)

    def test_drainCancelsUnwantedAttempts(self):
        """
        With nobody waiting, a drain cancels the connection attempts under way, which count as no connect
        failure; pools made after the drain are retired from the start.
        """
        waiter = Recorder()
        self.pool.acquire(waiter)
        self.pool.cancel(waiter)
        self.assertEqual(len(self.pool.connecting), 1)
        self.cluster.pools.drain()
        self.assertEqual(self.pool.connecting, set())
        self.assertEqual(self.stat("upstream_cx_connect_fail"), 0)
        self.assertTrue(self.cluster.pools.forHost("another host").draining)

    def test_closeAll(self):
        """
        closeAll aborts the connections and fails the waiters.
        """
        first, conn, peer = self.connect()
        self.begin(first)
        waiter = Recorder()
        self.pool.maxStreams = 1
        self.pool.acquire(waiter)
        self.cluster.pools.closeAll()
        self.assertEqual(waiter.events, [("failed", "pool closed", False)])
        self.assertEqual(first.events[1:], [("reset", "upstream_reset", False)])


class ConfigTests(SynchronousTestCase):
    """
    The cluster's protocol and http2.* keys.
    """

    def load(self, extra: str):
        return loadString(f"""
[mesh]
admin = off
[cluster:c]
endpoints = tcp:127.0.0.1:1
{extra}
""", "t.ini")

    def test_keys(self):
        """
        protocol = http2 and every http2.* key.
        """
        config = self.load("protocol = http2\nhttp2.max_concurrent_streams = 7\n"
                           "http2.initial_stream_window_size = 1MiB\nhttp2.initial_connection_window_size = 4MiB\n"
                           "http2.keepalive_interval = 30s\nhttp2.keepalive_timeout = 5s")
        c = config.clusters["c"]
        self.assertEqual(c.protocol, "http2")
        self.assertEqual(c.http2, HTTP2ClusterConfig(7, 1 << 20, 4 << 20, 30.0, 5.0))

    def test_defaults(self):
        """
        64 KiB / 1 MiB windows, 100 streams, no keep-alive.
        """
        c = self.load("protocol = http2").clusters["c"]
        self.assertEqual(c.http2, HTTP2ClusterConfig())
        self.assertIsNone(c.http2.keepalive_interval)

    def test_errors(self):
        """
        A window below 65535 bytes, and http2.* keys on an HTTP/1.1 cluster, are errors naming the key.
        """
        e = self.assertRaises(ConfigErrors, self.load, "protocol = http2\nhttp2.initial_stream_window_size = 100")
        self.assertIn("http2.initial_stream_window_size", str(e))
        e = self.assertRaises(ConfigErrors, self.load, "http2.max_concurrent_streams = 5")
        self.assertIn("applies only to clusters with protocol = http2", str(e))


# -- integration: the whole proxy on loopback against real HTTP/2 origins ------------------------------------


class H2Origin(protocol.Protocol):
    """
    A real HTTP/2 origin (h2c with prior knowledge, or h2 over TLS). Paths: C{/echo} answers with the
    request's method, path, body length and md5; C{/size/N} sends N bytes as the windows allow;
    C{/trailers} ends with gRPC trailers; C{/reset} resets after its head; C{/bad-status} answers with
    C{:status} 600; C{/refuse-once} refuses the
    first stream (REFUSED_STREAM) and answers the next; C{/slow} never answers; C{/stall} takes an upload
    without acknowledging it until L{release}. What it saw is kept on its factory.
    """

    BLOCK = b"x" * 16384

    def connectionMade(self):
        self.factory.instances.append(self)
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.h2.initiate_connection()
        self.streams = {}  # sid -> [path, md5, length, held]
        self.sending = {}  # sid -> bytes still to send
        self.stalled = True
        self.flush()

    def flush(self):
        data = self.h2.data_to_send()
        if data:
            self.transport.write(data)

    def release(self):
        """
        Acknowledge the stalled uploads, and stall no more.
        """
        self.stalled = False
        for sid, state in self.streams.items():
            if state[3]:
                self.h2.acknowledge_received_data(state[3], sid)
                state[3] = 0
        self.flush()

    def dataReceived(self, data):
        f = self.factory
        for event in self.h2.receive_data(data):
            kind = event.__class__
            if kind is RequestReceived:
                headers = event.headers
                f.requests.append(headers)
                path = dict(headers)[b":path"]
                self.streams[event.stream_id] = [path, hashlib.md5(), 0, 0]
                if event.stream_ended is not None:
                    self.answer(event.stream_id)
            elif kind is DataReceived:
                state = self.streams[event.stream_id]
                state[1].update(event.data)
                state[2] += len(event.data)
                if state[0] == b"/stall" and self.stalled:
                    state[3] += event.flow_controlled_length
                else:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if event.stream_ended is not None:
                    self.answer(event.stream_id)
            elif kind is TrailersReceived:
                f.trailers.append(event.headers)
                self.answer(event.stream_id)
            elif kind is StreamReset:
                f.resets.append((event.stream_id, event.error_code))
                self.sending.pop(event.stream_id, None)
            elif kind is WindowUpdated:
                self.pump()
        self.flush()

    def answer(self, sid):
        path, md5, length, _ = self.streams[sid]
        h2c = self.h2
        if path == b"/slow":
            return
        if path == b"/reset-early":
            h2c.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)
        elif path == b"/reset":
            h2c.send_headers(sid, [(b":status", b"200")])
            h2c.send_data(sid, b"partial")
            h2c.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)
        elif path == b"/bad-status":
            h2c.send_headers(sid, [(b":status", b"600")])  # and a body that never comes
        elif path == b"/refuse-once" and not self.factory.refused:
            self.factory.refused += 1
            h2c.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
        elif path == b"/trailers":
            h2c.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
            h2c.send_data(sid, b"grpc-body")
            h2c.send_headers(sid, [(b"grpc-status", b"0"), (b"grpc-message", b"fine")], end_stream=True)
        elif path.startswith(b"/size/"):
            n = int(path.split(b"/")[2])
            h2c.send_headers(sid, [(b":status", b"200"), (b"content-length", b"%d" % n)])
            self.sending[sid] = n
            self.pump()
        else:
            body = b"%s %d %s" % (path, length, md5.hexdigest().encode())
            h2c.send_headers(sid, [(b":status", b"200"), (b"content-length", b"%d" % len(body)),
                                   (b"x-origin", b"h2")])
            h2c.send_data(sid, body, end_stream=True)

    def pump(self):
        h2c = self.h2
        for sid, left in list(self.sending.items()):
            while left:
                n = min(left, h2c.local_flow_control_window(sid), 16384)
                if n <= 0:
                    break
                left -= n
                h2c.send_data(sid, self.BLOCK[:n], end_stream=not left)
            if left:
                self.sending[sid] = left
            else:
                del self.sending[sid]

    def connectionLost(self, reason):
        self.factory.instances.remove(self)
        if not self.factory.instances and self.factory.allClosed is not None:
            d, self.factory.allClosed = self.factory.allClosed, None
            d.callback(None)


class H2OriginFactory(protocol.Factory):
    protocol = H2Origin

    def __init__(self):
        self.instances = []
        self.requests = []
        self.trailers = []
        self.resets = []
        self.refused = 0
        self.connections = 0
        self.allClosed = None

    def buildProtocol(self, addr):
        self.connections += 1
        return super().buildProtocol(addr)

    def whenAllClosed(self):
        if not self.instances:
            return defer.succeed(None)
        self.allClosed = defer.Deferred()
        return self.allClosed


class SlowReader(protocol.Protocol):
    """
    Sends a request, then reads only when told to; counts the body bytes and keeps the head.
    """

    def __init__(self, request: bytes):
        self.request = request
        self.received = 0
        self.head = b""
        self.headerDone = False
        self.closed = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.request)

    def dataReceived(self, data):
        if not self.headerDone:
            head, sep, data = data.partition(b"\r\n\r\n")
            self.head += head
            self.headerDone = bool(sep)
        self.received += len(data)

    def connectionLost(self, reason):
        self.closed.callback(self.received)


class IntegrationBase(unittest.TestCase):
    """
    A real HTTP/2 origin (h2c) and a proxy in front of it, on loopback.
    """

    timeout = 60
    scheme = b"http"  # the :scheme the origin sees

    routes = """
[route:main/retry]
prefix = /retry/
prefix_rewrite = /
cluster = origin
retry.on = refused-stream
retry.num = 1
[route:main/all]
prefix = /
cluster = origin
"""

    @defer.inlineCallbacks
    def setUp(self):
        self.origin = H2OriginFactory()
        self.originPort = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.origin)
        self.addCleanup(self.origin.whenAllClosed)
        self.addCleanup(self.originPort.stopListening)
        self.service = yield self.startProxy(f"tcp:127.0.0.1:{self.originPort.getHost().port}")
        self.port = self.service.listeners["web"].port.getHost().port

    @defer.inlineCallbacks
    def startProxy(self, endpoint: str, extra: str = "", listener: str = ""):
        service = startService(self, f"""
[mesh]
admin = off
drain_timeout = 1s
[listener:web]
endpoint = tcp:0:interface=127.0.0.1
protocol = http
routes = main
{listener}
{self.routes}
[cluster:origin]
endpoints = {endpoint}
protocol = http2
connect_timeout = 1s
{extra}
""", seed=7, stop=stopProxy)
        yield service.whenLive
        return service

    def stat(self, name):
        return self.service.stats.get(name).value

    def h2client(self) -> defer.Deferred:
        return connectH2(self, self.port)



class IntegrationTests(IntegrationBase):
    """
    HTTP/1.1 and HTTP/2 clients through L{MeshService} to a real HTTP/2 origin on loopback.
    """

    @defer.inlineCallbacks
    def test_http1Client(self):
        """
        An HTTP/1.1 request (chunked, with trailers and hop-by-hop fields) reaches the origin as HTTP/2:
        pseudo-headers from the request line and Host, no connection-specific field, the body and its
        trailers intact; the answer comes back as HTTP/1.1.
        """
        answer = yield rawExchange(self.port, (
            b"POST /echo?q=1 HTTP/1.1\r\nHost: svc.local\r\nConnection: close, x-hop\r\nX-Hop: 1\r\n"
            b"Keep-Alive: 5\r\nTE: trailers\r\nTransfer-Encoding: chunked\r\nX-Custom: yes\r\n\r\n"
            b"5\r\nhello\r\n0\r\nx-req-trailer: 1\r\n\r\n"))
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer)
        self.assertIn(b"x-origin: h2", answer)
        self.assertTrue(answer.endswith(b"/echo?q=1 5 " + hashlib.md5(b"hello").hexdigest().encode()), answer)
        [seen] = self.origin.requests
        self.assertEqual(seen[:4], [(b":method", b"POST"), (b":scheme", self.scheme), (b":authority", b"svc.local"),
                                    (b":path", b"/echo?q=1")])
        names = [n for n, _ in seen]
        for name in (b"connection", b"keep-alive", b"transfer-encoding", b"x-hop", b"host"):
            self.assertNotIn(name, names)
        self.assertIn((b"te", b"trailers"), seen)
        self.assertIn((b"x-custom", b"yes"), seen)
        self.assertEqual(self.origin.trailers, [[(b"x-req-trailer", b"1")]])
        self.assertEqual(self.stat("cluster.origin.upstream_cx_http2_total"), 1)
        self.assertEqual(self.stat("cluster.origin.upstream_rq_total"), 1)

    @defer.inlineCallbacks
    def test_multiplexed(self):
        """
        Concurrent requests share one upstream connection.
        """
        client = yield self.h2client()
        responses = yield defer.gatherResults([client.request(b"/echo/%d" % i) for i in range(10)])
        self.assertEqual([r.status for r in responses], [200] * 10)
        self.assertEqual(self.origin.connections, 1)
        self.assertEqual(self.stat("cluster.origin.upstream_cx_http2_total"), 1)

    @defer.inlineCallbacks
    def test_trailersToH2Client(self):
        """
        gRPC's grpc-status and grpc-message trailers reach an HTTP/2 client as trailers.
        """
        client = yield self.h2client()
        r = yield client.request(b"/trailers", extra=[(b"te", b"trailers")])
        self.assertEqual(r.status, 200)
        self.assertEqual(r.data, b"grpc-body")
        self.assertEqual(r.trailers, [(b"grpc-status", b"0"), (b"grpc-message", b"fine")])

    @defer.inlineCallbacks
    def test_trailersToH1Client(self):
        """
        Toward an HTTP/1.1 client, the upstream's trailers end a chunked body.
        """
        answer = yield rawExchange(self.port, b"GET /trailers HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n"
                                              b"Connection: close\r\n\r\n")
        self.assertIn(b"transfer-encoding: chunked", answer.lower())
        self.assertTrue(answer.endswith(b"9\r\ngrpc-body\r\n0\r\ngrpc-status: 0\r\ngrpc-message: fine\r\n\r\n"),
                        answer)

    @defer.inlineCallbacks
    def test_requestTrailersH2ToH2(self):
        """
        An HTTP/2 client's request trailers reach the HTTP/2 origin.
        """
        client = yield self.h2client()
        h2c = client.conn
        sid = h2c.get_next_available_stream_id()
        client.responses[sid] = Response()
        d = client.waiting[sid] = defer.Deferred()
        h2c.send_headers(sid, head(b"/echo", b"POST", [(b"te", b"trailers")]))
        h2c.send_data(sid, b"abc")
        h2c.send_headers(sid, [(b"x-sum", b"3")], end_stream=True)
        client.flush()
        r = yield d
        self.assertEqual(r.status, 200)
        self.assertEqual(self.origin.trailers, [[(b"x-sum", b"3")]])

    @defer.inlineCallbacks
    def test_refusedStream(self):
        """
        REFUSED_STREAM is retried under retry.on = refused-stream; without a retry policy it is a 503 (UR)
        saying why.
        """
        answer = yield rawExchange(self.port, b"GET /retry/refuse-once HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer)
        self.assertEqual(self.stat("cluster.origin.upstream_rq_retry"), 1)
        self.origin.refused = 0
        answer = yield rawExchange(self.port, b"GET /refuse-once HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 503"), answer)
        self.assertIn(b"remote_refused_stream_reset", answer)

    @defer.inlineCallbacks
    def test_resetFlags(self):
        """
        A reset before the head is a 503 flagged UR with remote_reset; a refused stream the same with
        remote_refused_stream_reset; both as the access log records them.
        """
        path = os.path.abspath(self.mktemp())
        service = yield self.startProxy(f"tcp:127.0.0.1:{self.originPort.getHost().port}", listener=(
            f"access_log = {path}\naccess_log.format = %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%"))
        port = service.listeners["web"].port.getHost().port
        for target in (b"/reset-early", b"/refuse-once"):
            answer = yield rawExchange(port, b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % target)
            self.assertTrue(answer.startswith(b"HTTP/1.1 503"), answer)
        yield stopProxy(service)
        with open(path) as f:
            self.assertEqual(f.read(), "503 UR upstream_reset_before_response_started{remote_reset}\n"
                                       "503 UR upstream_reset_before_response_started{remote_refused_stream_reset}\n")

    @defer.inlineCallbacks
    def test_slowClientsDoNotStallOthers(self):
        """
        Over real sockets, 17 clients that stop reading their downloads (more than the 1 MiB connection
        window holds at one 64 KiB stream window each) do not stall another client's request multiplexed
        on the same upstream connection: only their streams' windows are held.
        """
        slow = []
        for i in range(17):
            client = KeepAliveClient()
            yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), client)
            client.request(b"/size/%d" % (16 << 20))
            client.transport.pauseProducing()
            slow.append(client)
        pool = self.service.clusters["origin"].pools
        [hostPool] = pool.pools.values()

        def held():
            return sum(1 for conn in hostPool.connections for s in conn.streams.values() if s.paused)

        yield waitFor(lambda: held() == 17, 20, lambda: "17 paused upstream streams (%d)" % held())
        self.assertEqual(len(hostPool.connections), 1)
        fast = KeepAliveClient()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), fast)
        answer = yield fast.request(b"/echo").addTimeout(10, reactor)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer)
        for client in slow + [fast]:
            client.transport.abortConnection()

    @defer.inlineCallbacks
    def test_invalidStatusOverLoopback(self):
        """
        Over real sockets, an origin's invalid :status (600) is a 503 flagged UC with a protocol error, as
        a bad HTTP/1.1 status line is; the origin sees its stream reset and the same upstream connection
        answers the next request.
        """
        path = os.path.abspath(self.mktemp())
        service = yield self.startProxy(f"tcp:127.0.0.1:{self.originPort.getHost().port}", listener=(
            f"access_log = {path}\naccess_log.format = %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%"))
        port = service.listeners["web"].port.getHost().port
        answer = yield rawExchange(port, b"GET /bad-status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 503"), answer)
        answer = yield rawExchange(port, b"GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer)
        self.assertEqual(self.origin.connections, 1)
        self.assertEqual(self.origin.resets, [(1, ErrorCodes.PROTOCOL_ERROR)])
        yield stopProxy(service)
        with open(path) as f:
            self.assertEqual(f.read().splitlines()[0], "503 UC upstream_reset_before_response_started{protocol_error}")

    @defer.inlineCallbacks
    def test_resetAfterHeaders(self):
        """
        An upstream reset after the response head resets the client's stream: never a complete response.
        """
        client = yield self.h2client()
        r = yield client.request(b"/reset")
        self.assertIsNotNone(r.reset)
        self.assertFalse(r.ended)

    @defer.inlineCallbacks
    def test_downstreamResetCancels(self):
        """
        A client that resets its stream makes the proxy cancel the upstream stream (RST_STREAM CANCEL);
        the upstream connection stays.
        """
        client = yield self.h2client()
        d = client.request(b"/slow")
        yield waitFor(lambda: self.origin.requests, 10, "the request at the origin", 0.01)
        client.reset(d.sid)
        yield waitFor(lambda: self.origin.resets, 10, "the reset at the origin", 0.01)
        self.assertEqual([code for _, code in self.origin.resets], [ErrorCodes.CANCEL])
        r = yield client.request(b"/echo")
        self.assertEqual(r.status, 200)
        self.assertEqual(self.origin.connections, 1)

    @defer.inlineCallbacks
    def test_uploadH2(self):
        """
        A 4 MiB upload from an HTTP/2 client arrives whole (windows opened as the origin reads).
        """
        client = yield self.h2client()
        body = os.urandom(4 << 20)
        r = yield client.request(b"/echo", b"POST", body)
        self.assertEqual(r.data, b"/echo %d %s" % (len(body), hashlib.md5(body).hexdigest().encode()))

    @defer.inlineCallbacks
    def test_slowClientDownload(self):
        """
        While an HTTP/1.1 client reads nothing, the proxy stops acknowledging the upstream's DATA; the
        32 MiB body then arrives whole, and the proxy's buffers stayed bounded throughout.
        """
        size = 32 << 20
        client = SlowReader(b"GET /size/%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % size)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), client)
        client.transport.pauseProducing()
        factory = self.service.listeners["web"].factory
        peak = yield peakBuffered(lambda: factory.connections)
        self.assertLess(peak, 4 << 20)
        client.transport.resumeProducing()
        received = yield client.closed
        self.assertEqual(received, size)

    @defer.inlineCallbacks
    def test_slowUpstreamUpload(self):
        """
        While the origin acknowledges nothing, the proxy sends no more than the windows allow and stops
        reading the HTTP/1.1 client; released, the 32 MiB upload arrives whole.
        """
        size = 32 << 20

        class Uploader(protocol.Protocol):
            def connectionMade(self):
                self.transport.write(b"POST /stall HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                                     b"Connection: close\r\n\r\n" % size)
                self.transport.write(b"u" * size)

            def dataReceived(self, data):
                self.answer = getattr(self, "answer", b"") + data

            def connectionLost(self, reason):
                self.closed.callback(getattr(self, "answer", b""))

        client = Uploader()
        client.closed = defer.Deferred()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), client)
        pools = self.service.clusters["origin"].pools.pools
        peak = yield peakBuffered(
            lambda: [conn for pool in pools.values() for conn in pool.connections],
            lambda conn: sum(sum(len(c) for c in s.pending or ()) for s in conn.streams.values()))
        self.assertLess(peak, 4 << 20)
        # The origin got at most its windows' worth.
        self.assertLessEqual(sum(s[2] for o in self.origin.instances for s in o.streams.values()), 1 << 20)
        for origin in self.origin.instances:
            origin.release()
        answer = yield client.closed
        self.assertTrue(answer.endswith(b"/stall %d %s" % (size, hashlib.md5(b"u" * size).hexdigest().encode())),
                        answer[-200:])

    @defer.inlineCallbacks
    def test_curl(self):
        """
        curl with HTTP/2 prior knowledge, through to the HTTP/2 origin.
        """
        if CURL is None:
            raise unittest.SkipTest("curl is not installed")
        out, err, code = yield getProcessOutputAndValue(
            CURL, ["-s", "-i", "--http2-prior-knowledge", f"http://127.0.0.1:{self.port}/echo"])
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith(b"HTTP/2 200"), out)
        self.assertTrue(out.endswith(b"/echo 0 " + hashlib.md5(b"").hexdigest().encode()), out)


class TLSIntegrationTests(IntegrationBase):
    """
    To an origin over TLS that negotiates h2 by ALPN.
    """

    scheme = b"https"
    test_http1Client = IntegrationTests.test_http1Client
    test_trailersToH2Client = IntegrationTests.test_trailersToH2Client
    test_uploadH2 = IntegrationTests.test_uploadH2

    @defer.inlineCallbacks
    def setUp(self):
        from twisted.internet.ssl import CertificateOptions

        from .test_tls import standardPKI

        pki = standardPKI(self.mktemp())
        cert = pki.twistedClient("server")
        options = CertificateOptions(privateKey=cert.privateKey.original, certificate=cert.original,
                                     acceptableProtocols=[b"h2"])
        self.origin = H2OriginFactory()
        self.originPort = reactor.listenSSL(0, self.origin, options, interface="127.0.0.1")
        self.addCleanup(self.origin.whenAllClosed)
        self.addCleanup(self.originPort.stopListening)
        self.service = yield self.startProxy(f"tcp:127.0.0.1:{self.originPort.getHost().port}",
                                             f"tls = up\n[tls:up]\nca = {pki.ca}\nsni = localhost\n")
        self.port = self.service.listeners["web"].port.getHost().port

    @defer.inlineCallbacks
    def test_alpn(self):
        """
        The upstream connection negotiated h2 by ALPN, and carried the request.
        """
        answer = yield rawExchange(self.port, b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer)
        [conn] = self.service.clusters["origin"].pools.pools[self.service.clusters["origin"].hosts[0]].connections
        self.assertEqual(conn.transport.negotiatedProtocol, b"h2")
        self.assertEqual(self.origin.requests[0][1], (b":scheme", b"https"))


class NginxTests(IntegrationBase):
    """
    nginx as the HTTP/2 (h2c prior knowledge) origin, where installed.
    """

    @defer.inlineCallbacks
    def setUp(self):
        port, root = yield startNginx(self, """
        location = /hello { return 200 "nginx-ok\\n"; }
        location /upload/ { dav_methods PUT; create_full_put_path on; }""", "client_max_body_size 64m;")
        self.root = root
        self.big = os.urandom(8 << 20)
        with open(os.path.join(root, "big"), "wb") as f:
            f.write(self.big)
        self.service = yield self.startProxy(f"tcp:127.0.0.1:{port}")
        self.port = self.service.listeners["web"].port.getHost().port

    @defer.inlineCallbacks
    def test_http1ClientToNginx(self):
        """
        An HTTP/1.1 client gets nginx's answer over an HTTP/2 upstream connection.
        """
        answer = yield rawExchange(self.port, b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer)
        self.assertTrue(answer.endswith(b"nginx-ok\n"), answer)
        self.assertEqual(self.stat("cluster.origin.upstream_cx_http2_total"), 1)

    @defer.inlineCallbacks
    def test_largeBodiesCurl(self):
        """
        curl over HTTP/2 to the proxy: an 8 MiB download from nginx arrives intact, and an 8 MiB upload
        (a WebDAV PUT) is stored intact.
        """
        if CURL is None:
            raise unittest.SkipTest("curl is not installed")
        out, err, code = yield getProcessOutputAndValue(
            CURL, ["-s", "--http2-prior-knowledge", f"http://127.0.0.1:{self.port}/big"])
        self.assertEqual(code, 0, err)
        self.assertEqual(hashlib.md5(out).hexdigest(), hashlib.md5(self.big).hexdigest())
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(self.big)
        out, err, code = yield getProcessOutputAndValue(
            CURL, ["-s", "-o", "/dev/null", "-w", "%{http_code}", "--http2-prior-knowledge", "-T", path,
                   f"http://127.0.0.1:{self.port}/upload/copy"])
        self.assertEqual((code, out), (0, b"201"), err)
        with open(os.path.join(self.root, "upload", "copy"), "rb") as f:
            self.assertEqual(hashlib.md5(f.read()).hexdigest(), hashlib.md5(self.big).hexdigest())
