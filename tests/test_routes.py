"""
Tests for route configuration (L{twistedmesh.config.routes}) and route matching
(L{twistedmesh.http.routes}).
"""

from __future__ import annotations

import random
from typing import Dict, List, Sequence, Tuple

from twisted.trial import unittest

from twistedmesh.config.errors import ConfigError
from twistedmesh.config.options import Options
from twistedmesh.config.routes import (
    DirectResponseConfig,
    HeaderMatcher,
    QueryMatcher,
    RedirectConfig,
    RetryPolicy,
    RouteConfig,
    WeightedCluster,
    parseRoute,
)
from twistedmesh.http import routes as httproutes
from twistedmesh.http.routes import DirectResponse, Route, RouteTable, parseQuery
from twistedmesh.http.stream import Stream

CLUSTERS = ("api", "web", "api-v1", "api-v2", "static")


def parse(items: Dict[str, str], table: str = "main", name: str = "api",
          clusters: Sequence[str] = CLUSTERS) -> Tuple[RouteConfig, List[str]]:
    """
    Parse a route section made of C{items} the way the loader does (finish included); return the config
    and the errors as C{"key: why"} strings.
    """
    errors: List[ConfigError] = []
    o = Options("t.ini", f"route:{table}/{name}", dict(items), errors)
    config = parseRoute(table, name, o, clusters)
    o.finish()
    for e in errors:
        assert e.file == "t.ini" and e.section == f"route:{table}/{name}", e
    return config, [f"{e.key}: {e.why}" for e in errors]


def request(path: bytes = b"/", authority: bytes = b"example.com", method: bytes = b"GET",
            headers: Sequence[Tuple[bytes, bytes]] = (), scheme: bytes = b"http") -> Stream:
    """
    A real L{Stream} (with no codec: matching never touches it) carrying the given request.
    """
    stream = Stream(None, [], "edge", None, 0.0)
    stream.method = method
    stream.path = path
    stream.authority = authority
    stream.scheme = scheme
    stream.requestHeaders = list(headers)
    return stream


class ParseMixin:
    """
    Helpers for tests that parse sections.
    """

    def good(self, **items: str) -> RouteConfig:
        """
        Parse C{items} (a C{__} in a keyword stands for a C{.}) and insist there is no error.
        """
        config, errors = parse({k.replace("__", "."): v for k, v in items.items()})
        self.assertEqual(errors, [])  # type: ignore[attr-defined]
        return config

    def bad(self, items: Dict[str, str], *fragments: str) -> List[str]:
        """
        Parse C{items} and insist that, for each fragment, some error contains it.
        """
        _, errors = parse(items)
        for fragment in fragments:
            self.assertTrue(any(fragment in e for e in errors),  # type: ignore[attr-defined]
                            f"{fragment!r} not in {errors}")
        return errors


def table(*sections: Dict[str, str]) -> RouteTable:
    """
    A route table of C{sections}, named C{r0}, C{r1}, ... in order; every section must be valid.
    """
    configs = []
    for i, items in enumerate(sections):
        config, errors = parse(items, name=f"r{i}")
        assert errors == [], errors
        configs.append(config)
    return RouteTable(configs)


def matched(t: RouteTable, stream: Stream) -> str | None:
    """
    The name of the route C{t} matches for C{stream}, or C{None}.
    """
    route = t.match(stream)
    return None if route is None else route.name


class ParseTests(ParseMixin, unittest.TestCase):
    """
    L{parseRoute}: values, defaults and every error path.
    """

    def test_defaults(self):
        """
        A route with only a cluster matches every host and path and gets the documented defaults.
        """
        config = self.good(cluster="api")
        self.assertEqual(config, RouteConfig(table="main", name="api", cluster="api"))
        self.assertEqual((config.hosts, config.prefix, config.path, config.regex), (("*",), "/", None, None))
        self.assertEqual((config.timeout, config.idle_timeout), (15.0, None))
        self.assertEqual(config.retry, RetryPolicy(on=(), num=1, per_try_timeout=None,
                                                   retriable_status_codes=(), replay_buffer=65536))
        self.assertTrue(config.forwards)

    def test_everything(self):
        """
        Every key is read into the frozen config.
        """
        config = self.good(
            hosts="API.example.com, *.example.com", prefix="/api/", methods="GET, POST",
            header__X_User="!exact:bob", header__accept="prefix:text/", query__debug="present",
            query__v="regex:[0-9]+", clusters="api-v1:90, api-v2:10", prefix_rewrite="/",
            host_rewrite="internal:8080", timeout="2s", idle_timeout="1m",
            retry__on="5xx, retriable-status-codes", retry__num="3", retry__per_try_timeout="250ms",
            retry__retriable_status_codes="409, 429", retry__replay_buffer="1MiB",
        )
        self.assertEqual(config.hosts, ("api.example.com", "*.example.com"))
        self.assertEqual(config.methods, ("GET", "POST"))
        self.assertEqual(config.headers, (HeaderMatcher("x_user", "exact", "bob", True),
                                          HeaderMatcher("accept", "prefix", "text/", False)))
        self.assertEqual(config.query, (QueryMatcher("debug", "present", None, False),
                                        QueryMatcher("v", "regex", "[0-9]+", False)))
        self.assertEqual(config.clusters, (WeightedCluster("api-v1", 90), WeightedCluster("api-v2", 10)))
        self.assertEqual((config.prefix_rewrite, config.host_rewrite), ("/", "internal:8080"))
        self.assertEqual((config.timeout, config.idle_timeout), (2.0, 60.0))
        self.assertEqual(config.retry, RetryPolicy(("5xx", "retriable-status-codes"), 3, 0.25, (409, 429), 1 << 20))
        self.assertRaises(Exception, setattr, config, "cluster", "web")

    def test_zeroTimeout(self):
        """
        C{timeout = 0} means no timeout, spelled C{None}.
        """
        self.assertIsNone(self.good(cluster="api", timeout="0").timeout)

    def test_badDuration(self):
        """
        A timeout that is not a duration is an error naming the key.
        """
        self.bad({"cluster": "api", "timeout": "5 minutes"}, "timeout: '5 minutes' is not a duration")

    def test_twoPathMatchers(self):
        """
        A route with more than one of prefix, path and regex is an error on each extra key.
        """
        self.bad({"cluster": "api", "prefix": "/a", "path": "/b", "regex": "/c"},
                 "path: conflicts with `prefix`", "regex: conflicts with `prefix`")

    def test_pathMustStartWithSlash(self):
        """
        A prefix or path not starting with / could never match, so it is an error.
        """
        self.bad({"cluster": "api", "prefix": "api/"}, "prefix: 'api/' must start with /")
        self.bad({"cluster": "api", "path": "api"}, "path: 'api' must start with /")

    def test_regexMatcher(self):
        """
        A regex path matcher replaces the default prefix.
        """
        config = self.good(cluster="api", regex="/v[0-9]+/.*")
        self.assertEqual((config.prefix, config.regex), (None, "/v[0-9]+/.*"))

    def test_badRegex(self):
        """
        A regex that does not compile is an error wherever it is written.
        """
        self.bad({"cluster": "api", "regex": "/(a"}, "regex: '/(a' is not a valid regular expression")
        self.bad({"cluster": "api", "header.x": "regex:[a"}, "header.x: '[a' is not a valid regular expression")
        self.bad({"cluster": "api", "query.x": "!regex:*"}, "query.x: '*' is not a valid regular expression")
        self.bad({"cluster": "api", "regex_rewrite": "(", "regex_rewrite.substitution": "x"},
                 "regex_rewrite: '(' is not a valid regular expression")

    def test_noAction(self):
        """
        A route without an action is an error on the section.
        """
        self.bad({"prefix": "/"}, "None: needs an action")

    def test_twoActions(self):
        """
        A route with two actions is an error on the second.
        """
        self.bad({"cluster": "api", "redirect": "/x"}, "redirect: conflicts with `cluster`")
        self.bad({"clusters": "api:1", "direct_response.status": "200"},
                 "direct_response.status: conflicts with `clusters`")

    def test_unknownCluster(self):
        """
        A cluster that is not configured is an error with a did-you-mean.
        """
        self.bad({"cluster": "apj"}, "cluster: names no [cluster:apj] section (did you mean `api`?)")
        self.bad({"clusters": "api-v1:50, api-v3:50"},
                 "clusters: names no [cluster:api-v3] section (did you mean `api-v")

    def test_badWeights(self):
        """
        Weights must be whole numbers of at least 1, every entry needs one, and a cluster appears once.
        """
        self.bad({"clusters": "api:0, web:1"}, "'api:0': the weight must be a whole number of at least 1")
        self.bad({"clusters": "api:-3, web:1"}, "'api:-3': the weight")
        self.bad({"clusters": "api:ten, web:1"}, "'api:ten': the weight")
        self.bad({"clusters": "api, web:1"}, "'api' is not NAME:WEIGHT")
        self.bad({"clusters": "api:1, api:2"}, "names `api` more than once")

    def test_redirect(self):
        """
        A redirect takes a URL, a status and strip_query.
        """
        config = self.good(redirect="https://example.com/new", redirect__status="308",
                           redirect__strip_query="true")
        self.assertEqual(config.redirect, RedirectConfig("https://example.com/new", 308, True))
        self.assertEqual(self.good(redirect="/new").redirect, RedirectConfig("/new", 301, False))
        self.assertFalse(config.forwards)

    def test_badRedirectStatus(self):
        """
        A redirect status other than 301, 302, 303, 307 and 308 is an error.
        """
        self.bad({"redirect": "/x", "redirect.status": "300"},
                 "redirect.status: '300' is not one of 301, 302, 303, 307, 308")

    def test_badRedirectURL(self):
        """
        A redirect is a path or an http(s) URL, without a fragment.
        """
        for url in ("ftp://example.com/x", "new/path", "//example.com/x", "https:///x"):
            self.bad({"redirect": url}, "redirect: ", "is neither a path")
        self.bad({"redirect": "/x#top"}, "cannot carry a #fragment")
        self.bad({"redirect": "https://e.com/x#top"}, "cannot carry a #fragment")

    def test_redirectOptionsWithoutRedirect(self):
        """
        redirect.status and redirect.strip_query without redirect are errors.
        """
        self.bad({"cluster": "api", "redirect.status": "302", "redirect.strip_query": "yes"},
                 "redirect.status: needs `redirect = URL`", "redirect.strip_query: needs `redirect = URL`")

    def test_directResponse(self):
        """
        A direct response takes a status from 200 to 599 and an optional body.
        """
        config = self.good(direct_response__status="503", direct_response__body="down for maintenance")
        self.assertEqual(config.direct_response, DirectResponseConfig(503, "down for maintenance"))
        self.bad({"direct_response.status": "700"}, "700 is not a status from 200 to 599")
        self.bad({"direct_response.status": "100"}, "100 is less than 200")
        self.bad({"cluster": "api", "direct_response.body": "x"}, "direct_response.body: needs")

    def test_forwardingOptionsOnLocalActions(self):
        """
        Rewrites, timeouts and retries on a redirect or direct response are errors, not silently ignored.
        """
        self.bad({"redirect": "/x", "host_rewrite": "a", "timeout": "1s", "retry.on": "5xx"},
                 "host_rewrite: only applies to a route with cluster or clusters",
                 "timeout: only applies", "retry.on: only applies")

    def test_prefixRewriteWithoutPrefix(self):
        """
        prefix_rewrite needs a written prefix matcher, not a path, a regex or the default.
        """
        self.bad({"cluster": "api", "path": "/a", "prefix_rewrite": "/b"}, "prefix_rewrite: needs a `prefix`")
        self.bad({"cluster": "api", "prefix_rewrite": "/b"}, "prefix_rewrite: needs a `prefix`")

    def test_twoPathRewrites(self):
        """
        prefix_rewrite and regex_rewrite together are an error.
        """
        self.bad({"cluster": "api", "prefix": "/a", "prefix_rewrite": "/b", "regex_rewrite": "a",
                  "regex_rewrite.substitution": "b"}, "regex_rewrite: conflicts with `prefix_rewrite`")

    def test_regexRewriteWithoutSubstitution(self):
        """
        regex_rewrite and regex_rewrite.substitution come together.
        """
        self.bad({"cluster": "api", "regex_rewrite": "^/v1"}, "regex_rewrite.substitution: is required")
        self.bad({"cluster": "api", "regex_rewrite.substitution": "/v2"},
                 "regex_rewrite.substitution: needs `regex_rewrite = PATTERN`")

    def test_emptySubstitution(self):
        """
        An empty substitution is allowed: it deletes what the pattern matched.
        """
        config = self.good(cluster="api", regex_rewrite="/+$", regex_rewrite__substitution="")
        self.assertEqual((config.regex_rewrite, config.regex_substitution), ("/+$", ""))

    def test_badSubstitution(self):
        """
        A substitution referring to a group the pattern lacks is an error at load time.
        """
        self.bad({"cluster": "api", "regex_rewrite": "^/(a)", "regex_rewrite.substitution": r"/\2"},
                 "regex_rewrite.substitution: '/\\\\2' is not a valid substitution")
        self.bad({"cluster": "api", "regex_rewrite": "^/(a)", "regex_rewrite.substitution": r"\g<x>"},
                 "is not a valid substitution")

    def test_badHostRewrite(self):
        """
        host_rewrite must be a host, optionally with a port.
        """
        self.bad({"cluster": "api", "host_rewrite": "a b"}, "host_rewrite: 'a b' is not a host name")
        self.bad({"cluster": "api", "host_rewrite": ":80"}, "host_rewrite: ':80' is not a host name")

    def test_retry(self):
        """
        retry.on names must be known, with a did-you-mean.
        """
        self.bad({"cluster": "api", "retry.on": "5xx, conect-failure"},
                 "retry.on: 'conect-failure' is not one of", "(did you mean `connect-failure`?)")

    def test_retriableStatusCodesWithoutCodes(self):
        """
        retriable-status-codes needs retry.retriable_status_codes, and the codes need the policy.
        """
        self.bad({"cluster": "api", "retry.on": "retriable-status-codes"},
                 "retry.retriable_status_codes: is required when retry.on includes retriable-status-codes")
        self.bad({"cluster": "api", "retry.on": "5xx", "retry.retriable_status_codes": "409"},
                 "retry.retriable_status_codes: has no effect unless")

    def test_badRetriableStatusCodes(self):
        """
        Retriable status codes are whole numbers from 100 to 599.
        """
        self.bad({"cluster": "api", "retry.on": "retriable-status-codes",
                  "retry.retriable_status_codes": "99, 600, x, 503"},
                 "'99' is not a status code", "'600' is not a status code", "'x' is not a status code")

    def test_retryKeysWithoutOn(self):
        """
        Retry settings without retry.on have no effect, so they are errors.
        """
        self.bad({"cluster": "api", "retry.num": "3", "retry.per_try_timeout": "1s"},
                 "retry.num: has no effect without retry.on", "retry.per_try_timeout: has no effect")

    def test_badHosts(self):
        """
        A wildcard stands alone or at one end of a domain, and a host pattern has no port.
        """
        self.bad({"cluster": "api", "hosts": "a*b.com"}, "'a*b.com': a wildcard stands alone")
        self.bad({"cluster": "api", "hosts": "*.*.com"}, "a wildcard stands alone")
        self.bad({"cluster": "api", "hosts": "**"}, "a wildcard stands alone")
        self.bad({"cluster": "api", "hosts": "example.com:8080"}, "without its port: drop the port")
        self.bad({"cluster": "api", "hosts": "[::1]:8080"}, "drop the port")
        self.bad({"cluster": "api", "hosts": "exa mple.com"}, "is not a domain name")

    def test_hostsLowercased(self):
        """
        Host patterns are stored lowercase (matching is case-insensitive) and deduplicated.
        """
        self.assertEqual(self.good(cluster="api", hosts="API.Example.com, api.example.COM, [::1]").hosts,
                         ("api.example.com", "[::1]"))

    def test_badMethods(self):
        """
        Methods are case-sensitive tokens; a lowercase standard method gets a did-you-mean.
        """
        self.bad({"cluster": "api", "methods": "get"}, "methods: 'get': methods are case-sensitive "
                                                        "(did you mean `GET`?)")
        self.bad({"cluster": "api", "methods": "GE T"}, "'GE T' is not a method name")

    def test_badHeaderMatchers(self):
        """
        Header and query matchers must be one of the documented forms.
        """
        self.bad({"cluster": "api", "header.x": "exakt:a"}, "header.x: 'exakt:a' is not a matcher",
                 "(did you mean `exact`?)")
        self.bad({"cluster": "api", "header.x": "exact"}, "exact needs a value")
        self.bad({"cluster": "api", "header.x": "present:yes"}, "present takes no value")
        self.bad({"cluster": "api", "header.": "present"}, "header.: names no header")
        self.bad({"cluster": "api", "header.a b": "present"}, "'a b' is not a header name")
        self.bad({"cluster": "api", "query.x": "prefix:a"}, "query.x: 'prefix:a' is not a matcher")
        self.bad({"cluster": "api", "query.x": "absent"}, "query.x: 'absent' is not a matcher")

    def test_unknownKey(self):
        """
        A misspelled key is reported by finish() with the closest known key.
        """
        self.bad({"cluster": "api", "retry.nmu": "3"}, "retry.nmu: unknown key (did you mean `retry.num`?)")
        self.bad({"cluster": "api", "headers.x": "present"}, "headers.x: unknown key")

    def test_allErrorsCollected(self):
        """
        Every problem of a section is reported in one pass.
        """
        errors = self.bad({"cluster": "apj", "prefix": "/a", "path": "/b", "timeout": "x",
                           "retry.on": "6xx"}, "cluster:", "path:", "timeout:", "retry.on:")
        self.assertEqual(len(errors), 4)


class MatchTests(unittest.TestCase):
    """
    L{RouteTable.match} for each matcher.
    """

    def test_prefix(self):
        """
        A prefix matches paths starting with it, ignoring the query.
        """
        t = table({"prefix": "/api/", "cluster": "api"})
        self.assertEqual(matched(t, request(b"/api/users?x=/y")), "r0")
        self.assertIsNone(matched(t, request(b"/api")))
        self.assertIsNone(matched(t, request(b"/x?/api/")))

    def test_defaultPrefix(self):
        """
        A route without a path matcher matches every path.
        """
        self.assertEqual(matched(table({"cluster": "api"}), request(b"/anything/at/all")), "r0")

    def test_path(self):
        """
        A path matches exactly that path, with any query.
        """
        t = table({"path": "/healthz", "cluster": "api"})
        self.assertEqual(matched(t, request(b"/healthz")), "r0")
        self.assertEqual(matched(t, request(b"/healthz?verbose")), "r0")
        self.assertIsNone(matched(t, request(b"/healthz/")))
        self.assertIsNone(matched(t, request(b"/health")))

    def test_regex(self):
        """
        A regex must match the whole path without the query.
        """
        t = table({"regex": "/v[0-9]+/items", "cluster": "api"})
        self.assertEqual(matched(t, request(b"/v12/items?page=2")), "r0")
        self.assertIsNone(matched(t, request(b"/v12/items/3")))
        self.assertIsNone(matched(t, request(b"/x/v1/items")))

    def test_methods(self):
        """
        Methods restrict a route to the listed methods, case-sensitively.
        """
        t = table({"methods": "GET, HEAD", "cluster": "api"})
        self.assertEqual(matched(t, request(method=b"HEAD")), "r0")
        self.assertIsNone(matched(t, request(method=b"POST")))
        self.assertIsNone(matched(t, request(method=b"get")))

    def test_hostsExact(self):
        """
        An exact host matches case-insensitively and without the port.
        """
        t = table({"hosts": "api.example.com", "cluster": "api"})
        for authority in (b"api.example.com", b"API.Example.COM", b"api.example.com:8443"):
            self.assertEqual(matched(t, request(authority=authority)), "r0", authority)
        self.assertIsNone(matched(t, request(authority=b"web.example.com")))
        self.assertIsNone(matched(t, request(authority=b"")))

    def test_hostsIPv6(self):
        """
        A bracketed IPv6 authority has its port stripped after the bracket, not at the first colon.
        """
        t = table({"hosts": "[::1]", "cluster": "api"})
        self.assertEqual(matched(t, request(authority=b"[::1]:8080")), "r0")
        self.assertEqual(matched(t, request(authority=b"[::1]")), "r0")

    def test_hostsSuffixWildcard(self):
        """
        C{*.example.com} matches any subdomain, at any depth, but not the bare domain.
        """
        t = table({"hosts": "*.example.com", "cluster": "api"})
        self.assertEqual(matched(t, request(authority=b"a.example.com")), "r0")
        self.assertEqual(matched(t, request(authority=b"a.b.Example.com:80")), "r0")
        self.assertIsNone(matched(t, request(authority=b"example.com")))
        self.assertIsNone(matched(t, request(authority=b"badexample.com")))
        self.assertIsNone(matched(t, request(authority=b".example.com")))

    def test_hostsPrefixWildcard(self):
        """
        C{api.*} matches C{api.} followed by anything.
        """
        t = table({"hosts": "api.*", "cluster": "api"})
        self.assertEqual(matched(t, request(authority=b"api.example.org:9")), "r0")
        self.assertIsNone(matched(t, request(authority=b"api.")))
        self.assertIsNone(matched(t, request(authority=b"www.api.example.org")))

    def test_hostsAny(self):
        """
        C{*} matches every authority, even an empty one.
        """
        t = table({"hosts": "*", "cluster": "api"})
        self.assertEqual(matched(t, request(authority=b"")), "r0")
        self.assertEqual(matched(t, request(authority=b"whatever:1")), "r0")

    def test_headerExact(self):
        """
        exact compares the whole value.
        """
        t = table({"header.x-user": "exact:alice", "cluster": "api"})
        self.assertEqual(matched(t, request(headers=[(b"x-user", b"alice")])), "r0")
        self.assertIsNone(matched(t, request(headers=[(b"x-user", b"alice2")])))
        self.assertIsNone(matched(t, request()))

    def test_headerNameCaseInsensitive(self):
        """
        A header name written with capitals matches the lowercase name the codec produces.
        """
        t = table({"header.X-User": "exact:alice", "cluster": "api"})
        self.assertEqual(matched(t, request(headers=[(b"x-user", b"alice")])), "r0")

    def test_headerPrefix(self):
        """
        prefix compares the start of the value.
        """
        t = table({"header.accept": "prefix:text/", "cluster": "api"})
        self.assertEqual(matched(t, request(headers=[(b"accept", b"text/html")])), "r0")
        self.assertIsNone(matched(t, request(headers=[(b"accept", b"application/json")])))

    def test_headerRegex(self):
        """
        regex must match the whole value.
        """
        t = table({"header.x-version": "regex:v[0-9]+", "cluster": "api"})
        self.assertEqual(matched(t, request(headers=[(b"x-version", b"v42")])), "r0")
        self.assertIsNone(matched(t, request(headers=[(b"x-version", b"v42-beta")])))

    def test_headerPresentAbsent(self):
        """
        present needs the header with any value, absent needs it missing.
        """
        t = table({"header.x-debug": "present", "cluster": "api"},
                  {"header.x-debug": "absent", "cluster": "api"})
        self.assertEqual(matched(t, request(headers=[(b"x-debug", b"")])), "r0")
        self.assertEqual(matched(t, request(headers=[(b"x-other", b"1")])), "r1")

    def test_headerInvert(self):
        """
        A leading ! inverts a matcher, and an inverted matcher matches when the header is missing.
        """
        t = table({"header.x-user": "!exact:bob", "cluster": "api"})
        self.assertEqual(matched(t, request(headers=[(b"x-user", b"alice")])), "r0")
        self.assertEqual(matched(t, request()), "r0")
        self.assertIsNone(matched(t, request(headers=[(b"x-user", b"bob")])))
        t = table({"header.x-debug": "!present", "cluster": "api"})
        self.assertIsNone(matched(t, request(headers=[(b"x-debug", b"1")])))
        self.assertEqual(matched(t, request()), "r0")

    def test_repeatedHeaders(self):
        """
        A repeated header is compared as its values joined with a comma, as Envoy does.
        """
        t = table({"header.x-tag": "exact:a,b", "cluster": "api"})
        headers = [(b"x-tag", b"a"), (b"other", b"z"), (b"x-tag", b"b")]
        self.assertEqual(matched(t, request(headers=headers)), "r0")
        self.assertIsNone(matched(t, request(headers=[(b"x-tag", b"a")])))

    def test_allHeaderMatchersMustMatch(self):
        """
        Several header matchers on a route all have to match.
        """
        t = table({"header.a": "present", "header.b": "present", "cluster": "api"})
        self.assertIsNone(matched(t, request(headers=[(b"a", b"1")])))
        self.assertEqual(matched(t, request(headers=[(b"b", b"1"), (b"a", b"1")])), "r0")

    def test_queryExact(self):
        """
        A query exact matcher compares the decoded value of the first occurrence of the parameter.
        """
        t = table({"query.name": "exact:é x", "cluster": "api"})
        self.assertEqual(matched(t, request(b"/?a=1&name=%C3%A9+x")), "r0")
        self.assertEqual(matched(t, request(b"/?name=%C3%A9%20x&name=other")), "r0")
        self.assertIsNone(matched(t, request(b"/?name=other&name=%C3%A9+x")))
        self.assertIsNone(matched(t, request(b"/")))

    def test_queryRegex(self):
        """
        A query regex matcher must match the whole decoded value.
        """
        t = table({"query.page": "regex:[0-9]+", "cluster": "api"})
        self.assertEqual(matched(t, request(b"/list?page=12")), "r0")
        self.assertIsNone(matched(t, request(b"/list?page=12a")))

    def test_queryPresentAndInvert(self):
        """
        present matches a parameter even without a value; ! inverts it.
        """
        t = table({"query.debug": "present", "cluster": "api"}, {"query.debug": "!present", "cluster": "api"})
        self.assertEqual(matched(t, request(b"/?debug")), "r0")
        self.assertEqual(matched(t, request(b"/?x=1&debug=")), "r0")
        self.assertEqual(matched(t, request(b"/?debugx=1")), "r1")

    def test_queryWithRawBytes(self):
        """
        A query with raw or percent-encoded non-UTF-8 bytes is matched, never an exception.
        """
        t = table({"query.q": "exact:x", "cluster": "api"}, {"cluster": "web"})
        self.assertEqual(matched(t, request(b"/?q=%ff\xfe&z=\xff")), "r1")
        self.assertEqual(parseQuery(b"a=%ff&b=\xfe&&c"), [(b"a", b"\xff"), (b"b", b"\xfe"), (b"c", b"")])

    def test_queryParsedLazilyOncePerMatch(self):
        """
        The query is parsed only when a route of the virtual host has query matchers, and then once per
        match however many routes look at it.
        """
        calls = []

        def counting(query):
            calls.append(query)
            return parseQuery(query)

        self.patch(httproutes, "parseQuery", counting)
        t = table({"prefix": "/a", "cluster": "api"})
        t.match(request(b"/a?x=1"))
        self.assertEqual(calls, [])
        t = table({"query.a": "present", "cluster": "api"}, {"query.b": "present", "cluster": "api"},
                  {"query.c": "present", "cluster": "api"})
        self.assertIsNone(t.match(request(b"/?d=1")))
        self.assertEqual(calls, [b"d=1"])

    def test_firstMatchWins(self):
        """
        Routes are tried in file order and the first that matches wins, even if a later one is more specific.
        """
        t = table({"prefix": "/", "cluster": "web"}, {"prefix": "/api/", "cluster": "api"})
        self.assertEqual(matched(t, request(b"/api/x")), "r0")
        t = table({"prefix": "/api/", "cluster": "api"}, {"prefix": "/", "cluster": "web"})
        self.assertEqual(matched(t, request(b"/api/x")), "r0")
        self.assertEqual(matched(t, request(b"/other")), "r1")

    def test_segmentIndexKeepsFileOrder(self):
        """
        Indexing routes by the first path segment never changes which route wins: file order still rules
        across routes tied to a segment and routes that match anywhere.
        """
        t = table(
            {"prefix": "/api/v1/", "cluster": "api"},
            {"prefix": "/", "header.x": "present", "cluster": "web"},
            {"prefix": "/api/", "cluster": "api"},
            {"path": "/api", "cluster": "api"},
            {"regex": "/api.*", "cluster": "api"},
        )
        self.assertEqual(matched(t, request(b"/api/v1/x")), "r0")
        self.assertEqual(matched(t, request(b"/api/v2/x", headers=[(b"x", b"")])), "r1")
        self.assertEqual(matched(t, request(b"/api/v2/x")), "r2")
        self.assertEqual(matched(t, request(b"/api")), "r3")
        self.assertEqual(matched(t, request(b"/apix/y")), "r4")
        self.assertIsNone(matched(t, request(b"/web")))
        self.assertIsNone(matched(t, request(b"*", method=b"OPTIONS")))

    def test_candidates(self):
        """
        Only the routes that can match the path's first segment are tried, in file order.
        """
        t = table(
            {"prefix": "/api/", "cluster": "api"},
            {"prefix": "/web/", "cluster": "web"},
            {"prefix": "/", "cluster": "web"},
            {"prefix": "/w", "cluster": "web"},
            {"path": "/web", "cluster": "web"},
        )

        def names(path):
            return [r.name for r in t.candidates(b"example.com", path)]

        self.assertEqual(names(b"/api/x"), ["r0", "r2", "r3"])
        self.assertEqual(names(b"/web/x"), ["r1", "r2", "r3", "r4"])
        self.assertEqual(names(b"/web"), ["r1", "r2", "r3", "r4"])
        self.assertEqual(names(b"/other"), ["r2", "r3"])
        self.assertEqual(matched(t, request(b"/web")), "r2")

    def test_noMatch(self):
        """
        A request no route matches gets C{None}.
        """
        self.assertIsNone(matched(table({"prefix": "/api/", "cluster": "api"}), request(b"/")))

    def test_routeOnSeveralHosts(self):
        """
        A route listing several hosts is part of each of their virtual hosts, in file order in each.
        """
        t = table({"hosts": "a.com", "prefix": "/x", "cluster": "api"},
                  {"hosts": "a.com, b.com", "cluster": "api"})
        self.assertEqual(matched(t, request(b"/x", b"a.com")), "r0")
        self.assertEqual(matched(t, request(b"/x", b"b.com")), "r1")
        self.assertEqual([r.name for r in t.virtualHost(b"A.com:1")], ["r0", "r1"])


class VirtualHostTests(unittest.TestCase):
    """
    Which virtual host (group of routes sharing a host pattern) a request goes to.
    """

    def setUp(self):
        # File order is deliberately the reverse of precedence.
        self.table = table(
            {"hosts": "*", "cluster": "api"},
            {"hosts": "api.*", "cluster": "api"},
            {"hosts": "api.example.*", "cluster": "api"},
            {"hosts": "*.com", "cluster": "api"},
            {"hosts": "*.example.com", "cluster": "api"},
            {"hosts": "api.example.com", "cluster": "api"},
        )

    def test_precedence(self):
        """
        exact beats the longest suffix wildcard, which beats the longest prefix wildcard, which beats *.
        """
        cases = [
            (b"api.example.com", "r5"),
            (b"web.example.com", "r4"),
            (b"web.other.com", "r3"),
            (b"api.example.org", "r2"),
            (b"api.other.org", "r1"),
            (b"web.other.org", "r0"),
        ]
        for authority, name in cases:
            self.assertEqual(matched(self.table, request(authority=authority)), name, authority)

    def test_noFallback(self):
        """
        Once a virtual host is chosen, a request none of its routes match gets no route, even if a less
        specific virtual host has a matching route (Envoy's semantics).
        """
        t = table({"hosts": "*", "cluster": "web"}, {"hosts": "api.example.com", "prefix": "/api", "cluster": "api"})
        self.assertEqual(matched(t, request(b"/api", b"api.example.com")), "r1")
        self.assertIsNone(matched(t, request(b"/other", b"api.example.com")))
        self.assertEqual(matched(t, request(b"/other", b"web.example.com")), "r0")

    def test_noVirtualHost(self):
        """
        Without a C{*} route, an authority no pattern matches gets no route.
        """
        t = table({"hosts": "a.com", "cluster": "api"})
        self.assertIsNone(t.match(request(authority=b"b.com")))
        self.assertEqual(t.virtualHost(b"b.com"), ())

    def test_cacheBounded(self):
        """
        Resolved authorities are cached, but never more than a bounded number of them.
        """
        for i in range(httproutes._HOST_CACHE_SIZE + 10):
            self.table.match(request(authority=b"h%d.example.com" % i))
        self.assertLessEqual(len(self.table._cache), httproutes._HOST_CACHE_SIZE)
        self.assertEqual(matched(self.table, request(authority=b"API.example.com")), "r5")
        self.assertEqual(matched(self.table, request(authority=b"API.example.com")), "r5")


class ClusterPickTests(unittest.TestCase):
    """
    L{Route.pickCluster}.
    """

    def test_single(self):
        """
        A route with one cluster returns it without drawing a random number.
        """
        route = table({"cluster": "api"}).routes[0]
        rng = random.Random(1)
        state = rng.getstate()
        self.assertEqual(route.pickCluster(rng), "api")
        self.assertEqual(rng.getstate(), state)

    def test_distribution(self):
        """
        90/10 weights give about 90% and 10% of picks.
        """
        route = table({"clusters": "api-v1:90, api-v2:10"}).routes[0]
        rng = random.Random(7)
        picks = [route.pickCluster(rng) for _ in range(10000)]
        share = picks.count("api-v1") / 10000
        self.assertTrue(0.885 <= share <= 0.915, share)
        self.assertEqual(picks.count("api-v1") + picks.count("api-v2"), 10000)

    def test_threeWay(self):
        """
        Every weighted cluster gets its share, the last one included.
        """
        route = table({"clusters": "api:1, web:2, static:1"}).routes[0]
        rng = random.Random(3)
        picks = [route.pickCluster(rng) for _ in range(8000)]
        for name, expected in (("api", 0.25), ("web", 0.5), ("static", 0.25)):
            share = picks.count(name) / 8000
            self.assertTrue(abs(share - expected) <= 0.025, (name, share))

    def test_seedStable(self):
        """
        The same seed gives the same sequence of picks (replays and tests are deterministic).
        """
        route = table({"clusters": "api-v1:50, api-v2:50"}).routes[0]
        rng = random.Random(42)
        self.assertEqual([route.pickCluster(rng) for _ in range(12)], [
            "api-v2", "api-v1", "api-v1", "api-v2", "api-v1", "api-v1",
            "api-v1", "api-v1", "api-v2", "api-v1", "api-v2", "api-v2",
        ])

    def test_notForwarding(self):
        """
        Asking a redirect route for a cluster is a programming error.
        """
        route = table({"redirect": "/x"}).routes[0]
        self.assertRaises(ValueError, route.pickCluster, random.Random(1))


class RewriteTests(unittest.TestCase):
    """
    L{Route.rewrite}.
    """

    def rewritten(self, items: Dict[str, str], path: bytes, authority: bytes = b"example.com"):
        """
        The C{(path, authority)} of a request to C{path} after the route of C{items} rewrote it.
        """
        t = table(items)
        stream = request(path, authority)
        route = t.match(stream)
        assert route is not None
        route.rewrite(stream)
        return stream.path, stream.authority

    def test_prefixRewrite(self):
        """
        prefix_rewrite replaces the matched prefix and keeps the query string.
        """
        items = {"prefix": "/api/", "prefix_rewrite": "/v2/", "cluster": "api"}
        self.assertEqual(self.rewritten(items, b"/api/users?id=/api/1"), (b"/v2/users?id=/api/1", b"example.com"))
        items = {"prefix": "/api/", "prefix_rewrite": "/", "cluster": "api"}
        self.assertEqual(self.rewritten(items, b"/api/users")[0], b"/users")

    def test_prefixRewriteAfterPathChanged(self):
        """
        If the path no longer starts with the prefix (another filter changed it), it is left alone.
        """
        route = table({"prefix": "/api/", "prefix_rewrite": "/", "cluster": "api"}).routes[0]
        stream = request(b"/other")
        route.rewrite(stream)
        self.assertEqual(stream.path, b"/other")

    def test_regexRewrite(self):
        """
        regex_rewrite substitutes every match in the path, with group references, keeping the query.
        """
        items = {"regex_rewrite": "^/service/([^/]+)(/.*)$", "regex_rewrite.substitution": r"\2/instance/\1",
                 "cluster": "api"}
        self.assertEqual(self.rewritten(items, b"/service/foo/v1/api?q=/service/x")[0],
                         b"/v1/api/instance/foo?q=/service/x")
        items = {"regex_rewrite": "/+", "regex_rewrite.substitution": "/", "cluster": "api"}
        self.assertEqual(self.rewritten(items, b"//a///b?x=//")[0], b"/a/b?x=//")

    def test_hostRewrite(self):
        """
        host_rewrite replaces the authority and leaves the path alone.
        """
        items = {"host_rewrite": "internal.svc:8080", "cluster": "api"}
        self.assertEqual(self.rewritten(items, b"/a?b", b"example.com"), (b"/a?b", b"internal.svc:8080"))

    def test_noRewrite(self):
        """
        A route without rewrites leaves the request as it is.
        """
        self.assertEqual(self.rewritten({"cluster": "api"}, b"/a?b", b"e.com"), (b"/a?b", b"e.com"))


class RedirectTests(unittest.TestCase):
    """
    L{Route.redirectLocation} and the redirect status.
    """

    def location(self, items: Dict[str, str], path: bytes, authority: bytes = b"example.com",
                 scheme: bytes = b"http") -> bytes:
        """
        The Location the route of C{items} gives a request.
        """
        route = table(items).routes[0]
        return route.redirectLocation(request(path, authority, scheme=scheme))

    def test_absolute(self):
        """
        An absolute URL replaces scheme, host and path, and the query is kept.
        """
        self.assertEqual(self.location({"redirect": "https://new.example.com/v2/"}, b"/old?a=1"),
                         b"https://new.example.com/v2/?a=1")

    def test_absoluteWithoutPath(self):
        """
        An absolute URL without a path keeps the request's path: the http to https redirect.
        """
        self.assertEqual(self.location({"redirect": "https://example.com"}, b"/a/b?c=d"),
                         b"https://example.com/a/b?c=d")

    def test_pathOnly(self):
        """
        A path-only redirect keeps the request's scheme and authority (port included).
        """
        self.assertEqual(self.location({"redirect": "/login"}, b"/account?next=1", b"Example.com:8443", b"https"),
                         b"https://Example.com:8443/login?next=1")

    def test_stripQuery(self):
        """
        strip_query drops the request's query.
        """
        self.assertEqual(self.location({"redirect": "/login", "redirect.strip_query": "true"}, b"/a?next=1"),
                         b"http://example.com/login")

    def test_urlQueryReplaces(self):
        """
        A query in the redirect URL replaces the request's.
        """
        self.assertEqual(self.location({"redirect": "https://e.com/x?from=old"}, b"/a?next=1"),
                         b"https://e.com/x?from=old")

    def test_status(self):
        """
        A redirect route carries its status and does not forward; a cluster route has no redirect status.
        """
        route = table({"redirect": "/x", "redirect.status": "307"}).routes[0]
        self.assertEqual((route.redirectStatus, route.forwards, route.directResponse), (307, False, None))
        self.assertIsNone(table({"cluster": "api"}).routes[0].redirectStatus)


class RouteTests(unittest.TestCase):
    """
    What a compiled L{Route} carries besides matching.
    """

    def test_directResponse(self):
        """
        A direct-response route carries its status and body as bytes.
        """
        route = table({"direct_response.status": "503", "direct_response.body": "maintenance"}).routes[0]
        self.assertEqual(route.directResponse, DirectResponse(503, b"maintenance"))
        self.assertEqual((route.forwards, route.redirectStatus), (False, None))

    def test_forwardingSettings(self):
        """
        A forwarding route carries its name, table, cluster, timeouts and retry policy.
        """
        route = table({"cluster": "api", "timeout": "0", "idle_timeout": "30s", "retry.on": "5xx, reset",
                       "retry.num": "2"}).routes[0]
        self.assertIsInstance(route, Route)
        self.assertEqual((route.table, route.name, route.cluster, route.forwards), ("main", "r0", "api", True))
        self.assertEqual((route.timeout, route.idleTimeout), (None, 30.0))
        self.assertEqual((route.retry.on, route.retry.num), (("5xx", "reset"), 2))
        self.assertEqual(route.weightedClusters, ())
        self.assertEqual(repr(route), "<Route main/r0>")
