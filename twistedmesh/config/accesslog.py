"""
The C{access_log.*} keys of a C{[listener:NAME]} section (see docs/access-logs.md).

L{parseAccessLog} reads them into a frozen L{AccessLogConfig}, reporting every bad value through the
section's L{Options}. Formats are compiled here once to check them, so that an unknown operator is a
config error that C{--validate} reports; L{twistedmesh.observability.accesslog.AccessLogger} compiles the
checked format again when the service is built.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

from ..observability.accesslog import (
    RESPONSE_FLAGS,
    FormatError,
    compileFormat,
    compileJSONFormat,
    parseStatusCondition,
)
from .errors import suggest
from .options import Options

#: Every key this module reads besides C{access_log} itself.
KEYS = (
    "access_log.format", "access_log.json", "access_log.json_format", "access_log.flush_interval",
    "access_log.status", "access_log.duration_min", "access_log.flags",
)
_STREAMS = ("stdout", "stderr")


@dataclass(frozen=True)
class AccessLogConfig:
    """
    A listener's access log.

    @ivar path: a file path, C{"stdout"} or C{"stderr"}.
    @ivar format: an Envoy format string (one line, no trailing newline needed), or C{None} for Envoy's
        default format. Only without C{json}.
    @ivar json: lines are JSON objects.
    @ivar json_format: the JSON fields as C{(key, template)} pairs in file order; empty for the default
        fields (L{twistedmesh.observability.accesslog.DEFAULT_JSON_FORMAT}).
    @ivar flush_interval: at most how long a line waits in memory before it is handed to the writer, in
        seconds.
    @ivar status: status conditions (C{5xx}, C{>=400}, C{404}); a line is written when any holds. Empty:
        no status filter.
    @ivar duration_min: write only requests (connections) that lasted at least this long, in seconds.
    @ivar flags: write only lines with one of these response flags (C{any}: with any flag). Empty: no flag
        filter.
    """

    path: str
    format: Optional[str] = None
    json: bool = False
    json_format: Tuple[Tuple[str, str], ...] = ()
    flush_interval: float = 1.0
    status: Tuple[str, ...] = ()
    duration_min: Optional[float] = None
    flags: Tuple[str, ...] = ()


def parseAccessLog(o: Options, protocol: Optional[str] = None) -> Optional[AccessLogConfig]:
    """
    Read C{access_log} and C{access_log.*} from a listener section; C{None} when there is no
    C{access_log} key. Every problem is recorded in C{o.errors}; the caller runs C{o.finish()} afterwards.

    @param protocol: the listener's protocol, when known: C{access_log.status} makes no sense for C{tcp}.
    """
    path = o.string("access_log", None)
    if path is None:
        for key in KEYS:
            if key in o:
                o.error(key, "needs `access_log = PATH | stdout | stderr`")
        return None
    _checkPath(o, path)

    jsonMode = o.boolean("access_log.json", False)
    fmt = _format(o, protocol)
    jsonFormat = _jsonFormat(o, protocol)
    if jsonMode and fmt is not None:
        o.error("access_log.format", "is for text lines: with access_log.json = true, use access_log.json_format")
    if jsonFormat and not jsonMode:
        o.error("access_log.json_format", "needs `access_log.json = true`")

    flushInterval = o.duration("access_log.flush_interval", 1.0)
    if flushInterval is not None and flushInterval <= 0:
        o.error("access_log.flush_interval", "must be more than 0 (lines are written at most this long after "
                                             "they are logged)")
        flushInterval = 1.0

    status = _status(o)
    if status and protocol == "tcp":
        o.error("access_log.status", "only applies to HTTP listeners: a TCP connection has no status")
        status = ()
    durationMin = o.duration("access_log.duration_min", None)
    flags = _flags(o)

    return AccessLogConfig(
        path=path,
        format=fmt if not jsonMode else None,
        json=bool(jsonMode),
        json_format=jsonFormat if jsonMode else (),
        flush_interval=flushInterval if flushInterval is not None else 1.0,
        status=status,
        duration_min=durationMin or None,
        flags=flags,
    )


def _checkPath(o: Options, path: str) -> None:
    """
    Check that C{path} can be a log file: stdout, stderr, or a file in an existing directory.
    """
    if path in _STREAMS:
        return
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        o.error("access_log", f"{path!r}: the directory {directory!r} does not exist "
                              "(write a file path, stdout or stderr)")
    elif os.path.isdir(path):
        o.error("access_log", f"{path!r} is a directory: name a file in it")


def _format(o: Options, protocol: Optional[str]) -> Optional[str]:
    """
    C{access_log.format}, joined to one line and compiled to check it; C{None} when absent or bad.
    """
    fmt = o.string("access_log.format", None)
    if fmt is None:
        return None
    # A long format may be continued over indented lines: they are one line of the log, joined by spaces.
    fmt = " ".join(line.strip() for line in fmt.splitlines() if line.strip())
    if fmt.endswith("\\n"):
        fmt = fmt[:-2]  # Envoy formats end with \n; ours always end lines, so accept it when pasted
    try:
        compileFormat(fmt, protocol if protocol in ("http", "tcp") else "http")
    except FormatError as e:
        o.error("access_log.format", str(e))
        return None
    return fmt


def _jsonFormat(o: Options, protocol: Optional[str]) -> Tuple[Tuple[str, str], ...]:
    """
    C{access_log.json_format} as C{(key, template)} pairs, compiled to check them.
    """
    raw = o.string("access_log.json_format", None)
    if raw is None:
        return ()
    fields: List[Tuple[str, str]] = []
    for line in raw.splitlines():
        line = line.strip()
        if not line:
            continue
        key, eq, template = line.partition("=")
        key, template = key.strip(), template.strip()
        if not eq or not key:
            o.error("access_log.json_format", f"{line!r} is not NAME = %OPERATOR% (one field per line)")
            continue
        fields.append((key, template))
    try:
        compileJSONFormat(fields, protocol if protocol in ("http", "tcp") else "http")
    except FormatError as e:
        o.error("access_log.json_format", str(e))
        return ()
    return tuple(fields)


def _status(o: Options) -> Tuple[str, ...]:
    """
    C{access_log.status} as normalised conditions.
    """
    conditions: List[str] = []
    for item in o.list("access_log.status"):
        try:
            parseStatusCondition(item)
        except ValueError as e:
            o.error("access_log.status", str(e))
            continue
        normal = item.replace(" ", "").lower()
        if normal not in conditions:
            conditions.append(normal)
    return tuple(conditions)


def _flags(o: Options) -> Tuple[str, ...]:
    """
    C{access_log.flags}, each a known response flag or C{any}.
    """
    flags: List[str] = []
    for item in o.list("access_log.flags"):
        if item != "any" and item not in RESPONSE_FLAGS:
            o.error("access_log.flags", f"{item!r} is not a response flag (one of {', '.join(RESPONSE_FLAGS)}, "
                                        f"or any){suggest(item.upper(), RESPONSE_FLAGS)}")
        elif item not in flags:
            flags.append(item)
    if "any" in flags and len(flags) > 1:
        o.error("access_log.flags", "`any` already matches every flag: list flags, or write any alone")
    return tuple(flags)
