"""
The C{api_key} HTTP filter: a request must carry one of the configured API keys in a header.

    [filter:keys]
    type = api_key
    header = x-api-key          ; default
    keys =
        k-3f9a1c
        k-77d0e2
    realm = acme                ; default

A request without the header, with it more than once, or with an unknown key gets a local reply: 401 with a
C{www-authenticate} challenge (response flag C{UAEX}, details C{api_key_denied}), and never reaches the
upstream. An accepted request goes on without the key header (the upstream never sees a secret) and with
C{x-acme-client} set to the key's position in C{keys} (0 for the first), so the upstream knows which client
called. A C{x-acme-client} header sent by the client is removed first: it cannot be forged.

The counters C{http.<listener>.api_key.allowed} and C{http.<listener>.api_key.denied} count the outcomes.
"""

from __future__ import annotations

import hmac
from typing import Callable, List, Sequence

from twisted.plugin import IPlugin
from zope.interface import implementer

from twistedmesh.http.stream import HTTPFilter, Stream
from twistedmesh.interfaces import IFilterContext, IHTTPFilterFactory

__all__ = ["ApiKeyFactory", "ApiKeyFilter", "CLIENT_HEADER"]

CLIENT_HEADER = b"x-acme-client"

_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")


class ApiKeyFilter(HTTPFilter):
    """
    Checks one request's API key (see the module docstring).

    It keeps nothing about any one stream, so one instance serves every stream of a listener: everything
    it needs was worked out by L{ApiKeyFactory.configure}.
    """

    def __init__(self, header: bytes, keys: Sequence[bytes], challenge: bytes, allowed, denied) -> None:
        """
        @param header: the lowercase name of the header that carries the key.
        @param keys: the valid keys; a key's position is the client's number.
        @param challenge: the C{www-authenticate} value of a 401.
        @param allowed: the counter of accepted requests.
        @param denied: the counter of refused requests.
        """
        self.header = header
        self.keys = tuple(keys)
        # The x-acme-client values, made once rather than per request.
        self.clients = tuple(str(i).encode("ascii") for i in range(len(self.keys)))
        self.challenge = challenge
        self.allowed = allowed
        self.denied = denied

    def requestHeaders(self, stream: Stream) -> object:
        """
        Refuse the request with a 401 local reply, or replace the key header with C{x-acme-client}.
        """
        header = self.header
        presented = None
        count = 0
        for name, value in stream.requestHeaders:
            if name == header:
                presented = value
                count += 1
        index = -1
        if count == 1:
            # compare_digest takes as long whichever byte differs; trying every key keeps the time
            # independent of which key matched.
            for i, key in enumerate(self.keys):
                if hmac.compare_digest(presented, key):
                    index = i
        if index < 0:
            self.denied.value += 1
            return stream.respond(401, b"a valid API key is required\n",
                                  [(b"www-authenticate", self.challenge)],
                                  flag="UAEX", details="api_key_denied")
        self.allowed.value += 1
        headers = stream.requestHeaders
        i = len(headers) - 1
        while i >= 0:
            name = headers[i][0]
            if name == header or name == CLIENT_HEADER:
                del headers[i]
            i -= 1
        headers.append((CLIENT_HEADER, self.clients[index]))
        return None


@implementer(IPlugin, IHTTPFilterFactory)
class ApiKeyFactory:
    """
    The C{api_key} plugin. Options: C{header} (default C{x-api-key}), C{keys} (required: comma- or
    line-separated), C{realm} (default C{acme}).
    """

    name = "api_key"

    def configure(self, options, context: IFilterContext) -> Callable[[Stream], ApiKeyFilter]:
        """
        Check the options once, at config load; problems are recorded on C{options}, naming the key.

        @param options: the C{[filter:NAME]} section (a L{twistedmesh.config.Options}).
        @param context: uses C{context.stats} and C{context.listener.name} for the counters.
        @return: a maker giving every stream the same L{ApiKeyFilter}.
        """
        header = options.string("header", "x-api-key").lower()
        if header == "host" or header.startswith(":") or header == CLIENT_HEADER.decode():
            options.error("header", f"`{header}` cannot carry the API key")
        elif not header or any(c not in _TOKEN for c in header):
            options.error("header", f"{header!r} is not a valid header name")

        keys: List[bytes] = []
        for key in options.list("keys"):
            if any(c.isspace() or not c.isprintable() or not c.isascii() for c in key):
                options.error("keys", "a key is printable ASCII without spaces")
            elif key.encode("ascii") in keys:
                options.error("keys", "lists a key twice")
            else:
                keys.append(key.encode("ascii"))
        if not keys and not any(e.key == "keys" and e.section == options.section for e in options.errors):
            options.error("keys", "is required: list at least one API key")

        realm = options.string("realm", "acme")
        if any(c in '"\\' or not c.isprintable() for c in realm):
            options.error("realm", "may not contain quotes, backslashes or control characters")

        challenge = f'ApiKey realm="{realm}", header="{header}"'.encode("utf-8")
        scope = context.stats.scope("http", context.listener.name).scope("api_key")
        shared = ApiKeyFilter(header.encode("ascii", "replace"), keys, challenge,
                              scope.counter("allowed"), scope.counter("denied"))

        def make(stream: Stream) -> ApiKeyFilter:
            """
            The filter for C{stream}: the shared one.
            """
            return shared

        return make

