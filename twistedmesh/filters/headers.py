"""
The C{headers} filter: add, set and remove request and response headers, as configured.

    [filter:tag]
    type = headers
    request.add =
        x-mesh: edge
    request.set = x-forwarded-host: api.example.com
    request.remove = x-debug, cookie2
    response.set = server: twistedmesh
    response.remove = x-powered-by

Each direction applies, in this order: C{remove} (every field of each name), then C{set} (every field of the
name removed, then the configured field appended), then C{add} (appended, keeping existing fields). Names are
lowercased. C{host}, pseudo-headers (C{:path}, ...), C{content-length} and the hop-by-hop fields are not
this filter's to change: the route's C{host_rewrite} and C{prefix_rewrite} change the authority and path,
and the codecs own framing.

Everything is parsed once, at config load, into tuples of bytes; one L{HeadersFilter} serves every stream
of the listener (it keeps no per-stream state), so a request costs only the edits to its header list.
"""

from __future__ import annotations

from typing import Callable, FrozenSet, List, Optional, Tuple

from twisted.plugin import IPlugin
from zope.interface import implementer

from ..config import Options
from ..http.h1 import HOP_BY_HOP
from ..http.stream import Headers, HTTPFilter, Stream
from ..interfaces import IFilterContext, IHTTPFilterFactory

__all__ = ["HeadersFactory", "HeadersFilter", "HeaderEdits"]

# RFC 9110 section 5.6.2: a field name is a token.
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")
# Fields the codecs own: framing and connection management. (Host and pseudo-headers are refused apart, with
# a pointer to the route options that change them.)
_PROTECTED = frozenset(name.decode("ascii") for name in HOP_BY_HOP) | {"content-length"}
_FORBIDDEN_VALUE_CHARS = ("\r", "\n", "\x00")


class HeaderEdits:
    """
    One direction's edits, parsed and ready: the names whose fields are dropped (C{remove} and C{set}
    names) and the fields appended afterwards (C{set} fields, then C{add} fields).

    @ivar drop: lowercase names (C{bytes}) whose existing fields are removed.
    @ivar append: C{(name, value)} pairs appended, in configured order.
    """

    __slots__ = ("drop", "append")

    def __init__(self, drop: FrozenSet[bytes], append: Tuple[Tuple[bytes, bytes], ...]) -> None:
        self.drop = drop
        self.append = append

    def __repr__(self) -> str:
        return f"<HeaderEdits drop={sorted(self.drop)!r} append={self.append!r}>"

    def apply(self, headers: Headers) -> None:
        """
        Edit C{headers} in place: drop every field named in C{drop}, then append C{append}.
        """
        drop = self.drop
        if drop:
            i = len(headers) - 1
            while i >= 0:
                if headers[i][0] in drop:
                    del headers[i]
                i -= 1
        if self.append:
            headers.extend(self.append)


class HeadersFilter(HTTPFilter):
    """
    Applies configured L{HeaderEdits} to the request headers (C{requestHeaders}) and the response headers
    (C{responseHeaders}). Stateless, so one instance serves every stream.
    """

    def __init__(self, request: HeaderEdits, response: HeaderEdits) -> None:
        self.request = request
        self.response = response

    def requestHeaders(self, stream: Stream) -> None:
        """
        Edit the request's headers before the filters after this one (and the upstream) see them.
        """
        self.request.apply(stream.requestHeaders)

    def responseHeaders(self, stream: Stream) -> None:
        """
        Edit the response's headers (the upstream's, or a later filter's local reply) on their way
        downstream.
        """
        self.response.apply(stream.responseHeaders)

    def __repr__(self) -> str:
        return f"<HeadersFilter request={self.request!r} response={self.response!r}>"


def _checkName(options: Options, key: str, name: str) -> Optional[bytes]:
    """
    C{name} lowercased as bytes, or C{None} after recording an error about C{key} when C{name} is not a
    field name this filter may touch.
    """
    lowered = name.lower()
    if not lowered:
        options.error(key, "a header needs a name: write `name: value`")
        return None
    if lowered == "host" or lowered.startswith(":"):
        options.error(key, f"`{lowered}` cannot be added, set or removed by the headers filter: "
                           "use the route's host_rewrite (or prefix_rewrite for the path)")
        return None
    if lowered in _PROTECTED:
        options.error(key, f"`{lowered}` is managed by the proxy (framing and connection handling) and "
                           "cannot be added, set or removed by the headers filter")
        return None
    bad = sorted({c for c in lowered if c not in _TCHAR})
    if bad:
        options.error(key, f"{name!r} is not a valid header name (it may not contain "
                           f"{', '.join(repr(c) for c in bad)})")
        return None
    return lowered.encode("ascii")


def _fields(options: Options, key: str) -> List[Tuple[bytes, bytes]]:
    """
    The C{name: value} lines of option C{key}, validated, as byte pairs; errors are recorded on C{options}.
    """
    raw = options.string(key, None)
    if raw is None:
        return []
    result: List[Tuple[bytes, bytes]] = []
    # Split on newlines only: a CR inside a line is an error to report, not a line break.
    for line in raw.split("\n"):
        line = line.strip(" \t")
        if not line:
            continue
        # A leading colon belongs to the name (a pseudo-header, which _checkName refuses by name).
        lead = ":" if line.startswith(":") and ":" in line[1:] else ""
        name, colon, value = line[len(lead):].partition(":")
        name = lead + name
        if not colon:
            options.error(key, f"{line!r} is not a header: write one `name: value` per line")
            continue
        value = value.strip(" \t")
        if any(c in value for c in _FORBIDDEN_VALUE_CHARS):
            options.error(key, f"the value of `{name.strip().lower()}` may not contain CR, LF or NUL")
            continue
        checked = _checkName(options, key, name.strip())
        if checked is not None:
            result.append((checked, value.encode("utf-8")))
    return result


def _edits(options: Options, direction: str) -> HeaderEdits:
    """
    Read C{<direction>.add}, C{.set} and C{.remove} into a L{HeaderEdits}.
    """
    addKey, setKey, removeKey = f"{direction}.add", f"{direction}.set", f"{direction}.remove"
    adds = _fields(options, addKey)
    sets = _fields(options, setKey)
    removes: List[bytes] = []
    for name in options.list(removeKey):
        checked = _checkName(options, removeKey, name)
        if checked is not None:
            removes.append(checked)
    setNames = {name for name, _ in sets}
    both = sorted(setNames.intersection(removes))
    if both:
        options.error(removeKey, f"{', '.join(n.decode() for n in both)}: also in {setKey}, which already "
                                 "replaces every existing field of the name")
    return HeaderEdits(frozenset(removes) | frozenset(setNames), tuple(sets) + tuple(adds))


@implementer(IPlugin, IHTTPFilterFactory)
class HeadersFactory:
    """
    The C{headers} plugin: add, set and remove request and response headers (see the module docstring).

    Options: C{request.add}, C{request.set}, C{response.add}, C{response.set} (one C{name: value} per line),
    C{request.remove}, C{response.remove} (names, comma- or line-separated).
    """

    name = "headers"

    def configure(self, options: Options, context: IFilterContext) -> Callable[[Stream], HeadersFilter]:
        """
        Parse and check the options once; errors are recorded on C{options} (naming the key).

        @return: a maker that gives every stream the same stateless L{HeadersFilter}.
        """
        shared = HeadersFilter(_edits(options, "request"), _edits(options, "response"))

        def make(stream: Stream) -> HeadersFilter:
            """
            The filter for C{stream}: the shared one.
            """
            return shared

        return make
