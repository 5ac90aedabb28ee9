"""
Integration tests of the whole proxy: L{MeshService} started in-process from an INI string on loopback
ephemeral ports, and C{twistd -n twistedmesh} started as a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import treq
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from twistedmesh.config import ConfigErrors, loadString
from twistedmesh.service import MeshService
from twistedmesh.tap import Options, freezeStartupObjects

from .support import Exchange, freePort, port, proxyConfig, requireTwistd, startEcho, startService, startTwistd

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


class ServiceTests(unittest.TestCase):
    """
    A proxy in this process, on loopback.
    """

    @defer.inlineCallbacks
    def test_tcpProxyThroughEcho(self):
        """
        Bytes sent to a TCP listener reach the cluster's host (a built-in TCP echo) and come back, and
        the listener and cluster counters say so.
        """
        echoPort = yield startEcho(self, "tcp")
        service = startService(self, f"""
[mesh]
admin = tcp:0:interface=127.0.0.1
[listener:edge]
endpoint = tcp:0:interface=127.0.0.1
cluster = echo
[cluster:echo]
endpoints = tcp:127.0.0.1:{echoPort}
""")
        yield service.whenLive
        self.assertEqual(service.state, "LIVE")
        client = Exchange(b"hello, mesh" * 1000, halfClose=True)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port(service.listeners["edge"])), client)
        received = yield client.done
        self.assertEqual(received, b"hello, mesh" * 1000)
        stats = service.stats
        self.assertEqual(stats.get("listener.edge.downstream_cx_total").value, 1)
        self.assertEqual(stats.get("cluster.echo.upstream_cx_total").value, 1)
        self.assertEqual(stats.get("cluster.echo.upstream_cx_tx_bytes_total").value, 11000)
        self.assertEqual(stats.get("cluster.echo.upstream_cx_rx_bytes_total").value, 11000)

        adminURL = f"http://127.0.0.1:{port(service.admin)}"
        response = yield treq.get(adminURL + "/stats?format=json", persistent=False)
        body = yield response.json()
        values = {s["name"]: s["value"] for s in body["stats"]}
        self.assertEqual(values["listener.edge.downstream_cx_total"], 1)
        response = yield treq.get(adminURL + "/ready", persistent=False)
        self.assertEqual((response.code, (yield response.text())), (200, "LIVE\n"))

    @defer.inlineCallbacks
    def test_httpEchoThroughTCPProxy(self):
        """
        The demo HTTP echo answers through a TCP listener with a description of the request.
        """
        webPort = yield startEcho(self)
        proxy = startService(self, f"""
[mesh]
admin = off
[listener:edge]
endpoint = tcp:0:interface=127.0.0.1
cluster = web
[cluster:web]
endpoints = tcp:127.0.0.1:{webPort}
""")
        yield proxy.whenLive
        response = yield treq.get(f"http://127.0.0.1:{port(proxy.listeners['edge'])}/hello",
                                  headers={"X-Test": "yes"}, persistent=False)
        text = yield response.text()
        self.assertEqual(response.code, 200)
        self.assertIn("GET /hello HTTP/1.1", text)
        self.assertIn("x-test: yes", text)

    @defer.inlineCallbacks
    def test_drainWaitsForConnections(self):
        """
        Stopping the service stops accepting at once but lets an open connection finish; the stop
        completes when it closes.
        """
        echoPort = yield startEcho(self, "tcp")
        service = MeshService(loadString(f"""
[mesh]
admin = off
drain_timeout = 30s
[listener:edge]
endpoint = tcp:0:interface=127.0.0.1
cluster = echo
[cluster:echo]
endpoints = tcp:127.0.0.1:{echoPort}
"""), reactor)
        service.startService()
        yield service.whenLive
        listenPort = port(service.listeners["edge"])

        class Hold(protocol.Protocol):
            def __init__(self):
                self.echoed = defer.Deferred()
                self.closed = defer.Deferred()

            def dataReceived(self, data):
                if not self.echoed.called:
                    self.echoed.callback(data)

            def connectionLost(self, reason):
                self.closed.callback(None)

        held = Hold()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", listenPort), held)
        held.transport.write(b"ping")
        self.assertEqual((yield held.echoed), b"ping")

        stopped = service.stopService()
        self.assertEqual(service.state, "DRAINING")
        yield deferLater(0.05)
        self.assertFalse(stopped.called, "the stop must wait for the open connection")
        refused = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", listenPort), protocol.Protocol()).addErrback(lambda f: f.value)
        self.assertIsInstance(refused, Exception, "new connections must be refused")
        held.transport.write(b"still here")
        held.transport.loseConnection()
        yield held.closed
        yield stopped

    @defer.inlineCallbacks
    def test_drainTimeoutAborts(self):
        """
        Connections still open after C{drain_timeout} are closed and the stop completes.
        """
        clock = MemoryReactorClock()
        service = MeshService(loadString("""
[mesh]
admin = off
drain_timeout = 5s
[listener:edge]
endpoint = tcp:0:interface=127.0.0.1
cluster = c
[cluster:c]
endpoints = tcp:127.0.0.1:1
"""), clock)
        service.startService()
        factory = service.listeners["edge"].factory
        aborted = []
        factory.abortAll = lambda: (aborted.append(True), factory.connections.clear(), drained.callback(None))
        drained = defer.Deferred()
        factory.whenDrained = lambda: drained
        stopped = service.stopService()
        clock.advance(4.9)
        self.assertFalse(stopped.called)
        clock.advance(0.2)
        self.assertEqual(aborted, [True])
        yield stopped

    @defer.inlineCallbacks
    def test_tcpAccessLog(self):
        """
        A TCP listener's access log gets one line per connection, with its bytes and upstream.
        """
        echoPort = yield startEcho(self, "tcp")
        path = os.path.abspath(self.mktemp())
        service = MeshService(loadString(f"""
[mesh]
admin = off
[listener:edge]
endpoint = tcp:0:interface=127.0.0.1
cluster = echo
access_log = {path}
access_log.format = %BYTES_RECEIVED% %BYTES_SENT% %UPSTREAM_CLUSTER% %RESPONSE_FLAGS%
[cluster:echo]
endpoints = tcp:127.0.0.1:{echoPort}
"""), reactor)
        service.startService()
        yield service.whenLive
        client = Exchange(b"ping" * 10, halfClose=True)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port(service.listeners["edge"])), client)
        yield client.done
        yield service.listeners["edge"].factory.whenDrained()
        yield service.stopService()
        with open(path) as f:
            self.assertEqual(f.read(), "40 40 echo -\n")

    @defer.inlineCallbacks
    def test_stopClosesFilters(self):
        """
        Stopping the service calls close() on filter makers that have one (filters keeping connections).
        """
        clock = MemoryReactorClock()
        service = MeshService(loadString(proxyConfig("c", """
[filter:authz]
type = ext_authz
uri = http://127.0.0.1:1/check
[cluster:c]
endpoints = tcp:127.0.0.1:1
""", mesh="admin = off\ndrain_timeout = 1s\n", listener="web", options="filters = authz, router\n")), clock)
        closed = []
        [maker] = [m for m in service.filterMakers if hasattr(m, "close")]
        maker.close = lambda: closed.append(True)
        service.startService()
        yield service.stopService()
        self.assertEqual(closed, [True])

    def test_badConfigNamesPlugin(self):
        """
        A chain naming a filter no plugin provides is a config error with a suggestion.
        """
        text = """
[listener:edge]
endpoint = tcp:0
filters = tcp_prxy
cluster = c
[cluster:c]
endpoints = tcp:127.0.0.1:1
"""
        e = self.assertRaises(ConfigErrors, MeshService, loadString(text, "x.ini"), MemoryReactorClock())
        self.assertIn("x.ini: [listener:edge] filters: no network filter plugin named `tcp_prxy` (did you mean `tcp_proxy`?)", str(e))

    def test_filterSectionKeysChecked(self):
        """
        A C{[filter:NAME]} section's keys are validated by its plugin, and unknown ones are errors.
        """
        text = """
[listener:edge]
endpoint = tcp:0
filters = proxy
cluster = c
[filter:proxy]
type = tcp_proxy
idle_timout = 5s
max_connect_attempts = zero
[cluster:c]
endpoints = tcp:127.0.0.1:1
"""
        e = self.assertRaises(ConfigErrors, MeshService, loadString(text, "x.ini"), MemoryReactorClock())
        messages = [str(err) for err in e.errors]
        self.assertIn("x.ini: [filter:proxy] idle_timout: unknown key (did you mean `idle_timeout`?)", messages)
        self.assertIn("x.ini: [filter:proxy] max_connect_attempts: 'zero' is not a whole number", messages)


def deferLater(seconds: float) -> defer.Deferred:
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)


class TapTests(unittest.TestCase):
    """
    The twistd plugin's options.
    """

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_validateOK(self):
        """
        C{--validate} on a good file prints OK and exits 0.
        """
        options = Options()
        out = self.patchStdout()
        e = self.assertRaises(SystemExit, options.parseOptions, ["--config", os.path.join(ROOT, "etc", "mesh.ini"), "--validate"])
        self.assertEqual((e.code, out.getvalue()), (0, "OK\n"))

    def test_validateErrors(self):
        """
        C{--validate} on a bad file prints every error and exits 1.
        """
        path = self.write("[mesh]\ndrain_timout = 1s\n[listener:a]\nendpoint = tcp:0\ncluster = nope\n")
        import io

        err = io.StringIO()
        self.patch(sys, "stderr", err)
        e = self.assertRaises(SystemExit, Options().parseOptions, ["--config", path, "--validate"])
        self.assertEqual(e.code, 1)
        self.assertIn("[mesh] drain_timout: unknown key (did you mean `drain_timeout`?)", err.getvalue())
        self.assertIn("[listener:a] cluster: names no [cluster:nope] section", err.getvalue())
        self.assertIn("2 error(s)", err.getvalue())

    def test_badConfigIsUsageError(self):
        """
        Without C{--validate}, a bad file is a usage error before any service exists.
        """
        from twisted.python.usage import UsageError

        path = self.write("[mesh]\nadmin = nonsense:1\n")
        e = self.assertRaises(UsageError, Options().parseOptions, ["--config", path])
        self.assertIn("[mesh] admin:", str(e))

    def test_freezeStartupObjects(self):
        """
        What exists when the proxy has started is moved out of the collector's reach (full collections under
        load then walk only what traffic allocated).
        """
        import gc

        self.addCleanup(gc.unfreeze)
        gc.unfreeze()
        startup = [object(), {"config": [1, 2]}]
        self.assertEqual(gc.get_freeze_count(), 0)
        freezeStartupObjects()
        self.assertGreaterEqual(gc.get_freeze_count(), len(startup))
        self.assertFalse(any(o is startup for o in gc.get_objects()))  # frozen: in no generation

    def patchStdout(self):
        import io

        out = io.StringIO()
        self.patch(sys, "stdout", out)
        return out


class TwistdTests(unittest.TestCase):
    """
    The real command line, as a newcomer runs it.
    """

    def setUp(self):
        self.twistd = requireTwistd()

    def test_pluginListed(self):
        """
        C{twistd --help} lists the twistedmesh plugin (the install put twisted/plugins on the path).
        """
        out = subprocess.run([self.twistd, "--help"], capture_output=True, text=True, cwd=tempfile.gettempdir(), timeout=60)
        self.assertIn("twistedmesh", out.stdout)

    @defer.inlineCallbacks
    def test_twistdServesAndDrainsOnSIGTERM(self):
        """
        C{twistd -n twistedmesh --config FILE} serves traffic through the proxy and exits 0 on SIGTERM.
        """
        ports = [freePort() for _ in range(3)]
        twistd, _ = startTwistd(self, f"""
[mesh]
admin = tcp:{ports[0]}:interface=127.0.0.1
drain_timeout = 2s
[listener:edge]
endpoint = tcp:{ports[1]}:interface=127.0.0.1
cluster = web
[cluster:web]
endpoints = tcp:127.0.0.1:{ports[2]}
[echo:web]
endpoint = tcp:{ports[2]}:interface=127.0.0.1
""")
        response = None
        for attempt in range(100):  # up to ~20 s for the process to start listening
            if twistd.ended.called:
                break
            try:
                response = yield treq.get(f"http://127.0.0.1:{ports[1]}/through", timeout=5, persistent=False)
                break
            except Exception:
                yield deferLater(0.2)
        self.assertIsNotNone(response, twistd.output())
        self.assertEqual(response.code, 200)
        self.assertIn("GET /through HTTP/1.1", (yield response.text()))
        stats = yield (yield treq.get(f"http://127.0.0.1:{ports[0]}/stats?format=json", persistent=False)).json()
        self.assertIn({"name": "listener.edge.downstream_cx_total", "value": 1}, stats["stats"])
        twistd.transport.signalProcess("TERM")
        code = yield twistd.ended
        self.assertEqual(code, 0, twistd.output())
        self.assertIn("listener edge listening on", twistd.output())
        self.assertIn("twistedmesh is live", twistd.output())

    @defer.inlineCallbacks
    def test_addressInUseExitsOne(self):
        """
        A listener whose address is taken: the process says why and exits 1, rather than running on with
        nothing listening.
        """
        from twisted.internet.protocol import Factory
        taken = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        twistd, _ = startTwistd(self, f"""
[listener:edge]
endpoint = tcp:{taken.getHost().port}:interface=127.0.0.1
cluster = web
[cluster:web]
endpoints = tcp:127.0.0.1:1
""")
        timeout = reactor.callLater(30, twistd.kill)
        code = yield twistd.ended
        if timeout.active():
            timeout.cancel()
        self.assertEqual(code, 1, twistd.output())
        self.assertIn("twistedmesh cannot start", twistd.output())
        self.assertIn("Address already in use", twistd.output())


