"""
Tests for cluster discovery (CDS, L{twistedmesh.upstream.cds}): the mapping of a v3 C{Cluster} onto a
cluster configuration (each honoured field, spellings, rejections), the CDS stream of the xDS client against
canned answers on a clock (ACK, NACK, 304, failures), how an accepted update is applied through the reload
machinery (added, kept, modified, removed, a static name refused, routes waiting for a cluster), the xDS
client across file reloads, and a control plane on loopback changing clusters while traffic flows.
"""

import json
import os
import tempfile
from typing import Any, Dict, List, Tuple

import treq
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.error import ConnectionDone
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.server import Site

from twistedmesh.config import ConfigErrors, loadString
from twistedmesh.config.model import HostConfig
from twistedmesh.observability.prometheus import PrometheusExporter
from twistedmesh.service import MeshService
from twistedmesh.upstream.cds import CDS_PATH, CDS_TYPE_URL, HTTP_OPTIONS, parseCluster
from twistedmesh.upstream.xds import EDS_PATH, EDS_TYPE_URL, InvalidResource

from .support import Traffic, port, proxyConfig, serveWhoami, startService, waitFor
from .test_xds import _cla, _lb, _loadExample

CONFIG = """
[mesh]
admin = off
xds.cluster = cp
xds.cds = true
xds.refresh_delay = 2s
xds.timeout = 1s
[listener:edge]
endpoint = tcp:10000:interface=127.0.0.1
protocol = http
routes = main
[route:main/api]
prefix = /api
cluster = api
[route:main/rest]
prefix = /
cluster = local
[cluster:cp]
endpoints = tcp:127.0.0.1:18000
[cluster:local]
endpoints = tcp:127.0.0.1:18001
"""


def _static(name: str, *ports: int, **extra) -> Dict[str, Any]:
    cluster: Dict[str, Any] = {"@type": CDS_TYPE_URL, "name": name, "type": "STATIC", "load_assignment": {
        "cluster_name": name, "endpoints": [{"lb_endpoints": [_lb("10.0.0.1", p) for p in ports]}]}}
    cluster.update(extra)
    return cluster


def _eds(name: str, **extra) -> Dict[str, Any]:
    cluster: Dict[str, Any] = {"name": name, "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}}}
    cluster.update(extra)
    return cluster


def _cds(version: str, nonce: str, *clusters) -> bytes:
    return json.dumps({"version_info": version, "nonce": nonce, "type_url": CDS_TYPE_URL,
                       "resources": list(clusters)}).encode()


def _eds_response(version: str, nonce: str, *assignments) -> bytes:
    return json.dumps({"version_info": version, "nonce": nonce, "type_url": EDS_TYPE_URL,
                       "resources": list(assignments)}).encode()


def _file(text: str) -> Any:
    """
    The cluster section of C{text} (an INI cluster named C{api}) as the loader makes it.
    """
    return loadString("[cluster:api]\n" + text, "f.ini").clusters["api"]


class MappingTests(SynchronousTestCase):
    """
    A v3 Cluster becomes the same configuration the equivalent C{[cluster:NAME]} section gives.
    """

    def parse(self, value, unknown=None):
        return parseCluster(value, "r", (unknown if unknown is not None else []).append)

    def test_static(self) -> None:
        """A STATIC cluster with inline endpoints, weights and a connect timeout equals its INI twin."""
        value = _static("api", 80, 81, connect_timeout="0.25s")
        value["load_assignment"]["endpoints"][0]["lb_endpoints"][1]["load_balancing_weight"] = 3
        self.assertEqual(self.parse(value), _file(
            "endpoints = tcp:host=10.0.0.1:port=80, tcp:host=10.0.0.1:port=81 weight=3\nconnect_timeout = 250ms"))

    def test_defaults(self) -> None:
        """An empty STATIC cluster takes Envoy's defaults: round robin, 5 s connect timeout, HTTP/1.1."""
        config = self.parse({"name": "api"})
        self.assertEqual((config.endpoints, config.lb_policy, config.connect_timeout, config.protocol,
                          config.discovery, config.health, config.outlier), ((), "round_robin", 5.0, "http1",
                                                                             None, None, None))

    def test_camelCase(self) -> None:
        """lowerCamelCase and snake_case spellings, bare and Any resources give the same cluster."""
        snake = _static("api", 80, connect_timeout="1s", lb_policy="LEAST_REQUEST",
                        circuit_breakers={"thresholds": [{"max_requests": 7}]})
        camel = {"name": "api", "type": "STATIC", "connectTimeout": "1s", "lbPolicy": "LEAST_REQUEST",
                 "circuitBreakers": {"thresholds": [{"maxRequests": {"value": 7}}]},
                 "loadAssignment": {"clusterName": "api", "endpoints": [{"lbEndpoints": [
                     {"endpoint": {"address": {"socketAddress": {"address": "10.0.0.1", "portValue": 80}}}}]}]}}
        self.assertEqual(self.parse(snake), self.parse(camel))
        self.assertEqual(self.parse(camel).breaker.max_requests, 7)

    def test_types(self) -> None:
        """EDS (with its service_name) and the DNS types map onto discovery; by name or number."""
        eds = self.parse(_eds("api", eds_cluster_config={"service_name": "api-v2"}))
        self.assertEqual((eds.discovery.type, eds.discovery.service_name, eds.endpoints), ("xds", "api-v2", ()))
        self.assertEqual(self.parse({"name": "api", "type": 3}).discovery.type, "xds")
        dns = {"name": "api", "type": "STRICT_DNS", "dns_refresh_rate": "3s", "respect_dns_ttl": True,
               "dns_lookup_family": "V4_ONLY", "dns_failure_refresh_rate": {"base_interval": "1s"},
               "load_assignment": {"endpoints": [{"lb_endpoints": [_lb("api.internal", 8080)]}]}}
        self.assertEqual(self.parse(dns), _file(
            "discovery = strict_dns\nendpoints = tcp:host=api.internal:port=8080\ndns_refresh_rate = 3s\n"
            "respect_dns_ttl = true\ndns_lookup_family = v4_only\ndns_failure_refresh_rate = 1s"))
        dns["type"] = "LOGICAL_DNS"
        self.assertEqual(self.parse(dns).discovery.type, "logical_dns")
        dns["load_assignment"]["endpoints"][0]["lb_endpoints"].append(_lb("api2.internal", 8080))
        self.assertRaises(InvalidResource, self.parse, dns)  # LOGICAL_DNS: one endpoint
        # Envoy's default family for a cluster is AUTO.
        dns["type"] = "STRICT_DNS"
        del dns["dns_lookup_family"]
        self.assertEqual(self.parse(dns).discovery.dns_lookup_family, "auto")

    def test_lbPolicies(self) -> None:
        """Each honoured policy by name and number; policy options map; others are refused."""
        for policy, number, name in (("ROUND_ROBIN", 0, "round_robin"), ("LEAST_REQUEST", 1, "least_request"),
                                     ("RING_HASH", 2, "ring_hash"), ("RANDOM", 3, "random"), ("MAGLEV", 5, "maglev")):
            self.assertEqual(self.parse({"name": "a", "lb_policy": policy}).lb.policy, name)
            self.assertEqual(self.parse({"name": "a", "lb_policy": number}).lb_policy, name)
        lb = self.parse({"name": "a", "lb_policy": "LEAST_REQUEST",
                         "least_request_lb_config": {"choice_count": 3, "active_request_bias": {"default_value": 0.5}},
                         "common_lb_config": {"healthy_panic_threshold": {"value": 20}}}).lb
        self.assertEqual((lb.choice_count, lb.active_request_bias, lb.healthy_panic_threshold), (3, 0.5, 20.0))
        ring = self.parse({"name": "a", "lb_policy": "RING_HASH",
                           "ring_hash_lb_config": {"minimum_ring_size": "64", "maximum_ring_size": 128}}).lb
        self.assertEqual((ring.minimum_ring_size, ring.maximum_ring_size, ring.hash_policy), (64, 128, None))
        for bad in ({"lb_policy": "CLUSTER_PROVIDED"}, {"lb_policy": "FASTEST"}, {"lb_policy": 9},
                    {"least_request_lb_config": {"choice_count": 1}},
                    {"ring_hash_lb_config": {"minimum_ring_size": 200, "maximum_ring_size": 100}},
                    {"common_lb_config": {"healthy_panic_threshold": {"value": 120}}},
                    {"maglev_lb_config": {"table_size": 7}}):
            self.assertRaises(InvalidResource, self.parse, dict(bad, name="a"))

    def test_circuitBreakers(self) -> None:
        """The DEFAULT thresholds are the cluster's breaker; HIGH ones are validated only."""
        config = self.parse({"name": "api", "circuit_breakers": {"thresholds": [
            {"priority": "HIGH", "max_connections": 1},
            {"max_connections": 10, "max_pending_requests": "20", "max_requests": {"value": 30}, "max_retries": 4,
             "retry_budget": {"budget_percent": {"value": 25.0}, "min_retry_concurrency": 5}}]}})
        self.assertEqual(config.breaker, _file(
            "endpoints = tcp:10.0.0.1:80\nbreaker.max_connections = 10\nbreaker.max_pending_requests = 20\n"
            "breaker.max_requests = 30\nbreaker.max_retries = 4\nbreaker.budget_percent = 25\n"
            "breaker.min_retry_concurrency = 5").breaker)
        for bad in ({"thresholds": [{"max_connections": 0}]}, {"thresholds": [{"max_requests": -1}]},
                    {"thresholds": [{}, {"priority": "DEFAULT"}]}, {"thresholds": [{"priority": "LOW"}]}):
            self.assertRaises(InvalidResource, self.parse, {"name": "api", "circuit_breakers": bad})

    def test_outlierDetection(self) -> None:
        """Outlier detection fields carry Envoy's names and map one to one, with the file's defaults."""
        value = {"consecutive_5xx": 3, "interval": "2s", "base_ejection_time": "10s", "max_ejection_percent": 50,
                 "enforcing_success_rate": 0, "split_external_local_origin_errors": True,
                 "success_rate_stdev_factor": {"value": 1500}}
        self.assertEqual(self.parse({"name": "api", "outlier_detection": value}).outlier, _file(
            "endpoints = tcp:10.0.0.1:80\noutlier.consecutive_5xx = 3\noutlier.interval = 2s\n"
            "outlier.base_ejection_time = 10s\noutlier.max_ejection_percent = 50\n"
            "outlier.enforcing_success_rate = 0\noutlier.split_external_local_origin_errors = true\n"
            "outlier.success_rate_stdev_factor = 1500").outlier)
        self.assertIsNotNone(self.parse({"name": "api", "outlier_detection": {}}).outlier)
        for bad in ({"max_ejection_percent": 101}, {"interval": "0s"}, {"interval": 5},
                    {"base_ejection_time": "60s", "max_ejection_time": "30s"}, {"consecutive_5xx": "many"}):
            self.assertRaises(InvalidResource, self.parse, {"name": "api", "outlier_detection": bad})

    def test_healthChecks(self) -> None:
        """One HTTP or TCP health check maps onto the health keys (expected_statuses: end exclusive)."""
        http = {"timeout": "1s", "interval": "3s", "unhealthy_threshold": 2, "healthy_threshold": 1,
                "no_traffic_interval": "10s", "http_health_check": {
                    "path": "/healthz", "host": "api.internal", "expected_statuses": [{"start": 200, "end": 300}]}}
        self.assertEqual(self.parse({"name": "api", "health_checks": [http]}).health, _file(
            "endpoints = tcp:10.0.0.1:80\nhealth.path = /healthz\nhealth.host = api.internal\n"
            "health.expected_statuses = 200-299\nhealth.interval = 3s\nhealth.timeout = 1s\n"
            "health.unhealthy_threshold = 2\nhealth.healthy_threshold = 1\nhealth.no_traffic_interval = 10s").health)
        tcp = {"timeout": "1s", "interval": "3s", "unhealthy_threshold": 2, "healthy_threshold": 2,
               "tcp_health_check": {"send": {"text": "50494e47"}, "receive": [{"text": "504f4e47"}]}}
        health = self.parse({"name": "api", "health_checks": [tcp]}).health
        self.assertEqual((health.type, health.send, health.receive), ("tcp", b"PING", b"PONG"))
        self.assertEqual(self.parse({"name": "api", "health_checks": [dict(http, http_health_check={
            "path": "/"})]}).health.host, "api")  # the cluster's name, as in Envoy
        for bad in ([http, tcp], [dict(http, interval=None)], [{k: v for k, v in http.items() if k != "timeout"}],
                    [dict(http, http_health_check={"path": "healthz"})],
                    [dict(http, http_health_check={"path": "/", "expected_statuses": [{"start": 200, "end": 200}]})],
                    [dict(tcp, tcp_health_check={"send": {"text": "zz"}})],
                    [dict(http, grpc_health_check={})],
                    [{k: v for k, v in http.items() if k != "http_health_check"}]):
            self.assertRaises(InvalidResource, self.parse, {"name": "api", "health_checks": bad})

    def test_http2(self) -> None:
        """HTTP/2 to the hosts: the typed protocol options (explicit) or the older http2_protocol_options."""
        typed = {HTTP_OPTIONS: {"@type": "type.googleapis.com/" + HTTP_OPTIONS, "explicit_http_config": {
            "http2_protocol_options": {"max_concurrent_streams": 50, "initial_stream_window_size": 131072,
                                       "connection_keepalive": {"interval": "30s", "timeout": "5s"}}}}}
        config = self.parse({"name": "api", "typed_extension_protocol_options": typed})
        twin = _file("endpoints = tcp:10.0.0.1:80\nprotocol = http2\nhttp2.max_concurrent_streams = 50\n"
                     "http2.initial_stream_window_size = 128KiB\nhttp2.keepalive_interval = 30s\n"
                     "http2.keepalive_timeout = 5s")
        self.assertEqual((config.protocol, config.http2), (twin.protocol, twin.http2))
        self.assertEqual(self.parse({"name": "api", "http2_protocol_options": {}}).protocol, "http2")
        explicit1 = {HTTP_OPTIONS: {"explicit_http_config": {"http_protocol_options": {}}}}
        self.assertEqual(self.parse({"name": "api", "typed_extension_protocol_options": explicit1}).protocol, "http1")
        for bad in ({HTTP_OPTIONS: {"auto_config": {}}}, {HTTP_OPTIONS: {"use_downstream_protocol_config": {}}},
                    {HTTP_OPTIONS: {"explicit_http_config": {"http3_protocol_options": {}}}},
                    {HTTP_OPTIONS: {"explicit_http_config": {"http2_protocol_options": {
                        "initial_stream_window_size": 100}}}}):
            self.assertRaises(InvalidResource, self.parse, {"name": "api", "typed_extension_protocol_options": bad})

    def test_rejected(self) -> None:
        """What cannot be honoured is refused, naming the field and the cluster."""
        cases = [
            ({"name": "api", "transport_socket": {"name": "envoy.transport_sockets.tls"}}, "transport_socket"),
            ({"name": "api", "type": "ORIGINAL_DST"}, "ORIGINAL_DST"),
            ({"name": "api", "cluster_type": {"name": "envoy.clusters.aggregate"}}, "cluster_type"),
            ({"name": "has space"}, "name"),
            ({"type": "STATIC"}, "name"),
            ({"name": "api", "connect_timeout": "-1s"}, "connect_timeout"),
            ({"name": "api", "connect_timeout": "0s"}, "connect_timeout"),
            (dict(_static("api", 70000)), "port_value"),
            ({"name": "api", "@type": EDS_TYPE_URL}, "expected"),
            ({"name": "api", "type": "STRICT_DNS"}, "STRICT_DNS"),
            ("not an object", "object"),
        ]
        for value, word in cases:
            with self.assertRaises(InvalidResource, msg=value) as caught:
                self.parse(value)
            self.assertIn(word, str(caught.exception))
        # Plain text asked for explicitly is fine.
        self.parse({"name": "api", "transport_socket": {"name": "envoy.transport_sockets.raw_buffer"}})

    def test_unknownFieldsReported(self) -> None:
        """Unknown fields are reported (for one log line each) and otherwise ignored."""
        unknown: List[str] = []
        config = self.parse(dict(_static("api", 80), metadata={"a": 1}, typed_extension_protocol_options={
            "envoy.extensions.other": {}}), unknown)
        self.assertEqual(len(config.endpoints), 1)
        self.assertEqual(sorted(unknown), ["r(api).typed_extension_protocol_options[envoy.extensions.other]",
                                           "r.metadata"])


class Plane:
    """
    Canned control-plane answers by path: each request waits for the test to answer it.
    """

    def __init__(self) -> None:
        self.requests: List[Tuple[str, Dict[str, Any]]] = []
        self.pending: List[Tuple[str, defer.Deferred]] = []

    def post(self, path: str, body: bytes) -> defer.Deferred:
        self.requests.append((path, json.loads(body)))
        d = defer.Deferred()
        self.pending.append((path, d))
        return d

    def answer(self, path: str, status: int, body: bytes = b"") -> None:
        self.pending = [(p, d) for p, d in self.pending if not d.called]  # cancelled meanwhile
        for i, (p, d) in enumerate(self.pending):
            if p == path:
                del self.pending[i]
                d.callback((status, body))
                return
        raise AssertionError(f"no request pending on {path}: {self.requests}")

    def last(self, path: str) -> Dict[str, Any]:
        return [r for p, r in self.requests if p == path][-1]


class Proxy:
    """
    A service of L{CONFIG} on a memory reactor, its xDS requests going to a L{Plane}; started.
    """

    def __init__(self, text: str = CONFIG) -> None:
        self.reactor = MemoryReactorClock()
        self.service = MeshService(loadString(text, "mesh.ini"), self.reactor, seed=1)
        self.plane = Plane()
        self.service.xds.post = self.plane.post
        self.service.startService()
        self.reactor.advance(0)

    def stat(self, name: str) -> int:
        return self.service.stats.get(name).value

    def cds(self, *clusters, version: str = "v1", nonce: str = "n1") -> None:
        self.plane.answer(CDS_PATH, 200, _cds(version, nonce, *clusters))

    def nextPoll(self, stream) -> None:
        self.reactor.advance(stream._timer.getTime() - self.reactor.seconds())

    def open(self):
        """
        A downstream HTTP/1.1 connection to the edge listener, on a memory transport.
        """
        protocol = self.service.listeners["edge"].front.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
        protocol.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555),
                                                hostAddress=IPv4Address("TCP", "127.0.0.1", 10000)))
        return protocol

    def get(self, path: str = "/api") -> bytes:
        """
        One HTTP/1.1 request through the edge listener, over a memory transport: what was answered.
        """
        protocol = self.service.listeners["edge"].front.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555),
                                    hostAddress=IPv4Address("TCP", "127.0.0.1", 10000))
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET " + path.encode() + b" HTTP/1.1\r\nhost: edge\r\n\r\n")
        return transport.value()

    def upstreams(self) -> List[Tuple[str, int]]:
        return [(host, port) for host, port, *_ in self.reactor.tcpClients]


class CDSClientTests(SynchronousTestCase):
    """
    The CDS stream: requests, ACK, NACK, 304 and failures, and its stats.
    """

    def test_firstRequest(self) -> None:
        """A wildcard request (no resource names) for the Cluster type, with the node, on the CDS path."""
        p = Proxy()
        self.assertEqual(p.plane.requests, [(CDS_PATH, {
            "version_info": "",
            "node": {"id": "twistedmesh", "cluster": "twistedmesh", "user_agent_name": "twistedmesh"},
            "resource_names": [], "type_url": CDS_TYPE_URL, "response_nonce": ""})])
        self.assertEqual(p.stat("cluster_manager.cds.update_attempt"), 1)

    def test_ackAndApply(self) -> None:
        """An accepted set is applied (the cluster exists and takes traffic) and ACKed with its version."""
        p = Proxy()
        self.assertIn(b"503", p.get().split(b"\r\n")[0])  # no api yet: cluster_not_found
        p.cds(_static("api", 8080))
        self.assertEqual(list(p.service.clusters), ["cp", "local", "api"])
        self.assertEqual([h.endpoint for h in p.service.clusters["api"].hosts], ["tcp:host=10.0.0.1:port=8080"])
        self.assertEqual(p.get(), b"")  # forwarded: no local answer
        self.assertIn(("10.0.0.1", 8080), p.upstreams())
        self.assertEqual((p.stat("cluster_manager.cds.update_success"), p.stat("cluster_manager.cluster_added")),
                         (1, 3))
        self.assertGreater(p.stat("cluster_manager.cds.version"), 0)
        p.nextPoll(p.service.xds.cds)
        request = p.plane.last(CDS_PATH)
        self.assertEqual((request["version_info"], request["response_nonce"]), ("v1", "n1"))
        self.assertNotIn("error_detail", request)
        self.assertEqual(p.service.cds.version, "v1")

    def test_nackInvalid(self) -> None:
        """An invalid cluster rejects the whole set: the clusters in effect stay; NACK with the reason."""
        p = Proxy()
        p.cds(_static("api", 8080))
        api = p.service.clusters["api"]
        p.nextPoll(p.service.xds.cds)
        p.cds(_static("api", 8081), _static("web", 80, lb_policy="FASTEST"), version="v2", nonce="n2")
        self.assertIs(p.service.clusters["api"], api)
        self.assertNotIn("web", p.service.clusters)
        self.assertEqual(p.stat("cluster_manager.cds.update_rejected"), 1)
        p.nextPoll(p.service.xds.cds)
        request = p.plane.last(CDS_PATH)
        self.assertEqual((request["version_info"], request["response_nonce"]), ("v1", "n2"))
        self.assertEqual(request["error_detail"]["code"], 3)
        self.assertIn("(web).lb_policy", request["error_detail"]["message"])

    def test_nackStaticName(self) -> None:
        """A cluster of the control plane may not take the name of a static one (NACK, nothing changes)."""
        p = Proxy()
        local = p.service.clusters["local"]
        p.cds(_static("api", 8080), _static("local", 9999))
        self.assertIs(p.service.clusters["local"], local)
        self.assertNotIn("api", p.service.clusters)
        p.nextPoll(p.service.xds.cds)
        self.assertIn("'local' is a static cluster", p.plane.last(CDS_PATH)["error_detail"]["message"])

    def test_notModifiedAndFailures(self) -> None:
        """304 changes nothing; another status or a timeout counts as update_failure; polling goes on."""
        p = Proxy()
        p.cds(_static("api", 8080))
        api = p.service.clusters["api"]
        p.nextPoll(p.service.xds.cds)
        p.plane.answer(CDS_PATH, 304)
        self.assertIs(p.service.clusters["api"], api)
        p.nextPoll(p.service.xds.cds)
        p.plane.answer(CDS_PATH, 500, b"oops")
        p.nextPoll(p.service.xds.cds)
        p.reactor.advance(1.0)  # xds.timeout
        self.assertEqual(p.stat("cluster_manager.cds.update_failure"), 2)
        self.assertEqual(p.stat("cluster_manager.cds.update_success"), 1)
        self.assertIs(p.service.clusters["api"], api)
        self.assertEqual(p.plane.last(CDS_PATH)["version_info"], "v1")

    def test_maxClusters(self) -> None:
        """A set larger than xds.max_clusters is rejected whole before any cluster is parsed (NACK)."""
        p = Proxy(CONFIG.replace("xds.cds = true", "xds.cds = true\nxds.max_clusters = 2"))
        p.cds(_static("api", 8080), _static("web", 80))
        p.nextPoll(p.service.xds.cds)
        p.cds(_static("api", 8080), _static("web", 80), {"name": "broken", "lb_policy": "FASTEST"},
              version="v2", nonce="n2")
        self.assertEqual(set(p.service.cdsClusters), {"api", "web"})
        self.assertEqual(p.stat("cluster_manager.cds.update_rejected"), 1)
        p.nextPoll(p.service.xds.cds)
        request = p.plane.last(CDS_PATH)
        self.assertEqual((request["version_info"], request["response_nonce"]), ("v1", "n2"))
        self.assertIn("3 resources, more than the 2", request["error_detail"]["message"])
        self.assertEqual(loadString(CONFIG, "m.ini").mesh.xds.max_clusters, 10000)

    def test_unchangedResendSkipped(self) -> None:
        """A response with the version and clusters of the set in effect (a new nonce) is ACKed without
        being parsed or built again; a change, or a new version, is applied."""
        p = Proxy()
        p.cds(_static("api", 8080))
        api = p.service.clusters["api"]
        builds = []
        build = p.service._build
        self.patch(p.service, "_build", lambda *a: builds.append(a) or build(*a))
        p.nextPoll(p.service.xds.cds)
        p.cds(_static("api", 8080), version="v1", nonce="n2")
        self.assertEqual(builds, [])
        self.assertIs(p.service.clusters["api"], api)
        self.assertEqual(p.stat("cluster_manager.cds.update_success"), 2)
        p.nextPoll(p.service.xds.cds)
        request = p.plane.last(CDS_PATH)
        self.assertEqual((request["version_info"], request["response_nonce"]), ("v1", "n2"))
        self.assertNotIn("error_detail", request)
        p.cds(_static("api", 8080), version="v2", nonce="n3")  # same clusters, new version: applied
        self.assertEqual(len(builds), 1)
        self.assertEqual(p.service.cds.version, "v2")
        p.nextPoll(p.service.xds.cds)
        p.cds(_static("api", 8081), version="v2", nonce="n4")  # same version, other clusters: applied
        self.assertEqual(len(builds), 2)
        self.assertIsNot(p.service.clusters["api"], api)

    def test_resendAfterNACKSkipped(self) -> None:
        """After a rejected set, the set in effect sent again is ACKed without work, clearing the error."""
        p = Proxy()
        p.cds(_static("api", 8080))
        p.nextPoll(p.service.xds.cds)
        p.cds(_static("api", 8080), _static("web", 80, lb_policy="FASTEST"), version="v2", nonce="n2")
        p.nextPoll(p.service.xds.cds)
        self.assertIn("error_detail", p.plane.last(CDS_PATH))
        p.cds(_static("api", 8080), version="v1", nonce="n3")
        p.nextPoll(p.service.xds.cds)
        request = p.plane.last(CDS_PATH)
        self.assertEqual((request["version_info"], request["response_nonce"]), ("v1", "n3"))
        self.assertNotIn("error_detail", request)

    def test_parseErrorIsNACKed(self) -> None:
        """A value Python cannot convert (a non-ASCII digit, thousands of digits) is a NACK with the reason
        and the nonce, counted as update_rejected."""
        p = Proxy()
        p.cds(_static("api", 8080, connect_timeout="9" * 5000 + "s"), version="v1", nonce="n1")
        p.nextPoll(p.service.xds.cds)
        p.cds(_static("api", 8080, circuit_breakers={"thresholds": [{"max_connections": "\u00b2"}]}),
              version="v1", nonce="n2")
        self.assertEqual(p.stat("cluster_manager.cds.update_rejected"), 2)
        p.nextPoll(p.service.xds.cds)
        request = p.plane.last(CDS_PATH)
        self.assertEqual((request["version_info"], request["response_nonce"]), ("", "n2"))
        self.assertIn("max_connections", request["error_detail"]["message"])
        self.assertNotIn("api", p.service.clusters)

    def test_drainingRefuses(self) -> None:
        """While the proxy drains, a set is not applied (NACK): a rebuilt listener would not drain."""
        p = Proxy()
        p.service.drain()
        p.cds(_static("api", 8080))
        self.assertNotIn("api", p.service.clusters)
        self.assertEqual(p.stat("cluster_manager.cds.update_rejected"), 1)

    def test_stopService(self) -> None:
        """Stopping the service stops the CDS polls (the request in flight is cancelled)."""
        p = Proxy()
        pending = p.plane.pending[0][1]
        p.service.stopService()
        self.assertTrue(pending.called)
        self.assertFalse(p.service.xds.cds.polling)


class ApplyTests(SynchronousTestCase):
    """
    An accepted set goes through the reload machinery: kept, modified, added and removed clusters.
    """

    def test_keptModifiedRemoved(self) -> None:
        """Unchanged clusters stay the same objects; a changed one is rebuilt and the old one drained; a
        cluster missing from the set is removed and drained; the listener routing to them follows."""
        p = Proxy()
        p.cds(_static("api", 8080), _static("web", 80))
        api, web = p.service.clusters["api"], p.service.clusters["web"]
        p.nextPoll(p.service.xds.cds)
        p.cds(_static("api", 8080), _static("web", 80, lb_policy="RANDOM"), version="v2", nonce="n2")
        self.assertIs(p.service.clusters["api"], api)
        self.assertIsNot(p.service.clusters["web"], web)
        self.assertEqual(p.service.clusters["web"].config.lb_policy, "random")
        self.assertEqual(web.pools.maxIdle, 0)  # drained
        self.assertIsNone(web.discovery)
        self.assertEqual(p.stat("cluster_manager.cluster_modified"), 1)
        p.nextPoll(p.service.xds.cds)
        p.cds(_static("web", 80, lb_policy="RANDOM"), version="v3", nonce="n3")
        self.assertNotIn("api", p.service.clusters)
        self.assertEqual(api.pools.maxIdle, 0)
        self.assertEqual(p.stat("cluster_manager.cluster_removed"), 1)
        self.assertIn(b"503", p.get().split(b"\r\n")[0])  # the route's cluster is gone again
        self.assertEqual(set(p.service.cdsClusters), {"web"})

    def test_clusterChangesKeepListener(self) -> None:
        """CDS never touches a listener, as in Envoy: a routed cluster added, changed and removed leaves the
        listener's build (filters, rate-limit buckets) as it is, a busy keep-alive connection is not told
        to close, and each new request goes to the cluster in effect when it starts."""
        p = Proxy()
        built = p.service._built["edge"]
        self.assertIn(b"503", p.get().split(b"\r\n")[0])  # no api yet
        p.cds(_static("api", 8080))
        self.assertIs(p.service._built["edge"], built)
        # A busy keep-alive connection: its request went to api on 8080, the answer is not back yet.
        protocol = p.service.listeners["edge"].front.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555),
                                    hostAddress=IPv4Address("TCP", "127.0.0.1", 10000))
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET /api HTTP/1.1\r\nhost: edge\r\n\r\n")
        self.assertEqual(p.upstreams()[-1][:2], ("10.0.0.1", 8080))
        for i, moved in enumerate((8081, 8082)):  # the endpoint moves twice
            p.nextPoll(p.service.xds.cds)
            p.cds(_static("api", moved), _static("other", 80), version=f"v{i + 2}", nonce=f"n{i + 2}")
        self.assertEqual(p.stat("cluster_manager.cluster_modified"), 2)
        self.assertIs(p.service._built["edge"], built)
        self.assertEqual((p.stat("listener_manager.listener_modified"),
                          p.stat("listener_manager.total_listeners_draining")), (0, 0))
        self.assertFalse(protocol.finishing)
        self.assertEqual(p.get(), b"")  # forwarded, to the cluster in effect now
        self.assertEqual(p.upstreams()[-1][:2], ("10.0.0.1", 8082))
        p.nextPoll(p.service.xds.cds)
        p.cds(_static("other", 80), version="v4", nonce="n4")  # api removed
        self.assertIs(p.service._built["edge"], built)
        self.assertIn(b"503", p.get().split(b"\r\n")[0])
        self.assertFalse(protocol.finishing)

    def test_removedClusterStatsDropped(self) -> None:
        """The stats of a removed cluster are dropped once it has drained (not while a request is on it, at
        the latest after drain_timeout): /stats and Prometheus no longer show them. A name the control plane
        brings back starts from zero, with new objects."""
        p = Proxy()
        exporter = PrometheusExporter(p.service.stats)
        p.cds(_static("api", 8080), _static("web", 80))
        web = p.service.clusters["web"]
        web.upstream_rq_total.value = 5
        p.nextPoll(p.service.xds.cds)
        p.cds(_static("api", 8080), version="v2", nonce="n2")  # web removed, idle: dropped at once
        self.assertIsNone(p.service.stats.get("cluster.web.upstream_rq_total"))
        self.assertFalse([s.name for s in p.service.stats if s.name.startswith("cluster.web.")])
        self.assertNotIn(b'envoy_cluster_name="web"', exporter.generate())
        self.assertIn(b'envoy_cluster_name="api"', exporter.generate())
        p.nextPoll(p.service.xds.cds)
        p.cds(_static("api", 8080), _static("web", 80), version="v3", nonce="n3")  # back: new stats
        self.assertIsNot(p.service.clusters["web"].upstream_rq_total, web.upstream_rq_total)
        self.assertEqual(p.service.stats.get("cluster.web.upstream_rq_total").value, 0)
        # A request in flight on api when it is removed: its stats stay until it ends.
        down = p.open()
        down.dataReceived(b"GET /api HTTP/1.1\r\nhost: edge\r\n\r\n")
        api = p.service.clusters["api"]
        p.nextPoll(p.service.xds.cds)
        p.cds(_static("web", 80), version="v4", nonce="n4")
        p.reactor.advance(1)
        self.assertIs(p.service.stats.get("cluster.api.upstream_rq_total"), api.upstream_rq_total)
        down.connectionLost(Failure(ConnectionDone()))  # the request ends
        p.reactor.advance(1)
        self.assertIsNone(p.service.stats.get("cluster.api.upstream_rq_total"))

    def test_removedStatsKeptWhenNameBack(self) -> None:
        """A cluster removed while busy and back before it drained: the new cluster counts on in the same
        stats, which are then not dropped (not even at the drain deadline)."""
        p = Proxy()
        p.cds(_static("api", 8080))
        down = p.open()
        down.dataReceived(b"GET /api HTTP/1.1\r\nhost: edge\r\n\r\n")
        old = p.service.clusters["api"]
        p.nextPoll(p.service.xds.cds)
        p.cds(version="v2", nonce="n2")
        p.nextPoll(p.service.xds.cds)
        p.cds(_static("api", 8081), version="v3", nonce="n3")
        new = p.service.clusters["api"]
        self.assertIsNot(new, old)
        self.assertIs(new.upstream_rq_total, old.upstream_rq_total)
        down.connectionLost(Failure(ConnectionDone()))
        p.reactor.advance(60)  # past drain_timeout
        self.assertIs(p.service.stats.get("cluster.api.upstream_rq_total"), new.upstream_rq_total)

    def test_edsClusterFromCDS(self) -> None:
        """A CDS cluster of type EDS subscribes at once (an EDS request goes out in the same turn); when CDS
        rebuilds it, the new cluster starts with the endpoints the control plane gave last."""
        p = Proxy()
        p.cds(_eds("api", eds_cluster_config={"service_name": "api-svc"}))
        p.reactor.advance(0)
        self.assertEqual(p.plane.last(EDS_PATH)["resource_names"], ["api-svc"])
        p.plane.answer(EDS_PATH, 200, _eds_response("e1", "m1", _cla("api-svc", _lb("10.0.0.7", 80))))
        api = p.service.clusters["api"]
        self.assertEqual([h.endpoint for h in api.hosts], ["tcp:host=10.0.0.7:port=80"])
        p.nextPoll(p.service.xds.cds)
        p.cds(_eds("api", eds_cluster_config={"service_name": "api-svc"}, lb_policy="LEAST_REQUEST"),
              version="v2", nonce="n2")
        rebuilt = p.service.clusters["api"]
        self.assertIsNot(rebuilt, api)
        self.assertEqual([h.endpoint for h in rebuilt.hosts], ["tcp:host=10.0.0.7:port=80"])
        self.assertEqual(p.get(), b"")
        self.assertIn(("10.0.0.7", 80), p.upstreams())
        self.assertEqual(p.service.xds.subscriptions, [rebuilt.discovery])

    def test_edsAnswerInFlightReachesRebuiltCluster(self) -> None:
        """An EDS answer to a request sent before CDS rebuilt the cluster is applied to the new cluster (while
        another subscription keeps the request alive)."""
        p = Proxy(CONFIG.replace("xds.timeout = 1s", "xds.timeout = 10s") + "[cluster:keep]\ndiscovery = xds\n")
        p.cds(_eds("api"))
        p.plane.answer(EDS_PATH, 304)  # the first request asked for keep alone: api is asked for at once
        p.reactor.advance(0)
        self.assertEqual(p.plane.last(EDS_PATH)["resource_names"], ["api", "keep"])
        p.nextPoll(p.service.xds.cds)  # the EDS request is still in flight
        p.cds(_eds("api", connect_timeout="1s"), version="v2", nonce="n2")
        p.plane.answer(EDS_PATH, 200, _eds_response("e1", "m1", _cla("api", _lb("10.0.0.7", 80)),
                                                    _cla("keep", _lb("10.0.0.8", 80))))
        self.assertEqual(p.service.clusters["api"].config.connect_timeout, 1.0)
        self.assertEqual([h.endpoint for h in p.service.clusters["api"].hosts], ["tcp:host=10.0.0.7:port=80"])

    def test_edsStreamRestartsWhenTheOnlyClusterIsRebuilt(self) -> None:
        """When CDS rebuilds the only EDS cluster, the EDS request in flight is given up and asked again at
        once: the new cluster gets the answer."""
        p = Proxy(CONFIG.replace("xds.timeout = 1s", "xds.timeout = 10s"))
        p.cds(_eds("api"))
        p.reactor.advance(0)
        p.nextPoll(p.service.xds.cds)
        p.cds(_eds("api", connect_timeout="1s"), version="v2", nonce="n2")
        p.reactor.advance(0)
        self.assertEqual([path for path, d in p.plane.pending if not d.called], [EDS_PATH])
        p.plane.answer(EDS_PATH, 200, _eds_response("e1", "m1", _cla("api", _lb("10.0.0.7", 80))))
        self.assertEqual([h.endpoint for h in p.service.clusters["api"].hosts], ["tcp:host=10.0.0.7:port=80"])

    def test_awaitedClustersLogged(self) -> None:
        """The clusters routes name that CDS has not provided are logged when the set changes."""
        events: List[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        p = Proxy()
        p.cds(_static("web", 80))
        p.nextPoll(p.service.xds.cds)
        p.cds(_static("api", 80), version="v2", nonce="n2")
        lines = [e["names"] for e in events if e.get("log_format", "").startswith("routes name clusters")]
        self.assertEqual(lines, ["api"])
        self.assertEqual(p.service._awaitingCDS, frozenset())

    def test_routeToUnknownClusterNeedsCDS(self) -> None:
        """Without xds.cds a route naming no cluster is a config error; with it, it loads and waits."""
        text = CONFIG.replace("xds.cds = true\n", "")
        with self.assertRaises(ConfigErrors) as caught:
            loadString(text, "mesh.ini")
        self.assertIn("route:main/api", str(caught.exception))
        self.assertIn("cluster", str(caught.exception))
        config = loadString(CONFIG, "mesh.ini")
        self.assertEqual(config.routes["main"][0].cluster, "api")
        # A tcp listener's cluster still has to be in the file.
        with self.assertRaises(ConfigErrors):
            loadString(CONFIG + "[listener:db]\nendpoint = tcp:10001\nprotocol = tcp\ncluster = db\n", "mesh.ini")


class ReloadTests(SynchronousTestCase):
    """
    File reloads with CDS clusters, and the xDS client across reloads.
    """

    def reload(self, p: Proxy, text: str):
        fd, path = tempfile.mkstemp(suffix=".ini")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        self.addCleanup(os.remove, path)
        return self.successResultOf(p.service.reload(path))

    def test_fileReloadKeepsCDSClusters(self) -> None:
        """A file reload keeps the CDS clusters (same objects); a static cluster the file now declares with
        a CDS cluster's name wins."""
        p = Proxy()
        p.cds(_static("api", 8080), _static("web", 80))
        api, web = p.service.clusters["api"], p.service.clusters["web"]
        client = p.service.xds
        result = self.reload(p, CONFIG.replace("prefix = /\n", "prefix = /x\n"))
        self.assertTrue(result.ok, result.errors)
        self.assertIs(p.service.clusters["api"], api)
        self.assertIs(p.service.clusters["web"], web)
        self.assertIs(p.service.xds, client)
        result = self.reload(p, CONFIG + "[cluster:web]\nendpoints = tcp:127.0.0.1:9\n")
        self.assertTrue(result.ok, result.errors)
        self.assertEqual(p.service.clusters["web"].config.endpoints, (HostConfig("tcp:127.0.0.1:9"),))
        self.assertIs(p.service.clusters["api"], api)

    def test_cdsTurnedOff(self) -> None:
        """A file without xds.cds drops the CDS clusters (drained) and stops polling CDS."""
        p = Proxy()
        p.cds(_static("api", 8080))
        api = p.service.clusters["api"]
        text = CONFIG.replace("xds.cds = true\n", "").replace("cluster = api", "cluster = local")
        result = self.reload(p, text)
        self.assertTrue(result.ok, result.errors)
        self.assertNotIn("api", p.service.clusters)
        self.assertEqual(api.pools.maxIdle, 0)
        self.assertIsNone(p.service.cds)
        self.assertEqual(p.service.cdsClusters, {})

    def test_xdsSettingsChange(self) -> None:
        """New xds.* settings make a new client; a kept EDS cluster moves to it with its hosts, and the old
        client stops polling."""
        text = CONFIG + "[cluster:api2]\ndiscovery = xds\n"
        p = Proxy(text)
        p.reactor.advance(0)
        p.plane.answer(EDS_PATH, 200, _eds_response("e1", "m1", _cla("api2", _lb("10.0.0.7", 80))))
        api2 = p.service.clusters["api2"]
        old = p.service.xds
        result = self.reload(p, text.replace("xds.refresh_delay = 2s", "xds.refresh_delay = 5s"))
        self.assertTrue(result.ok, result.errors)
        new = p.service.xds
        self.assertIsNot(new, old)
        self.assertEqual(new.config.refresh_delay, 5.0)
        self.assertFalse(old.eds.polling or old.cds.polling)
        self.assertIs(p.service.clusters["api2"], api2)
        self.assertIs(api2.discovery.client, new)
        self.assertEqual([h.endpoint for h in api2.hosts], ["tcp:host=10.0.0.7:port=80"])
        self.assertTrue(new.eds.polling and new.cds.polling)
        new.post = p.plane.post
        p.reactor.advance(0)
        self.assertEqual(p.plane.last(EDS_PATH)["resource_names"], ["api2"])

    def test_rebuiltEDSClusterSharesTheClient(self) -> None:
        """A reload that changes an EDS cluster rebuilds it on the same client (one poll for all, no second
        client), and the new cluster starts with the endpoints the old one had."""
        text = CONFIG + "[cluster:api2]\ndiscovery = xds\n"
        p = Proxy(text)
        p.reactor.advance(0)
        p.plane.answer(EDS_PATH, 200, _eds_response("e1", "m1", _cla("api2", _lb("10.0.0.7", 80))))
        client = p.service.xds
        result = self.reload(p, text + "connect_timeout = 1s\n")
        self.assertTrue(result.ok, result.errors)
        api2 = p.service.clusters["api2"]
        self.assertEqual(api2.config.connect_timeout, 1.0)
        self.assertIs(api2.discovery.client, client)
        self.assertEqual(client.subscriptions, [api2.discovery])
        self.assertEqual([h.endpoint for h in api2.hosts], ["tcp:host=10.0.0.7:port=80"])

    def test_controlPlaneClusterRebuilt(self) -> None:
        """When a reload rebuilds the control-plane cluster, the client polls through the new one."""
        p = Proxy()
        client = p.service.xds
        result = self.reload(p, CONFIG.replace("tcp:127.0.0.1:18000", "tcp:127.0.0.1:18002"))
        self.assertTrue(result.ok, result.errors)
        self.assertIs(p.service.xds, client)
        self.assertIs(client.controlPlane, p.service.clusters["cp"])


class InitialFetchTests(SynchronousTestCase):
    """
    C{xds.initial_fetch_timeout}: the listeners listen but do not accept, and the service stays STARTING,
    until the first CDS answer or the timeout.
    """

    def test_heldUntilFirstAnswer(self) -> None:
        """STARTING and not accepting until the control plane's first answer; then LIVE, whenLive fires."""
        p = Proxy()
        live = []
        p.service.whenLive.addCallback(live.append)
        self.assertEqual(p.service.state, "STARTING")
        self.assertTrue(p.service.listeners["edge"].held)
        p.plane.answer(CDS_PATH, 500)  # failing: still waiting
        p.nextPoll(p.service.xds.cds)
        self.assertEqual((p.service.state, live), ("STARTING", []))
        p.cds(_static("api", 8080))
        self.assertEqual(p.service.state, "LIVE")
        self.assertFalse(p.service.listeners["edge"].held)
        self.assertEqual(live, [None])
        self.assertIsNone(p.service._initialFetchTimer)
        self.assertNotIn(15.0, [c.getTime() for c in p.reactor.getDelayedCalls()])  # the timeout is cancelled

    def test_timeout(self) -> None:
        """Without an answer, the service serves after initial_fetch_timeout (15 s by default) with the
        file's clusters, and says so in the log."""
        events: List[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        p = Proxy()
        p.reactor.advance(14.9)
        self.assertEqual(p.service.state, "STARTING")
        p.reactor.advance(0.1)
        self.assertEqual(p.service.state, "LIVE")
        self.assertFalse(p.service.listeners["edge"].held)
        self.assertTrue([e for e in events if "initial_fetch_timeout" in e.get("log_format", "")])
        if not [d for _, d in p.plane.pending if not d.called]:
            p.nextPoll(p.service.xds.cds)
        p.cds(_static("api", 8080))  # a late answer is applied as any other
        self.assertIn("api", p.service.clusters)

    def test_rejectedFirstAnswer(self) -> None:
        """A first answer rejected (NACK) ends the wait too, as in Envoy: the control plane answered."""
        p = Proxy()
        p.cds(_static("local", 9999))
        self.assertEqual(p.service.state, "LIVE")

    def test_configured(self) -> None:
        """initial_fetch_timeout = 0 does not wait; another value is the wait."""
        p = Proxy(CONFIG.replace("xds.cds = true", "xds.cds = true\nxds.initial_fetch_timeout = 0"))
        self.assertEqual(p.service.state, "LIVE")
        self.assertFalse(p.service.listeners["edge"].held)
        p = Proxy(CONFIG.replace("xds.cds = true", "xds.cds = true\nxds.initial_fetch_timeout = 3s"))
        p.reactor.advance(3)
        self.assertEqual(p.service.state, "LIVE")

    def test_keysNeedCDS(self) -> None:
        """xds.max_clusters and xds.initial_fetch_timeout mean nothing without CDS: an error names them."""
        text = CONFIG.replace("xds.cds = true", "xds.max_clusters = 5\nxds.initial_fetch_timeout = 1s")
        with self.assertRaises(ConfigErrors) as caught:
            loadString(text, "m.ini")
        message = str(caught.exception)
        self.assertIn("xds.max_clusters", message)
        self.assertIn("xds.initial_fetch_timeout", message)
        self.assertIn("m.ini", message)
        with self.assertRaises(ConfigErrors):
            loadString(CONFIG.replace("xds.cds = true", "xds.cds = true\nxds.max_clusters = 0"), "m.ini")

    def test_stopWhileWaiting(self) -> None:
        """Stopping the service while it waits cancels the timeout."""
        p = Proxy()
        p.service.stopService()
        p.reactor.advance(60)
        self.assertEqual(p.service.state, "DRAINING")
        self.assertEqual(p.reactor.getDelayedCalls(), [])


class InitialFetchLoopbackTests(TestCase):
    """
    The wait for the first CDS answer on real sockets: a client connecting meanwhile is not served until
    the answer, then its request goes to the control plane's cluster.
    """

    timeout = 20

    @defer.inlineCallbacks
    def test_clientWaitsForFirstAnswer(self):
        backend = serveWhoami(self, b"a").getHost().port
        text = proxyConfig("api", "[cluster:cp]\nendpoints = tcp:127.0.0.1:1\n",
                           mesh="admin = off\nxds.cluster = cp\nxds.cds = true\nxds.refresh_delay = 10s\n")
        service = MeshService(loadString(text, "test.ini"), reactor, seed=1)
        plane = Plane()
        service.xds.post = plane.post
        service.startService()
        self.addCleanup(service.stopService)
        yield waitFor(lambda: service.listeners["edge"].port is not None, 5, "the listener bound")
        self.assertEqual(service.state, "STARTING")
        received: List[bytes] = []

        class Client(Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.append(data)

        client = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port(service.listeners["edge"])),
                                       Client())
        self.addCleanup(client.transport.loseConnection)
        client.transport.write(b"GET / HTTP/1.1\r\nhost: edge\r\n\r\n")
        yield deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(received, [])  # in the backlog, not accepted
        self.assertEqual(service.listeners["edge"].factory.connections, set())
        api = {"name": "api", "type": "STATIC", "load_assignment": {"cluster_name": "api", "endpoints": [
            {"lb_endpoints": [_lb("127.0.0.1", backend)]}]}}
        plane.answer(CDS_PATH, 200, _cds("v1", "n1", api))
        yield service.whenLive
        yield waitFor(lambda: b"".join(received).count(b"\r\n\r\n") and b"a" in b"".join(received), 5,
                      "the answer")
        self.assertTrue(b"".join(received).startswith(b"HTTP/1.1 200"))


class CDSIntegrationTests(TestCase):
    """
    The example control plane serving clusters and endpoints to a proxy on loopback while traffic flows.
    """

    timeout = 30

    @defer.inlineCallbacks
    def test_clusterLifecycleUnderTraffic(self):
        """A route's cluster appears (503 before), takes traffic, is modified under traffic with no failure,
        and is removed (503 again); an unrelated CDS change keeps it as it is."""
        example = _loadExample()
        backends = {}
        for name in (b"a", b"b"):
            backends[name] = serveWhoami(self, name).getHost().port
        endpoints: Dict[str, list] = {"api": [{"address": "127.0.0.1", "port": backends[b"a"]},
                                              {"address": "127.0.0.1", "port": backends[b"b"]}]}
        clusters: List[Dict[str, Any]] = []
        plane = example.EndpointsResource(lambda: endpoints, lambda: clusters)
        planePort = reactor.listenTCP(0, Site(plane), interface="127.0.0.1")
        self.addCleanup(planePort.stopListening)
        service = startService(self, proxyConfig(
            "api", f"[cluster:control_plane]\nendpoints = tcp:127.0.0.1:{planePort.getHost().port}\n",
            mesh="admin = off\nxds.cluster = control_plane\nxds.cds = true\nxds.refresh_delay = 50ms\n"))
        yield service.whenLive
        url = f"http://127.0.0.1:{port(service.listeners['edge'])}/"
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        load = Traffic(url, pool)
        traffic, seen, failures = load.run, load.seen, load.failures

        def until(check, what):
            return waitFor(check, 10, what)

        # Before CDS provides it: 503.
        yield until(lambda: service.stats.get("cluster_manager.cds.update_success").value >= 1, "a CDS answer")
        response = yield treq.get(url, pool=pool)
        yield response.content()
        self.assertEqual(response.code, 503)

        # Added (EDS type: its endpoints follow at once): traffic reaches both backends.
        clusters.append({"name": "api", "type": "EDS", "lb_policy": "ROUND_ROBIN", "connect_timeout": "1s"})
        yield until(lambda: "api" in service.clusters and len(service.clusters["api"].hosts) == 2, "api's hosts")
        yield traffic(4)
        self.assertEqual(set(seen), {b"a", b"b"})
        self.assertEqual(failures, [])
        api = service.clusters["api"]

        # An unrelated cluster added: api kept as it is.
        clusters.append({"name": "other", "type": "STATIC"})
        yield until(lambda: "other" in service.clusters, "other added")
        self.assertIs(service.clusters["api"], api)

        # Modified under traffic: a new cluster, no request fails.
        flowing = traffic(60)
        yield deferLater(reactor, 0.05, lambda: None)
        clusters[0] = dict(clusters[0], lb_policy="LEAST_REQUEST")
        yield until(lambda: service.clusters["api"].config.lb_policy == "least_request", "api modified")
        yield flowing
        self.assertEqual(failures, [])
        modified = service.clusters["api"]
        self.assertIsNot(modified, api)
        self.assertEqual(len(modified.hosts), 2)
        self.assertEqual(api.pools.maxIdle, 0)  # the old one drained
        del seen[:]
        yield traffic(6)
        self.assertTrue(seen and set(seen) <= {b"a", b"b"}, seen)
        self.assertEqual(modified.upstream_rq_total.value >= 6, True)

        # Removed: 503 again; the control plane saw ACKs only.
        del clusters[0]
        yield until(lambda: "api" not in service.clusters, "api removed")
        response = yield treq.get(url, pool=pool)
        yield response.content()
        self.assertEqual(response.code, 503)
        self.assertEqual(failures, [])
        cdsRequests = [r for r in plane.requests if r["type_url"] == CDS_TYPE_URL]
        self.assertFalse(any("error_detail" in r for r in cdsRequests))
        self.assertTrue(cdsRequests[-1]["version_info"])
