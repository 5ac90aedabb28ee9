"""
Prometheus exposition of a L{StatsStore}, through a C{prometheus_client} custom collector.

Each stat already carries its Prometheus form (C{tagName} and C{labels}, see L{twistedmesh.observability.stats}),
so a scrape only walks the store: C{cluster.api.upstream_rq_total} is exposed as
C{envoy_cluster_upstream_rq_total{envoy_cluster_name="api"}}, and every cluster's copy of that stat becomes
one more label set of the same metric family.

Counters go out through C{CounterMetricFamily}, which strips a trailing C{_total} and lets C{generate_latest}
add it back, so Envoy's C{*_total} counters keep their names exactly. A counter whose name does not end in
C{_total} (C{upstream_cx_connect_fail}) is exposed with the suffix added, as the Prometheus and OpenMetrics
conventions require of counters and as C{prometheus_client} insists: C{envoy_cluster_upstream_cx_connect_fail_total}.
(Envoy's own exposition leaves such names bare.) This is deliberate and kept: a dashboard written against
Envoy's bare name must add C{_total} for those few counters.

Histograms (L{twistedmesh.observability.stats.Histogram}) go out as real Prometheus histograms, typed
C{histogram}, with Envoy's names and units (milliseconds): cumulative C{<name>_bucket} samples, one per
bound plus C{le="+Inf"} (which equals C{_count}), then C{<name>_sum} and C{<name>_count}, as in
C{envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name="api",le="0.5"}}. The C{le} values are written
as Envoy writes them (C{"1"}, C{"3600000"}), not as C{prometheus_client}'s own histograms would
(C{"1.0"}, C{"3.6e+06"}); a query selecting one bucket by its C{le} carries over from Envoy unchanged.

Nothing here touches C{prometheus_client}'s global C{REGISTRY}: each L{PrometheusExporter} (one per admin
site) has a registry of its own, so two services in one process never see each other's stats.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, Iterable, Iterator, Optional, Set

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from .stats import Histogram, Labels, Stat, StatsStore

DEFAULT_PREFIX = "envoy_"

#: The content type of the exposition: the classic text format, version 0.0.4, which is what
#: C{generate_latest} writes (C{prometheus_client}'s own C{CONTENT_TYPE_LATEST} now names a later version).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The suffixes of a histogram's samples: another family with such a name would be read as part of it.
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# Characters a legacy Prometheus metric name may not hold become "_", as Envoy's sanitiser does; dots are
# the common case (a scope made without a tag keeps its name in the metric name).
_INVALID = re.compile(r"[^a-zA-Z0-9_:]")


def metricName(stat: Stat, prefix: str = DEFAULT_PREFIX) -> str:
    """
    The name C{stat} is exposed under: C{prefix} plus its tag name, invalid characters as C{_}, and for a
    counter a C{_total} suffix unless it already has one (see the module docstring).
    """
    name = _INVALID.sub("_", prefix + stat.tagName)
    if stat.kind == "counter" and not name.endswith("_total"):
        name += "_total"
    return name


def bucketLabel(bound: float) -> str:
    """
    The C{le} label value of a bucket bound, as Envoy writes it: the shortest form of the number, without
    a trailing C{.0} (C{0.5}, C{1}, C{3600000}).
    """
    text = repr(float(bound))
    return text[:-2] if text.endswith(".0") else text


def _family(stat: Stat, name: str) -> Metric:
    """
    An empty metric family of C{stat}'s kind named C{name}.
    """
    if stat.kind == "counter":
        # The family's own name loses a counter's "_total" (CounterMetricFamily strips it and
        # generate_latest adds it back to the HELP and TYPE lines); the samples keep the full name.
        return CounterMetricFamily(name, "")
    if stat.kind == "histogram":
        return HistogramMetricFamily(name, "")
    return GaugeMetricFamily(name, "")


def _addHistogram(family: Metric, name: str, histogram: Histogram) -> None:
    """
    Add C{histogram}'s samples to C{family}: a cumulative C{_bucket} per bound and C{+Inf}, C{_sum} and
    C{_count}, all with its labels.
    """
    labels = dict(histogram.labels)
    cumulative = histogram.cumulative()
    for bound, total in zip(histogram.bounds, cumulative):
        family.add_sample(name + "_bucket", {**labels, "le": bucketLabel(bound)}, total)
    family.add_sample(name + "_bucket", {**labels, "le": "+Inf"}, cumulative[-1])
    family.add_sample(name + "_sum", labels, histogram.sum)
    # The +Inf bucket is the count by definition; both are read from the buckets so that they agree.
    family.add_sample(name + "_count", labels, cumulative[-1])


class StatsCollector:
    """
    A C{prometheus_client} custom collector over one L{StatsStore}: one metric family per metric name, with
    one sample per label set.

    @ivar stats: the store exposed.
    @ivar prefix: prepended to every metric name.
    """

    def __init__(self, stats: StatsStore, prefix: str = DEFAULT_PREFIX) -> None:
        self.stats = stats
        self.prefix = prefix

    def collect(self, include: Optional[Callable[[Stat], bool]] = None) -> Iterator[Metric]:
        """
        The metric families of every stat, or of those C{include} accepts, sorted by name. A stat whose name
        and labels repeat an earlier one's (C{a.b} and C{a_b} both sanitise to C{a_b}), or whose kind
        disagrees with its family's, is left out: Prometheus rejects duplicate series and mixed types. So is
        a gauge named like one of a histogram's samples (C{<histogram>_count}); a counter cannot be, its
        name ending in C{_total}.
        """
        families: Dict[str, Metric] = {}
        seen: Dict[str, Set[Labels]] = {}
        for stat in self.stats:
            if include is not None and not include(stat):
                continue
            name = metricName(stat, self.prefix)
            family = families.get(name)
            if family is None:
                family = families[name] = _family(stat, name)
                seen[name] = set()
            elif family.type != stat.kind:
                continue
            if stat.labels in seen[name]:
                continue
            seen[name].add(stat.labels)
            # Samples are added with their own label dicts, not through add_metric's per-family label names,
            # because stats sharing a metric name need not share label names.
            if stat.kind == "histogram":
                _addHistogram(family, name, stat)
            else:
                family.add_sample(name, dict(stat.labels), stat.value)
        reserved = {name + suffix for name, family in families.items() if family.type == "histogram"
                    for suffix in _HISTOGRAM_SUFFIXES}
        for name in sorted(families):
            family = families[name]
            if family.type != "histogram" and name in reserved:
                continue
            yield family


class _Filtered:
    """
    What C{generate_latest} collects from for a filtered scrape: a L{StatsCollector} with a predicate.
    """

    def __init__(self, collector: StatsCollector, include: Callable[[Stat], bool]) -> None:
        self._collector = collector
        self._include = include

    def collect(self) -> Iterable[Metric]:
        return self._collector.collect(self._include)


class PrometheusExporter:
    """
    The Prometheus exposition of one L{StatsStore}: a L{StatsCollector} in a L{CollectorRegistry} of its
    own (C{auto_describe} off, so registering does not run a collection).

    @ivar collector: the L{StatsCollector}.
    @ivar registry: the registry holding only C{collector}.
    """

    def __init__(self, stats: StatsStore, prefix: str = DEFAULT_PREFIX) -> None:
        self.collector = StatsCollector(stats, prefix)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)

    def generate(self, include: Optional[Callable[[Stat], bool]] = None) -> bytes:
        """
        The text exposition (of type L{CONTENT_TYPE}) of every stat, or of only the stats C{include} accepts.
        """
        if include is None:
            return generate_latest(self.registry)
        return generate_latest(_Filtered(self.collector, include))
