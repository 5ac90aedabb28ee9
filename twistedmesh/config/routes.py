"""
C{[route:TABLE/NAME]} sections: how a request is matched and what is done with it (see docs/routes.md).

L{parseRoute} reads one section into a frozen L{RouteConfig}, reporting every bad value through the
section's L{Options} so that all errors of a file are collected. Patterns are checked here (a bad regex
is a config error, never a request-time one); L{twistedmesh.http.routes} compiles the config into the
matcher the router runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Collection, List, Optional, Tuple
from urllib.parse import urlsplit

from .errors import suggest
from .options import Options

#: What C{retry.on} may name (Envoy's C{x-envoy-retry-on} names).
RETRY_ON = (
    "5xx", "gateway-error", "connect-failure", "reset", "retriable-4xx", "retriable-status-codes",
    "refused-stream",
)
#: What C{retry.grpc_on} may name (Envoy's C{x-envoy-retry-grpc-on} names): gRPC statuses that arrive in
#: a response's headers (a trailers-only response).
GRPC_RETRY_ON = ("cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable")
REDIRECT_STATUSES = ("301", "302", "303", "307", "308")
HEADER_KINDS = ("exact", "regex", "prefix", "present", "absent")
QUERY_KINDS = ("exact", "regex", "present")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 token: header and method names
_HOST = re.compile(r"^(\[[0-9a-f:.]+\]|[a-z0-9_.-]*)$")  # a domain or bracketed IPv6, no port
_HOST_PORT = re.compile(r"^(\[[0-9a-f:.]+\]|[a-z0-9_.-]*)(:[0-9]+)?$", re.I)  # the same, port allowed
_STANDARD_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")


@dataclass(frozen=True)
class HeaderMatcher:
    """
    One C{header.NAME = [!]KIND[:VALUE]} matcher. C{name} is lowercase; C{kind} is one of
    L{HEADER_KINDS}; C{value} is the string to compare with, the regex, or C{None} for C{present} and
    C{absent}; C{invert} is the leading C{!}.
    """

    name: str
    kind: str
    value: Optional[str] = None
    invert: bool = False


@dataclass(frozen=True)
class QueryMatcher:
    """
    One C{query.NAME = [!]KIND[:VALUE]} matcher on a (decoded) query parameter; C{kind} is one of
    L{QUERY_KINDS}.
    """

    name: str
    kind: str
    value: Optional[str] = None
    invert: bool = False


@dataclass(frozen=True)
class WeightedCluster:
    """
    One entry of C{clusters = a:90, b:10}.
    """

    name: str
    weight: int


@dataclass(frozen=True)
class RedirectConfig:
    """
    C{redirect = URL}: an absolute C{http(s)://host[/path][?query]} or a path (C{/path[?query]}).
    """

    url: str
    status: int = 301
    strip_query: bool = False


@dataclass(frozen=True)
class DirectResponseConfig:
    """
    C{direct_response.status} and C{direct_response.body}: the proxy answers by itself.
    """

    status: int
    body: str = ""


@dataclass(frozen=True)
class RetryPolicy:
    """
    The C{retry.*} keys. Empty C{on} and C{grpc_on} mean no retries.
    """

    on: Tuple[str, ...] = ()
    num: int = 1
    per_try_timeout: Optional[float] = None
    retriable_status_codes: Tuple[int, ...] = ()
    replay_buffer: int = 64 * 1024
    grpc_on: Tuple[str, ...] = ()  # names from GRPC_RETRY_ON


@dataclass(frozen=True)
class RouteConfig:
    """
    A C{[route:TABLE/NAME]} section.

    Match: C{hosts} (domain patterns, lowercase), exactly one of C{prefix} / C{path} / C{regex} (the
    loader fills in C{prefix = "/"} when none is written), C{methods}, C{headers}, C{query}.

    Action, exactly one of: C{cluster}, C{clusters} (weighted), C{redirect}, C{direct_response}.

    Forwarding options: C{prefix_rewrite}, C{regex_rewrite} with C{regex_substitution},
    C{host_rewrite}, C{timeout} and C{idle_timeout} (seconds, C{None} for none), C{retry}.
    """

    table: str
    name: str
    hosts: Tuple[str, ...] = ("*",)
    prefix: Optional[str] = "/"
    path: Optional[str] = None
    regex: Optional[str] = None
    methods: Tuple[str, ...] = ()
    headers: Tuple[HeaderMatcher, ...] = ()
    query: Tuple[QueryMatcher, ...] = ()
    peer_san: Optional[Tuple[str, str]] = None  # tls.peer_san: (exact | prefix | regex, value)
    cluster: Optional[str] = None
    clusters: Tuple[WeightedCluster, ...] = ()
    redirect: Optional[RedirectConfig] = None
    direct_response: Optional[DirectResponseConfig] = None
    prefix_rewrite: Optional[str] = None
    regex_rewrite: Optional[str] = None
    regex_substitution: Optional[str] = None
    host_rewrite: Optional[str] = None
    timeout: Optional[float] = 15.0
    idle_timeout: Optional[float] = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    @property
    def forwards(self) -> bool:
        """
        Whether the route sends the request to a cluster (rather than redirecting or answering).
        """
        return self.cluster is not None or bool(self.clusters)


def parseRoute(table: str, name: str, o: Options, clusters: Collection[str]) -> RouteConfig:
    """
    Read the section C{[route:TABLE/NAME]} from C{o}. Every problem is recorded in C{o.errors}; the
    returned config is then only good for finding more errors. The caller runs C{o.finish()} afterwards
    to flag unknown keys.

    @param clusters: the names of the configured clusters, which C{cluster} and C{clusters} must name.
    """
    hosts = _hosts(o)
    prefix, path, regex = _pathMatcher(o)
    methods = _methods(o)
    headers, query = _dottedMatchers(o)
    peerSan = _peerSan(o)

    cluster = o.string("cluster", None)
    if cluster is not None:
        _checkCluster(o, "cluster", cluster, clusters)
    weighted = _weightedClusters(o, clusters)
    redirect = _redirect(o)
    direct = _directResponse(o)

    actions = ("cluster", "clusters", "redirect", "direct_response.status")
    written = [k for k in actions if o.string(k, None) is not None]
    if not written:
        o.error(None, "needs an action: one of cluster, clusters, redirect, direct_response.status")
    for key in written[1:]:
        o.error(key, f"conflicts with `{written[0]}`: a route takes exactly one of cluster, clusters, "
                     "redirect and direct_response")
    forwards = bool(written) and written[0] in ("cluster", "clusters")

    prefixRewrite, regexRewrite, substitution, hostRewrite = _rewrites(o, o.string("prefix", None) is not None)
    timeout = o.duration("timeout", 15.0)
    idleTimeout = o.duration("idle_timeout", None)
    retry = _retry(o)

    if written and not forwards:
        # These only make sense for a request that goes upstream: say so rather than ignore them.
        for key in ("prefix_rewrite", "regex_rewrite", "regex_rewrite.substitution", "host_rewrite", "timeout",
                    "idle_timeout", "retry.on", "retry.grpc_on", "retry.num", "retry.per_try_timeout",
                    "retry.retriable_status_codes", "retry.replay_buffer"):
            if key in o:
                o.error(key, f"only applies to a route with cluster or clusters, not with {written[0]}")

    return RouteConfig(
        table=table,
        name=name,
        hosts=hosts,
        prefix=prefix,
        path=path,
        regex=regex,
        methods=methods,
        headers=headers,
        query=query,
        peer_san=peerSan,
        cluster=cluster if written[:1] == ["cluster"] else None,
        clusters=weighted if written[:1] == ["clusters"] else (),
        redirect=redirect if written[:1] == ["redirect"] else None,
        direct_response=direct if written[:1] == ["direct_response.status"] else None,
        prefix_rewrite=prefixRewrite,
        regex_rewrite=regexRewrite,
        regex_substitution=substitution,
        host_rewrite=hostRewrite,
        timeout=timeout or None,  # 0 means no timeout
        idle_timeout=idleTimeout or None,
        retry=retry,
    )


# -- match --------------------------------------------------------------------------------------------------


def _hosts(o: Options) -> Tuple[str, ...]:
    hosts: List[str] = []
    for host in o.list("hosts", ("*",)):
        host = host.lower()
        if host != "*":
            bare = host[1:] if host.startswith("*") else host[:-1] if host.endswith("*") else host
            if "*" in bare or not bare:
                o.error("hosts", f"{host!r}: a wildcard stands alone or at the start or end of a domain "
                                 "(*, *.example.com, api.*)")
                continue
            if not _HOST.match(bare):
                hasPort = _HOST_PORT.match(bare) is not None
                o.error("hosts", f"{host!r}: " + ("hosts match the Host without its port: drop the port"
                                                  if hasPort else "is not a domain name"))
                continue
        if host not in hosts:
            hosts.append(host)
    return tuple(hosts) or ("*",)


def _pathMatcher(o: Options) -> Tuple[Optional[str], Optional[str], Optional[str]]:
    written = [k for k in ("prefix", "path", "regex") if o.string(k, None) is not None]
    for key in written[1:]:
        o.error(key, f"conflicts with `{written[0]}`: a route takes at most one of prefix, path and regex")
    prefix = o.string("prefix", None)
    path = o.string("path", None)
    regex = o.string("regex", None)
    for key, value in (("prefix", prefix), ("path", path)):
        if value is not None and not value.startswith("/"):
            o.error(key, f"{value!r} must start with / (request paths do)")
    if regex is not None and not _compiles(o, "regex", regex):
        regex = None
    if written[:1] == ["path"]:
        return None, path, None
    if written[:1] == ["regex"]:
        return None, None, regex
    return prefix or "/", None, None


def _methods(o: Options) -> Tuple[str, ...]:
    methods: List[str] = []
    for method in o.list("methods"):
        if not _TOKEN.match(method):
            o.error("methods", f"{method!r} is not a method name")
        elif method != method.upper() and method.upper() in _STANDARD_METHODS:
            o.error("methods", f"{method!r}: methods are case-sensitive (did you mean `{method.upper()}`?)")
        elif method not in methods:
            methods.append(method)
    return tuple(methods)


def _dottedMatchers(o: Options) -> Tuple[Tuple[HeaderMatcher, ...], Tuple[QueryMatcher, ...]]:
    headers: List[HeaderMatcher] = []
    query: List[QueryMatcher] = []
    for key in o.keys():
        group, dot, name = key.partition(".")
        if not dot or group not in ("header", "query"):
            continue
        spec = o.string(key, "")
        if not name:
            o.error(key, f"names no {group}: write {group}.NAME = ...")
            continue
        if group == "header":
            if not _TOKEN.match(name):
                o.error(key, f"{name!r} is not a header name")
                continue
            parsed = _matcherSpec(o, key, spec, HEADER_KINDS)
            if parsed is not None:
                headers.append(HeaderMatcher(name.lower(), *parsed))
        else:
            parsed = _matcherSpec(o, key, spec, QUERY_KINDS)
            if parsed is not None:
                query.append(QueryMatcher(name, *parsed))
    return tuple(headers), tuple(query)


def _peerSan(o: Options) -> Optional[Tuple[str, str]]:
    """
    C{tls.peer_san = exact:V | prefix:V | regex:R}: a SAN (URI or DNS) of the client's certificate.
    """
    spec = o.string("tls.peer_san", None)
    if spec is None:
        return None
    parsed = _matcherSpec(o, "tls.peer_san", spec, ("exact", "prefix", "regex"))
    if parsed is None:
        return None
    kind, value, invert = parsed
    if invert:
        o.error("tls.peer_san", "cannot be negated: a route for other clients is a later route without it")
        return None
    return kind, value


def _matcherSpec(o: Options, key: str, spec: str, kinds: Tuple[str, ...]):
    """
    C{[!]KIND[:VALUE]} as C{(kind, value, invert)}, or C{None} after recording an error.
    """
    invert = spec.startswith("!")
    body = spec[1:] if invert else spec
    kind, colon, value = body.partition(":")
    kind = kind.strip()
    forms = ", ".join(f"{k}:VALUE" if k in ("exact", "regex", "prefix") else k for k in kinds)
    if kind not in kinds:
        o.error(key, f"{spec!r} is not a matcher: write one of {forms}, with an optional leading !"
                     f"{suggest(kind, kinds)}")
        return None
    if kind in ("present", "absent"):
        if colon:
            o.error(key, f"{kind} takes no value: write {'!' if invert else ''}{kind}")
            return None
        return kind, None, invert
    if not colon:
        o.error(key, f"{kind} needs a value: write {kind}:VALUE")
        return None
    value = value.strip()
    if kind == "regex" and not _compiles(o, key, value):
        return None
    return kind, value, invert


# -- action -------------------------------------------------------------------------------------------------


def _checkCluster(o: Options, key: str, cluster: str, clusters: Collection[str]) -> bool:
    if cluster in clusters:
        return True
    o.error(key, f"names no [cluster:{cluster}] section{suggest(cluster, clusters)}")
    return False


def _weightedClusters(o: Options, clusters: Collection[str]) -> Tuple[WeightedCluster, ...]:
    weighted: List[WeightedCluster] = []
    for item in o.list("clusters"):
        cluster, colon, weight = item.partition(":")
        cluster, weight = cluster.strip(), weight.strip()
        if not colon or not cluster:
            o.error("clusters", f"{item!r} is not NAME:WEIGHT (write e.g. api-v1:90, api-v2:10)")
            continue
        try:
            value = int(weight)
        except ValueError:
            value = 0
        if value < 1:
            o.error("clusters", f"{item!r}: the weight must be a whole number of at least 1, not {weight!r}")
            continue
        if any(w.name == cluster for w in weighted):
            o.error("clusters", f"names `{cluster}` more than once")
            continue
        if _checkCluster(o, "clusters", cluster, clusters):
            weighted.append(WeightedCluster(cluster, value))
    return tuple(weighted)


def _redirect(o: Options) -> Optional[RedirectConfig]:
    url = o.string("redirect", None)
    status = o.string("redirect.status", "301", choices=REDIRECT_STATUSES)
    stripQuery = o.boolean("redirect.strip_query", False)
    if url is None:
        for key in ("redirect.status", "redirect.strip_query"):
            if key in o:
                o.error(key, "needs `redirect = URL`")
        return None
    if url.startswith("/") and not url.startswith("//"):
        if "#" in url:
            o.error("redirect", f"{url!r}: a redirect cannot carry a #fragment")
            return None
    else:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            o.error("redirect", f"{url!r} is neither a path (/new/path) nor an http(s) URL "
                                "(https://example.com/new/path)")
            return None
        if parts.fragment or url.endswith("#"):
            o.error("redirect", f"{url!r}: a redirect cannot carry a #fragment")
            return None
    return RedirectConfig(url=url, status=int(status), strip_query=bool(stripQuery))


def _directResponse(o: Options) -> Optional[DirectResponseConfig]:
    status = o.integer("direct_response.status", None, minimum=200)
    body = o.string("direct_response.body", "")
    if "direct_response.status" not in o:
        if "direct_response.body" in o:
            o.error("direct_response.body", "needs `direct_response.status`")
        return None
    if status is None:
        return None
    if status > 599:
        o.error("direct_response.status", f"{status} is not a status from 200 to 599")
        return None
    return DirectResponseConfig(status=status, body=body)


# -- forwarding options ---------------------------------------------------------------------------------------


def _rewrites(o: Options, prefixWritten: bool):
    prefixRewrite = o.string("prefix_rewrite", None)
    regexRewrite = o.string("regex_rewrite", None)
    hasSubstitution = "regex_rewrite.substitution" in o
    # An empty substitution is legal: it deletes what the regex matched.
    substitution = o.string("regex_rewrite.substitution", "")
    hostRewrite = o.string("host_rewrite", None)

    if prefixRewrite is not None and not prefixWritten:
        o.error("prefix_rewrite", "needs a `prefix` matcher: it replaces the matched prefix")
        prefixRewrite = None
    if prefixRewrite is not None and regexRewrite is not None:
        o.error("regex_rewrite", "conflicts with `prefix_rewrite`: a route takes at most one path rewrite")
        regexRewrite = None
    if regexRewrite is not None and not hasSubstitution:
        o.error("regex_rewrite.substitution", "is required with regex_rewrite (it may be empty)")
        regexRewrite = None
    elif hasSubstitution and "regex_rewrite" not in o:
        o.error("regex_rewrite.substitution", "needs `regex_rewrite = PATTERN`")
    if regexRewrite is not None:
        if not _compiles(o, "regex_rewrite", regexRewrite):
            regexRewrite = None
        else:
            try:
                # Check the group references now: sub() parses the template even when nothing matches.
                re.compile(regexRewrite.encode()).sub(substitution.encode(), b"")
            except (re.error, IndexError) as e:
                o.error("regex_rewrite.substitution", f"{substitution!r} is not a valid substitution: {e}")
                regexRewrite = None
    hostMatch = _HOST_PORT.match(hostRewrite) if hostRewrite is not None else None
    if hostRewrite is not None and (hostMatch is None or not hostMatch.group(1)):
        o.error("host_rewrite", f"{hostRewrite!r} is not a host name")
        hostRewrite = None
    return prefixRewrite, regexRewrite, substitution if regexRewrite is not None else None, hostRewrite


def _retry(o: Options) -> RetryPolicy:
    on: List[str] = []
    for item in o.list("retry.on"):
        if item not in RETRY_ON:
            o.error("retry.on", f"{item!r} is not one of {', '.join(RETRY_ON)}{suggest(item, RETRY_ON)}")
        elif item not in on:
            on.append(item)
    grpcOn: List[str] = []
    for item in o.list("retry.grpc_on"):
        if item not in GRPC_RETRY_ON:
            o.error("retry.grpc_on", f"{item!r} is not one of {', '.join(GRPC_RETRY_ON)}"
                                     f"{suggest(item, GRPC_RETRY_ON)}")
        elif item not in grpcOn:
            grpcOn.append(item)
    num = o.integer("retry.num", 1)
    perTry = o.duration("retry.per_try_timeout", None)
    codes: List[int] = []
    for item in o.list("retry.retriable_status_codes"):
        try:
            code = int(item)
        except ValueError:
            code = 0
        if not 100 <= code <= 599:
            o.error("retry.retriable_status_codes", f"{item!r} is not a status code from 100 to 599")
        elif code not in codes:
            codes.append(code)
    replay = o.size("retry.replay_buffer", 64 * 1024)

    if "retriable-status-codes" in on and not codes and "retry.retriable_status_codes" not in o:
        o.error("retry.retriable_status_codes", "is required when retry.on includes retriable-status-codes")
    elif "retry.retriable_status_codes" in o and "retriable-status-codes" not in on:
        o.error("retry.retriable_status_codes", "has no effect unless retry.on includes retriable-status-codes")
    if "retry.on" not in o and "retry.grpc_on" not in o:
        for key in ("retry.num", "retry.per_try_timeout", "retry.replay_buffer"):
            if key in o:
                o.error(key, "has no effect without retry.on or retry.grpc_on")
    return RetryPolicy(
        on=tuple(on),
        grpc_on=tuple(grpcOn),
        num=num if num is not None else 1,
        per_try_timeout=perTry or None,
        retriable_status_codes=tuple(codes),
        replay_buffer=replay if replay is not None else 64 * 1024,
    )


def _compiles(o: Options, key: str, pattern: str) -> bool:
    """
    Whether C{pattern} compiles (as the bytes pattern the matcher uses); if not, record why.
    """
    try:
        re.compile(pattern.encode())
    except re.error as e:
        o.error(key, f"{pattern!r} is not a valid regular expression: {e}")
        return False
    return True
