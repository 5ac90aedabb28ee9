"""
Parsers for the value types of the configuration: durations, sizes, lists, booleans, integers.

Each takes the raw string and returns the value or raises C{ValueError} with a message fit for a user;
L{twistedmesh.config.options.Options} turns that into a L{ConfigError} naming file, section and key.
"""

from __future__ import annotations

import re
from typing import List, Tuple

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9}
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def duration(text: str) -> float:
    """
    C{"250ms"}, C{"5s"}, C{"2m"}, C{"1h"} (a bare number is seconds) as seconds.
    """
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration (write e.g. 250ms, 5s, 2m, 1h)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]


def size(text: str) -> int:
    """
    C{"64KiB"}, C{"1MiB"}, C{"100"} (bytes), C{"10MB"} as a number of bytes.
    """
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size (write e.g. 512, 64KiB, 1MiB, 1GiB)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2) or "B"]


def boolean(text: str) -> bool:
    """
    C{true}/C{yes}/C{on}/C{1} or C{false}/C{no}/C{off}/C{0}.
    """
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{text!r} is not a boolean (write true or false)")


def integer(text: str, minimum: int = 0) -> int:
    """
    A whole number no smaller than C{minimum}.
    """
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None
    if value < minimum:
        raise ValueError(f"{value} is less than {minimum}")
    return value


def stringList(text: str) -> Tuple[str, ...]:
    """
    Items separated by commas or new lines, blanks dropped: C{"a, b"} is C{("a", "b")}.
    """
    return tuple(item.strip() for item in re.split(r"[,\n]", text) if item.strip())


def lines(text: str) -> List[str]:
    """
    The non-blank lines of a multi-line value, stripped.
    """
    return [line.strip() for line in text.splitlines() if line.strip()]
