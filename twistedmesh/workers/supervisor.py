"""
The parent of the worker processes: L{Supervisor} makes the shared listening sockets, runs the admin
endpoint and demo upstreams, and keeps C{[mesh] workers} L{WorkerSlot}s each running one worker, restarted
with back-off when it dies. Reload, drain and stats fan out to the workers over their control connections.

The parent alone reads the configuration file: it checks it, and hands the workers its text (in a new
worker's spec, and in each L{Reload}), so every worker runs the configuration the parent applied, whatever
the file on disk says when a worker is started again.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from twisted.application import service
from twisted.internet import defer, protocol, task
from twisted.internet.error import CannotListenError
from twisted.logger import Logger, eventFromJSON

from ..config import Config, ConfigErrors, readText
from ..demo import makeEchoFactory
from ..observability.stats import StatsStore
from ..reload import ReloadResult, diffConfigs
from ..service import Listening
from ..tls import ServerTLS
from .protocol import Drain, HealthCheck, Reload, Stats, SupervisorControl
from .sockets import SocketAddress, makeSocket, parseAddress
from .stats import ClusterView, MergedStats, Snapshot, merge, mergeClusters, snapshot, withoutGauges

#: How long the parent waits for a worker's stats before it shows the last ones it had.
STATS_TIMEOUT = 5.0
#: How long the parent waits for a worker's answer to a L{Reload}: reloads run one at a time, so a worker
#: that never answers must not hold up every later one.
RELOAD_TIMEOUT = 60.0
#: How often the parent gathers the workers' stats unasked (for the dashboard, and so that little of what
#: a worker counted is lost if it dies).
STATS_REFRESH = 5.0
#: How much longer than C{drain_timeout} the parent waits for a draining worker before killing it: the
#: worker aborts its connections at C{drain_timeout} itself, and then needs a moment to exit.
EXIT_GRACE = 1.0
#: The longest line of a worker's output kept while waiting for its end; a longer one is dropped.
MAX_OUTPUT_LINE = 1024 * 1024


def readConfig(path: str) -> Tuple[str, Config]:
    """
    Read the configuration file at C{path} once and check its text as start-up does.

    @return: the text as read, and the configuration built from it.
    @raise ConfigErrors: with every error found (or why the file cannot be read).
    """
    from ..tap import checkText

    text = readText(path)
    return text, checkText(text, path)


@dataclass(frozen=True)
class BackOff:
    """
    When a dead worker is started again: after C{initial} seconds, doubling with each death up to
    C{maximum}, back to C{initial} once a worker has stayed up C{stableAfter} seconds.
    """

    initial: float = 0.1
    maximum: float = 10.0
    stableAfter: float = 10.0


class WorkerSlot(protocol.ProcessProtocol):
    """
    One worker: its process (this is the process's protocol), its control connection, its restarts and
    the stats it reported.

    @ivar control: the parent's end of the control connection (L{SupervisorControl}), or C{None}.
    @ivar live: the running worker said it is serving (L{workerReady}).
    @ivar delay: the back-off before the next restart.
    @ivar starts: how many processes this slot has started.
    @ivar snapshot: the last stats the running worker reported.
    @ivar retired: the counters and histograms of the slot's earlier processes, so that summed counters do
        not fall back when a worker is replaced (what they counted after their last report is lost).
    @ivar exited: while a process runs, a Deferred that fires when it ends.
    @ivar configText: the configuration text the running worker runs: the one the parent had applied when
        the worker started, or the last one it applied in a L{Reload} since.
    @ivar sent: how many texts were sent to the slot's workers in a L{Reload}: each one's sequence number.
    @ivar appliedSeq: the sequence number of the text L{configText} was set from by a worker's answer.
    """

    log = Logger()

    def __init__(self, index: int, supervisor: "Supervisor") -> None:
        self.index = index
        self.supervisor = supervisor
        self.reactor = supervisor.reactor
        self.backOff = supervisor.backOff
        self.control: Optional[SupervisorControl] = None
        self.pid: Optional[int] = None
        self.live = False
        self.delay = self.backOff.initial
        self.starts = 0
        self.snapshot: Snapshot = []
        self.clusters: List = []  # the running worker's last clusterSnapshot
        self.retired: Snapshot = []
        self.exited: Optional[defer.Deferred] = None
        self.configText: Optional[str] = None
        self.sent = 0
        self.appliedSeq = 0
        self._restart = None
        self._stable = None
        self._output: Dict[int, bytes] = {}

    @property
    def running(self) -> bool:
        """
        Whether a process of this slot is running.
        """
        return self.exited is not None

    def start(self) -> None:
        """
        Start a worker process; once it has stayed up C{stableAfter} seconds, the back-off starts over.
        """
        self._restart = None
        self.exited = defer.Deferred()
        self.starts += 1
        # What the parent applied last, not the file as it is now (see Supervisor.spec); an answer to a
        # text sent to an earlier process changes nothing from now on.
        self.configText = self.supervisor.configText
        self.appliedSeq = self.sent
        try:
            self.supervisor.spawner(self)
        except Exception:
            self.log.failure("worker {index}: cannot start a process", index=self.index)
            self.exited = None
            self._scheduleRestart()
            return
        self.pid = getattr(self.transport, "pid", None)
        self._stable = self.reactor.callLater(self.backOff.stableAfter, self._stayedUp)

    def _stayedUp(self) -> None:
        self._stable = None
        self.delay = self.backOff.initial

    def _scheduleRestart(self) -> None:
        self.log.warn("worker {index}: starting again in {delay}s", index=self.index, delay=self.delay)
        self._restart = self.reactor.callLater(self.delay, self.start)
        self.delay = min(self.delay * 2, self.backOff.maximum)
        self.supervisor.restarts.value += 1

    def cancelRestart(self) -> None:
        """
        Start no process later (the supervisor is stopping).
        """
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        self._restart = None

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        """
        Output of the worker: on descriptor 1 its log events (JSON, one a line, from
        L{twisted.logger.jsonFileLogObserver}), which join the parent's log marked C{worker-N}, so they go
        wherever twistd logs (a file, when daemonized); on 2 anything else it writes (a crash's traceback).
        """
        buffer = self._output.get(childFD, b"") + data
        *lines, rest = buffer.split(b"\n")
        self._output[childFD] = rest if len(rest) <= MAX_OUTPUT_LINE else b""
        for line in lines:
            self._relay(childFD, line)

    def _relay(self, childFD: int, line: bytes) -> None:
        if childFD == 1 and line.startswith(b"\x1e"):
            try:
                event = eventFromJSON(line[1:].decode("utf-8", "replace"))
            except ValueError:
                event = None
            if isinstance(event, dict):
                event["log_system"] = f"worker-{self.index}"
                self.log.observer(event)
                return
        if line.strip():
            self.log.warn("worker {index}: {line}", index=self.index, line=line.decode("utf-8", "replace"))

    def processEnded(self, reason) -> None:
        """
        The worker process ended: keep what it counted, and unless the supervisor is stopping, start
        another after the back-off.
        """
        self.live = False
        for childFD, rest in sorted(self._output.items()):
            self._relay(childFD, rest)
        self._output.clear()
        control, self.control = self.control, None
        if control is not None and control.transport is not None:
            control.transport.loseConnection()  # normally closed already: the process held the other end
        self.supervisor.workerGone(self)
        if self._stable is not None and self._stable.active():
            self._stable.cancel()
        self._stable = None
        if self.snapshot:
            self.retired = snapshot(merge([self.retired, withoutGauges(self.snapshot)]))
            self.snapshot = []
        self.clusters = []
        exited, self.exited = self.exited, None
        if not (self.supervisor.stopping or self.supervisor.draining):
            value = reason.value
            how = (f"killed by signal {value.signal}" if getattr(value, "signal", None)
                   else f"exited with status {getattr(value, 'exitCode', None)}")
            self.log.error("worker {index} (pid {pid}) {how}", index=self.index, pid=self.pid, how=how)
            self._scheduleRestart()
        if exited is not None:
            exited.callback(None)

    def controlConnected(self, control: SupervisorControl) -> None:
        """
        The control connection to the running worker is up.
        """
        self.control = control

    def controlLost(self, control: SupervisorControl) -> None:
        """
        The control connection is gone (the worker is ending).
        """
        if self.control is control:
            self.control = None

    def workerReady(self, control: SupervisorControl, pid: int) -> None:
        """
        The worker said every one of its listeners is listening.
        """
        self.live = True
        self.log.info("worker {index} (pid {pid}) is live", index=self.index, pid=pid)
        self.supervisor.workerLive(self)

    def fetchStats(self) -> defer.Deferred:
        """
        The running worker's stats (a snapshot), or the last it reported if it does not answer in
        L{STATS_TIMEOUT}; none when no worker runs.
        """
        if not self.running:
            return defer.succeed([])
        if self.control is None:
            return defer.succeed(self.snapshot)
        d = self.control.callRemote(Stats)
        d.addTimeout(STATS_TIMEOUT, self.reactor)

        def got(response):
            self.snapshot = response["stats"]
            self.clusters = response["clusters"]
            return self.snapshot

        def failed(failure):
            self.log.warn("worker {index}: no stats ({why}); showing its last", index=self.index,
                          why=failure.getErrorMessage())
            return self.snapshot

        return d.addCallbacks(got, failed)

    def signal(self, name: str) -> None:
        """
        Send signal C{name} (C{"TERM"}, C{"KILL"}, C{"USR1"}) to the running worker, if any.
        """
        if self.running and self.transport is not None:
            try:
                self.transport.signalProcess(name)
            except Exception:  # ProcessExitedAlready: it is on its way out anyway
                pass


class _ReopenLogs:
    """
    What the SIGUSR1 handler calls in a single process (C{accessLogSinks.reopen()}): here, the workers own
    the access logs, so each of them is signalled in turn.
    """

    def __init__(self, supervisor: "Supervisor") -> None:
        self.supervisor = supervisor

    def reopen(self) -> None:
        """
        Ask every worker to reopen its access logs.
        """
        for slot in self.supervisor.slots:
            slot.signal("USR1")


class _ControlFactory(protocol.Factory):
    def __init__(self, slot: WorkerSlot) -> None:
        self.slot = slot

    def buildProtocol(self, addr) -> SupervisorControl:
        return SupervisorControl(self.slot)


class Supervisor(service.MultiService):
    """
    The parent process of C{[mesh] workers = N}. It serves the admin endpoint as a single process does
    (L{twistedmesh.admin.resource.AdminServer}), with every worker's stats summed.

    @ivar spawner: starts a process for a slot, connecting the slot to it as its process protocol (the
        default runs C{python -m twistedmesh.workers}); injected in tests.
    @ivar sockets: by listener name, the socket the parent holds: the listening socket every worker
        inherits (C{inherit}), or a bound one that reserves the address, and the port picked for port 0,
        for the workers' C{SO_REUSEPORT} sockets (C{reuseport}).
    @ivar addresses: by listener name, where the workers listen (the port resolved).
    @ivar config: the configuration in effect: built from L{configText}.
    @ivar configText: the text of the configuration file as the parent read it, checked and applied it
        (at start, or by the last reload every worker applied): what a worker started from now on runs.
    """

    log = Logger()

    def __init__(self, config: Config, reactor=None, spawner: Optional[Callable[[WorkerSlot], None]] = None,
                 backOff: BackOff = BackOff(), text: Optional[str] = None) -> None:
        """
        @param config: the checked configuration.
        @param text: the text C{config} was built from; by default the file C{config.file} is read and
            checked again (and what is read now is what runs, parent and workers alike).
        @raise ConfigErrors: if C{text} is not given and the file no longer loads.
        """
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        if text is None:
            text, config = readConfig(config.file)
        self.config = config
        self.configText = text
        self.reactor = reactor
        self.backOff = backOff
        self.spawner = spawner if spawner is not None else self._spawn
        self.sharing = config.mesh.workers_sharing
        self.stopping = False
        self.draining = False
        self.lastReload: Optional[ReloadResult] = None
        self._healthCheckFailed = False
        # The clusters live in the workers: these are views of them together, as last gathered.
        self.clusters: Dict[str, ClusterView] = {}
        self.own = StatsStore()  # the parent's own stats: workers.* and the admin's ssl.*
        self.own.gauge("workers.configured").value = config.mesh.workers
        self.liveGauge = self.own.gauge("workers.live")
        self.restarts = self.own.counter("workers.restarts")
        # What the admin shows: the sum of every worker's stats and the parent's, as last gathered (each
        # /stats gathers afresh; the dashboard reads the figures of the last refresh).
        self.stats = MergedStats()
        self._refresher = task.LoopingCall(self._refresh)
        self._refresher.clock = reactor
        self.accessLogSinks = _ReopenLogs(self)
        self.sockets: Dict[str, socket.socket] = {}
        self.addresses: Dict[str, SocketAddress] = {}
        self.slots = [WorkerSlot(i, self) for i in range(config.mesh.workers)]
        self.echoes: Dict[str, Listening] = {}
        self.adminTLS: Optional[ServerTLS] = None
        self.admin: Optional[Listening] = None
        self.whenLive = defer.Deferred()
        # One reload at a time, each to its end (the workers converged): see reload.
        self._reloading = defer.DeferredLock()
        for name, econfig in config.echoes.items():
            self.echoes[name] = self._listen(f"echo {name}", econfig.endpoint, makeEchoFactory(econfig))
        if config.mesh.admin is not None:
            from ..admin import makeAdminSite

            factory = makeAdminSite(self, reactor)
            if config.mesh.admin_tls is not None:
                self.adminTLS = ServerTLS(config.tls[config.mesh.admin_tls], reactor, self.own.root.scope("admin"))
                factory = self.adminTLS.wrapFactory(factory, reactor)
            self.admin = self._listen("admin", config.mesh.admin, factory)

    def _listen(self, label: str, endpoint: str, factory) -> Listening:
        listening = Listening(label, endpoint, factory, self.reactor)
        listening.setServiceParent(self)
        return listening

    @property
    def healthCheckFailed(self) -> bool:
        """
        Whether this proxy's health checks fail (admin C{/healthcheck/fail}): set here, it is passed on to
        every worker, and a worker started later is told too.
        """
        return self._healthCheckFailed

    @healthCheckFailed.setter
    def healthCheckFailed(self, failed: bool) -> None:
        self._healthCheckFailed = failed
        for slot in self.slots:
            if slot.control is not None:
                slot.control.callRemote(HealthCheck, failed=failed).addErrback(
                    lambda f, i=slot.index: self.log.warn("worker {index}: health check flag not set: {why}",
                                                          index=i, why=f.getErrorMessage()))

    @property
    def state(self) -> str:
        """
        C{DRAINING} once stopping; C{LIVE} while a worker serves; C{STARTING} before.
        """
        if self.stopping or self.draining:
            return "DRAINING"
        return "LIVE" if any(slot.live for slot in self.slots) else "STARTING"

    # Starting

    def startService(self) -> None:
        """
        Make the shared sockets, listen for the admin and demo upstreams, start every worker. A socket that
        cannot be made (address in use) stops the process, as in a single process.
        """
        service.Service.startService(self)
        try:
            self._makeSockets()
        except (CannotListenError, ValueError) as e:
            self.log.error("twistedmesh cannot start: {why}", why=e)
            self._stopReactor()
            return
        if self.adminTLS is not None:
            self.adminTLS.startReloading()
        ds = [defer.maybeDeferred(s.startService) for s in self]
        d = defer.gatherResults(ds, consumeErrors=True)
        d.addErrback(self._cannotListen)
        for slot in self.slots:
            slot.start()
        self._refresher.start(STATS_REFRESH, now=False)

    def _makeSockets(self) -> None:
        reusePort = self.sharing == "reuseport"
        for name, lconfig in self.config.listeners.items():
            address = parseAddress(lconfig.endpoint)
            # inherit: one listening socket for all. reuseport: a bound socket that is not listening (so it
            # gets no connections) holds the address, and the port the system picked, for the workers.
            sock = makeSocket(address, reusePort=reusePort, listen=not reusePort)
            self.sockets[name] = sock
            self.addresses[name] = address.withPort(sock.getsockname()[1])
            self.log.info("listener {name} on {host}:{port}, shared by {n} workers ({sharing})", name=name,
                          host=address.host, port=self.addresses[name].port, n=len(self.slots),
                          sharing=self.sharing)

    def _cannotListen(self, failure) -> None:
        self.log.failure("twistedmesh cannot start", getattr(failure.value, "subFailure", failure))
        self._stopReactor()

    def _stopReactor(self) -> None:
        self.failedToStart = True  # the process exits with status 1 (twistedmesh.tap)
        # twistd starts the service before it runs the reactor: stop it as soon as it runs, then.
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    def spec(self, slot: WorkerSlot, fds: Dict[str, int]) -> Dict:
        """
        What a worker is told on its standard input: the configuration text the slot's worker is to run
        (L{WorkerSlot.configText}: the last the parent applied) and the name of its file, its index, how to
        share each listener (C{fds}: the descriptor each inherited socket has in the worker), its control
        descriptor (3).
        """
        return {
            "file": self.config.file,
            "text": slot.configText,
            "index": slot.index,
            "sharing": self.sharing,
            "control": 3,
            "healthCheckFailed": self._healthCheckFailed,
            "listeners": {
                name: {"endpoint": self.config.listeners[name].endpoint, "address": address.toJSON(),
                       "fd": fds.get(name)}
                for name, address in self.addresses.items()
            },
        }

    def _spawn(self, slot: WorkerSlot) -> None:
        """
        Start C{python -m twistedmesh.workers} for C{slot}, and write its L{spec} (JSON) to its standard
        input: descriptor 3 is its end of a new socket pair (the control connection), 4 and up the
        inherited listening sockets; its stdout and stderr come to the slot (see
        L{WorkerSlot.childDataReceived}).
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            childFDs: Dict[int, object] = {0: "w", 1: "r", 2: "r", 3: theirs.fileno()}
            fds: Dict[str, int] = {}
            if self.sharing == "inherit":
                for fd, (name, sock) in enumerate(self.sockets.items(), 4):
                    childFDs[fd] = sock.fileno()
                    fds[name] = fd
            spec = json.dumps(self.spec(slot, fds)).encode("utf-8")
            argv = [sys.executable, "-m", "twistedmesh.workers"]
            process = self.reactor.spawnProcess(slot, sys.executable, argv, env=dict(os.environ),
                                                childFDs=childFDs)
            # The configuration text can be longer than a command-line argument may be: a pipe has no limit.
            process.write(spec)
            process.closeStdin()
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        try:
            self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, _ControlFactory(slot))
        finally:
            ours.close()  # the connection holds a duplicate

    def workerLive(self, slot: WorkerSlot) -> None:
        """
        A worker is serving (called by its slot).
        """
        self.liveGauge.value = sum(1 for s in self.slots if s.live)
        if not self.whenLive.called and all(s.live for s in self.slots):
            self.log.info("twistedmesh is live: {n} workers", n=len(self.slots))
            self.whenLive.callback(None)

    def workerGone(self, slot: WorkerSlot) -> None:
        """
        A worker ended (called by its slot).
        """
        self.liveGauge.value = sum(1 for s in self.slots if s.live)

    # Admin

    def collectStats(self, worker: Optional[str] = None) -> defer.Deferred:
        """
        Every worker's stats, asked for now, summed, with the parent's own (C{workers.*}) and what earlier
        processes of each slot counted; with C{worker}, only that worker's (C{/stats?worker=N}).

        @return: a Deferred firing with a L{StatsStore}.
        @raise ValueError: if C{worker} is not the index of a worker.
        """
        if worker is not None:
            try:
                index = int(worker)
            except ValueError:
                index = -1
            if not 0 <= index < len(self.slots):
                raise ValueError(f"worker must be a number from 0 to {len(self.slots) - 1}, not {worker!r}")
            return self.slots[index].fetchStats().addCallback(lambda data: merge([data]))
        d = defer.gatherResults([slot.fetchStats() for slot in self.slots])

        def summed(live: List[Snapshot]) -> MergedStats:
            self.stats.replace([snapshot(self.own)] + [slot.retired for slot in self.slots] + live)
            self.clusters = mergeClusters([(slot.index, slot.clusters) for slot in self.slots],
                                          self.config.clusters, self.stats)
            return self.stats

        return d.addCallback(summed)

    def _refresh(self) -> defer.Deferred:
        return self.collectStats().addErrback(lambda f: self.log.failure("cannot gather stats", f))

    def shutdown(self) -> None:
        """
        Stop the process (admin C{/quitquitquit}); the reactor's shutdown runs L{stopService}, which drains.
        """
        self.reactor.stop()

    def reload(self, path: Optional[str] = None) -> defer.Deferred:
        """
        Read the configuration file (C{path}, or the one in effect) and check it here, then have every
        running worker swap its text in (SIGHUP and the admin C{POST /reload} call this): the workers never
        read the file, so all of them run what the parent read, and a worker started later runs the text
        the parent last applied. C{[mesh] workers} and C{workers.sharing} take a restart to change; so does
        the parent's own part (the admin endpoint, the demo upstreams). Never fails: the outcome is the
        result.

        A new configuration is applied only if every worker applied it; otherwise the workers that did are
        sent the previous text again (L{_converge}), so that they all run what the parent shows.

        Reloads run one at a time: one asked for while another is under way waits for it to end (its
        workers answered, and those sent the text in effect again answered too), then reads the file and
        runs; each gets its own result. (Run together, the text in effect that the first sends back to a
        worker could reach it after the second's, leaving it on the old configuration.) A worker that does
        not answer within L{RELOAD_TIMEOUT} counts as refusing, so that it cannot hold up the reloads after.

        @return: a Deferred firing with a L{ReloadResult} once the workers run the configuration in effect:
            C{applied} if every worker swapped the new configuration in, C{ok} if moreover everything
            listens; each error names its worker.
        """
        return self._reloading.run(self._reload, path)

    def _reload(self, path: Optional[str]) -> defer.Deferred:
        path = path if path is not None else self.config.file
        now = self.reactor.seconds()
        if self.state == "DRAINING":
            return defer.succeed(self._reloaded(ReloadResult(False, False, ("the server is draining",), now, path)))
        try:
            text, config = readConfig(path)
        except ConfigErrors as e:
            return defer.succeed(self._reloaded(
                ReloadResult(False, False, tuple(str(error) for error in e.errors), now, path)))
        diff = diffConfigs(self.config, config)
        if (config.mesh.workers, config.mesh.workers_sharing) != (self.config.mesh.workers, self.sharing):
            return defer.succeed(self._reloaded(ReloadResult(
                False, False, (f"{path}: [mesh] workers and workers.sharing take a restart to change",), now, path,
                diff)))
        if self.sharing == "inherit" and diff.listeners.added:
            # The workers could not listen: only the parent makes inherited sockets, at start.
            return defer.succeed(self._reloaded(ReloadResult(
                False, False, (f"{path}: with workers.sharing = inherit, adding a listener or changing its "
                               f"endpoint ({', '.join(diff.listeners.added)}) takes a restart",), now, path, diff)))
        slots = [slot for slot in self.slots if slot.control is not None]

        def asked(slot: WorkerSlot) -> defer.Deferred:
            d = self._sendText(slot, text, path)
            d.addCallback(lambda r: (r[0], r[1], [f"worker {slot.index}: {e}" for e in r[2]]))
            return d

        def answered(results: List[Tuple[bool, bool, List[str]]]) -> defer.Deferred:
            applied = all(r[1] for r in results)
            errors = tuple(e for r in results for e in r[2])
            if applied:
                # A worker started from now on runs this text.
                self.config, self.configText = config, text
                if diff.admin or diff.echoes.changed:
                    self.log.warn("reload of {file}: the admin endpoint and the demo upstreams run in the parent, "
                                  "and take a restart to change", file=path)
                for name in diff.listeners.removed:
                    # No worker listens there any more: an inherited socket would queue connections that
                    # nobody accepts, a reserved address would stay taken.
                    sock = self.sockets.pop(name, None)
                    if sock is not None:
                        sock.close()
                    self.addresses.pop(name, None)
            result = ReloadResult(applied and not errors, applied, errors, now, path, diff)
            return self._converge().addCallback(lambda _: self._reloaded(result))

        return defer.gatherResults([asked(slot) for slot in slots]).addCallback(answered)

    def _sendText(self, slot: WorkerSlot, text: str, file: str) -> defer.Deferred:
        """
        Have C{slot}'s worker reload with configuration C{text}, and note it as what the worker runs if it
        applied it, unless it since applied a text sent after this one (the worker applies them in the
        order sent, so an answer that arrives after a newer one's is stale) or the slot's process changed.

        @return: a Deferred firing with C{(ok, applied, errors)}; never failing.
        """
        control = slot.control
        slot.sent += 1
        seq = slot.sent
        d = control.callRemote(Reload, text=text, file=file)
        d.addTimeout(RELOAD_TIMEOUT, self.reactor)

        def answer(response) -> Tuple[bool, bool, List[str]]:
            if response["applied"] and slot.control is control and seq > slot.appliedSeq:
                slot.configText, slot.appliedSeq = text, seq
            return response["ok"], response["applied"], list(response["errors"])

        def failed(failure) -> Tuple[bool, bool, List[str]]:
            if failure.check(defer.TimeoutError) is None:
                return False, False, [failure.getErrorMessage()]
            # It may still apply the text, unheard: what it runs is unknown until it answers another.
            if slot.control is control:
                slot.configText, slot.appliedSeq = None, seq
            return False, False, [f"no answer to the reload in {RELOAD_TIMEOUT:g} seconds"]

        return d.addCallback(answer).addErrback(failed)

    def _converge(self) -> defer.Deferred:
        """
        Send the applied text to every running worker that runs another: one that applied a reload the
        others refused (it goes back), or one started while a reload was under way (it goes forward).

        @return: a Deferred firing when every worker sent the text answered; never failing.
        """
        sent = []
        for slot in self.slots:
            if slot.control is None or slot.configText == self.configText:
                continue
            self.log.warn("worker {index} runs another configuration than the one in effect: reloading it",
                          index=slot.index)

            def done(result: Tuple[bool, bool, List[str]], slot: WorkerSlot = slot) -> None:
                if not result[1]:
                    self.log.error("worker {index} cannot run the configuration in effect:\n{errors}",
                                   index=slot.index, errors="\n".join(result[2]))

            sent.append(self._sendText(slot, self.configText, self.config.file).addCallback(done))
        return defer.gatherResults(sent)

    def _reloaded(self, result: ReloadResult) -> ReloadResult:
        self.lastReload = result
        if result.ok:
            self.log.info("reloaded {file} in {n} workers", file=result.file, n=len(self.slots))
        else:
            self.log.error("reload of {file} failed:\n{errors}", file=result.file, errors="\n".join(result.errors))
        return result

    def drain(self, graceful: bool = True) -> defer.Deferred:
        """
        Every worker stops accepting and drains (admin C{POST /drain_listeners}); the parent closes its
        copies of the sockets and starts no worker again. The workers keep running until the process stops.

        @return: a Deferred firing with C{None} once every worker was told.
        """
        self.draining = True
        self._closeSockets()
        for slot in self.slots:
            slot.cancelRestart()
            if slot.control is not None:
                slot.control.callRemote(Drain, graceful=graceful, exit=False)
        return defer.succeed(None)

    def _closeSockets(self) -> None:
        for sock in self.sockets.values():
            # Nothing accepts from these any more: with inherit, connections that queued on the socket
            # would wait for a worker that never comes; closing it makes new connections fail fast.
            sock.close()
        self.sockets.clear()

    # Stopping

    def stopService(self) -> defer.Deferred:
        """
        Drain: close the parent's sockets, tell every worker to drain (each stops accepting and finishes its
        connections within C{drain_timeout}), kill any still running C{EXIT_GRACE} seconds later, then stop
        the admin and demo listeners.
        """
        self.stopping = True
        self.running = 0
        if self._refresher.running:
            self._refresher.stop()
        if self.adminTLS is not None:
            self.adminTLS.stopReloading()
        self._closeSockets()
        waiting = []
        for slot in self.slots:
            slot.cancelRestart()
            if not slot.running:
                continue
            waiting.append(slot.exited)
            if slot.control is not None:
                slot.control.callRemote(Drain, graceful=True, exit=True)
            else:
                slot.signal("TERM")  # still starting: its SIGTERM handler drains too
        done = defer.gatherResults(waiting)

        def tooLong() -> None:
            for slot in self.slots:
                if slot.running:
                    self.log.warn("worker {index} still running after drain_timeout: killing it", index=slot.index)
                    slot.signal("KILL")

        timer = self.reactor.callLater(self.config.mesh.drain_timeout + EXIT_GRACE, tooLong)

        def finished(_):
            if timer.active():
                timer.cancel()
            return defer.gatherResults([defer.maybeDeferred(s.stopService) for s in list(self)], consumeErrors=True)

        done.addCallback(finished)
        done.addErrback(lambda f: self.log.failure("error while draining", f))
        return done
