"""
A cluster's active health checking options (see docs/health-checking.md): the C{health.*} keys of a
C{[cluster:NAME]} section.

L{parseHealth} reads them from the cluster section's L{Options} into a frozen L{HealthConfig}, or returns
C{None} when the section has no C{health.*} key (no active health checking). Every bad value is recorded
through the section, so that the loader reports all errors of the file at once, and the default is used in
its place so that checking goes on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Optional, Tuple

from .options import Options

#: The kinds of check C{health.type} may name.
HEALTH_TYPES = ("http", "tcp")
#: The HTTP versions an HTTP check may speak (C{health.codec}).
HEALTH_CODECS = ("http1", "http2")
#: Keys that only an HTTP check uses, and keys that only a TCP check uses: writing one with the other type
#: is an error (it would silently do nothing).
_HTTP_KEYS = ("health.path", "health.host", "health.expected_statuses", "health.codec",
              "health.reuse_connection")
_TCP_KEYS = ("health.send", "health.receive")
# A request target: origin-form, visible ASCII only (it is written to the wire as is).
_PATH = re.compile(r"^/[\x21-\x7e]*$")
# A Host header value: a reg-name or IP literal with an optional port; no whitespace or controls.
_HOST = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=:\[\]%-]+$")
_STATUS_RANGE = re.compile(r"^(\d{3})(?:\s*-\s*(\d{3}))?$")
# The escapes a text: payload may use, so that line-based protocols (PING\r\n) need no hex.
_ESCAPE = re.compile(r"\\(?:x([0-9A-Fa-f]{2})|(.))", re.DOTALL)
_SIMPLE_ESCAPES = MappingProxyType({"r": b"\r", "n": b"\n", "t": b"\t", "\\": b"\\", "0": b"\x00"})


@dataclass(frozen=True)
class HealthConfig:
    """
    The active health checking options of a cluster, with Envoy's defaults.

    @ivar type: C{"http"} (a C{GET} whose status is checked) or C{"tcp"} (a connection, optionally with a
        payload exchange).
    @ivar path: HTTP: the request target (C{/healthz}); C{None} for TCP.
    @ivar host: HTTP: the C{Host} header sent (by default the cluster's name, as in Envoy).
    @ivar expected_statuses: HTTP: inclusive C{(low, high)} ranges of statuses that pass; C{((200, 200),)}
        by default.
    @ivar interval: seconds between the end of one check of a host and the start of the next, while the
        host is healthy.
    @ivar timeout: seconds a whole check (connect, send, answer) may take before it fails.
    @ivar healthy_threshold: consecutive passing checks that make an unhealthy host healthy (the first
        check of a host makes it healthy at once, as in Envoy).
    @ivar unhealthy_threshold: consecutive failing checks that make a healthy host unhealthy.
    @ivar interval_jitter: seconds; a random amount from 0 to this is added to every interval.
    @ivar interval_jitter_percent: a percentage (0 to 100) of the interval; a random amount from 0 to this
        share of it is added to every interval.
    @ivar unhealthy_interval: the interval while the host is unhealthy (C{interval} unless written).
    @ivar no_traffic_interval: the interval of a healthy host while the cluster carries no traffic.
    @ivar initial_jitter: seconds; each host's first check starts a random time from 0 to this after
        the checker starts, so that many proxies do not check in step.
    @ivar codec: HTTP: C{"http1"} or C{"http2"}, the protocol the check speaks; C{None} (the default) for
        the cluster's own (HTTP/2 for a C{protocol = http2} cluster, else HTTP/1.1).
    @ivar reuse_connection: HTTP: keep the check's connection open for the next check of the host (a new
        request on HTTP/1.1 keep-alive, a new stream on HTTP/2), as Envoy does by default; C{False}: a new
        connection per check.
    @ivar send: TCP: bytes written once connected, or C{None}.
    @ivar receive: TCP: bytes that must appear in what the host sends for the check to pass, or C{None}
        (then connecting, and writing C{send}, is enough).
    """

    type: str = "http"
    path: Optional[str] = None
    host: str = ""
    expected_statuses: Tuple[Tuple[int, int], ...] = ((200, 200),)
    interval: float = 5.0
    timeout: float = 1.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    interval_jitter: float = 0.0
    interval_jitter_percent: float = 0.0
    unhealthy_interval: float = 5.0
    no_traffic_interval: float = 60.0
    initial_jitter: float = 0.0
    codec: Optional[str] = None
    reuse_connection: bool = True
    send: Optional[bytes] = None
    receive: Optional[bytes] = None

    def statusPasses(self, status: int) -> bool:
        """
        Whether an HTTP check answered with C{status} passes (it falls in one of C{expected_statuses}).
        """
        for low, high in self.expected_statuses:
            if low <= status <= high:
                return True
        return False


def parseStatuses(text: str) -> Tuple[Tuple[int, int], ...]:
    """
    A list of statuses and inclusive ranges (C{200, 204, 300-399}) as C{(low, high)} pairs.

    @raise ValueError: with a message for the user for anything that is not a status from 100 to 599 or
        a range of them with C{low <= high}.
    """
    ranges = []
    for item in re.split(r"[,\n]", text):
        item = item.strip()
        if not item:
            continue
        match = _STATUS_RANGE.match(item)
        if match is None:
            raise ValueError(f"{item!r} is not a status or a range of statuses (write e.g. 200, 200-299)")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if not (100 <= low <= 599 and 100 <= high <= 599):
            raise ValueError(f"{item!r}: statuses go from 100 to 599")
        if low > high:
            raise ValueError(f"{item!r}: the range is empty (write the lower status first)")
        ranges.append((low, high))
    if not ranges:
        raise ValueError("names no status")
    return tuple(ranges)


def parsePayload(text: str) -> bytes:
    """
    A TCP check payload: C{text:...} (UTF-8, with the escapes C{\\r}, C{\\n}, C{\\t}, C{\\0}, C{\\\\} and
    C{\\xHH}) or a hex string (C{50494e470d0a}; spaces allowed between bytes).

    @raise ValueError: for a malformed hex string or escape, or an empty payload.
    """
    if text.startswith("text:"):
        raw = text[len("text:"):]

        def escape(match: "re.Match[str]") -> str:
            """
            The byte (as a latin-1 character) one escape stands for.
            """
            # Work in latin-1 space so that \xHH is a byte, not a code point.
            if match.group(1) is not None:
                return chr(int(match.group(1), 16))
            simple = _SIMPLE_ESCAPES.get(match.group(2))
            if simple is None:
                raise ValueError(f"unknown escape \\{match.group(2)} (use \\r \\n \\t \\0 \\\\ or \\xHH)")
            return simple.decode("latin-1")

        # Encode the plain text as UTF-8 first, then undo the escapes byte-wise.
        payload = _ESCAPE.sub(escape, raw.encode("utf-8").decode("latin-1")).encode("latin-1")
    else:
        compact = "".join(text.split())
        try:
            payload = bytes.fromhex(compact)
        except ValueError:
            raise ValueError(f"{text!r} is neither hex (50494e47) nor text:... (text:PING\\r\\n)") from None
    if not payload:
        raise ValueError("is empty")
    return payload


def _payload(o: Options, key: str) -> Optional[bytes]:
    """
    A payload key (see L{parsePayload}), or C{None} when not written or bad (the error goes to C{o}).
    """
    raw = o.string(key, None)
    if raw is None:
        return None
    try:
        return parsePayload(raw)
    except ValueError as e:
        o.error(key, str(e))
        return None


def parseHealth(o: Options, clusterName: Optional[str] = None) -> Optional[HealthConfig]:
    """
    Read the C{health.*} keys of a cluster section.

    @param clusterName: the default C{Host} header of HTTP checks; the name in the section's title
        (C{cluster:NAME}) when not given.
    @return: C{None} when the section has no C{health.*} key at all; otherwise a L{HealthConfig}, with
        defaults in place of bad values (every problem is recorded in C{o}).
    """
    if not any(key.startswith("health.") for key in o.keys()):
        return None
    if clusterName is None:
        clusterName = o.section.partition(":")[2] or o.section

    before = len(o.errors)
    kind = o.string("health.type", None, choices=HEALTH_TYPES)
    typeValid = len(o.errors) == before  # a misspelled type must not make every other key an error too
    hasPath = "health.path" in o
    if kind is None:
        if hasPath or not typeValid:
            kind = "http"
        else:
            o.error("health.type", "is required: write health.path = /healthz for an HTTP check, or "
                                   "health.type = tcp for a TCP check")
            kind = "http"
            typeValid = False

    # Keys of the other type would do nothing: say so rather than ignore them.
    foreign = _TCP_KEYS if kind == "http" else _HTTP_KEYS
    for key in foreign:
        if key in o and typeValid:  # `in` marks the key known either way
            o.error(key, f"applies only to health.type = {'tcp' if kind == 'http' else 'http'}, not {kind}")

    path: Optional[str] = None
    host = ""
    statuses: Tuple[Tuple[int, int], ...] = ((200, 200),)
    send = receive = None
    codec: Optional[str] = None
    reuse = True
    if kind == "http":
        path = o.string("health.path", None)
        if path is None:
            if typeValid:
                o.error("health.path", "is required with health.type = http (write e.g. /healthz)")
            path = "/"
        elif not _PATH.match(path):
            o.error("health.path", f"{path!r} is not a path: it starts with / and has no spaces or "
                                   "control characters")
            path = "/"
        host = o.string("health.host", clusterName)
        if not _HOST.match(host):
            o.error("health.host", f"{host!r} is not a host name (letters, digits, dots, a :port)")
            host = clusterName
        rawStatuses = o.string("health.expected_statuses", None)
        if rawStatuses is not None:
            try:
                statuses = parseStatuses(rawStatuses)
            except ValueError as e:
                o.error("health.expected_statuses", str(e))
        codec = o.string("health.codec", None, choices=HEALTH_CODECS)
        reuse = o.boolean("health.reuse_connection", True)
    else:
        send = _payload(o, "health.send")
        receive = _payload(o, "health.receive")

    interval = o.positiveDuration("health.interval", 5.0)
    return HealthConfig(
        type=kind,
        path=path,
        host=host,
        expected_statuses=statuses,
        interval=interval,
        timeout=o.positiveDuration("health.timeout", 1.0),
        healthy_threshold=o.integer("health.healthy_threshold", 2, minimum=1),
        unhealthy_threshold=o.integer("health.unhealthy_threshold", 3, minimum=1),
        interval_jitter=o.duration("health.interval_jitter", 0.0),
        interval_jitter_percent=o.percentage("health.interval_jitter_percent", 0.0),
        unhealthy_interval=o.positiveDuration("health.unhealthy_interval", interval),
        no_traffic_interval=o.positiveDuration("health.no_traffic_interval", 60.0),
        initial_jitter=o.duration("health.initial_jitter", 0.0),
        codec=codec,
        reuse_connection=reuse,
        send=send,
        receive=receive,
    )


__all__ = ["HealthConfig", "HEALTH_TYPES", "HEALTH_CODECS", "parseHealth", "parseStatuses", "parsePayload"]
