"""
One worker process: C{python -m twistedmesh.workers}, started by the L{Supervisor}, which writes the
worker's SPEC (JSON, see L{Supervisor.spec}) to its standard input and closes it.

The SPEC carries the configuration as text: what the parent read and checked, and last applied. The worker
never reads the configuration file itself, so every worker runs what the parent applied, whatever the file
on disk says when a worker is started again. It builds that text without the parent's parts (the admin
endpoint and the demo upstreams), and runs a L{MeshService} whose listeners listen on the shared sockets:
an inherited descriptor, or a socket of its own with C{SO_REUSEPORT}. It answers the parent's control
commands (a L{Reload} brings the new text along), and drains and exits on the parent's L{Drain}, on
SIGTERM, or when the parent is gone. SIGINT is ignored: a Ctrl-C in a terminal reaches the whole process
group, and the parent coordinates the drain.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import sys
from types import MappingProxyType
from typing import Any, Callable, Dict, List

from twisted.internet import defer, protocol
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import (FilteringLogObserver, Logger, LogLevel, LogLevelFilterPredicate, globalLogBeginner,
                            jsonFileLogObserver)
from zope.interface import implementer

from ..config import Config, ConfigErrors, loadString
from ..tap import freezeStartupObjects
from .protocol import Ready, WorkerControl
from .sockets import InheritedEndpoint, ReusePortEndpoint, SocketAddress, parseAddress

log = Logger()


def workerConfig(config: Config) -> Config:
    """
    C{config} as a worker runs it: without the admin endpoint and the demo upstreams, which the parent runs.
    """
    mesh = dataclasses.replace(config.mesh, admin=None, admin_tls=None)
    return dataclasses.replace(config, mesh=mesh, echoes=MappingProxyType({}))


def reloadFromText(mesh) -> Callable[[str, str], defer.Deferred]:
    """
    The C{reloadConfig} of a worker's L{WorkerControl}: given the configuration's C{text} and the name of
    the C{file} it came from, reload C{mesh} (a L{twistedmesh.service.MeshService}) with that text, built as
    a worker runs it (L{workerConfig}); the file itself is not read.
    """

    def reloadConfig(text: str, file: str) -> defer.Deferred:
        # MeshService.reload builds what its loadConfig hook returns for the path: here, this text.
        mesh.loadConfig = lambda path: workerConfig(loadString(text, path))
        return mesh.reload(file)

    return reloadConfig


@implementer(IStreamServerEndpoint)
class _Unavailable:
    """
    An endpoint a worker cannot listen on: a listener the parent holds no socket for, with inherited
    sockets (the parent would have to make it: that takes a restart).
    """

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def listen(self, factory) -> defer.Deferred:
        return defer.fail(CannotListenError(None, None, ValueError(
            f"{self.endpoint!r} is not a socket the workers inherited: with workers.sharing = inherit, "
            f"a new or changed listener endpoint takes a restart")))


def listenerEndpoints(reactor, spec: Dict[str, Any]):
    """
    The C{listenerEndpoint} hook of the worker's L{MeshService}: for a listener the parent made a socket
    for, an endpoint on that socket (inherited, or one of our own with C{SO_REUSEPORT} on the same
    address); for another (after a reload), a new C{SO_REUSEPORT} socket, which only C{reuseport} allows.
    """
    listeners = spec["listeners"]

    def endpointFor(name: str, endpoint: str) -> IStreamServerEndpoint:
        entry = listeners.get(name)
        if entry is not None and entry["endpoint"] == endpoint:
            address = SocketAddress.fromJSON(entry["address"])
            if entry.get("fd") is not None:
                return InheritedEndpoint(reactor, entry["fd"], address.family)
            return ReusePortEndpoint(reactor, address)
        if spec["sharing"] == "reuseport":
            return ReusePortEndpoint(reactor, parseAddress(endpoint))
        return _Unavailable(endpoint)

    return endpointFor


class _One(protocol.Factory):
    def __init__(self, proto) -> None:
        self.proto = proto

    def buildProtocol(self, addr):
        return self.proto


def _observer():
    # Events as JSON lines on stdout, for the parent to log as its own (see WorkerSlot.childDataReceived);
    # what twistd shows by default: info and above.
    return FilteringLogObserver(jsonFileLogObserver(sys.stdout),
                                [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)])


def run(reactor, spec: Dict[str, Any]) -> int:
    """
    Run the worker described by C{spec} on C{reactor} until it has drained; return the exit status.
    """
    from ..service import MeshService

    index = spec["index"]
    status: List[int] = [0]
    try:
        # The text the parent last applied, not the file as it is now: it may have been edited since (or
        # a reload of it refused), and every worker must run what the parent runs.
        mesh = MeshService(workerConfig(loadString(spec["text"], spec["file"])), reactor,
                           listenerEndpoint=listenerEndpoints(reactor, spec))
    except ConfigErrors as e:
        log.error("worker {index}: invalid configuration:\n{errors}", index=index, errors=e)
        return 2
    mesh.healthCheckFailed = bool(spec.get("healthCheckFailed"))
    draining: List[bool] = []

    def drain() -> None:
        if not draining:
            draining.append(True)
            if reactor.running:
                reactor.stop()  # the shutdown trigger below drains

    control = WorkerControl(mesh, exit=drain, reloadConfig=reloadFromText(mesh), lost=drain)
    fd = spec["control"]
    os.set_blocking(fd, False)
    reactor.adoptStreamConnection(fd, socket.AF_UNIX, _One(control))
    os.close(fd)
    reactor.addSystemEventTrigger("before", "shutdown", mesh.stopService)

    def live(_) -> None:
        # whenLive fires once the listeners accept: with CDS, after its first answer or
        # xds.initial_fetch_timeout (the worker is not Ready while its routes would answer 503).
        control.callRemote(Ready, pid=os.getpid()).addErrback(lambda f: None)  # the parent may be gone

    def cannotListen(failure) -> None:
        status[0] = 1  # MeshService logged why and stopped the reactor

    def started() -> None:
        # SIGTERM stops the reactor (which drains) by Twisted's own handler; SIGINT is for the parent.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(mesh.accessLogSinks.reopen))
        mesh.startService()
        mesh.whenLive.addCallbacks(live, cannotListen)
        freezeStartupObjects()

    reactor.callWhenRunning(started)
    reactor.run()
    return status[0]


def readSpec(stream) -> Dict[str, Any]:
    """
    The worker's SPEC: JSON, the whole of C{stream} (binary), which the parent closes once it has written
    it. (Not on the command line: the configuration text in it may be longer than one argument can be.)
    """
    return json.loads(stream.read().decode("utf-8"))


def main() -> None:
    """
    The worker's entry point: the JSON spec comes on standard input (L{readSpec}).
    """
    # Read before the reactor runs: a blocking read of a pipe at start-up costs nothing.
    spec = readSpec(sys.stdin.buffer)
    globalLogBeginner.beginLoggingTo([_observer()], redirectStandardIO=False)
    from twisted.internet import reactor

    sys.exit(run(reactor, spec))
