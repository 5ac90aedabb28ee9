"""
A test harness for HTTP filters: drive a filter (or a chain) through request and response events in
trial, without sockets. twistedmesh's own filter tests use it; so can a plugin author's.

    from twistedmesh.testing import FilterHarness

    def test_addsHeader(self):
        h = FilterHarness(MyFilter())
        h.request(b"GET", b"/", [(b"x-user", b"ann")])
        self.assertIn((b"x-checked", b"yes"), h.upstream.headers)
        h.respond(200, [(b"content-length", b"2")], b"ok")
        self.assertEqual(h.downstream.status, 200)
        self.assertEqual(h.downstream.body, b"ok")
        self.assertTrue(h.completed)

The chain is the given filters followed by a recording terminal filter that plays the upstream: it records
what reached it (C{h.upstream}) and sends the response that L{FilterHarness.respond} describes back
through the response hooks. What the downstream would receive is recorded in C{h.downstream}.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock

from .http.stream import Headers, HTTPFilter, Stream


class Recorded:
    """
    What one side saw: C{headers} (and C{status} for responses), body C{chunks}, C{trailers}, whether it
    C{ended}.
    """

    def __init__(self) -> None:
        self.status: Optional[int] = None
        self.headers: Headers = []
        self.chunks: List[bytes] = []
        self.trailers: Optional[Headers] = None
        self.ended = False
        self.method: Optional[bytes] = None
        self.path: Optional[bytes] = None
        self.authority: Optional[bytes] = None

    @property
    def body(self) -> bytes:
        """
        The body chunks joined.
        """
        return b"".join(self.chunks)


class _Terminal(HTTPFilter):
    """
    The harness's last filter: records the request as the upstream would receive it.
    """

    def __init__(self, harness: "FilterHarness") -> None:
        self.harness = harness

    def requestHeaders(self, stream: Stream) -> None:
        up = self.harness.upstream
        up.method, up.path, up.authority = stream.method, stream.path, stream.authority
        up.headers = list(stream.requestHeaders)
        if stream.requestEnded:
            up.ended = True

    def requestData(self, stream: Stream, data: bytes, end: bool) -> None:
        up = self.harness.upstream
        if data:
            up.chunks.append(data)
        if end:
            up.ended = True

    def requestTrailers(self, stream: Stream, trailers: Headers) -> None:
        up = self.harness.upstream
        up.trailers = list(trailers)
        up.ended = True


class _Codec:
    """
    Stands in for the downstream connection: records what the stream writes and how it pauses.
    """

    def __init__(self, harness: "FilterHarness") -> None:
        self.harness = harness
        self.paused = 0
        self.responsePaused = 0
        self.resets: List[str] = []

    def pauseRequest(self, stream: Stream) -> None:
        self.paused += 1

    def resumeRequest(self, stream: Stream) -> None:
        self.paused -= 1

    def pauseResponse(self, stream: Stream) -> None:
        self.responsePaused += 1

    def resumeResponse(self, stream: Stream) -> None:
        self.responsePaused -= 1

    def localReplyStarted(self, stream: Stream, body: bytes) -> None:
        pass

    def writeHeaders(self, stream: Stream, end: bool) -> None:
        down = self.harness.downstream
        down.status = stream.status
        down.headers = list(stream.responseHeaders)
        if end:
            self._end(stream)

    def writeData(self, stream: Stream, data: bytes, end: bool) -> None:
        if data:
            self.harness.downstream.chunks.append(data)
        if end:
            self._end(stream)

    def writeTrailers(self, stream: Stream, trailers: Headers) -> None:
        self.harness.downstream.trailers = list(trailers)
        self._end(stream)

    def resetStream(self, stream: Stream, reason: str) -> None:
        self.resets.append(reason)

    def _end(self, stream: Stream) -> None:
        self.harness.downstream.ended = True
        stream.complete()


class FilterHarness:
    """
    Runs C{filters} (in chain order) over one stream; see the module docstring.

    @ivar stream: the L{Stream}.
    @ivar upstream: what reached the end of the request chain (a L{Recorded}).
    @ivar downstream: what the client would receive (a L{Recorded}).
    @ivar clock: a L{Clock} for filters that use timers (pass it to your filter factory's context).
    """

    def __init__(self, *filters: HTTPFilter, clock: Optional[Clock] = None,
                 peer: Tuple[str, int] = ("127.0.0.1", 40000)) -> None:
        self.clock = clock if clock is not None else Clock()
        self.upstream = Recorded()
        self.downstream = Recorded()
        self.terminal = _Terminal(self)
        self.codec = _Codec(self)
        makers = [lambda stream, f=f: f for f in filters] + [lambda stream: self.terminal]
        self.stream = Stream(self.codec, makers, "test",
                             IPv4Address("TCP", *peer), self.clock.seconds())

    @property
    def completed(self) -> bool:
        """
        Whether every filter's C{streamComplete} has run.
        """
        return self.stream.completed

    @property
    def paused(self) -> bool:
        """
        Whether some filter is holding the request (reading from the client is paused).
        """
        return self.codec.paused > 0

    def request(self, method: bytes = b"GET", path: bytes = b"/", headers: Sequence[Tuple[bytes, bytes]] = (),
                body: Optional[Sequence[bytes]] = None, trailers: Optional[Headers] = None,
                authority: bytes = b"example.com", end: bool = True) -> Stream:
        """
        Send a request through the chain: headers, then each chunk of C{body} (a list of chunks; a single
        C{bytes} is one chunk), then C{trailers}. With C{end=False} the request stays open: continue it
        with L{sendData}.
        """
        s = self.stream
        s.method, s.path, s.authority = method, path, authority
        s.requestHeaders = list(headers)
        if isinstance(body, bytes):
            body = [body]
        if not body and not trailers and end:
            s.requestEnded = True
        s.receiveRequestHeaders()
        for i, chunk in enumerate(body or ()):
            s.receiveRequestData(chunk, end and not trailers and i == len(body) - 1)
        if trailers:
            s.receiveRequestTrailers(list(trailers))
        return s

    def sendData(self, data: bytes, end: bool = False) -> None:
        """
        Send more request body.
        """
        self.stream.receiveRequestData(data, end)

    def respond(self, status: int, headers: Sequence[Tuple[bytes, bytes]] = (), body: Optional[Sequence[bytes]] = None,
                trailers: Optional[Headers] = None) -> None:
        """
        Play the upstream: send a response back through the chain's response hooks (last to first).
        """
        s = self.stream
        s.status = status
        s.responseHeaders = list(headers)
        if isinstance(body, bytes):
            body = [body]
        s.sendResponseHeaders(not body and not trailers)
        for i, chunk in enumerate(body or ()):
            s.sendResponseData(chunk, not trailers and i == len(body) - 1)
        if trailers:
            s.sendResponseTrailers(list(trailers))
