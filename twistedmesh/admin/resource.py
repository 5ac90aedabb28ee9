"""
The admin web interface: Envoy's admin paths (C{/ready}, C{/stats}, C{/stats/prometheus}, C{/clusters},
C{/config_dump}, C{/healthcheck/fail}, C{/healthcheck/ok}, C{/quitquitquit}) on plain C{twisted.web}.

Nothing here is on the proxy's hot path: every response is computed whole, per request, from the server's
live objects. Endpoints that change the proxy accept only C{POST}, so that a page elsewhere cannot stop
the proxy with an C{<img src=".../quitquitquit">}; and they refuse a C{POST} that a browser says another
site's page sent (L{crossSiteRefusal}), so that such a page cannot stop it with a form either. Every
request must name the admin by an address or an allowed name in its C{Host} header (L{hostRefusal}), so
that a page whose own name was made to resolve to the admin's address (DNS rebinding), and is therefore
same-origin with it, can neither drive nor read it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
from collections.abc import Mapping
from typing import Any, Callable, Collection, Dict, List, NamedTuple, Optional, Protocol, Tuple
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.internet.address import UNIXAddress
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from ..config import Config
from ..observability.prometheus import CONTENT_TYPE as PROMETHEUS_CONTENT_TYPE
from ..observability.prometheus import PrometheusExporter
from ..observability.stats import Histogram, Stat, StatsStore
from ..upstream.cluster import Cluster, Host
from .dashboard import CONTENT_SECURITY_POLICY, DEFAULT_REFRESH, RateSampler, renderDashboard

TEXT = b"text/plain; charset=utf-8"
HTML = b"text/html; charset=utf-8"
JSON = b"application/json"
REDACTED = "[redacted]"

# A key is a secret if its name, lowercased and without "_" or "-", contains one of these.
_SECRET_WORDS = ("privatekey", "password", "secret", "token")
# ...except the token-bucket settings of local_ratelimit, which are counts, not credentials, and which an
# operator reading the dump needs to see.
_NOT_SECRET = frozenset({"max_tokens", "tokens_per_fill"})
# A secret parameter inside a Twisted endpoint string, as in
# "tls:host=a:port=443:certificate=c.pem:privateKey=k.pem"; "\:" escapes a colon inside a value.
_SECRET_PARAMETER = re.compile(r"((?:^|:)privateKey=)((?:\\.|[^:\\])*)", re.IGNORECASE)
#: The C{Sec-Fetch-Site} values of a request that no other site's page made: one from a page of the admin
#: itself, or one the user made (typed in, a bookmark).
_NOT_CROSS_SITE = frozenset({b"same-origin", b"none"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_WHO_MAY_POST = ("the admin's POST endpoints take requests from its own pages, or from clients that send no "
                 "Origin (curl)")
#: A C{Host} header: an IPv6 literal in brackets, or anything else without a colon; an optional port.
_HOST_HEADER = re.compile(r"^(?:\[([0-9A-Fa-f:.]+)\]|([^:\[\]]+))(?::[0-9]*)?$")
_WHO_MAY_ASK = ("the admin answers requests for an IP address, localhost, or a name listed in [mesh] "
                "admin.allowed_hosts (a web page whose name was made to resolve to this address must not reach it)")


class AdminServer(Protocol):
    """
    What the admin interface needs of the server it shows (L{twistedmesh.service.MeshService} is one).

    @ivar stats: every stat of the server.
    @ivar clusters: the clusters by name.
    @ivar config: the configuration in effect, if any.
    @ivar state: C{"STARTING"}, C{"LIVE"} or C{"DRAINING"}.
    @ivar healthCheckFailed: set by C{/healthcheck/fail}, cleared by C{/healthcheck/ok}.

    A server may also have C{reload()} (for C{POST /reload}: a result or Deferred of one with C{asJSON()}),
    C{drain(graceful)} (for C{POST /drain_listeners}) and C{lastReload} (shown by C{/config_dump}), as
    L{twistedmesh.service.MeshService} does; the endpoints exist only when it does.
    """

    stats: StatsStore
    clusters: Mapping[str, Cluster]
    config: Optional[Config]
    state: str
    healthCheckFailed: bool

    def shutdown(self) -> None:
        """
        Ask the process to stop (it drains first).
        """


class _Endpoint(NamedTuple):
    method: bytes
    render: Callable[[Request], bytes]
    help: str


class AdminResource(Resource):
    """
    The whole admin interface, as one leaf resource that dispatches on the path below it (so it also works
    mounted under another resource).

    @ivar proxy: the server it shows and drives (an L{AdminServer}).
    """

    isLeaf = True
    log = Logger()

    def __init__(self, server: AdminServer, reactor: IReactorTime) -> None:
        super().__init__()
        # Not "server": Resource.putChild overwrites that attribute of a child with its parent's.
        self.proxy = server
        self.reactor = reactor
        self.prometheus = PrometheusExporter(server.stats)
        # The dashboard's rates; the site starts and stops its timer as it starts and stops listening.
        self.rates = RateSampler(server, reactor)
        self.endpoints: Dict[bytes, _Endpoint] = {
            b"/": _Endpoint(b"GET", self.renderHome, "the dashboard (HTML): listeners, clusters, health, rates"),
            b"/help": _Endpoint(b"GET", self.renderHelp, "this list of admin commands"),
            b"/clusters": _Endpoint(b"GET", self.renderClusters,
                                    "upstream cluster status (?format=json)"),
            b"/config_dump": _Endpoint(b"GET", self.renderConfigDump,
                                       "the configuration in effect, as JSON, secrets redacted"),
            b"/healthcheck/fail": _Endpoint(b"POST", self.renderHealthCheckFail,
                                            "make this proxy's health checks fail"),
            b"/healthcheck/ok": _Endpoint(b"POST", self.renderHealthCheckOk,
                                          "make this proxy's health checks pass again"),
            b"/quitquitquit": _Endpoint(b"POST", self.renderQuit, "drain and exit the server"),
            b"/ready": _Endpoint(b"GET", self.renderReady, "LIVE if the server is ready, 503 otherwise (DRAINING while it drains)"),
            b"/stats": _Endpoint(b"GET", self.renderStats,
                                 "the stats (?filter=REGEX, ?usedonly, ?format=json|prometheus)"),
            b"/stats/prometheus": _Endpoint(b"GET", self.renderPrometheus,
                                            "the stats in Prometheus format (?filter=REGEX, ?usedonly)"),
        }
        # Servers that can reload and drain (twistedmesh.service.MeshService) get the endpoints for it.
        if hasattr(server, "reload"):
            self.endpoints[b"/reload"] = _Endpoint(
                b"POST", self.renderReload, "load the configuration file again and swap it in (JSON result)")
        if hasattr(server, "drain"):
            self.endpoints[b"/drain_listeners"] = _Endpoint(
                b"POST", self.renderDrainListeners,
                "stop accepting on every listener (?graceful: also close connections as they finish)")

    def render(self, request: Request) -> bytes:
        """
        Dispatch on path and method. C{HEAD} is answered as C{GET} without the body; a method an endpoint
        does not take gets 405 with an C{Allow} header; an unknown path gets 404 with the list of paths; a
        C{POST} another site's page sent gets 403 with the reason (L{crossSiteRefusal}). Before all that,
        a request whose C{Host} is not this admin's gets 421 with the reason (L{hostRefusal}).
        """
        path = b"/" + b"/".join(request.postpath)
        refusal = hostRefusal(request, _allowedHosts(self.proxy))
        if refusal is not None:
            self.log.warn("admin: refused {method} {path}: {why}", method=_printable(request.method).decode(),
                          path=_printable(path).decode(), why=refusal)
            return _respond(request, 421, TEXT, f"{refusal}\n".encode(), b"Misdirected Request")
        endpoint = self.endpoints.get(path)
        if endpoint is None:
            return _respond(request, 404, TEXT, b"unknown path " + _printable(path) + b"\n" + self._help())
        method = request.method
        allowed = (b"GET", b"HEAD") if endpoint.method == b"GET" else (b"POST",)
        if method not in allowed:
            request.setHeader(b"Allow", b", ".join(allowed))
            return _respond(request, 405, TEXT,
                            b"method not allowed: use " + b" or ".join(allowed) + b"\n")
        if method == b"POST":
            refusal = crossSiteRefusal(request)
            if refusal is not None:
                self.log.warn("admin: refused POST {path}: {why}", path=_printable(path).decode(), why=refusal)
                return _respond(request, 403, TEXT, f"{refusal}\n".encode())
        collect = getattr(self.proxy, "collectStats", None)
        if collect is not None and endpoint.render in (self.renderStats, self.renderPrometheus, self.renderClusters):
            return self._renderCollected(request, endpoint, collect)
        body = endpoint.render(request)
        if method == b"HEAD":
            request.setHeader(b"Content-Length", b"%d" % (len(body),))
            return b""
        return body

    def _renderCollected(self, request: Request, endpoint: _Endpoint, collect) -> Any:
        """
        Stats and clusters of a server of several processes (L{twistedmesh.workers.Supervisor}): gathered
        from its workers first (summed, or one worker's stats with C{?worker=N}), then rendered.
        """
        clusters = endpoint.render == self.renderClusters
        try:
            d = collect(None if clusters else _arg(request, b"worker"))
        except ValueError as e:
            return _respond(request, 400, TEXT, f"{e}\n".encode())
        gone: List[bool] = []
        request.notifyFinish().addErrback(lambda f: gone.append(True))

        def rendered(stats: StatsStore) -> None:
            if gone:
                return
            body = endpoint.render(request) if clusters else endpoint.render(request, stats)
            if request.method == b"HEAD":
                request.setHeader(b"Content-Length", b"%d" % (len(body),))
            else:
                request.write(body)
            request.finish()

        def failed(failure) -> None:
            if not gone:
                request.write(_respond(request, 500, TEXT, f"cannot gather stats: {failure.getErrorMessage()}\n".encode()))
                request.finish()

        d.addCallback(rendered).addErrback(failed)
        return NOT_DONE_YET

    def _help(self) -> bytes:
        lines = ["admin commands are:"]
        for path, endpoint in sorted(self.endpoints.items()):
            method = " (POST)" if endpoint.method == b"POST" else ""
            lines.append(f"  {path.decode()}{method}: {endpoint.help}")
        return ("\n".join(lines) + "\n").encode()

    def renderHome(self, request: Request) -> bytes:
        """
        C{GET /}: the dashboard (L{twistedmesh.admin.dashboard}), reloading itself every C{?refresh=N}
        seconds (default 5, 0 for never).
        """
        refresh = _arg(request, b"refresh")
        try:
            seconds = DEFAULT_REFRESH if refresh is None else int(refresh)
        except ValueError:
            seconds = -1
        if not 0 <= seconds <= 3600:
            return _respond(request, 400, TEXT, b"refresh must be a whole number of seconds, 0 to 3600\n")
        endpoints = [(path.decode(), endpoint.method.decode(), endpoint.help)
                     for path, endpoint in sorted(self.endpoints.items())]
        body = renderDashboard(self.proxy, self.rates, endpoints, redactEndpoint, _health, seconds)
        request.setHeader(b"Content-Security-Policy", CONTENT_SECURITY_POLICY)
        return _respond(request, 200, HTML, body)

    def renderHelp(self, request: Request) -> bytes:
        """
        C{GET /help}: the list of admin commands, as text.
        """
        return _respond(request, 200, TEXT, self._help())

    def renderReady(self, request: Request) -> bytes:
        """
        C{GET /ready}: 200 C{LIVE} once the server is live, else 503 with its state.
        """
        state = self.proxy.state
        return _respond(request, 200 if state == "LIVE" else 503, TEXT, f"{state}\n".encode())

    def renderStats(self, request: Request, source: Optional[StatsStore] = None) -> bytes:
        """
        C{GET /stats}: C{name: value} lines sorted by name, then (as Envoy orders them) one line per histogram
        with its estimated quantiles, C{name: P0(x) P25(x) ... P100(x)} (see L{Histogram.quantile}), or
        C{name: No recorded values}. Envoy prints each quantile as C{(interval,cumulative)}; only the
        cumulative figure is kept here. With C{?format=json}, C{{"stats": [{"name", "value"}, ...],
        "histograms": [{"name", "quantiles", "count", "sum"}, ...]}}, quantiles C{null} while a histogram
        is empty. C{?format=prometheus} is L{renderPrometheus}. C{source}: the stats to show, if not the server's.
        """
        include, error = _statsFilter(request)
        if error is not None:
            return _respond(request, 400, TEXT, error)
        fmt = _arg(request, b"format")
        if fmt == "prometheus":
            return self.renderPrometheus(request, source)
        if fmt not in (None, "text", "json"):
            return _respond(request, 400, TEXT, b"format must be text, json or prometheus\n")
        stats: List[Stat] = []
        histograms: List[Histogram] = []
        for s in self.proxy.stats if source is None else source:
            if include is None or include(s):
                (histograms if s.kind == "histogram" else stats).append(s)
        if fmt == "json":
            body = {
                "stats": [{"name": s.name, "value": s.value} for s in stats],
                "histograms": [_histogramJSON(h) for h in histograms],
            }
            return _respond(request, 200, JSON, _json(body))
        lines = [f"{s.name}: {s.value}\n" for s in stats]
        lines.extend(f"{h.name}: {_histogramText(h)}\n" for h in histograms)
        return _respond(request, 200, TEXT, "".join(lines).encode())

    def renderPrometheus(self, request: Request, source: Optional[StatsStore] = None) -> bytes:
        """
        C{GET /stats/prometheus}: the Prometheus text exposition (of C{source}, if not the server's stats).
        """
        include, error = _statsFilter(request)
        if error is not None:
            return _respond(request, 400, TEXT, error)
        exporter = self.prometheus if source is None else PrometheusExporter(source)
        return _respond(request, 200, PROMETHEUS_CONTENT_TYPE.encode(), exporter.generate(include))

    def renderClusters(self, request: Request) -> bytes:
        """
        C{GET /clusters}: every host of every cluster with its figures and health, in Envoy's
        C{cluster::host::stat::value} text format or, with C{?format=json}, as JSON.
        """
        clusters = sorted(self.proxy.clusters.values(), key=lambda c: c.name)
        fmt = _arg(request, b"format")
        if fmt == "json":
            body = {"cluster_statuses": [
                {"name": c.name, "host_statuses": [_hostStatus(h) for h in c.hosts]} for c in clusters
            ]}
            return _respond(request, 200, JSON, _json(body))
        if fmt not in (None, "text"):
            return _respond(request, 400, TEXT, b"format must be text or json\n")
        lines = []
        for cluster in clusters:
            for host in cluster.hosts:
                prefix = f"{cluster.name}::{redactEndpoint(host.endpoint)}::"
                lines.extend(f"{prefix}{name}::{getattr(host, name)}" for name in Host.STATS)
                lines.append(f"{prefix}weight::{host.weight}")
                lines.append(f"{prefix}health_flags::{_health(host)}")
                lines.append(f"{prefix}health_reason::{host.healthReason}")
        return _respond(request, 200, TEXT, "".join(line + "\n" for line in lines).encode())

    def renderConfigDump(self, request: Request) -> bytes:
        """
        C{GET /config_dump}: the configuration in effect as JSON (C{{}} if there is none), with secrets
        redacted (see L{redact}).
        """
        config = self.proxy.config
        dump = redact(config) if config is not None else {}
        if hasattr(self.proxy, "lastReload"):
            # The outcome of the last hot reload (None before any): a file that did not build is reported
            # here while the configuration above stays in effect.
            last = self.proxy.lastReload
            dump["last_reload"] = last.asJSON() if hasattr(last, "asJSON") else last
        return _respond(request, 200, JSON, _json(dump))

    def renderReload(self, request: Request) -> Any:
        """
        C{POST /reload}: read the configuration file again and swap it in (see
        L{twistedmesh.service.MeshService.reload}); answer, once the new sockets listen, 200 with the
        result as JSON, or 400 with the errors when the file did not build (the previous configuration
        stays in effect), or 500 when it was swapped in but a new listener cannot listen.
        """
        gone: List[bool] = []
        request.notifyFinish().addErrback(lambda f: gone.append(True))

        def done(result) -> None:
            if gone:
                return
            body = result.asJSON() if hasattr(result, "asJSON") else result
            code = 200 if body.get("ok") else 400 if not body.get("applied") else 500
            request.write(_respond(request, code, JSON, _json(body)))
            request.finish()

        def failed(failure) -> None:
            if not gone:
                request.write(_respond(request, 500, TEXT, f"reload failed: {failure.getErrorMessage()}\n".encode()))
                request.finish()

        defer.maybeDeferred(self.proxy.reload).addCallback(done).addErrback(failed)
        return NOT_DONE_YET

    def renderDrainListeners(self, request: Request) -> bytes:
        """
        C{POST /drain_listeners}: stop accepting on every listener (the admin endpoint excepted) and turn
        C{/ready} to 503 C{DRAINING}; with C{?graceful}, also ask live connections to finish and close,
        aborting what is left after C{[mesh] drain_timeout} (see L{twistedmesh.service.MeshService.drain}).
        Answers at once; the draining goes on.
        """
        d = defer.maybeDeferred(self.proxy.drain, _flag(request, b"graceful"))
        d.addErrback(lambda f: self.proxy.log.failure("draining the listeners", f)
                     if hasattr(self.proxy, "log") else None)
        return _respond(request, 200, TEXT, b"OK\n")

    def renderHealthCheckFail(self, request: Request) -> bytes:
        """
        C{POST /healthcheck/fail}: make health checks of this proxy fail (to take it out of rotation).
        """
        self.proxy.healthCheckFailed = True
        return _respond(request, 200, TEXT, b"OK\n")

    def renderHealthCheckOk(self, request: Request) -> bytes:
        """
        C{POST /healthcheck/ok}: undo C{/healthcheck/fail}.
        """
        self.proxy.healthCheckFailed = False
        return _respond(request, 200, TEXT, b"OK\n")

    def renderQuit(self, request: Request) -> bytes:
        """
        C{POST /quitquitquit}: answer, then ask the server to shut down on the next reactor turn so that the
        answer is written first.
        """
        self.reactor.callLater(0, self.proxy.shutdown)
        return _respond(request, 200, TEXT, b"OK\n")


class AdminSite(Site):
    """
    A L{Site} without the per-request access log and the factory start/stop messages: the admin interface
    is polled (readiness probes, scrapes), and a line per poll would drown the proxy's own log.
    """

    noisy = False
    displayTracebacks = False

    def log(self, request: Request) -> None:
        """
        Log nothing for each request.
        """

    def startFactory(self) -> None:
        """
        Start the dashboard's rate readings along with listening.
        """
        super().startFactory()
        self.resource.rates.start()

    def stopFactory(self) -> None:
        """
        Stop the dashboard's rate readings when no longer listening.
        """
        self.resource.rates.stop()
        super().stopFactory()


def makeAdminSite(server: AdminServer, reactor: IReactorTime) -> Site:
    """
    The admin interface of C{server} as a L{Site} to listen with. C{reactor} schedules the shutdown that
    C{/quitquitquit} asks for and the connections' idle timeouts.
    """
    return AdminSite(AdminResource(server, reactor), logPath=None, reactor=reactor)


def redactEndpoint(endpoint: str) -> str:
    """
    C{endpoint}, a Twisted endpoint string, with the value of any C{privateKey=} parameter replaced by
    C{[redacted]}.
    """
    return _SECRET_PARAMETER.sub(lambda m: m.group(1) + REDACTED, endpoint)


def isSecretKey(key: str) -> bool:
    """
    Whether a configuration key names a secret: its name holds C{private_key}, C{password}, C{secret} or
    C{token} (in any case, with or without C{_} or C{-}), the token-bucket counts excepted.
    """
    if key in _NOT_SECRET:
        return False
    folded = key.lower().replace("_", "").replace("-", "")
    return any(word in folded for word in _SECRET_WORDS)


def redact(value: Any) -> Any:
    """
    C{value} (a config dataclass, mapping, sequence or scalar) as plain JSON-able data: dataclasses and
    mappings (C{MappingProxyType} included) become dicts, tuples become lists; the value of every key
    L{isSecretKey} accepts becomes C{[redacted]}, at any depth, and so does every endpoint string's
    C{privateKey} (see L{redactEndpoint}).
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _redactItems((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, Mapping):
        return _redactItems((str(k), v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redactEndpoint(value)
    return value


def _redactItems(items) -> Dict[str, Any]:
    return {key: REDACTED if isSecretKey(key) else redact(v) for key, v in items}


def _hostStatus(host: Host) -> Dict[str, Any]:
    return {
        "address": redactEndpoint(host.endpoint),
        "weight": host.weight,
        "health": _health(host),
        "health_reason": host.healthReason,
        "stats": {name: getattr(host, name) for name in Host.STATS},
    }


def _health(host: Host) -> str:
    # Envoy's format: "healthy", or each flag after a slash ("/failed_active_hc/pending_active_hc").
    if host.healthFlags:
        return "".join("/" + flag for flag in sorted(host.healthFlags))
    return "healthy" if host.healthy else "unhealthy"


def _statsFilter(request: Request) -> Tuple[Optional[Callable[[Stat], bool]], Optional[bytes]]:
    """
    The predicate that C{?filter=REGEX} and C{?usedonly} ask for (C{None} for all stats), or an error
    message for a bad request.
    """
    tests: List[Callable[[Stat], bool]] = []
    pattern = _arg(request, b"filter")
    if pattern is not None:
        try:
            regex = re.compile(pattern)
        except re.error as e:
            return None, f"invalid filter regex {pattern!r}: {e}\n".encode()
        tests.append(lambda s: regex.search(s.name) is not None)
    if _flag(request, b"usedonly"):
        tests.append(lambda s: s.used)
    if not tests:
        return None, None
    return (lambda s: all(test(s) for test in tests)), None


def _round(value: float) -> float:
    """
    A quantile estimate rounded to six significant digits: the estimate is no finer, and float noise
    (C{242.49999999999997}) goes.
    """
    return float(f"{value:.6g}")


def _quantile(value: float) -> Optional[float]:
    """
    A quantile estimate as JSON shows it: L{_round}ed, or C{None} (C{null}) for the NaN of an empty histogram.
    """
    return None if value != value else _round(value)


def _histogramText(histogram: Histogram) -> str:
    """
    What C{/stats} shows of a histogram: C{P0(x) P25(x) ... P100(x)}, or C{No recorded values} as in Envoy.
    """
    if not histogram.count:
        return "No recorded values"
    return " ".join(f"{label}({_number(_round(value))})" for label, value in histogram.quantiles().items())


def _histogramJSON(histogram: Histogram) -> Dict[str, Any]:
    """
    What C{/stats?format=json} shows of a histogram.
    """
    return {
        "name": histogram.name,
        "quantiles": {label: _quantile(value) for label, value in histogram.quantiles().items()},
        "count": histogram.count,
        "sum": histogram.sum,
    }


def _number(value: float) -> str:
    """
    C{value} in its shortest form, without a trailing C{.0} (C{1}, C{2.5}, C{3600000}).
    """
    text = repr(value)
    return text[:-2] if text.endswith(".0") else text


def _arg(request: Request, name: bytes) -> Optional[str]:
    """
    The first value of query argument C{name}, decoded (bytes that are not UTF-8 as U+FFFD), or C{None}.
    """
    values = request.args.get(name)
    return values[0].decode("utf-8", "replace") if values else None


def _flag(request: Request, name: bytes) -> bool:
    """
    Whether the query has C{name}, with a value or bare (Envoy's C{?usedonly}): C{twisted.web} leaves bare
    names out of C{request.args}, so look at the query string too.
    """
    if name in request.args:
        return True
    query = request.uri.partition(b"?")[2]
    return any(item.partition(b"=")[0] == name for item in query.replace(b";", b"&").split(b"&"))


def _allowedHosts(server: AdminServer) -> Tuple[str, ...]:
    # Read per request: a reload that changes [mesh] admin.allowed_hosts applies at once.
    config = getattr(server, "config", None)
    return config.mesh.admin_allowed_hosts if config is not None else ()


def hostRefusal(request: Request, allowedNames: Collection[str] = ()) -> Optional[str]:
    """
    Why a request to the admin is refused for its C{Host} header, or C{None} if it is not.

    A browser lets a page read, and post to, its own origin: a page at C{http://evil.example:9901} whose
    name its owner then makes resolve to C{127.0.0.1} (DNS rebinding) reaches the admin as its own origin,
    C{Origin} and C{Host} agreeing, and L{crossSiteRefusal} cannot tell. What gives it away is the name:
    its C{Host} is C{evil.example:9901}. So the admin answers only requests whose C{Host} is an IP address
    (IPv6 in brackets), C{localhost}, or one of C{allowedNames} (C{[mesh] admin.allowed_hosts}), any port;
    names compare without letter case or a trailing dot. A request without C{Host} (HTTP/1.0) names nothing
    and passes, as does any request over a UNIX socket, which no browser page can reach.

    @param allowedNames: the host names allowed besides addresses and C{localhost}, lowercased, without a
        trailing dot.
    @return: a one-line reason naming the C{Host} and what it would have had to be.
    """
    values = request.requestHeaders.getRawHeaders(b"host")
    if not values or isinstance(request.getHost(), UNIXAddress):
        return None
    for value in values:
        if not _allowedHost(value, allowedNames):
            return (f"misdirected request refused: Host {_printable(value).decode()} is not a name of this admin "
                    f"endpoint: {_WHO_MAY_ASK}")
    return None


def _allowedHost(value: bytes, allowedNames: Collection[str]) -> bool:
    text = value.decode("latin-1").strip()
    if not text:  # names nothing, as no Host at all
        return True
    match = _HOST_HEADER.match(text)
    if match is None:
        return False
    literal, name = match.groups()
    try:
        if literal is not None:
            ipaddress.IPv6Address(literal)
            return True
        ipaddress.IPv4Address(name)
        return True
    except ValueError:
        if literal is not None:
            return False
    name = name.lower().rstrip(".")
    return name == "localhost" or name in allowedNames


def crossSiteRefusal(request: Request) -> Optional[str]:
    """
    Why a C{POST} to the admin is refused as cross-site, or C{None} if it is not.

    A browser marks what a page makes it send: C{Sec-Fetch-Site} says whose page it is (C{same-origin}, or
    C{none} when the user made the request), and C{Origin} names the page's origin. A request with either
    saying another site is refused, so that a page on the web cannot drive the admin of the operator's
    browser with a form (C{<form action="http://127.0.0.1:9901/quitquitquit" method="post">}). Clients
    that send neither header (curl, scripts, monitoring) are not browsers serving someone else's page, and
    pass.

    @return: a one-line reason, naming the header and what it would have had to be.
    """
    fetchSite = request.getHeader(b"sec-fetch-site")
    if fetchSite is not None and fetchSite.strip().lower() not in _NOT_CROSS_SITE:
        return f"cross-site request refused: Sec-Fetch-Site is {_printable(fetchSite).decode()}: {_WHO_MAY_POST}"
    origin = request.getHeader(b"origin")
    if origin is None:
        return None
    scheme = "https" if request.isSecure() else "http"
    host = request.getHeader(b"host")
    if host is not None:
        own = _origin(f"{scheme}://{host.decode('latin-1')}")
    else:  # HTTP/1.0 without Host: the address the request came in on
        address = request.getHost()
        own = (scheme, str(address.host).lower(), address.port)
    claimed = _origin(origin.decode("latin-1"))
    if claimed is None or claimed != own:
        ownText = f"{own[0]}://{own[1]}:{own[2]}" if own is not None else "unknown: no valid Host header"
        return (f"cross-site request refused: Origin {_printable(origin).decode()} is not this admin endpoint "
                f"({ownText}): {_WHO_MAY_POST}")
    return None


def _origin(text: str) -> Optional[Tuple[str, str, int]]:
    """
    C{scheme://host[:port]} as C{(scheme, host, port)}, lowercased, the port filled in; C{None} if it is not
    an HTTP origin (C{Origin: null}, say).
    """
    try:
        parts = urlsplit(text.strip())
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS or not parts.hostname:
            return None
        return scheme, parts.hostname.lower(), parts.port or _DEFAULT_PORTS[scheme]
    except ValueError:  # a port that is not a number, or out of range
        return None


def _printable(path: bytes) -> bytes:
    # The path is echoed in a text/plain body; keep it to one line of visible ASCII.
    return bytes(c if 0x20 < c < 0x7F else 0x3F for c in path[:200])


def _json(value: Any) -> bytes:
    return (json.dumps(value, indent=2, default=str) + "\n").encode()


def _respond(request: Request, code: int, contentType: bytes, body: bytes, message: Optional[bytes] = None) -> bytes:
    """
    Set the status (with C{message} as its reason phrase, for one C{twisted.web} does not know) and the
    headers every admin response carries, and return C{body}.
    """
    request.setResponseCode(code, message)
    request.setHeader(b"Content-Type", contentType)
    request.setHeader(b"Cache-Control", b"no-cache, max-age=0")
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    return body
