#!/usr/bin/env python3
"""
Make a demo PKI for twistedmesh's TLS examples (etc/examples/tls.ini, docs/tls.md): a CA and the
certificates it signs, as PEM files in a directory (etc/pki by default).

    python etc/pki/make-demo-pki.py            # into etc/pki
    python etc/pki/make-demo-pki.py /tmp/pki   # elsewhere
    python etc/pki/make-demo-pki.py --force    # replace what is there (a new CA: old certificates stop
                                               # verifying)

It writes, each certificate as NAME.pem and its key as NAME.key (mode 0600):

    ca        the demo CA (keep ca.key if you want to issue more; nothing in the examples reads it)
    server    the edge listener: DNS localhost, IP 127.0.0.1 and ::1, URI spiffe://mesh.local/ns/default/sa/edge
    other     a second listener certificate for SNI: DNS other.localhost and *.apps.localhost
    frontend  a mesh client: URI spiffe://mesh.local/ns/default/sa/frontend
    backend   another mesh client: URI spiffe://mesh.local/ns/default/sa/backend (verify_san refuses it in the
              example)

These are demo credentials with EC P-256 keys, valid for 90 days. Never commit the keys (*.key): the
repository's .gitignore leaves etc/pki/*.pem and etc/pki/*.key out.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN = "spiffe://mesh.local/ns/default/sa/"
VALID_FOR = datetime.timedelta(days=90)

#: name -> (DNS SANs, IP SANs, URI SANs)
LEAVES = {
    "server": (["localhost"], ["127.0.0.1", "::1"], [TRUST_DOMAIN + "edge"]),
    "other": (["other.localhost", "*.apps.localhost"], [], []),
    "frontend": ([], [], [TRUST_DOMAIN + "frontend"]),
    "backend": ([], [], [TRUST_DOMAIN + "backend"]),
}


def _write(path: str, data: bytes, secret: bool) -> None:
    # Keys are created 0600 from the start, never readable by others even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _keyPEM(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _builder(subject: x509.Name, issuer: x509.Name, publicKey, now: datetime.datetime) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(publicKey)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALID_FOR))


def makeCA(directory: str, now: datetime.datetime):
    """
    Write ca.pem and ca.key; return the CA's certificate and key.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "twistedmesh demo"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "twistedmesh demo CA")])
    cert = (
        _builder(name, name, key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(os.path.join(directory, "ca.pem"), cert.public_bytes(serialization.Encoding.PEM), secret=False)
    _write(os.path.join(directory, "ca.key"), _keyPEM(key), secret=True)
    return cert, key


def makeLeaf(directory: str, name: str, dns: Sequence[str], ips: Sequence[str], uris: Sequence[str],
             caCert: x509.Certificate, caKey, now: datetime.datetime) -> x509.Certificate:
    """
    Write NAME.pem and NAME.key: a certificate for both server and client use, signed by the CA.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    sans = ([x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
            + [x509.UniformResourceIdentifier(u) for u in uris])
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "twistedmesh demo"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(subject, caCert.subject, key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(caKey.public_key()), critical=False)
        .sign(caKey, hashes.SHA256())
    )
    # Write the key first: a reloading proxy that sees the new certificate before its key refuses the
    # mismatched pair and keeps the old one until both are there.
    _write(os.path.join(directory, f"{name}.key"), _keyPEM(key), secret=True)
    _write(os.path.join(directory, f"{name}.pem"), cert.public_bytes(serialization.Encoding.PEM), secret=False)
    return cert


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("directory", nargs="?", default=os.path.join("etc", "pki"),
                        help="where to write the files (default: etc/pki)")
    parser.add_argument("--force", action="store_true", help="replace existing files")
    args = parser.parse_args(argv)

    os.makedirs(args.directory, exist_ok=True)
    names = ["ca"] + list(LEAVES)
    existing = [n for n in names if os.path.exists(os.path.join(args.directory, f"{n}.key"))]
    if existing and not args.force:
        print(f"{args.directory} already holds {', '.join(n + '.key' for n in existing)}; "
              "use --force to replace them", file=sys.stderr)
        return 1

    now = datetime.datetime.now(datetime.timezone.utc)
    caCert, caKey = makeCA(args.directory, now)
    report = [f"{os.path.join(args.directory, 'ca.pem')}: {caCert.subject.rfc4514_string()}"]
    for name, (dns, ips, uris) in LEAVES.items():
        cert = makeLeaf(args.directory, name, dns, ips, uris, caCert, caKey, now)
        report.append(f"{os.path.join(args.directory, name + '.pem')}: {', '.join([*dns, *ips, *uris])} "
                      f"(serial {cert.serial_number:x})")
    report.append(f"valid until {(now + VALID_FOR):%Y-%m-%d}; keys are mode 0600 — never commit them")
    # Report only once every file is written: a closed stdout must not leave half a PKI behind.
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
