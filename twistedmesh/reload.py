"""
Hot reload: what changed between two configurations, and the record of a reload.

L{diffConfigs} compares the configuration in effect with a newly loaded one, section by section, and says
for each listener, cluster, filter section, route table and echo whether it is kept, modified, added or
removed. The configuration objects are frozen dataclasses, so "unchanged" is plain structural equality;
what this module adds is the knowledge of what each piece depends on:

  - a cluster is kept when its own section and the C{[tls:NAME]} section it names are unchanged (then the
    service keeps the very same L{twistedmesh.upstream.cluster.Cluster}: pools, health and outlier state,
    stats);
  - a listener is kept when its section, its C{[tls:NAME]}, its route table, the C{[filter:NAME]} sections
    of its chain and the C{[mesh]} keys its streams read (tracing) are all unchanged (then it keeps its
    factory, its filter makers and its connections as they are). A listener whose endpoint changed is
    removed and added (a new socket); any other change is a modification, served by the same listening
    socket;
  - the admin endpoint changes only with C{[mesh] admin}, C{admin_tls} or that TLS section.

The clusters a listener uses are not among its dependencies: its filters look clusters up by name in the
service's live mapping of the clusters in effect when a stream or connection starts (see
L{twistedmesh.plugins.FilterContext}), so a cluster added, rebuilt or removed — by the file or by CDS —
is followed without touching the listener (its connections, its rate-limit buckets), as Envoy does.

The service (L{twistedmesh.service.MeshService.reload}) builds the new configuration, then swaps it in
using this diff; L{ReloadResult} is what it reports (admin C{/config_dump} shows the last one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

from .config import Config

__all__ = ["Changes", "ConfigDiff", "ReloadResult", "diffConfigs", "drainCluster"]


@dataclass(frozen=True)
class Changes:
    """
    What happened to the named sections of one kind, each name in exactly one of the four tuples, except
    that a listener or echo whose endpoint changed is in both C{removed} and C{added}.
    """

    kept: Tuple[str, ...] = ()
    modified: Tuple[str, ...] = ()
    added: Tuple[str, ...] = ()
    removed: Tuple[str, ...] = ()

    def summary(self) -> Dict[str, Any]:
        """
        The changes as JSON-able data (the kept names are only counted).
        """
        return {"kept": len(self.kept), "modified": list(self.modified), "added": list(self.added),
                "removed": list(self.removed)}

    @property
    def changed(self) -> bool:
        """
        Whether anything was modified, added or removed.
        """
        return bool(self.modified or self.added or self.removed)


@dataclass(frozen=True)
class ConfigDiff:
    """
    The difference between two configurations (L{diffConfigs}).

    @ivar admin: whether the admin endpoint must be replaced (its endpoint or TLS changed).
    """

    listeners: Changes
    clusters: Changes
    filters: Changes
    routes: Changes
    echoes: Changes
    admin: bool = False

    def summary(self) -> Dict[str, Any]:
        """
        The diff as JSON-able data, for logs and C{/config_dump}.
        """
        return {"listeners": self.listeners.summary(), "clusters": self.clusters.summary(),
                "filters": self.filters.summary(), "routes": self.routes.summary(),
                "echoes": self.echoes.summary(), "admin_changed": self.admin}


@dataclass(frozen=True)
class ReloadResult:
    """
    The outcome of one reload.

    @ivar ok: whether the new configuration is in effect, everything in it listening.
    @ivar applied: whether the new configuration was swapped in (C{False}: it did not build, and the
        previous one keeps serving). A reload can be applied and still not C{ok} when a new listener could
        not listen (its address in use, say).
    @ivar errors: what went wrong, one message each (a config error names file, section and key).
    @ivar time: when the reload was asked for, in seconds since the epoch (the service's clock).
    @ivar file: the file that was read.
    @ivar diff: what changed, once the file loaded.
    """

    ok: bool
    applied: bool
    errors: Tuple[str, ...]
    time: float
    file: str
    diff: Optional[ConfigDiff] = field(default=None, compare=False)

    def asJSON(self) -> Dict[str, Any]:
        """
        The result as JSON-able data (the C{last_reload} object of C{/config_dump}, the body of
        C{POST /reload}).
        """
        return {"ok": self.ok, "applied": self.applied, "errors": list(self.errors), "time": self.time,
                "file": self.file, "changes": self.diff.summary() if self.diff is not None else None}


def _names(old: Mapping[str, Any], new: Mapping[str, Any], same) -> Changes:
    """
    Sort the names of C{old} and C{new} into kept / modified / added / removed; C{same(name)} says whether
    a name present in both is unchanged.
    """
    kept, modified = [], []
    for name in new:
        if name in old:
            (kept if same(name) else modified).append(name)
    return Changes(tuple(kept), tuple(modified), tuple(n for n in new if n not in old),
                   tuple(n for n in old if n not in new))


def diffConfigs(old: Config, new: Config) -> ConfigDiff:
    """
    What changed from C{old} to C{new} (see the module docstring for what each kind depends on).
    """
    oldTLS, newTLS = old.tls, new.tls

    def sameTLS(a: Optional[str], b: Optional[str]) -> bool:
        if a != b:
            return False
        return a is None or oldTLS.get(a) == newTLS.get(b)

    clusters = _names(old.clusters, new.clusters,
                      lambda n: old.clusters[n] == new.clusters[n] and sameTLS(old.clusters[n].tls,
                                                                                 new.clusters[n].tls))
    filters = _names(old.filters, new.filters, lambda n: old.filters[n] == new.filters[n])
    routes = _names(old.routes, new.routes, lambda n: old.routes[n] == new.routes[n])
    meshSame = getattr(old.mesh, "tracing", None) == getattr(new.mesh, "tracing", None)

    def listenerSame(name: str) -> bool:
        a, b = old.listeners[name], new.listeners[name]
        if a != b or not sameTLS(a.tls, b.tls) or not meshSame:
            return False
        if a.routes is not None and old.routes.get(a.routes) != new.routes.get(b.routes):
            return False
        # Not the clusters it uses: the listener's filters find them in the live mapping (module docstring).
        return not any(old.filters.get(f) != new.filters.get(f) for f in a.filters)

    listeners = _moved(old.listeners, new.listeners, listenerSame)
    echoes = _moved(old.echoes, new.echoes, lambda n: old.echoes[n] == new.echoes[n])
    admin = (old.mesh.admin != new.mesh.admin or not sameTLS(old.mesh.admin_tls, new.mesh.admin_tls))
    return ConfigDiff(listeners, clusters, filters, routes, echoes, admin)


def _moved(old: Mapping[str, Any], new: Mapping[str, Any], same) -> Changes:
    """
    Like L{_names} for things that listen: one whose endpoint changed is removed and added.
    """
    changes = _names(old, new, same)
    moved = tuple(n for n in changes.modified if old[n].endpoint != new[n].endpoint)
    if not moved:
        return changes
    return Changes(changes.kept, tuple(n for n in changes.modified if n not in moved),
                   changes.added + moved, changes.removed + moved)


def drainCluster(cluster: Any) -> None:
    """
    Retire a cluster the new configuration replaced or removed: its idle upstream connections close now,
    each busy one when its request ends, and pools it makes from now on keep none either. Requests in
    flight finish, retries included.
    """
    cluster.pools.drain()
