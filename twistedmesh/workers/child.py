"""
One worker process: C{python -m twistedmesh.workers SPEC}, started by the L{Supervisor}.

SPEC is JSON (see L{Supervisor.spec}). The worker loads the configuration file, drops what the parent runs
(the admin endpoint and the demo upstreams), and runs a L{MeshService} whose listeners listen on the shared
sockets: an inherited descriptor, or a socket of its own with C{SO_REUSEPORT}. It answers the parent's
control commands, and drains and exits on the parent's L{Drain}, on SIGTERM, or when the parent is gone.
SIGINT is ignored: a Ctrl-C in a terminal reaches the whole process group, and the parent coordinates the
drain.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import sys
from types import MappingProxyType
from typing import Any, Dict, List, Optional

from twisted.internet import defer, protocol
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import (FilteringLogObserver, Logger, LogLevel, LogLevelFilterPredicate, globalLogBeginner,
                            jsonFileLogObserver)
from zope.interface import implementer

from ..config import Config, ConfigErrors, loadFile
from .protocol import Ready, WorkerControl
from .sockets import InheritedEndpoint, ReusePortEndpoint, SocketAddress, parseAddress

log = Logger()


def workerConfig(config: Config) -> Config:
    """
    C{config} as a worker runs it: without the admin endpoint and the demo upstreams, which the parent runs.
    """
    mesh = dataclasses.replace(config.mesh, admin=None, admin_tls=None)
    return dataclasses.replace(config, mesh=mesh, echoes=MappingProxyType({}))


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
        # The file as it is now: a worker started again after the file changed runs the new one (or, if
        # it has errors, exits, and is started again after the back-off until the file is fixed).
        mesh = MeshService(workerConfig(loadFile(spec["config"])), reactor,
                           listenerEndpoint=listenerEndpoints(reactor, spec))
    except ConfigErrors as e:
        log.error("worker {index}: invalid configuration:\n{errors}", index=index, errors=e)
        return 2
    mesh.loadConfig = lambda path: workerConfig(loadFile(path))
    mesh.healthCheckFailed = bool(spec.get("healthCheckFailed"))
    draining: List[bool] = []

    def drain() -> None:
        if not draining:
            draining.append(True)
            if reactor.running:
                reactor.stop()  # the shutdown trigger below drains

    control = WorkerControl(mesh, exit=drain, reloadConfig=mesh.reload, lost=drain)
    fd = spec["control"]
    os.set_blocking(fd, False)
    reactor.adoptStreamConnection(fd, socket.AF_UNIX, _One(control))
    os.close(fd)
    reactor.addSystemEventTrigger("before", "shutdown", mesh.stopService)

    def live(_) -> None:
        control.callRemote(Ready, pid=os.getpid()).addErrback(lambda f: None)  # the parent may be gone

    def cannotListen(failure) -> None:
        status[0] = 1  # MeshService logged why and stopped the reactor

    def started() -> None:
        # SIGTERM stops the reactor (which drains) by Twisted's own handler; SIGINT is for the parent.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(mesh.accessLogSinks.reopen))
        mesh.startService()
        mesh.whenLive.addCallbacks(live, cannotListen)

    reactor.callWhenRunning(started)
    reactor.run()
    return status[0]


def main(argv: Optional[List[str]] = None) -> None:
    """
    The worker's entry point: C{argv[1]} is the JSON spec.
    """
    argv = sys.argv if argv is None else argv
    spec = json.loads(argv[1])
    globalLogBeginner.beginLoggingTo([_observer()], redirectStandardIO=False)
    from twisted.internet import reactor

    sys.exit(run(reactor, spec))
