"""
The C{ext_authz} filter: Envoy's external authorization, HTTP-service flavour. Every request is first put to
an authorization service, which answers with a status: 2xx lets the request go on, anything else is the
answer the client gets.

    [filter:authz]
    type = ext_authz
    uri = http://127.0.0.1:9000/authz
    allowed_upstream_headers = x-user-id

Per request, the filter sends C{<method> <uri><path>} (the client's method; the client's request target
appended to C{uri}, as Envoy's C{path_prefix} does) with the client's C{allowed_headers} and no body, and
holds the request (its C{requestHeaders} hook returns a Deferred) until the service answers or C{timeout}
(200ms, Envoy's default) passes:

    - 2xx: the request goes on, with the answer's C{allowed_upstream_headers} set on it (replacing any the
      client sent);
    - any other status: the client gets that status and the answer's body, with the answer's
      C{allowed_client_headers} (flag C{UAEX}, details C{ext_authz_denied});
    - no answer (service down, too slow, broken): the client gets C{status_on_error} (403) with flag C{UAEX}
      and details C{ext_authz_error}, or, with C{failure_mode_allow = true}, the request goes on.

All streams of a listener share one filter, which sends through one persistent
L{twisted.web.client.HTTPConnectionPool} made at configure time (via treq): keep-alive connections to the
service are reused across requests.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit

import treq
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers as WebHeaders
from zope.interface import implementer

from ..config import Options
from ..http.h1 import HOP_BY_HOP
from ..http.stream import Headers, HTTPFilter, Stream
from ..interfaces import IFilterContext, IHTTPFilterFactory
from .ratelimit import _LABEL

__all__ = ["ExtAuthzFactory", "ExtAuthzFilter", "TreqRequester", "Answer"]

# (status, headers with lowercase names, body)
Answer = Tuple[int, Headers, bytes]
Requester = Callable[[bytes, bytes, Headers], Deferred]

_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")
# Framing and connection fields belong to the connections, not to the authorization exchange.
_NEVER_COPIED = frozenset(HOP_BY_HOP) | {b"content-length", b"host"}
_DEFAULT_ALLOWED = ("authorization", "cookie", "x-request-id")
# Envoy always passes these from a denial to the client, whatever allowed_client_headers says.
_ALWAYS_TO_CLIENT = (b"www-authenticate", b"location")
_CONNECT_TIMEOUT = 1.0


class TreqRequester:
    """
    Sends the authorization requests through treq, on one persistent connection pool.

    @ivar pool: the L{HTTPConnectionPool}; L{close} empties it.
    """

    def __init__(self, reactor, connectTimeout: float = _CONNECT_TIMEOUT) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.client = HTTPClient(Agent(reactor, pool=self.pool, connectTimeout=connectTimeout))

    def __call__(self, method: bytes, url: bytes, headers: Headers) -> Deferred:
        """
        Send C{method url} with C{headers} and no body.

        @return: a Deferred firing with the L{Answer} (the body read in full); cancelling it aborts the request.
        """
        sent = WebHeaders()
        for name, value in headers:
            sent.addRawHeader(name, value)
        d = self.client.request(method.decode("latin-1"), url, headers=sent, allow_redirects=False)

        def read(response) -> Deferred:
            got = [(name.lower(), value) for name, values in response.headers.getAllRawHeaders()
                   for value in values]
            return treq.content(response).addCallback(lambda body: (response.code, got, body))

        return d.addCallback(read)

    def close(self) -> Deferred:
        """
        Close the pool's idle connections (and stop their timers).
        """
        return self.pool.closeCachedConnections()


class _Check:
    """
    One request's question to the service: the Deferred the stream waits on, the timer that ends the wait
    and the request in flight (cancelled when the wait ends without it).
    """

    __slots__ = ("waiting", "timer", "answer", "done")

    def __init__(self) -> None:
        self.waiting: Deferred = Deferred(self._cancel)
        self.timer: Optional[IDelayedCall] = None
        self.answer: Optional[Deferred] = None
        self.done = False

    def _stop(self) -> None:
        self.done = True
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()
        answer, self.answer = self.answer, None
        if answer is not None and not answer.called:
            answer.cancel()

    def _cancel(self, _: Deferred) -> None:
        """
        The stream ended while waiting: stop the timer and abort the request to the service.
        """
        self._stop()

    def finish(self, outcome: object) -> None:
        """
        Fire the Deferred with C{outcome}, once: the service's answer, its failure or the timeout.
        """
        if self.done:
            return
        self._stop()
        self.waiting.callback(outcome)


class _Failed:
    """
    The outcome of a check the service failed.
    """

    __slots__ = ("failure",)

    def __init__(self, failure: Failure) -> None:
        self.failure = failure


class _Timeout:
    """
    The outcome of a check the service did not answer in time.
    """

    def __repr__(self) -> str:
        return "TIMEOUT"


_TIMED_OUT = _Timeout()


class ExtAuthzFilter(HTTPFilter):
    """
    Asks the authorization service about each request; one instance serves every stream of a listener.

    @ivar requester: what sends the authorization request (a L{TreqRequester}, or a fake in tests).
    """

    log = Logger()

    def __init__(self, clock, requester: Requester, uri: bytes, timeout: float, failureModeAllow: bool,
                 statusOnError: int, allowedHeaders: Sequence[bytes], upstreamHeaders: Sequence[bytes],
                 clientHeaders: Optional[Sequence[bytes]], stats) -> None:
        self.clock = clock
        self.requester = requester
        self.uri = uri
        self.timeout = timeout
        self.failureModeAllow = failureModeAllow
        self.statusOnError = statusOnError
        self.allowedHeaders = frozenset(allowedHeaders)
        self.upstreamHeaders = frozenset(upstreamHeaders)
        self.clientHeaders = None if clientHeaders is None else frozenset(clientHeaders) | set(_ALWAYS_TO_CLIENT)
        self.ok, self.denied, self.error, self.failureModeAllowed = stats

    def __repr__(self) -> str:
        return f"<ExtAuthzFilter {self.uri!r}>"

    def close(self) -> Optional[Deferred]:
        """
        Close the requester's idle connections, if it has any.
        """
        close = getattr(self.requester, "close", None)
        return close() if close is not None else None

    def requestHeaders(self, stream: Stream) -> object:
        """
        Ask the service about the request; hold it until the service answers or C{timeout} passes.
        """
        allowed = self.allowedHeaders
        headers = [(k, v) for k, v in stream.requestHeaders if k in allowed]
        path = stream.path if stream.path.startswith(b"/") else b"/" + stream.path
        try:
            answer = self.requester(stream.method, self.uri + path, headers)
        except Exception:
            failure = Failure()
            self.log.failure("could not send the authorization request", failure)
            return self._decide(_Failed(failure), stream)
        # Settled at once (refused synchronously, a fake)? Then decide now, before the stream pauses on
        # anything. (C{answer.called} is no test: a Deferred can be called yet wait on a chained one.)
        box: List[object] = []
        held: List[_Check] = []

        def settle(outcome: object) -> None:
            if held:
                held[0].finish(outcome)
            else:
                box.append(outcome)

        answer.addCallbacks(settle, lambda failure: settle(_Failed(failure)))
        if box:
            return self._decide(box[0], stream)
        check = _Check()
        held.append(check)
        check.answer = answer
        check.timer = self.clock.callLater(self.timeout, check.finish, _TIMED_OUT)
        # Added before the stream adds its own callbacks, so the decision (which may reply) runs first.
        check.waiting.addCallback(self._decide, stream)
        return check.waiting

    def _decide(self, outcome: object, stream: Stream) -> object:
        """
        The service answered (an L{Answer}), failed (a L{_Failed}) or timed out: let the request go on
        (C{None}) or answer it.
        """
        if isinstance(outcome, tuple):
            status, headers, body = outcome
            if 200 <= status < 300:
                self.ok.value += 1
                wanted = self.upstreamHeaders
                copied = [(k, v) for k, v in headers if k in wanted and k not in _NEVER_COPIED]
                if copied:
                    names = {k for k, _ in copied}
                    stream.requestHeaders[:] = [(k, v) for k, v in stream.requestHeaders if k not in names]
                    stream.requestHeaders.extend(copied)
                return None
            self.denied.value += 1
            wanted = self.clientHeaders
            toClient = [(k, v) for k, v in headers
                        if k not in _NEVER_COPIED and (wanted is None or k in wanted)]
            return stream.respond(status, body, toClient, flag="UAEX", details="ext_authz_denied")
        self.error.value += 1
        if isinstance(outcome, _Failed):
            self.log.debug("authorization request failed: {why}", why=outcome.failure.getErrorMessage())
        if self.failureModeAllow:
            self.failureModeAllowed.value += 1
            return None
        return stream.respond(self.statusOnError, b"", flag="UAEX", details="ext_authz_error")


def _headerNames(options: Options, key: str, default: Sequence[str]) -> Tuple[bytes, ...]:
    """
    A list of header names (lowercased), refusing framing and connection fields and anything not a token.
    """
    names = []
    for name in options.list(key, tuple(default)) or ():
        lowered = name.strip().lower()
        bad = sorted({c for c in lowered if c not in _TCHAR})
        if not lowered or bad:
            options.error(key, f"{name!r} is not a valid header name")
            continue
        if lowered.encode("ascii") in _NEVER_COPIED:
            options.error(key, f"`{lowered}` is managed by the proxy (framing and connection handling) and "
                               "cannot be passed to or from the authorization service")
            continue
        names.append(lowered.encode("ascii"))
    return tuple(names)


@implementer(IPlugin, IHTTPFilterFactory)
class ExtAuthzFactory:
    """
    The C{ext_authz} plugin (see the module docstring and docs/ext-authz.md).

    Options: C{uri} (required), C{timeout} (200ms), C{failure_mode_allow} (false), C{status_on_error} (403),
    C{allowed_headers} (C{authorization, cookie, x-request-id}), C{allowed_upstream_headers} (none),
    C{allowed_client_headers} (all but framing ones), C{stat_prefix} (C{ext_authz}).
    """

    name = "ext_authz"

    def __init__(self, requesterFactory: Optional[Callable[[object], Requester]] = None) -> None:
        """
        @param requesterFactory: makes the requester from the reactor (default L{TreqRequester}); tests
            pass a fake.
        """
        self.requesterFactory = requesterFactory

    def configure(self, options: Options, context: IFilterContext) -> Callable[[Stream], ExtAuthzFilter]:
        """
        Check the options and make the listener's requester (one connection pool per filter section).

        @return: a maker giving every stream the listener's one L{ExtAuthzFilter}.
        """
        reactor = context.reactor
        uri = options.string("uri")
        if uri is not None:
            parts = urlsplit(uri.strip())
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
                options.error("uri", f"{uri!r} is not an http:// or https:// URL without query (like "
                                     "http://127.0.0.1:9000/authz)")
                uri = None
            else:
                try:
                    parts.port
                except ValueError as e:
                    options.error("uri", f"{uri!r} has a bad port: {e}")
                    uri = None
        timeout = options.positiveDuration("timeout", 0.2)
        allow = options.boolean("failure_mode_allow", False)
        statusOnError = options.integer("status_on_error", 403, minimum=100)
        if statusOnError is not None and statusOnError > 599:
            options.error("status_on_error", f"{statusOnError} is not an HTTP status (100 to 599)")
            statusOnError = 403
        allowedHeaders = _headerNames(options, "allowed_headers", _DEFAULT_ALLOWED)
        upstreamHeaders = _headerNames(options, "allowed_upstream_headers", ())
        clientHeaders: Optional[Tuple[bytes, ...]] = None
        if "allowed_client_headers" in options:
            clientHeaders = _headerNames(options, "allowed_client_headers", ())
        prefix = options.string("stat_prefix", "ext_authz")
        if prefix is not None and not _LABEL.match(prefix):
            options.error("stat_prefix", f"{prefix!r} may hold only letters, digits, _ and -: it becomes part "
                                         "of stat names")
            prefix = "ext_authz"
        scope = context.stats.scope("http", context.listener.name).scope(prefix or "ext_authz")
        stats = tuple(scope.counter(name) for name in ("ok", "denied", "error", "failure_mode_allowed"))
        make = self.requesterFactory if self.requesterFactory is not None else TreqRequester
        requester = make(reactor)
        base = (uri or "").strip().rstrip("/").encode("utf-8")
        shared = ExtAuthzFilter(reactor, requester, base, timeout or 0.2, bool(allow), statusOnError or 403,
                                allowedHeaders, upstreamHeaders, clientHeaders, stats)

        def maker(stream: Stream) -> ExtAuthzFilter:
            """
            The filter for C{stream}: the listener's shared one, which holds the connection pool.
            """
            return shared

        # The service calls this when it stops (see IHTTPFilterFactory.configure).
        maker.close = shared.close  # type: ignore[attr-defined]
        return maker
