"""
Tests for active health checking (L{twistedmesh.upstream.health}, L{twistedmesh.config.health}) and the
C{health_check} HTTP filter (L{twistedmesh.filters.health_check}).

Unit tests run checks against fake client endpoints whose connection Deferreds the test fires, with
protocols on L{StringTransport}s and timers on a L{Clock}; HTTP/2 checks talk to h2's server-side
L{H2Connection} as the host. Integration tests check real hosts on loopback with the real reactor: a
C{twisted.web} origin (HTTP/1.1 keep-alive), an h2c and an h2-over-TLS host behind a L{MeshService} (seen
on its admin C{/clusters} page), and nginx serving h2c only, where installed.
"""

from __future__ import annotations

import configparser
import dataclasses
import os
from random import Random
from typing import Dict, List, Optional

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated, PingAckReceived, RemoteSettingsChanged, RequestReceived, StreamReset, WindowUpdated,
)
from h2.exceptions import ProtocolError as H2ProtocolError, TooManyStreamsError
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame, PingFrame
import treq
from twisted.internet import defer, protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import INegotiated
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.plugin import getPlugins
from twisted.python.failure import Failure
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
    FAILED_ACTIVE_HC, PENDING_ACTIVE_HC, HealthChecker, _hostLabel, finalStatus,
)

from .support import proxyConfig, startNginx, startService, waitFor

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
    A L{StringTransport} that looks like a TLS transport (it provides L{INegotiated}) that negotiated
    C{negotiatedProtocol} by ALPN.
    """

    def __init__(self, negotiatedProtocol: Optional[bytes] = None) -> None:
        super().__init__()
        self.negotiatedProtocol = negotiatedProtocol


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

    def handshake(self, alpn: Optional[bytes] = None) -> TLSStringTransport:
        """
        Connect over a memory transport that looks like TLS, negotiating C{alpn}, and complete the TLS
        handshake; return the transport.
        """
        transport = TLSStringTransport(alpn)
        self.accept(transport)
        self.protocol.handshakeCompleted()
        return transport

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

    def __init__(self, items: Optional[Dict[str, str]] = None, hosts: int = 1, seed: int = 0,
                 protocol: str = "http1") -> None:
        self.clock = Clock()
        self.stats = StatsStore()
        config = ClusterConfig("api", tuple(HostConfig(f"tcp:127.0.0.1:{9001 + i}") for i in range(hosts)),
                               protocol=protocol)
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
        Have the host send C{data} in answer to its check in flight: on the connection the check reuses, or
        on a new one, accepted first.
        """
        pending = self.endpoints[host].last
        if not pending.deferred.called:
            pending.accept()
        pending.protocol.dataReceived(data)
        return pending

    def inFlight(self, host: int = 0) -> bool:
        """
        Whether the host has a check waiting for its verdict.
        """
        return self.checker.checkers[self.cluster.hosts[host]].attempt is not None

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
            if not self.inFlight(host):
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

    def test_codecAndReuse(self):
        """
        C{health.codec} names the HTTP version (unset: the cluster's) and C{health.reuse_connection} switches
        reuse (on by default, as in Envoy); both are HTTP keys, and bad values are errors.
        """
        config, errors = parse({"health.path": "/"})
        self.assertEqual((config.codec, config.reuse_connection, errors), (None, True, []))
        config, errors = parse({"health.path": "/", "health.codec": "http2", "health.reuse_connection": "no"})
        self.assertEqual((config.codec, config.reuse_connection, errors), ("http2", False, []))
        _, errors = parse({"health.path": "/", "health.codec": "h2", "health.reuse_connection": "maybe"})
        self.assertEqual([k for k, _ in errors], ["health.codec", "health.reuse_connection"])
        self.assertIn("http1, http2", errors[0][1])
        _, errors = parse({"health.type": "tcp", "health.codec": "http1", "health.reuse_connection": "false"})
        self.assertEqual(errors, [("health.codec", "applies only to health.type = http, not tcp"),
                                  ("health.reuse_connection", "applies only to health.type = http, not tcp")])

    def test_codecFollowsCluster(self):
        """
        Unset, the codec is the cluster's protocol; C{health.codec} overrides it either way.
        """
        self.assertEqual(Checked().checker.codec, "http1")
        self.assertEqual(Checked(protocol="http2").checker.codec, "http2")
        self.assertEqual(Checked({"health.path": "/", "health.codec": "http1"}, protocol="http2").checker.codec,
                         "http1")
        self.assertEqual(Checked({"health.path": "/", "health.codec": "http2"}).checker.codec, "http2")


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
        The check is a C{GET} of the path with Host and the health checker's user agent (keep-alive: the
        connection is reused by default).
        """
        c = Checked({"health.path": "/healthz?deep=1", "health.host": "api.internal"})
        c.start()
        pending = c.endpoints[0].last
        pending.accept()
        self.assertEqual(pending.transport.value(), b"GET /healthz?deep=1 HTTP/1.1\r\nhost: api.internal\r\n"
                         b"user-agent: twistedmesh-health-check\r\n\r\n")

    def test_requestNoReuse(self):
        """
        With C{reuse_connection = false} the request says C{connection: close} and the connection is closed
        after the verdict.
        """
        c = Checked({"health.path": "/healthz", "health.reuse_connection": "false"})
        c.start()
        pending = c.answer(OK)
        self.assertEqual(pending.transport.value(), b"GET /healthz HTTP/1.1\r\nhost: api\r\n"
                         b"user-agent: twistedmesh-health-check\r\nconnection: close\r\n\r\n")
        self.assertTrue(pending.transport.disconnecting)
        c.next()
        self.assertEqual(len(c.endpoints[0].attempts), 2)

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
        self.assertFalse(pending.transport.disconnecting)  # kept for the next check

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
        # A host that answered keeps its connection for the next check.
        self.assertEqual((pending.transport.disconnecting, pending.transport.disconnected), (False, False))
        self.assertEqual(len(c.endpoints[0].attempts), 1)
        c.next()
        pending = c.answer(response(302, b"connection: close\r\n"))
        # One that answered and asked for a close gets a clean close, not a reset.
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
        c = Checked({"health.path": "/", "health.timeout": "2s", "health.unhealthy_threshold": "1",
                     "health.reuse_connection": "false"})
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
        c.endpoints[0].last.protocol.connectionLost(None)  # the host closes the kept connection
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


class HTTP1ReuseTests(unittest.TestCase):
    """
    HTTP/1.1 checks reuse their connection (keep-alive), as Envoy's C{reuse_connection} does by default.
    """

    def test_oneConnection(self):
        """
        Checks after the first send their request on the same connection, one after another.
        """
        c = Checked()
        c.start()
        pending = c.answer(OK)
        c.next()
        c.answer(response(503))
        c.next()
        c.answer(OK)
        self.assertEqual(len(c.endpoints[0].attempts), 1)
        request = (b"GET /healthz HTTP/1.1\r\nhost: api\r\nuser-agent: twistedmesh-health-check\r\n\r\n")
        self.assertEqual(pending.transport.value(), request * 3)
        self.assertEqual([c.stat("health_check." + n) for n in ("attempt", "success", "failure")], [3, 2, 1])
        self.assertFalse(pending.transport.disconnecting)

    def test_bodyReadToEnd(self):
        """
        The verdict waits for the end of the response (the body is read and dropped); the next check then
        reuses the connection.
        """
        c = Checked()
        c.start()
        pending = c.answer(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nab")
        self.assertEqual((c.host.healthy, c.inFlight()), (False, True))
        pending.protocol.dataReceived(b"cd")
        self.assertEqual((c.host.healthy, c.inFlight()), (True, False))
        c.next()
        self.assertEqual(len(c.endpoints[0].attempts), 1)
        self.assertEqual(pending.transport.value().count(b"GET /healthz"), 2)

    def test_unfinishedResponseFails(self):
        """
        A C{200} whose body stalls is no pass: the check times out (a network failure), the connection is
        aborted, and the next check makes a new one.
        """
        c = Checked({"health.path": "/healthz", "health.timeout": "1s"})
        c.start()
        first = c.answer(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\npartial")
        self.assertFalse(c.host.healthy)
        c.clock.advance(1)
        self.assertEqual(c.host.healthReason,
                         "failed active health check: timeout before the response ended (status 200)")
        self.assertEqual((c.stat("health_check.success"), c.stat("health_check.network_failure")), (0, 1))
        self.assertTrue(first.transport.disconnected)
        c.next()
        self.assertEqual(len(c.endpoints[0].attempts), 2)
        c.answer(OK)
        self.assertEqual(c.stat("health_check.success"), 1)

    def test_closedMidBodyFails(self):
        """
        A healthy host that answers C{200} and hangs up mid-body fails its check as a network failure.
        """
        c = Checked({"health.path": "/healthz", "health.unhealthy_threshold": "1"})
        c.start()
        first = c.answer(OK)
        self.assertTrue(c.host.healthy)
        c.next()
        first.protocol.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\npart")
        first.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual((c.host.healthy, c.host.healthReason), (
            False, "failed active health check: connection closed before the response ended (status 200)"))
        self.assertEqual(c.stat("health_check.network_failure"), 1)

    def test_bodyUntilClose(self):
        """
        A body read until the close (no length, no chunking) ends with the close: that is the verdict.
        """
        c = Checked()
        c.start()
        first = c.answer(b"HTTP/1.1 200 OK\r\n\r\nall of it")
        self.assertFalse(c.host.healthy)
        first.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual((c.host.healthy, c.stat("health_check.success")), (True, 1))

    def test_failingStatusAtEnd(self):
        """
        A failing status is a verdict at the end of its response too, and no network failure.
        """
        c = Checked()
        c.start()
        first = c.answer(b"HTTP/1.1 503 X\r\ntransfer-encoding: chunked\r\n\r\n4\r\ndown\r\n")
        self.assertTrue(c.inFlight())
        first.protocol.dataReceived(b"0\r\n\r\n")
        self.assertEqual(c.host.healthReason, "failed active health check: status 503")
        self.assertEqual((c.stat("health_check.failure"), c.stat("health_check.network_failure")), (1, 0))
        self.assertFalse(first.transport.disconnecting)  # kept: the response ended

    def test_immediateFailFromHead(self):
        """
        The immediate-fail header fails the check from the head alone, as before; the body is still read
        to its end so that the connection is reused.
        """
        c = Checked()
        c.start()
        first = c.answer(OK)
        c.next()
        first.protocol.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n"
                                    b"x-envoy-immediate-health-check-fail: true\r\n\r\nab")
        self.assertEqual((c.host.healthy, c.host.healthReason), (
            False, "failed active health check: immediate health check fail (status 200)"))
        first.protocol.dataReceived(b"cd")
        c.next()
        self.assertEqual(len(c.endpoints[0].attempts), 1)

    def test_closeNotReused(self):
        """
        A response with C{connection: close} (or an HTTP/1.0 one) ends the connection's use.
        """
        c = Checked()
        c.start()
        first = c.answer(response(200, b"connection: close\r\n"))
        self.assertTrue(first.transport.disconnecting)
        c.next()
        second = c.answer(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n")
        self.assertIsNot(second, first)
        self.assertTrue(second.transport.disconnecting)
        c.next()
        self.assertEqual(len(c.endpoints[0].attempts), 3)

    def test_hostClosesIdle(self):
        """
        A kept connection the host closes between checks is forgotten: the next check connects again.
        """
        c = Checked()
        c.start()
        first = c.answer(OK)
        first.protocol.connectionLost(None)
        c.next()
        self.assertEqual(len(c.endpoints[0].attempts), 2)
        c.answer(OK)
        self.assertEqual((c.stat("health_check.success"), c.stat("health_check.failure")), (2, 0))

    def test_staleConnectionRetried(self):
        """
        A request sent on a reused connection that the host closes before answering (its keep-alive
        timeout raced the check) goes again on a new connection: no failure is counted.
        """
        c = Checked()
        c.start()
        first = c.answer(OK)
        c.next()
        first.protocol.connectionLost(None)
        self.assertEqual(len(c.endpoints[0].attempts), 2)
        c.answer(OK)
        self.assertEqual([c.stat("health_check." + n) for n in ("attempt", "success", "failure")], [2, 2, 0])

    def test_staleRetryKeepsTimeout(self):
        """
        The retried request has what is left of the check's timeout, and a second close fails the check.
        """
        c = Checked({"health.path": "/", "health.timeout": "1s"})
        c.start()
        c.answer(OK)
        c.next()
        c.clock.advance(0.6)
        c.endpoints[0].last.protocol.connectionLost(None)
        c.clock.advance(0.399)
        self.assertTrue(c.inFlight())
        c.clock.advance(0.001)
        self.assertTrue(c.endpoints[0].last.cancelled)
        self.assertEqual(c.host.healthReason,
                         "healthy: last check failed (timeout), 1 of 3 failing checks to become unhealthy")
        c.next()
        pending = c.endpoints[0].last
        pending.accept()
        pending.protocol.connectionLost(None)  # a fresh connection closing is the host's failure
        self.assertEqual(c.stat("health_check.failure"), 2)

    def test_partialAnswerNotRetried(self):
        """
        A reused connection closed after part of the response came fails the check: the host did answer.
        """
        c = Checked()
        c.start()
        first = c.answer(OK)
        c.next()
        first.protocol.dataReceived(b"HTTP/1.1 5")
        first.protocol.connectionLost(None)
        self.assertEqual(len(c.endpoints[0].attempts), 1)
        self.assertEqual(c.stat("health_check.network_failure"), 1)

    def test_timeoutAbortsReused(self):
        """
        A timeout on a reused connection aborts it; the next check connects again.
        """
        c = Checked()
        c.start()
        first = c.answer(OK)
        c.next()
        c.clock.advance(1)
        self.assertTrue(first.transport.disconnected)
        first.protocol.connectionLost(None)
        c.next()
        self.assertEqual(len(c.endpoints[0].attempts), 2)

    def test_garbageWhileIdle(self):
        """
        Bytes on a kept connection with no check in flight spoil it: it is aborted and not reused.
        """
        c = Checked()
        c.start()
        first = c.answer(OK)
        first.protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertTrue(first.transport.disconnected)
        c.next()
        self.assertEqual(len(c.endpoints[0].attempts), 2)
        self.assertEqual(c.stat("health_check.failure"), 0)

    def test_h2Host(self):
        """
        An h2c-only host answering the request with its server preface (a SETTINGS frame) fails the check,
        saying it speaks HTTP/2.
        """
        c = Checked()
        c.start()
        c.answer(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        self.assertEqual(c.host.healthReason,
                         "failed active health check: protocol error: the host answered in HTTP/2, not HTTP/1.1")

    def test_stopClosesKept(self):
        """
        Stopping the checker closes the kept connection.
        """
        c = Checked()
        c.start()
        first = c.answer(OK)
        c.checker.stop()
        self.assertTrue(first.transport.disconnecting)

    def test_alpnH2(self):
        """
        An HTTP/1.1 check over TLS to a host that negotiated h2 by ALPN fails, saying so.
        """
        c = Checked({"health.path": "/", "health.codec": "http1"}, protocol="http2")
        c.start()
        transport = c.endpoints[0].last.handshake(b"h2")
        self.assertEqual(c.host.healthReason,
                         "failed active health check: protocol error: ALPN negotiated h2, not http/1.1")
        self.assertTrue(transport.disconnected)


class H2Peer:
    """
    The host's side of an HTTP/2 check connection in memory: h2's server-side L{H2Connection} reading what
    the checker wrote to a L{StringTransport} and answering into the checker's protocol.

    @ivar events: every h2 event the host saw, in order.
    """

    def __init__(self, pending: PendingConnection) -> None:
        self.pending = pending
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.h2.initiate_connection()
        self.events: List[object] = []
        self.read()
        self.send()

    def read(self) -> List[object]:
        """
        Take what the checker wrote since the last read and return the events it makes.
        """
        data = self.pending.transport.value()
        self.pending.transport.clear()
        events = self.h2.receive_data(data) if data else []
        self.events.extend(events)
        return events

    def send(self) -> None:
        """
        Deliver what the host queued to the checker.
        """
        data = self.h2.data_to_send()
        if data:
            self.pending.protocol.dataReceived(data)

    def requests(self) -> List[RequestReceived]:
        """
        The requests the host received.
        """
        self.read()
        return [e for e in self.events if isinstance(e, RequestReceived)]

    def respond(self, status: int, sid: Optional[int] = None, extra=(), body: Optional[bytes] = None) -> None:
        """
        Answer stream C{sid} (the latest request's by default) with C{status}, C{extra} fields and C{body}
        (none: the HEADERS frame ends the stream; C{b""} or more: a DATA frame follows, not ending it).
        """
        if sid is None:
            sid = self.requests()[-1].stream_id
        self.h2.send_headers(sid, [(b":status", b"%d" % status)] + list(extra), end_stream=body is None)
        if body:
            self.h2.send_data(sid, body)
        self.send()

    def goAway(self, last: int, code: ErrorCodes = ErrorCodes.NO_ERROR) -> None:
        """
        Send GOAWAY with C{last} as the last stream id processed, written by hand so that the host's h2 may
        still answer the streams up to C{last} (as a server shutting down gracefully does).
        """
        frame = GoAwayFrame(0)
        frame.last_stream_id = last
        frame.error_code = code
        self.pending.protocol.dataReceived(frame.serialize())


def h2Checked(items: Optional[Dict[str, str]] = None) -> Checked:
    """
    A L{Checked} HTTP/2 cluster (C{protocol = http2}), started.
    """
    c = Checked(items if items is not None else {"health.path": "/healthz", "health.host": "api.internal"},
                protocol="http2")
    c.start()
    return c


def h2Accept(c: Checked, transport: Optional[StringTransport] = None) -> H2Peer:
    """
    Accept the latest connection attempt and put an HTTP/2 peer on it.
    """
    pending = c.endpoints[0].last
    pending.accept(transport)
    return H2Peer(pending)


class H2CheckTests(unittest.TestCase):
    """
    HTTP checks of a C{protocol = http2} cluster speak HTTP/2: h2c with prior knowledge, a stream per check.
    """

    def test_request(self):
        """
        The check is the client preface, SETTINGS without push, and one C{GET} stream with C{:authority}
        from C{health.host}, ended by its HEADERS.
        """
        c = h2Checked()
        peer = h2Accept(c)
        [request] = peer.requests()
        self.assertEqual(request.stream_id, 1)
        self.assertEqual(request.headers, [
            (b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"api.internal"), (b":path", b"/healthz"),
            (b"user-agent", b"twistedmesh-health-check"),
        ])
        self.assertIsNotNone(request.stream_ended)
        settings = [e for e in peer.events if isinstance(e, RemoteSettingsChanged)][0]
        self.assertEqual(settings.changed_settings[SettingCodes.ENABLE_PUSH].new_value, 0)

    def test_success(self):
        """
        A 200 passes the check; the connection stays open for the next one.
        """
        c = h2Checked()
        peer = h2Accept(c)
        peer.respond(200)
        self.assertEqual((c.host.healthy, c.host.healthReason), (True, "healthy: last check passed"))
        self.assertFalse(peer.pending.transport.disconnecting)
        self.assertEqual(c.stat("health_check.success"), 1)

    def test_failureStatus(self):
        """
        A status outside C{expected_statuses} fails the check (not as a network failure); an expected
        one passes.
        """
        c = h2Checked({"health.path": "/", "health.expected_statuses": "200-299", "health.unhealthy_threshold": "1"})
        peer = h2Accept(c)
        peer.respond(204)
        c.next()
        peer.respond(503)
        self.assertEqual((c.host.healthy, c.host.healthReason), (False, "failed active health check: status 503"))
        self.assertEqual((c.stat("health_check.failure"), c.stat("health_check.network_failure")), (1, 0))

    def test_immediateFail(self):
        """
        C{x-envoy-immediate-health-check-fail} fails a healthy host at once.
        """
        c = h2Checked()
        peer = h2Accept(c)
        peer.respond(200)
        c.next()
        peer.respond(200, extra=[(b"x-envoy-immediate-health-check-fail", b"true")])
        self.assertEqual(c.host.healthReason,
                         "failed active health check: immediate health check fail (status 200)")

    def test_bodyReadToEnd(self):
        """
        A response with a body gets its verdict when the stream ends; its DATA is acknowledged as it comes,
        so the connection's window never shrinks, and the stream is not reset.
        """
        c = h2Checked()
        peer = h2Accept(c)
        peer.respond(200, body=b"x" * 16384)
        self.assertEqual((c.host.healthy, c.inFlight()), (False, True))
        peer.h2.send_data(1, b"y" * 16384)
        peer.h2.send_data(1, b"z" * 16384)
        peer.send()
        self.assertFalse(c.host.healthy)
        events = peer.read()
        self.assertTrue(any(isinstance(e, WindowUpdated) and e.stream_id == 0 for e in events))
        # Unacknowledged, the host could send no more than 16383 bytes.
        self.assertGreater(peer.h2.outbound_flow_control_window, 65535 - 3 * 16384)
        peer.h2.end_stream(1)
        peer.send()
        self.assertEqual((c.host.healthy, c.host.healthReason), (True, "healthy: last check passed"))
        self.assertEqual([e for e in peer.read() if isinstance(e, StreamReset)], [])
        self.assertFalse(peer.pending.transport.disconnecting)

    def test_bodyStalls(self):
        """
        A C{200} head whose body never ends is no pass: the check times out, naming the status.
        """
        c = h2Checked()
        peer = h2Accept(c)
        peer.respond(200, body=b"partial")
        c.clock.advance(c.config.timeout)
        self.assertEqual((c.host.healthy, c.host.healthReason), (
            False, "failed active health check: timeout before the response ended (status 200)"))
        self.assertEqual(c.stat("health_check.network_failure"), 1)
        self.assertTrue(peer.pending.transport.disconnected)

    def test_resetMidBody(self):
        """
        A healthy host whose C{200} stream is reset mid-body fails the check as a network failure.
        """
        c = h2Checked({"health.path": "/", "health.unhealthy_threshold": "1"})
        peer = h2Accept(c)
        peer.respond(200)
        c.next()
        peer.respond(200, body=b"part")
        peer.h2.reset_stream(3, ErrorCodes.INTERNAL_ERROR)
        peer.send()
        self.assertEqual((c.host.healthy, c.host.healthReason), (
            False, "failed active health check: stream reset (INTERNAL_ERROR)"))
        self.assertEqual(c.stat("health_check.network_failure"), 1)

    def test_closedMidBody(self):
        """
        A connection lost mid-body fails the check, naming the status the head carried.
        """
        c = h2Checked()
        peer = h2Accept(c)
        peer.respond(200, body=b"part")
        peer.pending.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(c.host.healthReason,
                         "failed active health check: connection closed before the response ended (status 200)")

    def test_trailersEnd(self):
        """
        Trailers end the response: that is the verdict.
        """
        c = h2Checked()
        peer = h2Accept(c)
        peer.respond(503, body=b"down")
        self.assertTrue(c.inFlight())
        peer.h2.send_headers(1, [(b"x-why", b"maintenance")], end_stream=True)
        peer.send()
        self.assertEqual(c.host.healthReason, "failed active health check: status 503")
        self.assertEqual(c.stat("health_check.network_failure"), 0)

    def test_immediateFailResetsBody(self):
        """
        An immediate-fail head is the verdict at once, body or not; the stream is then reset (CANCEL).
        """
        c = h2Checked()
        peer = h2Accept(c)
        peer.respond(200, extra=[(b"x-envoy-immediate-health-check-fail", b"true")], body=b"x")
        self.assertEqual(c.host.healthReason,
                         "failed active health check: immediate health check fail (status 200)")
        resets = [e for e in peer.read() if isinstance(e, StreamReset)]
        self.assertEqual([(e.stream_id, e.error_code) for e in resets], [(1, ErrorCodes.CANCEL)])

    def test_invalidStatus(self):
        """
        A C{:status} that is not three ASCII digits (h2 passes any value) fails the check as a protocol
        error, a network failure, and aborts the connection.
        """
        for value in (b"abc", b"20", b"2000", b"099", b"600", b"\xd9\xa2\xd9\xa0\xd9\xa0", b" 20"):
            c = h2Checked()
            peer = h2Accept(c)
            peer.h2.config.validate_outbound_headers = False
            peer.h2.send_headers(1, [(b":status", value)], end_stream=True)
            peer.send()
            self.assertEqual(c.host.healthReason, "failed active health check: protocol error: invalid :status",
                             value)
            self.assertEqual(c.stat("health_check.network_failure"), 1)
            self.assertTrue(peer.pending.transport.disconnected)

    def test_finalStatus(self):
        """
        L{finalStatus} accepts exactly three ASCII digits from 200 to 599.
        """
        self.assertEqual([finalStatus(v) for v in (b"200", b"404", b"599", b"199", b"600", b"2a0", b"20", b"")],
                         [200, 404, 599, 0, 0, 0, 0, 0])

    def test_endedStreamNotReset(self):
        """
        A stream the host ended with its response is not reset.
        """
        c = h2Checked()
        peer = h2Accept(c)
        peer.respond(200)
        self.assertEqual([e for e in peer.read() if isinstance(e, StreamReset)], [])

    def test_timeout(self):
        """
        No answer within C{timeout}: the connection is aborted and the check fails as a network failure.
        """
        c = h2Checked()
        peer = h2Accept(c)
        c.clock.advance(1)
        self.assertTrue(peer.pending.transport.disconnected)
        self.assertEqual(c.host.healthReason, "failed active health check: timeout")
        self.assertEqual(c.stat("health_check.network_failure"), 1)

    def test_streamReset(self):
        """
        A RST_STREAM instead of an answer fails the check as a network failure, naming the error.
        """
        c = h2Checked()
        peer = h2Accept(c)
        peer.h2.reset_stream(1, ErrorCodes.REFUSED_STREAM)
        peer.send()
        self.assertEqual(c.host.healthReason, "failed active health check: stream reset (REFUSED_STREAM)")
        self.assertEqual(c.stat("health_check.network_failure"), 1)

    def test_goAwayThenAnswer(self):
        """
        A graceful GOAWAY that covers the check's stream lets it be answered; then the connection is closed
        (with our GOAWAY) and the next check makes a new one.
        """
        c = h2Checked()
        peer = h2Accept(c)
        peer.requests()
        peer.goAway(last=1)
        self.assertTrue(c.inFlight())
        peer.respond(200, sid=1)
        self.assertTrue(c.host.healthy)
        self.assertTrue(peer.pending.transport.disconnecting)
        self.assertTrue(any(isinstance(e, ConnectionTerminated) for e in peer.read()))
        c.next()
        self.assertEqual(len(c.endpoints[0].attempts), 2)

    def test_goAwayWithError(self):
        """
        A GOAWAY with an error code fails the check in flight.
        """
        c = h2Checked()
        peer = h2Accept(c)
        peer.requests()
        peer.goAway(last=1, code=ErrorCodes.INTERNAL_ERROR)
        self.assertEqual(c.host.healthReason, "failed active health check: GOAWAY (INTERNAL_ERROR)")
        self.assertTrue(peer.pending.transport.disconnected)

    def test_goAwayUnprocessedFresh(self):
        """
        A fresh connection's GOAWAY that did not take the check's stream fails the check.
        """
        c = h2Checked()
        peer = h2Accept(c)
        peer.goAway(last=0)
        self.assertEqual(c.host.healthReason, "failed active health check: GOAWAY before a response")

    def test_goAwayWhileIdle(self):
        """
        A GOAWAY on a kept connection between checks closes it; the next check connects again.
        """
        c = h2Checked()
        peer = h2Accept(c)
        peer.respond(200)
        peer.goAway(last=1)
        self.assertTrue(peer.pending.transport.disconnecting)
        c.next()
        self.assertEqual(len(c.endpoints[0].attempts), 2)
        self.assertEqual(c.stat("health_check.failure"), 0)

    def test_http1Host(self):
        """
        A host that answers the preface in HTTP/1.1 fails the check at once, saying so (even byte by byte).
        """
        c = h2Checked()
        pending = c.endpoints[0].last
        pending.accept()
        for byte in b"HTTP/1.1 400 Bad Request\r\n\r\n"[:5]:
            pending.protocol.dataReceived(bytes([byte]))
        self.assertEqual(c.host.healthReason,
                         "failed active health check: protocol error: the host answered in HTTP/1.x, not HTTP/2")
        self.assertTrue(pending.transport.disconnected)
        self.assertEqual(c.stat("health_check.network_failure"), 1)

    def test_protocolError(self):
        """
        A frame h2 rejects fails the check with the protocol error, and GOAWAY goes out before the close.
        """
        c = h2Checked()
        peer = h2Accept(c)
        # A DATA frame on stream 0 is a connection error.
        peer.pending.protocol.dataReceived(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
        self.assertTrue(c.host.healthReason.startswith("failed active health check: protocol error: "),
                        c.host.healthReason)
        self.assertTrue(peer.pending.transport.disconnecting)
        [goaway] = [e for e in peer.read() if isinstance(e, ConnectionTerminated)]
        self.assertEqual(goaway.error_code, ErrorCodes.PROTOCOL_ERROR)
        self.assertEqual(c.stat("health_check.network_failure"), 1)

    def test_closedBeforeResponse(self):
        """
        A fresh connection closed before the answer fails the check.
        """
        c = h2Checked()
        peer = h2Accept(c)
        peer.pending.protocol.connectionLost(None)
        self.assertEqual(c.host.healthReason, "failed active health check: connection closed before a response")

    def test_alpnMismatch(self):
        """
        Over TLS, a host that negotiated http/1.1 by ALPN fails the check; one that negotiated h2 passes.
        """
        c = h2Checked()
        transport = c.endpoints[0].last.handshake(b"http/1.1")
        self.assertEqual(c.host.healthReason,
                         "failed active health check: protocol error: ALPN negotiated http/1.1, not h2")
        self.assertTrue(transport.disconnected)
        c.next()
        peer = h2Accept(c, TLSStringTransport(b"h2"))
        peer.pending.protocol.handshakeCompleted()
        peer.respond(200)
        self.assertEqual((c.stat("health_check.success"), c.stat("health_check.failure")), (1, 1))

    def test_tlsScheme(self):
        """
        A TLS cluster's checks say C{:scheme https}.
        """
        c = Checked({"health.path": "/"}, protocol="http2")
        c.cluster.tls = object()  # what the scheme is chosen by; the endpoints are fakes anyway
        checker = HealthChecker(c.cluster, c.config, c.clock, Random(0))
        self.assertIn((b":scheme", b"https"), checker.h2Request)


class H2ReuseTests(unittest.TestCase):
    """
    HTTP/2 checks reuse their connection: a new stream per check.
    """

    def test_streamsOnOneConnection(self):
        """
        Three checks are streams 1, 3 and 5 of one connection.
        """
        c = h2Checked()
        peer = h2Accept(c)
        for _ in range(3):
            peer.respond(200)
            c.next()
        self.assertEqual([r.stream_id for r in peer.requests()], [1, 3, 5, 7])
        self.assertEqual(len(c.endpoints[0].attempts), 1)
        self.assertEqual((c.stat("health_check.attempt"), c.stat("health_check.success")), (4, 3))

    def test_failureKeepsConnection(self):
        """
        A failing status keeps the connection; a network failure (timeout) drops it.
        """
        c = h2Checked()
        peer = h2Accept(c)
        peer.respond(503)
        c.next()
        self.assertEqual(len(c.endpoints[0].attempts), 1)
        c.clock.advance(1)
        self.assertTrue(peer.pending.transport.disconnected)
        peer.pending.protocol.connectionLost(None)
        c.next()
        self.assertEqual(len(c.endpoints[0].attempts), 2)

    def test_reconnectAfterPeerCloses(self):
        """
        A kept connection the host closes between checks is forgotten: the next check connects again and
        starts over at stream 1.
        """
        c = h2Checked()
        peer = h2Accept(c)
        peer.respond(200)
        peer.pending.protocol.connectionLost(None)
        c.next()
        second = h2Accept(c)
        self.assertEqual([r.stream_id for r in second.requests()], [1])
        second.respond(200)
        self.assertEqual((c.stat("health_check.success"), c.stat("health_check.failure")), (2, 0))

    def test_staleGoAwayRetried(self):
        """
        A reused connection's GOAWAY that did not take the check's stream sends the check again on a new
        connection: the host retired an idle connection, it did not fail.
        """
        c = h2Checked()
        peer = h2Accept(c)
        peer.respond(200)
        c.next()
        peer.goAway(last=1)
        self.assertEqual(len(c.endpoints[0].attempts), 2)
        self.assertTrue(peer.pending.transport.disconnecting)
        second = h2Accept(c)
        second.respond(200)
        self.assertEqual([c.stat("health_check." + n) for n in ("attempt", "success", "failure")], [2, 2, 0])

    def test_staleCloseRetried(self):
        """
        A reused connection closed before any of the answer came: the check goes again on a new connection.
        """
        c = h2Checked()
        peer = h2Accept(c)
        peer.respond(200)
        c.next()
        peer.pending.protocol.connectionLost(None)
        h2Accept(c).respond(503)
        self.assertEqual(c.checker.checkers[c.host].failures, 1)
        self.assertEqual(c.host.healthReason,
                         "healthy: last check failed (status 503), 1 of 3 failing checks to become unhealthy")

    def test_noReuse(self):
        """
        With C{reuse_connection = false} each check has its own connection, closed with GOAWAY after the
        verdict.
        """
        c = h2Checked({"health.path": "/", "health.reuse_connection": "false"})
        peer = h2Accept(c)
        peer.respond(200)
        self.assertTrue(peer.pending.transport.disconnecting)
        [goaway] = [e for e in peer.read() if isinstance(e, ConnectionTerminated)]
        self.assertEqual(goaway.error_code, ErrorCodes.NO_ERROR)
        c.next()
        second = h2Accept(c)
        self.assertEqual([r.stream_id for r in second.requests()], [1])

    def test_stopSaysGoAway(self):
        """
        Stopping the checker closes the kept connection with GOAWAY.
        """
        c = h2Checked()
        peer = h2Accept(c)
        peer.respond(200)
        c.checker.stop()
        self.assertTrue(peer.pending.transport.disconnecting)
        self.assertTrue(any(isinstance(e, ConnectionTerminated) for e in peer.read()))

    def test_pingAnsweredWhileIdle(self):
        """
        A kept connection answers the host's PINGs between checks (h2 does; we flush it).
        """
        c = h2Checked()
        peer = h2Accept(c)
        peer.respond(200)
        peer.h2.ping(b"12345678")
        peer.send()
        self.assertTrue(any(isinstance(e, PingAckReceived) for e in peer.read()))

    def test_noStreamRoomNotReused(self):
        """
        A kept connection whose host lowered C{SETTINGS_MAX_CONCURRENT_STREAMS} to 0 is not reused: the next
        check closes it (GOAWAY) and connects afresh, where the host's refusal fails the check clearly.
        """
        c = h2Checked()
        peer = h2Accept(c)
        peer.respond(200)
        peer.h2.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 0})
        peer.send()
        c.next()  # raised TooManyStreamsError out of the timer before
        self.assertTrue(peer.pending.transport.disconnecting)
        self.assertTrue(any(isinstance(e, ConnectionTerminated) for e in peer.read()))
        self.assertEqual(len(c.endpoints[0].attempts), 2)
        fresh = h2Accept(c)
        [request] = fresh.requests()
        fresh.h2.reset_stream(request.stream_id, ErrorCodes.REFUSED_STREAM)
        fresh.send()
        self.assertEqual(c.host.healthReason, "healthy: last check failed (stream reset (REFUSED_STREAM)), "
                         "1 of 3 failing checks to become unhealthy")

    def test_streamRefusedByH2(self):
        """
        Should h2 refuse the stream of a connection that looked reusable, the check goes out on a new
        connection within the same timeout, and the old one is closed.
        """
        c = h2Checked()
        peer = h2Accept(c)
        peer.respond(200)
        kept = c.checker.checkers[c.host].connection

        def refuse(*args, **kwargs):
            raise TooManyStreamsError("no room")

        kept.h2.send_headers = refuse
        c.next()
        self.assertTrue(peer.pending.transport.disconnecting)
        self.assertEqual(len(c.endpoints[0].attempts), 2)
        self.assertTrue(c.inFlight())
        fresh = h2Accept(c)
        fresh.respond(200)
        self.assertEqual((c.stat("health_check.success"), c.stat("health_check.failure")), (2, 0))
        # The old connection's close says nothing about the check that left it.
        peer.pending.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(c.host.healthReason, "healthy: last check passed")


class PausingTransport(StringTransport):
    """
    A L{StringTransport} whose host does not read: like a socket's, it pauses its streaming producer once
    more than C{bufferSize} bytes wait to be written, and resumes it when the test drains it.
    """

    bufferSize = 65536

    def write(self, data: bytes) -> None:
        """
        Buffer C{data}; pause the producer when the buffer is full.
        """
        super().write(data)
        if self.producer is not None and self.streaming and len(self.io.getvalue()) > self.bufferSize \
                and self.producerState == "producing":
            self.producerState = "paused"
            self.producer.pauseProducing()

    def drain(self) -> None:
        """
        The host read everything: empty the buffer and resume the producer.
        """
        self.clear()
        if self.producer is not None and self.producerState == "paused":
            self.producerState = "producing"
            self.producer.resumeProducing()


def pings(n: int) -> bytes:
    """
    C{n} serialized PING frames.
    """
    frame = PingFrame(0)
    frame.opaque_data = b"12345678"
    return frame.serialize() * n


class H2ControlFloodTests(unittest.TestCase):
    """
    The control frames h2 queues in answer to a host's are capped (1000 not taken by a writing transport).
    """

    def test_floodWhileIdleAborts(self):
        """
        A host that floods a kept connection with PINGs and reads nothing gets it aborted once the
        transport is full and 1000 more answers are queued; counted, and no verdict changes.
        """
        c = h2Checked()
        peer = h2Accept(c, PausingTransport())
        peer.respond(200)
        transport = peer.pending.transport
        frame = pings(1)
        sent = 0
        while not transport.disconnected and sent < 100000:
            peer.pending.protocol.dataReceived(frame)
            sent += 1
        self.assertTrue(transport.disconnected)
        # The transport's 64 KiB, then 1000 answers more (17 bytes each): bounded, at about 81 KiB.
        self.assertLess(len(transport.value()), 65536 + 1001 * 17 + 17)
        self.assertEqual(c.stat("health_check.outbound_control_flood"), 1)
        self.assertEqual((c.host.healthReason, c.stat("health_check.failure")), ("healthy: last check passed", 0))
        c.next()
        self.assertEqual(len(c.endpoints[0].attempts), 2)

    def test_floodInOneRead(self):
        """
        More than 1000 answers to one read are a flood even while the transport writes; a check in flight
        fails with it.
        """
        c = h2Checked()
        peer = h2Accept(c)
        peer.pending.protocol.dataReceived(pings(1001))
        self.assertTrue(peer.pending.transport.disconnected)
        self.assertEqual(c.host.healthReason,
                         "failed active health check: protocol error: too many control frames queued")
        self.assertEqual((c.stat("health_check.outbound_control_flood"),
                          c.stat("health_check.network_failure")), (1, 1))

    def test_readingHostNotCut(self):
        """
        A host that reads the answers may send any number of PINGs over time, and up to 1000 in one read.
        """
        c = h2Checked()
        peer = h2Accept(c, PausingTransport())
        peer.respond(200)
        transport = peer.pending.transport
        for _ in range(10):
            peer.pending.protocol.dataReceived(pings(1000))
            transport.drain()
        self.assertFalse(transport.disconnected)
        self.assertEqual(c.stat("health_check.outbound_control_flood"), 0)
        c.next()
        peer.respond(200)
        self.assertEqual((c.stat("health_check.success"), len(c.endpoints[0].attempts)), (2, 1))


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
        self.assertFalse(c.inFlight())
        c.clock.advance(0.001)
        self.assertTrue(c.inFlight())
        self.assertEqual(c.stat("health_check.attempt"), 2)

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
        connections = []
        build = wrapper.buildProtocol
        wrapper.buildProtocol = lambda addr: connections.append(addr) or build(addr)
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
        # Every check went on one keep-alive connection.
        self.assertGreaterEqual(len(origin.seen), 4)
        self.assertEqual(len(connections), 1)
        # Stop now and let every check connection close before trial inspects the reactor.
        checker.stop()
        yield waitFor(lambda: not wrapper.protocols)
        yield deferLater(reactor, 0.05, lambda: None)

    @defer.inlineCallbacks
    def test_stallingBody(self):
        """
        A real host that answers C{200} with C{content-length: 10} and sends 4 bytes of it is not healthy:
        the check times out; one that then hangs up fails as a close mid-body.
        """
        hangUp = []

        class Staller(protocol.Protocol):
            def dataReceived(self, data: bytes) -> None:
                self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\npart")
                if hangUp:
                    self.transport.loseConnection()

        factory = protocol.Factory.forProtocol(Staller)
        factory.noisy = False
        wrapper = WrappingFactory(factory)
        port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(wrapper)
        self.addCleanup(port.stopListening)
        checker = self.checker(f"tcp:127.0.0.1:{port.getHost().port}", {
            "health.path": "/healthz", "health.interval": "50ms", "health.timeout": "200ms",
        })
        host = checker.cluster.hosts[0]
        yield waitFor(lambda: host.healthReason != "pending first health check")
        self.assertEqual((host.healthy, host.healthReason), (
            False, "failed active health check: timeout before the response ended (status 200)"))
        hangUp.append(True)
        yield waitFor(lambda: "closed" in host.healthReason)
        self.assertEqual((host.healthy, host.healthReason), (
            False, "failed active health check: connection closed before the response ended (status 200)"))
        checker.stop()
        yield waitFor(lambda: not wrapper.protocols)

    @defer.inlineCallbacks
    def test_h2PingFlood(self):
        """
        A real HTTP/2 host that answers one check, then stops reading and floods the kept connection with
        PINGs gets that connection aborted by the cap on queued answers (counted), not buffered without end.
        """
        flooders = []

        class Flooder(protocol.Protocol):
            def connectionMade(self) -> None:
                self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
                self.h2.initiate_connection()
                self.transport.write(self.h2.data_to_send())
                self.sent = 0
                self.lost = False
                flooders.append(self)

            def dataReceived(self, data: bytes) -> None:
                for event in self.h2.receive_data(data):
                    if isinstance(event, RequestReceived):
                        self.h2.send_headers(event.stream_id, [(b":status", b"200")], end_stream=True)
                        self.transport.write(self.h2.data_to_send())
                        self.transport.pauseProducing()  # read nothing more
                        # Once the check has had its answer, so that the flood alone is judged.
                        reactor.callLater(0.05, self.flood)

            def flood(self) -> None:
                # Bounded: 2000 PINGs a turn, 200 turns at most (6.8 MB).
                if self.lost or self.sent >= 400000:
                    return
                self.transport.write(pings(2000))
                self.sent += 2000
                reactor.callLater(0, self.flood)

            def connectionLost(self, reason=None) -> None:
                self.lost = True

        factory = protocol.Factory.forProtocol(Flooder)
        factory.noisy = False
        port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        config = ClusterConfig("api", (HostConfig(f"tcp:127.0.0.1:{port.getHost().port}"),), protocol="http2")
        cluster = Cluster(config, reactor, StatsStore())
        health, errors = parse({"health.path": "/healthz", "health.interval": "1h", "health.timeout": "2s"})
        checker = HealthChecker(cluster, health, reactor, Random(0))
        checker.start()
        self.addCleanup(checker.stop)
        yield waitFor(lambda: flooders and (flooders[0].lost or flooders[0].sent >= 400000))
        [flooder] = flooders
        self.assertLess(flooder.sent, 400000)
        self.assertEqual(checker.outbound_control_flood.value, 1)
        self.assertEqual(checker.success.value, 1)
        self.assertTrue(cluster.hosts[0].healthy)  # the check had passed; the abort judges nothing

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


class H2Host(protocol.Protocol):
    """
    A real HTTP/2 host (h2c with prior knowledge, or h2 over TLS): answers every request with its
    factory's C{status} and the body C{ok}, recording the connection, stream id and fields of each.
    """

    def connectionMade(self) -> None:
        """
        Send the server preface.
        """
        self.factory.connections.append(self)
        self.factory.open.add(self)
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.h2.initiate_connection()
        self.transport.write(self.h2.data_to_send())

    def dataReceived(self, data: bytes) -> None:
        """
        Answer each request; close on the client's GOAWAY or a protocol error.
        """
        try:
            events = self.h2.receive_data(data)
        except H2ProtocolError:
            self.transport.loseConnection()
            return
        for event in events:
            if isinstance(event, RequestReceived):
                factory = self.factory
                factory.requests.append((self, event.stream_id, event.headers))
                if factory.refuse and len(factory.requests) > 1:
                    self.h2.reset_stream(event.stream_id, ErrorCodes.REFUSED_STREAM)
                    continue
                self.h2.send_headers(event.stream_id, [(b":status", b"%d" % factory.status),
                                                       (b"content-length", b"10")])
                # A stalling host sends part of the body and never the rest.
                self.h2.send_data(event.stream_id, b"ok" if factory.stall else b"ok" * 5,
                                  end_stream=not factory.stall)
                if factory.refuse:
                    # No stream more: on this connection, nor (once acknowledged) on any other.
                    self.h2.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 0})
            elif isinstance(event, ConnectionTerminated):
                self.transport.loseConnection()
        self.transport.write(self.h2.data_to_send())

    def connectionLost(self, reason=None) -> None:
        """
        Forget the connection; fire the waiters once none is open.
        """
        self.factory.open.discard(self)
        if not self.factory.open:
            waiters, self.factory.waiters = self.factory.waiters, []
            for d in waiters:
                d.callback(None)


class H2HostFactory(protocol.Factory):
    """
    Builds L{H2Host}s and keeps what they saw.

    @ivar status: the status every request gets.
    @ivar stall: answer with the head and 2 of the 10 bytes of the body, then nothing.
    @ivar refuse: after the first request, advertise C{SETTINGS_MAX_CONCURRENT_STREAMS = 0} and refuse
        every stream (REFUSED_STREAM).
    @ivar connections: every connection made, in order.
    @ivar requests: C{(connection, stream id, fields)} of every request.
    """

    protocol = H2Host
    noisy = False

    def __init__(self) -> None:
        self.status = 200
        self.stall = False
        self.refuse = False
        self.connections: List[H2Host] = []
        self.open = set()
        self.requests: List[tuple] = []
        self.waiters: List[defer.Deferred] = []

    def whenAllClosed(self) -> defer.Deferred:
        """
        Fires once no connection is open.
        """
        if not self.open:
            return defer.succeed(None)
        d = defer.Deferred()
        self.waiters.append(d)
        return d


class H2LoopbackTests(unittest.TestCase):
    """
    HTTP/2 health checks of real hosts, through a L{MeshService} on loopback, as C{/clusters} shows them.
    """

    timeout = 30

    @defer.inlineCallbacks
    def startMesh(self, clusters: str):
        """
        A started service with the admin endpoint, a listener and C{clusters} (stopped at cleanup).
        """
        mesh = "admin = tcp:0:interface=127.0.0.1\ndrain_timeout = 1s\n"
        service = startService(self, proxyConfig("origin", clusters, mesh=mesh, listener="web"), seed=3)
        yield service.whenLive
        return service

    def serveH2(self, options=None) -> "tuple[H2HostFactory, str]":
        """
        An HTTP/2 host listening on a loopback port, over TLS with C{options} (else h2c), until the test
        ends and its connections have closed; return it and its endpoint string.
        """
        origin = H2HostFactory()
        if options is None:
            port = reactor.listenTCP(0, origin, interface="127.0.0.1")
        else:
            port = reactor.listenSSL(0, origin, options, interface="127.0.0.1")
        self.addCleanup(origin.whenAllClosed)
        self.addCleanup(port.stopListening)
        return origin, f"tcp:127.0.0.1:{port.getHost().port}"

    @defer.inlineCallbacks
    def clustersPage(self, service) -> "defer.Deferred[str]":
        """
        The admin C{/clusters} page's text.
        """
        response = yield treq.get(f"http://127.0.0.1:{service.admin.port.getHost().port}/clusters",
                                  persistent=False)
        text = yield response.text()
        return text

    @defer.inlineCallbacks
    def test_h2cToggle(self):
        """
        An h2c host behind a C{protocol = http2} cluster turns healthy, then unhealthy when it answers 503,
        as C{/clusters} shows; every check is a new stream of one connection.
        """
        origin, endpoint = self.serveH2()
        service = yield self.startMesh(f"""
[cluster:origin]
endpoints = {endpoint}
protocol = http2
health.path = /healthz
health.interval = 50ms
health.no_traffic_interval = 50ms
health.unhealthy_threshold = 2
health.timeout = 2s
""")
        host = service.clusters["origin"].hosts[0]
        yield waitFor(lambda: host.healthy)
        page = yield self.clustersPage(service)
        self.assertIn(f"origin::{endpoint}::health_flags::healthy", page)
        self.assertIn(f"origin::{endpoint}::health_reason::healthy: last check passed", page)
        origin.status = 503
        yield waitFor(lambda: not host.healthy)
        page = yield self.clustersPage(service)
        self.assertIn(f"origin::{endpoint}::health_flags::/failed_active_hc", page)
        self.assertIn(f"origin::{endpoint}::health_reason::failed active health check: status 503", page)
        [conn] = origin.connections
        self.assertGreaterEqual(len(origin.requests), 3)
        self.assertEqual([sid for _, sid, _ in origin.requests], list(range(1, 2 * len(origin.requests), 2)))
        self.assertTrue(all(c is conn for c, _, _ in origin.requests))
        fields = origin.requests[0][2]
        self.assertIn((b":authority", b"origin"), fields)
        self.assertIn((b":scheme", b"http"), fields)
        self.assertIn((b"user-agent", b"twistedmesh-health-check"), fields)

    @defer.inlineCallbacks
    def test_tlsALPN(self):
        """
        Over TLS the check negotiates h2 by ALPN with the cluster's certificates and passes.
        """
        from twisted.internet.ssl import CertificateOptions

        from .test_tls import standardPKI

        pki = standardPKI(self.mktemp())
        cert = pki.twistedClient("server")
        options = CertificateOptions(privateKey=cert.privateKey.original, certificate=cert.original,
                                     acceptableProtocols=[b"h2"])
        origin, endpoint = self.serveH2(options)
        service = yield self.startMesh(f"""
[cluster:origin]
endpoints = {endpoint}
protocol = http2
tls = up
health.path = /healthz
health.host = api.internal
health.interval = 50ms
health.no_traffic_interval = 50ms
health.timeout = 2s
[tls:up]
ca = {pki.ca}
sni = localhost
""")
        host = service.clusters["origin"].hosts[0]
        yield waitFor(lambda: host.healthy)
        yield waitFor(lambda: len(origin.requests) >= 2)
        [conn] = origin.connections
        self.assertEqual(conn.transport.negotiatedProtocol, b"h2")
        fields = origin.requests[0][2]
        self.assertIn((b":scheme", b"https"), fields)
        self.assertIn((b":authority", b"api.internal"), fields)
        page = yield self.clustersPage(service)
        self.assertIn(f"origin::{endpoint}::health_flags::healthy", page)

    @defer.inlineCallbacks
    def test_http1OnlyHost(self):
        """
        An HTTP/1.1-only host behind an HTTP/2 cluster fails its checks, saying why.
        """
        wrapper = WrappingFactory(QuietSite(Toggle()))
        port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(wrapper)
        self.addCleanup(port.stopListening)
        service = yield self.startMesh(f"""
[cluster:origin]
endpoints = tcp:127.0.0.1:{port.getHost().port}
protocol = http2
health.path = /healthz
health.interval = 50ms
""")
        host = service.clusters["origin"].hosts[0]
        yield waitFor(lambda: host.healthReason != "pending first health check")
        self.assertEqual(host.healthReason,
                         "failed active health check: protocol error: the host answered in HTTP/1.x, not HTTP/2")
        yield service.stopService()
        yield waitFor(lambda: not wrapper.protocols)

    @defer.inlineCallbacks
    def test_stallingBody(self):
        """
        A host that answers C{200} and stalls mid-body never turns healthy: each check times out.
        """
        origin, endpoint = self.serveH2()
        origin.stall = True
        service = yield self.startMesh(f"""
[cluster:origin]
endpoints = {endpoint}
protocol = http2
health.path = /healthz
health.interval = 50ms
health.timeout = 200ms
""")
        host = service.clusters["origin"].hosts[0]
        yield waitFor(lambda: host.healthReason != "pending first health check")
        self.assertEqual((host.healthy, host.healthReason), (
            False, "failed active health check: timeout before the response ended (status 200)"))

    @defer.inlineCallbacks
    def test_noStreamsLeft(self):
        """
        A host that passes once, then advertises C{SETTINGS_MAX_CONCURRENT_STREAMS = 0} and refuses
        streams: the kept connection is not reused (nothing raises), and the fresh connection's refused
        stream fails the checks.
        """
        origin, endpoint = self.serveH2()
        origin.refuse = True
        service = yield self.startMesh(f"""
[cluster:origin]
endpoints = {endpoint}
protocol = http2
health.path = /healthz
health.interval = 50ms
health.no_traffic_interval = 50ms
health.unhealthy_threshold = 2
health.timeout = 2s
""")
        host = service.clusters["origin"].hosts[0]
        yield waitFor(lambda: host.healthy)
        yield waitFor(lambda: not host.healthy)
        self.assertEqual(host.healthReason, "failed active health check: stream reset (REFUSED_STREAM)")
        self.assertGreaterEqual(len(origin.connections), 2)
        # The first connection carried one stream only: the next check did not try it again.
        self.assertEqual(sum(1 for conn, _, _ in origin.requests if conn is origin.connections[0]), 1)


class NginxHealthTests(unittest.TestCase):
    """
    nginx serving h2c only (C{listen ... http2} on a plain port), where installed: HTTP/2 checks pass and
    fail by status; an HTTP/1.1 check of the same host cannot pass.
    """

    timeout = 30

    @defer.inlineCallbacks
    def test_nginx(self):
        """
        C{/healthz} (200) makes one cluster's host healthy, C{/down} (503) another's unhealthy, and
        C{health.codec = http1} fails against the h2c-only port.
        """
        number, _ = yield startNginx(self, """
        location = /healthz { return 200 "ok\\n"; }
        location = /down { return 503 "down\\n"; }
""")
        endpoint = f"tcp:127.0.0.1:{number}"
        checks = "health.interval = 50ms\nhealth.no_traffic_interval = 50ms\nhealth.timeout = 2s\n"
        service = startService(self, f"""
[mesh]
admin = off
[cluster:origin]
endpoints = {endpoint}
protocol = http2
health.path = /healthz
{checks}
[cluster:broken]
endpoints = {endpoint}
protocol = http2
health.path = /down
{checks}
[cluster:old]
endpoints = {endpoint}
protocol = http2
health.path = /healthz
health.codec = http1
{checks}
""", seed=3)
        good, bad, old = (service.clusters[n].hosts[0] for n in ("origin", "broken", "old"))
        yield waitFor(lambda: good.healthy and "pending" not in bad.healthReason + old.healthReason)
        self.assertEqual(bad.healthReason, "failed active health check: status 503")
        self.assertEqual(old.healthReason,
                         "failed active health check: protocol error: the host answered in HTTP/2, not HTTP/1.1")
        checker = service.clusters["origin"].healthChecker
        yield waitFor(lambda: checker.success.value >= 3)
        # Three checks or more, all on one connection (kept between checks, or carrying one now).
        self.assertEqual(service.stats.get("cluster.origin.health_check.network_failure").value, 0)
        hc = checker.checkers[good]
        conn = hc.connection if hc.connection is not None else hc.attempt.conn
        self.assertGreaterEqual(conn.checks, 3)
