"""
Load balancers. Each implements L{ILoadBalancer} over a cluster's list of hosts.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

from zope.interface import implementer

from ..interfaces import ILoadBalancer


@implementer(ILoadBalancer)
class RoundRobin:
    """
    Smooth weighted round robin (the scheme nginx uses): on each pick every available host's current
    weight grows by its weight, the largest wins and pays back the total. Hosts of weights 5, 1, 1 are
    picked a a b a c a a, never five in a row, and every window of sum(weights) picks is exact.
    """

    def __init__(self, hosts: Sequence["Host"]) -> None:
        self.hosts = list(hosts)
        self._current: List[int] = [0] * len(self.hosts)

    def pick(self, exclude: Optional["Host"] = None) -> Optional["Host"]:
        """
        The next host, skipping unhealthy ones and C{exclude} while another host is available.
        """
        hosts = self.hosts
        if len(hosts) == 1:
            host = hosts[0]
            return host if host.healthy else None
        current = self._current
        total = 0
        best = -1
        for i, host in enumerate(hosts):
            if not host.healthy or host is exclude:
                continue
            current[i] += host.weight
            total += host.weight
            if best < 0 or current[i] > current[best]:
                best = i
        if best < 0:
            if exclude is not None and exclude.healthy:
                return exclude
            return None
        current[best] -= total
        return hosts[best]


POLICIES = {"round_robin": RoundRobin}
