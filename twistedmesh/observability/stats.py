"""
The stats store: counters, gauges and histograms with Envoy's names.

Stat objects are created once (at config load or when a host appears) and kept by whoever updates them, so
the hot path does a plain attribute increment (C{counter.value += 1}) or one L{Histogram.record} call: no
string formatting, no dict lookup. Each stat also carries the Prometheus form of its name, split into a
metric name and labels the way Envoy's tag extraction does (C{cluster.api.upstream_rq_total} becomes
C{cluster_upstream_rq_total} with C{envoy_cluster_name="api"}), so exposition never parses names.

Histograms keep fixed buckets (Envoy's default boundaries, in milliseconds, L{DEFAULT_BUCKETS}) rather than
Envoy's log-linear C{circllhist}: what a Prometheus histogram needs, and what a quantile can be estimated
from (L{Histogram.quantile}). Envoy's C{/stats} also prints each quantile over the last flush interval;
this store keeps only the cumulative figures.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

Labels = Tuple[Tuple[str, str], ...]

#: Envoy's default histogram bucket boundaries (upper bounds, inclusive), in milliseconds.
DEFAULT_BUCKETS: Tuple[float, ...] = tuple(float(b) for b in (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000, 1800000,
    3600000,
))

#: The quantiles C{/stats} shows for each histogram, as Envoy's C{P<n>} labels with their fractions.
QUANTILES: Tuple[Tuple[str, float], ...] = (
    ("P0", 0.0), ("P25", 0.25), ("P50", 0.5), ("P75", 0.75), ("P90", 0.9), ("P95", 0.95), ("P99", 0.99),
    ("P99.5", 0.995), ("P99.9", 0.999), ("P100", 1.0),
)


class Counter:
    """
    A monotonically increasing count. Increment C{value} directly.
    """

    __slots__ = ("name", "tagName", "labels", "value")
    kind = "counter"

    def __init__(self, name: str, tagName: str, labels: Labels) -> None:
        self.name = name
        self.tagName = tagName
        self.labels = labels
        self.value = 0

    @property
    def used(self) -> bool:
        """
        Whether the stat is other than zero (what C{?usedonly} keeps).
        """
        return self.value != 0


class Gauge(Counter):
    """
    A value that goes up and down (active connections, say). Change C{value} directly.
    """

    __slots__ = ()
    kind = "gauge"


class Histogram:
    """
    A distribution of values (durations in milliseconds, by Envoy's convention) in fixed buckets. Call
    L{record} for each value.

    Bucket C{i} counts the values C{v} with C{bounds[i-1] < v <= bounds[i]} (Prometheus' C{le}: a value on
    a boundary belongs to the bucket that boundary closes); the last bucket counts the values above every
    bound (C{+Inf}).

    @ivar bounds: the buckets' upper bounds, increasing.
    @ivar buckets: the count of each bucket (not cumulative), one more than there are bounds.
    @ivar count: how many values were recorded.
    @ivar sum: their sum.
    """

    __slots__ = ("name", "tagName", "labels", "bounds", "buckets", "count", "sum")
    kind = "histogram"

    def __init__(self, name: str, tagName: str, labels: Labels, bounds: Sequence[float] = DEFAULT_BUCKETS) -> None:
        bounds = tuple(float(b) for b in bounds)
        if not bounds or any(a >= b for a, b in zip(bounds, bounds[1:])) or bounds[0] < 0:
            raise ValueError(f"histogram {name} bounds must be non-negative and increasing: {bounds!r}")
        self.name = name
        self.tagName = tagName
        self.labels = labels
        self.bounds = bounds
        self.buckets: List[int] = [0] * (len(bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def record(self, value: float) -> None:
        """
        Add one value: a binary search of the bounds and three increments, nothing allocated but the new
        numbers. Pass a float (C{(end - start) * 1000.0}): the bounds are floats, and comparing an int with
        them makes the search markedly slower. (A NaN lands in the first bucket and makes C{sum} NaN.)
        """
        self.buckets[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    @property
    def used(self) -> bool:
        """
        Whether any value was recorded (what C{?usedonly} keeps).
        """
        return self.count != 0

    def cumulative(self) -> List[int]:
        """
        The cumulative count of each bucket, Prometheus' C{_bucket} values: how many values were at most
        each bound, then (last) how many there were in all.
        """
        total = 0
        result = []
        for n in self.buckets:
            total += n
            result.append(total)
        return result

    def quantile(self, q: float) -> float:
        """
        An estimate of the C{q} quantile (C{0 <= q <= 1}) of the recorded values, or NaN if there are none.

        The estimate assumes the values in a bucket are spread evenly over it, as Prometheus'
        C{histogram_quantile} does: the value of rank C{q * count} is found in its bucket (the first
        non-empty bucket whose cumulative count reaches the rank) and interpolated linearly between the
        bucket's lower and upper bounds by its position among that bucket's values. The first bucket is
        taken to start at 0 (durations are never negative). A rank in the C{+Inf} bucket, which has no
        upper bound, is given as the highest bound: the true value is at least that. So C{P0} is the lower
        bound of the lowest non-empty bucket and C{P100} the upper bound of the highest, and an estimate
        below the highest bound is off by at most the width of its bucket.
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be between 0 and 1, not {q!r}")
        count = self.count
        if count == 0:
            return float("nan")
        rank = q * count
        bounds = self.bounds
        below = 0
        for i, n in enumerate(self.buckets):
            if n and below + n >= rank:
                if i == len(bounds):
                    return bounds[-1]
                lower = bounds[i - 1] if i else 0.0
                return lower + (bounds[i] - lower) * max(rank - below, 0.0) / n
            below += n
        return bounds[-1]  # unreachable while count agrees with the buckets

    def quantiles(self) -> Dict[str, float]:
        """
        The L{QUANTILES} C{/stats} shows, by label (C{"P50"}), each as L{quantile} estimates it.
        """
        return {label: self.quantile(q) for label, q in QUANTILES}


Stat = Union[Counter, Gauge, Histogram]


class StatsScope:
    """
    A prefix of stat names with the labels it implies, such as C{cluster.api.} with
    C{envoy_cluster_name="api"}. Handed to the code that owns those stats, so that nothing reaches a global.
    """

    def __init__(self, store: "StatsStore", prefix: str, tagPrefix: str, labels: Labels) -> None:
        self._store = store
        self._prefix = prefix
        self._tagPrefix = tagPrefix
        self._labels = labels

    def counter(self, name: str) -> Counter:
        """
        The counter C{<prefix><name>}, created on first use.
        """
        return self._store._get(Counter, self._prefix + name, self._tagPrefix + name, self._labels)

    def gauge(self, name: str) -> Gauge:
        """
        The gauge C{<prefix><name>}, created on first use.
        """
        return self._store._get(Gauge, self._prefix + name, self._tagPrefix + name, self._labels)

    def histogram(self, name: str) -> Histogram:
        """
        The histogram C{<prefix><name>}, created on first use, with Envoy's default buckets.
        """
        return self._store._get(Histogram, self._prefix + name, self._tagPrefix + name, self._labels)

    def scope(self, name: str, tag: Optional[str] = None) -> "StatsScope":
        """
        A sub-scope C{<prefix><name>.}. With C{tag}, C{name} is a value (a cluster's name, say) that becomes
        the label C{tag} instead of part of the Prometheus metric name.
        """
        if tag is None:
            return StatsScope(self._store, self._prefix + name + ".", self._tagPrefix + name + "_", self._labels)
        return StatsScope(self._store, self._prefix + name + ".", self._tagPrefix, self._labels + ((tag, name),))


class StatsStore:
    """
    Every stat of one L{twistedmesh.service.MeshService}. Not global: two services have two stores.
    """

    def __init__(self) -> None:
        self._stats: Dict[str, Stat] = {}
        self.root = StatsScope(self, "", "", ())

    def _get(self, kind: type, name: str, tagName: str, labels: Labels) -> Stat:
        stat = self._stats.get(name)
        if stat is None:
            stat = self._stats[name] = kind(name, tagName, labels)
        elif type(stat) is not kind:
            raise TypeError(f"stat {name} is a {stat.kind}, not a {kind.kind}")
        return stat

    def scope(self, kind: str, name: str) -> StatsScope:
        """
        The scope of one named thing, with Envoy's tag: C{scope("cluster", "api")} is C{cluster.api.} with
        the label C{envoy_cluster_name="api"}; likewise C{listener} and C{http}.
        """
        tag = _TAGS.get(kind, f"envoy_{kind}_name")
        return StatsScope(self, f"{kind}.{name}.", f"{kind}_", ((tag, name),))

    def counter(self, name: str) -> Counter:
        """
        A counter outside any scope (server-wide stats).
        """
        return self.root.counter(name)

    def gauge(self, name: str) -> Gauge:
        """
        A gauge outside any scope (server-wide stats).
        """
        return self.root.gauge(name)

    def histogram(self, name: str) -> Histogram:
        """
        A histogram outside any scope (server-wide stats).
        """
        return self.root.histogram(name)

    def get(self, name: str) -> Optional[Stat]:
        """
        The stat of that full name, or C{None}.
        """
        return self._stats.get(name)

    def removeScope(self, scope: StatsScope) -> int:
        """
        Forget every stat of C{scope} and its sub-scopes (a removed cluster's C{cluster.<name>.}): they are
        no longer listed, and asking the scope for one again makes a new one, from zero. Whoever still
        holds one of the removed objects may go on counting in it, unseen.

        A stat is the scope's when its name starts with the scope's prefix and its labels with the scope's
        labels: the scope of a cluster C{api} does not take the stats of a cluster C{api.v2}.

        @return: how many stats were removed.
        """
        prefix, labels = scope._prefix, scope._labels
        width = len(labels)
        gone = [name for name, stat in self._stats.items()
                if name.startswith(prefix) and stat.labels[:width] == labels]
        for name in gone:
            del self._stats[name]
        return len(gone)

    def __iter__(self) -> Iterator[Stat]:
        """
        Every stat, sorted by name.
        """
        return iter(sorted(self._stats.values(), key=lambda s: s.name))


_TAGS = {
    "cluster": "envoy_cluster_name",
    "listener": "envoy_listener_address",
    "http": "envoy_http_conn_manager_prefix",
}
