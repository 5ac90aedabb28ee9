"""
One real request per outcome, through real sockets on loopback, and the access-log line each one leaves:
C{%RESPONSE_CODE%}, C{%RESPONSE_FLAGS%} and C{%RESPONSE_CODE_DETAILS%} as Envoy would log them. One proxy
configuration covers them all (L{CONFIG}): an HTTP listener with C{rbac}, C{local_ratelimit} and the
router, routes to a live origin, to a port nobody listens on, with a short timeout, and to a cluster whose
circuit breaker admits one request.
"""

from __future__ import annotations

import os
import re
from typing import List, Optional

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.trial import unittest
from twisted.web import resource, server

from twistedmesh.service import MeshService

from .support import Exchange, freePort, port, startService, waitFor

CONFIG = """
[mesh]
admin = tcp:0:interface=127.0.0.1
admin.allowed_hosts = outcomes.test
drain_timeout = 1s

[listener:edge]
endpoint = tcp:0:interface=127.0.0.1
protocol = http
filters = deny, limit, router
routes = main
access_log = {log}
access_log.format = %REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %UPSTREAM_CLUSTER%

[filter:deny]
type = rbac
action = DENY
policy.blocked.principals = any
policy.blocked.permissions = path:prefix:/denied

; Plenty for everyone, except one request per hour for each x-tenant value.
[filter:limit]
type = local_ratelimit
max_tokens = 1000
tokens_per_fill = 1000
fill_interval = 1s
descriptor.1.key = header:x-tenant
descriptor.1.max_tokens = 1
descriptor.1.tokens_per_fill = 1
descriptor.1.fill_interval = 1h

[route:main/ok]
prefix = /ok
cluster = origin

[route:main/slow]
prefix = /slow
cluster = origin
timeout = 200ms

[route:main/hang]
prefix = /hang
cluster = origin
timeout = 30s

[route:main/dead]
prefix = /dead
cluster = dead

[route:main/narrow]
prefix = /narrow
cluster = narrow
timeout = 30s

[cluster:origin]
endpoints = tcp:127.0.0.1:{origin}

[cluster:dead]
endpoints = tcp:127.0.0.1:{dead}
connect_timeout = 2s

[cluster:narrow]
endpoints = tcp:127.0.0.1:{origin}
breaker.max_requests = 1
"""


class Origin(resource.Resource):
    """
    The upstream: C{/ok...} answers 200 at once; any other path is held open (and reported to
    C{arrivals}) until the test or the proxy ends it.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.held: List[server.Request] = []
        self.arrivals: defer.DeferredQueue = defer.DeferredQueue()

    def render_GET(self, request: server.Request):
        if request.path.startswith(b"/ok"):
            return b"fine"
        self.held.append(request)
        request.notifyFinish().addErrback(lambda _: None)  # the proxy may hang up on it
        self.arrivals.put(request)
        return server.NOT_DONE_YET


class OutcomeTests(unittest.TestCase):
    """
    Each test sends the request that produces one outcome and checks the client's answer and the
    access-log line.
    """

    timeout = 20

    @defer.inlineCallbacks
    def setUp(self):
        self.origin = Origin()
        site = server.Site(self.origin)
        site.log = lambda request: None
        self.originPort = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(self.originPort.stopListening)
        self.logPath = os.path.abspath(self.mktemp())
        # The dead cluster's port: nothing listens there, connecting is refused.
        text = CONFIG.format(log=self.logPath, origin=self.originPort.getHost().port, dead=freePort())
        self.service = startService(self, text, seed=3, stop=self._stop)
        yield self.service.whenLive
        self.port = port(self.service.listeners["edge"])
        self.sink = self.service.accessLogSinks.get(self.logPath)

    @defer.inlineCallbacks
    def _stop(self, service: MeshService):
        for request in self.origin.held:
            if not request.finished and not request._disconnected:
                request.finish()
        yield service.stopService()
        # Let the upstream connections the pools closed finish closing before trial checks the reactor.
        yield deferLater(reactor, 0.02, lambda: None)

    def connect(self, path: str, headers: str = "", close: bool = True, port: Optional[int] = None) -> defer.Deferred:
        """
        Open a connection to the proxy (or to C{port}) and send C{GET path}; fires with the L{Exchange}.
        """
        head = f"GET {path} HTTP/1.1\r\nHost: outcomes.test\r\n{headers}"
        if close:
            head += "Connection: close\r\n"
        client = Exchange((head + "\r\n").encode())
        return connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port or self.port), client)

    @defer.inlineCallbacks
    def get(self, path: str, headers: str = "", port: Optional[int] = None):
        """
        C{GET path} on a connection of its own; fires with the whole raw answer.
        """
        client = yield self.connect(path, headers, port=port)
        answer = yield client.done
        return answer

    @defer.inlineCallbacks
    def logLine(self, path: str):
        """
        The access-log line of the request for C{path}, once the sink has written it (a request's line is
        logged when its stream completes, which for a disconnect is after the client's side closed).
        """
        for _ in range(200):  # bounded: the line is due within a few reactor turns
            yield self.sink.flush()
            with open(self.logPath) as f:
                lines = [line.rstrip("\n") for line in f if line.startswith(path + " ")]
            if lines:
                self.assertEqual(len(lines), 1, lines)
                return lines[0]
            yield deferLater(reactor, 0.01, lambda: None)
        self.fail(f"no access-log line for {path}")

    @defer.inlineCallbacks
    def assertOutcome(self, path: str, status: bytes, line: str, headers: str = ""):
        """
        C{GET path} gets C{status} and logs exactly C{line}.
        """
        answer = yield self.get(path, headers)
        self.assertTrue(answer.startswith(b"HTTP/1.1 " + status), answer)
        logged = yield self.logLine(path)
        self.assertEqual(logged, line)
        return answer

    def test_ok(self):
        """A proxied 200 has no flag and details C{via_upstream}."""
        return self.assertOutcome("/ok", b"200 OK", "/ok 200 - via_upstream origin")

    def test_noRoute(self):
        """A path no route matches gets 404 with C{NR} C{route_not_found}, and no upstream."""
        return self.assertOutcome("/nowhere", b"404 Not Found", "/nowhere 404 NR route_not_found -")

    def test_connectionFailure(self):
        """An upstream that refuses the connection gives 503 C{UF} with Envoy's connection_failure details."""
        return self.assertOutcome(
            "/dead", b"503 Service Unavailable",
            "/dead 503 UF upstream_reset_before_response_started{connection_failure} dead")

    def test_upstreamTimeout(self):
        """An upstream silent past the route's timeout gives 504 C{UT} C{upstream_response_timeout}."""
        return self.assertOutcome("/slow", b"504 Gateway Timeout",
                                  "/slow 504 UT upstream_response_timeout origin")

    @defer.inlineCallbacks
    def test_circuitBreakerOverflow(self):
        """
        With the cluster's one allowed request in flight, the next gets 503 C{UO} with Envoy's overflow
        details; the first still completes.
        """
        first = yield self.connect("/narrow/first")
        held = yield self.origin.arrivals.get()
        yield self.assertOutcome(
            "/narrow/second", b"503 Service Unavailable",
            "/narrow/second 503 UO upstream_reset_before_response_started{overflow} narrow")
        held.write(b"late but fine")
        held.finish()
        answer = yield first.done
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 OK"), answer)
        logged = yield self.logLine("/narrow/first")
        self.assertEqual(logged, "/narrow/first 200 - via_upstream narrow")

    @defer.inlineCallbacks
    def test_rateLimited(self):
        """A tenant's second request within its bucket's hour gets 429 C{RL} C{local_rate_limited}."""
        yield self.assertOutcome("/ok/first", b"200 OK", "/ok/first 200 - via_upstream origin",
                                 "x-tenant: acme\r\n")
        yield self.assertOutcome("/ok/second", b"429 Too Many Requests",
                                 "/ok/second 429 RL local_rate_limited -", "x-tenant: acme\r\n")

    @defer.inlineCallbacks
    def test_rbacDenied(self):
        """
        A request RBAC denies gets 403 and details naming the matched policy; as in Envoy, no response flag.
        """
        answer = yield self.assertOutcome("/denied", b"403 Forbidden",
                                          "/denied 403 - rbac_access_denied_matched_policy[blocked] -")
        self.assertTrue(answer.endswith(b"RBAC: access denied"), answer)

    @defer.inlineCallbacks
    def test_downstreamDisconnect(self):
        """A client that hangs up before the answer leaves a line with status 0, C{DC}, and the upstream is let go."""
        client = yield self.connect("/hang", close=False)
        held = yield self.origin.arrivals.get()
        client.transport.abortConnection()
        yield client.done
        logged = yield self.logLine("/hang")
        self.assertEqual(logged, "/hang 0 DC downstream_remote_disconnect origin")
        yield waitFor(lambda: held._disconnected, 5, "the proxy to close the upstream exchange it no longer needs")

    @defer.inlineCallbacks
    def test_statsQuantiles(self):
        """
        After real requests, the admin C{/stats} shows each histogram as Envoy does: P0, P25, P50, P75, P90,
        P95, P99, P99.5, P99.9 and P100, in that order.
        """
        yield self.get("/ok")
        yield self.get("/nowhere")
        adminPort = self.service.admin.port.getHost().port
        answer = yield self.get("/stats?filter=%5Ehttp%5C.edge%5C.downstream_rq_time%24", port=adminPort)
        head, _, body = answer.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200"), head)
        [line] = body.decode().splitlines()
        name, _, values = line.partition(": ")
        self.assertEqual(name, "http.edge.downstream_rq_time")
        labels = re.findall(r"(P[0-9.]+)\(([0-9.e+-]+)\)", values)
        self.assertEqual([label for label, _ in labels],
                         ["P0", "P25", "P50", "P75", "P90", "P95", "P99", "P99.5", "P99.9", "P100"])
        numbers = [float(v) for _, v in labels]
        self.assertEqual(numbers, sorted(numbers))
