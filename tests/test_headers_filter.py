"""
Tests for L{twistedmesh.filters.headers}: the C{headers} filter's edits (driven through
L{twistedmesh.testing.FilterHarness}), its config checking, its registration as a plugin, and one request
through a real proxy to the built-in HTTP echo.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import treq
from twisted.internet import defer
from twisted.trial import unittest

from twistedmesh.config import ConfigError, Options
from twistedmesh.filters.headers import HeadersFactory, HeadersFilter
from twistedmesh.http.stream import HTTPFilter
from twistedmesh.testing import FilterHarness

from .support import FilterPluginTests, edgeConfig, port, startEcho, startService, stopProxy


def configure(items: Dict[str, str]) -> Tuple[object, List[ConfigError]]:
    """
    Configure the C{headers} plugin with C{items} as a C{[filter:h]} section, as the service does
    (including the unknown-key check); return its maker and the errors recorded.
    """
    errors: List[ConfigError] = []
    options = Options("t.ini", "filter:h", items, errors)
    # The headers filter uses nothing from the context.
    maker = HeadersFactory().configure(options, None)
    options.finish()
    return maker, errors


def messages(errors: List[ConfigError]) -> List[str]:
    """
    The errors as the user reads them.
    """
    return [str(e) for e in errors]


class RequestEditTests(unittest.TestCase):
    """
    C{request.add}, C{request.set} and C{request.remove} edit what the upstream receives.
    """

    def harness(self, items: Dict[str, str]) -> FilterHarness:
        """
        A harness running a C{headers} filter configured with C{items}, which must be valid.
        """
        maker, errors = configure(items)
        self.assertEqual(errors, [])
        return FilterHarness(maker(None))

    def test_add(self):
        """
        Added fields are appended after the existing ones, which are kept, in configured order.
        """
        h = self.harness({"request.add": "x-a: 1\nX-B: two words\nx-a: 3"})
        h.request(headers=[(b"x-a", b"0"), (b"accept", b"*/*")])
        self.assertEqual(h.upstream.headers, [
            (b"x-a", b"0"), (b"accept", b"*/*"), (b"x-a", b"1"), (b"x-b", b"two words"), (b"x-a", b"3"),
        ])

    def test_setReplacesEveryField(self):
        """
        A set field replaces every existing field of its name (whatever their case in the config).
        """
        h = self.harness({"request.set": "X-Tenant: blue"})
        h.request(headers=[(b"x-tenant", b"red"), (b"accept", b"*/*"), (b"x-tenant", b"green")])
        self.assertEqual(h.upstream.headers, [(b"accept", b"*/*"), (b"x-tenant", b"blue")])

    def test_setAddsWhenAbsent(self):
        """
        A set field whose name is absent is added.
        """
        h = self.harness({"request.set": "x-tenant: blue"})
        h.request(headers=[(b"accept", b"*/*")])
        self.assertEqual(h.upstream.headers, [(b"accept", b"*/*"), (b"x-tenant", b"blue")])

    def test_setSameNameTwice(self):
        """
        Two set lines with one name leave exactly those two fields.
        """
        h = self.harness({"request.set": "x-v: 1\nx-v: 2"})
        h.request(headers=[(b"x-v", b"0")])
        self.assertEqual(h.upstream.headers, [(b"x-v", b"1"), (b"x-v", b"2")])

    def test_remove(self):
        """
        Removed names lose every field, and names are matched case-insensitively.
        """
        h = self.harness({"request.remove": "X-Debug, cookie2\nx-other"})
        h.request(headers=[(b"x-debug", b"1"), (b"accept", b"*/*"), (b"x-debug", b"2"), (b"cookie2", b"c"),
                           (b"x-other", b"o")])
        self.assertEqual(h.upstream.headers, [(b"accept", b"*/*")])

    def test_order(self):
        """
        Removal runs first, then set, then add.
        """
        h = self.harness({"request.add": "x-a: added", "request.set": "x-s: set", "request.remove": "x-a"})
        h.request(headers=[(b"x-a", b"old"), (b"x-s", b"old")])
        self.assertEqual(h.upstream.headers, [(b"x-s", b"set"), (b"x-a", b"added")])

    def test_valueKeepsColonsAndTrims(self):
        """
        A value is everything after the first colon, with surrounding blanks trimmed; an empty value is
        allowed.
        """
        h = self.harness({"request.add": "x-url:   http://a:8080/p  \nx-empty:"})
        h.request()
        self.assertEqual(h.upstream.headers, [(b"x-url", b"http://a:8080/p"), (b"x-empty", b"")])

    def test_nonASCIIValueIsUTF8(self):
        """
        A value written with non-ASCII characters is sent as UTF-8.
        """
        h = self.harness({"request.add": "x-name: Zoë"})
        h.request()
        self.assertEqual(h.upstream.headers, [(b"x-name", "Zoë".encode("utf-8"))])

    def test_authorityUntouched(self):
        """
        The request's authority, path and method pass through unchanged.
        """
        h = self.harness({"request.add": "x-a: 1", "request.remove": "x-b"})
        h.request(b"POST", b"/p?q=1", authority=b"api.example.com", body=[b"data"])
        self.assertEqual((h.upstream.method, h.upstream.path, h.upstream.authority, h.upstream.body),
                         (b"POST", b"/p?q=1", b"api.example.com", b"data"))

    def test_noOptions(self):
        """
        Without options the filter changes nothing either way.
        """
        h = self.harness({})
        h.request(headers=[(b"x-a", b"1")])
        h.respond(200, [(b"content-length", b"2")], b"ok")
        self.assertEqual(h.upstream.headers, [(b"x-a", b"1")])
        self.assertEqual(h.downstream.headers, [(b"content-length", b"2")])
        self.assertTrue(h.completed)


class ResponseEditTests(unittest.TestCase):
    """
    C{response.add}, C{response.set} and C{response.remove} edit what the client receives.
    """

    def test_edits(self):
        """
        Response fields are removed, set and added like request ones; the body is untouched.
        """
        maker, errors = configure({
            "response.add": "x-mesh: yes",
            "response.set": "server: twistedmesh",
            "response.remove": "x-powered-by",
        })
        self.assertEqual(errors, [])
        h = FilterHarness(maker(None))
        h.request()
        h.respond(200, [(b"server", b"gunicorn"), (b"x-powered-by", b"py"), (b"content-length", b"2")], b"ok")
        self.assertEqual(h.downstream.headers, [
            (b"content-length", b"2"), (b"server", b"twistedmesh"), (b"x-mesh", b"yes"),
        ])
        self.assertEqual((h.downstream.status, h.downstream.body), (200, b"ok"))
        self.assertTrue(h.completed)

    def test_requestOptionsLeaveResponseAlone(self):
        """
        Request options do not touch the response, and response options do not touch the request.
        """
        maker, errors = configure({"request.remove": "x-a", "response.add": "x-r: 1"})
        h = FilterHarness(maker(None))
        h.request(headers=[(b"x-r", b"client")])
        h.respond(204, [(b"x-a", b"upstream")])
        self.assertEqual(h.upstream.headers, [(b"x-r", b"client")])
        self.assertEqual(h.downstream.headers, [(b"x-a", b"upstream"), (b"x-r", b"1")])

    def test_localReplyOfLaterFilter(self):
        """
        A local reply from a filter after this one gets the response edits too.
        """

        class Deny(HTTPFilter):
            """
            Refuses every request.
            """

            def requestHeaders(self, stream):
                return stream.respond(403, b"no\n", flag="UAEX", details="denied")

        maker, errors = configure({"response.add": "x-mesh: yes"})
        h = FilterHarness(maker(None), Deny())
        h.request()
        self.assertEqual(h.downstream.status, 403)
        self.assertIn((b"x-mesh", b"yes"), h.downstream.headers)
        self.assertIsNone(h.upstream.method)
        self.assertTrue(h.completed)


class SharedInstanceTests(unittest.TestCase):
    """
    One stateless filter serves every stream.
    """

    def test_makerReturnsOneInstance(self):
        """
        The maker hands every stream the same L{HeadersFilter}.
        """
        maker, errors = configure({"request.add": "x-a: 1"})
        first, second = maker(object()), maker(object())
        self.assertIsInstance(first, HeadersFilter)
        self.assertIs(first, second)

    def test_noLeakBetweenStreams(self):
        """
        Streams sharing the filter are edited independently: each gets exactly the configured edits.
        """
        maker, errors = configure({"request.add": "x-a: 1", "response.set": "x-r: 2"})
        filt = maker(None)
        for _ in range(3):
            h = FilterHarness(filt)
            h.request(headers=[(b"x-c", b"c")])
            h.respond(200, [(b"x-r", b"0")], b"")
            self.assertEqual(h.upstream.headers, [(b"x-c", b"c"), (b"x-a", b"1")])
            self.assertEqual(h.downstream.headers, [(b"x-r", b"2")])


class ConfigErrorTests(unittest.TestCase):
    """
    Bad options are config errors naming the file, section and key.
    """

    def test_lineWithoutColon(self):
        """
        A line that is not C{name: value} is an error.
        """
        _, errors = configure({"request.add": "x-a: 1\nx-b 2"})
        self.assertEqual(messages(errors),
                         ["t.ini: [filter:h] request.add: 'x-b 2' is not a header: write one `name: value` per line"])

    def test_controlCharactersInValue(self):
        """
        CR, LF (through a raw value) or NUL in a value is an error naming the key.
        """
        for char in ("\r", "\x00"):
            _, errors = configure({"response.set": f"x-a: one{char}two"})
            self.assertEqual(messages(errors),
                             ["t.ini: [filter:h] response.set: the value of `x-a` may not contain CR, LF or NUL"])

    def test_hostAndPseudoHeaders(self):
        """
        C{host} and pseudo-headers cannot be added, set or removed: the route rewrites those.
        """
        _, errors = configure({"request.set": "Host: other", "request.add": ":path: /x",
                               "request.remove": ":authority"})
        self.assertEqual([(e.key, e.why) for e in errors], [
            ("request.add", "`:path` cannot be added, set or removed by the headers filter: use the route's "
                            "host_rewrite (or prefix_rewrite for the path)"),
            ("request.set", "`host` cannot be added, set or removed by the headers filter: use the route's "
                            "host_rewrite (or prefix_rewrite for the path)"),
            ("request.remove", "`:authority` cannot be added, set or removed by the headers filter: use the "
                               "route's host_rewrite (or prefix_rewrite for the path)"),
        ])

    def test_framingAndHopByHop(self):
        """
        C{content-length} and hop-by-hop fields belong to the codecs.
        """
        _, errors = configure({"response.add": "connection: close\ncontent-length: 3",
                               "request.remove": "transfer-encoding"})
        self.assertEqual([e.key for e in errors], ["request.remove", "response.add", "response.add"])
        self.assertIn("`connection` is managed by the proxy", errors[1].why)
        self.assertIn("`content-length` is managed by the proxy", errors[2].why)

    def test_badName(self):
        """
        A name that is not an HTTP token, or is missing, is an error.
        """
        _, errors = configure({"request.add": "x a: 1\n: 2", "response.remove": "x(y)"})
        self.assertEqual([(e.key, e.why) for e in errors], [
            ("request.add", "'x a' is not a valid header name (it may not contain ' ')"),
            ("request.add", "a header needs a name: write `name: value`"),
            ("response.remove", "'x(y)' is not a valid header name (it may not contain '(', ')')"),
        ])

    def test_setAndRemoveSameName(self):
        """
        Naming a field in both C{set} and C{remove} of one direction is an error.
        """
        _, errors = configure({"response.set": "x-a: 1", "response.remove": "X-A, x-b"})
        self.assertEqual(messages(errors), [
            "t.ini: [filter:h] response.remove: x-a: also in response.set, which already replaces every "
            "existing field of the name",
        ])

    def test_unknownKey(self):
        """
        A misspelled option is an unknown key with a suggestion.
        """
        _, errors = configure({"request.ad": "x-a: 1"})
        self.assertEqual(messages(errors),
                         ["t.ini: [filter:h] request.ad: unknown key (did you mean `request.add`?)"])

    def test_allErrorsReported(self):
        """
        Every bad line is reported, and the good ones still parse.
        """
        maker, errors = configure({"request.add": "bad\nx-ok: 1\nalso bad"})
        self.assertEqual(len(errors), 2)
        h = FilterHarness(maker(None))
        h.request()
        self.assertEqual(h.upstream.headers, [(b"x-ok", b"1")])


class PluginTests(FilterPluginTests, unittest.TestCase):
    """
    The filter is registered like any plugin, and its shipped example stays valid.
    """

    plugin, example = "headers", "headers.ini"


class IntegrationTests(unittest.TestCase):
    """
    The filter in a real proxy, in front of the built-in HTTP echo.
    """

    @defer.inlineCallbacks
    def test_throughProxy(self):
        """
        The upstream sees the request edits and the client sees the response edits.
        """
        echoPort = yield startEcho(self)
        proxy = startService(self, edgeConfig(echoPort, "hdr, router", """
[filter:hdr]
type = headers
request.add =
    x-added: one
    x-keep: two
request.set = x-replace: new
request.remove = x-drop
response.add = x-mesh: yes
response.set = content-type: text/x-mesh
response.remove = x-echo-server
"""), stop=stopProxy)
        yield proxy.whenLive
        url = f"http://127.0.0.1:{port(proxy.listeners['edge'])}/hello"
        response = yield treq.get(url, headers={"X-Drop": "gone", "X-Replace": "old", "X-Keep": "one"},
                                  persistent=False)
        text = yield response.text()
        self.assertEqual(response.code, 200)
        lines = text.splitlines()
        self.assertIn("GET /hello HTTP/1.1", lines)
        self.assertIn("x-added: one", lines)
        self.assertIn("x-replace: new", lines)
        self.assertNotIn("x-replace: old", lines)
        self.assertEqual([l for l in lines if l.startswith("x-keep:")], ["x-keep: one", "x-keep: two"])
        self.assertFalse([l for l in lines if l.startswith("x-drop")])
        self.assertEqual(response.headers.getRawHeaders("x-mesh"), ["yes"])
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/x-mesh"])
        self.assertIsNone(response.headers.getRawHeaders("x-echo-server"))
