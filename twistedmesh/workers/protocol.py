"""
The control protocol between the supervisor and each worker: AMP (L{twisted.protocols.amp}) over a
socket pair the supervisor makes for each worker process.

Parent to worker: L{Stats} (the worker's stats, as data), L{Reload} (swap in the configuration text the
parent read and checked), L{Drain} (stop accepting, finish the open connections, and exit if asked),
L{HealthCheck} (fail health checks, or pass them again). Worker to parent: L{Ready} (every listener of the
worker is listening).
"""

from __future__ import annotations

import json
from typing import Any, Callable, List, Optional, Tuple

from twisted.internet import defer
from twisted.logger import Logger
from twisted.protocols import amp


class JSONValue(amp.Argument):
    """
    Any JSON-able value, of any size. One AMP value is at most 64 KiB and a proxy's stats are more than
    that, so the JSON text is split over as many keys as it needs: C{NAME}, C{NAME.1}, C{NAME.2}...
    """

    def toBox(self, name: bytes, strings, objects, proto) -> None:
        """
        Put C{objects[name]} into the box C{strings} as JSON, in chunks.
        """
        data = json.dumps(self.retrieve(objects, name.decode("ascii"), proto), separators=(",", ":")).encode()
        size = amp.MAX_VALUE_LENGTH
        strings[name] = data[:size]
        for i, start in enumerate(range(size, len(data), size), 1):
            strings[b"%s.%d" % (name, i)] = data[start:start + size]

    def fromBox(self, name: bytes, strings, objects, proto) -> None:
        """
        Join the chunks of C{name} in the box C{strings} and decode them into C{objects}.
        """
        parts = [strings.pop(name)]
        i = 1
        while b"%s.%d" % (name, i) in strings:
            parts.append(strings.pop(b"%s.%d" % (name, i)))
            i += 1
        objects[name.decode("ascii")] = json.loads(b"".join(parts))


class Stats(amp.Command):
    """
    Parent to worker: every stat of the worker (see L{twistedmesh.workers.stats.snapshot}), and the hosts
    of its clusters with their health (L{twistedmesh.workers.stats.clusterSnapshot}).
    """

    arguments: List = []
    response = [(b"stats", JSONValue()), (b"clusters", JSONValue())]


class Reload(amp.Command):
    """
    Parent to worker: build configuration C{text} (the file the parent read and checked, as it read it;
    C{file} is its name, for messages) and swap it in (L{twistedmesh.service.MeshService.reload}). The
    worker never reads the file itself: what it runs is what the parent applied, whatever the file on disk
    says by then. C{applied}: the new configuration is in effect; C{ok}: and all of it listens; C{errors}
    says what went wrong.
    """

    # The text may be over AMP's 64 KiB limit for one value: JSONValue splits it.
    arguments = [(b"text", JSONValue()), (b"file", amp.Unicode())]
    response = [(b"ok", amp.Boolean()), (b"applied", amp.Boolean()), (b"errors", JSONValue())]


class Drain(amp.Command):
    """
    Parent to worker: stop accepting and drain (L{twistedmesh.service.MeshService.drain}); with C{exit},
    then exit (the worker stops as on SIGTERM: the open connections get up to C{[mesh] drain_timeout}).
    Answered at once; with C{exit}, the worker's exit is the end of the drain.
    """

    arguments = [(b"graceful", amp.Boolean()), (b"exit", amp.Boolean())]
    response: List = []
    requiresAnswer = False


class HealthCheck(amp.Command):
    """
    Parent to worker: make this proxy's health checks fail, or pass again (admin C{/healthcheck/fail} and
    C{/healthcheck/ok}, which the parent serves).
    """

    arguments = [(b"failed", amp.Boolean())]
    response: List = []


class Ready(amp.Command):
    """
    Worker to parent: every listener of the worker is listening.
    """

    arguments = [(b"pid", amp.Integer())]
    response: List = []


def reloadResult(result: Any) -> Tuple[bool, bool, List[str]]:
    """
    What a service's C{reload} returned (a L{twistedmesh.reload.ReloadResult}, or C{(ok, errors)}), as
    C{(ok, applied, errors)}.
    """
    if isinstance(result, tuple):
        ok, errors = result
        applied = ok
    else:
        ok, applied, errors = result.ok, result.applied, result.errors
    return bool(ok), bool(applied), [str(e) for e in (errors or ())]


class WorkerControl(amp.AMP):
    """
    The worker's end: answers the parent's commands with its L{twistedmesh.service.MeshService}.

    @ivar mesh: the worker's service.
    @ivar exit: called to drain and exit.
    @ivar reloadConfig: given a configuration's text and file name, reloads and returns (or fires with) a
        L{twistedmesh.reload.ReloadResult} or C{(ok, errors)}.
    @ivar lost: called when the parent is gone (the worker then drains and exits too).
    """

    log = Logger()

    def __init__(self, mesh, exit: Callable[[], None],
                 reloadConfig: Callable[[str, str], Any], lost: Optional[Callable[[], None]] = None) -> None:
        super().__init__()
        self.mesh = mesh
        self.exit = exit
        self.reloadConfig = reloadConfig
        self.lost = lost

    @Stats.responder
    def stats(self):
        """
        Every stat of the worker.
        """
        from .stats import clusterSnapshot, snapshot

        return {"stats": snapshot(self.mesh.stats), "clusters": clusterSnapshot(self.mesh.clusters)}

    @Reload.responder
    def reload(self, text: str, file: str):
        """
        Reload from C{text}, and answer with the outcome.
        """
        d = defer.maybeDeferred(self.reloadConfig, text, file)
        d.addCallback(reloadResult)
        d.addErrback(lambda f: (False, False, [f"reload failed: {f.getErrorMessage()}"]))
        return d.addCallback(lambda r: {"ok": r[0], "applied": r[1], "errors": r[2]})

    @HealthCheck.responder
    def healthCheck(self, failed: bool):
        """
        Fail health checks (or pass them again).
        """
        self.mesh.healthCheckFailed = failed
        return {}

    @Drain.responder
    def drain(self, graceful: bool, exit: bool):
        """
        Drain; then exit, if asked.
        """
        if exit:
            self.exit()
        else:
            d = defer.maybeDeferred(self.mesh.drain, graceful)
            d.addErrback(lambda f: self.log.failure("draining", f))
        return {}

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        if self.lost is not None:
            self.lost()


class SupervisorControl(amp.AMP):
    """
    The parent's end of one worker's control connection: hears L{Ready} and tells the worker's slot.
    """

    def __init__(self, slot) -> None:
        super().__init__()
        self.slot = slot

    @Ready.responder
    def ready(self, pid: int):
        """
        The worker is serving.
        """
        self.slot.workerReady(self, pid)
        return {}

    def connectionMade(self) -> None:
        super().connectionMade()
        self.slot.controlConnected(self)

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        self.slot.controlLost(self)
