#!/usr/bin/env python3
"""
HTTP/2 throughput and latency of twistedmesh: h2load against nginx directly, and through twistedmesh with
an HTTP/2 (h2c) downstream and (a) an HTTP/1.1 upstream cluster, (b) an HTTP/2 upstream cluster; then a
100 MiB download and upload through (b) with the proxy's RSS sampled, to show that memory stays flat.

    python3 benchmarks/http2.py [--requests 20000] [--clients 10] [--streams 10] [--repeat 1] [--no-transfer]

One run: the origin (nginx, 1 worker, C{GET /} -> 200 with a 100-byte body, on an HTTP/1.1 port and an h2c
port) and h2load share CPU 0; twistedmesh runs alone on CPU 1, one process, as in C{benchmarks/http1.py}.
Each figure: C{h2load -n N -c C -m M} after a warm-up of N/10 requests; requests/s from h2load, p50/p99
from its per-request log (C{--log-file}).

Standard library and Twisted only (plus h2load, nginx, curl and taskset as programs). Everything listens on
127.0.0.1; files live in a temporary directory, removed at the end; every process started is stopped.
What it shares with the other benchmark scripts is in C{benchmarks/common.py}.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402  (this directory's module of shared pieces)
    BODY, ORIGIN_CPU, PROXY_CPU, BenchError, Proc, Procs, commandVersion, cpuModel, findNginx, freePort,
    medianRun, meshConfig, nginxConfig, pinned, procRssMiB, procTimes, reportFailures, runScript, startMesh,
    startNginx, tail,
)

TRANSFER = 100 << 20

# Besides nginxConfig's keep-alive settings: long HTTP/2 connections, and bodies up to 200 MiB.
NGINX_HTTP = """\
    http2_max_requests 1000000;
    http2_max_concurrent_streams 128;
    client_max_body_size 200m;"""

NGINX_SERVER = """\
        listen 127.0.0.1:{h1};
        listen 127.0.0.1:{h2} http2;
        root {tmp}/www;
        location = / {{
            return 200 "{body}";
        }}
        location /upload/ {{
            dav_methods PUT;
            create_full_put_path on;
        }}"""


def h2load(opts, port: int, n: int, log: Optional[str]) -> dict:
    """
    One h2load run at C{port}; its req/s, and p50/p99 in ms from C{log} (when given).
    """
    argv = [opts.h2load, "-n", str(n), "-c", str(opts.clients), "-m", str(opts.streams), "-t", "1"]
    if log:
        argv += ["--log-file", log]
    argv.append(f"http://127.0.0.1:{port}/")
    try:
        out = subprocess.run(pinned(ORIGIN_CPU if opts.pin else None, argv), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, timeout=600)
    except subprocess.TimeoutExpired:
        raise BenchError(f"h2load did not finish within 600 s: {' '.join(argv)}")
    text = out.stdout.decode("utf-8", "replace")
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", text)
    counts = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                       r"(\d+) errored", text)
    status = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    if not rps or not counts:
        raise BenchError(f"cannot read h2load's output:\n{text}")
    errors = []
    if int(counts.group(4)) or int(counts.group(5)) or int(counts.group(3)) != n:
        errors.append(counts.group(0))
    if status and int(status.group(1)) != n:
        errors.append(status.group(0))
    result = {"rps": float(rps.group(1)), "p50": None, "p99": None, "errors": errors, "raw": text}
    if log:
        # One line per request: start time (µs since the epoch), status, elapsed (µs).
        elapsed = []
        with open(log) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3:
                    elapsed.append(int(parts[2]))
        elapsed.sort()
        if elapsed:
            result["p50"] = elapsed[len(elapsed) // 2] / 1000
            result["p99"] = elapsed[min(len(elapsed) - 1, int(len(elapsed) * 0.99))] / 1000
    return result


class Bench:
    def __init__(self, opts, tmp: str, procs: Procs) -> None:
        self.opts = opts
        self.tmp = tmp
        self.procs = procs
        self.failures: List[str] = []

    def startOrigin(self):
        nginx = findNginx(self.opts.nginx)
        if not nginx:
            raise BenchError("nginx is needed (an h2c origin): not found")
        h1, h2 = freePort(), freePort()
        os.makedirs(os.path.join(self.tmp, "www", "upload"))
        server = NGINX_SERVER.format(tmp=self.tmp, h1=h1, h2=h2, body=BODY.decode("ascii"))
        p = startNginx(self.procs, nginx, self.tmp, nginxConfig(self.tmp, server, NGINX_HTTP),
                       ORIGIN_CPU if self.opts.pin else None, h1)
        return p, h1, h2

    def startMesh(self, protocol: str, origin: int):
        port = freePort()
        # Ready once an HTTP/1.1 GET goes through to the origin: the listener speaks both.
        p = startMesh(self.procs, self.tmp, f"twistedmesh ({protocol} upstream)",
                      meshConfig(port, origin, cluster=f"protocol = {protocol}\n"), port,
                      PROXY_CPU if self.opts.pin else None, f"mesh-{protocol}")
        return p, port

    def measure(self, label: str, proc: Optional[Proc], port: int) -> dict:
        opts = self.opts
        h2load(opts, port, max(opts.requests // 10, 100), None)  # warm-up
        runs = []
        for i in range(opts.repeat):
            cpu0 = procTimes(proc.pid) if proc else None
            t0 = time.monotonic()
            r = h2load(opts, port, opts.requests, os.path.join(self.tmp, f"h2load-{port}-{i}.log"))
            wall = time.monotonic() - t0
            cpu1 = procTimes(proc.pid) if proc else None
            r["cpu"] = (cpu1 - cpu0) / wall * 100 if cpu0 is not None and cpu1 is not None else None
            r["rss"] = procRssMiB(proc.pid) if proc else None
            runs.append(r)
        med = medianRun(runs)
        for e in med["errors"]:
            self.failures.append(f"{label}: {e}")
        print(f"  {label}: {med['rps']:,.0f} req/s, p50 {med['p50']:.2f} ms, p99 {med['p99']:.2f} ms", flush=True)
        return med

    def transfer(self, proc: Proc, port: int) -> None:
        """
        100 MiB down and up through the proxy with curl over HTTP/2, sampling the proxy's RSS.
        """
        curl = shutil.which("curl")
        if not curl:
            print("  (curl not installed: no transfer check)")
            return
        path = os.path.join(self.tmp, "www", "big")
        with open(path, "wb") as f:
            for _ in range(TRANSFER >> 20):
                f.write(os.urandom(1 << 20))
        base = procRssMiB(proc.pid)
        for what, argv in (
            ("download, read at 50 MB/s", [curl, "-s", "--http2-prior-knowledge", "--limit-rate", "50M",
                                           "-o", os.devnull, f"http://127.0.0.1:{port}/big"]),
            ("download, full speed", [curl, "-s", "--http2-prior-knowledge", "-o", os.devnull,
                                      f"http://127.0.0.1:{port}/big"]),
            ("upload (PUT)", [curl, "-s", "--http2-prior-knowledge", "-o", os.devnull, "-T", path,
                              f"http://127.0.0.1:{port}/upload/copy"]),
        ):
            peak = [base or 0.0]
            done = threading.Event()

            def sample():
                while not done.wait(0.1):
                    rss = procRssMiB(proc.pid)
                    if rss is not None:
                        peak[0] = max(peak[0], rss)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            t0 = time.monotonic()
            out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
            wall = time.monotonic() - t0
            done.set()
            sampler.join()
            ok = out.returncode == 0
            if what.startswith("upload"):
                ok = ok and os.path.getsize(os.path.join(self.tmp, "www", "upload", "copy")) == TRANSFER
            print(f"  {what}: {TRANSFER / wall / 1e6:,.0f} MB/s, proxy RSS {base:.1f} MiB before, peak "
                  f"{peak[0]:.1f} MiB{'' if ok else '  FAILED: ' + out.stdout.decode(errors='replace')[:200]}",
                  flush=True)
            if not ok:
                self.failures.append(f"transfer {what} failed (curl status {out.returncode})")


def printTable(results: Dict[str, dict], opts) -> None:
    print(f"\nh2load -n {opts.requests} -c {opts.clients} -m {opts.streams}"
          + (f" (median of {opts.repeat})" if opts.repeat > 1 else ""))
    print(f"| {'target':<42} | {'req/s':>9} | {'p50 ms':>7} | {'p99 ms':>7} | {'proxy CPU%':>10} | {'RSS MiB':>7} |")
    print(f"|{'-' * 44}|{'-' * 10}:|{'-' * 8}:|{'-' * 8}:|{'-' * 11}:|{'-' * 8}:|")
    for label, r in results.items():
        cpu = "–" if r["cpu"] is None else f"{r['cpu']:.0f}"
        rss = "–" if r["rss"] is None else f"{r['rss']:.0f}"
        print(f"| {label:<42} | {r['rps']:>9,.0f} | {r['p50']:>7.2f} | {r['p99']:>7.2f} | {cpu:>10} | {rss:>7} |")
    direct = results.get("direct to nginx (h2c)")
    h1 = results.get("twistedmesh, h2c in, HTTP/1.1 upstream")
    h2 = results.get("twistedmesh, h2c in, HTTP/2 upstream")
    if h2 and h1:
        print(f"  HTTP/2 upstream / HTTP/1.1 upstream: {h2['rps'] / h1['rps']:.2f}x req/s")
    if direct:
        for r, name in ((h1, "HTTP/1.1 upstream"), (h2, "HTTP/2 upstream")):
            if r:
                print(f"  twistedmesh ({name}) / direct: {r['rps'] / direct['rps']:.2f}x req/s")


def parseArgs(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20000, help="requests per h2load run (default 20000)")
    p.add_argument("--clients", type=int, default=10, help="h2load -c (default 10)")
    p.add_argument("--streams", type=int, default=10, help="h2load -m, streams per client (default 10)")
    p.add_argument("--repeat", type=int, default=1, help="runs per figure; the median is shown (default 1)")
    p.add_argument("--no-transfer", dest="transfer", action="store_false", help="skip the 100 MiB transfers")
    p.add_argument("--h2load", default=shutil.which("h2load") or "/usr/bin/h2load", help="the h2load binary")
    p.add_argument("--nginx", default="/usr/sbin/nginx", help="the nginx binary (default /usr/sbin/nginx)")
    opts = p.parse_args(argv)
    if opts.requests < 100 or opts.clients < 1 or opts.streams < 1 or opts.repeat < 1:
        p.error("--requests >= 100, --clients, --streams and --repeat >= 1")
    return opts


def run(opts, tmp: str, procs: Procs) -> int:
    import twisted

    opts.pin = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    if not os.access(opts.h2load, os.X_OK):
        raise BenchError(f"h2load not found at {opts.h2load}")
    print("twistedmesh HTTP/2 benchmark")
    print(f"  Python   {platform.python_version()}, Twisted {twisted.__version__}")
    print(f"  nginx    {commandVersion([opts.nginx, '-v'])}")
    print(f"  h2load   {commandVersion([opts.h2load, '--version'])}")
    print(f"  CPU      {cpuModel()}, {os.cpu_count()} CPUs; "
          + (f"nginx + h2load on CPU {ORIGIN_CPU}, twistedmesh on CPU {PROXY_CPU}" if opts.pin
             else "NOT PINNED"))
    bench = Bench(opts, tmp, procs)
    origin, h1Port, h2Port = bench.startOrigin()
    results: Dict[str, dict] = {}
    print("\nmeasuring")
    results["direct to nginx (h2c)"] = bench.measure("direct to nginx (h2c)", None, h2Port)
    for protocol, port, label in (("http1", h1Port, "twistedmesh, h2c in, HTTP/1.1 upstream"),
                                  ("http2", h2Port, "twistedmesh, h2c in, HTTP/2 upstream")):
        mesh, meshPort = bench.startMesh(protocol, port)
        try:
            results[label] = bench.measure(label, mesh, meshPort)
            if protocol == "http2" and opts.transfer:
                print("\n100 MiB through twistedmesh (h2c in, HTTP/2 upstream), curl --http2-prior-knowledge")
                bench.transfer(mesh, meshPort)
        finally:
            status = procs.stop(mesh)
            if status not in (0, None):
                print(f"  {mesh.name} exited with status {status}\n{tail(mesh.log)}")
    procs.stop(origin)
    printTable(results, opts)
    return reportFailures(bench.failures)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return runScript("twistedmesh-bench-h2-", parseArgs(argv), run)


if __name__ == "__main__":
    sys.exit(main())
