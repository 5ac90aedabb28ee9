"""
Stats across processes: a worker's L{StatsStore} as plain JSON-able data (L{snapshot}), and snapshots
added up into one store (L{MergedStats}) for the parent's admin endpoint.

Counters and gauges are summed. Histograms have fixed buckets (the same bounds in every worker), so they
merge exactly: bucket counts, counts and sums are added. The clusters' hosts, with their health, are
gathered likewise (L{clusterSnapshot}, L{mergeClusters}) for the admin C{/clusters}.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Set, Tuple

from ..observability.stats import Counter, Gauge, Histogram, StatsStore
from ..upstream.cluster import Host

#: One stat as data: C{[kind, name, tagName, labels, value]} for counters (C{"c"}) and gauges (C{"g"});
#: C{["h", name, tagName, labels, bounds, buckets, count, sum]} for histograms.
Snapshot = List[List[Any]]

_KINDS = {"c": Counter, "g": Gauge, "h": Histogram}


def snapshot(stats: Iterable) -> Snapshot:
    """
    Every stat of C{stats} (a L{StatsStore}) as JSON-able data.
    """
    result: Snapshot = []
    for s in stats:
        labels = [list(pair) for pair in s.labels]
        if s.kind == "histogram":
            result.append(["h", s.name, s.tagName, labels, list(s.bounds), list(s.buckets), s.count, s.sum])
        else:
            result.append(["c" if s.kind == "counter" else "g", s.name, s.tagName, labels, s.value])
    return result


def withoutGauges(data: Snapshot) -> Snapshot:
    """
    C{data} without its gauges: what a worker that exited still contributes (its counts happened; its
    active connections are gone).
    """
    return [entry for entry in data if entry[0] != "g"]


class MergedStats(StatsStore):
    """
    A store that holds the sum of several snapshots. Built afresh for each admin request; nothing on the
    hot path touches it.
    """

    def add(self, data: Snapshot) -> None:
        """
        Add every stat of C{data} to this store's figures of the same names. A stat whose name is taken
        by one of another kind, or a histogram with other bounds, is left out: the workers run the same
        code, so neither happens short of a bug.
        """
        for entry in data:
            kind, name, tagName, labels = entry[0], entry[1], entry[2], tuple(tuple(p) for p in entry[3])
            cls = _KINDS[kind]
            existing = self.get(name)
            if existing is not None and type(existing) is not cls:
                continue
            if kind == "h":
                bounds, buckets, count, total = entry[4:8]
                if existing is None:
                    existing = self._stats[name] = Histogram(name, tagName, labels, bounds)
                elif list(existing.bounds) != [float(b) for b in bounds] or len(buckets) != len(existing.buckets):
                    continue
                for i, n in enumerate(buckets):
                    existing.buckets[i] += n
                existing.count += count
                existing.sum += total
            else:
                stat = self._get(cls, name, tagName, labels)
                stat.value += entry[4]


    def replace(self, snapshots: Iterable[Snapshot]) -> None:
        """
        Hold the sum of C{snapshots} instead of the present figures.
        """
        self._stats = {}
        for data in snapshots:
            self.add(data)


def merge(snapshots: Iterable[Snapshot]) -> MergedStats:
    """
    The sum of C{snapshots}, as a store the admin endpoint can show.
    """
    store = MergedStats()
    for data in snapshots:
        store.add(data)
    return store


def clusterSnapshot(clusters: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """
    The hosts of every cluster of a worker, with their health and figures, as JSON-able data.
    """
    return [
        {"name": name, "hosts": [
            {"endpoint": h.endpoint, "weight": h.weight, "healthy": h.healthy, "flags": sorted(h.healthFlags),
             "reason": h.healthReason, "stats": {s: getattr(h, s) for s in Host.STATS}}
            for h in cluster.hosts
        ]}
        for name, cluster in clusters.items()
    ]


class HostView:
    """
    One host of a cluster as the workers see it together (for the admin C{/clusters} and dashboard): its
    figures summed; unhealthy if any worker finds it so, with every worker's flags.
    """

    def __init__(self, endpoint: str, weight: int) -> None:
        self.endpoint = endpoint
        self.weight = weight
        self.healthy = True
        self.healthFlags: Set[str] = set()
        self.reasons: List[Tuple[int, str]] = []
        for name in _HOST_STATS:
            setattr(self, name, 0)

    @property
    def healthReason(self) -> str:
        """
        The workers' reason, or each worker's when they differ (C{worker 0: ...; worker 1: ...}).
        """
        distinct = {reason for _, reason in self.reasons}
        if len(distinct) <= 1:
            return distinct.pop() if distinct else ""
        return "; ".join(f"worker {index}: {reason}" for index, reason in self.reasons)


class ClusterView:
    """
    One cluster as the workers see it together: L{HostView}s, its configuration, and its C{upstream_*}
    stats from the summed store (what the admin C{/clusters} and the dashboard read of a cluster).
    """

    def __init__(self, name: str, config: Any, stats: StatsStore) -> None:
        self.name = name
        self.config = config
        self.hosts: List[HostView] = []
        self._stats = stats

    def __getattr__(self, name: str) -> Any:
        if name.startswith("upstream_"):
            stat = self._stats.get(f"cluster.{self.name}.{name}")
            return stat if stat is not None else Counter(name, name, ())
        raise AttributeError(name)


_HOST_STATS = Host.STATS


def mergeClusters(snapshots: Iterable[Tuple[int, List[Dict[str, Any]]]], configs: Mapping[str, Any],
                  stats: StatsStore) -> Dict[str, ClusterView]:
    """
    The clusters of C{configs} as every worker (C{(index, clusterSnapshot)} pairs) sees them together.
    """
    views = {name: ClusterView(name, config, stats) for name, config in configs.items()}
    for index, clusters in snapshots:
        for entry in clusters:
            view = views.get(entry["name"])
            if view is None:  # a worker that has not reloaded yet
                continue
            hosts = {h.endpoint: h for h in view.hosts}
            for data in entry["hosts"]:
                host = hosts.get(data["endpoint"])
                if host is None:
                    host = hosts[data["endpoint"]] = HostView(data["endpoint"], data["weight"])
                    view.hosts.append(host)
                host.healthy = host.healthy and data["healthy"]
                host.healthFlags.update(data["flags"])
                host.reasons.append((index, data["reason"]))
                for name, value in data["stats"].items():
                    if name in _HOST_STATS:
                        setattr(host, name, getattr(host, name) + value)
    return views
