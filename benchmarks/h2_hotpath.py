"""
The proxy's own cost per HTTP/2 request, without sockets or the reactor: an h2c request is fed to a
downstream connection on a memory transport, the router hands it to a pooled upstream connection on a
memory transport (HTTP/1.1, or HTTP/2 multiplexed), and a canned response is fed back. The client's and
the origin's frames are made before the clock (the process's CPU time) starts, HPACK-encoded in order so
that the proxy's decoders stay in step: what is timed is exactly the proxy's Python work (h2 and HPACK both
ways, the stream, the filters, the route, the pool). The HTTP/1.1 twin of this is C{benchmarks/hotpath.py}.

    python3 benchmarks/h2_hotpath.py [--requests 20000] [--upstream http1|http2|both] [--profile]

On a shared machine even CPU time drifts by a third from run to run; instructions do not. Under callgrind,
two runs that make the same frames (C{--frames}) and proxy different numbers of requests differ by exactly
the proxied requests' instructions:

    valgrind --tool=callgrind --callgrind-out-file=/dev/null $(python3 -c "import sys; print(sys.executable)") \
        benchmarks/h2_hotpath.py \
        --upstream http2 --warm 200 --frames 1000 --requests 100     # then --requests 600: (Ir2 - Ir1) / 500
"""

import argparse
import cProfile
import pstats
import time

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.settings import SettingCodes
from hpack import Encoder
from hyperframe.frame import DataFrame, HeadersFrame, SettingsFrame, WindowUpdateFrame
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from twistedmesh.config import loadString
from twistedmesh.service import MeshService
from twistedmesh.upstream.http1 import UpstreamConnection
from twistedmesh.upstream.http2 import H2UpstreamConnection

import hotpath

# hotpath.py's configuration (this script's directory is on sys.path), its cluster speaking {protocol}.
CONFIG = hotpath.CONFIG + "protocol = {protocol}\n"

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"bench.local"), (b":path", b"/index.html"),
           (b"user-agent", b"h2load nghttp2/1.52.0"), (b"accept", b"*/*")]
RESPONSE_HEAD = [(b":status", b"200"), (b"server", b"nginx/1.22.1"), (b"date", b"Thu, 26 Nov 2026 10:00:00 GMT"),
                 (b"content-type", b"text/plain"), (b"content-length", b"100")]
BODY = b"x" * 100
H1_RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 26 Nov 2026 10:00:00 GMT\r\n"
               b"Content-Type: text/plain\r\nContent-Length: 100\r\nConnection: keep-alive\r\n\r\n" + BODY)
_MAX_WINDOW = 2 ** 31 - 1


def clientFrames(n: int) -> list:
    """
    The h2c client's bytes: its preface (a window large enough for every response, so the run never
    waits on flow control), then one HEADERS frame per request on streams 1, 3, 5...
    """
    encoder = Encoder()
    preface = (PREFACE + SettingsFrame(0, settings={SettingCodes.INITIAL_WINDOW_SIZE: _MAX_WINDOW}).serialize()
               + WindowUpdateFrame(0, window_increment=_MAX_WINDOW - 65535).serialize())
    requests = [HeadersFrame(2 * i + 1, data=encoder.encode(REQUEST), flags=["END_HEADERS", "END_STREAM"]).serialize()
                for i in range(n)]
    return [preface] + requests


def originFrames(n: int) -> list:
    """
    An HTTP/2 origin's answers on streams 1, 3, 5...: HEADERS, then 100 bytes of DATA ending the stream.
    """
    encoder = Encoder()
    return [HeadersFrame(2 * i + 1, data=encoder.encode(RESPONSE_HEAD), flags=["END_HEADERS"]).serialize()
            + DataFrame(2 * i + 1, data=BODY, flags=["END_STREAM"]).serialize() for i in range(n)]


def setup(protocol: str):
    """
    The proxy, a downstream connection that has had the client's preface, and one upstream connection
    in the pool (for HTTP/2, one that has had the origin's SETTINGS).
    """
    service = MeshService(loadString(CONFIG.format(protocol=protocol)), MemoryReactorClock())
    factory = service.listeners["web"].factory
    down = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
    downT = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
    down.makeConnection(downT)
    cluster = service.clusters["origin"]
    pool = cluster.pools.forHost(cluster.hosts[0])
    upT = StringTransport()
    if protocol == "http1":
        up = UpstreamConnection(pool)
        up.makeConnection(upT)
        pool.connections.add(up)
        pool.release(up)
    else:
        up = H2UpstreamConnection(pool)
        up.makeConnection(upT)
        origin = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        origin.initiate_connection()
        origin.receive_data(upT.value())
        up.dataReceived(origin.data_to_send())  # its SETTINGS and the acknowledgement of ours
        upT.clear()
    return service, down, downT, up, upT


def run(requests, responses, down, downT, up, upT) -> None:
    for request, response in zip(requests, responses):
        down.dataReceived(request)
        up.dataReceived(response)
        downT.clear()
        upT.clear()


def check(down, downT, up, upT, request: bytes, response: bytes, protocol: str) -> None:
    """
    One request through, and what came out both ways looks right (raises otherwise).
    """
    down.dataReceived(request)
    sent = upT.value()
    if protocol == "http1":
        assert sent.startswith(b"GET /index.html HTTP/1.1\r\n"), sent
    else:
        assert sent[3:4] == b"\x01", sent  # a HEADERS frame
    up.dataReceived(response)
    out = downT.value()
    assert out[3:4] == b"\x01" and BODY in out, out  # HEADERS, then the body in DATA
    downT.clear()
    upT.clear()


def measure(protocol: str, n: int, profile: bool, made: int = 0, warm: int = 1000) -> float:
    frames = clientFrames(max(made, warm + 1 + n + (n if profile else 0)))
    total = len(frames) - 1
    responses = [H1_RESPONSE] * total if protocol == "http1" else originFrames(total)
    service, down, downT, up, upT = setup(protocol)
    down.dataReceived(frames[0])
    downT.clear()
    requests = frames[1:]
    run(requests[:warm], responses[:warm], down, downT, up, upT)
    check(down, downT, up, upT, requests[warm], responses[warm], protocol)
    timed = slice(warm + 1, warm + 1 + n)
    # CPU time, not wall-clock: on a shared machine, time spent descheduled is not the proxy's cost.
    start = time.process_time()
    run(requests[timed], responses[timed], down, downT, up, upT)
    elapsed = time.process_time() - start
    if profile:
        rest = slice(warm + 1 + n, None)
        prof = cProfile.Profile()
        prof.enable()
        run(requests[rest], responses[rest], down, downT, up, upT)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return elapsed / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--upstream", choices=("http1", "http2", "both"), default="both")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--frames", type=int, default=0,
                        help="make at least this many requests' frames, whatever --requests (for callgrind)")
    parser.add_argument("--warm", type=int, default=1000, help="requests proxied before the measured ones")
    args = parser.parse_args()
    for protocol in ("http1", "http2") if args.upstream == "both" else (args.upstream,):
        us = measure(protocol, args.requests, args.profile, args.frames, args.warm)
        print(f"h2c -> proxy -> {protocol}: {us:.1f} us per proxied request ({1e6 / us:,.0f}/s, one core, no I/O)")


if __name__ == "__main__":
    main()
