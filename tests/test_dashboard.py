"""
Tests for the admin dashboard (C{GET /}, L{twistedmesh.admin.dashboard}): the rendered HTML on a
L{MeshService} built on a L{Clock}, the rate readings driven by that clock, and the page as headless
Chromium renders it from a proxy listening on loopback.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from types import MappingProxyType
from typing import Dict, List, Optional, Tuple

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from twisted.web.test.requesthelper import DummyRequest

from twistedmesh.admin.dashboard import RateSampler
from twistedmesh.admin.resource import AdminResource
from twistedmesh.config import ClusterConfig, Config, HostConfig, ListenerConfig, MeshConfig, loadString
from twistedmesh.observability.stats import StatsStore
from twistedmesh.service import MeshService
from twistedmesh.upstream.cluster import Cluster

from .support import dumpDOM, port, requireChromium, startService

CONFIG = """
[mesh]
admin = tcp:0:interface=127.0.0.1
drain_timeout = 1s

[listener:web]
endpoint = tcp:0:interface=127.0.0.1
protocol = http
routes = main

[listener:raw]
endpoint = tcp:0:interface=127.0.0.1
protocol = tcp
cluster = ledger-db

[route:main/all]
prefix = /
cluster = checkout-api

[cluster:checkout-api]
endpoints =
    tcp:127.0.0.1:1
    tcp:127.0.0.1:2  weight=3

[cluster:ledger-db]
endpoints = tcp:127.0.0.1:3
protocol = tcp
"""

POST_PATHS = ["/healthcheck/fail", "/healthcheck/ok", "/quitquitquit"]
GET_PATHS = ["/", "/clusters", "/config_dump", "/help", "/ready", "/stats", "/stats/prometheus"]


def render(resource: AdminResource, args: Optional[Dict[str, str]] = None, method: bytes = b"GET") -> DummyRequest:
    """
    Render C{GET /} (with query C{args}); the body is left in C{request.body}.
    """
    request = DummyRequest([])
    request.method = method
    for name, value in (args or {}).items():
        request.addArg(name.encode(), value.encode())
    request.body = resource.render(request)
    return request


class _Page(HTMLParser):
    """
    What a test needs from a rendered page: the text of each table row by CSS class, every link and form.
    """

    def __init__(self, html: str) -> None:
        super().__init__()
        self.rows: Dict[str, List[str]] = {}
        self.links: List[str] = []
        self.forms: List[Tuple[str, str]] = []
        self.headings: List[str] = []
        self._row: Optional[Tuple[str, List[str]]] = None
        self._heading: Optional[List[str]] = None
        self.feed(html)

    def handle_starttag(self, tag, attrs) -> None:
        a = dict(attrs)
        if tag == "tr" and a.get("class"):
            self._row = (a["class"], [])
        elif tag == "a":
            self.links.append(a["href"])
        elif tag == "form":
            self.forms.append((a["method"], a["action"]))
        elif tag == "h3":
            self._heading = []

    def handle_endtag(self, tag) -> None:
        if tag == "tr" and self._row is not None:
            cls, text = self._row
            # Collapse ordinary whitespace only: a rate's no-break space stays inside its cell.
            self.rows.setdefault(cls, []).append(re.sub(r"[ \t\n]+", " ", "".join(text)).strip())
            self._row = None
        elif tag == "h3" and self._heading is not None:
            self.headings.append(" ".join("".join(self._heading).split()))
            self._heading = None

    def handle_data(self, data) -> None:
        if self._row is not None:
            self._row[1].append(data + " ")
        if self._heading is not None:
            self._heading.append(data)


class DashboardTests(TestCase):
    """
    The page rendered from a real L{MeshService} (not listening) on a L{Clock}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.service = MeshService(loadString(CONFIG, "test.ini"), self.clock, seed=1)
        self.site = self.service.admin.factory
        self.resource: AdminResource = self.site.resource

    def page(self, **args: str) -> _Page:
        request = render(self.resource, args)
        self.assertEqual(request.responseCode, 200)
        return _Page(request.body.decode("utf-8"))

    def test_html(self) -> None:
        """C{GET /} is a UTF-8 HTML document that loads nothing from elsewhere."""
        request = render(self.resource)
        self.assertEqual(request.responseHeaders.getRawHeaders("content-type"), ["text/html; charset=utf-8"])
        [csp] = request.responseHeaders.getRawHeaders("content-security-policy")
        self.assertIn("default-src 'none'", csp)
        body = request.body.decode("utf-8")
        self.assertTrue(body.startswith("<!DOCTYPE html>"))
        self.assertNotRegex(body, r"(src|href)=\"(https?:)?//")
        self.assertNotIn("<script", body)
        self.assertEqual(request.responseHeaders.getRawHeaders("cache-control"), ["no-cache, max-age=0"])

    def test_listeners(self) -> None:
        """Each listener shows its name, endpoint, protocol and connections; HTTP ones their requests."""
        self.service.stats.get("listener.web.downstream_cx_active").value = 4
        self.service.stats.get("http.web.downstream_rq_active").value = 3
        self.service.stats.get("listener.raw.downstream_cx_active").value = 2
        rows = self.page().rows["listener"]
        self.assertEqual(rows, [
            "raw tcp:0:interface=127.0.0.1 not listening tcp 2 – –",
            "web tcp:0:interface=127.0.0.1 not listening http 4 3 –",
        ])

    def test_listeningAddress(self) -> None:
        """A listener that listens shows the address it got (useful with port 0)."""

        class Port:
            def getHost(self):
                from twisted.internet.address import IPv4Address
                return IPv4Address("TCP", "127.0.0.1", 41234)

        self.service.listeners["web"].port = Port()
        self.assertIn("web tcp:0:interface=127.0.0.1 127.0.0.1:41234 http", self.page().rows["listener"][1])

    def test_clusters(self) -> None:
        """Each cluster shows its hosts' weights, figures and health; and its requests in flight."""
        api = self.service.clusters["checkout-api"]
        api.upstream_rq_active.value = 5
        first = api.hosts[0]
        first.rq_active, first.cx_active, first.rq_total, first.rq_error = 2, 1, 40, 3
        page = self.page()
        self.assertEqual(page.headings, ["checkout-api 2/2 healthy", "ledger-db 1/1 healthy"])
        body = render(self.resource).body.decode()
        self.assertIn("http1, round_robin; active requests <b>5</b>", body)
        self.assertEqual(page.rows["host"][:2], [
            "tcp:127.0.0.1:1 1 healthy no health checking configured 2 1 40 3",
            "tcp:127.0.0.1:2 3 healthy no health checking configured 0 0 0 0",
        ])

    def test_unhealthyHosts(self) -> None:
        """A host's health flags and reason are shown as C{/clusters} has them, and marked bad."""
        api = self.service.clusters["checkout-api"]
        host = api.hosts[1]
        host.setHealthFlag("failed_active_hc", True, "failed active health check: connection refused")
        host.setHealthFlag("failed_outlier_check", True)
        api.healthChanged()
        page = self.page()
        self.assertEqual(page.headings[0], "checkout-api 1/2 healthy")
        self.assertEqual(page.rows["host"][1], "tcp:127.0.0.1:2 3 /failed_active_hc/failed_outlier_check "
                                               "failed active health check: connection refused 0 0 0 0")
        body = render(self.resource).body.decode()
        self.assertIn('<span class="badge bad">/failed_active_hc/failed_outlier_check</span>', body)
        self.assertIn('<span class="badge warn">1/2 healthy</span>', body)
        api.hosts[0].setHealthFlag("failed_active_hc", True, "timeout")
        self.assertIn('<span class="badge bad">0/2 healthy</span>', render(self.resource).body.decode())

    def test_state(self) -> None:
        """The server's state and a failed health check are at the top."""
        self.assertIn('<span id="state" class="badge warn">STARTING</span>', render(self.resource).body.decode())
        self.service.state = "LIVE"
        self.service.healthCheckFailed = True
        body = render(self.resource).body.decode()
        self.assertIn('<span id="state" class="badge ok">LIVE</span>', body)
        self.assertIn("health checks failing", body)

    def test_links(self) -> None:
        """Every admin endpoint is linked: C{GET} ones as links, C{POST} ones as forms that post."""
        page = self.page()
        for path in GET_PATHS:
            self.assertIn("." + path, page.links)
        for path in POST_PATHS:
            self.assertIn(("post", "." + path), page.forms)
        gets = sorted("." + p.decode() for p, e in self.resource.endpoints.items() if e.method == b"GET")
        posts = sorted(("post", "." + p.decode()) for p, e in self.resource.endpoints.items() if e.method == b"POST")
        self.assertEqual(sorted(l for l in page.links if "?" not in l), gets)
        self.assertEqual(sorted(page.forms), posts)

    def test_newEndpointLinked(self) -> None:
        """An endpoint added to the resource is on the page without touching the dashboard."""
        self.resource.endpoints[b"/x<y"] = self.resource.endpoints[b"/ready"]._replace(help="a & b")
        body = render(self.resource).body.decode()
        self.assertIn('<a href="./x&lt;y"><code>/x&lt;y</code></a> &ndash; a &amp; b', body)

    def test_refresh(self) -> None:
        """The page reloads itself every 5 s by default, as C{?refresh=N} says, or never with 0."""
        self.assertIn('<meta http-equiv="refresh" content="5">', render(self.resource).body.decode())
        self.assertIn('<meta http-equiv="refresh" content="2">',
                      render(self.resource, {"refresh": "2"}).body.decode())
        self.assertNotIn('http-equiv="refresh"', render(self.resource, {"refresh": "0"}).body.decode())
        for bad in ("x", "-1", "3601"):
            request = render(self.resource, {"refresh": bad})
            self.assertEqual(request.responseCode, 400)

    def test_head(self) -> None:
        """C{HEAD /} answers the headers of C{GET /} without the body."""
        request = render(self.resource, method=b"HEAD")
        self.assertEqual(request.body, b"")
        self.assertEqual(request.responseHeaders.getRawHeaders("content-type"), ["text/html; charset=utf-8"])


class EscapingTests(TestCase):
    """
    Every name and address on the page is HTML-escaped (names come from configuration and, with
    discovery, from a control plane) and endpoint secrets are redacted.
    """

    def test_escaped(self) -> None:
        """Markup in cluster, host and listener names shows as text; no element is injected."""
        clock = Clock()
        stats = StatsStore()
        evil = '<script>alert("x")</script>&'
        cluster = Cluster(ClusterConfig(evil, (HostConfig("unix:/run/<img>&.sock"),)), clock, stats)
        cluster.hosts[0].setHealthFlag("failed_active_hc", True, "<b>bad</b> & worse")

        class Server:
            config = Config(
                file="x.ini", mesh=MeshConfig(),
                listeners=MappingProxyType({"e<i>": ListenerConfig(
                    "e<i>", "ssl:443:privateKey=/k<ey>.pem:certKey=c.pem", "http", ("router",))}),
                clusters=MappingProxyType({}), filters=MappingProxyType({}), echoes=MappingProxyType({}))
            clusters = {evil: cluster}
            state = "<LIVE>"
            healthCheckFailed = False

        Server.stats = stats
        body = render(AdminResource(Server(), clock)).body.decode()
        self.assertNotIn("<script>", body)
        self.assertNotIn("<img", body)
        self.assertNotIn("<b>bad", body)
        self.assertNotIn("<i>", body)
        self.assertNotIn("/k<ey>", body)
        self.assertIn("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;", body)
        self.assertIn("unix:/run/&lt;img&gt;&amp;.sock", body)
        self.assertIn("&lt;b&gt;bad&lt;/b&gt; &amp; worse", body)
        self.assertIn("<b>e&lt;i&gt;</b>", body)
        self.assertIn("ssl:443:privateKey=[redacted]:certKey=c.pem", body)
        self.assertIn("&lt;LIVE&gt;", body)


class RateTests(TestCase):
    """
    The rates, from readings that the admin site takes on its clock while it is started.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.service = MeshService(loadString(CONFIG, "test.ini"), self.clock, seed=1)
        self.site = self.service.admin.factory
        self.sampler: RateSampler = self.site.resource.rates
        self.web = self.service.stats.get("http.web.downstream_rq_total")
        self.raw = self.service.stats.get("listener.raw.downstream_cx_total")
        self.api = self.service.clusters["checkout-api"]
        self.db = self.service.clusters["ledger-db"]

    def rates(self) -> Dict[str, List[str]]:
        page = _Page(render(self.site.resource).body.decode())
        return {"listener": [row.split(" ")[-1] for row in page.rows["listener"]],
                "cluster": re.findall(r"rate <b>(.*?)</b>", render(self.site.resource).body.decode())}

    def test_siteStartsAndStopsReadings(self) -> None:
        """Readings start with the site (one at once, then every second) and stop with it."""
        self.clock.advance(5)
        self.assertEqual(len(self.sampler._ring), 0)
        self.site.doStart()
        self.assertTrue(self.sampler.running)
        self.assertEqual(len(self.sampler._ring), 1)
        self.clock.pump([1, 1, 0.5])
        self.assertEqual([when for when, _ in self.sampler._ring], [5.0, 6.0, 7.0])
        self.site.doStop()
        self.assertFalse(self.sampler.running)
        self.clock.advance(5)
        self.assertEqual(len(self.sampler._ring), 3)

    def test_noRateAtFirst(self) -> None:
        """Until a reading is at least one interval old, no rate is shown."""
        self.site.doStart()
        self.addCleanup(self.site.doStop)
        self.web.value = 100
        self.clock.advance(0.5)
        self.assertIsNone(self.sampler.rates()[("listener", "web")])
        self.assertEqual(self.rates()["listener"][1], "\u2013")

    def test_rates(self) -> None:
        """Each rate is the change since the oldest reading over the time since, per listener and cluster."""
        self.site.doStart()
        self.addCleanup(self.site.doStop)
        for _ in range(4):  # at t = 0.5, 1.5, 2.5, 3.5: between readings, as traffic comes
            self.clock.advance(0.5)
            self.web.value += 10
            self.raw.value += 1
            self.api.upstream_rq_total.value += 5
            self.db.upstream_cx_total.value += 2
            self.db.upstream_rq_total.value += 1000  # a TCP cluster's rate is of connections
            self.clock.advance(0.5)
        rates = self.sampler.rates()
        self.assertEqual(rates, {("listener", "web"): 10.0, ("listener", "raw"): 1.0,
                                 ("cluster", "checkout-api"): 5.0, ("cluster", "ledger-db"): 2.0})
        shown = self.rates()
        self.assertEqual(shown["listener"], ["1.0\xa0cx/s", "10.0\xa0rq/s"])
        self.assertEqual(shown["cluster"], ["5.0&nbsp;rq/s", "2.0&nbsp;cx/s"])

    def test_window(self) -> None:
        """Old readings fall out of the ring: the rate is over the last ten seconds only."""
        self.site.doStart()
        self.addCleanup(self.site.doStop)
        self.clock.advance(1)
        self.web.value = 1000  # a burst long ago
        for _ in range(30):
            self.clock.advance(0.5)
            self.web.value += 2
            self.clock.advance(0.5)
        self.assertEqual(self.sampler.rates()[("listener", "web")], 2.0)

    def test_counterWentDown(self) -> None:
        """A counter lower than its reading (the thing was replaced by a reload) has no rate, not a negative one."""
        self.web.value = 50
        self.site.doStart()
        self.addCleanup(self.site.doStop)
        self.clock.advance(2)
        self.web.value = 3
        self.assertIsNone(self.sampler.rates()[("listener", "web")])

    def test_newCluster(self) -> None:
        """A cluster that appears later is rated from its first reading; until then it shows no rate."""
        self.site.doStart()
        self.addCleanup(self.site.doStop)
        self.clock.advance(1)
        late = Cluster(ClusterConfig("late", (HostConfig("tcp:127.0.0.1:4"),)), self.clock, self.service.stats)
        self.service.clusters["late"] = late
        self.assertIsNone(self.sampler.rates()[("cluster", "late")])
        self.clock.advance(1)
        late.upstream_rq_total.value = 6
        self.clock.advance(2)
        # From its first reading (t=2, 0) to now (t=4, 6).
        self.assertEqual(self.sampler.rates()[("cluster", "late")], 3.0)


class ChromiumTests(TestCase):
    """
    The dashboard served by a proxy on loopback, rendered by headless Chromium.
    """

    timeout = 90

    @inlineCallbacks
    def test_renders(self) -> None:
        """Chromium loads C{/} from the admin port and the rendered DOM names every cluster and listener."""
        chromium = requireChromium()
        service = startService(self, CONFIG)
        yield service.whenLive
        service.clusters["checkout-api"].hosts[1].setHealthFlag("failed_active_hc", True, "connection refused")
        dom = yield dumpDOM(self, chromium, f"http://127.0.0.1:{port(service.admin)}/")
        self.assertIn("<h1>twistedmesh", dom)
        page = _Page(dom)
        self.assertEqual([h.split()[0] for h in page.headings], ["checkout-api", "ledger-db"])
        self.assertEqual([row.split()[0] for row in page.rows["listener"]], ["raw", "web"])
        self.assertIn("/failed_active_hc", page.rows["host"][1])
        self.assertIn("./stats", page.links)
