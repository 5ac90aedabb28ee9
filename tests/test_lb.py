"""
Tests for L{twistedmesh.upstream.lb} (every policy, the rules they share, hash keys) and
L{twistedmesh.config.lb} (the options and every error path).
"""

from collections import Counter
from random import Random

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from twistedmesh.config import ClusterConfig, HostConfig, Options
from twistedmesh.config.lb import MAX_RING_SIZE, HashPolicy, LBConfig, parseHashPolicy, parseLB
from twistedmesh.interfaces import ILoadBalancer
from twistedmesh.observability.stats import StatsStore
from twistedmesh.upstream.cluster import Cluster
from twistedmesh.upstream.lb import (
    MAGLEV_TABLE_SIZE,
    POLICIES,
    LeastRequest,
    Maglev,
    RingHash,
    RoundRobin,
    WeightedRandom,
    addressHashKey,
    hash64,
    requestHashKey,
)


class _Host:
    """
    Just what a load balancer reads of a host.
    """

    def __init__(self, name: str, weight: int = 1) -> None:
        self.name = name
        self.endpoint = f"tcp:10.0.0.{name}:80" if name.isdigit() else f"tcp:{name}.local:80"
        self.weight = weight
        self.healthy = True
        self.rq_active = 0

    def __repr__(self) -> str:
        return self.name


def _names(lb: RoundRobin, n: int, exclude=None) -> str:
    """
    The names of C{n} picks, as one string.
    """
    return "".join(lb.pick(exclude).name for _ in range(n))


class RoundRobinTests(SynchronousTestCase):
    """
    Tests for L{RoundRobin}.
    """

    def test_smoothWeightedSequence(self) -> None:
        """
        Weights 5, 1, 1 give exactly a a b a c a a in every window of seven picks.
        """
        lb = RoundRobin([_Host("a", 5), _Host("b"), _Host("c")])
        self.assertEqual(_names(lb, 21), "aabacaa" * 3)

    def test_equalWeightsAlternate(self) -> None:
        """
        Hosts of equal weight are picked in turn.
        """
        lb = RoundRobin([_Host("a"), _Host("b"), _Host("c")])
        self.assertEqual(_names(lb, 6), "abcabc")

    def test_unhealthySkipped(self) -> None:
        """
        An unhealthy host is never picked while it is unhealthy, and the others share its picks.
        """
        a, b, c = _Host("a", 5), _Host("b"), _Host("c")
        lb = RoundRobin([a, b, c])
        a.healthy = False
        self.assertEqual(_names(lb, 4), "bcbc")

    def test_excludeHonoured(self) -> None:
        """
        The excluded host is not picked while another healthy host is available.
        """
        a, b = _Host("a", 5), _Host("b")
        lb = RoundRobin([a, b])
        self.assertEqual(_names(lb, 5, exclude=a), "bbbbb")

    def test_excludeOnlyHealthyHostReturned(self) -> None:
        """
        When the excluded host is the only healthy one, it is picked rather than nothing.
        """
        a, b = _Host("a"), _Host("b")
        b.healthy = False
        lb = RoundRobin([a, b])
        self.assertIs(lb.pick(a), a)

    def test_allUnhealthyNone(self) -> None:
        """
        With every host unhealthy, there is nothing to pick.
        """
        a, b = _Host("a"), _Host("b")
        a.healthy = b.healthy = False
        lb = RoundRobin([a, b])
        self.assertIsNone(lb.pick())
        self.assertIsNone(lb.pick(a))

    def test_clusterPicksThroughItsPolicy(self) -> None:
        """
        L{Cluster.pick} follows the configured weights over the cluster's hosts.
        """
        config = ClusterConfig(
            "api",
            (HostConfig("tcp:127.0.0.1:9001", 5), HostConfig("tcp:127.0.0.1:9002"), HostConfig("tcp:127.0.0.1:9003")),
        )
        cluster = Cluster(config, Clock(), StatsStore())
        a, b, c = cluster.hosts
        self.assertEqual([cluster.pick() for _ in range(7)], [a, a, b, a, c, a, a])

    def test_injectedSignature(self) -> None:
        """
        Built like every policy, with an injected random and a config, round robin keeps its sequence.
        """
        lb = RoundRobin([_Host("a", 5), _Host("b"), _Host("c")], Random(3), LBConfig())
        self.assertEqual(_names(lb, 14), "aabacaa" * 2)

    def test_rebuildKeepsItsPlace(self) -> None:
        """
        A rebuild (a health change elsewhere) continues the rotation rather than restarting it at the first
        host.
        """
        lb = RoundRobin([_Host("a"), _Host("b"), _Host("c")])
        picks = ""
        for _ in range(6):
            picks += lb.pick().name
            lb.rebuild()
        self.assertEqual(picks, "abcabc")

    def test_precomputedCycleIsSmooth(self) -> None:
        """
        The precomputed cycle is exactly the smooth weighted round robin sequence, cycle after cycle.
        """
        hosts = [_Host(n, w) for n, w in zip("abcd", (6, 10, 14, 4))]  # gcd 2: a cycle of 17
        self.assertEqual(_names(RoundRobin(hosts), 34 * 3), _smooth(hosts, 34 * 3))

    def test_longCycleSameSequence(self) -> None:
        """
        Weights whose cycle is too long to precompute give the same smooth sequence, computed per pick.
        """
        hosts = [_Host(str(i), 990 + i) for i in range(10)]  # coprime: a cycle of 9945 over 10 hosts
        lb = RoundRobin(hosts)
        self.assertEqual(_moved([lb.pick() for _ in range(3000)], _smoothHosts(hosts, 3000)), 0.0)
        hosts[3].healthy = False
        self.assertNotIn(hosts[3], [lb.pick() for _ in range(3000)])
        self.assertNotIn(hosts[4], [lb.pick(hosts[4]) for _ in range(100)])


class _TestCase(SynchronousTestCase):
    """
    A test case with a tolerance assertion (trial's C{assertAlmostEqual} takes no C{delta}).
    """

    def assertNear(self, actual: float, expected: float, delta: float, msg: str = "") -> None:
        """
        Fail unless C{actual} is within C{delta} of C{expected}.
        """
        if abs(actual - expected) > delta:
            self.fail(f"{actual} is not within {delta} of {expected} {msg}".rstrip())


def _smoothHosts(hosts, n: int) -> list:
    """
    The reference smooth weighted round robin: C{n} picks over C{hosts}.
    """
    current = [0] * len(hosts)
    total = sum(h.weight for h in hosts)
    picks = []
    for _ in range(n):
        best = 0
        for i, h in enumerate(hosts):
            current[i] += h.weight
            if current[i] > current[best]:
                best = i
        current[best] -= total
        picks.append(hosts[best])
    return picks


def _smooth(hosts, n: int) -> str:
    """
    The reference sequence's names, as one string.
    """
    return "".join(h.name for h in _smoothHosts(hosts, n))


def _hosts(n: int, weights=None) -> list:
    """
    C{n} hosts named 0, 1, ... with C{weights} (default 1 each).
    """
    return [_Host(str(i), weights[i] if weights else 1) for i in range(n)]


def _make(policy: str, hosts, seed: int = 1, panic=None, **options):
    """
    A C{policy} balancer over C{hosts} with a seeded random and C{options} as its L{LBConfig}.
    """
    return POLICIES[policy](hosts, Random(seed), LBConfig(policy=policy, **options), panic=panic)


def _shares(picks) -> dict:
    """
    Each picked host's share of C{picks}.
    """
    counts = Counter(picks)
    return {host: count / len(picks) for host, count in counts.items()}


KEYS = [b"user-%d" % i for i in range(10000)]


def _mapping(lb) -> list:
    """
    The host each of L{KEYS} goes to.
    """
    return [lb.pick(hashKey=key) for key in KEYS]


def _moved(before, after) -> float:
    """
    The share of keys whose host differs between two mappings.
    """
    return sum(1 for a, b in zip(before, after) if a is not b) / len(before)


class WeightedRandomTests(_TestCase):
    """
    Tests for L{WeightedRandom}.
    """

    def test_weightsRespected(self) -> None:
        """
        Over 10k picks each host's share is its share of the weights, within 10%.
        """
        hosts = _hosts(4, [1, 2, 3, 4])
        lb = _make("random", hosts)
        shares = _shares([lb.pick() for _ in range(10000)])
        for h in hosts:
            self.assertNear(shares[h], h.weight / 10, delta=0.1 * h.weight / 10)

    def test_equalWeightsUniform(self) -> None:
        """
        Hosts of equal weight share 10k picks evenly, within 10%.
        """
        hosts = _hosts(5)
        lb = _make("random", hosts)
        for share in _shares([lb.pick() for _ in range(10000)]).values():
            self.assertNear(share, 0.2, delta=0.02)

    def test_injectedRandomDecides(self) -> None:
        """
        The picks follow the injected random: the same seed gives the same picks, another seed others.
        """
        hosts = _hosts(4, [1, 2, 3, 4])
        one, two, three = (_make("random", hosts, seed=s) for s in (7, 7, 8))
        self.assertEqual([one.pick() for _ in range(50)], [two.pick() for _ in range(50)])
        self.assertNotEqual([one.pick() for _ in range(50)], [three.pick() for _ in range(50)])


class LeastRequestTests(_TestCase):
    """
    Tests for L{LeastRequest}.
    """

    def test_powerOfTwoChoicesPrefersLessLoaded(self) -> None:
        """
        With equal weights, of two random hosts the less loaded wins: an idle host among two busy ones gets
        1 - (2/3)^2 = 5/9 of the picks rather than a third.
        """
        a, b, c = hosts = _hosts(3)
        b.rq_active = c.rq_active = 5
        lb = _make("least_request", hosts)
        shares = _shares([lb.pick() for _ in range(10000)])
        self.assertNear(shares[a], 5 / 9, delta=0.03)
        self.assertNear(shares[b], 2 / 9, delta=0.03)

    def test_choiceCount(self) -> None:
        """
        With C{choice_count = 3} the idle host wins unless all three draws miss it: 1 - (2/3)^3.
        """
        a, b, c = hosts = _hosts(3)
        b.rq_active = c.rq_active = 5
        lb = _make("least_request", hosts, choice_count=3)
        self.assertNear(_shares([lb.pick() for _ in range(10000)])[a], 19 / 27, delta=0.03)

    def test_followsLoadAsItChanges(self) -> None:
        """
        Active requests are read at every pick: the host that becomes the least loaded gets the most picks.
        """
        a, b, c = hosts = _hosts(3)
        lb = _make("least_request", hosts)
        a.rq_active = b.rq_active = 9
        shares = _shares([lb.pick() for _ in range(3000)])
        self.assertGreater(shares[c], 0.5)

    def test_weightedFormula(self) -> None:
        """
        With unequal weights a host's share follows C{weight / (rq_active + 1) ** active_request_bias}.
        """
        for bias, expected in ((1.0, (2 / 4) / (2 / 4 + 1)), (0.5, 0.5), (2.0, (2 / 16) / (2 / 16 + 1)), (0.0, 2 / 3)):
            a, b = hosts = _hosts(2, [2, 1])
            a.rq_active = 3
            lb = _make("least_request", hosts, active_request_bias=bias)
            share = _shares([lb.pick() for _ in range(10000)])[a]
            self.assertNear(share, expected, delta=0.03, msg=f"bias {bias}")

    def test_weightedAvoidsExcluded(self) -> None:
        """
        The load-weighted draw never returns the excluded host while another is usable.
        """
        a, b, c = hosts = _hosts(3, [5, 1, 1])
        lb = _make("least_request", hosts)
        self.assertNotIn(a, [lb.pick(a) for _ in range(500)])


class RingHashTests(_TestCase):
    """
    Tests for L{RingHash}.
    """

    def test_sameKeySameHost(self) -> None:
        """
        A key always goes to the same host, whatever the random seed or the order the hosts are listed in.
        """
        hosts = _hosts(10)
        lb = _make("ring_hash", hosts, seed=1)
        first = _mapping(lb)
        self.assertEqual(_moved(_mapping(lb), first), 0.0)
        self.assertEqual(_moved(_mapping(_make("ring_hash", list(reversed(hosts)), seed=2)), first), 0.0)

    def test_ringSize(self) -> None:
        """
        A host of the largest weight gets C{minimum_ring_size} points and the others points in proportion.
        """
        hosts = _hosts(3, [2, 1, 2])
        lb = _make("ring_hash", hosts, minimum_ring_size=100)
        self.assertEqual(Counter(lb.entries), {hosts[0]: 100, hosts[1]: 50, hosts[2]: 100})

    def test_maximumRingSizeCaps(self) -> None:
        """
        A ring that would exceed C{maximum_ring_size} shrinks every host's share alike.
        """
        hosts = _hosts(4, [2, 1, 1, 1])
        lb = _make("ring_hash", hosts, minimum_ring_size=1024, maximum_ring_size=1000)
        counts = Counter(lb.entries)
        self.assertLessEqual(len(lb.entries), 1000)
        self.assertEqual(counts[hosts[0]], 2 * counts[hosts[1]])

    def test_evenSpread(self) -> None:
        """
        10k keys spread over 10 hosts of equal weight within 20% of a tenth each.
        """
        hosts = _hosts(10)
        for share in _shares(_mapping(_make("ring_hash", hosts))).values():
            self.assertNear(share, 0.1, delta=0.02)

    def test_removingHostMovesOnlyItsKeys(self) -> None:
        """
        Removing one host of 10 moves about a tenth of the keys, all of them the removed host's.
        """
        hosts = _hosts(10)
        before = _mapping(_make("ring_hash", hosts))
        after = _mapping(_make("ring_hash", hosts[:-1]))
        moved = _moved(before, after)
        self.assertTrue(0.5 / 10 < moved < 1.5 / 10, moved)
        self.assertEqual({b for b, a in zip(before, after) if a is not b}, {hosts[-1]})

    def test_addingHostMovesOnlyToIt(self) -> None:
        """
        Adding an 11th host moves about an eleventh of the keys, all of them to the new host.
        """
        hosts = _hosts(11)
        before = _mapping(_make("ring_hash", hosts[:-1]))
        after = _mapping(_make("ring_hash", hosts))
        moved = _moved(before, after)
        self.assertTrue(0.5 / 11 < moved < 1.5 / 11, moved)
        self.assertEqual({a for b, a in zip(before, after) if a is not b}, {hosts[-1]})

    def test_weightsShiftShare(self) -> None:
        """
        A host of weight 3 next to one of weight 1 owns about three quarters of the keys.
        """
        a, b = hosts = _hosts(2, [3, 1])
        self.assertNear(_shares(_mapping(_make("ring_hash", hosts)))[a], 0.75, delta=0.04)

    def test_unhealthyHostLikeRemoved(self) -> None:
        """
        An unhealthy host's keys go to the next point on the ring: the mapping is that of the ring
        without it, and no other key moves.
        """
        hosts = _hosts(10)
        lb = _make("ring_hash", hosts)
        hosts[4].healthy = False
        lb.rebuild()
        self.assertEqual(_moved(_mapping(lb), _mapping(_make("ring_hash", hosts[:4] + hosts[5:]))), 0.0)

    def test_randomKeyWithoutHashKey(self) -> None:
        """
        Without a hash key every pick hashes a random key, so picks spread over the hosts.
        """
        hosts = _hosts(4)
        lb = _make("ring_hash", hosts)
        for share in _shares([lb.pick() for _ in range(4000)]).values():
            self.assertNear(share, 0.25, delta=0.05)


class MaglevTests(_TestCase):
    """
    Tests for L{Maglev}.
    """

    def test_tableSize(self) -> None:
        """
        The table has 65537 slots, every one of them naming a host.
        """
        lb = _make("maglev", _hosts(3))
        self.assertEqual(len(lb.entries), MAGLEV_TABLE_SIZE)
        self.assertEqual(MAGLEV_TABLE_SIZE, 65537)
        self.assertNotIn(None, lb.entries)

    def test_evenSpread(self) -> None:
        """
        Hosts of equal weight own the same number of slots to within one, and share 10k keys evenly.
        """
        hosts = _hosts(7)
        lb = _make("maglev", hosts)
        slots = Counter(lb.entries).values()
        self.assertLessEqual(max(slots) - min(slots), 1)
        for share in _shares(_mapping(lb)).values():
            self.assertNear(share, 1 / 7, delta=0.15 / 7)

    def test_weightsShiftShare(self) -> None:
        """
        Hosts own slots in proportion to their weights, within 2%.
        """
        hosts = _hosts(4, [1, 2, 3, 4])
        slots = Counter(_make("maglev", hosts).entries)
        for h in hosts:
            self.assertNear(slots[h] / MAGLEV_TABLE_SIZE, h.weight / 10, delta=0.02 * h.weight / 10)

    def test_sameKeySameHost(self) -> None:
        """
        A key always goes to the same host, whatever the random seed or the order the hosts are listed in.
        """
        hosts = _hosts(5)
        lb = _make("maglev", hosts)
        first = _mapping(lb)
        self.assertEqual(_moved(_mapping(lb), first), 0.0)
        self.assertEqual(_moved(_mapping(_make("maglev", hosts[2:] + hosts[:2], seed=9)), first), 0.0)

    def test_removalMinimalDisruption(self) -> None:
        """
        Removing one host of 10 moves little more than its own tenth of the keys.
        """
        hosts = _hosts(10)
        before = _mapping(_make("maglev", hosts))
        after = _mapping(_make("maglev", hosts[:-1]))
        moved = _moved(before, after)
        self.assertTrue(0.5 / 10 < moved < 1.5 / 10, moved)

    def test_unhealthyHostKeysMoveOthersStay(self) -> None:
        """
        An unhealthy host's keys move to the next slots' hosts, spread over the others; no other key moves.
        """
        hosts = _hosts(5)
        lb = _make("maglev", hosts)
        before = _mapping(lb)
        hosts[0].healthy = False
        lb.rebuild()
        after = _mapping(lb)
        self.assertNotIn(hosts[0], after)
        self.assertEqual({b for b, a in zip(before, after) if a is not b}, {hosts[0]})
        self.assertEqual(set(a for b, a in zip(before, after) if a is not b), set(hosts[1:]))


class CommonRulesTests(_TestCase):
    """
    The rules every policy follows: health, C{exclude}, panic mode, rebuilds.
    """

    def _picks(self, lb, n: int = 400, exclude=None) -> list:
        return [lb.pick(exclude, b"k%d" % i) for i in range(n)]

    def test_providesInterface(self) -> None:
        """
        Every policy in L{POLICIES} provides L{ILoadBalancer}.
        """
        self.assertEqual(sorted(POLICIES), ["least_request", "maglev", "random", "ring_hash", "round_robin"])
        for name in POLICIES:
            verifyObject(ILoadBalancer, _make(name, _hosts(2)))

    def test_unhealthySkipped(self) -> None:
        """
        A host marked unhealthy is never picked, whether or not the balancer was rebuilt since.
        """
        for name in POLICIES:
            hosts = _hosts(4, [4, 1, 2, 1])
            lb = _make(name, hosts)
            hosts[0].healthy = False
            self.assertNotIn(hosts[0], self._picks(lb), name)
            lb.rebuild()
            self.assertNotIn(hosts[0], self._picks(lb), name)
            self.assertEqual(set(self._picks(lb)), set(hosts[1:]), name)

    def test_excludeHonoured(self) -> None:
        """
        The excluded host is not picked while another host is usable.
        """
        for name in POLICIES:
            hosts = _hosts(3, [5, 1, 1])
            lb = _make(name, hosts)
            self.assertNotIn(hosts[0], self._picks(lb, exclude=hosts[0]), name)

    def test_excludeOnlyUsableReturned(self) -> None:
        """
        When the excluded host is the only usable one, it is picked rather than nothing.
        """
        for name in POLICIES:
            a, b = hosts = _hosts(2)
            b.healthy = False
            lb = _make(name, hosts)
            self.assertEqual(set(self._picks(lb, 20, exclude=a)), {a}, name)
            c, d, e = hosts = _hosts(3)
            lb = _make(name, hosts)
            d.healthy = e.healthy = False  # stale snapshot: found out at pick time
            self.assertEqual(set(self._picks(lb, 20, exclude=c)), {c}, name)

    def test_allUnhealthyNone(self) -> None:
        """
        With every host unhealthy there is nothing to pick, excluded or not.
        """
        for name in POLICIES:
            hosts = _hosts(3)
            lb = _make(name, hosts)
            for h in hosts:
                h.healthy = False
            self.assertEqual(set(self._picks(lb, 20)), {None}, name)
            lb.rebuild()
            self.assertEqual(set(self._picks(lb, 20) + self._picks(lb, 20, exclude=hosts[0])), {None}, name)
            self.assertFalse(lb.inPanic)

    def test_panicBalancesOverAllHosts(self) -> None:
        """
        With fewer than 50% of hosts healthy, picks go to all hosts and each counts in the panic counter.
        """
        for name in POLICIES:
            hosts = _hosts(4)
            counter = StatsStore().counter("cluster.api.lb_healthy_panic")
            lb = _make(name, hosts, panic=counter)
            for h in hosts[1:]:
                h.healthy = False
            lb.rebuild()
            self.assertTrue(lb.inPanic, name)
            self.assertEqual(set(self._picks(lb, 400)), set(hosts), name)
            self.assertEqual(counter.value, 400, name)
            self.assertIs(lb.panic, counter)

    def test_noPanicAtThreshold(self) -> None:
        """
        With exactly half the hosts healthy (not fewer than 50%), unhealthy hosts stay out and nothing counts.
        """
        for name in POLICIES:
            hosts = _hosts(4)
            lb = _make(name, hosts)
            hosts[0].healthy = hosts[1].healthy = False
            lb.rebuild()
            self.assertFalse(lb.inPanic, name)
            self.assertEqual(set(self._picks(lb)), set(hosts[2:]), name)
            self.assertEqual(lb.panic.value, 0, name)

    def test_panicThresholdConfigured(self) -> None:
        """
        A threshold of 0 disables panic mode; one of 100 panics as soon as any host is unhealthy.
        """
        for name in POLICIES:
            hosts = _hosts(4)
            hosts[0].healthy = hosts[1].healthy = hosts[2].healthy = False
            lb = _make(name, hosts, healthy_panic_threshold=0.0)
            self.assertEqual(set(self._picks(lb)), {hosts[3]}, name)
            hosts[0].healthy = hosts[1].healthy = hosts[2].healthy = True
            hosts[3].healthy = False
            lb = _make(name, hosts, healthy_panic_threshold=100.0)
            self.assertTrue(lb.inPanic, name)
            self.assertIn(hosts[3], self._picks(lb), name)

    def test_rebuildBringsRecoveredHostBack(self) -> None:
        """
        A host that becomes healthy again is picked after L{rebuild}.
        """
        for name in POLICIES:
            hosts = _hosts(3)
            hosts[0].healthy = False
            lb = _make(name, hosts)
            self.assertNotIn(hosts[0], self._picks(lb), name)
            hosts[0].healthy = True
            lb.rebuild()
            self.assertIn(hosts[0], self._picks(lb), name)

    def test_rebuildWithNewMembership(self) -> None:
        """
        L{rebuild} with a new host list balances over the new hosts only.
        """
        for name in POLICIES:
            old, new = _hosts(3), [_Host(n) for n in "xyz"]
            lb = _make(name, old)
            lb.rebuild(new)
            self.assertEqual(set(self._picks(lb)), set(new), name)
            lb.rebuild([])
            self.assertIsNone(lb.pick(), name)

    def test_singleHost(self) -> None:
        """
        A single host is always picked, even when excluded, and not at all once unhealthy.
        """
        for name in POLICIES:
            (only,) = hosts = _hosts(1)
            lb = _make(name, hosts)
            self.assertEqual(set(self._picks(lb, 10) + self._picks(lb, 10, exclude=only)), {only}, name)
            only.healthy = False
            self.assertIsNone(lb.pick(), name)

    def test_clusterBuildsEveryPolicy(self) -> None:
        """
        A cluster built with any policy name picks its own hosts (the cluster's call passes only hosts).
        """
        for name in POLICIES:
            config = ClusterConfig("api", (HostConfig("tcp:127.0.0.1:9001"), HostConfig("tcp:127.0.0.1:9002")), name)
            cluster = Cluster(config, Clock(), StatsStore())
            self.assertIn(cluster.pick(), cluster.hosts, name)


class _Stream:
    """
    What L{requestHashKey} reads of a stream.
    """

    def __init__(self, headers, authority=b"api.local", address=None) -> None:
        self.requestHeaders = headers
        self.authority = authority
        self.downstreamAddress = address


class HashKeyTests(_TestCase):
    """
    Tests for L{requestHashKey}, L{addressHashKey} and L{hash64}.
    """

    def test_header(self) -> None:
        """
        A header policy hashes the header's value, or nothing when the header is absent or empty.
        """
        policy = HashPolicy("header", b"x-user")
        self.assertEqual(requestHashKey(policy, _Stream([(b"a", b"1"), (b"x-user", b"alice")])), b"alice")
        self.assertIsNone(requestHashKey(policy, _Stream([(b"a", b"1")])))
        self.assertIsNone(requestHashKey(policy, _Stream([(b"x-user", b"")])))

    def test_repeatedHeaderOrderFree(self) -> None:
        """
        Several values of the header give one key whatever their order.
        """
        policy = HashPolicy("header", b"x-user")
        one = requestHashKey(policy, _Stream([(b"x-user", b"a"), (b"x-user", b"b")]))
        two = requestHashKey(policy, _Stream([(b"x-user", b"b"), (b"x-user", b"a")]))
        self.assertEqual(one, two)
        self.assertNotEqual(one, requestHashKey(policy, _Stream([(b"x-user", b"a")])))

    def test_hostHeaderIsAuthority(self) -> None:
        """
        C{header:host} hashes the request's authority.
        """
        self.assertEqual(requestHashKey(HashPolicy("header", b"host"), _Stream([], b"shop.local")), b"shop.local")

    def test_cookie(self) -> None:
        """
        A cookie policy finds the named cookie among all cookie headers, or gives nothing.
        """
        policy = HashPolicy("cookie", b"session")
        stream = _Stream([(b"cookie", b"a=1; sessionx=2"), (b"cookie", b"b=3;session=abc ; c=4")])
        self.assertEqual(requestHashKey(policy, stream), b"abc")
        self.assertIsNone(requestHashKey(policy, _Stream([(b"cookie", b"sessionx=2")])))

    def test_sourceIP(self) -> None:
        """
        A source_ip policy hashes the peer's IP; a UNIX socket peer has none.
        """
        from twisted.internet.address import IPv4Address, UNIXAddress

        policy = HashPolicy("source_ip")
        self.assertEqual(requestHashKey(policy, _Stream([], address=IPv4Address("TCP", "10.1.2.3", 5555))), b"10.1.2.3")
        self.assertIsNone(addressHashKey(UNIXAddress(b"/run/x.sock")))

    def test_hashStable(self) -> None:
        """
        The key hash is BLAKE2b-64, fixed across processes: changing it would remap every key.
        """
        self.assertEqual(hash64(b"user-1"), 0x88E1EA21865AAC9A)


def _parse(items: dict):
    """
    Parse C{items} as a cluster section's keys: the L{LBConfig} and the error messages (unknown keys too).
    """
    errors = []
    o = Options("mesh.ini", "cluster:api", items, errors)
    config = parseLB(o)
    o.finish()
    return config, [str(e) for e in errors]


class ConfigTests(_TestCase):
    """
    Tests for L{parseLB} and L{parseHashPolicy}.
    """

    def _error(self, items: dict, expected: str) -> None:
        config, errors = _parse(items)
        self.assertEqual(errors, [f"mesh.ini: [cluster:api] {expected}"])

    def test_defaults(self) -> None:
        """
        A section without load-balancing keys gets Envoy's defaults: round robin, a 50% panic threshold.
        """
        config, errors = _parse({})
        self.assertEqual((config, errors), (LBConfig(), []))
        self.assertEqual((config.policy, config.healthy_panic_threshold), ("round_robin", 50.0))
        self.assertEqual((config.minimum_ring_size, config.maximum_ring_size), (1024, 8 * 1024 * 1024))

    def test_leastRequestOptions(self) -> None:
        """
        The least_request keys and a percentage threshold are read.
        """
        config, errors = _parse({
            "lb_policy": "least_request", "least_request.choice_count": "3",
            "least_request.active_request_bias": "0.5", "healthy_panic_threshold": "75%",
        })
        self.assertEqual(errors, [])
        self.assertEqual(config, LBConfig("least_request", 75.0, 3, 0.5))

    def test_ringHashOptions(self) -> None:
        """
        The ring_hash keys and a header hash policy (its name lowercased) are read.
        """
        config, errors = _parse({
            "lb_policy": "ring_hash", "ring_hash.minimum_ring_size": "64", "ring_hash.maximum_ring_size": "4096",
            "hash_policy": "header:X-User", "healthy_panic_threshold": "0",
        })
        self.assertEqual(errors, [])
        self.assertEqual(config, LBConfig("ring_hash", 0.0, minimum_ring_size=64, maximum_ring_size=4096,
                                          hash_policy=HashPolicy("header", b"x-user")))

    def test_hashPolicyForms(self) -> None:
        """
        Each hash policy form parses; cookie names keep their case.
        """
        self.assertEqual(parseHashPolicy(" cookie:SID "), HashPolicy("cookie", b"SID"))
        self.assertEqual(parseHashPolicy("source_ip"), HashPolicy("source_ip"))
        config, errors = _parse({"lb_policy": "maglev", "hash_policy": "source_ip"})
        self.assertEqual((config.policy, config.hash_policy, errors), ("maglev", HashPolicy("source_ip"), []))

    def test_unknownPolicy(self) -> None:
        """
        An unknown policy is named with the choices and the closest one.
        """
        self._error({"lb_policy": "least_requests"},
                    "lb_policy: 'least_requests' is not one of round_robin, least_request, random, ring_hash, "
                    "maglev (did you mean `least_request`?)")

    def test_misspelledPolicyKeysNotBlamed(self) -> None:
        """
        Keys of the policy a misspelled C{lb_policy} meant are not reported as well.
        """
        config, errors = _parse({"lb_policy": "ring_hsh", "ring_hash.minimum_ring_size": "64", "hash_policy": "source_ip"})
        self.assertEqual(len(errors), 1)
        self.assertIn("(did you mean `ring_hash`?)", errors[0])

    def test_badThreshold(self) -> None:
        """
        A panic threshold must be a number from 0 to 100.
        """
        self._error({"healthy_panic_threshold": "half"}, "healthy_panic_threshold: 'half' is not a number")
        self._error({"healthy_panic_threshold": "150"}, "healthy_panic_threshold: 150 must be from 0 to 100")
        self._error({"healthy_panic_threshold": "-1%"}, "healthy_panic_threshold: -1% must be from 0 to 100")
        self._error({"healthy_panic_threshold": "nan"}, "healthy_panic_threshold: 'nan' is not a number")

    def test_badChoiceCount(self) -> None:
        """
        C{least_request.choice_count} is a whole number of at least 2.
        """
        base = {"lb_policy": "least_request"}
        self._error({**base, "least_request.choice_count": "1"}, "least_request.choice_count: 1 is less than 2")
        self._error({**base, "least_request.choice_count": "two"},
                    "least_request.choice_count: 'two' is not a whole number")

    def test_badBias(self) -> None:
        """
        C{least_request.active_request_bias} is a number of at least 0.
        """
        base = {"lb_policy": "least_request"}
        self._error({**base, "least_request.active_request_bias": "-0.5"},
                    "least_request.active_request_bias: -0.5 must be at least 0")
        self._error({**base, "least_request.active_request_bias": "x"},
                    "least_request.active_request_bias: 'x' is not a number")
        self._error({**base, "least_request.active_request_bias": "inf"},
                    "least_request.active_request_bias: 'inf' is not a number")

    def test_badRingSizes(self) -> None:
        """
        Ring sizes are at least 1, the maximum at most 8M and not below the minimum.
        """
        base = {"lb_policy": "ring_hash", "hash_policy": "source_ip"}
        self._error({**base, "ring_hash.minimum_ring_size": "0"}, "ring_hash.minimum_ring_size: 0 is less than 1")
        self._error({**base, "ring_hash.maximum_ring_size": str(MAX_RING_SIZE + 1)},
                    f"ring_hash.maximum_ring_size: {MAX_RING_SIZE + 1} is more than the limit of {MAX_RING_SIZE} (8M)")
        self._error({**base, "ring_hash.minimum_ring_size": "2048", "ring_hash.maximum_ring_size": "1024"},
                    "ring_hash.minimum_ring_size: 2048 is more than ring_hash.maximum_ring_size (1024)")

    def test_hashPolicyRequired(self) -> None:
        """
        The hashing policies require a hash policy.
        """
        for policy in ("ring_hash", "maglev"):
            self._error({"lb_policy": policy},
                        f"hash_policy: is required with lb_policy = {policy}: write header:NAME, cookie:NAME or source_ip")

    def test_badHashPolicy(self) -> None:
        """
        A hash policy must be header:NAME, cookie:NAME or source_ip, with a valid name.
        """
        base = {"lb_policy": "maglev"}
        self._error({**base, "hash_policy": "heder:x"},
                    "hash_policy: 'heder:x' is not a hash policy: write header:NAME, cookie:NAME or source_ip "
                    "(did you mean `header`?)")
        self._error({**base, "hash_policy": "cookie:"}, "hash_policy: cookie needs a name: write cookie:NAME")
        self._error({**base, "hash_policy": "header:x y"},
                    "hash_policy: 'x y' is not a valid header name (letters, digits and !#$%&'*+.^_`|~-)")
        self._error({**base, "hash_policy": "source_ip:v4"},
                    "hash_policy: source_ip takes no name: write source_ip, not 'source_ip:v4'")

    def test_keysOfAnotherPolicy(self) -> None:
        """
        Keys that only another policy reads are errors naming the policy they belong to.
        """
        self._error({"least_request.choice_count": "3"},
                    "least_request.choice_count: applies only to lb_policy = least_request, not round_robin")
        self._error({"lb_policy": "maglev", "hash_policy": "source_ip", "ring_hash.maximum_ring_size": "8"},
                    "ring_hash.maximum_ring_size: applies only to lb_policy = ring_hash, not maglev")
        self._error({"lb_policy": "random", "hash_policy": "source_ip"},
                    "hash_policy: applies only to lb_policy = ring_hash or maglev, not random")

    def test_misspelledKey(self) -> None:
        """
        A misspelled key of the chosen policy is unknown, with the right key suggested.
        """
        self._error({"lb_policy": "least_request", "least_request.choise_count": "3"},
                    "least_request.choise_count: unknown key (did you mean `least_request.choice_count`?)")
