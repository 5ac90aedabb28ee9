#!/usr/bin/env python3
"""
What observability costs: twistedmesh with an access log (to a file) and tracing (1% sampled, spans
exported to a Zipkin collector) against the same proxy with both off, in one run, on one machine, measured
with wrk the way benchmarks/http1.py measures (its helpers are imported, not copied).

    python3 benchmarks/observability.py [--duration 5] [--rounds 3] [--connections 50]
    python3 benchmarks/observability.py --apart [--rounds 5]        # also the log alone, tracing alone
    python3 benchmarks/observability.py --no-sockets [--rounds 5]   # the proxy's own work only

Both proxies run at once, each pinned to CPU 1 (the origin, nginx, and wrk on CPU 0); wrk loads one at a
time, alternating (off, on, on, off, off, on, ...) so that a drift of the machine's speed falls on both.
Each proxy's figure is the median of its runs; the overhead is the median over rounds of
C{(off - on) / off}, each round's two runs being back to back.

Stats cannot be turned off (every stat is an attribute the hot path increments), so they are on in both
proxies, and their cost is measured separately, without sockets, as benchmarks/hotpath.py measures the
hot path: one request through memory transports is run with every stat counting its updates, and that
many counter increments and histogram records are then timed alone and set against hotpath.py's cost of a
whole request.

Standard library and Twisted only, like http1.py. Everything listens on 127.0.0.1; every file is in a
temporary directory removed at the end; every process started is stopped on the way out.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import queue
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from twisted.internet.testing import MemoryReactorClock



def _sibling(name: str):
    """
    The module benchmarks/C{name}.py, loaded from its file: putting this directory on C{sys.path} instead
    would let a benchmark script's name (C{h2.py}) shadow a library (C{h2}).
    """
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name + ".py")
    spec = importlib.util.spec_from_file_location(f"twistedmesh_benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


http1 = _sibling("http1")  # processes, the origin, wrk
LOG_TAIL_LINES, PROXY_CPU, BenchError = http1.LOG_TAIL_LINES, http1.PROXY_CPU, http1.BenchError
Proc, Procs, freePort, pinned, tail, twistdScript = (http1.Proc, http1.Procs, http1.freePort, http1.pinned,
                                                     http1.tail, http1.twistdScript)

TARGET_OVERHEAD = 10.0  # percent: the goal for access log + tracing + stats together

MESH_CONF = """\
[mesh]
admin = tcp:{admin}:interface=127.0.0.1
drain_timeout = 2s
{tracing}
[listener:web]
endpoint = tcp:{port}:interface=127.0.0.1
protocol = http
routes = main
{accessLog}
[route:main/all]
prefix = /
cluster = origin

[cluster:origin]
endpoints = tcp:127.0.0.1:{origin}
"""

# 1% of requests sampled; spans batched and posted to the origin, which answers any POST with 200 (nginx's
# `return 200` ignores the method), so the exporter does its whole job.
TRACING = """\
tracing.provider = zipkin
tracing.collector = http://127.0.0.1:{origin}/api/v2/spans
tracing.sample_rate = 1
"""

ACCESS_LOG = "access_log = {path}\n"


def startMesh(bench: http1.Bench, procs: Procs, tmp: str, name: str) -> Tuple[Proc, int]:
    """
    Start a twistedmesh in front of the origin, with what variant C{name} (of L{VARIANTS}) turns on.
    """
    log, trace = name in ("log", "on"), name in ("trace", "on")
    port, admin = freePort(), freePort()
    conf = os.path.join(tmp, f"mesh-{name}.ini")
    accessLog = os.path.join(tmp, f"access-{name}.log")
    with open(conf, "w") as f:
        f.write(MESH_CONF.format(
            admin=admin, port=port, origin=bench.originPort,
            tracing=TRACING.format(origin=bench.originPort) if trace else "",
            accessLog=ACCESS_LOG.format(path=accessLog) if log else "",
        ))
    argv = [sys.executable, twistdScript(), "-n", "--pidfile=", "twistedmesh", "--config", conf]
    p = procs.start(f"twistedmesh ({name})", pinned(bench.cpu(PROXY_CPU), argv),
                    os.path.join(tmp, f"twistd-{name}.log"), tmp)
    http1.waitReady(p, port)
    return p, port


def accessLogLines(tmp: str) -> int:
    path = os.path.join(tmp, "access-on.log")
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        return sum(1 for _ in f)


# -- stats, without sockets --------------------------------------------------------------------------------


def statsCost(requests: int) -> Dict[str, float]:
    """
    Per request: how many stat updates the hot path makes, what they cost alone (in µs), and what the whole
    request costs in benchmarks/hotpath.py (in µs).
    """
    hotpath = _sibling("hotpath")
    from twistedmesh import service as serviceModule
    from twistedmesh.observability import stats as statsModule

    counts = {"counter": 0, "record": 0}

    class CountingCounter(statsModule.Counter):
        __slots__ = ()

        def _get(self):
            return statsModule.Counter.value.__get__(self)

        def _set(self, v):
            counts["counter"] += 1
            statsModule.Counter.value.__set__(self, v)

        value = property(_get, _set)

    class CountingGauge(statsModule.Gauge):
        __slots__ = ()
        value = CountingCounter.value

    class CountingHistogram(statsModule.Histogram):
        __slots__ = ()

        def record(self, value: float) -> None:
            counts["record"] += 1
            statsModule.Histogram.record(self, value)

    kinds = {statsModule.Counter: CountingCounter, statsModule.Gauge: CountingGauge,
             statsModule.Histogram: CountingHistogram}

    class CountingStore(statsModule.StatsStore):
        def _get(self, kind, name, tagName, labels):
            return super()._get(kinds.get(kind, kind), name, tagName, labels)

    # Count one request's updates on a proxy whose every stat counts (this process only).
    original = serviceModule.StatsStore
    serviceModule.StatsStore = CountingStore
    try:
        down, downT, up, upT = hotpath.setup()
    finally:
        serviceModule.StatsStore = original
    hotpath.run(100, down, downT, up, upT)
    counts["counter"] = counts["record"] = 0
    hotpath.run(1000, down, downT, up, upT)
    perCounter = counts["counter"] / 1000.0
    perRecord = counts["record"] / 1000.0

    # Those updates alone, as the hot path makes them: an attribute of a resolved object, then `.value += 1`.
    class Holder:
        pass

    store = statsModule.StatsStore()
    holder = Holder()
    holder.counter = store.counter("bench.counter")
    holder.histogram = store.histogram("bench.histogram")
    nCounter, nRecord = round(perCounter), round(perRecord)

    def updates(n: int) -> None:
        h = holder
        for _ in range(n):
            for _ in range(nCounter):
                h.counter.value += 1
            for _ in range(nRecord):
                h.histogram.record(3.25)

    def empty(n: int) -> None:
        # The same loops without the updates: their cost is taken off.
        for _ in range(n):
            for _ in range(nCounter):
                pass
            for _ in range(nRecord):
                pass

    updates(1000)
    t0 = time.perf_counter()
    updates(requests)
    t1 = time.perf_counter()
    empty(requests)
    t2 = time.perf_counter()
    statsUs = max((t1 - t0) - (t2 - t1), 0.0) / requests * 1e6

    down, downT, up, upT = hotpath.setup()
    hotpath.run(1000, down, downT, up, upT)
    t0 = time.perf_counter()
    hotpath.run(requests, down, downT, up, upT)
    requestUs = (time.perf_counter() - t0) / requests * 1e6
    return {"counters": perCounter, "records": perRecord, "statsUs": statsUs, "requestUs": requestUs}


VARIANTS = ("off", "log", "trace", "on")  # neither; access log only; tracing 1% only; both


def hotpathConfig(hotpath, tmp: str, variant: str) -> str:
    """
    benchmarks/hotpath.py's configuration (C{hotpath}, the loaded module) with what C{variant} (of
    L{VARIANTS}) turns on: the access log to a file in C{tmp}, tracing at 1%.
    """
    text = hotpath.CONFIG
    if variant in ("trace", "on"):
        text = text.replace("[mesh]\n", "[mesh]\n" + TRACING.format(origin=9), 1)
    if variant in ("log", "on"):
        text = text.replace("routes = main\n", "routes = main\n" + ACCESS_LOG.format(
            path=os.path.join(tmp, f"hotpath-{variant}.log")), 1)
    if (variant in ("trace", "on")) != (text.count("tracing.") == 3) or (
            variant in ("log", "on")) != ("access_log" in text):
        raise BenchError("benchmarks/hotpath.py's CONFIG changed: cannot add the access log and tracing to it")
    return text


def threadReportingReactor() -> Tuple[type, Callable[[], None]]:
    """
    A memory reactor class that takes the access log's writer-thread reports (C{callFromThread}), and the
    function that runs them: a caller runs them between chunks of requests, as a reactor would between
    events.
    """
    reports: "queue.SimpleQueue" = queue.SimpleQueue()

    class Reactor(MemoryReactorClock):
        def callFromThread(self, f, *args, **kwargs) -> None:
            reports.put((f, args, kwargs))

    def drain() -> None:
        while not reports.empty():
            f, args, kwargs = reports.get()
            f(*args, **kwargs)

    return Reactor, drain


def hotPathCost(tmp: str, requests: int, rounds: int, variants: Sequence[str] = ("off", "on")) -> Dict[str, float]:
    """
    benchmarks/hotpath.py's request (memory transports, no reactor) on proxies with and without the access
    log and 1% tracing (C{variants}, from L{VARIANTS}), taking turns; the median µs per request of each.
    The access log's file writes happen on its writer thread, as in the real proxy; spans are exported to
    a collector that is never reached (the memory reactor connects nowhere), which costs what queueing
    them costs.
    """
    hotpath = _sibling("hotpath")
    reactorClass, drain = threadReportingReactor()

    def timed(setup, n: int) -> float:
        elapsed = 0.0
        while n > 0:
            chunk = min(n, 2000)
            t0 = time.perf_counter()
            hotpath.run(chunk, *setup)
            elapsed += time.perf_counter() - t0
            drain()
            n -= chunk
        return elapsed

    setups = {}
    original = hotpath.CONFIG, hotpath.MemoryReactorClock
    for name in variants:
        hotpath.CONFIG, hotpath.MemoryReactorClock = hotpathConfig(hotpath, tmp, name), reactorClass  # setup() reads them
        try:
            setups[name] = hotpath.setup()
        finally:
            hotpath.CONFIG, hotpath.MemoryReactorClock = original
        timed(setups[name], 1000)
    times: Dict[str, List[float]] = {name: [] for name in variants}
    for i in range(rounds):
        # Each round in a different order, so that a drift of the machine's speed falls on all.
        order = list(variants[i % len(variants):]) + list(variants[:i % len(variants)])
        for name in (order if i % 2 == 0 else reversed(order)):
            times[name].append(timed(setups[name], requests) / requests * 1e6)
    return {name: statistics.median(values) for name, values in times.items()}


def noSockets(opts: argparse.Namespace, tmp: str) -> int:
    """
    C{--no-sockets}: the proxy's own extra work per request for each of stats, the access log and tracing,
    and all together, without wrk, nginx or the network.
    """
    print("twistedmesh observability overhead, without sockets (benchmarks/hotpath.py's request)")
    s = statsCost(opts.requests)
    share = 100.0 * s["statsUs"] / s["requestUs"]
    print(f"  stats: {s['counters']:.0f} counter/gauge updates and {s['records']:.0f} histogram records per "
          f"request, {s['statsUs']:.2f} us of {s['requestUs']:.2f} us ({share:.1f}%)")
    hot = hotPathCost(tmp, max(opts.requests // 5, 1000), opts.rounds, VARIANTS)
    labels = {"off": "neither", "log": "access log (default format, to a file)", "trace": "tracing 1%",
              "on": "access log + tracing 1%"}
    print(f"\n  median of {opts.rounds} runs each, taking turns:")
    for name in VARIANTS:
        extra = hot[name] - hot["off"]
        print(f"  {labels[name]:<40} {hot[name]:7.2f} us per request" + (
            f"  {extra:+6.2f} us ({100.0 * extra / hot[name]:.1f}% of the requests/s)" if name != "off" else ""))
    return 0


# -- main --------------------------------------------------------------------------------------------------


def parseArgs(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=5, help="seconds per measured wrk run (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each proxy, alternating (default 3)")
    p.add_argument("--connections", type=int, default=50, help="wrk -c (default 50)")
    p.add_argument("--requests", type=int, default=50000, help="requests for the stats measurement")
    p.add_argument("--wrk", default="/usr/bin/wrk", help="the wrk binary (default /usr/bin/wrk)")
    p.add_argument("--nginx", default="/usr/sbin/nginx", help="the nginx binary (default /usr/sbin/nginx)")
    p.add_argument("--apart", action="store_true",
                   help="under load, also a proxy with the access log alone and one with tracing alone "
                        "(four proxies taking turns)")
    p.add_argument("--no-sockets", action="store_true",
                   help="only the measurements without sockets (no wrk, no nginx): stats, the access log and "
                        "tracing apart and together; --rounds runs of each")
    opts = p.parse_args(argv)
    if opts.duration < 1 or opts.rounds < 1 or opts.connections < 1 or opts.requests < 1000:
        p.error("--duration, --rounds and --connections must be >= 1, --requests >= 1000")
    opts.repeat = 1
    return opts


def run(opts: argparse.Namespace, tmp: str, procs: Procs) -> int:
    bench = http1.Bench(opts, tmp, procs)
    if not os.access(opts.wrk, os.X_OK):
        raise BenchError(f"wrk not found at {opts.wrk}")
    if (os.cpu_count() or 1) < 2 and bench.pin:
        bench.pin = False
    print("twistedmesh observability overhead")
    print(f"  CPU {http1.cpuModel()}, {os.cpu_count()} CPUs; "
          + ("origin + wrk on CPU 0, both proxies on CPU 1" if bench.pin else "NOT PINNED (taskset missing)"))
    print(f"  wrk -t1 -c{opts.connections} -d{opts.duration}s, {opts.rounds} alternating runs per proxy, "
          f"{http1.WARMUP_SECONDS}s warm-up each")
    print("  off: stats only (they cannot be turned off); on: stats + access log to a file + tracing "
          "at 1% (Zipkin export)" + ("; log, trace: each alone" if opts.apart else ""))

    origin = bench.startOrigin()
    print(f"\norigin: {bench.originName} on 127.0.0.1:{bench.originPort}")
    names = VARIANTS if opts.apart else ("off", "on")
    proxies: Dict[str, Tuple[Proc, int]] = {}
    for name in names:
        proxies[name] = startMesh(bench, procs, tmp, name)
        if not bench.checkAnswer(proxies[name][0], proxies[name][1], f"twistedmesh ({name})"):
            raise BenchError(f"twistedmesh ({name}) does not proxy correctly")

    runs: Dict[str, List[float]] = {name: [] for name in names}
    print("\nmeasuring")
    for name, (proc, port) in proxies.items():
        bench.wrk(port, opts.connections, http1.WARMUP_SECONDS)
    for i in range(opts.rounds):
        # Each round in a different order (and every other one reversed), so that no variant always runs
        # right after the same other one.
        order = list(names[i % len(names):]) + list(names[:i % len(names)])
        if i % 2:
            order.reverse()
        for name in order:
            proc, port = proxies[name]
            r = bench.wrk(port, opts.connections, opts.duration)
            if r["errors"]:
                bench.failures.append(f"{name} run {i + 1}: {'; '.join(r['errors'])}")
            if not proc.alive():
                raise BenchError(f"{proc.name} died.\n--- last {LOG_TAIL_LINES} lines ---\n{tail(proc.log)}")
            runs[name].append(r["rps"])
            print(f"  round {i + 1}, {name}: {r['rps']:,.0f} req/s", flush=True)
    for name, (proc, port) in proxies.items():
        bench.checkAnswer(proc, port, f"twistedmesh ({name}) after the load")
        status = procs.stop(proc)
        if status not in (0, None):
            print(f"  {proc.name} exited with status {status}\n--- last {LOG_TAIL_LINES} lines ---\n"
                  f"{tail(proc.log)}")
    lines = accessLogLines(tmp)  # after the stop, which flushes the log
    procs.stop(origin)

    off, on = statistics.median(runs["off"]), statistics.median(runs["on"])
    # Each round's runs are close in time, so their ratio is what a drift of the machine's speed (a
    # shared VM's neighbours) disturbs least: the headline is the median of the rounds' overheads.
    paired = sorted(100.0 * (a - b) / a for a, b in zip(runs["off"], runs["on"]) if a)
    overhead = statistics.median(paired) if paired else float("nan")
    print("\n| proxy | req/s (median) | runs |\n|---|---:|---|")
    for name, label in (("off", "stats only"), ("on", "stats + access log + tracing 1%")):
        print(f"| {label} | {statistics.median(runs[name]):,.0f} | "
              f"{', '.join(f'{x:,.0f}' for x in runs[name])} |")
    print(f"\nper round, (off - on) / off: {', '.join(f'{x:.1f}%' for x in paired)}; medians' ratio "
          f"{100.0 * (off - on) / off:.1f}%")
    print(f"access log + tracing 1% overhead (median of the rounds): {overhead:.1f}% of req/s "
          f"({lines:,} access-log lines written by the 'on' proxy)")
    for name, label in (("log", "access log alone"), ("trace", "tracing 1% alone")):
        if name in runs:
            alone = statistics.median([100.0 * (a - b) / a for a, b in zip(runs["off"], runs[name]) if a])
            print(f"{label} (median of the rounds): {alone:.1f}% of req/s")

    print("\nstats, without sockets (benchmarks/hotpath.py's request)")
    s = statsCost(opts.requests)
    share = 100.0 * s["statsUs"] / s["requestUs"]
    print(f"  per request: {s['counters']:.0f} counter/gauge updates and {s['records']:.0f} histogram records,"
          f" {s['statsUs']:.2f} us of {s['requestUs']:.2f} us ({share:.1f}% of the proxy's own work)")
    hot = hotPathCost(tmp, max(opts.requests // 5, 1000), 5)
    hotOverhead = 100.0 * (hot["on"] - hot["off"]) / hot["on"]
    print(f"\naccess log + tracing 1%, without sockets (benchmarks/hotpath.py's request, median of 5 alternating"
          f" runs):\n  off {hot['off']:.2f} us, on {hot['on']:.2f} us per request: {hot['on'] - hot['off']:.2f} us"
          f" more, {hotOverhead:.1f}% of the requests/s the proxy's own work allows")
    total = overhead + share
    verdict = "within" if total < TARGET_OVERHEAD else "OVER"
    print(f"\nall three together, under load: about {total:.1f}% ({verdict} the {TARGET_OVERHEAD:.0f}% target); "
          "figures on a shared machine are noisy: compare runs of one invocation only")
    return http1.reportFailures(bench.failures)


def main(argv: Optional[Sequence[str]] = None) -> int:
    opts = parseArgs(argv)
    return http1.runScript("twistedmesh-obs-bench-", opts,
                           lambda opts, tmp, procs: noSockets(opts, tmp) if opts.no_sockets else run(opts, tmp, procs))


if __name__ == "__main__":
    sys.exit(main())
