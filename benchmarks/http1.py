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
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BODY = (b"twistedmesh-benchmark-body-" + b"0123456789abcdefghijklmnopqrstuvwxyz" * 3)[:100]
assert len(BODY) == 100
ORIGIN_CPU = "0"
PROXY_CPU = "1"
WARMUP_SECONDS = 2
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
LOG_TAIL_LINES = 40
PROFILE_TOP = 25


class BenchError(Exception):
    """
    A failure that ends the run with a message rather than a traceback.
    """


# -- small helpers ----------------------------------------------------------------------------------------


def freePort() -> int:
    """
    A port free on 127.0.0.1 now, found by binding to port 0.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return f"(no log: {e})"
    text = data.decode("utf-8", "replace").splitlines()
    return "\n".join(text[-lines:]) if text else "(log is empty)"


def cpuModel() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def commandVersion(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"
    lines = out.stdout.decode("utf-8", "replace").strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def procTimes(pid: int) -> Optional[float]:
    """
    CPU seconds (user + system) the process has used so far, from /proc.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def procRssMiB(pid: int) -> Optional[float]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def twistdScript() -> str:
    """
    The twistd console script as a Python file (C{which twistd} may be a pyenv shell shim, which cProfile
    cannot run).
    """
    candidates = [os.path.join(sysconfig.get_path("scripts"), "twistd"),
                  os.path.join(os.path.dirname(sys.executable), "twistd")]
    found = shutil.which("twistd")
    if found:
        candidates.append(found)
    for path in candidates:
        try:
            with open(path, "rb") as f:
                head = f.read(200)
        except OSError:
            continue
        if head.startswith(b"#!") and b"python" in head.split(b"\n", 1)[0]:
            return path
    raise BenchError("cannot find the twistd script of this Python (is Twisted installed?)")


# -- processes --------------------------------------------------------------------------------------------


class Proc:
    """
    A process started by this script, with its output in a log file.
    """

    def __init__(self, name: str, argv: List[str], log: str, cwd: str) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self._logFile = open(log, "wb")
        # Own session: a Ctrl-C at the terminal reaches only this script, which then stops the children
        # itself, in order, so a profiled twistd still drains and writes its profile.
        self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._logFile,
                                      stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> Optional[int]:
        """
        SIGTERM, wait up to C{timeout}, then SIGKILL. Returns the exit status.
        """
        try:
            if self.popen.poll() is None:
                try:
                    self.popen.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    print(f"  {self.name}: no exit {timeout:.0f}s after SIGTERM, killing", flush=True)
                    self.popen.kill()
                    self.popen.wait(5)
            return self.popen.returncode
        finally:
            self._logFile.close()


class Procs:
    def __init__(self) -> None:
        self.running: List[Proc] = []

    def start(self, name: str, argv: List[str], log: str, cwd: str) -> Proc:
        p = Proc(name, argv, log, cwd)
        self.running.append(p)
        return p

    def stop(self, p: Proc) -> Optional[int]:
        if p in self.running:
            self.running.remove(p)
        return p.stop()

    def stopAll(self) -> None:
        while self.running:
            p = self.running.pop()
            try:
                p.stop()
            except Exception as e:  # keep stopping the others
                print(f"  stopping {p.name} failed: {e!r}", file=sys.stderr)


def pinned(cpu: Optional[str], argv: List[str]) -> List[str]:
    return ["taskset", "-c", cpu] + argv if cpu is not None else argv


def getOnce(port: int, timeout: float = 5.0):
    """
    One C{GET /} on a fresh connection: (status, body).
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/", headers={"Host": f"127.0.0.1:{port}"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def waitReady(proc: Proc, port: int, timeout: float = READY_TIMEOUT) -> None:
    """
    Poll until the port accepts a connection and answers a GET; raise with the log tail if the process
    dies or the time runs out.
    """
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(f"{proc.name} exited with status {proc.popen.returncode} before answering.\n"
                             f"--- last {LOG_TAIL_LINES} lines of its output ---\n{tail(proc.log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pass
            status, _ = getOnce(port, timeout=2)
            return
        except (OSError, http.client.HTTPException) as e:
            last = repr(e)
        time.sleep(0.1)
    raise BenchError(f"{proc.name} did not answer on 127.0.0.1:{port} within {timeout:.0f}s ({last}).\n"
                     f"--- last {LOG_TAIL_LINES} lines of its output ---\n{tail(proc.log)}")


# -- the parties ------------------------------------------------------------------------------------------


NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
error_log stderr;
pid {tmp}/nginx.pid;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    default_type text/plain;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            return 200 "{body}";
        }}
    }}
}}
"""

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

MESH_CONF = """\
[mesh]
admin = tcp:{admin}:interface=127.0.0.1
drain_timeout = 2s

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
        nginx = self.opts.nginx if os.access(self.opts.nginx, os.X_OK) else shutil.which("nginx")
        if nginx:
            conf = os.path.join(self.tmp, "nginx.conf")
            with open(conf, "w") as f:
                f.write(NGINX_CONF.format(tmp=self.tmp, port=port, body=BODY.decode("ascii")))
            argv = [nginx, "-p", self.tmp + "/", "-e", "stderr", "-c", conf]
            self.originName = "nginx"
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
        conf = os.path.join(self.tmp, "mesh.ini")
        with open(conf, "w") as f:
            f.write(MESH_CONF.format(admin=admin, port=port, origin=self.originPort))
        twistd = twistdScript()
        argv = [sys.executable]
        if profileTo:
            argv += ["-m", "cProfile", "-o", profileTo]
        argv += [twistd, "-n", "--pidfile=", "twistedmesh", "--config", conf]
        name = "twistedmesh" + (" (cProfile)" if profileTo else "")
        log = os.path.join(self.tmp, "twistd-profile.log" if profileTo else "twistd.log")
        p = self.procs.start(name, pinned(self.cpu(PROXY_CPU), argv), log, self.tmp)
        waitReady(p, port)
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


# -- wrk output -------------------------------------------------------------------------------------------


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def toMs(value: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", value.strip())
    if not m:
        raise ValueError(f"unparsable wrk latency {value!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def parseWrk(text: str) -> dict:
    rps = re.search(r"^Requests/sec:\s+([0-9.]+)", text, re.M)
    if not rps:
        raise BenchError(f"no Requests/sec in wrk's output:\n{text}")
    pct = dict(re.findall(r"^\s+(50|75|90|99)%\s+([0-9.]+(?:us|ms|s|m|h))\s*$", text, re.M))
    if "50" not in pct or "99" not in pct:
        raise BenchError(f"no Latency Distribution in wrk's output:\n{text}")
    errors = []
    non2xx = re.search(r"^\s*Non-2xx or 3xx responses:\s*(\d+)", text, re.M)
    if non2xx and int(non2xx.group(1)):
        errors.append(non2xx.group(0).strip())
    sock = re.search(r"^\s*Socket errors:.*$", text, re.M)
    if sock and any(int(n) for n in re.findall(r"\d+", sock.group(0))):
        errors.append(sock.group(0).strip())
    total = re.search(r"^\s*(\d+) requests in", text, re.M)
    return {
        "rps": float(rps.group(1)),
        "p50": toMs(pct["50"]),
        "p99": toMs(pct["99"]),
        "requests": int(total.group(1)) if total else None,
        "errors": errors,
        "cpu": None,
        "rss": None,
        "raw": text,
    }


def medianRun(runs: List[dict]) -> dict:
    """
    The run with the median requests/s (the lower middle one for an even count), so its p50/p99 belong to
    the same run; error lines are merged from all runs.
    """
    ordered = sorted(runs, key=lambda r: r["rps"])
    med = dict(ordered[(len(ordered) - 1) // 2])
    med["errors"] = sorted({e for r in runs for e in r["errors"]})
    med["runs"] = [r["rps"] for r in runs]
    return med


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

    nginx = opts.nginx if os.access(opts.nginx, os.X_OK) else shutil.which("nginx")
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
    if bench.failures:
        print("\nFAILURES:")
        for f in bench.failures:
            print(f"  {f}")
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    opts = parseArgs(argv)

    def onTerm(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, onTerm)
    procs = Procs()
    tmp = tempfile.mkdtemp(prefix="twistedmesh-bench-")
    try:
        return run(opts, tmp, procs)
    except BenchError as e:
        print(f"\nERROR: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything", file=sys.stderr)
        return 130
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs.stopAll()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
