"""
Circuit breakers (L{twistedmesh.upstream.breaker}) through the router, with memory transports and a
Clock: limits on requests, pending requests, connections and retries, and their stats.
"""

from twisted.internet.testing import MemoryReactorClock

from twistedmesh.config import ConfigErrors, loadString
from twistedmesh.http import server
from twistedmesh.service import MeshService

from .test_router import FakeEndpoint, RecordingStream, RouterTestBase, config, ok


class BreakerTestBase(RouterTestBase):
    """
    The router tests' proxy, with C{breaker.*} keys on the cluster.
    """

    hosts = 1
    breaker = ""

    def setUp(self) -> None:
        self.patch(server, "Stream", RecordingStream)
        self.patch(RecordingStream, "made", [])
        self.clock = MemoryReactorClock()
        text = config(self.hosts).replace("connect_timeout = 5s", "connect_timeout = 5s\n" + self.breaker)
        self.service = MeshService(loadString(text, "test.ini"), self.clock, seed=1)
        self.cluster = self.service.clusters["origin"]
        self.connects = []
        for host in self.cluster.hosts:
            host.client = FakeEndpoint(self, host)

    def assertOverflow(self, client) -> None:
        r = client.response()
        self.assertEqual(r.status, 503)
        self.assertEqual(r.header(b"x-envoy-overloaded"), b"true")
        self.assertEqual(client.stream.responseFlags, ["UO"])
        self.assertEqual(client.stream.responseCodeDetails, "upstream_reset_before_response_started{overflow}")


class RequestLimitTests(BreakerTestBase):
    """
    C{breaker.max_requests}.
    """

    breaker = "breaker.max_requests = 2"

    def test_overflow(self) -> None:
        """
        Past C{max_requests} requests in flight, the next is answered 503 UO at once; when one ends, a new
        one goes through again.
        """
        a = self.get(b"/x")
        self.get(b"/y")
        self.assertEqual(self.cstat("circuit_breakers.default.rq_open"), 1)
        self.assertEqual(self.cstat("circuit_breakers.default.remaining_rq"), 0)
        c = self.get(b"/z")
        self.assertOverflow(c)
        self.assertEqual(self.cstat("upstream_rq_pending_overflow"), 1)
        self.assertEqual(len(self.connects), 2)
        conn, t = self.connect(0)
        conn.dataReceived(ok(b"a"))
        self.assertEqual(a.response().body, b"a")
        self.assertEqual(self.cstat("circuit_breakers.default.rq_open"), 0)
        self.assertEqual(self.cstat("circuit_breakers.default.remaining_rq"), 1)
        self.get(b"/w")
        self.assertEqual(len(self.connects), 2)  # reuses the released connection: no new connect
        self.assertIn(b"GET /w HTTP/1.1", t.value())
        self.clock.advance(0)


class PendingLimitTests(BreakerTestBase):
    """
    C{breaker.max_pending_requests}.
    """

    breaker = "breaker.max_pending_requests = 1"

    def test_overflow(self) -> None:
        """
        Requests waiting for a connection count as pending; past the limit the next is refused.
        """
        self.get(b"/x")
        self.assertEqual(self.cstat("circuit_breakers.default.rq_pending_open"), 1)
        c = self.get(b"/y")
        self.assertOverflow(c)
        self.connect(0)
        self.assertEqual(self.cstat("circuit_breakers.default.rq_pending_open"), 0)
        self.assertEqual(self.cstat("circuit_breakers.default.remaining_pending"), 1)

    def test_pendingActive(self) -> None:
        """
        C{upstream_rq_pending_active} is the number waiting for a connection now;
        C{upstream_rq_pending_total} counts every request that had to wait.
        """
        self.get(b"/x")
        self.assertEqual(self.cstat("upstream_rq_pending_active"), 1)
        self.assertEqual(self.cstat("upstream_rq_pending_total"), 1)
        self.connect(0)
        self.assertEqual(self.cstat("upstream_rq_pending_active"), 0)
        self.assertEqual(self.cstat("upstream_rq_pending_total"), 1)


class ConnectionLimitTests(BreakerTestBase):
    """
    C{breaker.max_connections}.
    """

    breaker = "breaker.max_connections = 1"

    def test_queuesForTheConnection(self) -> None:
        """
        At the connection limit a request waits for a connection to be released rather than opening
        another, and then uses it.
        """
        a = self.get(b"/x")
        conn, t = self.connect(0)
        b = self.get(b"/y")
        self.assertEqual(len(self.connects), 1)
        self.assertEqual(self.cstat("upstream_cx_overflow"), 1)
        self.assertEqual(self.cstat("circuit_breakers.default.cx_open"), 1)
        conn.dataReceived(ok(b"a"))
        self.assertEqual(a.response().body, b"a")
        self.assertIn(b"GET /y HTTP/1.1", t.value())
        conn.dataReceived(ok(b"b"))
        self.assertEqual(b.response().body, b"b")
        self.assertEqual(len(self.connects), 1)
        self.clock.advance(0)

    def test_lostConnectionServesQueue(self) -> None:
        """
        When the connection at the limit closes, the queued request gets a new one.
        """
        self.get(b"/x")
        conn, t = self.connect(0)
        self.get(b"/y")
        t.loseConnection()
        self.clock.advance(0)
        self.assertEqual(len(self.connects), 2)
        self.assertEqual(self.cstat("circuit_breakers.default.cx_open"), 0)


class RetryLimitTests(BreakerTestBase):
    """
    C{breaker.max_retries}.
    """

    hosts = 2
    breaker = "breaker.max_retries = 1"

    def test_retryOverflow(self) -> None:
        """
        With one retry allowed in the cluster at a time, a second request's retry is refused and its 503
        forwarded; C{upstream_rq_retry_overflow} counts it.
        """
        a, b = self.get(b"/5xx/a"), self.get(b"/5xx/b")
        connA, _ = self.connect(0)
        connB, _ = self.connect(1)
        connA.dataReceived(ok(b"", b"503 Service Unavailable"))
        self.assertEqual(self.cstat("circuit_breakers.default.rq_retry_open"), 1)
        connB.dataReceived(ok(b"no", b"503 Service Unavailable"))
        self.assertEqual(b.response().status, 503)
        self.assertEqual(self.cstat("upstream_rq_retry_overflow"), 1)
        self.assertEqual(self.cstat("upstream_rq_retry"), 1)
        self.clock.advance(1)
        # The retry goes to the other host, whose connection b's finished exchange left idle.
        self.assertEqual(len(self.connects), 2)
        connB.dataReceived(ok(b"fine"))
        self.assertEqual(a.response().body, b"fine")
        self.assertEqual(self.cstat("circuit_breakers.default.rq_retry_open"), 0)
        self.clock.advance(0)


class BudgetTests(BreakerTestBase):
    """
    C{breaker.budget_percent}: the retry limit follows the load.
    """

    hosts = 2
    breaker = "breaker.budget_percent = 50\nbreaker.min_retry_concurrency = 1"

    def test_budget(self) -> None:
        """
        With 4 requests active and a 50% budget, 2 may retry at once; the third is refused.
        """
        clients = [self.get(b"/5xx/%d" % i) for i in range(4)]
        conns = [self.connect(i)[0] for i in range(4)]
        for conn in conns[:3]:
            conn.dataReceived(ok(b"", b"503 Service Unavailable"))
        self.assertEqual(self.cstat("upstream_rq_retry"), 2)
        self.assertEqual(self.cstat("upstream_rq_retry_overflow"), 1)
        self.assertEqual(clients[2].response().status, 503)


class BreakerConfigTests(BreakerTestBase):
    """
    The C{breaker.*} keys.
    """

    def test_defaults(self) -> None:
        """
        Envoy's defaults: 1024 connections, pending requests and requests, 3 retries.
        """
        c = self.cluster.config.breaker
        self.assertEqual((c.max_connections, c.max_pending_requests, c.max_requests, c.max_retries),
                         (1024, 1024, 1024, 3))
        self.assertEqual(self.cstat("circuit_breakers.default.remaining_cx"), 1024)

    def test_errors(self) -> None:
        """
        Bad limits name their keys.
        """
        text = config(1).replace("connect_timeout = 5s", "connect_timeout = 5s\nbreaker.max_requests = 0\n"
                                 "breaker.budget_percent = 150\nbreaker.max_retrys = 2")
        e = self.assertRaises(ConfigErrors, loadString, text, "t.ini")
        messages = [str(x) for x in e.errors]
        self.assertIn("t.ini: [cluster:origin] breaker.max_requests: 0 is less than 1", messages)
        self.assertIn("t.ini: [cluster:origin] breaker.budget_percent: '150' is not a percentage from 0 to 100",
                      messages)
        self.assertIn("t.ini: [cluster:origin] breaker.max_retrys: unknown key (did you mean `breaker.max_retries`?)",
                      messages)


class OutlierThroughRouterTests(BreakerTestBase):
    """
    Outlier detection fed by the router's upstream answers.
    """

    hosts = 2
    breaker = "outlier.consecutive_5xx = 2\noutlier.max_ejection_percent = 50"

    def test_consecutive5xxEjects(self) -> None:
        """
        Two 5xx answers in a row from one host eject it: later requests all go to the other host.
        """
        first = self.get(b"/1")
        connA, _ = self.connect(0)
        hostA = self.hostOf(0)
        connA.dataReceived(ok(b"bad", b"500 Internal Server Error"))
        self.assertEqual(first.response().status, 500)
        self.get(b"/2")
        connB, tB = self.connect(1)
        self.assertIsNot(self.hostOf(1), hostA)
        connB.dataReceived(ok(b"fine"))
        third = self.get(b"/3")  # round robin is back on A, whose idle connection is reused
        self.assertEqual(len(self.connects), 2)
        connA.dataReceived(ok(b"bad", b"500 Internal Server Error"))
        self.assertEqual(third.response().status, 500)
        self.assertFalse(hostA.healthy)
        self.assertIn("failed_outlier_check", hostA.healthFlags)
        self.assertEqual(self.cstat("outlier_detection.ejections_active"), 1)
        for path in (b"/4", b"/5"):
            self.get(path)
            self.assertIn(b"GET " + path + b" HTTP/1.1", tB.value())
            connB.dataReceived(ok(b"fine"))
        self.clock.advance(0)
