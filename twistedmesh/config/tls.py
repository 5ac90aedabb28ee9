"""
C{[tls:NAME]} sections: certificates, keys, trust roots and TLS settings, named by a listener's
C{tls = NAME} (downstream TLS) or a cluster's C{tls = NAME} (upstream TLS). See docs/tls.md.

L{parseTLS} reads one section into a frozen L{TLSConfig}, reporting every problem through the section's
L{Options}. Files are read and checked here, at load time: a missing or unreadable file, a file that holds
no PEM certificate or key, a certificate and key that are not a pair, an OpenSSL cipher string that selects
nothing. L{twistedmesh.tls} builds the OpenSSL contexts from the config (and rebuilds them when
the files change) with the same loaders, L{loadCertificates} and L{loadKeyPair}, so that a file is judged
the same way at load time and at rotation time.

The value of C{private_key} is a path, not the key itself, but the admin's C{/config_dump} redacts it all
the same (it redacts every key whose name holds C{private_key}, as L{SNICertificate.private_key} does).
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Collection, List, Optional, Tuple

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL

from .options import Options

#: What C{min_version} may say.
MIN_VERSIONS = ("1.2", "1.3")

#: The TLS 1.2 cipher suites used when C{ciphers} is not set: ECDHE key exchange with an AEAD cipher only
#: (Mozilla's "intermediate" profile without the finite-field DHE suites, which need DH parameters). TLS 1.3
#: suites are all modern and OpenSSL's defaults are kept for them.
DEFAULT_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

# A server name as the SNI extension carries it (RFC 6066: a DNS host name, no trailing dot), optionally
# with a leading "*." that stands for exactly one label.
_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_SNI_NAME = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*$")
# A verify_san DNS pattern: a DNS name, or the start of one followed by "*".
_DNS_PATTERN = re.compile(r"^[a-z0-9_*.-]+$")
# A URI SAN has a scheme (spiffe://trust-domain/path, say).
_URI = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
# ALPN protocol ids are opaque byte strings of 1 to 255 bytes; we take printable ASCII without spaces.
_ALPN_ID = re.compile(r"^[\x21-\x7e]{1,255}$")


@dataclass(frozen=True)
class SNICertificate:
    """
    An extra certificate, served to clients that ask for C{hostname} with SNI: a key C{sni.HOSTNAME =
    CERT KEY}. C{hostname} is lowercase; a leading C{*.} matches any one label (C{*.example.com} matches
    C{a.example.com}, not C{example.com} nor C{a.b.example.com}).
    """

    hostname: str
    certificate: str
    private_key: str


@dataclass(frozen=True)
class TLSConfig:
    """
    A C{[tls:NAME]} section. Paths are absolute (made so at load time, so that a later change of working
    directory cannot point a certificate reload at another file).

    @ivar certificate: the PEM certificate chain, leaf first (required on a listener; on a cluster, the
        client certificate for mutual TLS).
    @ivar private_key: the PEM private key of C{certificate} (unencrypted).
    @ivar client_ca: listener only: PEM CA certificates; when set, clients must present a certificate that
        chains to one of them (mutual TLS).
    @ivar ca: cluster only: PEM CA certificates the upstream's certificate must chain to (the system's
        trust store when not set).
    @ivar alpn: ALPN protocol ids in order of preference (a listener picks the first of these the client
        offers; a cluster offers them in this order).
    @ivar min_version: the lowest TLS version accepted, C{"1.2"} or C{"1.3"}.
    @ivar ciphers: an OpenSSL cipher string for TLS 1.2, or C{None} for L{DEFAULT_CIPHERS}.
    @ivar verify_san: listener: the client SANs allowed (with C{client_ca}); cluster: the server SANs
        expected. Each is a DNS name or a URI (C{spiffe://...}), exact, or a prefix when it ends in C{*}.
    @ivar sni: cluster only: the server name sent with SNI (and verified, without C{verify_san}).
    @ivar sni_certificates: listener only: extra certificates chosen by the client's SNI.
    @ivar reload_interval: seconds between checks of the files for changes; C{0} turns reloading off.
    """

    name: str
    certificate: Optional[str] = None
    private_key: Optional[str] = None
    client_ca: Optional[str] = None
    ca: Optional[str] = None
    alpn: Tuple[str, ...] = ()
    min_version: str = "1.2"
    ciphers: Optional[str] = None
    verify_san: Tuple[str, ...] = ()
    sni: Optional[str] = None
    sni_certificates: Tuple[SNICertificate, ...] = ()
    reload_interval: float = 10.0

    def files(self) -> Tuple[str, ...]:
        """
        Every file the section names, in a fixed order: what a reload watches.
        """
        paths = [self.certificate, self.private_key, self.client_ca, self.ca]
        for extra in self.sni_certificates:
            paths += [extra.certificate, extra.private_key]
        return tuple(p for p in paths if p is not None)


class KeyPair:
    """
    A certificate chain and its private key, read and checked (L{loadKeyPair}).

    @ivar chain: the certificates of the chain file, leaf first (C{cryptography} objects).
    @ivar key: the private key (a C{cryptography} private key).
    """

    def __init__(self, chain: Tuple[x509.Certificate, ...], key) -> None:
        self.chain = chain
        self.key = key

    @property
    def leaf(self) -> x509.Certificate:
        """
        The certificate the key belongs to: the first of the chain.
        """
        return self.chain[0]


def readFile(path: str) -> bytes:
    """
    The bytes of the file at C{path}.

    @raise ValueError: with a sentence saying why it cannot be read.
    """
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except PermissionError:
        raise ValueError(f"{path}: permission denied") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot be read: {e.strerror}") from None


def loadCertificates(path: str) -> Tuple[x509.Certificate, ...]:
    """
    The PEM certificates in the file at C{path}, in file order (a chain is leaf first).

    @raise ValueError: the file cannot be read or holds no well-formed PEM certificate (a file cut short
        while being written is caught here).
    """
    data = readFile(path)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError(f"{path}: not a PEM certificate file (or cut short)") from None
    return tuple(certificates)


def loadPrivateKey(path: str):
    """
    The (unencrypted) PEM private key in the file at C{path}.

    @raise ValueError: the file cannot be read, is not a PEM private key, or is encrypted.
    """
    data = readFile(path)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        # cryptography says "password was not given but private key is encrypted" with a TypeError.
        raise ValueError(f"{path}: the private key is encrypted; give an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError(f"{path}: not a PEM private key (or cut short)") from None


def _publicKeyBytes(key) -> bytes:
    """
    A public key as DER SubjectPublicKeyInfo: equal for a certificate and its private key, whatever the
    algorithm.
    """
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def loadKeyPair(certificatePath: str, keyPath: str) -> KeyPair:
    """
    Read a certificate chain and its key and check that they belong together.

    @raise ValueError: either file is unreadable or malformed, or the key is not the certificate's (as
        happens for a moment while both files are being replaced).
    """
    chain = loadCertificates(certificatePath)
    key = loadPrivateKey(keyPath)
    if _publicKeyBytes(chain[0].public_key()) != _publicKeyBytes(key.public_key()):
        raise ValueError(f"{keyPath} is not the private key of the certificate in {certificatePath}")
    return KeyPair(chain, key)


def parseTLS(name: str, o: Options) -> TLSConfig:
    """
    Read the section C{[tls:NAME]} from C{o}, reading and checking the files it names. Every problem is
    recorded in C{o.errors}; the returned config is then only good for finding more errors. The caller
    runs C{o.finish()} afterwards to flag unknown keys.

    A section used by a listener is checked further by L{checkServerTLS}, one used by a cluster by
    L{checkClientTLS}.
    """
    certificate = _path(o, "certificate")
    privateKey = _path(o, "private_key")
    clientCA = _path(o, "client_ca")
    ca = _path(o, "ca")

    if (certificate is None) != (privateKey is None):
        missing, given = ("private_key", "certificate") if privateKey is None else ("certificate", "private_key")
        o.error(missing, f"is required with `{given}`: a certificate is served with its key")
        if certificate is not None:
            _checkFile(o, "certificate", certificate)
    elif certificate is not None and privateKey is not None:
        _checkPair(o, "private_key", certificate, privateKey)
    for key, path in (("client_ca", clientCA), ("ca", ca)):
        if path is not None:
            _checkFile(o, key, path)

    alpn = _alpn(o)
    minVersion = o.string("min_version", "1.2", choices=MIN_VERSIONS)
    ciphers = _ciphers(o, minVersion)
    verifySAN = _verifySAN(o)
    sni = _sni(o)
    extras = _sniCertificates(o, certificate)
    reloadInterval = o.duration("reload_interval", 10.0)

    return TLSConfig(
        name=name,
        certificate=certificate,
        private_key=privateKey,
        client_ca=clientCA,
        ca=ca,
        alpn=alpn,
        min_version=minVersion or "1.2",
        ciphers=ciphers,
        verify_san=verifySAN,
        sni=sni,
        sni_certificates=extras,
        reload_interval=reloadInterval if reloadInterval is not None else 10.0,
    )


def checkServerTLS(tls: TLSConfig, o: Options, key: str = "tls",
                   alpnSpoken: Optional[Collection[str]] = None) -> None:
    """
    Record in C{o} (a listener's section, at its C{key}) what makes C{tls} unfit to serve downstream TLS:
    no certificate, a C{verify_san} with no C{client_ca} to make clients present a certificate, or (when
    C{alpnSpoken} lists the protocols the listener's codec speaks, as for C{protocol = http}) an ALPN
    protocol the listener would agree to and then not speak.
    """
    if alpnSpoken is not None:
        for protocol in tls.alpn:
            if protocol not in alpnSpoken:
                o.error(key, f"[tls:{tls.name}] offers ALPN {protocol!r}, which this listener does not speak "
                             f"(it speaks {', '.join(alpnSpoken)})")
    if tls.certificate is None:
        o.error(key, f"[tls:{tls.name}] needs `certificate` and `private_key` to serve TLS")
    if tls.verify_san and tls.client_ca is None:
        o.error(key, f"[tls:{tls.name}] has verify_san but no client_ca: clients present no certificate "
                     "to check unless client_ca is set")


def checkClientTLS(tls: TLSConfig, o: Options, key: str = "tls") -> None:
    """
    Record in C{o} (a cluster's section, at its C{key}) what makes C{tls} unfit for upstream TLS: extra
    certificates by SNI, which only a server can choose between.
    """
    if tls.sni_certificates:
        o.error(key, f"[tls:{tls.name}] has sni.HOSTNAME certificates, which only a listener uses; "
                     "upstream, `sni = NAME` sets the name to send")


# -- helpers --------------------------------------------------------------------------------------------------


def _failed(o: Options, *keys: str) -> bool:
    """
    Whether an error about one of C{keys} of this section is already recorded (so as not to pile a second
    error on a file that could not be read).
    """
    return any(e.section == o.section and e.key in keys for e in o.errors)


def _path(o: Options, key: str) -> Optional[str]:
    """
    The file named by C{key} as an absolute path, or C{None} when the key is absent. Readability is
    checked by whoever parses the file.
    """
    raw = o.string(key, None)
    if raw is None:
        return None
    return os.path.abspath(raw)


def _checkFile(o: Options, key: str, path: str) -> None:
    """
    Record an error at C{key} unless the file at C{path} holds PEM certificates.
    """
    try:
        loadCertificates(path)
    except ValueError as e:
        o.error(key, str(e))


def _checkPair(o: Options, key: str, certificate: str, privateKey: str) -> bool:
    """
    Load a certificate and key and check they match; record the error (at C{key}, or at C{certificate} /
    C{private_key} when one file is unreadable) and return C{False} if not.
    """
    try:
        loadCertificates(certificate)
    except ValueError as e:
        o.error("certificate" if key == "private_key" else key, str(e))
        return False
    try:
        loadKeyPair(certificate, privateKey)
    except ValueError as e:
        o.error(key, str(e))
        return False
    return True


def _alpn(o: Options) -> Tuple[str, ...]:
    """
    The C{alpn} list: printable protocol ids, each once.
    """
    protocols: List[str] = []
    for item in o.list("alpn"):
        if not _ALPN_ID.match(item):
            o.error("alpn", f"{item!r} is not an ALPN protocol id (write e.g. h2, http/1.1)")
        elif item in protocols:
            o.error("alpn", f"names {item!r} more than once")
        else:
            protocols.append(item)
    return tuple(protocols)


def _ciphers(o: Options, minVersion: Optional[str]) -> Optional[str]:
    """
    The C{ciphers} string, checked by OpenSSL itself.
    """
    ciphers = o.string("ciphers", None)
    if ciphers is None:
        return None
    if minVersion == "1.3":
        o.error("ciphers", "has no effect with min_version = 1.3: it sets TLS 1.2 cipher suites")
        return None
    try:
        # A throwaway context is the only judge of what OpenSSL accepts.
        SSL.Context(SSL.TLS_METHOD).set_cipher_list(ciphers.encode("ascii"))
    except (SSL.Error, UnicodeEncodeError):
        o.error("ciphers", f"{ciphers!r} selects no cipher OpenSSL knows (see `openssl ciphers -v`)")
        return None
    return ciphers


def _verifySAN(o: Options) -> Tuple[str, ...]:
    """
    The C{verify_san} patterns: URIs as written, DNS names lowercased, C{*} only at the end.
    """
    patterns: List[str] = []
    for item in o.list("verify_san"):
        body = item[:-1] if item.endswith("*") else item
        if not body:
            o.error("verify_san", "a lone * would allow every certificate: list the names to allow, "
                                  "or drop verify_san")
            continue
        if "*" in body:
            o.error("verify_san", f"{item!r}: * may only end a pattern (a prefix match), as in "
                                  "spiffe://mesh.local/ns/default/*")
            continue
        if _URI.match(item) is None:
            item = item.lower()  # DNS names compare without case
            if not _DNS_PATTERN.match(item):
                o.error("verify_san", f"{item!r} is neither a DNS name nor a URI such as "
                                      "spiffe://mesh.local/ns/default/sa/frontend")
                continue
            if _isIPAddress(body):
                o.error("verify_san", f"{item!r}: IP address SANs are not supported; name a DNS or URI SAN")
                continue
        if item not in patterns:
            patterns.append(item)
    return tuple(patterns)


def _isIPAddress(text: str) -> bool:
    """
    Whether C{text} is an IPv4 or IPv6 address.
    """
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _sni(o: Options) -> Optional[str]:
    """
    The upstream C{sni} name: a host name (lowercased), not an IP address nor a wildcard.
    """
    sni = o.string("sni", None)
    if sni is None:
        return None
    sni = sni.lower()
    if sni.startswith("*.") or not _SNI_NAME.match(sni) or _isIPAddress(sni):
        o.error("sni", f"{sni!r} is not a host name to send with SNI")
        return None
    return sni


def _sniCertificates(o: Options, default: Optional[str]) -> Tuple[SNICertificate, ...]:
    """
    The C{sni.HOSTNAME = CERT KEY} keys, in file order.
    """
    extras: List[SNICertificate] = []
    for key in o.keys():
        group, dot, hostname = key.partition(".")
        if group != "sni" or not dot:
            continue
        spec = o.string(key, "")
        hostname = hostname.lower()
        if not _SNI_NAME.match(hostname) or _isIPAddress(hostname):
            o.error(key, f"{hostname!r} is not a host name (write sni.api.example.com or sni.*.example.com)")
            continue
        if any(e.hostname == hostname for e in extras):
            o.error(key, f"a certificate for {hostname!r} is already given")
            continue
        paths = spec.split()
        if len(paths) != 2:
            o.error(key, f"{spec!r}: write the certificate file then the key file, separated by a space "
                         f"(sni.{hostname} = etc/pki/{hostname.lstrip('*.')}.pem etc/pki/"
                         f"{hostname.lstrip('*.')}.key)")
            continue
        certificate, privateKey = (os.path.abspath(p) for p in paths)
        if not _checkPair(o, key, certificate, privateKey):
            continue
        extras.append(SNICertificate(hostname, certificate, privateKey))
    if extras and default is None and not _failed(o, "certificate", "private_key"):
        o.error("certificate", "is required with sni.HOSTNAME keys: it is served to clients that send "
                               "another name, or none")
    return tuple(extras)
