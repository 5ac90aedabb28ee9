"""
Tests for the stats store (L{twistedmesh.observability.stats}): histograms, their quantile estimates, and
how they sit in scopes beside counters and gauges.
"""

from __future__ import annotations

import math
import tracemalloc
from random import Random
from typing import List

from twisted.trial.unittest import TestCase

from twistedmesh.observability.stats import (
    DEFAULT_BUCKETS,
    QUANTILES,
    Counter,
    Gauge,
    Histogram,
    StatsStore,
)

ENVOY_BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000,
                 1800000, 3600000)


def histogram(*values: float) -> Histogram:
    """
    A histogram with Envoy's default buckets holding C{values}.
    """
    h = Histogram("h", "h", ())
    for value in values:
        h.record(value)
    return h


def bucketOf(h: Histogram, value: float) -> int:
    """
    The index of the one bucket of C{h} that recording C{value} changes.
    """
    before = list(h.buckets)
    h.record(value)
    [index] = [i for i, (a, b) in enumerate(zip(before, h.buckets)) if a != b]
    return index


class BucketTests(TestCase):
    """
    Where L{Histogram.record} puts values, and what it keeps.
    """

    def test_defaultBuckets(self) -> None:
        """The default bounds are Envoy's, in milliseconds, with one more bucket for C{+Inf}."""
        self.assertEqual(DEFAULT_BUCKETS, ENVOY_BUCKETS)
        h = histogram()
        self.assertEqual(h.bounds, ENVOY_BUCKETS)
        self.assertEqual(h.buckets, [0] * 20)

    def test_onBoundary(self) -> None:
        """A value equal to a bound goes in the bucket that bound closes (Prometheus' C{le}), not the next."""
        h = histogram()
        for i, bound in enumerate(ENVOY_BUCKETS):
            self.assertEqual(bucketOf(h, bound), i, bound)

    def test_justAboveBoundary(self) -> None:
        """A value just above a bound goes in the next bucket; above the last bound, in C{+Inf}."""
        h = histogram()
        for i, bound in enumerate(ENVOY_BUCKETS):
            self.assertEqual(bucketOf(h, math.nextafter(bound, math.inf)), i + 1, bound)
        self.assertEqual(bucketOf(h, 1e12), len(ENVOY_BUCKETS))

    def test_belowFirstBound(self) -> None:
        """Zero, a negative value and anything up to the first bound go in the first bucket."""
        h = histogram()
        for value in (0, -3, 0.25, 0.5):
            self.assertEqual(bucketOf(h, value), 0, value)

    def test_countAndSum(self) -> None:
        """C{count} and C{sum} follow every value recorded, in and out of range."""
        h = histogram(1, 2.5, 40, 1e9)
        self.assertEqual((h.count, h.sum), (4, 1e9 + 43.5))
        self.assertEqual(sum(h.buckets), 4)

    def test_cumulative(self) -> None:
        """L{Histogram.cumulative} gives running totals per bound, the last being the count."""
        h = histogram(0.5, 3, 3, 7, 1e9)
        cumulative = h.cumulative()
        self.assertEqual(len(cumulative), len(ENVOY_BUCKETS) + 1)
        self.assertEqual(cumulative[:5], [1, 1, 3, 4, 4])
        self.assertEqual(cumulative[-2:], [4, 5])

    def test_recordKeepsNothing(self) -> None:
        """Recording many values keeps no memory per value: only counts change."""
        h = histogram(1.0)
        buckets = h.buckets
        values = [float(v % 5000) for v in range(5000)]
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        before = tracemalloc.get_traced_memory()[0]
        for value in values:
            h.record(value)
        grown = tracemalloc.get_traced_memory()[0] - before
        self.assertLess(grown, 1024)
        self.assertIs(h.buckets, buckets)
        self.assertEqual(len(h.buckets), len(ENVOY_BUCKETS) + 1)

    def test_customBounds(self) -> None:
        """Other bounds may be given; they are kept as floats."""
        h = Histogram("h", "h", (), bounds=(1, 2))
        self.assertEqual(h.bounds, (1.0, 2.0))
        for value in (1, 2, 3):
            h.record(value)
        self.assertEqual(h.buckets, [1, 1, 1])

    def test_badBounds(self) -> None:
        """Bounds that are empty, not increasing or negative are refused."""
        for bounds in ((), (1, 1), (2, 1), (-1, 1)):
            self.assertRaises(ValueError, Histogram, "h", "h", (), bounds)

    def test_used(self) -> None:
        """A histogram is used once it holds a value; a counter or gauge while it is not zero."""
        h = histogram()
        self.assertFalse(h.used)
        h.record(0)
        self.assertTrue(h.used)
        counter = Counter("c", "c", ())
        self.assertFalse(counter.used)
        counter.value = 1
        self.assertTrue(counter.used)
        gauge = Gauge("g", "g", ())
        gauge.value = -1
        self.assertTrue(gauge.used)


class QuantileTests(TestCase):
    """
    L{Histogram.quantile} and L{Histogram.quantiles}: estimates by linear interpolation within a bucket.
    """

    def test_empty(self) -> None:
        """An empty histogram's quantiles are NaN."""
        quantiles = histogram().quantiles()
        self.assertEqual(list(quantiles), [label for label, _ in QUANTILES])
        self.assertTrue(all(math.isnan(v) for v in quantiles.values()))

    def test_labels(self) -> None:
        """The quantiles are Envoy's ten, labelled as C{/stats} prints them."""
        self.assertEqual([label for label, _ in QUANTILES],
                         ["P0", "P25", "P50", "P75", "P90", "P95", "P99", "P99.5", "P99.9", "P100"])
        self.assertEqual([q for _, q in QUANTILES], [0, .25, .5, .75, .9, .95, .99, .995, .999, 1])

    def test_interpolatesWithinBucket(self) -> None:
        """Values all in one bucket are taken as spread evenly over it: P0 its lower bound, P100 its upper."""
        h = histogram(*[7] * 100)
        self.assertEqual(h.quantile(0), 5)
        self.assertEqual(h.quantile(0.5), 7.5)
        self.assertEqual(h.quantile(0.9), 9.5)
        self.assertEqual(h.quantile(1), 10)

    def test_firstBucketStartsAtZero(self) -> None:
        """The lowest bucket is taken to start at zero."""
        h = histogram(0.1, 0.2, 0.3, 0.4)
        self.assertEqual((h.quantile(0), h.quantile(0.5), h.quantile(1)), (0, 0.25, 0.5))

    def test_uniform(self) -> None:
        """For 1..1000 ms, spread evenly as the estimate assumes, every quantile is within 1 ms of the truth."""
        h = histogram(*range(1, 1001))
        for label, q in QUANTILES:
            exact = 1 + q * 999
            self.assertTrue(abs(h.quantile(q) - exact) <= 1, (label, h.quantile(q), exact))
        self.assertEqual(h.quantiles()["P50"], 500)
        self.assertEqual(h.quantiles()["P90"], 900)
        self.assertEqual(h.quantiles()["P0"], 0.5)
        self.assertEqual(h.quantiles()["P100"], 1000)

    def test_spansBuckets(self) -> None:
        """A rank falling inside a bucket is placed by its position among that bucket's values."""
        h = histogram(3, 7, 40, 40, 120)
        self.assertEqual(h.quantile(0), 1)
        self.assertEqual(h.quantile(0.25), 6.25)
        self.assertEqual(h.quantile(0.5), 31.25)
        self.assertEqual(h.quantile(0.75), 46.875)
        self.assertAlmostEqual(h.quantile(0.9), 175)
        self.assertEqual(h.quantile(1), 250)

    def test_sameBucketAsTruth(self) -> None:
        """For a skewed (log-normal) sample, each estimate lies in the bucket of the true nearest-rank value."""
        random = Random(1234)
        values: List[float] = sorted(random.lognormvariate(3, 1.5) for _ in range(2000))
        h = histogram(*values)
        bounds = (0.0,) + ENVOY_BUCKETS
        for label, q in QUANTILES:
            true = values[max(math.ceil(q * len(values)) - 1, 0)]
            i = next(i for i, b in enumerate(ENVOY_BUCKETS) if true <= b)
            self.assertTrue(bounds[i] <= h.quantile(q) <= bounds[i + 1], (label, true, h.quantile(q)))

    def test_overflow(self) -> None:
        """A rank in the C{+Inf} bucket is given as the highest bound, the least the true value can be."""
        h = histogram(1, 2e7, 3e7)
        self.assertEqual(h.quantile(0.5), 3600000)
        self.assertEqual(h.quantile(1), 3600000)
        self.assertEqual(h.quantile(0), 0.5)

    def test_outOfRange(self) -> None:
        """A quantile outside [0, 1] is refused."""
        h = histogram(1)
        self.assertRaises(ValueError, h.quantile, -0.1)
        self.assertRaises(ValueError, h.quantile, 99)


class StoreTests(TestCase):
    """
    Histograms in L{StatsStore} and its scopes.
    """

    def test_scopeHistogramOnce(self) -> None:
        """A scope's histogram is made on first use and the same object after."""
        stats = StatsStore()
        scope = stats.scope("cluster", "api")
        first = scope.histogram("upstream_rq_time")
        self.assertIsInstance(first, Histogram)
        self.assertIs(scope.histogram("upstream_rq_time"), first)
        self.assertIs(stats.scope("cluster", "api").histogram("upstream_rq_time"), first)
        self.assertIs(stats.get("cluster.api.upstream_rq_time"), first)

    def test_removeScope(self) -> None:
        """Removing a cluster's scope forgets its stats and its sub-scopes' (and nothing else: not a cluster
        whose name extends it with a dot); asking again makes new ones from zero."""
        stats = StatsStore()
        api = stats.scope("cluster", "api")
        rq = api.counter("upstream_rq_total")
        rq.value = 7
        api.scope("health_check").counter("attempt")
        api.histogram("upstream_rq_time")
        other = stats.scope("cluster", "api.v2").counter("upstream_rq_total")
        manager = stats.scope("cluster_manager", "x").counter("cluster_added")
        server = stats.counter("cluster.api.not_a_scope_stat")
        self.assertEqual(stats.removeScope(api), 3)
        names = [s.name for s in stats]
        self.assertEqual(names, sorted([other.name, manager.name, server.name]))
        self.assertIsNone(stats.get("cluster.api.upstream_rq_total"))
        fresh = stats.scope("cluster", "api").counter("upstream_rq_total")
        self.assertIsNot(fresh, rq)
        self.assertEqual(fresh.value, 0)

    def test_storeHistogram(self) -> None:
        """L{StatsStore.histogram} makes a histogram outside any scope, without labels."""
        stats = StatsStore()
        h = stats.histogram("server.initialization_time_ms")
        self.assertEqual((h.name, h.tagName, h.labels, h.kind),
                         ("server.initialization_time_ms", "server.initialization_time_ms", (), "histogram"))
        self.assertIs(stats.histogram("server.initialization_time_ms"), h)

    def test_tags(self) -> None:
        """A scoped histogram's name is Envoy's, its tag name and labels what Prometheus needs."""
        stats = StatsStore()
        h = stats.scope("cluster", "api").histogram("upstream_rq_time")
        self.assertEqual((h.name, h.tagName, h.labels),
                         ("cluster.api.upstream_rq_time", "cluster_upstream_rq_time",
                          (("envoy_cluster_name", "api"),)))
        h = stats.scope("listener", "edge").histogram("downstream_cx_length_ms")
        self.assertEqual((h.tagName, h.labels),
                         ("listener_downstream_cx_length_ms", (("envoy_listener_address", "edge"),)))

    def test_subScopes(self) -> None:
        """Sub-scopes compose as for counters: untagged names join the metric name, tagged ones add labels."""
        stats = StatsStore()
        h = stats.scope("http", "edge").scope("fault").histogram("delay_ms")
        self.assertEqual((h.name, h.tagName), ("http.edge.fault.delay_ms", "http_fault_delay_ms"))
        h = stats.root.scope("vhost").scope("www", tag="envoy_virtual_host").histogram("rq_time")
        self.assertEqual((h.name, h.tagName, h.labels),
                         ("vhost.www.rq_time", "vhost_rq_time", (("envoy_virtual_host", "www"),)))

    def test_kindClash(self) -> None:
        """A name taken by a counter or gauge cannot be a histogram, nor the other way round."""
        stats = StatsStore()
        scope = stats.scope("cluster", "api")
        scope.counter("upstream_rq_total")
        scope.histogram("upstream_rq_time")
        e = self.assertRaises(TypeError, scope.histogram, "upstream_rq_total")
        self.assertEqual(str(e), "stat cluster.api.upstream_rq_total is a counter, not a histogram")
        e = self.assertRaises(TypeError, scope.gauge, "upstream_rq_time")
        self.assertEqual(str(e), "stat cluster.api.upstream_rq_time is a histogram, not a gauge")
        self.assertRaises(TypeError, scope.counter, "upstream_rq_time")
        self.assertRaises(TypeError, stats.histogram, "cluster.api.upstream_rq_total")

    def test_iteration(self) -> None:
        """Iterating the store gives histograms with the other stats, all sorted by name."""
        stats = StatsStore()
        stats.counter("b_total")
        stats.histogram("a_time")
        stats.gauge("c_active")
        self.assertEqual([(s.name, s.kind) for s in stats],
                         [("a_time", "histogram"), ("b_total", "counter"), ("c_active", "gauge")])

    def test_storesSeparate(self) -> None:
        """Two stores hold two histograms of the same name."""
        one, two = StatsStore(), StatsStore()
        one.histogram("t").record(5)
        self.assertEqual(two.histogram("t").count, 0)
