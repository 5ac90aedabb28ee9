"""
Tests of the C{rbac} filters (L{twistedmesh.filters.rbac}), the stream's peer identity, and
C{x-forwarded-client-cert} (L{twistedmesh.http.xfcc}): units over L{FilterHarness} and fake connections,
then real mutual TLS on loopback through a L{MeshService}.
"""

from __future__ import annotations

import random
from typing import Dict, List, Optional

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource, server

from twistedmesh.config import ConfigError, ListenerConfig, Options, loadString
from twistedmesh.filters.rbac import RBACFactory, TCPRBACFactory
from twistedmesh.http.xfcc import forwardedClientCert, xfccElement
from twistedmesh.interfaces import IHTTPFilterFactory, INetworkFilterFactory
from twistedmesh.listener.chain import STOP
from twistedmesh.observability.stats import StatsStore
from twistedmesh.plugins import FilterContext
from twistedmesh.service import MeshService
from twistedmesh.testing import FilterHarness
from twistedmesh.tls import PeerIdentity

from .test_tls import FRONTEND, BACKEND, standardPKI

FRONTEND_ID = PeerIdentity("CN=frontend", ("frontend.mesh.local",), (FRONTEND,), "ab" * 32)
BACKEND_ID = PeerIdentity("CN=backend", (), (BACKEND,), "cd" * 32)


class Env:
    """
    One configured filter and the stats it counts into.
    """

    def __init__(self, factory, items: Dict[str, str], protocol: str = "http") -> None:
        self.stats = StatsStore()
        self.errors: List[ConfigError] = []
        listener = ListenerConfig(name="edge", endpoint="tcp:0", protocol=protocol, filters=("f",))
        context = FilterContext(Clock(), self.stats, {}, listener, random.Random(1))
        options = Options("t.ini", "filter:f", dict(items), self.errors)
        self.maker = factory.configure(options, context)
        options.finish()
        self.prefix = ("http.edge.rbac." if protocol == "http" else "listener.edge.rbac.")

    def stat(self, name: str) -> int:
        return self.stats.get(self.prefix + name).value


def policy(principals: str = "any", permissions: str = "any", **extra: str) -> Dict[str, str]:
    items = {"policy.p.principals": principals, "policy.p.permissions": permissions}
    items.update(extra)
    return items


class HTTPTests(SynchronousTestCase):
    """
    The HTTP filter, driven by L{FilterHarness}.
    """

    def run_(self, items: Dict[str, str], identity: Optional[PeerIdentity] = None, method: bytes = b"GET",
             path: bytes = b"/", headers=(), peer: str = "127.0.0.1", port: Optional[int] = None,
             sni: Optional[str] = None):
        env = Env(RBACFactory(), items)
        self.assertEqual(env.errors, [])
        h = FilterHarness(env.maker(None), peer=(peer, 40000))
        h.codec.peerIdentity = identity
        if port is not None:
            h.codec.localPort = port
        if sni is not None:
            h.codec.serverName = sni
        h.request(method, path, list(headers))
        return h, env

    def allowed(self, principals: str = "any", permissions: str = "any", **kw) -> bool:
        h, env = self.run_(policy(principals, permissions), **kw)
        return h.downstream.status is None

    def test_denialIs403(self) -> None:
        """
        A request no ALLOW policy matches gets 403 C{RBAC: access denied}, is not forwarded, and is counted.
        """
        h, env = self.run_(policy("san:exact:" + FRONTEND), identity=BACKEND_ID)
        self.assertEqual(h.downstream.status, 403)
        self.assertEqual(h.downstream.body, b"RBAC: access denied")
        self.assertEqual(h.stream.responseCodeDetails, "rbac_access_denied_matched_policy[none]")
        self.assertIsNone(h.upstream.method)
        self.assertEqual((env.stat("allowed"), env.stat("denied")), (0, 1))

    def test_allowIsForwarded(self) -> None:
        """
        A request an ALLOW policy matches reaches the upstream and is counted as allowed.
        """
        h, env = self.run_(policy("san:exact:" + FRONTEND), identity=FRONTEND_ID)
        self.assertIsNone(h.downstream.status)
        self.assertEqual(h.upstream.method, b"GET")
        self.assertEqual((env.stat("allowed"), env.stat("denied")), (1, 0))

    def test_denyAction(self) -> None:
        """
        With C{action = DENY} a matching policy denies (naming it) and a non-matching request passes.
        """
        items = policy("any", "path:prefix:/admin", action="DENY")
        h, _ = self.run_(items, path=b"/admin/x")
        self.assertEqual(h.downstream.status, 403)
        self.assertEqual(h.stream.responseCodeDetails, "rbac_access_denied_matched_policy[p]")
        h, _ = self.run_(items, path=b"/public")
        self.assertIsNone(h.downstream.status)

    def test_shadow(self) -> None:
        """
        In shadow mode a denial is counted as C{shadow_denied} but the request goes on.
        """
        h, env = self.run_(policy("san:exact:" + FRONTEND, shadow="true"))
        self.assertIsNone(h.downstream.status)
        self.assertEqual(h.upstream.method, b"GET")
        self.assertEqual((env.stat("shadow_denied"), env.stat("shadow_allowed"), env.stat("denied")), (1, 0, 0))
        h, env = self.run_(policy("any", shadow="true"))
        self.assertEqual(env.stat("shadow_allowed"), 1)

    def test_anyAndAuthenticated(self) -> None:
        """
        C{any} matches everything; C{authenticated} only a client with a certificate.
        """
        self.assertTrue(self.allowed("any"))
        self.assertFalse(self.allowed("authenticated"))
        self.assertTrue(self.allowed("authenticated", identity=BACKEND_ID))

    def test_sanMatchers(self) -> None:
        """
        C{san:} matches URI and DNS SANs exactly, by prefix, or by a whole-string regex.
        """
        self.assertTrue(self.allowed("san:prefix:spiffe://mesh.local/ns/default/", identity=FRONTEND_ID))
        self.assertFalse(self.allowed("san:prefix:spiffe://mesh.local/ns/other/", identity=FRONTEND_ID))
        self.assertTrue(self.allowed("san:exact:frontend.mesh.local", identity=FRONTEND_ID))
        self.assertTrue(self.allowed("san:regex:spiffe://.*/sa/(frontend|web)", identity=FRONTEND_ID))
        self.assertFalse(self.allowed("san:regex:/sa/frontend", identity=FRONTEND_ID))
        self.assertFalse(self.allowed("san:prefix:spiffe://"))

    def test_ip(self) -> None:
        """
        C{ip:CIDR} matches the direct peer's address.
        """
        self.assertTrue(self.allowed("ip:10.0.0.0/8", peer="10.1.2.3"))
        self.assertFalse(self.allowed("ip:10.0.0.0/8", peer="192.168.1.1"))
        self.assertTrue(self.allowed("ip:192.168.1.1", peer="192.168.1.1"))

    def test_headers(self) -> None:
        """
        C{header:NAME:} matches presence, an exact value, a prefix or a regex, on either side.
        """
        hdrs = [(b"x-team", b"payments-eu")]
        self.assertTrue(self.allowed("header:X-Team:present", headers=hdrs))
        self.assertFalse(self.allowed("header:x-other:present", headers=hdrs))
        self.assertTrue(self.allowed("header:x-team:exact:payments-eu", headers=hdrs))
        self.assertFalse(self.allowed("header:x-team:exact:payments", headers=hdrs))
        self.assertTrue(self.allowed("any", "header:x-team:prefix:payments", headers=hdrs))
        self.assertTrue(self.allowed("any", "header:x-team:regex:pay.*-(eu|us)", headers=hdrs))

    def test_pathAndMethod(self) -> None:
        """
        C{path:} matches the path without its query; C{method:} the method.
        """
        self.assertTrue(self.allowed("any", "path:prefix:/api/", path=b"/api/x?a=1"))
        self.assertFalse(self.allowed("any", "path:prefix:/api/", path=b"/apix"))
        self.assertTrue(self.allowed("any", "path:exact:/x", path=b"/x?y"))
        self.assertFalse(self.allowed("any", "path:exact:/x", path=b"/x/y"))
        self.assertTrue(self.allowed("any", "path:regex:/v[0-9]+/.*", path=b"/v2/items"))
        self.assertTrue(self.allowed("any", "method:GET"))
        self.assertFalse(self.allowed("any", "method:post"))
        self.assertTrue(self.allowed("any", "method:post", method=b"POST"))

    def test_portAndSNI(self) -> None:
        """
        C{port:} matches the local port and C{sni:} the server name, case-insensitively.
        """
        self.assertTrue(self.allowed("any", "port:443", port=443))
        self.assertFalse(self.allowed("any", "port:443", port=8443))
        self.assertTrue(self.allowed("any", "sni:API.example.com", sni="api.example.com"))
        self.assertFalse(self.allowed("any", "sni:api.example.com", sni="www.example.com"))
        self.assertFalse(self.allowed("any", "sni:api.example.com"))

    def test_andOrNot(self) -> None:
        """
        C{and} binds tighter than C{or}; C{not} and C{not:} negate; parentheses group.
        """
        self.assertTrue(self.allowed("any", "method:POST or method:GET and path:prefix:/a", path=b"/a"))
        self.assertFalse(self.allowed("any", "method:POST or method:GET and path:prefix:/a", path=b"/b"))
        self.assertTrue(self.allowed("any", "( method:POST or method:GET ) and path:prefix:/a", path=b"/a"))
        self.assertFalse(self.allowed("any", "( method:POST or method:GET ) and path:prefix:/a", path=b"/b"))
        self.assertFalse(self.allowed("any", "not path:prefix:/admin", path=b"/admin"))
        self.assertTrue(self.allowed("any", "not:path:prefix:/admin", path=b"/x"))
        self.assertTrue(self.allowed("not not any"))

    def test_policiesInOrder(self) -> None:
        """
        Policies are tried in order: the first that matches (both sides) names the denial.
        """
        items = {"action": "DENY",
                 "policy.first.principals": "ip:10.0.0.0/8", "policy.first.permissions": "any",
                 "policy.second.principals": "any", "policy.second.permissions": "method:GET"}
        h, _ = self.run_(items, peer="192.168.0.1")
        self.assertEqual(h.stream.responseCodeDetails, "rbac_access_denied_matched_policy[second]")
        h, _ = self.run_(items, peer="10.0.0.1")
        self.assertEqual(h.stream.responseCodeDetails, "rbac_access_denied_matched_policy[first]")

    def test_configErrors(self) -> None:
        """
        Bad expressions, unknown matchers, a per-policy action and a section without policies are errors.
        """
        cases = [
            ({"policy.p.principals": "path:prefix:/x", "policy.p.permissions": "any"}, "policy.p.principals"),
            ({"policy.p.principals": "any and", "policy.p.permissions": "any"}, "policy.p.principals"),
            ({"policy.p.principals": "any", "policy.p.permissions": "bogus:1"}, "policy.p.permissions"),
            ({"policy.p.principals": "ip:10.0.0.300/8", "policy.p.permissions": "any"}, "policy.p.principals"),
            ({"policy.p.principals": "san:regex:(", "policy.p.permissions": "any"}, "policy.p.principals"),
            ({"policy.p.principals": "any"}, "policy.p.permissions"),
            (dict(policy(), **{"policy.p.action": "DENY"}), "policy.p.action"),
            ({"action": "ALLOW"}, None),
            (dict(policy(), action="MAYBE"), "action"),
        ]
        for items, key in cases:
            env = Env(RBACFactory(), items)
            self.assertEqual([e.key for e in env.errors], [key], items)
        env = Env(TCPRBACFactory(), policy("header:x:present"), protocol="tcp")
        self.assertEqual([e.key for e in env.errors], ["policy.p.principals"])
        self.assertIn("TCP", env.errors[0].why)

    def test_plugins(self) -> None:
        """
        Both plugins are found by name, each under its own interface.
        """
        self.assertIn("rbac", [p.name for p in getPlugins(IHTTPFilterFactory)])
        self.assertIn("rbac", [p.name for p in getPlugins(INetworkFilterFactory)])


class FakeConn:
    """
    A network connection as a filter sees it.
    """

    def __init__(self, peer: str = "127.0.0.1", port: int = 5432) -> None:
        self.listener = "edge"
        self.transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", port),
                                         peerAddress=IPv4Address("TCP", peer, 40000))
        self.state: dict = {}
        self.closed: Optional[str] = None

    def close(self, reason: str = ""):
        self.closed = reason
        return STOP


class TCPTests(SynchronousTestCase):
    """
    The network filter, with fake connections.
    """

    def test_ipAllow(self) -> None:
        """
        A source outside the allowed network is closed on accept; one inside goes on.
        """
        env = Env(TCPRBACFactory(), policy("ip:10.0.0.0/8"), protocol="tcp")
        self.assertEqual(env.errors, [])
        inside, outside = FakeConn("10.9.9.9"), FakeConn("172.16.0.1")
        self.assertIsNone(env.maker(inside).connectionMade(inside))
        self.assertIs(env.maker(outside).connectionMade(outside), STOP)
        self.assertEqual((inside.closed, outside.closed), (None, "rbac_access_denied"))
        self.assertEqual((env.stat("allowed"), env.stat("denied")), (1, 1))

    def test_portDenyAndShadow(self) -> None:
        """
        C{action = DENY} on a port closes; in shadow mode it is only counted.
        """
        env = Env(TCPRBACFactory(), policy("any", "port:5432", action="DENY"), protocol="tcp")
        conn = FakeConn(port=5432)
        self.assertIs(env.maker(conn).connectionMade(conn), STOP)
        env = Env(TCPRBACFactory(), policy("any", "port:5432", action="DENY", shadow="yes"), protocol="tcp")
        conn = FakeConn(port=5432)
        self.assertIsNone(env.maker(conn).connectionMade(conn))
        self.assertIsNone(conn.closed)
        self.assertEqual((env.stat("shadow_denied"), env.stat("denied")), (1, 0))

    def test_identityDecidesOnFirstData(self) -> None:
        """
        A policy on the client certificate waits for the first bytes (after the handshake), then decides
        once.
        """
        env = Env(TCPRBACFactory(), policy("authenticated"), protocol="tcp")
        conn = FakeConn()
        flt = env.maker(conn)
        self.assertIsNone(flt.connectionMade(conn))
        self.assertIs(flt.dataReceived(conn, b"x"), STOP)  # a plaintext transport has no identity
        self.assertEqual(conn.closed, "rbac_access_denied")
        self.assertIsNone(flt.dataReceived(conn, b"y"))
        self.assertEqual(env.stat("denied"), 1)


class _TLSTransport(StringTransport):
    """
    A transport with a client certificate and a certificate of our own (pyOpenSSL objects).
    """

    def __init__(self, peerCert, ownCert) -> None:
        super().__init__()
        self.peerCert = peerCert
        self.ownCert = ownCert

    def getPeerCertificate(self):
        return self.peerCert

    def getHandle(self):
        own = self.ownCert

        class Handle:
            def get_certificate(self):
                return own
        return Handle()


class PeerIdentityAndXFCCTests(SynchronousTestCase):
    """
    C{Stream.peerIdentity} and the XFCC modes, without sockets.
    """

    def setUp(self) -> None:
        from OpenSSL.crypto import FILETYPE_PEM, load_certificate
        self.pki = standardPKI(self.mktemp())
        self.pki.issue("proxy", uris=["spiffe://mesh.local/ns/edge/sa/proxy"])

        def load(name):
            with open(self.pki.path(f"{name}.pem"), "rb") as f:
                return load_certificate(FILETYPE_PEM, f.read())
        self.certs = (load("frontend"), load("proxy"))
        self.transport = self.tlsTransport()

    def tlsTransport(self) -> "_TLSTransport":
        """
        A fresh transport whose peer is the frontend and whose own certificate is the proxy's.
        """
        return _TLSTransport(*self.certs)

    def test_streamPeerIdentity(self) -> None:
        """
        A stream's C{peerIdentity} comes from its connection's transport, and is None on plaintext.
        """
        h = FilterHarness()
        self.assertIsNone(h.stream.peerIdentity)
        h.codec.transport = StringTransport()
        self.assertIsNone(h.stream.peerIdentity)
        h.codec.transport = self.transport
        identity = h.stream.peerIdentity
        self.assertEqual(identity.uriSANs, (FRONTEND,))
        self.assertEqual(identity.subject, "CN=frontend")

    def test_accessLogPeerURISAN(self) -> None:
        """
        C{%DOWNSTREAM_PEER_URI_SAN%} shows the URI SAN of the stream's peer identity.
        """
        from twistedmesh.observability.accesslog import compileFormat
        h = FilterHarness()
        line = compileFormat("%DOWNSTREAM_PEER_URI_SAN%", "http")
        self.assertEqual(line.render(h.stream, 0.0), b"-\n")
        h.codec.transport = self.transport
        self.assertEqual(line.render(h.stream, 0.0), (FRONTEND + "\n").encode())

    def test_element(self) -> None:
        """
        The element has Envoy's keys in Envoy's order, with a quoted subject.
        """
        self.assertEqual(xfccElement(FRONTEND_ID, ["spiffe://p"]),
                         b'By=spiffe://p;Hash=' + b"ab" * 32 + b';Subject="CN=frontend";URI=' + FRONTEND.encode()
                         + b";DNS=frontend.mesh.local")
        self.assertEqual(xfccElement(PeerIdentity('CN=a\\"b', (), (), "00")), b'Hash=00;Subject="CN=a\\\\\\"b";URI=')

    def test_modes(self) -> None:
        """
        sanitize drops, forward keeps, append appends, sanitize_set replaces; without mTLS all drop.
        """
        class Conn:
            pass
        conn = Conn()
        conn.transport = self.transport
        incoming = [b"By=x;Hash=1"]
        self.assertEqual(forwardedClientCert(conn, "sanitize", incoming), ())
        self.assertEqual(forwardedClientCert(conn, "forward", incoming),
                         [(b"x-forwarded-client-cert", b"By=x;Hash=1")])
        [(_, appended)] = forwardedClientCert(conn, "append", incoming)
        self.assertTrue(appended.startswith(b"By=x;Hash=1,By=spiffe://mesh.local/ns/edge/sa/proxy;Hash="))
        self.assertIn(b"URI=" + FRONTEND.encode(), appended)
        [(_, replaced)] = forwardedClientCert(conn, "sanitize_set", incoming)
        self.assertEqual(replaced, appended.split(b",", 1)[1])
        plain = Conn()
        plain.transport = StringTransport()
        for mode in ("forward", "append", "sanitize_set"):
            self.assertEqual(forwardedClientCert(plain, mode, incoming), ())

    def h2Fields(self, mode: str, transport):
        """
        The request fields an HTTP/2 filter sees for a request carrying a forged XFCC, on C{transport}.
        """
        from twistedmesh.http.server import HTTPSettings
        from twistedmesh.listener.http import HTTPListenerFactory

        from .test_h2 import Hold, Peer
        Hold.streams = []
        stats = StatsStore()
        settings = HTTPSettings("web", [lambda s: Hold()], stats, Clock(), forwardClientCert=mode)
        proto = HTTPListenerFactory(settings, stats, True).buildProtocol(None)
        proto.makeConnection(transport)
        peer = Peer(proto, transport)
        peer.request([(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"https"),
                      (b":authority", b"a"), (b"x-forwarded-client-cert", b"By=forged")])
        [stream] = Hold.streams
        return [(bytes(n), bytes(v)) for n, v in stream.requestHeaders if bytes(n) == b"x-forwarded-client-cert"]

    def test_http2(self) -> None:
        """
        The HTTP/2 codec sanitizes by default and sets the client's element with sanitize_set.
        """
        self.assertEqual(self.h2Fields("sanitize", self.tlsTransport()), [])
        [(_, value)] = self.h2Fields("sanitize_set", self.tlsTransport())
        self.assertNotIn(b"forged", value)
        self.assertIn(b"URI=" + FRONTEND.encode(), value)
        self.assertEqual(self.h2Fields("append", StringTransport()), [])

    def test_listenerKey(self) -> None:
        """
        C{forward_client_cert} defaults to sanitize and refuses unknown modes.
        """
        base = "[mesh]\nadmin = off\n[listener:l]\nendpoint = tcp:0\nprotocol = http\nfilters = headers\n"
        self.assertEqual(loadString(base).listeners["l"].forward_client_cert, "sanitize")
        self.assertEqual(loadString(base + "forward_client_cert = append\n").listeners["l"].forward_client_cert,
                         "append")
        self.assertRaises(Exception, loadString, base + "forward_client_cert = always\n")


# -- real sockets ----------------------------------------------------------------------------------------------


class Upstream(resource.Resource):
    """
    Answers 200 C{ok}, recording each request's C{x-forwarded-client-cert}.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.xfcc: List[Optional[bytes]] = []

    def render(self, request):
        self.xfcc.append(request.getHeader(b"x-forwarded-client-cert"))
        return b"ok"


class Collect(Protocol):
    """
    Sends C{payload} once connected; collects the answer until the connection closes.
    """

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.received = b""
        self.done: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        head, sep, body = self.received.partition(b"\r\n\r\n")
        if sep and b"content-length: %d\r\n" % len(body) in head.lower() + b"\r\n":
            self.transport.loseConnection()  # the whole response is here

    def connectionLost(self, reason) -> None:
        self.done.callback(None)


REQUEST = b"GET /api HTTP/1.1\r\nHost: localhost\r\nx-forwarded-client-cert: By=forged\r\nConnection: close\r\n\r\n"


class LoopbackTests(TestCase):
    """
    A real proxy with mutual TLS and RBAC, and a TCP listener with RBAC by source address.
    """

    timeout = 20

    @inlineCallbacks
    def start(self, text: str):
        """
        Start a L{MeshService} for config C{text}; fire with it once it listens.
        """
        service = MeshService(loadString(text, "test.ini"), reactor, seed=1)
        service.startService()
        self.addCleanup(service.stopService)
        yield service.whenLive
        return service

    @inlineCallbacks
    def test_mtlsHTTP(self) -> None:
        """
        The frontend's certificate is allowed (the upstream sees its XFCC, not the forged one); another
        client's certificate gets 403.
        """
        from twisted.internet.ssl import optionsForClientTLS
        pki = standardPKI(self.mktemp())
        upstream = Upstream()
        site = server.Site(upstream)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        service = yield self.start(f"""
[mesh]
admin = off
[listener:web]
endpoint = tcp:0:interface=127.0.0.1
protocol = http
tls = edge
filters = authz, router
routes = main
forward_client_cert = sanitize_set
[filter:authz]
type = rbac
policy.frontend.principals = san:exact:{FRONTEND}
policy.frontend.permissions = any
[route:main/all]
prefix = /
cluster = up
[cluster:up]
endpoints = tcp:127.0.0.1:{port.getHost().port}
[tls:edge]
certificate = {pki.path("server.pem")}
private_key = {pki.path("server.key")}
client_ca = {pki.ca}
""")
        proxyPort = service.listeners["web"].port.getHost().port

        def ask(client: str):
            creator = optionsForClientTLS("localhost", trustRoot=pki.twistedCA(),
                                          clientCertificate=pki.twistedClient(client))
            probe = Collect(REQUEST)
            endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", proxyPort))
            return connectProtocol(endpoint, probe).addCallback(lambda _: probe.done).addCallback(
                lambda _: probe.received)

        allowed = yield ask("frontend")
        self.assertTrue(allowed.startswith(b"HTTP/1.1 200"), allowed)
        self.assertTrue(allowed.endswith(b"ok"), allowed)
        [xfcc] = upstream.xfcc
        self.assertNotIn(b"forged", xfcc)
        self.assertIn(b"URI=" + FRONTEND.encode(), xfcc)
        self.assertIn(b"Hash=", xfcc)
        denied = yield ask("backend")
        self.assertTrue(denied.startswith(b"HTTP/1.1 403"), denied)
        self.assertTrue(denied.endswith(b"RBAC: access denied"), denied)
        self.assertEqual(len(upstream.xfcc), 1)
        self.assertEqual(service.stats.get("http.web.rbac.allowed").value, 1)
        self.assertEqual(service.stats.get("http.web.rbac.denied").value, 1)
        yield deferLater(reactor, 0.05, lambda: None)

    @inlineCallbacks
    def test_tcpSourceIP(self) -> None:
        """
        A TCP listener allowing only 127.0.0.0/8 echoes; one allowing only 10.0.0.0/8 closes at once.
        """
        echo = yield self.start("[mesh]\nadmin = off\n[echo:e]\nendpoint = tcp:0:interface=127.0.0.1\n"
                                "protocol = tcp\n")
        echoPort = echo.echoes["e"].port.getHost().port
        proxy = yield self.start(f"""
[mesh]
admin = off
[listener:ok]
endpoint = tcp:0:interface=127.0.0.1
protocol = tcp
filters = f, tcp_proxy
cluster = echo
[listener:no]
endpoint = tcp:0:interface=127.0.0.1
protocol = tcp
filters = g, tcp_proxy
cluster = echo
[filter:f]
type = rbac
policy.local.principals = ip:127.0.0.0/8
policy.local.permissions = any
[filter:g]
type = rbac
policy.private.principals = ip:10.0.0.0/8
policy.private.permissions = any
[cluster:echo]
endpoints = tcp:127.0.0.1:{echoPort}
""")

        def connect(name: str, payload: bytes):
            client = Collect(payload)
            port = proxy.listeners[name].port.getHost().port
            return connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client).addCallback(
                lambda _: client)

        refused = yield connect("no", b"hello")
        yield refused.done
        self.assertEqual(refused.received, b"")
        accepted = yield connect("ok", b"hello")
        for _ in range(200):
            if accepted.received == b"hello":
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(accepted.received, b"hello")
        accepted.transport.loseConnection()
        yield accepted.done
        self.assertEqual(proxy.stats.get("listener.no.rbac.denied").value, 1)
        self.assertEqual(proxy.stats.get("listener.ok.rbac.allowed").value, 1)
        yield deferLater(reactor, 0.05, lambda: None)


class PeerSANRouteTests(SynchronousTestCase):
    """
    The route matcher C{tls.peer_san}.
    """

    def table(self, spec: str):
        from twistedmesh.http.routes import RouteTable
        config = loadString(f"""
[mesh]
admin = off
[listener:l]
endpoint = tcp:0
protocol = http
routes = t
[route:t/frontend]
prefix = /
tls.peer_san = {spec}
direct_response.status = 200
[route:t/others]
prefix = /
direct_response.status = 403
""")
        return RouteTable(config.routes["t"])

    def routeFor(self, spec: str, identity: Optional[PeerIdentity]) -> str:
        h = FilterHarness()
        h.codec.peerIdentity = identity
        h.stream.path, h.stream.authority = b"/x", b"a"
        return self.table(spec).match(h.stream).name

    def test_matches(self) -> None:
        """
        A route with C{tls.peer_san} matches only a client whose URI or DNS SAN matches it.
        """
        self.assertEqual(self.routeFor("exact:" + FRONTEND, FRONTEND_ID), "frontend")
        self.assertEqual(self.routeFor("exact:" + FRONTEND, BACKEND_ID), "others")
        self.assertEqual(self.routeFor("exact:" + FRONTEND, None), "others")
        self.assertEqual(self.routeFor("prefix:spiffe://mesh.local/ns/default/", BACKEND_ID), "frontend")
        self.assertEqual(self.routeFor("regex:frontend\\.mesh\\..*", FRONTEND_ID), "frontend")

    def test_errors(self) -> None:
        """
        An unknown kind, a bad regex and a negation are config errors naming C{tls.peer_san}.
        """
        for spec in ("present", "regex:(", "!exact:x"):
            with self.assertRaises(Exception) as caught:
                self.table(spec)
            self.assertIn("tls.peer_san", str(caught.exception), spec)
