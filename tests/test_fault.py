"""
Tests for L{twistedmesh.filters.fault}: the C{fault} filter's delays (held on a L{Clock}) and aborts
(drawn from a seeded L{random.Random}), header-controlled faults, C{max_active_faults}, timer cleanup,
stats, config errors, its registration as a plugin, and a real proxy answering 503 at 100%.
"""

from __future__ import annotations

import random
from typing import Dict, List, Optional, Sequence, Tuple

import treq
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from twistedmesh.config import ConfigError, ListenerConfig, Options
from twistedmesh.filters.fault import FaultFactory, FaultFilter
from twistedmesh.observability.stats import StatsStore
from twistedmesh.plugins import FilterContext
from twistedmesh.testing import FilterHarness

from .support import FilterPluginTests, edgeConfig, port, startEcho, startService, stopProxy


class Fault:
    """
    A configured C{[filter:chaos]} section of type C{fault}: its maker, errors, clock and stats.
    """

    def __init__(self, items: Dict[str, str], seed: int = 1) -> None:
        self.errors: List[ConfigError] = []
        self.clock = Clock()
        self.stats = StatsStore()
        listener = ListenerConfig("edge", "tcp:0", "http", ("chaos", "router"))
        context = FilterContext(self.clock, self.stats, {}, listener, random.Random(seed), None)
        options = Options("t.ini", "filter:chaos", items, self.errors)
        self.maker = FaultFactory().configure(options, context)
        options.finish()

    def stat(self, name: str) -> int:
        """
        The value of C{http.edge.fault.<name>}.
        """
        stat = self.stats.get("http.edge.fault." + name)
        assert stat is not None, name
        return stat.value

    def send(self, headers: Sequence[Tuple[bytes, bytes]] = ()) -> FilterHarness:
        """
        Start one request through a new filter; the caller answers it with L{answer} if it got through.
        """
        h = FilterHarness(self.maker(None), clock=self.clock)
        h.request(b"GET", b"/", headers)
        return h

    @staticmethod
    def answer(h: FilterHarness) -> None:
        """
        Play the upstream's 200 for a request that reached it.
        """
        h.respond(200, [(b"content-length", b"2")], b"ok")

    def run(self, n: int, headers: Sequence[Tuple[bytes, bytes]] = ()) -> List[Optional[int]]:
        """
        Send C{n} requests one after the other, answering those that reach the upstream; their statuses
        (C{None} for one still held).
        """
        result = []
        for _ in range(n):
            h = self.send(headers)
            if h.upstream.method is not None:
                self.answer(h)
            result.append(h.downstream.status)
        return result


def whys(errors: List[ConfigError]) -> List[Tuple[Optional[str], str]]:
    """
    The errors as C{(key, why)} pairs.
    """
    return [(e.key, e.why) for e in errors]


class DelayTests(unittest.TestCase):
    """
    C{delay.fixed} holds requests on the clock.
    """

    def test_heldUntilDelayPasses(self):
        """
        A delayed request reaches the upstream only when the clock reaches the delay, flagged C{DI}.
        """
        f = Fault({"delay.fixed": "2s"})
        self.assertEqual(f.errors, [])
        h = f.send()
        self.assertTrue(h.paused)
        self.assertEqual(h.stream.responseFlags, ["DI"])
        f.clock.advance(1.999)
        self.assertIsNone(h.upstream.method)
        f.clock.advance(0.001)
        self.assertEqual(h.upstream.method, b"GET")
        self.assertFalse(h.paused)
        f.answer(h)
        self.assertEqual(h.downstream.status, 200)
        self.assertTrue(h.completed)

    def test_stats(self):
        """
        C{delays_injected} counts delays; C{active_faults} counts held streams until they complete.
        """
        f = Fault({"delay.fixed": "1s"})
        first, second = f.send(), f.send()
        self.assertEqual((f.stat("delays_injected"), f.stat("active_faults")), (2, 2))
        f.clock.advance(1)
        f.answer(first)
        self.assertEqual(f.stat("active_faults"), 1)
        f.answer(second)
        self.assertEqual((f.stat("delays_injected"), f.stat("active_faults")), (2, 0))

    def test_percentage(self):
        """
        With C{delay.percentage = 10} and seed 7, exactly 108 of 1000 requests are delayed.
        """
        f = Fault({"delay.fixed": "1s", "delay.percentage": "10"}, seed=7)
        results = f.run(1000)
        self.assertEqual(results.count(None), 108)
        self.assertEqual(f.stat("delays_injected"), 108)

    def test_timerCancelledWhenStreamEndsEarly(self):
        """
        A stream that ends while held (the client went away) leaves no timer behind, and nothing reaches
        the upstream later.
        """
        f = Fault({"delay.fixed": "5s"})
        h = f.send()
        self.assertEqual(len(f.clock.getDelayedCalls()), 1)
        h.stream.reset("downstream_remote_disconnect")
        self.assertTrue(h.completed)
        self.assertEqual(f.clock.getDelayedCalls(), [])
        self.assertEqual(f.stat("active_faults"), 0)
        f.clock.advance(10)
        self.assertIsNone(h.upstream.method)

    def test_oneFilterPerStream(self):
        """
        Each stream gets its own filter (it holds the stream's timer).
        """
        f = Fault({"delay.fixed": "1s"})
        first, second = f.maker(None), f.maker(None)
        self.assertIsInstance(first, FaultFilter)
        self.assertIsNot(first, second)


class AbortTests(unittest.TestCase):
    """
    C{abort.http_status} answers requests from the proxy.
    """

    def test_abort(self):
        """
        An aborted request gets the status and C{fault filter abort}, flag C{FI}, and never goes upstream.
        """
        f = Fault({"abort.http_status": "503"})
        h = f.send()
        self.assertEqual((h.downstream.status, h.downstream.body), (503, b"fault filter abort"))
        self.assertEqual((h.stream.responseFlags, h.stream.responseCodeDetails), (["FI"], "fault_filter_abort"))
        self.assertIsNone(h.upstream.method)
        self.assertTrue(h.completed)
        self.assertEqual((f.stat("aborts_injected"), f.stat("active_faults")), (1, 0))

    def test_percentage(self):
        """
        With C{abort.percentage = 5} and seed 1, exactly 54 of 1000 requests are aborted.
        """
        f = Fault({"abort.http_status": "503", "abort.percentage": "5"}, seed=1)
        results = f.run(1000)
        self.assertEqual((results.count(503), results.count(200)), (54, 946))
        self.assertEqual(f.stat("aborts_injected"), 54)

    def test_zeroPercent(self):
        """
        At 0% nothing is aborted.
        """
        f = Fault({"abort.http_status": "503", "abort.percentage": "0%"})
        self.assertEqual(f.run(50), [200] * 50)

    def test_delayThenAbort(self):
        """
        With both, the delay comes first and the abort follows it; the stream is one active fault.
        """
        f = Fault({"delay.fixed": "1s", "abort.http_status": "502", "max_active_faults": "1"})
        h = f.send()
        self.assertIsNone(h.downstream.status)
        f.clock.advance(1)
        self.assertEqual(h.downstream.status, 502)
        self.assertEqual(h.stream.responseFlags, ["DI", "FI"])
        self.assertIsNone(h.upstream.method)
        self.assertTrue(h.completed)
        self.assertEqual((f.stat("faults_overflow"), f.stat("active_faults")), (0, 0))


class GRPCAbortTests(unittest.TestCase):
    """
    C{abort.grpc_status} answers gRPC requests with a trailers-only gRPC reply.
    """

    GRPC = [(b"content-type", b"application/grpc+proto")]

    def test_grpcAbort(self):
        """
        A gRPC request gets HTTP 200 with C{grpc-status} and C{grpc-message} in its headers, no body, flag
        C{FI}, and never goes upstream.
        """
        f = Fault({"abort.grpc_status": "14"})
        self.assertEqual(f.errors, [])
        h = f.send(self.GRPC)
        headers = dict(h.downstream.headers)
        self.assertEqual((h.downstream.status, h.downstream.body), (200, b""))
        self.assertEqual((headers[b"content-type"], headers[b"grpc-status"], headers[b"grpc-message"]),
                         (b"application/grpc", b"14", b"fault filter abort"))
        self.assertEqual(h.stream.responseFlags, ["FI"])
        self.assertIsNone(h.upstream.method)
        self.assertEqual(f.stat("aborts_injected"), 1)

    def test_notGRPCNotAborted(self):
        """
        A request that is not gRPC goes on untouched.
        """
        f = Fault({"abort.grpc_status": "14"})
        self.assertEqual(f.run(1, [(b"content-type", b"application/json")]), [200])
        self.assertEqual(f.stat("aborts_injected"), 0)

    def test_header(self):
        """
        With C{headers_control}, C{x-envoy-fault-abort-grpc-request} chooses the gRPC status.
        """
        f = Fault({"headers_control": "true"})
        h = f.send(self.GRPC + [(b"x-envoy-fault-abort-grpc-request", b"8")])
        self.assertEqual(dict(h.downstream.headers)[b"grpc-status"], b"8")

    def test_bothStatusesRefused(self):
        """
        C{abort.http_status} and C{abort.grpc_status} exclude each other.
        """
        self.assertEqual(whys(Fault({"abort.http_status": "503", "abort.grpc_status": "14"}).errors),
                         [("abort.grpc_status", "set abort.http_status or abort.grpc_status, not both")])


class ResponseRateLimitTests(unittest.TestCase):
    """
    C{response_rate_limit.kbps} paces the response body on the clock.
    """

    def test_chunkHeldForItsTime(self):
        """
        At 2 KiB/s a 1 KiB chunk reaches the client after half a second, and the next one half a second
        later; C{response_rl_injected} counts the stream.
        """
        f = Fault({"response_rate_limit.kbps": "2"})
        self.assertEqual(f.errors, [])
        h = f.send()
        h.respond(200, [], [b"a" * 1024, b"b" * 1024])
        self.assertEqual(h.downstream.body, b"")
        f.clock.advance(0.499)
        self.assertEqual(h.downstream.body, b"")
        f.clock.advance(0.001)
        self.assertEqual(h.downstream.body, b"a" * 1024)
        f.clock.advance(0.5)
        self.assertEqual(h.downstream.body, b"a" * 1024 + b"b" * 1024)
        self.assertTrue(h.completed)
        self.assertEqual((f.stat("response_rl_injected"), f.stat("active_faults")), (1, 0))

    def test_header(self):
        """
        With C{headers_control}, C{x-envoy-fault-throughput-response} sets the rate in KiB/s.
        """
        f = Fault({"headers_control": "true"})
        h = f.send([(b"x-envoy-fault-throughput-response", b"1")])
        h.respond(200, [], [b"x" * 512])
        f.clock.advance(0.49)
        self.assertEqual(h.downstream.body, b"")
        f.clock.advance(0.01)
        self.assertEqual(h.downstream.body, b"x" * 512)

    def test_percentageZero(self):
        """
        At 0% no response is paced.
        """
        f = Fault({"response_rate_limit.kbps": "1", "response_rate_limit.percentage": "0"})
        h = f.send()
        h.respond(200, [], [b"x" * 4096])
        self.assertEqual(h.downstream.body, b"x" * 4096)

    def test_holdBounded(self):
        """
        A huge chunk at a tiny rate is held at most the bound, not for its full time.
        """
        f = Fault({"response_rate_limit.kbps": "1"})
        h = f.send()
        h.respond(200, [], [b"x" * (1 << 20)])
        f.clock.advance(60)
        self.assertEqual(len(h.downstream.body), 1 << 20)

    def test_timerCancelledOnReset(self):
        """
        A stream reset while a chunk is held leaves no timer behind.
        """
        f = Fault({"response_rate_limit.kbps": "1"})
        h = f.send()
        h.respond(200, [], [b"x" * 1024, b"y"])
        h.stream.reset("downstream_remote_disconnect")
        self.assertEqual(f.clock.getDelayedCalls(), [])
        self.assertEqual(f.stat("active_faults"), 0)


class HeaderControlTests(unittest.TestCase):
    """
    C{headers_control = true} obeys the C{x-envoy-fault-*} request headers.
    """

    def test_abortHeader(self):
        """
        C{x-envoy-fault-abort-request} chooses the status.
        """
        f = Fault({"headers_control": "true"})
        self.assertEqual(f.errors, [])
        self.assertEqual(f.run(1, [(b"x-envoy-fault-abort-request", b"418")]), [418])
        self.assertEqual(f.run(1), [200])

    def test_delayHeader(self):
        """
        C{x-envoy-fault-delay-request} is the delay in milliseconds.
        """
        f = Fault({"headers_control": "true"})
        h = f.send([(b"x-envoy-fault-delay-request", b"250")])
        f.clock.advance(0.249)
        self.assertIsNone(h.upstream.method)
        f.clock.advance(0.001)
        self.assertEqual(h.upstream.method, b"GET")

    def test_headerOverridesConfig(self):
        """
        A header replaces the configured status or delay for its request.
        """
        f = Fault({"headers_control": "true", "delay.fixed": "10s", "abort.http_status": "503"})
        h = f.send([(b"x-envoy-fault-delay-request", b"100"), (b"x-envoy-fault-abort-request", b"429")])
        f.clock.advance(0.1)
        self.assertEqual(h.downstream.status, 429)

    def test_zeroDelayHeader(self):
        """
        A delay header of 0 asks for no delay, even when one is configured.
        """
        f = Fault({"headers_control": "true", "delay.fixed": "10s"})
        self.assertEqual(f.run(1, [(b"x-envoy-fault-delay-request", b"0")]), [200])
        self.assertEqual(f.stat("delays_injected"), 0)

    def test_percentageHeaders(self):
        """
        The percentage headers choose the share of requests, drawn from the seeded random.
        """
        f = Fault({"headers_control": "true"}, seed=3)
        results = f.run(1000, [(b"x-envoy-fault-abort-request", b"503"),
                               (b"x-envoy-fault-abort-request-percentage", b"50")])
        self.assertEqual(results.count(503), 509)
        held = f.run(10, [(b"x-envoy-fault-delay-request", b"100"),
                          (b"x-envoy-fault-delay-request-percentage", b"0")])
        self.assertEqual(held, [200] * 10)

    def test_percentageCapped(self):
        """
        A percentage header cannot go above the configured percentage.
        """
        f = Fault({"headers_control": "true", "abort.percentage": "0"})
        self.assertEqual(f.run(20, [(b"x-envoy-fault-abort-request", b"503"),
                                    (b"x-envoy-fault-abort-request-percentage", b"100")]), [200] * 20)

    def test_badHeaderValuesIgnored(self):
        """
        A status outside 200-599, a value that is not a whole number, and a bad percentage are ignored
        (the last in favour of the configured percentage).
        """
        f = Fault({"headers_control": "true"})
        for name, value in ((b"x-envoy-fault-abort-request", b"199"), (b"x-envoy-fault-abort-request", b"600"),
                            (b"x-envoy-fault-abort-request", b"5o3"), (b"x-envoy-fault-delay-request", b"-5"),
                            (b"x-envoy-fault-delay-request", b"1.5"), (b"x-envoy-fault-delay-request", b"9" * 50)):
            self.assertEqual(f.run(1, [(name, value)]), [200], (name, value))
        self.assertEqual(f.run(1, [(b"x-envoy-fault-abort-request", b"503"),
                                   (b"x-envoy-fault-abort-request-percentage", b"nan")]), [503])

    def test_ignoredByDefault(self):
        """
        Without C{headers_control} the headers do nothing.
        """
        f = Fault({"abort.http_status": "503", "abort.percentage": "0"})
        self.assertEqual(f.run(1, [(b"x-envoy-fault-abort-request", b"418"),
                                   (b"x-envoy-fault-delay-request", b"1000")]), [200])


class MaxActiveFaultsTests(unittest.TestCase):
    """
    C{max_active_faults} bounds the streams with a fault at once.
    """

    def test_overflow(self):
        """
        Past the limit a request gets no fault and C{faults_overflow} counts it; once a faulted stream
        completes, faults resume.
        """
        f = Fault({"delay.fixed": "1s", "max_active_faults": "1"})
        held = f.send()
        passed = f.send()
        self.assertIsNone(held.upstream.method)
        self.assertEqual(passed.upstream.method, b"GET")
        self.assertEqual(passed.stream.responseFlags, [])
        self.assertEqual((f.stat("faults_overflow"), f.stat("delays_injected"), f.stat("active_faults")),
                         (1, 1, 1))
        f.answer(passed)
        f.clock.advance(1)
        f.answer(held)
        self.assertIsNone(f.send().upstream.method)
        self.assertEqual(f.stat("delays_injected"), 2)

    def test_aborts(self):
        """
        The limit applies to aborts too: a stream is active until it completes.
        """
        f = Fault({"abort.http_status": "503", "max_active_faults": "0"})
        self.assertEqual(f.run(3), [200, 200, 200])
        self.assertEqual(f.stat("faults_overflow"), 3)


class ConfigErrorTests(unittest.TestCase):
    """
    Bad options are errors naming the key; all are reported at once.
    """

    def test_noFault(self):
        """
        A section that injects nothing is an error.
        """
        self.assertEqual(whys(Fault({}).errors), [
            (None, "injects no fault: set delay.fixed, abort.http_status, abort.grpc_status, "
                   "response_rate_limit.kbps or headers_control = true"),
        ])

    def test_badValues(self):
        """
        Percentages from 0 to 100, a positive delay, a status from 200 to 599.
        """
        f = Fault({"delay.fixed": "0s", "delay.percentage": "101", "abort.http_status": "600",
                   "abort.percentage": "lots", "max_active_faults": "-1"})
        self.assertEqual(whys(f.errors), [
            ("delay.percentage", "'101' is not a percentage from 0 to 100"),
            ("abort.percentage", "'lots' is not a percentage from 0 to 100"),
            ("max_active_faults", "-1 is less than 0"),
            ("delay.fixed", "must be more than 0"),
            ("abort.http_status", "600 is not a status from 200 to 599"),
        ])

    def test_lowStatus(self):
        """
        A status under 200 is an error.
        """
        self.assertEqual(whys(Fault({"abort.http_status": "99"}).errors),
                         [("abort.http_status", "99 is less than 200")])

    def test_percentageWithoutFault(self):
        """
        A percentage without its fault (and without header control) is an error.
        """
        f = Fault({"delay.fixed": "1s", "abort.percentage": "5"})
        self.assertEqual(whys(f.errors), [
            ("abort.percentage", "has no effect without abort.http_status or abort.grpc_status "
                                 "(or headers_control = true)"),
        ])

    def test_unknownKey(self):
        """
        A misspelled option is an unknown key with a suggestion.
        """
        f = Fault({"delay.fixed": "1s", "delay.percent": "5"})
        self.assertEqual(whys(f.errors), [("delay.percent", "unknown key (did you mean `delay.percentage`?)")])

    def test_statPrefix(self):
        """
        C{stat_prefix} names the counters' scope and must be usable in a stat name.
        """
        f = Fault({"abort.http_status": "503", "stat_prefix": "client_fault"})
        self.assertIsNotNone(f.stats.get("http.edge.client_fault.aborts_injected"))
        self.assertEqual(whys(Fault({"abort.http_status": "503", "stat_prefix": "a b"}).errors), [
            ("stat_prefix", "'a b' may hold only letters, digits, _ and -: it becomes part of stat names"),
        ])


class PluginTests(FilterPluginTests, unittest.TestCase):
    """
    The filter is registered like any plugin, and its shipped example stays valid.
    """

    plugin, example = "fault", "fault.ini"


class IntegrationTests(unittest.TestCase):
    """
    The filter in a real proxy, in front of the built-in HTTP echo.
    """

    @defer.inlineCallbacks
    def test_abortAtHundredPercent(self):
        """
        At 100% every request is answered 503 by the proxy and the echo never sees one.
        """
        echoPort = yield startEcho(self)
        proxy = startService(self, edgeConfig(echoPort, "chaos, router", """
[filter:chaos]
type = fault
abort.http_status = 503
abort.percentage = 100
"""), stop=stopProxy)
        yield proxy.whenLive
        url = f"http://127.0.0.1:{port(proxy.listeners['edge'])}/hello"
        for _ in range(2):
            response = yield treq.get(url, persistent=False)
            body = yield response.content()
            self.assertEqual((response.code, body), (503, b"fault filter abort"))
        self.assertEqual(proxy.stats.get("http.edge.fault.aborts_injected").value, 2)
        self.assertEqual(proxy.stats.get("cluster.echo.upstream_rq_total").value, 0)


    @defer.inlineCallbacks
    def test_grpcAbort(self):
        """
        A gRPC request through a real proxy is answered 200 with C{grpc-status: 14} and no body.
        """
        echoPort = yield startEcho(self)
        proxy = startService(self, edgeConfig(echoPort, "chaos, router", """
[filter:chaos]
type = fault
abort.grpc_status = 14
"""), stop=stopProxy)
        yield proxy.whenLive
        url = f"http://127.0.0.1:{port(proxy.listeners['edge'])}/svc.Echo/Say"
        response = yield treq.post(url, data=b"", headers={b"content-type": [b"application/grpc"]},
                                   persistent=False)
        body = yield response.content()
        self.assertEqual((response.code, body), (200, b""))
        self.assertEqual(response.headers.getRawHeaders(b"grpc-status"), [b"14"])
        self.assertEqual(response.headers.getRawHeaders(b"grpc-message"), [b"fault filter abort"])
        self.assertEqual(proxy.stats.get("cluster.echo.upstream_rq_total").value, 0)
