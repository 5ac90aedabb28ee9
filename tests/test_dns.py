"""
Tests for L{twistedmesh.upstream.dns}: strict and logical DNS clusters, with a fake resolver on a Clock
(unit) and with a twisted.names DNS server on 127.0.0.1 whose answers change while traffic flows through
the proxy (integration).
"""

import socket
from random import Random
from typing import Dict, List, Optional, Union

from twisted.internet import defer, reactor
from twisted.internet.error import DNSLookupError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.names import client, dns, error, server
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from twistedmesh.config import loadString
from twistedmesh.observability.stats import StatsStore
from twistedmesh.service import MeshService
from twistedmesh.upstream.cluster import Cluster
from twistedmesh.upstream.dns import DNSDiscovery, addressEndpoint, parseTarget

from .support import Traffic, proxyConfig, serveWhoami, waitFor

Answer = Union[List[tuple], Exception, defer.Deferred]


def _record(name: str, address: str, ttl: int) -> dns.RRHeader:
    if ":" in address:
        return dns.RRHeader(name, dns.AAAA, dns.IN, ttl, dns.Record_AAAA(address, ttl))
    return dns.RRHeader(name, dns.A, dns.IN, ttl, dns.Record_A(address, ttl))


class FakeResolver:
    """
    An IResolver answering from C{answers}: name -> list of C{(address, ttl)}, an exception, or a Deferred
    the test fires (or never does). Records every query.
    """

    def __init__(self) -> None:
        self.answers: Dict[str, Answer] = {}
        self.queries: List[tuple] = []

    def _answer(self, name: str, rtype: int) -> defer.Deferred:
        self.queries.append((name, rtype))
        answer = self.answers.get(name, error.DNSNameError(name))
        if isinstance(answer, Exception):
            return defer.fail(answer)
        if isinstance(answer, defer.Deferred):
            return answer
        records = [_record(name, a, ttl) for a, ttl in answer if (":" in a) == (rtype == dns.AAAA)]
        # A CNAME on the way, as a real answer may have: skipped.
        records.insert(0, dns.RRHeader(name, dns.CNAME, dns.IN, 60, dns.Record_CNAME(name, 60)))
        return defer.succeed((records, [], []))

    def lookupAddress(self, name: str, timeout=None) -> defer.Deferred:
        return self._answer(name, dns.A)

    def lookupIPV6Address(self, name: str, timeout=None) -> defer.Deferred:
        return self._answer(name, dns.AAAA)


class _TLS:
    """
    Just what a cluster asks of its ClientTLS: records the server name of each host's endpoint.
    """

    def __init__(self) -> None:
        self.names: List[Optional[str]] = []

    def wrapEndpoint(self, endpoint, hostname=None):
        self.names.append(hostname)
        return endpoint


class Setup:
    """
    A DNS cluster from INI keys, its fake resolver and clock, the discovery started.
    """

    def __init__(self, keys: str, endpoints: str = "tcp:api.test:8080") -> None:
        text = f"[mesh]\nadmin = off\n[cluster:api]\nendpoints = {endpoints}\n{keys}\n"
        self.config = loadString(text, "mesh.ini").clusters["api"]
        self.clock = Clock()
        self.stats = StatsStore()
        self.cluster = Cluster(self.config, self.clock, self.stats, Random(0))
        self.resolver = FakeResolver()
        self.discovery = DNSDiscovery(self.cluster, self.config.discovery, self.clock, Random(0), self.resolver)

    def stat(self, name: str) -> int:
        return self.stats.get("cluster.api." + name).value

    def endpoints(self) -> List[str]:
        return [h.endpoint for h in self.cluster.hosts]


class StrictDNSTests(SynchronousTestCase):
    """
    C{discovery = strict_dns}.
    """

    def test_everyAddressIsAHost(self) -> None:
        """Each address of each name is a host, with the configured port, weight and other parameters."""
        s = Setup("discovery = strict_dns", "tcp:api.test:8080:timeout=3 weight=2, tcp:host=web.test:port=81")
        s.resolver.answers = {"api.test": [("10.0.0.1", 30), ("10.0.0.2", 30)], "web.test": [("10.0.1.1", 30)]}
        s.discovery.start()
        self.assertEqual(s.endpoints(), ["tcp:host=10.0.0.1:port=8080:timeout=3", "tcp:host=10.0.0.2:port=8080:timeout=3",
                                         "tcp:host=10.0.1.1:port=81"])
        self.assertEqual([h.weight for h in s.cluster.hosts], [2, 2, 1])
        self.assertEqual(s.cluster.hosts[0].client._timeout, 3)
        self.assertEqual((s.stat("update_attempt"), s.stat("update_success"), s.stat("membership_total")), (1, 1, 3))

    def test_refresh(self) -> None:
        """Every dns_refresh_rate the names are resolved again; hosts that stay keep their object."""
        s = Setup("discovery = strict_dns\ndns_refresh_rate = 2s")
        s.resolver.answers = {"api.test": [("10.0.0.1", 30), ("10.0.0.2", 30)]}
        s.discovery.start()
        kept = s.cluster.hosts[1]
        s.resolver.answers = {"api.test": [("10.0.0.3", 30), ("10.0.0.2", 30)]}
        s.clock.advance(1.9)
        self.assertEqual(len(s.resolver.queries), 1)
        s.clock.advance(0.1)
        self.assertEqual(len(s.resolver.queries), 2)
        self.assertEqual(s.endpoints(), ["tcp:host=10.0.0.2:port=8080", "tcp:host=10.0.0.3:port=8080"])
        self.assertIs(s.cluster.hosts[0], kept)
        self.assertEqual(s.stat("membership_change"), 2)
        s.clock.advance(2)
        self.assertEqual((s.stat("update_success"), s.stat("update_no_rebuild")), (3, 1))

    def test_respectTTL(self) -> None:
        """With respect_dns_ttl the next resolution comes after the smallest TTL; a zero TTL means the rate."""
        s = Setup("discovery = strict_dns\nrespect_dns_ttl = true\ndns_refresh_rate = 5s")
        s.resolver.answers = {"api.test": [("10.0.0.1", 30), ("10.0.0.2", 12)]}
        s.discovery.start()
        self.assertEqual(s.discovery.nextDelay, 12.0)
        s.clock.advance(11.9)
        self.assertEqual(len(s.resolver.queries), 1)
        s.resolver.answers = {"api.test": [("10.0.0.1", 0)]}
        s.clock.advance(0.1)
        self.assertEqual(len(s.resolver.queries), 2)
        self.assertEqual(s.discovery.nextDelay, 5.0)

    def test_ttlIgnoredByDefault(self) -> None:
        """Without respect_dns_ttl the TTL does not matter."""
        s = Setup("discovery = strict_dns\ndns_refresh_rate = 3s")
        s.resolver.answers = {"api.test": [("10.0.0.1", 600)]}
        s.discovery.start()
        self.assertEqual(s.discovery.nextDelay, 3.0)

    def test_failureKeepsLastSet(self) -> None:
        """A failed resolution keeps the last good hosts, is counted, and is retried at the failure rate."""
        s = Setup("discovery = strict_dns\ndns_refresh_rate = 10s\ndns_failure_refresh_rate = 1s")
        s.resolver.answers = {"api.test": [("10.0.0.1", 30)]}
        s.discovery.start()
        before = s.cluster.hosts
        s.resolver.answers = {"api.test": DNSLookupError("SERVFAIL")}
        s.clock.advance(10)
        self.assertEqual(s.cluster.hosts, before)
        self.assertEqual((s.stat("update_failure"), s.stat("update_success")), (1, 1))
        self.assertEqual(s.discovery.nextDelay, 1.0)
        s.resolver.answers = {"api.test": [("10.0.0.9", 30)]}
        s.clock.advance(1)
        self.assertEqual(s.endpoints(), ["tcp:host=10.0.0.9:port=8080"])

    def test_oneNameFails(self) -> None:
        """When one of several names fails, it keeps its hosts while the others follow their answers."""
        s = Setup("discovery = strict_dns", "tcp:a.test:80, tcp:b.test:80")
        s.resolver.answers = {"a.test": [("10.0.0.1", 30)], "b.test": [("10.0.0.2", 30)]}
        s.discovery.start()
        s.resolver.answers = {"a.test": [("10.0.0.3", 30)], "b.test": error.DNSServerError("b.test")}
        s.clock.advance(5)
        self.assertEqual(s.endpoints(), ["tcp:host=10.0.0.2:port=80", "tcp:host=10.0.0.3:port=80"])
        self.assertEqual(s.stat("update_failure"), 1)

    def test_timeout(self) -> None:
        """A resolution that takes longer than dns_timeout fails (the query is cancelled); the hosts stay."""
        s = Setup("discovery = strict_dns\ndns_timeout = 2s\ndns_refresh_rate = 10s")
        s.resolver.answers = {"api.test": [("10.0.0.1", 30)]}
        s.discovery.start()
        pending = defer.Deferred()
        s.resolver.answers = {"api.test": pending}
        s.clock.advance(10)
        self.assertEqual(s.stat("update_failure"), 0)
        s.clock.advance(2)
        self.assertTrue(pending.called)  # cancelled
        self.assertEqual(s.stat("update_failure"), 1)
        self.assertEqual(s.endpoints(), ["tcp:host=10.0.0.1:port=8080"])

    def test_emptyAnswerKept(self) -> None:
        """An answer without an address is counted as empty and the last hosts are kept."""
        s = Setup("discovery = strict_dns")
        s.resolver.answers = {"api.test": [("10.0.0.1", 30)]}
        s.discovery.start()
        s.resolver.answers = {"api.test": []}
        s.clock.advance(5)
        self.assertEqual(s.stat("update_empty"), 1)
        self.assertEqual(s.endpoints(), ["tcp:host=10.0.0.1:port=8080"])

    def test_firstFailureNoHosts(self) -> None:
        """A name that never resolved gives no host."""
        s = Setup("discovery = strict_dns")
        s.discovery.start()
        self.assertEqual(s.cluster.hosts, ())
        self.assertEqual(s.stat("update_failure"), 1)

    def test_addressNotQueried(self) -> None:
        """An endpoint written with an address is used as it is."""
        s = Setup("discovery = strict_dns", "tcp:10.1.1.1:80")
        s.discovery.start()
        self.assertEqual(s.resolver.queries, [])
        self.assertEqual(s.endpoints(), ["tcp:host=10.1.1.1:port=80"])

    def test_families(self) -> None:
        """dns_lookup_family picks which records make hosts; IPv6 addresses are escaped in the endpoint."""
        answers = {"api.test": [("10.0.0.1", 30), ("2001:db8::1", 30)]}
        expected = {
            "v4_only": ["tcp:host=10.0.0.1:port=8080"],
            "v6_only": ["tcp:host=2001\\:db8\\:\\:1:port=8080"],
            "all": ["tcp:host=10.0.0.1:port=8080", "tcp:host=2001\\:db8\\:\\:1:port=8080"],
            "auto": ["tcp:host=2001\\:db8\\:\\:1:port=8080"],
            "v4_preferred": ["tcp:host=10.0.0.1:port=8080"],
        }
        for family, endpoints in expected.items():
            s = Setup(f"discovery = strict_dns\ndns_lookup_family = {family}")
            s.resolver.answers = dict(answers)
            s.discovery.start()
            self.assertEqual(s.endpoints(), endpoints, family)
        s = Setup("discovery = strict_dns\ndns_lookup_family = auto")
        s.resolver.answers = {"api.test": [("10.0.0.1", 30)]}
        s.discovery.start()
        self.assertEqual(s.endpoints(), ["tcp:host=10.0.0.1:port=8080"])  # no IPv6: falls back
        self.assertEqual(s.cluster.hosts[0].client._host, "10.0.0.1")

    def test_stop(self) -> None:
        """stop() cancels the next resolution and an answer arriving after it is dropped."""
        s = Setup("discovery = strict_dns")
        pending = defer.Deferred()
        s.resolver.answers = {"api.test": pending}
        s.discovery.start()
        s.discovery.stop()
        self.assertEqual(s.clock.getDelayedCalls(), [])
        self.assertEqual(s.cluster.hosts, ())

    def test_tlsKeepsName(self) -> None:
        """With TLS, a resolved address's connection is checked against the DNS name, not the address."""
        s = Setup("discovery = strict_dns")
        tls = s.cluster.tls = _TLS()
        s.resolver.answers = {"api.test": [("10.0.0.1", 30)]}
        s.discovery.start()
        self.assertEqual(tls.names, ["api.test"])


class SystemResolverTests(SynchronousTestCase):
    """
    The default resolver: the system's, through twisted.names.
    """

    def test_localhost(self) -> None:
        """Without an injected resolver, start() uses the system's: localhost resolves from the hosts file."""
        try:
            with open("/etc/hosts", encoding="utf-8") as f:
                if "localhost" not in f.read():
                    raise OSError
        except OSError:
            raise SkipTest("no /etc/hosts entry for localhost")
        text = "[mesh]\nadmin = off\n[cluster:api]\ndiscovery = strict_dns\nendpoints = tcp:localhost:8080\n"
        config = loadString(text, "mesh.ini").clusters["api"]
        reactor = MemoryReactorClock()
        cluster = Cluster(config, reactor, StatsStore(), Random(0))
        discovery = DNSDiscovery(cluster, config.discovery, reactor)
        discovery.start()
        self.addCleanup(discovery.stop)
        self.assertIn("tcp:host=127.0.0.1:port=8080", [h.endpoint for h in cluster.hosts])


class LogicalDNSTests(SynchronousTestCase):
    """
    C{discovery = logical_dns}.
    """

    def test_oneHostFirstAddress(self) -> None:
        """One host, named by the configured endpoint, connecting to the first address."""
        s = Setup("discovery = logical_dns")
        s.resolver.answers = {"api.test": [("10.0.0.5", 30), ("10.0.0.6", 30)]}
        s.discovery.start()
        self.assertEqual(s.endpoints(), ["tcp:api.test:8080"])
        self.assertEqual(s.cluster.hosts[0].client._host, "10.0.0.5")

    def test_addressFollowsAnswer(self) -> None:
        """When the first address changes, the same host connects to the new one (health and stats stay)."""
        s = Setup("discovery = logical_dns")
        s.resolver.answers = {"api.test": [("10.0.0.5", 30)]}
        s.discovery.start()
        host = s.cluster.hosts[0]
        host.rq_total = 3
        s.resolver.answers = {"api.test": [("10.0.0.7", 30), ("10.0.0.5", 30)]}
        s.clock.advance(5)
        self.assertEqual(s.cluster.hosts, (host,))
        self.assertEqual(host.client._host, "10.0.0.7")
        self.assertEqual(host.rq_total, 3)
        self.assertEqual(s.stat("membership_change"), 1)
        s.resolver.answers = {"api.test": DNSLookupError("down")}
        s.clock.advance(5)
        self.assertEqual(host.client._host, "10.0.0.7")


class TargetTests(SynchronousTestCase):
    """
    Endpoint strings taken apart and rebuilt.
    """

    def test_roundTrip(self) -> None:
        """Positional and keyword forms; other parameters survive."""
        target = parseTarget("tcp:api.test:80:timeout=2", 3)
        self.assertEqual((target.name, target.port, target.extra, target.weight), ("api.test", "80", ("timeout=2",), 3))
        self.assertEqual(addressEndpoint(target, "::1"), "tcp:host=\\:\\:1:port=80:timeout=2")
        target = parseTarget("tcp:port=80:host=api.test", 1)
        self.assertEqual((target.name, target.port), ("api.test", "80"))
        self.assertRaises(ValueError, parseTarget, "unix:/tmp/s", 1)
        self.assertRaises(ValueError, parseTarget, "tcp:api.test", 1)


# -- integration: a DNS server on loopback, the proxy, and traffic -----------------------------------------------


class Records:
    """
    The authority of the test's DNS server: C{answers} maps a name to addresses, changed by the test.
    """

    def __init__(self) -> None:
        self.answers: Dict[str, List[str]] = {}

    def query(self, query, timeout=None):
        name = query.name.name.decode("ascii")
        addresses = self.answers.get(name)
        if addresses is None:
            return defer.fail(error.DomainError(name))
        want = dns.AAAA if query.type == dns.AAAA else dns.A
        records = [_record(name, a, 1) for a in addresses
                   if (dns.AAAA if ":" in a else dns.A) == want]
        return defer.succeed((records, [], []))


def _ipv6Loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class DNSIntegrationTests(TestCase):
    """
    A strict_dns cluster resolving through a DNS server on 127.0.0.1 whose answer changes while requests
    flow through the proxy.
    """

    timeout = 30

    @defer.inlineCallbacks
    def test_answerChangesUnderTraffic(self):
        """Hosts follow the DNS answer (IPv4 only, both, IPv6 only) with no failed request on the way."""
        if not _ipv6Loopback():
            raise SkipTest("no IPv6 loopback (::1): the test needs two loopback addresses on one port")
        # One port, two loopback addresses: the DNS answer alone decides which backend gets traffic.
        v4 = serveWhoami(self, b"v4")
        port = v4.getHost().port
        serveWhoami(self, b"v6", port, "::1")
        records = Records()
        records.answers["api.test"] = ["127.0.0.1"]
        factory = server.DNSServerFactory(authorities=[records])
        udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        self.addCleanup(udp.stopListening)
        text = proxyConfig("api", f"""
[cluster:api]
discovery = strict_dns
endpoints = tcp:api.test:{port}
dns_lookup_family = all
dns_refresh_rate = 100ms
dns_timeout = 2s
""")
        service = MeshService(loadString(text, "dns.ini"), reactor, seed=1)
        cluster = service.clusters["api"]
        cluster.discovery.resolver = client.Resolver(servers=[("127.0.0.1", udp.getHost().port)], reactor=reactor)
        service.startService()
        self.addCleanup(service.stopService)
        yield service.whenLive
        load = Traffic(f"http://127.0.0.1:{service.listeners['edge'].port.getHost().port}/")
        traffic, seen, failures = load.run, load.seen, load.failures

        def endpoints():
            return sorted(h.endpoint for h in cluster.hosts)

        def until(expected):
            return waitFor(lambda: endpoints() == expected, 10, lambda: f"hosts {expected}, not {endpoints()}")

        v4Only = [f"tcp:host=127.0.0.1:port={port}"]
        both = sorted(v4Only + [f"tcp:host=\\:\\:1:port={port}"])
        yield until(v4Only)
        yield traffic(5)
        self.assertEqual(set(seen), {b"v4"})
        # The answer changes while requests are in flight.
        flowing = traffic(40)
        records.answers["api.test"] = ["127.0.0.1", "::1"]
        yield until(both)
        records.answers["api.test"] = ["::1"]
        yield until([f"tcp:host=\\:\\:1:port={port}"])
        yield flowing
        del seen[:]
        yield traffic(5)
        self.assertEqual(set(seen), {b"v6"})
        self.assertEqual(failures, [])
        # A failing DNS server keeps the last hosts.
        failuresBefore = cluster.stats.counter("update_failure").value
        del records.answers["api.test"]
        yield waitFor(lambda: cluster.stats.counter("update_failure").value > failuresBefore, 10, "a failed update")
        self.assertEqual(endpoints(), [f"tcp:host=\\:\\:1:port={port}"])
        yield traffic(2)
        self.assertEqual(failures, [])
