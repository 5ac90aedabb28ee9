"""
gRPC as the proxy sees it: which requests are gRPC, their C{grpc-timeout} header, and the shape of a local
reply to one.

gRPC runs over HTTP/2 with C{content-type: application/grpc}; its outcome is C{grpc-status} (and
C{grpc-message}) in the trailers, or in the headers of a "trailers-only" response (a HEADERS frame with
END_STREAM and no body). A gRPC client judges a call by that status, not by the HTTP status, so every local
reply to a gRPC request is made one (L{twistedmesh.http.stream.Stream.respond} does it, whichever filter
replies): HTTP 200, C{content-type: application/grpc}, the status mapped from the HTTP one as gRPC's
http-grpc-status-mapping document does, and the reply's text as the message.

Nothing here is on the path of a request that is not gRPC, and nothing on the path of a gRPC request that
the proxy forwards but the reading of C{grpc-timeout} at its start.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

# (The stream module imports this one: the alias is spelled out rather than imported back.)
Headers = List[Tuple[bytes, bytes]]

__all__ = [
    "OK", "CANCELLED", "UNKNOWN", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "UNIMPLEMENTED", "INTERNAL",
    "UNAVAILABLE", "PERMISSION_DENIED", "UNAUTHENTICATED", "RETRY_ON_STATUSES", "CONTENT_TYPE",
    "isGRPC", "statusForHTTP", "encodeMessage", "parseTimeout", "encodeTimeout", "localReplyHeaders",
]

# The gRPC status codes the proxy produces or reacts to (the full list is in grpc's statuscodes.md).
OK = 0
CANCELLED = 1
UNKNOWN = 2
DEADLINE_EXCEEDED = 4
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16

#: The statuses a route's C{retry.grpc_on} may name, by their names there (Envoy's C{x-envoy-retry-grpc-on}).
RETRY_ON_STATUSES = {
    "cancelled": CANCELLED,
    "deadline-exceeded": DEADLINE_EXCEEDED,
    "internal": INTERNAL,
    "resource-exhausted": RESOURCE_EXHAUSTED,
    "unavailable": UNAVAILABLE,
}

CONTENT_TYPE = b"application/grpc"
_PREFIX_LENGTH = len(CONTENT_TYPE)

# gRPC's http-grpc-status-mapping: what a client makes of an HTTP status that came without a grpc-status.
# Every status not listed is UNKNOWN.
_FROM_HTTP = {
    400: INTERNAL,
    401: UNAUTHENTICATED,
    403: PERMISSION_DENIED,
    404: UNIMPLEMENTED,
    429: UNAVAILABLE,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: UNAVAILABLE,
}

# grpc-timeout's units, in seconds (gRPC's PROTOCOL-HTTP2.md: "TimeoutUnit").
_TIMEOUT_UNITS = {
    ord("H"): 3600.0,
    ord("M"): 60.0,
    ord("S"): 1.0,
    ord("m"): 1e-3,
    ord("u"): 1e-6,
    ord("n"): 1e-9,
}
_MAX_TIMEOUT_DIGITS = 8  # the spec's bound on TimeoutValue

# grpc-message keeps printable ASCII but "%" as it is; every other byte (of the UTF-8 text) is %XX.
_KEPT = frozenset(range(0x20, 0x7F)) - {ord("%")}

# What a local reply of the proxy's own must not carry to a gRPC client: the framing of a body it no longer
# has, and a status of the filter's that the reply's own replaces.
_REPLACED = frozenset((b"content-type", b"content-length", b"grpc-status", b"grpc-message"))


def isGRPC(contentType: Optional[bytes]) -> bool:
    """
    Whether a request with this C{content-type} is gRPC: C{application/grpc}, or C{application/grpc+FORMAT}
    (C{+proto}, C{+json}), or either with parameters. gRPC-Web (C{application/grpc-web...}) is not: its
    status travels in the body.
    """
    if contentType is None or not contentType[:_PREFIX_LENGTH].lower() == CONTENT_TYPE:
        return False
    rest = contentType[_PREFIX_LENGTH:_PREFIX_LENGTH + 1]
    return rest in (b"", b"+", b";")


def statusForHTTP(status: int) -> int:
    """
    The gRPC status that stands for HTTP C{status} (gRPC's http-grpc-status-mapping: 400 INTERNAL, 401
    UNAUTHENTICATED, 403 PERMISSION_DENIED, 404 UNIMPLEMENTED, 429/502/503/504 UNAVAILABLE, else UNKNOWN).
    """
    return _FROM_HTTP.get(status, UNKNOWN)


def encodeMessage(text: bytes) -> bytes:
    """
    C{text} (UTF-8) as a C{grpc-message} value: percent-encoded as gRPC's PROTOCOL-HTTP2.md asks (every byte
    outside printable ASCII, and C{%} itself, becomes C{%XX}).
    """
    for byte in text:
        if byte not in _KEPT:
            break
    else:
        return text
    return b"".join(bytes((byte,)) if byte in _KEPT else b"%%%02X" % byte for byte in text)


def parseTimeout(value: Optional[bytes]) -> Optional[float]:
    """
    A C{grpc-timeout} value (1 to 8 digits and a unit: C{H}, C{M}, C{S}, C{m}, C{u} or C{n}) in seconds, or
    C{None} when it is absent or malformed. C{0} of any unit is C{None} too: it sets no deadline (as Envoy
    reads it), rather than one already past.
    """
    if value is None:
        return None
    value = value.strip()
    digits = value[:-1]
    if not 0 < len(digits) <= _MAX_TIMEOUT_DIGITS or not digits.isdigit():
        return None
    unit = _TIMEOUT_UNITS.get(value[-1])
    if unit is None:
        return None
    amount = int(digits)
    if not amount:
        return None
    return amount * unit


def encodeTimeout(seconds: float) -> bytes:
    """
    C{seconds} as a C{grpc-timeout} value: in milliseconds (rounded up, so a deadline is never shortened)
    while that fits in 8 digits, else in the smallest unit that does.
    """
    milliseconds = -(-seconds * 1000.0 // 1)
    if milliseconds < 10 ** _MAX_TIMEOUT_DIGITS:
        return b"%dm" % max(milliseconds, 1)
    for unit, size in ((b"S", 1.0), (b"M", 60.0), (b"H", 3600.0)):
        amount = -(-seconds / size // 1)
        if amount < 10 ** _MAX_TIMEOUT_DIGITS:
            return b"%d%s" % (amount, unit)
    return b"99999999H"


def localReplyHeaders(httpStatus: int, body: bytes, headers: Sequence[Tuple[bytes, bytes]],
                      grpcStatus: Optional[int] = None) -> Headers:
    """
    The headers of a trailers-only gRPC reply standing for the local reply C{httpStatus} / C{body} /
    C{headers}: the C{headers} (but their content-type and content-length), C{content-type:
    application/grpc}, C{grpc-status} and, if the body says anything, C{grpc-message} (the body without its
    trailing newline, percent-encoded).

    The status is C{grpcStatus} when given, else a C{grpc-status} the C{headers} already carry (a filter that
    made its reply gRPC-shaped itself), else L{statusForHTTP} of C{httpStatus}; likewise a C{grpc-message}
    in C{headers} wins over the body.
    """
    given = None
    givenMessage = None
    kept: Headers = []
    for field in headers:
        name = field[0]
        if name in _REPLACED:
            if name == b"grpc-status":
                given = field[1]
            elif name == b"grpc-message":
                givenMessage = field[1]
            continue
        kept.append(field)
    kept.append((b"content-type", CONTENT_TYPE))
    if grpcStatus is not None:
        kept.append((b"grpc-status", b"%d" % grpcStatus))
    elif given is not None:
        kept.append((b"grpc-status", given))
    else:
        kept.append((b"grpc-status", b"%d" % statusForHTTP(httpStatus)))
    if givenMessage is not None:
        kept.append((b"grpc-message", givenMessage))
    else:
        message = body.rstrip(b"\r\n")
        if message:
            kept.append((b"grpc-message", encodeMessage(message)))
    return kept
