"""
Passive outlier detection (Envoy's; see docs/outlier-detection.md): hosts that answer badly are ejected
from their cluster's load balancing for a while, judged on the traffic itself rather than on probes.

One L{OutlierDetector} per cluster. The router reports every upstream outcome through its hooks, which only
count (integer increments on the host's L{HostOutlierState}); a consecutive-failure counter reaching its
threshold ejects the host there and then. One timer per cluster, every C{interval} on the injected clock,
returns hosts whose ejection has run out and runs success-rate detection over the interval just ended.

Semantics follow Envoy's C{outlier_detection_impl.cc}:

  - B{What counts.} An upstream answer is a 5xx (500-599) or not; 502, 503 and 504 are also gateway
    failures. Any other answer is a success and resets both consecutive counters. Failures the proxy saw
    itself (local origin: connect failure, reset, timeout) are, by default, counted as the answer the proxy
    gives in their place (Envoy's C{resultToHttpCode}): a connect failure or a reset as a 503, a timeout as
    a 504, so each is a 5xx and a gateway failure. With C{split_external_local_origin_errors} they count
    only in their own C{consecutive_local_origin_failure} counter, which a successful connection
    (L{OutlierDetector.onConnectSuccess}) resets, and 5xx counting sees only the upstream's own answers.
  - B{Detection and enforcement.} A counter reaching its threshold (exactly, as Envoy compares) is a
    detection: C{ejections_detected_<kind>} counts it and the counter starts again, so a long bout of errors
    is detected again every threshold errors. It is enforced (the host ejected,
    C{ejections_enforced_<kind>}) when the C{enforcing_<kind>} percentage, rolled with the injected random,
    allows. Gateway failures are enforced 0% by default: detected, never ejected. A host already ejected is
    not detected again.
  - B{max_ejection_percent.} A detection that would make more than that share of the hosts ejected is
    dropped (C{ejections_overflow}), before the enforcing roll, as in Envoy. No exception for a first host:
    with the default 10%, a cluster of fewer than 10 hosts never ejects, unless C{always_eject_one_host}
    allows one ejection when none is active (Envoy's key of that name, default off).
  - B{Ejection time.} Each host carries a multiplier, raised by one at each ejection (while
    C{multiplier x base} is below C{max + base}); an ejection lasts C{min(base_ejection_time x multiplier,
    max_ejection_time)} plus the jitter drawn at ejection (0 to C{max_ejection_time_jitter}, whole ms).
    The host returns at the first sweep after that time, with its consecutive counters reset. At each sweep,
    a host that is in service and returned at least an C{interval} ago has its multiplier lowered by one.
  - B{Success rate.} At each sweep, the hosts in service that had at least C{success_rate_request_volume}
    answers in the interval just ended qualify; when at least C{success_rate_minimum_hosts} do (and the
    cluster has that many hosts), those whose success rate is below C{mean - stdev x stdev_factor / 1000}
    (population standard deviation) are detected. Local-origin success rate and failure-percentage detection
    are not implemented.
  - B{Active health checking.} When a check passes on an ejected host that active checking does not itself
    fail, L{OutlierDetector.onActiveHealthCheckPassed} returns it to service at once (Envoy's
    C{successful_active_health_check_uneject_host}, on by default).

Ejection sets the host's C{failed_outlier_check} health flag and tells the cluster (which rebuilds its load
balancer's snapshot), so an ejected host is picked only in panic mode. Envoy counts the outcomes of panic
traffic to an ejected host too, and so does this detector.

Per-host state lives in a dict keyed by L{Host} (hashed by identity), owned by the detector: the hosts
carry nothing of it but their health flag. The detector takes the cluster's hosts when it is made; the
cluster's membership is static.
"""

from __future__ import annotations

import math
from random import Random
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from ..config.outlier import OutlierConfig

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime

    from .cluster import Cluster, Host

#: The health flag this detector owns on a host (Envoy's name, shown on the admin C{/clusters} page).
FLAG = "failed_outlier_check"

# Detection kinds, as Envoy's stats name them (ejections_detected_<kind>, ejections_enforced_<kind>).
CONSECUTIVE_5XX = "consecutive_5xx"
CONSECUTIVE_GATEWAY_FAILURE = "consecutive_gateway_failure"
CONSECUTIVE_LOCAL_ORIGIN_FAILURE = "consecutive_local_origin_failure"
SUCCESS_RATE = "success_rate"
KINDS = (CONSECUTIVE_5XX, CONSECUTIVE_GATEWAY_FAILURE, CONSECUTIVE_LOCAL_ORIGIN_FAILURE, SUCCESS_RATE)

#: The local-origin failures the router reports, and the status each counts as when errors are not split
#: (Envoy's C{resultToHttpCode}: a connect failure, and so a reset, is a 503; a timeout a 504).
LOCAL_FAILURE_STATUS = {"connect": 503, "reset": 503, "timeout": 504}


class HostOutlierState:
    """
    What the detector knows of one host. Plain integer attributes (slots), so that a hook is a few
    increments.

    @ivar consecutive5xx: 5xx answers in a row.
    @ivar consecutiveGatewayFailure: 502/503/504 answers in a row.
    @ivar consecutiveLocalOriginFailure: local-origin failures in a row (split mode only).
    @ivar total: answers counted in the current interval (success-rate detection).
    @ivar success: non-5xx answers among them.
    @ivar successRate: the host's success rate (percent) over the last complete interval, or -1 when it did
        not qualify for success-rate detection (for the admin C{/clusters} page).
    @ivar ejected: whether the host is ejected now.
    @ivar ejectedAt: the clock's time of the current (or last) ejection.
    @ivar jitter: seconds added to the current ejection.
    @ivar multiplier: Envoy's ejection time back-off: the current ejection lasts C{base x multiplier}.
    @ivar ejections: how many times the host was ejected in all.
    @ivar unejectedAt: the clock's time the host last returned to service, or C{None}.
    """

    __slots__ = ("consecutive5xx", "consecutiveGatewayFailure", "consecutiveLocalOriginFailure", "total",
                 "success", "successRate", "ejected", "ejectedAt", "jitter", "multiplier", "ejections",
                 "unejectedAt")

    def __init__(self) -> None:
        self.consecutive5xx = 0
        self.consecutiveGatewayFailure = 0
        self.consecutiveLocalOriginFailure = 0
        self.total = 0
        self.success = 0
        self.successRate = -1.0
        self.ejected = False
        self.ejectedAt = 0.0
        self.jitter = 0.0
        self.multiplier = 0
        self.ejections = 0
        self.unejectedAt: Optional[float] = None

    def resetConsecutive(self) -> None:
        """
        Zero every consecutive counter (on return to service, so that a counter left near its threshold
        does not eject again after very few errors).
        """
        self.consecutive5xx = 0
        self.consecutiveGatewayFailure = 0
        self.consecutiveLocalOriginFailure = 0


class OutlierDetector:
    """
    Outlier detection for one cluster (see the module docstring for the rules).

    @ivar cluster: the L{Cluster}.
    @ivar config: the L{OutlierConfig}.
    @ivar successRateAverage: the mean success rate of the last success-rate sweep, or -1 when it did not
        run (too few qualifying hosts).
    @ivar successRateEjectionThreshold: the ejection threshold of that sweep, or -1.
    @ivar ejections_active: gauge, C{cluster.<name>.outlier_detection.ejections_active}; the other stats
        likewise (Envoy's names).
    """

    def __init__(self, cluster: "Cluster", config: OutlierConfig, clock: "IReactorTime", random: Random) -> None:
        """
        @param cluster: the cluster whose hosts are watched; its stats scope gets the
            C{outlier_detection.} stats.
        @param clock: the timer's clock, and the time ejections are measured with.
        @param random: rolls the C{enforcing_*} percentages and draws the jitter.
        """
        self.cluster = cluster
        self.config = config
        self.clock = clock
        self.random = random
        self._states: Dict["Host", HostOutlierState] = {host: HostOutlierState() for host in cluster.hosts}
        self._timer: Optional["IDelayedCall"] = None
        # During a sweep health changes are collected and the load balancer rebuilt once, not per host.
        self._sweeping = False
        self._healthDirty = False
        self.successRateAverage = -1.0
        self.successRateEjectionThreshold = -1.0
        # Copied off the config for the hooks: an attribute read instead of two.
        self._split = config.split_external_local_origin_errors
        self._threshold5xx = config.consecutive_5xx
        self._thresholdGateway = config.consecutive_gateway_failure
        self._thresholdLocal = config.consecutive_local_origin_failure
        self._enforcing = {
            CONSECUTIVE_5XX: config.enforcing_consecutive_5xx,
            CONSECUTIVE_GATEWAY_FAILURE: config.enforcing_consecutive_gateway_failure,
            CONSECUTIVE_LOCAL_ORIGIN_FAILURE: config.enforcing_consecutive_local_origin_failure,
            SUCCESS_RATE: config.enforcing_success_rate,
        }

        scope = cluster.stats.scope("outlier_detection")
        self.ejections_active = scope.gauge("ejections_active")
        self.ejections_total = scope.counter("ejections_total")
        self.ejections_enforced_total = scope.counter("ejections_enforced_total")
        self.ejections_overflow = scope.counter("ejections_overflow")
        self.detected = {kind: scope.counter(f"ejections_detected_{kind}") for kind in KINDS}
        self.enforced = {kind: scope.counter(f"ejections_enforced_{kind}") for kind in KINDS}

    # -- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """
        Start the interval timer (the service's C{startService}). Idempotent. The hooks count and eject
        without it; returning hosts to service and success-rate detection need it.
        """
        if self._timer is None:
            self._timer = self.clock.callLater(self.config.interval, self._sweep)

    def stop(self) -> None:
        """
        Stop the interval timer (the service's C{stopService}). Ejected hosts stay ejected.
        """
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    # -- hooks (hot path) ---------------------------------------------------------------------------------

    def onResponse(self, host: "Host", status: int) -> None:
        """
        The upstream C{host} answered with C{status} (the router calls this for every response head,
        retried or not, before deciding on a retry).
        """
        state = self._states.get(host)
        if state is None:  # not a host of this cluster
            return
        state.total += 1
        if 500 <= status < 600:
            if 502 <= status <= 504:
                state.consecutiveGatewayFailure += 1
                if state.consecutiveGatewayFailure == self._thresholdGateway:
                    self._detected(host, state, CONSECUTIVE_GATEWAY_FAILURE)
            else:
                state.consecutiveGatewayFailure = 0
            state.consecutive5xx += 1
            if state.consecutive5xx == self._threshold5xx:
                self._detected(host, state, CONSECUTIVE_5XX)
        else:
            state.success += 1
            state.consecutive5xx = 0
            state.consecutiveGatewayFailure = 0

    def onLocalFailure(self, host: "Host", kind: str) -> None:
        """
        A failure the proxy saw itself on C{host}: C{kind} is C{"connect"} (could not connect),
        C{"reset"} (the connection closed or broke mid-exchange) or C{"timeout"} (no answer in time).

        Unless errors are split, it counts as the 503 (connect, reset) or 504 (timeout) the proxy answers in
        its place; an unknown C{kind} counts as a connect failure.
        """
        if not self._split:
            self.onResponse(host, LOCAL_FAILURE_STATUS.get(kind, 503))
            return
        state = self._states.get(host)
        if state is None:
            return
        state.consecutiveLocalOriginFailure += 1
        if state.consecutiveLocalOriginFailure == self._thresholdLocal:
            self._detected(host, state, CONSECUTIVE_LOCAL_ORIGIN_FAILURE)

    def onConnectSuccess(self, host: "Host", final: bool = False) -> None:
        """
        A connection to C{host} was made (or an idle one handed out) for a request. With split errors it
        resets the local-origin counter.

        @param final: C{False} from the router (Envoy's C{LocalOriginConnectSuccess}): unless errors are
            split it means nothing, since the answer that follows will count. C{True} from C{tcp_proxy},
            where the connection is the whole outcome (Envoy's C{LocalOriginConnectSuccessFinal}): unless
            errors are split it counts as a 200.
        """
        if not self._split:
            if final:
                self.onResponse(host, 200)
            return
        state = self._states.get(host)
        if state is not None:
            state.consecutiveLocalOriginFailure = 0

    def onActiveHealthCheckPassed(self, host: "Host") -> None:
        """
        An active health check of C{host} passed: if outlier detection ejected it and active checking does
        not fail it, return it to service now (C{successful_active_health_check_uneject_host}).
        """
        if not self.config.successful_active_health_check_uneject_host:
            return
        state = self._states.get(host)
        if state is not None and state.ejected and "failed_active_hc" not in host.healthFlags:
            self._uneject(host, state, "an active health check passed")

    def hostsChanged(self, added, removed) -> None:
        """
        The cluster's membership changed (L{Cluster.updateHosts}): forget the removed hosts (an ejected one
        no longer counts as active) and watch the added ones. The caller rebuilds the load balancer.
        """
        states = self._states
        for host in removed:
            state = states.pop(host, None)
            if state is not None and state.ejected:
                self.ejections_active.value -= 1
        for host in added:
            states.setdefault(host, HostOutlierState())

    # -- inspection ---------------------------------------------------------------------------------------

    def stateOf(self, host: "Host") -> Optional[HostOutlierState]:
        """
        The detector's state of C{host} (for the admin page and tests), or C{None} for a foreign host.
        """
        return self._states.get(host)

    def ejectionDuration(self, state: HostOutlierState) -> float:
        """
        How long the current ejection of a host with C{state} lasts, jitter included, in seconds.
        """
        config = self.config
        return min(config.base_ejection_time * state.multiplier, config.max_ejection_time) + state.jitter

    # -- ejection -----------------------------------------------------------------------------------------

    def _detected(self, host: "Host", state: HostOutlierState, kind: str) -> None:
        """
        A consecutive counter reached its threshold: count the detection, try to eject, restart the counter
        (so that a long bout of errors is detected again, as in Envoy).
        """
        if state.ejected:
            return
        self.detected[kind].value += 1
        self._eject(host, state, kind)
        if kind == CONSECUTIVE_5XX:
            state.consecutive5xx = 0
        elif kind == CONSECUTIVE_GATEWAY_FAILURE:
            state.consecutiveGatewayFailure = 0
        else:
            state.consecutiveLocalOriginFailure = 0

    def _enforce(self, kind: str) -> bool:
        """
        Roll the C{enforcing_<kind>} percentage. 0 and 100 draw nothing, so that the defaults leave the
        injected random's sequence (which the load balancer shares) alone.
        """
        percent = self._enforcing[kind]
        if percent >= 100:
            return True
        if percent <= 0:
            return False
        return self.random.randrange(100) < percent

    def _eject(self, host: "Host", state: HostOutlierState, kind: str) -> None:
        """
        Eject C{host} for a detection of C{kind}, unless C{max_ejection_percent} forbids it (overflow) or
        the enforcing roll says no.
        """
        config = self.config
        active = self.ejections_active.value
        allowed = 100.0 * (active + 1) / len(self._states) <= config.max_ejection_percent
        if not allowed and not (config.always_eject_one_host and active == 0):
            self.ejections_overflow.value += 1
            return
        if kind == CONSECUTIVE_5XX or kind == SUCCESS_RATE:
            # Envoy's deprecated ejections_total counts only these two kinds, enforced or not.
            self.ejections_total.value += 1
        if not self._enforce(kind):
            return
        self.ejections_active.value += 1
        self.ejections_enforced_total.value += 1
        self.enforced[kind].value += 1
        state.ejected = True
        state.ejectedAt = self.clock.seconds()
        state.ejections += 1
        jitterMs = int(config.max_ejection_time_jitter * 1000)
        # Envoy draws whole milliseconds, 0 to the maximum inclusive; nothing drawn without jitter.
        state.jitter = self.random.randint(0, jitterMs) / 1000.0 if jitterMs > 0 else 0.0
        base = config.base_ejection_time
        if state.multiplier * base < config.max_ejection_time + base:
            state.multiplier += 1
        duration = self.ejectionDuration(state)
        self._setFlag(host, True, f"ejected by outlier detection ({kind}) for {duration:g}s")

    def _uneject(self, host: "Host", state: HostOutlierState, why: str) -> None:
        """
        Return C{host} to service.
        """
        state.ejected = False
        state.unejectedAt = self.clock.seconds()
        state.resetConsecutive()
        self.ejections_active.value -= 1
        # Say so only when nothing else keeps the host out; otherwise that reason stays the one shown.
        reason = f"returned to service by outlier detection: {why}" if host.healthFlags == {FLAG} else ""
        self._setFlag(host, False, reason)

    def _setFlag(self, host: "Host", on: bool, reason: str) -> None:
        """
        Set or clear this detector's flag on C{host}; tell the cluster when the host's health changed
        (at the end of the sweep, during one).
        """
        if host.setHealthFlag(FLAG, on, reason=reason):
            if self._sweeping:
                self._healthDirty = True
            else:
                self.cluster.healthChanged()

    # -- the interval sweep -------------------------------------------------------------------------------

    def _sweep(self) -> None:
        """
        Every C{interval}: return hosts whose ejection ran out, run success-rate detection over the interval
        just ended, lower the multiplier of hosts back in service for an interval, then re-arm.
        """
        self._timer = None
        self._sweeping = True
        try:
            now = self.clock.seconds()
            volumes: List[Tuple["Host", HostOutlierState, int, int]] = []
            for host, state in self._states.items():
                if state.ejected and now - state.ejectedAt >= self.ejectionDuration(state):
                    self._uneject(host, state, "its ejection time passed")
                # The interval's counts are judged once and start again (Envoy swaps its buckets).
                volumes.append((host, state, state.total, state.success))
                state.total = state.success = 0
                state.successRate = -1.0
            self._successRate(volumes)
            interval = self.config.interval
            for state in self._states.values():
                if (not state.ejected and state.multiplier and state.unejectedAt is not None
                        and now - state.unejectedAt >= interval):
                    state.multiplier -= 1
        finally:
            self._sweeping = False
            # Re-armed whatever happened: one failed sweep must not end detection for good.
            self.start()
            if self._healthDirty:
                self._healthDirty = False
                self.cluster.healthChanged()

    def _successRate(self, volumes: List[Tuple["Host", HostOutlierState, int, int]]) -> None:
        """
        Success-rate detection over the interval's C{(host, state, total, success)} counts.
        """
        config = self.config
        self.successRateAverage = self.successRateEjectionThreshold = -1.0
        minimum = config.success_rate_minimum_hosts
        volume = config.success_rate_request_volume
        valid = []
        for host, state, total, success in volumes:
            if not state.ejected and total and total >= volume:
                rate = 100.0 * success / total
                state.successRate = rate
                valid.append((host, state, rate))
        if not valid or len(valid) < minimum:
            return
        mean = sum(rate for _, _, rate in valid) / len(valid)
        stdev = math.sqrt(sum((rate - mean) ** 2 for _, _, rate in valid) / len(valid))
        threshold = mean - config.success_rate_stdev_factor / 1000.0 * stdev
        self.successRateAverage = mean
        self.successRateEjectionThreshold = threshold
        for host, state, rate in valid:
            if rate < threshold:
                self.detected[SUCCESS_RATE].value += 1
                self._eject(host, state, SUCCESS_RATE)


__all__ = ["OutlierDetector", "HostOutlierState", "FLAG", "KINDS", "LOCAL_FAILURE_STATUS"]
