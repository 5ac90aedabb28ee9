"""
The admin home page (C{GET /}): one self-contained HTML page showing the listeners, the clusters with each
host's health, the requests in flight, a recent request rate per listener and per cluster, and every admin
endpoint.

A rate needs two readings of a counter some time apart. L{RateSampler} keeps a small ring of counter
readings taken on a timer (every C{interval} seconds, on the injected clock) while the admin site listens,
and a page divides the change since the oldest reading by the time since: the rate over the last
C{window} seconds whoever looks and however often. (Rates computed from the previous page view instead
would depend on the viewers: the first view would have none, and two browsers refreshing in turn would
each see the rate over the other's refresh interval.) Each reading is a few dictionary lookups per
listener and cluster, once a second: nothing next to the traffic it measures, and off the request path.

The page has no external assets: inline CSS, a C{<meta http-equiv="refresh">} to reload it (no script),
and a Content-Security-Policy that forbids loading anything else. The only script is a one-line confirm
on the buttons of the C{POST} endpoints. Every name and address on the page is HTML-escaped, and endpoint
strings are redacted as C{/clusters} redacts them.
"""

from __future__ import annotations

from collections import deque
from html import escape
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Tuple

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

#: What the dashboard sends in C{Content-Security-Policy}: nothing may be loaded from anywhere, the inline
#: style and the confirm handlers may run, and forms may post only back to the admin endpoint.
CONTENT_SECURITY_POLICY = (b"default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
                           b"form-action 'self'; base-uri 'none'; frame-ancestors 'none'")

#: How often the page reloads itself by default, in seconds (C{?refresh=N} overrides; 0 turns it off).
DEFAULT_REFRESH = 5

_Key = Tuple[str, str]  # ("listener" | "cluster", name)


def listenerCounter(name: str, protocol: str) -> str:
    """
    The name of the counter a listener's rate is taken from: requests on an HTTP listener
    (C{http.<name>.downstream_rq_total}), connections on a TCP one (C{listener.<name>.downstream_cx_total}).
    """
    if protocol == "tcp":
        return f"listener.{name}.downstream_cx_total"
    return f"http.{name}.downstream_rq_total"


def _clusterCount(cluster: Any) -> int:
    # A TCP cluster carries connections, not requests: tcp_proxy counts upstream_cx_total only.
    if cluster.config.protocol == "tcp":
        return cluster.upstream_cx_total.value
    return cluster.upstream_rq_total.value


class RateSampler:
    """
    Readings of the counters the dashboard turns into rates, every C{interval} seconds, the last
    C{window / interval} of them kept.

    @ivar interval: seconds between readings.
    @ivar window: the longest span a rate is measured over, in seconds.
    """

    log = Logger()

    def __init__(self, server: Any, clock: IReactorTime, interval: float = 1.0, window: float = 10.0) -> None:
        """
        @param server: the L{twistedmesh.admin.resource.AdminServer} whose listeners and clusters are read.
        @param clock: runs the timer and dates the readings.
        """
        self.server = server
        self.clock = clock
        self.interval = interval
        self.window = window
        self._ring: Deque[Tuple[float, Dict[_Key, int]]] = deque(maxlen=max(2, int(round(window / interval))))
        self._loop: Optional[LoopingCall] = None

    def start(self) -> None:
        """
        Take a reading now and then every C{interval} seconds (a second call does nothing).
        """
        if self._loop is not None:
            return
        loop = self._loop = LoopingCall(self.sample)
        loop.clock = self.clock
        loop.start(self.interval, now=True).addErrback(
            lambda f: self.log.failure("dashboard rate sampling stopped", f))

    def stop(self) -> None:
        """
        Stop taking readings (those taken are kept).
        """
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()

    @property
    def running(self) -> bool:
        """
        Whether readings are being taken.
        """
        return self._loop is not None

    def counters(self) -> Dict[_Key, int]:
        """
        The current value of every counter a rate is taken from, by C{("listener", name)} and
        C{("cluster", name)}. Names are looked up afresh each time, so that a reload's new listeners and
        clusters are picked up.
        """
        values: Dict[_Key, int] = {}
        server = self.server
        config = server.config
        if config is not None:
            get = server.stats.get
            for name, listener in config.listeners.items():
                stat = get(listenerCounter(name, listener.protocol))
                if stat is not None:
                    values[("listener", name)] = stat.value
        for name, cluster in server.clusters.items():
            values[("cluster", name)] = _clusterCount(cluster)
        return values

    def sample(self) -> None:
        """
        Take one reading (the timer calls this; the oldest reading goes once the ring is full).
        """
        self._ring.append((self.clock.seconds(), self.counters()))

    def rates(self) -> Dict[_Key, Optional[float]]:
        """
        The rate of each counter per second, from the oldest reading that has it to its value now, or
        C{None} when there is no reading at least C{interval} old, or the counter went down (its
        listener or cluster was replaced by a reload).
        """
        now = self.clock.seconds()
        current = self.counters()
        result: Dict[_Key, Optional[float]] = {}
        for key, value in current.items():
            rate = None
            for when, old in self._ring:
                if key in old:
                    elapsed = now - when
                    if elapsed >= self.interval and value >= old[key]:
                        rate = (value - old[key]) / elapsed
                    break
            result[key] = rate
        return result


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d2329;background:#fafbfc}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.15em;margin:1.6em 0 .4em}h3{font-size:1em;margin:1em 0 .3em}
table{border-collapse:collapse;margin:.3em 0 .8em}
th,td{padding:.25em .7em;border-bottom:1px solid #dde1e5;text-align:left;vertical-align:top}
th{background:#eef1f4;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
code{font:13px ui-monospace,monospace}.muted{color:#67717b}
.badge{display:inline-block;padding:0 .5em;border-radius:.6em;font-size:.85em;font-weight:600}
.ok{background:#d8f3dc;color:#1b5e20}.bad{background:#fde0e0;color:#8e1b1b}.warn{background:#fff1c2;color:#6b4e00}
form{display:inline;margin:0}button{font:inherit;font-size:.9em}
ul.endpoints{list-style:none;padding:0}ul.endpoints li{margin:.2em 0}
"""


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _rate(rate: Optional[float], unit: str) -> str:
    if rate is None:
        return '<span class="muted">&ndash;</span>'
    return f"{rate:.1f}&nbsp;{unit}/s"


def _stat(server: Any, name: str) -> int:
    stat = server.stats.get(name)
    return stat.value if stat is not None else 0


def renderDashboard(server: Any, sampler: RateSampler, endpoints: Iterable[Tuple[str, str, str]],
                    redact: Callable[[str], str], health: Callable[[Any], str],
                    refresh: int = DEFAULT_REFRESH) -> bytes:
    """
    The dashboard of C{server} as a UTF-8 HTML document.

    @param server: the L{twistedmesh.admin.resource.AdminServer}; if it also has C{listeners} (as
        L{twistedmesh.service.MeshService} has: name to an object whose C{port} is the listening port or
        C{None}), each listener's actual address is shown.
    @param sampler: where the rates come from.
    @param endpoints: every admin endpoint as C{(path, method, help)}, in the order to list them.
    @param redact: turns an endpoint string into what may be shown (secrets replaced).
    @param health: turns a host into its health flags as C{/clusters} shows them (C{"healthy"},
        C{"/failed_active_hc"}, ...).
    @param refresh: reload the page every this many seconds; 0 for never.
    """
    rates = sampler.rates()
    parts: List[str] = [
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
    ]
    if refresh > 0:
        parts.append(f'<meta http-equiv="refresh" content="{refresh}">')
    state = server.state
    stateClass = "ok" if state == "LIVE" else "warn"
    parts += [
        f"<title>twistedmesh admin ({_e(state)})</title><style>{_STYLE}</style></head><body>",
        f'<h1>twistedmesh <span id="state" class="badge {stateClass}">{_e(state)}</span>',
    ]
    if server.healthCheckFailed:
        parts.append(' <span class="badge bad">health checks failing (/healthcheck/fail)</span>')
    parts.append("</h1>")
    window = f"{sampler.window:g}"
    refreshText = f"reloads every {refresh} s" if refresh > 0 else "does not reload"
    parts.append(f'<p class="muted">Rates are over the last {window} s, from readings taken every '
                 f'{sampler.interval:g} s; &ndash; until there is one. This page {refreshText} '
                 f'(<a href="./?refresh=0">stop</a>, <a href="./?refresh=1">every second</a>).</p>')
    parts += _listeners(server, rates, redact)
    parts += _clusters(server, rates, redact, health)
    parts += _endpoints(endpoints)
    parts.append("</body></html>\n")
    return "".join(parts).encode("utf-8")


def _listeners(server: Any, rates: Dict[_Key, Optional[float]], redact: Callable[[str], str]) -> List[str]:
    config = server.config
    listeners = sorted(config.listeners.items()) if config is not None else []
    parts = [f'<h2 id="listeners">Listeners ({len(listeners)})</h2>']
    if not listeners:
        parts.append('<p class="muted">none</p>')
        return parts
    parts.append("<table><tr><th>name</th><th>endpoint</th><th>listening on</th><th>protocol</th>"
                 "<th>connections</th><th>active requests</th><th>rate</th></tr>")
    listening = getattr(server, "listeners", None) or {}
    for name, listener in listeners:
        address = '<span class="muted">not listening</span>'
        port = getattr(listening.get(name), "port", None)
        if port is not None:
            address = f"<code>{_e(_address(port.getHost()))}</code>"
        tcp = listener.protocol == "tcp"
        active = '<span class="muted">&ndash;</span>' if tcp else str(_stat(server, f"http.{name}.downstream_rq_active"))
        protocol = listener.protocol + (" + TLS" if listener.tls else "")
        parts.append(
            f'<tr class="listener"><td><b>{_e(name)}</b></td><td><code>{_e(redact(listener.endpoint))}</code>'
            f"</td><td>{address}</td><td>{_e(protocol)}</td>"
            f'<td class="n">{_stat(server, f"listener.{name}.downstream_cx_active")}</td>'
            f'<td class="n">{active}</td>'
            f'<td class="n">{_rate(rates.get(("listener", name)), "cx" if tcp else "rq")}</td></tr>'
        )
    parts.append("</table>")
    return parts


def _address(address: Any) -> str:
    if hasattr(address, "port"):
        return f"{address.host}:{address.port}"
    return str(getattr(address, "name", address))  # a UNIX socket's path


def _clusters(server: Any, rates: Dict[_Key, Optional[float]], redact: Callable[[str], str],
              health: Callable[[Any], str]) -> List[str]:
    clusters = sorted(server.clusters.values(), key=lambda c: c.name)
    parts = [f'<h2 id="clusters">Clusters ({len(clusters)})</h2>']
    if not clusters:
        parts.append('<p class="muted">none</p>')
    for cluster in clusters:
        hosts = cluster.hosts
        healthy = sum(1 for h in hosts if h.healthy)
        badge = "ok" if healthy == len(hosts) else ("bad" if healthy == 0 else "warn")
        tcp = cluster.config.protocol == "tcp"
        parts.append(
            f'<h3 class="cluster">{_e(cluster.name)} <span class="badge {badge}">{healthy}/{len(hosts)} '
            f'healthy</span></h3><p>{_e(cluster.config.protocol)}, {_e(cluster.config.lb_policy)}; active requests '
            f"<b>{cluster.upstream_rq_active.value}</b>, connections <b>{cluster.upstream_cx_active.value}</b>, "
            f'rate <b>{_rate(rates.get(("cluster", cluster.name)), "cx" if tcp else "rq")}</b></p>'
        )
        parts.append("<table><tr><th>host</th><th>weight</th><th>health</th><th>reason</th>"
                     "<th>active requests</th><th>connections</th><th>requests</th><th>errors</th></tr>")
        for host in hosts:
            flags = health(host)
            cls = "ok" if host.healthy else "bad"
            parts.append(
                f'<tr class="host"><td><code>{_e(redact(host.endpoint))}</code></td><td class="n">{host.weight}</td>'
                f'<td><span class="badge {cls}">{_e(flags)}</span></td><td>{_e(host.healthReason)}</td>'
                f'<td class="n">{host.rq_active}</td><td class="n">{host.cx_active}</td>'
                f'<td class="n">{host.rq_total}</td><td class="n">{host.rq_error}</td></tr>'
            )
        parts.append("</table>")
    return parts


def _endpoints(endpoints: Iterable[Tuple[str, str, str]]) -> List[str]:
    # Links are relative ("./stats"), so that they still work with the admin resource mounted lower down.
    parts = ['<h2 id="endpoints">Admin endpoints</h2><ul class="endpoints">']
    for path, method, help in endpoints:
        if method == "GET":
            parts.append(f'<li><a href=".{_e(path)}"><code>{_e(path)}</code></a> &ndash; {_e(help)}</li>')
        else:
            # A form, since a link cannot POST; the confirm keeps a stray click from stopping the proxy.
            question = _e(f"POST {path}?")
            parts.append(
                f'<li><form method="post" action=".{_e(path)}" onsubmit="return confirm(this.dataset.q)" '
                f'data-q="{question}"><button type="submit"><code>POST {_e(path)}</code></button></form> '
                f"&ndash; {_e(help)}</li>"
            )
    parts.append("</ul>")
    return parts
