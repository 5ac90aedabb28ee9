"""
Deterministic per-request cost of the HTTP/1.1 proxy path: instructions counted by valgrind's callgrind and
system calls counted by strace, instead of wall-clock rates that a shared machine makes noisy.

Two measurements:

- ``hotpath``: the in-memory path of ``benchmarks/hotpath.py`` (parse, stream, filters, route, encode,
  pool; memory transports, no reactor). The script runs itself under callgrind twice, with ``--warm``
  requests and with ``--warm`` + ``--requests``, and divides the difference by ``--requests``: start-up
  and imports cancel out.
- ``reactor``: the real thing on loopback. A tiny blocking origin (threads, in this process) answers the
  same 100-byte response as ``http1.py``'s nginx; ``twistd twistedmesh`` runs under callgrind (or
  strace); this process sends sequential keep-alive ``GET``s on ``--connections`` connections in
  lock-step (one request on each, then every answer). Counters are zeroed after the warm-up and dumped
  after the measured requests (``callgrind_control``), so they cover exactly those requests: reactor,
  Twisted and our code, user space only. With ``--strace`` the proxy runs under ``strace -c -f`` instead
  and the system calls per request are listed (a run with the warm-up alone is subtracted).

    python3 benchmarks/callgrind.py hotpath [--requests 2000]
    python3 benchmarks/callgrind.py hotpath --observability log,trace,on   # what each adds (deterministic)
    python3 benchmarks/callgrind.py reactor [--requests 2000] [--connections 1]
    python3 benchmarks/callgrind.py reactor --strace
    python3 benchmarks/callgrind.py reactor --cprofile FILE   # where the time goes, with the same load

Needs valgrind (``callgrind_control``) and, for ``--strace``, strace. Python's hash seed is fixed so that
runs compare. Figures are per proxied request; lower is better.
"""

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BODY = b"x" * 100
ORIGIN_RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 26 Nov 2026 10:00:00 GMT\r\n"
                   b"Content-Type: text/plain\r\nContent-Length: 100\r\nConnection: keep-alive\r\n\r\n" + BODY)
REQUEST = b"GET /index.html HTTP/1.1\r\nHost: bench.local\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"

MESH_CONF = """\
[mesh]
admin = off
drain_timeout = 1s

[listener:web]
endpoint = tcp:{port}:interface=127.0.0.1
protocol = http
routes = main

[route:main/all]
prefix = /
cluster = origin

[cluster:origin]
endpoints = tcp:127.0.0.1:{origin}
"""


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONHASHSEED"] = "0"
    return e


def totalInstructions(outfile: str) -> int:
    """
    The instruction total of a callgrind output file (its C{totals:} or C{summary:} line).
    """
    total = None
    with open(outfile) as f:
        for line in f:
            if line.startswith("totals:") or line.startswith("summary:"):
                total = int(line.split()[1])
    if total is None:
        raise SystemExit(f"no totals in {outfile}")
    return total


# -- hotpath ------------------------------------------------------------------------------------------------


def hotpathChild(n: int, variant: str = "") -> None:
    sys.path.insert(0, HERE)
    import hotpath
    from twistedmesh.tap import freezeStartupObjects

    if not variant:
        down, downT, up, upT = hotpath.setup()
        freezeStartupObjects()  # as the proxy does once it runs (a full collection skips the start-up heap)
        hotpath.run(n, down, downT, up, upT)
        return
    # With the access log and/or tracing of benchmarks/observability.py's VARIANTS: its writer thread
    # reports through the reactor, so the requests run in chunks with those reports run in between.
    import observability
    reactorClass, drain = observability.threadReportingReactor()
    with tempfile.TemporaryDirectory() as tmp:
        hotpath.CONFIG = observability.hotpathConfig(hotpath, tmp, variant)
        hotpath.MemoryReactorClock = reactorClass
        setup = hotpath.setup()
        freezeStartupObjects()
        while n > 0:
            chunk = min(n, 1024)
            hotpath.run(chunk, *setup)
            drain()
            n -= chunk


def hotpathCount(opts, variant: str) -> float:
    """
    Instructions per request of hotpath.py's request with C{variant} (C{""}: as hotpath.py configures it).
    """
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (opts.warm, opts.warm + opts.requests):
            out = os.path.join(tmp, f"cg.{n}")
            argv = [sys.executable, os.path.abspath(__file__), "hotpath-child", "--requests", str(n)]
            if variant:
                argv += ["--observability", variant]
            subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"] + argv,
                           check=True, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            results.append(totalInstructions(out))
    return (results[1] - results[0]) / opts.requests


def hotpath(opts) -> None:
    if not opts.observability:
        per = hotpathCount(opts, "")
        print(f"hotpath: {per:,.0f} instructions per proxied request (in memory, {opts.requests} requests)")
        return
    counts = {}
    for variant in ["off"] + [v for v in opts.observability.split(",") if v != "off"]:
        counts[variant] = hotpathCount(opts, variant)
        extra = counts[variant] - counts["off"]
        print(f"hotpath, {variant:>5}: {counts[variant]:,.0f} instructions per proxied request"
              + (f" ({extra:+,.0f}, {100.0 * extra / counts['off']:+.1f}%)" if variant != "off" else ""),
              flush=True)


# -- reactor ------------------------------------------------------------------------------------------------


class Origin:
    """
    A blocking keep-alive origin: one thread per connection, one canned response per request head.
    """

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                n = buf.count(b"\r\n\r\n")
                if n:
                    buf = buf[buf.rindex(b"\r\n\r\n") + 4:]
                    conn.sendall(ORIGIN_RESPONSE * n)


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def waitListening(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the proxy exited ({proc.returncode}) before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("the proxy did not listen in time")


def readResponse(sock: socket.socket, expected: int, buf: bytearray) -> None:
    while len(buf) < expected:
        data = sock.recv(65536)
        if not data:
            raise SystemExit("the proxy closed a connection")
        buf += data


def load(port: int, connections: int, requests: int, socks) -> None:
    """
    C{requests} requests in lock-step rounds over C{socks}; every answer is checked.
    """
    rounds = requests // connections
    expectedLen = None
    for _ in range(rounds):
        for s in socks:
            s.sendall(REQUEST)
        for s in socks:
            buf = bytearray()
            if expectedLen is None:
                while b"\r\n\r\n" not in buf:
                    buf += s.recv(65536)
                head, _, rest = bytes(buf).partition(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200 "):
                    raise SystemExit(f"unexpected answer: {head!r}")
                expectedLen = len(head) + 4 + len(BODY)
            readResponse(s, expectedLen, buf)
            if not buf.endswith(BODY) or len(buf) != expectedLen:
                raise SystemExit(f"unexpected answer: {bytes(buf)!r}")


def twistdArgv(conf: str) -> list:
    """
    The command running twistd's console script with this Python (C{which twistd} may be a shell shim).
    """
    for path in (os.path.join(os.path.dirname(sys.executable), "twistd"), shutil.which("twistd")):
        if not path or not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            first = f.readline()
        if first.startswith(b"#!") and b"python" in first:
            return [sys.executable, path, "-n", "--pidfile=", "twistedmesh", "--config", conf]
    raise SystemExit("cannot find the twistd script")


def parseStrace(path: str) -> dict:
    """
    System call counts by name from C{strace -c} output.
    """
    counts = {}
    with open(path) as f:
        for line in f:
            m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", line)
            if m and m.group(2) != "total":
                counts[m.group(2)] = int(m.group(1))
    return counts


def straceDiff(opts) -> None:
    """
    System calls per request: a run with only the warm-up, one with the measured requests as well, the
    difference divided by their number (start-up, imports and shutdown cancel out).
    """
    requests = opts.requests
    opts.requests = 0
    base = reactor(opts)
    opts.requests = requests
    full = reactor(opts)
    measured = requests // opts.connections * opts.connections
    print(f"system calls per proxied request ({measured} requests, {opts.connections} connection(s) in lock-step):")
    total = 0.0
    for name in sorted(full, key=lambda n: -(full[n] - base.get(n, 0))):
        per = (full[name] - base.get(name, 0)) / measured
        if per >= 0.01:
            total += per
            print(f"  {name:16} {per:6.2f}")
    print(f"  {'total':16} {total:6.2f}")


def reactor(opts):
    origin = Origin()
    with tempfile.TemporaryDirectory() as tmp:
        port = freePort()
        conf = os.path.join(tmp, "mesh.ini")
        with open(conf, "w") as f:
            f.write(MESH_CONF.format(port=port, origin=origin.port))
        out = os.path.join(tmp, "callgrind.out")
        trace = os.path.join(tmp, "strace.out")
        if opts.strace:
            wrapper = ["strace", "-c", "-f", "-o", trace]
        elif opts.cprofile:
            wrapper = []
        else:
            wrapper = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        log = open(os.path.join(tmp, "proxy.log"), "w") if not opts.log else open(opts.log, "w")
        argv = twistdArgv(conf)
        if opts.cprofile:
            argv[1:1] = ["-m", "cProfile", "-o", opts.cprofile]
        proc = subprocess.Popen(wrapper + argv, env=env(), stdout=log, stderr=subprocess.STDOUT,
                                cwd=tmp)
        try:
            waitListening(port, proc)
            socks = []
            for _ in range(opts.connections):
                s = socket.create_connection(("127.0.0.1", port))
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                socks.append(s)
            load(port, opts.connections, opts.warm, socks)
            if wrapper and not opts.strace:
                subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
            load(port, opts.connections, opts.requests, socks)
            if wrapper and not opts.strace:
                subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
            for s in socks:
                s.close()
        finally:
            if opts.strace:
                # Stop the proxy itself: strace writes its summary when its child exits.
                with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                    for child in f.read().split():
                        os.kill(int(child), signal.SIGTERM)
            else:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
            origin.sock.close()
        measured = opts.requests // opts.connections * opts.connections
        if opts.cprofile:
            import pstats
            print(f"cProfile of the proxy ({opts.warm + measured} requests, start-up included) in {opts.cprofile}")
            pstats.Stats(opts.cprofile).sort_stats("tottime").print_stats(40)
            return
        if opts.strace:
            return parseStrace(trace)
        dumps = sorted(p for p in os.listdir(tmp) if p.startswith("callgrind.out.") or p == "callgrind.out")
        # The dump after the measured requests is the first numbered one (callgrind.out.1).
        numbered = [p for p in dumps if re.match(r"callgrind\.out\.\d+$", p)]
        if not numbered:
            raise SystemExit(f"no callgrind dump in {dumps}")
        first = sorted(numbered, key=lambda p: int(p.rsplit(".", 1)[1]))[0]
        per = totalInstructions(os.path.join(tmp, first)) / measured
        print(f"reactor: {per:,.0f} instructions per proxied request in the proxy process "
              f"({measured} requests, {opts.connections} connection(s) in lock-step, loopback)")
        if opts.keep:
            shutil.copy(os.path.join(tmp, first), opts.keep)
            print(f"callgrind output kept in {opts.keep} (callgrind_annotate {opts.keep})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["hotpath", "reactor", "hotpath-child"])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warm", type=int, default=200)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--strace", action="store_true", help="reactor: count system calls instead")
    parser.add_argument("--keep", metavar="FILE", help="reactor: keep the callgrind output here")
    parser.add_argument("--cprofile", metavar="FILE", help="reactor: run the proxy under cProfile instead")
    parser.add_argument("--log", metavar="FILE", help="reactor: write the proxy output here")
    parser.add_argument("--observability", metavar="VARIANTS", default="",
                        help="hotpath: with the access log and/or 1%% tracing of benchmarks/observability.py, "
                             "comma-separated among log, trace, on (each compared with off)")
    opts = parser.parse_args()
    if opts.mode == "hotpath-child":
        hotpathChild(opts.requests, opts.observability)
    elif opts.mode == "hotpath":
        hotpath(opts)
    elif opts.strace:
        straceDiff(opts)
    else:
        reactor(opts)


if __name__ == "__main__":
    main()
