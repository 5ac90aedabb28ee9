"""
Micro-benchmark of the HTTP/1.1 codec alone (no sockets, no reactor): parse 100k pipelined small GET
requests fed in 64 KiB reads (as Twisted reads), and encode 100k typical response heads.

    python benchmarks/h1_parse.py [N]
"""

import sys
import time

from twistedmesh.http.h1 import RequestParser, encodeResponseHead, stripHopByHop

REQUEST = (
    b"GET /api/v1/items?id=42 HTTP/1.1\r\n"
    b"Host: api.example.com\r\n"
    b"User-Agent: bench/1.0\r\n"
    b"Accept: */*\r\n"
    b"X-Request-Id: 0123456789abcdef\r\n"
    b"\r\n"
)

RESPONSE_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", b"123"),
    (b"date", b"Mon, 01 Jan 2024 00:00:00 GMT"),
    (b"server", b"twistedmesh"),
    (b"x-request-id", b"0123456789abcdef"),
]


class CountingHandler:
    """
    The cheapest handler possible: counts requests.
    """

    def __init__(self) -> None:
        self.requests = 0

    def requestHead(self, method, target, version, headers, keepAlive, hasBody, chunked, upgrade,
                    expectContinue):
        pass

    def requestData(self, data):
        pass

    def requestEnd(self, trailers):
        self.requests += 1

    def protocolError(self, status, reason):
        raise AssertionError((status, reason))


def best(fn, repeat=5):
    return min(fn() for _ in range(repeat))


def parse(n: int) -> float:
    stream = REQUEST * n
    reads = [stream[i:i + 65536] for i in range(0, len(stream), 65536)]
    handler = CountingHandler()
    parser = RequestParser(handler)
    start = time.perf_counter()
    for data in reads:
        parser.feed(data)
    elapsed = time.perf_counter() - start
    assert handler.requests == n, handler.requests
    return elapsed


def encode(n: int) -> float:
    headers = RESPONSE_HEADERS
    start = time.perf_counter()
    for _ in range(n):
        encodeResponseHead(200, None, headers)
    return time.perf_counter() - start


def strip(n: int) -> float:
    headers = RESPONSE_HEADERS
    start = time.perf_counter()
    for _ in range(n):
        stripHopByHop(headers)
    return time.perf_counter() - start


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    t = best(lambda: parse(n))
    print("parse %d pipelined GETs (%d B each): %.0f req/s, %.2f us/req"
          % (n, len(REQUEST), n / t, t / n * 1e6))
    t = best(lambda: encode(n))
    print("encodeResponseHead (5 fields): %.0f heads/s, %.2f us/head" % (n / t, t / n * 1e6))
    t = best(lambda: strip(n))
    print("stripHopByHop (5 fields, nothing to strip): %.0f/s, %.2f us" % (n / t, t / n * 1e6))


if __name__ == "__main__":
    main()
