"""
A small non-blocking Redis client: the RESP2 protocol on Twisted, for the global C{ratelimit} filter.

    client = RedisClient(clientFromString(reactor, "tcp:127.0.0.1:6379"), reactor)
    d = client.execute([[b"INCRBY", b"k", b"1"], [b"EXPIRE", b"k", b"60"]])
    # d fires with [1, 1]: one reply per command, in order

Why not txredisapi: the filter needs two commands (C{INCRBY} and C{EXPIRE}), pipelined. A dependency for
that is one more package to install, audit and keep compatible with the Twisted we support; this module
is about 150 lines of code (the rest is docstrings), does exactly what the filter needs, and does it the
way the rest of twistedmesh does: an injected clock (so tests drive the connect timeout and the reconnect
backoff with a L{twisted.internet.task.Clock}), an endpoint (so C{tcp:}, C{unix:} and C{tls:} all work),
and no module-level state.

What it does:

    - B{One persistent connection}, made on first use. Every L{RedisClient.execute} call writes all its
      commands at once (a pipeline) and gets one Deferred for all their replies; calls from many streams
      share the connection, and Redis answers in order, so replies are matched first in, first out.
    - B{A connect timeout}: a connection attempt that takes longer than C{connectTimeout} fails.
    - B{Reconnect with backoff}: when an attempt fails or the connection is lost, the next attempt is
      scheduled after C{initialDelay}, doubling up to C{maxDelay} while attempts keep failing (reset once
      one succeeds). In the meantime, calls fail at once with L{RedisConnectionError}: a caller with a
      20ms budget is better told now than after its budget is spent.

What it does not: RESP3, pub/sub, transactions, authentication (put C{AUTH} in front of your commands if
you need it), or command-level retries (a caller that wants one calls again).
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Deque, List, Optional, Sequence, Tuple, Union

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["RedisClient", "RedisProtocol", "RedisError", "RedisConnectionError", "encodeCommand"]

Reply = Union[bytes, int, None, "RedisError", list]
Command = Sequence[Union[bytes, str, int]]

_INCOMPLETE = object()  # what the parser returns when the buffer holds no whole reply yet


class RedisError(Exception):
    """
    An error reply from Redis (C{-ERR ...}, C{-WRONGTYPE ...}).
    """


class RedisConnectionError(Exception):
    """
    No connection to Redis: it could not be made (in time), was lost, or the client is closed.
    """


def encodeCommand(command: Command) -> bytes:
    """
    A command (its name, then its arguments) as a RESP array of bulk strings.
    """
    parts = [b"*%d\r\n" % len(command)]
    for arg in command:
        if isinstance(arg, int):
            arg = b"%d" % arg
        elif isinstance(arg, str):
            arg = arg.encode("utf-8")
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


def _parse(buf: bytes, pos: int) -> Tuple[object, int]:
    """
    Parse one RESP2 reply from C{buf} at C{pos}.

    @return: C{(reply, end)}, or C{(_INCOMPLETE, pos)} when the buffer does not hold it all yet.
    @raise ValueError: the bytes are not RESP2.
    """
    nl = buf.find(b"\r\n", pos)
    if nl < 0:
        return _INCOMPLETE, pos
    kind, line, after = buf[pos:pos + 1], buf[pos + 1:nl], nl + 2
    if kind == b"+":
        return line, after
    if kind == b"-":
        return RedisError(line.decode("utf-8", "replace")), after
    if kind == b":":
        return int(line), after
    if kind == b"$":
        size = int(line)
        if size < 0:
            return None, after
        if len(buf) < after + size + 2:
            return _INCOMPLETE, pos
        if buf[after + size:after + size + 2] != b"\r\n":
            raise ValueError("bulk string not followed by CRLF")
        return buf[after:after + size], after + size + 2
    if kind == b"*":
        count = int(line)
        if count < 0:
            return None, after
        items = []
        for _ in range(count):
            item, after = _parse(buf, after)
            if item is _INCOMPLETE:
                return _INCOMPLETE, pos
            items.append(item)
        return items, after
    raise ValueError(f"unknown RESP type byte {kind!r}")


class RedisProtocol(Protocol):
    """
    One connection: writes pipelines of commands, matches replies to them in order.

    @ivar onLost: called with this protocol and the reason when the connection is lost.
    """

    log = Logger()

    def __init__(self, onLost: Optional[Callable[["RedisProtocol", Failure], None]] = None) -> None:
        self.onLost = onLost
        self._buffer = b""
        # Each entry: the Deferred of one pipeline, how many replies it awaits, the replies so far.
        self._waiting: Deque[Tuple[Deferred, int, List[Reply]]] = deque()

    def connectionMade(self) -> None:
        """
        Turn Nagle off: pipelines are small and latency-bound (a 20ms budget cannot wait for an ACK).
        """
        setNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            setNoDelay(True)

    def execute(self, commands: Sequence[Command]) -> Deferred:
        """
        Send C{commands} in one write.

        @return: a Deferred firing with their replies (a list, in order), or failing with the first
            L{RedisError} among them, or with L{RedisConnectionError} if the connection is lost first.
        """
        d: Deferred = Deferred()
        self._waiting.append((d, len(commands), []))
        self.transport.write(b"".join(encodeCommand(c) for c in commands))
        return d

    def dataReceived(self, data: bytes) -> None:
        """
        Parse every whole reply received and hand it to the pipeline it answers.
        """
        buf = self._buffer + data
        pos = 0
        while pos < len(buf):
            try:
                reply, end = _parse(buf, pos)
            except ValueError as e:
                self.log.error("protocol error from Redis: {error}", error=e)
                self._buffer = b""
                self.transport.loseConnection()
                return
            if reply is _INCOMPLETE:
                break
            pos = end
            if not self._waiting:
                self.log.error("unexpected reply from Redis: {reply!r}", reply=reply)
                self.transport.loseConnection()
                return
            d, count, replies = self._waiting[0]
            replies.append(reply)  # type: ignore[arg-type]
            if len(replies) == count:
                self._waiting.popleft()
                errors = [r for r in replies if isinstance(r, RedisError)]
                if errors:
                    d.errback(errors[0])
                else:
                    d.callback(replies)
        self._buffer = buf[pos:]

    def connectionLost(self, reason: Failure) -> None:
        """
        Fail every pipeline still waiting, and tell the owner.
        """
        waiting, self._waiting = self._waiting, deque()
        for d, _, _ in waiting:
            d.errback(RedisConnectionError(f"connection to Redis lost: {reason.getErrorMessage()}"))
        if self.onLost is not None:
            self.onLost(self, reason)


class RedisClient:
    """
    One persistent, reconnecting connection to Redis, shared by all its callers (see the module docstring).

    @ivar endpoint: where Redis is (an L{IStreamClientEndpoint}).
    @ivar clock: the L{IReactorTime} for the connect timeout and the reconnect backoff.
    @ivar delay: how long the next reconnect waits.
    """

    log = Logger()

    def __init__(self, endpoint: IStreamClientEndpoint, clock: IReactorTime, connectTimeout: float = 1.0,
                 initialDelay: float = 0.1, maxDelay: float = 5.0) -> None:
        self.endpoint = endpoint
        self.clock = clock
        self.connectTimeout = connectTimeout
        self.initialDelay = initialDelay
        self.maxDelay = maxDelay
        self.delay = initialDelay
        self.protocol: Optional[RedisProtocol] = None
        self.closed = False
        self._connecting: Optional[Deferred] = None
        self._queued: List[Tuple[Sequence[Command], Deferred]] = []
        self._retry: Optional[IDelayedCall] = None
        self._lostWaiters: List[Deferred] = []

    def __repr__(self) -> str:
        state = "connected" if self.protocol else "connecting" if self._connecting else "disconnected"
        return f"<RedisClient {self.endpoint!r} {state}>"

    def execute(self, commands: Sequence[Command]) -> Deferred:
        """
        Send C{commands} as one pipeline (connecting first if there is no connection yet).

        @return: see L{RedisProtocol.execute}; fails at once with L{RedisConnectionError} while a reconnect
            waits out its backoff, or after L{close}.
        """
        if self.closed:
            return fail(RedisConnectionError("the Redis client is closed"))
        if self.protocol is not None:
            return self.protocol.execute(commands)
        if self._retry is not None:
            return fail(RedisConnectionError(f"not connected to Redis (next attempt in at most {self.delay:g}s)"))
        d: Deferred = Deferred()
        self._queued.append((commands, d))
        self._connect()
        return d

    def _connect(self) -> None:
        """
        Start a connection attempt, unless one is under way.
        """
        if self._connecting is not None or self.protocol is not None or self.closed:
            return
        d = connectProtocol(self.endpoint, RedisProtocol(self._lost))
        d.addTimeout(self.connectTimeout, self.clock)
        self._connecting = d
        d.addCallbacks(self._connected, self._failed)

    def _connected(self, protocol: RedisProtocol) -> None:
        """
        The connection is up: send what was queued while connecting.
        """
        self._connecting = None
        self.protocol = protocol
        self.delay = self.initialDelay
        queued, self._queued = self._queued, []
        for commands, d in queued:
            protocol.execute(commands).chainDeferred(d)

    def _failed(self, failure: Failure) -> None:
        """
        The attempt failed or timed out: fail what was queued and schedule the next attempt.
        """
        self._connecting = None
        self.log.warn("cannot connect to Redis at {endpoint}: {why} (next attempt in {delay:g}s)",
                      endpoint=self.endpoint, why=failure.getErrorMessage(), delay=self.delay)
        queued, self._queued = self._queued, []
        for _, d in queued:
            d.errback(RedisConnectionError(f"cannot connect to Redis: {failure.getErrorMessage()}"))
        self._scheduleRetry()

    def _lost(self, protocol: RedisProtocol, reason: Failure) -> None:
        """
        The connection went away: reconnect after the backoff delay (unless closed).
        """
        if self.protocol is protocol:
            self.protocol = None
            if not self.closed:
                self.log.warn("connection to Redis at {endpoint} lost: {why} (next attempt in {delay:g}s)",
                              endpoint=self.endpoint, why=reason.getErrorMessage(), delay=self.delay)
            self._scheduleRetry()
        waiters, self._lostWaiters = self._lostWaiters, []
        for d in waiters:
            d.callback(None)

    def _scheduleRetry(self) -> None:
        """
        Attempt again in C{delay} seconds, and double the delay (up to C{maxDelay}) for the one after.
        """
        if self.closed or self._retry is not None:
            return
        self._retry = self.clock.callLater(self.delay, self._retryNow)
        self.delay = min(self.delay * 2, self.maxDelay)

    def _retryNow(self) -> None:
        """
        The backoff delay is over: attempt to connect.
        """
        self._retry = None
        self._connect()

    def close(self) -> Deferred:
        """
        Stop for good: no more attempts, the connection closed, queued calls failed.

        @return: a Deferred firing once the connection (if any) is closed.
        """
        self.closed = True
        retry, self._retry = self._retry, None
        if retry is not None and retry.active():
            retry.cancel()
        if self._connecting is not None:
            self._connecting.cancel()
        protocol = self.protocol
        if protocol is None or protocol.transport is None:
            return succeed(None)
        d: Deferred = Deferred()
        self._lostWaiters.append(d)
        protocol.transport.loseConnection()
        return d
