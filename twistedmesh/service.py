"""
L{MeshService}: a whole proxy built from a L{Config} — clusters, listeners, demo upstreams and the admin
endpoint — started and drained as one Twisted service.
"""

from __future__ import annotations

import random
from typing import Dict, List, Optional

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from .config import Config, ConfigError, ConfigErrors
from .demo import makeEchoFactory
from .filters.health_check import ServerHealthState
from .http.routes import RouteTable
from .http.server import HTTPSettings
from .listener.http import HTTPListenerFactory
from .listener.tcp import TCPListenerFactory
from .tls import ServerTLS
from .observability.accesslog import AccessLogger, AccessLogSinks
from .observability.stats import StatsStore
from .plugins import FilterContext, buildChain, factoriesFor
from .upstream.cluster import Cluster, buildClusters


class Listening(service.Service):
    """
    One listening socket: an endpoint string and the factory that serves it. Unlike Twisted's
    C{StreamServerEndpointService} it keeps the port so that draining can stop accepting while the
    factory's connections live on.
    """

    log = Logger()

    def __init__(self, label: str, endpoint: str, factory, reactor) -> None:
        self.label = label
        self.endpointString = endpoint
        self.endpoint = serverFromString(reactor, endpoint)
        self.factory = factory
        self.port = None

    def startService(self) -> defer.Deferred:
        super().startService()
        d = self.endpoint.listen(self.factory)

        def listening(port):
            self.port = port
            self.log.info("{label} listening on {address}", label=self.label, address=port.getHost())
            return port

        return d.addCallback(listening)

    def stopListening(self) -> defer.Deferred:
        """
        Stop accepting new connections; the ones already accepted are left alone.
        """
        port, self.port = self.port, None
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return self.stopListening()


class MeshService(service.MultiService):
    """
    The proxy. Construction builds and checks everything (so it doubles as the deep part of
    C{--validate}: plugins found and configured, endpoints parsed); L{startService} listens;
    L{stopService} drains.

    @ivar state: C{"STARTING"}, C{"LIVE"} or C{"DRAINING"}, as the admin C{/ready} reports it.
    @ivar healthCheckFailed: set by the admin C{/healthcheck/fail} so that health checks of this proxy fail.
    """

    log = Logger()

    def __init__(self, config: Config, reactor=None, seed: Optional[int] = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.config = config
        self.reactor = reactor
        self.stats = StatsStore()
        self.random = random.Random(seed)
        self.state = "STARTING"
        self.healthCheckFailed = False
        self.filterMakers: List = []  # every listener's filter makers, for their close() at stop
        self.listeners: Dict[str, Listening] = {}
        self.serverTLS: Dict[str, ServerTLS] = {}
        self.echoes: Dict[str, Listening] = {}
        self.admin: Optional[Listening] = None
        self.adminTLS: Optional[ServerTLS] = None
        errors: List[ConfigError] = []
        self.accessLogSinks = AccessLogSinks(reactor, reactor, self.stats.counter("access_log.dropped"))
        if config.mesh.workers != 1:
            errors.append(ConfigError(config.file, "mesh", "workers", "only 1 worker is supported so far"))
        self.clusters: Dict[str, Cluster] = buildClusters(config.clusters, reactor, self.stats, self.random,
                                                          config.tls)
        for name, lconfig in config.listeners.items():
            factories = factoriesFor(lconfig.protocol, errors, config.file)
            routes = None
            if lconfig.routes is not None:
                routes = RouteTable(config.routes[lconfig.routes])
            context = FilterContext(reactor, self.stats, self.clusters, lconfig, self.random, routes,
                                    healthState=ServerHealthState(self))
            makers = buildChain(config, lconfig, factories, context, errors)
            self.filterMakers.extend(makers)
            accessLog = None
            if lconfig.access_log is not None:
                try:
                    sink = self.accessLogSinks.get(lconfig.access_log.path, lconfig.access_log.flush_interval)
                except OSError as e:
                    errors.append(ConfigError(config.file, f"listener:{name}", "access_log",
                                              f"cannot open {lconfig.access_log.path!r}: {e.strerror}"))
                else:
                    accessLog = AccessLogger(lconfig.access_log, reactor, reactor, sink=sink)
            if lconfig.protocol == "tcp":
                factory = TCPListenerFactory(lconfig, makers, self.stats, reactor, accessLog)
            else:
                settings = HTTPSettings(
                    name, makers, self.stats, reactor,
                    maxHeaderBytes=lconfig.max_request_headers_size,
                    maxHeaders=lconfig.max_request_headers_count,
                    idleTimeout=lconfig.idle_timeout,
                    requestHeadersTimeout=lconfig.request_headers_timeout,
                    maxRequestsPerConnection=lconfig.max_requests_per_connection,
                    random=self.random,
                    accessLog=accessLog,
                    forwardClientCert=lconfig.forward_client_cert,
                    traceSampleRate=None if lconfig.trace_sampling is None else lconfig.trace_sampling / 100.0,
                )
                factory = HTTPListenerFactory(settings, self.stats)
            if lconfig.tls is not None:
                # One ServerTLS per listener: its contexts are built here, once; its ssl.* stats are the
                # listener's.
                try:
                    serverTLS = ServerTLS(config.tls[lconfig.tls], reactor, self.stats.scope("listener", name))
                except ValueError as e:  # the files changed since the config was loaded
                    errors.append(ConfigError(config.file, f"tls:{lconfig.tls}", None, str(e)))
                    continue
                self.serverTLS[name] = serverTLS
                factory = serverTLS.wrapFactory(factory, reactor)
            self.listeners[name] = self._listen(f"listener {name}", lconfig.endpoint, factory)
        if errors:
            raise ConfigErrors(errors)
        for name, econfig in config.echoes.items():
            self.echoes[name] = self._listen(f"echo {name}", econfig.endpoint, makeEchoFactory(econfig))
        if config.mesh.admin is not None:
            from .admin import makeAdminSite

            factory = makeAdminSite(self, reactor)
            if config.mesh.admin_tls is not None:
                # Like a listener's: the admin's ssl.* stats go under admin., its files are reloaded too.
                try:
                    self.adminTLS = ServerTLS(config.tls[config.mesh.admin_tls], reactor,
                                              self.stats.root.scope("admin"))
                except ValueError as e:  # the files changed since the config was loaded
                    raise ConfigErrors([ConfigError(config.file, f"tls:{config.mesh.admin_tls}", None, str(e))])
                factory = self.adminTLS.wrapFactory(factory, reactor)
            self.admin = self._listen("admin", config.mesh.admin, factory)

    def _listen(self, label: str, endpoint: str, factory) -> Listening:
        listening = Listening(label, endpoint, factory, self.reactor)
        listening.setServiceParent(self)
        return listening

    def startService(self) -> None:
        """
        Listen on every endpoint; the state turns C{LIVE} once all of them are listening. A listener that
        cannot listen (address in use, say) stops the process: a proxy missing a listener is not healthy.
        """
        service.Service.startService(self)
        for cluster in self.clusters.values():
            if cluster.healthChecker is not None:
                cluster.healthChecker.start()
            if cluster.outlier is not None:
                cluster.outlier.start()
        for name, cluster in self.clusters.items():
            self.log.info("cluster {name}: {hosts} ({policy})", name=name,
                          hosts=", ".join(f"{h.endpoint} weight={h.weight}" for h in cluster.hosts),
                          policy=cluster.config.lb_policy)
        for tls in self.serverTLS.values():
            tls.startReloading()
        if self.adminTLS is not None:
            self.adminTLS.startReloading()
        for cluster in self.clusters.values():
            if cluster.tls is not None:
                cluster.tls.startReloading()
        ds = [defer.maybeDeferred(s.startService) for s in self]
        d = defer.gatherResults(ds, consumeErrors=True)
        d.addCallbacks(self._live, self._cannotListen)
        self.whenLive = d

    def _live(self, _) -> None:
        if self.state == "STARTING":
            self.state = "LIVE"
            self.log.info("twistedmesh is live: {n} listener(s)", n=len(self.listeners))

    def _cannotListen(self, failure) -> None:
        self.log.failure("twistedmesh cannot start", failure.value.subFailure
                         if hasattr(failure.value, "subFailure") else failure)
        if self.reactor.running:
            self.reactor.stop()
        return failure

    def shutdown(self) -> None:
        """
        Stop the process (admin C{/quitquitquit}); the reactor's shutdown runs L{stopService}, which drains.
        """
        self.reactor.stop()

    def stopService(self) -> defer.Deferred:
        """
        Drain: stop accepting on every listener, give open connections up to C{[mesh] drain_timeout} to
        finish, abort what is left, then stop the echo and admin services.
        """
        self.state = "DRAINING"
        self.running = 0
        for tls in self.serverTLS.values():
            tls.stopReloading()
        if self.adminTLS is not None:
            self.adminTLS.stopReloading()
        for cluster in self.clusters.values():
            if cluster.tls is not None:
                cluster.tls.stopReloading()
        stopped = [l.stopListening() for l in self.listeners.values()]
        for l in self.listeners.values():
            l.factory.drain()
        drained = [l.factory.whenDrained() for l in self.listeners.values()]
        done = defer.gatherResults(drained + stopped, consumeErrors=True)
        timeout = self.config.mesh.drain_timeout

        def tooLong() -> None:
            for l in self.listeners.values():
                l.factory.abortAll()

        timer = self.reactor.callLater(timeout, tooLong)

        def finished(result):
            if timer.active():
                timer.cancel()
            for cluster in self.clusters.values():
                if cluster.healthChecker is not None:
                    cluster.healthChecker.stop()
                if cluster.outlier is not None:
                    cluster.outlier.stop()
                cluster.pools.closeAll()
            # Filters that keep connections of their own (rate-limit, authorization services) close them.
            closing = [defer.maybeDeferred(m.close) for m in self.filterMakers if hasattr(m, "close")]
            return defer.gatherResults(
                [defer.maybeDeferred(s.stopService) for s in list(self)] + [self.accessLogSinks.close()] + closing,
                consumeErrors=True,
            )

        done.addBoth(finished)
        done.addErrback(lambda f: self.log.failure("error while draining", f))
        return done
