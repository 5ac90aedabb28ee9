"""
Helpers the integration tests share (not a test module: trial collects only C{test_*.py}): ports, the
proxy's and the demo echo's lifecycle in a test, proxy configurations, a small backend, the C{twistd}
subprocess, nginx, polling and buffer sampling on the real reactor, raw TCP exchanges, a keep-alive
HTTP/1.1 client, curl and headless Chromium, and a minimal HTTP/2 client over TCP.

Import them relatively, as the test modules import each other: C{from .support import freePort}.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import treq
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.settings import SettingCodes, Settings
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.plugin import getPlugins
from twisted.trial import unittest
from twisted.web import resource
from twisted.web.server import Site

from twistedmesh.config import loadFile, loadString
from twistedmesh.interfaces import IHTTPFilterFactory
from twistedmesh.service import MeshService

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -- ports and services ----------------------------------------------------------------------------------------


def freePort() -> int:
    """
    A TCP port on 127.0.0.1 that was free a moment ago: for a server this process does not start itself
    (a subprocess's config), or for a port nothing listens on.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port(listening) -> int:
    """
    The port a service's listener (or echo) is bound to.
    """
    return listening.port.getHost().port


def stopProxy(service: MeshService) -> defer.Deferred:
    """
    Stop C{service} and close its upstream pools at once (no keep-alive connection waits out the drain),
    then let the aborted connections finish closing before trial checks the reactor.
    """
    d = service.stopService()
    for cluster in service.clusters.values():
        cluster.pools.closeAll()
    return d.addCallback(lambda _: deferLater(reactor, 0.01, lambda: None))


def startService(test: unittest.TestCase, text: str, seed: int = 1,
                 stop: Callable[[MeshService], object] = MeshService.stopService) -> MeshService:
    """
    Build and start a L{MeshService} from INI C{text} (named C{test.ini} in errors) on the real reactor,
    and C{stop} it when C{test} ends: by default a draining stop; L{stopProxy} closes the pools too.
    """
    service = MeshService(loadString(text, "test.ini"), reactor, seed=seed)
    service.startService()
    test.addCleanup(stop, service)
    return service


@defer.inlineCallbacks
def startEcho(test: unittest.TestCase, protocol: Optional[str] = None):
    """
    Start the demo echo upstream (C{[echo:e]}: HTTP, or raw TCP with C{protocol = "tcp"}) on a loopback
    port for C{test}; fire with its port once it is live.
    """
    text = "[mesh]\nadmin = off\n[echo:e]\nendpoint = tcp:0:interface=127.0.0.1\n"
    if protocol is not None:
        text += f"protocol = {protocol}\n"
    echo = startService(test, text)
    yield echo.whenLive
    return port(echo.echoes["e"])


# -- proxy configurations --------------------------------------------------------------------------------------


def proxyConfig(cluster: str, sections: str = "", mesh: str = "admin = off\n", listener: str = "edge",
                options: str = "", route: str = "") -> str:
    """
    The INI text of a proxy with one HTTP listener, C{listener}, on a free loopback port, whose every path
    goes to the cluster C{cluster}: C{mesh} is the body of the C{[mesh]} section, C{options} and C{route}
    more lines of the listener's and of the route's sections, C{sections} the other sections (the
    clusters', the filters').
    """
    return f"""
[mesh]
{mesh}
[listener:{listener}]
endpoint = tcp:0:interface=127.0.0.1
protocol = http
routes = main
{options}
[route:main/all]
prefix = /
cluster = {cluster}
{route}
{sections}
"""


def edgeConfig(upstream: int, filters: Optional[str] = None, sections: str = "") -> str:
    """
    A L{proxyConfig} in front of one upstream: no admin, the listener C{edge} sending every path to the
    cluster C{echo} at C{127.0.0.1:upstream}; C{filters} is the listener's filter chain (name the router
    last), C{sections} more sections (the filters' own).
    """
    return proxyConfig("echo", sections + f"\n[cluster:echo]\nendpoints = tcp:127.0.0.1:{upstream}\n",
                       options=f"filters = {filters}\n" if filters is not None else "")


def exampleService(name: str) -> MeshService:
    """
    The service the shipped example C{etc/examples/NAME} builds, on a memory reactor (nothing listens or
    connects).
    """
    return MeshService(loadFile(os.path.join(ROOT, "etc", "examples", name)), MemoryReactorClock())



class FilterPluginTests:
    """
    Mixed into the C{TestCase} of an HTTP filter plugin: the plugin C{plugin} is found among the HTTP filter
    factories, and the shipped example C{etc/examples/EXAMPLE} (C{example}) builds a service whose one
    listener is C{edge}.
    """

    plugin: str
    example: str

    def test_found(self) -> None:
        """
        L{getPlugins} finds an HTTP filter factory named C{plugin}.
        """
        self.assertIn(self.plugin, [p.name for p in getPlugins(IHTTPFilterFactory)])

    def test_exampleINI(self) -> None:
        """
        The shipped example loads and builds a service (without listening or connecting).
        """
        self.assertEqual(sorted(exampleService(self.example).listeners), ["edge"])

# -- a small backend -------------------------------------------------------------------------------------------


class Whoami(resource.Resource):
    """
    A backend answering every request with its name.
    """

    isLeaf = True

    def __init__(self, name: bytes) -> None:
        super().__init__()
        self.name = name

    def render(self, request) -> bytes:
        """
        The name.
        """
        return self.name


def serveWhoami(test: unittest.TestCase, name: bytes, number: int = 0, interface: str = "127.0.0.1"):
    """
    Listen with a L{Whoami} called C{name} on C{interface}, port C{number} (a free one by default), until
    C{test} ends; return the listening port.
    """
    listening = reactor.listenTCP(number, Site(Whoami(name)), interface=interface)
    test.addCleanup(listening.stopListening)
    return listening


# -- the twistd command ----------------------------------------------------------------------------------------


class Twistd(protocol.ProcessProtocol):
    """
    A C{twistd} subprocess: its output, and a Deferred firing with its exit code.
    """

    def __init__(self) -> None:
        self.chunks = []
        self.ended = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    errReceived = outReceived

    def output(self) -> str:
        return b"".join(self.chunks).decode("utf-8", "replace")

    def processEnded(self, reason) -> None:
        self.ended.callback(reason.value.exitCode)

    def kill(self) -> None:
        if not self.ended.called:
            self.transport.signalProcess("KILL")
            return self.ended


def requireTwistd() -> str:
    """
    The C{twistd} executable; the test is skipped where it is not on PATH.
    """
    twistd = shutil.which("twistd")
    if twistd is None:
        raise unittest.SkipTest("twistd is not on PATH")
    return twistd


def startTwistd(test: unittest.TestCase, config: str) -> Tuple[Twistd, str]:
    """
    Write C{config} to a C{mesh.ini} in a fresh directory and run C{twistd -n twistedmesh} on it there
    (killed, and the directory removed, when C{test} ends; skipped without twistd). Returns the process and
    the config file's path (rewrite it to reload).
    """
    twistd = requireTwistd()
    workdir = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, workdir, True)
    path = os.path.join(workdir, "mesh.ini")
    with open(path, "w") as f:
        f.write(config)
    process = Twistd()
    reactor.spawnProcess(process, twistd, [twistd, "-n", "--pidfile=", "twistedmesh", "--config", path],
                         env=os.environ, path=workdir)
    test.addCleanup(process.kill)
    return process, path


# -- nginx as an upstream --------------------------------------------------------------------------------------

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


@defer.inlineCallbacks
def startNginx(test: unittest.TestCase, locations: str, http: str = ""):
    """
    nginx serving h2c (HTTP/2 with prior knowledge) on a free loopback port, where installed with HTTP/2
    (else C{test} is skipped): one process in the foreground, its files in a fresh directory that is also
    the server's root. C{locations} is the body of its C{server} block after C{listen}; C{http} goes in the
    C{http} block. Stopped (SIGTERM, its exit awaited) when C{test} ends. Fires with C{(port, root)} once
    it accepts connections.
    """
    if NGINX is None:
        raise unittest.SkipTest("nginx is not installed")
    out, err, code = yield getProcessOutputAndValue(NGINX, ["-V"])
    if b"http_v2_module" not in err + out:
        raise unittest.SkipTest("this nginx has no HTTP/2 module")
    root = os.path.abspath(test.mktemp())
    os.makedirs(root)
    number = freePort()
    conf = os.path.join(root, "nginx.conf")
    temp = " ".join(f"{kind}_temp_path {root}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    with open(conf, "w") as f:
        f.write(f"""
daemon off;
master_process off;
worker_processes 1;
error_log {root}/error.log;
pid {root}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log off;
    {temp}
    {http}
    server {{
        listen 127.0.0.1:{number} http2;
        root {root};
        {locations}
    }}
}}
""")
    exited = Twistd()  # (any process: its output, and its end)
    process = reactor.spawnProcess(exited, NGINX, [NGINX, "-p", root, "-c", conf], env=os.environ)

    def stop():
        process.signalProcess("TERM")
        return exited.ended

    test.addCleanup(stop)
    yield waitListening(number, 10, lambda: "nginx to accept connections:\n" + _tail(os.path.join(root, "error.log")),
                        lambda: exited.ended.called)
    return number, root


def _tail(path: str, lines: int = 20) -> str:
    """
    The last C{lines} lines of the file at C{path}, for a failure message.
    """
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return f"({path}: {e.strerror})"


# -- waiting on the real reactor -------------------------------------------------------------------------------


@defer.inlineCallbacks
def waitFor(predicate: Callable[[], object], bound: float = 5.0,
            what: Union[str, Callable[[], str]] = "the condition", step: float = 0.02):
    """
    Poll C{predicate} every C{step} seconds until it is true; fail after C{bound} seconds, saying C{what}
    was awaited (a callable is asked then, to describe the state it timed out in). Nothing sleeps: a
    loaded machine makes the wait longer, never the test wrong.
    """
    deadline = reactor.seconds() + bound
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {bound}s waiting for {what() if callable(what) else what}")
        yield deferLater(reactor, step, lambda: None)


@defer.inlineCallbacks
def waitListening(number: int, bound: float, what: Union[str, Callable[[], str]],
                  ended: Callable[[], bool] = lambda: False):
    """
    Try to connect to port C{number} on 127.0.0.1 until a connection is accepted (and closed at once); fail
    after C{bound} seconds, or as soon as C{ended()} says the server will never listen (its process
    exited), saying C{what} was awaited. For a server in another process, with no event to wait on.
    """
    deadline = reactor.seconds() + bound
    while True:
        try:
            p = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", number), protocol.Protocol())
        except Exception:
            if ended() or reactor.seconds() > deadline:
                gave = "gave up" if ended() else f"timed out after {bound}s"
                raise AssertionError(f"{gave} waiting on port {number} for {what() if callable(what) else what}")
            yield deferLater(reactor, 0.02, lambda: None)
        else:
            p.transport.loseConnection()
            return


class Traffic:
    """
    Requests to C{url}, one after another, each on a new connection or through a pool (treq): what
    answered, and what failed.

    @ivar seen: every answer's body, in order.
    @ivar failures: C{(status, body)} of every answer that was not a 200.
    """

    def __init__(self, url: str, pool=None) -> None:
        """
        @param pool: a C{HTTPConnectionPool} to send every request through (its connections kept between
            requests) instead of a new connection each.
        """
        self.url = url
        self.options = {"pool": pool} if pool is not None else {"persistent": False}
        self.seen: List[bytes] = []
        self.failures: List[Tuple[int, bytes]] = []

    @defer.inlineCallbacks
    def run(self, n: int):
        """
        Send C{n} requests; fire when the last is answered.
        """
        for _ in range(n):
            response = yield treq.get(self.url, **self.options)
            body = yield response.content()
            if response.code != 200:
                self.failures.append((response.code, body))
            self.seen.append(body)


@defer.inlineCallbacks
def peakBuffered(connections: Callable[[], Iterable], queued: Callable[[object], int] = lambda conn: 0,
                 samples: int = 20, interval: float = 0.05):
    """
    Sample the bytes the proxy holds for a second (C{samples} times, C{interval} apart): for each of
    C{connections()}, what its transport has not written yet plus C{queued(conn)} (what the connection
    queues itself); fire with the largest total seen for one connection. A backpressure test asserts
    this stays far below the body it moves.
    """
    peak = 0
    for _ in range(samples):
        yield deferLater(reactor, interval, lambda: None)
        for conn in connections():
            t = conn.transport
            peak = max(peak, len(t.dataBuffer) + t._tempDataLen + queued(conn))
    return peak


# -- raw TCP clients -------------------------------------------------------------------------------------------


class Exchange(protocol.Protocol):
    """
    A client that sends C{payload} (then half-closes, with C{halfClose}) and keeps everything it reads:
    C{answered} fires at the first bytes, C{done} with all of them once the connection closes.
    """

    def __init__(self, payload: bytes, halfClose: bool = False) -> None:
        self.payload = payload
        self.halfClose = halfClose
        self.received: List[bytes] = []
        self.answered = defer.Deferred()
        self.done = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)
        if self.halfClose:
            self.transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        if not self.answered.called:
            self.answered.callback(None)

    def connectionLost(self, reason) -> None:
        self.done.callback(b"".join(self.received))


def rawExchange(port: int, payload: bytes) -> defer.Deferred:
    """
    Send C{payload} to C{port} on 127.0.0.1; fire with all the bytes read until the server closes.
    """
    client = Exchange(payload)
    return connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client).addCallback(
        lambda _: client.done)


class KeepAliveClient(protocol.Protocol):
    """
    A keep-alive HTTP/1.1 client for one response at a time: L{request} sends a C{GET} and fires with the
    whole response, head and body (its length from C{content-length}, none without), or with C{b""} if the
    connection ends first (a refused handshake, say); C{lost} fires, and C{reason} is set, when the
    connection ends.
    """

    def __init__(self) -> None:
        self.buffer = b""
        self.waiting: Optional[defer.Deferred] = None
        self.lost: defer.Deferred = defer.Deferred()
        self.reason = None

    def request(self, path: bytes = b"/", host: bytes = b"localhost") -> defer.Deferred:
        """
        Send C{GET path} with C{Host: host}; the Deferred fires with the raw response.
        """
        self.waiting = defer.Deferred()
        self.transport.write(b"GET " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        return self.waiting

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        head, sep, body = self.buffer.partition(b"\r\n\r\n")
        if not sep:
            return
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(body) >= length and self.waiting is not None:
            response, self.buffer = head + sep + body[:length], body[length:]
            waiting, self.waiting = self.waiting, None
            waiting.callback(response)

    def connectionLost(self, reason) -> None:
        self.reason = reason
        if self.waiting is not None:
            waiting, self.waiting = self.waiting, None
            waiting.callback(b"")
        self.lost.callback(None)


# -- client programs: curl, Chromium ---------------------------------------------------------------------------


@defer.inlineCallbacks
def requireCurlHTTP2():
    """
    Fire with the path of a C{curl} that speaks HTTP/2; the test is skipped where there is none.
    """
    curl = shutil.which("curl")
    if curl is None:
        raise unittest.SkipTest("curl is not installed")
    out, err, code = yield getProcessOutputAndValue(curl, ["--version"])
    if b"HTTP2" not in out:
        raise unittest.SkipTest("this curl has no HTTP/2")
    return curl


def requireChromium() -> str:
    """
    A headless-capable Chromium (or Chrome) on PATH; the test is skipped where there is none.
    """
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path is not None:
            return path
    raise unittest.SkipTest("chromium is not installed (apt-get install chromium)")


@defer.inlineCallbacks
def dumpDOM(test: unittest.TestCase, chromium: str, url: str):
    """
    Load C{url} in headless C{chromium} (a profile of its own, removed when C{test} ends); fire with the DOM
    it ends on. Fails C{test} with Chromium's error output if it exits with a non-zero status.
    """
    profile = tempfile.mkdtemp(prefix="twistedmesh-chromium-")
    test.addCleanup(shutil.rmtree, profile, True)
    # A child process (the reactor goes on); `timeout` bounds it whatever Chromium does. --no-sandbox
    # because the suite may run as root, which Chromium's sandbox refuses.
    args = ["60", chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--disable-extensions", "--disable-background-networking",
            f"--user-data-dir={profile}", "--dump-dom", url]
    out, err, code = yield getProcessOutputAndValue(shutil.which("timeout") or "timeout", args,
                                                   env=dict(os.environ), reactor=reactor)
    test.assertEqual(code, 0, err.decode(errors="replace")[-2000:])
    return out.decode("utf-8")


# -- a minimal HTTP/2 client -----------------------------------------------------------------------------------


def head(path: bytes = b"/", method: bytes = b"GET", extra=()) -> list:
    """
    A request head: pseudo-headers first, then C{extra} fields.
    """
    return [(b":method", method), (b":path", path), (b":scheme", b"http"), (b":authority", b"example.com")] + \
        list(extra)


class Producer:
    """
    A push producer that records whether it is paused (a stand-in for a transport).
    """

    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


class Response:
    """
    What a client saw on one stream.
    """

    def __init__(self) -> None:
        self.headers = None
        self.data = bytearray()  # (appending to bytes would be quadratic on large bodies)
        self.trailers = None
        self.ended = False
        self.reset = None

    @property
    def status(self) -> int:
        """
        The C{:status}, as an int.
        """
        return int(dict(self.headers)[b":status"])

    def record(self, event) -> None:
        """
        Keep what C{event} (an h2 client event on this stream) says about the response.
        """
        kind = event.__class__
        if kind is ResponseReceived:
            self.headers = event.headers
        elif kind is DataReceived:
            self.data += event.data
        elif kind is TrailersReceived:
            self.trailers = event.headers
        elif kind is StreamEnded:
            self.ended = True
        elif kind is StreamReset:
            self.reset = event.error_code


class H2ClientProtocol(protocol.Protocol):
    """
    A minimal HTTP/2 client over TCP: requests return Deferreds firing with a L{Response}; request bodies
    are sent as the server's windows allow.
    """

    def __init__(self, window: Optional[int] = None):
        """
        @param window: the stream and connection windows to announce (h2's 64 KiB by default).
        """
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        if window is not None:
            self.conn.local_settings = Settings(client=True, initial_values={
                SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.window = window
        self.responses: Dict[int, Response] = {}
        self.waiting: Dict[int, defer.Deferred] = {}
        self.bodies: Dict[int, bytes] = {}
        self.goaways: List[ConnectionTerminated] = []
        self.closed = defer.Deferred()

    def connectionMade(self):
        """
        Send the preface.
        """
        self.conn.initiate_connection()
        if self.window is not None:
            self.conn.increment_flow_control_window(self.window - 65535)
        self.flush()

    def flush(self):
        """
        Write what h2 queued.
        """
        data = self.conn.data_to_send()
        if data:
            self.transport.write(data)

    def request(self, path: bytes, method: bytes = b"GET", body: Optional[bytes] = None, extra=()) -> defer.Deferred:
        """
        Start a request; the Deferred (with the stream id as C{sid}) fires with its L{Response}.
        """
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, head(path, method, extra), end_stream=body is None)
        self.responses[sid] = Response()
        d = self.waiting[sid] = defer.Deferred()
        if body is not None:
            self.bodies[sid] = body
            self.sendBodies()
        self.flush()
        d.sid = sid
        return d

    def reset(self, sid: int) -> None:
        """
        Cancel stream C{sid}.
        """
        self.conn.reset_stream(sid, ErrorCodes.CANCEL)
        self.flush()

    def sendBodies(self):
        """
        Send what the windows allow of the bodies still to send (C{bodies} keeps what is left, as views).
        """
        for sid, body in list(self.bodies.items()):
            body = memoryview(body)
            while body:
                n = min(len(body), self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
                if n <= 0:
                    break
                self.conn.send_data(sid, body[:n], end_stream=n == len(body))
                body = body[n:]
            if body:
                self.bodies[sid] = body
            else:
                del self.bodies[sid]

    def dataReceived(self, data):
        """
        Dispatch the server's frames.
        """
        for event in self.conn.receive_data(data):
            sid = getattr(event, "stream_id", None)
            r = self.responses.get(sid)
            if isinstance(event, StreamReset):
                # A reset after the stream's end changes nothing of what its requester was given.
                if sid in self.waiting:
                    r.record(event)
                    self.waiting.pop(sid).callback(r)
                continue
            if r is not None:
                r.record(event)
            if isinstance(event, DataReceived):
                self.conn.acknowledge_received_data(event.flow_controlled_length, sid)
            elif isinstance(event, StreamEnded):
                self.waiting.pop(sid).callback(r)
            elif isinstance(event, WindowUpdated):
                self.sendBodies()
            elif isinstance(event, ConnectionTerminated):
                self.goaways.append(event)
                if event.error_code == 0:
                    # h2 takes nothing more after a GOAWAY; the streams it names are still to be answered.
                    self.conn.state_machine.state = self.conn.state_machine.state.CLIENT_OPEN
        self.flush()

    def connectionLost(self, reason):
        """
        Fire C{closed}.
        """
        self.closed.callback(None)


@defer.inlineCallbacks
def connectH2(test: unittest.TestCase, port: int, window: Optional[int] = None):
    """
    An L{H2ClientProtocol} connected to C{port} on 127.0.0.1 (closed, and its close awaited, when C{test}
    ends).
    """
    client = H2ClientProtocol(window)
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    test.addCleanup(lambda: client.closed)
    test.addCleanup(client.transport.loseConnection)
    return client
