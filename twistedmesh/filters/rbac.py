"""
The C{rbac} filters: Envoy's role-based access control, for HTTP listeners (L{RBACFactory}) and for
C{protocol = tcp} listeners (L{TCPRBACFactory}); both are named C{rbac} (plugins are looked up per
interface).

    [filter:authz]
    type = rbac
    action = ALLOW
    policy.frontend.principals = san:exact:spiffe://mesh.local/ns/default/sa/frontend
    policy.frontend.permissions = method:GET and path:prefix:/api/
    policy.ops.principals = ip:10.0.0.0/8 and not header:x-debug:present
    policy.ops.permissions = any

C{action} (one for the whole section, as in Envoy): C{ALLOW} lets a request through when some policy
matches and denies it otherwise; C{DENY} denies it when some policy matches. A policy matches when its
C{principals} expression and its C{permissions} expression both match. Policies are tried in file order;
the first match names the policy in the denial's details. C{shadow = true} evaluates and counts
(C{rbac.shadow_allowed}, C{rbac.shadow_denied}) but never denies; otherwise C{rbac.allowed} and
C{rbac.denied} count, under C{http.<listener>.} or C{listener.<listener>.}.

An HTTP denial is a local C{403} with body C{RBAC: access denied} and response code details
C{rbac_access_denied_matched_policy[NAME]} (C{[none]} when C{action = ALLOW} and nothing matched). A TCP
denial closes the connection (reason C{rbac_access_denied}).

Expressions (the grammar, whitespace-separated tokens)::

    expr := term ("or" term)*
    term := factor ("and" factor)*
    factor := "not" factor | "not:" atom | "(" expr ")" | atom

C{and} binds tighter than C{or}; parentheses are tokens of their own (C{( a or b ) and c}), so that a regex
may contain them. An atom cannot contain whitespace (write C{\s} in a regex). An atom is one token without spaces:

    principals: C{any}, C{authenticated} (a client certificate was presented), C{san:exact:V},
    C{san:prefix:V}, C{san:regex:R} (any URI or DNS SAN of the client certificate; a regex must match the
    whole SAN), C{ip:CIDR} (the direct peer's address), C{header:NAME:present}, C{header:NAME:exact:V},
    C{header:NAME:prefix:V}, C{header:NAME:regex:R} (HTTP only).

    permissions: C{any}, C{path:exact:/x}, C{path:prefix:/api/}, C{path:regex:R} (the path without its
    query; HTTP only), C{method:GET} (HTTP only), C{header:...} (as above; HTTP only), C{port:443} (the
    listener's local port), C{sni:HOST} (the TLS server name the client sent, exact, case-insensitive).

Everything is compiled at config load into closures; a request costs the calls of the expressions.

A TCP filter whose expressions need the TLS identity or SNI (C{authenticated}, C{san:}, C{sni:}) decides on
the connection's first bytes (after the handshake), as Envoy does; otherwise on accept.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Callable, List, Optional, Tuple

from twisted.plugin import IPlugin
from zope.interface import implementer

from ..config import Options
from ..http.stream import HTTPFilter, Stream
from ..interfaces import (
    IFilterContext,
    IHTTPFilterFactory,
    INetworkConnection,
    INetworkFilter,
    INetworkFilterFactory,
)
from ..listener.chain import NetworkFilter
from ..tls import peerIdentity

__all__ = ["RBACFactory", "TCPRBACFactory", "RBACFilter", "TCPRBACFilter", "Policies", "compileExpression",
           "RBACSyntaxError", "HTTPView", "TCPView"]

Matcher = Callable[[object], bool]

PRINCIPAL_KINDS = frozenset(("any", "authenticated", "san", "ip", "header"))
PERMISSION_KINDS = frozenset(("any", "path", "method", "header", "port", "sni"))
HTTP_ONLY = frozenset(("header", "path", "method"))
TLS_KINDS = frozenset(("authenticated", "san", "sni"))


class RBACSyntaxError(ValueError):
    """
    An expression that does not parse; the message says why.
    """


# -- what the expressions look at -----------------------------------------------------------------------------


def _transportOf(codec):
    transport = getattr(codec, "transport", None)
    if transport is None:
        transport = getattr(getattr(codec, "conn", None), "transport", None)
    return transport


def _sni(transport) -> Optional[str]:
    try:
        name = transport.getHandle().get_servername()
    except Exception:
        return None
    return name.decode("ascii", "replace").lower() if name else None


def _localPort(transport) -> Optional[int]:
    try:
        return transport.getHost().port
    except Exception:
        return None


class HTTPView:
    """
    What an expression sees of a stream. Connection facts are read only when an atom asks.
    """

    __slots__ = ("stream",)

    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    def identity(self):
        return self.stream.peerIdentity

    def sourceIP(self) -> Optional[str]:
        return getattr(self.stream.downstreamAddress, "host", None)

    def header(self, name: bytes) -> Optional[bytes]:
        return self.stream.getRequestHeader(name)

    def path(self) -> bytes:
        path = self.stream.path
        i = path.find(b"?")
        return path if i < 0 else path[:i]

    def method(self) -> bytes:
        return self.stream.method

    def port(self) -> Optional[int]:
        codec = self.stream.codec
        port = getattr(codec, "localPort", None)  # a codec (or a test's) may state it
        if port is not None:
            return port
        return _localPort(_transportOf(codec))

    def sni(self) -> Optional[str]:
        codec = self.stream.codec
        name = getattr(codec, "serverName", None)
        if name is not None:
            return name
        return _sni(_transportOf(codec))


class TCPView:
    """
    What an expression sees of a network connection (L{INetworkConnection}).
    """

    __slots__ = ("conn",)

    def __init__(self, conn: INetworkConnection) -> None:
        self.conn = conn

    def identity(self):
        return peerIdentity(self.conn.transport)

    def sourceIP(self) -> Optional[str]:
        return getattr(self.conn.transport.getPeer(), "host", None)

    def port(self) -> Optional[int]:
        return _localPort(self.conn.transport)

    def sni(self) -> Optional[str]:
        return _sni(self.conn.transport)


# -- compiling expressions ------------------------------------------------------------------------------------


def _regex(text: str) -> "re.Pattern":
    try:
        return re.compile(text)
    except re.error as e:
        raise RBACSyntaxError(f"bad regex {text!r}: {e}")


def _stringMatcher(spec: str, what: str) -> Callable[[str], bool]:
    """
    C{exact:V}, C{prefix:V} or C{regex:R} as a predicate on a string.
    """
    how, colon, value = spec.partition(":")
    if not colon:
        raise RBACSyntaxError(f"{what} needs exact:VALUE, prefix:VALUE or regex:PATTERN, not {spec!r}")
    if how == "exact":
        return lambda s: s == value
    if how == "prefix":
        return lambda s: s.startswith(value)
    if how == "regex":
        pattern = _regex(value)
        return lambda s: pattern.fullmatch(s) is not None
    raise RBACSyntaxError(f"{what}: {how!r} is not exact, prefix or regex")


def _atom(token: str, allowed: frozenset, side: str) -> Tuple[Matcher, str]:
    """
    Compile one atom; return its matcher and its kind.
    """
    kind, _, rest = token.partition(":")
    if kind not in PRINCIPAL_KINDS | PERMISSION_KINDS:
        raise RBACSyntaxError(f"unknown matcher {token!r}")
    if kind not in allowed:
        raise RBACSyntaxError(f"{kind!r} cannot be used in {side} here (allowed: {', '.join(sorted(allowed))})")
    if kind == "any":
        if rest:
            raise RBACSyntaxError(f"`any` takes no argument: {token!r}")
        return (lambda v: True), kind
    if kind == "authenticated":
        if rest:
            raise RBACSyntaxError(f"`authenticated` takes no argument: {token!r}")
        return (lambda v: v.identity() is not None), kind
    if not rest:
        raise RBACSyntaxError(f"{kind} needs a value: {token!r}")
    if kind == "san":
        match = _stringMatcher(rest, "san")

        def san(v) -> bool:
            identity = v.identity()
            if identity is None:
                return False
            return any(match(s) for s in identity.uriSANs) or any(match(s) for s in identity.dnsSANs)
        return san, kind
    if kind == "ip":
        try:
            network = ipaddress.ip_network(rest, strict=False)
        except ValueError as e:
            raise RBACSyntaxError(f"ip: {e}")

        def ip(v) -> bool:
            host = v.sourceIP()
            if not host:
                return False
            try:
                address = ipaddress.ip_address(host.split("%", 1)[0])
            except ValueError:
                return False
            if address.version == 6 and address.ipv4_mapped is not None and network.version == 4:
                address = address.ipv4_mapped
            return address in network
        return ip, kind
    if kind == "header":
        name, colon, spec = rest.partition(":")
        if not name or not colon:
            raise RBACSyntaxError(f"write header:NAME:present, header:NAME:exact:VALUE, ... not {token!r}")
        key = name.lower().encode("ascii")
        if spec == "present":
            return (lambda v: v.header(key) is not None), kind
        match = _stringMatcher(spec, "header")

        def header(v) -> bool:
            value = v.header(key)
            return value is not None and match(value.decode("latin-1"))
        return header, kind
    if kind == "path":
        match = _stringMatcher(rest, "path")
        return (lambda v: match(v.path().decode("latin-1"))), kind
    if kind == "method":
        method = rest.upper().encode("ascii")
        return (lambda v: v.method() == method), kind
    if kind == "port":
        try:
            port = int(rest)
            if not 0 < port < 65536:
                raise ValueError
        except ValueError:
            raise RBACSyntaxError(f"port must be a number from 1 to 65535, not {rest!r}")
        return (lambda v: v.port() == port), kind
    # sni
    host = rest.lower()
    return (lambda v: v.sni() == host), kind


def compileExpression(text: str, allowed: frozenset, side: str = "an expression") -> Tuple[Matcher, frozenset]:
    """
    Compile C{text} (see the module docstring's grammar) using only the matcher kinds in C{allowed}.

    @return: the matcher (called with an L{HTTPView} or L{TCPView}) and the set of kinds it uses.
    @raise RBACSyntaxError: the text does not parse.
    """
    # Parentheses count only as tokens of their own (a regex atom may contain them).
    tokens = text.split()
    if not tokens:
        raise RBACSyntaxError("is empty: write `any` to match everything")
    kinds: set = set()
    pos = [0]

    def peek() -> Optional[str]:
        return tokens[pos[0]] if pos[0] < len(tokens) else None

    def take() -> str:
        token = peek()
        if token is None:
            raise RBACSyntaxError("ends too early")
        pos[0] += 1
        return token

    def expr() -> Matcher:
        parts = [term()]
        while peek() == "or":
            take()
            parts.append(term())
        if len(parts) == 1:
            return parts[0]
        return lambda v: any(p(v) for p in parts)

    def term() -> Matcher:
        parts = [factor()]
        while peek() == "and":
            take()
            parts.append(factor())
        if len(parts) == 1:
            return parts[0]
        return lambda v: all(p(v) for p in parts)

    def factor() -> Matcher:
        token = take()
        if token == "not":
            inner = factor()
            return lambda v: not inner(v)
        if token.startswith("not:"):
            inner = atom(token[4:])
            return lambda v: not inner(v)
        if token == "(":
            inner = expr()
            if take() != ")":
                raise RBACSyntaxError("a `(` is not closed")
            return inner
        if token in ("and", "or", ")"):
            raise RBACSyntaxError(f"unexpected {token!r}")
        return atom(token)

    def atom(token: str) -> Matcher:
        matcher, kind = _atom(token, allowed, side)
        kinds.add(kind)
        return matcher

    matcher = expr()
    if peek() is not None:
        raise RBACSyntaxError(f"unexpected {peek()!r} (join atoms with `and` / `or`)")
    return matcher, frozenset(kinds)


# -- policies ---------------------------------------------------------------------------------------------------


class Policies:
    """
    A section's policies, compiled: C{action}, C{shadow}, and C{(name, principals, permissions)} in order.
    """

    __slots__ = ("allow", "shadow", "policies", "needsTLS")

    def __init__(self, allow: bool, shadow: bool, policies: List[Tuple[str, Matcher, Matcher]],
                 needsTLS: bool = False) -> None:
        self.allow = allow
        self.shadow = shadow
        self.policies = policies
        self.needsTLS = needsTLS

    def matched(self, view) -> Optional[str]:
        """
        The name of the first policy that matches C{view}, or C{None}.
        """
        for name, principals, permissions in self.policies:
            if principals(view) and permissions(view):
                return name
        return None

    def decide(self, view) -> Tuple[bool, Optional[str]]:
        """
        C{(allowed, matched policy name)} for C{view}.
        """
        name = self.matched(view)
        return (name is not None) == self.allow, name


def _policies(options: Options, http: bool) -> Policies:
    """
    Read C{action}, C{shadow} and the C{policy.N.*} keys; errors are recorded on C{options}.
    """
    action = options.string("action", "ALLOW", choices=("ALLOW", "DENY"))
    shadow = options.boolean("shadow", False)
    principalKinds = PRINCIPAL_KINDS if http else PRINCIPAL_KINDS - HTTP_ONLY
    permissionKinds = PERMISSION_KINDS if http else PERMISSION_KINDS - HTTP_ONLY
    names: List[str] = []
    for key in options.keys():
        if not key.startswith("policy."):
            continue
        name, dot, field = key[len("policy."):].rpartition(".")
        if not dot or not name:
            options.error(key, "write policy.NAME.principals and policy.NAME.permissions")
            continue
        if field not in ("principals", "permissions"):
            hint = " (the section has one `action` for every policy)" if field == "action" else ""
            options.error(key, f"a policy has `principals` and `permissions`, not {field!r}{hint}")
            options._known.add(key)
            continue
        if name not in names:
            names.append(name)
    compiled: List[Tuple[str, Matcher, Matcher]] = []
    kinds: set = set()
    for name in names:
        sides = []
        for field, allowed in (("principals", principalKinds), ("permissions", permissionKinds)):
            key = f"policy.{name}.{field}"
            text = options.string(key)
            if text is None:
                sides.append(None)
                continue
            try:
                matcher, used = compileExpression(text, allowed, field)
            except RBACSyntaxError as e:
                extra = " (a TCP listener has no HTTP request to match)" if not http and any(
                    k in text for k in ("header:", "path:", "method:")) else ""
                options.error(key, f"{e}{extra}")
                sides.append(None)
                continue
            kinds |= used
            sides.append(matcher)
        if None not in sides:
            compiled.append((name, sides[0], sides[1]))
    if not names:
        options.error(None, "needs at least one policy (policy.NAME.principals and policy.NAME.permissions)")
    return Policies(action != "DENY", bool(shadow), compiled, needsTLS=bool(kinds & TLS_KINDS))


class _Counters:
    __slots__ = ("allowed", "denied", "shadowAllowed", "shadowDenied")

    def __init__(self, scope) -> None:
        self.allowed = scope.counter("allowed")
        self.denied = scope.counter("denied")
        self.shadowAllowed = scope.counter("shadow_allowed")
        self.shadowDenied = scope.counter("shadow_denied")

    def count(self, shadow: bool, allowed: bool) -> None:
        if shadow:
            (self.shadowAllowed if allowed else self.shadowDenied).value += 1
        else:
            (self.allowed if allowed else self.denied).value += 1


# -- HTTP -------------------------------------------------------------------------------------------------------

DENIED_BODY = b"RBAC: access denied"


class RBACFilter(HTTPFilter):
    """
    Decides on the request head; answers C{403} when the policies deny (unless shadowing). Stateless: one
    instance serves every stream of the listener.
    """

    def __init__(self, policies: Policies, counters: _Counters) -> None:
        self.policies = policies
        self.counters = counters

    def requestHeaders(self, stream: Stream) -> object:
        """
        Evaluate the policies against the request and its connection.
        """
        policies = self.policies
        allowed, name = policies.decide(HTTPView(stream))
        self.counters.count(policies.shadow, allowed)
        if allowed or policies.shadow:
            if policies.shadow:
                stream.state["rbacShadowResult"] = "allowed" if allowed else "denied"
            return None
        return stream.respond(403, DENIED_BODY,
                              details=f"rbac_access_denied_matched_policy[{name or 'none'}]")


@implementer(IPlugin, IHTTPFilterFactory)
class RBACFactory:
    """
    The HTTP C{rbac} plugin (see the module docstring). Options: C{action} (C{ALLOW} or C{DENY}, default
    C{ALLOW}), C{shadow} (default false), C{policy.NAME.principals}, C{policy.NAME.permissions}.
    """

    name = "rbac"

    def configure(self, options: Options, context: IFilterContext) -> Callable[[Stream], RBACFilter]:
        """
        Compile the policies once.
        """
        policies = _policies(options, http=True)
        scope = context.stats.scope("http", context.listener.name).scope("rbac")
        shared = RBACFilter(policies, _Counters(scope))

        def make(stream: Stream) -> RBACFilter:
            return shared

        return make


# -- TCP --------------------------------------------------------------------------------------------------------


class TCPRBACFilter(NetworkFilter):
    """
    Decides when the connection is accepted; closes it when the policies deny (unless shadowing).
    """

    def __init__(self, policies: Policies, counters: _Counters) -> None:
        self.policies = policies
        self.counters = counters

    def decide(self, conn: INetworkConnection) -> object:
        """
        Evaluate, count, and close the connection (returning L{STOP}) on a denial.
        """
        policies = self.policies
        allowed, name = policies.decide(TCPView(conn))
        self.counters.count(policies.shadow, allowed)
        if allowed or policies.shadow:
            return None
        conn.state["rbacMatchedPolicy"] = name or "none"
        return conn.close("rbac_access_denied")

    def connectionMade(self, conn: INetworkConnection) -> object:
        return self.decide(conn)


class TCPRBACFirstDataFilter(TCPRBACFilter):
    """
    For policies that need the TLS handshake's results: decides on the connection's first bytes. One per
    connection.
    """

    def __init__(self, policies: Policies, counters: _Counters) -> None:
        super().__init__(policies, counters)
        self.decided = False

    def connectionMade(self, conn: INetworkConnection) -> object:
        return None

    def dataReceived(self, conn: INetworkConnection, data: bytes) -> object:
        if self.decided:
            return None
        self.decided = True
        return self.decide(conn)


@implementer(IPlugin, INetworkFilterFactory)
class TCPRBACFactory:
    """
    The network C{rbac} plugin: the HTTP one's options, without the HTTP-only matchers.
    """

    name = "rbac"

    def configure(self, options: Options,
                  context: IFilterContext) -> Callable[[INetworkConnection], INetworkFilter]:
        """
        Compile the policies once.
        """
        policies = _policies(options, http=False)
        counters = _Counters(context.stats.scope("listener", context.listener.name).scope("rbac"))
        if policies.needsTLS:
            return lambda conn: TCPRBACFirstDataFilter(policies, counters)
        shared = TCPRBACFilter(policies, counters)
        return lambda conn: shared
