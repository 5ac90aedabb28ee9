"""
Tests for access logs: the format compiler (L{twistedmesh.observability.accesslog}), its filters and sinks,
and the C{access_log.*} listener keys (L{twistedmesh.config.accesslog}).
"""

from __future__ import annotations

import gc
import json
import os
import random
import sys
import re
from types import SimpleNamespace
from typing import Dict, List, Tuple

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import DeferredList
from twisted.internet.task import Clock
from twisted.trial import unittest

from twistedmesh.config.accesslog import AccessLogConfig, parseAccessLog
from twistedmesh.config.errors import ConfigError
from twistedmesh.config.options import Options
from twistedmesh.http.stream import Stream
from twistedmesh.observability import accesslog
from twistedmesh.observability.accesslog import (
    DEFAULT_FORMAT,
    OPERATORS,
    AccessLogger,
    AccessLogSinks,
    FileSink,
    FormatError,
    MemorySink,
    TCPAccessRecord,
    compileFormat,
    compileJSONFormat,
    parseStatusCondition,
    statusCodes,
)
from twistedmesh.observability.stats import Counter
from twistedmesh.upstream.cluster import Host

START = 1460751420.310  # 2016-04-15T20:17:00.310Z, Envoy's documented example
END = START + 0.226


class _Codec:
    """
    A codec that is never called: these tests set a stream's fields directly.
    """


def makeStream(**fields) -> Stream:
    """
    A real L{Stream} for Envoy's documented example request (a POST answered 204 in 226 ms), with
    C{fields} set on it.
    """
    s = Stream(_Codec(), [], "edge", IPv4Address("TCP", "10.0.35.28", 51234), START)
    s.method = b"POST"
    s.path = b"/api/v1/locations"
    s.authority = b"locations"
    s.requestHeaders = [
        (b"user-agent", b"nsq2http"),
        (b"content-length", b"154"),
        (b"x-forwarded-for", b"10.0.35.28"),
        (b"x-forwarded-proto", b"http"),
        (b"x-request-id", b"cc21d9b0-cf5c-432b-8c7e-98aeb7988cd2"),
    ]
    s.status = 204
    s.responseHeaders = [(b"x-envoy-upstream-service-time", b"100")]
    s.bytesReceived = 154
    s.upstreamHost = Host("tcp:10.0.2.1:80", None, 1)
    for name, value in fields.items():
        setattr(s, name, value)
    return s


def render(fmt: str, stream=None, end: float = END, protocol: str = "http") -> str:
    """
    C{fmt} compiled and rendered for C{stream} (the example stream by default), without the newline.
    """
    compiled = compileFormat(fmt, protocol)
    record = stream if stream is not None else makeStream()
    line = compiled.render(record, end)
    assert line.endswith(b"\n")
    text = compiled.text(record, end)
    assert line == text.encode(), (line, text)  # the bytes written are the text line
    return text[:-1]


def config(**items) -> AccessLogConfig:
    """
    An L{AccessLogConfig} for a memory sink, with C{items} set.
    """
    items.setdefault("path", "stdout")
    return AccessLogConfig(**items)


class DefaultFormatTests(unittest.TestCase):
    """
    The default format, exactly as Envoy writes it.
    """

    def test_envoyExample(self):
        """
        Envoy's documented example request renders to Envoy's documented example line.
        """
        self.assertEqual(
            compileFormat(DEFAULT_FORMAT).render(makeStream(), END),
            b'[2016-04-15T20:17:00.310Z] "POST /api/v1/locations HTTP/1.1" 204 - 154 0 226 100 "10.0.35.28" '
            b'"nsq2http" "cc21d9b0-cf5c-432b-8c7e-98aeb7988cd2" "locations" "10.0.2.1:80"\n',
        )

    def test_unsetFields(self):
        """
        A protocol-error stream (no headers, no upstream, a flag) renders every unset field as C{-}.
        """
        s = Stream(_Codec(), [], "edge", None, START)
        s.status = 400
        s.responseFlags.append("DPE")
        self.assertEqual(
            compileFormat(DEFAULT_FORMAT).render(s, START),
            b'[2016-04-15T20:17:00.310Z] "- - HTTP/1.1" 400 DPE 0 0 0 - "-" "-" "-" "-" "-"\n',
        )

    def test_tcp(self):
        """
        For a TCP connection, HTTP-only operators are C{-} and the response code 0, as in Envoy's TCP logs.
        """
        record = TCPAccessRecord("db", IPv4Address("TCP", "10.0.0.9", 40000), 1.0, bytesReceived=12,
                                 bytesSent=34, upstreamHost=Host("tcp:10.0.2.1:5432", None, 1))
        self.assertEqual(
            compileFormat(DEFAULT_FORMAT, "tcp").render(record, 2.5),
            b'[1970-01-01T00:00:01.000Z] "- - -" 0 - 12 34 1500 - "-" "-" "-" "-" "10.0.2.1:5432"\n',
        )


class StartTimeTests(unittest.TestCase):
    """
    C{%START_TIME%} and its strftime formats.
    """

    def test_default(self):
        """
        The default is ISO 8601 in UTC with milliseconds, float noise rounded away (not .309).
        """
        self.assertEqual(render("%START_TIME%"), "2016-04-15T20:17:00.310Z")

    def test_strftime(self):
        """
        A strftime format is applied in UTC.
        """
        self.assertEqual(render("%START_TIME(%Y/%m/%d %H:%M:%S %z)%"), "2016/04/15 20:17:00 +0000")

    def test_fractions(self):
        """
        C{%s} is epoch seconds; C{%1f}..C{%9f} and C{%f} are truncated fractional digits.
        """
        s = makeStream(startTime=1527590590.528917)
        self.assertEqual(render("%START_TIME(%s.%3f)%", s), "1527590590.528")
        self.assertEqual(render("%START_TIME(%s.%1f|%6f|%9f|%f)%", s), "1527590590.5|528917|528917000|528917000")

    def test_floatNoise(self):
        """
        Times are rounded to the microsecond before truncating: 1.000001 is 1.0000009999... as a float.
        """
        self.assertEqual(render("%START_TIME(%s.%6f)%", makeStream(startTime=1.000001)), "1.000001")

    def test_literalPercent(self):
        """
        C{%%} in a START_TIME format is a literal C{%}, also next to a fraction.
        """
        self.assertEqual(render("%START_TIME(%S%%%3f)%"), "00%310")

    def test_newSecond(self):
        """
        The per-second cache is refreshed when the second changes.
        """
        fmt = compileFormat("%START_TIME%")
        self.assertEqual(fmt.render(makeStream(startTime=10.5), 11), b"1970-01-01T00:00:10.500Z\n")
        self.assertEqual(fmt.render(makeStream(startTime=11.25), 12), b"1970-01-01T00:00:11.250Z\n")
        self.assertEqual(fmt.render(makeStream(startTime=10.75), 12), b"1970-01-01T00:00:10.750Z\n")


class HeaderOperatorTests(unittest.TestCase):
    """
    C{%REQ%}, C{%RESP%} and C{%TRAILER%}.
    """

    def test_request(self):
        """
        A request header is found by its case-insensitive name.
        """
        self.assertEqual(render("%REQ(User-Agent)%"), "nsq2http")

    def test_firstMatch(self):
        """
        A repeated header logs its first value.
        """
        s = makeStream(requestHeaders=[(b"x-a", b"1"), (b"x-a", b"2")])
        self.assertEqual(render("%REQ(X-A)%", s), "1")

    def test_missing(self):
        """
        An absent header is C{-}.
        """
        self.assertEqual(render("%REQ(X-NOPE)%|%RESP(X-NOPE)%"), "-|-")

    def test_pseudoHeaders(self):
        """
        C{:METHOD}, C{:PATH}, C{:AUTHORITY} (and C{HOST}), C{:SCHEME} read the stream's fields.
        """
        self.assertEqual(render("%REQ(:METHOD)% %REQ(:PATH)% %REQ(:AUTHORITY)% %REQ(HOST)% %REQ(:SCHEME)%"),
                         "POST /api/v1/locations locations locations http")

    def test_emptyAuthority(self):
        """
        A request without Host logs C{-} for C{:AUTHORITY}.
        """
        self.assertEqual(render("%REQ(:AUTHORITY)%", makeStream(authority=b"")), "-")

    def test_fallback(self):
        """
        C{X?Y} uses Y only when X is absent.
        """
        self.assertEqual(render("%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"), "/api/v1/locations")
        s = makeStream(requestHeaders=[(b"x-envoy-original-path", b"/orig")])
        self.assertEqual(render("%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%", s), "/orig")
        self.assertEqual(render("%REQ(X-NOPE?USER-AGENT)%"), "nsq2http")
        self.assertEqual(render("%REQ(X-NOPE?X-NEITHER)%"), "-")

    def test_truncation(self):
        """
        C{:Z} keeps the first Z characters, with or without a fallback.
        """
        self.assertEqual(render("%REQ(X-REQUEST-ID):8%"), "cc21d9b0")
        self.assertEqual(render("%REQ(X-NOPE?:PATH):4%"), "/api")
        self.assertEqual(render("%REQ(:PATH):4%"), "/api")

    def test_response(self):
        """
        C{%RESP(X)%} reads response headers and C{:STATUS} the status.
        """
        self.assertEqual(render("%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% %RESP(:STATUS)%"), "100 204")

    def test_longSpellings(self):
        """
        Envoy's C{REQUEST_HEADER}, C{RESPONSE_HEADER}, C{RESPONSE_TRAILER} are the same operators.
        """
        self.assertIs(OPERATORS["REQUEST_HEADER"], OPERATORS["REQ"])
        self.assertEqual(render("%REQUEST_HEADER(:METHOD)% %RESPONSE_HEADER(:STATUS)%"), "POST 204")

    def test_trailersFromState(self):
        """
        C{%TRAILER(X)%} reads C{state["responseTrailers"]} when a stream records them there.
        """
        s = makeStream()
        self.assertEqual(render("%TRAILER(GRPC-STATUS)%", s), "-")
        s.state["responseTrailers"] = [(b"grpc-status", b"0")]
        self.assertEqual(render("%TRAILER(GRPC-STATUS)%", s), "0")

    def test_trailersSentAreLogged(self):
        """
        The trailers a stream sends (after the response filters ran) are what C{%TRAILER(X)%} shows.
        """
        from twistedmesh.testing import FilterHarness
        h = FilterHarness()
        h.request()
        h.respond(200, [(b"content-type", b"application/grpc")], [b"\0\0\0\0\0"],
                  trailers=[(b"grpc-status", b"14"), (b"grpc-message", b"unavailable")])
        self.assertEqual(render("%TRAILER(GRPC-STATUS)% %TRAILER(GRPC-MESSAGE)% %TRAILER(X-NONE)%", h.stream),
                         "14 unavailable -")

    def test_notUTF8(self):
        """
        Bytes that are not UTF-8 are logged as C{\\xNN}; UTF-8 as itself.
        """
        s = makeStream(requestHeaders=[(b"x-a", b"caf\xc3\xa9"), (b"x-b", b"\xff")])
        self.assertEqual(render("%REQ(X-A)% %REQ(X-B)%", s), "caf\u00e9 \\xff")


class FieldOperatorTests(unittest.TestCase):
    """
    The operators that read stream fields.
    """

    def test_protocol(self):
        """
        C{%PROTOCOL%} is C{HTTP/1.1} or C{HTTP/1.0}.
        """
        self.assertEqual(render("%PROTOCOL%"), "HTTP/1.1")
        self.assertEqual(render("%PROTOCOL%", makeStream(version=b"1.0")), "HTTP/1.0")

    def test_responseCode(self):
        """
        C{%RESPONSE_CODE%} is the status, 0 when nothing was sent.
        """
        self.assertEqual(render("%RESPONSE_CODE%"), "204")
        self.assertEqual(render("%RESPONSE_CODE%", makeStream(status=0)), "0")

    def test_responseCodeDetails(self):
        """
        C{%RESPONSE_CODE_DETAILS%} is the details string, or C{-}.
        """
        self.assertEqual(render("%RESPONSE_CODE_DETAILS%"), "-")
        self.assertEqual(render("%RESPONSE_CODE_DETAILS%", makeStream(responseCodeDetails="via_upstream")),
                         "via_upstream")

    def test_responseFlags(self):
        """
        C{%RESPONSE_FLAGS%} joins the flags with commas, or is C{-}.
        """
        self.assertEqual(render("%RESPONSE_FLAGS%"), "-")
        self.assertEqual(render("%RESPONSE_FLAGS%", makeStream(responseFlags=["UF", "URX"])), "UF,URX")

    def test_bytes(self):
        """
        C{%BYTES_RECEIVED%} and C{%BYTES_SENT%} are the body byte counts.
        """
        self.assertEqual(render("%BYTES_RECEIVED% %BYTES_SENT%", makeStream(bytesSent=99)), "154 99")

    def test_duration(self):
        """
        C{%DURATION%} is whole milliseconds, truncated, without float noise (0.23 s is 230, not 229).
        """
        s = makeStream(startTime=1.0)
        self.assertEqual(render("%DURATION%", s, 1.23), "230")
        self.assertEqual(render("%DURATION%", s, 1.2309), "230")

    def test_responseDuration(self):
        """
        C{%RESPONSE_DURATION%} uses C{state["responseStartTime"]}, or is C{-}.
        """
        s = makeStream(startTime=1.0)
        self.assertEqual(render("%RESPONSE_DURATION%", s), "-")
        s.state["responseStartTime"] = 1.05
        self.assertEqual(render("%RESPONSE_DURATION%", s), "50")

    def test_upstreamHost(self):
        """
        C{%UPSTREAM_HOST%} is the host's address from its endpoint string, in Envoy's ip:port form.
        """
        cases = [
            ("tcp:10.0.2.1:80", "10.0.2.1:80"),
            ("tcp:host=api.internal:port=8080:timeout=3", "api.internal:8080"),
            ("tcp6:\\:\\:1:9001", "[::1]:9001"),
            ("unix:/run/api.sock", "/run/api.sock"),
            ("something:else", "something:else"),
        ]
        for endpoint, expected in cases:
            self.assertEqual(render("%UPSTREAM_HOST%", makeStream(upstreamHost=Host(endpoint, None, 1))), expected)
        self.assertEqual(render("%UPSTREAM_HOST%", makeStream(upstreamHost=None)), "-")

    def test_upstreamCluster(self):
        """
        C{%UPSTREAM_CLUSTER%} is the cluster's name, or C{-}.
        """
        self.assertEqual(render("%UPSTREAM_CLUSTER%"), "-")
        self.assertEqual(render("%UPSTREAM_CLUSTER%", makeStream(upstreamCluster=SimpleNamespace(name="api"))),
                         "api")

    def test_transportFailureReason(self):
        """
        C{%UPSTREAM_TRANSPORT_FAILURE_REASON%} is C{state["upstreamTransportFailureReason"]}, or C{-}.
        """
        s = makeStream()
        self.assertEqual(render("%UPSTREAM_TRANSPORT_FAILURE_REASON%", s), "-")
        s.state["upstreamTransportFailureReason"] = "TLS_error:CERTIFICATE_VERIFY_FAILED"
        self.assertEqual(render("%UPSTREAM_TRANSPORT_FAILURE_REASON%", s), "TLS_error:CERTIFICATE_VERIFY_FAILED")

    def test_downstreamRemoteAddress(self):
        """
        C{%DOWNSTREAM_REMOTE_ADDRESS%} is ip:port, [ip6]:port, a UNIX path, or C{-}.
        """
        self.assertEqual(render("%DOWNSTREAM_REMOTE_ADDRESS%"), "10.0.35.28:51234")
        six = makeStream(downstreamAddress=IPv6Address("TCP", "::1", 443))
        self.assertEqual(render("%DOWNSTREAM_REMOTE_ADDRESS%", six), "[::1]:443")
        unix = makeStream(downstreamAddress=UNIXAddress(b"/run/mesh.sock"))
        self.assertEqual(render("%DOWNSTREAM_REMOTE_ADDRESS%", unix), "/run/mesh.sock")
        self.assertEqual(render("%DOWNSTREAM_REMOTE_ADDRESS%", makeStream(downstreamAddress=None)), "-")

    def test_peerURISAN(self):
        """
        C{%DOWNSTREAM_PEER_URI_SAN%} is C{state["peerUriSan"]} (several joined by commas), or C{-}.
        """
        s = makeStream()
        self.assertEqual(render("%DOWNSTREAM_PEER_URI_SAN%", s), "-")
        s.state["peerUriSan"] = ["spiffe://mesh/a", "spiffe://mesh/b"]
        self.assertEqual(render("%DOWNSTREAM_PEER_URI_SAN%", s), "spiffe://mesh/a,spiffe://mesh/b")
        s.state["peerUriSan"] = "spiffe://mesh/c"
        self.assertEqual(render("%DOWNSTREAM_PEER_URI_SAN%", s), "spiffe://mesh/c")

    def test_requestId(self):
        """
        C{%REQUEST_ID%} is the x-request-id header.
        """
        self.assertEqual(render("%REQUEST_ID%"), "cc21d9b0-cf5c-432b-8c7e-98aeb7988cd2")
        self.assertEqual(render("%REQUEST_ID%", makeStream(requestHeaders=[])), "-")

    def test_routeName(self):
        """
        C{%ROUTE_NAME%} is TABLE/NAME, or C{-} when no route matched.
        """
        self.assertEqual(render("%ROUTE_NAME%"), "-")
        self.assertEqual(render("%ROUTE_NAME%", makeStream(route=SimpleNamespace(table="main", name="api"))),
                         "main/api")

    def test_traceId(self):
        """
        C{%TRACE_ID%} is the trace id of the request's trace context (a new trace's too), C{-} without one;
        C{null} in JSON, C{-} in a TCP line.
        """
        import random

        from twistedmesh.observability.tracing import TraceContext, propagate

        s = makeStream()
        self.assertEqual(render("%TRACE_ID%", s), "-")
        s.state["trace"] = TraceContext(b"4bf92f3577b34da6a3ce929d0e0e4736", b"00f067aa0ba902b7", None, True, "w3c")
        self.assertEqual(render("%TRACE_ID%", s), "4bf92f3577b34da6a3ce929d0e0e4736")
        s.state["trace"] = new = propagate([], random.Random(1), 0.0)
        self.assertEqual(render("%TRACE_ID%", s), new.traceId.decode("ascii"))
        self.assertEqual(json.loads(compileJSONFormat([("t", "%TRACE_ID%")]).render(makeStream(), END)), {"t": None})
        self.assertEqual(render("%TRACE_ID%", TCPAccessRecord("db", None, 1.0), protocol="tcp"), "-")

    def test_terminationDetails(self):
        """
        C{%CONNECTION_TERMINATION_DETAILS%} is a TCP record's C{terminationDetails} (a stream's state entry).
        """
        record = TCPAccessRecord("db", None, 1.0, terminationDetails="idle_timeout")
        self.assertEqual(render("%CONNECTION_TERMINATION_DETAILS%", record, 2.0, "tcp"), "idle_timeout")
        self.assertEqual(render("%CONNECTION_TERMINATION_DETAILS%"), "-")

    def test_literals(self):
        """
        Text between operators is kept, and C{%%} is a literal C{%}.
        """
        self.assertEqual(render("100%% [%RESPONSE_CODE%]%%"), "100% [204]%")
        self.assertEqual(compileFormat("no operators").render(None, 0), b"no operators\n")


class CompileErrorTests(unittest.TestCase):
    """
    Bad formats fail at compile time with a message a user can act on.
    """

    def assertError(self, fmt: str, fragment: str) -> None:
        """
        Compiling C{fmt} raises a L{FormatError} whose message contains C{fragment}.
        """
        e = self.assertRaises(FormatError, compileFormat, fmt)
        self.assertIn(fragment, str(e))

    def test_unknownOperator(self):
        """
        An unknown operator is an error with a suggestion.
        """
        self.assertError("%RESPONSE_COED%", "did you mean %RESPONSE_CODE%?")

    def test_argumentNotTaken(self):
        """
        An argument to an operator that takes none is an error.
        """
        self.assertError("%DURATION(ms)%", "takes no argument")

    def test_argumentMissing(self):
        """
        C{%REQ%} without a header is an error.
        """
        self.assertError("%REQ%", "needs an argument")

    def test_lengthNotTaken(self):
        """
        C{:Z} on an operator that does not truncate is an error, and so is C{:0}.
        """
        self.assertError("%DURATION:3%", "takes no :LENGTH")
        self.assertError("%REQ(X-A):0%", "always log nothing")

    def test_strayPercent(self):
        """
        A C{%} that starts no operator is an error that mentions C{%%}.
        """
        self.assertError("50% of %DURATION%", "%% for a literal %")
        self.assertError("%duration%", "starts no command operator")

    def test_badHeader(self):
        """
        Bad header names, three-way fallbacks and unknown pseudo-headers are errors.
        """
        self.assertError("%REQ(X A)%", "is not a header name")
        self.assertError("%REQ(A?B?C)%", "NAME?FALLBACK")
        self.assertError("%REQ(:STATUS)%", "not a pseudo-header here")
        self.assertError("%TRAILER(:PATH)%", "not a pseudo-header here")

    def test_badStartTime(self):
        """
        A START_TIME format ending in a lone C{%} is an error.
        """
        self.assertError("%START_TIME(%H:%)%", "lone %")

    def test_jsonErrors(self):
        """
        A JSON format names the field of a bad operator, and rejects empty and repeated keys.
        """
        e = self.assertRaises(FormatError, compileJSONFormat, [("code", "%RESPONSE_CODES%")])
        self.assertIn("JSON field 'code'", str(e))
        self.assertRaises(FormatError, compileJSONFormat, [("", "%DURATION%")])
        e = self.assertRaises(FormatError, compileJSONFormat, [("d", "%DURATION%"), ("d", "%DURATION%")])
        self.assertIn("twice", str(e))


class JSONTests(unittest.TestCase):
    """
    JSON lines: typed values, key order, escaping.
    """

    def line(self, fields: List[Tuple[str, str]], stream=None, protocol: str = "http") -> Dict:
        """
        The JSON object rendered for C{fields}, checking it is one line.
        """
        text = compileJSONFormat(fields, protocol).render(stream if stream is not None else makeStream(), END)
        self.assertTrue(text.endswith(b"}\n"))
        self.assertNotIn(b"\n", text[:-1])
        return json.loads(text)

    def test_types(self):
        """
        Numbers are numbers, strings strings, unset values null and empty headers C{""}.
        """
        s = makeStream(requestHeaders=[(b"x-empty", b"")])
        self.assertEqual(
            self.line([("code", "%RESPONSE_CODE%"), ("duration", "%DURATION%"), ("method", "%REQ(:METHOD)%"),
                       ("flags", "%RESPONSE_FLAGS%"), ("empty", "%REQ(X-EMPTY)%"), ("start", "%START_TIME%"),
                       ("rd", "%RESPONSE_DURATION%")], s),
            {"code": 204, "duration": 226, "method": "POST", "flags": None, "empty": "",
             "start": "2016-04-15T20:17:00.310Z", "rd": None},
        )

    def test_mixedTemplate(self):
        """
        A template with text around an operator is a string; unset operators in it are C{-}.
        """
        self.assertEqual(self.line([("d", "%DURATION%ms"), ("x", "<%REQ(X-NOPE)%>"), ("k", "const")]),
                         {"d": "226ms", "x": "<->", "k": "const"})

    def test_order(self):
        """
        Keys come out in the configured order.
        """
        text = compileJSONFormat([("z", "%DURATION%"), ("a", "%RESPONSE_CODE%")]).render(makeStream(), END)
        self.assertEqual(text, b'{"z":226,"a":204}\n')

    def test_escaping(self):
        """
        Quotes, backslashes and non-ASCII in values are escaped; the line stays ASCII.
        """
        s = makeStream(requestHeaders=[(b"user-agent", b'say "hi" \\ caf\xc3\xa9')])
        text = compileJSONFormat([("ua", "%REQ(USER-AGENT)%")]).render(s, END)
        self.assertTrue(text.isascii())
        self.assertEqual(json.loads(text), {"ua": 'say "hi" \\ caf\u00e9'})

    def test_tcp(self):
        """
        HTTP-only operators are null in a TCP line, and the response code 0.
        """
        record = TCPAccessRecord("db", None, 1.0, bytesSent=7)
        self.assertEqual(self.line([("m", "%REQ(:METHOD)%"), ("c", "%RESPONSE_CODE%"), ("s", "%BYTES_SENT%")],
                                   record, "tcp"),
                         {"m": None, "c": 0, "s": 7})

    def test_loggerDefaultJSON(self):
        """
        C{json = true} without fields logs the default format's fields by name.
        """
        sink = MemorySink()
        AccessLogger(config(json=True), Clock(), reactor, sink=sink).log(makeStream(), END)
        entry = json.loads(sink.lines[0])
        self.assertEqual((entry["method"], entry["response_code"], entry["upstream_host"], entry["duration"]),
                         ("POST", 204, "10.0.2.1:80", 226))


class FilterTests(unittest.TestCase):
    """
    Status, duration and flag filters on log lines.
    """

    def logged(self, stream, end: float = END, **items) -> bool:
        """
        Whether a logger configured with C{items} writes a line for C{stream}.
        """
        sink = MemorySink()
        AccessLogger(config(**items), Clock(), reactor, sink=sink).log(stream, end)
        return bool(sink.lines)

    def test_statusConditions(self):
        """
        C{5xx}, C{>=N}, C{<N}, C{=0}, C{!=N} and bare codes select what they say.
        """
        self.assertEqual(parseStatusCondition("5xx"), frozenset(range(500, 600)))
        self.assertEqual(parseStatusCondition(">=400"), frozenset(range(400, 1000)))
        self.assertEqual(parseStatusCondition("< 300"), frozenset(range(0, 300)))
        self.assertEqual(parseStatusCondition("=0"), frozenset([0]))
        self.assertEqual(parseStatusCondition("404"), frozenset([404]))
        self.assertNotIn(200, parseStatusCondition("!=200"))
        self.assertEqual(statusCodes(["404", "5xx"]), frozenset([404]) | frozenset(range(500, 600)))
        self.assertRaises(ValueError, parseStatusCondition, "6xx")

    def test_status(self):
        """
        A line is written only when some status condition holds.
        """
        self.assertFalse(self.logged(makeStream(status=200), status=("5xx", "404")))
        self.assertTrue(self.logged(makeStream(status=503), status=("5xx", "404")))
        self.assertTrue(self.logged(makeStream(status=404), status=("5xx", "404")))

    def test_durationMin(self):
        """
        A line is written only for requests at least C{duration_min} long.
        """
        s = makeStream(startTime=1.0)
        self.assertFalse(self.logged(s, 1.4999, duration_min=0.5))
        self.assertTrue(self.logged(s, 1.5, duration_min=0.5))

    def test_flags(self):
        """
        A line is written only when the stream has one of the listed flags; C{any} takes any flag.
        """
        self.assertFalse(self.logged(makeStream(), flags=("UF", "UH")))
        self.assertFalse(self.logged(makeStream(responseFlags=["NR"]), flags=("UF", "UH")))
        self.assertTrue(self.logged(makeStream(responseFlags=["URX", "UH"]), flags=("UF", "UH")))
        self.assertFalse(self.logged(makeStream(), flags=("any",)))
        self.assertTrue(self.logged(makeStream(responseFlags=["NR"]), flags=("any",)))

    def test_allMustPass(self):
        """
        With several filters, a line is written only when every one passes.
        """
        slow503 = makeStream(status=503, startTime=1.0, responseFlags=["UF"])
        items = dict(status=("5xx",), duration_min=1.0, flags=("UF",))
        self.assertTrue(self.logged(slow503, 2.0, **items))
        self.assertFalse(self.logged(slow503, 1.5, **items))
        self.assertFalse(self.logged(makeStream(status=200, startTime=1.0, responseFlags=["UF"]), 2.0, **items))
        self.assertFalse(self.logged(makeStream(status=503, startTime=1.0), 2.0, **items))

    def test_noFormattingWhenFiltered(self):
        """
        A filtered-out line is never rendered (the filters run first).
        """
        logger = AccessLogger(config(status=("5xx",), flags=("UF",)), Clock(), reactor, sink=MemorySink())
        rendered = []
        logger._renderHTTP = lambda s, e: rendered.append(s) or b"x\n"
        logger.log(makeStream(status=200), END)
        logger.log(makeStream(status=503), END)
        self.assertEqual(rendered, [])

    def test_tcpFilters(self):
        """
        TCP lines go through the duration and flag filters.
        """
        sink = MemorySink()
        logger = AccessLogger(config(flags=("UF",)), Clock(), reactor, sink=sink)
        logger.logTCP(TCPAccessRecord("db", None, 1.0), 2.0)
        logger.logTCP(TCPAccessRecord("db", None, 1.0, responseFlags=["UF"]), 2.0)
        self.assertEqual(len(sink.lines), 1)
        self.assertIn(b" UF ", sink.lines[0])


class LoggerTests(unittest.TestCase):
    """
    L{AccessLogger} outside its filters.
    """

    def test_customFormat(self):
        """
        A configured text format is used for HTTP lines and, with HTTP fields as C{-}, for TCP lines.
        """
        sink = MemorySink()
        logger = AccessLogger(config(format="%REQ(:METHOD)% %RESPONSE_CODE% %BYTES_SENT%"), Clock(), reactor,
                              sink=sink)
        logger.log(makeStream(bytesSent=5), END)
        logger.logTCP(TCPAccessRecord("db", None, 1.0, bytesSent=9), 2.0)
        self.assertEqual(sink.lines, [b"POST 204 5\n", b"- 0 9\n"])

    def test_brokenGetterCostsOneLine(self):
        """
        A getter that raises is logged as a failure; the caller does not see it.
        """
        sink = MemorySink()
        logger = AccessLogger(config(format="%UPSTREAM_HOST%"), Clock(), reactor, sink=sink)
        logger.log(makeStream(upstreamHost=object()), END)
        self.assertEqual(sink.lines, [])
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)

    def test_ownSink(self):
        """
        Without a sink, the logger opens C{config.path} and L{AccessLogger.close} writes and closes it.
        """
        path = self.mktemp()
        logger = AccessLogger(config(path=path, format="%RESPONSE_CODE%"), Clock(), reactor)
        logger.log(makeStream(), END)
        d = logger.close()

        def closed(_):
            with open(path) as f:
                self.assertEqual(f.read(), "204\n")

        return d.addCallback(closed)


class FileSinkTests(unittest.TestCase):
    """
    L{FileSink}: a real file written by the real writer thread, its timer on a L{Clock}.
    """

    def sink(self, path: str = None, **kw) -> FileSink:
        """
        A L{FileSink} on a fresh temporary file (or C{path}), closed after the test.
        """
        self.clock = Clock()
        self.path = path or self.mktemp()
        sink = FileSink(self.path, self.clock, reactor, **kw)
        self.addCleanup(sink.close)
        return sink

    def contents(self, path: str = None) -> str:
        """
        The file's text.
        """
        with open(path or self.path, encoding="utf-8") as f:
            return f.read()

    def test_timer(self):
        """
        Lines wait in memory until the flush timer fires, then the thread writes them.
        """
        sink = self.sink(flushInterval=1.0)
        sink.write(b"a\n")
        sink.write(b"b\n")
        self.clock.advance(0.9)
        self.assertEqual((sink.pending, self.contents()), (2, ""))
        self.clock.advance(0.1)
        self.assertEqual(sink.pending, 0)  # handed to the writer by the timer, not by the flush below
        return sink.flush().addCallback(lambda _: self.assertEqual(self.contents(), "a\nb\n"))

    def test_logFunction(self):
        """
        A logger from L{FileSink.logFunction} renders and queues in one call, with what L{FileSink.write}
        does after an append: the timer armed by the first line of a batch, a full batch handed off at
        once, lines after the close dropped and counted, a render that raises costing its line only.
        """
        dropped = Counter("access_log.dropped", "access_log_dropped", ())
        sink = self.sink(batchLines=3, flushInterval=1.0, dropped=dropped)
        failed = []

        def render(record, endTime):
            if record == "bad":
                raise ValueError(record)
            return record.encode() + b"\n"

        log = sink.logFunction(render, failed.append)
        log("a", 0)
        self.assertTrue(self.clock.getDelayedCalls())
        log("bad", 0)
        self.assertEqual((failed, sink.pending), (["bad"], 1))
        log("b", 0)
        log("c", 0)
        self.assertEqual((sink.pending, sink.queued), (0, 3))  # a full batch, at once
        log("d", 0)
        self.clock.advance(1.0)
        self.assertEqual((sink.pending, sink.queued), (0, 4))  # the timer's hand-off

        def flushed(_):
            self.assertEqual(self.contents(), "a\nb\nc\nd\n")
            closing = sink.close()
            log("late", 0)
            log("later", 0)
            self.assertEqual((dropped.value, sink.pending), (2, 0))
            return closing
        return sink.flush().addCallback(flushed)

    def test_unfilteredLoggerOneCall(self):
        """
        An access logger without filters, on a file, logs through its sink's L{FileSink.logFunction}; with
        a filter, through its own method. Both write the same lines.
        """
        from twistedmesh.config.accesslog import AccessLogConfig
        self.clock = Clock()
        sinks = []
        for status in ([], ["5xx"]):
            path = self.mktemp()
            sink = FileSink(path, self.clock, reactor)
            self.addCleanup(sink.close)
            logger = AccessLogger(AccessLogConfig(path=path, format="%RESPONSE_CODE% %REQ(:PATH)%", status=status),
                                  self.clock, reactor, sink=sink)
            self.assertEqual(type(logger.log).__name__, "function" if not status else "method")
            logger.log(makeStream(status=503), END)
            logger.log(makeStream(status=200), END)
            sinks.append((sink, path))

        def check(_):
            self.assertEqual([self.contents(path) for _, path in sinks],
                             ["503 /api/v1/locations\n200 /api/v1/locations\n", "503 /api/v1/locations\n"])
        return DeferredList([sink.flush() for sink, _ in sinks]).addCallback(check)

    def test_fullBatch(self):
        """
        A full batch is handed off at once, whatever the timer.
        """
        sink = self.sink(batchLines=3)
        for line in (b"1\n", b"2\n", b"3\n"):
            sink.write(line)
        self.assertEqual((sink.pending, sink.queued), (0, 3))
        return sink.flush().addCallback(lambda _: self.assertEqual(self.contents(), "1\n2\n3\n"))

    def test_flush(self):
        """
        L{FileSink.flush} fires once what was written before it is in the file.
        """
        sink = self.sink()
        sink.write("caf\u00e9\n".encode())
        return sink.flush().addCallback(lambda _: self.assertEqual(self.contents(), "caf\u00e9\n"))

    def test_close(self):
        """
        L{FileSink.close} writes what is pending; later lines are dropped and counted; every close waits.
        """
        dropped = Counter("access_log.dropped", "access_log_dropped", ())
        sink = self.sink(dropped=dropped)
        sink.write(b"last\n")
        first, second = sink.close(), sink.close()
        sink.write(b"too late\n")
        self.assertEqual(dropped.value, 1)

        def closed(_):
            self.assertEqual(self.contents(), "last\n")
            sink._thread.join(5)  # it reported the close and is returning
            self.assertFalse(sink._thread.is_alive())
            return second

        return first.addCallback(closed)

    def test_reopen(self):
        """
        After logrotate renames the file, L{FileSink.reopen} makes a new one; lines logged before the
        reopen still go to the old file.
        """
        sink = self.sink()
        sink.write(b"before rename\n")
        d = sink.flush()

        def rotate(_):
            os.rename(self.path, self.path + ".1")
            sink.write(b"before reopen\n")
            return sink.reopen()

        def reopened(_):
            sink.write(b"after reopen\n")
            return sink.flush()

        def check(_):
            self.assertEqual(self.contents(self.path + ".1"), "before rename\nbefore reopen\n")
            self.assertEqual(self.contents(), "after reopen\n")

        return d.addCallback(rotate).addCallback(reopened).addCallback(check)

    def test_failedReopen(self):
        """
        A reopen that cannot open the file is logged, and lines keep going to the old one.
        """
        base = self.mktemp()
        os.makedirs(base)
        path = os.path.join(base, "access.log")
        sink = self.sink(path)
        moved = base + ".moved"
        os.rename(base, moved)
        with open(base, "w"):
            pass  # a file where the directory was: opening base/access.log fails

        def reopened(_):
            sink.write(b"still here\n")
            return sink.flush()

        def check(_):
            self.assertEqual(self.contents(os.path.join(moved, "access.log")), "still here\n")

        return sink.reopen().addCallback(reopened).addCallback(check)

    def test_dropWhenBehind(self):
        """
        When the lines handed off and not yet written would pass C{maxQueuedLines}, the batch is dropped
        and counted; control actions still go through.
        """
        dropped = Counter("access_log.dropped", "access_log_dropped", ())
        sink = self.sink(batchLines=2, maxQueuedLines=3, dropped=dropped)
        for line in (b"1\n", b"2\n", b"3\n", b"4\n"):
            sink.write(line)
        # The writer reports back through the reactor, which has not run: lines 1-2 still count as queued.
        self.assertEqual((sink.queued, dropped.value), (2, 2))

        def check(_):
            self.assertEqual(self.contents(), "1\n2\n")
            self.assertEqual(sink.queued, 0)
            sink.write(b"5\n")
            return sink.flush().addCallback(lambda _: self.assertEqual(self.contents(), "1\n2\n5\n"))

        return sink.flush().addCallback(check)

    def test_badPath(self):
        """
        A file that cannot be opened fails at construction, not later in the thread.
        """
        self.assertRaises(OSError, FileSink, os.path.join(self.mktemp(), "missing", "a.log"), Clock(), reactor)

    def test_stdoutNotClosed(self):
        """
        A stdout sink writes to file descriptor 1 and leaves it open when closed.
        """
        sink = FileSink("stdout", Clock(), reactor)

        def closed(_):
            os.fstat(1)  # raises if descriptor 1 was closed

        return sink.close().addCallback(closed)

    def test_sharedSinks(self):
        """
        L{AccessLogSinks} gives listeners logging to the same target one sink, at the shortest interval.
        """
        sinks = AccessLogSinks(Clock(), reactor)
        path = self.mktemp()
        a, b = sinks.get(path, 2.0), sinks.get(path, 0.5)
        self.assertIs(a, b)
        self.assertEqual(a.flushInterval, 0.5)
        a.write(b"x\n")
        return sinks.close().addCallback(lambda _: self.assertEqual(self.contents(path), "x\n"))


class ConfigTests(unittest.TestCase):
    """
    The C{access_log.*} keys of a listener section.
    """

    def parse(self, protocol: str = None, **items: str):
        """
        Parse a listener section of C{items} (dots written as C{__}) the way the loader would; return the
        config and the errors as C{"key: why"} strings.
        """
        errors: List[ConfigError] = []
        o = Options("t.ini", "listener:edge", {k.replace("__", "."): v for k, v in items.items()}, errors)
        result = parseAccessLog(o, protocol)
        o.finish()
        return result, [f"{e.key}: {e.why}" for e in errors]

    def test_none(self):
        """
        Without C{access_log}, there is no access log.
        """
        self.assertEqual(self.parse(), (None, []))

    def test_defaults(self):
        """
        C{access_log = stdout} alone means the default format, flushed every second, no filters.
        """
        self.assertEqual(self.parse(access_log="stdout"), (AccessLogConfig(path="stdout"), []))

    def test_everything(self):
        """
        Every key is read, normalised and checked.
        """
        path = self.mktemp()
        os.makedirs(path)
        result, errors = self.parse(
            access_log=os.path.join(path, "access.log"),
            access_log__format="[%START_TIME%]\n%REQ(:METHOD)%\n%RESPONSE_CODE%\\n",
            access_log__flush_interval="250ms",
            access_log__status="5xx, >= 400",
            access_log__duration_min="500ms",
            access_log__flags="UF, UH",
        )
        self.assertEqual(errors, [])
        self.assertEqual(result, AccessLogConfig(
            path=os.path.join(path, "access.log"), format="[%START_TIME%] %REQ(:METHOD)% %RESPONSE_CODE%",
            flush_interval=0.25, status=("5xx", ">=400"), duration_min=0.5, flags=("UF", "UH"),
        ))

    def test_json(self):
        """
        C{json_format} is one C{NAME = TEMPLATE} per line, in order.
        """
        result, errors = self.parse(access_log="stderr", access_log__json="true",
                                    access_log__json_format="\ncode = %RESPONSE_CODE%\nhost = %REQ(:AUTHORITY)%")
        self.assertEqual(errors, [])
        self.assertEqual(result.json_format, (("code", "%RESPONSE_CODE%"), ("host", "%REQ(:AUTHORITY)%")))
        self.assertTrue(result.json)

    def test_keysWithoutPath(self):
        """
        C{access_log.*} keys without C{access_log} are errors.
        """
        self.assertEqual(self.parse(access_log__status="5xx")[1],
                         ["access_log.status: needs `access_log = PATH | stdout | stderr`"])

    def test_badFormat(self):
        """
        An unknown operator is a config error on the format key.
        """
        errors = self.parse(access_log="stdout", access_log__format="%DURATON%")[1]
        self.assertEqual(errors, ["access_log.format: unknown command operator %DURATON% "
                                  "(did you mean %DURATION%?)"])

    def test_jsonConflicts(self):
        """
        A text format with C{json = true}, or C{json_format} without it, is an error; so is a bad field line.
        """
        self.assertIn("access_log.format: is for text lines: with access_log.json = true, use "
                      "access_log.json_format",
                      self.parse(access_log="stdout", access_log__json="yes", access_log__format="%DURATION%")[1])
        self.assertIn("access_log.json_format: needs `access_log.json = true`",
                      self.parse(access_log="stdout", access_log__json_format="d = %DURATION%")[1])
        errors = self.parse(access_log="stdout", access_log__json="true", access_log__json_format="%DURATION%")[1]
        self.assertEqual(len(errors), 1)
        self.assertIn("is not NAME = %OPERATOR%", errors[0])

    def test_badValues(self):
        """
        A zero flush interval, bad status conditions and unknown flags are errors.
        """
        errors = self.parse(access_log="stdout", access_log__flush_interval="0s", access_log__status="5xx, 2oo",
                            access_log__flags="UF, XX, any")[1]
        self.assertEqual(len(errors), 4)
        self.assertIn("access_log.flush_interval: must be more than 0", errors[0])
        self.assertIn("'2oo' is not a status condition", errors[1])
        self.assertIn("'XX' is not a response flag", errors[2])
        self.assertIn("`any` already matches every flag", errors[3])

    def test_statusOnTCP(self):
        """
        A status filter on a TCP listener is an error.
        """
        self.assertEqual(self.parse("tcp", access_log="stdout", access_log__status="5xx")[1],
                         ["access_log.status: only applies to HTTP listeners: a TCP connection has no status"])

    def test_badPath(self):
        """
        A path in a missing directory, or a directory, is an error.
        """
        missing = os.path.join(self.mktemp(), "access.log")
        self.assertIn("does not exist", self.parse(access_log=missing)[1][0])
        existing = os.path.dirname(os.path.abspath(self.mktemp()))
        self.assertIn("is a directory", self.parse(access_log=existing)[1][0])

    def test_misspelledKey(self):
        """
        A misspelled access_log key is reported as unknown with a suggestion.
        """
        errors = self.parse(access_log="stdout", access_log__fromat="%DURATION%")[1]
        self.assertEqual(errors, ["access_log.fromat: unknown key (did you mean `access_log.format`?)"])


def byGetters(fmt, record, end: float) -> str:
    """
    The line C{fmt} (a compiled format) gives when each of its getters is called in turn: the reference the
    compiled render function must match, character for character.
    """
    return "".join(s if isinstance(s, str) else s(record, end) for s in fmt.segments)


class CompiledFunctionTests(unittest.TestCase):
    """
    A format compiles to one render function that computes the common operators in place (one scan of the
    request headers for all of them) and calls the getters of the others: its lines are exactly the
    getters' lines.
    """

    # Every operator, with the header variants the inlined code handles differently: several names, a
    # fallback, a truncation, a header that is present but empty.
    TEXT = (
        '[%START_TIME%] %START_TIME(%s.%6f)% "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
        '%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% '
        '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% %RESP(SERVER):3% %RESP(:STATUS)% "%REQ(X-FORWARDED-FOR)%" '
        '"%REQ(USER-AGENT):4%" "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" %REQ(HOST)% %REQ(:SCHEME)% '
        '%REQ(X-EMPTY)% %REQ(X-EMPTY?USER-AGENT)% %REQ(X-NOPE?X-EMPTY)% %REQUEST_HEADER(X-A)% %REQUEST_ID% '
        '"%UPSTREAM_HOST%" %UPSTREAM_CLUSTER% %TRAILER(GRPC-STATUS)% %RESPONSE_DURATION% '
        '%RESPONSE_CODE_DETAILS% %DOWNSTREAM_REMOTE_ADDRESS% %ROUTE_NAME% %CONNECTION_TERMINATION_DETAILS% '
        '%TRACE_ID% 100%%'
    )

    def records(self) -> List[Stream]:
        """
        Streams that take each branch: headers present, absent, empty, repeated, not UTF-8; fields empty;
        flags; no upstream host; versions known and unknown.
        """
        full = makeStream(responseFlags=["UF", "URX"], version=b"2", status=503, bytesSent=17)
        full.requestHeaders = full.requestHeaders + [
            (b"x-envoy-original-path", b"/orig"), (b"x-empty", b""), (b"x-a", b"first"), (b"x-a", b"second"),
            (b"user-agent", b"second agent"), (b"host", b"ignored"),
        ]
        full.responseHeaders = [(b"server", b"envoy"), (b"x-envoy-upstream-service-time", b"7"),
                                (b"x-envoy-upstream-service-time", b"8")]
        full.state["responseTrailers"] = [(b"grpc-status", b"14")]
        full.state["responseStartTime"] = START + 0.1
        bare = makeStream(requestHeaders=[], responseHeaders=[], authority=b"", upstreamHost=None, status=0,
                          version=b"3", method=b"GET")
        odd = makeStream(requestHeaders=[(b"user-agent", b"caf\xc3\xa9 \xff"), (b"x-request-id", b"\xfe")],
                         path=b"/\xff", version=b"", scheme=b"")
        return [makeStream(), full, bare, odd, makeStream(startTime=0.0009999999), makeStream(startTime=59.9995)]

    def test_textMatchesGetters(self):
        """
        Every operator of a text format renders as its getter does, for HTTP and TCP records.
        """
        fmt = compileFormat(self.TEXT)
        for record in self.records():
            expected = byGetters(fmt, record, END)
            self.assertEqual(fmt.text(record, END), expected)
            self.assertEqual(fmt.render(record, END), expected.encode())
        tcp = compileFormat(self.TEXT, "tcp")
        for record in (TCPAccessRecord("db", IPv4Address("TCP", "10.0.0.9", 4000), START, 10, 20,
                                       Host("tcp:10.1.1.1:5432", None, 1), None, ["UF"], "idle timeout"),
                       TCPAccessRecord("db", None, START)):
            expected = byGetters(tcp, record, END)
            self.assertEqual(tcp.text(record, END), expected)
            self.assertEqual(tcp.render(record, END), expected.encode())

    def test_jsonMatchesGetters(self):
        """
        Every operator of a JSON format renders as its getter does (typed: null, "", numbers).
        """
        fields = [(f"f{i}", "%" + source.split("%")[1] + "%") for i, source in
                  enumerate(self.TEXT.replace("%%", "").split("% ")) if source.count("%") >= 1]
        fields = [(key, template) for key, template in fields if template.count("%") == 2 and template != "%%"]
        fields.append(("mixed", "%REQ(:METHOD)% %REQ(X-NOPE)% %DURATION%"))
        self.assertGreater(len(fields), 25)
        fmt = compileJSONFormat(fields)
        for record in self.records():
            line = fmt.render(record, END)
            self.assertEqual(line, byGetters(fmt, record, END).encode())
            self.assertEqual(fmt.text(record, END), byGetters(fmt, record, END))
            json.loads(line)

    def test_defaultFormatInlined(self):
        """
        The default format calls no getter (but the protocol's, for a version it does not know), and
        scans the request headers once for its four header operators.
        """
        source = compileFormat(DEFAULT_FORMAT).source
        # Two functions: the bytes one, and the text one it falls back on for a line that is not ASCII.
        self.assertEqual(source.count("def "), 2)
        self.assertNotIn("decode()", source)  # the bytes one decodes nothing
        self.assertEqual(len(set(re.findall(r"(c[0-9]+)\(r, e\)", source))), 1)
        self.assertEqual(source.count("in r.requestHeaders"), 2)
        self.assertEqual(source.count("in r.responseHeaders"), 2)

    def test_notUTF8FallsBack(self):
        """
        A value that is not UTF-8 makes the whole line render the safe way; the next line is fast again.
        """
        fmt = compileFormat('%REQ(USER-AGENT)% %REQ(X-NOPE)% "%REQ(:PATH)%" %RESPONSE_CODE%')
        s = makeStream(requestHeaders=[(b"user-agent", b"caf\xc3\xa9 \xff")], path=b"/\xfe")
        self.assertEqual(fmt.render(s, END), 'caf\u00e9 \\xff - "/\\xfe" 204\n'.encode())
        self.assertEqual(fmt.render(makeStream(), END), b'nsq2http - "/api/v1/locations" 204\n')
        # UTF-8 that is not ASCII is written as it came.
        s = makeStream(requestHeaders=[(b"user-agent", b"caf\xc3\xa9")])
        self.assertEqual(fmt.render(s, END), b'caf\xc3\xa9 - "/api/v1/locations" 204\n')

    def test_literalPercentWithoutOperators(self):
        """
        A line with no operator left (a TCP line of HTTP-only ones, a JSON key with a %) has single %s.
        """
        s = makeStream()
        self.assertEqual(compileFormat("100%% done").render(s, END), b"100% done\n")
        self.assertEqual(compileFormat("%RESPONSE_CODE% %REQ(:PATH)% 50%%", "tcp").render(s, END), b"0 - 50%\n")
        self.assertEqual(compileJSONFormat([("p%", "%REQ(:PATH)%")], "tcp").render(s, END), b'{"p%":null}\n')

    def test_unencodableText(self):
        """
        Text that cannot be UTF-8 (a lone surrogate from some error message) is escaped, not a lost line,
        in a format of non-ASCII text and in JSON as in the bytes path.
        """
        s = makeStream()
        s.state["upstreamTransportFailureReason"] = "bad \udcff"
        for fmt in ("\u00e9 %UPSTREAM_TRANSPORT_FAILURE_REASON%", "a %UPSTREAM_TRANSPORT_FAILURE_REASON%"):
            line = compileFormat(fmt).render(s, END)
            self.assertTrue(line.endswith(b"bad \\udcff\n"), line)
        line = compileJSONFormat([("r", "x %UPSTREAM_TRANSPORT_FAILURE_REASON%")]).render(s, END)
        self.assertEqual(json.loads(line), {"r": "x bad \udcff"})

    def test_emptyFlag(self):
        """
        Flags that join to nothing log as C{-} in both paths.
        """
        fmt = compileFormat("%RESPONSE_FLAGS%")
        self.assertEqual(fmt.render(makeStream(responseFlags=[""]), END), b"-\n")
        self.assertEqual(fmt.text(makeStream(responseFlags=[""]), END), "-\n")

    def test_truncationNotASCII(self):
        """
        A cut counts characters, not bytes, even through the cut in the middle of a UTF-8 sequence.
        """
        fmt = compileFormat("%REQ(USER-AGENT):4%|%REQ(X-A):2%")
        s = makeStream(requestHeaders=[(b"user-agent", "caf\u00e9s".encode()), (b"x-a", b"ab\xc3\xa9")])
        self.assertEqual(fmt.render(s, END), "caf\u00e9|ab\n".encode())

    def test_unexpectedValueFallsBack(self):
        """
        A value the bytes template cannot take (a status that is not a number) renders the text way.
        """
        fmt = compileFormat("%RESPONSE_CODE% %REQ(:METHOD)%")
        self.assertEqual(fmt.render(makeStream(status=None), END), b"None POST\n")
        self.assertEqual(fmt.render(makeStream(), END), b"204 POST\n")

    def test_nonASCIILiteral(self):
        """
        A format whose own text is not ASCII renders through text (and is still UTF-8 on disk).
        """
        fmt = compileFormat("\u00e9t\u00e9 %REQ(:METHOD)% %START_TIME(%Y\u5e74)%")
        self.assertEqual(fmt.render(makeStream(), END), "\u00e9t\u00e9 POST 2016\u5e74\n".encode())

    def test_repeatedHeaderAmongSeveral(self):
        """
        With several header operators (one scan guarded by a set), each still logs its header's first value.
        """
        s = makeStream(requestHeaders=[(b"x-c", b"c1"), (b"x-a", b"a1"), (b"x-b", b"b1"), (b"x-a", b"a2"),
                                       (b"x-c", b"c2")])
        self.assertEqual(render("%REQ(X-A)% %REQ(X-B)% %REQ(X-C)% %REQ(X-A):1%", s), "a1 b1 c1 a")

    def test_newSecondInlined(self):
        """
        The inlined default time follows the clock across seconds, back and forth, and agrees with
        L{time.strftime} at a second's edge.
        """
        fmt = compileFormat("%START_TIME%|%DURATION%")
        for start, expected in [(10.5, "1970-01-01T00:00:10.500Z"), (11.0, "1970-01-01T00:00:11.000Z"),
                                (10.9995, "1970-01-01T00:00:10.999Z"), (START, "2016-04-15T20:17:00.310Z"),
                                (1e9 - 0.0000001, "2001-09-09T01:46:40.000Z")]:
            self.assertEqual(fmt.render(makeStream(startTime=start), start + 1), f"{expected}|1000\n".encode())

    def test_upstreamHostCacheBounded(self):
        """
        The inlined C{%UPSTREAM_HOST%} parses an endpoint once, and keeps at most 4096 of them.
        """
        fmt = compileFormat("%UPSTREAM_HOST%")
        # The Python render's cache is one of its globals; the C renderer's, one of its references.
        renders = [(fmt.pythonRender,
                    lambda: [v for k, v in fmt.pythonRender.__globals__.items() if k.startswith("c")])]
        if fmt.render is not fmt.pythonRender:
            renders.append((fmt.render, lambda: gc.get_referents(fmt.render)))
        for render, objects in renders:
            (cache,) = [v for v in objects() if type(v) is dict]
            for i in range(4100):
                self.assertEqual(render(makeStream(upstreamHost=Host(f"tcp:10.0.{i // 256}.{i % 256}:80",
                                                                     None, 1)), END),
                                 f"10.0.{i // 256}.{i % 256}:80\n".encode())
            self.assertEqual(len(cache), 4096)
            self.assertEqual(render(makeStream(upstreamHost=Host("tcp:10.0.16.3:80", None, 1)), END),
                             b"10.0.16.3:80\n")


class NativeRenderTests(unittest.TestCase):
    """
    The C renderer of text lines (twistedmesh/observability/_linefmt.c), which the install builds where a
    C compiler is: then it is every text format's C{render}. Its lines are the Python render's, byte for
    byte, and whatever it does not expect (a value of another type, a line that is not ASCII, a number
    too large, a getter that raises) it hands to the Python render, so that it also raises what Python
    raises.
    """

    def setUp(self):
        if accesslog._linefmt is None:
            raise unittest.SkipTest("the C renderer is not built here (no C compiler when installed, or "
                                    "TWISTEDMESH_PURE_PYTHON is set)")

    def assertSameLine(self, fmt, record, end=END):
        """
        C{fmt}'s C renderer gives the Python render's line for C{record}, or raises what it raises.
        """
        def outcome(render):
            try:
                return render(record, end)
            except Exception as e:
                return type(e)
        self.assertIsNot(fmt.render, fmt.pythonRender)
        self.assertEqual(outcome(fmt.render), outcome(fmt.pythonRender), record)

    def test_used(self):
        """
        A text format renders in C; a JSON format, and a format without operators, in Python.
        """
        fmt = compileFormat(DEFAULT_FORMAT)
        self.assertIsInstance(fmt.render, accesslog._linefmt.Format)
        for python in (compileJSONFormat([("d", "%DURATION%")]), compileFormat("constant")):
            self.assertIs(python.render, python.pythonRender)

    def test_matchesPython(self):
        """
        Every operator, on records that take every branch, renders as the Python render does (and as the
        text reference, escaped, says).
        """
        fmt = compileFormat(CompiledFunctionTests.TEXT)
        self.assertIsInstance(fmt.render, accesslog._linefmt.Format)
        for record in CompiledFunctionTests.records(None):
            self.assertSameLine(fmt, record)
            self.assertEqual(fmt.render(record, END), fmt.text(record, END).encode("utf-8", "backslashreplace"))

    def test_times(self):
        """
        Start times and durations at rounding edges (halves of a microsecond, the last millisecond of a
        second, negative durations, whole-number times, ints too large for a double to scale exactly)
        render as Python's round() and floor division do.
        """
        fmt = compileFormat("%START_TIME% %DURATION% %START_TIME(%s)% %DURATION%")
        rng = random.Random(7)
        cases = [(10.0, 9.9995), (10.0, 10.0005), (59.9995, 60.0), (START, START + 0.0000005),
                 (0.0000005, 1.5), (1, 3), (START, START - 2.5), (1e9 - 0.0000001, 1e9), (-0.0, 0.0),
                 (10 ** 12 + 1, 10 ** 12 + 2), (0, 2 ** 40 + 1), (9007199254, 9007199255)]
        for _ in range(2000):
            start = rng.uniform(0, 2e9)
            cases.append((start, start + rng.choice([rng.uniform(-1, 1), rng.randrange(-5000, 5000) / 1e6 + 0.0000005,
                                                     round(rng.uniform(0, 100), 6)])))
        for start, end in cases:
            record = makeStream(startTime=start)
            self.assertEqual(fmt.render(record, end), fmt.pythonRender(record, end), (start, end))

    def test_unexpectedValues(self):
        """
        Values the proxy never sets, but a filter or a plugin might, render as the Python render says: a
        bool or a huge status, text where bytes go, header fields as lists, a bytearray, a memoryview.
        """
        fmt = compileFormat(DEFAULT_FORMAT + "%REQ(X-A)% %RESP(X-B)% %REQ(:METHOD):2% %REQ(X-B?:PATH)%")
        host = type("H", (), {})
        for fields in [dict(status=True), dict(status=2 ** 70), dict(status=-3), dict(status=3.0),
                       dict(bytesSent=2 ** 63), dict(bytesSent=-(2 ** 63)), dict(method="GET"), dict(method=""),
                       dict(method=bytearray(b"GET")), dict(method=memoryview(b"GET")),
                       dict(requestHeaders=[(b"x-a", "text")]), dict(requestHeaders=[(b"x-a", None), (b"x-a", b"1")]),
                       dict(requestHeaders=[[b"user-agent", b"list"]], responseFlags=None),
                       dict(requestHeaders=((b"x-a", b"tuple"),)), dict(requestHeaders=[(b"x-b", None)]),
                       dict(requestHeaders=[(b"x-a", b"1"), (b"a", b"b", b"c")]),
                       dict(responseHeaders=[("x-b", b"text name")]), dict(version="1.1"), dict(version=[]),
                       dict(startTime=7), dict(responseFlags=("UF",)), dict(responseFlags=[1]),
                       dict(responseFlags=[b"UF"]), dict(authority=None), dict(upstreamHost=host()),
                       dict(upstreamHost=type("H", (), {"endpoint": 5})())]:
            self.assertSameLine(fmt, makeStream(**fields))
        self.assertIn(b" True - 154 ", fmt.render(makeStream(status=True), END))

    def test_errors(self):
        """
        What makes the Python render raise makes the C renderer raise the same exception, also when a
        record has two faults that the two would meet in different orders.
        """
        fmt = compileFormat(DEFAULT_FORMAT)
        for record in [SimpleNamespace(), makeStream(requestHeaders=None), makeStream(startTime=float("nan"))]:
            self.assertSameLine(fmt, record)
        self.assertSameLine(compileFormat("%RESPONSE_FLAGS% %START_TIME%"),
                            makeStream(startTime=float("nan"), responseFlags=[b"UF"]))
        self.assertRaises(ValueError, fmt.render, makeStream(startTime=float("nan")), END)

    def test_fields(self):
        """
        The C renderer reads a stream's fields from their slots, yet renders what Python's attribute
        lookup gives: a subclass's property, a class patched after lines were rendered, a record with its
        own __getattribute__ or with plain instance attributes, an unset slot (an AttributeError).
        """
        fmt = compileFormat("%REQ(:METHOD)% %RESPONSE_CODE% %DURATION% %UPSTREAM_HOST%")

        class Sub(Stream):
            __slots__ = ()

        class Loud(Stream):
            __slots__ = ()

            def __getattribute__(self, name):
                value = super().__getattribute__(name)
                return value.upper() if name == "method" else value

        record = makeStream()
        sub = Sub(_Codec(), [], "edge", IPv4Address("TCP", "10.0.35.28", 51234), START)
        for name in ("method", "path", "authority", "requestHeaders", "status", "responseHeaders", "bytesReceived",
                     "upstreamHost"):
            setattr(sub, name, getattr(record, name))
        self.assertSameLine(fmt, sub)
        self.assertIn(b"POST 204", fmt.render(sub, END))
        Sub.method = property(lambda self: b"PATCHED")
        self.assertSameLine(fmt, sub)
        self.assertIn(b"PATCHED 204", fmt.render(sub, END))
        loud = Loud(_Codec(), [], "edge", None, START)
        for name in ("method", "requestHeaders", "responseHeaders", "status", "upstreamHost"):
            setattr(loud, name, getattr(record, name))
        loud.method = b"get"
        self.assertIn(b"GET 204", fmt.render(loud, END))
        self.assertSameLine(fmt, loud)
        plain = SimpleNamespace(method=b"PUT", requestHeaders=[], responseHeaders=[], status=201, startTime=START,
                                upstreamHost=None)
        self.assertSameLine(fmt, plain)
        self.assertIn(b"PUT 201", fmt.render(plain, END))
        unset = Stream.__new__(Stream)
        self.assertSameLine(fmt, unset)
        self.assertRaises(AttributeError, fmt.render, unset, END)

        class Borrowed:  # a slot's descriptor on a class without that slot: not read as if it had it
            __slots__ = ()
            requestHeaders = responseHeaders = ()
            startTime, status, upstreamHost = START, 200, None

        Borrowed.method = Stream.method
        for _ in range(200):
            self.assertSameLine(fmt, Borrowed())
        self.assertRaises(TypeError, fmt.render, Borrowed(), END)

    def test_reentrant(self):
        """
        A line whose getter renders another line of the same format, in another second (a property, a
        plugin's getter), keeps its own second's text.
        """
        fmt = compileFormat("%START_TIME% %REQ(:METHOD)%")

        class Record:
            requestHeaders = responseHeaders = ()

            def __init__(self, startTime, inner=None):
                self.startTime, self.inner = startTime, inner

            @property
            def method(self):
                if self.inner is not None:
                    fmt.render(self.inner, END)
                    [bytes([65 + i % 26]) * 24 for i in range(2000)]  # reuse what a freed text would free
                return b"GET"

        for i in range(50):
            self.assertEqual(fmt.render(Record(START + i * 7.0, Record(1e9 + i * 3.0)), END),
                             fmt.pythonRender(Record(START + i * 7.0), END))

    def test_noReferencesKept(self):
        """
        Rendering holds no reference to what it read once the line is made.
        """
        agent, method, address = b"agent-" + os.urandom(4).hex().encode(), b"GE" + b"T", "tcp:10.9.8.7:" + "80"
        record = makeStream(method=method, requestHeaders=[(b"user-agent", agent)], upstreamHost=Host(address, None, 1))
        fmt = compileFormat(DEFAULT_FORMAT)
        fmt.render(record, END)
        before = [sys.getrefcount(x) for x in (agent, method, address, record)]
        for _ in range(1000):
            fmt.render(record, END)
        self.assertEqual([sys.getrefcount(x) for x in (agent, method, address, record)], before)

    def test_badOps(self):
        """
        The renderer refuses ops it cannot run, when it is built.
        """
        Format = accesslog._linefmt.Format
        millis = tuple(b"%03d" % i for i in range(1000))
        for ops in [(("nope",),), (("lit", "text"),), (("value", (("request", 0),), None),),
                    (("value", (), None),), (("int",),), (("time", object(), ()),), (("lit", b"x"),) * 129,
                    ((chr(0xD800),),), (("value", ((chr(0xD800), "x"),), None),),
                    (("time", object(), (10 ** 50,) + millis[1:]),)]:
            self.assertRaises(ValueError, Format, ops, (), (), lambda r, e: b"")
        self.assertRaises(TypeError, Format, (), (), (), None)
        self.assertIsInstance(Format((("time", object(), millis),), (), (), lambda r, e: b""), Format)

    def test_pythonOnly(self):
        """
        With C{TWISTEDMESH_PURE_PYTHON} set, formats render in Python.
        """
        import subprocess
        code = ("from twistedmesh.observability.accesslog import compileFormat, DEFAULT_FORMAT\n"
                "f = compileFormat(DEFAULT_FORMAT)\nprint(f.render is f.pythonRender)")
        out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, TWISTEDMESH_PURE_PYTHON="1"),
                             capture_output=True, text=True, check=True).stdout
        self.assertEqual(out.strip(), "True")
