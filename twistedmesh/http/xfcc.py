"""
C{x-forwarded-client-cert} (XFCC), as Envoy's connection manager handles it, for both HTTP codecs.

The listener key C{forward_client_cert} picks what happens to the header before any filter runs:

    - C{sanitize} (the default): every incoming XFCC field is removed, and none is added.
    - C{forward}: on a mutual-TLS connection the incoming fields go upstream unchanged (Envoy's
      C{FORWARD_ONLY}); otherwise they are removed.
    - C{append}: on a mutual-TLS connection the client's certificate is appended to the incoming value
      (Envoy's C{APPEND_FORWARD}); otherwise the fields are removed.
    - C{sanitize_set}: on a mutual-TLS connection the value is replaced by the client's certificate alone;
      otherwise the fields are removed.

"Mutual TLS" means the client presented a certificate (the listener's TLS has C{client_ca}). The element
added for the client, in Envoy's format and order, is::

    By=<our URI SAN>;Hash=<sha256 hex of the client's DER certificate>;Subject="<client subject>";URI=<first
    client URI SAN>;DNS=<client DNS SAN>;DNS=<...>

C{By} is repeated for each URI SAN of the certificate this proxy served on the connection, and left out
when it has none; C{URI=} is always present (empty when the client certificate has no URI SAN); one
C{DNS=} per DNS SAN. The subject is RFC 4514 text in double quotes (a C{"} or C{\\} in it is escaped with a
backslash). Several incoming XFCC fields are joined with C{","} into one. The element is worked out once
per connection.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from cryptography import x509

from ..tls import PeerIdentity, peerIdentity

__all__ = ["XFCC", "XFCC_ADDS", "XFCC_MODES", "forwardedClientCert", "xfccElement"]

XFCC = b"x-forwarded-client-cert"
XFCC_MODES = ("sanitize", "forward", "append", "sanitize_set")
# The modes that add an element even when the client sent no XFCC.
XFCC_ADDS = frozenset(("append", "sanitize_set"))


def _ownURISANs(transport) -> Tuple[str, ...]:
    """
    The URI SANs of the certificate this side served on C{transport}'s TLS connection (C{()} if unknown).
    """
    try:
        certificate = transport.getHandle().get_certificate()
    except Exception:
        return ()
    if certificate is None:
        return ()
    try:
        san = certificate.to_cryptography().extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (x509.ExtensionNotFound, ValueError):
        return ()
    return tuple(san.value.get_values_for_type(x509.UniformResourceIdentifier))


def xfccElement(identity: PeerIdentity, by: Sequence[str] = ()) -> bytes:
    """
    The XFCC element for a client of C{identity}, from a proxy whose certificate has the URI SANs C{by}.
    """
    subject = identity.subject.replace("\\", "\\\\").replace('"', '\\"')
    parts: List[str] = [f"By={b}" for b in by]
    parts.append(f"Hash={identity.sha256}")
    parts.append(f'Subject="{subject}"')
    parts.append(f"URI={identity.uriSANs[0] if identity.uriSANs else ''}")
    parts.extend(f"DNS={d}" for d in identity.dnsSANs)
    return ";".join(parts).encode("utf-8")


def forwardedClientCert(conn, mode: str, incoming: Optional[List[bytes]]) -> Sequence[Tuple[bytes, bytes]]:
    """
    The XFCC fields to send upstream for a request on connection C{conn} (a codec with a C{transport}),
    given the listener's C{mode} and the C{incoming} values (C{None} when the client sent none).
    """
    if mode == "sanitize":
        return ()
    transport = conn.transport
    identity = peerIdentity(transport)
    if identity is None:
        return ()  # not mutual TLS: always sanitized
    if mode == "forward":
        return [(XFCC, v) for v in incoming] if incoming else ()
    element = getattr(conn, "_xfccElement", None)
    if element is None:
        element = conn._xfccElement = xfccElement(identity, _ownURISANs(transport))
    if mode == "append" and incoming:
        return [(XFCC, b",".join(incoming) + b"," + element)]
    return [(XFCC, element)]
