"""
Stats across processes: a worker's L{StatsStore} as plain JSON-able data (L{snapshot}), and snapshots
added up into one store (L{MergedStats}) for the parent's admin endpoint.

Counters and gauges are summed. Histograms have fixed buckets (the same bounds in every worker), so they
merge exactly: bucket counts, counts and sums are added.
"""

from __future__ import annotations

from typing import Any, Iterable, List

from ..observability.stats import Counter, Gauge, Histogram, StatsStore

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
