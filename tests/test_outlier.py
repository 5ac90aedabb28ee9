"""
Tests for L{twistedmesh.upstream.outlier} (passive outlier detection over a real L{Cluster}, driven by a
memory clock and a seeded random) and L{twistedmesh.config.outlier} (the C{outlier.*} keys).
"""

from random import Random
from typing import Dict, List, Tuple

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from twistedmesh.config import ClusterConfig, HostConfig, Options
from twistedmesh.config.errors import ConfigError
from twistedmesh.config.outlier import OutlierConfig, parseOutlier
from twistedmesh.observability.stats import StatsStore
from twistedmesh.upstream.cluster import Cluster, Host
from twistedmesh.upstream.outlier import FLAG, OutlierDetector

SEED = 1


class _Setup:
    """
    A cluster of ten hosts (10.0.0.1 to 10.0.0.10), its stats store, a memory clock and a started detector.
    """

    def __init__(self, hosts: int = 10, seed: int = SEED, **overrides) -> None:
        self.reactor = MemoryReactorClock()
        self.store = StatsStore()
        endpoints = tuple(HostConfig(f"tcp:10.0.0.{i}:80") for i in range(1, hosts + 1))
        self.cluster = Cluster(ClusterConfig("c", endpoints), self.reactor, self.store)
        self.hosts: Tuple[Host, ...] = self.cluster.hosts
        self.config = OutlierConfig(**overrides)
        self.detector = OutlierDetector(self.cluster, self.config, self.reactor, Random(seed))
        self.detector.start()

    def stat(self, name: str) -> int:
        """
        The value of C{cluster.c.outlier_detection.<name>}.
        """
        stat = self.store.get("cluster.c.outlier_detection." + name)
        assert stat is not None, name
        return stat.value

    def respond(self, host: Host, *statuses: int) -> None:
        """
        Report each of C{statuses} as an answer of C{host}.
        """
        for status in statuses:
            self.detector.onResponse(host, status)

    def fail(self, host: Host, kind: str, times: int) -> None:
        """
        Report C{times} local-origin failures of C{kind} on C{host}.
        """
        for _ in range(times):
            self.detector.onLocalFailure(host, kind)

    def ejected(self) -> List[Host]:
        """
        The hosts carrying the outlier flag.
        """
        return [h for h in self.hosts if FLAG in h.healthFlags]


class Consecutive5xxTests(SynchronousTestCase):
    """
    Consecutive 5xx detection.
    """

    def test_ejectsAtThreshold(self) -> None:
        """
        The fifth 5xx in a row ejects the host, the fourth does not.
        """
        s = _Setup()
        host = s.hosts[0]
        s.respond(host, 500, 501, 500, 599)
        self.assertTrue(host.healthy)
        s.respond(host, 500)
        self.assertFalse(host.healthy)
        self.assertEqual(host.healthFlags, {FLAG})
        self.assertEqual(s.ejected(), [host])

    def test_successResets(self) -> None:
        """
        A non-5xx answer between 5xx answers starts the count again.
        """
        s = _Setup()
        host = s.hosts[0]
        s.respond(host, 500, 500, 500, 500, 200, 500, 500, 500, 500)
        self.assertTrue(host.healthy)
        s.respond(host, 500)
        self.assertFalse(host.healthy)

    def test_otherHostsUnaffected(self) -> None:
        """
        Counters are per host: 5xx answers spread over two hosts eject neither.
        """
        s = _Setup()
        a, b = s.hosts[0], s.hosts[1]
        for _ in range(4):
            s.respond(a, 500)
            s.respond(b, 503)
        self.assertEqual(s.ejected(), [])

    def test_clusterToldOfEjection(self) -> None:
        """
        An ejection goes through the cluster: its membership_healthy gauge drops.
        """
        s = _Setup()
        s.respond(s.hosts[0], *[500] * 5)
        self.assertEqual(s.cluster.membership_healthy.value, 9)

    def test_disabledByZero(self) -> None:
        """
        consecutive_5xx = 0 never detects.
        """
        s = _Setup(consecutive_5xx=0)
        s.respond(s.hosts[0], *[500] * 20)
        self.assertEqual(s.ejected(), [])
        self.assertEqual(s.stat("ejections_detected_consecutive_5xx"), 0)

    def test_foreignHostIgnored(self) -> None:
        """
        Reports about a host the cluster does not have change nothing.
        """
        s = _Setup()
        other = _Setup().hosts[0]
        s.respond(other, *[500] * 5)
        s.fail(other, "connect", 5)
        s.detector.onConnectSuccess(other)
        s.detector.onActiveHealthCheckPassed(other)
        self.assertEqual(s.stat("ejections_detected_consecutive_5xx"), 0)
        self.assertTrue(other.healthy)
        self.assertIsNone(s.detector.stateOf(other))

    def test_alreadyEjectedNotDetectedAgain(self) -> None:
        """
        More 5xx answers from an ejected host (panic traffic) are no new detection.
        """
        s = _Setup()
        host = s.hosts[0]
        s.respond(host, *[500] * 15)
        self.assertEqual(s.stat("ejections_detected_consecutive_5xx"), 1)
        self.assertEqual(s.stat("ejections_enforced_consecutive_5xx"), 1)


class GatewayFailureTests(SynchronousTestCase):
    """
    Consecutive gateway failure detection (502, 503, 504).
    """

    def test_detectedNotEnforcedByDefault(self) -> None:
        """
        With the default enforcing_consecutive_gateway_failure of 0, five gateway failures are detected
        but do not eject.
        """
        s = _Setup(consecutive_5xx=100)
        host = s.hosts[0]
        s.respond(host, 502, 503, 504, 503, 502)
        self.assertTrue(host.healthy)
        self.assertEqual(s.stat("ejections_detected_consecutive_gateway_failure"), 1)
        self.assertEqual(s.stat("ejections_enforced_consecutive_gateway_failure"), 0)
        self.assertEqual(s.stat("ejections_enforced_total"), 0)

    def test_longBoutDetectedAgain(self) -> None:
        """
        Each detection restarts its count: ten gateway failures in a row, not enforced, are two gateway
        and two 5xx detections.
        """
        s = _Setup(enforcing_consecutive_5xx=0)
        s.respond(s.hosts[0], *[502] * 10)
        self.assertEqual(s.stat("ejections_detected_consecutive_gateway_failure"), 2)
        self.assertEqual(s.stat("ejections_detected_consecutive_5xx"), 2)
        self.assertTrue(s.hosts[0].healthy)

    def test_enforced(self) -> None:
        """
        With enforcing_consecutive_gateway_failure = 100, five gateway failures eject.
        """
        s = _Setup(consecutive_5xx=100, enforcing_consecutive_gateway_failure=100)
        host = s.hosts[0]
        s.respond(host, 502, 503, 504, 503)
        self.assertTrue(host.healthy)
        s.respond(host, 502)
        self.assertFalse(host.healthy)
        self.assertEqual(s.stat("ejections_enforced_consecutive_gateway_failure"), 1)
        self.assertEqual(s.stat("ejections_detected_consecutive_gateway_failure"), 1)

    def test_other5xxResetsGatewayCount(self) -> None:
        """
        A 5xx that is not a gateway failure restarts the gateway count but not the 5xx count.
        """
        s = _Setup(consecutive_5xx=9, enforcing_consecutive_gateway_failure=100)
        host = s.hosts[0]
        s.respond(host, 503, 503, 503, 503, 500, 503, 503, 503)
        self.assertTrue(host.healthy)
        state = s.detector.stateOf(host)
        self.assertEqual((state.consecutive5xx, state.consecutiveGatewayFailure), (8, 3))
        s.respond(host, 503)
        self.assertFalse(host.healthy)
        self.assertEqual(s.stat("ejections_detected_consecutive_5xx"), 1)
        self.assertEqual(s.stat("ejections_detected_consecutive_gateway_failure"), 0)


class LocalOriginTests(SynchronousTestCase):
    """
    Failures the proxy saw itself: connect failures, resets, timeouts.
    """

    def test_countAs5xxWhenNotSplit(self) -> None:
        """
        Without split, connect failures, resets and timeouts count as 5xx answers and eject at
        consecutive_5xx.
        """
        s = _Setup()
        host = s.hosts[0]
        s.fail(host, "connect", 2)
        s.fail(host, "reset", 1)
        s.fail(host, "timeout", 1)
        self.assertTrue(host.healthy)
        s.fail(host, "connect", 1)
        self.assertFalse(host.healthy)
        self.assertEqual(s.stat("ejections_enforced_consecutive_5xx"), 1)
        self.assertEqual(s.stat("ejections_detected_consecutive_local_origin_failure"), 0)

    def test_gatewayFailuresWhenNotSplit(self) -> None:
        """
        Without split, each local failure is also a gateway failure (503 or 504, as Envoy maps them).
        """
        s = _Setup(consecutive_5xx=100)
        host = s.hosts[0]
        s.fail(host, "timeout", 3)
        s.fail(host, "connect", 1)
        s.fail(host, "reset", 1)
        self.assertEqual(s.stat("ejections_detected_consecutive_gateway_failure"), 1)

    def test_successRateCountsLocalFailuresWhenNotSplit(self) -> None:
        """
        Without split, a local failure counts in the interval's volume as a failed request.
        """
        s = _Setup()
        host = s.hosts[0]
        s.fail(host, "connect", 1)
        s.respond(host, 200)
        state = s.detector.stateOf(host)
        self.assertEqual((state.total, state.success), (2, 1))

    def test_splitCountsSeparately(self) -> None:
        """
        With split, local failures eject at consecutive_local_origin_failure and never count as 5xx.
        """
        s = _Setup(split_external_local_origin_errors=True, consecutive_local_origin_failure=3)
        host = s.hosts[0]
        s.respond(host, 500, 500, 500, 500)
        s.fail(host, "connect", 2)
        self.assertTrue(host.healthy)
        self.assertEqual(s.detector.stateOf(host).consecutive5xx, 4)
        self.assertEqual(s.detector.stateOf(host).total, 4)
        s.fail(host, "timeout", 1)
        self.assertFalse(host.healthy)
        self.assertEqual(s.stat("ejections_detected_consecutive_local_origin_failure"), 1)
        self.assertEqual(s.stat("ejections_enforced_consecutive_local_origin_failure"), 1)
        self.assertEqual(s.stat("ejections_detected_consecutive_5xx"), 0)

    def test_splitConnectSuccessResets(self) -> None:
        """
        With split, a successful connection restarts the local-origin count.
        """
        s = _Setup(split_external_local_origin_errors=True, consecutive_local_origin_failure=3)
        host = s.hosts[0]
        s.fail(host, "reset", 2)
        s.detector.onConnectSuccess(host)
        s.fail(host, "reset", 2)
        self.assertTrue(host.healthy)
        s.fail(host, "reset", 1)
        self.assertFalse(host.healthy)

    def test_splitAnswerDoesNotResetLocal(self) -> None:
        """
        With split, an upstream answer (even a 200) does not restart the local-origin count.
        """
        s = _Setup(split_external_local_origin_errors=True, consecutive_local_origin_failure=3)
        host = s.hosts[0]
        s.fail(host, "connect", 2)
        s.respond(host, 200)
        s.fail(host, "connect", 1)
        self.assertFalse(host.healthy)

    def test_connectSuccessIgnoredWhenNotSplit(self) -> None:
        """
        Without split, a successful connection does not reset the 5xx count (the answer will count).
        """
        s = _Setup()
        host = s.hosts[0]
        s.fail(host, "connect", 4)
        s.detector.onConnectSuccess(host)
        s.fail(host, "connect", 1)
        self.assertFalse(host.healthy)


    def test_finalConnectSuccessIsASuccess(self) -> None:
        """
        Without split, a final connect success (tcp_proxy's) counts as a 200: it resets the 5xx count and
        counts in the interval's volume.
        """
        s = _Setup()
        host = s.hosts[0]
        s.fail(host, "connect", 4)
        s.detector.onConnectSuccess(host, final=True)
        s.fail(host, "connect", 4)
        self.assertTrue(host.healthy)
        state = s.detector.stateOf(host)
        self.assertEqual((state.total, state.success), (9, 1))

    def test_splitFinalConnectSuccessResetsLocal(self) -> None:
        """
        With split, a final connect success resets the local-origin count and is no answer.
        """
        s = _Setup(split_external_local_origin_errors=True, consecutive_local_origin_failure=3)
        host = s.hosts[0]
        s.fail(host, "connect", 2)
        s.detector.onConnectSuccess(host, final=True)
        s.fail(host, "connect", 2)
        self.assertTrue(host.healthy)
        self.assertEqual(s.detector.stateOf(host).total, 0)


class EjectionTimeTests(SynchronousTestCase):
    """
    How long ejections last, and returning to service.
    """

    def ejectNow(self, s: _Setup, host: Host) -> None:
        """
        Eject C{host} with five 5xx answers.
        """
        s.respond(host, *[500] * 5)
        self.assertFalse(host.healthy)

    def test_unejectedOnNextSweepAfterTime(self) -> None:
        """
        An ejection of 25s with a 10s interval ends at the 30s sweep, not before.
        """
        s = _Setup(base_ejection_time=25.0)
        host = s.hosts[0]
        self.ejectNow(s, host)
        self.assertEqual(s.stat("ejections_active"), 1)
        s.reactor.advance(10)
        s.reactor.advance(10)
        s.reactor.advance(5)
        self.assertFalse(host.healthy)
        s.reactor.advance(5)
        self.assertTrue(host.healthy)
        self.assertEqual(host.healthFlags, set())
        self.assertEqual(s.stat("ejections_active"), 0)
        self.assertEqual(s.cluster.membership_healthy.value, 10)

    def test_multipliesAndCaps(self) -> None:
        """
        Each ejection in a row lasts one base_ejection_time more, up to max_ejection_time.
        """
        s = _Setup(base_ejection_time=30.0, max_ejection_time=90.0)
        host = s.hosts[0]
        state = s.detector.stateOf(host)
        durations = []
        for _ in range(5):
            self.ejectNow(s, host)
            durations.append(s.detector.ejectionDuration(state))
            ejectedAt = s.reactor.seconds()
            while not host.healthy:
                s.reactor.advance(10)
            self.assertEqual(s.reactor.seconds() - ejectedAt, durations[-1])
        self.assertEqual(durations, [30.0, 60.0, 90.0, 90.0, 90.0])
        # The multiplier stops one past the cap (Envoy's rule), so that decay back to base is bounded.
        self.assertEqual(state.multiplier, 4)

    def test_multiplierDecays(self) -> None:
        """
        A host back in service for an interval has its multiplier lowered by one at each sweep.
        """
        s = _Setup(base_ejection_time=10.0)
        host = s.hosts[0]
        state = s.detector.stateOf(host)
        self.ejectNow(s, host)
        s.reactor.advance(10)
        self.ejectNow(s, host)
        self.assertEqual(state.multiplier, 2)
        s.reactor.advance(10)
        s.reactor.advance(10)
        self.assertTrue(host.healthy)
        self.assertEqual(state.multiplier, 2)  # returned at the last sweep: not an interval ago yet
        s.reactor.advance(10)
        self.assertEqual(state.multiplier, 1)
        s.reactor.advance(10)
        self.assertEqual(state.multiplier, 0)
        s.reactor.advance(10)
        self.assertEqual(state.multiplier, 0)
        self.ejectNow(s, host)
        self.assertEqual(s.detector.ejectionDuration(state), 10.0)

    def test_countersResetOnReturn(self) -> None:
        """
        5xx answers while ejected (panic traffic) do not carry over: after returning, the host needs a
        whole new run to be ejected again.
        """
        s = _Setup()
        host = s.hosts[0]
        self.ejectNow(s, host)
        s.respond(host, 500, 500, 500, 500)
        s.reactor.advance(30)
        self.assertTrue(host.healthy)
        s.respond(host, 500)
        self.assertTrue(host.healthy)

    def test_jitter(self) -> None:
        """
        Each ejection adds a jitter of whole milliseconds drawn from the injected random.
        """
        s = _Setup(max_ejection_time_jitter=7.0, seed=42)
        host = s.hosts[0]
        self.ejectNow(s, host)
        expected = Random(42).randint(0, 7000) / 1000.0
        state = s.detector.stateOf(host)
        self.assertEqual(state.jitter, expected)
        self.assertEqual(s.detector.ejectionDuration(state), 30.0 + expected)
        s.reactor.advance(10)
        s.reactor.advance(10)
        s.reactor.advance(10)
        self.assertFalse(host.healthy)  # 30s passed, the jitter has not
        s.reactor.advance(10)
        self.assertTrue(host.healthy)

    def test_startStop(self) -> None:
        """
        start arms one timer however often it is called; stop cancels it and nothing returns hosts then.
        """
        s = _Setup()
        s.detector.start()
        self.assertEqual(len(s.reactor.getDelayedCalls()), 1)
        host = s.hosts[0]
        self.ejectNow(s, host)
        s.detector.stop()
        self.assertEqual(s.reactor.getDelayedCalls(), [])
        s.reactor.advance(100)
        self.assertFalse(host.healthy)


class MaxEjectionPercentTests(SynchronousTestCase):
    """
    max_ejection_percent and always_eject_one_host.
    """

    def test_overflow(self) -> None:
        """
        With the default 10% of ten hosts, a second ejection overflows and the host stays in service.
        """
        s = _Setup()
        a, b = s.hosts[0], s.hosts[1]
        s.respond(a, *[500] * 5)
        s.respond(b, *[500] * 5)
        self.assertFalse(a.healthy)
        self.assertTrue(b.healthy)
        self.assertEqual(s.stat("ejections_overflow"), 1)
        self.assertEqual(s.stat("ejections_active"), 1)
        self.assertEqual(s.stat("ejections_detected_consecutive_5xx"), 2)
        self.assertEqual(s.stat("ejections_enforced_consecutive_5xx"), 1)

    def test_roomAfterReturn(self) -> None:
        """
        Once the ejected host returns, another may be ejected.
        """
        s = _Setup()
        a, b = s.hosts[0], s.hosts[1]
        s.respond(a, *[500] * 5)
        s.reactor.advance(30)
        s.respond(b, *[500] * 5)
        self.assertTrue(a.healthy)
        self.assertFalse(b.healthy)

    def test_noExceptionForFirstHost(self) -> None:
        """
        When one host is already more than the percentage (5% of ten), nothing is ejected.
        """
        s = _Setup(max_ejection_percent=5)
        s.respond(s.hosts[0], *[500] * 5)
        self.assertEqual(s.ejected(), [])
        self.assertEqual(s.stat("ejections_overflow"), 1)

    def test_alwaysEjectOneHost(self) -> None:
        """
        always_eject_one_host allows one ejection past the percentage, not two.
        """
        s = _Setup(max_ejection_percent=5, always_eject_one_host=True)
        s.respond(s.hosts[0], *[500] * 5)
        s.respond(s.hosts[1], *[500] * 5)
        self.assertEqual(s.ejected(), [s.hosts[0]])
        self.assertEqual(s.stat("ejections_overflow"), 1)

    def test_higherPercentage(self) -> None:
        """
        With 30%, three of ten hosts may be ejected and the fourth overflows.
        """
        s = _Setup(max_ejection_percent=30)
        for host in s.hosts[:4]:
            s.respond(host, *[500] * 5)
        self.assertEqual(s.ejected(), list(s.hosts[:3]))
        self.assertEqual(s.stat("ejections_overflow"), 1)


class EnforcingTests(SynchronousTestCase):
    """
    The enforcing_* percentages, rolled with the injected random.
    """

    def test_rolledWithInjectedRandom(self) -> None:
        """
        With enforcing_consecutive_5xx = 50, which detections eject follows the seeded random's draws.
        """
        s = _Setup(enforcing_consecutive_5xx=50, max_ejection_percent=100, seed=7)
        replica = Random(7)
        expected = [h for h in s.hosts if replica.randrange(100) < 50]
        for host in s.hosts:
            s.respond(host, *[500] * 5)
        self.assertEqual(s.ejected(), expected)
        self.assertTrue(0 < len(expected) < 10)  # the seed exercises both outcomes
        self.assertEqual(s.stat("ejections_detected_consecutive_5xx"), 10)
        self.assertEqual(s.stat("ejections_enforced_consecutive_5xx"), len(expected))

    def test_zeroEnforcingDrawsNothing(self) -> None:
        """
        The defaults (0 and 100) draw nothing from the random the load balancer shares.
        """
        s = _Setup(consecutive_5xx=100)
        before = s.detector.random.getstate()
        s.respond(s.hosts[0], *[503] * 5)  # gateway: enforcing 0
        s.respond(s.hosts[1], *[500] * 100)  # 5xx: enforcing 100
        self.assertEqual(s.detector.random.getstate(), before)


class SuccessRateTests(SynchronousTestCase):
    """
    Success-rate detection at each sweep.
    """

    def traffic(self, s: _Setup, counts: Dict[int, Tuple[int, int]]) -> None:
        """
        For each host index, C{(successes, failures)} answers, interleaved so that no consecutive detection
        fires.
        """
        for index, (ok, bad) in counts.items():
            host = s.hosts[index]
            for i in range(max(ok, bad)):
                if i < bad:
                    s.respond(host, 500)
                if i < ok:
                    s.respond(host, 200)

    def test_outlierEjected(self) -> None:
        """
        Nine hosts at 100% and one at 50% (mean 95, stdev 15, threshold 66.5): the 50% host is ejected.
        """
        s = _Setup()
        counts = {i: (100, 0) for i in range(1, 10)}
        counts[0] = (50, 50)
        self.traffic(s, counts)
        self.assertEqual(s.ejected(), [])
        s.reactor.advance(10)
        self.assertEqual(s.ejected(), [s.hosts[0]])
        self.assertAlmostEqual(s.detector.successRateAverage, 95.0)
        self.assertAlmostEqual(s.detector.successRateEjectionThreshold, 66.5)
        self.assertEqual(s.detector.stateOf(s.hosts[0]).successRate, 50.0)
        self.assertEqual(s.stat("ejections_detected_success_rate"), 1)
        self.assertEqual(s.stat("ejections_enforced_success_rate"), 1)

    def test_withinThresholdKept(self) -> None:
        """
        Only a rate strictly below mean - factor x stdev is ejected: nine hosts at 100% and one at 80% (mean
        98, stdev 6) lose it with 1.9 (threshold 86.6) and keep it with 3.0 (threshold exactly 80).
        """
        counts = {i: (100, 0) for i in range(1, 10)}
        counts[0] = (80, 20)
        s = _Setup()
        self.traffic(s, counts)
        s.reactor.advance(10)
        self.assertEqual(s.ejected(), [s.hosts[0]])
        s = _Setup(success_rate_stdev_factor=3000)
        self.traffic(s, counts)
        s.reactor.advance(10)
        self.assertEqual(s.ejected(), [])
        self.assertEqual(s.detector.successRateEjectionThreshold, 80.0)

    def test_tooFewQualifyingHosts(self) -> None:
        """
        With only four hosts over the request volume (minimum five), nothing is judged.
        """
        s = _Setup()
        counts = {i: (100, 0) for i in range(1, 4)}
        counts[0] = (50, 50)
        self.traffic(s, counts)
        s.reactor.advance(10)
        self.assertEqual(s.ejected(), [])
        self.assertEqual(s.detector.successRateAverage, -1.0)
        self.assertEqual(s.stat("ejections_detected_success_rate"), 0)

    def test_requestVolume(self) -> None:
        """
        A host with fewer answers than success_rate_request_volume in the interval is not judged.
        """
        s = _Setup()
        counts = {i: (100, 0) for i in range(1, 10)}
        counts[0] = (49, 50)
        self.traffic(s, counts)
        s.reactor.advance(10)
        self.assertEqual(s.ejected(), [])
        self.assertEqual(s.detector.stateOf(s.hosts[0]).successRate, -1.0)
        self.assertAlmostEqual(s.detector.successRateAverage, 100.0)

    def test_intervalsCountedApart(self) -> None:
        """
        Each sweep judges the interval just ended: answers of an earlier interval do not add up.
        """
        s = _Setup()
        counts = {i: (50, 0) for i in range(1, 10)}
        counts[0] = (25, 25)
        self.traffic(s, counts)
        s.reactor.advance(10)
        self.traffic(s, counts)
        s.reactor.advance(10)
        self.assertEqual(s.ejected(), [])

    def test_clusterTooSmall(self) -> None:
        """
        A cluster with fewer hosts than success_rate_minimum_hosts never runs success-rate detection.
        """
        # Four hosts: three at 100%, one at 50% (mean 87.5, stdev 21.7); a factor of 1 puts it below.
        s = _Setup(hosts=4, success_rate_minimum_hosts=5, max_ejection_percent=100, success_rate_stdev_factor=1000)
        counts = {i: (100, 0) for i in range(1, 4)}
        counts[0] = (50, 50)
        self.traffic(s, counts)
        s.reactor.advance(10)
        self.assertEqual(s.ejected(), [])
        s = _Setup(hosts=4, success_rate_minimum_hosts=4, max_ejection_percent=100, success_rate_stdev_factor=1000)
        self.traffic(s, counts)
        s.reactor.advance(10)
        self.assertEqual(s.ejected(), [s.hosts[0]])

    def test_ejectedHostsNotJudged(self) -> None:
        """
        A host already ejected is left out of the sweep's success rates (it is not detected twice).
        """
        s = _Setup(max_ejection_percent=20)
        s.respond(s.hosts[0], *[500] * 5)
        counts = {i: (100, 0) for i in range(1, 10)}
        counts[0] = (50, 50)
        self.traffic(s, counts)
        s.reactor.advance(10)
        self.assertEqual(s.ejected(), [s.hosts[0]])
        self.assertEqual(s.stat("ejections_detected_success_rate"), 0)
        self.assertEqual(s.stat("ejections_active"), 1)
        self.assertAlmostEqual(s.detector.successRateAverage, 100.0)

    def test_notEnforced(self) -> None:
        """
        With enforcing_success_rate = 0 the outlier is detected, not ejected.
        """
        s = _Setup(enforcing_success_rate=0)
        counts = {i: (100, 0) for i in range(1, 10)}
        counts[0] = (50, 50)
        self.traffic(s, counts)
        s.reactor.advance(10)
        self.assertEqual(s.ejected(), [])
        self.assertEqual(s.stat("ejections_detected_success_rate"), 1)
        self.assertEqual(s.stat("ejections_enforced_success_rate"), 0)


class LoadBalancingTests(SynchronousTestCase):
    """
    Ejected hosts and the cluster's load balancer.
    """

    def test_ejectedNotPicked(self) -> None:
        """
        An ejected host is never picked, and is picked again once it returns.
        """
        s = _Setup()
        host = s.hosts[0]
        s.respond(host, *[500] * 5)
        picks = {s.cluster.pick() for _ in range(1000)}
        self.assertNotIn(host, picks)
        self.assertEqual(len(picks), 9)
        s.reactor.advance(30)
        picks = {s.cluster.pick() for _ in range(1000)}
        self.assertIn(host, picks)

    def test_panicUsesEjectedHosts(self) -> None:
        """
        With six of ten hosts ejected the cluster is in panic mode and picks them too.
        """
        s = _Setup(max_ejection_percent=100)
        for host in s.hosts[:6]:
            s.respond(host, *[500] * 5)
        self.assertEqual(len(s.ejected()), 6)
        self.assertTrue(s.cluster.lb.inPanic)
        picks = {s.cluster.pick() for _ in range(100)}
        self.assertEqual(picks, set(s.hosts))
        self.assertEqual(s.cluster.lb_healthy_panic.value, 100)

    def test_sweepRebuildsOnce(self) -> None:
        """
        Hosts returning at the same sweep rebuild the load balancer once.
        """
        s = _Setup(max_ejection_percent=100)
        for host in s.hosts[:3]:
            s.respond(host, *[500] * 5)
        calls = []
        original = s.cluster.healthChanged
        s.cluster.healthChanged = lambda: (calls.append(1), original())
        s.reactor.advance(30)
        self.assertEqual(s.ejected(), [])
        self.assertEqual(len(calls), 1)
        self.assertEqual(s.cluster.membership_healthy.value, 10)


class ActiveHealthCheckTests(SynchronousTestCase):
    """
    onActiveHealthCheckPassed.
    """

    def test_passReturnsHost(self) -> None:
        """
        A passing active check returns an ejected host to service at once.
        """
        s = _Setup()
        host = s.hosts[0]
        s.respond(host, *[500] * 5)
        s.detector.onActiveHealthCheckPassed(host)
        self.assertTrue(host.healthy)
        self.assertEqual(s.stat("ejections_active"), 0)
        self.assertIn(host, {s.cluster.pick() for _ in range(100)})
        self.assertIn("active health check passed", host.healthReason)

    def test_notWhileActiveCheckFails(self) -> None:
        """
        A host that active checking itself marks failed stays ejected.
        """
        s = _Setup()
        host = s.hosts[0]
        host.setHealthFlag("failed_active_hc", True, reason="active check failed")
        s.respond(host, *[500] * 5)
        s.detector.onActiveHealthCheckPassed(host)
        self.assertIn(FLAG, host.healthFlags)

    def test_disabled(self) -> None:
        """
        successful_active_health_check_uneject_host = false leaves the host ejected.
        """
        s = _Setup(successful_active_health_check_uneject_host=False)
        host = s.hosts[0]
        s.respond(host, *[500] * 5)
        s.detector.onActiveHealthCheckPassed(host)
        self.assertFalse(host.healthy)

    def test_otherReasonKept(self) -> None:
        """
        Returning a host that another flag keeps out leaves that flag's reason on show.
        """
        s = _Setup()
        host = s.hosts[0]
        s.respond(host, *[500] * 5)
        host.setHealthFlag("pending_active_hc", True, reason="waiting for the first check")
        s.reactor.advance(30)
        self.assertEqual(host.healthFlags, {"pending_active_hc"})
        self.assertEqual(host.healthReason, "waiting for the first check")


class StatsTests(SynchronousTestCase):
    """
    The outlier_detection stats, by Envoy's names.
    """

    def test_values(self) -> None:
        """
        A run of ejections of every kind leaves Envoy's counters and the active gauge at the right values.
        """
        s = _Setup(max_ejection_percent=20, enforcing_consecutive_gateway_failure=100, consecutive_5xx=6)
        s.respond(s.hosts[0], *[502] * 5)  # gateway, enforced
        s.respond(s.hosts[1], *[500] * 6)  # 5xx, enforced
        s.respond(s.hosts[2], *[500] * 6)  # 5xx, overflow
        self.assertEqual(s.stat("ejections_active"), 2)
        self.assertEqual(s.stat("ejections_enforced_total"), 2)
        self.assertEqual(s.stat("ejections_overflow"), 1)
        # Envoy's deprecated total: consecutive 5xx and success rate only, past the percentage check.
        self.assertEqual(s.stat("ejections_total"), 1)
        self.assertEqual(s.stat("ejections_detected_consecutive_gateway_failure"), 1)
        self.assertEqual(s.stat("ejections_enforced_consecutive_gateway_failure"), 1)
        self.assertEqual(s.stat("ejections_detected_consecutive_5xx"), 2)
        self.assertEqual(s.stat("ejections_enforced_consecutive_5xx"), 1)
        self.assertEqual(s.stat("ejections_detected_consecutive_local_origin_failure"), 0)
        self.assertEqual(s.stat("ejections_enforced_success_rate"), 0)
        s.reactor.advance(30)
        self.assertEqual(s.stat("ejections_active"), 0)

    def test_prometheusLabels(self) -> None:
        """
        The stats carry the cluster as a label and Envoy's metric name.
        """
        s = _Setup()
        stat = s.store.get("cluster.c.outlier_detection.ejections_active")
        self.assertEqual(stat.kind, "gauge")
        self.assertEqual(stat.tagName, "cluster_outlier_detection_ejections_active")
        self.assertEqual(stat.labels, (("envoy_cluster_name", "c"),))


def _parse(items: Dict[str, str]):
    """
    Parse C{items} as a cluster section; return the config and the errors (after C{finish}).
    """
    errors: List[ConfigError] = []
    o = Options("mesh.ini", "cluster:c", items, errors)
    config = parseOutlier(o)
    o.finish()
    return config, errors


class ConfigTests(SynchronousTestCase):
    """
    Tests for L{parseOutlier}.
    """

    def test_absent(self) -> None:
        """
        A section without outlier.* keys has no outlier detection.
        """
        config, errors = _parse({})
        self.assertIsNone(config)
        self.assertEqual(errors, [])

    def test_defaults(self) -> None:
        """
        One outlier.* key turns detection on with Envoy's defaults for the rest.
        """
        config, errors = _parse({"outlier.consecutive_5xx": "5"})
        self.assertEqual(errors, [])
        self.assertEqual(config, OutlierConfig())
        self.assertEqual(
            (config.consecutive_5xx, config.consecutive_gateway_failure, config.consecutive_local_origin_failure,
             config.split_external_local_origin_errors, config.interval, config.base_ejection_time,
             config.max_ejection_time, config.max_ejection_percent, config.enforcing_consecutive_5xx,
             config.enforcing_consecutive_gateway_failure, config.enforcing_consecutive_local_origin_failure,
             config.enforcing_success_rate, config.success_rate_minimum_hosts, config.success_rate_request_volume,
             config.success_rate_stdev_factor, config.max_ejection_time_jitter,
             config.successful_active_health_check_uneject_host, config.always_eject_one_host),
            (5, 5, 5, False, 10.0, 30.0, 300.0, 10, 100, 0, 100, 100, 5, 100, 1900, 0.0, True, False),
        )

    def test_values(self) -> None:
        """
        Every key is read with its type: counts, durations, percentages (a % allowed), booleans.
        """
        config, errors = _parse({
            "outlier.consecutive_5xx": "3",
            "outlier.consecutive_gateway_failure": "4",
            "outlier.consecutive_local_origin_failure": "2",
            "outlier.split_external_local_origin_errors": "true",
            "outlier.interval": "500ms",
            "outlier.base_ejection_time": "1m",
            "outlier.max_ejection_time": "10m",
            "outlier.max_ejection_percent": "50%",
            "outlier.enforcing_consecutive_5xx": "90",
            "outlier.enforcing_consecutive_gateway_failure": "100",
            "outlier.enforcing_consecutive_local_origin_failure": "0",
            "outlier.enforcing_success_rate": "10",
            "outlier.success_rate_minimum_hosts": "3",
            "outlier.success_rate_request_volume": "20",
            "outlier.success_rate_stdev_factor": "1000",
            "outlier.max_ejection_time_jitter": "2s",
            "outlier.successful_active_health_check_uneject_host": "no",
            "outlier.always_eject_one_host": "yes",
        })
        self.assertEqual(errors, [])
        self.assertEqual(config, OutlierConfig(
            consecutive_5xx=3, consecutive_gateway_failure=4, consecutive_local_origin_failure=2,
            split_external_local_origin_errors=True, interval=0.5, base_ejection_time=60.0,
            max_ejection_time=600.0, max_ejection_percent=50, enforcing_consecutive_5xx=90,
            enforcing_consecutive_gateway_failure=100, enforcing_consecutive_local_origin_failure=0,
            enforcing_success_rate=10, success_rate_minimum_hosts=3, success_rate_request_volume=20,
            success_rate_stdev_factor=1000, max_ejection_time_jitter=2.0,
            successful_active_health_check_uneject_host=False, always_eject_one_host=True,
        ))

    def test_maxEjectionTimeFollowsLongBase(self) -> None:
        """
        Unwritten, max_ejection_time is 300s or base_ejection_time, whichever is longer (Envoy's rule).
        """
        config, errors = _parse({"outlier.base_ejection_time": "10m"})
        self.assertEqual(errors, [])
        self.assertEqual(config.max_ejection_time, 600.0)

    def test_errors(self) -> None:
        """
        Bad values are reported by key, each with the default in its place.
        """
        config, errors = _parse({
            "outlier.max_ejection_percent": "101",
            "outlier.enforcing_success_rate": "half",
            "outlier.interval": "0s",
            "outlier.base_ejection_time": "60s",
            "outlier.max_ejection_time": "30s",
            "outlier.consecutive_5xx": "-1",
            "outlier.split_external_local_origin_errors": "maybe",
        })
        byKey = {e.key: e.why for e in errors}
        self.assertEqual(set(byKey), {
            "outlier.max_ejection_percent", "outlier.enforcing_success_rate", "outlier.interval",
            "outlier.max_ejection_time", "outlier.consecutive_5xx", "outlier.split_external_local_origin_errors",
        })
        self.assertIn("from 0 to 100", byKey["outlier.max_ejection_percent"])
        self.assertIn("base_ejection_time", byKey["outlier.max_ejection_time"])
        self.assertEqual(errors[0].file, "mesh.ini")
        self.assertEqual(errors[0].section, "cluster:c")
        self.assertEqual((config.max_ejection_percent, config.enforcing_success_rate, config.interval,
                          config.max_ejection_time, config.consecutive_5xx), (10, 100, 10.0, 60.0, 5))

    def test_unknownKeySuggested(self) -> None:
        """
        A misspelled outlier.* key is reported as unknown with the closest key suggested.
        """
        config, errors = _parse({"outlier.consecutive_5xxx": "3"})
        self.assertIsNotNone(config)
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0].key, "outlier.consecutive_5xxx")
        self.assertIn("outlier.consecutive_5xx", errors[0].why)
