"""
Tests for active health checking (L{twistedmesh.upstream.health}, L{twistedmesh.config.health}) and the
C{health_check} HTTP filter (L{twistedmesh.filters.health_check}).

Unit tests run checks against fake client endpoints whose connection Deferreds the test fires, with
protocols on L{StringTransport}s and timers on a L{Clock}; one integration test checks a real
C{twisted.web} origin on loopback with the real reactor.
"""

from __future__ import annotations

import configparser
import dataclasses
import os
from random import Random
from typing import Dict, List, Optional

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import INegotiated
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.plugin import getPlugins
from twisted.protocols.policies import WrappingFactory
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from twistedmesh.config import ClusterConfig, ConfigError, HostConfig, ListenerConfig, Options, loadFile
from twistedmesh.config.health import HealthConfig, parseHealth, parsePayload, parseStatuses
from twistedmesh.filters.health_check import HealthCheckFactory, HealthState, ServerHealthState
from twistedmesh.interfaces import IHTTPFilterFactory
from twistedmesh.observability.stats import StatsStore
from twistedmesh.plugins import FilterContext
from twistedmesh.testing import FilterHarness
from twistedmesh.upstream.cluster import Cluster
from twistedmesh.upstream.health import (
    FAILED_ACTIVE_HC, PENDING_ACTIVE_HC, HealthChecker, _hostLabel,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "etc", "examples", "health.ini")
ADDRESS = IPv4Address("TCP", "127.0.0.1", 9001)
OK = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"


def response(status: int, extra: bytes = b"") -> bytes:
    """
    A bodiless HTTP/1.1 response with C{status} and the header lines C{extra}.
    """
    return b"HTTP/1.1 %d X\r\ncontent-length: 0\r\n%s\r\n" % (status, extra)


def parse(items: Dict[str, str], section: str = "cluster:api") -> "tuple[Optional[HealthConfig], List]":
    """
    C{items} read by L{parseHealth}, and the errors as C{(key, why)} pairs (unknown keys included).
    """
    errors: List[ConfigError] = []
    o = Options("t.ini", section, items, errors)
    config = parseHealth(o)
    o.finish()
    return config, [(e.key, e.why) for e in errors]


@implementer(INegotiated)
class TLSStringTransport(StringTransport):
    """
    A L{StringTransport} that looks like a TLS transport (it provides L{INegotiated}).
    """

    negotiatedProtocol = None


class PendingConnection:
    """
    One connection attempt made through a L{FakeEndpoint}: the test accepts or refuses it.
    """

    def __init__(self, factory) -> None:
        self.factory = factory
        self.cancelled = False
        self.deferred: defer.Deferred = defer.Deferred(self._cancel)
        self.protocol = None
        self.transport: Optional[StringTransport] = None

    def _cancel(self, d: defer.Deferred) -> None:
        """
        Record the cancellation (the Deferred then errbacks with CancelledError by itself).
        """
        self.cancelled = True

    def accept(self, transport: Optional[StringTransport] = None):
        """
        Connect: build the protocol on a memory transport, as an endpoint would, then fire the Deferred.
        """
        self.transport = transport if transport is not None else StringTransport()
        self.protocol = self.factory.buildProtocol(ADDRESS)
        self.protocol.makeConnection(self.transport)
        self.deferred.callback(self.protocol)
        return self.protocol

    def refuse(self) -> None:
        """
        Fail the attempt as a closed port would.
        """
        self.deferred.errback(ConnectionRefusedError())


class FakeEndpoint:
    """
    A client endpoint whose connection attempts wait for the test (see L{PendingConnection}).
    """

    def __init__(self) -> None:
        self.attempts: List[PendingConnection] = []

    def connect(self, factory) -> defer.Deferred:
        """
        Record an attempt; its Deferred fires when the test accepts or refuses it.
        """
        pending = PendingConnection(factory)
        self.attempts.append(pending)
        return pending.deferred

    @property
    def last(self) -> PendingConnection:
        """
        The latest attempt.
        """
        return self.attempts[-1]


class Checked:
    """
    A cluster of C{hosts} fake hosts with a L{HealthChecker} on a L{Clock}, counting C{healthChanged} calls.
    """

    def __init__(self, items: Optional[Dict[str, str]] = None, hosts: int = 1, seed: int = 0) -> None:
        self.clock = Clock()
        self.stats = StatsStore()
        config = ClusterConfig("api", tuple(HostConfig(f"tcp:127.0.0.1:{9001 + i}") for i in range(hosts)))
        self.cluster = Cluster(config, self.clock, self.stats)
        self.endpoints = [FakeEndpoint() for _ in range(hosts)]
        for host, endpoint in zip(self.cluster.hosts, self.endpoints):
            host.client = endpoint
        self.changes = 0
        original = self.cluster.healthChanged

        def healthChanged() -> None:
            self.changes += 1
            original()

        self.cluster.healthChanged = healthChanged
        self.config, errors = parse(items if items is not None else {"health.path": "/healthz"})
        assert errors == [], errors
        self.checker = HealthChecker(self.cluster, self.config, self.clock, Random(seed))

    @property
    def host(self):
        """
        The first host.
        """
        return self.cluster.hosts[0]

    def stat(self, name: str) -> int:
        """
        The value of C{cluster.api.<name>}.
        """
        stat = self.stats.get("cluster.api." + name)
        assert stat is not None, name
        return stat.value

    def start(self) -> None:
        """
        Start the checker and run the first checks (no initial jitter: they are due at once).
        """
        self.checker.start()
        self.clock.advance(0)

    def answer(self, data: bytes, host: int = 0) -> PendingConnection:
        """
        Accept the host's pending check and have the host send C{data}.
        """
        pending = self.endpoints[host].last
        pending.accept()
        pending.protocol.dataReceived(data)
        return pending

    def next(self, host: int = 0) -> None:
        """
        Move the clock to the host's next scheduled check.
        """
        checker = self.checker.checkers[self.cluster.hosts[host]]
        self.clock.advance(checker.timer.getTime() - self.clock.seconds())

    def traffic(self) -> None:
        """
        Count a request to the cluster, as the router does.
        """
        self.cluster.upstream_rq_total.value += 1

    def checks(self, statuses: List[int], host: int = 0) -> None:
        """
        Answer a check with each status in turn, moving the clock to the next check whenever the latest one
        is over.
        """
        for status in statuses:
            if self.endpoints[host].last.deferred.called:
                self.next(host)
            self.answer(response(status), host)


class ConfigTests(unittest.TestCase):
    """
    L{parseHealth} reads the C{health.*} keys of a cluster section.
    """

    def test_noHealthKeys(self):
        """
        A cluster without C{health.*} keys has no health checking.
        """
        errors: List[ConfigError] = []
        self.assertIsNone(parseHealth(Options("t.ini", "cluster:api", {"endpoints": "tcp:127.0.0.1:1"}, errors)))
        self.assertEqual(errors, [])

    def test_defaults(self):
        """
        C{health.path} alone gives an HTTP check with Envoy's defaults and the cluster's name as Host.
        """
        config, errors = parse({"health.path": "/healthz"})
        self.assertEqual(errors, [])
        self.assertEqual(config, HealthConfig(type="http", path="/healthz", host="api"))
        self.assertEqual(
            (config.interval, config.timeout, config.healthy_threshold, config.unhealthy_threshold,
             config.unhealthy_interval, config.no_traffic_interval, config.expected_statuses),
            (5.0, 1.0, 2, 3, 5.0, 60.0, ((200, 200),)),
        )

    def test_everyKey(self):
        """
        Every HTTP key is read (and marked known), durations and percentages included.
        """
        config, errors = parse({
            "health.type": "http", "health.path": "/ready?full=1", "health.host": "api.internal:8080",
            "health.expected_statuses": "200-299, 404", "health.interval": "10s", "health.timeout": "250ms",
            "health.healthy_threshold": "1", "health.unhealthy_threshold": "5", "health.interval_jitter": "1s",
            "health.interval_jitter_percent": "10%", "health.unhealthy_interval": "2s",
            "health.no_traffic_interval": "30s", "health.initial_jitter": "500ms",
        })
        self.assertEqual(errors, [])
        self.assertEqual(config, HealthConfig(
            type="http", path="/ready?full=1", host="api.internal:8080", expected_statuses=((200, 299), (404, 404)),
            interval=10.0, timeout=0.25, healthy_threshold=1, unhealthy_threshold=5, interval_jitter=1.0,
            interval_jitter_percent=10.0, unhealthy_interval=2.0, no_traffic_interval=30.0, initial_jitter=0.5,
        ))

    def test_unhealthyIntervalDefaultsToInterval(self):
        """
        Without C{health.unhealthy_interval}, an unhealthy host is checked every C{health.interval}.
        """
        config, _ = parse({"health.path": "/", "health.interval": "2s"})
        self.assertEqual(config.unhealthy_interval, 2.0)

    def test_tcp(self):
        """
        C{health.type = tcp} takes C{send} and C{receive} as hex or C{text:} payloads.
        """
        config, errors = parse({"health.type": "tcp", "health.send": "text:PING\\r\\n",
                                "health.receive": "2b 50 4f 4e 47"})
        self.assertEqual(errors, [])
        self.assertEqual((config.type, config.send, config.receive, config.path), ("tcp", b"PING\r\n", b"+PONG", None))

    def test_payloadEscapes(self):
        """
        C{text:} payloads are UTF-8 with C{\\xHH}, C{\\0} and C{\\\\} escapes; hex may have spaces.
        """
        self.assertEqual(parsePayload("text:é\\x00\\0\\\\\\t"), "é".encode() + b"\x00\x00\\\t")
        self.assertEqual(parsePayload("00 ff"), b"\x00\xff")
        for bad in ("zz", "text:", "text:\\q", "abc"):
            self.assertRaises(ValueError, parsePayload, bad)

    def test_statusRanges(self):
        """
        Expected statuses are inclusive ranges; a status passes when some range holds it.
        """
        config = HealthConfig(expected_statuses=parseStatuses("200-299, 404"))
        self.assertEqual([s for s in (199, 200, 204, 299, 300, 404, 503) if config.statusPasses(s)],
                         [200, 204, 299, 404])

    def test_typeRequired(self):
        """
        C{health.*} keys without C{health.path} or C{health.type} are an error, not a silent TCP check.
        """
        _, errors = parse({"health.interval": "1s"})
        self.assertEqual([k for k, _ in errors], ["health.type"])

    def test_httpNeedsPath(self):
        """
        C{health.type = http} needs C{health.path}.
        """
        _, errors = parse({"health.type": "http"})
        self.assertEqual([k for k, _ in errors], ["health.path"])

    def test_foreignKeys(self):
        """
        HTTP keys on a TCP check, and TCP keys on an HTTP check, are errors (they would do nothing).
        """
        _, errors = parse({"health.type": "tcp", "health.path": "/", "health.expected_statuses": "200"})
        self.assertEqual([k for k, _ in errors], ["health.path", "health.expected_statuses"])
        _, errors = parse({"health.path": "/", "health.send": "00"})
        self.assertEqual(errors, [("health.send", "applies only to health.type = tcp, not http")])

    def test_badValues(self):
        """
        Bad values are reported by key, every one of them.
        """
        _, errors = parse({
            "health.path": "healthz", "health.host": "a b", "health.expected_statuses": "200, 299-200",
            "health.timeout": "0s", "health.interval_jitter_percent": "150", "health.healthy_threshold": "0",
            "health.interval": "soon",
        })
        self.assertEqual(sorted(k for k, _ in errors), sorted([
            "health.path", "health.host", "health.expected_statuses", "health.timeout",
            "health.interval_jitter_percent", "health.healthy_threshold", "health.interval",
        ]))
        for bad in ("600", "abc", "", "20-30"):
            self.assertRaises(ValueError, parseStatuses, bad)

    def test_misspelledType(self):
        """
        A misspelled C{health.type} is one error, with a suggestion, not one per key.
        """
        _, errors = parse({"health.type": "tpc", "health.send": "00"})
        self.assertEqual([k for k, _ in errors], ["health.type"])
        self.assertIn("tcp", errors[0][1])


class CheckerStartTests(unittest.TestCase):
    """
    Starting and stopping a L{HealthChecker}.
    """

    def test_startMarksPending(self):
        """
        Started, every host is unhealthy and pending its first check, and the cluster is told.
        """
        c = Checked(hosts=2)
        c.checker.start()
        for host in c.cluster.hosts:
            self.assertEqual((host.healthy, host.healthReason, host.healthFlags),
                             (False, "pending first health check", {FAILED_ACTIVE_HC, PENDING_ACTIVE_HC}))
        self.assertEqual((c.changes, c.stat("membership_healthy"), c.stat("health_check.healthy")), (1, 0, 0))
        self.assertIsNone(c.cluster.pick())

    def test_firstChecksAtOnce(self):
        """
        Without C{initial_jitter} every host's first check is due at once.
        """
        c = Checked(hosts=3)
        c.checker.start()
        self.assertEqual([len(e.attempts) for e in c.endpoints], [0, 0, 0])
        c.clock.advance(0)
        self.assertEqual([len(e.attempts) for e in c.endpoints], [1, 1, 1])
        self.assertEqual(c.stat("health_check.attempt"), 3)

    def test_stop(self):
        """
        Stopping cancels the scheduled checks and abandons the one in flight, without a verdict.
        """
        c = Checked(hosts=2)
        c.start()
        c.answer(OK, host=1)
        pending = c.endpoints[0].last
        c.checker.stop()
        self.assertTrue(pending.cancelled)
        self.assertEqual(c.clock.getDelayedCalls(), [])
        self.assertEqual(c.stat("health_check.failure"), 0)
        c.clock.advance(1000)
        self.assertEqual([len(e.attempts) for e in c.endpoints], [1, 1])

    def test_stopAbortsConnection(self):
        """
        Stopping aborts a check whose connection is open.
        """
        c = Checked()
        c.start()
        c.endpoints[0].last.accept()
        c.checker.stop()
        self.assertTrue(c.endpoints[0].last.transport.disconnected)


class HTTPCheckTests(unittest.TestCase):
    """
    HTTP checks and the thresholds.
    """

    def test_request(self):
        """
        The check is a C{GET} of the path with Host, the health checker's user agent and C{connection: close}.
        """
        c = Checked({"health.path": "/healthz?deep=1", "health.host": "api.internal"})
        c.start()
        pending = c.endpoints[0].last
        pending.accept()
        self.assertEqual(pending.transport.value(), b"GET /healthz?deep=1 HTTP/1.1\r\nhost: api.internal\r\n"
                         b"user-agent: twistedmesh-health-check\r\nconnection: close\r\n\r\n")

    def test_firstSuccessMarksHealthy(self):
        """
        The first passing check makes a host healthy at once, whatever C{healthy_threshold}.
        """
        c = Checked({"health.path": "/", "health.healthy_threshold": "5"})
        c.start()
        pending = c.answer(OK)
        self.assertEqual((c.host.healthy, c.host.healthReason, c.host.healthFlags),
                         (True, "healthy: last check passed", set()))
        self.assertEqual((c.changes, c.stat("membership_healthy"), c.stat("health_check.healthy")), (2, 1, 1))
        self.assertIs(c.cluster.pick(), c.host)
        self.assertTrue(pending.transport.disconnecting)

    def test_unhealthyThreshold(self):
        """
        A healthy host turns unhealthy after C{unhealthy_threshold} consecutive failures, not before.
        """
        c = Checked()
        c.start()
        c.checks([200, 503, 503])
        self.assertTrue(c.host.healthy)
        self.assertEqual(c.host.healthReason,
                         "healthy: last check failed (status 503), 2 of 3 failing checks to become unhealthy")
        self.assertEqual(c.changes, 2)
        c.next()
        c.answer(response(503))
        self.assertEqual((c.host.healthy, c.host.healthReason, c.host.healthFlags),
                         (False, "failed active health check: status 503", {FAILED_ACTIVE_HC}))
        self.assertEqual((c.changes, c.stat("membership_healthy")), (3, 0))

    def test_healthyThreshold(self):
        """
        An unhealthy host turns healthy after C{healthy_threshold} consecutive passes, not before.
        """
        c = Checked({"health.path": "/", "health.unhealthy_threshold": "1"})
        c.start()
        c.checks([200, 500, 200])
        self.assertFalse(c.host.healthy)
        self.assertEqual(c.host.healthReason,
                         "failed active health check: last check passed, 1 of 2 passing checks to become healthy")
        c.next()
        c.answer(OK)
        self.assertTrue(c.host.healthy)
        self.assertEqual(c.changes, 4)

    def test_runsReset(self):
        """
        A pass resets the run of failures (and a failure the run of passes).
        """
        c = Checked()
        c.start()
        c.checks([200, 503, 503, 200, 503, 503])
        self.assertTrue(c.host.healthy)
        c.checker.checkers[c.host].successes = 0
        c.next()
        c.answer(response(503))
        self.assertFalse(c.host.healthy)
        c.checks([200, 200, 503, 200])  # healthy after the first two, then one failure, then a pass
        self.assertTrue(c.host.healthy)
        self.assertEqual(c.checker.checkers[c.host].failures, 0)

    def test_firstFailureNeedsThreshold(self):
        """
        A failed first check leaves the host unhealthy (no longer pending), needing C{healthy_threshold} passes.
        """
        c = Checked()
        c.start()
        c.answer(response(503))
        self.assertEqual((c.host.healthy, c.host.healthFlags), (False, {FAILED_ACTIVE_HC}))
        self.assertEqual(c.changes, 1)
        c.next()
        c.answer(OK)
        self.assertFalse(c.host.healthy)
        c.next()
        c.answer(OK)
        self.assertTrue(c.host.healthy)

    def test_expectedStatuses(self):
        """
        A status inside C{expected_statuses} passes and one outside fails.
        """
        c = Checked({"health.path": "/", "health.expected_statuses": "200-299, 404",
                     "health.unhealthy_threshold": "1"})
        c.start()
        c.checks([204])
        self.assertTrue(c.host.healthy)
        c.checks([404, 404])
        self.assertTrue(c.host.healthy)
        c.next()
        pending = c.answer(response(302))
        self.assertEqual(c.host.healthReason, "failed active health check: status 302")
        # A host that answered gets a clean close, not a reset.
        self.assertEqual((pending.transport.disconnecting, pending.transport.disconnected), (True, False))

    def test_immediateFail(self):
        """
        A response with C{x-envoy-immediate-health-check-fail} fails a healthy host at once.
        """
        c = Checked()
        c.start()
        c.answer(OK)
        c.next()
        c.answer(response(200, b"x-envoy-immediate-health-check-fail: true\r\n"))
        self.assertEqual((c.host.healthy, c.host.healthReason),
                         (False, "failed active health check: immediate health check fail (status 200)"))

    def test_timeoutConnecting(self):
        """
        A connection attempt still pending at C{timeout} is cancelled and the check fails as a timeout.
        """
        c = Checked({"health.path": "/", "health.timeout": "2s", "health.unhealthy_threshold": "1"})
        c.start()
        c.answer(OK)
        c.next()
        c.clock.advance(1.999)
        self.assertTrue(c.host.healthy)
        c.clock.advance(0.001)
        self.assertTrue(c.endpoints[0].last.cancelled)
        self.assertEqual((c.host.healthy, c.host.healthReason), (False, "failed active health check: timeout"))
        self.assertEqual((c.stat("health_check.failure"), c.stat("health_check.network_failure")), (1, 1))

    def test_timeoutConnected(self):
        """
        A host that accepts but does not answer within C{timeout} has its connection aborted.
        """
        c = Checked()
        c.start()
        pending = c.endpoints[0].last
        pending.accept()
        pending.protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")  # half a head
        c.clock.advance(1)
        self.assertTrue(pending.transport.disconnected)
        self.assertEqual(c.host.healthReason, "failed active health check: timeout")

    def test_connectionRefused(self):
        """
        A refused connection fails the check as a network failure, saying so.
        """
        c = Checked()
        c.start()
        c.endpoints[0].last.refuse()
        self.assertEqual(c.host.healthReason, "failed active health check: connection refused")
        self.assertEqual((c.stat("health_check.failure"), c.stat("health_check.network_failure")), (1, 1))

    def test_closedBeforeResponse(self):
        """
        A host that closes before answering fails the check as a network failure.
        """
        c = Checked()
        c.start()
        pending = c.endpoints[0].last
        pending.accept()
        pending.protocol.connectionLost(None)
        self.assertEqual(c.host.healthReason, "failed active health check: connection closed before a response")
        self.assertEqual(c.stat("health_check.network_failure"), 1)

    def test_notHTTP(self):
        """
        A host that does not speak HTTP/1.1 fails the check with the protocol error.
        """
        c = Checked()
        c.start()
        c.answer(b"SSH-2.0-OpenSSH\r\n")
        self.assertTrue(c.host.healthReason.startswith("failed active health check: protocol error: "))

    def test_stats(self):
        """
        C{attempt}, C{success}, C{failure} and C{network_failure} count checks by outcome.
        """
        c = Checked()
        c.start()
        c.checks([200, 503])
        c.next()
        c.endpoints[0].last.refuse()
        c.next()
        self.assertEqual([c.stat("health_check." + n) for n in ("attempt", "success", "failure", "network_failure")],
                         [4, 1, 2, 1])

    def test_lateVerdictIgnored(self):
        """
        Bytes or a close after the verdict change nothing (one verdict per check).
        """
        c = Checked()
        c.start()
        pending = c.answer(OK)
        pending.protocol.dataReceived(b"garbage")
        pending.protocol.connectionLost(None)
        self.assertEqual((c.stat("health_check.success"), c.stat("health_check.failure")), (1, 0))

    def test_otherOwnersFlag(self):
        """
        A host another owner keeps out (outlier detection) stays out when its checks pass, with that reason.
        """
        c = Checked()
        c.start()
        c.host.setHealthFlag("failed_outlier_check", True, reason="ejected by outlier detection")
        changes = c.changes
        c.answer(OK)
        self.assertEqual((c.host.healthy, c.host.healthFlags, c.host.healthReason),
                         (False, {"failed_outlier_check"}, "ejected by outlier detection"))
        self.assertEqual((c.changes, c.stat("health_check.healthy")), (changes, 1))
        c.next()
        c.answer(OK)
        self.assertEqual(c.host.healthReason, "ejected by outlier detection")
        c.host.setHealthFlag("failed_outlier_check", False)
        c.next()
        c.answer(OK)
        self.assertEqual(c.host.healthReason, "healthy: last check passed")

    def test_loadBalancerSkipsFailedHost(self):
        """
        Once a host fails, the load balancer stops picking it; once it recovers, picks it again.
        """
        c = Checked({"health.path": "/", "health.unhealthy_threshold": "1", "health.healthy_threshold": "1"},
                    hosts=2)
        c.start()
        c.answer(OK, host=0)
        c.answer(OK, host=1)
        bad = c.cluster.hosts[1]
        c.next(host=1)
        c.answer(response(503), host=1)
        self.assertNotIn(bad, {c.cluster.pick() for _ in range(10)})
        c.next(host=1)
        c.answer(OK, host=1)
        self.assertIn(bad, {c.cluster.pick() for _ in range(10)})


class TCPCheckTests(unittest.TestCase):
    """
    TCP checks: connect, send, receive.
    """

    def test_connectOnly(self):
        """
        Without C{receive}, connecting passes the check (and the connection is closed).
        """
        c = Checked({"health.type": "tcp"})
        c.start()
        pending = c.endpoints[0].last
        pending.accept()
        self.assertTrue(c.host.healthy)
        self.assertTrue(pending.transport.disconnecting)
        self.assertEqual(pending.transport.value(), b"")

    def test_connectOnlyTLS(self):
        """
        Over TLS, a connect-only check passes when the handshake completes, not at TCP connect.
        """
        c = Checked({"health.type": "tcp"})
        c.start()
        pending = c.endpoints[0].last
        pending.accept(TLSStringTransport())
        self.assertFalse(c.host.healthy)
        pending.protocol.handshakeCompleted()
        self.assertTrue(c.host.healthy)

    def test_tlsHandshakeFailure(self):
        """
        A TLS connection that closes before its handshake fails the check, saying so.
        """
        c = Checked({"health.type": "tcp"})
        c.start()
        pending = c.endpoints[0].last
        pending.accept(TLSStringTransport())
        pending.protocol.connectionLost(None)
        self.assertEqual(c.host.healthReason, "failed active health check: TLS handshake failed")

    def test_sendReceive(self):
        """
        C{send} is written on connect; the check passes once C{receive} appears, even split across reads.
        """
        c = Checked({"health.type": "tcp", "health.send": "text:PING\\r\\n", "health.receive": "text:+PONG"})
        c.start()
        pending = c.endpoints[0].last
        pending.accept()
        self.assertEqual(pending.transport.value(), b"PING\r\n")
        pending.protocol.dataReceived(b"noise+PO")
        self.assertFalse(c.host.healthy)
        pending.protocol.dataReceived(b"NG\r\n")
        self.assertTrue(c.host.healthy)

    def test_receiveMismatchTimesOut(self):
        """
        Bytes that never contain C{receive} leave the check waiting until it times out.
        """
        c = Checked({"health.type": "tcp", "health.receive": "text:+PONG"})
        c.start()
        pending = c.endpoints[0].last
        pending.accept()
        pending.protocol.dataReceived(b"-ERR unknown command\r\n")
        self.assertEqual(c.stat("health_check.failure"), 0)
        c.clock.advance(1)
        self.assertEqual(c.host.healthReason, "failed active health check: timeout")

    def test_closedBeforeReceive(self):
        """
        A host that closes before sending C{receive} fails the check.
        """
        c = Checked({"health.type": "tcp", "health.receive": "text:+PONG"})
        c.start()
        pending = c.endpoints[0].last
        pending.accept()
        pending.protocol.connectionLost(None)
        self.assertEqual(c.host.healthReason,
                         "failed active health check: connection closed before the expected bytes")


class ScheduleTests(unittest.TestCase):
    """
    When checks happen: intervals, jitter, no-traffic and unhealthy intervals.
    """

    def test_interval(self):
        """
        With traffic, a healthy host's next check starts C{interval} after the last one ended.
        """
        c = Checked({"health.path": "/", "health.interval": "3s"})
        c.start()
        c.clock.advance(0.5)
        c.traffic()
        c.answer(OK)
        c.clock.advance(2.999)
        self.assertEqual(len(c.endpoints[0].attempts), 1)
        c.clock.advance(0.001)
        self.assertEqual(len(c.endpoints[0].attempts), 2)

    def test_noTrafficInterval(self):
        """
        A healthy host of a cluster that carried no traffic since its last check waits C{no_traffic_interval}.
        """
        c = Checked({"health.path": "/", "health.interval": "3s", "health.no_traffic_interval": "20s"})
        c.start()
        c.answer(OK)
        self.assertEqual(c.checker.checkers[c.host].timer.getTime(), 20.0)
        c.next()
        c.traffic()
        c.answer(OK)
        self.assertEqual(c.checker.checkers[c.host].timer.getTime(), 23.0)

    def test_unhealthyInterval(self):
        """
        An unhealthy host is checked every C{unhealthy_interval}, traffic or not.
        """
        c = Checked({"health.path": "/", "health.interval": "3s", "health.unhealthy_interval": "1s"})
        c.start()
        c.answer(response(503))
        self.assertEqual(c.checker.checkers[c.host].timer.getTime(), 1.0)

    def test_jitter(self):
        """
        With a seeded random, initial jitter and both interval jitters give an exact schedule.
        """
        c = Checked({"health.path": "/", "health.interval": "2s", "health.initial_jitter": "1s",
                     "health.interval_jitter": "500ms", "health.interval_jitter_percent": "10"},
                    hosts=2, seed=7)
        replica = Random(7)
        c.checker.start()
        first = [replica.random() * 1.0, replica.random() * 1.0]
        self.assertEqual(sorted(call.getTime() for call in c.clock.getDelayedCalls()), sorted(first))
        c.clock.advance(max(first))
        c.traffic()
        c.answer(OK, host=0)
        delay = 2.0
        delay += replica.random() * 2.0 * 10.0 / 100.0
        delay += replica.random() * 0.5
        self.assertEqual(c.checker.checkers[c.cluster.hosts[0]].timer.getTime(), max(first) + delay)
        self.assertTrue(2.0 < delay < 2.7)

    def test_noJitterNoDraws(self):
        """
        Without jitter the checker draws nothing from the shared random (the load balancer's sequences stay).
        """
        random = Random(3)
        c = Checked()
        c.checker.random = random
        c.start()
        c.checks([200, 503, 200])
        self.assertEqual(random.random(), Random(3).random())


class LogLabelTests(unittest.TestCase):
    """
    How hosts are named in log lines.
    """

    def test_hostLabel(self):
        """
        A host is logged by its first three endpoint fields, never its key file.
        """
        self.assertEqual(_hostLabel("tls:host=a:port=443:certificate=c.pem:privateKey=k.pem"), "tls:host=a:port=443")
        self.assertEqual(_hostLabel("tcp:127.0.0.1:9001"), "tcp:127.0.0.1:9001")
        self.assertEqual(_hostLabel(r"tcp6:\:\:1:9001:timeout=3"), r"tcp6:\:\:1:9001")


class FilterTests(unittest.TestCase):
    """
    The C{health_check} HTTP filter.
    """

    def make(self, items: Optional[Dict[str, str]] = None, state: object = None, attach: bool = True):
        """
        A filter configured from C{items}, with C{state} as the context's C{healthState}; the errors.
        """
        errors: List[ConfigError] = []
        listener = ListenerConfig("edge", "tcp:0", "http", ("hc", "router"))
        context = FilterContext(Clock(), StatsStore(), {}, listener, Random(0), None)
        if attach:
            context.healthState = state if state is not None else HealthState()
        options = Options("t.ini", "filter:hc", items or {}, errors)
        maker = HealthCheckFactory().configure(options, context)
        options.finish()
        self.assertEqual(errors, [])
        return maker(None)

    def test_answers200(self):
        """
        A request for C{/healthz} is answered 200 C{OK} by the proxy; the upstream never sees it.
        """
        h = FilterHarness(self.make())
        h.request(b"GET", b"/healthz")
        self.assertEqual((h.downstream.status, h.downstream.body), (200, b"OK"))
        self.assertIsNone(h.upstream.method)

    def test_queryIgnored(self):
        """
        The query does not keep a request from being a health check.
        """
        h = FilterHarness(self.make({"path": "/ping"}))
        h.request(b"GET", b"/ping?from=lb")
        self.assertEqual(h.downstream.status, 200)

    def test_failed(self):
        """
        After C{/healthcheck/fail}, health checks get 503 with C{x-envoy-immediate-health-check-fail: true}.
        """
        h = FilterHarness(self.make(state=HealthState(failed=True)))
        h.request(b"GET", b"/healthz")
        self.assertEqual(h.downstream.status, 503)
        self.assertIn((b"x-envoy-immediate-health-check-fail", b"true"), h.downstream.headers)
        self.assertEqual(h.stream.responseCodeDetails, "health_check_failed")

    def test_draining(self):
        """
        While draining, health checks get 503.
        """
        h = FilterHarness(self.make(state=HealthState(draining=True)))
        h.request(b"GET", b"/healthz")
        self.assertEqual(h.downstream.status, 503)

    def test_stateReadPerRequest(self):
        """
        The state is read at every request, so clearing the flag makes checks pass again.
        """
        state = HealthState(failed=True)
        f = self.make(state=state)
        state.failed = False
        h = FilterHarness(f)
        h.request(b"GET", b"/healthz")
        self.assertEqual(h.downstream.status, 200)

    def test_passThrough(self):
        """
        With C{pass_through = true}, a health check goes to the upstream, whose answer decides.
        """
        h = FilterHarness(self.make({"pass_through": "true"}))
        h.request(b"GET", b"/healthz")
        self.assertEqual(h.upstream.path, b"/healthz")
        h.respond(500, [(b"content-length", b"0")])
        self.assertEqual(h.downstream.status, 500)

    def test_passThroughFailed(self):
        """
        With C{pass_through = true} and the proxy failed, the proxy answers 503 without asking the upstream.
        """
        h = FilterHarness(self.make({"pass_through": "true"}, HealthState(failed=True)))
        h.request(b"GET", b"/healthz")
        self.assertEqual(h.downstream.status, 503)
        self.assertIsNone(h.upstream.method)

    def test_otherPaths(self):
        """
        Other requests pass through, their responses untouched while the proxy is healthy.
        """
        h = FilterHarness(self.make())
        h.request(b"GET", b"/healthz/deeper")
        self.assertEqual(h.upstream.path, b"/healthz/deeper")
        h.respond(200, [(b"content-length", b"2")], b"ok")
        self.assertEqual(h.downstream.headers, [(b"content-length", b"2")])

    def test_failedMarksEveryResponse(self):
        """
        While failed, every response passing the filter carries C{x-envoy-immediate-health-check-fail}, once.
        """
        h = FilterHarness(self.make(state=HealthState(failed=True)))
        h.request(b"GET", b"/api")
        h.respond(200, [(b"content-length", b"0"), (b"x-envoy-immediate-health-check-fail", b"true")])
        self.assertEqual(h.downstream.headers.count((b"x-envoy-immediate-health-check-fail", b"true")), 1)
        h = FilterHarness(self.make(state=HealthState(failed=True)))
        h.request(b"GET", b"/api")
        h.respond(200, [(b"content-length", b"0")])
        self.assertIn((b"x-envoy-immediate-health-check-fail", b"true"), h.downstream.headers)

    def test_noContextState(self):
        """
        A context without C{healthState} gives a proxy that is never failed.
        """
        h = FilterHarness(self.make(attach=False))
        h.request(b"GET", b"/healthz")
        self.assertEqual(h.downstream.status, 200)

    def test_serverHealthState(self):
        """
        L{ServerHealthState} reads the server's C{healthCheckFailed} flag and draining state live.
        """

        class Server:
            healthCheckFailed = False
            state = "LIVE"

        server = Server()
        state = ServerHealthState(server)
        self.assertEqual((state.failed, state.draining), (False, False))
        server.healthCheckFailed, server.state = True, "DRAINING"
        self.assertEqual((state.failed, state.draining), (True, True))

    def test_badPath(self):
        """
        A C{path} that is not an origin-form path without a query is an error.
        """
        for bad in ("healthz", "/a b", "/h?x=1"):
            errors: List[ConfigError] = []
            listener = ListenerConfig("edge", "tcp:0", "http", ("hc",))
            options = Options("t.ini", "filter:hc", {"path": bad}, errors)
            HealthCheckFactory().configure(options, FilterContext(Clock(), StatsStore(), {}, listener))
            self.assertEqual([e.key for e in errors], ["path"], bad)

    def test_plugin(self):
        """
        The filter is registered as the C{health_check} HTTP filter plugin.
        """
        self.assertIn("health_check", {p.name for p in getPlugins(IHTTPFilterFactory)})


class ExampleTests(unittest.TestCase):
    """
    C{etc/examples/health.ini}.
    """

    def test_exampleSections(self):
        """
        Every cluster section of the example has valid C{health.*} keys and every health_check filter valid options.
        """
        parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";",))
        parser.read(EXAMPLE)
        checked = 0
        for title in parser.sections():
            items = dict(parser.items(title))
            errors: List[ConfigError] = []
            if title.startswith("cluster:"):
                config = parseHealth(Options(EXAMPLE, title, items, errors))
                checked += config is not None
            elif title.startswith("filter:") and items.get("type") == "health_check":
                del items["type"]
                listener = ListenerConfig("edge", "tcp:0", "http", ("hc",))
                HealthCheckFactory().configure(Options(EXAMPLE, title, items, errors),
                                               FilterContext(Clock(), StatsStore(), {}, listener))
                checked += 1
            self.assertEqual(errors, [], title)
        self.assertGreaterEqual(checked, 3)

    def test_exampleLoads(self):
        """
        The example loads as a whole (once C{ClusterConfig} has its C{health} field).
        """
        if "health" not in {f.name for f in dataclasses.fields(ClusterConfig)}:
            raise unittest.SkipTest("the loader does not read health.* keys yet (see the integration notes)")
        config = loadFile(EXAMPLE)
        self.assertIsNotNone(config.clusters["api"].health)


class Toggle(Resource):
    """
    An origin whose every path answers C{status}, recording each request's path, user agent and Host.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.status = 200
        self.seen: List[tuple] = []

    def render_GET(self, request) -> bytes:
        """
        Record the request and answer C{status}.
        """
        self.seen.append((request.path, request.getHeader(b"user-agent"), request.getHeader(b"host")))
        request.setResponseCode(self.status)
        return b"ok"


class QuietSite(Site):
    """
    A L{Site} without the per-request log line.
    """

    noisy = False

    def log(self, request) -> None:
        """
        Log nothing.
        """


@defer.inlineCallbacks
def waitFor(predicate, timeout: float = 5.0):
    """
    Poll C{predicate} on the real reactor every 10ms until it holds; fail after C{timeout} seconds.
    """
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        yield deferLater(reactor, 0.01, lambda: None)


class LoopbackTests(unittest.TestCase):
    """
    Health checks of real hosts over loopback, on the real reactor.
    """

    timeout = 20

    def checker(self, endpoint: str, items: Dict[str, str]) -> HealthChecker:
        """
        A started checker of a cluster of one host at C{endpoint} (stopped at cleanup).
        """
        config = ClusterConfig("api", (HostConfig(endpoint),))
        cluster = Cluster(config, reactor, StatsStore())
        health, errors = parse(items)
        self.assertEqual(errors, [])
        checker = HealthChecker(cluster, health, reactor, Random(0))
        checker.start()
        self.addCleanup(checker.stop)
        return checker

    @defer.inlineCallbacks
    def test_toggle(self):
        """
        A real origin's host goes healthy while C{/healthz} answers 200 and unhealthy once it answers 503.
        """
        origin = Toggle()
        wrapper = WrappingFactory(QuietSite(origin))
        port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(wrapper)
        self.addCleanup(port.stopListening)
        checker = self.checker(f"tcp:127.0.0.1:{port.getHost().port}", {
            "health.path": "/healthz", "health.interval": "50ms", "health.no_traffic_interval": "50ms",
            "health.unhealthy_threshold": "2", "health.timeout": "2s",
        })
        cluster = checker.cluster
        host = cluster.hosts[0]
        yield waitFor(lambda: host.healthy)
        self.assertEqual(origin.seen[0], (b"/healthz", b"twistedmesh-health-check", b"api"))
        origin.status = 503
        yield waitFor(lambda: not host.healthy)
        self.assertEqual(host.healthReason, "failed active health check: status 503")
        self.assertEqual(cluster.membership_healthy.value, 0)
        origin.status = 200
        yield waitFor(lambda: host.healthy)
        # Stop now and let every check connection close before trial inspects the reactor.
        checker.stop()
        yield waitFor(lambda: not wrapper.protocols)
        yield deferLater(reactor, 0.05, lambda: None)

    @defer.inlineCallbacks
    def test_refused(self):
        """
        A closed port on loopback is reported as a refused connection.
        """
        port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(WrappingFactory(QuietSite(Toggle())))
        number = port.getHost().port
        yield port.stopListening()
        checker = self.checker(f"tcp:127.0.0.1:{number}", {"health.type": "tcp", "health.interval": "50ms"})
        host = checker.cluster.hosts[0]
        yield waitFor(lambda: host.healthReason != "pending first health check")
        self.assertEqual(host.healthReason, "failed active health check: connection refused")
