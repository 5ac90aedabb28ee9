"""
Tests for L{twistedmesh.filters.ext_authz} (the C{ext_authz} filter).

Unit tests drive the filter through L{FilterHarness} with a L{FakeRequester} (the authorization service's
answers under the test's control) and a L{Clock}: allow, deny, headers both ways, the timeout, errors,
C{failure_mode_allow}, C{status_on_error}, config errors. Then a real loopback setup: a twisted.web
authorization service, a proxy with C{filters = authz, router} and the built-in echo upstream.
"""

from __future__ import annotations

import random
from typing import Dict, List, Optional, Tuple

import treq
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest
from twisted.web import resource, server

from twistedmesh.config import ConfigError, ListenerConfig, Options
from twistedmesh.filters.ext_authz import ExtAuthzFactory, ExtAuthzFilter, TreqRequester
from twistedmesh.observability.stats import StatsStore
from twistedmesh.plugins import FilterContext
from twistedmesh.service import MeshService
from twistedmesh.testing import FilterHarness

from .support import FilterPluginTests, edgeConfig, freePort, port, startEcho, startService, stopProxy

URI = {"uri": "http://authz.local:9000/authz"}
STATS = ("ok", "denied", "error", "failure_mode_allowed")


class FakeRequester:
    """
    Stands in for L{TreqRequester}: records each call and hands back a Deferred the test fires.

    @ivar calls: C{(method, url, headers, deferred)} per request.
    @ivar now: when set, an outcome (an answer tuple or an exception) returned already fired.
    """

    def __init__(self) -> None:
        self.calls: List[Tuple[bytes, bytes, list, Deferred]] = []
        self.cancelled = 0
        self.now: Optional[object] = None

    def __call__(self, method: bytes, url: bytes, headers: list) -> Deferred:
        if isinstance(self.now, Exception):
            d = fail(self.now)
        elif self.now is not None:
            d = succeed(self.now)
        else:
            d = Deferred(lambda _: self._cancelled())
        self.calls.append((method, url, list(headers), d))
        return d

    def _cancelled(self) -> None:
        self.cancelled += 1

    def answer(self, status: int, headers=(), body: bytes = b"") -> None:
        """
        Answer the last request.
        """
        self.calls[-1][3].callback((status, list(headers), body))


def makeContext(clock) -> FilterContext:
    """
    The context the service would pass for an HTTP listener named C{edge}, on C{clock}.
    """
    listener = ListenerConfig("edge", "tcp:0", "http", ("authz", "router"))
    return FilterContext(clock, StatsStore(), {}, listener, random.Random(1))


def configure(items: Dict[str, str], clock=None, requester=None
              ) -> Tuple[ExtAuthzFilter, List[ConfigError], FilterContext]:
    """
    Configure the plugin with C{items} as a C{[filter:authz]} section (unknown-key check included), with
    C{requester} in place of treq; return the shared filter, the errors and the context.
    """
    errors: List[ConfigError] = []
    options = Options("t.ini", "filter:authz", items, errors)
    context = makeContext(clock if clock is not None else Clock())
    fake = requester if requester is not None else FakeRequester()
    maker = ExtAuthzFactory(lambda reactor: fake).configure(options, context)
    options.finish()
    return maker(None), errors, context


def whys(errors: List[ConfigError]) -> List[Tuple[Optional[str], str]]:
    """
    The errors as C{(key, why)} pairs.
    """
    return [(e.key, e.why) for e in errors]


def stats(context: FilterContext, prefix: str = "ext_authz") -> Tuple[int, ...]:
    """
    The values of C{ok}, C{denied}, C{error} and C{failure_mode_allowed}.
    """
    return tuple(context.stats.get(f"http.edge.{prefix}.{name}").value for name in STATS)


class FakeCase(unittest.TestCase):
    """
    A filter configured with C{URI} (plus the test's options) that talks to a L{FakeRequester}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.authz = FakeRequester()

    def filter(self, **extra: str) -> ExtAuthzFilter:
        """
        The filter for C{URI} and C{extra}; must be valid.
        """
        filt, errors, self.context = configure(dict(URI, **extra), self.clock, self.authz)
        self.assertEqual(errors, [])
        return filt

    def start(self, filt: ExtAuthzFilter, headers=((b"authorization", b"Bearer good"),), method: bytes = b"GET",
              path: bytes = b"/orders/7?full=1") -> FilterHarness:
        """
        Start one request through C{filt}, without answering the authorization request.
        """
        h = FilterHarness(filt, clock=self.clock)
        h.request(method, path, list(headers))
        return h


class DecisionTests(FakeCase):
    """
    2xx allows, anything else is the client's answer.
    """

    def test_request(self):
        """
        The service gets the client's method, C{uri} plus the request target, and only the allowed headers.
        """
        filt = self.filter()
        self.start(filt, method=b"DELETE", headers=[(b"authorization", b"Bearer good"), (b"x-other", b"1"),
                                                    (b"cookie", b"a=1"), (b"cookie", b"b=2")])
        method, url, headers, _ = self.authz.calls[0]
        self.assertEqual((method, url), (b"DELETE", b"http://authz.local:9000/authz/orders/7?full=1"))
        self.assertEqual(headers, [(b"authorization", b"Bearer good"), (b"cookie", b"a=1"), (b"cookie", b"b=2")])

    def test_allowed(self):
        """
        A 200 lets the held request go on; C{ok} counts it.
        """
        filt = self.filter()
        h = self.start(filt)
        self.assertTrue(h.paused)
        self.assertIsNone(h.upstream.method)
        self.authz.answer(200)
        self.assertFalse(h.paused)
        self.assertEqual(h.upstream.path, b"/orders/7?full=1")
        self.assertEqual(stats(self.context), (1, 0, 0, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_any2xx(self):
        """
        Any 2xx status allows.
        """
        filt = self.filter()
        h = self.start(filt)
        self.authz.answer(204)
        self.assertEqual(h.upstream.method, b"GET")

    def test_upstreamHeaders(self):
        """
        The answer's C{allowed_upstream_headers} replace the client's own; other answer headers are dropped.
        """
        filt = self.filter(allowed_upstream_headers="x-user-id, x-roles")
        h = self.start(filt, headers=[(b"x-user-id", b"forged"), (b"authorization", b"Bearer good")])
        self.authz.answer(200, [(b"x-user-id", b"42"), (b"x-roles", b"a"), (b"x-roles", b"b"), (b"x-secret", b"s")])
        self.assertEqual(h.upstream.headers, [(b"authorization", b"Bearer good"), (b"x-user-id", b"42"),
                                              (b"x-roles", b"a"), (b"x-roles", b"b")])

    def test_denied(self):
        """
        A 401 is the client's answer, with the service's body and headers, flag C{UAEX}; the upstream sees
        nothing.
        """
        filt = self.filter()
        h = self.start(filt)
        self.authz.answer(401, [(b"www-authenticate", b'Bearer realm="x"'), (b"content-length", b"7"),
                                (b"connection", b"close"), (b"x-reason", b"expired")], b"go away")
        self.assertEqual((h.downstream.status, h.downstream.body), (401, b"go away"))
        self.assertEqual(h.downstream.headers, [(b"www-authenticate", b'Bearer realm="x"'),
                                                (b"x-reason", b"expired"), (b"content-type", b"text/plain"),
                                                (b"content-length", b"7")])
        self.assertEqual((h.stream.responseFlags, h.stream.responseCodeDetails), (["UAEX"], "ext_authz_denied"))
        self.assertIsNone(h.upstream.method)
        self.assertTrue(h.completed)
        self.assertEqual(stats(self.context), (0, 1, 0, 0))

    def test_clientHeaders(self):
        """
        With C{allowed_client_headers}, only those (plus www-authenticate and location) reach the client.
        """
        filt = self.filter(allowed_client_headers="x-reason, content-type")
        h = self.start(filt)
        self.authz.answer(302, [(b"location", b"/login"), (b"x-reason", b"r"), (b"x-secret", b"s"),
                                (b"content-type", b"text/html")])
        self.assertEqual(h.downstream.status, 302)
        self.assertEqual(h.downstream.headers, [(b"location", b"/login"), (b"x-reason", b"r"),
                                                (b"content-type", b"text/html"), (b"content-length", b"0")])

    def test_serverErrorDenies(self):
        """
        A 5xx from the service is a denial with that status, not an error.
        """
        filt = self.filter(failure_mode_allow="true")
        h = self.start(filt)
        self.authz.answer(503, body=b"busy")
        self.assertEqual((h.downstream.status, h.downstream.body), (503, b"busy"))
        self.assertEqual(stats(self.context), (0, 1, 0, 0))

    def test_answeredAtOnce(self):
        """
        A requester that has already answered decides without pausing the stream.
        """
        filt = self.filter()
        self.authz.now = (403, [], b"no")
        h = self.start(filt)
        self.assertEqual(h.downstream.status, 403)
        self.assertEqual((h.codec.paused, self.clock.getDelayedCalls()), (0, []))

    def test_sharedAcrossStreams(self):
        """
        The maker hands every stream the same filter.
        """
        maker = ExtAuthzFactory(lambda reactor: self.authz).configure(
            Options("t.ini", "filter:authz", dict(URI), []), makeContext(self.clock))
        self.assertIs(maker(object()), maker(object()))


class FailureTests(FakeCase):
    """
    No answer: C{status_on_error} (403), or the request goes on with C{failure_mode_allow}.
    """

    def test_timeout(self):
        """
        No answer within 200ms: 403 with C{UAEX}/C{ext_authz_error}; the request to the service is cancelled.
        """
        filt = self.filter()
        h = self.start(filt)
        self.clock.advance(0.199)
        self.assertTrue(h.paused)
        self.clock.advance(0.001)
        self.assertEqual(h.downstream.status, 403)
        self.assertEqual((h.stream.responseFlags, h.stream.responseCodeDetails), (["UAEX"], "ext_authz_error"))
        self.assertEqual(self.authz.cancelled, 1)
        self.assertEqual(stats(self.context), (0, 0, 1, 0))

    def test_timeoutOption(self):
        """
        C{timeout} sets how long a request waits.
        """
        filt = self.filter(timeout="1s")
        h = self.start(filt)
        self.clock.advance(0.9)
        self.authz.answer(200)
        self.assertEqual(h.upstream.method, b"GET")
        self.assertEqual(self.authz.cancelled, 0)

    def test_refused(self):
        """
        A failed request (the service is down) is an error: 403.
        """
        filt = self.filter()
        h = self.start(filt)
        self.authz.calls[0][3].errback(ConnectionRefusedError())
        self.assertEqual(h.downstream.status, 403)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(stats(self.context), (0, 0, 1, 0))

    def test_failedAtOnce(self):
        """
        A requester that fails synchronously is an error too.
        """
        filt = self.filter()
        self.authz.now = ConnectionRefusedError()
        h = self.start(filt)
        self.assertEqual(h.downstream.status, 403)

    def test_failureModeAllow(self):
        """
        With C{failure_mode_allow}, errors and timeouts let the request through; C{failure_mode_allowed}
        counts them.
        """
        filt = self.filter(failure_mode_allow="true")
        h = self.start(filt)
        self.clock.advance(0.2)
        self.assertEqual(h.upstream.method, b"GET")
        h2 = self.start(filt)
        self.authz.calls[-1][3].errback(ConnectionRefusedError())
        self.assertEqual(h2.upstream.method, b"GET")
        self.assertEqual(stats(self.context), (0, 0, 2, 2))

    def test_statusOnError(self):
        """
        C{status_on_error} sets the status of an error.
        """
        filt = self.filter(status_on_error="503")
        h = self.start(filt)
        self.clock.advance(0.2)
        self.assertEqual(h.downstream.status, 503)

    def test_streamGone(self):
        """
        A stream that ends while waiting stops the timer and cancels the request, without counting.
        """
        filt = self.filter()
        h = self.start(filt)
        h.stream.reset("client went away")
        self.assertEqual(self.authz.cancelled, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(stats(self.context), (0, 0, 0, 0))


class ConfigErrorTests(unittest.TestCase):
    """
    Bad options are errors naming the key.
    """

    def test_required(self):
        """
        C{uri} is required.
        """
        _, errors, _ = configure({})
        self.assertEqual(whys(errors), [("uri", "is required")])

    def test_badValues(self):
        """
        A bad uri, timeout, status, header name or stat prefix is reported.
        """
        _, errors, _ = configure({"uri": "ftp://x/", "timeout": "0", "status_on_error": "700",
                                  "allowed_headers": "authorization, bad name", "allowed_upstream_headers":
                                  "content-length", "allowed_client_headers": "transfer-encoding",
                                  "stat_prefix": "a.b", "failure_mode": "true"})
        self.assertEqual([key for key, _ in whys(errors)], [
            "uri", "timeout", "status_on_error", "allowed_headers", "allowed_upstream_headers",
            "allowed_client_headers", "stat_prefix", "failure_mode"])
        self.assertIn("did you mean", whys(errors)[-1][1])

    def test_defaults(self):
        """
        200ms, deny on error with 403, the default headers to send, none copied upstream; a trailing slash
        on C{uri} is dropped.
        """
        filt, errors, context = configure({"uri": "https://a.example/check/"})
        self.assertEqual(errors, [])
        self.assertEqual((filt.uri, filt.timeout, filt.failureModeAllow, filt.statusOnError),
                         (b"https://a.example/check", 0.2, False, 403))
        self.assertEqual(filt.allowedHeaders, {b"authorization", b"cookie", b"x-request-id"})
        self.assertEqual((filt.upstreamHeaders, filt.clientHeaders), (frozenset(), None))
        self.assertEqual(stats(context), (0, 0, 0, 0))

    def test_statPrefix(self):
        """
        C{stat_prefix} names the counters' scope.
        """
        _, errors, context = configure(dict(URI, stat_prefix="authn"))
        self.assertEqual(errors, [])
        self.assertEqual(stats(context, "authn"), (0, 0, 0, 0))


class PluginTests(FilterPluginTests, unittest.TestCase):
    """
    The filter is registered like any plugin, and its shipped example stays valid.
    """

    plugin, example = "ext_authz", "ext-authz.ini"

    def test_pool(self):
        """
        The default requester keeps one persistent pool per configured filter.
        """
        requester = TreqRequester(MemoryReactorClock())
        self.assertTrue(requester.pool.persistent)
        self.successResultOf(requester.close())


class AuthzResource(resource.Resource):
    """
    A toy authorization service: C{Authorization: Bearer good} is allowed (with C{x-user-id: 42}); anything
    else gets 401 with C{www-authenticate}. It records the paths and methods it is asked about.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: List[Tuple[bytes, bytes]] = []

    def render(self, request: server.Request) -> bytes:
        self.seen.append((request.method, request.uri))
        if request.getHeader(b"authorization") == b"Bearer good":
            request.setHeader(b"x-user-id", b"42")
            return b""
        request.setResponseCode(401)
        request.setHeader(b"www-authenticate", b'Bearer realm="mesh"')
        return b"who are you?\n"


class LoopbackTests(unittest.TestCase):
    """
    The filter on the real reactor, with treq, a twisted.web authorization service and an echo upstream.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.authz = AuthzResource()
        site = server.Site(self.authz)
        site.log = lambda request: None
        self.authzPort = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.authzPort.stopListening)
        self.echoPort = yield startEcho(self)

    @defer.inlineCallbacks
    def startProxy(self, authzPort: int, extra: str = ""):
        """
        A proxy whose listener C{edge} asks the service on C{authzPort}, then routes to the echo.
        """
        proxy = startService(self, edgeConfig(self.echoPort, "authz, router", f"""
[filter:authz]
type = ext_authz
uri = http://127.0.0.1:{authzPort}/authz
timeout = 2s
allowed_upstream_headers = x-user-id
{extra}
"""), stop=self.stopWithFilter)
        yield proxy.whenLive
        return proxy

    @defer.inlineCallbacks
    def stopWithFilter(self, proxy: MeshService):
        """
        Stop C{proxy} as L{stopProxy} does, then close the filter's pool to the service too.
        """
        yield stopProxy(proxy)
        yield proxy.listeners["edge"].factory.settings.makers[0](None).close()

    @defer.inlineCallbacks
    def get(self, proxy: MeshService, path: str, token: Optional[str] = None):
        """
        GET C{path} through C{proxy}; return C{(response, body)}.
        """
        url = f"http://127.0.0.1:{port(proxy.listeners['edge'])}{path}"
        headers = {"authorization": token} if token else {}
        response = yield treq.get(url, headers=headers, persistent=False)
        body = yield response.content()
        return response, body

    @defer.inlineCallbacks
    def test_allowedAndDenied(self):
        """
        A good token reaches the upstream with C{x-user-id: 42}; a bad one gets the service's 401 and
        www-authenticate; the service is asked about the method and path.
        """
        proxy = yield self.startProxy(self.authzPort.getHost().port)
        response, body = yield self.get(proxy, "/hello?x=1", "Bearer good")
        self.assertEqual(response.code, 200)
        self.assertIn(b"GET /hello?x=1 HTTP/1.1", body)
        self.assertIn(b"x-user-id: 42", body)
        response, body = yield self.get(proxy, "/hello", "Bearer bad")
        self.assertEqual((response.code, body), (401, b"who are you?\n"))
        self.assertEqual(response.headers.getRawHeaders(b"www-authenticate"), [b'Bearer realm="mesh"'])
        self.assertEqual(self.authz.seen, [(b"GET", b"/authz/hello?x=1"), (b"GET", b"/authz/hello")])
        counters = [proxy.stats.get(f"http.edge.ext_authz.{name}").value for name in STATS]
        self.assertEqual(counters, [1, 1, 0, 0])

    @defer.inlineCallbacks
    def test_serviceDown(self):
        """
        With nothing listening at C{uri}, requests get 403.
        """
        proxy = yield self.startProxy(freePort())
        response, body = yield self.get(proxy, "/hello", "Bearer good")
        self.assertEqual(response.code, 403)
        self.assertEqual(proxy.stats.get("http.edge.ext_authz.error").value, 1)

    @defer.inlineCallbacks
    def test_serviceDownFailureModeAllow(self):
        """
        With nothing listening and C{failure_mode_allow = true}, requests reach the upstream.
        """
        proxy = yield self.startProxy(freePort(), "failure_mode_allow = true")
        response, body = yield self.get(proxy, "/hello", "Bearer good")
        self.assertEqual(response.code, 200)
        self.assertNotIn(b"x-user-id", body)
        self.assertEqual(proxy.stats.get("http.edge.ext_authz.failure_mode_allowed").value, 1)
