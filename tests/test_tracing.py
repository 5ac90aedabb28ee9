"""
Tests for trace-context propagation (L{twistedmesh.observability.tracing}).
"""

from __future__ import annotations

import random
import uuid

from twisted.trial import unittest

from twistedmesh.observability import tracing

from twistedmesh.observability.tracing import (
    FORMAT_B3,
    FORMAT_B3_MULTI,
    FORMAT_W3C,
    TraceContext,
    capTracestate,
    newRequestId,
    parseB3,
    parseB3Multi,
    parseTraceparent,
    propagate,
    sampledByTraceId,
)

TRACE = b"0af7651916cd43dd8448eb211c80319c"
SPAN = b"b7ad6b7169203331"
PARENT = b"00f067aa0ba902b7"
TP = b"00-" + TRACE + b"-" + SPAN + b"-01"
# What random.Random(1) gives: its first 64 bits are the span id, with or without a new trace; a new
# trace's id is the 128 bits after them (one 192-bit draw, span id in its low bits).
SEED1_FIRST_SPAN = b"91b7584a2265b1f5"
SEED1_SPAN = SEED1_FIRST_SPAN
SEED1_TRACE = b"1027c4d1c386bbc4cd613e30d8f16adf"


class TraceparentTests(unittest.TestCase):
    """
    L{parseTraceparent}.
    """

    def test_valid(self):
        """
        A well-formed version 00 value gives its trace id, the sender's span and the sampled flag.
        """
        self.assertEqual(parseTraceparent(TP), TraceContext(TRACE, SPAN, None, True, FORMAT_W3C))
        self.assertIs(parseTraceparent(TP[:-2] + b"00").sampled, False)
        self.assertIs(parseTraceparent(TP[:-2] + b"03").sampled, True)

    def test_wrongLengths(self):
        """
        A trace id, parent id or flags field of the wrong length is refused.
        """
        for value in (b"00-" + TRACE[:-1] + b"-" + SPAN + b"-01", b"00-" + TRACE + b"-" + SPAN + b"0-01",
                      b"00-" + TRACE + b"-" + SPAN + b"-1", b"0-" + TRACE + b"-" + SPAN + b"-01", b"", TP[:-1]):
            self.assertIsNone(parseTraceparent(value), value)

    def test_notHex(self):
        """
        Non-hex characters (uppercase included, as the spec requires lowercase) are refused.
        """
        for value in (TP.replace(b"0af7", b"0ag7"), TP.upper(), TP[:-2] + b"0x",
                      TP.replace(b"-", b"_"), b"00-" + TRACE + b"--" + SPAN[1:] + b"-01"):
            self.assertIsNone(parseTraceparent(value), value)

    def test_allZeros(self):
        """
        An all-zero trace id or parent id is invalid.
        """
        self.assertIsNone(parseTraceparent(b"00-" + b"0" * 32 + b"-" + SPAN + b"-01"))
        self.assertIsNone(parseTraceparent(b"00-" + TRACE + b"-" + b"0" * 16 + b"-01"))

    def test_versionFF(self):
        """
        Version ff is invalid.
        """
        self.assertIsNone(parseTraceparent(b"ff" + TP[2:]))

    def test_extraFields(self):
        """
        Version 00 with extra fields is refused; a future version with extra fields is read.
        """
        self.assertIsNone(parseTraceparent(TP + b"-what"))
        self.assertIsNone(parseTraceparent(TP + b"x"))
        self.assertEqual(parseTraceparent(b"cc" + TP[2:] + b"-what"),
                         TraceContext(TRACE, SPAN, None, True, FORMAT_W3C))
        self.assertIsNone(parseTraceparent(b"cc" + TP[2:] + b"what"))


class B3Tests(unittest.TestCase):
    """
    L{parseB3} and L{parseB3Multi}.
    """

    def test_single(self):
        """
        The B3 single header is read with and without sampling and parent, and with a 64-bit trace id.
        """
        self.assertEqual(parseB3(TRACE + b"-" + SPAN), TraceContext(TRACE, SPAN, None, None, FORMAT_B3))
        self.assertEqual(parseB3(TRACE + b"-" + SPAN + b"-0"), TraceContext(TRACE, SPAN, None, False, FORMAT_B3))
        self.assertEqual(parseB3(TRACE + b"-" + SPAN + b"-1-" + PARENT),
                         TraceContext(TRACE, SPAN, PARENT, True, FORMAT_B3))
        self.assertEqual(parseB3(TRACE[16:] + b"-" + SPAN + b"-1"),
                         TraceContext(TRACE[16:], SPAN, None, True, FORMAT_B3))

    def test_singleDebugAndLoneDecision(self):
        """
        C{d} means debug (sampled), and a lone C{0} is a decision without ids.
        """
        self.assertEqual(parseB3(TRACE + b"-" + SPAN + b"-d"),
                         TraceContext(TRACE, SPAN, None, True, FORMAT_B3, debug=True))
        self.assertEqual(parseB3(b"0"), TraceContext(b"", b"", None, False, FORMAT_B3))

    def test_singleMalformed(self):
        """
        Bad ids, sampling values or field counts are refused.
        """
        for value in (b"", b"x", b"2", TRACE, TRACE + b"-" + SPAN + b"-2", TRACE[:20] + b"-" + SPAN,
                      TRACE + b"-" + SPAN[:-1], TRACE + b"-" + SPAN + b"-1-" + PARENT + b"-x",
                      b"0" * 32 + b"-" + SPAN, TRACE + b"-" + SPAN + b"-1-zz"):
            self.assertIsNone(parseB3(value), value)

    def test_multi(self):
        """
        The x-b3-* values are read, x-b3-flags 1 meaning debug, and ids without the other are refused.
        """
        self.assertEqual(parseB3Multi(TRACE, SPAN, PARENT, b"1", None),
                         TraceContext(TRACE, SPAN, PARENT, True, FORMAT_B3_MULTI))
        self.assertEqual(parseB3Multi(TRACE, SPAN, None, None, b"1"),
                         TraceContext(TRACE, SPAN, None, True, FORMAT_B3_MULTI, debug=True))
        self.assertEqual(parseB3Multi(None, None, None, b"0", None),
                         TraceContext(b"", b"", None, False, FORMAT_B3_MULTI))
        self.assertIsNone(parseB3Multi(TRACE, None, None, b"1", None))
        self.assertIsNone(parseB3Multi(TRACE, SPAN, None, b"yes", None))


class TracestateTests(unittest.TestCase):
    """
    L{capTracestate}.
    """

    def test_cap(self):
        """
        A value over 512 bytes keeps its whole members that fit; a short value is returned itself.
        """
        short = b"a=1,b=2"
        self.assertIs(capTracestate(short), short)
        member = b"k%03d=" + b"v" * 94  # 100 bytes
        long = b",".join(member % i for i in range(8))
        self.assertEqual(capTracestate(long), b",".join(member % i for i in range(5)))
        self.assertIsNone(capTracestate(b"k=" + b"v" * 600))


class PropagateTests(unittest.TestCase):
    """
    L{propagate}: the context returned and the headers rewritten for the upstream.
    """

    def test_nothingIncoming(self):
        """
        Without a trace field, a new trace starts and a W3C traceparent is appended, other tuples untouched.
        """
        other = (b"accept", b"*/*")
        headers = [other]
        context = propagate(headers, random.Random(1), 1.0)
        self.assertEqual(context, TraceContext(SEED1_TRACE, SEED1_SPAN, None, True, FORMAT_W3C))
        self.assertEqual(headers, [other, (b"traceparent", b"00-" + SEED1_TRACE + b"-" + SEED1_SPAN + b"-01")])
        self.assertIs(headers[0], other)

    def test_newTraceContextReads(self):
        """
        A new trace's context (ids cut from the traceparent only when read) reads as a full TraceContext,
        both ways round, and its C{sampled} can still be changed.
        """
        context = propagate([], random.Random(1), 0.0)
        full = TraceContext(SEED1_TRACE, SEED1_SPAN, None, False, FORMAT_W3C)
        self.assertIsInstance(context, TraceContext)
        self.assertEqual((context.traceId, context.spanId, context.parentId, context.sampled, context.format,
                          context.debug), (SEED1_TRACE, SEED1_SPAN, None, False, FORMAT_W3C, False))
        self.assertTrue(full == context and context == full)
        self.assertEqual(repr(context), repr(full))
        context.sampled = True
        self.assertNotEqual(context, full)

    def test_unsampledStillPropagated(self):
        """
        An unsampled request without a trace field still gets a new traceparent (flags 00), as Envoy still
        propagates ids: the services behind the proxy learn the decision instead of making their own. The
        ids are the same draws as a sampled request's.
        """
        headers = [(b"accept", b"*/*")]
        context = propagate(headers, random.Random(1), 0.0)
        self.assertEqual(context, TraceContext(SEED1_TRACE, SEED1_SPAN, None, False, FORMAT_W3C))
        self.assertEqual(headers[1], (b"traceparent", b"00-" + SEED1_TRACE + b"-" + SEED1_SPAN + b"-00"))

    def test_notTracedSkipsTheScan(self):
        """
        C{traced=False} (the caller saw no trace field) gives the same context and fields as a scan that
        finds none; it is taken at its word, so a trace field it missed is not read (the scan is skipped).
        """
        for rate in (0.0, 1.0):
            scanned = [(b"accept", b"*/*")]
            told = [(b"accept", b"*/*")]
            self.assertEqual(propagate(told, random.Random(1), rate, False),
                             propagate(scanned, random.Random(1), rate))
            self.assertEqual(told, scanned)
        headers = [(b"traceparent", TP)]
        context = propagate(headers, random.Random(1), 1.0, False)
        self.assertEqual((context.traceId, context.parentId), (SEED1_TRACE, None))
        self.assertEqual(headers[0], (b"traceparent", TP))

    def test_zeroIdsDrawnAgain(self):
        """
        An all-zero trace or span id is invalid: that id is drawn again (the trace id first), and the other
        kept; on both paths that start a new trace.
        """
        class Zeros(random.Random):
            # Hands out `zeros` once (all 192 bits of the ids' draw), then behaves as Random(1).
            def __init__(self, zeros: int) -> None:
                super().__init__(1)
                self.zeros = zeros

            def getrandbits(self, k: int) -> int:
                if self.zeros is not None:
                    bits, self.zeros = self.zeros, None
                    return bits & ((1 << k) - 1)
                return super().getrandbits(k)

        seed1 = random.Random(1)
        redrawnTrace = b"%032x" % seed1.getrandbits(128)
        redrawnSpan = b"%016x" % seed1.getrandbits(64)  # after a redrawn trace id
        firstSpan = b"%016x" % random.Random(1).getrandbits(64)  # a span id redrawn alone
        for malformed in (False, True):
            def newTrace(zeros):
                headers = [(b"traceparent", b"junk")] if malformed else []
                context = propagate(headers, Zeros(zeros), 1.0)
                [(_, value)] = headers
                self.assertEqual(value, b"00-%s-%s-01" % (context.traceId, context.spanId))
                return context.traceId, context.spanId

            self.assertEqual(newTrace(0xABC), (redrawnTrace, b"0000000000000abc"))
            self.assertEqual(newTrace(0x123 << 64), (b"%032x" % 0x123, firstSpan))
            self.assertEqual(newTrace(0), (redrawnTrace, redrawnSpan))
            self.assertEqual(newTrace((1 << 191) | 1), (b"8" + b"0" * 31, b"0" * 15 + b"1"))

    def test_traceparentRewritten(self):
        """
        An incoming traceparent is replaced in place with our span as the parent; tracestate is kept as is.
        """
        state = (b"tracestate", b"congo=t61rcWkgMzE")
        other = (b"accept", b"*/*")
        headers = [(b"traceparent", TP), other, state]
        listId = id(headers)
        context = propagate(headers, random.Random(1), 0.0)
        self.assertEqual(context, TraceContext(TRACE, SEED1_FIRST_SPAN, SPAN, True, FORMAT_W3C))
        self.assertEqual(headers, [(b"traceparent", b"00-" + TRACE + b"-" + SEED1_FIRST_SPAN + b"-01"), other,
                                   state])
        # No allocation beyond the rewritten tuple: same list, same other tuples.
        self.assertEqual(id(headers), listId)
        self.assertIs(headers[1], other)
        self.assertIs(headers[2], state)

    def test_tracestateCappedAndJoined(self):
        """
        Several tracestate fields become one, capped to 512 bytes of whole members.
        """
        member = b"k%03d=" + b"v" * 94
        headers = [(b"traceparent", TP), (b"tracestate", member % 0 + b"," + member % 1),
                   (b"tracestate", b",".join(member % i for i in range(2, 8)))]
        propagate(headers, random.Random(1), 0.0)
        self.assertEqual(headers[1], (b"tracestate", b",".join(member % i for i in range(5))))
        self.assertEqual(len(headers), 2)

    def test_malformedTraceparent(self):
        """
        A malformed traceparent starts a new trace, replaced in place, and its tracestate is dropped.
        """
        headers = [(b"traceparent", b"ff" + TP[2:]), (b"tracestate", b"a=1")]
        context = propagate(headers, random.Random(1), 0.0)
        self.assertEqual(context, TraceContext(SEED1_TRACE, SEED1_SPAN, None, False, FORMAT_W3C))
        self.assertEqual(headers, [(b"traceparent", b"00-" + SEED1_TRACE + b"-" + SEED1_SPAN + b"-00")])

    def test_repeatedTraceparent(self):
        """
        Two traceparent fields are invalid: a new trace replaces the first and the second goes.
        """
        headers = [(b"traceparent", TP), (b"traceparent", TP)]
        context = propagate(headers, random.Random(1), 1.0)
        self.assertIsNone(context.parentId)
        self.assertEqual(headers, [(b"traceparent", b"00-" + SEED1_TRACE + b"-" + SEED1_SPAN + b"-01")])

    def test_b3Single(self):
        """
        A B3 single header is rewritten as B3 single: our span, its sampling, the incoming span as parent.
        """
        headers = [(b"b3", TRACE[16:] + b"-" + SPAN + b"-0-" + PARENT)]
        context = propagate(headers, random.Random(1), 1.0)
        self.assertEqual(context, TraceContext(TRACE[16:], SEED1_FIRST_SPAN, SPAN, False, FORMAT_B3))
        self.assertEqual(headers, [(b"b3", TRACE[16:] + b"-" + SEED1_FIRST_SPAN + b"-0-" + SPAN)])

    def test_b3SingleDebug(self):
        """
        The debug flag is honoured as sampled and passed on as C{d}.
        """
        headers = [(b"b3", TRACE + b"-" + SPAN + b"-d")]
        context = propagate(headers, random.Random(1), 0.0)
        self.assertTrue(context.sampled)
        self.assertEqual(headers, [(b"b3", TRACE + b"-" + SEED1_FIRST_SPAN + b"-d-" + SPAN)])

    def test_b3LoneZero(self):
        """
        A lone C{b3: 0} is honoured: a new unsampled trace, still in B3 single.
        """
        headers = [(b"b3", b"0")]
        context = propagate(headers, random.Random(1), 1.0)
        self.assertEqual(context, TraceContext(SEED1_TRACE, SEED1_SPAN, None, False, FORMAT_B3))
        self.assertEqual(headers, [(b"b3", SEED1_TRACE + b"-" + SEED1_SPAN + b"-0")])

    def test_b3Multi(self):
        """
        B3 multi fields are rewritten as B3 multi, in place, with the parent and sampling added.
        """
        traceField = (b"x-b3-traceid", TRACE)
        headers = [traceField, (b"x-b3-spanid", SPAN), (b"x-b3-parentspanid", PARENT)]
        context = propagate(headers, random.Random(3), 0.0)
        self.assertEqual(context.parentId, SPAN)
        self.assertIs(context.format, FORMAT_B3_MULTI)
        self.assertEqual(headers, [traceField, (b"x-b3-spanid", context.spanId), (b"x-b3-parentspanid", SPAN),
                                   (b"x-b3-sampled", b"0")])
        self.assertIs(context.sampled, False)
        self.assertIs(headers[0], traceField)

    def test_b3MultiDebug(self):
        """
        With x-b3-flags 1 the request is sampled, the flag stays and no x-b3-sampled is sent.
        """
        headers = [(b"x-b3-traceid", TRACE), (b"x-b3-spanid", SPAN), (b"x-b3-flags", b"1"),
                   (b"x-b3-sampled", b"0")]
        context = propagate(headers, random.Random(1), 0.0)
        self.assertTrue(context.sampled)
        self.assertEqual(headers, [(b"x-b3-traceid", TRACE), (b"x-b3-spanid", SEED1_FIRST_SPAN),
                                   (b"x-b3-flags", b"1"), (b"x-b3-parentspanid", SPAN)])

    def test_precedence(self):
        """
        A valid traceparent wins over B3, whose fields are removed; a malformed one loses to a valid b3.
        """
        headers = [(b"b3", PARENT + b"-" + PARENT + b"-0"), (b"traceparent", TP), (b"x-b3-traceid", PARENT),
                   (b"x-b3-spanid", PARENT)]
        context = propagate(headers, random.Random(1), 0.0)
        self.assertEqual(context, TraceContext(TRACE, SEED1_FIRST_SPAN, SPAN, True, FORMAT_W3C))
        self.assertEqual(headers, [(b"traceparent", b"00-" + TRACE + b"-" + SEED1_FIRST_SPAN + b"-01")])

        headers = [(b"traceparent", b"junk"), (b"tracestate", b"a=1"), (b"b3", TRACE + b"-" + SPAN + b"-1")]
        context = propagate(headers, random.Random(1), 0.0)
        self.assertIs(context.format, FORMAT_B3)
        self.assertEqual(headers, [(b"b3", TRACE + b"-" + SEED1_FIRST_SPAN + b"-1-" + SPAN)])

    def test_samplingHonoured(self):
        """
        An incoming decision wins over the rate, and draws nothing from the random for sampling.
        """
        rng = random.Random(1)
        context = propagate([(b"traceparent", TP[:-2] + b"00")], rng, 1.0)
        self.assertIs(context.sampled, False)
        reference = random.Random(1)
        reference.getrandbits(64)
        self.assertEqual(rng.random(), reference.random())

    def test_samplingDecided(self):
        """
        Without an incoming decision, the trace id decides: sampled when its last 14 hex digits are below
        C{sampleRate * 2**56} (OpenTelemetry's ratio rule), so every proxy decides the same for a trace, and
        no number is drawn for it.
        """
        outcomes = set()
        for seed in range(200):
            rng = random.Random(seed)
            context = propagate([], rng, 0.5)
            self.assertIs(context.sampled, int(context.traceId[-14:], 16) < 2 ** 55)
            outcomes.add(context.sampled)
            reference = random.Random(seed)
            reference.getrandbits(192)
            self.assertEqual(rng.getrandbits(32), reference.getrandbits(32))  # the ids' draw only
        self.assertEqual(outcomes, {True, False})
        # An incoming trace without a decision: its own id decides, whatever the random.
        value = int(TRACE[-14:], 16)
        below, above = (value - 64) / 2 ** 56, (value + 64) / 2 ** 56  # a float holds 53 bits of a 56-bit number
        for seed in (1, 2, 3):
            self.assertIs(propagate([(b"b3", TRACE + b"-" + SPAN)], random.Random(seed), below).sampled, False)
            self.assertIs(propagate([(b"b3", TRACE + b"-" + SPAN)], random.Random(seed), above).sampled, True)
        # A 64-bit B3 trace id has 56 bits to decide too.
        short = b"00000000000000ff"
        self.assertIs(propagate([(b"b3", short + b"-" + SPAN)], random.Random(1), 256 / 2 ** 56).sampled, True)
        self.assertIs(propagate([(b"b3", short + b"-" + SPAN)], random.Random(1), 255 / 2 ** 56).sampled, False)
        self.assertIs(propagate([], random.Random(1), 0.0).sampled, False)
        self.assertIs(propagate([], random.Random(1), 1.0).sampled, True)
        self.assertTrue(sampledByTraceId(b"f" * 32, 1.0))
        self.assertFalse(sampledByTraceId(b"0" * 31 + b"1", 0.0))

    def test_newContextCopies(self):
        """
        A new trace's context copies and pickles as the plain context it stands for.
        """
        import copy
        import pickle

        context = propagate([], random.Random(1), 1.0)
        for twin in (copy.copy(context), copy.deepcopy(context), pickle.loads(pickle.dumps(context))):
            self.assertEqual(twin, TraceContext(SEED1_TRACE, SEED1_SPAN, None, True, FORMAT_W3C))
            twin.parentId = b"x"  # a plain context again: writable

    def test_requestIdFromTheTrace(self):
        """
        With C{requestId=False} and no trace coming in, one 192-bit draw makes the span id, the trace id and
        an x-request-id: a canonical version 4 UUID whose 32 hex digits are the trace id.
        """
        for seed in range(300):
            rng = random.Random(seed)
            headers = [(b"user-agent", b"x")]
            context = propagate(headers, rng, 0.25, requestId=False)
            names = [name for name, _ in headers]
            self.assertEqual(names, [b"user-agent", b"x-request-id", b"traceparent"])
            requestId = headers[1][1]
            parsed = uuid.UUID(requestId.decode("ascii"))
            self.assertEqual((parsed.version, parsed.variant), (4, uuid.RFC_4122))
            self.assertEqual(str(parsed).encode("ascii"), requestId)
            self.assertEqual(requestId.replace(b"-", b""), context.traceId)
            self.assertEqual(parseTraceparent(headers[2][1]).traceId, context.traceId)
            self.assertEqual(len(context.spanId), 16)
            reference = random.Random(seed)
            reference.getrandbits(192)
            self.assertEqual(rng.getrandbits(32), reference.getrandbits(32))  # one draw for everything

    def test_requestIdBesideIncomingTrace(self):
        """
        With C{requestId=False} and a trace coming in, the x-request-id is a UUID of its own, drawn after
        the span id; the trace id stays the incoming one.
        """
        headers = [(b"traceparent", TP)]
        context = propagate(headers, random.Random(1), 0.0, requestId=False)
        self.assertEqual(context.traceId, TRACE)
        reference = random.Random(1)
        reference.getrandbits(64)
        self.assertEqual(headers[-1], (b"x-request-id", newRequestId(reference)))
        self.assertEqual(len([n for n, _ in headers if n == b"x-request-id"]), 1)

    def test_neverRaises(self):
        """
        Garbage in any trace field never raises and always yields a valid traceparent or b3 upstream.
        """
        rng = random.Random(7)
        for name in (b"traceparent", b"tracestate", b"b3", b"x-b3-traceid", b"x-b3-sampled", b"x-b3-flags",
                     b"x-b3-parentspanid"):
            for value in (b"", b"-", b"\xff\x00", b"0-0-0-0-0", TP + b"-", b"a" * 2000):
                headers = [(name, value)]
                context = propagate(headers, rng, 0.5)
                self.assertEqual(len(context.spanId), 16)
                self.assertIsNotNone(parseTraceparent(dict(headers).get(b"traceparent", TP)))


class NativeIdsTests(unittest.TestCase):
    """
    The C writer of new ids (twistedmesh/observability/_traceids.c), which the install builds where a C
    compiler is: from the same draws, the same request ids, trace ids, traceparents and sampling decisions
    as the Python code it stands in for.
    """

    def setUp(self):
        if tracing._traceids is None:
            raise unittest.SkipTest("the C id writer is not built here (no C compiler when installed, or "
                                    "TWISTEDMESH_PURE_PYTHON is set)")

    def test_used(self):
        """
        newRequestId and a new trace's propagate() call the C code when it is built.
        """
        calls = []
        self.patch(tracing, "_requestIdOf", lambda bits: calls.append("id") or tracing._traceids.requestId(bits))
        self.patch(tracing, "_startTrace", lambda *a: calls.append("trace") or tracing._traceids.startTrace(*a))
        newRequestId(random.Random(1))
        propagate([], random.Random(1), 0.5, False, False)
        self.assertEqual(calls, ["id", "trace"])

    def test_requestIds(self):
        """
        Request ids from the same draws are the same, and canonical version 4 UUIDs.
        """
        native = [newRequestId(r) for r in [random.Random(9)] for _ in range(2000)]
        self.patch(tracing, "_requestIdOf", None)
        python = [newRequestId(r) for r in [random.Random(9)] for _ in range(2000)]
        self.assertEqual(native, python)
        for rid in native[:50]:
            self.assertEqual(str(uuid.UUID(rid.decode())).encode(), rid)
            self.assertEqual(uuid.UUID(rid.decode()).version, 4)

    def newTraces(self, seed, sampleRate, requestId):
        rng = random.Random(seed)
        out = []
        for _ in range(300):
            headers = [(b"accept", b"*/*")] + ([(b"x-request-id", b"given")] if requestId else [])
            context = propagate(headers, rng, sampleRate, False, requestId)
            out.append((headers, context.traceId, context.spanId, context.sampled))
        return out

    def test_newTraces(self):
        """
        New traces from the same draws have the same ids, headers and sampling decisions, with and without
        a request id to make, at every rate.
        """
        decisions = set()
        for rate in (0.0, 0.01, 0.5, 1.0, 2.0, -1.0, float("nan")):
            for requestId in (False, True):
                native = self.newTraces(rate.__hash__() & 0xFFFF, rate, requestId)
                self.patch(tracing, "_startTrace", None)
                python = self.newTraces(rate.__hash__() & 0xFFFF, rate, requestId)
                self.patch(tracing, "_startTrace", tracing._traceids.startTrace)
                self.assertEqual(native, python, (rate, requestId))
                decisions.update(t[3] for t in native)
        self.assertEqual(decisions, {True, False})

    def test_zeroIds(self):
        """
        A draw with an all-zero trace or span id is drawn again (by the Python code), as without C.
        """
        class Draws(random.Random):
            def __init__(self, first):
                super().__init__(3)
                self.first = list(first)

            def getrandbits(self, k):
                return self.first.pop(0) if self.first else super().getrandbits(k)

        for first in ([0], [1], [1 << 64], [0, 0, 0]):
            self.assertIsNone(tracing._traceids.startTrace([], first[0], False, 0.5))
            for requestId in (False, True):
                native = propagate([], Draws(first), 0.5, False, requestId)
                self.patch(tracing, "_startTrace", None)
                python = propagate([], Draws(first), 0.5, False, requestId)
                self.patch(tracing, "_startTrace", tracing._traceids.startTrace)
                self.assertEqual((native.traceId, native.spanId, native.sampled),
                                 (python.traceId, python.spanId, python.sampled))
                self.assertNotEqual(native.traceId, b"0" * 32)

    def test_samplingEdge(self):
        """
        A trace id whose low 56 bits equal the rate's threshold is not sampled (below, strictly); one
        below it is, as OpenTelemetry's rule and the Python comparison of an int with a float say.
        """
        k = 0x00123456789ABC
        rate = k / float(1 << 56)
        for low, sampled in [(k, False), (k - 1, True), (k + 1, False)]:
            bits = (((0xAB << 56) | low) << 64) | 0x1234
            headers = []
            context = tracing._traceids.startTrace(headers, bits, False, rate)
            self.assertEqual(context.sampled, sampled)
            self.assertEqual(context.sampled, tracing.sampledByTraceId(context.traceId, rate))
            self.assertTrue(headers[-1][1].endswith(b"-01" if sampled else b"-00"))

    def test_badInput(self):
        """
        Numbers that are not a draw's are refused, not written.
        """
        self.assertRaises(OverflowError, tracing._traceids.requestId, -1)
        self.assertRaises(OverflowError, tracing._traceids.requestId, 1 << 128)
        self.assertRaises(TypeError, tracing._traceids.requestId, "1")
        self.assertRaises(OverflowError, tracing._traceids.startTrace, [], 1 << 192, False, 0.5)
        self.assertRaises(TypeError, tracing._traceids.startTrace, [], 1, False)
        self.assertRaises(TypeError, tracing._traceids.startTrace, [], 1, False, "0.5")
        self.assertRaises(TypeError, tracing._traceids.setContext, object(), "x-request-id", b"traceparent")

    def test_startTrace(self):
        """
        startTrace appends the fields (the request id only when asked to make one) and returns the
        registered context class, built without calling it, with its ids and decision.
        """
        bits = (0x0123456789ABCDEF0123456789ABCDEF << 64) | 0xFEDCBA9876543210
        trace, span = b"%032x" % (bits >> 64), b"%016x" % (bits & ((1 << 64) - 1))
        # The trace id with a version 4 UUID's bits: the version nibble 4, the variant 0b10.
        uuidDigits = trace[:12] + b"4" + trace[13:16] + b"%x" % (8 | (int(trace[16:17], 16) & 3)) + trace[17:]
        for makeRequestId in (False, True):
            headers = [(b"accept", b"*/*")]
            context = tracing._traceids.startTrace(headers, bits, makeRequestId, 1.0)
            self.assertIs(type(context), tracing._NewTraceContext)
            traceId = uuidDigits if makeRequestId else trace
            self.assertEqual((context.ids, context.sampled, context.traceId, context.spanId),
                             (traceId + b"-" + span, True, traceId, span))
            rid = str(uuid.UUID(uuidDigits.decode())).encode()
            self.assertEqual(headers, [(b"accept", b"*/*")] + ([(b"x-request-id", rid)] if makeRequestId else [])
                             + [(b"traceparent", b"00-" + traceId + b"-" + span + b"-01")])
        self.assertIsNone(tracing._traceids.startTrace([], 0, False, 1.0))

        class Counting(list):
            appended = 0

            def append(self, item):
                Counting.appended += 1
                super().append(item)

        # Not a plain list: propagate's Python code appends, through the list's own append.
        self.assertIsNone(tracing._traceids.startTrace(Counting(), bits, True, 1.0))
        headers = Counting()
        context = propagate(headers, random.Random(2), 1.0, False, False)
        self.assertEqual((Counting.appended, len(headers), context.sampled), (2, 2, True))


class BrokenRandomTests(unittest.TestCase):
    """
    A random source that breaks its contract is an error, never a hang.
    """

    def test_negativeDraw(self):
        """
        A new trace's draw that is negative (no real C{getrandbits} gives one) raises instead of looping
        forever looking for a non-zero id.
        """
        class Negative(random.Random):
            def getrandbits(self, k):
                return -1

        self.patch(tracing, "_startTrace", None)
        self.assertRaises(ValueError, propagate, [], Negative(), 0.5, False, True)
