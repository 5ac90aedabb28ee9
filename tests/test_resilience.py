"""
Resilience end to end, on loopback with the real reactor: a proxy in front of real upstreams that die or
start failing while traffic flows.

  - L{RetryAndEjectionTests}: three upstreams, retries on the route and outlier detection on the cluster;
    one upstream is killed in the middle of a load loop. The client must see no error, the dead host must
    be ejected, and the stats must say what happened.
  - L{TLSHealthCheckTests}: active HTTP health checks of an upstream that serves TLS, with a test CA: the
    host becomes healthy through real handshakes, goes unhealthy when C{/healthz} answers 503, and proxied
    requests reach it over TLS too.

Nothing sleeps: state is polled with short C{deferLater} waits under an overall bound, so that a loaded
machine makes the tests slower, never wrong.
"""

from __future__ import annotations

import shutil
import tempfile

import treq
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.ssl import CertificateOptions, PrivateCertificate
from twisted.trial import unittest
from twisted.web import resource
from twisted.web.client import HTTPConnectionPool

from twistedmesh.service import MeshService

from .support import proxyConfig, startService, stopProxy, waitFor
from .test_http import CountingSite
from .test_tls import PKI


class Named(resource.Resource):
    """
    An upstream that answers every request with its own name (and C{/healthz} with C{healthStatus}),
    recording whether each request came over TLS.
    """

    isLeaf = True

    def __init__(self, name: bytes):
        super().__init__()
        self.name = name
        self.healthStatus = 200
        self.requests = 0
        self.checks = 0
        self.secure = []  # request.isSecure() of every request, checks included

    def render(self, request):
        self.secure.append(request.isSecure())
        if request.path == b"/healthz":
            self.checks += 1
            request.setResponseCode(self.healthStatus)
            return b"ok" if self.healthStatus == 200 else b"failing"
        self.requests += 1
        return self.name


class TrackingSite(CountingSite):
    """
    A Site that keeps its open connections (L{CountingSite}), so that a test can also abort them (kill the
    upstream); it logs no request.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log = lambda request: None

    def abortAll(self):
        for proto in list(self.open):
            # Site builds a _GenericHTTPChannelProtocol, a proxy whose HTTPChannel holds the transport.
            getattr(proto, "_channel", proto).transport.abortConnection()


class ResilienceBase(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def listen(self, name: bytes, tlsOptions=None):
        """
        Start an upstream answering C{name} on a loopback port (over TLS with C{tlsOptions});
        return (resource, site, port).
        """
        origin = Named(name)
        site = TrackingSite(origin)
        if tlsOptions is None:
            port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        else:
            port = reactor.listenSSL(0, site, tlsOptions, interface="127.0.0.1")
        # Cleanups run last-in first-out: stop listening, then wait for the connections to close.
        self.addCleanup(site.allClosed)
        self.addCleanup(lambda: port.stopListening() if port.connected else None)
        return origin, site, port

    def startProxy(self, cluster: str, sections: str, route: str) -> MeshService:
        """
        A proxy (no admin, 1 s drain) whose listener C{web} sends every path to C{cluster} (C{route} more
        lines of that route), with the other C{sections}; stopped with its pools closed when the test ends.
        """
        config = proxyConfig(cluster, sections, mesh="admin = off\ndrain_timeout = 1s\n", listener="web",
                             route=route)
        return startService(self, config, seed=7, stop=stopProxy)

    def stat(self, service: MeshService, name: str):
        return service.stats.get(name).value

    def clientPool(self) -> HTTPConnectionPool:
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 10
        pool.retryAutomatically = False  # a failure must reach the test, not be hidden by the client
        self.addCleanup(pool.closeCachedConnections)
        return pool


class RetryAndEjectionTests(ResilienceBase):
    """
    One of three upstreams dies under load: retries hide it from the client and outlier detection
    ejects it.
    """

    TOTAL = 300        # requests in the load loop (at least)
    KILL_AFTER = 100   # completed requests before the kill
    HARD_CAP = 3000    # never more than this, even if ejection were late
    CONCURRENCY = 10

    @defer.inlineCallbacks
    def test_killUpstreamUnderLoad(self):
        """
        Killing one upstream (stop listening, abort its connections) in the middle of a load loop: every
        client request still gets a 200 from a live upstream, the dead host is ejected
        (C{failed_outlier_check}), and the retry, ejection and connect-failure stats record it.
        """
        upstreams = []
        for name in (b"alpha", b"beta", b"gamma"):
            upstreams.append((yield self.listen(name)))
        endpoints = "\n".join(f"    tcp:127.0.0.1:{port.getHost().port}" for _, _, port in upstreams)
        # consecutive_5xx is above the number of exchanges that can be in flight to the killed host (at
        # most CONCURRENCY), so the ejection always needs some connect failures after the kill: the
        # connect-failure assertion below cannot depend on timing. (Resets and connect failures both count
        # as 503s here: split_external_local_origin_errors is off.)
        retries = "timeout = 5s\nretry.on = 5xx, connect-failure, reset\nretry.num = 2\n"
        service = self.startProxy("three", route=retries, sections=f"""
[cluster:three]
endpoints =
{endpoints}
connect_timeout = 1s
; at the kill several requests may retry at once: the default max_retries (3) would turn the 4th into a 503
breaker.max_retries = 100
outlier.consecutive_5xx = {self.CONCURRENCY + 5}
outlier.max_ejection_percent = 50
outlier.base_ejection_time = 60s
outlier.interval = 30s
""")
        yield service.whenLive
        url = f"http://127.0.0.1:{service.listeners['web'].port.getHost().port}/"
        cluster = service.clusters["three"]
        victimOrigin, victimSite, victimPort = upstreams[0]
        victim = cluster.hosts[0]
        self.assertEqual(victim.endpoint, f"tcp:127.0.0.1:{victimPort.getHost().port}")

        pool = self.clientPool()
        results = []   # (code, body) of every request
        errors = []    # client-side failures (connection errors)
        state = {"started": 0, "done": 0, "killedAt": None}

        def kill():
            state["killedAt"] = state["done"]
            victimPort.stopListening()
            victimSite.abortAll()

        def more():
            if state["started"] >= self.HARD_CAP:
                return False
            if state["started"] < self.TOTAL:
                return True
            # Past TOTAL, go on only until the victim is ejected (normally long before TOTAL).
            return "failed_outlier_check" not in victim.healthFlags

        @defer.inlineCallbacks
        def worker():
            while more():
                state["started"] += 1
                try:
                    response = yield treq.get(url, pool=pool)
                    body = yield response.content()
                    results.append((response.code, body))
                except Exception as e:  # noqa: BLE001 - any client failure is a test failure below
                    errors.append(repr(e))
                state["done"] += 1
                if state["done"] == self.KILL_AFTER:
                    kill()

        yield defer.gatherResults([worker() for _ in range(self.CONCURRENCY)], consumeErrors=True)

        # The client saw nothing of it.
        self.assertEqual(errors, [])
        bad = [(code, body) for code, body in results if code != 200]
        self.assertEqual(bad, [])
        self.assertGreaterEqual(len(results), self.TOTAL)
        self.assertEqual({body for _, body in results}, {b"alpha", b"beta", b"gamma"})
        self.assertIsNotNone(state["killedAt"])

        # The dead host is ejected, the others are not.
        self.assertIn("failed_outlier_check", victim.healthFlags)
        self.assertFalse(victim.healthy)
        self.assertIn("ejected by outlier detection (consecutive_5xx)", victim.healthReason)
        self.assertEqual([h.healthy for h in cluster.hosts[1:]], [True, True])
        # After the ejection nothing reached it: the last requests were all answered by the others.
        self.assertNotIn(b"alpha", {body for _, body in results[-20:]})

        # The stats say what happened.
        prefix = "cluster.three."
        self.assertGreater(self.stat(service, prefix + "upstream_rq_retry"), 0)
        self.assertEqual(self.stat(service, prefix + "outlier_detection.ejections_active"), 1)
        self.assertEqual(self.stat(service, prefix + "outlier_detection.ejections_enforced_consecutive_5xx"), 1)
        self.assertGreater(self.stat(service, prefix + "upstream_cx_connect_fail"), 0)
        self.assertGreater(victim.cx_connect_fail, 0)
        self.assertEqual(self.stat(service, prefix + "upstream_rq_retry_overflow"), 0)
        self.assertEqual(self.stat(service, prefix + "membership_healthy"), 2)
        self.assertEqual(self.stat(service, "http.web.downstream_rq_5xx"), 0)


class TLSHealthCheckTests(ResilienceBase):
    """
    Active HTTP health checks of a TLS upstream, with the cluster's TLS settings.
    """

    @defer.inlineCallbacks
    def test_healthCheckOverTLS(self):
        """
        The host is pending, then healthy after checks made over TLS (with the test CA and SNI
        C{localhost}); when C{/healthz} answers 503 it becomes unhealthy within a few intervals and the
        proxy answers 503 UH; when it recovers, requests flow again, over TLS.
        """
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        pki = PKI(directory)
        certPath, keyPath, _ = pki.issue("server", dns=["localhost"])
        with open(certPath, "rb") as f:
            certPEM = f.read()
        with open(keyPath, "rb") as f:
            keyPEM = f.read()
        serverCert = PrivateCertificate.loadPEM(certPEM + keyPEM)
        options = CertificateOptions(privateKey=serverCert.privateKey.original,
                                     certificate=serverCert.original)
        origin, site, port = yield self.listen(b"secure", options)

        service = self.startProxy("up", route="timeout = 5s\n", sections=f"""
[cluster:up]
endpoints = tcp:127.0.0.1:{port.getHost().port}
connect_timeout = 2s
tls = up
health.path = /healthz
health.interval = 100ms
health.no_traffic_interval = 100ms
health.timeout = 5s
health.unhealthy_threshold = 3
health.healthy_threshold = 2
[tls:up]
ca = {pki.ca}
sni = localhost
""")
        yield service.whenLive
        url = f"http://127.0.0.1:{service.listeners['web'].port.getHost().port}/x"
        cluster = service.clusters["up"]
        host = cluster.hosts[0]
        prefix = "cluster.up.health_check."

        # Healthy through real TLS handshakes.
        yield waitFor(lambda: host.healthy, 10, "the TLS host to become healthy")
        self.assertEqual(host.healthFlags, set())
        self.assertGreater(origin.checks, 0)
        self.assertGreater(self.stat(service, prefix + "success"), 0)
        self.assertEqual(self.stat(service, prefix + "healthy"), 1)

        # Proxied requests go over TLS too.
        response = yield treq.get(url, persistent=False)
        body = yield response.content()
        self.assertEqual((response.code, body), (200, b"secure"))
        self.assertEqual(origin.requests, 1)
        self.assertTrue(origin.secure and all(origin.secure), origin.secure)

        # /healthz fails: unhealthy within a few intervals (3 failing checks at 100 ms; bound generous).
        origin.healthStatus = 503
        failedBefore = self.stat(service, prefix + "failure")
        yield waitFor(lambda: not host.healthy, 10, "the host to fail its health checks")
        self.assertIn("failed_active_hc", host.healthFlags)
        self.assertEqual(host.healthReason, "failed active health check: status 503")
        self.assertGreaterEqual(self.stat(service, prefix + "failure") - failedBefore, 3)
        self.assertEqual(self.stat(service, prefix + "network_failure"), 0)
        self.assertEqual(self.stat(service, prefix + "healthy"), 0)

        # No healthy host: the proxy answers 503 itself and the request does not reach the upstream.
        response = yield treq.get(url, persistent=False)
        yield response.content()
        self.assertEqual(response.code, 503)
        self.assertEqual(origin.requests, 1)

        # Recovery: healthy_threshold passes, then traffic flows again over TLS.
        origin.healthStatus = 200
        yield waitFor(lambda: host.healthy, 10, "the host to recover")
        response = yield treq.get(url, persistent=False)
        body = yield response.content()
        self.assertEqual((response.code, body), (200, b"secure"))
        self.assertEqual(origin.requests, 2)
        self.assertTrue(all(origin.secure), origin.secure)
