"""
Tests for L{twistedmesh.http.h1}: the sans-IO HTTP/1.1 parsers and encoders.

Each smuggling test names, in its docstring, whether llhttp rejects the input by itself (strict mode)
or whether L{twistedmesh.http.h1} has to.
"""

from __future__ import annotations

from typing import List, Optional

from twisted.trial.unittest import SynchronousTestCase

from twistedmesh.http.h1 import (
    HOP_BY_HOP,
    REASON_PHRASES,
    RequestParser,
    ResponseParser,
    encodeChunk,
    encodeLastChunk,
    encodeRequestHead,
    encodeResponseHead,
    stripHopByHop,
)


class RequestRecorder:
    """
    A request handler that records every callback as a tuple.
    """

    def __init__(self) -> None:
        self.events: List[tuple] = []

    def requestHead(self, method, target, version, headers, keepAlive, hasBody, chunked, upgrade,
                    expectContinue) -> None:
        self.events.append(("head", method, target, version, headers, dict(
            keepAlive=keepAlive, hasBody=hasBody, chunked=chunked, upgrade=upgrade,
            expectContinue=expectContinue)))

    def requestData(self, data) -> None:
        assert data, "empty data event"
        self.events.append(("data", data))

    def requestEnd(self, trailers) -> None:
        self.events.append(("end", trailers))

    def protocolError(self, status, reason) -> None:
        self.events.append(("error", status, reason))

    def merged(self) -> List[tuple]:
        """
        The events with consecutive data events joined (feeding byte by byte splits bodies).
        """
        out: List[tuple] = []
        for event in self.events:
            if event[0] == "data" and out and out[-1][0] == "data":
                out[-1] = ("data", out[-1][1] + event[1])
            else:
                out.append(event)
        return out

    def flags(self, index: int = 0) -> dict:
        return [e for e in self.events if e[0] == "head"][index][5]


class ResponseRecorder:
    """
    A response handler that records every callback as a tuple.
    """

    def __init__(self) -> None:
        self.events: List[tuple] = []

    def responseInformational(self, status, headers) -> None:
        self.events.append(("info", status, headers))

    def responseHead(self, status, reason, version, headers, keepAlive, hasBody, chunked) -> None:
        self.events.append(("head", status, reason, version, headers, dict(
            keepAlive=keepAlive, hasBody=hasBody, chunked=chunked)))

    def responseData(self, data) -> None:
        assert data, "empty data event"
        self.events.append(("data", data))

    def responseEnd(self, trailers) -> None:
        self.events.append(("end", trailers))

    def protocolError(self, reason) -> None:
        self.events.append(("error", reason))

    merged = RequestRecorder.merged


def parseRequests(data: bytes, **kwargs) -> RequestRecorder:
    recorder = RequestRecorder()
    RequestParser(recorder, **kwargs).feed(data)
    return recorder


def kinds(recorder) -> List[str]:
    return [e[0] for e in recorder.events]


class RequestFramingTests(SynchronousTestCase):
    """
    Tests for L{RequestParser}'s message framing and head reporting.
    """

    def test_simpleGet(self) -> None:
        """
        A GET without a body gives one head, with method, target, version and flags, then an end.
        """
        r = parseRequests(b"GET /a?b=c HTTP/1.1\r\nHost: example.com\r\n\r\n")
        self.assertEqual(r.events, [
            ("head", b"GET", b"/a?b=c", b"1.1", [(b"host", b"example.com")], dict(
                keepAlive=True, hasBody=False, chunked=False, upgrade=False, expectContinue=False)),
            ("end", None),
        ])

    def test_headersLowercasedOrderedAndRepeated(self) -> None:
        """
        Field names are lowercased; order and repeated fields are kept as sent.
        """
        r = parseRequests(
            b"GET / HTTP/1.1\r\nHost: a\r\nX-B: 1\r\nCookie: a=1\r\nx-b: 2\r\nCOOKIE: b=2\r\n\r\n")
        self.assertEqual(r.events[0][4], [
            (b"host", b"a"), (b"x-b", b"1"), (b"cookie", b"a=1"), (b"x-b", b"2"), (b"cookie", b"b=2")])

    def test_valueWhitespaceTrimmed(self) -> None:
        """
        Leading and trailing whitespace around a field value is not part of it; inner whitespace is.
        """
        r = parseRequests(b"GET / HTTP/1.1\r\nHost: a\r\nX:  \t b  c \t \r\n\r\n")
        self.assertEqual(r.events[0][4][1], (b"x", b"b  c"))

    def test_contentLengthBody(self) -> None:
        """
        A Content-Length body is reported as data and then an end.
        """
        r = parseRequests(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
        self.assertEqual(kinds(r), ["head", "data", "end"])
        self.assertEqual(r.events[1], ("data", b"hello"))
        self.assertEqual(r.flags(), dict(
            keepAlive=True, hasBody=True, chunked=False, upgrade=False, expectContinue=False))

    def test_contentLengthZero(self) -> None:
        """
        Content-Length: 0 means no body: hasBody is false and the end follows the head.
        """
        r = parseRequests(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(kinds(r), ["head", "end"])
        self.assertFalse(r.flags()["hasBody"])

    def test_contentLengthBodyByteByByte(self) -> None:
        """
        A Content-Length body fed one byte at a time arrives whole, and the end comes only at its last
        byte.
        """
        data = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello world"
        r = RequestRecorder()
        parser = RequestParser(r)
        for i in range(len(data) - 1):
            parser.feed(data[i:i + 1])
        self.assertNotIn("end", kinds(r))
        parser.feed(data[-1:])
        self.assertEqual(r.merged()[1:], [("data", b"hello world"), ("end", None)])

    def test_bodyIsNotCopied(self) -> None:
        """
        Body data reaches the handler as the bytes httptools made, not as a copy or a join of ours.
        """
        r = parseRequests(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc")
        self.assertIs(type(r.events[1][1]), bytes)

    def test_chunkedWithExtensionsAndTrailers(self) -> None:
        """
        A chunked body with chunk extensions is de-chunked; its trailers come with the end, lowercased.
        """
        r = parseRequests(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;name=value\r\nhello\r\n6;a;b=\"q s\"\r\n world\r\n"
            b"0\r\nX-Checksum: abc\r\nGrpc-Status: 0\r\n\r\n")
        self.assertEqual(r.flags()["chunked"], True)
        self.assertEqual(r.flags()["hasBody"], True)
        self.assertEqual(r.merged()[1:], [
            ("data", b"hello world"), ("end", [(b"x-checksum", b"abc"), (b"grpc-status", b"0")])])

    def test_chunkedWithoutTrailers(self) -> None:
        """
        A chunked body without trailers ends with C{None}, not an empty list.
        """
        r = parseRequests(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        self.assertEqual(r.events[1:], [("data", b"abc"), ("end", None)])

    def test_transferEncodingCaseInsensitive(self) -> None:
        """
        The chunked coding name is case-insensitive.
        """
        r = parseRequests(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n")
        self.assertEqual(kinds(r), ["head", "data", "end"])

    def test_pipelinedInOneFeed(self) -> None:
        """
        Several requests in one feed produce their event sequences one after the other, in order.
        """
        r = parseRequests(
            b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
            b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi"
            b"GET /3 HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(kinds(r), ["head", "end", "head", "data", "end", "head", "end"])
        self.assertEqual([e[2] for e in r.events if e[0] == "head"], [b"/1", b"/2", b"/3"])

    PIPELINE = (
        b"GET /one HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n"
        b"POST /two HTTP/1.1\r\nHost: a\r\nContent-Length: 7\r\n\r\npayload"
        b"PUT /three HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4;x=y\r\nabcd\r\n2\r\nef\r\n0\r\nT: 1\r\n\r\n"
    )

    def test_pipelineSplitAtEveryByte(self) -> None:
        """
        A three-request pipeline split in two at every byte boundary gives the same events as in one
        feed.
        """
        expected = parseRequests(self.PIPELINE).merged()
        self.assertEqual([e[0] for e in expected],
                         ["head", "end", "head", "data", "end", "head", "data", "end"])
        for i in range(1, len(self.PIPELINE)):
            r = RequestRecorder()
            parser = RequestParser(r)
            parser.feed(self.PIPELINE[:i])
            parser.feed(self.PIPELINE[i:])
            self.assertEqual(r.merged(), expected, "split at %d" % (i,))

    def test_pipelineByteByByte(self) -> None:
        """
        A three-request pipeline fed one byte at a time gives the same events as in one feed.
        """
        expected = parseRequests(self.PIPELINE).merged()
        r = RequestRecorder()
        parser = RequestParser(r)
        for i in range(len(self.PIPELINE)):
            parser.feed(self.PIPELINE[i:i + 1])
        self.assertEqual(r.merged(), expected)

    def test_http11KeepAliveByDefault(self) -> None:
        """
        An HTTP/1.1 request keeps the connection alive unless it says close.
        """
        self.assertTrue(parseRequests(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").flags()["keepAlive"])

    def test_http11ConnectionClose(self) -> None:
        """
        Connection: close (among other tokens, any case) ends keep-alive for HTTP/1.1.
        """
        r = parseRequests(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: x-foo, Close\r\n\r\n")
        self.assertFalse(r.flags()["keepAlive"])

    def test_http10ClosesByDefault(self) -> None:
        """
        An HTTP/1.0 request without Connection: keep-alive does not keep the connection, and needs no
        Host.
        """
        r = parseRequests(b"GET / HTTP/1.0\r\n\r\n")
        self.assertEqual(r.events[0][3], b"1.0")
        self.assertFalse(r.flags()["keepAlive"])

    def test_http10KeepAlive(self) -> None:
        """
        HTTP/1.0 with Connection: keep-alive keeps the connection.
        """
        r = parseRequests(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
        self.assertTrue(r.flags()["keepAlive"])
        self.assertEqual(r.events[0][3], b"1.0")

    def test_http11WithKeepAliveToken(self) -> None:
        """
        HTTP/1.1 with Connection: keep-alive is reported as 1.1 and kept alive.
        """
        r = parseRequests(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n\r\n")
        self.assertEqual(r.events[0][3], b"1.1")
        self.assertTrue(r.flags()["keepAlive"])

    def test_bytesAfterCloseDiscarded(self) -> None:
        """
        Whatever follows a request that does not keep the connection is discarded without an error.
        """
        for first in (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", b"GET / HTTP/1.0\r\n\r\n"):
            r = RequestRecorder()
            parser = RequestParser(r)
            parser.feed(first + b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
            parser.feed(b"GET /3 HTTP/1.1\r\nHost: a\r\n\r\n")
            self.assertEqual(kinds(r), ["head", "end"])

    def test_expectContinue(self) -> None:
        """
        Expect: 100-continue (any case) is reported as expectContinue.
        """
        r = parseRequests(
            b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n")
        self.assertTrue(r.flags()["expectContinue"])
        self.assertFalse(parseRequests(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").flags()["expectContinue"])

    def test_leadingEmptyLinesIgnored(self) -> None:
        """
        Empty lines before a request line are ignored (RFC 9112 §2.2).
        """
        r = parseRequests(b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(kinds(r), ["head", "end"])

    def test_absoluteFormTarget(self) -> None:
        """
        An absolute-form target is reported as sent.
        """
        r = parseRequests(b"GET http://b.example/x HTTP/1.1\r\nHost: b.example\r\n\r\n")
        self.assertEqual(r.events[0][2], b"http://b.example/x")

    def test_handlerExceptionPropagates(self) -> None:
        """
        An exception from the handler leaves feed() as itself, not as a protocol error.
        """
        class Broken(RequestRecorder):
            def requestHead(self, *args):
                raise ZeroDivisionError()

        r = Broken()
        parser = RequestParser(r)
        self.assertRaises(ZeroDivisionError, parser.feed, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(r.events, [])

    def test_noInputAfterProtocolError(self) -> None:
        """
        After a protocol error the parser ignores further input.
        """
        r = RequestRecorder()
        parser = RequestParser(r)
        parser.feed(b"GET / HTTP/1.1\r\n\r\n")
        parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(kinds(r), ["error"])

    def test_requestBeforeErrorDelivered(self) -> None:
        """
        A good request before a bad one in the same feed is delivered before the error.
        """
        r = parseRequests(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\n\r\n")
        self.assertEqual(kinds(r), ["head", "end", "error"])


class UpgradeTests(SynchronousTestCase):
    """
    Tests for upgrade and CONNECT requests in L{RequestParser}.
    """

    def test_websocketUpgrade(self) -> None:
        """
        An Upgrade request ends the parsing: head with upgrade, end, and the following bytes in
        upgradeData.
        """
        r = RequestRecorder()
        parser = RequestParser(r)
        parser.feed(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                    b"\x81\x05hello")
        self.assertEqual(kinds(r), ["head", "end"])
        self.assertTrue(r.flags()["upgrade"])
        self.assertEqual(parser.upgradeData, b"\x81\x05hello")

    def test_upgradeHeaderWithoutConnectionUpgrade(self) -> None:
        """
        An Upgrade field without Connection: upgrade is no upgrade request.
        """
        r = parseRequests(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n")
        self.assertFalse(r.flags()["upgrade"])

    def test_connect(self) -> None:
        """
        CONNECT is an upgrade: the bytes after its head are tunnel bytes.
        """
        r = RequestRecorder()
        parser = RequestParser(r)
        parser.feed(b"CONNECT db.example:5432 HTTP/1.1\r\nHost: db.example:5432\r\n\r\n\x00\x01")
        self.assertEqual(r.events[0][1:3], (b"CONNECT", b"db.example:5432"))
        self.assertTrue(r.flags()["upgrade"])
        self.assertEqual(parser.upgradeData, b"\x00\x01")

    def test_upgradeWithContentLengthBody(self) -> None:
        """
        The Content-Length body of an upgrade request is delivered as data before the end, and only the
        bytes after it are upgradeData, even split across feeds.
        """
        r = RequestRecorder()
        parser = RequestParser(r)
        parser.feed(b"POST / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                    b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\nContent-Length: 6\r\n\r\nabc")
        self.assertEqual(kinds(r), ["head", "data"])
        self.assertIdentical(parser.upgradeData, None)
        parser.feed(b"defPRI")
        self.assertEqual(r.merged()[1:], [("data", b"abcdef"), ("end", None)])
        self.assertEqual(parser.upgradeData, b"PRI")

    def test_upgradeWithChunkedBodyRejected(self) -> None:
        """
        An upgrade request with a chunked body is a 400: httptools hides where that body ends.
        """
        r = parseRequests(b"POST / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        self.assertEqual(r.events[-1][:2], ("error", 400))

    def test_connectWithBodyRejected(self) -> None:
        """
        A CONNECT request with a body is a 400.
        """
        r = parseRequests(b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\nContent-Length: 2\r\n\r\nab")
        self.assertEqual(r.events, [("error", 400, "CONNECT with a body")])

    def test_declineUpgrade(self) -> None:
        """
        declineUpgrade() parses the bytes after the upgrade request, and later ones, as requests.
        """
        r = RequestRecorder()
        parser = RequestParser(r)
        parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n"
                    b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(kinds(r), ["head", "end"])
        parser.declineUpgrade()
        parser.feed(b"GET /last HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual([e[2] for e in r.events if e[0] == "head"], [b"/", b"/next", b"/last"])

    def test_feedAfterUpgradeRaises(self) -> None:
        """
        Feeding after an upgrade is a bug in the caller: the bytes belong to the tunnel.
        """
        parser = RequestParser(RequestRecorder())
        parser.feed(b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\n\r\n")
        self.assertRaises(RuntimeError, parser.feed, b"x")

    def test_declineWithoutUpgradeRaises(self) -> None:
        """
        declineUpgrade() without an upgrade is a bug in the caller.
        """
        self.assertRaises(RuntimeError, RequestParser(RequestRecorder()).declineUpgrade)


class SmugglingTests(SynchronousTestCase):
    """
    Every request-smuggling vector is rejected with a 400 (or the status named), and nothing of the
    request is reported before the error.
    """

    def assertRejected(self, data: bytes, status: int = 400, afterHead: bool = False) -> None:
        """
        Assert that C{data} gives a protocol error with C{status} and nothing else, or, if C{afterHead}
        (for errors llhttp finds in a body, or after its headers-complete callback), the head (and
        maybe data) and then the error, but never an end.
        """
        r = parseRequests(data)
        self.assertEqual(r.events[-1][:2], ("error", status), r.events)
        if afterHead:
            self.assertEqual(r.events[0][0], "head")
            self.assertNotIn("end", kinds(r))
        else:
            self.assertEqual(len(r.events), 1, r.events)

    def body(self, headers: bytes, version: bytes = b"1.1") -> bytes:
        return b"POST / HTTP/" + version + b"\r\nHost: a\r\n" + headers + b"\r\n5\r\nhello\r\n0\r\n\r\n"

    def chunked(self, chunk: bytes) -> bytes:
        return b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk + b"0\r\n\r\n"

    def test_contentLengthAndTransferEncoding(self) -> None:
        """
        Content-Length then Transfer-Encoding is rejected (llhttp, and our check).
        """
        self.assertRejected(self.body(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"))

    def test_transferEncodingAndContentLength(self) -> None:
        """
        Transfer-Encoding then Content-Length is rejected (llhttp, and our check).
        """
        self.assertRejected(self.body(b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n"))

    def test_duplicateContentLengthEqual(self) -> None:
        """
        Two equal Content-Length fields are rejected (llhttp, and our check): we allow no duplicate.
        """
        self.assertRejected(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n"
                            b"hello")

    def test_duplicateContentLengthDiffering(self) -> None:
        """
        Two differing Content-Length fields are rejected (llhttp, and our check).
        """
        self.assertRejected(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"
                            b"hello")

    def test_contentLengthListForm(self) -> None:
        """
        Content-Length: 5,5 is rejected (llhttp).
        """
        self.assertRejected(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5,5\r\n\r\nhello")

    def test_contentLengthPlusSign(self) -> None:
        """
        Content-Length: +5 is rejected (llhttp).
        """
        self.assertRejected(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello")

    def test_contentLengthNegative(self) -> None:
        """
        Content-Length: -5 is rejected (llhttp).
        """
        self.assertRejected(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -5\r\n\r\nhello")

    def test_contentLengthInnerSpace(self) -> None:
        """
        Content-Length: 5 5 is rejected (llhttp).
        """
        self.assertRejected(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5 5\r\n\r\nhello")

    def test_contentLengthVerticalTab(self) -> None:
        """
        Content-Length with a vertical tab before the digits is rejected (llhttp): only SP and HTAB
        are whitespace.
        """
        self.assertRejected(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \x0b5\r\n\r\nhello")

    def test_contentLengthHex(self) -> None:
        """
        Content-Length: 0x5 is rejected (llhttp).
        """
        self.assertRejected(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\n\r\nhello")

    def test_contentLengthEmpty(self) -> None:
        """
        An empty Content-Length is rejected (llhttp).
        """
        self.assertRejected(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length:\r\n\r\nhello")

    def test_contentLengthOverflow(self) -> None:
        """
        A Content-Length beyond 64 bits is rejected (llhttp).
        """
        self.assertRejected(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n")

    def test_contentLengthExtraOWSAccepted(self) -> None:
        """
        Extra spaces around a Content-Length value are optional whitespace (RFC 9110 §5.5), not part of
        the value: accepted, as by Envoy and every compliant parser.
        """
        r = parseRequests(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length:  5  \r\n\r\nhello")
        self.assertEqual(kinds(r), ["head", "data", "end"])

    def test_transferEncodingChunkedThenIdentity(self) -> None:
        """
        Transfer-Encoding: chunked, identity (chunked not final) is rejected (llhttp, and our check).
        """
        self.assertRejected(self.body(b"Transfer-Encoding: chunked, identity\r\n"))

    def test_transferEncodingXchunked(self) -> None:
        """
        Transfer-Encoding: xchunked is rejected (llhttp, and our check).
        """
        self.assertRejected(self.body(b"Transfer-Encoding: xchunked\r\n"))

    def test_transferEncodingIdentity(self) -> None:
        """
        Transfer-Encoding: identity is rejected (llhttp, and our check).
        """
        self.assertRejected(self.body(b"Transfer-Encoding: identity\r\n"))

    def test_transferEncodingLeadingComma(self) -> None:
        """
        Transfer-Encoding: ,chunked is rejected (ours: llhttp accepts it).
        """
        self.assertRejected(self.body(b"Transfer-Encoding: ,chunked\r\n"))

    def test_transferEncodingSplitToken(self) -> None:
        """
        Transfer-Encoding: chun ked is rejected (ours and llhttp).
        """
        self.assertRejected(self.body(b"Transfer-Encoding: chun ked\r\n"))

    def test_transferEncodingTrailingTab(self) -> None:
        """
        Transfer-Encoding: chunked followed by a tab is rejected (llhttp, after the head was reported:
        we take the tab for optional whitespace, llhttp does not).
        """
        self.assertRejected(self.body(b"Transfer-Encoding: chunked\t\r\n"), afterHead=True)

    def test_transferEncodingVerticalTab(self) -> None:
        """
        Transfer-Encoding: \\x0bchunked is rejected (llhttp: an invalid value character).
        """
        self.assertRejected(self.body(b"Transfer-Encoding: \x0bchunked\r\n"))

    def test_transferEncodingGzipChunked(self) -> None:
        """
        Transfer-Encoding: gzip, chunked is valid HTTP that we do not implement: 501 (ours: llhttp
        accepts it).
        """
        self.assertRejected(self.body(b"Transfer-Encoding: gzip, chunked\r\n"), 501)

    def test_transferEncodingRepeated(self) -> None:
        """
        Two Transfer-Encoding: chunked fields (chunked applied twice) are rejected (llhttp, and ours).
        """
        self.assertRejected(self.body(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"))

    def test_transferEncodingOnHTTP10(self) -> None:
        """
        Transfer-Encoding in an HTTP/1.0 request is rejected (ours: llhttp accepts it).
        """
        self.assertRejected(self.body(b"Transfer-Encoding: chunked\r\n", b"1.0"))

    def test_bareLFRequestLine(self) -> None:
        """
        A request line ended by a bare LF is rejected (llhttp).
        """
        self.assertRejected(b"GET / HTTP/1.1\nHost: a\r\n\r\n")

    def test_bareLFHeader(self) -> None:
        """
        A header line ended by a bare LF is rejected (llhttp).
        """
        self.assertRejected(b"GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n")

    def test_bareLFEndOfHead(self) -> None:
        """
        A head ended by bare LFs is rejected (llhttp).
        """
        self.assertRejected(b"GET / HTTP/1.1\r\nHost: a\n\n")

    def test_bareCR(self) -> None:
        """
        A bare CR inside a field value is rejected (llhttp).
        """
        self.assertRejected(b"GET / HTTP/1.1\r\nHost: a\r\nX: y\rZ: w\r\n\r\n")

    def test_chunkSizeHexPrefix(self) -> None:
        """
        Chunk size 0x5 is rejected (llhttp).
        """
        self.assertRejected(self.chunked(b"0x5\r\nhello\r\n"), afterHead=True)

    def test_chunkSizeNegative(self) -> None:
        """
        Chunk size -1 is rejected (llhttp).
        """
        self.assertRejected(self.chunked(b"-1\r\nhello\r\n"), afterHead=True)

    def test_chunkSizeOverflow(self) -> None:
        """
        A chunk size beyond 64 bits is rejected (llhttp).
        """
        self.assertRejected(self.chunked(b"1ffffffffffffffff\r\nhello\r\n"), afterHead=True)

    def test_chunkSizeTrailingSpace(self) -> None:
        """
        A space after the chunk size is rejected (llhttp, strict).
        """
        self.assertRejected(self.chunked(b"5 \r\nhello\r\n"), afterHead=True)

    def test_chunkSizeLeadingSpace(self) -> None:
        """
        A space before the chunk size is rejected (llhttp).
        """
        self.assertRejected(self.chunked(b" 5\r\nhello\r\n"), afterHead=True)

    def test_chunkSizeGarbage(self) -> None:
        """
        A chunk size followed by a NUL is rejected (llhttp).
        """
        self.assertRejected(self.chunked(b"5\x00\r\nhello\r\n"), afterHead=True)

    def test_chunkSizeMissing(self) -> None:
        """
        A chunk-size line with no size is rejected (llhttp).
        """
        self.assertRejected(self.chunked(b"\r\nhello\r\n"), afterHead=True)

    def test_chunkDataTooLong(self) -> None:
        """
        Chunk data longer than its size (no CRLF where it must be) is rejected (llhttp).
        """
        self.assertRejected(self.chunked(b"3\r\nhello\r\n"), afterHead=True)

    def test_chunkExtensionEmpty(self) -> None:
        """
        A chunk extension with nothing after the semicolon is rejected (llhttp).
        """
        self.assertRejected(self.chunked(b"5;\r\nhello\r\n"), afterHead=True)

    def test_chunkExtensionSpaceInName(self) -> None:
        """
        A chunk extension name with a space is rejected (llhttp).
        """
        self.assertRejected(self.chunked(b"5;a b\r\nhello\r\n"), afterHead=True)

    def test_chunkExtensionSpaceInValue(self) -> None:
        """
        An unquoted chunk extension value with a space is rejected (llhttp).
        """
        self.assertRejected(self.chunked(b"5;a=b c\r\nhello\r\n"), afterHead=True)

    def test_chunkExtensionUnterminatedQuote(self) -> None:
        """
        A chunk extension with an unterminated quoted value is rejected (llhttp).
        """
        self.assertRejected(self.chunked(b"5;a=\"b\r\nhello\r\n"), afterHead=True)

    def test_chunkExtensionControlChar(self) -> None:
        """
        A control character in a chunk extension is rejected (llhttp).
        """
        self.assertRejected(self.chunked(b"5;a=\x01\r\nhello\r\n"), afterHead=True)

    def test_obsFoldSpace(self) -> None:
        """
        A field line continued by a line starting with a space (obs-fold) is rejected (llhttp).
        """
        self.assertRejected(b"GET / HTTP/1.1\r\nHost: a\r\nX: y\r\n z\r\n\r\n")

    def test_obsFoldTab(self) -> None:
        """
        A field line continued by a line starting with a tab (obs-fold) is rejected (llhttp).
        """
        self.assertRejected(b"GET / HTTP/1.1\r\nHost: a\r\nX: y\r\n\tz\r\n\r\n")

    def test_firstFieldLineIndented(self) -> None:
        """
        Whitespace before the first field line is rejected (llhttp).
        """
        self.assertRejected(b"GET / HTTP/1.1\r\n Host: a\r\n\r\n")

    def test_nulInValue(self) -> None:
        """
        A NUL in a field value is rejected (llhttp).
        """
        self.assertRejected(b"GET / HTTP/1.1\r\nHost: a\r\nX: y\x00z\r\n\r\n")

    def test_crInValue(self) -> None:
        """
        A CR not followed by LF inside a field value is rejected (llhttp).
        """
        self.assertRejected(b"GET / HTTP/1.1\r\nHost: a\r\nX: y\rz\r\n\r\n")

    def test_lfInValue(self) -> None:
        """
        An LF inside a field value (a bare-LF line break) is rejected (llhttp).
        """
        self.assertRejected(b"GET / HTTP/1.1\r\nHost: a\r\nX: y\nz\r\n\r\n")

    def test_controlCharInValue(self) -> None:
        """
        Other control characters (here DEL) in a field value are rejected (llhttp).
        """
        self.assertRejected(b"GET / HTTP/1.1\r\nHost: a\r\nX: y\x7fz\r\n\r\n")

    def test_spaceBeforeColon(self) -> None:
        """
        Whitespace between a field name and the colon is rejected (llhttp).
        """
        self.assertRejected(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length : 5\r\n\r\nhello")

    def test_tabBeforeColon(self) -> None:
        """
        A tab between a field name and the colon is rejected (llhttp).
        """
        self.assertRejected(b"GET / HTTP/1.1\r\nHost: a\r\nX\t: y\r\n\r\n")

    def test_invalidNameCharacter(self) -> None:
        """
        A field name with a non-token character is rejected (llhttp).
        """
        self.assertRejected(b"GET / HTTP/1.1\r\nHost: a\r\nX(y): z\r\n\r\n")

    def test_nonASCIIName(self) -> None:
        """
        A field name with a non-ASCII byte is rejected (llhttp).
        """
        self.assertRejected(b"GET / HTTP/1.1\r\nHost: a\r\nX\xffy: z\r\n\r\n")

    def test_emptyName(self) -> None:
        """
        A field line with an empty name is rejected (llhttp).
        """
        self.assertRejected(b"GET / HTTP/1.1\r\nHost: a\r\n: z\r\n\r\n")

    def test_missingHost(self) -> None:
        """
        An HTTP/1.1 request without Host is rejected (ours: llhttp accepts it).
        """
        self.assertRejected(b"GET / HTTP/1.1\r\nX: y\r\n\r\n")

    def test_repeatedHost(self) -> None:
        """
        A request with two Host fields is rejected (ours: llhttp accepts it).
        """
        self.assertRejected(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")

    def test_http09(self) -> None:
        """
        An HTTP/0.9 request line is refused with 505 (ours: llhttp accepts it).
        """
        self.assertRejected(b"GET / HTTP/0.9\r\n\r\n", 505)

    def test_http20(self) -> None:
        """
        An HTTP/2.0 request line is refused with 505 (ours: llhttp accepts it).
        """
        self.assertRejected(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505)

    def test_http20KeepAlive(self) -> None:
        """
        An HTTP/2.0 request line with Connection: keep-alive is still refused with 505.
        """
        self.assertRejected(b"GET / HTTP/2.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n", 505)

    def test_invalidVersion(self) -> None:
        """
        HTTP/1.2 is rejected (llhttp).
        """
        self.assertRejected(b"GET / HTTP/1.2\r\nHost: a\r\n\r\n")

    def test_invalidMethod(self) -> None:
        """
        A method with a non-token character is rejected (llhttp).
        """
        self.assertRejected(b"G@T / HTTP/1.1\r\nHost: a\r\n\r\n")

    def test_lowercaseMethod(self) -> None:
        """
        A lowercase method is rejected (llhttp: methods are case-sensitive).
        """
        self.assertRejected(b"get / HTTP/1.1\r\nHost: a\r\n\r\n")

    def test_spaceInTarget(self) -> None:
        """
        A space inside the request-target is rejected (llhttp).
        """
        self.assertRejected(b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n")

    def test_controlCharInTarget(self) -> None:
        """
        A control character in the request-target is rejected (llhttp).
        """
        self.assertRejected(b"GET /a\x01b HTTP/1.1\r\nHost: a\r\n\r\n")


class RequestLimitTests(SynchronousTestCase):
    """
    Tests for L{RequestParser}'s size limits.
    """

    def test_headerBytesAtLimit(self) -> None:
        """
        A head whose names and values add up to exactly maxHeaderBytes is accepted.
        """
        value = b"v" * (100 - len(b"host") - len(b"a") - len(b"x"))
        r = parseRequests(b"GET / HTTP/1.1\r\nHost: a\r\nX: " + value + b"\r\n\r\n", maxHeaderBytes=100)
        self.assertEqual(kinds(r), ["head", "end"])

    def test_headerBytesOverLimit(self) -> None:
        """
        One byte more than maxHeaderBytes is a 431.
        """
        value = b"v" * (101 - len(b"host") - len(b"a") - len(b"x"))
        r = parseRequests(b"GET / HTTP/1.1\r\nHost: a\r\nX: " + value + b"\r\n\r\n", maxHeaderBytes=100)
        self.assertEqual(r.events, [("error", 431, "request header fields too large")])

    def test_defaultHeaderBytesLimit(self) -> None:
        """
        By default a head of more than 60 KiB is a 431.
        """
        r = parseRequests(b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 61440 + b"\r\n\r\n")
        self.assertEqual(r.events[0][:2], ("error", 431))

    def test_headerCountAtLimit(self) -> None:
        """
        maxHeaders fields are accepted.
        """
        fields = b"".join(b"X-%d: v\r\n" % i for i in range(99))
        r = parseRequests(b"GET / HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n")
        self.assertEqual(len(r.events[0][4]), 100)

    def test_headerCountOverLimit(self) -> None:
        """
        One field more than maxHeaders (100 by default) is a 431.
        """
        fields = b"".join(b"X-%d: v\r\n" % i for i in range(100))
        r = parseRequests(b"GET / HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n")
        self.assertEqual(r.events, [("error", 431, "too many request header fields")])

    def test_targetAtLimit(self) -> None:
        """
        A request-target of exactly maxTargetBytes is accepted.
        """
        r = parseRequests(b"GET /" + b"a" * 99 + b" HTTP/1.1\r\nHost: a\r\n\r\n", maxTargetBytes=100)
        self.assertEqual(kinds(r), ["head", "end"])

    def test_targetOverLimit(self) -> None:
        """
        A request-target longer than maxTargetBytes (16 KiB by default) is a 414.
        """
        r = parseRequests(b"GET /" + b"a" * 16384 + b" HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(r.events, [("error", 414, "request-target too long")])

    def test_targetDrippedOverLimit(self) -> None:
        """
        A request-target arriving in small pieces is refused as soon as it passes the limit.
        """
        r = RequestRecorder()
        parser = RequestParser(r, maxTargetBytes=100)
        parser.feed(b"GET /")
        for _ in range(30):
            parser.feed(b"aaaa")
        self.assertEqual(r.events, [("error", 414, "request-target too long")])

    def test_fieldDrippedOverLimit(self) -> None:
        """
        A field value that never ends is refused once the bytes fed inside the head pass
        maxHeaderBytes + maxTargetBytes, before the field is complete (httptools would buffer it all).
        """
        r = RequestRecorder()
        parser = RequestParser(r, maxHeaderBytes=1000, maxTargetBytes=100)
        parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX: ")
        for i in range(10):
            parser.feed(b"v" * 100)
        self.assertEqual(r.events, [])
        parser.feed(b"v" * 101)
        self.assertEqual(r.events, [("error", 431, "request head or trailers too large")])

    def test_bodyFeedsAreNotHeadBytes(self) -> None:
        """
        Many feeds of body data do not count against the head limits.
        """
        r = RequestRecorder()
        parser = RequestParser(r, maxHeaderBytes=100, maxTargetBytes=10)
        parser.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\n")
        for i in range(64):
            parser.feed(b"x" * 64)
        parser.feed(b"\r\n0\r\n\r\n")
        self.assertEqual(r.merged()[1:], [("data", b"x" * 4096), ("end", None)])

    def test_trailerDrippedOverLimit(self) -> None:
        """
        A trailer field that never ends is refused once it passes the limit, before it is complete.
        """
        r = RequestRecorder()
        parser = RequestParser(r, maxHeaderBytes=1000, maxTargetBytes=100)
        parser.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: ")
        for i in range(10):
            parser.feed(b"v" * 100)
        self.assertEqual(kinds(r), ["head"])
        parser.feed(b"v" * 101)
        self.assertEqual(r.events[-1], ("error", 431, "request head or trailers too large"))

    def test_trailerCountOverLimit(self) -> None:
        """
        More trailer fields than maxHeaders is a 431.
        """
        trailers = b"".join(b"T-%d: v\r\n" % i for i in range(4))
        r = parseRequests(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" + trailers + b"\r\n",
            maxHeaders=3)
        self.assertEqual(r.events[-1], ("error", 431, "too many request trailer fields"))

    def test_trailerBytesOverLimit(self) -> None:
        """
        Trailers whose names and values add up to more than maxHeaderBytes are a 431.
        """
        r = parseRequests(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nT: " + b"v" * 100
            + b"\r\n\r\n", maxHeaderBytes=100)
        self.assertEqual(r.events[-1], ("error", 431, "request trailer fields too large"))


def parseResponses(data: bytes, method: bytes = b"GET") -> ResponseRecorder:
    recorder = ResponseRecorder()
    parser = ResponseParser(recorder)
    parser.expectResponse(method)
    parser.feed(data)
    return recorder


class ResponseParserTests(SynchronousTestCase):
    """
    Tests for L{ResponseParser}.
    """

    def test_contentLengthResponse(self) -> None:
        """
        A Content-Length response gives a head with status, reason, version and flags, data, end.
        """
        r = parseResponses(b"HTTP/1.1 200 Fine Thanks\r\nContent-Length: 2\r\nServer: x\r\n\r\nhi")
        self.assertEqual(r.events, [
            ("head", 200, b"Fine Thanks", b"1.1", [(b"content-length", b"2"), (b"server", b"x")],
             dict(keepAlive=True, hasBody=True, chunked=False)),
            ("data", b"hi"),
            ("end", None),
        ])

    def test_emptyReason(self) -> None:
        """
        A status line without a reason phrase gives an empty reason.
        """
        r = parseResponses(b"HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(r.events[0][2], b"")

    def test_chunkedWithTrailers(self) -> None:
        """
        A chunked response is de-chunked and its trailers come with the end.
        """
        r = parseResponses(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"3;x=1\r\nabc\r\n0\r\nGrpc-Status: 0\r\n\r\n")
        self.assertEqual(r.events[0][5], dict(keepAlive=True, hasBody=True, chunked=True))
        self.assertEqual(r.events[1:], [("data", b"abc"), ("end", [(b"grpc-status", b"0")])])

    def test_byteByByte(self) -> None:
        """
        A chunked response fed one byte at a time gives the same events as in one feed.
        """
        data = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n")
        r = ResponseRecorder()
        parser = ResponseParser(r)
        parser.expectResponse(b"GET")
        for i in range(len(data)):
            parser.feed(data[i:i + 1])
        self.assertEqual(r.merged(), parseResponses(data).merged())

    def test_headWithContentLength(self) -> None:
        """
        A response to HEAD has no body even with a Content-Length, and the next response parses.
        """
        r = ResponseRecorder()
        parser = ResponseParser(r)
        parser.expectResponse(b"HEAD")
        parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
        self.assertEqual(r.events, [
            ("head", 200, b"OK", b"1.1", [(b"content-length", b"1234")],
             dict(keepAlive=True, hasBody=False, chunked=False)),
            ("end", None),
        ])
        parser.expectResponse(b"GET")
        parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
        self.assertEqual(r.events[2:], [
            ("head", 200, b"OK", b"1.1", [(b"content-length", b"2")],
             dict(keepAlive=True, hasBody=True, chunked=False)),
            ("data", b"hi"),
            ("end", None),
        ])

    def test_headWithChunkedAndNoLength(self) -> None:
        """
        A response to HEAD ends at its head whether it says chunked or gives no length at all.
        """
        for fields in (b"Transfer-Encoding: chunked\r\n", b""):
            r = parseResponses(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n", b"HEAD")
            self.assertEqual(kinds(r), ["head", "end"])
            self.assertEqual(r.events[0][5], dict(keepAlive=True, hasBody=False, chunked=False))

    def test_headByteByByte(self) -> None:
        """
        A response to HEAD split at every byte still ends exactly at its head.
        """
        data = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX: y\r\n\r\n"
        r = ResponseRecorder()
        parser = ResponseParser(r)
        parser.expectResponse(b"HEAD")
        for i in range(len(data)):
            parser.feed(data[i:i + 1])
        self.assertEqual(kinds(r), ["head", "end"])
        self.assertEqual(r.events[0][4], [(b"content-length", b"5"), (b"x", b"y")])

    def test_headThenUnsolicitedBytes(self) -> None:
        """
        Bytes after the head of a response to HEAD (a body it should not have) are a protocol error.
        """
        r = parseResponses(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"HEAD")
        self.assertEqual(kinds(r), ["head", "end", "error"])

    def test_headAfterEarlyHints(self) -> None:
        """
        An interim 103 before the response to HEAD is reported, and the final head still ends it.
        """
        r = parseResponses(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
                           b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"HEAD")
        self.assertEqual(r.events[0], ("info", 103, [(b"link", b"</a.css>")]))
        self.assertEqual(kinds(r), ["info", "head", "end"])

    def test_noContent(self) -> None:
        """
        A 204 has no body even with a Content-Length.
        """
        r = parseResponses(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n")
        self.assertEqual(kinds(r), ["head", "end"])
        self.assertFalse(r.events[0][5]["hasBody"])

    def test_notModified(self) -> None:
        """
        A 304 has no body even with a Content-Length.
        """
        r = parseResponses(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n")
        self.assertEqual(kinds(r), ["head", "end"])
        self.assertFalse(r.events[0][5]["hasBody"])

    def test_continueThenOK(self) -> None:
        """
        A 100 Continue is reported as informational, then the final response follows.
        """
        r = parseResponses(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(r.events[0], ("info", 100, []))
        self.assertEqual(kinds(r), ["info", "head", "data", "end"])

    def test_continueSplit(self) -> None:
        """
        A 100 Continue in one feed and the final response in a later one: the parser still expects it.
        """
        r = ResponseRecorder()
        parser = ResponseParser(r)
        parser.expectResponse(b"POST")
        parser.feed(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertEqual(kinds(r), ["info"])
        parser.feed(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(kinds(r), ["info", "head", "end"])

    def test_switchingProtocols(self) -> None:
        """
        A 101 ends the parsing: head, end, and the bytes after it are upgradeData.
        """
        r = ResponseRecorder()
        parser = ResponseParser(r)
        parser.expectResponse(b"GET")
        parser.feed(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                    b"\x81\x02hi")
        self.assertEqual(kinds(r), ["head", "end"])
        self.assertEqual(r.events[0][1], 101)
        self.assertEqual(r.events[0][5], dict(keepAlive=False, hasBody=False, chunked=False))
        self.assertEqual(parser.upgradeData, b"\x81\x02hi")
        self.assertRaises(RuntimeError, parser.feed, b"more")

    def test_switchingProtocolsWithoutUpgrade(self) -> None:
        """
        A 101 without an Upgrade field is a protocol error.
        """
        r = parseResponses(b"HTTP/1.1 101 Switching Protocols\r\n\r\nxyz")
        self.assertEqual(kinds(r)[-1], "error")

    def test_connectEstablished(self) -> None:
        """
        A 2xx to CONNECT opens a tunnel at the end of its head, whatever its framing fields say.
        """
        r = ResponseRecorder()
        parser = ResponseParser(r)
        parser.expectResponse(b"CONNECT")
        parser.feed(b"HTTP/1.1 200 Connection Established\r\nContent-Length: 0\r\n\r\n\x16\x03\x01")
        self.assertEqual(kinds(r), ["head", "end"])
        self.assertEqual(r.events[0][5], dict(keepAlive=False, hasBody=False, chunked=False))
        self.assertEqual(parser.upgradeData, b"\x16\x03\x01")

    def test_connectRefused(self) -> None:
        """
        A non-2xx to CONNECT is an ordinary response with a body.
        """
        r = parseResponses(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 4\r\n\r\nnope",
                           b"CONNECT")
        self.assertEqual(r.merged()[1:], [("data", b"nope"), ("end", None)])

    def test_readUntilClose(self) -> None:
        """
        A response without length or chunking has a body that ends when the upstream closes.
        """
        r = ResponseRecorder()
        parser = ResponseParser(r)
        parser.expectResponse(b"GET")
        parser.feed(b"HTTP/1.1 200 OK\r\n\r\nsome")
        parser.feed(b" data")
        self.assertEqual(r.events[0][5], dict(keepAlive=False, hasBody=True, chunked=False))
        self.assertNotIn("end", kinds(r))
        parser.feedEOF()
        self.assertEqual(r.merged()[1:], [("data", b"some data"), ("end", None)])

    def test_readUntilCloseHTTP10(self) -> None:
        """
        An HTTP/1.0 response without Content-Length is read until close.
        """
        r = ResponseRecorder()
        parser = ResponseParser(r)
        parser.expectResponse(b"GET")
        parser.feed(b"HTTP/1.0 200 OK\r\n\r\nabc")
        parser.feedEOF()
        self.assertEqual(r.events[0][3], b"1.0")
        self.assertEqual(kinds(r), ["head", "data", "end"])

    def test_truncatedContentLength(self) -> None:
        """
        A close before the end of a Content-Length body is a protocol error, not an end.
        """
        r = ResponseRecorder()
        parser = ResponseParser(r)
        parser.expectResponse(b"GET")
        parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        parser.feedEOF()
        self.assertEqual(r.events[-1], ("error", "upstream closed mid-response"))
        self.assertNotIn("end", kinds(r))

    def test_truncatedChunked(self) -> None:
        """
        A close before the last chunk is a protocol error.
        """
        r = ResponseRecorder()
        parser = ResponseParser(r)
        parser.expectResponse(b"GET")
        parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        parser.feedEOF()
        self.assertEqual(r.events[-1], ("error", "upstream closed mid-response"))

    def test_truncatedHead(self) -> None:
        """
        A close in the middle of a head is a protocol error.
        """
        r = ResponseRecorder()
        parser = ResponseParser(r)
        parser.expectResponse(b"GET")
        parser.feed(b"HTTP/1.1 200 OK\r\nContent-")
        parser.feedEOF()
        self.assertEqual(r.events, [("error", "upstream closed mid-response")])

    def test_closeBeforeResponse(self) -> None:
        """
        A close while a response is expected but none has begun is its own protocol error.
        """
        r = ResponseRecorder()
        parser = ResponseParser(r)
        parser.expectResponse(b"GET")
        parser.feedEOF()
        self.assertEqual(r.events, [("error", "upstream closed before response")])

    def test_closeWhenIdle(self) -> None:
        """
        A close on an idle connection (after a complete response) is no error.
        """
        r = parseResponses(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(kinds(r), ["head", "end"])
        parser = ResponseParser(r)
        parser.feedEOF()
        self.assertEqual(kinds(r), ["head", "end"])

    def test_unsolicitedData(self) -> None:
        """
        Bytes from the upstream when no response is expected are a protocol error.
        """
        r = ResponseRecorder()
        ResponseParser(r).feed(b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertEqual(r.events, [("error", "unsolicited data from upstream")])

    def test_dataAfterResponse(self) -> None:
        """
        Bytes after a complete response (before the next request) are a protocol error.
        """
        r = parseResponses(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n")
        self.assertEqual(kinds(r), ["head", "end", "error"])

    def test_expectWhilePending(self) -> None:
        """
        expectResponse() while a response is pending is a bug in the caller.
        """
        parser = ResponseParser(ResponseRecorder())
        parser.expectResponse(b"GET")
        self.assertRaises(RuntimeError, parser.expectResponse, b"GET")

    def test_keepAlive(self) -> None:
        """
        HTTP/1.1 keeps alive unless Connection: close; HTTP/1.0 only with Connection: keep-alive.
        """
        cases = [
            (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", True),
            (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", False),
            (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", False),
            (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n", True),
        ]
        for data, keepAlive in cases:
            head = parseResponses(data).events[0]
            self.assertEqual(head[5]["keepAlive"], keepAlive, data)
            self.assertEqual(head[3], data[5:8], data)

    def test_unsupportedTransferEncoding(self) -> None:
        """
        A response body with a transfer-coding other than chunked is a protocol error.
        """
        r = parseResponses(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc")
        self.assertEqual(r.events, [("error", "unsupported Transfer-Encoding from upstream")])

    def test_contentLengthAndTransferEncoding(self) -> None:
        """
        A response with both Content-Length and Transfer-Encoding is a protocol error (llhttp).
        """
        r = parseResponses(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n")
        self.assertEqual(kinds(r), ["error"])

    def test_malformedStatus(self) -> None:
        """
        A malformed status line is a protocol error.
        """
        self.assertEqual(kinds(parseResponses(b"HTTP/1.1 20 OK\r\n\r\n")), ["error"])

    def test_headerCountLimit(self) -> None:
        """
        More response fields than maxHeaders is a protocol error.
        """
        r = ResponseRecorder()
        parser = ResponseParser(r, maxHeaders=2)
        parser.expectResponse(b"GET")
        parser.feed(b"HTTP/1.1 200 OK\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n")
        self.assertEqual(r.events, [("error", "too many response header fields")])

    def test_headerBytesLimit(self) -> None:
        """
        A response head larger than maxHeaderBytes is a protocol error.
        """
        r = ResponseRecorder()
        parser = ResponseParser(r, maxHeaderBytes=50)
        parser.expectResponse(b"GET")
        parser.feed(b"HTTP/1.1 200 OK\r\nA: " + b"x" * 50 + b"\r\n\r\n")
        self.assertEqual(r.events, [("error", "response head too large")])

    def test_fieldDrippedOverLimit(self) -> None:
        """
        A response field that never ends is refused once it passes maxHeaderBytes.
        """
        r = ResponseRecorder()
        parser = ResponseParser(r, maxHeaderBytes=500)
        parser.expectResponse(b"GET")
        parser.feed(b"HTTP/1.1 200 OK\r\nA: ")
        for i in range(5):
            parser.feed(b"x" * 100)
        self.assertEqual(r.events, [])
        parser.feed(b"x")
        self.assertEqual(r.events, [("error", "response head or trailers too large")])

    def test_handlerExceptionPropagates(self) -> None:
        """
        An exception from the handler leaves feed() as itself.
        """
        class Broken(ResponseRecorder):
            def responseData(self, data):
                raise ZeroDivisionError()

        parser = ResponseParser(Broken())
        parser.expectResponse(b"GET")
        self.assertRaises(ZeroDivisionError, parser.feed, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")


class EncoderTests(SynchronousTestCase):
    """
    Tests for the encoders, mostly by round trip through the parsers.
    """

    HEADERS = [(b"content-type", b"text/plain"), (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")]

    def test_responseHeadStandardReason(self) -> None:
        """
        A standard reason phrase is used when none is given.
        """
        self.assertEqual(encodeResponseHead(404, None, [(b"content-length", b"0")]),
                         b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
        self.assertEqual(REASON_PHRASES[503], b"Service Unavailable")

    def test_responseHeadCustomReason(self) -> None:
        """
        A given reason phrase is used as is, and an unknown status gets an empty one.
        """
        self.assertEqual(encodeResponseHead(200, b"Fine", []), b"HTTP/1.1 200 Fine\r\n\r\n")
        self.assertEqual(encodeResponseHead(599, None, []), b"HTTP/1.1 599 \r\n\r\n")

    def test_responseHeadFraming(self) -> None:
        """
        chunked adds transfer-encoding; keepAlive false adds connection: close; a keep-alive HTTP/1.0
        peer gets connection: keep-alive.
        """
        self.assertEqual(encodeResponseHead(200, None, [], chunked=True, keepAlive=False),
                         b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n")
        self.assertEqual(encodeResponseHead(200, None, [(b"a", b"b")], peerVersion=b"1.0"),
                         b"HTTP/1.1 200 OK\r\na: b\r\nconnection: keep-alive\r\n\r\n")
        self.assertEqual(encodeResponseHead(200, None, [], keepAlive=False, peerVersion=b"1.0"),
                         b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n")

    def test_responseRoundTrip(self) -> None:
        """
        An encoded chunked response with trailers parses back to the same status, fields, body and
        trailers.
        """
        wire = b"".join([
            encodeResponseHead(201, None, self.HEADERS, chunked=True),
            *encodeChunk(b"hello "), *encodeChunk(b""), *encodeChunk(b"world"),
            encodeLastChunk([(b"grpc-status", b"0"), (b"grpc-message", b"ok")]),
        ])
        r = parseResponses(wire)
        self.assertEqual(r.merged(), [
            ("head", 201, b"Created", b"1.1", self.HEADERS + [(b"transfer-encoding", b"chunked")],
             dict(keepAlive=True, hasBody=True, chunked=True)),
            ("data", b"hello world"),
            ("end", [(b"grpc-status", b"0"), (b"grpc-message", b"ok")]),
        ])

    def test_requestRoundTrip(self) -> None:
        """
        An encoded request head with a Content-Length body parses back to the same request.
        """
        headers = [(b"host", b"api"), (b"content-length", b"3"), (b"x-a", b"1"), (b"x-a", b"2")]
        r = parseRequests(encodeRequestHead(b"PUT", b"/p?q=1", headers) + b"abc")
        self.assertEqual(r.events, [
            ("head", b"PUT", b"/p?q=1", b"1.1", headers, dict(
                keepAlive=True, hasBody=True, chunked=False, upgrade=False, expectContinue=False)),
            ("data", b"abc"),
            ("end", None),
        ])

    def test_requestRoundTripChunked(self) -> None:
        """
        An encoded chunked request parses back with its body and no trailers.
        """
        wire = b"".join([encodeRequestHead(b"POST", b"/", [(b"host", b"a")], chunked=True),
                         *encodeChunk(b"x" * 300), encodeLastChunk()])
        r = parseRequests(wire)
        self.assertEqual(r.events[0][4], [(b"host", b"a"), (b"transfer-encoding", b"chunked")])
        self.assertEqual(r.merged()[1:], [("data", b"x" * 300), ("end", None)])

    def test_requestHeadWithoutHeaders(self) -> None:
        """
        A request head without fields is just the request line and the empty line.
        """
        self.assertEqual(encodeRequestHead(b"GET", b"/", []), b"GET / HTTP/1.1\r\n\r\n")

    def test_requestHeadHostFirst(self) -> None:
        """
        A host given apart is written as the first field, before the others, with or without them.
        """
        self.assertEqual(encodeRequestHead(b"GET", b"/", [(b"accept", b"*/*")], host=b"example"),
                         b"GET / HTTP/1.1\r\nhost: example\r\naccept: */*\r\n\r\n")
        self.assertEqual(encodeRequestHead(b"GET", b"/", [], chunked=True, host=b"example"),
                         b"GET / HTTP/1.1\r\nhost: example\r\ntransfer-encoding: chunked\r\n\r\n")

    def test_chunkDoesNotCopy(self) -> None:
        """
        encodeChunk frames the data object itself (hex size, data, CRLF) for writeSequence.
        """
        data = b"y" * 26
        framed = encodeChunk(data)
        self.assertEqual(framed, (b"1a\r\n", data, b"\r\n"))
        self.assertIs(framed[1], data)

    def test_emptyChunk(self) -> None:
        """
        Empty data gives no chunk at all: a zero-size chunk would end the body.
        """
        self.assertEqual(encodeChunk(b""), ())

    def test_lastChunk(self) -> None:
        """
        The last chunk is 0, the trailers if any, and the empty line.
        """
        self.assertEqual(encodeLastChunk(), b"0\r\n\r\n")
        self.assertEqual(encodeLastChunk([(b"a", b"1")]), b"0\r\na: 1\r\n\r\n")


class HopByHopTests(SynchronousTestCase):
    """
    Tests for L{stripHopByHop}.
    """

    def test_nothingToStrip(self) -> None:
        """
        Without hop-by-hop fields the same list comes back, not a copy.
        """
        headers = [(b"host", b"a"), (b"accept", b"*/*")]
        self.assertIs(stripHopByHop(headers), headers)

    def test_stripsFixedSet(self) -> None:
        """
        Connection, Keep-Alive, Proxy-Connection, TE, Transfer-Encoding and Upgrade are removed; the
        rest keeps its order.
        """
        headers = [(b"host", b"a"), (b"connection", b"keep-alive"), (b"keep-alive", b"timeout=5"),
                   (b"proxy-connection", b"keep-alive"), (b"x-1", b"1"), (b"te", b"gzip"),
                   (b"transfer-encoding", b"chunked"), (b"upgrade", b"websocket"), (b"x-2", b"2")]
        self.assertEqual(stripHopByHop(headers), [(b"host", b"a"), (b"x-1", b"1"), (b"x-2", b"2")])
        self.assertEqual(HOP_BY_HOP, frozenset([b"connection", b"keep-alive", b"proxy-connection", b"te",
                                                b"transfer-encoding", b"upgrade"]))

    def test_connectionNominated(self) -> None:
        """
        Connection: close, x-foo removes x-foo too (names compared case-insensitively).
        """
        headers = [(b"connection", b"close, X-Foo"), (b"x-foo", b"1"), (b"x-bar", b"2")]
        self.assertEqual(stripHopByHop(headers), [(b"x-bar", b"2")])

    def test_repeatedConnection(self) -> None:
        """
        Every Connection field nominates its names.
        """
        headers = [(b"connection", b"x-a"), (b"x-a", b"1"), (b"x-b", b"2"), (b"connection", b"x-b,,"),
                   (b"x-c", b"3")]
        self.assertEqual(stripHopByHop(headers), [(b"x-c", b"3")])

    def test_teTrailersKept(self) -> None:
        """
        TE listing trailers is kept as te: trailers, even when Connection names it; other TE values go.
        """
        self.assertEqual(stripHopByHop([(b"connection", b"TE"), (b"te", b"trailers")]),
                         [(b"te", b"trailers")])
        self.assertEqual(stripHopByHop([(b"te", b"deflate;q=0.5, Trailers")]), [(b"te", b"trailers")])
        self.assertEqual(stripHopByHop([(b"te", b"deflate")]), [])

    def test_plainConnectionValues(self) -> None:
        """
        The common Connection values (keep-alive, close, in either case) are stripped without splitting;
        close still nominates a field named close, and te is still kept when it lists trailers.
        """
        headers = [(b"server", b"s"), (b"connection", b"keep-alive"), (b"close", b"x")]
        self.assertEqual(stripHopByHop(headers), [(b"server", b"s"), (b"close", b"x")])
        for value in (b"close", b"Close"):
            headers = [(b"server", b"s"), (b"connection", value), (b"close", b"x"), (b"x-1", b"1")]
            self.assertEqual(stripHopByHop(headers), [(b"server", b"s"), (b"x-1", b"1")])
        headers = [(b"connection", b"Keep-Alive"), (b"te", b"trailers"), (b"x-1", b"1")]
        self.assertEqual(stripHopByHop(headers), [(b"te", b"trailers"), (b"x-1", b"1")])
        headers = [(b"connection", b"keep-alive"), (b"connection", b"x-2"), (b"x-2", b"2"), (b"x-1", b"1")]
        self.assertEqual(stripHopByHop(headers), [(b"x-1", b"1")])

    def test_proxyAuthenticateKept(self) -> None:
        """
        Proxy-Authenticate and Proxy-Authorization are end to end (as in Envoy).
        """
        headers = [(b"proxy-authenticate", b"Basic"), (b"proxy-authorization", b"Basic x"),
                   (b"upgrade", b"h2c")]
        self.assertEqual(stripHopByHop(headers), headers[:2])
