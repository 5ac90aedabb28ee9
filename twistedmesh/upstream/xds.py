"""
xDS over REST-JSON: the polling state machine shared by every resource type, and endpoint discovery (EDS)
on it (see docs/discovery.md); cluster discovery (CDS) is the other type, in L{twistedmesh.upstream.cds}.

One L{XDSClient} per service talks to the control plane in the static cluster C{[mesh] xds.cluster} names.
It runs one L{XDSStream} per resource type, each an instance of the same state machine parameterized by an
L{XDSType} (the path, the type URL, the names asked for, how a resource is validated and applied). While it
runs, a stream polls C{POST <path_prefix>/v3/discovery:<type>} every C{xds.refresh_delay} (plus jitter
drawn from the injected random) with a v3 C{DiscoveryRequest}:

  - C{node} (C{id}, C{cluster}, C{user_agent_name}), the sorted C{resource_names}, the C{type_url}, the
    C{version_info} last applied and the C{response_nonce} of the last response;
  - after a response it accepted (ACK) C{version_info} is that response's; after one it rejected (NACK) it
    stays the previous one and C{error_detail} (C{{code, message}}, code 3: INVALID_ARGUMENT) says why.

A C{304} means nothing changed. A response is validated whole before anything is applied: one invalid
resource rejects the update (NACK) and what is in effect stays; so does any input the proxy cannot read
(too deep, too long a number) and, as a backstop, any error while reading or applying it. A type may skip
a resend of what is in effect (CDS does: no parse, no build). Unknown fields are ignored (logged once
each, up to L{MAX_UNKNOWN_FIELDS} names); JSON field names may be snake_case or lowerCamelCase; resources
may be C{@type}-tagged Any messages; wrapper values may be written bare (C{3}) or wrapped (C{{"value": 3}});
durations are proto3 JSON strings (C{"1.5s"}).

EDS: every cluster with C{discovery = xds} subscribes (L{XDSClient.subscribe}) to the
C{ClusterLoadAssignment} named after it (or its C{service_name}); one request asks for all of them, and the
last assignment accepted for each resource is kept so that a cluster rebuilt by a reload starts with it.

Requests go through Twisted's HTTP/1.1 client on the control-plane cluster's own hosts (its load balancer,
health and TLS), each bounded by C{xds.timeout} on the injected clock; nothing blocks the reactor.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from hashlib import blake2b
from random import Random
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Set, Tuple

from twisted.internet import defer, protocol
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from ..config.discovery import XDSConfig
from .discovery import DiscoveredHost, IDiscovery, UpdateStats

if TYPE_CHECKING:
    from .cluster import Cluster

__all__ = [
    "XDSClient", "XDSStream", "XDSType", "EDSSubscription", "InvalidResource", "Assignment", "parseAssignment",
    "parseResponse", "decodeResponse", "responseDigest", "parseDuration", "EDS_TYPE_URL", "EDS_PATH",
    "MAX_UNKNOWN_FIELDS",
]

#: The type URL of an EDS resource (and of an EDS request and response).
EDS_TYPE_URL = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
#: The REST path of EDS.
EDS_PATH = "/v3/discovery:endpoints"
#: google.rpc.Code INVALID_ARGUMENT: the code of every NACK's error_detail.
INVALID_ARGUMENT = 3
#: A response body larger than this is refused (a control plane gone wrong must not exhaust memory).
MAX_RESPONSE_BYTES = 16 * 1024 * 1024

_CAMEL = re.compile(r"(?<=[a-z0-9])([A-Z])")
# ASCII digits only (str.isdigit and \d take "²" and other digits int() refuses), and few of them: the
# longest duration proto3 allows is 315576000000s, and int() of thousands of digits is refused or slow.
_DURATION = re.compile(r"^([0-9]{1,12})(?:\.([0-9]{1,9}))?s$")
_DIGITS = re.compile(r"^[0-9]{1,20}$")
#: How many distinct unknown field names are logged (and remembered); later ones are not.
MAX_UNKNOWN_FIELDS = 1000
# A field name worth logging as it is; another (a control plane's garbage) is logged as "<name>".
_FIELD_NAME = re.compile(r"^[A-Za-z0-9_@.]{1,64}$")
# Where a field is that differs between resources: a list index, a cluster's name ("resources[3](api)").
_NONCE = re.compile(rb'"nonce"\s*:\s*"([\x20-\x21\x23-\x5b\x5d-\x7e]{0,256})"')
_PLACE = re.compile(r"\[\d+\](?:\([^()]*\))?")
_HEALTH = {"UNKNOWN": 0, "HEALTHY": 1, "UNHEALTHY": 2, "DRAINING": 3, "TIMEOUT": 4, "DEGRADED": 5}
#: health_status values whose hosts are not used (Envoy's: failed, going away, or timed out).
_UNUSABLE = frozenset((2, 3, 4))
_UINT32 = 0xFFFFFFFF
_DNS_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?$")


class InvalidResource(ValueError):
    """
    A response or resource the client cannot apply: the update is rejected (NACK) with this message.
    """


def _snake(name: str) -> str:
    """
    A JSON field name in snake_case (proto3 JSON allows lowerCamelCase too).
    """
    return _CAMEL.sub(lambda m: "_" + m.group(1).lower(), name)


class _Fields:
    """
    A JSON object's fields by snake_case name, reporting the ones nobody read as unknown.
    """

    def __init__(self, value: Any, path: str, unknown: Callable[[str], None]) -> None:
        if not isinstance(value, dict):
            raise InvalidResource(f"{path}: expected an object, not {_kind(value)}")
        self.path = path
        self.items = {}
        for key, item in value.items():
            name = _snake(key)
            if name in self.items:
                raise InvalidResource(f"{path}: field {name} given twice")
            self.items[name] = item
        self.unknown = unknown
        self.read: Set[str] = set()

    def get(self, name: str, default: Any = None) -> Any:
        self.read.add(name)
        value = self.items.get(name)
        return default if value is None else value

    def done(self) -> None:
        for name in self.items:
            if name not in self.read and name != "@type":
                self.unknown(f"{self.path}.{name if _FIELD_NAME.match(name) else '<name>'}")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _uint(value: Any, path: str, minimum: int = 0, maximum: int = _UINT32) -> int:
    """
    A proto3 JSON unsigned integer: a number, a numeric string, or either wrapped as C{{"value": ...}}.
    """
    if isinstance(value, dict):
        if set(value) - {"value"}:
            raise InvalidResource(f"{path}: a wrapper takes only a value field")
        value = value.get("value", 0)
    if isinstance(value, bool):
        raise InvalidResource(f"{path}: expected a number, not a boolean")
    if isinstance(value, str):
        if _DIGITS.match(value.strip()) is None:
            raise InvalidResource(f"{path}: {value[:40]!r} is not a whole number")
        value = int(value)
    elif isinstance(value, float):
        if not value.is_integer():
            raise InvalidResource(f"{path}: {value!r} is not a whole number")
        value = int(value)
    elif not isinstance(value, int):
        raise InvalidResource(f"{path}: expected a number, not {_kind(value)}")
    if not minimum <= value <= maximum:
        raise InvalidResource(f"{path}: {value if value.bit_length() < 64 else 'a large number'} is not from "
                              f"{minimum} to {maximum}")
    return value


def parseDuration(value: Any, path: str = "duration") -> float:
    """
    A proto3 JSON duration (C{"1.5s"}, C{"0.010s"}, C{"3s"}) in seconds; negative ones are refused.

    @raise InvalidResource: not such a string.
    """
    if not isinstance(value, str):
        raise InvalidResource(f"{path}: a duration is a string like \"1.5s\", not {_kind(value)}")
    match = _DURATION.match(value.strip())
    if match is None:
        raise InvalidResource(f"{path}: {value[:40]!r} is not a duration like \"1.5s\"")
    seconds, fraction = match.groups()
    return int(seconds) + (int(fraction.ljust(9, "0")) / 1e9 if fraction else 0.0)


@dataclass(frozen=True)
class Assignment:
    """
    A validated C{ClusterLoadAssignment}, reduced to what the client applies.

    @ivar name: C{cluster_name}.
    @ivar hosts: the usable endpoints of the lowest priority that has any.
    @ivar listed: how many endpoints the assignment listed, at every priority (0: an empty assignment).
    @ivar staleAfter: C{policy.endpoint_stale_after} in seconds, or C{None}.
    """

    name: str
    hosts: Tuple[DiscoveredHost, ...]
    listed: int
    staleAfter: Optional[float] = None


def parseAssignment(value: Any, path: str, unknown: Callable[[str], None], names: bool = False) -> Assignment:
    """
    Validate one EDS resource (an Any tagged with L{EDS_TYPE_URL}, or the bare message).

    @param names: accept DNS names as well as IP addresses (the C{load_assignment} of a DNS cluster).

    @raise InvalidResource: the resource is invalid (then the whole update is rejected).
    """
    if isinstance(value, dict) and "@type" in value and value["@type"] != EDS_TYPE_URL:
        raise InvalidResource(f"{path}: resource of type {value['@type']!r}, expected {EDS_TYPE_URL}")
    cla = _Fields(value, path, unknown)
    name = cla.get("cluster_name")
    if not isinstance(name, str) or not name:
        raise InvalidResource(f"{path}: cluster_name is required")
    byPriority: Dict[int, List[DiscoveredHost]] = {}
    listed = 0
    groups = cla.get("endpoints", [])
    if not isinstance(groups, list):
        raise InvalidResource(f"{path}.endpoints: expected a list")
    for i, group in enumerate(groups):
        gpath = f"{path}.endpoints[{i}]"
        locality = _Fields(group, gpath, unknown)
        # Locality weights and the locality itself are validated but not used: hosts are balanced as one set.
        if locality.get("load_balancing_weight") is not None:
            _uint(locality.get("load_balancing_weight"), gpath + ".load_balancing_weight", 1)
        if locality.get("locality") is not None and not isinstance(locality.get("locality"), dict):
            raise InvalidResource(f"{gpath}.locality: expected an object")
        priority = _uint(locality.get("priority", 0), gpath + ".priority", 0, 128)
        lbEndpoints = locality.get("lb_endpoints", [])
        if not isinstance(lbEndpoints, list):
            raise InvalidResource(f"{gpath}.lb_endpoints: expected a list")
        usable = byPriority.setdefault(priority, [])
        for j, lbEndpoint in enumerate(lbEndpoints):
            listed += 1
            host = _lbEndpoint(lbEndpoint, f"{gpath}.lb_endpoints[{j}]", unknown, names)
            if host is not None:
                usable.append(host)
        locality.done()
    staleAfter = None
    if cla.get("policy") is not None:
        policy = _Fields(cla.get("policy"), path + ".policy", unknown)
        if policy.get("endpoint_stale_after") is not None:
            staleAfter = parseDuration(policy.get("endpoint_stale_after"), path + ".policy.endpoint_stale_after")
            if staleAfter <= 0:
                staleAfter = None  # Envoy: zero means never stale
        if policy.get("overprovisioning_factor") is not None:
            _uint(policy.get("overprovisioning_factor"), path + ".policy.overprovisioning_factor", 1)
        policy.done()
    cla.done()
    hosts: Tuple[DiscoveredHost, ...] = ()
    for priority in sorted(byPriority):
        if byPriority[priority]:
            hosts = tuple(byPriority[priority])
            break
    return Assignment(name, hosts, listed, staleAfter)


def _lbEndpoint(value: Any, path: str, unknown: Callable[[str], None], names: bool = False) -> Optional[DiscoveredHost]:
    """
    One C{LbEndpoint}: its host, or C{None} when its C{health_status} says not to use it.
    """
    lb = _Fields(value, path, unknown)
    status = lb.get("health_status", 0)
    if isinstance(status, str):
        if status not in _HEALTH:
            raise InvalidResource(f"{path}.health_status: {status!r} is not one of {', '.join(_HEALTH)}")
        status = _HEALTH[status]
    elif not isinstance(status, int) or isinstance(status, bool) or status not in _HEALTH.values():
        raise InvalidResource(f"{path}.health_status: {status!r} is not a health status")
    weight = _uint(lb.get("load_balancing_weight", 1), path + ".load_balancing_weight", 1)
    endpoint = _Fields(lb.get("endpoint", {}), path + ".endpoint", unknown)
    hostname = endpoint.get("hostname")
    if hostname is not None and not isinstance(hostname, str):
        raise InvalidResource(f"{path}.endpoint.hostname: expected a string")
    address = _Fields(endpoint.get("address", {}), path + ".endpoint.address", unknown)
    if address.get("socket_address") is None:
        raise InvalidResource(f"{path}.endpoint.address: socket_address is required (pipe and other "
                              f"addresses are not supported)")
    socketAddress = _Fields(address.get("socket_address"), path + ".endpoint.address.socket_address", unknown)
    ip = socketAddress.get("address")
    if not isinstance(ip, str) or not (isIPAddress(ip) or isIPv6Address(ip)
                                       or (names and _DNS_NAME.match(ip) is not None)):
        what = "an IP address or a DNS name" if names else "an IP address"
        raise InvalidResource(f"{path}.endpoint.address.socket_address.address: {ip!r} is not {what}")
    protocol = socketAddress.get("protocol", "TCP")
    if protocol not in ("TCP", 0):
        raise InvalidResource(f"{path}.endpoint.address.socket_address.protocol: only TCP is supported")
    if socketAddress.get("named_port") is not None:
        raise InvalidResource(f"{path}.endpoint.address.socket_address.named_port: not supported, give port_value")
    port = _uint(socketAddress.get("port_value", 0), path + ".endpoint.address.socket_address.port_value", 1, 65535)
    for fields in (socketAddress, address, endpoint, lb):
        fields.done()
    if status in _UNUSABLE:
        return None
    return DiscoveredHost(f"tcp:host={ip.replace(':', chr(92) + ':')}:port={port}", weight, hostname or None)


@dataclass(frozen=True)
class Response:
    """
    A validated C{DiscoveryResponse}.

    @ivar resources: the validated resources by name (L{Assignment}s for EDS, cluster configs for CDS).
    """

    version: str
    nonce: str
    resources: Dict[str, Any]


def decodeResponse(body: bytes) -> Any:
    """
    The JSON value of a response body.

    @raise InvalidResource: not JSON, nested too deep to decode, or a number too long to convert.
    """
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InvalidResource(f"the response is not JSON this proxy can read: {str(e)[:200]}") from None


def responseDigest(value: Any) -> bytes:
    """
    A digest of a decoded response without its C{nonce} (every response has a new one): two responses
    with the same digest carry the same version and resources.
    """
    if isinstance(value, dict) and "nonce" in value:
        value = {k: v for k, v in value.items() if k != "nonce"}
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return blake2b(text.encode("ascii"), digest_size=16).digest()


def parseResponse(body: Any, unknown: Callable[[str], None], typeURL: str = EDS_TYPE_URL,
                  parseResource: Callable[[Any, str, Callable[[str], None]], Any] = parseAssignment,
                  maxResources: Optional[int] = None) -> Response:
    """
    Validate a C{DiscoveryResponse} whole.

    @param body: the response body, or its value already decoded (L{decodeResponse}).
    @param typeURL: the type of the resources asked for: a response of another type is refused.
    @param parseResource: validates one resource (C{(value, path, unknown)}); what it returns has a C{name}.
    @param maxResources: a response with more resources is refused (before any is parsed).
    @raise InvalidResource: not JSON, not a response, too many resources, or one of them is invalid.
    """
    value = decodeResponse(body) if isinstance(body, (bytes, str)) else body
    response = _Fields(value, "response", unknown)
    version = response.get("version_info", "")
    nonce = response.get("nonce", "")
    if not isinstance(version, str) or not isinstance(nonce, str):
        raise InvalidResource("response: version_info and nonce are strings")
    given = response.get("type_url", typeURL)
    if given != typeURL:
        raise InvalidResource(f"response: type_url {str(given)[:200]!r}, expected {typeURL}")
    resources = response.get("resources", [])
    if not isinstance(resources, list):
        raise InvalidResource("response.resources: expected a list")
    if maxResources is not None and len(resources) > maxResources:
        raise InvalidResource(f"response.resources: {len(resources)} resources, more than the {maxResources} "
                              f"this proxy takes")
    # Read (and so not reported as unknown) but not used.
    response.get("control_plane")
    response.get("canary")
    parsed: Dict[str, Any] = {}
    for i, resource in enumerate(resources):
        try:
            item = parseResource(resource, f"response.resources[{i}]", unknown)
        except InvalidResource:
            raise
        except (ValueError, RecursionError) as e:  # a value Python refuses (a conversion's limit)
            raise InvalidResource(f"response.resources[{i}]: {str(e)[:200]}") from None
        if item.name in parsed:
            raise InvalidResource(f"response.resources[{i}]: {item.name!r} is given twice")
        parsed[item.name] = item
    response.done()
    return Response(version, nonce, parsed)


@implementer(IBodyProducer)
class _BytesProducer:
    """
    A request body already in memory, written at once.
    """

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer) -> defer.Deferred:
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _HostEndpoints:
    """
    The endpoint factory of the client's agent: a pick of the client's control-plane cluster (the one in
    effect now), for every request.
    """

    def __init__(self, client: "XDSClient") -> None:
        self.client = client

    def endpointForURI(self, uri):
        cluster = self.client.controlPlane
        host = cluster.pick()
        if host is None:
            raise ConnectionError(f"cluster {cluster.name} has no healthy host")
        return host.client


class XDSType:
    """
    What one resource type (EDS, CDS) adds to the shared polling state machine (L{XDSStream}): the path
    and type it polls, the names it asks for, how a resource is validated, and what happens to an answer.
    Subclasses override what they need.

    @ivar typeURL: the C{type_url} of requests and responses.
    @ivar path: the REST path, after C{xds.path_prefix}.
    @ivar maxResources: a response with more resources is rejected (C{None}: no limit).
    @ivar skipUnchanged: a response with the version and resources of the last one accepted is ACKed
        without being parsed or applied again (L{unchanged} is called instead of L{accept}).
    """

    typeURL = ""
    path = ""
    maxResources: Optional[int] = None
    skipUnchanged = False

    def resourceNames(self) -> List[str]:
        """
        The C{resource_names} of the next request (empty: every resource, as CDS asks).
        """
        return []

    def parseResource(self, value: Any, path: str, unknown: Callable[[str], None]) -> Any:
        """
        Validate one resource of a response; the result has a C{name}.

        @raise InvalidResource: the resource is invalid (the whole update is rejected).
        """
        raise NotImplementedError

    def attempted(self) -> Any:
        """
        A poll starts; the result is given back to L{accept}, L{rejected} or L{failed} for that poll.
        """
        return None

    def accept(self, response: Response, token: Any) -> None:
        """
        Apply a validated response.

        @raise InvalidResource: it cannot be applied after all; nothing of it may have been applied then
            (the update is rejected like an invalid one).
        """

    def unchanged(self, version: str, token: Any) -> None:
        """
        A response the same as the last one accepted was ACKed without work (with L{skipUnchanged}).
        """

    def rejected(self, why: str, token: Any) -> None:
        """
        A response was rejected (NACK).
        """

    def failed(self, why: str, token: Any) -> None:
        """
        A poll failed: the control plane was unreachable, timed out or answered neither C{200} nor C{304}.
        """


class _EDS(XDSType):
    """
    Endpoint discovery: the assignments of the running L{EDSSubscription}s, one request for them all.
    """

    typeURL = EDS_TYPE_URL
    path = EDS_PATH

    def __init__(self, client: "XDSClient") -> None:
        self.client = client
        #: The last assignment accepted for each resource subscribed to, with its version: a cluster
        #: rebuilt by a reload or CDS starts with it rather than empty.
        self.known: Dict[str, Tuple[Assignment, str]] = {}

    def resourceNames(self) -> List[str]:
        return sorted({s.resource for s in self.client.subscriptions if s.running})

    def parseResource(self, value: Any, path: str, unknown: Callable[[str], None]) -> Assignment:
        return parseAssignment(value, path, unknown)

    def attempted(self) -> Tuple[List["EDSSubscription"], Set[str]]:
        running = [s for s in self.client.subscriptions if s.running]
        for s in running:
            s.stats.update_attempt.value += 1
        return running, {s.resource for s in running}

    def accept(self, response: Response, token: Tuple[List["EDSSubscription"], Set[str]]) -> None:
        asked = token[1]
        known = self.known
        for name in asked:
            assignment = response.resources.get(name)
            if assignment is not None and assignment.listed:
                known[name] = (assignment, response.version)
        # The subscriptions running now, not those of when the request left: a cluster a reload rebuilt
        # meanwhile gets the answer its predecessor asked for.
        running = [s for s in self.client.subscriptions if s.running and s.resource in asked]
        for name in list(known):
            if not any(s.resource == name for s in self.client.subscriptions):
                del known[name]
        for s in running:
            s.apply(response.resources.get(s.resource), response.version)

    def rejected(self, why: str, token: Tuple[List["EDSSubscription"], Set[str]]) -> None:
        for s in token[0]:
            s.update_rejected.value += 1

    def failed(self, why: str, token: Tuple[List["EDSSubscription"], Set[str]]) -> None:
        for s in token[0]:
            s.stats.update_failure.value += 1


@implementer(IDiscovery)
class EDSSubscription:
    """
    One cluster's subscription to its C{ClusterLoadAssignment} (the cluster's L{IDiscovery}).

    @ivar resource: the resource name (C{service_name}, else the cluster's name).
    @ivar running: between L{start} and L{stop}.
    @ivar version: the version of the last assignment applied to the cluster, or C{None}.
    """

    def __init__(self, client: "XDSClient", cluster: "Cluster") -> None:
        self.client = client
        self.cluster = cluster
        self.resource = cluster.config.discovery.service_name or cluster.name
        self.stats = UpdateStats(cluster.stats)
        self.update_rejected = cluster.stats.counter("update_rejected")
        self.running = False
        self.version: Optional[str] = None
        self._stale = None

    def start(self) -> None:
        """
        Join the client's polls (the first one starts at once if none runs).
        """
        if not self.running:
            self.running = True
            client = self.client
            if self not in client.subscriptions:
                client.subscriptions.append(self)
            known = client.eds.kind.known.get(self.resource)
            if known is not None:
                self.apply(*known)  # what the control plane said last, until it says more
            client._subscriptionsChanged()

    def stop(self) -> None:
        """
        Leave the polls (the last subscription to leave stops them); the cluster keeps its hosts. A stopped
        subscription is forgotten by its client.
        """
        if self.running:
            self.running = False
            self._cancelStale()
        if self in self.client.subscriptions:
            self.client.subscriptions.remove(self)
        self.client._subscriptionsChanged()

    def apply(self, assignment: Optional[Assignment], version: str) -> None:
        """
        The accepted response's assignment for this cluster (C{None}: not in the response).
        """
        stats = self.stats
        if assignment is None or not assignment.listed:
            # Envoy's rule: an empty (or missing) assignment is counted and the previous hosts kept.
            stats.update_empty.value += 1
            return
        changed = self.cluster.updateHosts(assignment.hosts)
        self.version = version
        stats.update_success.value += 1
        if not changed:
            stats.update_no_rebuild.value += 1
        self._cancelStale()
        if assignment.staleAfter is not None:
            self._stale = self.client.clock.callLater(assignment.staleAfter, self._staled, assignment.staleAfter)

    def _staled(self, after: float) -> None:
        """
        No update for C{endpoint_stale_after}: the control plane said to drop its endpoints then.
        """
        self._stale = None
        self.client.log.warn("cluster {cluster}: no endpoint update for {after}s (endpoint_stale_after): "
                             "dropping its endpoints", cluster=self.cluster.name, after=after)
        self.cluster.updateHosts(())

    def _cancelStale(self) -> None:
        stale, self._stale = self._stale, None
        if stale is not None and stale.active():
            stale.cancel()


class XDSStream:
    """
    The polling state machine of one resource type, the same for EDS and CDS (see the module docstring):
    a request every C{refresh_delay} plus jitter, ACK and NACK by C{version_info}, C{response_nonce} and
    C{error_detail}, C{304} as "nothing changed", a timeout on the injected clock.

    @ivar kind: the L{XDSType} polled.
    @ivar version: C{version_info} of the last response accepted (sent back as the ACK), C{""} before one.
    @ivar nonce: the nonce of the last response read, C{""} before one.
    @ivar errorDetail: the C{error_detail} of the next request (after a NACK), or C{None}.
    @ivar polling: a poll is scheduled or in flight.
    @ivar accepted: the L{responseDigest} of the last response accepted, when the kind skips unchanged
        resends; set it to C{None} to have the next response applied whatever it is.
    @ivar requests: the requests sent, as dicts (the last few, for tests and debugging).
    """

    def __init__(self, client: "XDSClient", kind: XDSType) -> None:
        self.client = client
        self.kind = kind
        self.path = client.config.path_prefix + kind.path
        self.version = ""
        self.nonce = ""
        self.errorDetail: Optional[Dict[str, Any]] = None
        self.polling = False
        self.requests: List[Dict[str, Any]] = []
        self._timer = None
        self._inflight: Optional[defer.Deferred] = None
        self._again = False  # poll again at once when the request in flight is answered
        self.accepted: Optional[bytes] = None

    def start(self) -> None:
        """
        Start polling: the first request goes out on the next turn of the reactor, so that everything
        started in this one is in it.
        """
        if not self.polling:
            self.polling = True
            self._timer = self.client.clock.callLater(0, self.poll)

    def soon(self) -> None:
        """
        Poll now, or as soon as the request in flight is answered (the resources asked for changed).
        """
        if not self.polling:
            return
        if self._inflight is not None:
            self._again = True
        elif self._timer is not None and self._timer.active():
            self._timer.reset(0)

    def stop(self) -> None:
        """
        Stop polling: cancel the timer and the request in flight.
        """
        if self.polling:
            self.polling = False
            timer, self._timer = self._timer, None
            if timer is not None and timer.active():
                timer.cancel()
            inflight, self._inflight = self._inflight, None
            if inflight is not None:
                inflight.cancel()

    def request(self) -> Dict[str, Any]:
        """
        The next C{DiscoveryRequest}.
        """
        config = self.client.config
        request: Dict[str, Any] = {
            "version_info": self.version,
            "node": {"id": config.node_id, "cluster": config.node_cluster, "user_agent_name": "twistedmesh"},
            "resource_names": self.kind.resourceNames(),
            "type_url": self.kind.typeURL,
            "response_nonce": self.nonce,
        }
        if self.errorDetail is not None:
            request["error_detail"] = self.errorDetail
        return request

    def poll(self) -> None:
        """
        Send one request now (the timer calls it).
        """
        self._timer = None
        if not self.polling:
            return
        request = self.request()
        self.requests = self.requests[-9:] + [request]
        token = self.kind.attempted()
        client = self.client
        d = defer.maybeDeferred(client.post, self.path, json.dumps(request).encode("utf-8"))
        self._inflight = d
        timer = client.clock.callLater(client.config.timeout, d.cancel)

        def ended(result):
            if timer.active():
                timer.cancel()
            return result

        d.addBoth(ended)
        d.addCallbacks(self._answered, self._failed, callbackArgs=(token,), errbackArgs=(token,))
        d.addErrback(lambda f: client.log.failure("xDS poll failed unexpectedly", f))
        d.addBoth(self._next, d)

    def _answered(self, answer: Tuple[int, bytes], token: Any) -> None:
        status, body = answer
        if status == 304:
            return
        if status != 200:
            text = body[:200].decode("utf-8", "replace")
            self._failed(Failure(ConnectionError(f"HTTP status {status}: {text!r}")), token)
            return
        kind = self.kind
        value = None
        try:
            value = decodeResponse(body)
            digest = None
            if kind.skipUnchanged:
                digest = responseDigest(value)
                if digest == self.accepted and isinstance(value, dict):
                    # What is in effect already (Envoy ACKs such a resend without applying it again).
                    nonce = value.get("nonce", "")
                    self.nonce = nonce if isinstance(nonce, str) else ""
                    self.errorDetail = None
                    kind.unchanged(self.version, token)
                    return
            response = parseResponse(value, self.client._unknownField, kind.typeURL, kind.parseResource,
                                     kind.maxResources)
            kind.accept(response, token)
        except InvalidResource as e:
            self._reject(str(e), body, token, value)
            return
        except Exception as e:  # a bug, or an input nobody foresaw: rejected all the same, never dropped
            self.client.log.failure("xDS: an update of {path} could not be parsed or applied", path=kind.path)
            self._reject(f"{type(e).__name__}: {str(e)[:200]}", body, token, value)
            return
        self.accepted = digest
        self.nonce = response.nonce
        self.version = response.version
        self.errorDetail = None
        self.client.log.debug("xDS: applied {path} version {version}", path=kind.path, version=response.version)

    def _reject(self, why: str, body: bytes, token: Any, value: Any = None) -> None:
        """
        NACK: keep what was applied and the last version; say why in the next request.

        @param value: the decoded body, or C{None} if it did not decode.
        """
        if isinstance(value, dict):
            nonce = value.get("nonce")
        else:
            # Not JSON this proxy can decode (too deep, a number too long): the nonce is still echoed if it
            # can be found, so that the control plane sees which response was refused.
            match = _NONCE.search(body)
            nonce = match.group(1).decode("ascii") if match is not None else None
        if isinstance(nonce, str):
            self.nonce = nonce
        self.errorDetail = {"code": INVALID_ARGUMENT, "message": why}
        self.kind.rejected(why, token)
        self.client.log.warn("xDS: rejected an update of {path} from the control plane (kept version "
                             "{version!r}): {why}", path=self.kind.path, version=self.version, why=why)

    def _failed(self, failure: Failure, token: Any) -> None:
        if failure.check(defer.CancelledError) and not self.polling:
            return  # stopped
        why = "timed out" if failure.check(defer.CancelledError) else failure.getErrorMessage()
        self.kind.failed(why, token)
        self.client.log.warn("xDS: cannot reach the control plane for {path} ({why})", path=self.kind.path, why=why)

    def _next(self, _, d: defer.Deferred) -> None:
        if self._inflight is d:
            self._inflight = None
        if self.polling:
            config = self.client.config
            delay = config.refresh_delay * (1.0 + config.jitter * self.client.random.random())
            if self._again:
                self._again, delay = False, 0
            self._timer = self.client.clock.callLater(delay, self.poll)


class XDSClient:
    """
    This proxy's link to its control plane: one L{XDSStream} per resource type, EDS for the subscribed
    clusters' assignments and, when asked for (L{watchClusters}), CDS. Both speak through L{post}.

    @ivar controlPlane: the cluster the control plane is in; the service points it at the running one
        when a reload rebuilds that cluster.
    @ivar eds: the EDS stream (it polls while a subscription runs).
    @ivar cds: the CDS stream, or C{None} until L{watchClusters}.
    """

    log = Logger()

    def __init__(self, config: XDSConfig, controlPlane: "Cluster", clock: IReactorTime, random: Random,
                 post: Optional[Callable[[str, bytes], defer.Deferred]] = None) -> None:
        """
        @param post: sends one request: C{post(path, body)} fires with C{(status, body)}; by default over
            HTTP/1.1 to a host of C{controlPlane}. Tests pass canned answers.
        """
        self.config = config
        self.controlPlane = controlPlane
        self.clock = clock
        self.random = random
        self.post = post if post is not None else self._post
        self.subscriptions: List[EDSSubscription] = []
        self.eds = XDSStream(self, _EDS(self))
        self.cds: Optional[XDSStream] = None
        self._unknown: Set[str] = set()
        self._unknownSuppressed = False
        self._agent = None

    def subscribe(self, cluster: "Cluster") -> EDSSubscription:
        """
        The L{IDiscovery} of an xDS cluster: a subscription to its assignment, in the polls once started.
        """
        return EDSSubscription(self, cluster)

    def watchClusters(self, kind: XDSType) -> XDSStream:
        """
        Poll CDS too, for C{kind} (a L{twistedmesh.upstream.cds.CDSSubscription}); started by the caller.
        """
        self.cds = XDSStream(self, kind)
        return self.cds

    def stop(self) -> None:
        """
        Stop every stream (the client is being replaced, or the service stops).
        """
        self.eds.stop()
        if self.cds is not None:
            self.cds.stop()

    def resourceNames(self) -> List[str]:
        """
        The sorted resource names of the running EDS subscriptions.
        """
        return self.eds.kind.resourceNames()

    def _subscriptionsChanged(self) -> None:
        eds = self.eds
        if not any(s.running for s in self.subscriptions):
            eds.stop()
        elif not eds.polling:
            eds.start()
        elif not eds.requests or not set(self.resourceNames()) <= set(eds.requests[-1]["resource_names"]):
            eds.soon()  # a resource not asked for yet: ask now rather than after refresh_delay

    def _unknownField(self, path: str) -> None:
        # List indices and cluster names differ from one resource to the next: one log line per field,
        # whatever its place. The names are bounded: a control plane sending ever new ones must not grow
        # this set, or the log, without end.
        key = _PLACE.sub("[]", path)
        unknown = self._unknown
        if key in unknown:
            return
        if len(unknown) >= MAX_UNKNOWN_FIELDS:
            if not self._unknownSuppressed:
                self._unknownSuppressed = True
                self.log.warn("xDS: {count} unknown fields logged; further unknown fields suppressed",
                              count=len(unknown))
            return
        unknown.add(key)
        self.log.info("xDS: ignoring unknown field {field}", field=key)

    def _post(self, path: str, body: bytes) -> defer.Deferred:
        """
        POST C{body} to C{path} on a host of the control-plane cluster; fires with C{(status, body)}.
        """
        if self._agent is None:
            self._agent = Agent.usingEndpointFactory(self.clock, _HostEndpoints(self))
        host = (self.config.host or self.controlPlane.name).encode("ascii")
        headers = Headers({b"content-type": [b"application/json"], b"accept": [b"application/json"]})
        d = self._agent.request(b"POST", b"http://" + host + path.encode("ascii"), headers, _BytesProducer(body))

        def read(response):
            body = _BoundedBody(MAX_RESPONSE_BYTES)
            response.deliverBody(body)
            return body.finished.addCallback(lambda content: (response.code, content))

        return d.addCallback(read)


class _BoundedBody(protocol.Protocol):
    """
    Collects a response body of at most C{limit} bytes; C{finished} fires with it, or fails (too large,
    connection lost). Cancelling C{finished} stops the download.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.chunks: List[bytes] = []
        self.finished = defer.Deferred(lambda d: self._stop())

    def _stop(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.chunks = []
            self.finished.errback(ConnectionError(f"response larger than {self.limit} bytes"))
            self._stop()
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self.chunks))
        else:
            self.finished.errback(reason)
