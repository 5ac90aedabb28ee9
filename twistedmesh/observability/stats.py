"""
The stats store: counters and gauges with Envoy's names.

Stat objects are created once (at config load or when a host appears) and kept by whoever updates them, so
the hot path does a plain attribute increment (C{counter.value += 1}): no string formatting, no dict lookup.
Each stat also carries the Prometheus form of its name, split into a metric name and labels the way Envoy's
tag extraction does (C{cluster.api.upstream_rq_total} becomes C{cluster_upstream_rq_total} with
C{envoy_cluster_name="api"}), so exposition never parses names.
"""

from __future__ import annotations

from typing import Dict, Iterator, Optional, Tuple, Union

Labels = Tuple[Tuple[str, str], ...]


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


class Gauge(Counter):
    """
    A value that goes up and down (active connections, say). Change C{value} directly.
    """

    __slots__ = ()
    kind = "gauge"


Stat = Union[Counter, Gauge]


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

    def get(self, name: str) -> Optional[Stat]:
        """
        The stat of that full name, or C{None}.
        """
        return self._stats.get(name)

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
