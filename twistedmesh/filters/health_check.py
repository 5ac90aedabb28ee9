"""
The C{health_check} filter: Envoy's HTTP health check filter. It answers the health checks that load
balancers (or other proxies) make of this proxy, so that C{POST /healthcheck/fail} on the admin endpoint,
or draining, takes the proxy out of their rotation.

    [filter:hc]
    type = health_check
    path = /healthz
    pass_through = false

    [listener:edge]
    filters = hc, router

A request whose path (without its query) is C{path}:

  - while the proxy is failed (admin C{/healthcheck/fail}) or draining, is answered C{503} by the proxy,
    with C{x-envoy-immediate-health-check-fail: true} (a twistedmesh or Envoy checking this proxy marks it
    unhealthy at once on seeing it) and response code details C{health_check_failed};
  - otherwise, with C{pass_through = false} (the default), is answered C{200 OK} by the proxy itself;
    with C{pass_through = true} it goes on to the next filters (the router), so the upstream's answer
    decides.

Any other request passes through; while the proxy is failed or draining, every response that passes
through the filter also gets C{x-envoy-immediate-health-check-fail: true}, as in Envoy. Put the filter
before the router.

Where the proxy's state comes from: the filter reads C{context.healthState}, an object with boolean
C{failed} and C{draining} attributes (L{HealthState}; L{ServerHealthState} reads them off a
L{twistedmesh.service.MeshService}). A context without one (as in tests, or before the service passes
it) gives a state that never fails.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.plugin import IPlugin
from zope.interface import implementer

from ..config import Options
from ..http.stream import HTTPFilter, Stream
from ..interfaces import IFilterContext, IHTTPFilterFactory
from ..upstream.health import IMMEDIATE_FAIL_HEADER

__all__ = ["HealthCheckFactory", "HealthCheckFilter", "HealthState", "ServerHealthState"]

_FAILED_HEADERS = ((IMMEDIATE_FAIL_HEADER, b"true"),)
_OK_BODY = b"OK"
_FAILED_BODY = b"health check failed"


class HealthState:
    """
    Whether this proxy should fail the health checks made of it.

    @ivar failed: set by the admin C{POST /healthcheck/fail}, cleared by C{/healthcheck/ok}.
    @ivar draining: the proxy is shutting down.
    """

    def __init__(self, failed: bool = False, draining: bool = False) -> None:
        self.failed = failed
        self.draining = draining

    def __repr__(self) -> str:
        return f"<HealthState failed={self.failed} draining={self.draining}>"


class ServerHealthState:
    """
    A L{HealthState} read live off a server that has C{healthCheckFailed} (the admin's flag) and C{state}
    (C{"DRAINING"} while draining), as L{twistedmesh.service.MeshService} has, so that the admin endpoint
    needs no change.
    """

    def __init__(self, server: object) -> None:
        self.server = server

    @property
    def failed(self) -> bool:
        """
        The server's C{healthCheckFailed}.
        """
        return bool(getattr(self.server, "healthCheckFailed", False))

    @property
    def draining(self) -> bool:
        """
        Whether the server's C{state} is C{"DRAINING"}.
        """
        return getattr(self.server, "state", None) == "DRAINING"


class HealthCheckFilter(HTTPFilter):
    """
    Answers health check requests (see the module docstring). Stateless between streams, so one instance
    serves every stream of the listener.
    """

    def __init__(self, path: bytes, passThrough: bool, state: object) -> None:
        self.path = path
        self.passThrough = passThrough
        self.state = state

    def __repr__(self) -> str:
        return f"<HealthCheckFilter path={self.path!r} pass_through={self.passThrough}>"

    def requestHeaders(self, stream: Stream) -> object:
        """
        Answer a health check (200, or 503 while failed or draining) or, with C{pass_through}, let a
        passing one go on; let every other request go on.
        """
        path = stream.path
        if path is None:
            return None
        if path != self.path and path.partition(b"?")[0] != self.path:
            return None
        state = self.state
        if state.failed or state.draining:
            return stream.respond(503, _FAILED_BODY, _FAILED_HEADERS, details="health_check_failed")
        if self.passThrough:
            return None
        return stream.respond(200, _OK_BODY)

    def responseHeaders(self, stream: Stream) -> None:
        """
        While failed or draining, mark every other response (pass-through health checks, ordinary
        requests) with C{x-envoy-immediate-health-check-fail: true} too, as Envoy does, so that a proxy
        checking this one learns it from its ordinary traffic as well. (The filter's own 503 does not pass
        here: a local reply runs only through the filters before the one replying.)
        """
        state = self.state
        if state.failed or state.draining:
            headers = stream.responseHeaders
            # An upstream proxy may have set it already: one field is enough.
            if not any(name == IMMEDIATE_FAIL_HEADER for name, _ in headers):
                headers.append(_FAILED_HEADERS[0])


def _path(options: Options) -> bytes:
    """
    The C{path} option: an origin-form path of visible ASCII without a query.
    """
    raw = options.string("path", "/healthz")
    if not raw.startswith("/") or any(not 0x21 <= ord(c) <= 0x7E for c in raw) or "?" in raw:
        options.error("path", f"{raw!r} is not a path: it starts with /, has no spaces, controls or query")
        return b"/healthz"
    return raw.encode("ascii")


@implementer(IPlugin, IHTTPFilterFactory)
class HealthCheckFactory:
    """
    The C{health_check} plugin (see the module docstring and docs/health-checking.md).

    Options: C{path} (default C{/healthz}), C{pass_through} (default C{false}).
    """

    name = "health_check"

    def configure(self, options: Options, context: IFilterContext) -> Callable[[Stream], HealthCheckFilter]:
        """
        Check the options once and take the proxy's health state from the context.

        @return: a maker giving every stream the same stateless L{HealthCheckFilter}.
        """
        path = _path(options)
        passThrough = options.boolean("pass_through", False)
        state: Optional[object] = getattr(context, "healthState", None)
        if state is None:
            # The context predates health states (or is a test's): a proxy that is never failed.
            state = HealthState()
        shared = HealthCheckFilter(path, passThrough, state)

        def make(stream: Stream) -> HealthCheckFilter:
            """
            The filter for C{stream}: the shared one.
            """
            return shared

        return make
