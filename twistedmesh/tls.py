"""
TLS for listeners and clusters, built from a C{[tls:NAME]} section (L{twistedmesh.config.tls.TLSConfig};
docs/tls.md is the user's guide).

Downstream, L{ServerTLS} holds the pyOpenSSL contexts of one listener: built once (one per certificate: the
default one and one per C{sni.HOSTNAME}), shared by every connection, rebuilt only when the files change.
L{ServerTLS.wrapFactory} wraps the listener's factory in a L{TLSMemoryBIOFactory}, so the socket is still a
plain C{tcp:} endpoint and TLS is a layer between it and the listener's protocol. Clients are verified
during the handshake: the chain by OpenSSL against C{client_ca}, the SANs by our verify callback against
C{verify_san}; a client that fails either gets a TLS alert and never speaks to the filters.

Upstream, L{ClientTLS} makes connection creators for a cluster's hosts (L{ClientTLS.wrapEndpoint}):
Twisted's L{optionsForClientTLS} (chain against C{ca}, host name by C{service_identity}), or, with
C{verify_san}, the same options with a verify callback that accepts the listed DNS names (still through
C{service_identity}) and URI SANs, such as SPIFFE IDs, which C{service_identity} cannot check.

Filters learn who the peer is from L{peerIdentity}.

Certificate rotation: L{ServerTLS.startReloading} (and L{ClientTLS.startReloading}) checks the files'
C{stat()} every C{reload_interval} on the injected clock. A C{stat()} is one cheap system call per file, so
it runs on the reactor thread; the files are only read when their size, times or inode changed. New
contexts replace the old ones only when every pair loads and matches, so a pair caught half-written (or a
key that is not the certificate's) is logged and the previous certificates stay in use; the next change to
the files triggers another attempt. Handshakes started before the swap finish with the old contexts.

Sessions are not resumed (Twisted's default too): every connection runs a full handshake, so the verify
callback, and with it C{verify_san}, judges every connection, and a rotated certificate is used by every
new connection.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from OpenSSL import SSL
from OpenSSL.crypto import X509, PKey
from service_identity import VerificationError
from service_identity.hazmat import DNS_ID, verify_service_identity
from service_identity.pyopenssl import extract_patterns
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import (
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.ssl import (
    AcceptableCiphers,
    Certificate,
    CertificateOptions,
    KeyPair as TwistedKeyPair,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from .config.tls import DEFAULT_CIPHERS, KeyPair, TLSConfig, loadCertificates, loadKeyPair
from .observability.stats import StatsScope, StatsStore

_PROTOCOL_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}
_TWISTED_VERSIONS = {"1.2": TLSVersion.TLSv1_2, "1.3": TLSVersion.TLSv1_3}
# No compression (CRIME), the server's cipher order, no renegotiation (a handshake is where verification
# happens; a renegotiation would be a second, unaccounted one), no session tickets (see the module
# docstring), a fresh ECDH key per handshake.
_SERVER_OPTIONS = (
    SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_TICKET
    | SSL.OP_SINGLE_ECDH_USE
)
_FATAL = 2  # the alert level in the high byte of an info callback's `ret` for SSL_CB_ALERT


# -- peer identity --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerIdentity:
    """
    Who the peer of a TLS connection proved to be, from its certificate.

    @ivar subject: the subject as an RFC 4514 string (C{"CN=frontend,O=mesh"}).
    @ivar dnsSANs: the DNS names of its subjectAltName, as written.
    @ivar uriSANs: the URIs of its subjectAltName (a SPIFFE ID is one).
    @ivar sha256: the SHA-256 of the DER certificate, lowercase hex without separators (what Envoy's
        C{%DOWNSTREAM_PEER_FINGERPRINT_256%} shows).
    """

    subject: str
    dnsSANs: Tuple[str, ...]
    uriSANs: Tuple[str, ...]
    sha256: str


def identityFromCertificate(certificate: x509.Certificate) -> PeerIdentity:
    """
    The L{PeerIdentity} a certificate states.
    """
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        dns: Tuple[str, ...] = ()
        uris: Tuple[str, ...] = ()
    else:
        dns = tuple(san.get_values_for_type(x509.DNSName))
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
    return PeerIdentity(
        subject=certificate.subject.rfc4514_string(),
        dnsSANs=dns,
        uriSANs=uris,
        sha256=certificate.fingerprint(hashes.SHA256()).hex(),
    )


def peerIdentity(transport: object) -> Optional[PeerIdentity]:
    """
    The identity of the peer at the other end of C{transport}, or C{None} when the connection is not TLS,
    the handshake has not finished, or the peer sent no certificate (a listener without C{client_ca} does
    not ask for one).

    A network filter passes C{conn.transport}; an HTTP filter the transport of the stream's connection.
    On a listener's connection the identity is worked out once and kept, so asking per request is cheap.
    """
    cached = getattr(transport, "_meshPeerIdentity", None) if isinstance(transport, _ServerTLSProtocol) else None
    if cached is not None:
        return cached
    getPeerCertificate = getattr(transport, "getPeerCertificate", None)
    if getPeerCertificate is None:
        return None
    try:
        certificate = getPeerCertificate()
    except SSL.Error:
        # Asked before the handshake finished, or after the connection failed.
        return None
    if certificate is None:
        return None
    identity = identityFromCertificate(certificate.to_cryptography())
    if isinstance(transport, _ServerTLSProtocol):
        transport._meshPeerIdentity = identity
    return identity


class SANMatcher:
    """
    A C{verify_san} list, compiled: each pattern is a DNS name or a URI, matched exactly, or as a prefix
    when it ends in C{*}. DNS names compare without case (the config lowercases the patterns).
    """

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(patterns)
        self._exactDNS = frozenset(p for p in self.patterns if not _isURI(p) and not p.endswith("*"))
        self._prefixDNS = tuple(p[:-1] for p in self.patterns if not _isURI(p) and p.endswith("*"))
        self._exactURI = frozenset(p for p in self.patterns if _isURI(p) and not p.endswith("*"))
        self._prefixURI = tuple(p[:-1] for p in self.patterns if _isURI(p) and p.endswith("*"))

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def matches(self, identity: PeerIdentity) -> bool:
        """
        Whether one of the identity's SANs is one the patterns allow, comparing names literally (a
        certificate's C{*.example.com} SAN is only matched by the pattern C{*.example.com} or a prefix of
        it). This is the check for client certificates.
        """
        for name in identity.dnsSANs:
            name = name.lower()
            if name in self._exactDNS or name.startswith(self._prefixDNS):
                return True
        return self._matchesURI(identity)

    def matchesServer(self, certificate: X509, identity: PeerIdentity) -> bool:
        """
        Whether a server's certificate holds one of the identities the patterns expect: a DNS pattern
        without C{*} is checked by C{service_identity} as a host name would be (a wildcard certificate
        covers it), DNS prefixes and URIs literally. This is the check for upstream servers.
        """
        if self._exactDNS:
            patterns = extract_patterns(certificate)
            for name in self._exactDNS:
                try:
                    verify_service_identity(patterns, [DNS_ID(name)], [])
                except VerificationError:
                    continue
                return True
        if self._prefixDNS and any(n.lower().startswith(self._prefixDNS) for n in identity.dnsSANs):
            return True
        return self._matchesURI(identity)

    def _matchesURI(self, identity: PeerIdentity) -> bool:
        for uri in identity.uriSANs:
            if uri in self._exactURI or uri.startswith(self._prefixURI):
                return True
        return False


_URI = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


def _isURI(pattern: str) -> bool:
    """
    Whether a C{verify_san} pattern is a URI (it has a scheme) rather than a DNS name.
    """
    return _URI.match(pattern) is not None


# -- watching files -------------------------------------------------------------------------------------------


def _stat(path: str) -> Optional[Tuple[int, int, int, int]]:
    """
    What tells whether a file changed: its size, inode, and modification and change times (a rename over
    the file, as atomic writers and Kubernetes secret volumes do, changes the inode); C{None} if it cannot
    be stat'ed.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


class _Reloader:
    """
    Calls C{check} every C{interval} seconds on C{clock} until stopped. An exception other than the
    expected ones is a bug: it is left to the reactor to log, and the loop goes on.
    """

    def __init__(self, clock: IReactorTime, interval: float, check: Callable[[], object]) -> None:
        self.clock = clock
        self.interval = interval
        self.check = check
        self.call: Optional[IDelayedCall] = None

    def start(self) -> None:
        """
        Schedule the first check (nothing when the interval is 0 or checks are already scheduled).
        """
        if self.call is None and self.interval > 0:
            self.call = self.clock.callLater(self.interval, self._tick)

    def stop(self) -> None:
        """
        Cancel the next check.
        """
        call, self.call = self.call, None
        if call is not None and call.active():
            call.cancel()

    def _tick(self) -> None:
        self.call = None
        try:
            self.check()
        finally:
            self.call = self.clock.callLater(self.interval, self._tick)


class _FileSet:
    """
    The files of a C{[tls:NAME]} section and the state they were last seen in.
    """

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = tuple(paths)
        self.seen = self.signature()

    def signature(self) -> Tuple[object, ...]:
        """
        The L{_stat} of every file, in order.
        """
        return tuple(_stat(p) for p in self.paths)

    def changed(self) -> bool:
        """
        Whether any file changed since the last call (or construction); the new state becomes the one
        compared with next time. The state is taken before the caller reads the files, so a write that
        lands while they are being read is seen as a change at the next check.
        """
        now = self.signature()
        if now == self.seen:
            return False
        self.seen = now
        return True


# -- downstream -----------------------------------------------------------------------------------------------


class _ServerContexts:
    """
    One generation of a listener's contexts: the default one (whose SNI callback switches to the others)
    and the leaf certificate it serves. Replaced as a whole on rotation, never changed, so a handshake in
    progress sees one consistent set.
    """

    def __init__(self, default: SSL.Context, leaf: x509.Certificate) -> None:
        self.default = default
        self.leaf = leaf


def _sniSelector(byName: Dict[str, SSL.Context], wildcards: Dict[str, SSL.Context]):
    """
    The SNI callback over one generation's contexts: switch the connection to the context of the name the
    client asked for, if one has its own certificate (the exact name first, then C{*.rest} for
    C{label.rest}); otherwise the default context serves it.
    """

    def select(connection: SSL.Connection) -> None:
        name = connection.get_servername()
        if not name:
            return
        host = name.decode("ascii", "replace").lower()
        context = byName.get(host)
        if context is None:
            _, dot, parent = host.partition(".")
            context = wildcards.get(parent) if dot else None
        if context is not None:
            connection.set_context(context)

    return select


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    The downstream TLS of one listener (see the module docstring).

    @ivar config: the C{[tls:NAME]} section.
    @ivar handshakes: counter C{ssl.handshake}: completed handshakes.
    @ivar connectionErrors: counter C{ssl.connection_error}: connections we sent a fatal alert on (a
        failed handshake, whatever the reason).
    @ivar failVerifySAN: counter C{ssl.fail_verify_san}: client certificates refused by C{verify_san}.
    @ivar failVerifyError: counter C{ssl.fail_verify_error}: client certificates that did not verify
        against C{client_ca} (unknown issuer, expired, ...).
    @ivar reloads: counter C{ssl.certificate_reload}: certificate rotations applied.
    @ivar reloadFailures: counter C{ssl.certificate_reload_failed}: changes to the files that were refused
        (the previous certificates stayed in use).
    """

    log = Logger()

    def __init__(self, config: TLSConfig, clock: IReactorTime, stats: Optional[StatsScope] = None) -> None:
        """
        Read the files and build the contexts.

        @param config: the section; it must have C{certificate} and C{private_key}.
        @param clock: the clock file checks are scheduled on (L{startReloading}).
        @param stats: the scope the C{ssl.*} counters go in (the listener's, C{listener.<name>.}); a
            private one when not given.

        @raise ValueError: a file cannot be read, or a pair does not match (the files changed since the
            config was loaded).
        """
        if config.certificate is None or config.private_key is None:
            raise ValueError(f"[tls:{config.name}] has no certificate and private_key to serve")
        self.config = config
        self.clock = clock
        scope = (stats if stats is not None else StatsStore().root).scope("ssl")
        self.handshakes = scope.counter("handshake")
        self.connectionErrors = scope.counter("connection_error")
        self.failVerifySAN = scope.counter("fail_verify_san")
        self.failVerifyError = scope.counter("fail_verify_error")
        self.reloads = scope.counter("certificate_reload")
        self.reloadFailures = scope.counter("certificate_reload_failed")
        self._matcher = SANMatcher(config.verify_san)
        self._alpn = tuple(p.encode("ascii") for p in config.alpn)
        # The session ID context must be set when clients are verified (OpenSSL refuses otherwise); one
        # per section name keeps listeners with different trust apart.
        self._sessionContext = hashlib.sha256(config.name.encode("utf-8")).hexdigest()[:32].encode("ascii")
        self._files = _FileSet(config.files())
        self._contexts = self._build()
        self._reloader = _Reloader(clock, config.reload_interval, self.checkFiles)

    @property
    def certificate(self) -> x509.Certificate:
        """
        The default certificate in use now (the leaf of C{certificate}).
        """
        return self._contexts.leaf

    # -- building contexts --

    def _build(self) -> _ServerContexts:
        """
        Read every file and build a new generation of contexts.

        @raise ValueError: a file cannot be read or parsed, or a pair does not match.
        """
        config = self.config
        clientCAs: Tuple[x509.Certificate, ...] = ()
        if config.client_ca is not None:
            clientCAs = loadCertificates(config.client_ca)
        main = loadKeyPair(config.certificate, config.private_key)
        byName: Dict[str, SSL.Context] = {}
        wildcards: Dict[str, SSL.Context] = {}
        for extra in config.sni_certificates:
            context = self._context(loadKeyPair(extra.certificate, extra.private_key), clientCAs)
            if extra.hostname.startswith("*."):
                wildcards[extra.hostname[2:]] = context
            else:
                byName[extra.hostname] = context
        select = _sniSelector(byName, wildcards) if (byName or wildcards) else None
        return _ServerContexts(self._context(main, clientCAs, select), main.leaf)

    def _context(self, pair: KeyPair, clientCAs: Sequence[x509.Certificate],
                 selectByName: Optional[Callable[[SSL.Connection], None]] = None) -> SSL.Context:
        """
        L{_newContext}, with OpenSSL's refusals (a key type it cannot use, say) as C{ValueError}s like
        every other reason a pair cannot be used.
        """
        try:
            return self._newContext(pair, clientCAs, selectByName)
        except SSL.Error as e:
            subject = pair.leaf.subject.rfc4514_string()
            raise ValueError(f"OpenSSL cannot use the certificate {subject!r}: {e}") from None

    def _newContext(self, pair: KeyPair, clientCAs: Sequence[x509.Certificate],
                    selectByName: Optional[Callable[[SSL.Connection], None]] = None) -> SSL.Context:
        """
        One server context, configured completely before any connection uses it (pyOpenSSL forbids
        changing a context in use). Every context of a listener is configured alike but for the
        certificate: after an SNI switch OpenSSL takes the certificate, trust store, CA list and ALPN
        callback from the new context, but keeps the verify mode and callback of the first.
        """
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(_PROTOCOL_VERSIONS[self.config.min_version])
        context.set_options(_SERVER_OPTIONS)
        context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        context.set_session_id(self._sessionContext)
        context.use_certificate(X509.from_cryptography(pair.leaf))
        for certificate in pair.chain[1:]:
            context.add_extra_chain_cert(X509.from_cryptography(certificate))
        context.use_privatekey(PKey.from_cryptography_key(pair.key))
        context.check_privatekey()
        if clientCAs:
            store = context.get_cert_store()
            for ca in clientCAs:
                store.add_cert(X509.from_cryptography(ca))
            # The CA names go in the CertificateRequest so that a client with several certificates picks
            # the right one.
            context.set_client_ca_list([X509.from_cryptography(ca).get_subject() for ca in clientCAs])
            context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT | SSL.VERIFY_CLIENT_ONCE,
                               self._verify)
        if self._alpn:
            context.set_alpn_select_callback(self._selectALPN)
        if selectByName is not None:
            context.set_tlsext_servername_callback(selectByName)
        context.set_info_callback(self._info)
        context.set_cipher_list((self.config.ciphers or DEFAULT_CIPHERS).encode("ascii"))
        return context

    # -- OpenSSL callbacks (run during a handshake; they must not raise) --

    def _selectALPN(self, connection: SSL.Connection, offered: List[bytes]) -> bytes:
        """
        Our first protocol that the client offers: the listener's preference wins, as the proxy knows
        which of its codecs it would rather run.
        """
        for protocol in self._alpn:
            if protocol in offered:
                return protocol
        return SSL.NO_OVERLAPPING_PROTOCOLS

    def _verify(self, connection: SSL.Connection, certificate: X509, errno: int, depth: int, ok: int) -> bool:
        """
        The verify callback for client certificates: OpenSSL has checked the chain (C{ok}); at the leaf
        (C{depth} 0) we check its SANs against C{verify_san}. Returning C{False} fails the handshake
        with an alert.
        """
        if not ok:
            self.failVerifyError.value += 1
            return False
        if depth != 0 or not self._matcher:
            return True
        try:
            identity = identityFromCertificate(certificate.to_cryptography())
        except ValueError:
            # A malformed subjectAltName: nothing we could allow.
            identity = None
        if identity is not None and self._matcher.matches(identity):
            return True
        self.failVerifySAN.value += 1
        self.log.debug("tls {name}: refused a client certificate: no SAN in verify_san ({sans})",
                       name=self.config.name,
                       sans=", ".join(identity.dnsSANs + identity.uriSANs) if identity else "malformed")
        return False

    def _info(self, connection: SSL.Connection, where: int, ret: int) -> None:
        """
        The info callback: count completed handshakes and fatal alerts we send.
        """
        if where & SSL.SSL_CB_HANDSHAKE_DONE:
            self.handshakes.value += 1
        elif where & SSL.SSL_CB_WRITE_ALERT == SSL.SSL_CB_WRITE_ALERT and ret >> 8 == _FATAL:
            self.connectionErrors.value += 1

    # -- IOpenSSLServerConnectionCreator --

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """
        A connection on the current default context (Twisted then puts it in the accepting state and
        attaches the protocol).
        """
        return SSL.Connection(self._contexts.default, None)

    # -- the listener's side --

    def wrapFactory(self, factory: IProtocolFactory, reactor: Optional[IReactorTime] = None) -> "ServerTLSFactory":
        """
        C{factory} behind TLS: listen with the result on a plain C{tcp:} endpoint.

        @param reactor: the reactor the connections run on; TLS defers small writes to its next iteration
            to send them as one record. The clock given to the constructor when not given.
        """
        return ServerTLSFactory(self, factory, reactor if reactor is not None else self.clock)

    # -- rotation --

    def startReloading(self) -> None:
        """
        Check the files every C{reload_interval} (nothing if it is 0) and switch to new certificates when
        they change (see the module docstring).
        """
        self._reloader.start()

    def stopReloading(self) -> None:
        """
        Stop checking the files.
        """
        self._reloader.stop()

    def checkFiles(self) -> bool:
        """
        Check the files now; if any changed, build new contexts and use them for new connections. Return
        whether new contexts are in use. A change that does not load (a file half-written, a key that does
        not match its certificate) is logged and the previous contexts are kept.
        """
        if not self._files.changed():
            return False
        try:
            contexts = self._build()
        except ValueError as e:
            self.reloadFailures.value += 1
            self.log.error("tls {name}: files changed but cannot be used, keeping the previous certificates: "
                           "{why}", name=self.config.name, why=str(e))
            return False
        self._contexts = contexts
        self.reloads.value += 1
        self.log.info("tls {name}: certificates reloaded (serial {serial:x}, valid until {notAfter})",
                      name=self.config.name, serial=contexts.leaf.serial_number,
                      notAfter=contexts.leaf.not_valid_after_utc.isoformat())
        return True


class _ServerTLSProtocol(BufferingTLSTransport):
    """
    Twisted's TLS transport with a slot for the peer's identity, worked out on first use by
    L{peerIdentity}.
    """

    _meshPeerIdentity: Optional[PeerIdentity] = None


class ServerTLSFactory(TLSMemoryBIOFactory):
    """
    A listener's factory behind TLS. It passes the service's draining calls (L{drain}, L{whenDrained},
    L{abortAll}) on to the wrapped factory, so a TLS listener drains like a plain one.
    """

    protocol = _ServerTLSProtocol
    noisy = False

    def __init__(self, tls: ServerTLS, wrappedFactory: IProtocolFactory, reactor: IReactorTime) -> None:
        super().__init__(tls, False, wrappedFactory, reactor)
        self.tls = tls

    def drain(self) -> None:
        """
        The wrapped factory's C{drain()}.
        """
        self.wrappedFactory.drain()

    def whenDrained(self) -> Deferred:
        """
        The wrapped factory's C{whenDrained()}.
        """
        return self.wrappedFactory.whenDrained()

    def abortAll(self) -> None:
        """
        The wrapped factory's C{abortAll()}.
        """
        self.wrappedFactory.abortAll()


# -- upstream -------------------------------------------------------------------------------------------------


class _ClientMaterial:
    """
    What the files of a cluster's C{[tls:NAME]} section hold, loaded: trust roots and client certificate.
    """

    def __init__(self, config: TLSConfig) -> None:
        if config.ca is not None:
            self.trustRoot = trustRootFromCertificates(
                [Certificate(X509.from_cryptography(c)) for c in loadCertificates(config.ca)]
            )
        else:
            self.trustRoot = platformTrust()
        self.clientCertificate: Optional[PrivateCertificate] = None
        self.extraChain: List[X509] = []
        if config.certificate is not None and config.private_key is not None:
            pair = loadKeyPair(config.certificate, config.private_key)
            self.clientCertificate = PrivateCertificate.fromCertificateAndKeyPair(
                Certificate(X509.from_cryptography(pair.leaf)),
                TwistedKeyPair(PKey.from_cryptography_key(pair.key)),
            )
            self.extraChain = [X509.from_cryptography(c) for c in pair.chain[1:]]


@implementer(IOpenSSLClientConnectionCreator)
class _SANVerifyingCreator:
    """
    A client connection creator that verifies the chain as Twisted does (C{CertificateOptions} with the
    trust roots) but, instead of one host name, accepts a server whose certificate holds one of the
    C{verify_san} identities. C{service_identity} checks DNS names; URI SANs (SPIFFE IDs) it cannot, so
    the callback compares them itself.
    """

    def __init__(self, options: CertificateOptions, serverName: Optional[str], matcher: SANMatcher) -> None:
        self._options = options
        self._serverName = serverName.encode("ascii") if serverName and not _isIPAddress(serverName) else None
        self._matcher = matcher

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """
        A connection on the shared context, with SNI and our verify callback (which replaces the
        context's chain-only one for this connection).
        """
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        if self._serverName is not None:
            connection.set_tlsext_host_name(self._serverName)
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
                              _serverSANCallback(tlsProtocol, self._matcher))
        return connection


def _serverSANCallback(tlsProtocol: TLSMemoryBIOProtocol, matcher: SANMatcher):
    """
    A verify callback for one upstream connection: the chain as OpenSSL judged it, then the leaf's SANs.
    A refusal is reported to the protocol as a L{VerificationError} saying what was expected.
    """

    def verify(connection: SSL.Connection, certificate: X509, errno: int, depth: int, ok: int) -> bool:
        if not ok or depth != 0:
            return bool(ok)
        try:
            identity = identityFromCertificate(certificate.to_cryptography())
            if matcher.matchesServer(certificate, identity):
                return True
            why = (f"the upstream certificate's SANs ({', '.join(identity.dnsSANs + identity.uriSANs) or 'none'})"
                   f" match none of verify_san ({', '.join(matcher.patterns)})")
        except Exception as e:  # an exception must not escape into OpenSSL: it would be lost
            why = f"cannot check the upstream certificate: {e}"
        tlsProtocol.failVerification(Failure(VerificationError(why)))
        return False

    return verify


@implementer(IOpenSSLClientConnectionCreator)
class _CurrentCreator:
    """
    The creator handed out for one server name: it asks L{ClientTLS} for the current one at each
    connection, so endpoints wrapped once keep working across a certificate rotation.
    """

    def __init__(self, owner: "ClientTLS", serverName: Optional[str]) -> None:
        self._owner = owner
        self._serverName = serverName

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """
        A connection from the current creator for our server name.
        """
        return self._owner._creators[self._serverName].clientConnectionForTLS(tlsProtocol)


class ClientTLS:
    """
    The upstream TLS of one cluster (see the module docstring).

    The server name sent with SNI (and, without C{verify_san}, the one the certificate must be valid for)
    is the section's C{sni}, or else the host name given to L{creatorFor} / L{wrapEndpoint}, typically the
    host of the cluster's endpoint string (L{endpointHost}).
    """

    log = Logger()

    def __init__(self, config: TLSConfig, clock: Optional[IReactorTime] = None) -> None:
        """
        Read the files.

        @param clock: the clock file checks are scheduled on; without one, L{startReloading} does nothing.

        @raise ValueError: a file cannot be read, or the client certificate and key do not match.
        """
        self.config = config
        self.clock = clock
        self._matcher = SANMatcher(config.verify_san)
        self._material = _ClientMaterial(config)
        self._creators: Dict[Optional[str], IOpenSSLClientConnectionCreator] = {}
        self._files = _FileSet(config.files())
        self._reloader = (_Reloader(clock, config.reload_interval, self.checkFiles)
                          if clock is not None else None)

    def _extraOptions(self, material: _ClientMaterial) -> Dict[str, object]:
        """
        The C{CertificateOptions} arguments from the section: minimum version, ciphers, chain.
        """
        extra: Dict[str, object] = {"raiseMinimumTo": _TWISTED_VERSIONS[self.config.min_version]}
        if self.config.ciphers is not None:
            extra["acceptableCiphers"] = AcceptableCiphers.fromOpenSSLCipherString(self.config.ciphers)
        if material.extraChain:
            extra["extraCertChain"] = material.extraChain
        return extra

    def _creator(self, material: _ClientMaterial, serverName: Optional[str]) -> IOpenSSLClientConnectionCreator:
        """
        A new creator for C{serverName} from C{material}: Twisted's own without C{verify_san}, ours with it.
        """
        alpn = [p.encode("ascii") for p in self.config.alpn] or None
        if not self._matcher:
            assert serverName is not None
            return optionsForClientTLS(serverName, trustRoot=material.trustRoot,
                                       clientCertificate=material.clientCertificate,
                                       acceptableProtocols=alpn,
                                       extraCertificateOptions=self._extraOptions(material))
        options = CertificateOptions(trustRoot=material.trustRoot, acceptableProtocols=alpn,
                                     **self._clientKeyOptions(material), **self._extraOptions(material))
        return _SANVerifyingCreator(options, serverName, self._matcher)

    @staticmethod
    def _clientKeyOptions(material: _ClientMaterial) -> Dict[str, object]:
        """
        The C{CertificateOptions} arguments that present our client certificate, if we have one.
        """
        if material.clientCertificate is None:
            return {}
        return {"privateKey": material.clientCertificate.privateKey.original,
                "certificate": material.clientCertificate.original}

    def creatorFor(self, hostname: Optional[str] = None) -> IOpenSSLClientConnectionCreator:
        """
        The connection creator for a server called C{hostname} (ignored when the section sets C{sni}).
        Its context is built now, once, and shared by every connection to that name.

        @raise ValueError: there is no name to verify: no C{sni}, no C{verify_san} and no C{hostname}.
        """
        serverName = self.config.sni or (hostname.lower() if hostname else None)
        if serverName is None and not self._matcher:
            raise ValueError(f"[tls:{self.config.name}] needs `sni` or `verify_san` to know which server "
                             "identity to expect")
        if serverName not in self._creators:
            self._creators[serverName] = self._creator(self._material, serverName)
        return _CurrentCreator(self, serverName)

    def wrapEndpoint(self, endpoint: IStreamClientEndpoint, hostname: Optional[str] = None) -> IStreamClientEndpoint:
        """
        C{endpoint} with TLS on top (L{creatorFor} C{hostname}).
        """
        return wrapClientTLS(self.creatorFor(hostname), endpoint)

    def startReloading(self) -> None:
        """
        Check the files every C{reload_interval}, as L{ServerTLS.startReloading} does; new connections use
        the new client certificate and trust roots.
        """
        if self._reloader is not None:
            self._reloader.start()

    def stopReloading(self) -> None:
        """
        Stop checking the files.
        """
        if self._reloader is not None:
            self._reloader.stop()

    def checkFiles(self) -> bool:
        """
        Check the files now and switch to what they hold if they changed and load; return whether the
        switch happened. What does not load is logged and the previous material kept.
        """
        if not self._files.changed():
            return False
        try:
            material = _ClientMaterial(self.config)
            creators = {name: self._creator(material, name) for name in self._creators}
        except (ValueError, SSL.Error) as e:
            self.log.error("tls {name}: files changed but cannot be used, keeping the previous ones: {why}",
                           name=self.config.name, why=str(e))
            return False
        self._material, self._creators = material, creators
        self.log.info("tls {name}: upstream certificates reloaded", name=self.config.name)
        return True


def _isIPAddress(text: str) -> bool:
    """
    Whether C{text} is an IPv4 or IPv6 address (which SNI must not carry).
    """
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def endpointHost(description: str) -> Optional[str]:
    """
    The host of a TCP client endpoint string (C{tcp:api.internal:443}, C{tcp:host=10.0.0.1:port=80},
    C{tcp6:...}, C{tls:...}), or C{None} for other kinds (C{unix:}): the default server name for
    L{ClientTLS.creatorFor}.
    """
    # Twisted's endpoint strings separate with ":" and escape a literal one with "\".
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", description.strip())]
    if parts[0] not in ("tcp", "tcp6", "tls", "ssl") or len(parts) < 2:
        return None
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        if eq and key == "host":
            return value or None
    positional = [p for p in parts[1:] if "=" not in p]
    return positional[0] if positional else None
