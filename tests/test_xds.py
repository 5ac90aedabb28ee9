"""
Tests for L{twistedmesh.upstream.xds}: the EDS client's state machine against canned responses on a Clock
(ACK, NACK, 304, timeouts, malformed JSON, field spellings, Any, durations, wrappers), and a control plane
(examples/xds_control_plane) on loopback changing endpoints while requests flow through the proxy.
"""

import importlib.util
import json
import os
from random import Random
from typing import Any, Dict, List

import treq
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Site

from twistedmesh.config import loadString
from twistedmesh.observability.stats import StatsStore
from twistedmesh.upstream.cluster import buildClusters
from twistedmesh.upstream.xds import (
    EDS_TYPE_URL, MAX_UNKNOWN_FIELDS, InvalidResource, _BoundedBody, parseAssignment, parseDuration,
)

from .support import Traffic, port, proxyConfig, serveWhoami, startService, waitFor

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(os.path.dirname(HERE), "examples", "xds_control_plane", "control_plane.py")

CONFIG = """
[mesh]
admin = off
xds.cluster = cp
xds.refresh_delay = 2s
xds.jitter = 10%
xds.timeout = 1s
xds.node_id = proxy-1
xds.node_cluster = edge
[cluster:cp]
endpoints = tcp:127.0.0.1:18000
[cluster:api]
discovery = xds
[cluster:web]
discovery = xds
service_name = web-svc
"""


def _lb(address: str, port: int, **extra) -> Dict[str, Any]:
    lb = {"endpoint": {"address": {"socket_address": {"address": address, "port_value": port}}}}
    lb.update(extra)
    return lb


def _cla(name: str, *lbEndpoints, typed: bool = True, **extra) -> Dict[str, Any]:
    cla: Dict[str, Any] = {"cluster_name": name, "endpoints": [{"lb_endpoints": list(lbEndpoints)}]}
    if typed:
        cla["@type"] = EDS_TYPE_URL
    cla.update(extra)
    return cla


def _response(version: str, nonce: str, *resources) -> bytes:
    return json.dumps({"version_info": version, "nonce": nonce, "type_url": EDS_TYPE_URL,
                       "resources": list(resources)}).encode()


class Plane:
    """
    Canned control-plane answers: each request waits for the test to L{answer} it.
    """

    def __init__(self) -> None:
        self.requests: List[Dict[str, Any]] = []
        self.paths: List[str] = []
        self.pending: List[defer.Deferred] = []

    def post(self, path: str, body: bytes) -> defer.Deferred:
        self.paths.append(path)
        self.requests.append(json.loads(body))
        d = defer.Deferred()
        self.pending.append(d)
        return d

    def answer(self, status: int, body: bytes = b"") -> None:
        self.pending.pop(0).callback((status, body))


class Setup:
    """
    The clusters of L{CONFIG} on a Clock with the xDS client's requests going to a L{Plane}; started.
    """

    def __init__(self, text: str = CONFIG) -> None:
        self.clock = Clock()
        self.stats = StatsStore()
        config = loadString(text, "mesh.ini")
        self.clusters = buildClusters(config.clusters, self.clock, self.stats, Random(3), xds=config.mesh.xds)
        self.api = self.clusters["api"]
        self.client = self.api.discovery.client
        self.plane = Plane()
        self.client.post = self.plane.post
        for cluster in self.clusters.values():
            cluster.start()
        self.clock.advance(0)

    def stat(self, cluster: str, name: str) -> int:
        return self.stats.get(f"cluster.{cluster}.{name}").value

    def endpoints(self, cluster: str = "api") -> List[str]:
        return [h.endpoint for h in self.clusters[cluster].hosts]

    def nextPoll(self) -> None:
        """
        Run the clock to the next poll.
        """
        timer = self.client.eds._timer
        self.clock.advance(timer.getTime() - self.clock.seconds())


class ClientTests(SynchronousTestCase):
    """
    The client's requests and how it takes responses.
    """

    def test_firstRequest(self) -> None:
        """One request for every subscribed resource (sorted), with the node and no version yet."""
        s = Setup()
        self.assertEqual(s.plane.paths, ["/v3/discovery:endpoints"])
        self.assertEqual(s.plane.requests, [{
            "version_info": "", "node": {"id": "proxy-1", "cluster": "edge", "user_agent_name": "twistedmesh"},
            "resource_names": ["api", "web-svc"], "type_url": EDS_TYPE_URL, "response_nonce": "",
        }])
        self.assertEqual(s.stat("api", "update_attempt"), 1)

    def test_ack(self) -> None:
        """An accepted response is applied and ACKed: the next request carries its version and nonce."""
        s = Setup()
        s.plane.answer(200, _response("v1", "n1", _cla("api", _lb("10.0.0.1", 80), _lb("10.0.0.2", 81)),
                                      _cla("web-svc", _lb("10.0.1.1", 80))))
        self.assertEqual(s.endpoints(), ["tcp:host=10.0.0.1:port=80", "tcp:host=10.0.0.2:port=81"])
        self.assertEqual(s.endpoints("web"), ["tcp:host=10.0.1.1:port=80"])
        self.assertEqual(s.stat("api", "update_success"), 1)
        s.nextPoll()
        request = s.plane.requests[-1]
        self.assertEqual((request["version_info"], request["response_nonce"]), ("v1", "n1"))
        self.assertNotIn("error_detail", request)

    def test_nack(self) -> None:
        """An invalid resource rejects the whole update: hosts kept, previous version, error_detail sent."""
        s = Setup()
        s.plane.answer(200, _response("v1", "n1", _cla("api", _lb("10.0.0.1", 80))))
        s.nextPoll()
        s.plane.answer(200, _response("v2", "n2", _cla("web-svc", _lb("10.0.1.1", 80)),
                                      _cla("api", _lb("10.0.0.9", 70000))))
        self.assertEqual(s.endpoints(), ["tcp:host=10.0.0.1:port=80"])
        self.assertEqual(s.endpoints("web"), [])  # the valid resource of a rejected update is not applied
        self.assertEqual(s.stat("api", "update_rejected"), 1)
        s.nextPoll()
        request = s.plane.requests[-1]
        self.assertEqual((request["version_info"], request["response_nonce"]), ("v1", "n2"))
        self.assertEqual(request["error_detail"]["code"], 3)
        self.assertIn("port_value", request["error_detail"]["message"])
        self.assertIn("70000", request["error_detail"]["message"])
        # A good update afterwards is ACKed and clears the error.
        s.plane.answer(200, _response("v3", "n3", _cla("api", _lb("10.0.0.3", 80))))
        s.nextPoll()
        self.assertNotIn("error_detail", s.plane.requests[-1])
        self.assertEqual(s.plane.requests[-1]["version_info"], "v3")

    def test_notModified(self) -> None:
        """304: nothing changes, and the next request still carries the version applied."""
        s = Setup()
        s.plane.answer(200, _response("v1", "n1", _cla("api", _lb("10.0.0.1", 80))))
        s.nextPoll()
        hosts = s.api.hosts
        s.plane.answer(304)
        self.assertIs(s.api.hosts, hosts)
        self.assertEqual((s.stat("api", "update_success"), s.stat("api", "update_failure")), (1, 0))
        s.nextPoll()
        self.assertEqual(s.plane.requests[-1]["version_info"], "v1")

    def test_timeout(self) -> None:
        """A request unanswered within xds.timeout is cancelled and counted; polling goes on."""
        s = Setup()
        pending = s.plane.pending[0]
        s.clock.advance(0.999)
        self.assertFalse(pending.called)
        s.clock.advance(0.001)
        self.assertTrue(pending.called)
        self.assertEqual(s.stat("api", "update_failure"), 1)
        s.nextPoll()
        self.assertEqual(len(s.plane.requests), 2)

    def test_httpError(self) -> None:
        """A non-200 answer is a failure: hosts kept, nothing ACKed or NACKed."""
        s = Setup()
        s.plane.answer(503, b"overloaded")
        self.assertEqual((s.stat("api", "update_failure"), s.stat("api", "update_rejected")), (1, 0))
        s.nextPoll()
        self.assertNotIn("error_detail", s.plane.requests[-1])

    def test_noControlPlaneHost(self) -> None:
        """With no healthy host in the control-plane cluster, a poll fails (counted) and polling goes on."""
        s = Setup()
        s.plane.answer(304)
        s.client.post = s.client._post  # the real HTTP client, over the control-plane cluster's hosts
        cp = s.clusters["cp"]
        cp.hosts[0].setHealthFlag("failed_active_hc", True)
        cp.healthChanged()
        s.nextPoll()
        self.assertEqual(s.stat("api", "update_failure"), 1)
        self.assertIsNotNone(s.client.eds._timer)

    def test_malformedJSON(self) -> None:
        """A body that is not JSON is rejected (NACK, with the last nonce known)."""
        s = Setup()
        s.plane.answer(200, _response("v1", "n1", _cla("api", _lb("10.0.0.1", 80))))
        s.nextPoll()
        s.plane.answer(200, b'{"version_info": "v2", ')
        self.assertEqual(s.endpoints(), ["tcp:host=10.0.0.1:port=80"])
        s.nextPoll()
        request = s.plane.requests[-1]
        self.assertEqual((request["version_info"], request["response_nonce"]), ("v1", "n1"))
        self.assertIn("not JSON", request["error_detail"]["message"])

    def test_unreadableInputIsNACKed(self) -> None:
        """Inputs Python refuses to convert are rejected like any invalid one (NACK with the nonce echoed,
        update_rejected counted), never dropped: a non-ASCII digit, thousands of digits, JSON nested too
        deep to decode, a duration of thousands of digits."""
        def deep(n: int) -> bytes:
            return b'{"nonce": "d", "resources": ' + b"[" * n + b"]" * n + b"}"

        bodies = [
            _response("v2", "sup", _cla("api", _lb("10.0.0.9", "\u00b2"))),
            _response("v2", "long", _cla("api", _lb("10.0.0.9", "9" * 5000))),
            _response("v2", "num", _cla("api", _lb("10.0.0.9", 8))).replace(b"8}", b"9" * 5000 + b"}"),
            _response("v2", "dur", _cla("api", _lb("10.0.0.9", 80),
                                        policy={"endpoint_stale_after": "9" * 5000 + "s"})),
            deep(100000),
        ]
        s = Setup()
        s.plane.answer(200, _response("v1", "n1", _cla("api", _lb("10.0.0.1", 80))))
        s.nextPoll()
        for i, body in enumerate(bodies):
            s.plane.answer(200, body)
            self.assertEqual(s.stat("api", "update_rejected"), i + 1)
            s.nextPoll()
            request = s.plane.requests[-1]
            self.assertEqual(request["version_info"], "v1")
            self.assertEqual(request["error_detail"]["code"], 3)
            self.assertEqual(request["response_nonce"], ["sup", "long", "num", "dur", "d"][i])
        self.assertEqual(s.endpoints(), ["tcp:host=10.0.0.1:port=80"])

    def test_unexpectedErrorIsNACKed(self) -> None:
        """Any exception from parsing (a bug) is a NACK too: the reason in error_detail, nonce echoed,
        update_rejected counted, the hosts kept."""
        s = Setup()
        s.plane.answer(200, _response("v1", "n1", _cla("api", _lb("10.0.0.1", 80))))
        s.nextPoll()

        def broken(value, path, unknown):
            raise KeyError("surprise")

        self.patch(s.client.eds.kind, "parseResource", broken)
        s.plane.answer(200, _response("v2", "n2", _cla("api", _lb("10.0.0.2", 80))))
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)
        self.assertEqual(s.stat("api", "update_rejected"), 1)
        s.nextPoll()
        request = s.plane.requests[-1]
        self.assertEqual((request["version_info"], request["response_nonce"]), ("v1", "n2"))
        self.assertIn("KeyError", request["error_detail"]["message"])
        self.assertEqual(s.endpoints(), ["tcp:host=10.0.0.1:port=80"])

    def test_jitter(self) -> None:
        """Polls come every refresh_delay plus up to jitter of it, drawn from the seeded random."""
        delays = []
        for _ in range(2):
            s = Setup()
            seen = []
            for _ in range(5):
                s.plane.answer(304)
                seen.append(s.client.eds._timer.getTime() - s.clock.seconds())
                s.nextPoll()
            delays.append(seen)
            for d in seen:
                self.assertTrue(2.0 <= d <= 2.2, d)
        self.assertEqual(delays[0], delays[1])
        self.assertGreater(len(set(delays[0])), 1)

    def test_missingResource(self) -> None:
        """A response without a cluster's resource leaves that cluster as it is (counted as empty)."""
        s = Setup()
        s.plane.answer(200, _response("v1", "n1", _cla("api", _lb("10.0.0.1", 80))))
        s.nextPoll()
        s.plane.answer(200, _response("v2", "n2", _cla("web-svc", _lb("10.0.1.1", 80))))
        self.assertEqual(s.endpoints(), ["tcp:host=10.0.0.1:port=80"])
        self.assertEqual(s.stat("api", "update_empty"), 1)

    def test_stop(self) -> None:
        """When the last subscription stops, the request in flight is cancelled and polling ends."""
        s = Setup()
        pending = s.plane.pending[0]
        for cluster in s.clusters.values():
            cluster.stop()
        self.assertTrue(pending.called)
        self.assertEqual(s.clock.getDelayedCalls(), [])
        self.assertEqual(s.stat("api", "update_failure"), 0)

    def test_newResourceAskedAtOnce(self) -> None:
        """A subscription to a resource not asked for yet sends the next request at once; one to a resource
        already asked for waits for the next poll."""
        s = Setup()
        s.plane.answer(304)
        text = CONFIG + "[cluster:same]\ndiscovery = xds\nservice_name = api\n[cluster:extra]\ndiscovery = xds\n"
        config = loadString(text, "mesh.ini")
        more = buildClusters({n: config.clusters[n] for n in ("same", "extra")}, s.clock, s.stats, Random(1),
                             xds=config.mesh.xds, xdsClient=s.client)
        more["same"].start()
        s.clock.advance(0)
        self.assertEqual(len(s.plane.requests), 1)
        more["extra"].start()
        s.clock.advance(0)
        self.assertEqual(len(s.plane.requests), 2)
        self.assertEqual(s.plane.requests[-1]["resource_names"], ["api", "extra", "web-svc"])

    def test_updatesFollowLive(self) -> None:
        """Endpoints come and go across versions; hosts that stay keep their object."""
        s = Setup()
        s.plane.answer(200, _response("v1", "n1", _cla("api", _lb("10.0.0.1", 80), _lb("10.0.0.2", 80))))
        kept = s.api.hosts[1]
        s.nextPoll()
        s.plane.answer(200, _response("v2", "n2", _cla("api", _lb("10.0.0.2", 80, load_balancing_weight=5),
                                                       _lb("10.0.0.3", 80))))
        self.assertEqual(s.endpoints(), ["tcp:host=10.0.0.2:port=80", "tcp:host=10.0.0.3:port=80"])
        self.assertIs(s.api.hosts[0], kept)
        self.assertEqual(kept.weight, 5)


class AssignmentTests(SynchronousTestCase):
    """
    Parsing one ClusterLoadAssignment: the subset honoured, spellings, and what is refused.
    """

    def parse(self, value, unknown=None):
        seen = [] if unknown is None else unknown
        return parseAssignment(value, "r", seen.append)

    def test_camelCase(self) -> None:
        """lowerCamelCase and snake_case field names give the same assignment."""
        snake = _cla("api", _lb("10.0.0.1", 80, load_balancing_weight=2, health_status="HEALTHY"))
        camel = {"@type": EDS_TYPE_URL, "clusterName": "api", "endpoints": [{"lbEndpoints": [
            {"endpoint": {"address": {"socketAddress": {"address": "10.0.0.1", "portValue": 80}}},
             "loadBalancingWeight": 2, "healthStatus": "HEALTHY"}]}]}
        self.assertEqual(self.parse(snake), self.parse(camel))
        self.assertEqual(self.parse(camel).hosts[0].weight, 2)

    def test_anyType(self) -> None:
        """A resource may be a bare message or an Any of the EDS type; another type is refused."""
        self.assertEqual(self.parse(_cla("api", _lb("10.0.0.1", 80), typed=False)).name, "api")
        wrong = _cla("api", _lb("10.0.0.1", 80))
        wrong["@type"] = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
        with self.assertRaises(InvalidResource) as caught:
            self.parse(wrong)
        self.assertIn("envoy.config.cluster.v3.Cluster", str(caught.exception))

    def test_wrappers(self) -> None:
        """Wrapper values may be bare, wrapped or numeric strings; zero, negatives and fractions are refused."""
        for weight in (3, {"value": 3}, "3", 3.0):
            assignment = self.parse(_cla("api", _lb("10.0.0.1", 80, load_balancing_weight=weight)))
            self.assertEqual(assignment.hosts[0].weight, 3, weight)
        for weight in (0, -1, 2.5, {"value": 0}, True, "x", {"value": 1, "other": 2}):
            self.assertRaises(InvalidResource, self.parse,
                              _cla("api", _lb("10.0.0.1", 80, load_balancing_weight=weight)))

    def test_durations(self) -> None:
        """Proto3 JSON durations, in seconds with up to nine decimals."""
        self.assertEqual(parseDuration("1.5s"), 1.5)
        self.assertEqual(parseDuration("3s"), 3.0)
        self.assertEqual(parseDuration("0.000000001s"), 1e-9)
        for bad in ("1.5", "-1s", "1.5ms", 1.5, "s", "1.0000000001s"):
            self.assertRaises(InvalidResource, parseDuration, bad)
        assignment = self.parse(_cla("api", _lb("10.0.0.1", 80), policy={"endpointStaleAfter": "2.5s"}))
        self.assertEqual(assignment.staleAfter, 2.5)

    def test_healthStatus(self) -> None:
        """UNHEALTHY, DRAINING and TIMEOUT endpoints are not used; HEALTHY, UNKNOWN, DEGRADED (and numbers) are."""
        assignment = self.parse(_cla(
            "api", _lb("10.0.0.1", 80, health_status="HEALTHY"), _lb("10.0.0.2", 80, health_status="UNHEALTHY"),
            _lb("10.0.0.3", 80, health_status="DRAINING"), _lb("10.0.0.4", 80), _lb("10.0.0.5", 80, health_status=3),
            _lb("10.0.0.6", 80, health_status="DEGRADED"), _lb("10.0.0.7", 80, health_status="TIMEOUT")))
        self.assertEqual([h.endpoint for h in assignment.hosts],
                         ["tcp:host=10.0.0.1:port=80", "tcp:host=10.0.0.4:port=80", "tcp:host=10.0.0.6:port=80"])
        self.assertEqual(assignment.listed, 7)
        self.assertRaises(InvalidResource, self.parse, _cla("api", _lb("10.0.0.1", 80, health_status="SICK")))

    def test_invalid(self) -> None:
        """Addresses must be IP addresses with a port; names, pipes and named ports are refused."""
        for lb in (_lb("api.internal", 80), _lb("10.0.0.1", 0), _lb("10.0.0.1", 65536),
                   {"endpoint": {"address": {"pipe": {"path": "/tmp/s"}}}},
                   {"endpoint": {"address": {"socket_address": {"address": "10.0.0.1", "named_port": "http"}}}},
                   {"endpoint": {"address": {"socket_address": {"address": "10.0.0.1", "port_value": 80,
                                                                "protocol": "UDP"}}}},
                   "not an object"):
            self.assertRaises(InvalidResource, self.parse, _cla("api", lb))
        self.assertRaises(InvalidResource, self.parse, {"endpoints": []})  # no cluster_name

    def test_asciiDigitsOnly(self) -> None:
        """A numeric string takes ASCII digits only, and not thousands of them; so does a duration."""
        for value in ("\u00b2", "\u0663", "8" * 21, " ", "-1", "1e3"):
            with self.assertRaises(InvalidResource):
                self.parse(_cla("api", _lb("10.0.0.1", value)))
        self.assertEqual(self.parse(_cla("api", _lb("10.0.0.1", " 80 "))).hosts[0].endpoint,
                         "tcp:host=10.0.0.1:port=80")
        for duration in ("\u00b2s", "1.\u00b2s", "9" * 13 + "s", "9" * 5000 + "s"):
            self.assertRaises(InvalidResource, parseDuration, duration)
        self.assertEqual(parseDuration("315576000000s"), 315576000000)

    def test_ipv6(self) -> None:
        """An IPv6 address becomes an escaped endpoint string."""
        assignment = self.parse(_cla("api", _lb("::1", 80)))
        self.assertEqual(assignment.hosts[0].endpoint, "tcp:host=\\:\\:1:port=80")

    def test_unknownIgnored(self) -> None:
        """Unknown fields are reported (for a log line) and otherwise ignored."""
        unknown: List[str] = []
        assignment = self.parse(_cla("api", _lb("10.0.0.1", 80, metadata={"a": 1}), named_endpoints={}), unknown)
        self.assertEqual(len(assignment.hosts), 1)
        self.assertEqual(sorted(unknown), ["r.endpoints[0].lb_endpoints[0].metadata", "r.named_endpoints"])

    def test_priorities(self) -> None:
        """The lowest priority with a usable endpoint is used: priority 1 takes over when 0 has none."""
        value = {"cluster_name": "api", "endpoints": [
            {"priority": 1, "lb_endpoints": [_lb("10.0.0.2", 80)]},
            {"lb_endpoints": [_lb("10.0.0.1", 80, health_status="UNHEALTHY")]},
        ]}
        self.assertEqual([h.endpoint for h in self.parse(value).hosts], ["tcp:host=10.0.0.2:port=80"])
        value["endpoints"][1]["lb_endpoints"][0]["health_status"] = "HEALTHY"
        self.assertEqual([h.endpoint for h in self.parse(value).hosts], ["tcp:host=10.0.0.1:port=80"])

    def test_hostnameIsServerName(self) -> None:
        """An endpoint's hostname is its TLS server name."""
        lb = _lb("10.0.0.1", 443)
        lb["endpoint"]["hostname"] = "api.internal"
        self.assertEqual(self.parse(_cla("api", lb)).hosts[0].server_name, "api.internal")


class BoundedBodyTests(SynchronousTestCase):
    """
    The response body reader of the HTTP client.
    """

    def test_tooLarge(self) -> None:
        """A body over the limit fails the poll and stops the download."""
        body = _BoundedBody(5)
        transport = StringTransport()
        body.makeConnection(transport)
        body.dataReceived(b"abc")
        body.dataReceived(b"def")
        self.failureResultOf(body.finished, ConnectionError)
        self.assertEqual(transport.producerState, "stopped")

    def test_complete(self) -> None:
        """A body within the limit is delivered whole when the response ends."""
        body = _BoundedBody(10)
        body.makeConnection(StringTransport())
        body.dataReceived(b"abc")
        body.dataReceived(b"def")
        body.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.successResultOf(body.finished), b"abcdef")


class StaleTests(SynchronousTestCase):
    """
    C{policy.endpoint_stale_after}.
    """

    def test_staleDropsEndpoints(self) -> None:
        """Without an update for endpoint_stale_after, the cluster's endpoints are dropped."""
        s = Setup()
        s.plane.answer(200, _response("v1", "n1", _cla("api", _lb("10.0.0.1", 80),
                                                       policy={"endpoint_stale_after": "5.5s"})))
        for _ in range(2):
            s.nextPoll()
            s.plane.answer(304)
        self.assertEqual(len(s.api.hosts), 1)
        while s.clock.seconds() < 5.5:
            s.nextPoll()
            s.plane.answer(304)
        self.assertEqual(s.api.hosts, ())


class UnknownFieldLogTests(SynchronousTestCase):
    """
    Unknown fields are logged once each.
    """

    def test_loggedOnce(self) -> None:
        """The same unknown field in two responses gives one log line."""
        events: List[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        s = Setup()
        s.plane.answer(200, _response("v1", "n1", _cla("api", _lb("10.0.0.1", 80, metadata={}))))
        s.nextPoll()
        s.plane.answer(200, _response("v2", "n2", _cla("api", _lb("10.0.0.2", 80, metadata={}))))
        lines = [e for e in events if e.get("log_format", "").startswith("xDS: ignoring unknown field")]
        self.assertEqual([e["field"] for e in lines], ["response.resources[].endpoints[].lb_endpoints[].metadata"])
        self.assertEqual(s.endpoints(), ["tcp:host=10.0.0.2:port=80"])

    def test_bounded(self) -> None:
        """Distinct unknown field names are remembered and logged up to a bound, then one line says further
        ones are suppressed; a name that is not a field name's is not logged as it is."""
        events: List[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        s = Setup()
        junk = {f"junk{i}": 1 for i in range(MAX_UNKNOWN_FIELDS + 50)}
        junk["x" * 10000] = 1
        s.plane.answer(200, _response("v1", "n1", _cla("api", _lb("10.0.0.1", 80), **junk)))
        s.nextPoll()
        s.plane.answer(200, _response("v2", "n2", _cla("api", _lb("10.0.0.2", 80), **{"more": 1})))
        self.assertEqual(len(s.client._unknown), MAX_UNKNOWN_FIELDS)
        logged = [e["field"] for e in events if e.get("log_format", "").startswith("xDS: ignoring unknown field")]
        self.assertEqual(len(logged), MAX_UNKNOWN_FIELDS)
        self.assertTrue(all(len(f) < 100 for f in logged))
        suppressed = [e for e in events if "further unknown fields suppressed" in e.get("log_format", "")]
        self.assertEqual(len(suppressed), 1)
        self.assertEqual(s.endpoints(), ["tcp:host=10.0.0.2:port=80"])

    def test_oddNameNotEmbedded(self) -> None:
        """A field name that is not a plausible one is reported as <name>."""
        unknown: List[str] = []
        parseAssignment(_cla("api", _lb("10.0.0.1", 80), **{"a b\n" * 50: 1}), "r", unknown.append)
        self.assertEqual(unknown, ["r.<name>"])


# -- integration: the example control plane on loopback, the proxy, and traffic ---------------------------------


def _loadExample():
    spec = importlib.util.spec_from_file_location("xds_control_plane_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class XDSIntegrationTests(TestCase):
    """
    The example control plane (examples/xds_control_plane) serving a proxy on loopback.
    """

    timeout = 30

    @defer.inlineCallbacks
    def test_endpointsChangeUnderTraffic(self):
        """Endpoints added and removed by the control plane while requests flow (new hosts health-checked
        before they take traffic): none fails."""
        example = _loadExample()
        backends = {}
        for name in (b"a", b"b", b"c"):
            backends[name] = serveWhoami(self, name).getHost().port
        table: Dict[str, list] = {"api": [{"address": "127.0.0.1", "port": backends[b"a"]}]}
        plane = example.EndpointsResource(lambda: table)
        planePort = reactor.listenTCP(0, Site(plane), interface="127.0.0.1")
        self.addCleanup(planePort.stopListening)
        service = startService(self, proxyConfig("api", f"""
[cluster:control_plane]
endpoints = tcp:127.0.0.1:{planePort.getHost().port}
[cluster:api]
discovery = xds
health.path = /
health.interval = 200ms
""", mesh="admin = tcp:0:interface=127.0.0.1\nxds.cluster = control_plane\nxds.refresh_delay = 50ms\n"))
        yield service.whenLive
        cluster = service.clusters["api"]
        load = Traffic(f"http://127.0.0.1:{port(service.listeners['edge'])}/")
        traffic, seen, failures = load.run, load.seen, load.failures

        def ports():
            return sorted(int(h.endpoint.rsplit("=", 1)[1]) for h in cluster.hosts)

        def until(names):
            expected = sorted(backends[n] for n in names)
            # New hosts are pending their first health check: wait until it passed.
            return waitFor(lambda: ports() == expected and all(h.healthy for h in cluster.hosts), 10,
                           lambda: f"healthy hosts on {expected} (they are on {ports()})")

        yield until([b"a"])
        yield traffic(3)
        self.assertEqual(set(seen), {b"a"})
        flowing = traffic(60)
        table["api"] = [{"address": "127.0.0.1", "port": backends[b"a"]},
                        {"address": "127.0.0.1", "port": backends[b"b"]}]
        yield until([b"a", b"b"])
        table["api"] = [{"address": "127.0.0.1", "port": backends[b"b"]},
                        {"address": "127.0.0.1", "port": backends[b"c"], "weight": 2},
                        {"address": "127.0.0.1", "port": backends[b"a"], "health": "DRAINING"}]
        yield until([b"b", b"c"])
        yield flowing
        del seen[:]
        yield traffic(9)
        self.assertEqual(set(seen), {b"b", b"c"})
        self.assertEqual(failures, [])
        # The proxy ACKs what it applied, and the control plane answers 304 to a proxy that has it.
        last = plane.requests[-1]
        self.assertEqual(last["resource_names"], ["api"])
        self.assertNotIn("error_detail", last)
        self.assertTrue(last["version_info"])
        self.assertGreater(cluster.stats.counter("update_success").value, 2)
        self.assertEqual(set(cluster.healthChecker.checkers), set(cluster.hosts))  # a's checks stopped
        # The admin /clusters page lists the hosts of now, with their weights.
        admin = f"http://127.0.0.1:{service.admin.port.getHost().port}/clusters"
        lines = (yield (yield treq.get(admin, persistent=False)).text()).splitlines()
        listed = {line.split("::")[1] for line in lines if line.startswith("api::")}
        self.assertEqual(listed, {f"tcp:host=127.0.0.1:port={backends[n]}" for n in (b"b", b"c")})
        self.assertIn(f"api::tcp:host=127.0.0.1:port={backends[b'c']}::weight::2", lines)
        # A control plane that fails keeps the proxy on its last endpoints.
        table["api"] = [{"address": "not-an-ip", "port": 1}]
        yield waitFor(lambda: plane.requests[-1].get("error_detail"), 10, "a NACK")
        self.assertIn("not an IP address", plane.requests[-1]["error_detail"]["message"])
        self.assertEqual(ports(), sorted([backends[b"b"], backends[b"c"]]))
        yield traffic(2)
        self.assertEqual(failures, [])
