"""
L{Options}: one config section's keys, read through typed getters that turn bad values into
L{ConfigError}s naming the file, section and key. Filter plugins receive their section as an C{Options}.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple, TypeVar

from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.testing import MemoryReactor

from . import values
from .errors import ConfigError, suggest

T = TypeVar("T")


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()


class Options:
    """
    The keys of one section. Every getter records the key as known; L{finish} reports any key that no
    getter asked for as unknown, with the closest known key as a suggestion. A bad value is recorded in
    C{errors} (shared by the whole file, so that all errors are reported at once) and the getter returns
    the default, so that checking goes on.
    """

    def __init__(self, file: str, section: str, items: Dict[str, str], errors: List[ConfigError]) -> None:
        self.file = file
        self.section = section
        self._items = items
        self._known: Set[str] = set()
        self.errors = errors

    def __contains__(self, key: str) -> bool:
        self._known.add(key)
        return key in self._items

    def keys(self) -> List[str]:
        """
        The keys written in the section, in file order.
        """
        return list(self._items)

    def error(self, key: Optional[str], why: str) -> None:
        """
        Record an error about C{key} (or the section, for C{None}).
        """
        self.errors.append(ConfigError(self.file, self.section, key, why))

    def _get(self, key: str, default: object, parse: Callable[[str], T]):
        self._known.add(key)
        raw = self._items.get(key)
        if raw is None or raw.strip() == "":
            if default is REQUIRED:
                self.error(key, "is required")
                return None
            return default
        try:
            return parse(raw)
        except ValueError as e:
            self.error(key, str(e))
            return None if default is REQUIRED else default

    def string(self, key: str, default=REQUIRED, choices: Optional[Sequence[str]] = None) -> Optional[str]:
        """
        The value as a stripped string; with C{choices}, one of them.
        """

        def parse(raw: str) -> str:
            raw = raw.strip()
            if choices is not None and raw not in choices:
                raise ValueError(f"{raw!r} is not one of {', '.join(choices)}{suggest(raw, choices)}")
            return raw

        return self._get(key, default, parse)

    def duration(self, key: str, default=REQUIRED) -> Optional[float]:
        """
        A duration (C{250ms}, C{5s}, C{2m}) in seconds.
        """
        return self._get(key, default, values.duration)

    def size(self, key: str, default=REQUIRED) -> Optional[int]:
        """
        A size (C{512}, C{64KiB}, C{1MiB}) in bytes.
        """
        return self._get(key, default, values.size)

    def integer(self, key: str, default=REQUIRED, minimum: int = 0) -> Optional[int]:
        """
        A whole number no smaller than C{minimum}.
        """
        return self._get(key, default, lambda raw: values.integer(raw, minimum))

    def positiveDuration(self, key: str, default=REQUIRED) -> Optional[float]:
        """
        A duration above zero.
        """

        def parse(raw: str) -> float:
            value = values.duration(raw)
            if value <= 0:
                raise ValueError("must be more than 0")
            return value

        return self._get(key, default, parse)

    def percentage(self, key: str, default=REQUIRED, whole: bool = False):
        """
        A percentage from 0 to 100, a trailing C{%} allowed (C{10}, C{12.5%}); with C{whole}, an integer.
        """

        def parse(raw: str):
            raw = raw.strip()
            text = raw[:-1].strip() if raw.endswith("%") else raw
            try:
                value = int(text) if whole else float(text)
            except ValueError:
                value = None
            # float() takes "nan" and "inf": the range check refuses them too.
            if value is None or not 0 <= value <= 100:
                raise ValueError(f"{raw!r} is not a {'whole ' if whole else ''}percentage from 0 to 100")
            return value

        return self._get(key, default, parse)

    def boolean(self, key: str, default=REQUIRED) -> Optional[bool]:
        """
        C{true} or C{false} (C{yes}/C{no}, C{on}/C{off}, C{1}/C{0} too).
        """
        return self._get(key, default, values.boolean)

    def list(self, key: str, default=()) -> Tuple[str, ...]:
        """
        Comma- or line-separated items.
        """
        return self._get(key, default, values.stringList)

    def serverEndpoint(self, key: str, default=REQUIRED) -> Optional[str]:
        """
        A Twisted server endpoint string (C{tcp:10000:interface=127.0.0.1}), checked by parsing it.
        """
        return self._get(key, default, checkServerEndpoint)

    def finish(self) -> None:
        """
        Report every key no getter asked for as unknown.
        """
        for key in self._items:
            if key not in self._known:
                self.error(key, f"unknown key{suggest(key, self._known)}")


def checkServerEndpoint(text: str) -> str:
    """
    Parse C{text} as a server endpoint string without listening; return it stripped or raise C{ValueError}.
    """
    text = text.strip()
    try:
        serverFromString(MemoryReactor(), text)
    except Exception as e:  # Twisted's parsers raise ValueError, KeyError, TypeError...
        raise ValueError(f"{text!r} is not a valid server endpoint string: {e}") from None
    return text


def checkClientEndpoint(text: str) -> str:
    """
    Parse C{text} as a client endpoint string without connecting; return it or raise C{ValueError}.
    """
    text = text.strip()
    try:
        clientFromString(MemoryReactor(), text)
    except Exception as e:  # as above: the parsers raise several exception types
        raise ValueError(f"{text!r} is not a valid client endpoint string: {e}") from None
    return text
