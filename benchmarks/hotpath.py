"""
The proxy's own cost per HTTP/1.1 request, without sockets or the reactor: a request is fed to a
downstream connection on a memory transport, the router hands it to a pooled upstream connection on a
memory transport, and a canned response is fed back. What is left is exactly the Python work of the hot
path (parse, stream, filters, route, encode, pool), so changes to it show up here without the noise of a
load test.

    python3 benchmarks/hotpath.py [--requests 50000] [--profile]
"""

import argparse
import cProfile
import pstats
import time

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from twistedmesh.config import loadString
from twistedmesh.service import MeshService
from twistedmesh.upstream.http1 import UpstreamConnection

CONFIG = """
[mesh]
admin = off
[listener:web]
endpoint = tcp:0
protocol = http
routes = main
[route:main/all]
prefix = /
cluster = origin
[cluster:origin]
endpoints = tcp:127.0.0.1:1
"""

REQUEST = (b"GET /index.html HTTP/1.1\r\nHost: bench.local\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n")
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 26 Nov 2026 10:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 100\r\nConnection: keep-alive\r\n\r\n" + b"x" * 100)


def setup():
    service = MeshService(loadString(CONFIG), MemoryReactorClock())
    factory = service.listeners["web"].factory
    down = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
    downT = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
    down.makeConnection(downT)
    cluster = service.clusters["origin"]
    pool = cluster.pools.forHost(cluster.hosts[0])
    up = UpstreamConnection(pool)
    upT = StringTransport()
    up.makeConnection(upT)
    pool.connections.add(up)
    pool.release(up)
    return down, downT, up, upT


def run(n: int, down, downT, up, upT) -> None:
    for _ in range(n):
        down.dataReceived(REQUEST)
        up.dataReceived(RESPONSE)
        downT.clear()
        upT.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=50000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    down, downT, up, upT = setup()
    run(1000, down, downT, up, upT)  # warm up, and check it works
    down.dataReceived(REQUEST)
    assert b"GET /index.html HTTP/1.1\r\n" in upT.value(), upT.value()
    up.dataReceived(RESPONSE)
    assert downT.value().startswith(b"HTTP/1.1 200 OK\r\n") and downT.value().endswith(b"x" * 100), downT.value()
    downT.clear()
    upT.clear()
    start = time.perf_counter()
    run(args.requests, down, downT, up, upT)
    elapsed = time.perf_counter() - start
    print(f"{elapsed / args.requests * 1e6:.2f} us per proxied request ({args.requests / elapsed:,.0f}/s, one core, no I/O)")
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        run(args.requests, down, downT, up, upT)
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
