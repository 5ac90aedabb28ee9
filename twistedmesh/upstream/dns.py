"""
DNS discovery (Envoy's C{STRICT_DNS} and C{LOGICAL_DNS} clusters; see docs/discovery.md).

A DNS cluster's C{endpoints} name hosts by DNS name (C{tcp:api.internal:8080}). L{DNSDiscovery} resolves
every name through an injected L{IResolver} (twisted.names: the answers carry TTLs) on the injected clock,
never blocking the reactor, and re-resolves every C{dns_refresh_rate} (or, with C{respect_dns_ttl}, after
the answers' smallest TTL):

  - B{strict_dns}: every address of every name is a host, named C{tcp:host=<address>:port=<port>} and
    keeping the name as its TLS server name when the cluster has C{tls}. Hosts come and go with the answers
    through L{Cluster.updateHosts}.
  - B{logical_dns}: one host, named by the configured endpoint, that connects to the first address of the
    latest answer: new connections follow the answer, existing ones are left alone (Envoy's rule, for
    large DNS-balanced services whose answers rotate).

A name whose resolution fails (an error, no answer within C{dns_timeout}, or an answer without an address)
keeps its last good addresses, and the next try comes after C{dns_failure_refresh_rate}. A name written as
an address is used as it is, without a query.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from random import Random
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IReactorTime, IResolver
from twisted.logger import Logger
from twisted.names import dns
from twisted.python.failure import Failure
from zope.interface import implementer

from ..config.discovery import DiscoveryConfig
from .discovery import DiscoveredHost, IDiscovery, UpdateStats

if TYPE_CHECKING:
    from .cluster import Cluster

__all__ = ["DNSDiscovery", "DNSTarget", "parseTarget", "addressEndpoint", "addressesOf", "systemResolver"]

_SPLIT = re.compile(r"(?<!\\):")


@dataclass(frozen=True)
class DNSTarget:
    """
    One configured endpoint of a DNS cluster, taken apart.

    @ivar endpoint: the endpoint string as configured.
    @ivar name: the DNS name (or address) to resolve.
    @ivar port: the port, as written.
    @ivar extra: the endpoint's other parameters (C{timeout=3}, C{bindAddress=...}), kept on every address.
    @ivar weight: the configured weight, given to each of the name's addresses.
    """

    endpoint: str
    name: str
    port: str
    extra: Tuple[str, ...]
    weight: int


def parseTarget(endpoint: str, weight: int) -> DNSTarget:
    """
    Take a C{tcp:} client endpoint string apart (C{tcp:NAME:PORT} or C{tcp:host=NAME:port=PORT}).

    @raise ValueError: not a C{tcp:} endpoint with a host and a port.
    """
    parts = _SPLIT.split(endpoint.strip())
    if parts[0] != "tcp":
        raise ValueError(f"{endpoint!r}: a DNS cluster resolves tcp: endpoints only")
    positional: List[str] = []
    host = port = None
    extra = []
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        if not eq:
            positional.append(part)
        elif key == "host":
            host = value
        elif key == "port":
            port = value
        else:
            extra.append(part)
    if host is None and positional:
        host = positional.pop(0)
    if port is None and positional:
        port = positional.pop(0)
    if not host or not port:
        raise ValueError(f"{endpoint!r} names no host and port")
    return DNSTarget(endpoint, host.replace("\\:", ":"), port, tuple(extra), weight)


def addressEndpoint(target: DNSTarget, address: str) -> str:
    """
    The endpoint string of one of C{target}'s addresses: C{tcp:host=ADDRESS:port=PORT} plus the target's
    other parameters (an IPv6 address has its colons escaped).
    """
    fields = ["tcp", "host=" + address.replace(":", "\\:"), "port=" + target.port]
    fields.extend(target.extra)
    return ":".join(fields)


def addressesOf(result: Tuple[list, list, list], rtype: int) -> Tuple[List[str], Optional[int]]:
    """
    The addresses of type C{rtype} (C{dns.A} or C{dns.AAAA}) in a twisted.names lookup result
    C{(answers, authority, additional)}, in answer order without repeats, and their smallest TTL (C{None}
    without any). CNAME records on the way are skipped: the resolver has followed them.
    """
    addresses: List[str] = []
    ttl: Optional[int] = None
    for record in result[0]:
        if record.type != rtype:
            continue
        if rtype == dns.A:
            address = record.payload.dottedQuad()
        else:
            address = socket.inet_ntop(socket.AF_INET6, record.payload.address)
        if address not in addresses:
            addresses.append(address)
        ttl = record.ttl if ttl is None else min(ttl, record.ttl)
    return addresses, ttl


def systemResolver(reactor, resolvconf: str = "/etc/resolv.conf", hostsFile: bytes = b"/etc/hosts") -> IResolver:
    """
    twisted.names' resolver of the system on C{reactor}: the hosts file first, then the name servers of
    C{resolvconf} (through a cache honouring the TTLs). Like C{client.createResolver}, which cannot be
    given a reactor.

    The hosts file is read on each lookup of a name (a small file, once per refresh per name); the name
    servers are asked over UDP without blocking.
    """
    from twisted.names import cache, client, hosts, resolve

    return resolve.ResolverChain([
        hosts.Resolver(hostsFile),
        cache.CacheResolver(reactor=reactor),
        client.Resolver(resolvconf, reactor=reactor),
    ])


class _Empty(Exception):
    """
    A name resolved to no address of the wanted family.
    """


@implementer(IDiscovery)
class DNSDiscovery:
    """
    Resolves a DNS cluster's names on a timer and updates its hosts (see the module docstring).

    @ivar targets: the configured endpoints, taken apart.
    @ivar last: each target's last good addresses (a target missing here has never resolved).
    @ivar nextDelay: the wait before the next resolution, as last scheduled (for tests and the docs).
    """

    log = Logger()

    def __init__(self, cluster: "Cluster", config: DiscoveryConfig, clock: IReactorTime,
                 random: Optional[Random] = None, resolver: Optional[IResolver] = None) -> None:
        self.cluster = cluster
        self.config = config
        self.clock = clock
        self.resolver = resolver
        self.logical = config.type == "logical_dns"
        self.targets = [parseTarget(h.endpoint, h.weight) for h in cluster.config.endpoints]
        self.stats = UpdateStats(cluster.stats)
        self.last: Dict[int, Tuple[List[str], Optional[int]]] = {}
        self.running = False
        self.nextDelay: Optional[float] = None
        self._timer = None
        self._timeout = None
        self._pending: List[defer.Deferred] = []
        self._round = 0
        self._address: Optional[str] = None  # logical_dns: the address the host connects to

    def start(self) -> None:
        """
        Resolve now, then on the timer.
        """
        if self.running:
            return
        self.running = True
        if self.resolver is None:
            self.resolver = systemResolver(self.clock)
        self.resolve()

    def stop(self) -> None:
        """
        Cancel the timer and any resolution in flight; the hosts stay.
        """
        self.running = False
        self._round += 1  # answers still arriving belong to no round
        for call in (self._timer, self._timeout):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._timeout = None
        pending, self._pending = self._pending, []
        for d in pending:
            d.cancel()

    def resolve(self) -> None:
        """
        One resolution of every name (the timer calls it; so may a test).
        """
        self._timer = None
        self._round += 1
        round = self._round
        self.stats.update_attempt.value += 1
        lookups = [self._lookup(t) for t in self.targets]
        self._pending = [d for d in lookups if not d.called]
        self._timeout = self.clock.callLater(self.config.dns_timeout, self._timedOut, round)
        done = defer.DeferredList(lookups, consumeErrors=True)
        done.addCallback(self._resolved, round)
        done.addErrback(lambda f: self.log.failure("cluster {name}: DNS update failed", f, name=self.cluster.name))

    def _timedOut(self, round: int) -> None:
        self._timeout = None
        if round != self._round:
            return
        pending, self._pending = self._pending, []
        for d in pending:
            d.cancel()  # a resolver without a canceller errbacks with CancelledError; the late answer is dropped

    def _lookup(self, target: DNSTarget) -> defer.Deferred:
        """
        C{target}'s addresses of the configured family and their smallest TTL.
        """
        name = target.name
        if isIPAddress(name) or isIPv6Address(name):
            return defer.succeed(([name], None))
        family = self.config.dns_lookup_family
        if family == "v4_only":
            return self._query(name, dns.A).addCallback(self._nonEmpty)
        if family == "v6_only":
            return self._query(name, dns.AAAA).addCallback(self._nonEmpty)
        both = defer.DeferredList([self._query(name, dns.A), self._query(name, dns.AAAA)], consumeErrors=True)
        return both.addCallback(self._combine, family)

    def _query(self, name: str, rtype: int) -> defer.Deferred:
        lookup = self.resolver.lookupAddress if rtype == dns.A else self.resolver.lookupIPV6Address
        d = defer.maybeDeferred(lookup, name)
        return d.addCallback(addressesOf, rtype)

    @staticmethod
    def _nonEmpty(found: Tuple[List[str], Optional[int]]) -> Tuple[List[str], Optional[int]]:
        if not found[0]:
            raise _Empty()
        return found

    @staticmethod
    def _combine(results, family: str) -> Tuple[List[str], Optional[int]]:
        """
        The addresses of an A and an AAAA query, as C{family} wants them: C{all} both (IPv4 first),
        C{v4_preferred} IPv4 if any else IPv6, C{auto} IPv6 if any else IPv4. Fails only if both did.
        """
        (ok4, r4), (ok6, r6) = results
        if not ok4 and not ok6:
            return r4  # the failure of the A query stands for both
        v4 = r4 if ok4 else ([], None)
        v6 = r6 if ok6 else ([], None)
        if family == "all":
            ttls = [t for t in (v4[1], v6[1]) if t is not None]
            found = (v4[0] + v6[0], min(ttls) if ttls else None)
        elif family == "v4_preferred":
            found = v4 if v4[0] else v6
        else:
            found = v6 if v6[0] else v4
        if not found[0]:
            raise _Empty()
        return found

    def _resolved(self, results: Sequence[Tuple[bool, object]], round: int) -> None:
        """
        Every name's lookup ended: apply the answers (a failed name keeps its last good addresses), count
        the round, schedule the next.
        """
        if round != self._round:
            return  # stopped (or restarted) meanwhile
        timeout, self._timeout = self._timeout, None
        if timeout is not None and timeout.active():
            timeout.cancel()
        self._pending = []
        failed = empty = False
        ttls: List[int] = []
        for i, (ok, result) in enumerate(results):
            target = self.targets[i]
            if ok:
                self.last[i] = result
                if result[1] is not None:
                    ttls.append(result[1])
                continue
            failure: Failure = result
            if failure.check(_Empty):
                empty = True
                why = "no address"
            else:
                failed = True
                why = "timed out" if failure.check(defer.CancelledError) else failure.getErrorMessage()
            self.log.warn("cluster {cluster}: cannot resolve {name} ({why}); keeping its last addresses",
                          cluster=self.cluster.name, name=target.name, why=why)
        stats = self.stats
        changed = self._apply()
        if failed:
            stats.update_failure.value += 1
        elif empty:
            stats.update_empty.value += 1
        else:
            stats.update_success.value += 1
            if not changed:
                stats.update_no_rebuild.value += 1
        config = self.config
        if failed or empty:
            delay = config.dns_failure_refresh_rate
        elif config.respect_dns_ttl and ttls and min(ttls) > 0:
            delay = float(min(ttls))
        else:
            delay = config.dns_refresh_rate
        self.nextDelay = delay
        if self.running:
            self._timer = self.clock.callLater(delay, self.resolve)

    def _apply(self) -> bool:
        """
        Hand the cluster the hosts of the last good answers; C{True} if that changed anything.
        """
        cluster = self.cluster
        tls = cluster.tls is not None
        if self.logical:
            found = self.last.get(0)
            if found is None:
                return False
            target = self.targets[0]
            address = found[0][0]
            if not cluster.hosts:
                self._address = address
                return cluster.updateHosts([DiscoveredHost(
                    target.endpoint, target.weight, target.name if tls else None, addressEndpoint(target, address),
                )])
            if address == self._address:
                return False
            # The same host, connecting elsewhere from now on: its health, stats and pooled connections stay.
            self._address = address
            host = cluster.hosts[0]
            host.client = cluster.clientFor(cluster.reactor, addressEndpoint(target, address),
                                            target.name if tls else None)
            self.log.info("cluster {cluster}: {name} now connects to {address}", cluster=cluster.name,
                          name=target.name, address=address)
            return True
        hosts = []
        for i, target in enumerate(self.targets):
            found = self.last.get(i)
            if found is None:
                continue
            for address in found[0]:
                hosts.append(DiscoveredHost(addressEndpoint(target, address), target.weight,
                                            target.name if tls else None))
        return cluster.updateHosts(hosts)
