"""
Tests for L{twistedmesh.workers}: the config keys, stats across processes, the AMP control protocol over
an in-memory pair, the supervisor's back-off and fan-out with a L{Clock} and a fake process spawner, and
(integration) C{twistd -n twistedmesh} with C{workers = 2} as real processes on loopback.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from typing import Dict, List, Optional

from twisted.internet import defer, reactor
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial import unittest
from twisted.web.test.requesthelper import DummyRequest

from twistedmesh.admin.resource import AdminResource
from twistedmesh.config import ConfigErrors, loadFile, loadString
from twistedmesh.observability.stats import StatsStore
from twistedmesh.reload import ReloadResult
from twistedmesh.workers import BackOff, Supervisor
from twistedmesh.workers.supervisor import RELOAD_TIMEOUT
from twistedmesh.workers.child import listenerEndpoints, reloadFromText, workerConfig
from twistedmesh.workers.protocol import Drain, JSONValue, Reload, Stats, SupervisorControl, WorkerControl
from twistedmesh.workers.sockets import (InheritedEndpoint, ReusePortEndpoint, SocketAddress, makeSocket,
                                         parseAddress)
from twistedmesh.workers.stats import merge, snapshot, withoutGauges

from .support import freePort, requireTwistd, startTwistd


CONFIG = """
[mesh]
admin = off
workers = {workers}
drain_timeout = 2s
[listener:edge]
endpoint = tcp:0:interface=127.0.0.1
cluster = web
[cluster:web]
endpoints = tcp:127.0.0.1:1
"""


def config(workers: int = 2, extra: str = ""):
    return loadString(CONFIG.format(workers=workers) + extra, "mesh.ini")


def supervise(text: str, *args, **kwargs) -> Supervisor:
    """
    A L{Supervisor} of configuration C{text} (file C{mesh.ini}, which is not read).
    """
    return Supervisor(loadString(text, "mesh.ini"), *args, text=text, **kwargs)


class ConfigTests(unittest.TestCase):
    """
    C{[mesh] workers} and C{workers.sharing}.
    """

    def test_defaults(self):
        """One worker, sharing by SO_REUSEPORT, unless the file says otherwise."""
        mesh = loadString("[mesh]\n").mesh
        self.assertEqual((mesh.workers, mesh.workers_sharing), (1, "reuseport"))

    def test_countAndSharing(self):
        """A number of workers and either sharing are taken."""
        mesh = loadString("[mesh]\nworkers = 3\nworkers.sharing = inherit\n").mesh
        self.assertEqual((mesh.workers, mesh.workers_sharing), (3, "inherit"))

    def test_auto(self):
        """C{auto} is one worker per core the process may run on."""
        self.assertEqual(loadString("[mesh]\nworkers = auto\n").mesh.workers, len(os.sched_getaffinity(0)))

    def test_badValues(self):
        """A bad count or sharing names the file, section and key."""
        e = self.assertRaises(ConfigErrors, loadString, "[mesh]\nworkers = 0\nworkers.sharing = fork\n", "m.ini")
        text = str(e)
        self.assertIn("m.ini: [mesh] workers:", text)
        self.assertIn("m.ini: [mesh] workers.sharing: 'fork' is not one of reuseport, inherit", text)

    def test_onlyTCPListenersWithWorkers(self):
        """With several workers a listener must be TCP (a UNIX socket cannot be shared by port)."""
        text = "[mesh]\nworkers = 2\n[listener:a]\nendpoint = unix:/tmp/x.sock\ncluster = c\n" \
               "[cluster:c]\nendpoints = tcp:127.0.0.1:1\n"
        e = self.assertRaises(ConfigErrors, loadString, text, "m.ini")
        self.assertIn("[listener:a] endpoint: must be a tcp: or tcp6: endpoint when [mesh] workers > 1", str(e))
        loadString(text.replace("workers = 2", "workers = 1"))  # one process: anything goes

    def test_workerConfig(self):
        """A worker runs neither the admin endpoint nor the demo upstreams: the parent does."""
        c = loadString(CONFIG.format(workers=2).replace("admin = off", "admin = tcp:0") +
                       "[echo:e]\nendpoint = tcp:0\n")
        w = workerConfig(c)
        self.assertIsNone(w.mesh.admin)
        self.assertEqual(dict(w.echoes), {})
        self.assertEqual(w.listeners, c.listeners)


class SocketTests(unittest.TestCase):
    """
    Addresses from endpoint strings, and the shared sockets.
    """

    def test_parseAddress(self):
        """Port, interface and backlog come from Twisted's own parsing of the string."""
        self.assertEqual(parseAddress("tcp:8080:interface=127.0.0.1:backlog=7"),
                         SocketAddress(socket.AF_INET, "127.0.0.1", 8080, 7))
        self.assertEqual(parseAddress("tcp:80").host, "0.0.0.0")
        self.assertEqual(parseAddress("tcp6:80:interface=\\:\\:1").family, socket.AF_INET6)
        self.assertRaises(ValueError, parseAddress, "unix:/tmp/x")

    def test_reusePortGroup(self):
        """
        A bound C{SO_REUSEPORT} socket holds the port (port 0 resolved); workers' sockets join it on the
        same port, and a socket without the option cannot.
        """
        holder = makeSocket(SocketAddress(socket.AF_INET, "127.0.0.1", 0, 5), reusePort=True, listen=False)
        self.addCleanup(holder.close)
        port = holder.getsockname()[1]
        address = SocketAddress(socket.AF_INET, "127.0.0.1", port, 5)
        first = makeSocket(address, reusePort=True, listen=True)
        self.addCleanup(first.close)
        second = makeSocket(address, reusePort=True, listen=True)
        self.addCleanup(second.close)
        from twisted.internet.error import CannotListenError

        self.assertRaises(CannotListenError, makeSocket, address, False, True)

    @defer.inlineCallbacks
    def test_inheritedEndpointListensAgain(self):
        """
        An endpoint on an inherited descriptor adopts a duplicate each time, so closing one port leaves
        the descriptor open for the next listen (a reload).
        """
        from twisted.internet.protocol import Factory, Protocol

        sock = makeSocket(SocketAddress(socket.AF_INET, "127.0.0.1", 0, 5), reusePort=False, listen=True)
        self.addCleanup(sock.close)
        endpoint = InheritedEndpoint(reactor, sock.fileno(), socket.AF_INET)
        port = yield endpoint.listen(Factory.forProtocol(Protocol))
        self.assertEqual(port.getHost().port, sock.getsockname()[1])
        yield port.stopListening()
        port = yield endpoint.listen(Factory.forProtocol(Protocol))
        yield port.stopListening()
        os.fstat(sock.fileno())  # still open

    @defer.inlineCallbacks
    def test_reusePortEndpoint(self):
        """A C{reuseport} endpoint listens on the address the parent reserved."""
        from twisted.internet.protocol import Factory, Protocol

        holder = makeSocket(SocketAddress(socket.AF_INET, "127.0.0.1", 0, 5), reusePort=True, listen=False)
        self.addCleanup(holder.close)
        address = SocketAddress(socket.AF_INET, "127.0.0.1", holder.getsockname()[1], 5)
        port = yield ReusePortEndpoint(reactor, address).listen(Factory.forProtocol(Protocol))
        self.assertEqual(port.getHost().port, address.port)
        yield port.stopListening()

    def test_listenerEndpoints(self):
        """
        A worker listens on what the parent made for a listener; a listener the parent made nothing for
        (added by a reload) gets a socket of its own with reuseport, and cannot listen with inherit.
        """
        spec = {"sharing": "inherit", "listeners": {
            "a": {"endpoint": "tcp:0", "address": [socket.AF_INET, "0.0.0.0", 4000, 50], "fd": 7}}}
        endpointFor = listenerEndpoints(reactor, spec)
        self.assertIsInstance(endpointFor("a", "tcp:0"), InheritedEndpoint)
        self.assertEqual(endpointFor("a", "tcp:0").fd, 7)
        failure = self.failureResultOf(endpointFor("b", "tcp:9").listen(None))
        self.assertIn("takes a restart", failure.getErrorMessage())
        spec["sharing"] = "reuseport"
        spec["listeners"]["a"]["fd"] = None
        self.assertEqual(endpointFor("a", "tcp:0").address.port, 4000)
        self.assertEqual(endpointFor("b", "tcp:9").address.port, 9)


def filledStore(requests: int, active: int, times=()) -> StatsStore:
    store = StatsStore()
    scope = store.scope("listener", "edge")
    scope.counter("downstream_cx_total").value = requests
    scope.gauge("downstream_cx_active").value = active
    histogram = store.scope("cluster", "web").histogram("upstream_rq_time")
    for t in times:
        histogram.record(t)
    return store


class StatsTests(unittest.TestCase):
    """
    Snapshots of a worker's stats, and their sum.
    """

    def test_snapshotIsJSON(self):
        """A snapshot survives JSON, names, Prometheus tags and labels included."""
        data = json.loads(json.dumps(snapshot(filledStore(3, 1, [2.0]))))
        merged = merge([data])
        counter = merged.get("listener.edge.downstream_cx_total")
        self.assertEqual((counter.kind, counter.value), ("counter", 3))
        self.assertEqual(counter.labels, (("envoy_listener_address", "edge"),))
        self.assertEqual(counter.tagName, "listener_downstream_cx_total")

    def test_sum(self):
        """Counters and gauges are summed; histograms merge bucket by bucket."""
        merged = merge([snapshot(filledStore(3, 1, [0.3, 7.0])), snapshot(filledStore(4, 2, [7.0, 70000.0]))])
        self.assertEqual(merged.get("listener.edge.downstream_cx_total").value, 7)
        self.assertEqual(merged.get("listener.edge.downstream_cx_active").value, 3)
        h = merged.get("cluster.web.upstream_rq_time")
        self.assertEqual((h.count, h.sum), (4, 0.3 + 7.0 + 7.0 + 70000.0))
        alone = StatsStore().histogram("x")
        for t in (0.3, 7.0, 7.0, 70000.0):
            alone.record(t)
        self.assertEqual(h.buckets, alone.buckets)

    def test_kindClashIgnored(self):
        """A stat that is a counter in one snapshot and a gauge in another keeps the first kind."""
        a = [["c", "x", "x", [], 1]]
        b = [["g", "x", "x", [], 5]]
        self.assertEqual(merge([a, b]).get("x").value, 1)

    def test_withoutGauges(self):
        """What a dead worker leaves behind: its counts, not its active figures."""
        kinds = {entry[0] for entry in withoutGauges(snapshot(filledStore(1, 1, [1.0])))}
        self.assertEqual(kinds, {"c", "h"})

    def test_replace(self):
        """A merged store can be refilled in place (the admin's exporter keeps a reference to it)."""
        merged = merge([snapshot(filledStore(1, 1))])
        merged.replace([snapshot(filledStore(5, 0))])
        self.assertEqual(merged.get("listener.edge.downstream_cx_total").value, 5)


class FakeMesh:
    """
    What L{WorkerControl} needs of a L{MeshService}.
    """

    def __init__(self, requests: int = 0) -> None:
        self.stats = filledStore(requests, 1)
        self.drains: List[bool] = []
        self.healthCheckFailed = False
        self.clusters: Dict = {}
        self.reloads: List[tuple] = []  # (text, file) of each Reload
        self.reloadWith = None

    def drain(self, graceful: bool = True):
        self.drains.append(graceful)
        return defer.succeed(None)


def controlPair(mesh: FakeMesh, slot=None):
    """
    A worker's L{WorkerControl} and the parent's end connected in memory; the pump moves the bytes.
    """
    exits: List[bool] = []
    lost: List[bool] = []

    def reloadConfig(text, file):
        mesh.reloads.append((text, file))
        if callable(mesh.reloadWith):  # a function answering each reload in its own way
            return mesh.reloadWith(text, file)
        return mesh.reloadWith

    worker = WorkerControl(mesh, exit=lambda: exits.append(True), reloadConfig=reloadConfig,
                           lost=lambda: lost.append(True))
    parent = SupervisorControl(slot) if slot is not None else amp.AMP()
    client, server, pump = iosim.connectedServerAndClient(lambda: worker, lambda: parent)
    return parent, worker, pump, exits, lost


class ProtocolTests(unittest.TestCase):
    """
    The control commands over a real AMP connection in memory.
    """

    def test_stats(self):
        """C{Stats} answers with the worker's snapshot."""
        parent, worker, pump, _, _ = controlPair(FakeMesh(requests=9))
        d = parent.callRemote(Stats)
        pump.flush()
        data = self.successResultOf(d)["stats"]
        self.assertEqual(merge([data]).get("listener.edge.downstream_cx_total").value, 9)

    def test_bigValues(self):
        """A value over AMP's 64 KiB limit is split over several keys and joined again."""
        mesh = FakeMesh()
        for i in range(3000):
            mesh.stats.scope("cluster", f"c{i}").counter("upstream_rq_total").value = i
        parent, worker, pump, _, _ = controlPair(mesh)
        d = parent.callRemote(Stats)
        pump.flush()
        data = self.successResultOf(d)["stats"]
        self.assertGreater(len(json.dumps(data)), 3 * amp.MAX_VALUE_LENGTH)
        self.assertEqual(merge([data]).get("cluster.c2999.upstream_rq_total").value, 2999)

    def test_jsonValueChunks(self):
        """The chunks are NAME, NAME.1, NAME.2...: each within AMP's limit."""
        box: Dict[bytes, bytes] = {}
        JSONValue().toBox(b"v", box, {"v": "x" * (amp.MAX_VALUE_LENGTH * 2)}, None)
        self.assertEqual(sorted(box), [b"v", b"v.1", b"v.2"])
        self.assertTrue(all(len(v) <= amp.MAX_VALUE_LENGTH for v in box.values()))
        out: Dict[str, object] = {}
        JSONValue().fromBox(b"v", dict(box), out, None)
        self.assertEqual(out["v"], "x" * (amp.MAX_VALUE_LENGTH * 2))

    def test_reload(self):
        """C{Reload} runs the worker's reload with the text and file name and answers with its outcome."""
        mesh = FakeMesh()
        mesh.reloadWith = defer.succeed(ReloadResult(False, True, ("listener a cannot listen: in use",), 0.0, "m.ini"))
        parent, worker, pump, _, _ = controlPair(mesh)
        d = parent.callRemote(Reload, text="[mesh]\n", file="m.ini")
        pump.flush()
        self.assertEqual(self.successResultOf(d),
                         {"ok": False, "applied": True, "errors": ["listener a cannot listen: in use"]})
        self.assertEqual(mesh.reloads, [("[mesh]\n", "m.ini")])

    def test_reloadBigText(self):
        """A configuration text over AMP's 64 KiB limit for one value arrives whole."""
        mesh = FakeMesh()
        mesh.reloadWith = ReloadResult(True, True, (), 0.0, "m.ini")
        parent, worker, pump, _, _ = controlPair(mesh)
        text = "[mesh]\n" + "".join(f"; comment line {i}\n" for i in range(20000))
        self.assertGreater(len(text), 3 * amp.MAX_VALUE_LENGTH)
        d = parent.callRemote(Reload, text=text, file="m.ini")
        pump.flush()
        self.assertTrue(self.successResultOf(d)["applied"])
        self.assertEqual(mesh.reloads, [(text, "m.ini")])

    def test_reloadCrash(self):
        """A reload that raises is an answer too, not a lost command."""
        mesh = FakeMesh()
        mesh.reloadWith = defer.fail(RuntimeError("boom"))
        parent, worker, pump, _, _ = controlPair(mesh)
        d = parent.callRemote(Reload, text="", file="m.ini")
        pump.flush()
        self.assertEqual(self.successResultOf(d), {"ok": False, "applied": False, "errors": ["reload failed: boom"]})
        self.assertEqual(mesh.reloads, [("", "m.ini")])

    def test_drain(self):
        """C{Drain} either drains the service in place or drains and exits."""
        mesh = FakeMesh()
        parent, worker, pump, exits, _ = controlPair(mesh)
        parent.callRemote(Drain, graceful=False, exit=False)
        pump.flush()
        self.assertEqual((mesh.drains, exits), ([False], []))
        parent.callRemote(Drain, graceful=True, exit=True)
        pump.flush()
        self.assertEqual((mesh.drains, exits), ([False], [True]))

    def test_parentGone(self):
        """A worker whose parent is gone drains and exits."""
        parent, worker, pump, _, lost = controlPair(FakeMesh())
        parent.transport.loseConnection()
        pump.flush()
        self.assertEqual(lost, [True])


class FakeProcess:
    """
    The transport of a spawned process, as far as a slot uses it.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: List[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class Spawner:
    """
    A fake process spawner: each spawn connects the slot to a L{FakeProcess}, and (with C{meshes}) its
    control connection to an in-memory worker.
    """

    def __init__(self, connect: bool = False) -> None:
        self.connect = connect
        self.spawned: List = []
        self.meshes: Dict[int, FakeMesh] = {}
        self.pumps: List = []
        self.exits: Dict[int, List[bool]] = {}
        self.specs: List[Dict] = []
        self.fail = False

    def __call__(self, slot) -> None:
        if self.fail:
            raise OSError("no more processes")
        process = FakeProcess(1000 + len(self.spawned))
        self.spawned.append((slot.index, process))
        self.specs.append(slot.supervisor.spec(slot, {}))  # what the real spawner writes to its stdin
        slot.makeConnection(process)
        if self.connect:
            mesh = self.meshes[slot.index] = FakeMesh(requests=10 * (slot.index + 1))
            parent, worker, pump, exits, _ = controlPair(mesh, slot)
            self.pumps.append(pump)
            self.exits[slot.index] = exits

    def flush(self) -> None:
        for pump in self.pumps:
            pump.flush()


def died(slot, sig: Optional[int] = signal.SIGKILL) -> None:
    if sig is None:
        slot.processEnded(Failure(ProcessDone(0)))
    else:
        slot.processEnded(Failure(ProcessTerminated(signal=sig)))


class SupervisionTests(unittest.TestCase):
    """
    Restarts with back-off, on an injected clock.
    """

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.spawner = Spawner()
        self.supervisor = supervise(CONFIG.format(workers=2), self.clock, self.spawner, BackOff(0.1, 1.0, 10.0))
        self.slot = self.supervisor.slots[0]
        for slot in self.supervisor.slots:
            slot.start()

    def test_restartBackOff(self):
        """A worker that keeps dying is started again after 0.1 s, then 0.2, 0.4... up to the cap."""
        for delay in [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]:
            died(self.slot)
            self.assertFalse(self.slot.running)
            before = len(self.spawner.spawned)
            self.clock.advance(delay - 0.01)
            self.assertEqual(len(self.spawner.spawned), before)
            self.clock.advance(0.02)
            self.assertEqual(len(self.spawner.spawned), before + 1)
            self.assertTrue(self.slot.running)
        self.assertEqual(self.supervisor.restarts.value, 6)
        self.assertEqual([i for i, _ in self.spawner.spawned].count(1), 1)  # the other worker untouched

    def test_resetAfterStayingUp(self):
        """A worker that stayed up C{stableAfter} seconds is restarted after the initial delay again."""
        died(self.slot)
        self.clock.advance(0.1)
        died(self.slot)
        self.clock.advance(0.2)
        self.assertEqual(self.slot.delay, 0.4)
        self.clock.advance(9.9)
        self.assertEqual(self.slot.delay, 0.4)
        self.clock.advance(0.1)
        self.assertEqual(self.slot.delay, 0.1)
        died(self.slot)
        spawned = len(self.spawner.spawned)
        self.clock.advance(0.1)
        self.assertEqual(len(self.spawner.spawned), spawned + 1)

    def test_cleanExitRestartedToo(self):
        """A worker that exits by itself (status 0) while the supervisor runs is replaced as well."""
        died(self.slot, None)
        self.clock.advance(0.1)
        self.assertTrue(self.slot.running)

    def test_reopenLogs(self):
        """SIGUSR1 in the parent (reopen the access logs) is passed on to every running worker."""
        died(self.supervisor.slots[1])
        self.supervisor.accessLogSinks.reopen()
        self.assertEqual([p.signals for _, p in self.spawner.spawned], [["USR1"], []])

    def test_addressInUse(self):
        """A listener's address in use stops the process before any worker starts."""
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        text = CONFIG.format(workers=2).replace("tcp:0:", f"tcp:{taken.getsockname()[1]}:")
        clock = MemoryReactorClock()
        spawner = Spawner()
        supervise(text, clock, spawner).startService()
        self.assertEqual(spawner.spawned, [])
        self.assertEqual([f for f, _, _ in clock.whenRunningHooks], [clock.stop])

    def test_outputRelayed(self):
        """
        A worker's log events (JSON lines on its stdout) join the parent's log marked with the worker,
        even split over reads; other output (stderr) is logged as text.
        """
        from twisted.logger import Logger, eventAsJSON, formatEvent

        events: List[dict] = []
        self.slot.log = Logger(observer=events.append)
        line = ("\x1e" + eventAsJSON({"log_format": "listener {name} listening", "name": "edge",
                                      "log_level": None, "log_namespace": "twistedmesh.service"}) + "\n").encode()
        self.slot.childDataReceived(1, line[:10])
        self.assertEqual(events, [])
        self.slot.childDataReceived(1, line[10:])
        self.slot.childDataReceived(2, b"Traceback (most recent call last):\n  File")
        self.assertEqual([(e["log_system"], formatEvent(e)) for e in events[:1]],
                         [("worker-0", "listener edge listening")])
        self.assertEqual(formatEvent(events[1]), "worker 0: Traceback (most recent call last):")
        died(self.slot)  # what is left of the output is logged when the process ends
        self.assertIn("worker 0:   File", [formatEvent(e) for e in events[2:]])

    def test_spawnFailure(self):
        """A process that cannot be started is tried again with the same back-off."""
        died(self.slot)
        self.spawner.fail = True
        self.clock.advance(0.1)
        self.assertFalse(self.slot.running)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.spawner.fail = False
        self.clock.advance(0.2)
        self.assertTrue(self.slot.running)

    def test_noRestartWhileStopping(self):
        """
        Stopping tells every worker to drain, starts none again, and fires once all have exited; one
        still running C{drain_timeout} plus a grace second later is killed.
        """
        self.supervisor.running = 1
        d = self.supervisor.stopService()
        processes = [p for _, p in self.spawner.spawned]
        self.assertEqual([p.signals for p in processes], [["TERM"], ["TERM"]])  # no control link: SIGTERM
        died(self.supervisor.slots[0], signal.SIGTERM)
        self.clock.advance(2.9)
        self.assertNoResult(d)
        self.assertEqual(processes[1].signals, ["TERM"])
        self.clock.advance(0.1)
        self.assertEqual(processes[1].signals, ["TERM", "KILL"])
        died(self.supervisor.slots[1])
        self.successResultOf(d)
        self.clock.advance(100)
        self.assertEqual(len(self.spawner.spawned), 2)
        self.assertEqual(self.supervisor.state, "DRAINING")


class FanOutTests(unittest.TestCase):
    """
    Stats, reload and drain across workers connected in memory.
    """

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.spawner = Spawner(connect=True)
        self.supervisor = supervise(CONFIG.format(workers=2), self.clock, self.spawner)
        for slot in self.supervisor.slots:
            slot.start()
        self.spawner.flush()

    def collect(self, worker=None):
        d = self.supervisor.collectStats(worker)
        self.spawner.flush()
        return self.successResultOf(d)

    def test_summed(self):
        """The parent's stats are the workers' summed, with its own C{workers.*}."""
        stats = self.collect()
        self.assertEqual(stats.get("listener.edge.downstream_cx_total").value, 10 + 20)
        self.assertEqual(stats.get("listener.edge.downstream_cx_active").value, 2)
        self.assertEqual(stats.get("workers.configured").value, 2)
        self.assertIs(stats, self.supervisor.stats)  # refreshed in place

    def test_perWorker(self):
        """C{worker=N}: that worker's stats alone; another value is refused."""
        self.assertEqual(self.collect("1").get("listener.edge.downstream_cx_total").value, 20)
        self.assertRaises(ValueError, self.supervisor.collectStats, "2")
        self.assertRaises(ValueError, self.supervisor.collectStats, "x")

    def test_deadWorkerCountsKept(self):
        """
        When a worker dies, what it counted (as of its last report) stays in the sum; its gauges go.
        """
        self.collect()
        died(self.supervisor.slots[0])
        self.spawner.flush()
        stats = self.collect()
        self.assertEqual(stats.get("listener.edge.downstream_cx_total").value, 30)
        self.assertEqual(stats.get("listener.edge.downstream_cx_active").value, 1)
        self.assertEqual(stats.get("workers.restarts").value, 1)
        self.clock.advance(0.1)  # the replacement starts from zero, and adds to the sum
        self.spawner.flush()
        self.assertEqual(self.collect().get("listener.edge.downstream_cx_total").value, 40)

    def test_liveAndReady(self):
        """The parent is LIVE once a worker said it is serving; C{workers.live} counts them."""
        self.assertEqual(self.supervisor.state, "STARTING")
        slot = self.supervisor.slots[0]
        slot.workerReady(slot.control, 1000)
        self.assertEqual(self.supervisor.state, "LIVE")
        self.assertEqual(self.supervisor.liveGauge.value, 1)
        died(slot)
        self.assertEqual(self.supervisor.liveGauge.value, 0)

    def test_adminStats(self):
        """The admin C{/stats} shows the sum, C{?worker=N} one worker, a bad N a 400."""
        resource = AdminResource(self.supervisor, self.clock)

        def get(**args):
            request = DummyRequest([b"stats"])
            for name, value in args.items():
                request.addArg(name.encode(), value.encode())
            body = resource.render(request)
            self.spawner.flush()
            return request, body

        request, _ = get()
        self.assertIn(b"listener.edge.downstream_cx_total: 30\n", b"".join(request.written))
        self.assertTrue(request.finished)
        request, _ = get(worker="0", format="json")
        stats = json.loads(b"".join(request.written))["stats"]
        self.assertIn({"name": "listener.edge.downstream_cx_total", "value": 10}, stats)
        request, body = get(worker="7")
        self.assertEqual(request.responseCode, 400)
        self.assertIn(b"worker must be a number from 0 to 1", body)

    def test_clusters(self):
        """
        The admin C{/clusters} shows each host as the workers see it together: figures summed, unhealthy
        if a worker finds it so, each worker's reason when they differ.
        """
        from twistedmesh.upstream.cluster import Host

        for index, mesh in self.spawner.meshes.items():
            host = Host("tcp:127.0.0.1:1", None, 1)
            host.rq_total = 5 * (index + 1)
            if index == 1:
                host.setHealthFlag("failed_active_hc", True, "503 from /healthz")
            mesh.clusters = {"web": type("C", (), {"hosts": [host]})()}
            mesh.stats.scope("cluster", "web").counter("upstream_rq_total").value = 7
        resource = AdminResource(self.supervisor, self.clock)
        request = DummyRequest([b"clusters"])
        request.addArg(b"format", b"json")
        resource.render(request)
        self.spawner.flush()
        status = json.loads(b"".join(request.written))["cluster_statuses"]
        self.assertEqual([c["name"] for c in status], ["web"])
        host = status[0]["host_statuses"][0]
        self.assertEqual((host["address"], host["stats"]["rq_total"], host["health"]),
                         ("tcp:127.0.0.1:1", 15, "/failed_active_hc"))
        self.assertEqual(host["health_reason"], "worker 0: no health checking configured; worker 1: 503 from /healthz")
        self.assertEqual(self.supervisor.clusters["web"].upstream_rq_total.value, 14)
        self.assertEqual(self.supervisor.clusters["web"].upstream_cx_active.value, 0)  # no such stat yet
        page = DummyRequest([b""])
        body = resource.render(page)  # the dashboard reads the same views
        self.assertEqual(page.responseCode, 200)
        self.assertIn(b"tcp:127.0.0.1:1", body)
        self.assertIn(b"503 from /healthz", body)

    def test_reloadFansOut(self):
        """
        A reload sends every worker the text the parent read; it is applied when all applied it; errors
        name the worker.
        """
        path = self.mktemp()
        edited = CONFIG.format(workers=2) + "; edited\n"
        with open(path, "w") as f:
            f.write(edited)
        for mesh in self.spawner.meshes.values():
            mesh.reloadWith = ReloadResult(True, True, (), 0.0, path)
        d = self.supervisor.reload(path)
        self.spawner.flush()
        result = self.successResultOf(d)
        self.assertEqual((result.ok, result.applied, result.errors), (True, True, ()))
        self.assertEqual([m.reloads for m in self.spawner.meshes.values()], [[(edited, path)], [(edited, path)]])
        self.assertEqual(self.supervisor.configText, edited)
        self.spawner.meshes[1].reloadWith = ReloadResult(False, False, ("[cluster:x] bad",), 0.0, path)
        d = self.supervisor.reload(path)
        self.spawner.flush()
        result = self.successResultOf(d)
        self.assertEqual((result.ok, result.applied, result.errors), (False, False, ("worker 1: [cluster:x] bad",)))
        self.assertIs(self.supervisor.lastReload, result)

    def test_partialReloadRolledBack(self):
        """
        When one worker refuses a reload the others applied, those are sent the text in effect again, so
        that every worker runs what the parent shows.
        """
        path = self.mktemp()
        first = CONFIG.format(workers=2)
        second = first + "[cluster:more]\nendpoints = tcp:127.0.0.1:2\n"
        with open(path, "w") as f:
            f.write(second)
        self.spawner.meshes[0].reloadWith = ReloadResult(True, True, (), 0.0, path)
        self.spawner.meshes[1].reloadWith = ReloadResult(False, False, ("no",), 0.0, path)
        result = self.supervisor.reload(path)
        self.spawner.flush()
        self.spawner.flush()  # the second round: the text in effect sent back
        self.assertFalse(self.successResultOf(result).applied)
        self.assertEqual(self.spawner.meshes[0].reloads, [(second, path), (first, "mesh.ini")])
        self.assertEqual(self.spawner.meshes[1].reloads, [(second, path)])
        self.assertEqual([slot.configText for slot in self.supervisor.slots], [first, first])
        self.assertEqual(self.supervisor.configText, first)
        self.assertNotIn("more", self.supervisor.config.clusters)

    def test_workerStartedDuringReload(self):
        """
        A worker started while a reload is under way (it was started with the text then in effect, and
        not asked) is sent the new text once the reload is applied.
        """
        path = self.mktemp()
        edited = CONFIG.format(workers=2) + "; edited\n"
        with open(path, "w") as f:
            f.write(edited)
        for mesh in self.spawner.meshes.values():
            mesh.reloadWith = defer.Deferred()  # the reload is under way until fired
        died(self.supervisor.slots[1])
        d = self.supervisor.reload(path)
        self.spawner.flush()
        self.clock.advance(0.1)  # worker 1 again, with the text in effect
        self.spawner.flush()
        self.assertEqual(self.spawner.specs[-1]["text"], CONFIG.format(workers=2))
        mesh1 = self.spawner.meshes[1]
        mesh1.reloadWith = ReloadResult(True, True, (), 0.0, path)
        self.spawner.meshes[0].reloadWith.callback(ReloadResult(True, True, (), 0.0, path))
        self.spawner.flush()
        self.assertTrue(self.successResultOf(d).applied)
        self.assertEqual(mesh1.reloads, [(edited, path)])
        self.assertEqual([slot.configText for slot in self.supervisor.slots], [edited, edited])

    def answerInOrder(self, pending: List, refuse) -> None:
        """
        Answer the reloads in C{pending} (C{(worker, text, Deferred)}, appended as each worker is asked)
        oldest first, each as soon as the one before it has been answered, refusing those C{refuse(worker,
        text)} says, until none is left.
        """
        while pending:
            index, text, d = pending.pop(0)
            applied = not refuse(index, text)
            d.callback(ReloadResult(applied, applied, () if applied else ("no",), 0.0, ""))
            self.spawner.flush()

    def pendingReloads(self) -> List:
        """
        Make every worker's reload wait to be answered: the list of those asked, in order.
        """
        pending: List = []
        for index, mesh in self.spawner.meshes.items():
            def wait(text, file, index=index):
                d = defer.Deferred()
                pending.append((index, text, d))
                return d
            mesh.reloadWith = wait
        return pending

    def test_overlappingReloads(self):
        """
        A reload asked for while another is under way waits for it to end (its text sent back to the
        workers that applied it when another refused it) before it reads the file and asks the workers:
        at the end every worker runs what the parent shows. (Both used to run at once: the text in effect,
        sent back to worker 1 after the first reload, reached it after the second, so that it ran the
        old configuration while the parent showed the second's.)
        """
        path = self.mktemp()
        old = CONFIG.format(workers=2)
        first, second = old + "; first\n", old + "; second\n"
        pending = self.pendingReloads()
        with open(path, "w") as f:
            f.write(first)
        d1 = self.supervisor.reload(path)
        self.spawner.flush()
        with open(path, "w") as f:
            f.write(second)
        d2 = self.supervisor.reload(path)
        self.spawner.flush()
        self.assertEqual([text for _, text, _ in pending], [first, first])  # the second waits its turn
        self.answerInOrder(pending, lambda index, text: index == 0 and text == first)
        r1, r2 = self.successResultOf(d1), self.successResultOf(d2)
        self.assertEqual((r1.applied, r2.applied), (False, True))
        self.assertEqual(self.supervisor.configText, second)
        self.assertEqual([slot.configText for slot in self.supervisor.slots], [second, second])
        # What each worker last applied: worker 1 took the first, went back, then took the second.
        self.assertEqual([m.reloads for m in self.spawner.meshes.values()],
                         [[(first, path), (second, path)], [(first, path), (old, "mesh.ini"), (second, path)]])

    def test_reloadsQueued(self):
        """
        Reloads asked for while one is under way run one after the other, in the order asked, each reading
        the file when its turn comes; each gets its own result.
        """
        pending = self.pendingReloads()
        paths = [self.mktemp() for _ in range(3)]
        texts = [CONFIG.format(workers=2) + f"; {i}\n" for i in range(3)]
        for path, text in zip(paths, texts):
            with open(path, "w") as f:
                f.write(text)
        ds = [self.supervisor.reload(path) for path in paths]
        self.spawner.flush()
        with open(paths[2], "w") as f:
            f.write(texts[2] + "; edited while waiting\n")
        self.assertEqual([text for _, text, _ in pending], [texts[0]] * 2)
        self.answerInOrder(pending, lambda index, text: False)
        results = [self.successResultOf(d) for d in ds]
        self.assertEqual([(r.ok, r.file) for r in results], [(True, path) for path in paths])
        self.assertEqual([text for text, _ in self.spawner.meshes[0].reloads],
                         texts[:2] + [texts[2] + "; edited while waiting\n"])

    def test_reloadTimeout(self):
        """
        A worker that does not answer a reload within L{RELOAD_TIMEOUT} counts as refusing it, and what it
        runs as unknown: it is sent the text in effect again; a reload waiting its turn then runs.
        """
        path = self.mktemp()
        edited = CONFIG.format(workers=2) + "; edited\n"
        with open(path, "w") as f:
            f.write(edited)
        stuck: List[defer.Deferred] = []  # worker 0's reloads, none answered until the end
        self.spawner.meshes[0].reloadWith = lambda text, file: stuck.append(defer.Deferred()) or stuck[-1]
        self.spawner.meshes[1].reloadWith = ReloadResult(True, True, (), 0.0, path)
        first = self.supervisor.reload(path)
        second = self.supervisor.reload(path)
        self.spawner.flush()
        self.clock.advance(RELOAD_TIMEOUT)
        self.spawner.flush()
        self.assertNoResult(first)  # worker 0 is sent the text in effect again, and does not answer either
        self.assertIsNone(self.supervisor.slots[0].configText)
        self.clock.advance(RELOAD_TIMEOUT)
        self.spawner.flush()
        result = self.successResultOf(first)
        self.assertEqual((result.applied, result.errors), (False, ("worker 0: no answer to the reload in 60 seconds",)))
        # Worker 1 applied the text and was sent back; then the second reload's turn came.
        self.assertEqual([text for text, _ in self.spawner.meshes[1].reloads],
                         [edited, CONFIG.format(workers=2), edited])
        self.assertNoResult(second)
        self.assertEqual(len(stuck), 3)
        stuck[-1].callback(ReloadResult(True, True, (), 0.0, path))
        self.spawner.flush()
        self.assertTrue(self.successResultOf(second).applied)
        self.assertEqual([slot.configText for slot in self.supervisor.slots], [edited, edited])

    def test_staleAnswerIgnored(self):
        """
        Of two texts sent to a worker, the answer to the older one, arriving last, does not make it what
        the worker is noted to run: the worker applies them in the order sent.
        """
        pending = self.pendingReloads()
        slot = self.supervisor.slots[0]
        self.supervisor._sendText(slot, "older", "mesh.ini")
        self.supervisor._sendText(slot, "newer", "mesh.ini")
        self.spawner.flush()
        mine = [entry for entry in pending if entry[0] == 0]
        self.assertEqual([text for _, text, _ in mine], ["older", "newer"])
        mine[1][2].callback(ReloadResult(True, True, (), 0.0, ""))
        self.spawner.flush()
        mine[0][2].callback(ReloadResult(True, True, (), 0.0, ""))
        self.spawner.flush()
        self.assertEqual(slot.configText, "newer")

    def test_reloadChecksFirst(self):
        """A file with errors, or another worker count, reaches no worker."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[mesh]\nworkers = 2\nnope = 1\n")
        result = self.successResultOf(self.supervisor.reload(path))
        self.assertFalse(result.applied)
        self.assertIn("nope: unknown key", result.errors[0])
        with open(path, "w") as f:
            f.write(CONFIG.format(workers=3))
        result = self.successResultOf(self.supervisor.reload(path))
        self.assertIn("take a restart", result.errors[0])
        self.assertEqual([m.reloads for m in self.spawner.meshes.values()], [[], []])

    def test_reloadRemovesListener(self):
        """
        A listener a reload removed loses the parent's socket too (with inherit, connections would queue
        on it with nobody to accept them); with inherit, a reload that adds one is refused (only the
        parent makes inherited sockets, at start).
        """
        text = CONFIG.format(workers=2).replace("workers = 2", "workers = 2\nworkers.sharing = inherit")
        self.supervisor = supervise(text, self.clock, self.spawner)
        for slot in self.supervisor.slots:
            slot.start()
        self.spawner.flush()
        self.supervisor._makeSockets()
        sock = self.supervisor.sockets["edge"]
        for mesh in self.spawner.meshes.values():
            mesh.reloadWith = ReloadResult(True, True, (), 0.0, "")
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text.replace("[listener:edge]", "[listener:other]"))
        result = self.successResultOf(self.supervisor.reload(path))
        self.assertIn("with workers.sharing = inherit, adding a listener or changing its endpoint (other)",
                      result.errors[0])
        with open(path, "w") as f:
            f.write(text.split("[listener:edge]")[0] + "[cluster:web]\nendpoints = tcp:127.0.0.1:1\n")
        d = self.supervisor.reload(path)
        self.spawner.flush()
        self.assertTrue(self.successResultOf(d).ok)
        self.assertEqual((self.supervisor.sockets, self.supervisor.addresses), ({}, {}))
        self.assertEqual(sock.fileno(), -1)  # closed

    def test_healthCheckFlag(self):
        """
        Admin C{/healthcheck/fail} and C{/healthcheck/ok} on the parent reach every worker; a worker started
        later is told in its spec.
        """
        resource = AdminResource(self.supervisor, self.clock)
        request = DummyRequest([b"healthcheck", b"fail"])
        request.method = b"POST"
        resource.render(request)
        self.spawner.flush()
        self.assertEqual([m.healthCheckFailed for m in self.spawner.meshes.values()], [True, True])
        self.assertTrue(self.supervisor.spec(self.supervisor.slots[0], {})["healthCheckFailed"])
        self.supervisor.healthCheckFailed = False
        self.spawner.flush()
        self.assertEqual([m.healthCheckFailed for m in self.spawner.meshes.values()], [False, False])

    def test_adminHostChecked(self):
        """
        The parent's admin refuses a C{Host} that is no address, C{localhost} or name of C{[mesh]
        admin.allowed_hosts} in the configuration in effect (a DNS-rebinding page), reads included.
        """
        self.supervisor.config = loadString(CONFIG.format(workers=2).replace(
            "admin = off", "admin = off\nadmin.allowed_hosts = mesh-admin.internal"), "mesh.ini")
        resource = AdminResource(self.supervisor, self.clock)

        def get(host: str) -> int:
            request = DummyRequest([b"ready"])
            request.requestHeaders.setRawHeaders(b"host", [host.encode()])
            resource.render(request)
            return request.responseCode

        slot = self.supervisor.slots[0]
        slot.workerReady(slot.control, 1000)
        self.assertEqual([get(h) for h in ("evil.example:9975", "mesh-admin.internal:9975", "127.0.0.1:9975")],
                         [421, 200, 200])

    def test_drainListeners(self):
        """C{drain} (admin C{/drain_listeners}) drains every worker in place and starts none again."""
        self.supervisor.drain(graceful=True)
        self.spawner.flush()
        self.assertEqual([m.drains for m in self.spawner.meshes.values()], [[True], [True]])
        self.assertEqual(self.supervisor.state, "DRAINING")
        died(self.supervisor.slots[0])
        self.clock.advance(60)
        self.assertEqual(len(self.spawner.spawned), 2)

    def test_stopDrainsOverAMP(self):
        """Stopping sends C{Drain} with exit to every connected worker."""
        self.supervisor.running = 1
        self.supervisor.stopService()
        self.spawner.flush()
        self.assertEqual(self.spawner.exits, {0: [True], 1: [True]})


class AppliedTextTests(unittest.TestCase):
    """
    Workers run the configuration text the parent applied (in their spec, and in each reload), never the
    file as it is on disk when they start.
    """

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.spawner = Spawner(connect=True)
        self.path = self.mktemp()
        self.text = CONFIG.format(workers=2).replace("workers = 2", "workers = 2\nworkers.sharing = inherit")
        self.write(self.text)
        # As twistd does: the file checked, then the supervisor made with what was checked.
        self.supervisor = Supervisor(loadFile(self.path), self.clock, self.spawner, BackOff(0.1, 1.0, 10.0))
        for slot in self.supervisor.slots:
            slot.start()
        self.spawner.flush()
        for mesh in self.spawner.meshes.values():
            mesh.reloadWith = ReloadResult(True, True, (), 0.0, self.path)

    def write(self, text: str) -> None:
        with open(self.path, "w") as f:
            f.write(text)

    def restart(self, index: int = 0) -> Dict:
        """
        Worker C{index} dies and is started again: the spec it was given.
        """
        died(self.supervisor.slots[index])
        self.clock.advance(0.1)
        self.spawner.flush()
        self.assertEqual(self.spawner.spawned[-1][0], index)
        return self.spawner.specs[-1]

    def test_specCarriesText(self):
        """A worker is given the text of the file as the parent read it, and the file's name."""
        self.assertEqual([(s["text"], s["file"]) for s in self.spawner.specs], [(self.text, self.path)] * 2)

    def test_restartAfterFileEdited(self):
        """A worker started again after the file was edited (and not reloaded) runs the applied text."""
        self.write("[mesh]\nworkers = 2\nthis is = not what runs\n")
        spec = self.restart()
        self.assertEqual((spec["text"], spec["file"]), (self.text, self.path))
        self.assertEqual(set(workerConfig(loadString(spec["text"], spec["file"])).listeners), {"edge"})

    def test_restartAfterReload(self):
        """
        A reload sends every worker the text the parent read; a worker started after it runs that text,
        even if the file has changed again since.
        """
        edited = self.text.replace("tcp:127.0.0.1:1", "tcp:127.0.0.1:2")
        self.write(edited)
        d = self.supervisor.reload()
        self.spawner.flush()
        self.assertTrue(self.successResultOf(d).ok)
        self.assertEqual([m.reloads for m in self.spawner.meshes.values()], [[(edited, self.path)]] * 2)
        self.write("garbage")
        self.assertEqual(self.restart(1)["text"], edited)

    def test_restartAfterRefusedReload(self):
        """
        After a reload the parent refused (with inherit, an added listener), a worker started again runs
        the text in effect, so it can listen on every socket it inherits (it used to read the refused
        file, fail to listen on the new listener, and be restarted forever).
        """
        self.supervisor._makeSockets()
        self.addCleanup(lambda: [sock.close() for sock in self.supervisor.sockets.values()])
        self.write(self.text + "[listener:other]\nendpoint = tcp:0:interface=127.0.0.1\ncluster = web\n")
        result = self.successResultOf(self.supervisor.reload())
        self.assertFalse(result.applied)
        self.assertIn("takes a restart", result.errors[0])
        self.assertEqual([m.reloads for m in self.spawner.meshes.values()], [[], []])
        spec = self.restart()
        self.assertEqual(spec["text"], self.text)
        spec = self.supervisor.spec(self.supervisor.slots[0], {"edge": 4})  # as _spawn passes the socket
        endpointFor = listenerEndpoints(reactor, spec)
        endpoints = {name: endpointFor(name, lconfig.endpoint)
                     for name, lconfig in workerConfig(loadString(spec["text"], spec["file"])).listeners.items()}
        self.assertEqual(list(endpoints), ["edge"])
        self.assertIsInstance(endpoints["edge"], InheritedEndpoint)

    def test_specOnStandardInput(self):
        """
        The real spawner writes the spec to the worker's standard input, not its command line (a large
        configuration is longer than one argument may be), and the worker reads it back whole.
        """
        import io

        from twistedmesh.workers.child import readSpec

        class Process:
            pid = 4242
            written = b""
            closed = False

            def write(self, data):
                self.written += data

            def closeStdin(self):
                self.closed = True

        process = Process()
        spawned = []

        class SpawningReactor(MemoryReactorClock):
            def spawnProcess(self, proto, executable, args, env=None, childFDs=None, **kw):
                spawned.append((args, childFDs))
                proto.makeConnection(process)
                return process

        big = self.text + "".join(f"; padding {i}\n" for i in range(20000))
        self.assertGreater(len(big), 128 * 1024)  # over Linux's limit for one argument
        supervisor = Supervisor(loadString(big, self.path), SpawningReactor(), text=big)
        supervisor.slots[0].start()
        [(args, childFDs)] = spawned
        self.assertEqual(args[1:], ["-m", "twistedmesh.workers"])
        self.assertEqual(childFDs[0], "w")
        self.assertTrue(process.closed)
        spec = readSpec(io.BytesIO(process.written))
        self.assertEqual((spec["text"], spec["file"], spec["index"]), (big, self.path, 0))

    def test_unreadableAtStart(self):
        """A supervisor that is not given the text reads the file: one that cannot be read is a config error."""
        e = self.assertRaises(ConfigErrors, Supervisor, loadString(self.text, self.path + ".gone"), self.clock,
                              self.spawner)
        self.assertIn(".gone: cannot read the file", str(e))


class WorkerReloadTests(unittest.TestCase):
    """
    The worker's side of a reload (L{reloadFromText}): a real service built from the text it is sent.
    """

    def setUp(self):
        from twistedmesh.service import MeshService

        self.mesh = MeshService(workerConfig(config(2)), MemoryReactorClock())
        self.path = self.mktemp()
        with open(self.path, "w") as f:
            f.write("[mesh]\nthe file on disk = is never read\n")
        self.more = CONFIG.format(workers=2) + "[cluster:more]\nendpoints = tcp:127.0.0.1:2\n"

    def test_reloadFromText(self):
        """The worker swaps in the text, named after its file; it does not read the file."""
        result = self.successResultOf(reloadFromText(self.mesh)(self.more, self.path))
        self.assertTrue(result.ok, result.errors)
        self.assertIn("more", self.mesh.config.clusters)
        self.assertEqual(self.mesh.config.file, self.path)
        self.assertIsNone(self.mesh.config.mesh.admin)  # as a worker runs it

    def test_errorsNameTheFile(self):
        """A text that does not load changes nothing, and its errors name the file it came from."""
        result = self.successResultOf(reloadFromText(self.mesh)("[mesh]\nnope = 1\n", self.path))
        self.assertFalse(result.applied)
        self.assertIn(f"{self.path}: [mesh] nope", result.errors[0])
        self.assertEqual(set(self.mesh.config.clusters), {"web"})

    def test_overAMP(self):
        """A L{Reload} with a text over 64 KiB, over AMP, is swapped in whole."""
        text = self.more + "".join(f"; padding {i}\n" for i in range(10000))
        self.assertGreater(len(text), 2 * amp.MAX_VALUE_LENGTH)
        worker = WorkerControl(self.mesh, exit=lambda: None, reloadConfig=reloadFromText(self.mesh))
        parent, _, pump = iosim.connectedServerAndClient(lambda: worker, amp.AMP)
        d = parent.callRemote(Reload, text=text, file=self.path)
        pump.flush()
        self.assertEqual(self.successResultOf(d), {"ok": True, "applied": True, "errors": []})
        self.assertIn("more", self.mesh.config.clusters)


def request(port: int) -> bytes:
    """
    One HTTP/1.1 request on a new connection, read to the end; raises what the socket raises.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /load HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


def load(port: int, total: int, concurrency: int, killAfter: int = 0, kill=None) -> Dict[str, int]:
    """
    C{total} requests from C{concurrency} threads, each on a new connection; after the C{killAfter}th has
    started, C{kill()}. A request that fails other than by a refused connection is tried again, up to
    twice, 50 ms apart. Blocking: run it in a thread.
    """
    import threading

    lock = threading.Lock()
    counts = {"started": 0, "ok": 0, "refused": 0, "failed": 0, "retried": 0}

    def attempt() -> bool:
        try:
            return request(port).startswith(b"HTTP/1.1 200")
        except ConnectionRefusedError:
            with lock:
                counts["refused"] += 1
            return False
        except OSError:  # reset, or closed before the response
            return False

    def run() -> None:
        while True:
            with lock:
                if counts["started"] == total:
                    return
                counts["started"] += 1
                n = counts["started"]
            if n == killAfter and kill is not None:
                kill()
            if attempt():
                with lock:
                    counts["ok"] += 1
                continue
            with lock:
                counts["failed"] += 1
            for _ in range(2):
                time.sleep(0.05)
                if attempt():
                    with lock:
                        counts["retried"] += 1
                    break

    threads = [threading.Thread(target=run) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts


class WorkersTwistdTests(unittest.TestCase):
    """
    C{twistd -n twistedmesh} with C{workers = 2}: real processes sharing a real listener on loopback.
    """

    def setUp(self):
        requireTwistd()

    @defer.inlineCallbacks
    def start(self, sharing: str):
        import treq

        self.treq = treq
        self.admin, self.port, echo = freePort(), freePort(), freePort()
        self.process, self.path = startTwistd(self, f"""
[mesh]
admin = tcp:{self.admin}:interface=127.0.0.1
drain_timeout = 2s
workers = 2
workers.sharing = {sharing}
[listener:edge]
endpoint = tcp:{self.port}:interface=127.0.0.1:backlog=128
protocol = http
routes = main
[route:main/all]
prefix = /
cluster = web
[cluster:web]
endpoints = tcp:127.0.0.1:{echo}
[echo:web]
endpoint = tcp:{echo}:interface=127.0.0.1
""")
        yield self.until(lambda: "twistedmesh is live: 2 workers" in self.process.output(), "both workers live")

    @defer.inlineCallbacks
    def until(self, test, what: str, seconds: float = 20.0):
        """
        Wait (polling every 0.1 s, at most C{seconds}) for C{test()} (which may return a Deferred).
        """
        deadline = time.monotonic() + seconds
        while True:
            if self.process.ended.called:
                self.fail(f"twistd exited waiting for {what}:\n{self.process.output()}")
            if (yield defer.maybeDeferred(test)):
                return
            if time.monotonic() > deadline:
                self.fail(f"timed out waiting for {what}:\n{self.process.output()[-4000:]}")
            yield deferLater(reactor, 0.1, lambda: None)

    @defer.inlineCallbacks
    def stats(self, worker: Optional[int] = None) -> Dict[str, int]:
        url = f"http://127.0.0.1:{self.admin}/stats?format=json"
        if worker is not None:
            url += f"&worker={worker}"
        body = yield (yield self.treq.get(url, persistent=False, timeout=10)).json()
        return {s["name"]: s["value"] for s in body["stats"]}

    def pids(self) -> Dict[int, int]:
        """
        The pid of each worker, as the parent logged it when the worker went live (the latest wins).
        """
        import re

        return {int(i): int(p) for i, p in re.findall(r"worker (\d+) \(pid (\d+)\) is live", self.process.output())}

    @defer.inlineCallbacks
    def scenario(self, sharing: str, bothServe: bool, mayFail: int):
        yield self.start(sharing)
        # Requests through the shared listener: served by the workers, the parent shows the sum.
        counts = yield deferToThread(load, self.port, 60, 4)
        self.assertEqual(counts["ok"], 60, counts)
        perWorker = []
        for i in (0, 1):
            perWorker.append((yield self.stats(i)).get("listener.edge.downstream_cx_total", 0))
        self.assertEqual(sum(perWorker), 60)
        if bothServe:
            self.assertTrue(all(perWorker), perWorker)
        summed = yield self.stats()
        self.assertEqual((summed["listener.edge.downstream_cx_total"], summed["workers.live"]), (60, 2))

        # Reload reaches both workers.
        response = yield self.treq.post(f"http://127.0.0.1:{self.admin}/reload", persistent=False, timeout=10)
        self.assertEqual(response.code, 200)
        self.assertEqual((yield response.json())["ok"], True)
        for i in (0, 1):
            self.assertEqual((yield self.stats(i))["server.reload.success"], 1)
        # So does SIGHUP.
        self.process.transport.signalProcess("HUP")
        for i in (0, 1):
            yield self.until(lambda: self.stats(i).addCallback(lambda s: s["server.reload.success"] == 2),
                             f"worker {i} reloaded on SIGHUP")

        # The file is edited into one the parent refuses (with inherit, a new listener; with reuseport, a
        # broken file): the workers keep what the parent applied, and so does the worker killed below when
        # it is started again (reading the file, it could not listen, or not even load it).
        with open(self.path) as f:
            applied = f.read()
        with open(self.path, "w") as f:
            if sharing == "inherit":
                f.write(applied + f"[listener:other]\nendpoint = tcp:{freePort()}:interface=127.0.0.1\n"
                                  f"protocol = http\nroutes = main\n")
            else:
                f.write("[mesh]\nworkers = 2\nthis is not = a valid file\n")
        response = yield self.treq.post(f"http://127.0.0.1:{self.admin}/reload", persistent=False, timeout=10)
        self.assertEqual(response.code, 400)
        self.assertFalse((yield response.json())["applied"])

        # SIGKILL a worker under load: no connection is refused; the requests that fail (reset, or closed
        # without a response) are those the killed worker had (see the two tests), and each of them
        # succeeds when tried again.
        victim = self.pids()[0]
        counts = yield deferToThread(load, self.port, 400, 4, 100, lambda: os.kill(victim, signal.SIGKILL))
        self.assertEqual(counts["refused"], 0, counts)
        self.assertLessEqual(counts["failed"], mayFail, counts)
        self.assertEqual(counts["ok"] + counts["retried"], 400, counts)

        # The worker comes back.
        yield self.until(lambda: self.pids().get(0, victim) != victim, "a new worker 0")
        yield self.until(lambda: self.stats().addCallback(lambda s: s["workers.live"] == 2), "2 live workers")
        self.assertEqual((yield self.stats())["workers.restarts"], 1)
        self.assertNotIn("invalid configuration", self.process.output())
        if bothServe:
            # ...and it serves (each connection is hashed to one of the workers' sockets).
            counts = yield deferToThread(load, self.port, 40, 4)
            self.assertEqual(counts["ok"], 40, counts)
            self.assertGreater((yield self.stats(0)).get("listener.edge.downstream_cx_total", 0), 0)
        self.assertIn("worker 0 (pid %d) killed by signal 9" % victim, self.process.output())

        # SIGTERM: both drain, the parent exits 0.
        self.process.transport.signalProcess("TERM")
        code = yield self.process.ended
        self.assertEqual(code, 0, self.process.output()[-4000:])
        import re

        stopped = re.findall(r"\[worker-(\d)\] Main loop terminated", self.process.output())
        self.assertEqual(sorted(stopped), ["0", "1"], self.process.output()[-4000:])

    def test_reusePort(self):
        """
        With C{reuseport}: both workers serve, reload reaches both, SIGTERM drains and exits 0; a killed
        worker comes back and costs its requests in flight, plus the connections the kernel had queued on
        its socket, including those that arrived while the dying process was torn down (at most one per
        client thread, each retried at most twice, in practice).
        """
        return self.scenario("reuseport", bothServe=True, mayFail=8)

    def test_inherit(self):
        """
        The same with C{inherit} (one listening socket shared): whichever worker accepts first serves,
        so both serving is not asserted. A killed worker costs only the connections it had accepted (at most
        one per client thread): the rest wait in the shared queue for the other worker.
        """
        return self.scenario("inherit", bothServe=False, mayFail=4)
