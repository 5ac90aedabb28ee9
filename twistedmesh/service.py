"""
L{MeshService}: a whole proxy built from a L{Config} — clusters, listeners, demo upstreams and the admin
endpoint — started, hot-reloaded and drained as one Twisted service.

A configuration becomes live objects in one place, L{MeshService._build}, used alike at startup and by
L{MeshService.reload}: a new file is built completely (the kept pieces reused, see L{twistedmesh.reload})
before anything is swapped, so a file that does not build leaves the running proxy untouched.
"""

from __future__ import annotations

import dataclasses
import random
from types import MappingProxyType
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger

from .config import Config, ConfigError, ConfigErrors, loadFile
from .demo import makeEchoFactory
from .filters.health_check import ServerHealthState
from .http.routes import RouteTable
from .http.server import HTTPSettings
from .listener.http import HTTPListenerFactory, http2Settings
from .listener.tcp import TCPListenerFactory
from .reload import ConfigDiff, ReloadResult, diffConfigs, drainCluster
from .tls import ServerTLS
from .observability.accesslog import AccessLogger, AccessLogSinks
from .observability.stats import StatsStore
from .config.tracing import listenerSampleRate
from .observability.export import buildExporter
from .observability.tracing import SpanRecorder
from .plugins import FilterContext, buildChain, factoriesFor
from .config.model import ClusterConfig
from .upstream.cds import CDSSubscription
from .upstream.cluster import Cluster, buildClusters
from .upstream.xds import EDSSubscription, InvalidResource, XDSClient


class _Front(protocol.Factory):
    """
    What a listening port actually listens with: it hands each accepted connection to the factory serving
    the listener now, so a reload can change that factory without closing the socket (no connection is
    refused while it happens).
    """

    noisy = False

    def __init__(self, served: protocol.Factory) -> None:
        self.served = served
        self.listening = False

    def doStart(self) -> None:
        self.listening = True
        self.served.doStart()

    def doStop(self) -> None:
        self.listening = False
        self.served.doStop()

    def buildProtocol(self, addr):
        return self.served.buildProtocol(addr)


class Listening(service.Service):
    """
    One listening socket: an endpoint string and the factory that serves it. Unlike Twisted's
    C{StreamServerEndpointService} it keeps the port so that draining can stop accepting while the
    factory's connections live on, and a reload can hand the socket's new connections to another factory
    (L{switch}).

    @ivar whenListening: the L{Deferred} of the last L{startService}: fires with the port, or fails.
    """

    log = Logger()

    def __init__(self, label: str, endpoint: str, factory, reactor, serverEndpoint=None) -> None:
        self.label = label
        self.endpointString = endpoint
        # serverEndpoint: an IStreamServerEndpoint to use instead of parsing the string (a worker process
        # listens on a socket its supervisor made; see twistedmesh.workers).
        self.endpoint = serverEndpoint if serverEndpoint is not None else serverFromString(reactor, endpoint)
        self.front = _Front(factory)
        self.port = None
        self.whenListening: Optional[defer.Deferred] = None
        self.held = False  # listening but not accepting (see hold)

    @property
    def factory(self):
        """
        The factory serving new connections.
        """
        return self.front.served

    def switch(self, factory) -> None:
        """
        Serve new connections with C{factory} from now on; the previous factory's connections are left to
        it (the caller drains them).
        """
        front = self.front
        previous, front.served = front.served, factory
        if front.listening:
            factory.doStart()
            previous.doStop()

    def startService(self) -> defer.Deferred:
        super().startService()
        d = self.endpoint.listen(self.front)

        def listening(port):
            self.port = port
            if self.held:
                self._pause(port)
            self.log.info("{label} listening on {address}{held}", label=self.label, address=port.getHost(),
                          held=" (not accepting yet)" if self.held else "")
            return port

        d.addCallback(listening)
        self.whenListening = d
        return d

    def hold(self) -> None:
        """
        Listen but do not accept: the socket is bound (its address errors show now) and connecting
        clients wait in its backlog until L{release}.
        """
        self.held = True
        if self.port is not None:
            self._pause(self.port)

    def release(self) -> None:
        """
        Accept connections (after L{hold}).
        """
        if self.held:
            self.held = False
            resume = getattr(self.port, "startReading", None)
            if resume is not None:
                resume()

    @staticmethod
    def _pause(port) -> None:
        pause = getattr(port, "stopReading", None)  # a FileDescriptor port: stop calling accept()
        if pause is not None:
            pause()

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


def _outcome(what: str, listening: defer.Deferred) -> defer.Deferred:
    """
    A L{Deferred} firing with C{(what, None)} once C{listening} fires, or C{(what, failure)} if it fails
    (the failure is then handled here: the reload reports it).
    """
    outcome = defer.Deferred()

    def listened(port):
        outcome.callback((what, None))
        return port

    def failed(failure) -> None:
        outcome.callback((what, failure))

    listening.addCallbacks(listened, failed)
    return outcome


class _BuiltListener:
    """
    One listener as L{MeshService._build} made it: the factory that counts and drains its connections,
    what its socket serves (that factory, or it behind TLS), its TLS and its filter makers.
    """

    def __init__(self, config, factory, served, serverTLS: Optional[ServerTLS], makers: List) -> None:
        self.config = config
        self.factory = factory
        self.served = served
        self.serverTLS = serverTLS
        self.makers = makers
        self.closed = False

    def close(self) -> defer.Deferred:
        """
        Close the makers that hold resources of their own (once), now that no stream uses them.
        """
        if self.closed:
            return defer.succeed(None)
        self.closed = True
        return defer.gatherResults([defer.maybeDeferred(m.close) for m in self.makers if hasattr(m, "close")],
                                   consumeErrors=True)


class _Build:
    """
    Everything a configuration builds before it serves: the clusters, the listeners, the admin site and
    the span exporter. Pieces a reload kept are the running ones, not copies.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.clusters: Dict[str, Cluster] = {}
        self.fresh: List[str] = []  # the clusters built anew
        self.listeners: Dict[str, _BuiltListener] = {}
        self.freshListeners: List[_BuiltListener] = []  # the listeners built anew (not kept)
        self.admin = None  # (site, ServerTLS or None) when the admin endpoint is (re)built
        self.spanExporter = None
        self.freshExporter = False
        self.xds: Optional[XDSClient] = None  # the xDS client: the running one, or a new one for new settings

    def discard(self) -> None:
        """
        The build failed: close what it opened (filter makers of new listeners, a new span exporter).
        """
        for built in self.freshListeners:
            built.close()
        if self.freshExporter and self.spanExporter is not None:
            self.spanExporter.close()


class MeshService(service.MultiService):
    """
    The proxy. Construction builds and checks everything (so it doubles as the deep part of
    C{--validate}: plugins found and configured, endpoints parsed); L{startService} listens;
    L{reload} swaps in a new configuration file; L{drain} and L{stopService} drain.

    @ivar state: C{"STARTING"}, C{"LIVE"} or C{"DRAINING"}, as the admin C{/ready} reports it.
    @ivar healthCheckFailed: set by the admin C{/healthcheck/fail} so that health checks of this proxy fail.
    @ivar lastReload: the L{ReloadResult} of the last L{reload}, or C{None}.
    @ivar config: the configuration in effect: L{fileConfig} plus the clusters from CDS.
    @ivar fileConfig: the configuration as the file gives it (its clusters are the static ones).
    @ivar cdsClusters: the clusters from CDS in effect, by name (empty without C{[mesh] xds.cds}).
    @ivar xds: the link to the control plane (C{[mesh] xds.cluster}), or C{None}; kept across reloads
        while the C{xds.*} keys stay the same.
    @ivar cds: the CDS subscription while C{[mesh] xds.cds} is on, else C{None}.
    """

    log = Logger()

    def __init__(self, config: Config, reactor=None, seed: Optional[int] = None,
                 listenerEndpoint: Optional[Callable[[str, str], IStreamServerEndpoint]] = None) -> None:
        """
        @param listenerEndpoint: given a listener's name and endpoint string, the endpoint it listens on;
            by default the string parsed. A worker process passes one that adopts a shared socket.
        @raise ConfigErrors: with every error the build found.
        """
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.listenerEndpoint = listenerEndpoint
        # What reload reads a file with; a worker process's drops what its supervisor runs (twistedmesh.workers).
        self.loadConfig: Callable[[str], Config] = loadFile
        self.config = config
        self.fileConfig = config
        self.cdsClusters: Dict[str, ClusterConfig] = {}
        self.xds: Optional[XDSClient] = None
        self.cds: Optional[CDSSubscription] = None
        self._awaitingCDS: frozenset = frozenset()  # route clusters CDS has not provided (logged once)
        self.reactor = reactor
        self.stats = StatsStore()
        self.random = random.Random(seed)
        self.state = "STARTING"
        self.healthCheckFailed = False
        self.lastReload: Optional[ReloadResult] = None
        self.listeners: Dict[str, Listening] = {}
        self.echoes: Dict[str, Listening] = {}
        self.admin: Optional[Listening] = None
        self.adminTLS: Optional[ServerTLS] = None
        self.spanExporter = None
        self.clusters: Dict[str, Cluster] = {}
        self._built: Dict[str, _BuiltListener] = {}
        self._retiring: List[_BuiltListener] = []  # replaced or removed by a reload, still draining
        self._drainTimer = None  # aborts what a drain left open after [mesh] drain_timeout
        self._forgetting: Dict[Cluster, object] = {}  # removed clusters whose stats go once they drained
        # At startup with CDS: fires when the first CDS answer is in, or xds.initial_fetch_timeout passed;
        # until then the listeners listen without accepting (None: not waiting).
        self._initialFetch: Optional[defer.Deferred] = None
        self._initialFetchTimer = None
        root = self.stats.root
        self.reloadSuccess = root.counter("server.reload.success")
        self.reloadFailure = root.counter("server.reload.failure")
        manager = self.stats.root.scope("listener_manager")
        self.listenerStats = {kind: manager.counter(f"listener_{kind}") for kind in ("added", "modified", "removed")}
        self.listenersDraining = manager.gauge("total_listeners_draining")
        manager = self.stats.root.scope("cluster_manager")
        self.clusterStats = {kind: manager.counter(f"cluster_{kind}") for kind in ("added", "modified", "removed")}
        self.accessLogSinks = AccessLogSinks(reactor, reactor, self.stats.counter("access_log.dropped"))
        build = self._build(config, None)
        self.clusters.update(build.clusters)
        self.spanExporter = build.spanExporter
        self._adoptXDS(build, ())
        self._built = build.listeners
        for name, built in build.listeners.items():
            self.listeners[name] = self._listen(f"listener {name}", built.config.endpoint, built.served, name)
        for name, econfig in config.echoes.items():
            self.echoes[name] = self._listen(f"echo {name}", econfig.endpoint, makeEchoFactory(econfig))
        if build.admin is not None:
            site, self.adminTLS = build.admin
            self.admin = self._listen("admin", config.mesh.admin, site)
        self.listenerStats["added"].value += len(build.listeners)
        self.clusterStats["added"].value += len(build.clusters)

    # -- building -----------------------------------------------------------------------------------------------

    @property
    def filterMakers(self) -> List:
        """
        Every current listener's filter makers, first listener first.
        """
        return [m for built in self._built.values() for m in built.makers]

    @property
    def serverTLS(self) -> Dict[str, ServerTLS]:
        """
        The downstream TLS of each current listener that has one, by listener name.
        """
        return {name: b.serverTLS for name, b in self._built.items() if b.serverTLS is not None}

    def _build(self, config: Config, diff: Optional[ConfigDiff]) -> _Build:
        """
        Build C{config}: with C{diff} (a reload), only what changed; the kept clusters and listeners are
        the running ones. Nothing is started and nothing listens.

        @raise ConfigErrors: with every error found; what the build opened is closed again.
        """
        build = _Build(config)
        errors: List[ConfigError] = []
        try:
            self._buildInto(build, config, diff, errors)
        except BaseException:
            build.discard()
            raise
        if errors:
            build.discard()
            raise ConfigErrors(errors)
        return build

    def _buildInto(self, build: _Build, config: Config, diff: Optional[ConfigDiff], errors: List[ConfigError]) -> None:
        reactor = self.reactor
        tracingKept = diff is not None and getattr(self.config.mesh, "tracing", None) == config.mesh.tracing
        if tracingKept:
            build.spanExporter = self.spanExporter
        else:
            # [mesh] tracing.provider: one exporter for every listener's spans, flushed when the service stops.
            build.spanExporter = buildExporter(config.mesh.tracing, reactor, self.stats)
            build.freshExporter = True
        spanExporter = build.spanExporter
        kept = frozenset(diff.clusters.kept) if diff is not None else frozenset()
        fresh = {name: c for name, c in config.clusters.items() if name not in kept}
        build.xds = self._xdsClientFor(config)
        made = buildClusters(fresh, reactor, self.stats, self.random, config.tls, xds=config.mesh.xds,
                             existing=self.clusters, xdsClient=build.xds)
        build.fresh = list(made)
        # In the file's order; a kept cluster is the running object (pools, health, outlier state, stats).
        build.clusters = {name: made[name] if name in made else self.clusters[name] for name in config.clusters}
        keptListeners = frozenset(diff.listeners.kept) if diff is not None else frozenset()
        for name, lconfig in config.listeners.items():
            if name in keptListeners:
                build.listeners[name] = self._built[name]
                # Kept, so its filters are not configured again: the cluster its tcp_proxy names (checked
                # when it was built) must still be there, as a rebuild would require.
                for fname in lconfig.filters:
                    fconfig = config.filters.get(fname)
                    if fconfig is not None and fconfig.type == "tcp_proxy":
                        wanted = fconfig.items.get("cluster", lconfig.cluster)
                        if wanted is not None and wanted.strip() not in config.clusters:
                            errors.append(ConfigError(config.file, fconfig.section or f"filter:{fname}", "cluster",
                                                      f"no cluster named `{wanted.strip()}`"))
                continue
            factories = factoriesFor(lconfig.protocol, errors, config.file)
            routes = None
            if lconfig.routes is not None:
                routes = RouteTable(config.routes[lconfig.routes])
            # Filters look clusters up in the live mapping (L{_swap} updates it in place): a change of
            # clusters does not rebuild the listener, and a stream keeps the cluster it picked. Options are
            # checked against the clusters of this build.
            context = FilterContext(reactor, self.stats, self.clusters, lconfig, self.random, routes,
                                    healthState=ServerHealthState(self), clusterNames=build.clusters.keys())
            makers = buildChain(config, lconfig, factories, context, errors)
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
                    spans=None if spanExporter is None else SpanRecorder(
                        spanExporter, None, config.mesh.tracing.node_id or config.mesh.tracing.service_name),
                    forwardClientCert=lconfig.forward_client_cert,
                    traceSampleRate=listenerSampleRate(config.mesh.tracing, lconfig.tracing_sample_rate),
                )
                factory = HTTPListenerFactory(settings, self.stats, http2Settings(lconfig.http2))
            served, serverTLS = factory, None
            if lconfig.tls is not None:
                # One ServerTLS per listener: its contexts are built here, once; its ssl.* stats are the
                # listener's.
                try:
                    serverTLS = ServerTLS(config.tls[lconfig.tls], reactor, self.stats.scope("listener", name))
                except ValueError as e:  # the files changed since the config was loaded
                    errors.append(ConfigError(config.file, f"tls:{lconfig.tls}", None, str(e)))
                    build.freshListeners.append(_BuiltListener(lconfig, factory, factory, None, makers))
                    continue
                served = serverTLS.wrapFactory(factory, reactor)
            built = build.listeners[name] = _BuiltListener(lconfig, factory, served, serverTLS, makers)
            build.freshListeners.append(built)
        if config.mesh.admin is not None and (diff is None or diff.admin):
            from .admin import makeAdminSite

            site = makeAdminSite(self, reactor)
            adminTLS = None
            if config.mesh.admin_tls is not None:
                # Like a listener's: the admin's ssl.* stats go under admin., its files are reloaded too.
                try:
                    adminTLS = ServerTLS(config.tls[config.mesh.admin_tls], reactor, self.stats.root.scope("admin"))
                except ValueError as e:  # the files changed since the config was loaded
                    errors.append(ConfigError(config.file, f"tls:{config.mesh.admin_tls}", None, str(e)))
                    return
                site = adminTLS.wrapFactory(site, reactor)
            build.admin = (site, adminTLS)

    def _listening(self, label: str, endpoint: str, factory, listener: Optional[str] = None) -> Listening:
        serverEndpoint = None
        if listener is not None and self.listenerEndpoint is not None:
            serverEndpoint = self.listenerEndpoint(listener, endpoint)
        listening = Listening(label, endpoint, factory, self.reactor, serverEndpoint)
        if listener is not None and self._initialFetch is not None:
            listening.hold()  # added by a reload while the first CDS answer is awaited: likewise
        return listening

    def _listen(self, label: str, endpoint: str, factory, listener: Optional[str] = None) -> Listening:
        listening = self._listening(label, endpoint, factory, listener)
        listening.setServiceParent(self)
        return listening

    # -- starting -----------------------------------------------------------------------------------------------

    def _startCluster(self, cluster: Cluster) -> None:
        if cluster.healthChecker is not None:
            cluster.healthChecker.start()
        if cluster.outlier is not None:
            cluster.outlier.start()
        if cluster.tls is not None:
            cluster.tls.startReloading()
        start = getattr(cluster, "start", None)  # discovery (DNS, xDS)
        if start is not None:
            start()

    def _stopCluster(self, cluster: Cluster) -> None:
        if cluster.healthChecker is not None:
            cluster.healthChecker.stop()
        if cluster.outlier is not None:
            cluster.outlier.stop()
        if cluster.tls is not None:
            cluster.tls.stopReloading()
        stop = getattr(cluster, "stop", None)
        if stop is not None:
            stop()

    def startService(self) -> None:
        """
        Listen on every endpoint; the state turns C{LIVE} once all of them are listening and, with CDS, once
        the first CDS answer is in or C{xds.initial_fetch_timeout} passed (until then the listeners are
        bound but do not accept; L{whenLive} fires then). A listener that cannot listen (address in use,
        say) stops the process: a proxy missing a listener is not healthy.
        """
        service.Service.startService(self)
        for name, cluster in self.clusters.items():
            self._startCluster(cluster)
            self.log.info("cluster {name}: {hosts} ({policy})", name=name,
                          hosts=", ".join(f"{h.endpoint} weight={h.weight}" for h in cluster.hosts),
                          policy=cluster.config.lb_policy)
        if self.xds is not None and self.xds.cds is not None:
            self.xds.cds.start()
            self._awaitInitialFetch(self.xds.config.initial_fetch_timeout)
        self._noteAwaitingCDS(self.config)
        for tls in self.serverTLS.values():
            tls.startReloading()
        if self.adminTLS is not None:
            self.adminTLS.startReloading()
        ds = [defer.maybeDeferred(s.startService) for s in self]
        d = defer.gatherResults(ds, consumeErrors=True)
        if self._initialFetch is not None:
            # Every socket is bound (an address in use fails the start now), then the wait for CDS.
            fetched = self._initialFetch
            d.addCallback(lambda _: fetched)
        d.addCallbacks(self._live, self._cannotListen)
        self.whenLive = d

    def _awaitInitialFetch(self, timeout: float) -> None:
        """
        Hold the listeners (bound, not accepting) until the first CDS answer or C{timeout} seconds, as
        Envoy's C{initial_fetch_timeout}: routes then find the control plane's clusters from the first
        request on, rather than answering 503 meanwhile. The state stays C{STARTING} (C{/ready} 503).
        """
        if timeout <= 0:
            return
        self._initialFetch = defer.Deferred()
        for listening in self.listeners.values():
            listening.hold()
        self._initialFetchTimer = self.reactor.callLater(timeout, self._initialFetchDone, "timeout")

    def _initialFetchDone(self, why: str) -> None:
        """
        The wait for the first CDS answer is over (C{why}: C{"answered"}, C{"timeout"}, or C{"off"}: CDS
        turned off by a reload): the listeners accept.
        """
        fetched, self._initialFetch = self._initialFetch, None
        if fetched is None:
            return
        timer, self._initialFetchTimer = self._initialFetchTimer, None
        if timer is not None and timer.active():
            timer.cancel()
        if why == "timeout":
            self.log.warn("CDS: no answer from the control plane in xds.initial_fetch_timeout: serving with the "
                          "clusters of the file only")
        if self.state != "DRAINING":
            for listening in self.listeners.values():
                listening.release()
        fetched.callback(None)

    def _live(self, _) -> None:
        if self.state == "STARTING":
            self.state = "LIVE"
            self.log.info("twistedmesh is live: {n} listener(s)", n=len(self.listeners))

    def _cannotListen(self, failure) -> None:
        self.log.failure("twistedmesh cannot start", failure.value.subFailure
                         if hasattr(failure.value, "subFailure") else failure)
        self.failedToStart = True  # the process exits with status 1 (twistedmesh.tap)
        # twistd starts services before it runs the reactor: stop it as soon as it runs, then (stopping
        # only a running reactor left a proxy that could not listen running forever, doing nothing).
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)
        return failure

    # -- xDS: the control plane's client, and clusters from CDS ------------------------------------------------

    def _xdsClientFor(self, config: Config) -> Optional[XDSClient]:
        """
        The xDS client of C{config}: the running one while the C{[mesh] xds.*} keys are the same, else a
        new one (not started: L{_adoptXDS} puts it in effect if the build is swapped in).
        """
        xds = config.mesh.xds
        if xds is None:
            return None
        if self.xds is not None and self.xds.config == xds:
            return self.xds
        return XDSClient(xds, None, self.reactor, self.random)

    def _adoptXDS(self, build: _Build, kept: Sequence[str]) -> None:
        """
        Put the xDS client of C{build} in effect: it polls through the control-plane cluster in effect now;
        a new client (new settings) takes over the EDS subscriptions of the C{kept} clusters, which keep
        their hosts meanwhile, and the old one stops. CDS polls while C{[mesh] xds.cds} is on.
        """
        old, client = self.xds, build.xds
        self.xds = client
        if client is not None:
            client.controlPlane = build.clusters[client.config.cluster]
        if old is not client:
            if old is not None:
                old.stop()
            for name in kept:
                cluster = build.clusters[name]
                if isinstance(cluster.discovery, EDSSubscription) and cluster.discovery.client is not client:
                    cluster.discovery.stop()
                    cluster.discovery = client.subscribe(cluster)
                    if self.running:
                        cluster.discovery.start()
        if client is None or not client.config.cds:
            self.cds = None
            self.cdsClusters = {}
            self._initialFetchDone("off")
        elif client.cds is None:
            self.cds = CDSSubscription(self.stats.root.scope("cluster_manager").scope("cds"), self._applyCDS,
                                       client.config.max_clusters, answered=lambda: self._initialFetchDone("answered"))
            client.watchClusters(self.cds)
            if self.running:
                client.cds.start()

    def _withCDS(self, config: Config, cds: Mapping[str, ClusterConfig]) -> Config:
        """
        C{config} (a file's) with the clusters from CDS added after its own, when it has C{[mesh] xds.cds};
        a cluster the file now declares itself is the file's.
        """
        if config.mesh.xds is None or not config.mesh.xds.cds or not cds:
            return config
        clusters = dict(config.clusters)
        for name, cluster in cds.items():
            if name in clusters:
                self.log.warn("cluster {name} is now a static cluster of {file}: the one from CDS is dropped",
                              name=name, file=config.file)
                continue
            clusters[name] = cluster
        return dataclasses.replace(config, clusters=MappingProxyType(clusters))

    def _applyCDS(self, clusters: Dict[str, ClusterConfig], version: str) -> None:
        """
        Swap in the clusters of an accepted CDS response (the state of the world: a cluster missing from
        it is removed) through the reload machinery: the file's configuration plus C{clusters}, built,
        diffed and swapped, so that unchanged clusters are kept as they are, changed ones rebuilt and
        removed ones drained, and listeners whose routes name them follow.

        @raise InvalidResource: the set cannot be applied (a static cluster's name, or it does not build):
            nothing changed, and the update is rejected.
        """
        if self.state == "DRAINING":
            # As reload: a rebuilt listener would not drain with the others. The process is going away.
            raise InvalidResource("the proxy is draining: cluster updates are not applied")
        static = self.fileConfig.clusters
        for name in clusters:
            if name in static:
                raise InvalidResource(f"cluster {name!r} is a static cluster of {self.fileConfig.file}: the "
                                      f"control plane cannot replace it")
        config = self._withCDS(self.fileConfig, clusters)
        diff = diffConfigs(self.config, config)
        try:
            build = self._build(config, diff)
        except ConfigErrors as e:
            raise InvalidResource("; ".join(str(err) for err in e.errors)) from None
        except Exception as e:  # a bug must not take the running proxy down with it
            self.log.failure("applying CDS version {version} failed", version=version)
            raise InvalidResource(f"{type(e).__name__}: {e}") from None
        self.cdsClusters = dict(clusters)
        self._swap(build, diff).addErrback(lambda f: self.log.failure("applying CDS version {version}", f,
                                                                      version=version))
        if diff.clusters.changed:
            self.log.info("CDS: applied version {version}: {changes}", version=version,
                          changes=diff.clusters.summary())
        self._noteAwaitingCDS(config)

    def _noteAwaitingCDS(self, config: Config) -> None:
        """
        Log the clusters routes name that are not there (yet): with CDS, the control plane is to provide
        them; until then such a route answers 503 C{cluster_not_found}. Logged when the set changes.
        """
        if config.mesh.xds is None or not config.mesh.xds.cds:
            return
        named = set()
        for routes in config.routes.values():
            for route in routes:
                if getattr(route, "cluster", None) is not None:
                    named.add(route.cluster)
                named.update(w.name for w in getattr(route, "clusters", ()))
        awaiting = frozenset(named - set(config.clusters))
        if awaiting != self._awaitingCDS and awaiting:
            self.log.info("routes name clusters that CDS has not provided (503 cluster_not_found until it "
                          "does): {names}", names=", ".join(sorted(awaiting)))
        self._awaitingCDS = awaiting

    # -- hot reload ---------------------------------------------------------------------------------------------

    def reload(self, path: Optional[str] = None) -> defer.Deferred:
        """
        Load the configuration file at C{path} (by default the file in effect, read again), build it as
        startup does and, if it builds, swap it in (SIGHUP and the admin C{POST /reload} call this; so may
        a supervisor over AMP). Never fails: the outcome is the result.

          - A file that does not load or build changes nothing: the previous configuration keeps serving,
            the errors are logged and counted (C{server.reload.failure}).
          - Otherwise, at once (within this call): unchanged clusters and listeners are kept as they are
            (same objects: pools, health and outlier state, connections, stats); a modified listener keeps
            its socket and serves new connections, and new requests on its idle keep-alive connections,
            with the new build, while the streams in flight finish on the build they started with and its
            busy connections are drained (see L{twistedmesh.listener.http.HTTPListenerFactory.adoptIdle});
            changed and removed clusters are retired (health checking stopped, idle connections closed,
            busy ones closed when their request ends); removed listeners stop accepting and drain (aborted
            after C{[mesh] drain_timeout}); filter makers of a retired listener are closed once its
            connections are gone.
          - Then new sockets listen (listeners added or moved to another endpoint, once the sockets they
            replace are closed).

        @param path: the file to read; C{None} for C{self.config.file}.
        @return: a L{Deferred} firing with a L{ReloadResult} once new sockets listen (C{ok} false, with the
            messages, if one could not); it is also kept as L{lastReload}.
        """
        path = path if path is not None else self.config.file
        now = self.reactor.seconds()
        if self.state == "DRAINING":
            return defer.succeed(self._reloaded(ReloadResult(False, False, ("the server is draining",), now, path)))
        diff = None
        try:
            fileConfig = self.loadConfig(path)
            config = self._withCDS(fileConfig, self.cdsClusters)
            diff = diffConfigs(self.config, config)
            build = self._build(config, diff)
        except ConfigErrors as e:
            return defer.succeed(self._reloaded(
                ReloadResult(False, False, tuple(str(err) for err in e.errors), now, path, diff)))
        except Exception as e:  # a plugin's bug must not take the running proxy down with it
            self.log.failure("reload of {file} failed", file=path)
            return defer.succeed(self._reloaded(ReloadResult(False, False, (f"{type(e).__name__}: {e}",), now, path, diff)))
        self.fileConfig = fileConfig
        # A cluster the file now declares is the file's: the control plane's of that name is gone for good.
        cdsClusters = {n: c for n, c in self.cdsClusters.items() if n not in fileConfig.clusters}
        if len(cdsClusters) != len(self.cdsClusters) and self.xds is not None and self.xds.cds is not None:
            self.xds.cds.accepted = None  # the set in effect is no longer the one accepted: judge it again
        self.cdsClusters = cdsClusters
        listening = self._swap(build, diff)
        self._noteAwaitingCDS(config)

        def done(results) -> ReloadResult:
            errors = tuple(f"{what} cannot listen: {f.getErrorMessage()}" for what, f in results if f is not None)
            return self._reloaded(ReloadResult(not errors, True, errors, now, path, diff))

        return listening.addCallback(done)

    def _reloaded(self, result: ReloadResult) -> ReloadResult:
        self.lastReload = result
        if result.ok:
            self.reloadSuccess.value += 1
            self.log.info("reloaded {file}: {changes}", file=result.file, changes=result.diff.summary())
        else:
            self.reloadFailure.value += 1
            self.log.error("reload of {file} failed{kept}:\n{errors}", file=result.file,
                           kept="" if result.applied else ", the previous configuration stays in effect",
                           errors="\n".join(result.errors))
        return result

    def _swap(self, build: _Build, diff: ConfigDiff) -> defer.Deferred:
        """
        Put C{build} in effect (see L{reload}). Synchronous up to the new sockets: the returned L{Deferred}
        fires with a list of C{(what, failure or None)} once they listen.
        """
        config = build.config
        running = self.running
        oldClusters, oldExporter = dict(self.clusters), self.spanExporter
        oldConfig, self.config = self.config, config
        # In place: every listener's filters look clusters up in this one mapping (see _buildInto).
        self.clusters.clear()
        self.clusters.update(build.clusters)
        self.spanExporter = build.spanExporter
        self._adoptXDS(build, diff.clusters.kept)
        for name in diff.clusters.modified + diff.clusters.removed:
            cluster = oldClusters[name]
            self._stopCluster(cluster)
            drainCluster(cluster)
        for name in diff.clusters.removed:
            self._forgetStatsWhenDrained(oldClusters[name], self.reactor.seconds() + self.config.mesh.drain_timeout)
        if running:
            for name in build.fresh:
                self._startCluster(build.clusters[name])
        for kind in ("modified", "added", "removed"):
            self.clusterStats[kind].value += len(getattr(diff.clusters, kind))
            self.listenerStats[kind].value += len(getattr(diff.listeners, kind))

        oldBuilt, self._built = self._built, build.listeners
        retired: List[defer.Deferred] = []
        stopping: List[defer.Deferred] = []
        for name in diff.listeners.modified:
            new, old = build.listeners[name], oldBuilt[name]
            self.listeners[name].switch(new.served)
            if running and new.serverTLS is not None:
                new.serverTLS.startReloading()
            # An idle HTTP/1.1 connection carries on under the new build rather than being closed under a
            # client that may be sending on it right now; not if its TLS changed (a connection accepted
            # without the client certificate the new section asks for must not be served by it).
            oldTLS = oldConfig.tls.get(old.config.tls) if old.config.tls is not None else None
            newTLS = config.tls.get(new.config.tls) if new.config.tls is not None else None
            if (isinstance(new.factory, HTTPListenerFactory) and isinstance(old.factory, HTTPListenerFactory)
                    and oldTLS == newTLS):
                new.factory.adoptIdle(old.factory)
            retired.append(self._retire(old))
        for name in diff.listeners.removed:
            listening = self.listeners.pop(name)
            stopping.append(listening.stopListening())
            if listening.parent is not None:
                listening.disownServiceParent()
            retired.append(self._retire(oldBuilt[name]))
        for name in diff.echoes.modified:
            self.echoes[name].switch(makeEchoFactory(config.echoes[name]))
        for name in diff.echoes.removed:
            listening = self.echoes.pop(name)
            stopping.append(listening.stopListening())
            if listening.parent is not None:
                listening.disownServiceParent()
        if diff.admin:
            if self.adminTLS is not None:
                self.adminTLS.stopReloading()
            if self.admin is not None:
                stopping.append(self.admin.stopListening())
                if self.admin.parent is not None:
                    self.admin.disownServiceParent()
            self.admin, self.adminTLS = None, None
        if oldExporter is not None and oldExporter is not self.spanExporter:
            # Spans of streams still running on the old listeners go to the old exporter: close it after.
            defer.gatherResults(retired).addCallback(lambda _: oldExporter.close()).addErrback(
                lambda f: self.log.failure("closing the previous span exporter", f))

        # New sockets, once the sockets they may replace (same address, another name) are closed.
        pending: List[tuple] = []
        for name in diff.listeners.added:
            built = build.listeners[name]
            listening = self._listening(f"listener {name}", built.config.endpoint, built.served, name)
            self.listeners[name] = listening
            pending.append((f"listener {name}", self.listeners, name, listening, built.serverTLS))
        for name in diff.echoes.added:
            econfig = config.echoes[name]
            listening = self._listening(f"echo {name}", econfig.endpoint, makeEchoFactory(econfig))
            self.echoes[name] = listening
            pending.append((f"echo {name}", self.echoes, name, listening, None))
        if build.admin is not None:
            site, self.adminTLS = build.admin
            self.admin = self._listening("admin", config.mesh.admin, site)
            pending.append(("admin", None, None, self.admin, self.adminTLS))
        if not pending:
            return defer.succeed([])

        def listen(_) -> defer.Deferred:
            ds = []
            for what, where, name, listening, tls in pending:
                current = self.admin if where is None else where.get(name)
                if current is not listening or listening.parent is not None:
                    continue  # replaced by a later reload meanwhile
                listening.setServiceParent(self)  # listens now if the service runs
                if self.running:
                    if tls is not None:
                        tls.startReloading()
                    ds.append(_outcome(what, listening.whenListening))
            return defer.gatherResults(ds)

        return defer.gatherResults(stopping, consumeErrors=True).addBoth(listen)

    def _forgetStatsWhenDrained(self, cluster: Cluster, deadline: float) -> None:
        """
        Drop the stats of a removed cluster (C{cluster.<name>.}) once it has no request or connection left,
        or at C{deadline} (the drain timeout: its requests are the old configuration's), so that a control
        plane rotating cluster names does not grow C{/stats} without end. Not if a cluster of that name is
        in effect by then: the new cluster counts on in those stats (the same objects, by name).
        """
        self._forgetting.pop(cluster, None)
        if self.clusters.get(cluster.name) is not None:
            return
        breaker = cluster.breaker
        busy = breaker.requests.count > 0 or breaker.connections.count > 0 or cluster.upstream_cx_active.value > 0
        now = self.reactor.seconds()
        if busy and now < deadline and self.running:
            self._forgetting[cluster] = self.reactor.callLater(
                min(1.0, deadline - now), self._forgetStatsWhenDrained, cluster, deadline)
            return
        self.stats.removeScope(cluster.stats)

    def _retire(self, built: _BuiltListener) -> defer.Deferred:
        """
        Drain a listener build that a reload replaced or removed: its HTTP connections finish what they
        have and close (HTTP/2 with GOAWAY), what is left after C{[mesh] drain_timeout} is aborted, and
        then its filter makers are closed. Fires when that is done.
        """
        if built.serverTLS is not None:
            built.serverTLS.stopReloading()
        self._retiring.append(built)
        self.listenersDraining.value += 1
        factory = built.factory
        factory.drain()
        timer = self.reactor.callLater(self.config.mesh.drain_timeout, factory.abortAll)

        def drained(_) -> defer.Deferred:
            if timer.active():
                timer.cancel()
            if built in self._retiring:
                self._retiring.remove(built)
                self.listenersDraining.value -= 1
            return built.close()

        d = factory.whenDrained().addCallback(drained)
        d.addErrback(lambda f: self.log.failure("closing the filters of listener {name}", f, name=built.config.name))
        return d

    # -- draining and stopping ----------------------------------------------------------------------------------

    def drain(self, graceful: bool = True) -> defer.Deferred:
        """
        Drain every listener (the admin endpoint excepted), as SIGTERM, C{/quitquitquit} and the admin
        C{POST /drain_listeners} do: the state turns C{DRAINING} (C{/ready} answers 503) and the listeners
        stop accepting. With C{graceful}, live HTTP connections are also asked to finish what they have and
        close (C{connection: close} on their last response, HTTP/2 GOAWAY), and whatever is still open after
        C{[mesh] drain_timeout} is aborted; without, the connections are left to end by themselves. A
        drained server does not come back (reloads are refused); stopping it follows.

        @return: a L{Deferred} that fires with C{None} once no downstream connection is left.
        """
        first = self.state != "DRAINING"
        self.state = "DRAINING"
        stopped = [l.stopListening() for l in self.listeners.values()]
        factories = [b.factory for b in self._built.values()] + [b.factory for b in self._retiring]
        if graceful:
            for factory in factories:
                factory.drain()
            timer = self._drainTimer
            if timer is None or not timer.active():
                def tooLong() -> None:
                    for b in list(self._built.values()) + list(self._retiring):
                        b.factory.abortAll()

                self._drainTimer = self.reactor.callLater(self.config.mesh.drain_timeout, tooLong)
        if first:
            self.log.info("draining{how}", how=" gracefully" if graceful else "")
        drained = [f.whenDrained() for f in factories]

        def done(result):
            timer = self._drainTimer
            if timer is not None and timer.active() and not any(f.connections for f in factories):
                timer.cancel()
            return None

        return defer.gatherResults(drained + stopped, consumeErrors=True).addBoth(done)

    def shutdown(self) -> None:
        """
        Stop the process (admin C{/quitquitquit}); the reactor's shutdown runs L{stopService}, which drains.
        """
        self.reactor.stop()

    def stopService(self) -> defer.Deferred:
        """
        Drain (L{drain}: stop accepting on every listener, give open connections up to C{[mesh]
        drain_timeout} to finish, abort what is left), then stop the clusters, the filters, the echo and
        admin services.
        """
        self.running = 0
        for tls in self.serverTLS.values():
            tls.stopReloading()
        if self.adminTLS is not None:
            self.adminTLS.stopReloading()
        done = self.drain(graceful=True)

        def finished(result):
            timer, self._initialFetchTimer = self._initialFetchTimer, None
            if timer is not None and timer.active():
                timer.cancel()
            for timer in self._forgetting.values():
                timer.cancel()
            self._forgetting.clear()
            if self.xds is not None:
                self.xds.stop()
            for cluster in self.clusters.values():
                self._stopCluster(cluster)
                cluster.pools.closeAll()
            # Filters that keep connections of their own (rate-limit, authorization services) close them.
            closing = [b.close() for b in list(self._built.values()) + list(self._retiring)]
            return defer.gatherResults(
                [defer.maybeDeferred(s.stopService) for s in list(self)] + [self.accessLogSinks.close()] + closing
                + ([self.spanExporter.close()] if self.spanExporter is not None else []),
                consumeErrors=True,
            )

        done.addBoth(finished)
        done.addErrback(lambda f: self.log.failure("error while draining", f))
        return done
