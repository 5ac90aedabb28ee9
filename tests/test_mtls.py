"""
Mutual TLS end to end, through a real L{MeshService} on loopback sockets with a PKI made for each test:
an HTTP listener that requires client certificates and checks their SANs, upstream mTLS origination,
certificate rotation under an open connection, and the admin endpoint behind C{[mesh] admin_tls}. Twisted
TLS clients drive every case; C{openssl s_client} and C{curl} repeat the listener's matrix when installed.
"""

from __future__ import annotations

import datetime
import os
import shutil
from typing import List, Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web import resource, server

from twistedmesh.config import ConfigErrors, loadString
from twistedmesh.service import MeshService

from .support import KeepAliveClient, startService
from .test_tls import BACKEND, FRONTEND, OPENSSL, PKI, bump, serialOf, standardPKI

CURL = shutil.which("curl")
OPERATOR = "spiffe://mesh.local/ns/ops/sa/operator"


def issueExpired(pki: PKI, name: str, dns=(), uris=()) -> None:
    """
    Write C{name}.pem / C{name}.key into C{pki}'s directory: a certificate signed by its CA that expired
    yesterday.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    sans: List[x509.GeneralName] = [x509.DNSName(d) for d in dns] + [x509.UniformResourceIdentifier(u) for u in uris]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(pki.caCert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=30))
        .not_valid_after(now - datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(pki.caKey, hashes.SHA256())
    )
    with open(pki.path(f"{name}.pem"), "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(pki.path(f"{name}.key"), "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


class Upstream(resource.Resource):
    """
    Answers 200 C{ok}; records each request's C{x-forwarded-client-cert} and the client certificate the
    request came with (when served over TLS).
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.xfcc: List[Optional[bytes]] = []
        self.clientSubjects: List[Optional[str]] = []

    def render(self, request):
        self.xfcc.append(request.getHeader(b"x-forwarded-client-cert"))
        getPeer = getattr(request.channel.transport, "getPeerCertificate", None)
        cert = getPeer() if getPeer is not None else None
        self.clientSubjects.append(cert.to_cryptography().subject.rfc4514_string() if cert is not None else None)
        return b"ok"


class MTLSTests(TestCase):
    """
    A proxy with an mTLS edge and an mTLS admin, on loopback, with a PKI made for the test.
    """

    timeout = 30

    def setUp(self) -> None:
        self.pki = standardPKI(self.mktemp())
        self.pki.issue("operator", uris=[OPERATOR])
        issueExpired(self.pki, "expired-client", uris=[FRONTEND])
        issueExpired(self.pki, "expired-server", dns=["localhost"], uris=[BACKEND])
        self.untrusted = PKI(self.mktemp(), caName="rogue")
        self.untrusted.issue("frontend", uris=[FRONTEND])  # the right SAN, the wrong CA
        self.upstream = Upstream()
        port = reactor.listenTCP(0, server.Site(self.upstream), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.upstreamPort = port.getHost().port

    @inlineCallbacks
    def start(self, text: str):
        """
        Start a L{MeshService} for config C{text}; fire with it once it listens.
        """
        self.addCleanup(lambda: deferLater(reactor, 0.05, lambda: None))  # let closed sockets go
        service = startService(self, text)
        yield service.whenLive
        return service

    def edgeConfig(self, cluster: str = "", admin: str = "admin = off") -> str:
        """
        A config with the mTLS listener C{edge} in front of the plaintext test upstream (or C{cluster},
        given as sections, named C{up}).
        """
        p = self.pki.path
        cluster = cluster or f"[cluster:up]\nendpoints = tcp:127.0.0.1:{self.upstreamPort}\n"
        return f"""
[mesh]
{admin}
[listener:edge]
endpoint = tcp:0:interface=127.0.0.1
protocol = http
tls = edge
routes = main
forward_client_cert = sanitize_set
[tls:edge]
certificate = {p("server.pem")}
private_key = {p("server.key")}
client_ca = {self.pki.ca}
verify_san = {FRONTEND}
alpn = http/1.1
[route:main/all]
prefix = /
cluster = up
{cluster}
"""

    def creator(self, clientCert: Optional[str] = None, pki: Optional[PKI] = None):
        """
        A Twisted client TLS creator trusting the test CA, with client certificate C{clientCert} of C{pki}.
        """
        pki = pki or self.pki
        return optionsForClientTLS("localhost", trustRoot=self.pki.twistedCA(),
                                   clientCertificate=pki.twistedClient(clientCert) if clientCert else None)

    @inlineCallbacks
    def connect(self, port: int, creator) -> KeepAliveClient:
        """
        A L{KeepAliveClient} connected over TLS from C{creator} to C{port}; it is closed at cleanup.
        """
        client = KeepAliveClient()
        endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
        yield connectProtocol(endpoint, client)

        def close():
            client.transport.loseConnection()
            return client.lost

        self.addCleanup(close)
        return client

    @inlineCallbacks
    def get(self, port: int, creator, path: bytes = b"/") -> bytes:
        """
        One request over a new TLS connection: the response, or C{b""} if the connection was refused.
        """
        client = yield self.connect(port, creator)
        response = yield client.request(path)
        return response

    def stat(self, service: MeshService, name: str) -> int:
        return service.stats.get(name).value

    # -- the listener's matrix --

    @inlineCallbacks
    def test_listenerMatrix(self) -> None:
        """
        The mTLS listener refuses no certificate, an untrusted CA's, an expired one and a SAN not in
        verify_san, and serves the allowed client (its XFCC reaching the upstream).
        """
        service = yield self.start(self.edgeConfig())
        port = service.listeners["edge"].port.getHost().port
        self.assertEqual((yield self.get(port, self.creator())), b"")
        self.assertEqual((yield self.get(port, self.creator("frontend", self.untrusted))), b"")
        self.assertEqual(self.stat(service, "listener.edge.ssl.fail_verify_error"), 1)
        self.assertEqual((yield self.get(port, self.creator("expired-client"))), b"")
        self.assertEqual(self.stat(service, "listener.edge.ssl.fail_verify_error"), 2)
        self.assertEqual((yield self.get(port, self.creator("backend"))), b"")
        self.assertEqual(self.stat(service, "listener.edge.ssl.fail_verify_san"), 1)
        self.assertEqual(self.upstream.xfcc, [])
        ok = yield self.get(port, self.creator("frontend"))
        self.assertTrue(ok.startswith(b"HTTP/1.1 200"), ok)
        self.assertTrue(ok.endswith(b"ok"), ok)
        [xfcc] = self.upstream.xfcc
        self.assertIn(b"URI=" + FRONTEND.encode(), xfcc)

    @inlineCallbacks
    def test_listenerMatrixOpenSSL(self) -> None:
        """
        C{openssl s_client} gets a 200 with the frontend certificate and no response without a certificate
        or with a SAN not in verify_san.
        """
        if OPENSSL is None:
            raise SkipTest("openssl is not installed")
        service = yield self.start(self.edgeConfig())
        port = service.listeners["edge"].port.getHost().port
        p = self.pki.path

        def sClient(*args: str):
            return getProcessOutputAndValue(
                OPENSSL, ("s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
                          "-CAfile", self.pki.ca, "-ign_eof", "-quiet", *args),
                env=dict(os.environ), stdinBytes=b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")

        out, err, code = yield sClient("-cert", p("frontend.pem"), "-key", p("frontend.key"))
        self.assertIn(b"HTTP/1.1 200", out, err)
        for args in ((), ("-cert", p("backend.pem"), "-key", p("backend.key")),
                     ("-cert", p("expired-client.pem"), "-key", p("expired-client.key"))):
            out, err, code = yield sClient(*args)
            self.assertNotIn(b"HTTP/1.1", out, (args, err))
        self.assertEqual(len(self.upstream.xfcc), 1)

    @inlineCallbacks
    def test_listenerMatrixCurl(self) -> None:
        """
        C{curl --cert/--key/--cacert} gets a 200 with the frontend certificate; without one, with the
        untrusted CA's, the expired one or another SAN, curl fails and nothing reaches the upstream.
        """
        if CURL is None:
            raise SkipTest("curl is not installed")
        service = yield self.start(self.edgeConfig())
        port = service.listeners["edge"].port.getHost().port

        def curl(name: Optional[str] = None, pki: Optional[PKI] = None):
            pki = pki or self.pki
            args = ["-sS", "--max-time", "10", "--resolve", f"localhost:{port}:127.0.0.1",
                    "--cacert", self.pki.ca, "-o", "-", "-w", "\n%{http_code}"]
            if name is not None:
                args += ["--cert", pki.path(f"{name}.pem"), "--key", pki.path(f"{name}.key")]
            return getProcessOutputAndValue(CURL, args + [f"https://localhost:{port}/"], env=dict(os.environ))

        out, err, code = yield curl("frontend")
        self.assertEqual((code, out), (0, b"ok\n200"), err)
        for name, pki in ((None, None), ("frontend", self.untrusted), ("expired-client", None),
                          ("backend", None)):
            out, err, code = yield curl(name, pki)
            self.assertNotEqual(code, 0, (name, out))
            self.assertNotIn(b"200", out, (name, err))
        self.assertEqual(len(self.upstream.xfcc), 1)

    # -- upstream mTLS --

    def upstreamTLS(self, serverCert: str) -> int:
        """
        A Twisted TLS server serving C{serverCert} that requires a client certificate from the test CA, in
        front of the test upstream; return its port.
        """
        options = self.pki.twistedClient(serverCert).options(self.pki.twistedCA())
        port = reactor.listenSSL(0, server.Site(self.upstream), options, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def meshCluster(self, port: int) -> str:
        p = self.pki.path
        return f"""
[cluster:up]
endpoints = tcp:127.0.0.1:{port}
tls = mesh
[tls:mesh]
ca = {self.pki.ca}
certificate = {p("frontend.pem")}
private_key = {p("frontend.key")}
verify_san = {BACKEND}
"""

    @inlineCallbacks
    def test_upstreamMTLS(self) -> None:
        """
        A cluster with C{tls = mesh} presents the frontend certificate to an upstream that requires one and
        checks the upstream's SPIFFE ID: 200.
        """
        upstreamPort = self.upstreamTLS("backend")
        service = yield self.start(self.edgeConfig(self.meshCluster(upstreamPort)))
        port = service.listeners["edge"].port.getHost().port
        ok = yield self.get(port, self.creator("frontend"))
        self.assertTrue(ok.startswith(b"HTTP/1.1 200"), ok)
        self.assertEqual(self.upstream.clientSubjects, ["CN=frontend"])

    @inlineCallbacks
    def test_upstreamWrongSAN(self) -> None:
        """
        An upstream whose certificate lacks the expected SAN, or has expired, fails the connection: 503,
        nothing reaching it.
        """
        for serverCert in ("server", "expired-server"):
            upstreamPort = self.upstreamTLS(serverCert)
            service = yield self.start(self.edgeConfig(self.meshCluster(upstreamPort)))
            port = service.listeners["edge"].port.getHost().port
            failed = yield self.get(port, self.creator("frontend"))
            self.assertTrue(failed.startswith(b"HTTP/1.1 503"), failed)
            # As Envoy reports it: a connection failure whose transport failure reason is TLS.
            self.assertIn(b"reset reason: connection failure, transport failure reason: TLS_error", failed)
        self.assertEqual(self.upstream.xfcc, [])

    # -- rotation --

    @inlineCallbacks
    def test_rotationKeepsOpenConnection(self) -> None:
        """
        After the listener's files are replaced and checked, an open keep-alive connection keeps being
        served with the old certificate while a new connection gets the new one.
        """
        service = yield self.start(self.edgeConfig())
        port = service.listeners["edge"].port.getHost().port
        first = serialOf(self.pki.path("server.pem"))
        old = yield self.connect(port, self.creator("frontend"))
        response = yield old.request()
        self.assertTrue(response.startswith(b"HTTP/1.1 200"), response)

        _, _, second = self.pki.issue("server2", dns=["localhost"])
        shutil.copyfile(self.pki.path("server2.pem"), self.pki.path("server.pem"))
        shutil.copyfile(self.pki.path("server2.key"), self.pki.path("server.key"))
        bump(self.pki.path("server.pem"), self.pki.path("server.key"))
        self.assertTrue(service.serverTLS["edge"].checkFiles())

        response = yield old.request()
        self.assertTrue(response.startswith(b"HTTP/1.1 200"), response)
        self.assertEqual(old.transport.getPeerCertificate().get_serial_number(), first)
        self.assertIsNone(old.reason)
        new = yield self.connect(port, self.creator("frontend"))
        response = yield new.request()
        self.assertTrue(response.startswith(b"HTTP/1.1 200"), response)
        self.assertEqual(new.transport.getPeerCertificate().get_serial_number(), second)
        self.assertEqual(self.stat(service, "listener.edge.ssl.certificate_reload"), 1)

    # -- the admin endpoint --

    def adminConfig(self) -> str:
        """
        The edge config with the admin endpoint behind C{[tls:ops]}, which only lets the operator in.
        """
        p = self.pki.path
        return self.edgeConfig(admin="admin = tcp:0:interface=127.0.0.1\nadmin_tls = ops") + f"""
[tls:ops]
certificate = {p("server.pem")}
private_key = {p("server.key")}
client_ca = {self.pki.ca}
verify_san = {OPERATOR}
"""

    @inlineCallbacks
    def test_adminOverMTLS(self) -> None:
        """
        With C{admin_tls}, C{/ready} answers 200 over TLS to the operator's certificate and the handshake
        is refused without one or with another client's.
        """
        service = yield self.start(self.adminConfig())
        port = service.admin.port.getHost().port
        ready = yield self.get(port, self.creator("operator"), b"/ready")
        self.assertTrue(ready.startswith(b"HTTP/1.1 200"), ready)
        self.assertTrue(ready.endswith(b"LIVE\n") or ready.endswith(b"LIVE"), ready)
        self.assertEqual((yield self.get(port, self.creator(), b"/ready")), b"")
        self.assertEqual((yield self.get(port, self.creator("frontend"), b"/ready")), b"")
        self.assertEqual(self.stat(service, "admin.ssl.fail_verify_san"), 1)
        self.assertEqual(self.stat(service, "admin.ssl.handshake"), 1)

    @inlineCallbacks
    def test_adminTLSReloads(self) -> None:
        """
        The admin's C{[tls:NAME]} is watched like a listener's: started with the service, stopped with it.
        """
        service = yield self.start(self.adminConfig())
        self.assertIsNotNone(service.adminTLS._reloader.call)
        yield service.stopService()
        self.assertIsNone(service.adminTLS._reloader.call)

    def test_adminTLSConfigErrors(self) -> None:
        """
        C{admin_tls} must name a C{[tls:NAME]} section (with a suggestion), one that can serve, and an
        admin endpoint that is on.
        """
        p = self.pki.path
        base = f"[tls:ops]\ncertificate = {p('server.pem')}\nprivate_key = {p('server.key')}\n"
        with self.assertRaises(ConfigErrors) as caught:
            loadString("[mesh]\nadmin_tls = opz\n" + base)
        self.assertIn("names no [tls:opz] section", str(caught.exception))
        self.assertIn("ops", str(caught.exception).split("[tls:opz] section", 1)[1])
        with self.assertRaises(ConfigErrors) as caught:
            loadString("[mesh]\nadmin_tls = ops\n[tls:ops]\nca = " + self.pki.ca + "\n")
        self.assertIn("needs `certificate` and `private_key`", str(caught.exception))
        with self.assertRaises(ConfigErrors) as caught:
            loadString("[mesh]\nadmin = off\nadmin_tls = ops\n" + base)
        self.assertIn("admin = off", str(caught.exception))
        self.assertEqual(loadString("[mesh]\nadmin_tls = ops\n" + base).mesh.admin_tls, "ops")
