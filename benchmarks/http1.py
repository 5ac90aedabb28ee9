#!/usr/bin/env python3
"""
HTTP/1.1 throughput and latency of twistedmesh, against the origin itself and against
C{twisted.web.proxy.ReverseProxyResource}, measured the way /work/shared/BENCHMARKS.md measured its peers.

    python3 benchmarks/http1.py [--duration 10] [--connections 50,1] [--repeat 1] [--quick] [--profile]

One run: an origin (nginx, 1 worker, C{GET /} -> 200 with a 100-byte body, keep-alive) and wrk share CPU 0;
each proxy under test runs alone on CPU 1, one process. For every connection count, wrk measures the origin
directly, twistedmesh and twisted.web.proxy, each after a 2 s warm-up; the median of C{--repeat} runs is
printed. C{--profile} adds a c=50 run of twistedmesh under cProfile and prints the top 25 functions by
tottime.

Standard library and Twisted only. Everything listens on 127.0.0.1 on ports picked by binding to port 0;
all files live in a temporary directory, removed at the end; every process started is stopped (SIGTERM,
then SIGKILL) on the way out, including on Ctrl-C and errors.
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import pstats
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # common.py, also when another script loads this one from its file
    sys.path.insert(0, HERE)

# observability.py loads this file and takes some of these from it (twistdScript, say).
from common import (  # noqa: E402,F401
    BODY, LOG_TAIL_LINES, ORIGIN_CPU, PROXY_CPU, WARMUP_SECONDS, BenchError, Proc, Procs, commandVersion,
    cpuModel, findNginx, freePort, getOnce, medianRun, meshConfig, nginxConfig, parseWrk, pinned, procRssMiB,
    procTimes, reportFailures, runScript, startMesh, startNginx, tail, twistdScript, waitReady,
)

PROFILE_TOP = 25


# -- the parties ------------------------------------------------------------------------------------------


NGINX_SERVER = """\
        listen 127.0.0.1:{port};
        location / {{
            return 200 "{body}";
        }}"""

# The fallback origin when nginx is missing: keep-alive HTTP/1.1 on a bare Protocol (GET without bodies).
TWISTED_ORIGIN = """\
import sys
from twisted.internet import protocol, reactor

BODY = bytes.fromhex(sys.argv[2])
RESPONSE = (b"HTTP/1.1 200 OK\\r\\nContent-Type: text/plain\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(BODY)) + BODY

class Origin(protocol.Protocol):
    def connectionMade(self):
        self.buf = b""
    def dataReceived(self, data):
        self.buf += data
        n = self.buf.count(b"\\r\\n\\r\\n")
        if n:
            self.buf = self.buf[self.buf.rindex(b"\\r\\n\\r\\n") + 4:]
            self.transport.write(RESPONSE * n)

f = protocol.Factory()
f.protocol = Origin
reactor.listenTCP(int(sys.argv[1]), f, backlog=1024, interface="127.0.0.1")
reactor.run()
"""

REVERSE_PROXY = """\
import sys
from twisted.internet import reactor
from twisted.web.proxy import ReverseProxyResource
from twisted.web.server import Site

port, originPort = int(sys.argv[1]), int(sys.argv[2])
reactor.listenTCP(port, Site(ReverseProxyResource("127.0.0.1", originPort, b"")), backlog=1024,
                  interface="127.0.0.1")
reactor.run()
"""

class Target:
    def __init__(self, key: str, label: str) -> None:
        self.key = key
        self.label = label


DIRECT = Target("direct", "direct to origin")
MESH = Target("mesh", "twistedmesh")
WEBPROXY = Target("webproxy", "twisted.web.proxy")
MESH_PROFILED = Target("mesh-prof", "twistedmesh under cProfile")


class Bench:
    def __init__(self, opts: argparse.Namespace, tmp: str, procs: Procs) -> None:
        self.opts = opts
        self.tmp = tmp
        self.procs = procs
        self.pin = shutil.which("taskset") is not None
        self.originName = ""
        self.originPort = 0
        self.failures: List[str] = []

    def cpu(self, which: str) -> Optional[str]:
        return which if self.pin else None

    # the origin

    def startOrigin(self) -> Proc:
        port = freePort()
        nginx = findNginx(self.opts.nginx)
        if nginx:
            self.originName = "nginx"
            server = NGINX_SERVER.format(port=port, body=BODY.decode("ascii"))
            p = startNginx(self.procs, nginx, self.tmp, nginxConfig(self.tmp, server), self.cpu(ORIGIN_CPU), port,
                           "origin.log")
        else:
            print("NOTE: nginx not found: falling back to a tiny Twisted origin (a much lower ceiling than "
                  "nginx; figures are not comparable with BENCHMARKS.md).")
            script = os.path.join(self.tmp, "origin.py")
            with open(script, "w") as f:
                f.write(TWISTED_ORIGIN)
            argv = [sys.executable, script, str(port), BODY.hex()]
            self.originName = "twisted-origin"
            p = self.procs.start(self.originName, pinned(self.cpu(ORIGIN_CPU), argv),
                                 os.path.join(self.tmp, "origin.log"), self.tmp)
            waitReady(p, port)
        self.originPort = port
        return p

    # the proxies

    def startMesh(self, profileTo: Optional[str] = None):
        port, admin = freePort(), freePort()
        config = meshConfig(port, self.originPort, mesh=f"admin = tcp:{admin}:interface=127.0.0.1\n")
        name = "twistedmesh" + (" (cProfile)" if profileTo else "")
        p = startMesh(self.procs, self.tmp, name, config, port, self.cpu(PROXY_CPU),
                      "mesh-profile" if profileTo else "mesh", profileTo)
        return p, port

    def startWebProxy(self):
        port = freePort()
        script = os.path.join(self.tmp, "webproxy.py")
        with open(script, "w") as f:
            f.write(REVERSE_PROXY)
        p = self.procs.start("twisted.web.proxy", pinned(self.cpu(PROXY_CPU), [sys.executable, script, str(port),
                                                                               str(self.originPort)]),
                             os.path.join(self.tmp, "webproxy.log"), self.tmp)
        waitReady(p, port)
        return p, port

    # checks and measurements

    def checkAnswer(self, proc: Optional[Proc], port: int, label: str) -> bool:
        try:
            status, body = getOnce(port)
        except (OSError, http.client.HTTPException) as e:
            status, body = None, repr(e).encode()
        ok = status == 200 and body == BODY
        if ok:
            print(f"  check {label}: GET / -> {status}, {len(body)}-byte body as served by the origin: OK")
        else:
            msg = f"check {label}: GET / -> {status}, body {body[:200]!r} ({len(body)} bytes): WRONG"
            print("  " + msg)
            self.failures.append(msg)
            if proc is not None:
                print(f"--- last {LOG_TAIL_LINES} lines of {proc.name}'s output ---\n{tail(proc.log)}")
        return ok

    def wrk(self, port: int, connections: int, duration: int) -> dict:
        argv = pinned(self.cpu(ORIGIN_CPU), [self.opts.wrk, "-t1", f"-c{connections}", f"-d{duration}s",
                                             "--latency", "--timeout", "5s", f"http://127.0.0.1:{port}/"])
        try:
            out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 timeout=duration + 30, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise BenchError(f"wrk did not finish within {duration + 30}s")
        text = out.stdout.decode("utf-8", "replace")
        if out.returncode != 0:
            raise BenchError(f"wrk exited {out.returncode}:\n{text}")
        return parseWrk(text)

    def measure(self, target: Target, proc: Optional[Proc], port: int, conns: Sequence[int],
                results: Dict) -> None:
        for c in conns:
            print(f"  {target.label}, c={c}: warm-up {WARMUP_SECONDS}s", end="", flush=True)
            warm = self.wrk(port, c, WARMUP_SECONDS)
            runs = []
            for i in range(self.opts.repeat):
                cpu0 = procTimes(proc.pid) if proc else None
                t0 = time.monotonic()
                r = self.wrk(port, c, self.opts.duration)
                elapsed = time.monotonic() - t0
                cpu1 = procTimes(proc.pid) if proc else None
                if cpu0 is not None and cpu1 is not None:
                    r["cpu"] = 100.0 * (cpu1 - cpu0) / elapsed
                r["rss"] = procRssMiB(proc.pid) if proc else None
                runs.append(r)
                print(f", run {i + 1}: {r['rps']:,.0f} req/s", end="", flush=True)
                if r["errors"]:
                    print(f"\n    ERRORS: {'; '.join(r['errors'])}", end="")
            print(flush=True)
            med = medianRun(runs)
            med["served"] = (warm["requests"] or 0) + sum(x["requests"] or 0 for x in runs)
            results[(target.key, c)] = med
            if med["errors"] or any(x["errors"] for x in runs):
                msg = f"{target.label} c={c}: " + "; ".join(sorted({e for x in runs for e in x["errors"]}))
                self.failures.append(msg)
                if proc is not None:
                    print(f"--- last {LOG_TAIL_LINES} lines of {proc.name}'s output ---\n{tail(proc.log)}")
            if proc is not None and not proc.alive():
                raise BenchError(f"{proc.name} died during the c={c} run (status {proc.popen.returncode}).\n"
                                 f"--- last {LOG_TAIL_LINES} lines ---\n{tail(proc.log)}")


# -- report -----------------------------------------------------------------------------------------------


def fmtOpt(value: Optional[float], fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def printTable(c: int, results: Dict, targets: Sequence[Target], repeat: int) -> None:
    rows = [(t, results[(t.key, c)]) for t in targets if (t.key, c) in results]
    if not rows:
        return
    print(f"\nHTTP/1.1, c={c}" + (f" (median of {repeat})" if repeat > 1 else ""))
    header = f"| {'target':<28} | {'req/s':>9} | {'p50 ms':>7} | {'p99 ms':>7} | {'proxy CPU%':>10} | {'RSS MiB':>7} |"
    print(header)
    cells = header.split("|")[1:-1]
    print("|" + "|".join("-" * len(cell) if i == 0 else "-" * (len(cell) - 1) + ":"
                         for i, cell in enumerate(cells)) + "|")
    for t, r in rows:
        print(f"| {t.label:<28} | {r['rps']:>9,.0f} | {r['p50']:>7.3f} | {r['p99']:>7.3f} | "
              f"{fmtOpt(r['cpu'], '.0f'):>10} | {fmtOpt(r['rss'], '.0f'):>7} |")
        if repeat > 1:
            print(f"|   runs: {', '.join(f'{x:,.0f}' for x in r['runs'])}")
    for t, r in rows:
        if r["errors"]:
            print(f"  {t.label}: {'; '.join(r['errors'])}")
    mesh = results.get((MESH.key, c))
    if mesh:
        for other in (WEBPROXY, DIRECT):
            o = results.get((other.key, c))
            if o and o["rps"]:
                print(f"  twistedmesh / {other.label}: {mesh['rps'] / o['rps']:.2f}x req/s")


def printProfile(path: str) -> None:
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        print(f"\nno profile was written to {path}: did twistd exit cleanly?")
        return
    print(f"\ncProfile of twistedmesh, c=50: top {PROFILE_TOP} functions by tottime")
    stats = pstats.Stats(path, stream=sys.stdout)
    stats.strip_dirs().sort_stats("tottime").print_stats(PROFILE_TOP)


# -- main -------------------------------------------------------------------------------------------------


def parseArgs(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=10, help="seconds per measured wrk run (default 10)")
    p.add_argument("--connections", default="50,1", help="comma-separated wrk -c values (default 50,1)")
    p.add_argument("--repeat", type=int, default=1, help="runs per figure; the median is shown (default 1)")
    p.add_argument("--quick", action="store_true", help="3 s runs, c=50 only")
    p.add_argument("--profile", action="store_true",
                   help="also run twistedmesh under cProfile at c=50 and print the top 25 by tottime")
    p.add_argument("--wrk", default="/usr/bin/wrk", help="the wrk binary (default /usr/bin/wrk)")
    p.add_argument("--nginx", default="/usr/sbin/nginx", help="the nginx binary (default /usr/sbin/nginx)")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.duration = 3
        opts.connections = "50"
    try:
        opts.conns = [int(x) for x in opts.connections.split(",") if x.strip()]
    except ValueError:
        p.error(f"--connections: not a list of integers: {opts.connections!r}")
    if not opts.conns or min(opts.conns) < 1:
        p.error("--connections: give at least one count, each >= 1")
    if opts.duration < 1 or opts.repeat < 1:
        p.error("--duration and --repeat must be >= 1")
    return opts


def header(opts: argparse.Namespace, bench: Bench) -> None:
    import twisted

    nginx = findNginx(opts.nginx)
    print("twistedmesh HTTP/1.1 benchmark")
    print(f"  Python   {platform.python_version()} ({sys.executable})")
    print(f"  Twisted  {twisted.__version__}")
    print(f"  nginx    {commandVersion([nginx, '-v']) if nginx else 'not installed'}")
    print(f"  wrk      {commandVersion([opts.wrk, '-v']).split(' Copyright')[0]}")
    print(f"  CPU      {cpuModel()}, {os.cpu_count()} CPUs; "
          + (f"origin + wrk on CPU {ORIGIN_CPU}, proxy under test on CPU {PROXY_CPU}" if bench.pin
             else "NOT PINNED (taskset missing)"))
    print(f"  wrk -t1 -c{{{','.join(map(str, opts.conns))}}} -d{opts.duration}s --latency, "
          f"{WARMUP_SECONDS}s warm-up, median of {opts.repeat}")


def run(opts: argparse.Namespace, tmp: str, procs: Procs) -> int:
    bench = Bench(opts, tmp, procs)
    header(opts, bench)
    if not os.access(opts.wrk, os.X_OK):
        raise BenchError(f"wrk not found at {opts.wrk}")
    if (os.cpu_count() or 1) < 2 and bench.pin:
        print("NOTE: one CPU only: pinning disabled")
        bench.pin = False

    results: Dict = {}
    origin = bench.startOrigin()
    print(f"\norigin: {bench.originName} on 127.0.0.1:{bench.originPort}")
    bench.checkAnswer(origin, bench.originPort, "origin")

    print("\nmeasuring")
    bench.measure(DIRECT, None, bench.originPort, opts.conns, results)

    mesh, meshPort = bench.startMesh()
    try:
        if bench.checkAnswer(mesh, meshPort, "twistedmesh"):
            bench.measure(MESH, mesh, meshPort, opts.conns, results)
            bench.checkAnswer(mesh, meshPort, "twistedmesh after the load")
    finally:
        status = procs.stop(mesh)
        if status not in (0, None):
            print(f"  twistedmesh exited with status {status} on SIGTERM\n"
                  f"--- last {LOG_TAIL_LINES} lines ---\n{tail(mesh.log)}")

    web, webPort = bench.startWebProxy()
    try:
        if bench.checkAnswer(web, webPort, "twisted.web.proxy"):
            bench.measure(WEBPROXY, web, webPort, opts.conns, results)
    finally:
        procs.stop(web)

    profilePath = None
    if opts.profile:
        profilePath = os.path.join(tmp, "twistedmesh.prof")
        prof, profPort = bench.startMesh(profileTo=profilePath)
        try:
            if bench.checkAnswer(prof, profPort, "twistedmesh under cProfile"):
                bench.measure(MESH_PROFILED, prof, profPort, [50], results)
        finally:
            status = procs.stop(prof)
            if status != 0:
                print(f"  profiled twistd exited with status {status}\n"
                      f"--- last {LOG_TAIL_LINES} lines ---\n{tail(prof.log)}")

    procs.stop(origin)

    for c in opts.conns:
        printTable(c, results, [DIRECT, MESH, WEBPROXY], opts.repeat)
    if profilePath:
        r = results.get((MESH_PROFILED.key, 50))
        if r:
            print(f"\ntwistedmesh under cProfile, c=50: {r['rps']:,.0f} req/s, p50 {r['p50']:.2f} ms, "
                  f"p99 {r['p99']:.2f} ms (profiling overhead included); the profile covers "
                  f"{r['served']:,} requests from wrk (warm-up included), so ncalls / {r['served']:,} "
                  f"is calls per request")
        printProfile(profilePath)
    return reportFailures(bench.failures)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return runScript("twistedmesh-bench-", parseArgs(argv), run)


if __name__ == "__main__":
    sys.exit(main())
