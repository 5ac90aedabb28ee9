"""
What the benchmark scripts share: the processes they start and stop (pinned to a CPU where taskset is
installed), the nginx origin's configuration, the proxy's configuration and its C{twistd} process, waiting
for a port to answer, reading wrk's report, and the way a script runs, cleans up and exits.

Not a benchmark itself: C{http1.py}, C{http2.py} and C{workers.py} import it (their directory is on
C{sys.path} when they run). Standard library only.
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from typing import Callable, List, Optional, Sequence

BODY = (b"twistedmesh-benchmark-body-" + b"0123456789abcdefghijklmnopqrstuvwxyz" * 3)[:100]
assert len(BODY) == 100
ORIGIN_CPU = "0"
PROXY_CPU = "1"
WARMUP_SECONDS = 2
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
LOG_TAIL_LINES = 40


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
    """
    The last C{lines} lines of the log at C{path}, or why there are none.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return f"(no log: {e})"
    text = data.decode("utf-8", "replace").splitlines()
    return "\n".join(text[-lines:]) if text else "(log is empty)"


def cpuModel() -> str:
    """
    The CPU's model name, from /proc/cpuinfo.
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def commandVersion(argv: Sequence[str]) -> str:
    """
    The first line C{argv} (a program's version option) prints.
    """
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
    """
    The process's resident memory in MiB, from /proc.
    """
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
    A process started by a script, with its output in a log file.
    """

    def __init__(self, name: str, argv: List[str], log: str, cwd: str) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self._logFile = open(log, "wb")
        # Own session: a Ctrl-C at the terminal reaches only the script, which then stops the children
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
    """
    Every process a script started and has not stopped yet, to stop them all on the way out.
    """

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
    """
    C{argv} run on CPU C{cpu} (by taskset), or as it is when C{cpu} is None.
    """
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
            getOnce(port, timeout=2)
            return
        except (OSError, http.client.HTTPException) as e:
            last = repr(e)
        time.sleep(0.1)
    raise BenchError(f"{proc.name} did not answer on 127.0.0.1:{port} within {timeout:.0f}s ({last}).\n"
                     f"--- last {LOG_TAIL_LINES} lines of its output ---\n{tail(proc.log)}")


# -- the origin: nginx ------------------------------------------------------------------------------------


def findNginx(path: str) -> Optional[str]:
    """
    The nginx at C{path} (a script's C{--nginx}) if it is there, else the one on PATH, else None.
    """
    return path if os.access(path, os.X_OK) else shutil.which("nginx")


def nginxConfig(tmp: str, server: str, http: str = "") -> str:
    """
    An nginx configuration for one foreground process keeping its files in C{tmp}: keep-alive connections
    that last a whole run, no access log, C{http} in the C{http} block and C{server} as its one server.
    """
    temps = "\n".join(f"    {kind}_temp_path {tmp}/{kind};"
                      for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""\
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
{temps}
{http}
    server {{
{server}
    }}
}}
"""


def startNginx(procs: Procs, nginx: str, tmp: str, config: str, cpu: Optional[str], port: int,
               log: str = "nginx.log") -> Proc:
    """
    Run C{nginx} on C{config} (written to C{tmp}/nginx.conf), on CPU C{cpu}; return once C{port} answers.
    """
    conf = os.path.join(tmp, "nginx.conf")
    with open(conf, "w") as f:
        f.write(config)
    p = procs.start("nginx", pinned(cpu, [nginx, "-p", tmp + "/", "-e", "stderr", "-c", conf]),
                    os.path.join(tmp, log), tmp)
    waitReady(p, port)
    return p


# -- the proxy --------------------------------------------------------------------------------------------


def meshConfig(port: int, origin: int, mesh: str = "admin = off\n", endpoint: str = "",
               cluster: str = "") -> str:
    """
    A twistedmesh configuration: one HTTP listener on C{port} (C{endpoint} appended to its endpoint
    string) sending everything to the origin on C{origin}; C{mesh} and C{cluster} are more lines of the
    C{[mesh]} and C{[cluster:origin]} sections.
    """
    return f"""\
[mesh]
{mesh}drain_timeout = 2s

[listener:web]
endpoint = tcp:{port}:interface=127.0.0.1{endpoint}
protocol = http
routes = main

[route:main/all]
prefix = /
cluster = origin

[cluster:origin]
endpoints = tcp:127.0.0.1:{origin}
{cluster}"""


def startMesh(procs: Procs, tmp: str, name: str, config: str, port: int, cpu: Optional[str], files: str,
              profileTo: Optional[str] = None) -> Proc:
    """
    Run C{twistd twistedmesh} (under cProfile, writing to C{profileTo}, when given) on C{config} as
    C{name}, on CPU C{cpu}, its config and log C{files}.ini and C{files}.log in C{tmp}; return once C{port}
    answers a GET.
    """
    conf = os.path.join(tmp, f"{files}.ini")
    with open(conf, "w") as f:
        f.write(config)
    argv = [sys.executable]
    if profileTo:
        argv += ["-m", "cProfile", "-o", profileTo]
    argv += [twistdScript(), "-n", "--pidfile=", "twistedmesh", "--config", conf]
    p = procs.start(name, pinned(cpu, argv), os.path.join(tmp, f"{files}.log"), tmp)
    waitReady(p, port)
    return p


# -- wrk's report -----------------------------------------------------------------------------------------


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def toMs(value: str) -> float:
    """
    A wrk latency (C{"1.25ms"}, C{"830.00us"}) in milliseconds.
    """
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", value.strip())
    if not m:
        raise ValueError(f"unparsable wrk latency {value!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def parseWrk(text: str) -> dict:
    """
    What a C{wrk --latency} report says: requests/s, p50 and p99 in ms, the request count, and its error
    lines (non-2xx answers, socket errors).
    """
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


# -- a script's run ---------------------------------------------------------------------------------------


def reportFailures(failures: Sequence[str]) -> int:
    """
    List C{failures} (if any); the script's exit status: 1 with failures, else 0.
    """
    if not failures:
        return 0
    print("\nFAILURES:")
    for f in failures:
        print(f"  {f}")
    return 1


def runScript(prefix: str, opts: argparse.Namespace, run: Callable[[argparse.Namespace, str, Procs], int]) -> int:
    """
    Call C{run(opts, tmp, procs)} with a fresh temporary directory (named from C{prefix}) and an empty
    L{Procs}; whatever happens (an error, Ctrl-C, SIGTERM), stop every process still running and remove the
    directory. Returns the exit status: C{run}'s, 2 on a L{BenchError}, 130 when interrupted.
    """

    def onTerm(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, onTerm)
    procs = Procs()
    tmp = tempfile.mkdtemp(prefix=prefix)
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
