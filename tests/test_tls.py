"""
Tests of TLS: the C{[tls:NAME]} section parser (L{twistedmesh.config.tls}) and the downstream and upstream
TLS layers (L{twistedmesh.tls}). The layers are tested for real, on loopback sockets, with
certificates made for each test in a temporary directory: a Twisted client (and C{openssl s_client} when it
is installed) talks to an echo server behind L{ServerTLS}, and L{ClientTLS} talks to such servers.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
from typing import Dict, List, Optional, Sequence, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import (
    Certificate,
    KeyPair,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
)
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest
from zope.interface import implementer

from twistedmesh.admin import redact
from twistedmesh.config.errors import ConfigError
from twistedmesh.config.options import Options
from twistedmesh.config.tls import TLSConfig, checkClientTLS, checkServerTLS, parseTLS
from twistedmesh.tls import (
    ClientTLS,
    PeerIdentity,
    SANMatcher,
    ServerTLS,
    endpointHost,
    peerIdentity,
)

FRONTEND = "spiffe://mesh.local/ns/default/sa/frontend"
BACKEND = "spiffe://mesh.local/ns/default/sa/backend"
OPENSSL = shutil.which("openssl")


# -- a PKI made per test ----------------------------------------------------------------------------------------


class PKI:
    """
    A CA and certificates it signs, written as PEM files into a directory: C{NAME.pem} (the certificate)
    and C{NAME.key} (its key). EC P-256 keys: quick to make.
    """

    def __init__(self, directory: str, caName: str = "ca") -> None:
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.caKey = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"twistedmesh test {caName}")])
        self.caCert = (
            self._builder(name, name, self.caKey.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.caKey.public_key()), critical=False)
            .sign(self.caKey, hashes.SHA256())
        )
        self.ca = self.path(f"{caName}.pem")
        self._write(self.ca, self.caCert.public_bytes(serialization.Encoding.PEM))

    def path(self, name: str) -> str:
        """
        The path of file C{name} in the PKI's directory.
        """
        return os.path.join(self.directory, name)

    def _builder(self, subject, issuer, publicKey):
        """
        A certificate builder valid from an hour ago for a day, with a random serial.
        """
        now = datetime.datetime.now(datetime.timezone.utc)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(publicKey)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=1)))

    def _write(self, path: str, data: bytes) -> None:
        """
        Write C{data} to C{path}.
        """
        with open(path, "wb") as f:
            f.write(data)

    def issue(self, name: str, dns: Sequence[str] = (), ips: Sequence[str] = (), uris: Sequence[str] = (),
              write: bool = True) -> Tuple[str, str, int]:
        """
        A certificate for C{name} (its CN) with the given SANs; return (certificate path, key path, serial).
        """
        key = ec.generate_private_key(ec.SECP256R1())
        sans: List[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        sans += [x509.UniformResourceIdentifier(u) for u in uris]
        builder = (
            self._builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), self.caCert.subject,
                          key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.caKey.public_key()),
                           critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.caKey, hashes.SHA256())
        certPath, keyPath = self.path(f"{name}.pem"), self.path(f"{name}.key")
        if write:
            self._write(certPath, cert.public_bytes(serialization.Encoding.PEM))
            self._write(keyPath, key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
        return certPath, keyPath, cert.serial_number

    def twistedCA(self) -> Certificate:
        """
        The CA certificate as Twisted's trust root.
        """
        return Certificate.loadPEM(self.caCert.public_bytes(serialization.Encoding.PEM))

    def twistedClient(self, name: str) -> PrivateCertificate:
        """
        The certificate and key C{name} as a Twisted client certificate.
        """
        with open(self.path(f"{name}.pem"), "rb") as f:
            cert = Certificate.loadPEM(f.read())
        with open(self.path(f"{name}.key"), "rb") as f:
            key = KeyPair.load(f.read(), 1)  # 1: FILETYPE_PEM
        return PrivateCertificate.fromCertificateAndKeyPair(cert, key)


def standardPKI(directory: str) -> PKI:
    """
    The certificates most tests use: C{server} (localhost, 127.0.0.1), C{other} (other.test and
    *.apps.test, for SNI), C{frontend} (a client with a SPIFFE ID), C{backend} (a server with a SPIFFE ID)
    and C{dnsclient} (a client with a DNS SAN).
    """
    pki = PKI(directory)
    pki.issue("server", dns=["localhost"], ips=["127.0.0.1"])
    pki.issue("other", dns=["other.test", "*.apps.test"])
    pki.issue("frontend", uris=[FRONTEND])
    pki.issue("backend", uris=[BACKEND])
    pki.issue("dnsclient", dns=["frontend.mesh.local"])
    return pki


def options(items: Dict[str, str]) -> Tuple[Options, List[ConfigError]]:
    """
    A C{[tls:edge]} section holding C{items}, and the error list it records into.
    """
    errors: List[ConfigError] = []
    return Options("mesh.ini", "tls:edge", dict(items), errors), errors


def tlsConfig(pki: PKI, **items: str) -> TLSConfig:
    """
    A L{TLSConfig} serving C{server.pem}, with more keys from C{items} (C{sni_NAME} becomes C{sni.NAME});
    the test fails if it does not parse.
    """
    section = {"certificate": pki.path("server.pem"), "private_key": pki.path("server.key")}
    for key, value in items.items():
        section[key.replace("__", ".")] = value
    o, errors = options(section)
    config = parseTLS("edge", o)
    o.finish()
    if errors:
        raise AssertionError("\n".join(map(str, errors)))
    return config


def serialOf(path: str) -> int:
    """
    The serial number of the (first) certificate in the file at C{path}.
    """
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read()).serial_number


def bump(*paths: str) -> None:
    """
    Move the modification time of C{paths} on, so that a rewrite within one timestamp tick still shows.
    """
    for path in paths:
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


# -- loopback peers ---------------------------------------------------------------------------------------------


@implementer(IHandshakeListener)
class Echo(Protocol):
    """
    The server: echoes bytes, and records the client's identity when the handshake completes.
    """

    def connectionMade(self) -> None:
        self.identity: Optional[PeerIdentity] = None
        self.handshook = False
        self.lost = defer.Deferred()
        self.factory.connections.append(self)

    def handshakeCompleted(self) -> None:
        self.handshook = True
        self.identity = peerIdentity(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def connectionLost(self, reason) -> None:
        self.lost.callback(None)


class EchoFactory(Factory):
    """
    Makes L{Echo}s and keeps them, so that tests can look at the server side and wait for it to close.
    """

    protocol = Echo
    noisy = False

    def __init__(self) -> None:
        self.connections: List[Echo] = []


@implementer(IHandshakeListener)
class Probe(Protocol):
    """
    The client: sends C{payload} once the handshake is done, closes once it is echoed, and records what it
    saw: whether the handshake completed, the server's certificate serial, the ALPN protocol, the echo
    and why the connection ended.
    """

    def __init__(self, payload: bytes = b"ping") -> None:
        self.payload = payload
        self.handshook = False
        self.serial: Optional[int] = None
        self.alpn: Optional[bytes] = None
        self.received = b""
        self.reason = None
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        # TLS holds this until the handshake is done.
        self.transport.write(self.payload)

    def handshakeCompleted(self) -> None:
        self.handshook = True
        self.serial = self.transport.getPeerCertificate().get_serial_number()
        self.alpn = self.transport.negotiatedProtocol

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if len(self.received) >= len(self.payload):
            self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        self.reason = reason
        self.done.callback(self)

    @property
    def echoed(self) -> bool:
        """
        Whether the payload came back whole.
        """
        return self.received == self.payload


class LoopbackMixin:
    """
    Listening with a L{ServerTLS} and connecting with Twisted clients, cleaning up after each test.
    """

    timeout = 10

    def setUp(self) -> None:
        self.pki = standardPKI(self.mktemp())

    @defer.inlineCallbacks
    def listen(self, tls: ServerTLS):
        """
        Listen on a loopback port with an echo server behind C{tls}; return (port number, echo factory).
        """
        factory = EchoFactory()
        port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(tls.wrapFactory(factory, reactor))

        def cleanUp():
            d = defer.maybeDeferred(port.stopListening)
            return defer.gatherResults([d] + [c.lost for c in factory.connections])

        self.addCleanup(cleanUp)
        return port.getHost().port, factory

    def serve(self, **items: str):
        """
        A L{ServerTLS} for C{tlsConfig(self.pki, **items)} listening; return (tls, port number, factory).
        """
        tls = ServerTLS(tlsConfig(self.pki, **items), Clock())
        d = self.listen(tls)
        d.addCallback(lambda result: (tls,) + result)
        return d

    def talk(self, port: int, creator, payload: bytes = b"ping") -> defer.Deferred:
        """
        Connect to C{port} with TLS from C{creator}, send C{payload}; fire with the L{Probe} once closed.
        """
        probe = Probe(payload)
        endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
        d = endpoint.connect(Factory.forProtocol(lambda: probe))
        d.addCallback(lambda _: probe.done)
        return d

    def client(self, hostname: str = "localhost", clientCert: Optional[str] = None, alpn=None, **extra):
        """
        A Twisted client creator trusting the test CA, optionally with client certificate C{clientCert}.
        """
        return optionsForClientTLS(
            hostname, trustRoot=self.pki.twistedCA(),
            clientCertificate=self.pki.twistedClient(clientCert) if clientCert else None,
            acceptableProtocols=alpn, extraCertificateOptions=extra or None,
        )

    @defer.inlineCallbacks
    def openssl(self, port: int, *args: str):
        """
        Run C{openssl s_client} against C{port} with C{args}; return its output as text.
        """
        if OPENSSL is None:
            raise unittest.SkipTest("openssl is not installed")
        out, err, code = yield getProcessOutputAndValue(
            OPENSSL, ("s_client", "-connect", f"127.0.0.1:{port}", *args), env=dict(os.environ), stdinBytes=b"",
        )
        return (out + err).decode("utf-8", "replace")


# -- config -------------------------------------------------------------------------------------------------------


class ParseTests(unittest.TestCase):
    """
    L{parseTLS}: keys, defaults, file checks and errors naming the key.
    """

    def setUp(self) -> None:
        self.pki = standardPKI(self.mktemp())

    def parse(self, **items: str) -> Tuple[TLSConfig, List[ConfigError]]:
        section = {k.replace("__", "."): v for k, v in items.items()}
        o, errors = options(section)
        config = parseTLS("edge", o)
        o.finish()
        return config, errors

    def assertError(self, errors: List[ConfigError], key: str, *fragments: str) -> None:
        self.assertEqual([e.key for e in errors], [key], errors)
        for fragment in fragments:
            self.assertIn(fragment, errors[0].why)

    def test_defaults(self):
        """
        A certificate and key alone give TLS 1.2 minimum, no ALPN, no client verification, 10s reloads,
        and absolute paths.
        """
        config, errors = self.parse(certificate=os.path.relpath(self.pki.path("server.pem")),
                                    private_key=self.pki.path("server.key"))
        self.assertEqual(errors, [])
        self.assertEqual(config.certificate, os.path.abspath(self.pki.path("server.pem")))
        self.assertEqual((config.min_version, config.alpn, config.client_ca, config.verify_san,
                          config.ciphers, config.reload_interval), ("1.2", (), None, (), None, 10.0))

    def test_everyKey(self):
        """
        Every key is read: lists, SNI certificates in file order with lowercase names, durations.
        """
        config, errors = self.parse(
            certificate=self.pki.path("server.pem"), private_key=self.pki.path("server.key"),
            client_ca=self.pki.ca, ca=self.pki.ca, alpn="h2, http/1.1", min_version="1.3",
            verify_san=f"{FRONTEND}, Frontend.Mesh.Local, spiffe://mesh.local/ns/prod/*",
            sni="API.internal", reload_interval="250ms",
            **{"sni__Other.test": f"{self.pki.path('other.pem')} {self.pki.path('other.key')}",
               "sni__*.apps.test": f"{self.pki.path('other.pem')} {self.pki.path('other.key')}"},
        )
        self.assertEqual(errors, [])
        self.assertEqual(config.alpn, ("h2", "http/1.1"))
        self.assertEqual(config.verify_san, (FRONTEND, "frontend.mesh.local", "spiffe://mesh.local/ns/prod/*"))
        self.assertEqual(config.sni, "api.internal")
        self.assertEqual([s.hostname for s in config.sni_certificates], ["other.test", "*.apps.test"])
        self.assertEqual((config.min_version, config.reload_interval), ("1.3", 0.25))

    def test_missingFile(self):
        """
        A file that does not exist is an error at the key naming it.
        """
        _, errors = self.parse(certificate=self.pki.path("server.pem"), private_key=self.pki.path("server.key"),
                               client_ca=self.pki.path("nope.pem"))
        self.assertError(errors, "client_ca", "no such file", "nope.pem")

    def test_unreadableFile(self):
        """
        A path that cannot be read as a file (a directory here) is an error at the key naming it.
        """
        _, errors = self.parse(certificate=self.pki.path("server.pem"), private_key=self.pki.directory)
        self.assertError(errors, "private_key", "cannot be read")

    def test_mismatchedPair(self):
        """
        A key that is not the certificate's is an error at private_key naming both files.
        """
        _, errors = self.parse(certificate=self.pki.path("server.pem"), private_key=self.pki.path("other.key"))
        self.assertError(errors, "private_key", "is not the private key", "other.key", "server.pem")

    def test_truncatedCertificate(self):
        """
        A certificate file cut short (as while being written) is an error at certificate.
        """
        with open(self.pki.path("server.pem"), "rb") as f:
            data = f.read()
        with open(self.pki.path("server.pem"), "wb") as f:
            f.write(data[: len(data) // 2])
        _, errors = self.parse(certificate=self.pki.path("server.pem"), private_key=self.pki.path("server.key"))
        self.assertError(errors, "certificate", "not a PEM certificate")

    def test_keyNotAKey(self):
        """
        A private_key file holding a certificate is an error at private_key.
        """
        _, errors = self.parse(certificate=self.pki.path("server.pem"), private_key=self.pki.path("server.pem"))
        self.assertError(errors, "private_key", "not a PEM private key")

    def test_keyWithoutCertificate(self):
        """
        A private_key without a certificate is an error at certificate.
        """
        _, errors = self.parse(private_key=self.pki.path("server.key"))
        self.assertError(errors, "certificate", "is required with `private_key`")

    def test_badMinVersion(self):
        """
        min_version is 1.2 or 1.3; 1.1 is an error listing the choices.
        """
        _, errors = self.parse(certificate=self.pki.path("server.pem"), private_key=self.pki.path("server.key"),
                               min_version="1.1")
        self.assertError(errors, "min_version", "'1.1' is not one of 1.2, 1.3")

    def test_badCiphers(self):
        """
        A cipher string that selects nothing is an error; so is any cipher string with min_version 1.3.
        """
        _, errors = self.parse(certificate=self.pki.path("server.pem"), private_key=self.pki.path("server.key"),
                               ciphers="NOT-A-CIPHER")
        self.assertError(errors, "ciphers", "selects no cipher")
        _, errors = self.parse(certificate=self.pki.path("server.pem"), private_key=self.pki.path("server.key"),
                               ciphers="ECDHE+AESGCM", min_version="1.3")
        self.assertError(errors, "ciphers", "no effect with min_version = 1.3")

    def test_badSNISyntax(self):
        """
        An sni.HOSTNAME key needs exactly two paths and a host name; each mistake is an error at its key.
        """
        _, errors = self.parse(certificate=self.pki.path("server.pem"), private_key=self.pki.path("server.key"),
                               **{"sni__other.test": self.pki.path("other.pem")})
        self.assertError(errors, "sni.other.test", "write the certificate file then the key file")
        _, errors = self.parse(certificate=self.pki.path("server.pem"), private_key=self.pki.path("server.key"),
                               **{"sni__bad!host": f"{self.pki.path('other.pem')} {self.pki.path('other.key')}"})
        self.assertError(errors, "sni.bad!host", "is not a host name")
        _, errors = self.parse(certificate=self.pki.path("server.pem"), private_key=self.pki.path("server.key"),
                               **{"sni__other.test": f"{self.pki.path('other.pem')} {self.pki.path('server.key')}"})
        self.assertError(errors, "sni.other.test", "is not the private key")

    def test_sniNeedsDefault(self):
        """
        sni.HOSTNAME certificates without a default certificate is an error at certificate.
        """
        _, errors = self.parse(**{"sni__other.test": f"{self.pki.path('other.pem')} {self.pki.path('other.key')}"})
        self.assertError(errors, "certificate", "required with sni.HOSTNAME")

    def test_badVerifySAN(self):
        """
        verify_san refuses a lone *, a * before the end, and IP addresses.
        """
        for value, fragment in (("*", "lone *"), ("spiffe://mesh.local/*/sa/x", "may only end"),
                                ("10.0.0.1", "IP address")):
            _, errors = self.parse(verify_san=value)
            self.assertError(errors, "verify_san", fragment)

    def test_unknownKey(self):
        """
        An unknown key is reported with a suggestion.
        """
        _, errors = self.parse(certificate=self.pki.path("server.pem"), private_key=self.pki.path("server.key"),
                               client_cert=self.pki.ca)
        self.assertError(errors, "client_cert", "did you mean")

    def test_serverUse(self):
        """
        A listener's section needs a certificate, verify_san needs client_ca, and ALPN offers only what the
        listener speaks; a cluster's section takes no sni.HOSTNAME certificates.
        """
        listener, errors = options({})
        checkServerTLS(TLSConfig("edge", verify_san=(FRONTEND,)), listener)
        self.assertEqual([e.key for e in errors], ["tls", "tls"])
        self.assertIn("needs `certificate`", errors[0].why)
        self.assertIn("no client_ca", errors[1].why)
        listener, errors = options({})
        checkServerTLS(tlsConfig(self.pki, alpn="h2, http/1.1"), listener, alpnSpoken=("http/1.1",))
        self.assertEqual([e.key for e in errors], ["tls"])
        self.assertIn("offers ALPN 'h2'", errors[0].why)
        cluster, errors = options({})
        config = tlsConfig(self.pki, sni__x="%s %s" % (self.pki.path("other.pem"), self.pki.path("other.key")))
        checkClientTLS(config, cluster)
        self.assertEqual([e.key for e in errors], ["tls"])

    def test_privateKeyRedacted(self):
        """
        The admin's config dump hides private_key paths, those of SNI certificates included.
        """
        config = tlsConfig(self.pki, sni__x="%s %s" % (self.pki.path("other.pem"), self.pki.path("other.key")))
        dumped = redact(config)
        self.assertEqual(dumped["private_key"], "[redacted]")
        self.assertEqual(dumped["sni_certificates"][0]["private_key"], "[redacted]")
        self.assertEqual(dumped["certificate"], config.certificate)


# -- units without sockets ---------------------------------------------------------------------------------------


class UnitTests(unittest.TestCase):
    """
    The pieces that need no socket: SAN matching, endpoint hosts, context reuse, reload scheduling.
    """

    def test_sanMatcherExactAndPrefix(self):
        """
        Patterns match DNS names without case and URIs exactly, or as prefixes with a trailing *.
        """
        m = SANMatcher(["frontend.mesh.local", "spiffe://mesh.local/ns/prod/*", FRONTEND, "api-*"])

        def ident(dns=(), uris=()):
            return PeerIdentity("CN=x", tuple(dns), tuple(uris), "00")

        self.assertTrue(m.matches(ident(dns=["Frontend.Mesh.Local"])))
        self.assertTrue(m.matches(ident(uris=[FRONTEND])))
        self.assertTrue(m.matches(ident(uris=["spiffe://mesh.local/ns/prod/sa/anything"])))
        self.assertTrue(m.matches(ident(dns=["api-7.mesh.local"])))
        self.assertFalse(m.matches(ident(uris=[FRONTEND + "x"])))
        self.assertFalse(m.matches(ident(uris=["spiffe://mesh.local/ns/prodx/sa/a"])))
        self.assertFalse(m.matches(ident(dns=["frontend.mesh.local.evil"])))
        self.assertFalse(m.matches(ident()))

    def test_endpointHost(self):
        """
        The host of a TCP client endpoint string, positional or keyword; none for a UNIX socket.
        """
        self.assertEqual(endpointHost("tcp:api.internal:443"), "api.internal")
        self.assertEqual(endpointHost("tcp:host=10.0.0.1:port=80"), "10.0.0.1")
        self.assertEqual(endpointHost("tcp:port=80:host=db"), "db")
        self.assertIsNone(endpointHost("unix:/run/app.sock"))

    def test_contextsBuiltOnce(self):
        """
        Every connection uses the same context: nothing is built per connection.
        """
        pki = standardPKI(self.mktemp())
        tls = ServerTLS(tlsConfig(pki, alpn="h2"), Clock())
        first = tls.serverConnectionForTLS(None).get_context()
        second = tls.serverConnectionForTLS(None).get_context()
        self.assertIs(first, second)

    def test_reloadSchedule(self):
        """
        startReloading checks every reload_interval on the injected clock until stopped; 0 turns it off.
        """
        pki = standardPKI(self.mktemp())
        clock = Clock()
        tls = ServerTLS(tlsConfig(pki, reload_interval="5s"), clock)
        tls.startReloading()
        self.assertEqual([c.getTime() for c in clock.getDelayedCalls()], [5.0])
        clock.advance(5)
        self.assertEqual([c.getTime() for c in clock.getDelayedCalls()], [10.0])
        tls.stopReloading()
        self.assertEqual(clock.getDelayedCalls(), [])
        off = ServerTLS(tlsConfig(pki, reload_interval="0"), clock)
        off.startReloading()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_factoryDelegatesDraining(self):
        """
        The TLS factory passes the service's drain, whenDrained and abortAll on to the wrapped factory.
        """
        pki = standardPKI(self.mktemp())
        calls = []

        class Inner(Factory):
            def drain(self):
                calls.append("drain")

            def whenDrained(self):
                calls.append("whenDrained")
                return defer.succeed(None)

            def abortAll(self):
                calls.append("abortAll")

        factory = ServerTLS(tlsConfig(pki), Clock()).wrapFactory(Inner())
        factory.drain()
        factory.whenDrained()
        factory.abortAll()
        self.assertEqual(calls, ["drain", "whenDrained", "abortAll"])

    def test_noIdentityWithoutTLS(self):
        """
        peerIdentity of a plain transport is None.
        """
        self.assertIsNone(peerIdentity(StringTransport()))

    def test_vanishedFilesAtStart(self):
        """
        ServerTLS refuses to start when its files went away after the config was loaded.
        """
        pki = standardPKI(self.mktemp())
        config = tlsConfig(pki)
        os.remove(pki.path("server.key"))
        self.assertRaises(ValueError, ServerTLS, config, Clock())


# -- downstream TLS on loopback ---------------------------------------------------------------------------------


class ServerTLSTests(LoopbackMixin, unittest.TestCase):
    """
    L{ServerTLS} on a loopback socket with real clients.
    """

    @defer.inlineCallbacks
    def test_handshakeAndEcho(self):
        """
        A client that trusts the CA completes the handshake, gets the server certificate, and its bytes are
        echoed; the handshake is counted.
        """
        tls, port, factory = yield self.serve()
        probe = yield self.talk(port, self.client(), b"hello over TLS")
        self.assertTrue(probe.echoed)
        self.assertEqual(probe.serial, serialOf(self.pki.path("server.pem")))
        self.assertEqual(tls.handshakes.value, 1)

    @defer.inlineCallbacks
    def test_alpnServerPreference(self):
        """
        The listener picks the first of its ALPN protocols that the client offers, whatever the client's
        order; with nothing in common no protocol is negotiated.
        """
        tls, port, factory = yield self.serve(alpn="h2, http/1.1")
        both = yield self.talk(port, self.client(alpn=[b"http/1.1", b"h2"]))
        self.assertEqual(both.alpn, b"h2")
        h1 = yield self.talk(port, self.client(alpn=[b"http/1.1"]))
        self.assertEqual(h1.alpn, b"http/1.1")
        other = yield self.talk(port, self.client(alpn=[b"spdy/3"]))
        self.assertIsNone(other.alpn)
        self.assertTrue(other.echoed)

    @defer.inlineCallbacks
    def test_sniPicksCertificate(self):
        """
        A client asking for other.test gets the other certificate; one asking for localhost the default.
        """
        pair = f"{self.pki.path('other.pem')} {self.pki.path('other.key')}"
        tls, port, factory = yield self.serve(**{"sni__other.test": pair})
        other = yield self.talk(port, self.client("other.test"))
        self.assertEqual(other.serial, serialOf(self.pki.path("other.pem")))
        self.assertTrue(other.echoed)
        default = yield self.talk(port, self.client("localhost"))
        self.assertEqual(default.serial, serialOf(self.pki.path("server.pem")))

    @defer.inlineCallbacks
    def test_sniWildcard(self):
        """
        sni.*.apps.test serves any one-label name under apps.test.
        """
        pair = f"{self.pki.path('other.pem')} {self.pki.path('other.key')}"
        tls, port, factory = yield self.serve(**{"sni__*.apps.test": pair})
        probe = yield self.talk(port, self.client("shop.apps.test"))
        self.assertEqual(probe.serial, serialOf(self.pki.path("other.pem")))

    @defer.inlineCallbacks
    def test_sniKeepsClientVerification(self):
        """
        A client that selects an SNI certificate is held to the same client_ca and verify_san as the
        default certificate's clients.
        """
        pair = f"{self.pki.path('other.pem')} {self.pki.path('other.key')}"
        tls, port, factory = yield self.serve(client_ca=self.pki.ca, verify_san=FRONTEND,
                                              **{"sni__other.test": pair})
        allowed = yield self.talk(port, self.client("other.test", clientCert="frontend"))
        self.assertTrue(allowed.echoed)
        self.assertEqual(allowed.serial, serialOf(self.pki.path("other.pem")))
        noCertificate = yield self.talk(port, self.client("other.test"))
        self.assertFalse(noCertificate.echoed)
        wrongIdentity = yield self.talk(port, self.client("other.test", clientCert="backend"))
        self.assertFalse(wrongIdentity.echoed)
        self.assertEqual(tls.failVerifySAN.value, 1)

    @defer.inlineCallbacks
    def test_minVersion(self):
        """
        With min_version 1.3 a client that stops at TLS 1.2 is refused; with the default 1.2 it is served.
        """
        tls, port, factory = yield self.serve(min_version="1.3")
        old = self.client(lowerMaximumSecurityTo=TLSVersion.TLSv1_2)
        refused = yield self.talk(port, old)
        self.assertFalse(refused.handshook)
        self.assertFalse(refused.echoed)
        self.assertEqual(tls.connectionErrors.value, 1)
        tls12, port12, _ = yield self.serve()
        served = yield self.talk(port12, self.client(lowerMaximumSecurityTo=TLSVersion.TLSv1_2))
        self.assertTrue(served.echoed)

    @defer.inlineCallbacks
    def test_tls11Refused(self):
        """
        A TLS 1.1 client is refused by the default min_version even when the cipher string would allow
        TLS 1.1 (security level 0, CBC suites).
        """
        tls, port, factory = yield self.serve(ciphers="ECDHE+AES:@SECLEVEL=0")
        output = yield self.openssl(port, "-tls1_1", "-cipher", "ECDHE+AES:@SECLEVEL=0")
        self.assertNotIn("BEGIN CERTIFICATE", output)
        self.assertEqual(tls.handshakes.value, 0)
        # The same client asking for TLS 1.2 is served: the refusal is the version's.
        output = yield self.openssl(port, "-tls1_2", "-cipher", "ECDHE+AES:@SECLEVEL=0")
        self.assertIn("BEGIN CERTIFICATE", output)

    @defer.inlineCallbacks
    def test_opensslALPNAndSNI(self):
        """
        openssl s_client sees the listener's ALPN choice and the certificate its SNI name selects.
        """
        pair = f"{self.pki.path('other.pem')} {self.pki.path('other.key')}"
        tls, port, factory = yield self.serve(alpn="h2, http/1.1", **{"sni__other.test": pair})
        output = yield self.openssl(port, "-servername", "other.test", "-alpn", "http/1.1,h2",
                                    "-CAfile", self.pki.ca, "-verify_return_error")
        self.assertIn("ALPN protocol: h2", output)
        self.assertRegex(output, r"subject=\s*CN\s*=\s*other\n")  # OpenSSL 3.2 drops the spaces
        self.assertIn("Verify return code: 0 (ok)", output)
        output = yield self.openssl(port, "-servername", "localhost", "-alpn", "http/1.1")
        self.assertIn("ALPN protocol: http/1.1", output)
        self.assertRegex(output, r"subject=\s*CN\s*=\s*server\n")

    @defer.inlineCallbacks
    def test_mtlsRequiresClientCertificate(self):
        """
        With client_ca, a client without a certificate is refused: its bytes never reach the echo.
        """
        tls, port, factory = yield self.serve(client_ca=self.pki.ca)
        probe = yield self.talk(port, self.client())
        self.assertFalse(probe.echoed)
        self.assertFalse(factory.connections[0].handshook)
        self.assertEqual(tls.handshakes.value, 0)
        self.assertEqual(tls.connectionErrors.value, 1)

    @defer.inlineCallbacks
    def test_mtlsWrongCA(self):
        """
        A client certificate from another CA is refused and counted as a verification error.
        """
        stranger = PKI(self.mktemp(), caName="stranger")
        stranger.issue("intruder", uris=[FRONTEND])
        tls, port, factory = yield self.serve(client_ca=self.pki.ca)
        creator = optionsForClientTLS("localhost", trustRoot=self.pki.twistedCA(),
                                      clientCertificate=stranger.twistedClient("intruder"))
        probe = yield self.talk(port, creator)
        self.assertFalse(probe.echoed)
        self.assertEqual(tls.failVerifyError.value, 1)
        self.assertEqual(tls.handshakes.value, 0)

    @defer.inlineCallbacks
    def test_mtlsPeerIdentity(self):
        """
        A client with a certificate from client_ca is served, and the server sees its subject, SANs and
        certificate hash.
        """
        tls, port, factory = yield self.serve(client_ca=self.pki.ca)
        probe = yield self.talk(port, self.client(clientCert="frontend"))
        self.assertTrue(probe.echoed)
        identity = factory.connections[0].identity
        with open(self.pki.path("frontend.pem"), "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        self.assertEqual(identity, PeerIdentity(
            subject="CN=frontend", dnsSANs=(), uriSANs=(FRONTEND,),
            sha256=cert.fingerprint(hashes.SHA256()).hex(),
        ))
        # Asked again (as a filter would per request), the same object comes back: worked out once.
        self.assertIs(peerIdentity(factory.connections[0].transport), identity)

    @defer.inlineCallbacks
    def test_verifySANExact(self):
        """
        verify_san with an exact SPIFFE ID serves that client and refuses another one from the same CA,
        counting the refusal.
        """
        tls, port, factory = yield self.serve(client_ca=self.pki.ca, verify_san=FRONTEND)
        allowed = yield self.talk(port, self.client(clientCert="frontend"))
        self.assertTrue(allowed.echoed)
        denied = yield self.talk(port, self.client(clientCert="backend"))
        self.assertFalse(denied.echoed)
        self.assertEqual(tls.failVerifySAN.value, 1)
        self.assertEqual(tls.handshakes.value, 1)

    @defer.inlineCallbacks
    def test_verifySANPrefixAndDNS(self):
        """
        A prefix pattern allows every SPIFFE ID under it; a DNS pattern allows a client with that DNS SAN.
        """
        tls, port, factory = yield self.serve(client_ca=self.pki.ca,
                                              verify_san="spiffe://mesh.local/ns/default/sa/front*, "
                                                         "frontend.mesh.local")
        byPrefix = yield self.talk(port, self.client(clientCert="frontend"))
        self.assertTrue(byPrefix.echoed)
        byDNS = yield self.talk(port, self.client(clientCert="dnsclient"))
        self.assertTrue(byDNS.echoed)
        denied = yield self.talk(port, self.client(clientCert="backend"))
        self.assertFalse(denied.echoed)
        self.assertEqual(tls.failVerifySAN.value, 1)


class RotationTests(LoopbackMixin, unittest.TestCase):
    """
    Certificate rotation: the files are checked on the clock and new handshakes use what they hold.
    """

    def replaceServerPair(self, certificate: str = "server2", key: Optional[str] = None) -> None:
        """
        Copy the pair C{certificate}.pem / C{key}.key (C{key} defaults to C{certificate}) over server.pem
        and server.key.
        """
        shutil.copyfile(self.pki.path(f"{certificate}.pem"), self.pki.path("server.pem"))
        if (key or certificate) != "server":
            shutil.copyfile(self.pki.path(f"{key or certificate}.key"), self.pki.path("server.key"))
        bump(self.pki.path("server.pem"), self.pki.path("server.key"))

    @defer.inlineCallbacks
    def test_rotation(self):
        """
        New files are picked up at the next check on the clock; a new handshake gets the new certificate
        without a restart.
        """
        clock = Clock()
        tls = ServerTLS(tlsConfig(self.pki, reload_interval="10s"), clock)
        port, factory = yield self.listen(tls)
        tls.startReloading()
        self.addCleanup(tls.stopReloading)
        first = serialOf(self.pki.path("server.pem"))
        _, _, second = self.pki.issue("server2", dns=["localhost"])
        self.replaceServerPair()
        before = yield self.talk(port, self.client())
        self.assertEqual(before.serial, first)
        clock.advance(10)
        after = yield self.talk(port, self.client())
        self.assertEqual(after.serial, second)
        self.assertEqual(tls.reloads.value, 1)
        self.assertEqual(tls.certificate.serial_number, second)

    @defer.inlineCallbacks
    def test_badRotationKeepsPrevious(self):
        """
        A mismatched pair, then a half-written certificate, are logged and refused: handshakes keep the
        previous certificate; once the pair is whole it is used.
        """
        events: List[dict] = []
        tls = ServerTLS(tlsConfig(self.pki), Clock())
        tls.log = tls.log.__class__(observer=events.append)
        port, factory = yield self.listen(tls)
        first = serialOf(self.pki.path("server.pem"))
        _, _, second = self.pki.issue("server2", dns=["localhost"])
        self.replaceServerPair("server2", key="server")  # the new certificate with the old key
        self.assertFalse(tls.checkFiles())
        self.assertIn("is not the private key", events[-1]["why"])
        probe = yield self.talk(port, self.client())
        self.assertEqual(probe.serial, first)

        with open(self.pki.path("server2.pem"), "rb") as f:
            whole = f.read()
        with open(self.pki.path("server.pem"), "wb") as f:
            f.write(whole[:100])
        shutil.copyfile(self.pki.path("server2.key"), self.pki.path("server.key"))
        bump(self.pki.path("server.pem"), self.pki.path("server.key"))
        self.assertFalse(tls.checkFiles())
        self.assertIn("not a PEM certificate", events[-1]["why"])
        self.assertEqual(tls.reloadFailures.value, 2)
        probe = yield self.talk(port, self.client())
        self.assertEqual(probe.serial, first)

        with open(self.pki.path("server.pem"), "wb") as f:
            f.write(whole)
        bump(self.pki.path("server.pem"))
        self.assertTrue(tls.checkFiles())
        probe = yield self.talk(port, self.client())
        self.assertEqual(probe.serial, second)

    @defer.inlineCallbacks
    def test_clientCARotation(self):
        """
        A new client_ca file is picked up too: clients of the new CA are served, those of the old refused.
        """
        tls = ServerTLS(tlsConfig(self.pki, client_ca=self.pki.ca), Clock())
        port, factory = yield self.listen(tls)
        newCA = PKI(self.mktemp(), caName="ca2")
        newCA.issue("frontend", uris=[FRONTEND])
        shutil.copyfile(newCA.ca, self.pki.ca)
        bump(self.pki.ca)
        self.assertTrue(tls.checkFiles())
        old = yield self.talk(port, self.client(clientCert="frontend"))
        self.assertFalse(old.echoed)
        new = yield self.talk(port, optionsForClientTLS("localhost", trustRoot=self.pki.twistedCA(),
                                                        clientCertificate=newCA.twistedClient("frontend")))
        self.assertTrue(new.echoed)


# -- upstream TLS ---------------------------------------------------------------------------------------------


class ClientTLSTests(LoopbackMixin, unittest.TestCase):
    """
    L{ClientTLS} against L{ServerTLS} listeners.
    """

    def clientConfig(self, **items: str) -> TLSConfig:
        """
        A cluster's C{[tls:upstream]} section of C{items} (C{a__b} is C{a.b}), which must parse.
        """
        o, errors = options({k.replace("__", "."): v for k, v in items.items()})
        config = parseTLS("upstream", o)
        o.finish()
        self.assertEqual(errors, [])
        return config

    def connect(self, port: int, client: ClientTLS, hostname: Optional[str] = None) -> defer.Deferred:
        """
        Connect to C{port} through C{client.wrapEndpoint}; fire with the L{Probe} once closed.
        """
        probe = Probe()
        endpoint = client.wrapEndpoint(TCP4ClientEndpoint(reactor, "127.0.0.1", port), hostname)
        d = endpoint.connect(Factory.forProtocol(lambda: probe))
        d.addCallback(lambda _: probe.done)
        return d

    @defer.inlineCallbacks
    def test_verifiesServerName(self):
        """
        With trust roots from ca, a server whose certificate is valid for the name is accepted; one that is
        not (sni names another host) is refused.
        """
        tls, port, factory = yield self.serve()
        good = yield self.connect(port, ClientTLS(self.clientConfig(ca=self.pki.ca)), hostname="localhost")
        self.assertTrue(good.echoed)
        bad = yield self.connect(port, ClientTLS(self.clientConfig(ca=self.pki.ca, sni="wrong.test")),
                                 hostname="localhost")
        self.assertFalse(bad.handshook)
        self.assertFalse(bad.echoed)

    @defer.inlineCallbacks
    def test_untrustedServer(self):
        """
        A server certificate from a CA not in ca is refused even when the name matches.
        """
        tls, port, factory = yield self.serve()
        stranger = PKI(self.mktemp(), caName="stranger")
        probe = yield self.connect(port, ClientTLS(self.clientConfig(ca=stranger.ca)), hostname="localhost")
        self.assertFalse(probe.echoed)

    @defer.inlineCallbacks
    def test_uriSAN(self):
        """
        With verify_san, a server presenting the expected SPIFFE ID is accepted (its certificate names no
        host at all); another ID is refused with a verification error naming both.
        """
        config = TLSConfig("edge", certificate=self.pki.path("backend.pem"),
                           private_key=self.pki.path("backend.key"))
        tls = ServerTLS(config, Clock())
        port, factory = yield self.listen(tls)
        good = yield self.connect(port, ClientTLS(self.clientConfig(ca=self.pki.ca, verify_san=BACKEND)))
        self.assertTrue(good.echoed)
        bad = yield self.connect(port, ClientTLS(self.clientConfig(ca=self.pki.ca, verify_san=FRONTEND)))
        self.assertFalse(bad.echoed)
        self.assertIn(FRONTEND, str(bad.reason.value))
        self.assertIn(BACKEND, str(bad.reason.value))

    @defer.inlineCallbacks
    def test_verifySANDNS(self):
        """
        A DNS name in verify_san is checked by service_identity: the server's localhost certificate passes
        for localhost and fails for another name.
        """
        tls, port, factory = yield self.serve()
        good = yield self.connect(port, ClientTLS(self.clientConfig(ca=self.pki.ca, verify_san="localhost")))
        self.assertTrue(good.echoed)
        bad = yield self.connect(port, ClientTLS(self.clientConfig(ca=self.pki.ca, verify_san="db.internal")))
        self.assertFalse(bad.echoed)

    @defer.inlineCallbacks
    def test_meshMTLS(self):
        """
        The cluster's certificate and key are presented to an mTLS listener, which sees the SPIFFE ID; ALPN
        is offered from alpn.
        """
        tls, port, factory = yield self.serve(client_ca=self.pki.ca, verify_san=FRONTEND, alpn="h2")
        client = ClientTLS(self.clientConfig(ca=self.pki.ca, certificate=self.pki.path("frontend.pem"),
                                             private_key=self.pki.path("frontend.key"), alpn="h2"))
        probe = yield self.connect(port, client, hostname="localhost")
        self.assertTrue(probe.echoed)
        self.assertEqual(probe.alpn, b"h2")
        self.assertEqual(factory.connections[0].identity.uriSANs, (FRONTEND,))

    @defer.inlineCallbacks
    def test_clientCertificateRotation(self):
        """
        After the client certificate files change, an endpoint wrapped before presents the new certificate.
        """
        tls, port, factory = yield self.serve(client_ca=self.pki.ca)
        shutil.copyfile(self.pki.path("frontend.pem"), self.pki.path("me.pem"))
        shutil.copyfile(self.pki.path("frontend.key"), self.pki.path("me.key"))
        client = ClientTLS(self.clientConfig(ca=self.pki.ca, certificate=self.pki.path("me.pem"),
                                             private_key=self.pki.path("me.key")), Clock())
        endpoint = client.wrapEndpoint(TCP4ClientEndpoint(reactor, "127.0.0.1", port), "localhost")

        def viaEndpoint():
            probe = Probe()
            d = endpoint.connect(Factory.forProtocol(lambda: probe))
            d.addCallback(lambda _: probe.done)
            return d

        yield viaEndpoint()
        shutil.copyfile(self.pki.path("backend.pem"), self.pki.path("me.pem"))
        shutil.copyfile(self.pki.path("backend.key"), self.pki.path("me.key"))
        bump(self.pki.path("me.pem"), self.pki.path("me.key"))
        self.assertTrue(client.checkFiles())
        yield viaEndpoint()
        self.assertEqual([c.identity.uriSANs for c in factory.connections], [(FRONTEND,), (BACKEND,)])

    def test_needsAName(self):
        """
        Without sni, verify_san or a host name there is no identity to check: creatorFor says so.
        """
        client = ClientTLS(self.clientConfig(ca=self.pki.ca))
        self.assertRaises(ValueError, client.creatorFor, None)
