"""
Tests for L{twistedmesh.filters.ratelimit}: the C{local_ratelimit} filter's token buckets (driven through
L{twistedmesh.testing.FilterHarness} with a L{Clock}), descriptors and their LRU bound, shadow mode, the
C{x-ratelimit-*} headers, the C{routes} restriction, stats, config errors, its registration as a plugin,
and a real proxy answering 429 once the bucket is empty.
"""

from __future__ import annotations

import random
from typing import Dict, List, Optional, Sequence, Tuple

import treq
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from twistedmesh.config import ConfigError, ListenerConfig, Options
from twistedmesh.config.routes import RouteConfig
from twistedmesh.filters.ratelimit import LocalRateLimitFactory, LocalRateLimitFilter
from twistedmesh.http.routes import RouteTable
from twistedmesh.observability.stats import StatsStore
from twistedmesh.plugins import FilterContext
from twistedmesh.testing import FilterHarness

from .support import FilterPluginTests, edgeConfig, port, startEcho, startService, stopProxy

BASE = {"max_tokens": "3", "tokens_per_fill": "2", "fill_interval": "1s"}


def makeContext(clock: Clock, routes: Optional[RouteTable] = None) -> FilterContext:
    """
    The context the service would pass for an HTTP listener named C{edge}, on C{clock}.
    """
    listener = ListenerConfig("edge", "tcp:0", "http", ("limit", "router"), routes="main")
    return FilterContext(clock, StatsStore(), {}, listener, random.Random(1), routes)


def configure(items: Dict[str, str], clock: Optional[Clock] = None,
              routes: Optional[RouteTable] = None) -> Tuple[LocalRateLimitFilter, List[ConfigError], FilterContext]:
    """
    Configure the plugin with C{items} as a C{[filter:limit]} section, as the service does (including the
    unknown-key check); return the filter the maker gives, the errors recorded and the context.
    """
    errors: List[ConfigError] = []
    options = Options("t.ini", "filter:limit", items, errors)
    context = makeContext(clock if clock is not None else Clock(), routes)
    maker = LocalRateLimitFactory().configure(options, context)
    options.finish()
    return maker(None), errors, context


def whys(errors: List[ConfigError]) -> List[Tuple[Optional[str], str]]:
    """
    The errors as C{(key, why)} pairs.
    """
    return [(e.key, e.why) for e in errors]


def send(filt: LocalRateLimitFilter, clock: Clock, headers: Sequence[Tuple[bytes, bytes]] = (),
         path: bytes = b"/", peer: Tuple[str, int] = ("127.0.0.1", 40000)) -> FilterHarness:
    """
    Run one request through C{filt}; if it reaches the upstream, answer it with 200.
    """
    h = FilterHarness(filt, clock=clock, peer=peer)
    h.request(b"GET", path, headers)
    if h.upstream.method is not None:
        h.respond(200, [(b"content-length", b"2")], b"ok")
    return h


def statuses(filt: LocalRateLimitFilter, clock: Clock, n: int, **kwargs) -> List[int]:
    """
    The statuses of C{n} requests sent one after the other (keyword arguments as for L{send}).
    """
    return [send(filt, clock, **kwargs).downstream.status for _ in range(n)]


class TokenBucketTests(unittest.TestCase):
    """
    The global bucket: starts full, empties, refills lazily from the clock.
    """

    def setUp(self) -> None:
        self.clock = Clock()

    def filter(self, items: Dict[str, str] = BASE) -> LocalRateLimitFilter:
        """
        A filter configured with C{items}, which must be valid.
        """
        filt, errors, _ = configure(dict(items), self.clock)
        self.assertEqual(errors, [])
        return filt

    def test_startsFull(self):
        """
        A new bucket lets C{max_tokens} requests through, then refuses the next.
        """
        self.assertEqual(statuses(self.filter(), self.clock, 4), [200, 200, 200, 429])

    def test_refusal(self):
        """
        A refused request gets Envoy's 429 local reply, flag C{RL}, and never reaches the upstream.
        """
        filt = self.filter({"max_tokens": "1", "fill_interval": "1s"})
        send(filt, self.clock)
        h = send(filt, self.clock)
        self.assertEqual((h.downstream.status, h.downstream.body), (429, b"local_rate_limited"))
        self.assertEqual((h.stream.responseFlags, h.stream.responseCodeDetails), (["RL"], "local_rate_limited"))
        self.assertIsNone(h.upstream.method)
        self.assertNotIn(b"x-ratelimit-limit", [k for k, _ in h.downstream.headers])
        self.assertTrue(h.completed)

    def test_refillAfterInterval(self):
        """
        C{tokens_per_fill} tokens come back once a whole C{fill_interval} has passed, not before.
        """
        filt = self.filter()
        statuses(filt, self.clock, 3)
        self.clock.advance(0.999)
        self.assertEqual(statuses(filt, self.clock, 1), [429])
        self.clock.advance(0.001)
        self.assertEqual(statuses(filt, self.clock, 3), [200, 200, 429])

    def test_severalIntervals(self):
        """
        Several intervals give several fills at once.
        """
        filt = self.filter({"max_tokens": "10", "tokens_per_fill": "2", "fill_interval": "1s"})
        statuses(filt, self.clock, 10)
        self.clock.advance(3.5)
        self.assertEqual(statuses(filt, self.clock, 7), [200] * 6 + [429])

    def test_refillCapped(self):
        """
        However long the bucket waits, it holds at most C{max_tokens}.
        """
        filt = self.filter()
        statuses(filt, self.clock, 3)
        self.clock.advance(3600)
        self.assertEqual(statuses(filt, self.clock, 4), [200, 200, 200, 429])

    def test_fillPhaseKept(self):
        """
        Fills happen every C{fill_interval} from the bucket's start, as with a timer: a request between
        two fills does not push the next fill back.
        """
        filt = self.filter({"max_tokens": "1", "fill_interval": "1s"})
        statuses(filt, self.clock, 1)
        self.clock.advance(1.5)
        self.assertEqual(statuses(filt, self.clock, 2), [200, 429])
        self.clock.advance(0.5)
        self.assertEqual(statuses(filt, self.clock, 2), [200, 429])

    def test_floatRounding(self):
        """
        Elapsed times that are whole intervals give every fill despite float rounding (0.3 / 0.1 is
        2.999...).
        """
        filt = self.filter({"max_tokens": "5", "fill_interval": "100ms"})
        statuses(filt, self.clock, 5)
        self.clock.advance(0.3)
        self.assertEqual(statuses(filt, self.clock, 4), [200, 200, 200, 429])

    def test_clockGoesBack(self):
        """
        A clock that jumps back neither empties the bucket below zero nor stops fills: the interval
        restarts from the new time.
        """
        filt = self.filter({"max_tokens": "1", "fill_interval": "1s"})
        self.clock.advance(1000)
        statuses(filt, self.clock, 1)
        self.clock.rightNow = 10.0
        self.assertEqual(statuses(filt, self.clock, 1), [429])
        self.clock.advance(1)
        self.assertEqual(statuses(filt, self.clock, 2), [200, 429])

    def test_noTimers(self):
        """
        The filter schedules nothing: refills are computed when requests arrive.
        """
        filt = self.filter()
        statuses(filt, self.clock, 5)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_sharedAcrossStreams(self):
        """
        The maker hands every stream the same filter, so all streams of the listener share the buckets.
        """
        errors: List[ConfigError] = []
        maker = LocalRateLimitFactory().configure(Options("t.ini", "filter:limit", dict(BASE), errors),
                                                  makeContext(self.clock))
        self.assertIs(maker(object()), maker(object()))


class DescriptorTests(unittest.TestCase):
    """
    Descriptors give each distinct value of their key a bucket of its own.
    """

    def setUp(self) -> None:
        self.clock = Clock()

    def filter(self, **extra: str) -> LocalRateLimitFilter:
        """
        A global bucket of 5 and an x-user descriptor of 2 tokens per 10s, plus C{extra} options.
        """
        items = {"max_tokens": "5", "fill_interval": "10s", "descriptor.1.key": "header:X-User",
                 "descriptor.1.max_tokens": "2", "descriptor.1.fill_interval": "10s"}
        items.update({k.replace("__", "."): v for k, v in extra.items()})
        filt, errors, _ = configure(items, self.clock)
        self.assertEqual(errors, [])
        return filt

    def test_perHeaderValue(self):
        """
        Each x-user value has its own bucket; requests without the header use the global one.
        """
        filt = self.filter()
        ann, bob = [(b"x-user", b"ann")], [(b"x-user", b"bob")]
        self.assertEqual(statuses(filt, self.clock, 3, headers=ann), [200, 200, 429])
        self.assertEqual(statuses(filt, self.clock, 3, headers=bob), [200, 200, 429])
        self.assertEqual(statuses(filt, self.clock, 6), [200] * 5 + [429])

    def test_descriptorRefill(self):
        """
        A descriptor bucket refills by its own C{tokens_per_fill} and C{fill_interval}.
        """
        filt = self.filter(descriptor__1__tokens_per_fill="1", descriptor__1__fill_interval="1s")
        ann = [(b"x-user", b"ann")]
        statuses(filt, self.clock, 2, headers=ann)
        self.clock.advance(1)
        self.assertEqual(statuses(filt, self.clock, 2, headers=ann), [200, 429])

    def test_remoteAddress(self):
        """
        C{remote_address} gives each client address its own bucket.
        """
        filt, errors, _ = configure({"max_tokens": "5", "fill_interval": "1s",
                                     "descriptor.ip.key": "remote_address", "descriptor.ip.max_tokens": "1",
                                     "descriptor.ip.fill_interval": "1s"}, self.clock)
        self.assertEqual(errors, [])
        self.assertEqual(statuses(filt, self.clock, 2, peer=("10.0.0.1", 1)), [200, 429])
        self.assertEqual(statuses(filt, self.clock, 2, peer=("10.0.0.2", 1)), [200, 429])

    def test_pathWithoutQuery(self):
        """
        C{path} keys by the path without its query, so a new query string does not get a new bucket.
        """
        filt, errors, _ = configure({"max_tokens": "5", "fill_interval": "1s", "descriptor.p.key": "path",
                                     "descriptor.p.max_tokens": "1", "descriptor.p.fill_interval": "1s"},
                                    self.clock)
        self.assertEqual(errors, [])
        self.assertEqual(send(filt, self.clock, path=b"/a?x=1").downstream.status, 200)
        self.assertEqual(send(filt, self.clock, path=b"/a?x=2").downstream.status, 429)
        self.assertEqual(send(filt, self.clock, path=b"/b").downstream.status, 200)

    def test_allMatchingDescriptors(self):
        """
        A request with values for two descriptors needs a token from both, and a refused one takes none.
        """
        filt = self.filter(descriptor__ip__key="remote_address", descriptor__ip__max_tokens="3",
                           descriptor__ip__fill_interval="10s")
        ann, bob = [(b"x-user", b"ann")], [(b"x-user", b"bob")]
        self.assertEqual(statuses(filt, self.clock, 3, headers=ann), [200, 200, 429])
        # The refused third request took none of the address's 3 tokens: bob gets the last one.
        self.assertEqual(statuses(filt, self.clock, 2, headers=bob), [200, 429])

    def test_lruBound(self):
        """
        At most C{max_buckets} descriptor buckets are kept; the least recently used one is dropped (and
        its value starts again with a full bucket).
        """
        filt = self.filter(max_buckets="2", descriptor__1__max_tokens="1")
        ann, bob, carol = [(b"x-user", b"ann")], [(b"x-user", b"bob")], [(b"x-user", b"carol")]
        statuses(filt, self.clock, 1, headers=ann)
        statuses(filt, self.clock, 1, headers=bob)
        self.assertEqual(statuses(filt, self.clock, 1, headers=ann), [429])  # ann is now the most recent
        self.assertEqual(statuses(filt, self.clock, 1, headers=carol), [200])  # bob is dropped
        self.assertEqual(len(filt.buckets), 2)
        self.assertEqual(statuses(filt, self.clock, 1, headers=ann), [429])
        self.assertEqual(statuses(filt, self.clock, 1, headers=bob), [200])

    def test_longValuesDigested(self):
        """
        A long value is kept as a short digest, and different long values still get different buckets.
        """
        filt = self.filter(descriptor__1__max_tokens="1")
        first, second = [(b"x-user", b"a" * 5000)], [(b"x-user", b"a" * 4999 + b"b")]
        self.assertEqual(statuses(filt, self.clock, 2, headers=first), [200, 429])
        self.assertEqual(statuses(filt, self.clock, 1, headers=second), [200])
        self.assertEqual([len(value) for _, value in filt.buckets], [16, 16])


class ShadowTests(unittest.TestCase):
    """
    C{shadow = true} counts what would be refused but refuses nothing.
    """

    def test_shadow(self):
        """
        Over the limit, requests still reach the upstream; C{rate_limited} counts them, C{enforced} not.
        """
        clock = Clock()
        filt, errors, context = configure({"max_tokens": "1", "fill_interval": "1s", "shadow": "true"}, clock)
        self.assertEqual(statuses(filt, clock, 3), [200, 200, 200])
        values = {s.name: s.value for s in context.stats}
        self.assertEqual((values["http.edge.local_rate_limit.ok"],
                          values["http.edge.local_rate_limit.rate_limited"],
                          values["http.edge.local_rate_limit.enforced"]), (1, 2, 0))


class StatsTests(unittest.TestCase):
    """
    Envoy's counters, made at configure time.
    """

    def test_counters(self):
        """
        C{enabled}, C{ok}, C{rate_limited} and C{enforced} exist from the start and count requests.
        """
        clock = Clock()
        filt, _, context = configure(dict(BASE), clock)
        names = ["http.edge.local_rate_limit." + n for n in ("enabled", "enforced", "ok", "rate_limited")]
        self.assertEqual([(s.name, s.value) for s in context.stats], [(n, 0) for n in names])
        statuses(filt, clock, 5)
        self.assertEqual([s.value for s in context.stats], [5, 2, 3, 2])

    def test_statPrefix(self):
        """
        C{stat_prefix} names the counters' scope, so two limiters on one listener count apart.
        """
        _, errors, context = configure(dict(BASE, stat_prefix="per_user"))
        self.assertEqual(errors, [])
        self.assertIsNotNone(context.stats.get("http.edge.per_user.enforced"))
        self.assertIsNone(context.stats.get("http.edge.local_rate_limit.enforced"))


class RateLimitHeaderTests(unittest.TestCase):
    """
    C{enable_x_ratelimit_headers} adds C{x-ratelimit-limit}, C{-remaining} and C{-reset} to responses.
    """

    def test_allowed(self):
        """
        An allowed request's response says the limit, the tokens left and the seconds to the next fill.
        """
        clock = Clock()
        filt, _, _ = configure({"max_tokens": "3", "fill_interval": "10s", "enable_x_ratelimit_headers": "yes"},
                               clock)
        clock.advance(3)
        h = send(filt, clock)
        self.assertEqual(h.downstream.headers, [
            (b"content-length", b"2"), (b"x-ratelimit-limit", b"3"), (b"x-ratelimit-remaining", b"2"),
            (b"x-ratelimit-reset", b"7"),
        ])

    def test_refused(self):
        """
        The 429 carries the headers too.
        """
        clock = Clock()
        filt, _, _ = configure({"max_tokens": "1", "fill_interval": "1s", "enable_x_ratelimit_headers": "true"},
                               clock)
        send(filt, clock)
        h = send(filt, clock)
        self.assertEqual(h.downstream.status, 429)
        self.assertIn((b"x-ratelimit-remaining", b"0"), h.downstream.headers)
        self.assertIn((b"x-ratelimit-reset", b"1"), h.downstream.headers)

    def test_descriptorLimit(self):
        """
        For a descriptor's request, the headers describe the descriptor's bucket.
        """
        clock = Clock()
        filt, _, _ = configure({"max_tokens": "100", "fill_interval": "1s", "enable_x_ratelimit_headers": "true",
                                "descriptor.1.key": "header:x-user", "descriptor.1.max_tokens": "4",
                                "descriptor.1.fill_interval": "1m"}, clock)
        h = send(filt, clock, headers=[(b"x-user", b"ann")])
        self.assertEqual(h.downstream.headers[1:], [
            (b"x-ratelimit-limit", b"4"), (b"x-ratelimit-remaining", b"3"), (b"x-ratelimit-reset", b"60"),
        ])

    def test_fewestTokensReported(self):
        """
        When two descriptor buckets allowed a request, the headers describe the one with fewer tokens left.
        """
        clock = Clock()
        filt, _, _ = configure({"max_tokens": "100", "fill_interval": "1s", "enable_x_ratelimit_headers": "true",
                                "descriptor.1.key": "header:x-user", "descriptor.1.max_tokens": "4",
                                "descriptor.1.fill_interval": "1m", "descriptor.2.key": "remote_address",
                                "descriptor.2.max_tokens": "2", "descriptor.2.fill_interval": "2s"}, clock)
        h = send(filt, clock, headers=[(b"x-user", b"ann")])
        self.assertEqual(h.downstream.headers[1:], [
            (b"x-ratelimit-limit", b"2"), (b"x-ratelimit-remaining", b"1"), (b"x-ratelimit-reset", b"2"),
        ])

    def test_offByDefault(self):
        """
        Without the option, responses are left alone.
        """
        clock = Clock()
        filt, _, _ = configure(dict(BASE), clock)
        self.assertEqual(send(filt, clock).downstream.headers, [(b"content-length", b"2")])


def routeTable() -> RouteTable:
    """
    A table C{main} with routes C{api} (C{/api/}) and C{web} (everything else).
    """
    return RouteTable([RouteConfig("main", "api", prefix="/api/", cluster="api"),
                       RouteConfig("main", "web", prefix="/", cluster="web")])


class RoutesTests(unittest.TestCase):
    """
    C{routes =} limits only the requests the listener's route table sends to the listed routes.
    """

    def test_onlyListedRoutes(self):
        """
        Requests for a listed route are limited and counted; others pass untouched and uncounted.
        """
        clock = Clock()
        filt, errors, context = configure({"max_tokens": "1", "fill_interval": "1s", "routes": "main/api"},
                                          clock, routeTable())
        self.assertEqual(errors, [])
        self.assertEqual(statuses(filt, clock, 2, path=b"/api/x"), [200, 429])
        self.assertEqual(statuses(filt, clock, 2, path=b"/home"), [200, 200])
        self.assertEqual(context.stats.get("http.edge.local_rate_limit.enabled").value, 2)

    def test_unknownRoute(self):
        """
        A route the table does not have is an error with a suggestion.
        """
        _, errors, _ = configure(dict(BASE, routes="main/apj, main/web"), routes=routeTable())
        self.assertEqual(whys(errors), [
            ("routes", "names no route 'main/apj' of this listener's table (write TABLE/NAME) "
                       "(did you mean `main/api`?)"),
        ])

    def test_noRouteTable(self):
        """
        C{routes} on a listener without a route table is an error.
        """
        _, errors, _ = configure(dict(BASE, routes="main/api"))
        self.assertEqual(whys(errors), [
            ("routes", "the listener names no route table (routes = TABLE), so no route can match"),
        ])


class ConfigErrorTests(unittest.TestCase):
    """
    Bad options are errors naming the key; all are reported at once.
    """

    def test_required(self):
        """
        C{max_tokens} and C{fill_interval} are required.
        """
        _, errors, _ = configure({})
        self.assertEqual(whys(errors), [("max_tokens", "is required"), ("fill_interval", "is required")])

    def test_badNumbers(self):
        """
        Token counts must be at least 1, C{fill_interval} at least 50ms, C{max_buckets} at least 1.
        """
        _, errors, _ = configure({"max_tokens": "0", "tokens_per_fill": "x", "fill_interval": "10ms",
                                  "max_buckets": "0"})
        self.assertEqual(whys(errors), [
            ("max_tokens", "0 is less than 1"),
            ("tokens_per_fill", "'x' is not a whole number"),
            ("fill_interval", "10ms is less than 50ms (Envoy's minimum)"),
            ("max_buckets", "0 is less than 1"),
        ])

    def test_fiftyMillisecondsAllowed(self):
        """
        Exactly 50ms is allowed.
        """
        _, errors, _ = configure({"max_tokens": "1", "fill_interval": "50ms"})
        self.assertEqual(errors, [])

    def test_badDescriptorKey(self):
        """
        A descriptor key must be C{header:NAME}, C{remote_address} or C{path}, and a header a field name.
        """
        common = {"max_tokens": "1", "fill_interval": "1s"}
        items = dict(common)
        for label, spec in (("a", "remote_addr"), ("b", "header:"), ("c", "header:Host"), ("d", "header:x y")):
            items.update({f"descriptor.{label}.key": spec, f"descriptor.{label}.max_tokens": "1",
                          f"descriptor.{label}.fill_interval": "1s"})
        _, errors, _ = configure(items)
        self.assertEqual(whys(errors), [
            ("descriptor.a.key", "'remote_addr' is not one of header:NAME, remote_address, path "
                                 "(did you mean `remote_address`?)"),
            ("descriptor.b.key", "names no header: write header:NAME"),
            ("descriptor.c.key", "`host` is not a header field here: the request's authority and path are kept "
                                 "apart from its headers (use `path` for the path)"),
            ("descriptor.d.key", "'x y' is not a valid header name (it may not contain ' ')"),
        ])

    def test_descriptorIncomplete(self):
        """
        A descriptor needs its key, C{max_tokens} and C{fill_interval}.
        """
        _, errors, _ = configure({"max_tokens": "1", "fill_interval": "1s", "descriptor.1.tokens_per_fill": "2"})
        self.assertEqual(whys(errors), [
            ("descriptor.1.key", "is required"),
            ("descriptor.1.max_tokens", "is required"),
            ("descriptor.1.fill_interval", "is required"),
        ])

    def test_duplicateDescriptor(self):
        """
        Two descriptors with one key are an error.
        """
        items = {"max_tokens": "1", "fill_interval": "1s"}
        for label in ("1", "2"):
            items.update({f"descriptor.{label}.key": "path", f"descriptor.{label}.max_tokens": "1",
                          f"descriptor.{label}.fill_interval": "1s"})
        _, errors, _ = configure(items)
        self.assertEqual(whys(errors), [("descriptor.2.key", "is the same as an earlier descriptor's key")])

    def test_misspelledKeys(self):
        """
        A misspelled option, descriptor ones included, is an unknown key with a suggestion; a malformed
        descriptor key says how to write one.
        """
        _, errors, _ = configure({"max_tokens": "1", "fill_interval": "1s", "shadwo": "true",
                                  "descriptor.1.key": "path", "descriptor.1.max_token": "1",
                                  "descriptor.1.max_tokens": "1", "descriptor.1.fill_interval": "1s",
                                  "descriptor.key": "path"})
        self.assertEqual(whys(errors), [
            ("descriptor.key", "write descriptor.N.key, descriptor.N.max_tokens, descriptor.N.tokens_per_fill "
                               "and descriptor.N.fill_interval (N: letters, digits, _ or -)"),
            ("shadwo", "unknown key (did you mean `shadow`?)"),
            ("descriptor.1.max_token", "unknown key (did you mean `descriptor.1.max_tokens`?)"),
        ])

    def test_badStatPrefix(self):
        """
        C{stat_prefix} must be usable in a stat name.
        """
        _, errors, _ = configure(dict(BASE, stat_prefix="a.b"))
        self.assertEqual(whys(errors), [
            ("stat_prefix", "'a.b' may hold only letters, digits, _ and -: it becomes part of stat names"),
        ])


class PluginTests(FilterPluginTests, unittest.TestCase):
    """
    The filter is registered like any plugin, and its shipped example stays valid.
    """

    plugin, example = "local_ratelimit", "ratelimit.ini"


class IntegrationTests(unittest.TestCase):
    """
    The filter in a real proxy, in front of the built-in HTTP echo.
    """

    @defer.inlineCallbacks
    def test_429WhenEmpty(self):
        """
        With two tokens and no refill in sight, the third request is answered 429 by the proxy.
        """
        echoPort = yield startEcho(self)
        proxy = startService(self, edgeConfig(echoPort, "limit, router", """
[filter:limit]
type = local_ratelimit
max_tokens = 2
fill_interval = 1h
"""), stop=stopProxy)
        yield proxy.whenLive
        url = f"http://127.0.0.1:{port(proxy.listeners['edge'])}/hello"
        codes, bodies = [], []
        for _ in range(3):
            response = yield treq.get(url, persistent=False)
            codes.append(response.code)
            bodies.append((yield response.content()))
        self.assertEqual(codes, [200, 200, 429])
        self.assertEqual(bodies[2], b"local_rate_limited")
        self.assertEqual(proxy.stats.get("http.edge.local_rate_limit.enforced").value, 1)
