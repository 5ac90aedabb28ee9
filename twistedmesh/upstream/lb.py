"""
Load balancers: each implements L{ILoadBalancer} over a cluster's hosts (see docs/load-balancing.md).

Every policy is a class constructed as C{Policy(hosts, random, config, panic=counter)} and shares these
rules (L{_Balancer}):

  - B{Snapshot.} L{_Balancer.rebuild} takes a snapshot of the hosts' health: the hosts to balance over
    (the healthy ones) and whether the cluster is in panic mode, plus the policy's precomputed arrays.
    The cluster calls it whenever a host's health, weight or the membership changes; C{pick} then only
    reads precomputed arrays. Rings and tables are rebuilt only when membership or weights changed, so a
    health change costs O(hosts).
  - B{Unhealthy hosts} are never picked (outside panic mode). C{pick} also re-checks C{host.healthy} on
    the host it chose, so a host that went unhealthy since the last C{rebuild} is skipped at once; a host
    that became healthy gets traffic after the next C{rebuild}.
  - B{exclude} (the host a retry moves away from) is avoided while another usable host exists, and
    returned when it is the only one.
  - B{Panic mode} (Envoy's): when some hosts are healthy but fewer than C{healthy_panic_threshold} percent
    of them, the balancer ignores health and balances over all hosts; each pick made so counts in the
    C{panic} counter (the cluster passes its C{cluster.<name>.lb_healthy_panic} stat). With no healthy
    host at all C{pick} returns C{None} (the router's 503 C{UH}), unlike Envoy, which would panic.
"""

from __future__ import annotations

import sys
from array import array
from bisect import bisect_left, bisect_right
from hashlib import blake2b, shake_128
from itertools import accumulate, cycle
from math import gcd
from random import Random
from types import MappingProxyType
from typing import TYPE_CHECKING, Callable, Iterable, List, Optional, Sequence

from zope.interface import implementer

from ..config.lb import HashPolicy, LBConfig
from ..interfaces import ILoadBalancer

if TYPE_CHECKING:
    from .cluster import Host

#: Maglev's lookup table size: a prime, so that every host's permutation visits every slot.
MAGLEV_TABLE_SIZE = 65537
#: Host visits (hosts x schedule length) a round-robin schedule may cost to precompute; beyond it (huge,
#: coprime weights) round robin computes each pick by a scan instead, with the same sequence.
_SCHEDULE_BUILD_LIMIT = 1 << 16
_DEFAULT_CONFIG = LBConfig()


def hash64(key: bytes) -> int:
    """
    The stable 64-bit hash the hashing policies place keys with: BLAKE2b with an 8-byte digest, read
    little-endian. Stable across processes and machines (unlike C{hash()}), so that every proxy maps a key
    to the same host.
    """
    return int.from_bytes(blake2b(key, digest_size=8).digest(), "little")


class PanicCounter:
    """
    The default C{panic} counter when the cluster passes none: just a C{value}, like a stats L{Counter}.
    """

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


class _Balancer:
    """
    What every policy shares: the health snapshot, panic mode, the C{exclude} rule.

    @ivar hosts: every host of the cluster, as a tuple.
    @ivar random: the injected L{random.Random}.
    @ivar config: the L{LBConfig}.
    @ivar panic: a counter (anything with an integer C{value}) incremented on each pick made in panic mode.
    @ivar inPanic: whether the last L{rebuild} found the cluster in panic mode.
    """

    def __init__(
        self,
        hosts: Sequence["Host"],
        random: Optional[Random] = None,
        config: Optional[LBConfig] = None,
        panic: object = None,
    ) -> None:
        self.config = config if config is not None else _DEFAULT_CONFIG
        # A private generator when none is injected (older callers): never the random module's global one.
        self.random = random if random is not None else Random()
        self._rand: Callable[[], float] = self.random.random
        self.panic = panic if panic is not None else PanicCounter()
        self.hosts: tuple = ()
        self.inPanic = False
        self._avail: tuple = ()
        self._n = 0
        self._members: frozenset = frozenset()
        self._shape: Optional[tuple] = None
        self.rebuild(hosts)

    def rebuild(self, hosts: Optional[Sequence["Host"]] = None) -> None:
        """
        Take a new snapshot after a host's health or weight changed, or, with C{hosts}, after the
        membership changed. Rings and tables are rebuilt only when membership or weights changed.
        """
        if hosts is not None:
            self.hosts = tuple(hosts)
        hosts = self.hosts
        healthy = tuple(h for h in hosts if h.healthy)
        # Panic needs at least one healthy host: with none, "no healthy upstream" is the honest answer.
        panic = bool(healthy) and len(healthy) * 100 < self.config.healthy_panic_threshold * len(hosts)
        self.inPanic = panic
        self._avail = hosts if panic else healthy
        self._n = len(self._avail)
        self._members = frozenset(hosts)
        shape = tuple((h, h.weight) for h in hosts)
        if shape != self._shape:
            self._shape = shape
            self._membershipChanged()
        self._availabilityChanged()

    def _membershipChanged(self) -> None:
        """
        Rebuild what depends on the hosts and their weights only (rings, tables).
        """

    def _availabilityChanged(self) -> None:
        """
        Rebuild what depends on the hosts available for picking (C{self._avail}).
        """

    def _usable(self, exclude: Optional["Host"]) -> List["Host"]:
        """
        The available hosts a pick may return now: the slow path's candidates.
        """
        panic = self.inPanic
        return [h for h in self._avail if h is not exclude and (panic or h.healthy)]

    def _fallback(self, exclude: Optional["Host"]) -> Optional["Host"]:
        """
        When no other host is usable: C{exclude} itself if it still is (a retry to the same host beats a
        503), else C{None}.
        """
        if exclude is not None and exclude in self._members and (self.inPanic or exclude.healthy):
            return exclude
        return None

    def _weightedChoice(self, hosts: Sequence["Host"]) -> "Host":
        """
        A weighted random choice among C{hosts} (non-empty), for the slow paths.
        """
        total = 0
        for h in hosts:
            total += h.weight
        x = self._rand() * total
        for h in hosts:
            x -= h.weight
            if x < 0:
                return h
        return hosts[-1]  # rounding


class _StaticWeights(_Balancer):
    """
    Cumulative weights of the available hosts, for the policies that draw by static weight.
    """

    def _availabilityChanged(self) -> None:
        cumulative = []
        total = 0
        for h in self._avail:
            total += h.weight
            cumulative.append(total)
        self._cumulative = cumulative
        self._total = total
        self._equal = len({h.weight for h in self._avail}) <= 1

    def _draw(self) -> "Host":
        """
        A random available host by static weight (C{self._n} >= 2); no health check.
        """
        if self._equal:
            return self._avail[int(self._rand() * self._n)]
        # hi = n - 1: random() * total may round up to total; the last host is then the right answer.
        return self._avail[bisect_right(self._cumulative, self._rand() * self._total, 0, self._n - 1)]


@implementer(ILoadBalancer)
class RoundRobin(_Balancer):
    """
    Smooth weighted round robin (the scheme nginx uses): on each pick every available host's current
    weight grows by its weight, the largest wins and pays back the total. Hosts of weights 5, 1, 1 are
    picked a a b a c a a, never five in a row, and every window of sum(weights) picks is exact.

    The cycle is precomputed at L{rebuild} (over weights divided by their gcd) and a pick is a cursor
    step; a host found unusable is stepped over. Should the cycle be too long to precompute, each pick
    runs the algorithm itself, giving the same sequence.
    """

    _cursor = 0

    def _availabilityChanged(self) -> None:
        avail = self._avail
        divisor = 0
        for h in avail:
            divisor = gcd(divisor, h.weight)
        weights = [h.weight // divisor for h in avail] if divisor else []
        self._current = [0] * len(avail)
        if len(set(weights)) <= 1:
            # Equal weights: smooth round robin is plain rotation in host order.
            self._schedule: Optional[tuple] = avail
        elif sum(weights) * len(avail) <= _SCHEDULE_BUILD_LIMIT:
            self._schedule = self._smoothCycle(weights)
        else:
            self._schedule = None
        # Keep the place rather than restart: frequent health changes must not favour the first host.
        self._cursor = self._cursor % len(self._schedule) if self._schedule else 0

    def _smoothCycle(self, weights: List[int]) -> tuple:
        """
        One full cycle of smooth weighted round robin over the available hosts.
        """
        avail = self._avail
        total = sum(weights)
        current = [0] * len(weights)
        sequence = []
        for _ in range(total):
            best = 0
            for i, w in enumerate(weights):
                current[i] += w
                if current[i] > current[best]:
                    best = i
            current[best] -= total
            sequence.append(avail[best])
        return tuple(sequence)

    def pick(self, exclude: Optional["Host"] = None, hashKey: Optional[bytes] = None) -> Optional["Host"]:
        """
        The next host of the cycle, skipping unhealthy ones and C{exclude} while another host is usable.
        C{hashKey} is ignored.
        """
        schedule = self._schedule
        if schedule is None:
            return self._scan(exclude)
        n = len(schedule)
        if not n:
            return None
        panic = self.inPanic
        if panic:
            self.panic.value += 1
        i = self._cursor
        host = schedule[i]
        i += 1
        self._cursor = 0 if i == n else i
        if host is exclude or not (panic or host.healthy):
            return self._walk(exclude)
        return host

    def _walk(self, exclude: Optional["Host"]) -> Optional["Host"]:
        """
        Step along the cycle to the next usable host.
        """
        schedule = self._schedule
        n = len(schedule)
        panic = self.inPanic
        i = self._cursor
        for _ in range(n):
            host = schedule[i]
            i += 1
            if i == n:
                i = 0
            if host is not exclude and (panic or host.healthy):
                self._cursor = i
                return host
        return self._fallback(exclude)

    def _scan(self, exclude: Optional["Host"]) -> Optional["Host"]:
        """
        One step of smooth weighted round robin computed on the spot (cycles too long to precompute).
        """
        avail = self._avail
        current = self._current
        panic = self.inPanic
        if panic:
            self.panic.value += 1
        total = 0
        best = -1
        for i, host in enumerate(avail):
            if host is exclude or not (panic or host.healthy):
                continue
            current[i] += host.weight
            total += host.weight
            if best < 0 or current[i] > current[best]:
                best = i
        if best < 0:
            return self._fallback(exclude)
        current[best] -= total
        return avail[best]


@implementer(ILoadBalancer)
class WeightedRandom(_StaticWeights):
    """
    A random host, each with probability proportional to its weight, drawn from the injected random.
    """

    def pick(self, exclude: Optional["Host"] = None, hashKey: Optional[bytes] = None) -> Optional["Host"]:
        """
        A random usable host by weight, avoiding C{exclude} while another is usable. C{hashKey} is ignored.
        """
        n = self._n
        if n <= 1:
            if not n:
                return None
            host = self._avail[0]
            return host if host.healthy or self.inPanic else None
        panic = self.inPanic
        if panic:
            self.panic.value += 1
        host = self._draw()
        if host is exclude or not (panic or host.healthy):
            usable = self._usable(exclude)
            return self._weightedChoice(usable) if usable else self._fallback(exclude)
        return host


@implementer(ILoadBalancer)
class LeastRequest(_StaticWeights):
    """
    Envoy's least request balancer, reading each host's C{rq_active}.

      - Equal weights: the power of C{choice_count} choices. Draw C{choice_count} (default 2) available
        hosts uniformly at random, with replacement as Envoy does, and take the one with the fewest active
        requests (the first drawn on a tie). O(choice_count) per pick.
      - Unequal weights: each available host gets the effective weight
        C{weight / (rq_active + 1) ** active_request_bias}, computed afresh at every pick, and one host is
        drawn at random in proportion to it. O(hosts) per pick. Envoy puts the same effective weights in
        an EDF scheduler, where a host's weight is the one computed when it was last picked; a fresh
        random draw is exact and keeps no state. With C{active_request_bias = 0} the weights are static
        and the draw is weighted random (precomputed, O(log hosts)).
    """

    def _availabilityChanged(self) -> None:
        super()._availabilityChanged()
        self._bias = self.config.active_request_bias
        self._choices = self.config.choice_count
        self._weights = [float(h.weight) for h in self._avail]

    def pick(self, exclude: Optional["Host"] = None, hashKey: Optional[bytes] = None) -> Optional["Host"]:
        """
        The less loaded of C{choice_count} random hosts, or a draw by load-scaled weight (see the class),
        avoiding C{exclude} while another host is usable. C{hashKey} is ignored.
        """
        n = self._n
        if n <= 1:
            if not n:
                return None
            host = self._avail[0]
            return host if host.healthy or self.inPanic else None
        panic = self.inPanic
        if panic:
            self.panic.value += 1
        if self._equal:
            avail = self._avail
            rand = self._rand
            host = avail[int(rand() * n)]
            if self._choices == 2:
                other = avail[int(rand() * n)]
                if other.rq_active < host.rq_active:
                    host = other
            else:
                for _ in range(self._choices - 1):
                    other = avail[int(rand() * n)]
                    if other.rq_active < host.rq_active:
                        host = other
        elif self._bias == 0.0:
            host = self._draw()
        else:
            host = self._loadWeighted(self._avail, self._weights)
        if host is exclude or not (panic or host.healthy):
            return self._slow(exclude)
        return host

    def _loadWeighted(self, hosts: Sequence["Host"], weights: Sequence[float]) -> "Host":
        """
        Draw one of C{hosts} (non-empty) by C{weight / (rq_active + 1) ** bias}.
        """
        bias = self._bias
        # A comprehension and accumulate run at C speed: faster than a loop filling a preallocated list.
        if bias == 1.0:
            cumulative = list(accumulate([w / (h.rq_active + 1) for h, w in zip(hosts, weights)]))
        else:
            cumulative = list(accumulate([w / (h.rq_active + 1) ** bias for h, w in zip(hosts, weights)]))
        total = cumulative[-1]
        if total <= 0.0:  # every weight underflowed (a huge bias under load): any host will do
            return hosts[int(self._rand() * len(hosts))]
        return hosts[bisect_right(cumulative, self._rand() * total, 0, len(hosts) - 1)]

    def _slow(self, exclude: Optional["Host"]) -> Optional["Host"]:
        """
        The choice again over the usable hosts only (after drawing C{exclude} or a newly unhealthy host).
        """
        usable = self._usable(exclude)
        if not usable:
            return self._fallback(exclude)
        if not self._equal:
            if self._bias == 0.0:
                return self._weightedChoice(usable)
            return self._loadWeighted(usable, [float(h.weight) for h in usable])
        rand = self._rand
        host = usable[int(rand() * len(usable))]
        for _ in range(self._choices - 1):
            other = usable[int(rand() * len(usable))]
            if other.rq_active < host.rq_active:
                host = other
        return host


class _Hashing(_Balancer):
    """
    What ring hash and Maglev share: a lookup array built from the membership, and the walk forward from
    an unusable entry.

    An unhealthy (or excluded) host's keys go to the next entry of the ring or table whose host is usable.
    For ring hash this is exactly the ring Envoy would rebuild over the healthy hosts, at no rebuild cost;
    for Maglev it spreads the host's keys over the others by weight. Either way only that host's keys
    move, and they come back when it recovers.
    """

    @property
    def entries(self) -> tuple:
        """
        The owners of the ring's points in ring order (ring hash) or the table's hosts by slot (Maglev),
        as a copy: for tests and admin pages, not the hot path.
        """
        return tuple(self._entries)

    def _walk(self, i: int, exclude: Optional["Host"]) -> Optional["Host"]:
        """
        The host of the first usable entry after entry C{i}.
        """
        entries = self._entries
        n = len(entries)
        panic = self.inPanic
        for _ in range(n - 1):
            i += 1
            if i == n:
                i = 0
            host = entries[i]
            if host is not exclude and (panic or host.healthy):
                return host
        return self._fallback(exclude)


@implementer(ILoadBalancer)
class RingHash(_Hashing):
    """
    Consistent hashing on a ring (Envoy's C{ring_hash}, Karger et al.).

    Each host owns points on a 64-bit ring: a host of the largest weight gets C{minimum_ring_size} points
    and every other host C{ceil(minimum_ring_size * weight / largest weight)}; if the ring would exceed
    C{maximum_ring_size}, every host's count shrinks by the same factor (at least one point each). A host's
    points are the successive 64-bit little-endian words of SHAKE-128 of its endpoint string, so they
    depend only on the host and its count (a longer count extends the same sequence). A key goes to the
    owner of the first point at or after L{hash64}C{(key)}, wrapping round.

    Envoy instead sizes the whole ring to about C{minimum_ring_size}, which re-deals every host's points
    when a host joins or leaves (moving about 2/N of keys); here a host's points depend on its weight
    relative to the heaviest only, so adding or removing a host moves only that host's share (about 1/N).
    The price is a ring of C{minimum_ring_size} points per heaviest-weight host.
    """

    def _membershipChanged(self) -> None:
        hosts = self.hosts
        if not hosts:
            self._hashes: list = []
            self._entries = []
            return
        perHeaviest = self.config.minimum_ring_size
        heaviest = max(h.weight for h in hosts)
        counts = [-(-h.weight * perHeaviest // heaviest) for h in hosts]  # ceiling division
        total = sum(counts)
        cap = self.config.maximum_ring_size
        if total > cap:
            counts = [max(1, c * cap // total) for c in counts]
        points: List[int] = []
        owners: list = []
        for host, count in zip(hosts, counts):
            words = array("Q", shake_128(host.endpoint.encode("utf-8")).digest(8 * count))
            if sys.byteorder == "big":
                words.byteswap()  # the points are defined little-endian, whatever the machine
            points.extend(words)
            owners.extend([host] * count)
        # A stable sort: equal points (astronomically unlikely) stay in host order, so every proxy agrees.
        order = sorted(range(len(points)), key=points.__getitem__)
        self._hashes = [points[i] for i in order]
        self._entries = [owners[i] for i in order]

    def pick(self, exclude: Optional["Host"] = None, hashKey: Optional[bytes] = None) -> Optional["Host"]:
        """
        The owner of the first ring point at or after C{hash64(hashKey)} that is usable (not C{exclude},
        healthy unless in panic mode); a random point when C{hashKey} is C{None}.
        """
        n = self._n
        if n <= 1:
            if not n:
                return None
            host = self._avail[0]
            return host if host.healthy or self.inPanic else None
        panic = self.inPanic
        if panic:
            self.panic.value += 1
        hashes = self._hashes
        # hash64, inlined: a function call is a tenth of the pick.
        point = (int.from_bytes(blake2b(hashKey, digest_size=8).digest(), "little") if hashKey is not None
                 else self.random.getrandbits(64))
        i = bisect_left(hashes, point)
        if i == len(hashes):
            i = 0
        host = self._entries[i]
        if host is exclude or not (panic or host.healthy):
            return self._walk(i, exclude)
        return host


@implementer(ILoadBalancer)
class Maglev(_Hashing):
    """
    Maglev consistent hashing (Eisenbud et al., NSDI 2016; Envoy's C{maglev}): a lookup table of
    L{MAGLEV_TABLE_SIZE} (65537, a prime) slots, each naming a host; a key goes to
    C{table[hash64(key) % 65537]}.

    Population: each host has a permutation of the slots, C{(offset + j * skip) % 65537} with C{offset}
    and C{skip} from BLAKE2b of its endpoint string; hosts take turns claiming their next unclaimed slot
    until the table is full. With weights, turns follow Envoy's scheme: a host of weight C{w} takes its
    k-th turn at round C{max(k + 1, ceil(k * largest / w))}, so it claims slots in proportion to its
    weight. Every host ends up with its weighted share of the slots to within a slot or two, and removing
    a host moves little more than its own share of keys. Hosts take turns in endpoint order, so proxies
    that list the hosts in different orders build the same table.
    """

    tableSize = MAGLEV_TABLE_SIZE

    def _membershipChanged(self) -> None:
        hosts = self.hosts
        if not hosts:
            self._entries = []
            return
        size = self.tableSize
        # Build in endpoint order, so that proxies that list (or resolve) the hosts in different orders
        # still build the same table.
        hosts = sorted(hosts, key=lambda h: (h.endpoint, h.weight))
        table: list = [None] * size
        positions = []
        skips = []
        for host in hosts:
            digest = blake2b(host.endpoint.encode("utf-8"), digest_size=16).digest()
            positions.append(int.from_bytes(digest[:8], "little") % size)
            skips.append(int.from_bytes(digest[8:], "little") % (size - 1) + 1)
        filled = 0
        for index in self._turns(hosts):
            c = positions[index]
            skip = skips[index]
            while table[c] is not None:
                c += skip
                if c >= size:
                    c -= size
            table[c] = hosts[index]
            c += skip
            positions[index] = c - size if c >= size else c
            filled += 1
            if filled == size:
                break
        self._entries = table

    def _turns(self, hosts: Sequence["Host"]) -> Iterable[int]:
        """
        The order in which hosts (by index) claim slots, at least as many turns as the table has slots:
        rounds of every host for equal weights; for unequal ones, Envoy's weighted rounds (a host of
        weight C{w} takes its k-th turn at round C{max(k + 1, ceil(k * largest / w))}), hosts in index order
        within a round.
        """
        weights = [h.weight for h in hosts]
        n = len(weights)
        if len(set(weights)) == 1:
            return cycle(range(n))
        heaviest = max(weights)
        # Enough rounds for a table's worth of turns: by round R a host has taken at least R * w / heaviest.
        rounds = -(-self.tableSize * heaviest // sum(weights)) + 2
        keys = []  # round * n + index: sorting orders turns by round, then by host
        for i, w in enumerate(weights):
            if w == heaviest:
                keys.extend(r * n + i for r in range(1, rounds + 1))
            else:
                keys.append(n + i)
                keys.extend(-(-k * heaviest // w) * n + i for k in range(1, rounds * w // heaviest + 1))
        keys.sort()
        return [key % n for key in keys]

    def pick(self, exclude: Optional["Host"] = None, hashKey: Optional[bytes] = None) -> Optional["Host"]:
        """
        The host of slot C{hash64(hashKey) % 65537}, or of the first usable slot after it (see
        L{_Hashing}); a random slot when C{hashKey} is C{None}.
        """
        n = self._n
        if n <= 1:
            if not n:
                return None
            host = self._avail[0]
            return host if host.healthy or self.inPanic else None
        panic = self.inPanic
        if panic:
            self.panic.value += 1
        size = self.tableSize
        if hashKey is not None:
            i = int.from_bytes(blake2b(hashKey, digest_size=8).digest(), "little") % size  # hash64, inlined
        else:
            i = int(self._rand() * size)
        host = self._entries[i]
        if host is exclude or not (panic or host.healthy):
            return self._walk(i, exclude)
        return host


#: C{lb_policy} names to policy classes (read-only: a cluster looks its policy up here).
POLICIES: "MappingProxyType[str, type]" = MappingProxyType({
    "round_robin": RoundRobin,
    "least_request": LeastRequest,
    "random": WeightedRandom,
    "ring_hash": RingHash,
    "maglev": Maglev,
})


def requestHashKey(policy: HashPolicy, stream) -> Optional[bytes]:
    """
    The key C{policy} hashes for an HTTP request, or C{None} (then the balancer picks a random key) when
    the request lacks the header or cookie.

    C{header:host} reads the authority (the codecs keep it apart from the other headers). Several values
    of one header are sorted and joined, so their order does not matter (as in Envoy). Cookies are not
    set by the proxy when missing.
    """
    kind = policy.kind
    name = policy.name
    if kind == "header":
        if name == b"host":
            return stream.authority or None
        found = [v for n, v in stream.requestHeaders if n == name]
        if len(found) == 1:
            return found[0] or None
        return b"\x00".join(sorted(found)) or None
    if kind == "cookie":
        prefix = name + b"="
        for n, v in stream.requestHeaders:
            if n == b"cookie":
                for crumb in v.split(b";"):
                    crumb = crumb.strip()
                    if crumb.startswith(prefix):
                        return crumb[len(prefix):] or None
        return None
    return addressHashKey(stream.downstreamAddress)


def addressHashKey(address) -> Optional[bytes]:
    """
    The C{source_ip} key of a peer address: its IP as ASCII, or C{None} for an address without one (a
    UNIX socket).
    """
    host = getattr(address, "host", None)
    return host.encode("ascii") if host else None


__all__ = [
    "ILoadBalancer", "RoundRobin", "WeightedRandom", "LeastRequest", "RingHash", "Maglev", "POLICIES",
    "MAGLEV_TABLE_SIZE", "PanicCounter", "hash64", "requestHashKey", "addressHashKey",
]
