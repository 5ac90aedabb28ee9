"""
Tests for the admin web interface (L{twistedmesh.admin}) and the Prometheus exposition
(L{twistedmesh.observability.prometheus}).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from types import MappingProxyType
from typing import Dict, List, Optional

import treq
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor as globalReactor
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import globalLogPublisher
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data
from twisted.web.test.requesthelper import DummyRequest

from twistedmesh.admin import makeAdminSite, redact, redactEndpoint
from twistedmesh.admin.resource import AdminResource, hostRefusal
from twistedmesh.config import (ClusterConfig, Config, ConfigErrors, FilterConfig, HostConfig, ListenerConfig,
                                MeshConfig, loadString)
from twistedmesh.observability.prometheus import PrometheusExporter, StatsCollector, bucketLabel, metricName
from twistedmesh.observability.stats import DEFAULT_BUCKETS, StatsStore
from twistedmesh.upstream.cluster import Cluster, Host

from .support import dumpDOM, requireChromium, waitFor

PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: The C{/stats} line of the histogram L{FakeServer} fills (values 3, 7, 40, 40 and 120 ms).
RQ_TIME_LINE = ("cluster.api.upstream_rq_time: P0(1) P25(6.25) P50(31.25) P75(46.875) P90(175) P95(212.5) "
                "P99(242.5) P99.5(246.25) P99.9(249.25) P100(250)")
TLS_ENDPOINT = r"tls:host=db.internal:port=5432:certificate=client.pem:privateKey=/etc/pki/client.key:trustRoots=ca"


def makeConfig() -> Config:
    """
    A configuration with secrets in the places C{/config_dump} must hide them.
    """
    api = ClusterConfig("api", (HostConfig("tcp:127.0.0.1:9001"), HostConfig("tcp:127.0.0.1:9002", 3)))
    db = ClusterConfig("db", (HostConfig(TLS_ENDPOINT),), protocol="tcp")
    return Config(
        file="etc/mesh.ini",
        mesh=MeshConfig(admin="tcp:9901:interface=127.0.0.1"),
        listeners=MappingProxyType({
            "edge": ListenerConfig("edge", "tcp:10000", "tcp", ("tcp_proxy",), cluster="api"),
        }),
        clusters=MappingProxyType({"api": api, "db": db}),
        filters=MappingProxyType({
            "ext_authz": FilterConfig("ext_authz", "ext_authz", MappingProxyType({
                "api_token": "t0k3n",
                "client_secret": "s3cr3t",
                "Upstream-Password": "hunter2",
                "tls.private_key": "/etc/pki/authz.key",
                "timeout": "250ms",
            }), "filter:ext_authz"),
            "local_ratelimit": FilterConfig("local_ratelimit", "local_ratelimit", MappingProxyType({
                "max_tokens": "100", "tokens_per_fill": "10",
            }), "filter:local_ratelimit"),
        }),
        echoes=MappingProxyType({}),
    )


class FakeServer:
    """
    What the admin interface shows: a real L{StatsStore} and a real L{Cluster}, the rest plain attributes.
    """

    def __init__(self, reactor) -> None:
        self.stats = StatsStore()
        self.config: Optional[Config] = makeConfig()
        api = Cluster(self.config.clusters["api"], reactor, self.stats)
        self.clusters: Dict[str, Cluster] = {"api": api}
        self.state = "LIVE"
        self.healthCheckFailed = False
        self.shutdowns = 0
        api.upstream_cx_total.value = 3
        api.upstream_cx_active.value = 2
        self.stats.scope("cluster", "web").counter("upstream_cx_total").value = 5
        self.stats.counter("server.total_connections").value = 0
        rqTime = api.stats.histogram("upstream_rq_time")
        for ms in (3, 7, 40, 40, 120):
            rqTime.record(ms)
        self.stats.scope("http", "edge").histogram("downstream_rq_time")  # never recorded into
        first = api.hosts[0]
        first.cx_total, first.cx_active, first.rq_total, first.rq_error = 7, 1, 9, 2

    def shutdown(self) -> None:
        """
        Count the calls instead of stopping anything.
        """
        self.shutdowns += 1


def withAllowedHosts(config: Config, *names: str) -> Config:
    """
    C{config} with C{[mesh] admin.allowed_hosts} set to C{names}.
    """
    return dataclasses.replace(config, mesh=dataclasses.replace(config.mesh, admin_allowed_hosts=names))


def render(resource: AdminResource, path: str, method: bytes = b"GET",
           args: Optional[Dict[str, str]] = None) -> DummyRequest:
    """
    Render C{path} (with query C{args}) on C{resource}; the body is left in C{request.body}.
    """
    segments = [s.encode() for s in path.lstrip("/").split("/")] if path != "/" else []
    request = DummyRequest(segments)
    request.method = method
    for name, value in (args or {}).items():
        request.addArg(name.encode(), value.encode())
    request.body = resource.render(request)
    return request


def header(request: DummyRequest, name: str) -> Optional[str]:
    """
    The single value of response header C{name}, or C{None}.
    """
    values = request.responseHeaders.getRawHeaders(name)
    return values[0] if values else None


class AdminTestCase(TestCase):
    """
    Shared set-up: a fake server on a L{Clock} and its admin resource.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.server = FakeServer(self.clock)
        self.resource = AdminResource(self.server, self.clock)

    def get(self, path: str, **args: str) -> DummyRequest:
        """
        C{GET path?args}.
        """
        return render(self.resource, path, b"GET", args)

    def post(self, path: str) -> DummyRequest:
        """
        C{POST path}.
        """
        return render(self.resource, path, b"POST")


class ReadyTests(AdminTestCase):
    """
    C{/ready}.
    """

    def test_live(self) -> None:
        """A live server answers 200 C{LIVE}."""
        request = self.get("/ready")
        self.assertEqual((request.responseCode, request.body), (200, b"LIVE\n"))

    def test_starting(self) -> None:
        """A starting server answers 503 C{STARTING}, so a load balancer does not send it traffic yet."""
        self.server.state = "STARTING"
        request = self.get("/ready")
        self.assertEqual((request.responseCode, request.body), (503, b"STARTING\n"))

    def test_draining(self) -> None:
        """A draining server answers 503 C{DRAINING}."""
        self.server.state = "DRAINING"
        request = self.get("/ready")
        self.assertEqual((request.responseCode, request.body), (503, b"DRAINING\n"))


class StatsTests(AdminTestCase):
    """
    C{/stats}.
    """

    def test_text(self) -> None:
        """Every counter and gauge is a C{name: value} line, sorted by name; the histograms follow, sorted."""
        request = self.get("/stats")
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(header(request, "content-type"), "text/plain; charset=utf-8")
        lines = request.body.decode().splitlines()
        isHistogram = [" P0(" in line or line.endswith(": No recorded values") for line in lines]
        first = isHistogram.index(True)
        self.assertTrue(all(isHistogram[first:]), "histograms come last")
        counters, histograms = lines[:first], lines[first:]
        self.assertEqual(counters, sorted(counters))
        self.assertEqual(histograms, sorted(histograms))
        self.assertIn(RQ_TIME_LINE, histograms)
        self.assertIn("http.edge.downstream_rq_time: No recorded values", histograms)
        self.assertIn("cluster.api.upstream_cx_total: 3", lines)
        self.assertIn("cluster.api.upstream_cx_active: 2", lines)
        self.assertIn("cluster.web.upstream_cx_total: 5", lines)
        self.assertIn("server.total_connections: 0", lines)
        self.assertEqual(len(lines), len(list(self.server.stats)))

    def test_filter(self) -> None:
        """C{?filter=REGEX} keeps only the stats whose names the regex matches anywhere."""
        request = self.get("/stats", filter=r"upstream_cx_(total|active)$")
        self.assertEqual(request.body.decode().splitlines(), [
            "cluster.api.upstream_cx_active: 2",
            "cluster.api.upstream_cx_total: 3",
            "cluster.web.upstream_cx_total: 5",
        ])

    def test_badFilter(self) -> None:
        """An invalid regex is a 400 naming the regex, not a server error."""
        request = self.get("/stats", filter="upstream_(")
        self.assertEqual(request.responseCode, 400)
        self.assertIn(b"invalid filter regex 'upstream_('", request.body)
        self.assertEqual(header(request, "content-type"), "text/plain; charset=utf-8")

    def test_usedOnly(self) -> None:
        """C{?usedonly} leaves out every stat still at zero and every histogram without values."""
        request = self.get("/stats", usedonly="")
        lines = request.body.decode().splitlines()
        self.assertIn("cluster.api.upstream_cx_total: 3", lines)
        self.assertIn(RQ_TIME_LINE, lines)
        self.assertNotIn("server.total_connections: 0", lines)
        self.assertTrue(all(not line.endswith(": 0") for line in lines))
        self.assertNotIn("No recorded values", request.body.decode())

    def test_json(self) -> None:
        """C{?format=json} gives C{{"stats": [{"name", "value"}, ...]}}, filtered like the text."""
        request = self.get("/stats", format="json", filter="^cluster\\.api\\.upstream_cx_(total|active)$")
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(header(request, "content-type"), "application/json")
        self.assertEqual(json.loads(request.body), {"stats": [
            {"name": "cluster.api.upstream_cx_active", "value": 2},
            {"name": "cluster.api.upstream_cx_total", "value": 3},
        ], "histograms": []})

    def test_formatPrometheus(self) -> None:
        """C{?format=prometheus} is the same exposition as C{/stats/prometheus}."""
        request = self.get("/stats", format="prometheus")
        self.assertEqual(header(request, "content-type"), PROMETHEUS_TYPE)
        self.assertEqual(request.body, self.get("/stats/prometheus").body)

    def test_unknownFormat(self) -> None:
        """An unknown C{?format} is a 400."""
        request = self.get("/stats", format="yaml")
        self.assertEqual(request.responseCode, 400)


class HistogramStatsTests(AdminTestCase):
    """
    Histograms in C{/stats}: estimated quantiles in the text, a C{histograms} section in the JSON.
    """

    def test_textQuantiles(self) -> None:
        """A histogram's line gives its ten cumulative quantile estimates, Envoy's way but without intervals."""
        lines = self.get("/stats", filter="upstream_rq_time$").body.decode().splitlines()
        self.assertEqual(lines, [RQ_TIME_LINE])

    def test_textEmpty(self) -> None:
        """A histogram with no values says so, as Envoy's does."""
        lines = self.get("/stats", filter="downstream_rq_time").body.decode().splitlines()
        self.assertEqual(lines, ["http.edge.downstream_rq_time: No recorded values"])

    def test_textAfterCounters(self) -> None:
        """Histograms come after every counter and gauge, even those whose names sort later."""
        self.server.stats.histogram("a.first_time").record(1)
        lines = self.get("/stats").body.decode().splitlines()
        at = [i for i, line in enumerate(lines) if line.startswith("a.first_time: P0(")]
        self.assertEqual(len(at), 1)
        # Every counter and gauge (a "name: number" line) comes before it.
        self.assertFalse(any(line.rsplit(": ", 1)[1].lstrip("-").isdigit() for line in lines[at[0]:]))

    def test_textRounds(self) -> None:
        """Estimates are printed to six significant digits, without float noise or a trailing C{.0}."""
        h = self.server.stats.histogram("t")
        for ms in (1.1, 1.2, 1.3):
            h.record(ms)
        [line] = self.get("/stats", filter="^t$").body.decode().splitlines()
        self.assertEqual(line, "t: P0(1) P25(2) P50(3) P75(4) P90(4.6) P95(4.8) P99(4.96) P99.5(4.98) "
                               "P99.9(4.996) P100(5)")

    def test_json(self) -> None:
        """C{?format=json} has a C{histograms} section with quantiles, count and sum; C{null} quantiles when empty."""
        request = self.get("/stats", format="json", filter="rq_time$")
        body = json.loads(request.body)
        self.assertEqual(body["stats"], [])
        self.assertEqual(body["histograms"], [
            {"name": "cluster.api.upstream_rq_time", "count": 5, "sum": 210.0, "quantiles": {
                "P0": 1, "P25": 6.25, "P50": 31.25, "P75": 46.875, "P90": 175, "P95": 212.5, "P99": 242.5,
                "P99.5": 246.25, "P99.9": 249.25, "P100": 250}},
            {"name": "http.edge.downstream_rq_time", "count": 0, "sum": 0.0, "quantiles": {
                label: None for label in ["P0", "P25", "P50", "P75", "P90", "P95", "P99", "P99.5", "P99.9",
                                          "P100"]}},
        ])

    def test_jsonUsedOnly(self) -> None:
        """C{?usedonly} drops empty histograms from the JSON too."""
        body = json.loads(self.get("/stats", format="json", usedonly="").body)
        self.assertEqual([h["name"] for h in body["histograms"]], ["cluster.api.upstream_rq_time"])
        self.assertNotIn("server.total_connections", [s["name"] for s in body["stats"]])

    def test_filter(self) -> None:
        """C{?filter} selects histograms by their full name."""
        body = json.loads(self.get("/stats", format="json", filter="^http\\.").body)
        self.assertEqual([h["name"] for h in body["histograms"]], ["http.edge.downstream_rq_time"])
        self.assertEqual(self.get("/stats", filter="^server\\.").body, b"server.total_connections: 0\n")


class PrometheusEndpointTests(AdminTestCase):
    """
    C{/stats/prometheus}.
    """

    def test_exposition(self) -> None:
        """The exposition has Envoy's metric names with the cluster as a label, and parses."""
        request = self.get("/stats/prometheus")
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(header(request, "content-type"), PROMETHEUS_TYPE)
        text = request.body.decode()
        self.assertIn('envoy_cluster_upstream_cx_total{envoy_cluster_name="api"} 3.0\n', text)
        self.assertIn("# TYPE envoy_cluster_upstream_cx_total counter\n", text)
        families = {f.name: f for f in text_string_to_metric_families(text)}
        family = families["envoy_cluster_upstream_cx"]
        self.assertEqual(family.type, "counter")
        self.assertEqual(
            sorted((s.name, s.labels["envoy_cluster_name"], s.value) for s in family.samples),
            [("envoy_cluster_upstream_cx_total", "api", 3.0), ("envoy_cluster_upstream_cx_total", "web", 5.0)],
        )
        active = families["envoy_cluster_upstream_cx_active"]
        self.assertEqual(active.type, "gauge")
        self.assertEqual([(s.labels, s.value) for s in active.samples], [({"envoy_cluster_name": "api"}, 2.0)])

    def test_filtered(self) -> None:
        """C{?filter} and C{?usedonly} narrow the exposition as they narrow C{/stats}, histograms included."""
        request = self.get("/stats/prometheus", usedonly="",
                           filter="^(cluster\\.api|http\\.edge)\\.(upstream|membership|downstream)")
        names = {f.name for f in text_string_to_metric_families(request.body.decode())}
        self.assertEqual(names, {"envoy_cluster_upstream_cx", "envoy_cluster_upstream_cx_active",
                                 "envoy_cluster_membership_total", "envoy_cluster_membership_healthy",
                                 "envoy_cluster_upstream_rq_time"})

    def test_histogram(self) -> None:
        """A histogram is a Prometheus histogram with the cluster as a label and Envoy's C{le} values."""
        text = self.get("/stats/prometheus").body.decode()
        self.assertIn("# TYPE envoy_cluster_upstream_rq_time histogram\n", text)
        self.assertIn('envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name="api",le="0.5"} 0.0\n', text)
        self.assertIn('envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name="api",le="250"} 5.0\n', text)
        self.assertIn('envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name="api",le="+Inf"} 5.0\n', text)
        self.assertIn('envoy_cluster_upstream_rq_time_count{envoy_cluster_name="api"} 5.0\n', text)
        self.assertIn('envoy_cluster_upstream_rq_time_sum{envoy_cluster_name="api"} 210.0\n', text)
        family = {f.name: f for f in text_string_to_metric_families(text)}["envoy_http_downstream_rq_time"]
        self.assertEqual(family.type, "histogram")
        self.assertEqual({s.labels["envoy_http_conn_manager_prefix"] for s in family.samples}, {"edge"})

    def test_badFilter(self) -> None:
        """An invalid regex is a 400 here too."""
        self.assertEqual(self.get("/stats/prometheus", filter="[").responseCode, 400)


class PrometheusCollectorTests(TestCase):
    """
    L{StatsCollector} and L{PrometheusExporter}.
    """

    def families(self, stats: StatsStore, prefix: str = "envoy_"):
        """
        The parsed exposition of C{stats}, by family name.
        """
        text = PrometheusExporter(stats, prefix).generate().decode()
        return {f.name: f for f in text_string_to_metric_families(text)}

    def test_groupsLabelSets(self) -> None:
        """The same stat of several clusters is one family, declared once, with a sample per cluster."""
        stats = StatsStore()
        for name, value in (("a", 1), ("b", 2), ("c", 3)):
            stats.scope("cluster", name).gauge("upstream_cx_active").value = value
        text = PrometheusExporter(stats).generate().decode()
        self.assertEqual(text.count("# TYPE envoy_cluster_upstream_cx_active gauge"), 1)
        family = self.families(stats)["envoy_cluster_upstream_cx_active"]
        self.assertEqual([(s.labels["envoy_cluster_name"], s.value) for s in family.samples],
                         [("a", 1.0), ("b", 2.0), ("c", 3.0)])

    def test_counterTotalNotDoubled(self) -> None:
        """A counter already ending in C{_total} keeps its name exactly, as in Envoy's exposition."""
        stats = StatsStore()
        stats.scope("cluster", "api").counter("upstream_rq_total").value = 4
        text = PrometheusExporter(stats).generate().decode()
        self.assertIn('envoy_cluster_upstream_rq_total{envoy_cluster_name="api"} 4.0\n', text)
        self.assertNotIn("_total_total", text)

    def test_counterGetsTotal(self) -> None:
        """A counter without C{_total} is exposed with it, typed counter (Prometheus requires the suffix)."""
        stats = StatsStore()
        counter = stats.scope("cluster", "api").counter("upstream_cx_connect_fail")
        counter.value = 1
        self.assertEqual(metricName(counter), "envoy_cluster_upstream_cx_connect_fail_total")
        family = self.families(stats)["envoy_cluster_upstream_cx_connect_fail"]
        self.assertEqual(family.type, "counter")
        self.assertEqual(family.samples[0].name, "envoy_cluster_upstream_cx_connect_fail_total")

    def test_gaugeKeepsName(self) -> None:
        """A gauge is typed gauge and keeps its name, even one ending in C{_total}."""
        stats = StatsStore()
        stats.scope("cluster", "api").gauge("membership_total").value = 2
        family = self.families(stats)["envoy_cluster_membership_total"]
        self.assertEqual((family.type, family.samples[0].value), ("gauge", 2.0))

    def test_prefix(self) -> None:
        """The prefix is a constructor argument."""
        stats = StatsStore()
        stats.counter("server.restarts").value = 1
        self.assertIn("mesh_server_restarts", self.families(stats, prefix="mesh_"))
        self.assertEqual(StatsCollector(stats, "x_").prefix, "x_")

    def test_sanitises(self) -> None:
        """Characters a metric name cannot hold (dots, dashes) become underscores."""
        stats = StatsStore()
        stats.root.scope("my-thing").gauge("queue.depth").value = 1
        self.assertIn("envoy_my_thing_queue_depth", self.families(stats))

    def test_duplicateSeriesDropped(self) -> None:
        """Two stats that sanitise to the same name and labels give one sample, not a duplicate series."""
        stats = StatsStore()
        stats.counter("a.b_total").value = 1
        stats.counter("a_b_total").value = 2
        samples = self.families(stats)["envoy_a_b"].samples
        self.assertEqual(len(samples), 1)

    def test_mixedKindsDropped(self) -> None:
        """A gauge whose name collides with a counter's is left out rather than making the scrape unparsable."""
        stats = StatsStore()
        stats.scope("cluster", "api").gauge("upstream_x_total").value = 2
        stats.counter("cluster.upstream_x_total").value = 1
        family = self.families(stats)["envoy_cluster_upstream_x_total"]
        self.assertEqual([(family.type, s.labels, s.value) for s in family.samples],
                         [("gauge", {"envoy_cluster_name": "api"}, 2.0)])

    def test_ownRegistry(self) -> None:
        """Each exporter has its own registry; nothing reaches prometheus_client's global one."""
        one, two = StatsStore(), StatsStore()
        one.counter("only_in_one_total").value = 1
        first, second = PrometheusExporter(one), PrometheusExporter(two)
        self.assertIsNot(first.registry, REGISTRY)
        self.assertIn(b"envoy_only_in_one_total", first.generate())
        self.assertNotIn(b"only_in_one", second.generate())
        self.assertNotIn(b"only_in_one", generate_latest(REGISTRY))

    def test_histogramParsesBack(self) -> None:
        """A histogram's exposition parses back: cumulative buckets per bound, C{+Inf} equal to C{_count}, C{_sum}."""
        stats = StatsStore()
        h = stats.scope("cluster", "api").histogram("upstream_rq_time")
        values = [0.5, 0.7, 3, 5, 5.01, 99, 100, 2000, 2000, 7e6]
        for ms in values:
            h.record(ms)
        family = self.families(stats)["envoy_cluster_upstream_rq_time"]
        self.assertEqual(family.type, "histogram")
        buckets = [s for s in family.samples if s.name == "envoy_cluster_upstream_rq_time_bucket"]
        self.assertEqual([s.labels["le"] for s in buckets], [bucketLabel(b) for b in DEFAULT_BUCKETS] + ["+Inf"])
        for s in buckets:
            self.assertEqual(s.labels["envoy_cluster_name"], "api")
            bound = float(s.labels["le"])
            self.assertEqual(s.value, sum(1 for v in values if v <= bound), s.labels["le"])
        counts = [s.value for s in buckets]
        self.assertEqual(counts, sorted(counts))
        [count] = [s for s in family.samples if s.name == "envoy_cluster_upstream_rq_time_count"]
        [total] = [s for s in family.samples if s.name == "envoy_cluster_upstream_rq_time_sum"]
        self.assertEqual((count.value, buckets[-1].value, total.value), (10.0, 10.0, sum(values)))
        self.assertEqual(count.labels, {"envoy_cluster_name": "api"})

    def test_histogramLabelSets(self) -> None:
        """The same histogram of two clusters is one family, declared once, with a set of samples per cluster."""
        stats = StatsStore()
        stats.scope("cluster", "a").histogram("upstream_rq_time").record(1)
        stats.scope("cluster", "b").histogram("upstream_rq_time").record(1e9)
        text = PrometheusExporter(stats).generate().decode()
        self.assertEqual(text.count("# TYPE envoy_cluster_upstream_rq_time histogram"), 1)
        family = self.families(stats)["envoy_cluster_upstream_rq_time"]
        counts = {(s.labels["envoy_cluster_name"], s.labels["le"]): s.value
                  for s in family.samples if s.name.endswith("_bucket")}
        self.assertEqual((counts[("a", "1")], counts[("b", "1")], counts[("b", "+Inf")]), (1.0, 0.0, 1.0))

    def test_emptyHistogram(self) -> None:
        """A histogram without values is exposed with zero counts, as Envoy exposes it."""
        stats = StatsStore()
        stats.histogram("t")
        family = self.families(stats)["envoy_t"]
        self.assertEqual({s.value for s in family.samples}, {0.0})
        self.assertEqual(len(family.samples), len(DEFAULT_BUCKETS) + 3)

    def test_bucketLabel(self) -> None:
        """Bounds are written as Envoy writes them: shortest form, no C{.0}, no exponent for Envoy's bounds."""
        self.assertEqual([bucketLabel(b) for b in (0.5, 1.0, 250, 3600000.0)], ["0.5", "1", "250", "3600000"])
        self.assertEqual(metricName(StatsStore().histogram("x.y_ms")), "envoy_x_y_ms")

    def test_histogramSuffixClash(self) -> None:
        """A gauge named like a histogram's C{_count} sample is left out rather than corrupt the histogram."""
        stats = StatsStore()
        stats.histogram("t").record(1)
        stats.gauge("t_count").value = 9
        families = self.families(stats)
        self.assertNotIn("envoy_t_count", families)
        [count] = [s for s in families["envoy_t"].samples if s.name == "envoy_t_count"]
        self.assertEqual(count.value, 1.0)

    def test_liveValues(self) -> None:
        """Every scrape reads the stats' current values."""
        stats = StatsStore()
        counter = stats.counter("hits_total")
        exporter = PrometheusExporter(stats)
        counter.value = 41
        self.assertIn(b"envoy_hits_total 41.0", exporter.generate())
        counter.value += 1
        self.assertIn(b"envoy_hits_total 42.0", exporter.generate())


class ClustersTests(AdminTestCase):
    """
    C{/clusters}.
    """

    def test_text(self) -> None:
        """Each host has Envoy's C{cluster::host::stat::value} lines: figures, weight, health and its reason."""
        request = self.get("/clusters")
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(header(request, "content-type"), "text/plain; charset=utf-8")
        lines = request.body.decode().splitlines()
        first = "api::tcp:127.0.0.1:9001::"
        for line in ["cx_total::7", "cx_active::1", "cx_connect_fail::0", "rq_total::9", "rq_active::0",
                     "rq_error::2", "weight::1", "health_flags::healthy",
                     "health_reason::no health checking configured"]:
            self.assertIn(first + line, lines)
        self.assertIn("api::tcp:127.0.0.1:9002::weight::3", lines)
        self.assertEqual(len(lines), 2 * 9)

    def test_unhealthy(self) -> None:
        """An unhealthy host shows C{unhealthy} and why."""
        host = self.server.clusters["api"].hosts[1]
        host.healthy = False
        host.healthReason = "3 consecutive 5xx"
        lines = self.get("/clusters").body.decode().splitlines()
        self.assertIn("api::tcp:127.0.0.1:9002::health_flags::unhealthy", lines)
        self.assertIn("api::tcp:127.0.0.1:9002::health_reason::3 consecutive 5xx", lines)

    def test_json(self) -> None:
        """C{?format=json} gives C{cluster_statuses} with every host's address, weight, health and stats."""
        self.server.clusters["api"].hosts[1].healthy = False
        request = self.get("/clusters", format="json")
        self.assertEqual(header(request, "content-type"), "application/json")
        body = json.loads(request.body)
        [cluster] = body["cluster_statuses"]
        self.assertEqual(cluster["name"], "api")
        first, second = cluster["host_statuses"]
        self.assertEqual(first, {
            "address": "tcp:127.0.0.1:9001", "weight": 1, "health": "healthy",
            "health_reason": "no health checking configured",
            "stats": {"cx_total": 7, "cx_active": 1, "cx_connect_fail": 0, "rq_total": 9, "rq_active": 0,
                      "rq_error": 2},
        })
        self.assertEqual((second["address"], second["weight"], second["health"]),
                         ("tcp:127.0.0.1:9002", 3, "unhealthy"))

    def test_redactsEndpoint(self) -> None:
        """A host's endpoint string shows no C{privateKey} value, in text or JSON."""
        cluster = self.server.clusters["api"]
        cluster.hosts = cluster.hosts + (Host(TLS_ENDPOINT, None, 1),)
        for request in (self.get("/clusters"), self.get("/clusters", format="json")):
            self.assertNotIn(b"client.key", request.body)
            self.assertIn(b"privateKey=[redacted]:trustRoots=ca", request.body)

    def test_badFormat(self) -> None:
        """An unknown C{?format} is a 400."""
        self.assertEqual(self.get("/clusters", format="xml").responseCode, 400)


class ConfigDumpTests(AdminTestCase):
    """
    C{/config_dump}.
    """

    def dump(self) -> dict:
        """
        The parsed C{/config_dump}.
        """
        request = self.get("/config_dump")
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(header(request, "content-type"), "application/json")
        return json.loads(request.body)

    def test_dump(self) -> None:
        """The whole effective configuration, with its file name, as plain JSON."""
        dump = self.dump()
        self.assertEqual(dump["file"], "etc/mesh.ini")
        self.assertEqual(dump["mesh"], {"admin": "tcp:9901:interface=127.0.0.1", "admin_tls": None,
                                        "admin_allowed_hosts": [], "drain_timeout": 10.0, "workers": 1,
                                        "workers_sharing": "reuseport", "xds": None, "tracing": None})
        self.assertEqual(dump["clusters"]["api"]["endpoints"], [
            {"endpoint": "tcp:127.0.0.1:9001", "weight": 1}, {"endpoint": "tcp:127.0.0.1:9002", "weight": 3},
        ])
        self.assertEqual(dump["listeners"]["edge"]["filters"], ["tcp_proxy"])
        self.assertEqual(dump["filters"]["ext_authz"]["items"]["timeout"], "250ms")
        self.assertEqual(dump["echoes"], {})

    def test_redactsSecretKeys(self) -> None:
        """Keys naming a private key, password, secret or token have their values replaced, at any depth."""
        dump = self.dump()
        items = dump["filters"]["ext_authz"]["items"]
        for key in ("api_token", "client_secret", "Upstream-Password", "tls.private_key"):
            self.assertEqual(items[key], "[redacted]")
        text = json.dumps(dump)
        for secret in ("t0k3n", "s3cr3t", "hunter2", "authz.key"):
            self.assertNotIn(secret, text)

    def test_keepsTokenBucket(self) -> None:
        """The rate limiter's token-bucket counts are not secrets and stay visible."""
        self.assertEqual(self.dump()["filters"]["local_ratelimit"]["items"],
                         {"max_tokens": "100", "tokens_per_fill": "10"})

    def test_redactsEndpointPrivateKey(self) -> None:
        """An endpoint string's C{privateKey=} value is redacted, the rest of the string kept."""
        [host] = self.dump()["clusters"]["db"]["endpoints"]
        self.assertEqual(host["endpoint"], TLS_ENDPOINT.replace("/etc/pki/client.key", "[redacted]"))

    def test_noConfig(self) -> None:
        """Without a configuration the dump is an empty object."""
        self.server.config = None
        self.assertEqual(self.dump(), {})

    def test_redactEndpointEscapedColon(self) -> None:
        """An escaped colon inside a C{privateKey} value does not end the redaction early."""
        self.assertEqual(redactEndpoint(r"tls:privateKey=C\:\\keys\\k.pem:port=1"),
                         "tls:privateKey=[redacted]:port=1")
        self.assertEqual(redactEndpoint("tcp:privatekeyfile=1"), "tcp:privatekeyfile=1")

    def test_redactNested(self) -> None:
        """L{redact} descends into lists and mappings inside mappings."""
        self.assertEqual(redact({"a": [{"password": "x", "b": MappingProxyType({"Token": 1})}]}),
                         {"a": [{"password": "[redacted]", "b": {"Token": "[redacted]"}}]})


class MutatingTests(AdminTestCase):
    """
    C{/healthcheck/fail}, C{/healthcheck/ok} and C{/quitquitquit}.
    """

    def test_healthCheckFail(self) -> None:
        """C{POST /healthcheck/fail} sets C{healthCheckFailed}."""
        request = self.post("/healthcheck/fail")
        self.assertEqual((request.responseCode, request.body), (200, b"OK\n"))
        self.assertTrue(self.server.healthCheckFailed)

    def test_healthCheckOk(self) -> None:
        """C{POST /healthcheck/ok} clears C{healthCheckFailed}."""
        self.server.healthCheckFailed = True
        request = self.post("/healthcheck/ok")
        self.assertEqual((request.responseCode, request.body), (200, b"OK\n"))
        self.assertFalse(self.server.healthCheckFailed)

    def test_quit(self) -> None:
        """C{POST /quitquitquit} answers first and shuts the server down on the next reactor turn."""
        request = self.post("/quitquitquit")
        self.assertEqual((request.responseCode, request.body), (200, b"OK\n"))
        self.assertEqual(self.server.shutdowns, 0)
        self.clock.advance(0)
        self.assertEqual(self.server.shutdowns, 1)

    def test_getIsNotAllowed(self) -> None:
        """A C{GET} of a mutating endpoint is a 405 with C{Allow: POST} and changes nothing."""
        self.server.healthCheckFailed = True
        for path in ("/healthcheck/fail", "/healthcheck/ok", "/quitquitquit"):
            for method in (b"GET", b"HEAD", b"PUT"):
                request = render(self.resource, path, method)
                self.assertEqual(request.responseCode, 405, (path, method))
                self.assertEqual(header(request, "allow"), "POST")
        self.clock.advance(0)
        self.assertEqual(self.server.shutdowns, 0)
        self.assertTrue(self.server.healthCheckFailed)

    def test_postToReadOnlyIsNotAllowed(self) -> None:
        """A C{POST} to a read-only endpoint is a 405 naming C{GET} and C{HEAD}."""
        request = self.post("/stats")
        self.assertEqual(request.responseCode, 405)
        self.assertEqual(header(request, "allow"), "GET, HEAD")


class IndexTests(AdminTestCase):
    """
    C{/}, unknown paths, and the headers of every response.
    """

    PATHS = ["/clusters", "/config_dump", "/healthcheck/fail", "/healthcheck/ok", "/quitquitquit", "/ready",
             "/stats", "/stats/prometheus"]

    def test_home(self) -> None:
        """C{GET /help} lists every endpoint (C{GET /} is the HTML dashboard: tests/test_dashboard.py)."""
        request = self.get("/help")
        self.assertEqual(request.responseCode, 200)
        body = request.body.decode()
        for path in self.PATHS:
            self.assertIn(f"  {path}", body)
        self.assertIn("/quitquitquit (POST)", body)

    def test_unknownPath(self) -> None:
        """An unknown path is a 404 that lists the endpoints."""
        request = self.get("/nope/x")
        self.assertEqual(request.responseCode, 404)
        self.assertTrue(request.body.startswith(b"unknown path /nope/x\n"))
        for path in self.PATHS:
            self.assertIn(path.encode(), request.body)

    def test_commonHeaders(self) -> None:
        """Every response, errors included, sets a content type, no caching and nosniff."""
        requests = [self.get(p) for p in ["/", "/ready", "/stats", "/stats/prometheus", "/clusters",
                                          "/config_dump", "/nope", "/quitquitquit"]]
        requests += [self.get("/stats", filter="("), self.post("/healthcheck/ok")]
        self.server.state = "DRAINING"
        requests.append(self.get("/ready"))
        for request in requests:
            self.assertIsNotNone(header(request, "content-type"))
            self.assertEqual(header(request, "cache-control"), "no-cache, max-age=0")
            self.assertEqual(header(request, "x-content-type-options"), "nosniff")


class SiteTests(TestCase):
    """
    L{makeAdminSite}, driven over a memory transport.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.server = FakeServer(self.clock)
        self.site = makeAdminSite(self.server, self.clock)

    def exchange(self, raw: bytes) -> bytes:
        """
        Send C{raw} to a new connection to the site and return what it wrote back.
        """
        protocol = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 12345))
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(raw)
        response = transport.value()
        protocol.connectionLost(None)
        return response

    def test_servesHTTP(self) -> None:
        """A raw HTTP/1.1 request gets the admin's response."""
        response = self.exchange(b"GET /ready HTTP/1.1\r\nHost: 127.0.0.1:9901\r\n\r\n")
        self.assertTrue(response.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertTrue(response.endswith(b"\r\n\r\nLIVE\n"))
        self.assertIn(b"X-Content-Type-Options: nosniff\r\n", response)

    def test_head(self) -> None:
        """C{HEAD} gets the headers of C{GET}, with its length, and no body (nor twisted.web's warning about one)."""
        events: List[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        response = self.exchange(b"HEAD /ready HTTP/1.1\r\nHost: 127.0.0.1:9901\r\n\r\n")
        self.assertTrue(response.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertIn(b"Content-Length: 5\r\n", response)
        self.assertTrue(response.endswith(b"\r\n\r\n"))
        self.assertEqual(events, [])

    def test_bareUsedOnly(self) -> None:
        """A bare C{?usedonly} (no C{=}), which twisted.web leaves out of C{request.args}, still applies."""
        response = self.exchange(b"GET /stats?usedonly HTTP/1.1\r\nHost: 127.0.0.1:9901\r\n\r\n")
        self.assertIn(b"cluster.api.upstream_cx_total: 3\n", response)
        self.assertNotIn(b"server.total_connections", response)

    def test_idleTimeoutOnInjectedReactor(self) -> None:
        """Connections time out on the reactor given to L{makeAdminSite}, not on the global one."""
        protocol = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 12345))
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.clock.advance(self.site.timeOut + 1)
        self.assertTrue(transport.disconnecting)

    def test_noAccessLog(self) -> None:
        """Requests leave no access-log line and no factory chatter in the log."""
        events: List[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.site.doStart()
        self.addCleanup(self.site.doStop)
        self.exchange(b"GET /stats HTTP/1.1\r\nHost: 127.0.0.1:9901\r\nUser-Agent: probe\r\n\r\n")
        self.assertEqual(events, [])


class LoopbackTests(TestCase):
    """
    The admin site listening on loopback with the real reactor, queried with treq over real HTTP.
    """

    async def test_endpoints(self) -> None:
        """Every endpoint answers over real HTTP as it does in memory, and C{/quitquitquit} stops the server."""
        server = FakeServer(globalReactor)
        server.state = "STARTING"
        wrapper = WrappingFactory(makeAdminSite(server, globalReactor))
        port = await serverFromString(globalReactor, "tcp:0:interface=127.0.0.1").listen(wrapper)
        pool = HTTPConnectionPool(globalReactor)
        client = treq.client.HTTPClient(Agent(globalReactor, pool=pool))

        async def closeAll() -> None:
            await pool.closeCachedConnections()
            await port.stopListening()
            # The server's side of each connection closes a moment after the client's.
            await waitFor(lambda: not wrapper.protocols, 5, "the admin's connections to close")

        self.addCleanup(lambda: Deferred.fromCoroutine(closeAll()))
        base = f"http://127.0.0.1:{port.getHost().port}"

        async def fetch(method: str, path: str):
            response = await client.request(method, base + path)
            return response.code, await response.content(), response.headers

        self.assertEqual((await fetch("GET", "/ready"))[:2], (503, b"STARTING\n"))
        server.state = "LIVE"
        self.assertEqual((await fetch("GET", "/ready"))[:2], (200, b"LIVE\n"))

        code, body, headers = await fetch("GET", "/stats?filter=cluster%5C.api%5C.(upstream_cx|membership)&usedonly")
        self.assertEqual((code, body), (200, b"cluster.api.membership_healthy: 2\ncluster.api.membership_total: 2\n"
                                             b"cluster.api.upstream_cx_active: 2\ncluster.api.upstream_cx_total: 3\n"))
        self.assertEqual(headers.getRawHeaders("cache-control"), ["no-cache, max-age=0"])
        code, body, _ = await fetch("GET", "/stats?format=json&filter=web")
        self.assertEqual(json.loads(body), {"stats": [{"name": "cluster.web.upstream_cx_total", "value": 5}],
                                            "histograms": []})
        self.assertEqual((await fetch("GET", "/stats?filter=%28"))[0], 400)

        code, body, headers = await fetch("GET", "/stats/prometheus")
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders("content-type"), [PROMETHEUS_TYPE])
        samples = {(s.name, tuple(s.labels.items())): s.value
                   for f in text_string_to_metric_families(body.decode()) for s in f.samples}
        self.assertEqual(samples[("envoy_cluster_upstream_cx_total", (("envoy_cluster_name", "api"),))], 3.0)

        code, body, _ = await fetch("GET", "/clusters")
        self.assertIn(b"api::tcp:127.0.0.1:9001::cx_total::7\n", body)
        code, body, _ = await fetch("GET", "/clusters?format=json")
        self.assertEqual(json.loads(body)["cluster_statuses"][0]["host_statuses"][1]["weight"], 3)

        code, body, _ = await fetch("GET", "/config_dump")
        self.assertEqual(json.loads(body)["filters"]["ext_authz"]["items"]["client_secret"], "[redacted]")

        code, _, headers = await fetch("GET", "/healthcheck/fail")
        self.assertEqual((code, headers.getRawHeaders("allow")), (405, ["POST"]))
        self.assertFalse(server.healthCheckFailed)
        self.assertEqual((await fetch("POST", "/healthcheck/fail"))[:2], (200, b"OK\n"))
        self.assertTrue(server.healthCheckFailed)
        self.assertEqual((await fetch("POST", "/healthcheck/ok"))[:2], (200, b"OK\n"))
        self.assertFalse(server.healthCheckFailed)

        self.assertEqual((await fetch("GET", "/nope"))[0], 404)
        self.assertEqual((await fetch("GET", "/quitquitquit"))[0], 405)
        self.assertEqual(server.shutdowns, 0)
        self.assertEqual((await fetch("POST", "/quitquitquit"))[:2], (200, b"OK\n"))
        await deferLater(globalReactor, 0, lambda: None)
        self.assertEqual(server.shutdowns, 1)


class ReloadingServer(FakeServer):
    """
    A L{FakeServer} that can also reload and drain (so the admin has C{/reload} and C{/drain_listeners}),
    counting the calls.
    """

    def __init__(self, reactor) -> None:
        super().__init__(reactor)
        self.reloads = 0
        self.drains: List[bool] = []

    def reload(self):
        self.reloads += 1
        return {"ok": True, "applied": True, "errors": []}

    def drain(self, graceful: bool = True):
        self.drains.append(graceful)


class CrossSiteTests(TestCase):
    """
    A C{POST} that a browser says another site's page sent is refused (403, with the reason); one from the
    admin's own pages, or from a client that sends no C{Origin} (curl), is served.
    """

    POST_PATHS = ["/healthcheck/fail", "/healthcheck/ok", "/quitquitquit", "/reload", "/drain_listeners"]

    def setUp(self) -> None:
        self.clock = Clock()
        self.server = ReloadingServer(self.clock)
        # A name the admin is reached by (through an SSH tunnel, say): allowed as a Host.
        self.server.config = withAllowedHosts(self.server.config, "admin.internal")
        self.resource = AdminResource(self.server, self.clock)

    def post(self, path: str, headers: Dict[str, str], host: Optional[str] = "127.0.0.1:9901",
             secure: bool = False, method: bytes = b"POST") -> DummyRequest:
        """
        C{POST path} with request C{headers}, C{Host: host}, over TLS if C{secure}.
        """
        request = DummyRequest([s.encode() for s in path.lstrip("/").split("/")])
        request.method = method
        request.isSecure = lambda: secure
        if host is not None:
            request.requestHeaders.setRawHeaders(b"host", [host.encode()])
        for name, value in headers.items():
            request.requestHeaders.setRawHeaders(name.encode(), [value.encode()])
        request.body = self.resource.render(request)
        return request

    def assertNothingDone(self) -> None:
        self.clock.advance(0)
        self.assertEqual((self.server.healthCheckFailed, self.server.shutdowns, self.server.reloads,
                          self.server.drains), (False, 0, 0, []))

    def test_crossSiteFetchRefused(self) -> None:
        """
        C{Sec-Fetch-Site: cross-site} or C{same-site} (another site, or another port or subdomain of this
        one) is a 403 on every C{POST} endpoint, with a plain-text reason, and changes nothing.
        """
        for site in ("cross-site", "same-site"):
            for path in self.POST_PATHS:
                request = self.post(path, {"Sec-Fetch-Site": site, "Origin": "http://127.0.0.1:9901"})
                self.assertEqual(request.responseCode, 403, (site, path))
                self.assertEqual(header(request, "content-type"), "text/plain; charset=utf-8")
                self.assertTrue(request.body.startswith(
                    f"cross-site request refused: Sec-Fetch-Site is {site}: the admin's POST endpoints take "
                    f"requests from its own pages".encode()), request.body)
        self.assertNothingDone()

    def test_foreignOriginRefused(self) -> None:
        """
        An C{Origin} that is not the request's own C{scheme://host:port} is a 403 naming both (a browser
        without C{Sec-Fetch-*} headers still sends C{Origin} with a form's C{POST}).
        """
        cases = [
            ("http://evil.example", "127.0.0.1:9901", False),
            ("http://127.0.0.1:8080", "127.0.0.1:9901", False),  # another port of the same host
            ("https://127.0.0.1:9901", "127.0.0.1:9901", False),  # another scheme
            ("http://127.0.0.1:9901", "127.0.0.1:9901", True),
            ("http://localhost:9901", "127.0.0.1:9901", False),
            ("null", "127.0.0.1:9901", False),  # a sandboxed frame, a data: URL
            ("http://127.0.0.1:99999", "127.0.0.1:9901", False),  # not a port
        ]
        for origin, host, secure in cases:
            for path in self.POST_PATHS:
                request = self.post(path, {"Origin": origin}, host, secure)
                self.assertEqual(request.responseCode, 403, (origin, path))
                self.assertIn(f"cross-site request refused: Origin {origin} is not this admin endpoint".encode(),
                              request.body)
        request = self.post("/quitquitquit", {"Origin": "http://evil.example"})
        self.assertIn(b"(http://127.0.0.1:9901)", request.body)
        self.assertNothingDone()

    def test_sameOriginServed(self) -> None:
        """
        A C{POST} from the admin's own page (C{Origin} matches, C{Sec-Fetch-Site: same-origin}) is served,
        default ports, IPv6 literals, letter case and TLS included.
        """
        cases = [
            ("http://127.0.0.1:9901", "127.0.0.1:9901", False),
            ("http://admin.internal", "admin.internal:80", False),
            ("http://admin.internal:80", "admin.internal", False),
            ("https://admin.internal", "Admin.Internal", True),
            ("https://[::1]:9901", "[::1]:9901", True),
            ("HTTP://LocalHost:9901", "localhost:9901", False),
        ]
        for origin, host, secure in cases:
            self.server.healthCheckFailed = False
            request = self.post("/healthcheck/fail", {"Origin": origin, "Sec-Fetch-Site": "same-origin"},
                                host, secure)
            self.assertEqual((request.responseCode, request.body), (200, b"OK\n"), origin)
            self.assertTrue(self.server.healthCheckFailed)

    def test_userInitiatedServed(self) -> None:
        """C{Sec-Fetch-Site: none} (the user made the request, not a page) is served."""
        request = self.post("/healthcheck/fail", {"Sec-Fetch-Site": "none"})
        self.assertEqual(request.responseCode, 200)
        self.assertTrue(self.server.healthCheckFailed)

    def test_scriptsServed(self) -> None:
        """A client that sends neither header (curl, a script) is served, with a C{Host} or without one."""
        for host in ("127.0.0.1:9901", None):
            request = self.post("/reload", {}, host)
            self.assertEqual(request.responseCode, 200)
        self.assertEqual(self.server.reloads, 2)
        self.assertEqual(self.post("/drain_listeners", {}).responseCode, 200)
        self.assertEqual(self.server.drains, [False])

    def test_noHostHeader(self) -> None:
        """Without C{Host} (HTTP/1.0), C{Origin} is compared with the address the request came in on."""
        self.assertEqual(self.post("/healthcheck/fail", {"Origin": "http://127.0.0.1"}, None).responseCode, 200)
        self.assertEqual(self.post("/healthcheck/ok", {"Origin": "http://127.0.0.2"}, None).responseCode, 403)
        self.assertTrue(self.server.healthCheckFailed)

    def test_readsNotRefused(self) -> None:
        """
        A cross-site C{GET} is answered (it changes nothing, and the browser keeps the answer from the
        other site's page); a cross-site C{GET} of a C{POST} endpoint is still a 405.
        """
        request = self.post("/ready", {"Sec-Fetch-Site": "cross-site", "Origin": "http://evil.example"},
                            method=b"GET")
        self.assertEqual(request.responseCode, 200)
        request = self.post("/quitquitquit", {"Sec-Fetch-Site": "cross-site"}, method=b"GET")
        self.assertEqual(request.responseCode, 405)


class HostTests(TestCase):
    """
    Every request must name the admin in C{Host} by an IP address, C{localhost} or an allowed name: a page
    whose name was made to resolve to the admin's address (DNS rebinding) is same-origin with itself, so
    only its C{Host} gives it away.
    """

    REBINDING = {"Host": "evil.example:9901", "Origin": "http://evil.example:9901", "Sec-Fetch-Site": "same-origin"}

    def setUp(self) -> None:
        self.clock = Clock()
        self.server = ReloadingServer(self.clock)
        self.server.config = withAllowedHosts(self.server.config, "admin.internal", "mesh.example")
        self.resource = AdminResource(self.server, self.clock)

    def request(self, path: str, headers: Dict[str, str], method: bytes = b"GET") -> DummyRequest:
        request = DummyRequest([s.encode() for s in path.lstrip("/").split("/")] if path != "/" else [])
        request.method = method
        request.isSecure = lambda: False
        for name, value in headers.items():
            request.requestHeaders.addRawHeader(name.encode(), value.encode())
        request.body = self.resource.render(request)
        return request

    def assertRefused(self, request: DummyRequest, host: str) -> None:
        self.assertEqual((request.responseCode, request.responseMessage), (421, b"Misdirected Request"), host)
        self.assertEqual(header(request, "content-type"), "text/plain; charset=utf-8")
        self.assertEqual(request.body.decode(), (
            f"misdirected request refused: Host {host} is not a name of this admin endpoint: the admin answers "
            f"requests for an IP address, localhost, or a name listed in [mesh] admin.allowed_hosts (a web page "
            f"whose name was made to resolve to this address must not reach it)\n"))

    def test_rebindingRefused(self) -> None:
        """
        A page at C{evil.example:9901} (same-origin with itself) can neither read the admin (C{/config_dump},
        C{/stats}, the dashboard...) nor drive it (C{/quitquitquit}, C{/reload}): each is a 421 with the
        reason, nothing done, and a warning logged.
        """
        events: List[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for path in ("/config_dump", "/stats", "/stats/prometheus", "/clusters", "/", "/help", "/ready", "/nope"):
            self.assertRefused(self.request(path, self.REBINDING), "evil.example:9901")
        for path in CrossSiteTests.POST_PATHS:
            self.assertRefused(self.request(path, self.REBINDING, b"POST"), "evil.example:9901")
        self.clock.advance(0)
        self.assertEqual((self.server.healthCheckFailed, self.server.shutdowns, self.server.reloads,
                          self.server.drains), (False, 0, 0, []))
        warned = [e for e in events if e.get("log_format", "").startswith("admin: refused")]
        self.assertEqual(len(warned), 13)
        self.assertEqual((warned[0]["method"], warned[0]["path"]), ("GET", "/config_dump"))

    def test_addressesAndLocalhostServed(self) -> None:
        """IP addresses (IPv6 in brackets), C{localhost}, any port or none, letter case aside, are served."""
        for host in ("127.0.0.1", "127.0.0.1:9901", "10.1.2.3:80", "[::1]", "[::1]:9901", "[fe80::1]:1",
                     "localhost", "LocalHost:9901", "localhost.:9901", "127.0.0.1:"):
            request = self.request("/ready", {"Host": host})
            self.assertEqual((request.responseCode, request.body), (200, b"LIVE\n"), host)
        request = self.request("/quitquitquit", {"Host": "[::1]:9901", "Origin": "http://[::1]:9901"}, b"POST")
        self.assertEqual(request.responseCode, 200)

    def test_allowedNamesServed(self) -> None:
        """
        A name of C{[mesh] admin.allowed_hosts} is served (letter case and a trailing dot aside), also with
        the page's own C{Origin}; the names in effect are read per request, so a reload changes them at once.
        """
        for host in ("admin.internal", "Admin.Internal.:9901", "mesh.example:80"):
            request = self.request("/config_dump", {"Host": host})
            self.assertEqual(request.responseCode, 200, host)
        request = self.request("/healthcheck/fail", {"Host": "admin.internal:9901",
                                                     "Origin": "http://admin.internal:9901",
                                                     "Sec-Fetch-Site": "same-origin"}, b"POST")
        self.assertEqual(request.responseCode, 200)
        self.assertTrue(self.server.healthCheckFailed)
        self.server.config = withAllowedHosts(self.server.config, "other.internal")
        self.assertRefused(self.request("/ready", {"Host": "admin.internal"}), "admin.internal")
        self.assertEqual(self.request("/ready", {"Host": "other.internal"}).responseCode, 200)
        self.server.config = None
        self.assertRefused(self.request("/ready", {"Host": "other.internal"}), "other.internal")

    def test_otherHostsRefused(self) -> None:
        """
        Names that are not allowed, names that merely start or end like an allowed one, and C{Host} values
        that are not a host (an IPv6 address without brackets, a bad port, an IPv4 address in brackets).
        """
        for host in ("evil.example", "localhost.evil.example", "127.0.0.1.evil.example", "admin.internal.evil",
                     "xadmin.internal", "::1", "[::1", "[127.0.0.1]", "127.0.0.1:x", "0x7f.0.0.1", "a b",
                     "[::1]x", "localhost:9901:1"):
            self.assertRefused(self.request("/ready", {"Host": host}), host.replace(" ", "?"))

    def test_noHostServed(self) -> None:
        """A request without C{Host} (HTTP/1.0), or with an empty one, names nothing and is served."""
        self.assertEqual(self.request("/ready", {}).responseCode, 200)
        self.assertEqual(self.request("/ready", {"Host": ""}).responseCode, 200)

    def test_everyHostChecked(self) -> None:
        """With several C{Host} headers, one that is not the admin's is enough to refuse."""
        request = DummyRequest([b"ready"])
        request.requestHeaders.setRawHeaders(b"host", [b"127.0.0.1", b"evil.example"])
        self.assertIsNotNone(hostRefusal(request))
        request.requestHeaders.setRawHeaders(b"host", [b"127.0.0.1", b"localhost"])
        self.assertIsNone(hostRefusal(request))

    def test_unixSocketNotChecked(self) -> None:
        """Over a UNIX socket (C{admin = unix:...}), which no browser page reaches, C{Host} is not checked."""
        request = DummyRequest([b"ready"])
        request.requestHeaders.setRawHeaders(b"host", [b"evil.example"])
        request.getHost = lambda: UNIXAddress(b"/run/twistedmesh/admin.sock")
        self.assertIsNone(hostRefusal(request))


class AllowedHostsConfigTests(TestCase):
    """
    C{[mesh] admin.allowed_hosts}: a list of host names, lowercased, without a trailing dot.
    """

    def test_parsed(self) -> None:
        """Comma- or line-separated names; none by default."""
        config = loadString("[mesh]\nadmin.allowed_hosts = Admin.Internal., mesh-1.example\n  ops_box\n", "m.ini")
        self.assertEqual(config.mesh.admin_allowed_hosts, ("admin.internal", "mesh-1.example", "ops_box"))
        self.assertEqual(loadString("[mesh]\n", "m.ini").mesh.admin_allowed_hosts, ())

    def test_notNames(self) -> None:
        """A value with a port, brackets or a blank is an error naming the file, section and key."""
        with self.assertRaises(ConfigErrors) as caught:
            loadString("[mesh]\nadmin.allowed_hosts = ok.example, a:80, [::1], *.example\n", "m.ini")
        self.assertEqual([str(e) for e in caught.exception.errors], [
            f"m.ini: [mesh] admin.allowed_hosts: must be host names without a port (IP addresses and localhost "
            f"are always allowed), not {bad!r}" for bad in ("a:80", "[::1]", "*.example")])


class HostLoopbackTests(TestCase):
    """
    The C{Host} check over real HTTP on loopback, with curl resolving a foreign name to C{127.0.0.1} as a
    rebound DNS name would.
    """

    async def curl(self, host: str, port: int, path: str) -> bytes:
        curl = shutil.which("curl")
        if curl is None:
            raise SkipTest("curl is not installed")
        out, err, code = await getProcessOutputAndValue(
            curl, ["-sS", "-i", "--max-time", "10", "--resolve", f"{host}:{port}:127.0.0.1",
                   f"http://{host}:{port}{path}"], env=dict(os.environ), reactor=globalReactor)
        self.assertEqual(code, 0, err)
        return out

    async def test_rebindingOverHTTP(self) -> None:
        """
        C{/config_dump} asked for by a name that resolves to the admin's address is a 421; the same request
        by an allowed name, or by the address, is answered.
        """
        server = FakeServer(globalReactor)
        server.config = withAllowedHosts(server.config, "admin.internal")
        port = await serverFromString(globalReactor, "tcp:0:interface=127.0.0.1").listen(
            makeAdminSite(server, globalReactor))
        self.addCleanup(port.stopListening)
        number = port.getHost().port
        answer = await self.curl("evil.example", number, "/config_dump")
        self.assertTrue(answer.startswith(b"HTTP/1.1 421 Misdirected Request\r\n"), answer[:200])
        self.assertIn(b"misdirected request refused: Host evil.example:%d" % (number,), answer)
        self.assertNotIn(b"cluster", answer)
        for host in ("admin.internal", "127.0.0.1"):
            answer = await self.curl(host, number, "/config_dump")
            self.assertTrue(answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:200])
            self.assertIn(b'"clusters"', answer)


@inlineCallbacks
def dumpDOMResolving(test: TestCase, chromium: str, url: str, rules: str):
    """
    L{dumpDOM}, with Chromium resolving names by C{rules} (C{--host-resolver-rules}): how a test plays a
    DNS name that an attacker made resolve to the admin's address.
    """
    profile = tempfile.mkdtemp(prefix="twistedmesh-chromium-")
    test.addCleanup(shutil.rmtree, profile, True)
    args = ["60", chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--disable-extensions", "--disable-background-networking",
            f"--host-resolver-rules={rules}", f"--user-data-dir={profile}", "--dump-dom", url]
    out, err, code = yield getProcessOutputAndValue(shutil.which("timeout") or "timeout", args,
                                                   env=dict(os.environ), reactor=globalReactor)
    test.assertEqual(code, 0, err.decode(errors="replace")[-2000:])
    return out.decode("utf-8")


class BrowserTests(TestCase):
    """
    Form posts made by headless Chromium to an admin listening on loopback: from another site's page, and
    from a page of the admin's own origin (as the dashboard's buttons are).
    """

    timeout = 90

    def listen(self, site: Site) -> int:
        port = globalReactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @inlineCallbacks
    def test_formPosts(self) -> None:
        """
        A page on another site whose form posts to the admin's C{/healthcheck/fail} gets the 403 and
        changes nothing; the same form on a page of the admin's own origin works.
        """
        chromium = requireChromium()
        server = FakeServer(globalReactor)
        root = Resource()
        root.putChild(b"admin", AdminResource(server, globalReactor))

        def page(action: str) -> Data:
            return Data(f'<!doctype html><form id="f" method="post" action="{action}"></form>'
                        f'<script>document.getElementById("f").submit()</script>'.encode(), "text/html")

        root.putChild(b"post", page("/admin/healthcheck/fail"))
        adminPort = self.listen(Site(root))
        elsewhere = Resource()
        elsewhere.putChild(b"post", page(f"http://127.0.0.1:{adminPort}/admin/healthcheck/fail"))
        otherPort = self.listen(Site(elsewhere))

        # localhost and 127.0.0.1 are different sites to a browser; the DOM is the one Chromium ends on after
        # the page's form submitted itself.
        dom = yield dumpDOM(self, chromium, f"http://localhost:{otherPort}/post")
        self.assertIn("cross-site request refused: Sec-Fetch-Site is cross-site", dom)
        self.assertFalse(server.healthCheckFailed)
        # Another port of the same host is another origin of the same site.
        dom = yield dumpDOM(self, chromium, f"http://127.0.0.1:{otherPort}/post")
        self.assertIn("cross-site request refused: Sec-Fetch-Site is same-site", dom)
        self.assertFalse(server.healthCheckFailed)

        dom = yield dumpDOM(self, chromium, f"http://127.0.0.1:{adminPort}/post")
        self.assertIn("OK", dom)
        self.assertTrue(server.healthCheckFailed)

    @inlineCallbacks
    def test_rebinding(self) -> None:
        """
        A page of C{evil.example} whose name resolves to the admin's address (DNS rebinding, played with
        Chromium's resolver rules) is same-origin with the admin: its form's C{POST} passes the cross-site
        check, but its C{Host} names no address or allowed name: 421, nothing done; nor can it read
        C{/config_dump}. The same page by the admin's address works.
        """
        chromium = requireChromium()
        server = FakeServer(globalReactor)
        root = Resource()
        root.putChild(b"admin", AdminResource(server, globalReactor))
        root.putChild(b"post", Data(b'<!doctype html><form id="f" method="post" action="/admin/healthcheck/fail">'
                                    b'</form><script>document.getElementById("f").submit()</script>', "text/html"))
        adminPort = self.listen(Site(root))
        rules = "MAP evil.example 127.0.0.1"
        dom = yield dumpDOMResolving(self, chromium, f"http://evil.example:{adminPort}/post", rules)
        self.assertIn(f"misdirected request refused: Host evil.example:{adminPort}", dom)
        self.assertFalse(server.healthCheckFailed)
        dom = yield dumpDOMResolving(self, chromium, f"http://evil.example:{adminPort}/admin/config_dump", rules)
        self.assertIn("misdirected request refused", dom)
        self.assertNotIn("clusters", dom)
        dom = yield dumpDOM(self, chromium, f"http://127.0.0.1:{adminPort}/post")
        self.assertIn("OK", dom)
        self.assertTrue(server.healthCheckFailed)
