"""
The twistd entry point: C{twistd -n twistedmesh --config etc/mesh.ini [--validate]}.

The configuration is loaded and fully checked in L{Options.postOptions}, before the reactor starts, so a
bad file is a list of errors and exit status 1, never a half-started proxy.
"""

from __future__ import annotations

import gc
import os
import signal
import sys

from twisted.internet.testing import MemoryReactorClock
from twisted.application import service
from twisted.python import usage

from .config import Config, ConfigErrors, loadString, readText


def check(path: str) -> Config:
    """
    Load the file at C{path} and build a service from it against a memory reactor (nothing listens or
    connects), which finds every error the loader and the plugins can see.

    @raise ConfigErrors: with every error found.
    """
    return checkText(readText(path), path)


def checkText(text: str, file: str) -> Config:
    """
    L{check} for configuration C{text} already read (C{file} names it in errors).

    @raise ConfigErrors: with every error found.
    """
    from .service import MeshService

    config = loadString(text, file)
    MeshService(config, MemoryReactorClock())
    return config


class Options(usage.Options):
    """
    Command-line options of the twistedmesh twistd plugin.
    """

    synopsis = "[--config FILE] [--validate]"
    optParameters = [["config", "c", "etc/mesh.ini", "The configuration file (INI)."]]
    optFlags = [["validate", None, "Check the configuration, print OK or every error, and exit."]]

    def postOptions(self) -> None:
        try:
            # Read once: with workers, what the parent checked is the very text the workers run.
            self.configText = readText(self["config"])
            self.meshConfig = checkText(self.configText, self["config"])
        except ConfigErrors as e:
            if self["validate"]:
                sys.stderr.write(f"{e}\n{len(e.errors)} error(s)\n")
                raise SystemExit(1)
            raise usage.UsageError(f"invalid configuration:\n{e}")
        if self["validate"]:
            sys.stdout.write("OK\n")
            raise SystemExit(0)


class _Signals(service.MultiService):
    """
    Makes SIGTERM and SIGINT a drain-and-exit-0, as operators of Envoy and nginx expect, SIGUSR1 a
    reopen of the access logs (for logrotate), and SIGHUP a hot reload of the configuration file
    (L{twistedmesh.service.MeshService.reload}; as with nginx, a file that does not build is logged and
    the running configuration stays).

    The reactor's own handlers stop it too, but twistd then re-raises the signal on its way out so the exit
    status says "killed by SIGTERM"; a proxy that drained cleanly should say 0. So once the reactor runs
    (it installs its handlers as it starts), ours replace them.
    """

    def __init__(self, mesh) -> None:
        super().__init__()
        self.mesh = mesh
        mesh.setServiceParent(self)

    def startService(self) -> None:
        super().startService()
        from twisted.internet import reactor

        def install() -> None:
            def stop(signum, frame) -> None:
                reactor.callFromThread(_stop, reactor)

            def reopen(signum, frame) -> None:
                # logrotate moved the access logs away: write to new files of the same names.
                reactor.callFromThread(self.mesh.accessLogSinks.reopen)

            def reload(signum, frame) -> None:
                reactor.callFromThread(self.mesh.reload)

            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, stop)
            signal.signal(signal.SIGUSR1, reopen)
            if hasattr(self.mesh, "reload"):
                signal.signal(signal.SIGHUP, reload)
            freezeStartupObjects()

        reactor.callWhenRunning(install)
        reactor.addSystemEventTrigger("after", "shutdown", self._exitStatus)

    def _exitStatus(self) -> None:
        # A proxy that could not listen must not exit 0 (a supervisor would think it was asked to stop).
        # twistd has no way to set the status, so leave here, once everything else has shut down.
        if getattr(self.mesh, "failedToStart", False):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)


def freezeStartupObjects() -> None:
    """
    Take everything allocated so far out of the garbage collector's full passes. What a proxy builds at
    startup (modules, the configuration, listeners, clusters) lives as long as the process, yet a full
    collection under load would walk all of it: measured, such a pause fell from 19 ms to 0.4 ms. What a
    later reload replaces is collected as usual; only the startup copy, if it holds cycles, stays.
    """
    gc.collect()
    gc.freeze()


def _stop(reactor) -> None:
    if reactor.running:
        reactor.stop()


def makeService(options: Options) -> service.IService:
    """
    The L{twistedmesh.service.MeshService} for the validated configuration.
    """
    from .service import MeshService

    if options.meshConfig.mesh.workers > 1:
        # [mesh] workers = N: this process supervises N worker processes (docs/workers.md).
        from .workers import Supervisor

        return _Signals(Supervisor(options.meshConfig, text=options.configText))
    return _Signals(MeshService(options.meshConfig))
