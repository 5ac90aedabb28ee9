"""
Route tables compiled for the hot path: L{RouteTable.match} finds the L{Route} for a request, and the
route says what to do with it (pick a cluster, rewrite, redirect, answer directly).

Everything is resolved when the table is built: regexes compiled, strings encoded to bytes, hosts grouped
into virtual hosts, weights made cumulative. A match costs one host lookup (cached per authority), one
split of the path from its query, one dict lookup on the path's first segment (which skips the routes
that cannot match it), and a loop over the remaining routes doing C{startswith} / C{==} / C{fullmatch};
the query is parsed only when a route tried has query matchers.

Virtual hosts follow Envoy: the table picks the most specific host pattern that matches the authority
(exact, then the longest C{*.suffix}, then the longest C{prefix.*}, then C{*}); only the routes listing
that pattern are tried, in file order, and the first that matches wins. See docs/routes.md.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from random import Random
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple
from urllib.parse import unquote_to_bytes, urlsplit

from ..config.routes import RetryPolicy, RouteConfig, WeightedCluster

# Path matcher kinds (small ints compare fastest in the match loop).
_PREFIX, _EXACT, _REGEX = 0, 1, 2
# Header / query matcher kinds.
_M_EXACT, _M_REGEX, _M_PREFIX, _M_PRESENT, _M_ABSENT = 0, 1, 2, 3, 4
_KINDS = {"exact": _M_EXACT, "regex": _M_REGEX, "prefix": _M_PREFIX, "present": _M_PRESENT, "absent": _M_ABSENT}
# Distinct authorities remembered per table: enough for any real deployment, bounded against a client
# sending a new Host on every request.
_HOST_CACHE_SIZE = 4096

# (name, kind, value, invert): value is bytes, a compiled bytes pattern, or None.
_Matcher = Tuple[bytes, int, object, bool]


class DirectResponse(NamedTuple):
    """
    What a C{direct_response} route answers with.
    """

    status: int
    body: bytes


class Route:
    """
    One compiled C{[route:TABLE/NAME]}.

    @ivar name: the route's NAME.
    @ivar table: the route's TABLE.
    @ivar config: the L{RouteConfig} it was built from.
    @ivar cluster: the cluster of a C{cluster = NAME} route, else C{None}.
    @ivar weightedClusters: the C{clusters = a:90, b:10} entries, else C{()}.
    @ivar forwards: whether the request goes to a cluster (C{cluster} or C{weightedClusters}); if not,
        exactly one of C{redirectStatus} and C{directResponse} is set.
    @ivar redirectStatus: the status of a redirect route (301, 302, 303, 307, 308), else C{None}; the
        C{Location} is L{redirectLocation}.
    @ivar directResponse: the L{DirectResponse} of a direct-response route, else C{None}.
    @ivar prefixRewrite: C{(matchedPrefix, replacement)} as bytes, else C{None}.
    @ivar regexRewrite: C{(pattern, substitution)}, a compiled bytes pattern and bytes, else C{None}.
    @ivar hostRewrite: the new authority as bytes, else C{None}.
    @ivar timeout: the whole-request timeout in seconds, or C{None} for none.
    @ivar idleTimeout: the stream idle timeout in seconds, or C{None} for none.
    @ivar retry: the L{RetryPolicy} (C{retry.on} empty: no retries).
    """

    __slots__ = (
        "name", "table", "config", "cluster", "weightedClusters", "forwards", "redirectStatus",
        "directResponse", "prefixRewrite", "regexRewrite", "hostRewrite", "timeout", "idleTimeout", "retry",
        "_names", "_cumulative", "_total", "_rScheme", "_rHost", "_rPath", "_rQuery", "_rStrip",
        "_pathKind", "_pathValue", "_methods", "_headers", "_query", "_peerSan",
    )

    def __init__(self, config: RouteConfig) -> None:
        self.name = config.name
        self.table = config.table
        self.config = config
        self.cluster = config.cluster
        self.weightedClusters: Tuple[WeightedCluster, ...] = config.clusters
        self.forwards = config.forwards
        self.timeout = config.timeout
        self.idleTimeout = config.idle_timeout
        self.retry: RetryPolicy = config.retry

        # Weighted pick: cumulative weights, so a pick is one randrange and one bisect.
        self._names = tuple(w.name for w in config.clusters)
        cumulative: List[int] = []
        total = 0
        for w in config.clusters:
            total += w.weight
            cumulative.append(total)
        self._cumulative = tuple(cumulative)
        self._total = total

        self.prefixRewrite: Optional[Tuple[bytes, bytes]] = None
        if config.prefix_rewrite is not None and config.prefix is not None:
            self.prefixRewrite = (config.prefix.encode(), config.prefix_rewrite.encode())
        self.regexRewrite: Optional[Tuple[re.Pattern, bytes]] = None
        if config.regex_rewrite is not None:
            self.regexRewrite = (re.compile(config.regex_rewrite.encode()),
                                 (config.regex_substitution or "").encode())
        self.hostRewrite = config.host_rewrite.encode() if config.host_rewrite is not None else None

        self.redirectStatus: Optional[int] = None
        self._rScheme = self._rHost = self._rPath = self._rQuery = None
        self._rStrip = False
        if config.redirect is not None:
            self._compileRedirect(config)

        self.directResponse: Optional[DirectResponse] = None
        if config.direct_response is not None:
            self.directResponse = DirectResponse(config.direct_response.status,
                                                 config.direct_response.body.encode())

        if config.path is not None:
            self._pathKind, self._pathValue = _EXACT, config.path.encode()
        elif config.regex is not None:
            self._pathKind, self._pathValue = _REGEX, re.compile(config.regex.encode())
        else:
            self._pathKind, self._pathValue = _PREFIX, (config.prefix or "/").encode()
        self._methods = frozenset(m.encode() for m in config.methods) or None
        self._headers: Tuple[_Matcher, ...] = tuple(
            (h.name.encode(), _KINDS[h.kind], _compileValue(h.kind, h.value), h.invert) for h in config.headers
        )
        self._query: Tuple[_Matcher, ...] = tuple(
            (q.name.encode(), _KINDS[q.kind], _compileValue(q.kind, q.value), q.invert) for q in config.query
        )
        self._peerSan = _peerSanMatcher(config.peer_san)

    def _compileRedirect(self, config: RouteConfig) -> None:
        redirect = config.redirect
        assert redirect is not None
        self.redirectStatus = redirect.status
        self._rStrip = redirect.strip_query
        url = redirect.url
        if url.startswith("/"):
            path, question, query = url.partition("?")
        else:
            parts = urlsplit(url)
            self._rScheme = parts.scheme.encode()
            self._rHost = parts.netloc.encode()
            # "https://example.com" (no path) keeps the request's path: the usual http → https redirect.
            path, question, query = parts.path, "?" if parts.query or url.endswith("?") else "", parts.query
        self._rPath = path.encode() if path else None
        # A query in the redirect URL replaces the request's (Envoy does the same).
        self._rQuery = query.encode() if question else None

    def __repr__(self) -> str:
        return f"<Route {self.table}/{self.name}>"

    def pickCluster(self, random: Random) -> str:
        """
        The cluster to send this request to: the C{cluster}, or a weighted pick among
        C{weightedClusters} using C{random} (injected so that tests and replays are deterministic).

        @raise ValueError: if the route does not forward (a redirect or direct response).
        """
        if self.cluster is not None:
            return self.cluster
        if not self._total:
            raise ValueError(f"route {self.table}/{self.name} does not forward to a cluster")
        return self._names[bisect_right(self._cumulative, random.randrange(self._total))]

    def rewrite(self, stream) -> None:
        """
        Apply the route's rewrites to C{stream} in place: C{prefix_rewrite} or C{regex_rewrite} on the path
        (the query string is kept as it is), C{host_rewrite} on the authority.
        """
        if self.hostRewrite is not None:
            stream.authority = self.hostRewrite
        if self.prefixRewrite is None and self.regexRewrite is None:
            return
        target = stream.path
        i = target.find(b"?")
        if i >= 0:
            path, rest = target[:i], target[i:]
        else:
            path, rest = target, b""
        if self.prefixRewrite is not None:
            prefix, replacement = self.prefixRewrite
            if not path.startswith(prefix):
                return  # a filter changed the path since the match: leave it alone
            path = replacement + path[len(prefix):]
        else:
            pattern, substitution = self.regexRewrite  # type: ignore[misc]
            path = pattern.sub(substitution, path)
        stream.path = path + rest

    def redirectLocation(self, stream) -> bytes:
        """
        The C{Location} of a redirect route for C{stream}: the redirect URL's scheme and host, or the
        request's when the URL is a path; the URL's path, or the request's when an absolute URL has none;
        the URL's query if it has one, else the request's unless C{redirect.strip_query}.
        """
        path, query = splitTarget(stream.path)
        if self._rPath is not None:
            path = self._rPath
        if self._rQuery is not None:
            query = self._rQuery
        elif self._rStrip:
            query = b""
        location = (self._rScheme or stream.scheme) + b"://" + (self._rHost or stream.authority) + path
        return location + b"?" + query if query else location


def _peerSanMatcher(spec: Optional[Tuple[str, str]]):
    """
    C{tls.peer_san} as a predicate on a L{twistedmesh.tls.PeerIdentity} (or C{None}: no match), else C{None}.
    """
    if spec is None:
        return None
    kind, value = spec
    if kind == "exact":
        def test(san: str) -> bool:
            return san == value
    elif kind == "prefix":
        def test(san: str) -> bool:
            return san.startswith(value)
    else:
        pattern = re.compile(value)

        def test(san: str) -> bool:
            return pattern.fullmatch(san) is not None

    def matches(identity) -> bool:
        if identity is None:
            return False
        return any(test(s) for s in identity.uriSANs) or any(test(s) for s in identity.dnsSANs)
    return matches


def _compileValue(kind: str, value: Optional[str]) -> object:
    if value is None:
        return None
    return re.compile(value.encode()) if kind == "regex" else value.encode()


class _VirtualHost:
    """
    The routes of one host pattern, in file order, indexed by the first segment of the path they can
    match, so that a big table is not scanned route by route.

    A route whose prefix has a second C{/} (C{/api/}, C{/api/v1}) or whose exact path is C{/api/...} can
    only match paths whose first segment is C{api}; every other route (C{prefix = /}, C{prefix = /ap},
    a regex) is a candidate for any path. C{buckets} maps a first segment to its candidates, in file
    order; C{fallback} holds the routes a path with any other first segment can match.
    """

    __slots__ = ("entries", "buckets", "fallback")

    def __init__(self, entries: Sequence[tuple]) -> None:
        self.entries = tuple(entries)
        keyed: Dict[bytes, List[int]] = {}
        anywhere: List[int] = []
        for index, entry in enumerate(self.entries):
            segment = _segmentKey(entry[1], entry[2])
            if segment is None:
                anywhere.append(index)
            else:
                keyed.setdefault(segment, []).append(index)
        self.fallback = tuple(self.entries[i] for i in anywhere)
        # Merge each bucket with the routes that match anywhere, keeping file order.
        self.buckets = {
            segment: tuple(self.entries[i] for i in sorted(indexes + anywhere))
            for segment, indexes in keyed.items()
        }


def _segmentKey(kind: int, value: object) -> Optional[bytes]:
    """
    The first path segment every path a matcher accepts has, or C{None} if it accepts several.
    """
    if kind == _EXACT:
        end = value.find(b"/", 1)  # type: ignore[union-attr]
        return value[1:end] if end > 0 else value[1:]  # type: ignore[index]
    if kind == _PREFIX:
        end = value.find(b"/", 1)  # type: ignore[union-attr]
        return value[1:end] if end > 0 else None  # type: ignore[index]
    return None


def splitTarget(target: bytes) -> Tuple[bytes, bytes]:
    """
    A request target as its path and its query (without the C{?}; C{b""} when there is none).
    """
    path, _, query = target.partition(b"?")
    return path, query


class RouteTable:
    """
    The routes of one table (C{[route:TABLE/...]} sections, in file order), compiled for matching.

    @ivar routes: every L{Route}, in file order.
    """

    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        self.routes: Tuple[Route, ...] = tuple(Route(config) for config in routes)
        groups: Dict[str, List[tuple]] = {}
        for route in self.routes:
            entry = (route, route._pathKind, route._pathValue, route._methods, route._headers, route._query,
                     route._peerSan)
            for host in route.config.hosts:
                groups.setdefault(host, []).append(entry)
        vhosts = {host: _VirtualHost(entries) for host, entries in groups.items()}
        self._exact: Dict[bytes, _VirtualHost] = {}
        suffixes: List[Tuple[bytes, _VirtualHost]] = []
        prefixes: List[Tuple[bytes, _VirtualHost]] = []
        self._any = vhosts.get("*", _VirtualHost(()))
        for host, vhost in vhosts.items():
            if host == "*":
                continue
            if host.startswith("*"):
                suffixes.append((host[1:].encode(), vhost))
            elif host.endswith("*"):
                prefixes.append((host[:-1].encode(), vhost))
            else:
                self._exact[host.encode()] = vhost
        # Longest first: the most specific wildcard wins.
        self._suffixes = tuple(sorted(suffixes, key=lambda s: -len(s[0])))
        self._prefixes = tuple(sorted(prefixes, key=lambda p: -len(p[0])))
        self._cache: Dict[bytes, _VirtualHost] = {}

    def virtualHost(self, authority: bytes) -> Tuple[Route, ...]:
        """
        The routes of the virtual host C{authority} (a Host value, any case, maybe with a port) selects,
        in file order; C{()} when no host pattern matches.
        """
        return tuple(entry[0] for entry in self._group(authority).entries)

    def candidates(self, authority: bytes, path: bytes) -> Tuple[Route, ...]:
        """
        The routes L{match} tries, in order, for a request to C{authority} and C{path} (without query):
        those of the chosen virtual host that can match the path's first segment.
        """
        vhost = self._group(authority)
        entries = vhost.fallback
        if vhost.buckets:
            end = path.find(b"/", 1)
            entries = vhost.buckets.get(path[1:end] if end > 0 else path[1:], entries)
        return tuple(entry[0] for entry in entries)

    def _group(self, authority: bytes) -> _VirtualHost:
        vhost = self._cache.get(authority)
        if vhost is None:
            vhost = self._resolve(authority)
            if len(self._cache) >= _HOST_CACHE_SIZE:
                self._cache.clear()
            self._cache[authority] = vhost
        return vhost

    def _resolve(self, authority: bytes) -> _VirtualHost:
        host = authority.lower()
        if host.startswith(b"["):
            end = host.find(b"]")
            if end >= 0:
                host = host[:end + 1]
        else:
            colon = host.find(b":")
            if colon >= 0:
                host = host[:colon]
        vhost = self._exact.get(host)
        if vhost is not None:
            return vhost
        n = len(host)
        for suffix, vhost in self._suffixes:
            # The wildcard matches at least one character: *.example.com does not match .example.com.
            if n > len(suffix) and host.endswith(suffix):
                return vhost
        for prefix, vhost in self._prefixes:
            if n > len(prefix) and host.startswith(prefix):
                return vhost
        return self._any

    def match(self, stream) -> Optional[Route]:
        """
        The first route, in file order, of the virtual host chosen by C{stream.authority} that matches
        C{stream}'s path, method, headers and query; C{None} when none does (Envoy answers 404 with the
        C{NR} flag).
        """
        vhost = self._group(stream.authority)
        path, query = splitTarget(stream.path)
        entries = vhost.fallback
        if vhost.buckets:
            end = path.find(b"/", 1)
            entries = vhost.buckets.get(path[1:end] if end > 0 else path[1:], entries)
        method = stream.method
        params = None
        for route, kind, value, methods, headers, queryMatchers, peerSan in entries:
            if kind == _PREFIX:
                if not path.startswith(value):
                    continue
            elif kind == _EXACT:
                if path != value:
                    continue
            elif value.fullmatch(path) is None:
                continue
            if methods is not None and method not in methods:
                continue
            if headers and not _headersMatch(headers, stream.requestHeaders):
                continue
            if queryMatchers:
                if params is None:
                    params = parseQuery(query)
                if not _queryMatch(queryMatchers, params):
                    continue
            if peerSan is not None and not peerSan(stream.peerIdentity):
                continue
            return route
        return None


def _headersMatch(matchers: Tuple[_Matcher, ...], headers: Sequence[Tuple[bytes, bytes]]) -> bool:
    for name, kind, value, invert in matchers:
        found = [v for k, v in headers if k == name]
        if kind == _M_PRESENT:
            ok = bool(found)
        elif kind == _M_ABSENT:
            ok = not found
        elif not found:
            ok = False
        else:
            # Envoy compares a repeated header as its values joined with ",".
            joined = found[0] if len(found) == 1 else b",".join(found)
            if kind == _M_EXACT:
                ok = joined == value
            elif kind == _M_PREFIX:
                ok = joined.startswith(value)  # type: ignore[arg-type]
            else:
                ok = value.fullmatch(joined) is not None  # type: ignore[union-attr]
        if ok == invert:
            return False
    return True


def parseQuery(query: bytes) -> List[Tuple[bytes, bytes]]:
    """
    The C{(name, value)} pairs of a query string, percent- and C{+}-decoded, blank values kept, in order:
    what C{parse_qsl(query, keep_blank_values=True)} gives, but on bytes throughout (C{parse_qsl} on bytes
    raises on C{%C3%A9} or a raw non-ASCII byte, and a client must not be able to make matching raise).
    """
    params = []
    for field in query.split(b"&"):
        if field:
            name, _, value = field.partition(b"=")
            params.append((unquote_to_bytes(name.replace(b"+", b" ")), unquote_to_bytes(value.replace(b"+", b" "))))
    return params


def _queryMatch(matchers: Tuple[_Matcher, ...], params: List[Tuple[bytes, bytes]]) -> bool:
    for name, kind, value, invert in matchers:
        # Envoy looks at the first occurrence of a repeated parameter.
        found = None
        for k, v in params:
            if k == name:
                found = v
                break
        if kind == _M_PRESENT:
            ok = found is not None
        elif found is None:
            ok = False
        elif kind == _M_EXACT:
            ok = found == value
        else:
            ok = value.fullmatch(found) is not None  # type: ignore[union-attr]
        if ok == invert:
            return False
    return True
