"""
Trace-context propagation: the proxy reads the incoming trace context (W3C C{traceparent}/C{tracestate},
B3 single C{b3}, or B3 multi C{x-b3-*}), makes its own span a child of the incoming one, decides sampling,
and rewrites the request's headers in place for the upstream.

Rules:
  - Precedence: a valid C{traceparent} wins; then a valid C{b3}; then valid C{x-b3-*}; then a B3
    sampling decision without ids (C{b3: 0}, a lone C{x-b3-sampled}); then nothing (a new trace).
  - The headers of the format that wins are rewritten in that format (our span id, the incoming span
    as parent); the other formats' headers are removed, so the upstream sees one consistent context.
  - A malformed header never raises: it is as if absent. When every present header is malformed, a new
    trace starts in the format of the first of them in precedence order (a bad C{traceparent} is
    replaced by a new one); when nothing came in, a new C{traceparent} is added (W3C is the default).
  - C{tracestate} is passed through unchanged (several fields are joined into one) with a valid
    C{traceparent} only, and at most 512 bytes of it are kept, whole list members only (W3C section
    3.3.1.5); without a valid C{traceparent} it is dropped, as the W3C spec requires.
  - Sampling: an incoming decision is honoured (W3C flag bit 0; B3 C{1}/C{0}/C{d}, C{x-b3-sampled},
    C{x-b3-flags: 1}); otherwise the trace id decides, as OpenTelemetry's TraceIdRatioBased sampler does:
    the trace is sampled when the number in its last 14 hex digits (56 bits, random in W3C's level 2 ids
    and in ours) is below C{sampleRate * 2**56}. Every proxy with the same rate decides the same for a
    trace, and the decision costs no draw.
  - Randomness comes from the injected C{random}: the span id alone (64 bits) when a trace came in; for a
    new trace, one 192-bit draw whose low 64 bits are the span id and high 128 the trace id (the same
    numbers as the span id's draw then the trace id's, in one call). When the caller also needs an
    C{x-request-id} (L{propagate}'s C{requestId=False}) and no trace came in, the same draw makes it: the
    trace id's bits become a version 4 UUID, whose 32 hex digits are the trace id, so that the access
    log's request id finds the trace.

Ids are lowercase hex bytes, as on the wire; a 64-bit B3 trace id stays 16 characters.

Spans: a listener's connection manager tells its L{SpanRecorder} of each finished stream whose trace is
sampled (it checks the decision itself, beside its call to the access logger); the recorder makes one
L{Span}, the proxy's ingress span (kind SERVER) whose id is the parent id sent upstream, tagged as Envoy
tags its spans, and hands it to an exporter (L{twistedmesh.observability.export}).

Where the install built it, C{_traceids.c} writes the ids' text (L{newRequestId}, a new trace in
L{propagate}): the same bytes from the same draws. It refuses a draw wider than asked for (a C{random}
whose C{getrandbits(k)} returns more than k bits), which no real generator gives.
"""

from __future__ import annotations

from binascii import hexlify as _hexlify
from typing import Any, Dict, List, Optional, Tuple

from twisted.logger import Logger

from .accesslog import _PROTOCOLS, _addressText, _endpointAddress
from .native import load as _loadNative

_traceids = _loadNative("_traceids")  # ids written in C, where it is built: the same bytes as below
# (A stale build without one of them falls back to Python rather than failing the import.)
_requestIdOf = getattr(_traceids, "requestId", None)
_startTrace = getattr(_traceids, "startTrace", None)

Headers = List[Tuple[bytes, bytes]]

TRACEPARENT = b"traceparent"
TRACESTATE = b"tracestate"
B3 = b"b3"
X_B3_TRACEID = b"x-b3-traceid"
X_B3_SPANID = b"x-b3-spanid"
X_B3_PARENTSPANID = b"x-b3-parentspanid"
X_B3_SAMPLED = b"x-b3-sampled"
X_B3_FLAGS = b"x-b3-flags"

FORMAT_W3C = "w3c"
FORMAT_B3 = "b3"
FORMAT_B3_MULTI = "b3multi"

TRACESTATE_MAX = 512

# Every field that carries a trace context; a caller that looks at each name anyway can tell propagate()
# that none came in.
TRACE_FIELDS = frozenset((TRACEPARENT, TRACESTATE, B3, X_B3_TRACEID, X_B3_SPANID, X_B3_PARENTSPANID, X_B3_SAMPLED,
                          X_B3_FLAGS))
_NAMES = TRACE_FIELDS
_MULTI = (X_B3_TRACEID, X_B3_SPANID, X_B3_PARENTSPANID, X_B3_SAMPLED, X_B3_FLAGS)
_HEX = b"0123456789abcdef"
_HEX_DASH = b"0123456789abcdef-"
_ODD = b"13579bdf"  # last hex digit of a flags byte with bit 0 (sampled) set
_ZERO16 = b"0" * 16
_ZERO32 = b"0" * 32
_SPAN_RANGE = 1 << 64  # a new trace's 192-bit draw below this has an all-zero trace id
_SPAN_MASK = _SPAN_RANGE - 1  # its span id's bits
# A version 4 UUID's fixed bits (the version nibble 4, the variant 0b10), placed in the trace-id part of a
# 192-bit draw: the trace id that is also an x-request-id. Its version bits make it never all zero.
_UUID_RANDOM = ((1 << 128) - 1) ^ (0xF << 76) ^ (0x3 << 62)
_UUID_V4 = (0x4 << 76) | (0x2 << 62)
_DRAW_AS_UUID = (_UUID_RANDOM << 64) | _SPAN_MASK
_DRAW_UUID_BITS = _UUID_V4 << 64
_RATIO_BITS = (1 << 56) - 1  # the trace id's bits that decide sampling (its last 14 hex digits)
_RATIO_SCALE = float(1 << 56)
X_REQUEST_ID = b"x-request-id"
_TRACEPARENT_SAMPLED = b"00-%s-01"  # % b"<trace id>-<span id>"
_TRACEPARENT_UNSAMPLED = b"00-%s-00"
_DASH = 45  # ord("-")
_B3_SAMPLING = {b"1": True, b"0": False, b"d": True}
_MULTI_SAMPLED = {b"1": True, b"0": False, b"true": True, b"false": False}


class TraceContext:
    """
    One request's trace context. After L{propagate}: C{spanId} is the proxy's span, C{parentId} the
    incoming span (None for a new trace), C{sampled} the decision, C{format} the one written upstream
    (C{FORMAT_W3C}, C{FORMAT_B3} or C{FORMAT_B3_MULTI}), C{debug} the B3 debug flag. As returned by the
    C{parse*} functions, it is the sender's context: C{spanId} the sender's span, C{parentId} its parent
    when stated, C{sampled} None when no decision was stated.
    """

    __slots__ = ("traceId", "spanId", "parentId", "sampled", "format", "debug")

    def __init__(self, traceId: bytes, spanId: bytes, parentId: Optional[bytes], sampled: Optional[bool],
                 format: str, debug: bool = False) -> None:
        self.traceId = traceId
        self.spanId = spanId
        self.parentId = parentId
        self.sampled = sampled
        self.format = format
        self.debug = debug

    def __repr__(self) -> str:
        return (f"TraceContext(traceId={self.traceId!r}, spanId={self.spanId!r}, parentId={self.parentId!r}, "
                f"sampled={self.sampled!r}, format={self.format!r}, debug={self.debug!r})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TraceContext):
            return NotImplemented
        return (self.traceId == other.traceId and self.spanId == other.spanId and self.parentId == other.parentId
                and self.sampled == other.sampled and self.format == other.format and self.debug == other.debug)

    __hash__ = None  # type: ignore[assignment]


class _NewTraceContext(TraceContext):
    """
    The context L{propagate} gives a request that brought no trace field, most requests: a new W3C trace,
    no parent, not debug. Only C{sampled} and C{ids} (b"<trace id>-<span id>", as in the traceparent sent)
    are stored; C{traceId} and C{spanId} are cut out of C{ids} when read, as only a sampled request's are.
    Its ids, parent, format and debug flag are read-only.
    """

    __slots__ = ("ids",)
    # Built empty and filled by propagate(): TraceContext.__init__ would cost a fifth of that path.
    __init__ = object.__init__  # type: ignore[assignment]
    parentId = None  # type: ignore[assignment]
    format = FORMAT_W3C  # type: ignore[assignment]
    debug = False  # type: ignore[assignment]

    @property  # type: ignore[override]
    def traceId(self) -> bytes:
        return self.ids[:32]

    @property  # type: ignore[override]
    def spanId(self) -> bytes:
        return self.ids[33:]

    def __reduce__(self):
        # copy and pickle: as the plain context it stands for (the read-only names could not be set back).
        return TraceContext, (self.traceId, self.spanId, None, self.sampled, FORMAT_W3C, False)


if _startTrace is not None:
    _traceids.setContext(_NewTraceContext, X_REQUEST_ID, TRACEPARENT)


def _isId(value: bytes, size: int, zero: bytes) -> bool:
    """
    Whether C{value} is C{size} lowercase hex digits, not all zero.
    """
    return len(value) == size and not value.translate(None, _HEX) and value != zero


def _isTraceId(value: bytes) -> bool:
    """
    Whether C{value} is a B3 trace id: 16 or 32 lowercase hex digits, not all zero.
    """
    size = len(value)
    if size == 32:
        return _isId(value, 32, _ZERO32)
    return size == 16 and _isId(value, 16, _ZERO16)


def parseTraceparent(value: bytes) -> Optional[TraceContext]:
    """
    The context of a W3C C{traceparent} value, or None when it is malformed.
    """
    size = len(value)
    if size < 55:
        return None
    if size == 55:
        if value[:2] == b"ff" or value.count(b"-") != 3 or value.translate(None, _HEX_DASH):
            return None
    else:
        # A future version may append fields ("-..."); version 00 may not.
        if value[55] != _DASH or value[:2] in (b"00", b"ff"):
            return None
        head = value[:55]
        if head.count(b"-") != 3 or head.translate(None, _HEX_DASH):
            return None
    if value[2] != _DASH or value[35] != _DASH or value[52] != _DASH:
        return None
    traceId = value[3:35]
    parentId = value[36:52]
    if traceId == _ZERO32 or parentId == _ZERO16:
        return None
    return TraceContext(traceId, parentId, None, value[54] in _ODD, FORMAT_W3C)


def parseB3(value: bytes) -> Optional[TraceContext]:
    """
    The context of a B3 single-header value, or None when it is malformed. A sampling decision alone
    (C{0}, C{1}, C{d}) gives a context with empty ids.
    """
    if len(value) == 1:
        sampled = _B3_SAMPLING.get(value)
        if sampled is None:
            return None
        return TraceContext(b"", b"", None, sampled, FORMAT_B3, value == b"d")
    parts = value.split(b"-")
    count = len(parts)
    if count < 2 or count > 4:
        return None
    traceId = parts[0]
    spanId = parts[1]
    if not _isTraceId(traceId) or not _isId(spanId, 16, _ZERO16):
        return None
    sampled = None
    debug = False
    parentId = None
    if count >= 3:
        flag = parts[2]
        sampled = _B3_SAMPLING.get(flag)
        if sampled is None:
            return None
        debug = flag == b"d"
        if count == 4:
            parentId = parts[3]
            if not _isId(parentId, 16, _ZERO16):
                return None
    return TraceContext(traceId, spanId, parentId, sampled, FORMAT_B3, debug)


def parseB3Multi(traceId: Optional[bytes], spanId: Optional[bytes], parentId: Optional[bytes],
                 sampled: Optional[bytes], flags: Optional[bytes]) -> Optional[TraceContext]:
    """
    The context of B3 multi-header values (None for an absent header), or None when they are malformed.
    A sampling decision without ids gives a context with empty ids.
    """
    decision: Optional[bool] = None
    debug = False
    if flags is not None:
        if flags == b"1":
            debug = True
            decision = True
        elif flags != b"0":
            return None
    if sampled is not None:
        stated = _MULTI_SAMPLED.get(sampled)
        if stated is None:
            return None
        if not debug:
            decision = stated
    if traceId is None and spanId is None:
        if decision is None:
            return None
        return TraceContext(b"", b"", None, decision, FORMAT_B3_MULTI, debug)
    if traceId is None or spanId is None or not _isTraceId(traceId) or not _isId(spanId, 16, _ZERO16):
        return None
    if parentId is not None and not _isId(parentId, 16, _ZERO16):
        return None
    return TraceContext(traceId, spanId, parentId, decision, FORMAT_B3_MULTI, debug)


def capTracestate(value: bytes) -> Optional[bytes]:
    """
    C{value} itself when it fits in 512 bytes; else its longest prefix of whole list members that fits,
    or None when not even the first one does.
    """
    if len(value) <= TRACESTATE_MAX:
        return value
    cut = value.rfind(b",", 0, TRACESTATE_MAX + 1)
    if cut <= 0:
        return None
    value = value[:cut].rstrip(b" \t,")
    return value or None


def _newSpanId(random) -> bytes:
    """
    A new, non-zero 64-bit span id as 16 hex digits.
    """
    bits = random.getrandbits(64)
    while not bits:
        bits = random.getrandbits(64)
    return b"%016x" % bits


def _nonZeroIds(random, bits: int) -> int:
    """
    A new trace's 192-bit draw C{bits} (trace id high, span id low) with an all-zero id drawn again (an
    all-zero id is invalid): the trace id first, then the span id; the other id is kept.
    """
    if bits < 0:
        raise ValueError(f"a draw of random bits is never negative: {bits}")
    while bits < _SPAN_RANGE:
        bits |= random.getrandbits(128) << 64
    while not bits & _SPAN_MASK:
        bits |= random.getrandbits(64)
    return bits


def _newIds(random) -> bytes:
    """
    A new trace's ids, b"<trace id>-<span id>" (32 and 16 hex digits), as a traceparent carries them.
    """
    bits = random.getrandbits(192)
    if bits < _SPAN_RANGE or not bits & _SPAN_MASK:
        bits = _nonZeroIds(random, bits)
    return _hexlify(bits.to_bytes(24, "big"), b"-", -16)


def newRequestId(random) -> bytes:
    """
    A random (version 4) UUID as bytes, from the injected random; cheaper than building a C{uuid.UUID}.
    """
    if _requestIdOf is not None:
        return _requestIdOf(random.getrandbits(128))
    # One C call for all 32 hex digits; a %x of a 128-bit int, or a format per group, costs more.
    h = _hexlify(((random.getrandbits(128) & _UUID_RANDOM) | _UUID_V4).to_bytes(16, "big"))
    return b"-".join((h[:8], h[8:12], h[12:16], h[16:20], h[20:]))


def sampledByTraceId(traceId: bytes, sampleRate: float) -> bool:
    """
    The decision for a trace that came without one: whether the number in C{traceId}'s last 14 hex digits
    is below C{sampleRate * 2**56} (OpenTelemetry's TraceIdRatioBased rule, on W3C's random low 56 bits).
    """
    return sampleRate >= 1.0 or (sampleRate > 0.0 and int(traceId[-14:], 16) < sampleRate * _RATIO_SCALE)


def propagate(headers: Headers, random, sampleRate: float, traced: bool = True,
              requestId: bool = True) -> TraceContext:
    """
    Read the incoming trace context from C{headers}, make the proxy's span its child, decide sampling
    (an incoming decision wins; else the trace id decides, see L{sampledByTraceId}), and rewrite
    C{headers} in place for the upstream (see the module docstring for the rules). Never raises on header
    values.

    @param headers: the request's fields, lowercased names; changed in place (only trace fields are
        replaced, removed or appended; the other tuples stay where and what they are).
    @param random: a L{random.Random}-like source (C{getrandbits}).
    @param sampleRate: the probability, from 0 to 1, of sampling a request with no incoming decision.
    @param traced: False when the caller already knows that no field named in L{TRACE_FIELDS} is among
        C{headers} (a connection manager that looked at every name anyway): the scan for them is skipped.
    @param requestId: False when C{headers} has no C{x-request-id} and the caller wants one appended: for
        a new trace it comes from the trace's own draw (its digits are the trace id's).
    @return: the proxy's trace context.
    """
    # The common case first: no trace field came in. One pass that allocates nothing, then a new trace
    # whose ids go upstream whether or not it is sampled (as Envoy does): an unsampled request still
    # carries the decision, and the ids to hang it on, so that services behind the proxy do not sample it.
    if traced:
        for field in headers:
            if field[0] in _NAMES:
                context = _propagateFound(headers, [i for i, f in enumerate(headers) if f[0] in _NAMES],
                                          random, sampleRate)
                if not requestId:
                    headers.append((X_REQUEST_ID, newRequestId(random)))
                return context
    # _newIds(), inlined (a call costs a tenth of this path): one draw for both ids (and the request id),
    # and one C call that writes them in hex with the dash between them that the traceparent wants.
    bits = random.getrandbits(192)
    if _startTrace is not None:
        # What the lines below do, in C: the fields appended, the context made (None: an all-zero id,
        # drawn again below).
        context = _startTrace(headers, bits, not requestId, sampleRate)
        if context is not None:
            return context
    if not requestId:
        bits = (bits & _DRAW_AS_UUID) | _DRAW_UUID_BITS  # the trace id, a UUID's bits (never all zero)
    if bits < _SPAN_RANGE or not bits & _SPAN_MASK:  # an all-zero id: one chance in 2**64
        bits = _nonZeroIds(random, bits)
    ids = _hexlify(bits.to_bytes(24, "big"), b"-", -16)
    if not requestId:
        headers.append((X_REQUEST_ID, b"-".join((ids[:8], ids[8:12], ids[12:16], ids[16:20], ids[20:32]))))
    if sampleRate >= 1.0 or (sampleRate > 0.0 and (bits >> 64) & _RATIO_BITS < sampleRate * _RATIO_SCALE):
        sampled = True
        headers.append((TRACEPARENT, _TRACEPARENT_SAMPLED % ids))
    else:
        sampled = False
        headers.append((TRACEPARENT, _TRACEPARENT_UNSAMPLED % ids))
    context = _NewTraceContext()
    context.ids = ids
    context.sampled = sampled
    return context


def _propagateFound(headers: Headers, found: List[int], random, sampleRate: float) -> TraceContext:
    """
    L{propagate} when some trace fields came in (their indices in C{found}).
    """
    tpCount = 0
    tpAt = b3At = -1
    states: List[int] = []
    multi = {}
    remove: List[int] = []
    for i in found:
        name, value = headers[i]
        if name == TRACEPARENT:
            tpCount += 1
            if tpAt < 0:
                tpAt = i
            else:
                remove.append(i)
        elif name == TRACESTATE:
            states.append(i)
        elif name == B3:
            if b3At < 0:
                b3At = i
            else:
                remove.append(i)
        elif name in multi:
            remove.append(i)  # a repeated x-b3-* field: the first one counts
        else:
            multi[name] = i

    incoming = None
    if tpAt >= 0 and tpCount == 1:  # several traceparent fields are invalid (W3C section 3.2)
        incoming = parseTraceparent(headers[tpAt][1])
    decisionOnly = None
    if incoming is None and b3At >= 0:
        parsed = parseB3(headers[b3At][1])
        if parsed is not None:
            if parsed.traceId:
                incoming = parsed
            else:
                decisionOnly = parsed
    if incoming is None and multi:
        parsed = parseB3Multi(*[headers[multi[n]][1] if n in multi else None for n in _MULTI])
        if parsed is not None:
            if parsed.traceId:
                incoming = parsed
            elif decisionOnly is None:
                decisionOnly = parsed

    if incoming is not None:
        context = incoming
        context.parentId = context.spanId
        context.spanId = _newSpanId(random)
        fmt = context.format
    else:
        if decisionOnly is not None:
            fmt = decisionOnly.format
        elif tpAt >= 0:
            fmt = FORMAT_W3C
        elif b3At >= 0:
            fmt = FORMAT_B3
        elif multi.keys() - {X_B3_PARENTSPANID}:
            fmt = FORMAT_B3_MULTI
        else:
            fmt = FORMAT_W3C  # only tracestate or a stray x-b3-parentspanid came in
        ids = _newIds(random)
        context = TraceContext(ids[:32], ids[33:], None,
                               decisionOnly.sampled if decisionOnly is not None else None, fmt,
                               decisionOnly.debug if decisionOnly is not None else False)
    if context.sampled is None:
        context.sampled = sampledByTraceId(context.traceId, sampleRate)
    sampled = context.sampled

    append: Headers = []
    # W3C fields.
    if fmt == FORMAT_W3C:
        value = b"00-%s-%s-%s" % (context.traceId, context.spanId, b"01" if sampled else b"00")
        if tpAt >= 0:
            headers[tpAt] = (TRACEPARENT, value)
        else:
            append.append((TRACEPARENT, value))
    elif tpAt >= 0:
        remove.append(tpAt)
    if states:
        if incoming is not None and fmt == FORMAT_W3C:
            first = states[0]
            if len(states) == 1:
                state: Optional[bytes] = headers[first][1]
            else:
                state = b",".join([headers[i][1] for i in states])
                remove.extend(states[1:])
            capped = capTracestate(state)  # type: ignore[arg-type]
            if capped is None:
                remove.append(first)
            elif capped is not headers[first][1]:
                headers[first] = (TRACESTATE, capped)
        else:
            remove.extend(states)
    # B3 single.
    if fmt == FORMAT_B3:
        flag = b"d" if context.debug else (b"1" if sampled else b"0")
        if context.parentId is not None:
            value = b"%s-%s-%s-%s" % (context.traceId, context.spanId, flag, context.parentId)
        else:
            value = b"%s-%s-%s" % (context.traceId, context.spanId, flag)
        headers[b3At] = (B3, value)
    elif b3At >= 0:
        remove.append(b3At)
    # B3 multi.
    if fmt == FORMAT_B3_MULTI:
        _setMulti(headers, multi, append, remove, X_B3_TRACEID, context.traceId)
        _setMulti(headers, multi, append, remove, X_B3_SPANID, context.spanId)
        _setMulti(headers, multi, append, remove, X_B3_PARENTSPANID, context.parentId)
        if context.debug:
            # Debug implies sampling: B3 says not to send x-b3-sampled with it.
            _setMulti(headers, multi, append, remove, X_B3_SAMPLED, None)
        else:
            _setMulti(headers, multi, append, remove, X_B3_SAMPLED, b"1" if sampled else b"0")
            _setMulti(headers, multi, append, remove, X_B3_FLAGS, None)
    else:
        remove.extend(multi.values())

    if remove:
        for i in sorted(remove, reverse=True):
            del headers[i]
    if append:
        headers.extend(append)
    return context


def _setMulti(headers: Headers, multi: dict, append: Headers, remove: List[int], name: bytes,
              value: Optional[bytes]) -> None:
    """
    Make the B3 multi field C{name} say C{value} (remove it for None), in place when it came in; a value
    that is already there keeps its tuple.
    """
    at = multi.get(name)
    if value is None:
        if at is not None:
            remove.append(at)
    elif at is None:
        append.append((name, value))
    elif headers[at][1] != value:
        headers[at] = (name, value)


class Span:
    """
    One finished span, as the exporters encode it.

    @ivar traceId: 32 (or, from B3, 16) hex digits, as bytes; C{spanId}, C{parentId} (None for a root
        span) 16.
    @ivar name: the operation name.
    @ivar start: when it began, in seconds since the epoch (the injected clock's C{seconds()}).
    @ivar duration: how long it lasted, in seconds.
    @ivar tags: C{(key, value)} text pairs, in the order they were set, each key once (Zipkin's are a map).
    @ivar error: whether the request failed (a 5xx or a reset).
    @ivar remote: the downstream peer as C{(ip, port)}, or None.
    @ivar debug: the B3 debug flag.
    """

    __slots__ = ("traceId", "spanId", "parentId", "name", "start", "duration", "tags", "error", "remote",
                 "debug")

    def __init__(self, traceId: bytes, spanId: bytes, parentId: Optional[bytes], name: str, start: float,
                 duration: float, tags: List[Tuple[str, str]], error: bool = False,
                 remote: Optional[Tuple[str, int]] = None, debug: bool = False) -> None:
        self.traceId = traceId
        self.spanId = spanId
        self.parentId = parentId
        self.name = name
        self.start = start
        self.duration = duration
        self.tags = tags
        self.error = error
        self.remote = remote
        self.debug = debug

    def __repr__(self) -> str:
        return f"Span({self.name!r}, traceId={self.traceId!r}, spanId={self.spanId!r}, parentId={self.parentId!r})"


def _text(value: bytes) -> str:
    """
    Header bytes as text that stays valid UTF-8 whatever a client sent.
    """
    return value.decode("utf-8", "backslashreplace")


#: The longest C{http.url} and C{user_agent} tag kept (Envoy cuts the path tag at 256 characters too): a client
#: controls both, and may force sampling with an incoming trace flag.
MAX_TAG_LENGTH = 256
_SPAN_FIELDS = frozenset((b"x-request-id", b"user-agent"))  # the request fields a span's tags tell of
_COMPONENT_TAG = ("component", "proxy")
_ERROR_TAG = ("error", "true")


class SpanRecorder:
    """
    Records the spans of sampled streams: a connection manager calls L{record} for each finished stream
    whose trace is sampled (C{HTTPSettings.spans}). It can also stand where an access logger stands,
    C{log(stream, endTime)}: then it passes every stream on to C{accessLog} and records the sampled ones.

    @ivar exporter: where spans go: anything with an C{add(span)} method (an
        L{twistedmesh.observability.export.SpanExporter}).
    @ivar accessLog: the listener's access logger, or None.
    """

    logger = Logger()  # not `log`: that is the hot-path method here

    def __init__(self, exporter: Any, accessLog: Any = None, nodeId: str = "twistedmesh") -> None:
        self.exporter = exporter
        self.accessLog = accessLog
        self.nodeId = nodeId
        self._addresses: Dict[str, str] = {}  # upstream endpoint string -> host:port, parsed once each

    def log(self, stream: Any, endTime: float) -> None:
        """
        A stream finished (called after C{stream.complete()}): log it, and record its span if it was sampled.

        @param stream: the L{twistedmesh.http.stream.Stream}.
        @param endTime: when it ended (the clock's C{seconds()}).
        """
        accessLog = self.accessLog
        if accessLog is not None:
            accessLog.log(stream, endTime)
        trace = stream.state.get("trace")
        if trace is not None and trace.sampled:
            self.record(stream, trace, endTime)

    def record(self, stream: Any, trace: TraceContext, endTime: float) -> None:
        """
        Record the span of a finished, sampled C{stream} (a connection manager that has checked
        C{trace.sampled} itself calls this, and spares unsampled requests a call).

        @param trace: the stream's trace context (C{stream.state["trace"]}).
        @param endTime: when it ended (the clock's C{seconds()}).
        """
        try:
            self.exporter.add(self.span(stream, trace, endTime))
        except Exception:
            # A span is worth less than the connection this runs on: never let it raise there.
            self.logger.failure("recording a span for listener {listener} failed", listener=stream.listener)

    def span(self, stream: Any, trace: TraceContext, endTime: float) -> Span:
        """
        The proxy's span for a finished C{stream} whose trace context is C{trace}.
        """
        status = stream.status
        # A reset (upstream or downstream) leaves the response unfinished: Envoy tags that as an error too.
        error = status >= 500 or status < 100 or not stream.responseEnded
        url = b"%s://%s%s" % (stream.scheme or b"http", stream.authority, stream.path)
        # One decode for the usual all-ASCII URL; else each part on its own, as bytes that are not UTF-8
        # must not run into the next part.
        url = url.decode("ascii") if url.isascii() else "%s://%s%s" % (
            _text(stream.scheme or b"http"), _text(stream.authority), _text(stream.path))
        if len(url) > MAX_TAG_LENGTH:
            url = url[:MAX_TAG_LENGTH]  # clients choose these (and can ask for sampling): keep spans small
        version = stream.version
        requestId = userAgent = None
        for name, value in stream.requestHeaders:
            if name in _SPAN_FIELDS:  # one set lookup for most fields, rather than two comparisons
                if name == b"x-request-id":
                    if requestId is None:
                        requestId = _text(value)
                elif userAgent is None:
                    userAgent = _text(value)
        tags = [
            _COMPONENT_TAG,
            ("node_id", self.nodeId),
            ("http.method", _text(stream.method)),
            ("http.url", url),
            ("http.protocol", _PROTOCOLS.get(version) or ("HTTP/" + _text(version) if version else "-")),
            ("http.status_code", str(status)),
            ("response_flags", ",".join(stream.responseFlags) or "-"),
            ("upstream_cluster", stream.upstreamCluster.name if stream.upstreamCluster is not None else "-"),
        ]
        host = stream.upstreamHost
        if host is not None:
            endpoint = host.endpoint
            address = self._addresses.get(endpoint)
            if address is None:
                address = _endpointAddress(endpoint)
                if len(self._addresses) < 4096:  # dynamic hosts come and go: stay bounded
                    self._addresses[endpoint] = address
            tags.append(("upstream_address", address))
        peer = stream.downstreamAddress
        ip = getattr(peer, "host", None)
        if ip is not None:
            # An IP peer, the usual one: written here as _addressText() would, sparing it the call.
            remote: Optional[Tuple[str, int]] = (ip, peer.port)
            tags.append(("peer.address", f"[{ip}]:{peer.port}" if ":" in ip else f"{ip}:{peer.port}"))
        else:
            remote = None
            peerText = _addressText(peer)  # a UNIX socket's path, or None
            if peerText is not None:
                tags.append(("peer.address", peerText))
        tags += (
            ("guid:x-request-id", requestId or "-"),
            ("user_agent", userAgent[:MAX_TAG_LENGTH] if userAgent else "-"),
            ("request_size", str(stream.bytesReceived)),
            ("response_size", str(stream.bytesSent)),
        )
        if error:
            tags.append(_ERROR_TAG)
        route = stream.route
        return Span(trace.traceId, trace.spanId, trace.parentId,
                    "%s/%s" % (route.table, route.name) if route is not None else "ingress",
                    stream.startTime, endTime - stream.startTime, tags, error, remote, trace.debug)
