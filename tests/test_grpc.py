"""
gRPC awareness: L{twistedmesh.http.grpc} (status mapping, grpc-message and grpc-timeout encodings), the
gRPC shape of every local reply (L{twistedmesh.http.stream.Stream.respond}), the router's C{grpc-timeout}
deadline and DEADLINE_EXCEEDED, and the route key C{retry.grpc_on}.

Unit tests drive a whole L{MeshService} on a L{MemoryReactorClock} (the downstream an HTTP/1.1 connection
or h2's own client connection on a memory transport, the upstream connections completed by the test, as in
tests/test_router.py). Integration tests put a real grpcio server and client on loopback with the proxy
between them.
"""

from __future__ import annotations

from typing import List, Optional

from h2.errors import ErrorCodes
from h2.events import ResponseReceived
from twisted.internet import defer, threads
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest
from twisted.trial.unittest import SynchronousTestCase

from twistedmesh.config import loadString
from twistedmesh.config.routes import GRPC_RETRY_ON, RetryPolicy
from twistedmesh.http import grpc, server
from twistedmesh.http.stream import HTTPFilter
from twistedmesh.service import MeshService
from twistedmesh.testing import FilterHarness

from .support import freePort, head, startService, stopProxy
from .test_h2 import Peer
from .test_router import Client, FakeEndpoint, MemoryTransport, RecordingStream, RouterTestBase, ok
from .test_routes import parse

GRPC_CT = (b"content-type", b"application/grpc")
FRAME = b"\x00\x00\x00\x00\x05hello"  # one uncompressed gRPC message of 5 bytes

CONFIG = """
[mesh]
admin = off
[listener:web]
endpoint = tcp:0
protocol = http
routes = main
[listener:guarded]
endpoint = tcp:0
protocol = http
filters = deny, chaos, router
routes = main
[listener:limited]
endpoint = tcp:0
protocol = http
filters = limit, router
routes = main
[listener:strict]
endpoint = tcp:0
protocol = http
routes = other
[filter:deny]
type = rbac
action = DENY
policy.forbidden.principals = any
policy.forbidden.permissions = path:prefix:/forbidden/
[filter:chaos]
type = fault
headers_control = true
[filter:limit]
type = local_ratelimit
max_tokens = 1
tokens_per_fill = 1
fill_interval = 1h
[route:main/quick]
prefix = /quick/
cluster = origin
timeout = 1s
[route:main/nocap]
prefix = /nocap/
cluster = origin
timeout = 0
[route:main/try]
prefix = /try/
cluster = origin
timeout = 10s
retry.grpc_on = unavailable
retry.per_try_timeout = 500ms
[route:main/retry]
prefix = /retry/
cluster = origin
retry.grpc_on = unavailable, cancelled
retry.num = 1
[route:main/hello]
path = /hello
direct_response.status = 200
direct_response.body = hello
[route:main/all]
prefix = /
cluster = origin
[route:other/only]
path = /only
cluster = origin
[cluster:origin]
endpoints = tcp:10.0.0.1:80, tcp:10.0.0.2:80
connect_timeout = 5s
"""


def trailersOnly(status: int, message: bytes = b"") -> bytes:
    """
    An HTTP/1.1 upstream's trailers-only gRPC answer: 200 with the status in its headers, no body.
    """
    extra = b"grpc-message: %s\r\n" % message if message else b""
    return (b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ngrpc-status: %d\r\n%scontent-length: 0\r\n\r\n"
            % (status, extra))


class GRPCTestBase(RouterTestBase):
    """
    A proxy with L{CONFIG}'s listeners in front of a cluster C{origin} of two hosts that connect through
    L{FakeEndpoint}s (see tests/test_router.py).
    """

    def setUp(self) -> None:
        self.patch(server, "Stream", RecordingStream)
        self.patch(RecordingStream, "made", [])
        self.clock = MemoryReactorClock()
        self.service = MeshService(loadString(CONFIG, "test.ini"), self.clock, seed=1)
        self.cluster = self.service.clusters["origin"]
        self.connects: List[tuple] = []
        for host in self.cluster.hosts:
            host.client = FakeEndpoint(self, host)

    def call(self, path: bytes, extra: bytes = b"", listener: str = "web", grpcRequest: bool = True) -> Client:
        """
        An HTTP/1.1 client's POST of one gRPC message to C{path} (a gRPC request unless C{grpcRequest} is
        false).
        """
        client = Client(self, listener)
        ct = b"content-type: application/grpc\r\n" if grpcRequest else b"content-type: application/json\r\n"
        client.send(b"POST %s HTTP/1.1\r\nHost: example.com\r\n%ste: trailers\r\ncontent-length: %d\r\n%s\r\n%s"
                    % (path, ct, len(FRAME), extra, FRAME))
        return client

    def h2(self, listener: str = "web") -> Peer:
        """
        An HTTP/2 client (h2's own connection, prior knowledge) on a new connection to C{listener}.
        """
        addr = IPv4Address("TCP", "192.0.2.8", 50001)
        proto = self.service.listeners[listener].factory.buildProtocol(addr)
        transport = MemoryTransport(self.clock, proto, peerAddress=addr)
        proto.makeConnection(transport)
        return Peer(proto, transport)

    def h2call(self, peer: Peer, path: bytes, extra=(), body: bool = True) -> int:
        """
        A gRPC call's request on a new stream of C{peer}: its stream id. The headers and one message
        (ending the stream) arrive in one read, as gRPC clients send them; without C{body}, the headers
        alone end the stream.
        """
        fields = head(path, b"POST", [GRPC_CT, (b"te", b"trailers")] + list(extra))
        return peer.request(fields, FRAME) if body else peer.request(fields)

    def assertTrailersOnly(self, peer: Peer, sid: int, status: int, message: Optional[bytes]) -> dict:
        """
        Stream C{sid} was answered with one HEADERS frame that ended it: 200, application/grpc,
        C{grpc-status: status} and C{grpc-message: message} (absent when C{None}); return its fields.
        """
        heads = [e for e in peer.events if isinstance(e, ResponseReceived) and e.stream_id == sid]
        self.assertEqual(len(heads), 1)
        self.assertIsNotNone(heads[0].stream_ended, "the HEADERS frame did not end the stream")
        r = peer.responses[sid]
        self.assertEqual((r.data, r.trailers, r.reset), (b"", None, None))
        fields = dict(r.headers)
        self.assertEqual((fields[b":status"], fields[b"content-type"], fields[b"grpc-status"]),
                         (b"200", b"application/grpc", b"%d" % status))
        self.assertEqual(fields.get(b"grpc-message"), message)
        self.assertNotIn(b"content-length", fields)
        return fields

    def assertGRPCReply(self, client: Client, status: int, message: Optional[bytes]) -> None:
        """
        The HTTP/1.1 client got a gRPC reply: 200, application/grpc, no body, C{grpc-status: status},
        C{grpc-message: message} (absent when C{None}).
        """
        r = client.response()
        self.assertEqual((r.status, r.body, r.header(b"content-type"), r.header(b"content-length")),
                         (200, b"", b"application/grpc", b"0"))
        self.assertEqual(r.header(b"grpc-status"), b"%d" % status)
        self.assertEqual(r.header(b"grpc-message"), message)


# -- the helpers


class HelperTests(SynchronousTestCase):
    """
    L{twistedmesh.http.grpc}'s encodings and mappings.
    """

    def test_isGRPC(self) -> None:
        """
        application/grpc, with a +format or parameters, in any case, is gRPC; gRPC-Web and others are not.
        """
        for value in (b"application/grpc", b"application/grpc+proto", b"application/grpc+json",
                      b"Application/GRPC", b"application/grpc;charset=utf-8"):
            self.assertTrue(grpc.isGRPC(value), value)
        for value in (None, b"", b"application/grpc-web", b"application/grpc-web+proto", b"application/json",
                      b"text/plain", b"application/grpcx", b"application/grp"):
            self.assertFalse(grpc.isGRPC(value), value)

    def test_statusForHTTP(self) -> None:
        """
        HTTP statuses map to gRPC ones as gRPC's http-grpc-status-mapping document says; others are
        UNKNOWN.
        """
        table = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14,
                 200: 2, 408: 2, 413: 2, 500: 2, 301: 2}
        self.assertEqual({status: grpc.statusForHTTP(status) for status in table}, table)

    def test_encodeMessage(self) -> None:
        """
        Printable ASCII passes as it is (the same object); C{%}, controls and non-ASCII bytes become %XX
        in upper case.
        """
        plain = b"upstream request timeout"
        self.assertIs(grpc.encodeMessage(plain), plain)
        self.assertEqual(grpc.encodeMessage("100% sûr\n\t~".encode()), b"100%25 s%C3%BBr%0A%09~")
        self.assertEqual(grpc.encodeMessage(b"\x7f\x00"), b"%7F%00")

    def test_parseTimeoutUnits(self) -> None:
        """
        Every unit of grpc-timeout: hours, minutes, seconds, milliseconds, microseconds, nanoseconds.
        """
        for value, seconds in ((b"2H", 7200.0), (b"3M", 180.0), (b"4S", 4.0), (b"250m", 0.25),
                               (b"500u", 0.0005), (b"100n", 1e-7), (b"99999999S", 99999999.0), (b" 7S ", 7.0)):
            self.assertAlmostEqual(grpc.parseTimeout(value), seconds, places=12, msg=value)

    def test_parseTimeoutMalformed(self) -> None:
        """
        Values that are not 1 to 8 digits and a known unit are ignored (C{None}), and so is a zero.
        """
        for value in (None, b"", b"S", b"5", b"10x", b"10s", b"-5S", b"1.5S", b"123456789m", b"1 S", b"+5S",
                      b"\xd9\xa1S", b"0S", b"00000000m"):
            self.assertIsNone(grpc.parseTimeout(value), value)

    def test_encodeTimeout(self) -> None:
        """
        Timeouts go upstream in milliseconds, rounded up, in larger units when 8 digits cannot hold them;
        what is encoded parses back to at least the timeout.
        """
        self.assertEqual(grpc.encodeTimeout(1.0), b"1000m")
        self.assertEqual(grpc.encodeTimeout(0.0001), b"1m")
        self.assertEqual(grpc.encodeTimeout(0.0101), b"11m")
        self.assertEqual(grpc.encodeTimeout(200000.0), b"200000S")
        for seconds in (0.25, 1.5, 15.0, 99999.999, 1e6, 1e9):
            self.assertGreaterEqual(grpc.parseTimeout(grpc.encodeTimeout(seconds)), seconds)

    def test_retryNamesAgree(self) -> None:
        """
        The names C{retry.grpc_on} accepts are the ones the router knows the statuses of.
        """
        self.assertEqual(sorted(GRPC_RETRY_ON), sorted(grpc.RETRY_ON_STATUSES))


# -- local replies through the stream


class Replier(HTTPFilter):
    """
    Answers every request locally with what it was made with.
    """

    def __init__(self, status: int, body: bytes = b"", headers=(), grpcStatus: Optional[int] = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers
        self.grpcStatus = grpcStatus

    def requestHeaders(self, stream):
        return stream.respond(self.status, self.body, self.headers, flag="XX", details="test_reply",
                              grpcStatus=self.grpcStatus)


class Buffering(HTTPFilter):
    """
    Asks for the whole request body, up to 4 bytes.
    """

    def requestHeaders(self, stream):
        return stream.bufferRequestBody(4)


class LocalReplyTests(SynchronousTestCase):
    """
    L{Stream.respond} makes every local reply to a gRPC request a trailers-only gRPC response.
    """

    def reply(self, *args, contentType: bytes = b"application/grpc", **kwargs) -> FilterHarness:
        h = FilterHarness(Replier(*args, **kwargs))
        h.request(b"POST", b"/svc.Echo/Say", [(b"content-type", contentType)])
        return h

    def test_shape(self) -> None:
        """
        A 503 with a body becomes HTTP 200, application/grpc, grpc-status 14 (UNAVAILABLE) and the body as
        grpc-message; nothing follows the headers; flag and details stay; the filter's other headers stay.
        """
        h = self.reply(503, b"no healthy upstream\n", [(b"x-envoy-overloaded", b"true"),
                                                       (b"content-type", b"text/html")])
        d = h.downstream
        self.assertEqual((d.status, d.body, d.trailers, d.ended), (200, b"", None, True))
        self.assertEqual(d.headers, [(b"x-envoy-overloaded", b"true"), (b"content-type", b"application/grpc"),
                                     (b"grpc-status", b"14"), (b"grpc-message", b"no healthy upstream")])
        self.assertEqual((h.stream.status, h.stream.responseFlags, h.stream.responseCodeDetails),
                         (200, ["XX"], "test_reply"))
        self.assertIsNone(h.upstream.method)

    def test_statusMapping(self) -> None:
        """
        The HTTP status of each local reply chooses its gRPC status.
        """
        for status, expected in ((400, b"13"), (401, b"16"), (403, b"7"), (404, b"12"), (429, b"14"),
                                 (502, b"14"), (503, b"14"), (504, b"14"), (500, b"2"), (413, b"2"),
                                 (200, b"2"), (302, b"2")):
            h = self.reply(status, b"x")
            self.assertEqual((h.downstream.status, dict(h.downstream.headers)[b"grpc-status"]), (200, expected),
                             status)

    def test_grpcStatusGiven(self) -> None:
        """
        A status the replying filter names wins over the mapped one.
        """
        h = self.reply(504, b"upstream request timeout\n", grpcStatus=grpc.DEADLINE_EXCEEDED)
        self.assertEqual(dict(h.downstream.headers)[b"grpc-status"], b"4")

    def test_grpcStatusInHeaders(self) -> None:
        """
        A reply a filter made gRPC-shaped itself keeps its grpc-status and grpc-message.
        """
        h = self.reply(200, b"", [(b"grpc-status", b"9"), (b"grpc-message", b"not now")])
        fields = dict(h.downstream.headers)
        self.assertEqual((fields[b"grpc-status"], fields[b"grpc-message"]), (b"9", b"not now"))
        self.assertEqual([k for k, _ in h.downstream.headers].count(b"grpc-status"), 1)

    def test_messageEncoded(self) -> None:
        """
        grpc-message is the body without its newline, percent-encoded; an empty body sends none.
        """
        h = self.reply(403, "accès refusé: 100%\n".encode())
        self.assertEqual(dict(h.downstream.headers)[b"grpc-message"], b"acc%C3%A8s refus%C3%A9: 100%25")
        h = self.reply(404, b"")
        self.assertNotIn(b"grpc-message", dict(h.downstream.headers))

    def test_notGRPC(self) -> None:
        """
        Other requests, gRPC-Web ones included, get the reply as it was made.
        """
        for contentType in (b"application/json", b"application/grpc-web+proto"):
            h = self.reply(503, b"busy", contentType=contentType, grpcStatus=grpc.DEADLINE_EXCEEDED)
            self.assertEqual((h.downstream.status, h.downstream.body), (503, b"busy"))
            self.assertEqual(h.downstream.headers, [(b"content-type", b"text/plain"), (b"content-length", b"4")])
        h = FilterHarness(Replier(503, b"busy"))
        h.request(b"GET", b"/")
        self.assertEqual(h.downstream.status, 503)

    def test_bodyTooLarge(self) -> None:
        """
        The stream's own 413 (a body over a buffering filter's limit) is gRPC-shaped too.
        """
        h = FilterHarness(Buffering())
        h.request(b"POST", b"/svc.Echo/Say", [GRPC_CT], body=[b"abc", b"defgh"])
        d = h.downstream
        self.assertEqual((d.status, d.body), (200, b""))
        self.assertEqual((dict(d.headers)[b"grpc-status"], dict(d.headers)[b"grpc-message"]),
                         (b"2", b"Payload Too Large"))
        self.assertEqual(h.stream.responseCodeDetails, "request_payload_too_large")

    def test_filterFailure(self) -> None:
        """
        A filter that raises is answered as gRPC UNKNOWN with the proxy's message.
        """
        class Broken(HTTPFilter):
            def requestHeaders(self, stream):
                raise RuntimeError("boom")

        h = FilterHarness(Broken())
        h.request(b"POST", b"/svc.Echo/Say", [GRPC_CT])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        fields = dict(h.downstream.headers)
        self.assertEqual((h.downstream.status, fields[b"grpc-status"], fields[b"grpc-message"]),
                         (200, b"2", b"internal error in a filter"))

    def test_afterResponseStartedResets(self) -> None:
        """
        A local reply once the response has started still resets the stream, gRPC or not.
        """
        h = FilterHarness()
        h.request(b"POST", b"/svc.Echo/Say", [GRPC_CT], end=False)
        h.stream.status = 200
        h.stream.responseHeaders = [GRPC_CT]
        h.stream.sendResponseHeaders()
        h.stream.respond(503, b"late")
        self.assertEqual(h.codec.resets, ["local_reply_after_response_started"])
        self.assertEqual((h.downstream.status, h.downstream.headers), (200, [GRPC_CT]))


class FilterRepliesTests(GRPCTestBase):
    """
    The built-in filters' and the router's local replies reach gRPC clients as gRPC, over HTTP/1.1 and
    HTTP/2.
    """

    def test_rbacDenied(self) -> None:
        """
        RBAC's 403 is PERMISSION_DENIED, over HTTP/2 in one HEADERS frame, counted as the 200 it is.
        """
        peer = self.h2("guarded")
        sid = self.h2call(peer, b"/forbidden/svc.Echo/Say", body=False)
        self.assertTrailersOnly(peer, sid, 7, b"RBAC: access denied")
        self.assertEqual(self.stat("http.guarded.downstream_rq_2xx"), 1)
        self.assertEqual(self.connects, [])

    def test_replyBeforeBodyInSameRead(self) -> None:
        """
        A reply made at the headers of a request whose body (and END_STREAM) came in the same read: the
        usual shape of a unary gRPC call.
        """
        peer = self.h2("guarded")
        sid = self.h2call(peer, b"/forbidden/svc.Echo/Say")
        self.assertTrailersOnly(peer, sid, 7, b"RBAC: access denied")
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_rbacDeniedHTTP1(self) -> None:
        """
        The same over HTTP/1.1: 200 with an empty body; the details are still RBAC's.
        """
        client = self.call(b"/forbidden/svc.Echo/Say", listener="guarded")
        self.assertGRPCReply(client, 7, b"RBAC: access denied")
        self.assertEqual(client.stream.responseCodeDetails, "rbac_access_denied_matched_policy[forbidden]")

    def test_faultHTTPAbort(self) -> None:
        """
        A fault abort with an HTTP status is gRPC-shaped with the mapped status; flag FI stays.
        """
        peer = self.h2("guarded")
        sid = self.h2call(peer, b"/svc.Echo/Say", [(b"x-envoy-fault-abort-request", b"503")], body=False)
        self.assertTrailersOnly(peer, sid, 14, b"fault filter abort")

    def test_faultGRPCAbort(self) -> None:
        """
        A fault abort with a gRPC status (the shared helper) keeps that status.
        """
        client = self.call(b"/svc.Echo/Say", b"x-envoy-fault-abort-grpc-request: 8\r\n", listener="guarded")
        self.assertGRPCReply(client, 8, b"fault filter abort")
        self.assertEqual(client.stream.responseFlags, ["FI"])

    def test_rateLimited(self) -> None:
        """
        A local rate limit's 429 is UNAVAILABLE.
        """
        peer = self.h2("limited")
        peer.request(head(b"/hello"))
        sid = self.h2call(peer, b"/svc.Echo/Say", body=False)
        self.assertTrailersOnly(peer, sid, 14, b"local_rate_limited")

    def test_routeNotFound(self) -> None:
        """
        No route is UNIMPLEMENTED (the body is empty: no grpc-message), flag NR.
        """
        peer = self.h2("strict")
        sid = self.h2call(peer, b"/svc.Echo/Say", body=False)
        self.assertTrailersOnly(peer, sid, 12, None)

    def test_connectFailure(self) -> None:
        """
        A connect failure is UNAVAILABLE with Envoy's message; flag UF and its details stay.
        """
        client = self.call(b"/svc.Echo/Say")
        self.refuse()
        self.assertGRPCReply(client, 14, b"upstream connect error or disconnect/reset before headers. "
                                         b"reset reason: connection failure")
        self.assertEqual(client.stream.responseFlags, ["UF"])
        self.assertEqual(client.stream.responseCodeDetails,
                         "upstream_reset_before_response_started{connection_failure}")
        self.assertEqual(client.stream.status, 200)

    def test_plainRequestUnaffected(self) -> None:
        """
        A request that is not gRPC still gets the plain 503.
        """
        client = self.call(b"/svc.Echo/Say", grpcRequest=False)
        self.refuse()
        r = client.response()
        self.assertEqual((r.status, r.header(b"content-type")), (503, b"text/plain"))
        self.assertIsNone(r.header(b"grpc-status"))


# -- grpc-timeout and DEADLINE_EXCEEDED


class DeadlineTests(GRPCTestBase):
    """
    A gRPC request's C{grpc-timeout} is its timeout, capped by the route's; a timeout answers
    DEADLINE_EXCEEDED.
    """

    def timerDelay(self, client: Client) -> Optional[float]:
        """
        How long the router's request timer has left, or C{None} without one.
        """
        timer = client.router.timer
        return None if timer is None else timer.getTime() - self.clock.seconds()

    def test_deadlineShorterThanRoute(self) -> None:
        """
        A 100 ms deadline under a 1 s route: the timer is 100 ms, and when it fires the client gets
        DEADLINE_EXCEEDED with flag UT and details upstream_response_timeout; the header goes upstream
        as it came.
        """
        client = self.call(b"/quick/svc.Echo/Say", b"grpc-timeout: 100m\r\n")
        conn, upT = self.connect()
        self.assertIn(b"\r\ngrpc-timeout: 100m\r\n", upT.value())
        self.assertEqual(self.timerDelay(client), 0.1)
        self.clock.advance(0.05)
        self.assertEqual(client.transport.value(), b"")
        self.clock.advance(0.05)
        self.assertGRPCReply(client, 4, b"upstream request timeout")
        self.assertEqual(client.stream.responseFlags, ["UT"])
        self.assertEqual(client.stream.responseCodeDetails, "upstream_response_timeout")
        self.assertEqual(self.cstat("upstream_rq_timeout"), 1)
        self.assertAbandoned(conn, upT)

    def test_cappedByRoute(self) -> None:
        """
        A 5 s deadline under a 1 s route gets 1 s, and the upstream is told 1000m.
        """
        client = self.call(b"/quick/svc.Echo/Say", b"grpc-timeout: 5S\r\n")
        conn, upT = self.connect()
        self.assertEqual(self.timerDelay(client), 1.0)
        self.assertIn(b"\r\ngrpc-timeout: 1000m\r\n", upT.value())
        self.assertNotIn(b"5S", upT.value())
        self.clock.advance(1)
        self.assertGRPCReply(client, 4, b"upstream request timeout")

    def test_noCapWithoutRouteTimeout(self) -> None:
        """
        With C{timeout = 0} the deadline alone bounds the request, however long, in every unit.
        """
        for value, seconds in ((b"2H", 7200.0), (b"3M", 180.0), (b"4S", 4.0), (b"250m", 0.25),
                               (b"500u", 0.0005), (b"100n", 1e-7)):
            client = self.call(b"/nocap/svc.Echo/Say", b"grpc-timeout: %s\r\n" % value)
            self.assertAlmostEqual(self.timerDelay(client), seconds, places=12, msg=value)
        client = self.call(b"/nocap/svc.Echo/Say")
        self.assertIsNone(self.timerDelay(client))

    def test_malformedIgnored(self) -> None:
        """
        A malformed (or zero) grpc-timeout leaves the route's timeout in charge, and goes upstream untouched.
        """
        for value in (b"abc", b"123456789m", b"10x", b"5", b"0S", b"1.5S"):
            client = self.call(b"/quick/svc.Echo/Say", b"grpc-timeout: %s\r\n" % value)
            self.assertEqual(self.timerDelay(client), 1.0, value)
        conn, upT = self.connect(0)
        self.assertIn(b"\r\ngrpc-timeout: abc\r\n", upT.value())

    def test_notGRPCIgnored(self) -> None:
        """
        A grpc-timeout on a request that is not gRPC is just a header: the route's timeout and a plain 504.
        """
        client = self.call(b"/quick/x", b"grpc-timeout: 100m\r\n", grpcRequest=False)
        self.connect()
        self.assertEqual(self.timerDelay(client), 1.0)
        self.clock.advance(1)
        r = client.response()
        self.assertEqual((r.status, r.body), (504, b"upstream request timeout\n"))

    def test_routeTimeoutIsDeadlineExceeded(self) -> None:
        """
        Without a grpc-timeout, the route's own timeout also answers DEADLINE_EXCEEDED (not the
        UNAVAILABLE a 504 maps to, which would invite the client to retry).
        """
        client = self.call(b"/quick/svc.Echo/Say")
        self.connect()
        self.clock.advance(1)
        self.assertGRPCReply(client, 4, b"upstream request timeout")

    def test_perTryTimeout(self) -> None:
        """
        A per-try timeout that cannot be retried answers DEADLINE_EXCEEDED, details upstream_per_try_timeout.
        """
        client = self.call(b"/try/svc.Echo/Say")
        self.connect()
        self.clock.advance(0.5)
        self.assertGRPCReply(client, 4, b"upstream request timeout")
        self.assertEqual(client.stream.responseCodeDetails, "upstream_per_try_timeout")

    def test_deadlineOverHTTP2(self) -> None:
        """
        Over HTTP/2 the deadline's reply is a HEADERS frame ending the stream.
        """
        peer = self.h2()
        sid = self.h2call(peer, b"/quick/svc.Echo/Say", [(b"grpc-timeout", b"20m")])
        self.connect()
        self.clock.advance(0.02)
        peer.pump()
        self.assertTrailersOnly(peer, sid, 4, b"upstream request timeout")

    def test_timeoutAfterResponseStartedResets(self) -> None:
        """
        A deadline that passes once the response has started resets the HTTP/2 stream (the client sees
        an error, never a call that looks complete).
        """
        peer = self.h2()
        sid = self.h2call(peer, b"/quick/svc.Echo/Say", [(b"grpc-timeout", b"20m")])
        conn, _ = self.connect()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ntransfer-encoding: chunked\r\n"
                          b"\r\na\r\n\x00\x00\x00\x00\x05hello\r\n")
        peer.pump()
        self.clock.advance(0.02)
        peer.pump()
        r = peer.responses[sid]
        self.assertEqual((r.status, r.data, r.reset), (200, FRAME, ErrorCodes.INTERNAL_ERROR))
        self.assertEqual(self.hstat("downstream_rq_tx_reset"), 1)
        self.assertEqual(self.cstat("upstream_rq_timeout"), 1)


# -- retry.grpc_on


class GRPCRetryTests(GRPCTestBase):
    """
    C{retry.grpc_on} retries on the grpc-status of a trailers-only response.
    """

    def test_retriedThenSuccess(self) -> None:
        """
        UNAVAILABLE in the headers from host A is retried on host B, whose answer reaches the client.
        """
        client = self.call(b"/retry/svc.Echo/Say")
        connA, tA = self.connect()
        connA.dataReceived(trailersOnly(14, b"draining"))
        self.assertEqual(client.transport.value(), b"")
        self.assertEqual(self.cstat("upstream_rq_retry"), 1)
        self.clock.advance(self.backoffDelay(client.router))
        self.assertIs(self.hostOf(-1), self.cluster.hosts[1])
        connB, tB = self.connect()
        self.assertTrue(tB.value().endswith(FRAME), "the request body was not replayed")
        connB.dataReceived(trailersOnly(0))
        r = client.response()
        self.assertEqual((r.status, r.header(b"grpc-status")), (200, b"0"))
        self.assertNotIn("URX", client.stream.responseFlags)

    def test_cancelledRetried(self) -> None:
        """
        Each listed name retries its status: C{cancelled} is 1.
        """
        client = self.call(b"/retry/svc.Echo/Say")
        self.connect()[0].dataReceived(trailersOnly(1))
        self.assertEqual(self.cstat("upstream_rq_retry"), 1)
        self.clock.advance(self.backoffDelay(client.router))
        self.connect()[0].dataReceived(trailersOnly(0))
        self.assertEqual(client.response().header(b"grpc-status"), b"0")

    def test_unlistedStatusForwarded(self) -> None:
        """
        A status the route does not list (INTERNAL here) is the client's answer at once.
        """
        client = self.call(b"/retry/svc.Echo/Say")
        self.connect()[0].dataReceived(trailersOnly(13, b"bug"))
        r = client.response()
        self.assertEqual((r.header(b"grpc-status"), r.header(b"grpc-message")), (b"13", b"bug"))
        self.assertEqual(self.cstat("upstream_rq_retry"), 0)

    def test_exhausted(self) -> None:
        """
        When the retries run out, the last answer is forwarded with flag URX.
        """
        client = self.call(b"/retry/svc.Echo/Say")
        self.connect()[0].dataReceived(trailersOnly(14, b"first"))
        self.clock.advance(self.backoffDelay(client.router))
        self.connect()[0].dataReceived(trailersOnly(14, b"second"))
        r = client.response()
        self.assertEqual((r.header(b"grpc-status"), r.header(b"grpc-message")), (b"14", b"second"))
        self.assertIn("URX", client.stream.responseFlags)
        self.assertEqual(len(self.connects), 2)

    def test_statusInTrailersNotRetried(self) -> None:
        """
        A status that comes in trailers, after the response started, cannot be retried.
        """
        client = self.call(b"/retry/svc.Echo/Say")
        self.connect()[0].dataReceived(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ntransfer-encoding: chunked\r\n\r\n"
            b"0\r\ngrpc-status: 14\r\n\r\n")
        self.assertEqual(self.cstat("upstream_rq_retry"), 0)
        sent = client.transport.value()
        self.assertTrue(sent.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertTrue(sent.endswith(b"0\r\ngrpc-status: 14\r\n\r\n"))
        self.assertEqual(len(self.connects), 1)

    def test_httpStatusNotRetriedByGRPCOn(self) -> None:
        """
        C{retry.grpc_on} alone does not retry HTTP failures (that is C{retry.on}'s job).
        """
        client = self.call(b"/retry/svc.Echo/Say")
        self.connect()[0].dataReceived(ok(b"", b"503 Service Unavailable"))
        self.assertEqual(self.cstat("upstream_rq_retry"), 0)
        self.assertEqual(client.response().status, 503)

    def test_routeWithoutGRPCOn(self) -> None:
        """
        A route without C{retry.grpc_on} forwards UNAVAILABLE as it is.
        """
        client = self.call(b"/svc.Echo/Say")
        self.connect()[0].dataReceived(trailersOnly(14))
        self.assertEqual(client.response().header(b"grpc-status"), b"14")
        self.assertEqual(self.cstat("upstream_rq_retry"), 0)


class GRPCRetryConfigTests(SynchronousTestCase):
    """
    C{retry.grpc_on} is checked like C{retry.on}.
    """

    def test_parsed(self) -> None:
        """
        Names are kept in order, once each; C{retry.num} needs no C{retry.on} beside them.
        """
        config, errors = parse({"cluster": "api", "retry.grpc_on": "unavailable, deadline-exceeded, unavailable",
                                "retry.num": "3"})
        self.assertEqual(errors, [])
        self.assertEqual(config.retry, RetryPolicy(num=3, grpc_on=("unavailable", "deadline-exceeded")))

    def test_badName(self) -> None:
        """
        An unknown name is an error naming the choices, with a did-you-mean.
        """
        config, errors = parse({"cluster": "api", "retry.grpc_on": "unavailble, resource_exhausted"})
        self.assertEqual(errors, [
            "retry.grpc_on: 'unavailble' is not one of cancelled, deadline-exceeded, internal, resource-exhausted, "
            "unavailable (did you mean `unavailable`?)",
            "retry.grpc_on: 'resource_exhausted' is not one of cancelled, deadline-exceeded, internal, "
            "resource-exhausted, unavailable (did you mean `resource-exhausted`?)"])

    def test_onlyForForwardingRoutes(self) -> None:
        """
        A route that does not forward cannot retry.
        """
        config, errors = parse({"direct_response.status": "200", "retry.grpc_on": "unavailable"})
        self.assertIn("retry.grpc_on: only applies to a route with cluster or clusters, not with "
                      "direct_response.status", errors)


# -- integration: a real gRPC client and server through the proxy


try:
    import grpc as grpcio
except ImportError:  # the test extra is not installed
    grpcio = None

SERVICE = "test.Echo"
_CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]  # never through an HTTP proxy from the environment
_CALL_TIMEOUT = 20.0  # every client call's own deadline: a hung proxy fails the test instead of hanging it


class EchoServicer:
    """
    The handlers of the test's gRPC server (bytes in, bytes out: no generated code). They run on the
    server's thread pool; C{release} lets C{Slow} and C{Stall} go when the test ends.
    """

    def __init__(self) -> None:
        import threading
        self.release = threading.Event()
        self.failFirst = 0  # RetryOnce answers UNAVAILABLE this many times first
        self.calls: List[str] = []

    def handler(self):
        """
        The generic handler for L{SERVICE}.
        """
        g = grpcio
        return g.method_handlers_generic_handler(SERVICE, {
            "Say": g.unary_unary_rpc_method_handler(self.say),
            "Count": g.unary_stream_rpc_method_handler(self.count),
            "Join": g.stream_unary_rpc_method_handler(self.join),
            "Chat": g.stream_stream_rpc_method_handler(self.chat),
            "Fail": g.unary_unary_rpc_method_handler(self.fail),
            "Slow": g.unary_unary_rpc_method_handler(self.slow),
            "Stall": g.unary_stream_rpc_method_handler(self.stall),
            "Flaky": g.unary_unary_rpc_method_handler(self.flaky),
            "Remaining": g.unary_unary_rpc_method_handler(self.remaining),
        })

    def say(self, request: bytes, context) -> bytes:
        self.calls.append("Say")
        return b"echo:" + request

    def count(self, request: bytes, context):
        for i in range(int(request)):
            yield b"%d" % i

    def join(self, requests, context) -> bytes:
        return b"|".join(requests)

    def chat(self, requests, context):
        for request in requests:
            yield b"re:" + request

    def fail(self, request: bytes, context) -> bytes:
        context.abort(grpcio.StatusCode.RESOURCE_EXHAUSTED, "quota: 100% used ✓")

    def slow(self, request: bytes, context) -> bytes:
        self.release.wait(10)
        return b"late"

    def stall(self, request: bytes, context):
        yield b"first"
        self.release.wait(10)
        yield b"never seen"

    def remaining(self, request: bytes, context) -> bytes:
        return b"%f" % context.time_remaining()

    def flaky(self, request: bytes, context) -> bytes:
        self.calls.append("Flaky")
        if self.failFirst:
            self.failFirst -= 1
            context.abort(grpcio.StatusCode.UNAVAILABLE, "warming up")
        return b"ok"


def _unary(channel, method: str):
    return channel.unary_unary(f"/{SERVICE}/{method}")


class IntegrationTests(unittest.TestCase):
    """
    grpcio's client and server on loopback, the proxy between them: an h2c listener, and a cluster with
    C{protocol = http2} to the server. Client calls block, so they run in threads (deferToThread), never
    on the reactor.
    """

    if grpcio is None:
        skip = "grpcio is not installed (pip install grpcio, or the project's test extra)"

    @defer.inlineCallbacks
    def setUp(self):
        from concurrent import futures

        self.servicer = EchoServicer()
        self.server = grpcio.server(futures.ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers((self.servicer.handler(),))
        serverPort = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.addCleanup(self.stopServer)
        self.proxy = startService(self, f"""
[mesh]
admin = off
[listener:edge]
endpoint = tcp:0:interface=127.0.0.1
protocol = http
filters = deny, router
routes = main
[filter:deny]
type = rbac
action = DENY
policy.secret.principals = any
policy.secret.permissions = path:prefix:/test.Secret/
[route:main/slow]
path = /{SERVICE}/Slow
cluster = grpc
timeout = 200ms
[route:main/capped]
path = /{SERVICE}/Remaining
cluster = grpc
timeout = 5s
[route:main/flaky]
path = /{SERVICE}/Flaky
cluster = grpc
retry.grpc_on = unavailable
retry.num = 2
[route:main/down]
prefix = /test.Down/
cluster = down
[route:main/echo]
prefix = /{SERVICE}/
cluster = grpc
timeout = 0
[cluster:grpc]
endpoints = tcp:127.0.0.1:{serverPort}
protocol = http2
[cluster:down]
endpoints = tcp:127.0.0.1:{freePort()}
protocol = http2
connect_timeout = 2s
""", stop=stopProxy)
        yield self.proxy.whenLive
        port = self.proxy.listeners["edge"].port.getHost().port
        self.channel = grpcio.insecure_channel(f"127.0.0.1:{port}", options=_CHANNEL_OPTIONS)
        self.addCleanup(threads.deferToThread, self.channel.close)

    @defer.inlineCallbacks
    def stopServer(self):
        self.servicer.release.set()
        yield threads.deferToThread(self.server.stop(0).wait, 10)

    def stat(self, name: str) -> int:
        return self.proxy.stats.get(name).value

    def inThread(self, f, *args, **kwargs):
        """
        Run a blocking client call off the reactor: C{f(*args, **kwargs)}'s result, or the
        C{grpc.RpcError} it raised as C{(code, details)}.
        """
        def run():
            try:
                return f(*args, **kwargs)
            except grpcio.RpcError as e:
                return (e.code(), e.details())
        return threads.deferToThread(run)

    @defer.inlineCallbacks
    def test_unary(self):
        """
        A unary call goes through: the answer and an OK status; the upstream leg is HTTP/2.
        """
        answer = yield self.inThread(_unary(self.channel, "Say"), b"hi", timeout=_CALL_TIMEOUT)
        self.assertEqual(answer, b"echo:hi")
        self.assertEqual(self.stat("cluster.grpc.upstream_cx_http2_total"), 1)
        self.assertEqual(self.stat("cluster.grpc.upstream_rq_2xx"), 1)

    @defer.inlineCallbacks
    def test_serverStreaming(self):
        """
        A server-streaming call gets every message, in order.
        """
        call = self.channel.unary_stream(f"/{SERVICE}/Count")
        answer = yield self.inThread(lambda: list(call(b"50", timeout=_CALL_TIMEOUT)))
        self.assertEqual(answer, [b"%d" % i for i in range(50)])

    @defer.inlineCallbacks
    def test_clientStreaming(self):
        """
        A client-streaming call delivers every message to the server.
        """
        call = self.channel.stream_unary(f"/{SERVICE}/Join")
        answer = yield self.inThread(call, iter([b"a", b"bb", b"c" * 70000]), timeout=_CALL_TIMEOUT)
        self.assertEqual(answer, b"a|bb|" + b"c" * 70000)

    @defer.inlineCallbacks
    def test_bidi(self):
        """
        A bidirectional call: each message answered while the stream stays open.
        """
        call = self.channel.stream_stream(f"/{SERVICE}/Chat")

        def chat():
            import queue

            outbox: "queue.Queue" = queue.Queue()
            responses = call(iter(outbox.get, None), timeout=_CALL_TIMEOUT)
            seen = []
            for word in (b"one", b"two", b"three"):
                outbox.put(word)
                seen.append(next(responses))  # answered before the next message is even sent
            outbox.put(None)
            seen.extend(responses)
            return seen

        answer = yield self.inThread(chat)
        self.assertEqual(answer, [b"re:one", b"re:two", b"re:three"])

    @defer.inlineCallbacks
    def test_errorStatus(self):
        """
        The server's error status and its (percent-encoded, non-ASCII) message reach the client intact.
        """
        answer = yield self.inThread(_unary(self.channel, "Fail"), b"", timeout=_CALL_TIMEOUT)
        self.assertEqual(answer, (grpcio.StatusCode.RESOURCE_EXHAUSTED, "quota: 100% used ✓"))

    @defer.inlineCallbacks
    def test_deadlineInProxy(self):
        """
        A route timeout shorter than the server's delay: the proxy answers DEADLINE_EXCEEDED with its
        message. (The client sets no deadline, so nobody else could have.)
        """
        answer = yield self.inThread(_unary(self.channel, "Slow"), b"")
        self.assertEqual(answer, (grpcio.StatusCode.DEADLINE_EXCEEDED, "upstream request timeout"))
        self.assertEqual(self.stat("cluster.grpc.upstream_rq_timeout"), 1)

    @defer.inlineCallbacks
    def test_deadlineCapped(self):
        """
        A client deadline longer than the route's timeout reaches the server as the route's: the server
        has at most 5 seconds left, not 20.
        """
        answer = yield self.inThread(_unary(self.channel, "Remaining"), b"", timeout=_CALL_TIMEOUT)
        self.assertTrue(0 < float(answer) <= 5.0, answer)

    @defer.inlineCallbacks
    def test_serverDiesMidStream(self):
        """
        A server that goes away after the first message of a stream: the client gets that message and
        then an error, never a clean end.
        """
        call = self.channel.unary_stream(f"/{SERVICE}/Stall")

        def run():
            responses = call(b"", timeout=_CALL_TIMEOUT)
            first = next(responses)
            self.server.stop(0)
            try:
                rest = list(responses)
            except grpcio.RpcError as e:
                return first, e.code()
            return first, rest

        first, outcome = yield threads.deferToThread(run)
        self.assertEqual(first, b"first")
        self.assertIsInstance(outcome, grpcio.StatusCode)
        self.assertNotEqual(outcome, grpcio.StatusCode.OK)

    @defer.inlineCallbacks
    def test_retryOnUnavailable(self):
        """
        C{retry.grpc_on = unavailable}: two UNAVAILABLE answers are retried, the third call succeeds.
        """
        self.servicer.failFirst = 2
        answer = yield self.inThread(_unary(self.channel, "Flaky"), b"", timeout=_CALL_TIMEOUT)
        self.assertEqual(answer, b"ok")
        self.assertEqual(self.servicer.calls, ["Flaky"] * 3)
        self.assertEqual(self.stat("cluster.grpc.upstream_rq_retry"), 2)

    @defer.inlineCallbacks
    def test_localReplies(self):
        """
        The proxy's own answers are real gRPC statuses to a real client: RBAC's PERMISSION_DENIED, no
        route's UNIMPLEMENTED, an unreachable cluster's UNAVAILABLE.
        """
        denied = yield self.inThread(self.channel.unary_unary("/test.Secret/Get"), b"", timeout=_CALL_TIMEOUT)
        self.assertEqual(denied, (grpcio.StatusCode.PERMISSION_DENIED, "RBAC: access denied"))
        missing = yield self.inThread(self.channel.unary_unary("/test.Other/Get"), b"", timeout=_CALL_TIMEOUT)
        self.assertEqual(missing[0], grpcio.StatusCode.UNIMPLEMENTED)
        down = yield self.inThread(self.channel.unary_unary("/test.Down/Get"), b"", timeout=_CALL_TIMEOUT)
        self.assertEqual(down[0], grpcio.StatusCode.UNAVAILABLE)
        self.assertIn("connection failure", down[1])
