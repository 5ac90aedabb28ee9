"""
Access logs: one line per HTTP request (or per TCP connection), in Envoy's format language.

Three parts, each resolved once at config load so that a request pays only for what it logs:

  - B{Formats.} A format string such as C{[%START_TIME%] "%REQ(:METHOD)% %REQ(:PATH)%" %RESPONSE_CODE%} is
    compiled by L{compileFormat} (or L{compileJSONFormat}) into literal strings and I{getters}, small
    closures C{(record, endTime) -> str}, and from them into one render function written for the format
    (Python source generated from our own pieces, never from user text: header names are checked tokens,
    literals are constants): it scans the request headers once for every C{%REQ(...)%}, computes the
    common operators in place, calls the getters of the rare ones, and fills one %-template. A text
    format's template is bytes: header values go into the line as they came, without a decode per value
    or an encode per line; a line that turns out not to be ASCII is rendered again as text (which escapes
    bytes that are not UTF-8). Where the install compiled it (setup.py; it needs a C compiler), a text
    format renders in C instead (C{_linefmt.c}, about a third of the Python render's cost): the same
    operators as ops, the same bytes, and the Python render for any line it does not expect
    (C{CompiledFormat.pythonRender}; C{TWISTEDMESH_PURE_PYTHON=1} turns the C one off). Unknown operators and bad arguments are L{FormatError}s at compile time, never at request
    time.
  - B{Filters.} L{AccessLogger.log} checks the configured status, duration and flag filters first, on plain
    fields, so a request that is not logged costs a few comparisons and no formatting.
  - B{Sinks.} L{FileSink} never blocks the reactor: lines are appended to a list, and a timer (or a full
    batch) hands the list to one writer thread that joins and writes it. The writer's backlog is
    bounded; past the bound whole batches are dropped and counted (C{access_log.dropped}) rather than
    letting memory grow while a disk stalls. L{MemorySink} keeps lines for tests.

The records are L{twistedmesh.http.stream.Stream}s for HTTP and L{TCPAccessRecord}s for TCP connections;
getters read only the attributes both share, plus the HTTP ones for HTTP-only operators (which compile to
a constant C{-} in a TCP format).
"""

from __future__ import annotations

import difflib
import os
import queue
import re
import select
import threading
import time
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii
from operator import attrgetter
from types import MappingProxyType
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple, Union

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from zope.interface import Interface, implementer

from .native import load as _loadNative
from .stats import Counter

_linefmt = _loadNative("_linefmt")  # the C renderer of text lines, where it is built

__all__ = [
    "DEFAULT_FORMAT", "DEFAULT_JSON_FORMAT", "RESPONSE_FLAGS", "OPERATORS", "FormatError", "CompiledFormat",
    "compileFormat", "compileJSONFormat", "parseStatusCondition", "statusCodes", "TCPAccessRecord",
    "IAccessLogSink", "MemorySink", "FileSink", "openSink", "AccessLogSinks", "AccessLogger",
]

#: Envoy's default format (C{%REQ(...)%} spelling), used when a listener sets no C{access_log.format}.
DEFAULT_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE% '
    '%RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% '
    '"%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"\n'
)

#: The fields of C{access_log.json = true} without C{access_log.json_format}: the default format's, named.
DEFAULT_JSON_FORMAT: Tuple[Tuple[str, str], ...] = (
    ("start_time", "%START_TIME%"),
    ("method", "%REQ(:METHOD)%"),
    ("path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
    ("protocol", "%PROTOCOL%"),
    ("response_code", "%RESPONSE_CODE%"),
    ("response_flags", "%RESPONSE_FLAGS%"),
    ("bytes_received", "%BYTES_RECEIVED%"),
    ("bytes_sent", "%BYTES_SENT%"),
    ("duration", "%DURATION%"),
    ("upstream_service_time", "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%"),
    ("x_forwarded_for", "%REQ(X-FORWARDED-FOR)%"),
    ("user_agent", "%REQ(USER-AGENT)%"),
    ("request_id", "%REQ(X-REQUEST-ID)%"),
    ("authority", "%REQ(:AUTHORITY)%"),
    ("upstream_host", "%UPSTREAM_HOST%"),
)

#: Envoy's response flags: what C{access_log.flags} may name.
RESPONSE_FLAGS: Tuple[str, ...] = (
    "UH", "UF", "UO", "NR", "URX", "NC", "DT", "DC", "LH", "UT", "LR", "UR", "UC", "DI", "FI", "RL", "UAEX",
    "RLSE", "IH", "SI", "DPE", "UPE", "UMSDR", "OM", "DF",
)

#: What a getter is: C{(stream or TCP record, endTime) -> text}.
Getter = Callable[[Any, float], str]
#: What a value getter is: the typed value (C{str}, C{int}) or C{None} when unset.
ValueGetter = Callable[[Any, float], Union[str, int, None]]

_MISSING = "-"
_OPERATOR = re.compile(r"%([A-Z0-9_]+)(?:\(([^)]*)\))?(?::([0-9]+))?%")
_TOKEN = re.compile(r"^:?[!#$&'*+.^_`|~0-9A-Za-z-]+$")


class FormatError(ValueError):
    """
    A format string that cannot be compiled: an unknown operator, a bad argument, a stray C{%}.
    """


# -- records ---------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class TCPAccessRecord:
    """
    What a C{protocol = tcp} listener knows about one connection, for L{AccessLogger.logTCP}. The listener
    fills it as the connection goes (counting bytes both ways) and logs it when the connection is lost.

    @ivar listener: the listener's name.
    @ivar downstreamAddress: the peer's L{IAddress} (C{transport.getPeer()}).
    @ivar startTime: when the connection was accepted, in seconds since the epoch (the clock's C{seconds()}).
    @ivar bytesReceived: bytes read from the downstream peer.
    @ivar bytesSent: bytes written to the downstream peer.
    @ivar upstreamHost: the L{twistedmesh.upstream.cluster.Host} connected to (its C{endpoint} is logged),
        or C{None}.
    @ivar upstreamCluster: the L{twistedmesh.upstream.cluster.Cluster} (its C{name}), or C{None}.
    @ivar responseFlags: Envoy flags such as C{UF} (connect failure), C{UH} (no healthy host).
    @ivar terminationDetails: why the proxy closed the connection (C{NetworkConnection.closeReason}), or
        C{""}; the C{%CONNECTION_TERMINATION_DETAILS%} operator.
    @ivar state: optional facts, as on a stream: C{"peerUriSan"}, C{"upstreamTransportFailureReason"}.
    """

    listener: str
    downstreamAddress: Any
    startTime: float
    bytesReceived: int = 0
    bytesSent: int = 0
    upstreamHost: Any = None
    upstreamCluster: Any = None
    responseFlags: List[str] = field(default_factory=list)
    terminationDetails: str = ""
    state: Dict[str, Any] = field(default_factory=dict)


# -- small renderers shared by getters -------------------------------------------------------------------------


def _decode(value: bytes) -> str:
    """
    Header bytes as text. Not latin-1: UTF-8 values should read as themselves in the file; bytes that are
    not UTF-8 become C{\\xNN} so a line stays valid UTF-8 whatever a client sent.
    """
    return value.decode("utf-8", "backslashreplace")


def _addressText(address: Any) -> Optional[str]:
    """
    C{ip:port} (C{[ip6]:port}) for an IP address, the path for a UNIX one, C{None} for anything else.
    """
    if address is None:
        return None
    host = getattr(address, "host", None)
    if host is not None:
        return f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"
    name = getattr(address, "name", None)
    if isinstance(name, bytes):
        return _decode(name)
    return name if isinstance(name, str) else None


def _endpointAddress(endpoint: str) -> str:
    """
    The C{host:port} of a Twisted client endpoint string (C{tcp:10.0.0.1:9001} → C{10.0.0.1:9001}), the
    way Envoy logs C{%UPSTREAM_HOST%}; the string itself when it is some other kind of endpoint.
    """
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", endpoint)]
    kind, args = parts[0], parts[1:]
    positional = [a for a in args if "=" not in a]
    keywords = dict(a.split("=", 1) for a in args if "=" in a)
    if kind in ("tcp", "tcp6", "tls", "ssl"):
        host = keywords.get("host", positional[0] if positional else None)
        port = keywords.get("port", positional[1] if len(positional) > 1 else None)
        if host and port:
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    elif kind == "unix":
        return keywords.get("path", positional[0] if positional else endpoint)
    return endpoint


class _TimeFormat:
    """
    A C{START_TIME} format: strftime (in UTC) plus Envoy's C{%s} (epoch seconds) and C{%f} / C{%1f}..C{%9f}
    (fractional seconds, truncated; C{%f} is nine digits). The strftime part changes once a second, so it
    is cached per second and a line pays only for the fraction.

    Times are floats, good to about a microsecond at today's epoch: C{%7f}..C{%9f} are padded with zeros.
    """

    __slots__ = ("_pieces", "_fracs", "second", "_template", "head", "tail", "headData", "tailData")

    def __init__(self, fmt: str) -> None:
        pieces: List[Union[str, int]] = []  # strftime chunks (str), fraction digits (int), epoch (-1)
        fracs: List[int] = []
        chunk = []
        i, n = 0, len(fmt)
        while i < n:
            c = fmt[i]
            if c != "%":
                chunk.append(c)
                i += 1
                continue
            if i + 1 >= n:
                raise FormatError(f"START_TIME format {fmt!r} ends with a lone %")
            nxt = fmt[i + 1]
            if nxt == "s" or nxt == "f" or (nxt in "123456789" and fmt[i + 2:i + 3] == "f"):
                if chunk:
                    pieces.append("".join(chunk))
                    chunk = []
                if nxt == "s":
                    pieces.append(-1)
                    i += 2
                else:
                    digits = 9 if nxt == "f" else int(nxt)
                    pieces.append(digits)
                    fracs.append(digits)
                    i += 2 if nxt == "f" else 3
                continue
            chunk.append(fmt[i:i + 2])  # a strftime directive, %% included: strftime handles it
            i += 2
        if chunk:
            pieces.append("".join(chunk))
        self._pieces = tuple(pieces)
        self._fracs = tuple(fracs)
        self.second: Optional[int] = None  # the cached second
        self._template = ""
        # With exactly one %3f (the default format), the current second's text around the milliseconds:
        # a compiled format inlines head + millis + tail (see millisOnly), as text or as bytes (*Data).
        self.head = self.tail = ""
        self.headData = self.tailData = b""
        try:
            self(0.0)
        except (ValueError, OverflowError) as e:
            raise FormatError(f"START_TIME format {fmt!r}: {e}") from None

    @property
    def millisOnly(self) -> bool:
        """
        Whether the format has exactly one fraction, of three digits (C{%3f}), as the default has.
        """
        return self._fracs == (3,)

    def advance(self, second: int) -> None:
        """
        Make C{second} the cached one: its template (and C{head}, C{tail}).
        """
        tm = time.gmtime(second)
        out: List[Optional[str]] = []
        for piece in self._pieces:
            if piece.__class__ is str:
                out.append(time.strftime(piece, tm))
            elif piece == -1:
                out.append(str(second))
            else:
                out.append(None)  # a fraction's place
        if self._fracs:
            self._template = "".join("%s" if x is None else x.replace("%", "%%") for x in out)
        else:
            self._template = "".join(out)  # type: ignore[arg-type]
        if self._fracs == (3,):
            at = out.index(None)
            self.head = "".join(out[:at])  # type: ignore[arg-type]
            self.tail = "".join(out[at + 1:])  # type: ignore[arg-type]
            self.headData = self.head.encode("utf-8")
            self.tailData = self.tail.encode("utf-8")
        self.second = second

    def ofRecord(self, record: Any, endTime: float) -> str:
        """
        The getter: C{record.startTime} formatted (one call fewer than a wrapper around L{__call__}).
        """
        return self(record.startTime)

    def __call__(self, t: float) -> str:
        """
        C{t} (seconds since the epoch) formatted.
        """
        # Round to microseconds first: 1460751420.310 is 1460751420.30999994... as a float, and
        # truncating that would log .309.
        us = round(t * 1_000_000)
        second, frac = divmod(us, 1_000_000)
        if second != self.second:
            self.advance(second)
        fracs = self._fracs
        if not fracs:
            return self._template
        if fracs == (3,):  # the default format: keep its path short
            return self.head + _MILLIS[frac // 1000] + self.tail
        return self._template % tuple(_fraction(frac, digits) for digits in fracs)


#: C{"000"} .. C{"999"}: the default format's milliseconds, without a C{%} per line (as text and as bytes).
_MILLIS: Tuple[str, ...] = tuple("%03d" % i for i in range(1000))
_MILLIS_DATA: Tuple[bytes, ...] = tuple(m.encode("ascii") for m in _MILLIS)


def _fraction(micros: int, digits: int) -> str:
    """
    C{micros} (0..999999) as C{digits} fractional digits, truncated (or zero-padded past six).
    """
    if digits <= 6:
        return "%0*d" % (digits, micros // 10 ** (6 - digits))
    return "%06d" % micros + "0" * (digits - 6)


# -- operators -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Operator:
    """
    One command operator: whether it takes an argument and a C{:Z} truncation, what type its value has
    (C{"str"} or C{"int"}, which matters for JSON), whether it exists only for HTTP (a TCP format renders
    it as C{-}), how to make its value getter, and optionally a faster text getter.
    """

    name: str
    kind: str
    arg: str  # "none" | "required" | "optional"
    truncates: bool
    httpOnly: bool
    value: Callable[[Optional[str], Optional[int]], ValueGetter]
    text: Optional[Callable[[Optional[str], Optional[int]], Getter]] = None
    tcpConstant: Optional[int] = None  # what an HTTP-only int operator is in a TCP line (Envoy: code 0)


_PSEUDO = {
    "request": {":method": "method", ":path": "path", ":authority": "authority", "host": "authority",
                ":scheme": "scheme"},
    "response": {":status": "status"},
    "trailers": {},
}


def _headerNames(op: str, arg: str, kind: str) -> List[Tuple[str, str]]:
    """
    C{X?Y} as C{[(kind, name)]}: each name lowercased and checked, pseudo-headers mapped to fields.
    """
    sources = []
    names = arg.split("?")
    if len(names) > 2 or not all(names):
        raise FormatError(f"%{op}({arg})%: write %{op}(NAME)% or %{op}(NAME?FALLBACK)%")
    for name in names:
        lower = name.strip().lower()
        if not _TOKEN.match(lower):
            raise FormatError(f"%{op}({arg})%: {name!r} is not a header name")
        if lower.startswith(":") or lower in _PSEUDO[kind]:
            attr = _PSEUDO[kind].get(lower)
            if attr is None:
                known = ", ".join(sorted(k.upper() for k in _PSEUDO[kind] if k.startswith(":")))
                raise FormatError(f"%{op}({arg})%: {name} is not a pseudo-header here"
                                  + (f" (known: {known})" if known else ""))
            sources.append(("field", attr))
        else:
            sources.append((kind, lower))
    return sources


def _source(kind: str, name: str) -> Callable[[Any], Optional[bytes]]:
    """
    A function C{record -> bytes or None} reading one header (first match, like Envoy) or stream field.
    """
    if kind == "field":
        if name == "status":
            return lambda r: b"%d" % r.status if getattr(r, "status", 0) else None
        get = attrgetter(name)
        return lambda r: get(r) or None  # an empty authority means "no Host": unset
    key = name.encode("ascii")
    if kind == "request":
        def fromRequest(r: Any) -> Optional[bytes]:
            for k, v in r.requestHeaders:
                if k == key:
                    return v
            return None
        return fromRequest
    if kind == "response":
        def fromResponse(r: Any) -> Optional[bytes]:
            for k, v in r.responseHeaders:
                if k == key:
                    return v
            return None
        return fromResponse

    def fromTrailers(r: Any) -> Optional[bytes]:
        # The stream keeps the trailers it sent in its state (only streams that had any).
        trailers = r.state.get("responseTrailers")
        if trailers:
            for k, v in trailers:
                if k == key:
                    return v
        return None
    return fromTrailers


def _headerGetter(names: List[Tuple[str, str]], maxLen: Optional[int], absent: Optional[str],
                  empty: str) -> Callable[[Any, float], Optional[str]]:
    """
    A getter of the first of C{names} that is set, decoded and truncated. C{absent} is what an unset value
    gives (C{-} for text, C{None} for JSON), C{empty} what a header present with an empty value gives (C{-}
    for text, C{""} for JSON, as Envoy's typed JSON does).
    """
    if len(names) == 1 and names[0][0] in ("request", "response"):
        # The common cases, inlined: one header, one loop, no helper calls.
        key = names[0][1].encode("ascii")
        if names[0][0] == "request":
            def requestHeader(r: Any, e: float) -> Optional[str]:
                for k, v in r.requestHeaders:
                    if k == key:
                        return v.decode("utf-8", "backslashreplace")[:maxLen] or empty
                return absent
            return requestHeader

        def responseHeader(r: Any, e: float) -> Optional[str]:
            for k, v in r.responseHeaders:
                if k == key:
                    return v.decode("utf-8", "backslashreplace")[:maxLen] or empty
            return absent
        return responseHeader
    if len(names) == 1 and names[0][0] == "field" and names[0][1] != "status":
        fieldOf = attrgetter(names[0][1])

        def pseudo(r: Any, e: float) -> Optional[str]:
            return fieldOf(r).decode("utf-8", "backslashreplace")[:maxLen] or absent
        return pseudo
    if len(names) == 2 and names[0][0] == "request" and names[1][0] == "field" and names[1][1] != "status":
        # The default format's %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%: a header, else a request field.
        key = names[0][1].encode("ascii")
        fallback = attrgetter(names[1][1])

        def headerOrField(r: Any, e: float) -> Optional[str]:
            for k, v in r.requestHeaders:
                if k == key:
                    return v.decode("utf-8", "backslashreplace")[:maxLen] or empty
            return fallback(r).decode("utf-8", "backslashreplace")[:maxLen] or absent
        return headerOrField
    sources = [_source(k, n) for k, n in names]
    first = sources[0]
    second = sources[1] if len(sources) > 1 else None

    def anyHeader(r: Any, e: float) -> Optional[str]:
        v = first(r)
        if v is None and second is not None:
            v = second(r)
        if v is None:
            return absent
        return _decode(v)[:maxLen] or empty
    return anyHeader


def _headerOperator(op: str, kind: str) -> Tuple[Callable, Callable]:
    """
    The value and text getter factories of C{%REQ%}, C{%RESP%} or C{%TRAILER%}.
    """

    def value(arg: Optional[str], maxLen: Optional[int]) -> ValueGetter:
        return _headerGetter(_headerNames(op, arg or "", kind), maxLen, None, "")

    def text(arg: Optional[str], maxLen: Optional[int]) -> Getter:
        return _headerGetter(_headerNames(op, arg or "", kind), maxLen, _MISSING, _MISSING)  # type: ignore

    return value, text


_DEFAULT_TIME = "%Y-%m-%dT%H:%M:%S.%3fZ"  # what %START_TIME% without a format means


def _startTime(arg: Optional[str], maxLen: Optional[int]) -> ValueGetter:
    """
    C{%START_TIME%} / C{%START_TIME(FORMAT)%}: the record's start time, formatted.
    """
    # A formatted time is never empty: the value getter is the text getter too.
    return _TimeFormat(arg if arg else _DEFAULT_TIME).ofRecord


def _ms(start: float, end: float) -> int:
    """
    Whole milliseconds from C{start} to C{end} (truncated, as Envoy does, after rounding away float noise).
    """
    return round((end - start) * 1_000_000) // 1000


def _duration(arg: Optional[str], maxLen: Optional[int]) -> ValueGetter:
    """
    C{%DURATION%}: milliseconds from the start to C{endTime}.
    """
    return lambda r, e: _ms(r.startTime, e)


def _durationText(arg: Optional[str], maxLen: Optional[int]) -> Getter:
    """
    C{%DURATION%} as text, inlined (it is in every default line).
    """
    return lambda r, e: str(round((e - r.startTime) * 1_000_000) // 1000)


def _responseDuration(arg: Optional[str], maxLen: Optional[int]) -> ValueGetter:
    """
    C{%RESPONSE_DURATION%}: milliseconds to C{state["responseStartTime"]}, if recorded.
    """
    def get(r: Any, e: float) -> Optional[int]:
        t = r.state.get("responseStartTime")
        return None if t is None else _ms(r.startTime, t)
    return get


_PROTOCOLS = MappingProxyType({b"1.1": "HTTP/1.1", b"1.0": "HTTP/1.0", b"2": "HTTP/2", b"2.0": "HTTP/2"})


def _protocol(arg: Optional[str], maxLen: Optional[int]) -> ValueGetter:
    """
    C{%PROTOCOL%}: C{HTTP/1.1}, C{HTTP/1.0}.
    """
    def get(r: Any, e: float) -> Optional[str]:
        version = r.version
        return _PROTOCOLS.get(version) or ("HTTP/" + _decode(version) if version else None)
    return get


def _protocolText(arg: Optional[str], maxLen: Optional[int]) -> Getter:
    """
    C{%PROTOCOL%} as text.
    """
    get = _protocol(arg, maxLen)
    return lambda r, e: get(r, e) or _MISSING


def _flags(arg: Optional[str], maxLen: Optional[int]) -> ValueGetter:
    """
    C{%RESPONSE_FLAGS%}: the flags joined by commas.
    """
    return lambda r, e: ",".join(r.responseFlags) or None


def _flagsText(arg: Optional[str], maxLen: Optional[int]) -> Getter:
    """
    C{%RESPONSE_FLAGS%} as text, C{-} for none.
    """
    return lambda r, e: ",".join(r.responseFlags) or _MISSING


def _upstreamHost(arg: Optional[str], maxLen: Optional[int]) -> ValueGetter:
    """
    C{%UPSTREAM_HOST%}: the host's address, parsed once per endpoint string.
    """
    # Per getter, not per module: hosts are few and their endpoint strings never change, so parse each once.
    cache: Dict[str, str] = {}

    def get(r: Any, e: float) -> Optional[str]:
        host = r.upstreamHost
        if host is None:
            return None
        endpoint = host.endpoint
        text = cache.get(endpoint)
        if text is None:
            text = _endpointAddress(endpoint)
            if len(cache) < 4096:  # dynamic hosts come and go: stay bounded
                cache[endpoint] = text
        return text
    return get


def _upstreamHostText(arg: Optional[str], maxLen: Optional[int]) -> Getter:
    """
    C{%UPSTREAM_HOST%} as text.
    """
    get = _upstreamHost(arg, maxLen)
    return lambda r, e: get(r, e) or _MISSING


def _attribute(name: str, kind: str = "str") -> Callable[[Optional[str], Optional[int]], ValueGetter]:
    """
    The factory of a getter that reads record attribute C{name} (C{None} or C{""} is unset).
    """
    get = attrgetter(name)
    if kind == "int":
        return lambda arg, maxLen: lambda r, e: get(r)
    return lambda arg, maxLen: lambda r, e: get(r) or None


def _intText(name: str) -> Callable[[Optional[str], Optional[int]], Getter]:
    """
    The factory of a text getter for integer attribute C{name} (never unset).
    """
    get = attrgetter(name)
    return lambda arg, maxLen: lambda r, e: str(get(r))


def _stateEntry(key: str) -> Callable[[Optional[str], Optional[int]], ValueGetter]:
    """
    The factory of a getter that reads C{record.state[key]}: facts some other part of the proxy may
    record (a sequence is joined with commas, as Envoy joins several SANs).
    """
    def make(arg: Optional[str], maxLen: Optional[int]) -> ValueGetter:
        def get(r: Any, e: float) -> Optional[str]:
            v = r.state.get(key)
            if v is None or v == "":
                return None
            if isinstance(v, bytes):
                return _decode(v)
            if isinstance(v, (list, tuple)):
                return ",".join(_decode(x) if isinstance(x, bytes) else str(x) for x in v) or None
            return str(v)
        return get
    return make


def _peerUriSan(arg: Optional[str], maxLen: Optional[int]) -> ValueGetter:
    """
    The client certificate's URI SANs: C{state["peerUriSan"]} when something recorded it, else the
    record's C{peerIdentity} (a stream's, worked out once per connection, only when a format asks).
    """
    fromState = _stateEntry("peerUriSan")(arg, maxLen)

    def get(r: Any, e: float) -> Optional[str]:
        v = fromState(r, e)
        if v is not None:
            return v
        identity = getattr(r, "peerIdentity", None)
        if identity is None or not identity.uriSANs:
            return None
        return ",".join(identity.uriSANs)
    return get


def _nameOf(attr: str) -> Callable[[Optional[str], Optional[int]], ValueGetter]:
    """
    The factory of a getter of C{record.<attr>.name} (a cluster's), C{None} when unset.
    """
    def make(arg: Optional[str], maxLen: Optional[int]) -> ValueGetter:
        def get(r: Any, e: float) -> Optional[str]:
            obj = getattr(r, attr)
            return None if obj is None else obj.name
        return get
    return make


def _routeName(arg: Optional[str], maxLen: Optional[int]) -> ValueGetter:
    """
    C{%ROUTE_NAME%}: C{TABLE/NAME} of the matched route.
    """
    def get(r: Any, e: float) -> Optional[str]:
        route = r.route
        return None if route is None else f"{route.table}/{route.name}"
    return get


def _traceId(arg: Optional[str], maxLen: Optional[int]) -> ValueGetter:
    """
    C{%TRACE_ID%}: the request's trace id (hex), when the listener propagates trace context.
    """
    def get(r: Any, e: float) -> Optional[str]:
        trace = r.state.get("trace")
        return None if trace is None or not trace.traceId else trace.traceId.decode("ascii")
    return get


def _remoteAddress(arg: Optional[str], maxLen: Optional[int]) -> ValueGetter:
    """
    C{%DOWNSTREAM_REMOTE_ADDRESS%}: the peer's ip:port.
    """
    return lambda r, e: _addressText(r.downstreamAddress)


def _terminationDetails(arg: Optional[str], maxLen: Optional[int]) -> ValueGetter:
    """
    C{%CONNECTION_TERMINATION_DETAILS%}: why the proxy closed the connection.
    """
    fromState = _stateEntry("connectionTerminationDetails")(arg, maxLen)

    def get(r: Any, e: float) -> Optional[str]:
        details = getattr(r, "terminationDetails", None)  # a TCP record's; a stream keeps it in state
        return details or fromState(r, e)
    return get


def _operators() -> Mapping[str, _Operator]:
    """
    Build the read-only operator table (once, at import).
    """
    reqValue, reqText = _headerOperator("REQ", "request")
    respValue, respText = _headerOperator("RESP", "response")
    trailerValue, trailerText = _headerOperator("TRAILER", "trailers")
    requestId = lambda arg, maxLen: reqValue("X-REQUEST-ID", None)  # noqa: E731
    requestIdText = lambda arg, maxLen: reqText("X-REQUEST-ID", None)  # noqa: E731
    ops = [
        _Operator("START_TIME", "str", "optional", False, False, _startTime, _startTime),
        _Operator("REQ", "str", "required", True, True, reqValue, reqText),
        _Operator("RESP", "str", "required", True, True, respValue, respText),
        _Operator("TRAILER", "str", "required", True, True, trailerValue, trailerText),
        _Operator("PROTOCOL", "str", "none", False, True, _protocol, _protocolText),
        _Operator("RESPONSE_CODE", "int", "none", False, True, _attribute("status", "int"), _intText("status"),
                  tcpConstant=0),
        _Operator("RESPONSE_CODE_DETAILS", "str", "none", False, True, _attribute("responseCodeDetails")),
        _Operator("RESPONSE_FLAGS", "str", "none", False, False, _flags, _flagsText),
        _Operator("BYTES_RECEIVED", "int", "none", False, False, _attribute("bytesReceived", "int"),
                  _intText("bytesReceived")),
        _Operator("BYTES_SENT", "int", "none", False, False, _attribute("bytesSent", "int"),
                  _intText("bytesSent")),
        _Operator("DURATION", "int", "none", False, False, _duration, _durationText),
        _Operator("RESPONSE_DURATION", "int", "none", False, True, _responseDuration),
        _Operator("UPSTREAM_HOST", "str", "none", False, False, _upstreamHost, _upstreamHostText),
        _Operator("UPSTREAM_CLUSTER", "str", "none", False, False, _nameOf("upstreamCluster")),
        _Operator("UPSTREAM_TRANSPORT_FAILURE_REASON", "str", "none", False, False,
                  _stateEntry("upstreamTransportFailureReason")),
        _Operator("DOWNSTREAM_REMOTE_ADDRESS", "str", "none", False, False, _remoteAddress),
        _Operator("DOWNSTREAM_PEER_URI_SAN", "str", "none", False, False, _peerUriSan),
        _Operator("REQUEST_ID", "str", "none", False, True, requestId, requestIdText),
        _Operator("ROUTE_NAME", "str", "none", False, True, _routeName),
        _Operator("TRACE_ID", "str", "none", False, True, _traceId),
        _Operator("CONNECTION_TERMINATION_DETAILS", "str", "none", False, False, _terminationDetails),
    ]
    table = {op.name: op for op in ops}
    # Envoy's newer long spellings of the header operators.
    table["REQUEST_HEADER"] = table["REQ"]
    table["RESPONSE_HEADER"] = table["RESP"]
    table["RESPONSE_TRAILER"] = table["TRAILER"]
    return MappingProxyType(table)


#: Every command operator this proxy knows, by name (read-only).
OPERATORS: Mapping[str, _Operator] = _operators()


# -- compiling formats -----------------------------------------------------------------------------------------


class _Piece:
    """
    One operator of a format being compiled: its getter (what L{CompiledFormat.segments} shows, and what
    the render function calls when L{_inlineCode} has no code for the operator), plus what L{_inlineCode}
    needs to write that code.
    """

    __slots__ = ("getter", "op", "arg", "maxLen", "json")

    def __init__(self, getter: Getter, op: _Operator, arg: Optional[str], maxLen: Optional[int], json: bool) -> None:
        self.getter = getter
        self.op = op
        self.arg = arg
        self.maxLen = maxLen
        self.json = json


class _Source:
    """
    The source of one render function while L{CompiledFormat} writes it: the objects it refers to
    (C{env}, its globals), statements before its C{return}, and the request and response header names
    read by the one scan of each list (each name's first value lands in a variable).

    Names in the generated code: C{r} the record, C{e} the end time, C{cN} objects, C{tN} temporaries,
    C{qN} / C{pN} request / response header values, C{k} and C{v} the scan's loop variables.
    """

    def __init__(self) -> None:
        self.env: Dict[str, Any] = {"_enc": encode_basestring_ascii, "__builtins__": __builtins__}
        self.lines: List[str] = []
        self.request: Dict[bytes, str] = {}
        self.response: Dict[bytes, str] = {}
        self._temps = 0

    def const(self, value: Any) -> str:
        """
        A name for C{value} in the function's globals.
        """
        name = "c%d" % len(self.env)
        self.env[name] = value
        return name

    def temp(self) -> str:
        """
        A fresh local variable name.
        """
        self._temps += 1
        return "t%d" % self._temps

    def header(self, kind: str, name: bytes) -> str:
        """
        The variable holding the first value of header C{name} (C{None} when absent) of the C{"request"}
        or C{"response"}.
        """
        table = self.request if kind == "request" else self.response
        var = table.get(name)
        if var is None:
            var = table[name] = ("q%d" if kind == "request" else "p%d") % len(table)
        return var

    def _scan(self, attr: str, table: Dict[bytes, str]) -> List[str]:
        """
        One loop over C{r.<attr>} filling every variable of C{table}, first value wins (as Envoy reads).
        """
        if not table:
            return []
        out = [" = ".join(table.values()) + " = None", f"for k, v in r.{attr}:"]
        indent = "    "
        if len(table) > 2:
            # One hash probe per field instead of a comparison per wanted name.
            out.append(f"    if k in {self.const(frozenset(table))}:")
            indent = "        "
        for i, (name, var) in enumerate(table.items()):
            out.append(f"{indent}{'elif' if i else 'if'} k == {name!r}:")
            out.append(f"{indent}    if {var} is None:")
            out.append(f"{indent}        {var} = v")
        return out

    def function(self, slots: List[_Slot], literals: List[str], json: bool) -> Tuple[Callable, Callable, str]:
        """
        Compile the format whose template is C{literals[0] slot0 literals[1] slot1 ... literals[-1]}
        (C{len(literals) == len(slots) + 1}): C{text(r, e)} gives the line as text, C{render(r, e)} as the
        bytes written; both functions, and their source.
        """
        body = self._scan("requestHeaders", self.request) + self._scan("responseHeaders", self.response)
        body += self.lines
        template = "".join(lit.replace("%", "%%") + ("%s" if i < len(slots) else "")
                           for i, lit in enumerate(literals))
        textValues = ", ".join(text for text, _, _ in slots)

        def returning(values: str, decode: str) -> List[str]:
            if not slots:
                return body + [f"return {self.const(''.join(literals))}"]
            return body + [f"return {self.const(template)} % ({values.replace(_DECODE, decode)},)"]

        # The reference: what every line is, whatever bytes came in (header bytes that are not UTF-8 as
        # \xNN escapes, so that a line is always valid UTF-8).
        source = "def text(r, e):\n" + _indent(returning(textValues, ".decode('utf-8', 'backslashreplace')"), 1)
        literal = "".join(literals)
        if json or not literal.isascii():
            # JSON values are ASCII once escaped; header bytes are nearly always UTF-8, and a strict
            # decode without arguments is the fastest: try that, and take the reference on failure.
            fast = returning(textValues, ".decode()")
            fast[-1] = f"return ({fast[-1][len('return '):]}).encode()"
            source += ("def render(r, e):\n    try:\n" + _indent(fast, 2)
                       + "    except UnicodeError:  # bytes that are not UTF-8, text that cannot be UTF-8\n"
                       + "        return text(r, e).encode('utf-8', 'backslashreplace')\n")
        else:
            # Text lines as bytes from the start: header bytes go in as they are, with no decoding per value
            # or encoding per line. A line that is all ASCII (nearly every one) is exactly the reference's
            # bytes; any other renders the reference way, which escapes what is not UTF-8.
            if slots:
                convs = [conv for _, _, conv in slots] + [""]
                data = self.const("".join(lit.replace("%", "%%") + conv for lit, conv in zip(literals, convs))
                                  .encode("ascii"))
                line = f"line = {data} % ({', '.join(d for _, d, _ in slots)},)"
            else:
                line = f"line = {self.const(literal.encode('ascii'))}"  # no template: no %% to undo
            source += ("def render(r, e):\n    try:\n" + _indent(body + [line], 2)
                       + "    except (TypeError, UnicodeError):  # a value of an unexpected type or text\n"
                       + "        return text(r, e).encode('utf-8', 'backslashreplace')\n"
                       + "    if line.isascii():\n        return line\n"
                       + "    return text(r, e).encode('utf-8', 'backslashreplace')\n")
        namespace = self.env
        exec(compile(source, "<access log format>", "exec"), namespace)  # our own code, built from our pieces
        return namespace["text"], namespace.pop("render"), source  # render calls text: it stays


def _indent(lines: List[str], depth: int) -> str:
    """
    C{lines} as a block of source, C{depth} levels deep.
    """
    pad = "    " * depth
    return "".join(f"{pad}{line}\n" for line in lines)


_DECODE = ".decode(@)"  # header bytes to text; L{_Source.function} writes the decoding it stands for
_INT_FIELDS = {"RESPONSE_CODE": "status", "BYTES_RECEIVED": "bytesReceived", "BYTES_SENT": "bytesSent"}
_PROTOCOLS_JSON = MappingProxyType({k: encode_basestring_ascii(v) for k, v in _PROTOCOLS.items()})
_PROTOCOLS_DATA = MappingProxyType({k: v.encode("ascii") for k, v in _PROTOCOLS.items()})


#: One %-slot of a render function: its text expression (header bytes marked with L{_DECODE}), the
#: expression of the same value for the bytes template, and that slot's conversion there (C{%s} for bytes,
#: C{%d} for an int).
_Slot = Tuple[str, str, str]


_HEADER_OPERATORS = ("REQ", "RESP", "REQUEST_ID")  # the operators whose value is a header's (or a field's)


def _pieceSources(piece: _Piece) -> List[Tuple[str, str]]:
    """
    Where a C{%REQ%}, C{%RESP%} or C{%REQUEST_ID%} piece reads its value: L{_headerNames}'s sources.
    """
    name = piece.op.name
    return _headerNames(name, "X-REQUEST-ID" if name == "REQUEST_ID" else piece.arg or "",
                        "response" if name == "RESP" else "request")


def _inlineCode(piece: _Piece, src: _Source) -> Optional[List[_Slot]]:
    """
    The slots (after statements added to C{src.lines}) that render C{piece} exactly as its getter does,
    for the operators common enough to be worth it; C{None} for the others, whose getter is called. Most
    take one slot; the default C{%START_TIME%} takes three (its text around the milliseconds).
    Every value here reads the same attributes, with the same rules, as the getter it replaces (the tests
    render each operator both ways). The bytes expressions are used by a text format's fast path only,
    which falls back on the text ones for a line that is not ASCII (see L{_Source.function}).
    """
    op, maxLen, json = piece.op, piece.maxLen, piece.json
    name = op.name
    if name in _HEADER_OPERATORS:
        sources = _pieceSources(piece)
        # Each source as an expression that is None when unset (an empty field is unset; an empty header
        # is set, and logs as unset text).
        exprs = []
        for where, key in sources:
            if where == "field" and key != "status":
                exprs.append(f"(r.{key} or None)")
            elif where in ("request", "response"):
                exprs.append(src.header(where, key.encode("ascii")))
            else:
                return None  # trailers, :status: the getter
        cut = "" if maxLen is None else f"[:{maxLen}]"
        if json:  # present but empty is "", unset is null
            if len(exprs) == 1 and exprs[0][0] in "qp":
                var = exprs[0]
            else:
                var = src.temp()
                src.lines.append(f"{var} = {exprs[0]}")
                for fallback in exprs[1:]:
                    src.lines.append(f"if {var} is None:")
                    src.lines.append(f"    {var} = {fallback}")
            return [(f"('null' if {var} is None else _enc({var}{_DECODE}{cut}))", "", "")]
        # In text, unset and empty both log as "-": one expression, no temporaries. Bytes are cut as bytes:
        # a cut that differs from the text's leaves a byte past 0x7f, so the line renders the text way.
        value, mayBeEmpty = "b'-'", False
        for expr in reversed(exprs):
            if expr.endswith(" or None)"):  # a field: unset when empty, so `or` picks the next source
                value, mayBeEmpty = f"{expr[:-len('None)')]}{value})", False
            elif value == "b'-'":  # the last source, a header
                value, mayBeEmpty = f"({expr} or b'-')", False
            else:  # a header: the first value if there is one, even an empty one
                value, mayBeEmpty = f"({expr} if {expr} is not None else {value})", True
        if mayBeEmpty:
            value = f"({value} or b'-')"
        return [(f"{value}{_DECODE}{cut}", f"{value}{cut}", "%s")]
    if name == "START_TIME":
        fmt = _TimeFormat(piece.arg or _DEFAULT_TIME)
        time = src.const(fmt)
        if fmt.millisOnly:
            second, micros = src.temp(), src.temp()
            src.lines.append(f"{second}, {micros} = divmod(round(r.startTime * 1000000), 1000000)")
            src.lines.append(f"if {second} != {time}.second:")
            src.lines.append(f"    {time}.advance({second})")
            if not json:  # three slots of the template: no intermediate strings
                return [(f"{time}.head", f"{time}.headData", "%s"),
                        (f"{src.const(_MILLIS)}[{micros} // 1000]", f"{src.const(_MILLIS_DATA)}[{micros} // 1000]",
                         "%s"),
                        (f"{time}.tail", f"{time}.tailData", "%s")]
            text = f"{time}.head + {src.const(_MILLIS)}[{micros} // 1000] + {time}.tail"
        else:
            text = f"{time}(r.startTime)"
        return [(f"_enc({text})", "", "")] if json else [(text, f"{text}.encode()", "%s")]
    if name == "DURATION":
        expr = "(round((e - r.startTime) * 1000000) // 1000)"
        return [(expr, expr, "%d")]
    if name in _INT_FIELDS:
        attr = _INT_FIELDS[name]
        if json:
            return [(f"('null' if r.{attr} is None else r.{attr})", "", "")]
        # %s is str(); %d would print a bool as 1 and a float cut: only an int goes in, anything else
        # becomes None, which %d refuses, and the line renders the text way.
        return [(f"r.{attr}", f"(r.{attr} if r.{attr}.__class__ is int else None)", "%d")]
    if name == "PROTOCOL":
        # Copies as plain dicts: a read-only mapping's .get is looked up the slow way on every call.
        getter = src.const(piece.getter)
        if json:
            return [(f"({src.const(dict(_PROTOCOLS_JSON))}.get(r.version) or {getter}(r, e))", "", "")]
        return [(f"({src.const(dict(_PROTOCOLS))}.get(r.version) or {getter}(r, e))",
                 f"({src.const(dict(_PROTOCOLS_DATA))}.get(r.version) or {getter}(r, e).encode())", "%s")]
    if name == "RESPONSE_FLAGS":
        join = src.const(",".join)
        if json:
            var = src.temp()
            src.lines.append(f"{var} = {join}(r.responseFlags)")
            return [(f"(_enc({var}) if {var} else 'null')", "", "")]
        return [(f"({join}(r.responseFlags) or '-')",
                 f"(b'-' if not r.responseFlags else ({join}(r.responseFlags).encode() or b'-'))", "%s")]
    if name == "UPSTREAM_HOST":
        cache, address = _hostAddresses()
        host = src.temp()
        src.lines.append(f"{host} = r.upstreamHost")
        both = f"({src.const(cache)}.get({host}.endpoint) or {src.const(address)}({host}.endpoint))"
        if json:
            return [(f"('null' if {host} is None else _enc({both}[0]))", "", "")]
        return [(f"('-' if {host} is None else ({both}[0] or '-'))",
                 f"(b'-' if {host} is None else ({both}[1] or b'-'))", "%s")]
    return None


def _hostAddresses() -> Tuple[Dict[str, Tuple[str, bytes]], Callable[[str], Tuple[str, bytes]]]:
    """
    C{%UPSTREAM_HOST%}'s cache, endpoint string -> (text, bytes) of its address, and the function that
    fills it: hosts are few and their endpoints never change.
    """
    cache: Dict[str, Tuple[str, bytes]] = {}

    def address(endpoint: str) -> Tuple[str, bytes]:
        text = _endpointAddress(endpoint)
        both = (text, text.encode("utf-8", "backslashreplace"))
        if len(cache) < 4096:  # dynamic hosts come and go: stay bounded
            cache[endpoint] = both
        return both
    return cache, address


def _nativeOp(piece: _Piece, request: Dict[bytes, int], response: Dict[bytes, int]) -> tuple:
    """
    C{piece} as an op of the C renderer (see _linefmt.c for what each does), with the same rules as the
    slots of L{_inlineCode}; header names get slots in C{request} / C{response}. Operators without an op of
    their own call their getter.
    """
    op, maxLen = piece.op, piece.maxLen
    name = op.name
    if name in _HEADER_OPERATORS:
        sources = []
        for where, key in _pieceSources(piece):
            if where == "field" and key != "status":
                sources.append(("field", key))
            elif where in ("request", "response"):
                table = request if where == "request" else response
                sources.append((where, table.setdefault(key.encode("ascii"), len(table))))
            else:
                return ("call", piece.getter)  # trailers, :status
        return ("value", tuple(sources), maxLen)
    if name == "START_TIME":
        fmt = _TimeFormat(piece.arg or _DEFAULT_TIME)
        return ("time", fmt, _MILLIS_DATA) if fmt.millisOnly else ("call", fmt.ofRecord)
    if name == "DURATION":
        return ("duration",)
    if name in _INT_FIELDS:
        return ("int", _INT_FIELDS[name])
    if name == "PROTOCOL":
        return ("protocol", dict(_PROTOCOLS_DATA), piece.getter)
    if name == "RESPONSE_FLAGS":
        return ("flags", ",".join)
    if name == "UPSTREAM_HOST":
        return ("host",) + _hostAddresses()
    return ("call", piece.getter)


def _nativeRender(segments: Sequence[Union[str, Getter, _Piece]],
                  render: Callable[[Any, float], bytes]) -> Optional[Callable]:
    """
    The C renderer of a text format (C{segments}: literals, pieces, getters; C{render} its Python render,
    which renders what the C one does not expect), or C{None} where it is not built or the format is
    beyond it: then the Python render is used.
    """
    if _linefmt is None:
        return None
    request: Dict[bytes, int] = {}
    response: Dict[bytes, int] = {}
    ops = []
    for s in segments:
        if isinstance(s, str):
            ops.append(("lit", s.encode("ascii")))
        elif isinstance(s, _Piece):
            ops.append(_nativeOp(s, request, response))
        else:
            ops.append(("call", s))
    try:
        return _linefmt.Format(tuple(ops), tuple(request), tuple(response), render)
    except ValueError:  # more operators, or header names, than it takes
        return None


class CompiledFormat:
    """
    A compiled format. C{segments} is a tuple of literal strings and getters (C{(record, endTime) -> str}).
    C{render(record, endTime)} gives one line as the bytes to write, newline included; C{text(record,
    endTime)} the same line as text. Both are functions written for this format when it is compiled: they
    scan the request (and response) headers once for every header the format names, compute the common
    operators in place, call the getters of the others, and pour the results into one %-template.
    C{source} is their text. Where the C renderer is built, a text format's C{render} is that instead, and
    C{pythonRender} the Python function it stands in for (the same object otherwise).
    """

    __slots__ = ("segments", "render", "text", "source", "pythonRender")

    def __init__(self, segments: Sequence[Union[str, Getter, _Piece]]) -> None:
        merged: List[Union[str, Getter, _Piece]] = []
        for s in segments:
            if isinstance(s, str) and merged and isinstance(merged[-1], str):
                merged[-1] += s
            elif not (isinstance(s, str) and not s):
                merged.append(s)
        self.segments = tuple(s.getter if isinstance(s, _Piece) else s for s in merged)
        src = _Source()
        json = any(isinstance(s, _Piece) and s.json for s in merged)
        literals: List[str] = [""]
        slots: List[_Slot] = []
        for s in merged:
            if isinstance(s, str):
                literals[-1] += s
                continue
            inline = _inlineCode(s, src) if isinstance(s, _Piece) else None
            if inline is None:
                call = "%s(r, e)" % src.const(s.getter if isinstance(s, _Piece) else s)
                inline = [(call, f"{call}.encode()", "%s")]
            for slot in inline:
                slots.append(slot)
                literals.append("")
        self.text, self.render, self.source = src.function(slots, literals, json)
        self.pythonRender = self.render
        if not json and slots and "".join(literals).isascii():
            native = _nativeRender(merged, self.render)
            if native is not None:
                self.render = native


def _suggestOperator(name: str) -> str:
    """
    A "did you mean" clause for an unknown operator name.
    """
    close = difflib.get_close_matches(name, list(OPERATORS), n=1, cutoff=0.6)
    return f" (did you mean %{close[0]}%?)" if close else ""


def _parse(text: str) -> List[Union[str, Tuple[_Operator, Optional[str], Optional[int], str]]]:
    """
    C{text} as literal strings and C{(operator, arg, maxLen, source)} tuples, every operator checked.
    """
    out: List[Union[str, Tuple[_Operator, Optional[str], Optional[int], str]]] = []
    pos, n = 0, len(text)
    while pos < n:
        i = text.find("%", pos)
        if i < 0:
            out.append(text[pos:])
            break
        if i > pos:
            out.append(text[pos:i])
        if text.startswith("%%", i):
            out.append("%")
            pos = i + 2
            continue
        match = _OPERATOR.match(text, i)
        if match is None:
            raise FormatError(f"the % at position {i} starts no command operator: write %NAME%, "
                              f"%NAME(ARG)% or %NAME(ARG):LENGTH%, or %% for a literal %")
        name, arg, maxLen = match.group(1), match.group(2), match.group(3)
        op = OPERATORS.get(name)
        if op is None:
            raise FormatError(f"unknown command operator %{name}%{_suggestOperator(name)}")
        if op.arg == "none" and arg is not None:
            raise FormatError(f"%{name}% takes no argument")
        if op.arg == "required" and not arg:
            raise FormatError(f"%{name}% needs an argument: %{name}(HEADER)%")
        if maxLen is not None and not op.truncates:
            raise FormatError(f"%{name}% takes no :LENGTH")
        limit = int(maxLen) if maxLen is not None else None
        if limit == 0:
            raise FormatError(f"{match.group(0)}: a length of 0 would always log nothing")
        out.append((op, arg, limit, match.group(0)))
        pos = match.end()
    return out


def _textGetter(op: _Operator, arg: Optional[str], maxLen: Optional[int], protocol: str) -> Union[str, Getter]:
    """
    The text getter of one operator, or a literal when it is constant for C{protocol}.
    """
    if op.httpOnly and protocol == "tcp":
        # Envoy logs these as "-" for TCP (the response code as 0): a literal, folded at compile time.
        return _MISSING if op.tcpConstant is None else str(op.tcpConstant)
    if op.text is not None:
        return op.text(arg, maxLen)
    value = op.value(arg, maxLen)
    if op.kind == "int":
        def number(r: Any, e: float) -> str:
            v = value(r, e)
            return _MISSING if v is None else str(v)
        return number
    return lambda r, e: value(r, e) or _MISSING


def _textPiece(item: Tuple[_Operator, Optional[str], Optional[int], str], protocol: str) -> Union[str, _Piece]:
    """
    A parsed operator of a text format as a L{_Piece}, or a literal when it is constant for C{protocol}.
    """
    op, arg, maxLen, _ = item
    getter = _textGetter(op, arg, maxLen, protocol)
    return getter if isinstance(getter, str) else _Piece(getter, op, arg, maxLen, False)


def _jsonGetter(op: _Operator, arg: Optional[str], maxLen: Optional[int], protocol: str) -> Union[str, Getter]:
    """
    A getter of the value as a JSON fragment: a number, a string, or C{null} when unset (Envoy's typed JSON).
    """
    if op.httpOnly and protocol == "tcp":
        return "null" if op.tcpConstant is None else str(op.tcpConstant)
    value = op.value(arg, maxLen)
    if op.kind == "int":
        def number(r: Any, e: float) -> str:
            v = value(r, e)
            return "null" if v is None else str(v)
        return number

    def string(r: Any, e: float) -> str:
        v = value(r, e)
        return "null" if v is None else encode_basestring_ascii(v)
    return string


def _checkProtocol(protocol: str) -> None:
    """
    Reject a protocol other than C{http} and C{tcp} (a programming error).
    """
    if protocol not in ("http", "tcp"):
        raise ValueError(f"protocol is http or tcp, not {protocol!r}")


def compileFormat(text: str, protocol: str = "http") -> CompiledFormat:
    """
    Compile an Envoy text format. A trailing newline is optional: every line ends with one.

    @param protocol: C{"http"}, or C{"tcp"} for a TCP listener's lines, where HTTP-only operators (C{REQ},
        C{RESP}, C{PROTOCOL}, ...) render C{-} and C{%RESPONSE_CODE%} renders C{0}, as in Envoy.
    @raise FormatError: for an unknown operator, a bad argument or a stray C{%}.
    """
    _checkProtocol(protocol)
    if text.endswith("\n"):
        text = text[:-1]
    segments: List[Union[str, Getter, _Piece]] = []
    for item in _parse(text):
        segments.append(item if isinstance(item, str) else _textPiece(item, protocol))
    segments.append("\n")
    return CompiledFormat(segments)


def compileJSONFormat(fields: Sequence[Tuple[str, str]], protocol: str = "http") -> CompiledFormat:
    """
    Compile C{(key, template)} pairs into a format whose lines are JSON objects, keys in the given order.
    A template that is exactly one operator has a typed value (numbers are numbers, unset is C{null});
    any other template is rendered as text (unset operators as C{-}) into a JSON string.

    @raise FormatError: as L{compileFormat}, naming the key; or for an empty or repeated key.
    """
    _checkProtocol(protocol)
    segments: List[Union[str, Getter, _Piece]] = ["{"]
    seen = set()
    for index, (key, template) in enumerate(fields):
        if not key:
            raise FormatError("a JSON field needs a name: write NAME = %OPERATOR%")
        if key in seen:
            raise FormatError(f"JSON field {key!r} is given twice")
        seen.add(key)
        try:
            items = _parse(template)
        except FormatError as e:
            raise FormatError(f"JSON field {key!r}: {e}") from None
        segments.append(("," if index else "") + encode_basestring_ascii(key) + ":")
        if len(items) == 1 and not isinstance(items[0], str):
            op, arg, maxLen, _ = items[0]
            getter = _jsonGetter(op, arg, maxLen, protocol)
            segments.append(getter if isinstance(getter, str) else _Piece(getter, op, arg, maxLen, True))
        elif all(isinstance(i, str) for i in items):
            segments.append(encode_basestring_ascii("".join(items)))  # type: ignore[arg-type]
        else:
            inner = CompiledFormat([i if isinstance(i, str) else _textPiece(i, protocol) for i in items])
            segments.append(lambda r, e, text=inner.text: encode_basestring_ascii(text(r, e)))
    segments.append("}\n")
    return CompiledFormat(segments)


# -- filters ---------------------------------------------------------------------------------------------------

_STATUS_CONDITION = re.compile(r"^(?:([1-5])xx|(>=|<=|!=|>|<|=)?\s*([0-9]{1,3}))$")


def parseStatusCondition(text: str) -> FrozenSet[int]:
    """
    The status codes (0..999) one C{access_log.status} item selects: C{5xx}, C{>=400}, C{<300}, C{=0}
    (no response was sent), C{!=200}, or a bare code such as C{404}.

    @raise ValueError: with a message for a user.
    """
    match = _STATUS_CONDITION.match(text.strip().lower())
    if match is None:
        raise ValueError(f"{text!r} is not a status condition (write e.g. 5xx, >=400, <300, 404)")
    klass, op, number = match.groups()
    if klass is not None:
        base = int(klass) * 100
        return frozenset(range(base, base + 100))
    value = int(number)
    tests = {
        None: lambda s: s == value, "=": lambda s: s == value, "!=": lambda s: s != value,
        ">=": lambda s: s >= value, "<=": lambda s: s <= value, ">": lambda s: s > value, "<": lambda s: s < value,
    }
    test = tests[op]
    return frozenset(s for s in range(1000) if test(s))


def statusCodes(conditions: Sequence[str]) -> FrozenSet[int]:
    """
    The union of what each condition selects (a line is logged when any condition holds).
    """
    codes: FrozenSet[int] = frozenset()
    for condition in conditions:
        codes |= parseStatusCondition(condition)
    return codes


# -- sinks -----------------------------------------------------------------------------------------------------


class IAccessLogSink(Interface):
    """
    Where access log lines go. C{write} is on the hot path and must not block; the others return
    L{Deferred}s that never fail (problems are logged and counted).
    """

    def write(line: bytes) -> None:
        """
        Queue one line (UTF-8, newline included).
        """

    def flush() -> Deferred:
        """
        Write everything queued so far.

        @return: a L{Deferred} that fires with C{None} once it is written.
        """

    def reopen() -> Deferred:
        """
        Close and reopen the file (after logrotate renamed it); lines queued before go to the old file.

        @return: a L{Deferred} that fires with C{None} once the new file is open.
        """

    def close() -> Deferred:
        """
        Flush and close; later lines are dropped and counted.

        @return: a L{Deferred} that fires with C{None} once everything is written and the file closed.
        """


@implementer(IAccessLogSink)
class MemorySink:
    """
    Keeps the lines written (bytes, as a file would get them) in C{lines}, for tests.

    @ivar reopens: how many times L{reopen} was called.
    @ivar closed: whether L{close} was called.
    """

    def __init__(self) -> None:
        self.lines: List[bytes] = []
        self.reopens = 0
        self.closed = False

    def write(self, line: bytes) -> None:
        """
        Keep C{line}.
        """
        self.lines.append(line)

    def flush(self) -> Deferred:
        """
        Nothing to do: already fired.
        """
        return succeed(None)

    def reopen(self) -> Deferred:
        """
        Count the reopen.
        """
        self.reopens += 1
        return succeed(None)

    def close(self) -> Deferred:
        """
        Mark the sink closed.
        """
        self.closed = True
        return succeed(None)


class _Batch:
    """
    One hand-off to the writer thread: lines to write (possibly none), then an optional control action
    (C{"flush"}, C{"reopen"}, C{"close"}) whose L{Deferred} fires on the reactor thread when it is done.
    """

    __slots__ = ("lines", "action", "done")

    def __init__(self, lines: Optional[List[bytes]], action: Optional[str], done: Optional[Deferred]) -> None:
        self.lines = lines
        self.action = action
        self.done = done


def _writeAll(fd: int, data: bytes) -> None:
    """
    Write all of C{data} to C{fd} (from the writer thread): a pipe may take it in parts, and a stdout left
    non-blocking by someone else may refuse for a moment.
    """
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [], 1.0)
            continue
        view = view[written:]


@implementer(IAccessLogSink)
class FileSink:
    """
    Appends lines to a file (or to stdout / stderr) without blocking the reactor.

    L{write} appends to a list. The list is handed to a single writer thread when the flush timer fires
    (C{flushInterval} after the first line of a batch, on the injected clock) or when it holds C{batchLines}
    lines. One thread of our own rather than the reactor's thread pool: the pool may run two hand-offs at
    once, out of order, and it is shared with DNS and other work that a stalled disk must not starve.

    The writer's backlog is bounded: when the lines handed off and not yet written would exceed
    C{maxQueuedLines}, the new batch is dropped and its lines counted in C{dropped} (as they are when a
    write fails, or when lines arrive after L{close}). Control actions (flush, reopen, close) are never
    dropped. The file is opened here, once, so that a bad path fails at startup; the thread starts with the
    first hand-off (after C{twistd} has forked, which threads do not survive).

    @ivar target: the path, C{"stdout"} or C{"stderr"}.
    @ivar dropped: the C{access_log.dropped} counter.
    """

    log = Logger()

    def __init__(self, target: str, clock: IReactorTime, reactor: IReactorFromThreads, flushInterval: float = 1.0,
                 dropped: Optional[Counter] = None, batchLines: int = 1024, maxQueuedLines: int = 65536) -> None:
        """
        @param target: a file path (created if missing, appended to), C{"stdout"} or C{"stderr"}.
        @param clock: runs the flush timer.
        @param reactor: the writer thread reports back through its C{callFromThread}.
        @param flushInterval: at most how long a line waits in memory, in seconds.
        @param dropped: the counter of dropped lines (a private one if C{None}).
        @param batchLines: hand off as soon as this many lines wait, whatever the timer.
        @param maxQueuedLines: the bound on lines handed off but not yet written.
        @raise OSError: when the file cannot be opened.
        """
        self.target = target
        self.clock = clock
        self.reactor = reactor
        self.flushInterval = flushInterval
        self.batchLines = batchLines
        self.maxQueuedLines = maxQueuedLines
        self.dropped = dropped if dropped is not None else Counter("access_log.dropped", "access_log_dropped", ())
        if target in ("stdout", "stderr"):
            self._fd = 1 if target == "stdout" else 2
            self._owned = False
        else:
            self._fd = self._open()
            self._owned = True
        self._pending: List[bytes] = []
        self._queued = 0  # lines handed to the writer, not yet reported written (reactor thread only)
        # Unbounded as a structure; the bound is _queued, checked before every data hand-off, so that a
        # control action can always be queued without blocking or dropping it.
        self._queue: "queue.SimpleQueue[_Batch]" = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._timer = None
        self._closed = False
        self._closeWaiters: List[Deferred] = []

    @property
    def pending(self) -> int:
        """
        How many lines wait in memory for the next hand-off.
        """
        return len(self._pending)

    @property
    def queued(self) -> int:
        """
        How many lines were handed to the writer and are not yet reported written.
        """
        return self._queued

    def _open(self) -> int:
        """
        Open the target for appending (created C{0644} if missing).
        """
        return os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    # -- reactor thread

    def write(self, line: bytes) -> None:
        """
        Queue C{line}; it reaches the file within C{flushInterval}.
        """
        pending = self._pending
        pending.append(line)
        n = len(pending)
        # The first line of a batch arms the timer (it stays armed while lines wait), a full batch goes.
        if n == 1 or n >= self.batchLines:
            self._appended()

    def logFunction(self, render: Callable[[Any, float], bytes],
                    failed: Callable[[Any], None]) -> Callable[[Any, float], None]:
        """
        A function C{log(record, endTime)} that renders a line with C{render} and queues it as L{write}
        does, in one call: an access logger without filters uses it as its C{log}, which spares each request
        the logger's call into L{write}. When C{render} raises, C{failed(record)} is called instead.
        """
        pending = self._pending
        batchLines = self.batchLines
        appended = self._appended

        def log(record: Any, endTime: float) -> None:
            try:
                line = render(record, endTime)
            except Exception:
                failed(record)
                return
            pending.append(line)
            n = len(pending)
            if n == 1 or n >= batchLines:  # the first line of a batch (the timer), or a full batch
                appended()
        return log

    def _appended(self) -> None:
        """
        After L{write}, or a L{logFunction} logger, queued the first line of a batch or filled one: drop the
        lines if the sink is closed, hand off a full batch, arm the flush timer.
        """
        pending = self._pending
        if self._closed:
            self.dropped.value += len(pending)
            pending.clear()
        elif len(pending) >= self.batchLines:
            self._handOff(None, None)
        elif self._timer is None:
            self._timer = self.clock.callLater(self.flushInterval, self._tick)

    def _tick(self) -> None:
        """
        The flush timer: hand off what is pending.
        """
        self._timer = None
        if self._pending:
            self._handOff(None, None)

    def flush(self) -> Deferred:
        """
        See L{IAccessLogSink.flush}.
        """
        if self._closed:
            return self._whenClosed()
        d: Deferred = Deferred()
        self._handOff("flush", d)
        return d

    def reopen(self) -> Deferred:
        """
        See L{IAccessLogSink.reopen}. For stdout and stderr there is nothing to reopen.
        """
        if self._closed:
            return self._whenClosed()
        d: Deferred = Deferred()
        self._handOff("reopen", d)
        return d

    def close(self) -> Deferred:
        """
        See L{IAccessLogSink.close}. The writer thread ends once it has closed the file.
        """
        if self._closed:
            return self._whenClosed()
        self._closed = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        d = self._whenClosed()
        self._handOff("close", None)
        return d

    def _whenClosed(self) -> Deferred:
        """
        A L{Deferred} that fires once the close is done (at once if it is).
        """
        d: Deferred = Deferred()
        if self._closeWaiters is None:
            d.callback(None)
        else:
            self._closeWaiters.append(d)
        return d

    def _handOff(self, action: Optional[str], done: Optional[Deferred]) -> None:
        """
        Give the pending lines (if the backlog allows) and C{action} to the writer thread.
        """
        pending = self._pending
        lines: Optional[List[bytes]] = None
        if pending:
            # The list itself stays: a logger made by logFunction() appends to it.
            lines = pending.copy()
            pending.clear()
            count = len(lines)
            if self._queued + count > self.maxQueuedLines:
                # The writer is behind (a stalled disk, a blocked pipe): losing log lines beats growing
                # without bound or blocking the proxy.
                self.dropped.value += count
                lines = None
            else:
                self._queued += count
        if lines is None and action is None:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"access log {self.target}", daemon=True)
            self._thread.start()
        self._queue.put(_Batch(lines, action, done))

    def _reported(self, written: int, failed: int, action: Optional[str], done: Optional[Deferred],
                  error: Optional[BaseException]) -> None:
        """
        The writer finished a batch (called on the reactor thread).
        """
        self._queued -= written + failed
        if failed:
            self.dropped.value += failed
        if error is not None:
            self.log.error("access log {target}: {error}", target=self.target, error=error)
        if done is not None:
            done.callback(None)
        if action == "close":
            waiters, self._closeWaiters = self._closeWaiters, None
            for d in waiters:
                d.callback(None)

    # -- writer thread

    def _run(self) -> None:
        """
        The writer thread: write batches in order, do their actions, report each back to the reactor.
        """
        get = self._queue.get
        report = self.reactor.callFromThread
        while True:
            batch = get()
            written = failed = 0
            error: Optional[BaseException] = None
            if batch.lines:
                try:
                    _writeAll(self._fd, b"".join(batch.lines))
                    written = len(batch.lines)
                except Exception as e:
                    # Not only OSError: whatever goes wrong, the thread must live on and report, or every
                    # later flush and close would wait forever.
                    failed, error = len(batch.lines), e
            action = batch.action
            try:
                if action == "reopen" and self._owned:
                    fd = self._open()  # open first: if it fails, keep logging to the old file
                    os.close(self._fd)
                    self._fd = fd
                elif action == "close" and self._owned:
                    os.close(self._fd)
            except OSError as e:
                error = e
            report(self._reported, written, failed, action, batch.done, error)
            if action == "close":
                return


def openSink(target: str, clock: IReactorTime, reactor: IReactorFromThreads, flushInterval: float = 1.0,
             dropped: Optional[Counter] = None) -> IAccessLogSink:
    """
    The sink of an C{access_log = PATH | stdout | stderr} setting.

    @raise OSError: when the file cannot be opened.
    """
    return FileSink(target, clock, reactor, flushInterval, dropped)


class AccessLogSinks:
    """
    The sinks of one service, one per target, so that two listeners logging to the same file share one
    writer (and one file offset) instead of interleaving two. Owned by the service, not global.
    """

    def __init__(self, clock: IReactorTime, reactor: IReactorFromThreads, dropped: Optional[Counter] = None) -> None:
        """
        @param dropped: the C{access_log.dropped} counter all sinks count into.
        """
        self.clock = clock
        self.reactor = reactor
        self.dropped = dropped
        self._sinks: Dict[str, IAccessLogSink] = {}

    def get(self, target: str, flushInterval: float = 1.0) -> IAccessLogSink:
        """
        The sink for C{target}, opened on first use; a shared sink flushes at the shortest interval asked.

        @raise OSError: when the file cannot be opened.
        """
        sink = self._sinks.get(target)
        if sink is None:
            sink = self._sinks[target] = openSink(target, self.clock, self.reactor, flushInterval, self.dropped)
        elif isinstance(sink, FileSink):
            sink.flushInterval = min(sink.flushInterval, flushInterval)
        return sink

    def reopen(self) -> Deferred:
        """
        Reopen every file (wire this to SIGUSR1 for logrotate).

        @return: a L{Deferred} that fires when all are reopened.
        """
        return DeferredList([s.reopen() for s in self._sinks.values()])

    def close(self) -> Deferred:
        """
        Flush and close every sink (at shutdown, after draining).

        @return: a L{Deferred} that fires when everything is written.
        """
        return DeferredList([s.close() for s in self._sinks.values()])


# -- the logger ------------------------------------------------------------------------------------------------


class AccessLogger:
    """
    One listener's access log: L{log} for each finished HTTP stream, L{logTCP} for each closed TCP connection.

    @ivar config: the L{twistedmesh.config.accesslog.AccessLogConfig}.
    @ivar sink: where lines go.
    """

    # Not `log`, the project's usual name: that is the hot-path method here.
    logger = Logger()

    def __init__(self, config: Any, clock: IReactorTime, reactor: IReactorFromThreads,
                 sink: Optional[IAccessLogSink] = None, dropped: Optional[Counter] = None) -> None:
        """
        Compile the format and filters of C{config} once.

        @param config: an L{twistedmesh.config.accesslog.AccessLogConfig}.
        @param sink: where to write (a shared one from L{AccessLogSinks}, a L{MemorySink}); if C{None}, the
            logger opens its own from C{config.path} and L{close} closes it.
        @param dropped: the C{access_log.dropped} counter, for a sink the logger opens.
        @raise FormatError: for a bad format (the config parser reports these first).
        @raise OSError: when the log file cannot be opened.
        """
        self.config = config
        if config.json:
            fields = config.json_format or DEFAULT_JSON_FORMAT
            self._http = compileJSONFormat(fields, "http")
            self._tcp = compileJSONFormat(fields, "tcp")
        else:
            fmt = config.format or DEFAULT_FORMAT
            self._http = compileFormat(fmt, "http")
            self._tcp = compileFormat(fmt, "tcp")
        self._renderHTTP = self._http.render
        self._renderTCP = self._tcp.render
        self._statuses: Optional[FrozenSet[int]] = statusCodes(config.status) if config.status else None
        self._minMs: int = round(config.duration_min * 1000) if config.duration_min else 0
        flags = tuple(config.flags)
        self._anyFlag = "any" in flags
        self._flags: Optional[FrozenSet[str]] = frozenset(flags) if flags and not self._anyFlag else None
        self._filtered = bool(self._minMs or flags)  # any filter besides status
        self._ownsSink = sink is None
        self.sink = sink if sink is not None else openSink(config.path, clock, reactor, config.flush_interval, dropped)
        self._write = self.sink.write
        if self._statuses is None and not self._filtered and isinstance(self.sink, FileSink):
            # Nothing to filter: one call per request renders and queues (see FileSink.logFunction).
            self.log = self.sink.logFunction(self._renderHTTP, self._failed)  # type: ignore[method-assign]

    def _passes(self, record: Any, endTime: float) -> bool:
        """
        Whether C{record} passes the duration and flag filters.
        """
        # The filters, cheapest first; every configured one must pass.
        if self._minMs and round((endTime - record.startTime) * 1_000_000) // 1000 < self._minMs:
            return False
        if self._anyFlag:
            return bool(record.responseFlags)
        if self._flags is not None:
            return not self._flags.isdisjoint(record.responseFlags)
        return True

    def log(self, stream: Any, endTime: float) -> None:
        """
        Log a finished stream (call after C{stream.complete()}), unless a filter rejects it.

        @param stream: the L{twistedmesh.http.stream.Stream}.
        @param endTime: when it ended (the clock's C{seconds()}): the end of C{%DURATION%}.
        """
        statuses = self._statuses
        if statuses is not None and stream.status not in statuses:
            return
        if self._filtered and not self._passes(stream, endTime):
            return
        try:
            line = self._renderHTTP(stream, endTime)
        except Exception:
            self._failed(stream)
            return
        self._write(line)

    def _failed(self, record: Any) -> None:
        """
        Rendering C{record}'s line raised (called in the C{except} clause): log that, and lose the line only.
        """
        # A getter's bug must cost one line, not the connection it is called from.
        self.logger.failure("access log line for listener {listener} failed", listener=record.listener)

    def logTCP(self, record: TCPAccessRecord, endTime: float) -> None:
        """
        Log a closed TCP connection, unless a filter rejects it. The status filter does not apply to TCP
        (the config parser rejects it on a TCP listener).

        @param endTime: when the connection closed: the end of C{%DURATION%}.
        """
        if self._filtered and not self._passes(record, endTime):
            return
        try:
            line = self._renderTCP(record, endTime)
        except Exception:
            self._failed(record)
            return
        self._write(line)

    def flush(self) -> Deferred:
        """
        Flush the sink. @return: its L{Deferred}.
        """
        return self.sink.flush()

    def reopen(self) -> Deferred:
        """
        Reopen the sink's file. @return: its L{Deferred}.
        """
        return self.sink.reopen()

    def close(self) -> Deferred:
        """
        Close the sink if the logger opened it (a shared sink is closed by its L{AccessLogSinks}); flush it
        otherwise. @return: a L{Deferred} that fires when the lines are written.
        """
        return self.sink.close() if self._ownsSink else self.sink.flush()
