"""
HTTP/1.1 codec, sans-IO: bytes in, handler callbacks out; encoders return bytes for the transport.

This is the hot path of the proxy, so the shape is chosen for speed:

- A parser is given a handler object once; its methods are bound once in ``__init__`` and called with
  plain arguments.  No event objects, no Deferreds, no header dicts.
- Headers are ordered lists of ``(name, value)`` tuples of bytes, names lowercased, repeats and order
  kept (as h2 and Envoy do).  Values have their trailing whitespace removed (RFC 9110 §5.5: it is not
  part of the value; llhttp strips only the leading whitespace).
- Body data is handed on exactly as httptools produces it: httptools slices each body span out of the
  buffer it was fed into a new ``bytes`` object (one copy we cannot avoid, in C); we never copy, join or
  buffer it again.

Both parsers run llhttp (through httptools) in its default strict mode and add the checks llhttp does
not make.  What llhttp rejects by itself (see the tests, which state it per case): Content-Length
together with Transfer-Encoding, any duplicate Content-Length, a Content-Length that is not all digits
or overflows, Transfer-Encoding whose final coding is not ``chunked`` (in a request), control characters
(NUL, CR, LF, VT, ...) in header values, bare LF or bare CR line endings, obs-fold, whitespace between a
field name and the colon, invalid field-name characters, invalid chunk sizes (``0x5``, ``-1``, spaces,
overflow), most malformed chunk extensions, unknown methods, invalid request targets and versions.
What this module adds: a Transfer-Encoding other than exactly ``chunked`` (``gzip, chunked``,
``,chunked``, a repeated header), Transfer-Encoding on HTTP/1.0, a missing or repeated Host on HTTP/1.1,
HTTP versions other than 1.0 and 1.1 (llhttp accepts 0.9 and 2.0 request lines), the size limits, and
the request/response pairing (HEAD, CONNECT, unsolicited data).  We reject *every* duplicate
Content-Length, even with equal values (Envoy rejects only differing ones): simpler and never needed by
a correct client.  Known gap: an empty chunk-extension name (``5;=x``) is accepted by llhttp and
httptools does not expose extensions to us; the chunk framing itself is still exact.

What httptools cannot do, and what we do instead:

- **pause()/resume()**: llhttp can pause (``HPE_PAUSED``) but httptools exposes neither ``llhttp_pause``
  nor the offset at which a callback stopped the parser.  So a parser has no ``pause()``: every message
  in one ``feed()`` is delivered, in order.  The connection manager queues pipelined requests and calls
  ``pauseProducing()`` on the transport to stop further input.
- **skip the body of a response to HEAD**: llhttp's "skip body" is the return value 1 of
  ``on_headers_complete``, which httptools does not let us return.  Instead, while a HEAD (or CONNECT)
  response is expected, :class:`ResponseParser` finds the end of each response head itself (the first
  ``CRLF CRLF``: llhttp's strict mode accepts no other line ending), feeds llhttp only up to it, ends the
  response there and replaces the llhttp parser for the next one.
- **upgrade with a body**: httptools tells llhttp to skip the body of every upgrade request, so the body
  bytes arrive with the tunnel bytes.  For a Content-Length body we cut it off ourselves; an upgrade
  request with a chunked body is rejected with 400 (we could not find its end).
"""

from __future__ import annotations

from http import HTTPStatus
from types import MappingProxyType
from typing import Iterable, List, Optional, Protocol, Sequence, Tuple

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpRequestParser,
    HttpResponseParser,
)

__all__ = [
    "Headers",
    "RequestHandler",
    "ResponseHandler",
    "RequestParser",
    "ResponseParser",
    "encodeRequestHead",
    "encodeResponseHead",
    "encodeChunk",
    "encodeLastChunk",
    "HOP_BY_HOP",
    "stripHopByHop",
    "REASON_PHRASES",
]

Headers = List[Tuple[bytes, bytes]]


class RequestHandler(Protocol):
    """
    What a :class:`RequestParser` calls.  For each request, in order: ``requestHead`` once, then
    ``requestData`` zero or more times, then ``requestEnd`` once; or ``protocolError`` once at any point,
    after which nothing more is called.  Pipelined requests produce consecutive sequences within a
    single ``feed()``.  An exception raised by a handler method propagates out of ``feed()`` unchanged
    and leaves the parser unusable (a bug is not turned into a 400).
    """

    def requestHead(
        self,
        method: bytes,
        target: bytes,
        version: bytes,
        headers: Headers,
        keepAlive: bool,
        hasBody: bool,
        chunked: bool,
        upgrade: bool,
        expectContinue: bool,
    ) -> None:
        """
        A request head was parsed and validated.

        @param method: e.g. C{b"GET"}, as llhttp knows it (an unknown method was already a 400).
        @param target: the request-target exactly as sent (origin, absolute, authority or asterisk form).
        @param version: C{b"1.1"} or C{b"1.0"}.
        @param headers: every field, lowercased names, in order, hop-by-hop ones included (see
            L{stripHopByHop}).  The list is the handler's to keep.
        @param keepAlive: the connection may carry another request after this one (HTTP/1.1 without
            C{Connection: close}, or HTTP/1.0 with C{Connection: keep-alive}).  When false, the parser
            discards every byte after this request.
        @param hasBody: C{requestData} calls may follow (a chunked body, or a Content-Length above 0).
        @param chunked: the body is chunked on the wire (trailers may come with C{requestEnd}).
        @param upgrade: a CONNECT, or an C{Upgrade} with C{Connection: upgrade}.  The parser stops after
            this request; once C{feed()} has returned after C{requestEnd}, C{parser.upgradeData} holds the
            bytes that followed it.  See L{RequestParser.declineUpgrade}.
        @param expectContinue: the request carries C{Expect: 100-continue} (case-insensitive); the
            manager decides whether to send C{100 Continue}.  Other expectations are left in C{headers}.
        """

    def requestData(self, data: bytes) -> None:
        """
        A piece of the request body (de-chunked), as httptools produced it; never empty.
        """

    def requestEnd(self, trailers: Optional[Headers]) -> None:
        """
        The request is complete.  C{trailers} is the list of trailer fields of a chunked body (lowercased
        names), or C{None} when there were none.
        """

    def protocolError(self, status: int, reason: str) -> None:
        """
        The input is not acceptable HTTP/1.1: reply C{status} (400, 414, 431, 501 or 505) and close.
        The parser accepts no more input.  C{reason} is for logs, not for the client.
        """


class ResponseHandler(Protocol):
    """
    What a :class:`ResponseParser` calls.  For each expected response: ``responseInformational`` zero or
    more times (1xx except 101), then ``responseHead`` once, ``responseData`` zero or more times and
    ``responseEnd`` once; or ``protocolError`` once at any point, after which nothing more is called.
    An exception raised by a handler method propagates out of ``feed()``/``feedEOF()`` unchanged.
    """

    def responseInformational(self, status: int, headers: Headers) -> None:
        """
        An interim 1xx response (100 Continue, 102, 103 Early Hints, ...) arrived; the final response
        follows.  101 is not interim: it is a final L{responseHead}.
        """

    def responseHead(
        self,
        status: int,
        reason: bytes,
        version: bytes,
        headers: Headers,
        keepAlive: bool,
        hasBody: bool,
        chunked: bool,
    ) -> None:
        """
        The final response head was parsed.

        @param reason: the reason phrase as sent (maybe C{b""}).
        @param version: C{b"1.1"} or C{b"1.0"}.
        @param keepAlive: the connection can be reused once this response ends (false for
            C{Connection: close}, HTTP/1.0 without keep-alive, read-until-close bodies, 101 and a 2xx
            to CONNECT).
        @param hasBody: C{responseData} calls may follow.  False for responses to HEAD, for 1xx, 204 and
            304, and for a 2xx to CONNECT; true for read-until-close bodies.
        @param chunked: the body is chunked on the wire (only ever true when C{hasBody} is).
        """

    def responseData(self, data: bytes) -> None:
        """
        A piece of the response body (de-chunked), as httptools produced it; never empty.
        """

    def responseEnd(self, trailers: Optional[Headers]) -> None:
        """
        The response is complete (trailers as in L{RequestHandler.requestEnd}).  After a 101, or a 2xx
        to CONNECT, C{parser.upgradeData} holds the tunnel bytes that came with the head once C{feed()}
        returns.
        """

    def protocolError(self, reason: str) -> None:
        """
        The upstream broke HTTP/1.1 (malformed or unsolicited bytes, a limit exceeded, or a close in the
        middle of a response).  The parser accepts no more input; the connection must be closed.
        """


# Parser states.  Those above _CHUNK divert feed() from the llhttp fast path.
_IDLE = 0  # between messages
_HEAD = 1  # inside a message head
_BODY = 2  # inside a body
_CHUNK = 3  # after a chunk-size line, before its data: the trailers of the last chunk
_UPGRADE_BODY = 4  # an upgrade request's Content-Length body, which we cut from the tunnel bytes
_UPGRADED = 5  # the connection switched protocols; upgradeData holds what followed
_CLOSING = 6  # a non-keep-alive request ended: discard the rest
_DEAD = 7  # after protocolError (or a handler exception)

_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}


def _version(parser, connection: bool) -> Optional[bytes]:
    """
    The message's version, C{b"1.1"}, C{b"1.0"}, or C{None} for any other.

    httptools formats the version as a str (over 200 ns); llhttp's keep-alive flag is a cheap tell for
    the common case: in a message without a Connection field it is set only for HTTP/1.1 (llhttp's
    strict mode accepts 0.9, 1.0, 1.1 and 2.0, and treats all but 1.1 as 1.0).
    """
    if not connection and parser.should_keep_alive():
        return b"1.1"
    return _VERSIONS.get(parser.get_http_version())


class _Reject(Exception):
    """
    Raised in a parser callback to stop llhttp and reply an error: httptools turns it into an
    HttpParserCallbackError whose __context__ is this object.
    """

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason


class _HeadDone(Exception):
    """
    Raised in ResponseParser.on_headers_complete to stop llhttp after a head with no body that llhttp
    would not know to have none (HEAD, a 2xx to CONNECT).
    """


class _Discard(Exception):
    """
    Raised in on_message_begin after a non-keep-alive request: stops llhttp without an error.
    """


# Only these names need a look at their value while parsing; all others are appended untouched.
_SPECIAL = frozenset(
    [b"content-length", b"transfer-encoding", b"host", b"connection", b"expect"]
)


def _connectionTokens(value: bytes) -> Tuple[bool, bool]:
    """
    Return (close, keepAlive) for a Connection field value.
    """
    value = value.lower()
    if value == b"keep-alive":
        return False, True
    if value == b"close":
        return True, False
    close = keepAlive = False
    for token in value.split(b","):
        token = token.strip(b" \t")
        if token == b"close":
            close = True
        elif token == b"keep-alive":
            keepAlive = True
    return close, keepAlive


def _addTrailer(parser, name: bytes, value: bytes, status: int, side: str) -> None:
    """
    Add a trailer field to C{parser}'s trailers, within the same budgets as its head (a budget of their own).
    """
    trailers = parser._trailers
    if trailers is None:
        trailers = parser._trailers = []
        parser._headerBytes = 0
    parser._headerBytes += len(name) + len(value)
    if parser._headerBytes > parser._maxHeaderBytes:
        raise _Reject(status, f"{side} trailer fields too large")
    if len(trailers) >= parser._maxHeaders:
        raise _Reject(status, f"too many {side} trailer fields")
    trailers.append((name, value))


class RequestParser:
    """
    Parses the requests of one downstream connection and reports them to a L{RequestHandler}.

    Call L{feed} with every chunk of bytes read from the connection.  The parser enforces the limits
    below and the request-smuggling rules described in the module docstring; a violation is reported
    once with C{handler.protocolError(status, reason)}, after which L{feed} ignores its input.

    @ivar upgradeData: C{None}, or, once an upgrade request (see C{RequestHandler.requestHead}) has
        ended, the bytes that followed it on the connection (maybe C{b""}).  After that, L{feed} must
        not be called again unless L{declineUpgrade} is.
    """

    __slots__ = (
        "_parser",
        "_onHead",
        "_onData",
        "_onEnd",
        "_onError",
        "_maxHeaderBytes",
        "_maxHeaders",
        "_maxTargetBytes",
        "_maxStall",
        "_state",
        "_messages",
        "_chunks",
        "_stall",
        "_target",
        "_headers",
        "_headerBytes",
        "_trailers",
        "_contentLength",
        "_transferEncoding",
        "_chunked",
        "_hosts",
        "_connection",
        "_close",
        "_keepAlive",
        "_expectContinue",
        "_keepConnection",
        "_upgradeBodyLeft",
        "upgradeData",
    )

    def __init__(
        self,
        handler: RequestHandler,
        maxHeaderBytes: int = 60 * 1024,
        maxHeaders: int = 100,
        maxTargetBytes: int = 16 * 1024,
    ) -> None:
        """
        @param handler: receives the callbacks; its methods are looked up once, here.
        @param maxHeaderBytes: the most bytes of field names plus values in a request head (Envoy counts
            the same way, C{max_request_headers_kb}); more is a 431.  Trailers have a budget of their own
            of the same size.
        @param maxHeaders: the most header fields (and, separately, trailer fields); more is a 431.
        @param maxTargetBytes: the longest request-target; longer is a 414.  (The method and version
            are bounded by llhttp, so this bounds the request line.)
        """
        self._onHead = handler.requestHead
        self._onData = handler.requestData
        self._onEnd = handler.requestEnd
        self._onError = handler.protocolError
        self._maxHeaderBytes = maxHeaderBytes
        self._maxHeaders = maxHeaders
        self._maxTargetBytes = maxTargetBytes
        # httptools accumulates a field in memory until it is complete, before we see it, so a field
        # dripped in forever would grow without bound: feed() also counts the raw bytes of the feeds that
        # fall wholly inside one head (or one trailer section) against this.
        self._maxStall = maxHeaderBytes + maxTargetBytes
        self._state = _IDLE
        self._messages = 0
        self._chunks = 0
        self._stall = 0
        self._trailers = None
        self._upgradeBodyLeft = 0
        self.upgradeData: Optional[bytes] = None
        self._parser = HttpRequestParser(self)

    def feed(self, data: bytes) -> None:
        """
        Parse C{data}, the next bytes from the connection, calling the handler for every event it
        completes.

        @raise RuntimeError: if the connection was upgraded (see C{upgradeData}).
        """
        state = self._state
        if state > _CHUNK:
            self._feedSpecial(data)
            return
        messages = self._messages
        chunks = self._chunks
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as e:
            self._upgraded(data[e.args[0]:])
            return
        except HttpParserCallbackError as e:
            self._callbackFailed(e)
            return
        except HttpParserError as e:
            if self._state == _CLOSING:
                # llhttp refuses data after "Connection: close"; we ignore it instead.
                self._state = _DEAD
                return
            self._fail(400, str(e))
            return
        if (
            state == self._state
            and (state == _HEAD or state == _CHUNK)
            and messages == self._messages
            and chunks == self._chunks
        ):
            self._stall += len(data)
            if self._stall > self._maxStall:
                self._fail(431, "request head or trailers too large")
        else:
            self._stall = 0

    def declineUpgrade(self) -> None:
        """
        Go on parsing HTTP/1.1 after an upgrade request the manager will not honour (say, an C{h2c}
        upgrade answered with a plain response): the bytes in C{upgradeData} are parsed as the next
        requests, now.

        @raise RuntimeError: if the parser is not in the upgraded state.
        """
        if self._state != _UPGRADED:
            raise RuntimeError("declineUpgrade() without an upgrade")
        data = self.upgradeData
        self.upgradeData = None
        self._state = _IDLE
        if data:
            self.feed(data)

    # -- llhttp callbacks (httptools looks them up by name) --------------------------------------------

    def on_message_begin(self) -> None:
        if self._state == _CLOSING:
            raise _Discard()
        self._state = _HEAD
        self._messages += 1
        self._target = b""
        self._headers = []
        self._headerBytes = 0
        self._trailers = None
        self._contentLength = -1  # absent
        self._transferEncoding = None
        self._chunked = False
        self._hosts = 0
        self._connection = False
        self._close = False
        self._keepAlive = False
        self._expectContinue = False

    def on_url(self, piece: bytes) -> None:
        # llhttp reports the target once per feed_data() call it spans.
        target = self._target + piece if self._target else piece
        if len(target) > self._maxTargetBytes:
            raise _Reject(414, "request-target too long")
        self._target = target

    def on_header(self, name: bytes, value: bytes) -> None:
        # The hottest function of the codec (once per field): keep it lean.
        name = name.lower()
        value = value.rstrip(b" \t")
        if self._state != _HEAD:
            self._trailer(name, value)
            return
        headers = self._headers
        size = self._headerBytes + len(name) + len(value)
        self._headerBytes = size
        if size > self._maxHeaderBytes or len(headers) >= self._maxHeaders:
            if size > self._maxHeaderBytes:
                raise _Reject(431, "request header fields too large")
            raise _Reject(431, "too many request header fields")
        if name in _SPECIAL:
            self._specialHeader(name, value)
        headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        version = _version(parser, self._connection)
        if version is None:
            raise _Reject(505, "unsupported HTTP version")
        chunked = self._chunked
        if version == b"1.1":
            if self._hosts == 0:
                raise _Reject(400, "missing Host header")
            keepAlive = not self._close
        else:
            if self._transferEncoding is not None:
                raise _Reject(400, "Transfer-Encoding in an HTTP/1.0 request")
            keepAlive = self._keepAlive and not self._close
        method = parser.get_method()
        hasBody = chunked or self._contentLength > 0
        upgrade = parser.should_upgrade()
        if upgrade and hasBody:
            if method == b"CONNECT":
                raise _Reject(400, "CONNECT with a body")
            if chunked:
                raise _Reject(400, "upgrade request with a chunked body")
            # httptools makes llhttp skip this body; feed() cuts it off the tunnel bytes.
            self._upgradeBodyLeft = self._contentLength
        self._state = _BODY
        self._keepConnection = keepAlive
        self._onHead(
            method,
            self._target,
            version,
            self._headers,
            keepAlive,
            hasBody,
            chunked,
            upgrade,
            self._expectContinue,
        )

    def on_body(self, data: bytes) -> None:
        self._state = _BODY
        self._onData(data)

    def on_chunk_header(self) -> None:
        self._state = _CHUNK
        self._chunks += 1

    def on_message_complete(self) -> None:
        if self._upgradeBodyLeft:
            # llhttp ended the message without its body: feed() delivers the body, then the end.
            self._state = _UPGRADE_BODY
            return
        self._state = _IDLE if self._keepConnection else _CLOSING
        self._onEnd(self._trailers)

    # -- internals -------------------------------------------------------------------------------------

    def _specialHeader(self, name: bytes, value: bytes) -> None:
        if name == b"content-length":
            # llhttp already rejects duplicates, non-digits and Content-Length with Transfer-Encoding;
            # this is the belt to its braces, and gives us the length.
            if not value.isdigit() or self._contentLength >= 0 or self._transferEncoding is not None:
                raise _Reject(400, "invalid Content-Length")
            self._contentLength = int(value)
        elif name == b"transfer-encoding":
            if self._transferEncoding is not None or self._contentLength >= 0:
                raise _Reject(400, "repeated Transfer-Encoding, or with Content-Length")
            self._transferEncoding = value
            if value.lower() == b"chunked":
                self._chunked = True
            elif value.rsplit(b",", 1)[-1].strip(b" \t").lower() == b"chunked" and value[:1] != b",":
                # A coding before chunked (gzip, chunked) is valid HTTP, but we would have to undo it.
                raise _Reject(501, "unsupported transfer-coding")
            else:
                raise _Reject(400, "invalid Transfer-Encoding")
        elif name == b"host":
            self._hosts += 1
            if self._hosts > 1:
                raise _Reject(400, "repeated Host header")
        elif name == b"connection":
            self._connection = True
            close, keepAlive = _connectionTokens(value)
            self._close = self._close or close
            self._keepAlive = self._keepAlive or keepAlive
        elif name == b"expect":
            self._expectContinue = value.lower() == b"100-continue"

    def _trailer(self, name: bytes, value: bytes) -> None:
        _addTrailer(self, name, value, 431, "request")

    def _feedSpecial(self, data: bytes) -> None:
        state = self._state
        if state == _UPGRADE_BODY:
            rest = self._upgradeBody(data)
            if rest is not None:
                self.upgradeData = rest
                self._state = _UPGRADED
        elif state == _UPGRADED:
            raise RuntimeError("feed() after an upgrade: the bytes belong to the tunnel")
        # _CLOSING, _DEAD: ignore the input.

    def _upgraded(self, rest: bytes) -> None:
        if self._state == _UPGRADE_BODY:
            rest = self._upgradeBody(rest)
            if rest is None:
                return
        self.upgradeData = rest
        self._state = _UPGRADED

    def _upgradeBody(self, data: bytes) -> Optional[bytes]:
        """
        Deliver the part of C{data} that belongs to an upgrade request's body; return the bytes after
        the body, or C{None} if the body is not complete yet.
        """
        left = self._upgradeBodyLeft
        if len(data) < left:
            if data:
                self._upgradeBodyLeft = left - len(data)
                self._onData(data)
            return None
        self._upgradeBodyLeft = 0
        self._onData(data[:left])
        self._onEnd(None)
        return data[left:]

    def _callbackFailed(self, error: HttpParserCallbackError) -> None:
        cause = error.__context__
        if isinstance(cause, _Reject):
            self._fail(cause.status, cause.reason)
            return
        self._state = _DEAD
        if isinstance(cause, _Discard):
            return
        if cause is not None:
            # A bug in the handler: let it surface as itself, not as a 400.
            raise cause from None
        raise error

    def _fail(self, status: int, reason: str) -> None:
        self._state = _DEAD
        self._onError(status, reason)


class ResponseParser:
    """
    Parses the responses on one upstream connection and reports them to a L{ResponseHandler}.

    Call L{expectResponse} with the request's method when the request is written (before any of its
    response can be fed), then L{feed} with every chunk of bytes read, and L{feedEOF} when the upstream
    closes.  One response is expected at a time: upstream requests are not pipelined (Envoy does not
    either), so bytes that arrive with no response expected are a protocol error.

    @ivar upgradeData: C{None}, or, after a 101 or a 2xx to CONNECT, the bytes that followed the head
        (maybe C{b""}).  After that, L{feed} must not be called again.
    """

    __slots__ = (
        "_parser",
        "_onInformational",
        "_onHead",
        "_onData",
        "_onEnd",
        "_onError",
        "_maxHeaderBytes",
        "_maxHeaders",
        "_state",
        "_messages",
        "_chunks",
        "_stall",
        "_expected",
        "_scan",
        "_headDone",
        "_tail",
        "_interim",
        "_eofBody",
        "_reason",
        "_headers",
        "_headerBytes",
        "_trailers",
        "_contentLength",
        "_transferEncoding",
        "_connection",
        "_close",
        "_keepAlive",
        "upgradeData",
    )

    def __init__(
        self, handler: ResponseHandler, maxHeaderBytes: int = 60 * 1024, maxHeaders: int = 100
    ) -> None:
        """
        @param handler: receives the callbacks; its methods are looked up once, here.
        @param maxHeaderBytes: the most bytes of reason phrase, field names and values in a response
            head (and, separately, in its trailers).
        @param maxHeaders: the most fields in a response head (and, separately, in its trailers).
        """
        self._onInformational = handler.responseInformational
        self._onHead = handler.responseHead
        self._onData = handler.responseData
        self._onEnd = handler.responseEnd
        self._onError = handler.protocolError
        self._maxHeaderBytes = maxHeaderBytes
        self._maxHeaders = maxHeaders
        self._state = _IDLE
        self._messages = 0
        self._chunks = 0
        self._stall = 0
        self._expected: Optional[bytes] = None
        self._scan = False
        self._headDone = False
        self._tail = b""
        self._interim = False
        self._eofBody = False
        self._trailers = None
        self.upgradeData: Optional[bytes] = None
        self._parser = HttpResponseParser(self)

    def expectResponse(self, method: bytes) -> None:
        """
        Announce that a request with C{method} was sent, so its response may now arrive.  The method
        decides the framing: a response to HEAD has no body whatever its headers say, and a 2xx to
        CONNECT opens a tunnel.

        @raise RuntimeError: if a response is already expected or in progress.
        """
        if self._expected is not None or self._state != _IDLE:
            raise RuntimeError("expectResponse() while a response is pending")
        self._expected = method
        self._tail = b""
        # For these two the head's end must be found by us: see the module docstring.
        self._scan = method == b"HEAD" or method == b"CONNECT"

    def feed(self, data: bytes) -> None:
        """
        Parse C{data}, the next bytes from the upstream, calling the handler for every event it
        completes.

        @raise RuntimeError: after a 101 or a 2xx to CONNECT (the bytes belong to the tunnel).
        """
        if self._state > _CHUNK:
            if self._state == _UPGRADED:
                raise RuntimeError("feed() after an upgrade: the bytes belong to the tunnel")
            return
        if self._scan:
            self._feedScanning(data)
        else:
            self._feed(data)

    def feedEOF(self) -> None:
        """
        The upstream closed its side.  Ends a read-until-close body with C{responseEnd(None)}; reports
        C{protocolError} if a response was expected, or in progress with a Content-Length or chunked
        body; does nothing on an idle connection.  The parser accepts no more input.
        """
        state = self._state
        if state > _CHUNK:
            return
        self._state = _DEAD
        if state == _BODY and self._eofBody:
            self._onEnd(None)
        elif state != _IDLE:
            self._onError("upstream closed mid-response")
        elif self._expected is not None:
            self._onError("upstream closed before response")

    # -- llhttp callbacks ------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._expected is None:
            raise _Reject(0, "unsolicited data from upstream")
        self._state = _HEAD
        self._messages += 1
        self._reason = b""
        self._eofBody = False
        self._headers = []
        self._headerBytes = 0
        self._trailers = None
        self._contentLength = None
        self._transferEncoding = None
        self._connection = False
        self._close = False
        self._keepAlive = False

    def on_status(self, piece: bytes) -> None:
        self._headerBytes += len(piece)
        if self._headerBytes > self._maxHeaderBytes:
            raise _Reject(0, "response head too large")
        self._reason += piece

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        value = value.rstrip(b" \t")
        if self._state != _HEAD:
            self._trailer(name, value)
            return
        headers = self._headers
        size = self._headerBytes + len(name) + len(value)
        self._headerBytes = size
        if size > self._maxHeaderBytes or len(headers) >= self._maxHeaders:
            if size > self._maxHeaderBytes:
                raise _Reject(0, "response head too large")
            raise _Reject(0, "too many response header fields")
        if name in _SPECIAL:
            if name == b"content-length":
                self._contentLength = int(value)  # llhttp validated it (digits, no duplicate)
            elif name == b"transfer-encoding":
                if self._transferEncoding is not None:
                    raise _Reject(0, "repeated Transfer-Encoding")
                self._transferEncoding = value
            elif name == b"connection":
                self._connection = True
                close, keepAlive = _connectionTokens(value)
                self._close = self._close or close
                self._keepAlive = self._keepAlive or keepAlive
        headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if not 100 <= status <= 599:
            raise _Reject(0, "invalid status code")
        if 100 <= status < 200 and status != 101:
            # llhttp ends a 1xx at its head and goes on with the next response.
            self._interim = True
            self._state = _BODY
            self._onInformational(status, self._headers)
            return
        version = _version(parser, self._connection)
        if version is None:
            raise _Reject(0, "unsupported HTTP version")
        self._scan = False
        method = self._expected
        if version == b"1.1":
            keepAlive = not self._close
        else:
            keepAlive = self._keepAlive and not self._close
        chunked = False
        if status == 101:
            # llhttp raises HttpParserUpgrade right after this (or an error without an Upgrade field).
            hasBody = keepAlive = False
        elif method == b"CONNECT" and 200 <= status < 300:
            # A tunnel from the end of this head, whatever framing fields it has (RFC 9110 §9.3.6).
            self._state = _UPGRADED
            self._headDone = True
            self._onHead(status, self._reason, version, self._headers, False, False, False)
            raise _HeadDone()
        elif method == b"HEAD":
            self._state = _BODY
            self._headDone = True
            self._onHead(status, self._reason, version, self._headers, keepAlive, False, False)
            raise _HeadDone()
        elif status == 204 or status == 304:
            hasBody = False
        else:
            te = self._transferEncoding
            if te is not None:
                if te.lower() != b"chunked" or version != b"1.1":
                    raise _Reject(0, "unsupported Transfer-Encoding from upstream")
                hasBody = chunked = True
            elif self._contentLength is not None:
                hasBody = self._contentLength > 0
            else:
                hasBody = True
                keepAlive = False
                self._eofBody = True
        self._state = _BODY
        self._onHead(status, self._reason, version, self._headers, keepAlive, hasBody, chunked)

    def on_body(self, data: bytes) -> None:
        self._state = _BODY
        self._onData(data)

    def on_chunk_header(self) -> None:
        self._state = _CHUNK
        self._chunks += 1

    def on_message_complete(self) -> None:
        self._state = _IDLE
        if self._interim:
            self._interim = False
            return
        self._expected = None
        self._onEnd(self._trailers)

    # -- internals -------------------------------------------------------------------------------------

    def _trailer(self, name: bytes, value: bytes) -> None:
        _addTrailer(self, name, value, 0, "response")

    def _feed(self, data: bytes) -> None:
        state = self._state
        messages = self._messages
        chunks = self._chunks
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as e:
            # A 101 with Upgrade: llhttp has already ended the message.
            self.upgradeData = data[e.args[0]:]
            self._state = _UPGRADED
            return
        except HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, _HeadDone):
                return
            self._state = _DEAD
            if isinstance(cause, _Reject):
                self._onError(cause.reason)
                return
            if cause is not None:
                raise cause from None
            raise
        except HttpParserError as e:
            self._state = _DEAD
            self._onError(str(e))
            return
        if (
            state == self._state
            and (state == _HEAD or state == _CHUNK)
            and messages == self._messages
            and chunks == self._chunks
        ):
            # See RequestParser.__init__: bound what httptools accumulates for one field.
            self._stall += len(data)
            if self._stall > self._maxHeaderBytes:
                self._state = _DEAD
                self._onError("response head or trailers too large")
        else:
            self._stall = 0

    def _feedScanning(self, data: bytes) -> None:
        """
        Feed llhttp one response head at a time, for a response to HEAD or CONNECT (see the module
        docstring).  Interim 1xx heads go by (llhttp ends them itself); the final head ends the scan.
        """
        while data and self._scan:
            tail = self._tail
            end = (tail + data).find(b"\r\n\r\n") if tail else data.find(b"\r\n\r\n")
            if end < 0:
                self._tail = (tail + data)[-3:]
                self._feed(data)
                return
            end += 4 - len(tail)
            self._tail = b""
            head = data[:end]
            data = data[end:]
            messages = self._messages
            self._feed(head)
            if self._headDone:
                # on_headers_complete stopped llhttp after a final head with no body: this llhttp parser
                # is spent; the next response gets a fresh one.
                self._headDone = False
                self._expected = None
                self._parser = HttpResponseParser(self)
                if self._state == _UPGRADED:  # a 2xx to CONNECT
                    self.upgradeData = data
                    self._onEnd(None)
                    return
                self._state = _IDLE
                self._onEnd(None)
                break
            state = self._state
            if state > _CHUNK:
                if state == _UPGRADED:  # a 101
                    self.upgradeData += data
                return
            if self._messages == messages or state == _HEAD:
                self._state = _DEAD
                self._onError("malformed response head")
                return
        if data and self._state <= _CHUNK:
            self._feed(data)


# -- encoders ------------------------------------------------------------------------------------------
#
# Encoders trust their input: header names and values were validated when they were parsed (or come
# from configuration, validated at load).  Checking again here would cost on every response.

#: Standard reason phrases, as bytes, by status code.
REASON_PHRASES = MappingProxyType(
    {int(s): s.phrase.encode("latin-1") for s in HTTPStatus}
)
# Private constants below are plain dicts (never mutated): a mappingproxy lookup costs more.
_STATUS_LINES = {
    code: b"HTTP/1.1 %d %s\r\n" % (code, phrase) for code, phrase in REASON_PHRASES.items()
}
_CRLF = b"\r\n"
_joinField = b": ".join
_TE_CHUNKED = b"transfer-encoding: chunked\r\n"
# The end of a response head by (chunked, keepAlive, peer is HTTP/1.0): framing and connection fields,
# then the empty line.
_RESPONSE_TAILS = {
        (chunked, keepAlive, http10): (
            (_TE_CHUNKED if chunked else b"")
            + (
                b"connection: keep-alive\r\n"
                if keepAlive and http10
                else b"" if keepAlive else b"connection: close\r\n"
            )
            + _CRLF
        )
        for chunked in (False, True)
        for keepAlive in (False, True)
    for http10 in (False, True)
}


def encodeResponseHead(
    status: int,
    reason: Optional[bytes],
    headers: Sequence[Tuple[bytes, bytes]],
    chunked: bool = False,
    keepAlive: bool = True,
    peerVersion: bytes = b"1.1",
) -> bytes:
    """
    Serialize a response head (an C{HTTP/1.1} status line, the fields, the framing and connection
    fields, and the empty line).

    @param reason: the reason phrase, or C{None} for the standard one (or an empty one if C{status} has
        none).
    @param headers: end-to-end fields, written as given: they must already be stripped of hop-by-hop
        fields (L{stripHopByHop}) and carry C{content-length} when the body has a known length.
    @param chunked: add C{transfer-encoding: chunked} (then C{headers} must not have content-length, and
        the peer must be HTTP/1.1).
    @param keepAlive: false adds C{connection: close}.
    @param peerVersion: the client's version; for C{b"1.0"}, C{keepAlive} adds C{connection: keep-alive}.
    """
    if reason is None:
        line = _STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % (status,)
    else:
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason)
    if keepAlive and not chunked and peerVersion != b"1.0":
        tail = _CRLF  # the common case, without building a key
    else:
        tail = _RESPONSE_TAILS[chunked, keepAlive, peerVersion == b"1.0"]
    if headers:
        # Two C-level joins beat a Python loop building one flat list (see benchmarks/h1_parse.py).
        return b"".join((line, _CRLF.join(map(_joinField, headers)), _CRLF, tail))
    return line + tail


def encodeRequestHead(
    method: bytes,
    target: bytes,
    headers: Sequence[Tuple[bytes, bytes]],
    chunked: bool = False,
    host: Optional[bytes] = None,
) -> bytes:
    """
    Serialize an C{HTTP/1.1} request head.

    @param headers: end-to-end fields (including C{host}, unless given as C{host}), written as given;
        they carry C{content-length} when the body has a known length.
    @param chunked: add C{transfer-encoding: chunked} (then C{headers} must not have content-length).
    @param host: if given, a C{host} field written first (as clients send it), so that a caller
        holding it apart from the other fields need not build a new list.
    """
    tail = _TE_CHUNKED + _CRLF if chunked else _CRLF
    line = b" HTTP/1.1\r\n" if host is None else b" HTTP/1.1\r\nhost: " + host + _CRLF
    if headers:
        return b"".join((method, b" ", target, line, _CRLF.join(map(_joinField, headers)), _CRLF, tail))
    return b"".join((method, b" ", target, line, tail))


def encodeChunk(data: bytes) -> Tuple[bytes, ...]:
    """
    Frame C{data} as one chunk, for C{transport.writeSequence}: the body itself is not copied.  Empty
    data gives an empty tuple (an empty chunk would end the body).
    """
    if not data:
        return ()
    return (b"%x\r\n" % len(data), data, _CRLF)


def encodeLastChunk(trailers: Optional[Iterable[Tuple[bytes, bytes]]] = None) -> bytes:
    """
    The end of a chunked body: the zero-size chunk, the trailer fields if any, the empty line.
    """
    if trailers:
        return b"".join((b"0\r\n", _CRLF.join(map(_joinField, trailers)), _CRLF, _CRLF))
    return b"0\r\n\r\n"


# -- hop-by-hop fields ---------------------------------------------------------------------------------

#: Fields that describe one connection and are never forwarded (RFC 9110 §7.6.1), as Envoy strips them.
#: Proxy-Authenticate and Proxy-Authorization are end-to-end for Envoy, and for us.
HOP_BY_HOP = frozenset(
    [b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding", b"upgrade"]
)
# The Connection values almost every peer sends, and the one token each is.
_PLAIN_CONNECTION = {b"keep-alive": b"keep-alive", b"close": b"close", b"Keep-Alive": b"keep-alive",
                     b"Close": b"close"}
_KEEP_ALIVE = frozenset([b"keep-alive"])
_CLOSE = frozenset([b"keep-alive", b"close"])
_HOP_BY_HOP_CLOSE = HOP_BY_HOP | {b"close"}  # with the fields a Connection: close nominates


def stripHopByHop(headers: Headers) -> Headers:
    """
    Remove the hop-by-hop fields: those in L{HOP_BY_HOP} and those named by any C{Connection} field,
    except that a C{te} field listing C{trailers} is kept as C{te: trailers} (gRPC needs it end to end;
    this holds even when Connection names te, as an HTTP/1.1 client sending TE must).

    @return: C{headers} itself when there is nothing to remove (the common case costs no copy), else a
        new list in the same order.
    """
    for name, _ in headers:
        if name in HOP_BY_HOP:
            break
    else:
        return headers
    nominated = set()
    for name, value in headers:
        if name == b"connection":
            plain = _PLAIN_CONNECTION.get(value)
            if plain is not None:
                nominated.add(plain)  # what almost every peer sends, without splitting it
                continue
            for token in value.split(b","):
                token = token.strip(b" \t").lower()
                if token:
                    nominated.add(token)
        elif name == b"te":
            nominated.add(b"te")  # never a plain filter: te may be kept
    if nominated <= _KEEP_ALIVE:
        return [field for field in headers if field[0] not in HOP_BY_HOP]
    if nominated <= _CLOSE:
        return [field for field in headers if field[0] not in _HOP_BY_HOP_CLOSE]
    nominated.discard(b"te")
    result = []
    keptTE = False
    for name, value in headers:
        if name == b"te":
            tokens = [t.split(b";", 1)[0].strip(b" \t").lower() for t in value.split(b",")]
            if b"trailers" in tokens and not keptTE:
                result.append((b"te", b"trailers"))
                keptTE = True
        elif name not in HOP_BY_HOP and name not in nominated:
            result.append((name, value))
    return result
