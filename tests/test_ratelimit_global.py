"""
Tests for L{twistedmesh.filters.ratelimit_global} (the global C{ratelimit} filter) and
L{twistedmesh.redis} (its Redis client).

Unit tests run against L{FakeRedis}, a Redis that speaks RESP2 over memory transports, with a L{Clock}:
counting per descriptor value, window rollover, 429s, the timeout, C{failure_mode_deny}, Redis being down,
reconnecting. Then the same filter against a real C{redis-server} (started by the test on a free loopback
port, skipped when it is not installed), and two proxies sharing one Redis.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from typing import Dict, List, Optional, Sequence, Tuple

import treq
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from twistedmesh.config import ConfigError, ListenerConfig, Options
from twistedmesh.filters.ratelimit_global import GlobalRateLimitFactory, GlobalRateLimitFilter
from twistedmesh.observability.stats import StatsStore
from twistedmesh.plugins import FilterContext
from twistedmesh.redis import RedisClient, RedisConnectionError, RedisError, RedisProtocol, _parse, encodeCommand
from twistedmesh.service import MeshService
from twistedmesh.testing import FilterHarness

from .support import (
    FilterPluginTests, edgeConfig, freePort, port, startEcho, startService, stopProxy, waitFor, waitListening,
)

REDIS_SERVER = shutil.which("redis-server")
NO_REDIS = "redis-server is not installed (apt-get install redis-server)"
USER = {"redis": "tcp:127.0.0.1:6379", "domain": "edge", "descriptor.user.key": "header:x-user",
        "descriptor.user.requests_per_unit": "2", "descriptor.user.unit": "minute"}
STATS = ("ok", "over_limit", "error", "failure_mode_allowed")


class FakeRedis:
    """
    Plays a Redis server for L{RedisProtocol}s on L{StringTransport}s: L{flush} reads what the clients
    wrote and answers C{INCRBY} and C{EXPIRE} from a dict (anything else gets an error reply).

    @ivar data: key to count.
    @ivar ttls: key to the last C{EXPIRE} seconds.
    @ivar commands: every command received, in order.
    """

    def __init__(self) -> None:
        self.data: Dict[bytes, int] = {}
        self.ttls: Dict[bytes, int] = {}
        self.commands: List[list] = []
        self.connections: List[Tuple[RedisProtocol, StringTransport]] = []

    def attach(self, protocol: RedisProtocol, transport: StringTransport) -> None:
        """
        A client connected.
        """
        self.connections.append((protocol, transport))

    def flush(self) -> None:
        """
        Answer everything the clients sent so far.
        """
        for protocol, transport in list(self.connections):
            buf = transport.value()
            transport.clear()
            pos, out = 0, []
            while pos < len(buf):
                command, pos = _parse(buf, pos)
                self.commands.append(command)
                out.append(self.answer(command))
            if out:
                protocol.dataReceived(b"".join(out))

    def answer(self, command: list) -> bytes:
        """
        The RESP reply to one command.
        """
        name = command[0].upper()
        if name == b"INCRBY":
            self.data[command[1]] = self.data.get(command[1], 0) + int(command[2])
            return b":%d\r\n" % self.data[command[1]]
        if name == b"EXPIRE":
            self.ttls[command[1]] = int(command[2])
            return b":1\r\n"
        return b"-ERR unknown command '%s'\r\n" % command[0]

    def drop(self) -> None:
        """
        Close every connection (Redis restarting, say).
        """
        connections, self.connections = self.connections, []
        for protocol, _ in connections:
            protocol.connectionLost(Failure(ConnectionDone()))


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """
    Connects to a L{FakeRedis}; C{mode} makes attempts succeed (C{up}), be refused (C{refused}) or never
    finish (C{hang}).
    """

    def __init__(self, server: FakeRedis) -> None:
        self.server = server
        self.mode = "up"
        self.attempts = 0

    def connect(self, factory) -> Deferred:
        """
        One connection attempt, as C{mode} says.
        """
        self.attempts += 1
        if self.mode == "refused":
            return fail(ConnectionRefusedError())
        if self.mode == "hang":
            return Deferred()
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.server.attach(protocol, transport)
        return succeed(protocol)


def makeContext(clock) -> FilterContext:
    """
    The context the service would pass for an HTTP listener named C{edge}, on C{clock}.
    """
    listener = ListenerConfig("edge", "tcp:0", "http", ("limit", "router"))
    return FilterContext(clock, StatsStore(), {}, listener, random.Random(1))


def configure(items: Dict[str, str], clock=None) -> Tuple[GlobalRateLimitFilter, List[ConfigError], FilterContext]:
    """
    Configure the plugin with C{items} as a C{[filter:limit]} section, as the service does (unknown-key
    check included); return the shared filter, the errors and the context.
    """
    errors: List[ConfigError] = []
    options = Options("t.ini", "filter:limit", items, errors)
    context = makeContext(clock if clock is not None else Clock())
    maker = GlobalRateLimitFactory().configure(options, context)
    options.finish()
    return maker(None), errors, context


def whys(errors: List[ConfigError]) -> List[Tuple[Optional[str], str]]:
    """
    The errors as C{(key, why)} pairs.
    """
    return [(e.key, e.why) for e in errors]


def stats(context: FilterContext, prefix: str = "ratelimit") -> Tuple[int, ...]:
    """
    The values of C{ok}, C{over_limit}, C{error} and C{failure_mode_allowed}.
    """
    return tuple(context.stats.get(f"http.edge.{prefix}.{name}").value for name in STATS)


class FakeRedisCase(unittest.TestCase):
    """
    A filter configured with C{USER} (plus the test's options), whose client talks to a L{FakeRedis}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.redis = FakeRedis()
        self.endpoint = FakeEndpoint(self.redis)

    def filter(self, **extra: str) -> GlobalRateLimitFilter:
        """
        The filter for C{USER} and C{extra} (C{__} in a name stands for C{.}); must be valid.
        """
        items = dict(USER)
        items.update({k.replace("__", "."): v for k, v in extra.items()})
        filt, errors, self.context = configure(items, self.clock)
        self.assertEqual(errors, [])
        filt.client = RedisClient(self.endpoint, self.clock)
        return filt

    def start(self, filt: GlobalRateLimitFilter, headers: Sequence[Tuple[bytes, bytes]] = ((b"x-user", b"ann"),),
              path: bytes = b"/", peer: Tuple[str, int] = ("127.0.0.1", 40000)) -> FilterHarness:
        """
        Start one request through C{filt}, without answering the Redis check.
        """
        h = FilterHarness(filt, clock=self.clock, peer=peer)
        h.request(b"GET", path, list(headers))
        return h

    def finish(self, h: FilterHarness) -> int:
        """
        Answer the upstream side of C{h} if the request got there; return the status the client got.
        """
        if h.upstream.method is not None and h.downstream.status is None:
            h.respond(200, [(b"content-length", b"2")], b"ok")
        return h.downstream.status  # type: ignore[return-value]

    def send(self, filt: GlobalRateLimitFilter, **kwargs) -> FilterHarness:
        """
        One request, with Redis answering at once.
        """
        h = self.start(filt, **kwargs)
        self.redis.flush()
        self.finish(h)
        return h

    def statuses(self, filt: GlobalRateLimitFilter, n: int, **kwargs) -> List[int]:
        """
        The statuses of C{n} requests sent one after the other.
        """
        return [self.send(filt, **kwargs).downstream.status for _ in range(n)]  # type: ignore[misc]


class CountingTests(FakeRedisCase):
    """
    Fixed-window counters per descriptor value, lyft/ratelimit style.
    """

    def test_perValue(self):
        """
        Each x-user value has its own counter; the third request of a value in the window gets 429.
        """
        filt = self.filter()
        self.assertEqual(self.statuses(filt, 3), [200, 200, 429])
        self.assertEqual(self.statuses(filt, 3, headers=[(b"x-user", b"bob")]), [200, 200, 429])
        self.assertEqual(stats(self.context), (4, 2, 0, 0))

    def test_keysAndCommands(self):
        """
        The key is C{domain_descriptorKey_value_windowStart}; C{INCRBY key 1} and C{EXPIRE key unit} go in
        one pipeline.
        """
        filt = self.filter()
        self.clock.advance(125)
        h = self.start(filt)
        self.assertTrue(h.paused)
        self.assertEqual(self.redis.connections[0][1].value(),
                         encodeCommand([b"INCRBY", b"edge_header:x-user_ann_120", b"1"])
                         + encodeCommand([b"EXPIRE", b"edge_header:x-user_ann_120", b"60"]))
        self.redis.flush()
        self.assertFalse(h.paused)
        self.assertEqual(self.finish(h), 200)
        self.assertEqual(self.redis.ttls, {b"edge_header:x-user_ann_120": 60})

    def test_noValueNoCheck(self):
        """
        A request with no value for any descriptor goes on at once, without asking Redis or counting.
        """
        filt = self.filter()
        h = self.start(filt, headers=())
        self.assertEqual(h.upstream.method, b"GET")
        self.assertEqual(self.endpoint.attempts, 0)
        self.assertEqual(stats(self.context), (0, 0, 0, 0))

    def test_windowRollover(self):
        """
        A new window starts a new counter (the old one expires in Redis on its own).
        """
        filt = self.filter()
        self.clock.advance(59)
        self.assertEqual(self.statuses(filt, 3), [200, 200, 429])
        self.clock.advance(1)
        self.assertEqual(self.statuses(filt, 3), [200, 200, 429])
        self.assertEqual(sorted(self.redis.data), [b"edge_header:x-user_ann_0", b"edge_header:x-user_ann_60"])

    def test_units(self):
        """
        C{second}, C{hour} and C{day} windows start on whole units, and keys expire after one unit.
        """
        filt = self.filter(descriptor__user__unit="hour", descriptor__ip__key="remote_address",
                           descriptor__ip__requests_per_unit="10", descriptor__ip__unit="day",
                           descriptor__p__key="path", descriptor__p__requests_per_unit="10",
                           descriptor__p__unit="second")
        self.clock.advance(90061.5)
        self.send(filt, path=b"/a?q=1", peer=("10.0.0.9", 1))
        self.assertEqual(self.redis.ttls, {b"edge_header:x-user_ann_90000": 3600,
                                           b"edge_remote_address_10.0.0.9_86400": 86400,
                                           b"edge_path_/a_90061": 1})

    def test_generic(self):
        """
        A C{generic:VALUE} descriptor counts every request under C{generic_key}.
        """
        filt = self.filter(descriptor__all__key="generic:all", descriptor__all__requests_per_unit="3",
                           descriptor__all__unit="minute")
        self.assertEqual(self.statuses(filt, 2, headers=()), [200, 200])
        self.assertEqual(self.statuses(filt, 2), [200, 429])
        self.assertEqual(self.redis.data[b"edge_generic_key_all_0"], 4)

    def test_overLimit(self):
        """
        Over the limit: Envoy's 429 with C{x-envoy-ratelimited: true}, flag C{RL}; the upstream sees nothing.
        """
        filt = self.filter()
        self.statuses(filt, 2)
        h = self.send(filt)
        self.assertEqual(h.downstream.status, 429)
        self.assertIn((b"x-envoy-ratelimited", b"true"), h.downstream.headers)
        self.assertEqual((h.stream.responseFlags, h.stream.responseCodeDetails), (["RL"], "request_rate_limited"))
        self.assertIsNone(h.upstream.method)
        self.assertTrue(h.completed)

    def test_anyDescriptorOverLimit(self):
        """
        With two descriptors, one over its limit refuses the request; both counters go up in one pipeline.
        """
        filt = self.filter(descriptor__ip__key="remote_address", descriptor__ip__requests_per_unit="3",
                           descriptor__ip__unit="minute")
        self.assertEqual(self.statuses(filt, 2), [200, 200])
        self.assertEqual(self.statuses(filt, 2, headers=[(b"x-user", b"bob")]), [200, 429])
        self.assertEqual(len(self.redis.connections), 1)

    def test_sharedConnection(self):
        """
        Concurrent requests share the one connection; replies go back to the right requests in order.
        """
        filt = self.filter()
        hs = [self.start(filt) for _ in range(3)]
        self.assertEqual(len(self.redis.connections), 1)
        self.redis.flush()
        self.assertEqual([self.finish(h) for h in hs], [200, 200, 429])

    def test_sharedAcrossStreams(self):
        """
        The maker hands every stream the same filter.
        """
        errors: List[ConfigError] = []
        maker = GlobalRateLimitFactory().configure(Options("t.ini", "filter:limit", dict(USER), errors),
                                                   makeContext(self.clock))
        self.assertIs(maker(object()), maker(object()))


class FailureTests(FakeRedisCase):
    """
    Redis slow, down or erring: allow (and count an error), or deny with 500 in C{failure_mode_deny}.
    """

    def test_timeoutAllows(self):
        """
        No answer within C{timeout} (20ms by default): the request goes on; C{error} and
        C{failure_mode_allowed} count it, and the late answer is ignored.
        """
        filt = self.filter()
        h = self.start(filt)
        self.clock.advance(0.019)
        self.assertTrue(h.paused)
        self.clock.advance(0.001)
        self.assertFalse(h.paused)
        self.assertEqual(self.finish(h), 200)
        self.assertEqual(stats(self.context), (0, 0, 1, 1))
        self.redis.flush()
        self.assertEqual(stats(self.context), (0, 0, 1, 1))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timeoutOption(self):
        """
        C{timeout} sets how long a request waits.
        """
        filt = self.filter(timeout="100ms")
        h = self.start(filt)
        self.clock.advance(0.05)
        self.redis.flush()
        self.assertEqual(self.finish(h), 200)
        self.assertEqual(stats(self.context), (1, 0, 0, 0))

    def test_failureModeDeny(self):
        """
        With C{failure_mode_deny}, a timeout is answered 500, flag C{RLSE}, as Envoy does.
        """
        filt = self.filter(failure_mode_deny="true")
        h = self.start(filt)
        self.clock.advance(0.02)
        self.assertEqual(h.downstream.status, 500)
        self.assertEqual((h.stream.responseFlags, h.stream.responseCodeDetails), (["RLSE"], "rate_limiter_error"))
        self.assertIsNone(h.upstream.method)
        self.assertEqual(stats(self.context), (0, 0, 1, 0))

    def test_redisDownAllows(self):
        """
        Redis refusing connections: requests go on at once, counted as errors.
        """
        self.endpoint.mode = "refused"
        filt = self.filter()
        h = self.start(filt)
        self.assertEqual(self.finish(h), 200)
        self.assertEqual(stats(self.context), (0, 0, 1, 1))

    def test_redisDownDenies(self):
        """
        Redis down with C{failure_mode_deny}: 500.
        """
        self.endpoint.mode = "refused"
        filt = self.filter(failure_mode_deny="yes")
        self.assertEqual(self.start(filt).downstream.status, 500)

    def test_errorReply(self):
        """
        An error reply from Redis counts as an error and lets the request through.
        """
        filt = self.filter()
        self.redis.answer = lambda command: b"-ERR out of memory\r\n"  # type: ignore[method-assign]
        self.assertEqual(self.statuses(filt, 1), [200])
        self.assertEqual(stats(self.context), (0, 0, 1, 1))

    def test_streamEndsWhileWaiting(self):
        """
        A stream that ends while waiting cancels the timer; Redis's answer is then ignored.
        """
        filt = self.filter()
        h = self.start(filt)
        h.stream.reset("client went away")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.redis.flush()
        self.assertEqual(stats(self.context), (0, 0, 0, 0))


class ReconnectTests(FakeRedisCase):
    """
    One persistent connection, remade with backoff on the injected clock.
    """

    def test_reconnectAfterLoss(self):
        """
        A lost connection is remade after 100ms; meanwhile requests fail fast (and are allowed).
        """
        filt = self.filter()
        self.assertEqual(self.statuses(filt, 1), [200])
        self.redis.drop()
        self.assertEqual(self.statuses(filt, 1), [200])
        self.assertEqual(stats(self.context), (1, 0, 1, 1))
        self.clock.advance(0.1)
        self.assertEqual(self.endpoint.attempts, 2)
        self.assertEqual(len(self.redis.connections), 1)
        self.assertEqual(self.statuses(filt, 2), [200, 429])

    def test_pendingFailOnLoss(self):
        """
        Requests waiting when the connection drops are let through at once, not after the timeout.
        """
        filt = self.filter()
        h = self.start(filt)
        self.redis.drop()
        self.assertEqual(self.finish(h), 200)
        self.assertEqual(stats(self.context), (0, 0, 1, 1))

    def test_backoff(self):
        """
        Failed attempts are spaced 0.1s, 0.2s, 0.4s, ... up to 5s; a success resets the delay.
        """
        self.endpoint.mode = "refused"
        filt = self.filter()
        self.send(filt)
        delays = []
        for _ in range(8):
            call = self.clock.getDelayedCalls()[0]
            delays.append(round(call.getTime() - self.clock.seconds(), 3))
            self.clock.advance(delays[-1])
        self.assertEqual(delays, [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])
        self.assertEqual(self.endpoint.attempts, 9)
        self.endpoint.mode = "up"
        self.clock.advance(5)
        self.assertEqual(filt.client.delay, 0.1)
        self.assertEqual(self.statuses(filt, 1), [200])
        self.assertEqual(self.context.stats.get("http.edge.ratelimit.ok").value, 1)

    def test_connectTimeout(self):
        """
        An attempt that hangs is given up after the connect timeout, then retried.
        """
        self.endpoint.mode = "hang"
        filt = self.filter(timeout="5s")
        h = self.start(filt)
        self.clock.advance(1)
        self.assertEqual(self.finish(h), 200)
        self.assertEqual(stats(self.context), (0, 0, 1, 1))
        self.clock.advance(0.1)
        self.assertEqual(self.endpoint.attempts, 2)

    def test_close(self):
        """
        After L{RedisClient.close}, nothing is retried and calls fail.
        """
        self.endpoint.mode = "refused"
        filt = self.filter()
        self.send(filt)
        filt.client.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.failureResultOf(filt.client.execute([[b"PING"]]), RedisConnectionError)


class ProtocolTests(unittest.TestCase):
    """
    L{RedisProtocol}: RESP2 encoding and parsing, pipelining.
    """

    def connect(self) -> Tuple[RedisProtocol, StringTransport]:
        """
        A protocol on a memory transport.
        """
        protocol = RedisProtocol()
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_encode(self):
        """
        Commands are arrays of bulk strings; str and int arguments are encoded.
        """
        self.assertEqual(encodeCommand([b"SET", "k", 12]), b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n")

    def test_replyTypes(self):
        """
        Simple strings, integers, bulk strings (null too) and arrays, split anywhere across reads.
        """
        protocol, _ = self.connect()
        d = protocol.execute([[b"A"], [b"B"], [b"C"], [b"D"], [b"E"]])
        data = b"+OK\r\n:-3\r\n$5\r\nhe\r\nl\r\n$-1\r\n*2\r\n$1\r\nx\r\n:1\r\n"
        for i in range(len(data)):
            protocol.dataReceived(data[i:i + 1])
        self.assertEqual(self.successResultOf(d), [b"OK", -3, b"he\r\nl", None, [b"x", 1]])

    def test_pipelinesInOrder(self):
        """
        Two pipelines in flight get their own replies, first in first out.
        """
        protocol, _ = self.connect()
        first, second = protocol.execute([[b"A"], [b"B"]]), protocol.execute([[b"C"]])
        protocol.dataReceived(b":1\r\n:2\r\n:3\r\n")
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), ([1, 2], [3]))

    def test_errorReply(self):
        """
        An error reply fails its pipeline with L{RedisError}.
        """
        protocol, _ = self.connect()
        d = protocol.execute([[b"A"], [b"B"]])
        protocol.dataReceived(b":1\r\n-ERR nope\r\n")
        self.assertEqual(str(self.failureResultOf(d, RedisError).value), "ERR nope")

    def test_garbage(self):
        """
        Bytes that are not RESP close the connection.
        """
        protocol, transport = self.connect()
        protocol.execute([[b"A"]])
        protocol.dataReceived(b"?what\r\n")
        self.assertTrue(transport.disconnecting)
        self.flushLoggedErrors()

    def test_lost(self):
        """
        Pipelines waiting when the connection is lost fail with L{RedisConnectionError}.
        """
        protocol, _ = self.connect()
        d = protocol.execute([[b"A"]])
        protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, RedisConnectionError)


class ConfigErrorTests(unittest.TestCase):
    """
    Bad options are errors naming the key.
    """

    def test_required(self):
        """
        C{redis}, C{domain} and a descriptor are required.
        """
        _, errors, _ = configure({})
        self.assertEqual(whys(errors), [
            ("redis", "is required"), ("domain", "is required"),
            ("descriptor.N.key", "at least one descriptor is required (descriptor.N.key, "
                                 "descriptor.N.requests_per_unit, descriptor.N.unit)"),
        ])

    def test_badValues(self):
        """
        A bad endpoint, descriptor key, unit, limit, timeout or stat prefix is reported.
        """
        _, errors, _ = configure({"redis": "nosuch:1", "domain": "a b", "descriptor.1.key": "header:",
                                  "descriptor.1.requests_per_unit": "-1", "descriptor.1.unit": "minutes",
                                  "descriptor.2.key": "generic", "descriptor.2.requests_per_unit": "1",
                                  "descriptor.2.unit": "day", "timeout": "0", "stat_prefix": "a.b"})
        self.assertEqual([key for key, _ in whys(errors)], [
            "redis", "domain", "descriptor.1.key", "descriptor.1.requests_per_unit", "descriptor.1.unit",
            "descriptor.2.key", "timeout", "stat_prefix",
        ])
        self.assertIn("(did you mean `minute`?)", whys(errors)[4][1])
        self.assertIn("generic:VALUE", whys(errors)[5][1])

    def test_duplicate(self):
        """
        Two descriptors with one key are an error.
        """
        items = dict(USER, **{"descriptor.2.key": "header:X-User", "descriptor.2.requests_per_unit": "1",
                              "descriptor.2.unit": "second"})
        _, errors, _ = configure(items)
        self.assertEqual(whys(errors), [("descriptor.2.key", "is the same as an earlier descriptor's key")])

    def test_statPrefix(self):
        """
        C{stat_prefix} names the counters' scope.
        """
        _, errors, context = configure(dict(USER, stat_prefix="fleet"))
        self.assertEqual(errors, [])
        self.assertEqual(stats(context, "fleet"), (0, 0, 0, 0))


class PluginTests(FilterPluginTests, unittest.TestCase):
    """
    The filter is registered like any plugin, and its shipped example stays valid.
    """

    plugin, example = "ratelimit", "ratelimit-global.ini"


class RedisServerCase(unittest.TestCase):
    """
    Starts a throwaway C{redis-server} on a free loopback port for each test.
    """

    if REDIS_SERVER is None:
        skip = NO_REDIS

    @defer.inlineCallbacks
    def setUp(self):
        self.port = freePort()
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(self.stopRedis)
        yield waitListening(self.port, 10, "redis-server to listen", lambda: self.process.poll() is not None)

    def stopRedis(self) -> None:
        """
        Stop the server and wait for it.
        """
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


class RealRedisTests(RedisServerCase):
    """
    The client and the filter against a real Redis.
    """

    @defer.inlineCallbacks
    def test_pipeline(self):
        """
        INCRBY and EXPIRE in one pipeline, as the filter sends them.
        """
        client = RedisClient(clientFromString(reactor, f"tcp:127.0.0.1:{self.port}"), reactor)
        self.addCleanup(client.close)
        replies = yield client.execute([[b"INCRBY", b"k", b"1"], [b"INCRBY", b"k", b"1"], [b"EXPIRE", b"k", b"60"],
                                        [b"TTL", b"k"]])
        self.assertEqual(replies, [1, 2, 1, 60])
        with self.assertRaises(RedisError):
            yield client.execute([[b"NOSUCHCOMMAND"]])

    @defer.inlineCallbacks
    def test_filterCounts(self):
        """
        The filter (on the real reactor) counts in Redis and refuses the request over the limit.
        """
        filt, errors, context = configure(dict(USER, redis=f"tcp:127.0.0.1:{self.port}", timeout="2s"), reactor)
        self.assertEqual(errors, [])
        self.addCleanup(filt.client.close)
        codes = []
        for _ in range(3):
            h = FilterHarness(filt, clock=reactor)  # type: ignore[arg-type]
            h.request(b"GET", b"/", [(b"x-user", b"ann")])
            yield waitFor(lambda: not h.paused, 5, "the filter to hear from Redis", step=0.005)
            if h.upstream.method is not None:
                h.respond(200, [(b"content-length", b"2")], b"ok")
            codes.append(h.downstream.status)
        self.assertEqual(codes, [200, 200, 429])
        self.assertEqual(stats(context), (2, 1, 0, 0))

    @defer.inlineCallbacks
    def test_redisRestart(self):
        """
        Redis going away: requests are allowed with an error; once it is back, the client reconnects.
        """
        filt, errors, context = configure(dict(USER, redis=f"tcp:127.0.0.1:{self.port}", timeout="2s"), reactor)
        self.addCleanup(filt.client.close)
        client = filt.client
        self.assertEqual((yield client.execute([[b"INCRBY", b"k", b"1"]])), [1])
        self.process.terminate()
        self.process.wait(10)
        yield waitFor(lambda: client.protocol is None, 10, "the client to see Redis go", step=0.01)
        with self.assertRaises(RedisConnectionError):
            yield client.execute([[b"INCRBY", b"k", b"1"]])
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        yield waitFor(lambda: client.protocol is not None, 10, "the client to reconnect", step=0.05)
        self.assertEqual((yield client.execute([[b"INCRBY", b"k", b"1"]])), [1])


class TwoProxiesTests(RedisServerCase):
    """
    The issue's test: two proxies (two MeshService instances) sharing one Redis hold one global count.
    """

    @defer.inlineCallbacks
    def startProxy(self, echoPort: int) -> MeshService:
        """
        A proxy whose listener C{edge} limits to 5 requests a day in total, in front of the echo.
        """
        proxy = startService(self, edgeConfig(echoPort, "limit, router", f"""
[filter:limit]
type = ratelimit
redis = tcp:127.0.0.1:{self.port}
domain = fleet
; a day, not a minute: a test run must not straddle two windows
descriptor.all.key = generic:all
descriptor.all.requests_per_unit = 5
descriptor.all.unit = day
timeout = 2s
"""), stop=self.stopWithRedis)
        yield proxy.whenLive
        return proxy

    @defer.inlineCallbacks
    def stopWithRedis(self, service: MeshService):
        """
        Stop C{service} as L{stopProxy} does, then close the filter's Redis connection too.
        """
        yield stopProxy(service)
        yield service.listeners["edge"].factory.settings.makers[0](None).client.close()

    @defer.inlineCallbacks
    def test_sharedCount(self):
        """
        Limit 5: three requests through A and three through B give exactly one 429, and the stats of the
        two proxies add up.
        """
        echoPort = yield startEcho(self)
        a = yield self.startProxy(echoPort)
        b = yield self.startProxy(echoPort)
        codes = []
        for proxy in (a, b, a, b, a, b):
            url = f"http://127.0.0.1:{port(proxy.listeners['edge'])}/hello"
            response = yield treq.get(url, persistent=False)
            yield response.content()
            codes.append(response.code)
        self.assertEqual(codes, [200] * 5 + [429])
        ok = [p.stats.get("http.edge.ratelimit.ok").value for p in (a, b)]
        over = [p.stats.get("http.edge.ratelimit.over_limit").value for p in (a, b)]
        self.assertEqual((ok, over), ([3, 2], [0, 1]))
