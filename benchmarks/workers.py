#!/usr/bin/env python3
"""
twistedmesh with several worker processes: how evenly each way of sharing a listener spreads connections
over the workers, and how throughput scales from one worker to two.

    python3 benchmarks/workers.py [--duration 10] [--connections 50] [--short 400] [--quick]

Balance: for C{workers.sharing = reuseport} and C{inherit} in turn, a proxy with C{workers = 2} in front of
nginx gets C{--short} short connections (one request each, C{Connection: close}) from one client, then as
many from 4 client threads, then a wrk run; after each, each worker's own figures (admin
C{/stats?worker=N}: C{listener.web.downstream_cx_total} and C{http.web.downstream_rq_total}) say how many
connections and requests it served.

Scaling: wrk through C{workers = 1} and C{workers = 2} (the default sharing), nothing pinned for either
(see the README: on 2 cores the load generator and the origin compete with the workers).

Reuses benchmarks/http1.py's bench (the origin, wrk) and benchmarks/common.py (processes, the proxy's
config); standard library and Twisted only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import http1  # noqa: E402  (the sibling script: its bench, the origin and wrk)
from common import (  # noqa: E402  (this directory's module of shared pieces)
    READY_TIMEOUT, WARMUP_SECONDS, BenchError, cpuModel, freePort, getOnce, meshConfig, procTimes, runScript,
    startMesh, tail,
)


def adminStats(admin: int, worker: Optional[int] = None) -> Dict[str, float]:
    """
    C{/stats?format=json} of the admin endpoint (of one worker with C{worker}), as name -> value.
    """
    conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=10)
    try:
        path = "/stats?format=json" + (f"&worker={worker}" if worker is not None else "")
        conn.request("GET", path)
        body = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    return {s["name"]: s["value"] for s in body["stats"]}


def perWorker(admin: int, workers: int) -> List[Tuple[int, int]]:
    """
    (connections, requests) each worker served so far.
    """
    figures = []
    for i in range(workers):
        s = adminStats(admin, i)
        figures.append((int(s.get("listener.web.downstream_cx_total", 0)), int(s.get("http.web.downstream_rq_total", 0))))
    return figures


def shortConnections(port: int, total: int, threads: int) -> int:
    """
    C{total} requests, each on its own connection, from C{threads} threads; the number that failed.
    """
    lock = threading.Lock()
    state = {"left": total, "failed": 0}

    def run() -> None:
        while True:
            with lock:
                if not state["left"]:
                    return
                state["left"] -= 1
            try:
                status, _ = getOnce(port)
                ok = status == 200
            except (OSError, http.client.HTTPException):
                ok = False
            if not ok:
                with lock:
                    state["failed"] += 1

    pool = [threading.Thread(target=run) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return state["failed"]


class WorkersBench(http1.Bench):
    """
    The http1 bench, with a multi-worker twistedmesh and nothing pinned.
    """

    def cpu(self, which: str) -> Optional[str]:
        return None  # see the module docstring: the same (no) pinning for every figure

    def startWorkers(self, workers: int, sharing: str):
        port, admin = freePort(), freePort()
        config = meshConfig(port, self.originPort, endpoint=":backlog=1024", mesh=(
            f"admin = tcp:{admin}:interface=127.0.0.1\nworkers = {workers}\nworkers.sharing = {sharing}\n"))
        p = startMesh(self.procs, self.tmp, f"twistedmesh workers={workers} {sharing}", config, port, None,
                      f"mesh-{workers}-{sharing}")
        deadline = time.monotonic() + READY_TIMEOUT
        while adminStats(admin).get("workers.live", workers) < workers:  # every worker serving
            if time.monotonic() > deadline:
                raise BenchError(f"not every worker went live:\n{tail(p.log)}")
            time.sleep(0.1)
        return p, port, admin


def spread(before: List[Tuple[int, int]], after: List[Tuple[int, int]], which: int) -> str:
    counts = [a[which] - b[which] for a, b in zip(after, before)]
    total = sum(counts) or 1
    shares = " / ".join(f"{c} ({100.0 * c / total:.0f}%)" for c in counts)
    return f"{shares}   max/mean {max(counts) * len(counts) / total:.2f}"


def balance(bench: WorkersBench, opts, sharing: str) -> None:
    proc, port, admin = bench.startWorkers(2, sharing)
    try:
        print(f"\nbalance, workers = 2, workers.sharing = {sharing} (worker 0 / worker 1)")
        before = perWorker(admin, 2)
        # the readiness checks went through the listener too: measure from here
        for label, threads in (("one client", 1), ("4 client threads", 4)):
            failed = shortConnections(port, opts.short, threads)
            after = perWorker(admin, 2)
            print(f"  {opts.short} short connections, {label}: connections {spread(before, after, 0)}"
                  + (f"   ({failed} failed)" if failed else ""))
            before = after
        for c in opts.conns:
            r = bench.wrk(port, c, opts.duration)
            after = perWorker(admin, 2)
            print(f"  wrk -c{c} {opts.duration}s: {r['rps']:,.0f} req/s; connections {spread(before, after, 0)}; "
                  f"requests {spread(before, after, 1)}" + (f"   ERRORS {r['errors']}" if r["errors"] else ""))
            before = after
    finally:
        bench.procs.stop(proc)


def scaling(bench: WorkersBench, opts, sharing: str) -> None:
    print(f"\nscaling (workers.sharing = {sharing} for 2; nothing pinned)")
    results = {}
    for workers in (1, 2):
        proc, port, admin = bench.startWorkers(workers, sharing)
        try:
            for c in opts.conns:
                bench.wrk(port, c, WARMUP_SECONDS)
                cpu0 = sum(filter(None, (procTimes(pid) for pid in treePids(proc.pid))))
                t0 = time.monotonic()
                r = bench.wrk(port, c, opts.duration)
                elapsed = time.monotonic() - t0
                cpu1 = sum(filter(None, (procTimes(pid) for pid in treePids(proc.pid))))
                results[(workers, c)] = r
                print(f"  workers = {workers}, wrk -c{c}: {r['rps']:,.0f} req/s, p50 {r['p50']:.2f} ms, "
                      f"p99 {r['p99']:.2f} ms, proxy CPU {100.0 * (cpu1 - cpu0) / elapsed:.0f}%"
                      + (f"   ERRORS {r['errors']}" if r["errors"] else ""))
        finally:
            bench.procs.stop(proc)
    for c in opts.conns:
        one, two = results.get((1, c)), results.get((2, c))
        if one and two:
            print(f"  c={c}: workers = 2 / workers = 1 = {two['rps'] / one['rps']:.2f}x")


def treePids(pid: int) -> List[int]:
    """
    C{pid} and its children (the workers), from /proc.
    """
    pids = [pid]
    try:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                            pids.append(int(entry))
                except (OSError, ValueError, IndexError):
                    continue
    except OSError:
        pass
    return pids


def parseArgs(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--duration", type=int, default=10, help="seconds per measured wrk run (default 10)")
    p.add_argument("--connections", default="50", help="comma-separated wrk -c values (default 50)")
    p.add_argument("--short", type=int, default=400, help="short connections per balance check (default 400)")
    p.add_argument("--sharing", default="reuseport", help="the sharing of the scaling run (default reuseport)")
    p.add_argument("--quick", action="store_true", help="3 s runs, 200 short connections")
    p.add_argument("--wrk", default="/usr/bin/wrk")
    p.add_argument("--nginx", default="/usr/sbin/nginx")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.duration, opts.short = 3, 200
    opts.conns = [int(x) for x in opts.connections.split(",") if x.strip()]
    opts.repeat = 1
    return opts


def run(opts, tmp: str, procs) -> int:
    bench = WorkersBench(opts, tmp, procs)
    if not os.access(opts.wrk, os.X_OK):
        raise BenchError(f"wrk not found at {opts.wrk}")
    print(f"twistedmesh workers benchmark: {cpuModel()}, {os.cpu_count()} CPUs, nothing pinned")
    origin = bench.startOrigin()
    print(f"origin: {bench.originName} on 127.0.0.1:{bench.originPort}")
    for sharing in ("reuseport", "inherit"):
        balance(bench, opts, sharing)
    scaling(bench, opts, opts.sharing)
    procs.stop(origin)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return runScript("twistedmesh-workers-bench-", parseArgs(argv), run)


if __name__ == "__main__":
    sys.exit(main())
