"""
Active health checking (Envoy's): every host of a cluster is probed on a timer, and its C{healthy} flag
follows the results, so that the load balancer stops picking a host that fails and picks it again once it
recovers. See docs/health-checking.md.

One L{HealthChecker} per cluster holds one L{HostHealthChecker} per host. Each check is a fresh connection
made with the host's own client endpoint (C{host.client.connect}), so a TLS host is checked over TLS with
the cluster's certificates, and a check never takes or leaves a connection in the request pool: a pooled
connection would let a check pass on a connection the host has long stopped accepting new ones like, and
a check stuck behind a slow request would time out for the wrong reason.

  - B{HTTP} checks send C{GET <path> HTTP/1.1} with C{host}, C{user-agent: twistedmesh-health-check} and
    C{connection: close} (the connection is used once, so the host may close it at once) and pass when
    the response's status is one of C{expected_statuses}. The verdict is taken from the response head;
    the body is never read.
  - B{TCP} checks connect (and, for a TLS host, complete the handshake), write C{send} if configured, and
    pass when C{receive} appears in what the host sends (or at once when no C{receive} is configured).

A check that takes longer than C{timeout} (connecting included) fails: the connection attempt is
cancelled, or the connection aborted. Everything is timed on the injected clock and every random draw
comes from the injected L{random.Random}, so tests are exact.

Health (Envoy's rules): when the checker starts every host is unhealthy, flagged C{failed_active_hc} and
C{pending_active_hc}, until its first check; the first check that passes makes it healthy at once. After
that, C{unhealthy_threshold} consecutive failures make a healthy host unhealthy and C{healthy_threshold}
consecutive passes make an unhealthy host healthy. A response carrying
C{x-envoy-immediate-health-check-fail} (another proxy's C{health_check} filter, failed by its admin) makes
the host unhealthy at once.

The checker owns the host's C{failed_active_hc} and C{pending_active_hc} flags and sets them through
L{Host.setHealthFlag}, so that it never undoes another owner's verdict (outlier detection's
C{failed_outlier_check}): a host is healthy only when no flag is left. When C{host.healthy} changes the
checker calls C{cluster.healthChanged()}, which rebuilds the load balancer. C{host.healthReason} is set on
every change of the checker's flags and, while no other owner's flag is set, after every check too, so
that C{/clusters} shows how close a host is to changing.
"""

from __future__ import annotations

from random import Random
from typing import TYPE_CHECKING, Callable, Dict, Optional

from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IHandshakeListener, INegotiated, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..config.health import HealthConfig
from ..http import h1

if TYPE_CHECKING:
    from .cluster import Cluster, Host

__all__ = [
    "HealthChecker", "HostHealthChecker", "FAILED_ACTIVE_HC", "PENDING_ACTIVE_HC", "USER_AGENT",
    "IMMEDIATE_FAIL_HEADER",
]

#: The health flag (Envoy's name, as C{/clusters} shows it) of a host that active health checking failed.
FAILED_ACTIVE_HC = "failed_active_hc"
#: The health flag of a host not yet checked since the checker started.
PENDING_ACTIVE_HC = "pending_active_hc"
#: The C{user-agent} of HTTP checks, so that hosts can tell checks from traffic (in their logs, say).
USER_AGENT = b"twistedmesh-health-check"
#: A response header that fails the host at once, whatever the thresholds (set by Envoy's, and our,
#: C{health_check} filter when that proxy is failed or draining).
IMMEDIATE_FAIL_HEADER = b"x-envoy-immediate-health-check-fail"
_PENDING_REASON = "pending first health check"
_PASSED_REASON = "healthy: last check passed"
_FAILED_PREFIX = "failed active health check: "
_OWN_FLAGS = frozenset((FAILED_ACTIVE_HC, PENDING_ACTIVE_HC))


class _Attempt:
    """
    One check of one host in flight: the connection attempt (or connection) and the timeout timer.
    Exactly one of L{succeed}, L{fail} or L{cancel} ends it; later calls (a close after the verdict, the
    errback of a cancelled connection attempt) are ignored.

    @ivar done: the verdict is in (or the attempt was cancelled).
    @ivar connecting: the endpoint's connection Deferred, once C{connect} returned.
    @ivar transport: the connection's transport, once connected.
    @ivar timer: the timeout's delayed call, while pending.
    """

    __slots__ = ("report", "done", "connecting", "transport", "timer")

    def __init__(self, report: Callable[[bool, str, bool, bool], None]) -> None:
        self.report = report
        self.done = False
        self.connecting: Optional[defer.Deferred] = None
        self.transport = None
        self.timer = None

    def succeed(self) -> None:
        """
        The check passed: close the connection (letting what was written go out) and report.
        """
        if self._end(abort=False):
            self.report(True, "", False, False)

    def fail(self, reason: str, network: bool = False, immediate: bool = False) -> None:
        """
        The check failed for C{reason}: close the connection (or cancel the attempt) and report.
        C{network} says the host gave no usable answer (refused, reset, timed out, not HTTP): then the
        connection is aborted, since nothing on it is worth waiting for; a host that answered (a 503) gets
        a clean close. C{immediate} says the host asked to be failed at once.
        """
        if self._end(abort=network):
            self.report(False, reason, network, immediate)

    def cancel(self) -> None:
        """
        Abandon the check without a verdict (the checker stopped).
        """
        self._end(abort=True)

    def timedOut(self) -> None:
        """
        The timeout fired before a verdict.
        """
        self.timer = None
        self.fail("timeout", network=True)

    def _end(self, abort: bool) -> bool:
        """
        Tear down what is open, once; C{False} if the attempt had already ended.
        """
        if self.done:
            return False
        self.done = True
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()
        transport = self.transport
        if transport is not None:
            if abort:
                transport.abortConnection()
            else:
                transport.loseConnection()
        elif self.connecting is not None and not self.connecting.called:
            # Not connected yet: cancelling the endpoint's Deferred stops the attempt (its errback then
            # finds the attempt done and says nothing).
            self.connecting.cancel()
        return True


@implementer(IHandshakeListener)
class _HTTPCheck(protocol.Protocol):
    """
    An HTTP check on one connection: writes the request once connected and takes the verdict from the
    response head (an L{h1.ResponseHandler}).
    """

    def __init__(self, attempt: _Attempt, request: bytes, config: HealthConfig) -> None:
        self.attempt = attempt
        self.request = request
        self.config = config
        self.parser: Optional[h1.ResponseParser] = None
        self.handshaken = False

    def connectionMade(self) -> None:
        """
        Send the request (the parser expects the response to a C{GET}).
        """
        self.attempt.transport = self.transport
        self.parser = h1.ResponseParser(self)
        self.parser.expectResponse(b"GET")
        self.transport.write(self.request)

    def handshakeCompleted(self) -> None:
        """
        The TLS handshake is done (only for a TLS host): a close from now on is no handshake failure.
        """
        self.handshaken = True

    def dataReceived(self, data: bytes) -> None:
        """
        Parse the response, until the verdict.
        """
        if not self.attempt.done:
            self.parser.feed(data)

    def responseInformational(self, status: int, headers: h1.Headers) -> None:
        """
        A 1xx before the final response: wait on.
        """

    def responseHead(self, status: int, reason: bytes, version: bytes, headers: h1.Headers, keepAlive: bool,
                     hasBody: bool, chunked: bool) -> None:
        """
        The verdict: the immediate-fail header, else the status.
        """
        if any(name == IMMEDIATE_FAIL_HEADER for name, _ in headers):
            self.attempt.fail(f"immediate health check fail (status {status})", immediate=True)
        elif self.config.statusPasses(status):
            self.attempt.succeed()
        else:
            self.attempt.fail(f"status {status}")

    def responseData(self, data: bytes) -> None:
        """
        The body is not looked at.
        """

    def responseEnd(self, trailers: Optional[h1.Headers]) -> None:
        """
        Nothing to do: the verdict was taken at the head.
        """

    def protocolError(self, reason: str) -> None:
        """
        The host did not speak HTTP/1.1.
        """
        self.attempt.fail(f"protocol error: {reason}", network=True)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        """
        Before the verdict the host hung up on the check (or the TLS handshake failed); after it, this is
        our own close (ignored).
        """
        if INegotiated.providedBy(self.transport) and not self.handshaken:
            self.attempt.fail("TLS handshake failed", network=True)
        else:
            self.attempt.fail("connection closed before a response", network=True)


@implementer(IHandshakeListener)
class _TCPCheck(protocol.Protocol):
    """
    A TCP check on one connection: writes C{send}, then waits for C{receive} to appear in the bytes read.
    Only the last C{len(receive) - 1} bytes are kept between reads, so a host that talks a lot costs no
    memory.
    """

    def __init__(self, attempt: _Attempt, config: HealthConfig) -> None:
        self.attempt = attempt
        self.send = config.send
        self.receive = config.receive
        self.tail = b""
        self.handshaken = False

    def connectionMade(self) -> None:
        """
        Write C{send}; pass a connect-only check over plain TCP at once.
        """
        self.attempt.transport = self.transport
        if self.send:
            self.transport.write(self.send)  # a TLS transport holds it until the handshake is done
        # A TLS host passes a connect-only check once the handshake is done (handshakeCompleted), as in
        # Envoy, whose connect event for TLS comes after it: a host that accepts TCP but cannot do TLS is
        # no use to the cluster.
        if self.receive is None and not INegotiated.providedBy(self.transport):
            self.attempt.succeed()

    def handshakeCompleted(self) -> None:
        """
        The TLS handshake is done: a connect-only check passes.
        """
        self.handshaken = True
        if self.receive is None:
            self.attempt.succeed()

    def dataReceived(self, data: bytes) -> None:
        """
        Look for C{receive} in what was read, across reads.
        """
        if self.attempt.done or self.receive is None:
            return
        buffered = self.tail + data if self.tail else data
        receive = self.receive
        if receive in buffered:
            self.attempt.succeed()
            return
        keep = len(receive) - 1
        self.tail = buffered[-keep:] if keep else b""

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        """
        Before the verdict: the host hung up (during the TLS handshake, or before sending C{receive}).
        """
        if INegotiated.providedBy(self.transport) and not self.handshaken:
            self.attempt.fail("TLS handshake failed", network=True)
        else:
            self.attempt.fail("connection closed before the expected bytes", network=True)


class _CheckFactory(protocol.Factory):
    """
    Builds the one protocol of one check (endpoints want a factory).
    """

    noisy = False  # a "Starting factory" log line per check would drown the log

    def __init__(self, build: Callable[[], protocol.Protocol]) -> None:
        self.build = build

    def buildProtocol(self, addr) -> protocol.Protocol:
        """
        The check's protocol.
        """
        return self.build()


def _connectReason(failure: Failure) -> str:
    """
    A short, stable description of why a connection attempt failed, for C{healthReason}.
    """
    if failure.check(error.ConnectionRefusedError):
        return "connection refused"
    if failure.check(error.TimeoutError):
        return "connect timeout"
    if failure.check(error.DNSLookupError):
        return "DNS lookup failed"
    if failure.check(error.NoRouteError):
        return "no route to host"
    return f"connection failed: {failure.getErrorMessage()}"


def _hostLabel(endpoint: str) -> str:
    """
    The first three fields of an endpoint string (C{tls:host=a:port=443}) for log lines: enough to name
    the host, without the certificate and key parameters the admin pages take care to redact.
    """
    fields = []
    field = []
    escaped = False
    for c in endpoint:
        if escaped:
            field.append(c)
            escaped = False
        elif c == "\\":
            field.append(c)
            escaped = True
        elif c == ":":
            fields.append("".join(field))
            field = []
            if len(fields) == 3:
                return ":".join(fields)
        else:
            field.append(c)
    fields.append("".join(field))
    return ":".join(fields[:3])


class HostHealthChecker:
    """
    The checks of one host: its timer, its check in flight and its run of consecutive results.

    @ivar host: the L{Host}.
    @ivar successes: consecutive passing checks (0 after a failure).
    @ivar failures: consecutive failing checks (0 after a pass).
    @ivar firstCheck: no check has ended since the checker started.
    @ivar timer: the delayed call of the next check, while one is scheduled.
    @ivar attempt: the check in flight, or C{None}.
    @ivar lastTraffic: the cluster's traffic count (see L{HealthChecker.traffic}) when this host's last
        check ended (or the checker started).
    """

    def __init__(self, parent: "HealthChecker", host: "Host") -> None:
        self.parent = parent
        self.host = host
        self.successes = 0
        self.failures = 0
        self.firstCheck = True
        self.timer = None
        self.attempt: Optional[_Attempt] = None
        self.lastTraffic = parent.traffic()

    def schedule(self, delay: float) -> None:
        """
        Check again in C{delay} seconds.
        """
        self.timer = self.parent.clock.callLater(delay, self.check)

    def stop(self) -> None:
        """
        Cancel the next check and abandon the one in flight.
        """
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()
        attempt, self.attempt = self.attempt, None
        if attempt is not None:
            attempt.cancel()

    def check(self) -> None:
        """
        Start one check now.
        """
        self.timer = None
        parent = self.parent
        config = parent.config
        attempt = _Attempt(lambda ok, reason, network, immediate: self._ended(attempt, ok, reason, network,
                                                                               immediate))
        self.attempt = attempt
        parent.attempt.value += 1
        attempt.timer = parent.clock.callLater(config.timeout, attempt.timedOut)
        if config.type == "http":
            factory = _CheckFactory(lambda: _HTTPCheck(attempt, parent.request, config))
        else:
            factory = _CheckFactory(lambda: _TCPCheck(attempt, config))

        def connectFailed(failure: Failure) -> None:
            """
            The connection could not be made; after a verdict this is the errback of our own cancel, and
            there is nothing to report.
            """
            if not attempt.done:
                attempt.fail(_connectReason(failure), network=True)

        # maybeDeferred: an endpoint that raises instead of returning a failed Deferred is a failed check too.
        d = defer.maybeDeferred(self.host.client.connect, factory)
        if not attempt.done:
            attempt.connecting = d
        # Once connected the protocol reports by itself: only a failure to connect needs handling here.
        d.addErrback(connectFailed)
        d.addErrback(self._bug)

    def _bug(self, failure: Failure) -> None:
        """
        Log an unexpected error in the check's own callbacks (never a failed check: those are verdicts).
        """
        self.parent.log.failure("health check of {host} failed unexpectedly", failure,
                                host=_hostLabel(self.host.endpoint))

    def _ended(self, attempt: _Attempt, ok: bool, reason: str, network: bool, immediate: bool) -> None:
        """
        A check ended: count it, apply the thresholds, schedule the next one.
        """
        if attempt is not self.attempt:
            return
        self.attempt = None
        try:
            self._judge(ok, reason, network, immediate)
        finally:
            # Scheduled whatever happened: one failing callback must not end checking of the host for good.
            if self.parent.running:
                self.schedule(self.nextDelay())

    def _judge(self, ok: bool, reason: str, network: bool, immediate: bool) -> None:
        """
        Count a check's verdict and apply the thresholds to the host's health.
        """
        parent = self.parent
        config = parent.config
        host = self.host
        failed = FAILED_ACTIVE_HC in host.healthFlags
        first, self.firstCheck = self.firstCheck, False
        progress = None  # a new healthReason when the verdict does not change the flag
        if ok:
            parent.success.value += 1
            self.failures = 0
            self.successes += 1
            if not failed:
                progress = _PASSED_REASON
            elif first or self.successes >= config.healthy_threshold:
                # Envoy's rule: a host's very first passing check makes it healthy at once, so that a
                # cluster starting up need not wait healthy_threshold intervals for its first host.
                parent.setFailed(host, False, _PASSED_REASON)
            else:
                progress = (f"{_FAILED_PREFIX}last check passed, {self.successes} of "
                            f"{config.healthy_threshold} passing checks to become healthy")
        else:
            parent.failure.value += 1
            if network:
                parent.network_failure.value += 1
            self.successes = 0
            self.failures += 1
            if failed:
                if first:
                    # A failed first check leaves the host unhealthy but no longer pending.
                    host.setHealthFlag(PENDING_ACTIVE_HC, False)
                    parent.log.info("cluster {cluster}: host {host} failed its first health check ({reason})",
                                    cluster=parent.cluster.name, host=_hostLabel(host.endpoint), reason=reason)
                progress = _FAILED_PREFIX + reason
            elif immediate or self.failures >= config.unhealthy_threshold:
                parent.setFailed(host, True, _FAILED_PREFIX + reason)
            else:
                progress = (f"healthy: last check failed ({reason}), {self.failures} of "
                            f"{config.unhealthy_threshold} failing checks to become unhealthy")
        if progress is not None and host.healthFlags <= _OWN_FLAGS:
            # While another owner (outlier detection) keeps the host out, its reason is the one to show.
            host.healthReason = progress
        outlier = getattr(parent.cluster, "outlier", None)
        if ok and outlier is not None:
            outlier.onActiveHealthCheckPassed(host)

    def nextDelay(self) -> float:
        """
        The wait before the next check (Envoy's choice of interval, plus jitter): C{unhealthy_interval}
        while the host is unhealthy; while it is healthy, C{no_traffic_interval} if the cluster carried no
        traffic since this host's last check, else C{interval}. Then C{interval_jitter_percent} of that
        and C{interval_jitter}, each scaled by a random draw, are added (a draw is made only for a jitter
        that is configured).
        """
        parent = self.parent
        config = parent.config
        traffic = parent.traffic()
        if FAILED_ACTIVE_HC in self.host.healthFlags:
            # An unhealthy host gets no traffic by construction, so "no traffic" says nothing about it;
            # and noticing its recovery soon matters more than saving a check.
            base = config.unhealthy_interval
        elif traffic == self.lastTraffic:
            base = config.no_traffic_interval
        else:
            base = config.interval
        self.lastTraffic = traffic
        delay = base
        rand = parent.random.random
        if config.interval_jitter_percent:
            delay += rand() * base * config.interval_jitter_percent / 100.0
        if config.interval_jitter:
            delay += rand() * config.interval_jitter
        return delay


class HealthChecker:
    """
    Active health checking of one cluster's hosts (see the module docstring).

    Stats, under C{cluster.<name>.health_check.} (Envoy's names): C{attempt}, C{success}, C{failure}
    (every failed check, network failures included), C{network_failure} (no answer: refused, reset, timed
    out, not HTTP), and the gauge C{healthy} (hosts that active health checking does not fail).

    @ivar cluster: the L{Cluster}.
    @ivar config: the L{HealthConfig}.
    @ivar clock: the L{IReactorTime} every timer runs on.
    @ivar random: the L{random.Random} jitter is drawn from.
    @ivar checkers: the L{HostHealthChecker} of each host, while started.
    @ivar running: between L{start} and L{stop}.
    @ivar request: the HTTP check's request, encoded once.
    """

    log = Logger()

    def __init__(self, cluster: "Cluster", config: HealthConfig, clock: IReactorTime, random: Random) -> None:
        self.cluster = cluster
        self.config = config
        self.clock = clock
        self.random = random
        self.running = False
        self.checkers: Dict["Host", HostHealthChecker] = {}
        scope = cluster.stats.scope("health_check")
        self.attempt = scope.counter("attempt")
        self.success = scope.counter("success")
        self.failure = scope.counter("failure")
        self.network_failure = scope.counter("network_failure")
        self.healthy = scope.gauge("healthy")
        headers = [
            (b"host", config.host.encode("ascii")),
            (b"user-agent", USER_AGENT),
            # One check, one connection: tell the host so that it can close at once.
            (b"connection", b"close"),
        ]
        path = (config.path or "/").encode("ascii")
        self.request = h1.encodeRequestHead(b"GET", path, headers)

    def traffic(self) -> int:
        """
        A count that grows with the cluster's traffic (requests and connections the proxy sent it; health
        checks do not count), to tell whether the cluster carried traffic between two checks.
        """
        cluster = self.cluster
        return cluster.upstream_rq_total.value + cluster.upstream_cx_total.value

    def start(self) -> None:
        """
        Mark every host unhealthy, pending its first check, and schedule each host's first check: at once,
        or a random time up to C{initial_jitter} later (drawn per host, in host order).
        """
        if self.running:
            return
        self.running = True
        cluster = self.cluster
        for host in cluster.hosts:
            host.setHealthFlag(FAILED_ACTIVE_HC, True)
            host.setHealthFlag(PENDING_ACTIVE_HC, True, reason=_PENDING_REASON)
        self._updateGauge()
        cluster.healthChanged()
        self.checkers = {host: HostHealthChecker(self, host) for host in cluster.hosts}
        jitter = self.config.initial_jitter
        for checker in self.checkers.values():
            checker.schedule(self.random.random() * jitter if jitter else 0.0)

    def stop(self) -> None:
        """
        Cancel every scheduled check and abandon those in flight. Hosts keep their health.
        """
        self.running = False
        for checker in self.checkers.values():
            checker.stop()

    def hostsChanged(self, added, removed) -> None:
        """
        The cluster's membership changed (L{Cluster.updateHosts}): a removed host's checks stop; an added
        host starts as Envoy's do, unhealthy and pending its first check, which runs at once (or up to
        C{initial_jitter} later) when checking is running. The caller rebuilds the load balancer.
        """
        for host in removed:
            checker = self.checkers.pop(host, None)
            if checker is not None:
                checker.stop()
        jitter = self.config.initial_jitter
        for host in added:
            host.setHealthFlag(FAILED_ACTIVE_HC, True)
            host.setHealthFlag(PENDING_ACTIVE_HC, True, reason=_PENDING_REASON)
            if self.running:
                checker = self.checkers[host] = HostHealthChecker(self, host)
                checker.schedule(self.random.random() * jitter if jitter else 0.0)
        self._updateGauge()

    def setFailed(self, host: "Host", failed: bool, reason: str) -> None:
        """
        Set or clear C{host}'s C{failed_active_hc} flag (clearing C{pending_active_hc}) with C{reason}, and
        tell the cluster if C{host.healthy} changed (another owner's flag may keep the host out anyway).
        """
        before = host.healthy
        host.setHealthFlag(PENDING_ACTIVE_HC, False)
        # The reason is written only when this flag decides the host's health: while outlier detection
        # keeps the host out, its reason stays the one shown.
        others = host.healthFlags - _OWN_FLAGS
        host.setHealthFlag(FAILED_ACTIVE_HC, failed, reason="" if others else reason)
        self.log.info("cluster {cluster}: host {host} {state} active health checking ({reason})",
                      cluster=self.cluster.name, host=_hostLabel(host.endpoint),
                      state="failed" if failed else "passed", reason=reason)
        self._updateGauge()
        if host.healthy != before:
            self.cluster.healthChanged()

    def _updateGauge(self) -> None:
        """
        Set the C{healthy} gauge: the hosts active health checking does not fail.
        """
        self.healthy.value = sum(1 for h in self.cluster.hosts if FAILED_ACTIVE_HC not in h.healthFlags)
