"""
Tests for L{twistedmesh.upstream.lb}: smooth weighted round robin.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twistedmesh.config import ClusterConfig, HostConfig
from twistedmesh.observability.stats import StatsStore
from twistedmesh.upstream.cluster import Cluster
from twistedmesh.upstream.lb import RoundRobin


class _Host:
    """
    Just what a load balancer reads of a host.
    """

    def __init__(self, name: str, weight: int = 1) -> None:
        self.name = name
        self.weight = weight
        self.healthy = True

    def __repr__(self) -> str:
        return self.name


def _names(lb: RoundRobin, n: int, exclude=None) -> str:
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
