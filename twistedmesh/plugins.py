"""
Finding filter plugins and turning a listener's C{filters =} list into per-connection (or per-stream)
filter makers, once, when the service is built.
"""

from __future__ import annotations

import random as _random
from dataclasses import dataclass, field
from typing import AbstractSet, Callable, Dict, List, Mapping, Optional

from twisted.plugin import getPlugins
from zope.interface import implementer
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from .config import ConfigError, Config, ListenerConfig, Options, suggest
from .interfaces import IFilterContext, IHTTPFilterFactory, INetworkFilterFactory
from .observability.stats import StatsStore


@implementer(IFilterContext)
@dataclass
class FilterContext:
    """
    The narrow handles a filter factory gets (see L{IFilterContext}).

    @ivar clusters: the clusters in effect, by name: the service's one live mapping, which reloads and CDS
        updates change in place (a cluster added, replaced or removed) without rebuilding the listener. A
        filter looks its cluster up when a stream or connection starts and keeps that object for it, never
        across streams: so a stream finishes on the cluster it started with and the next one gets the new.
    @ivar clusterNames: the names of the clusters of the configuration being built (what a factory checks
        its options against: C{clusters} still shows the configuration in effect while a reload builds);
        C{None}: the names of C{clusters}.
    """

    reactor: object
    stats: StatsStore
    clusters: Mapping[str, object]
    listener: ListenerConfig
    random: _random.Random = field(default_factory=_random.Random)
    routes: Optional[object] = None  # the listener's compiled route table (HTTP listeners)
    healthState: Optional[object] = None  # the proxy's health (failed, draining), for health_check
    clusterNames: Optional[AbstractSet[str]] = None


def findFactories(interface, errors: List[ConfigError], file: str) -> Dict[str, object]:
    """
    Every plugin providing C{interface}, by name, each checked with C{verifyObject}. Plugins that do not
    hold to the interface are reported as errors rather than used.
    """
    found: Dict[str, object] = {}
    for plugin in getPlugins(interface):
        try:
            verifyObject(interface, plugin)
        except Invalid as e:
            errors.append(ConfigError(file, None, None, f"plugin {plugin!r} does not provide {interface.__name__}: {e}"))
            continue
        if plugin.name in found and found[plugin.name] is not plugin:
            errors.append(ConfigError(file, None, None, f"two plugins are named {plugin.name!r}: "
                                      f"{found[plugin.name]!r} and {plugin!r}; rename one"))
            continue
        found[plugin.name] = plugin
    return found


def buildChain(
    config: Config,
    listener: ListenerConfig,
    factories: Mapping[str, object],
    context: FilterContext,
    errors: List[ConfigError],
) -> List[Callable]:
    """
    The filter makers for C{listener}'s chain, in order. Each name in C{filters =} is a C{[filter:NAME]}
    section (whose C{type} names the plugin) or, without a section, a plugin's own name with its defaults.
    Errors (unknown plugin, bad options) are appended to C{errors}.
    """
    makers: List[Callable] = []
    section = f"listener:{listener.name}"
    kind = "network" if listener.protocol == "tcp" else "HTTP"
    for name in listener.filters:
        fconfig = config.filters.get(name)
        ptype = fconfig.type if fconfig is not None else name
        factory = factories.get(ptype)
        if factory is None:
            where = fconfig.section if fconfig is not None else section
            key = "type" if fconfig is not None else "filters"
            errors.append(ConfigError(
                config.file, where, key, f"no {kind} filter plugin named `{ptype}`{suggest(ptype, factories)}"
            ))
            continue
        options = Options(
            config.file,
            fconfig.section if fconfig is not None else f"filter:{name}",
            dict(fconfig.items) if fconfig is not None else {},
            errors,
        )
        try:
            maker = factory.configure(options, context)
        except ConfigError as e:
            errors.append(e)
            continue
        options.finish()
        makers.append(maker)
    return makers


def factoriesFor(protocol: str, errors: List[ConfigError], file: str) -> Dict[str, object]:
    """
    The filter plugins that a listener of C{protocol} (C{tcp} or C{http}) can use.
    """
    interface = INetworkFilterFactory if protocol == "tcp" else IHTTPFilterFactory
    return findFactories(interface, errors, file)
