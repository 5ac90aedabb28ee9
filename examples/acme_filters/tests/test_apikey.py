"""
Tests for L{acme_filters.apikey}, written the way a plugin author tests a filter: the filter driven through
L{twistedmesh.testing.FilterHarness} (no sockets, no reactor), and its options checked through
L{twistedmesh.config.Options} exactly as the proxy checks them at config load.

Run them from this directory with C{trial tests}.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Dict, List, Tuple

from twisted.internet.task import Clock
from twisted.trial import unittest

from acme_filters.apikey import ApiKeyFactory, ApiKeyFilter
from twistedmesh.config import ConfigError, ConfigErrors, Options, loadString
from twistedmesh.observability.stats import StatsStore
from twistedmesh.plugins import FilterContext, buildChain
from twistedmesh.testing import FilterHarness


def context() -> SimpleNamespace:
    """
    The part of a filter context that C{api_key} uses: a stats store and the listener's name.
    """
    return SimpleNamespace(stats=StatsStore(), listener=SimpleNamespace(name="edge"))


def configure(items: Dict[str, str]) -> Tuple[object, List[ConfigError], SimpleNamespace]:
    """
    Configure C{api_key} from C{items} (a C{[filter:keys]} section) as the proxy does, unknown-key check
    included; return the maker, the errors and the context.
    """
    errors: List[ConfigError] = []
    ctx = context()
    options = Options("t.ini", "filter:keys", items, errors)
    maker = ApiKeyFactory().configure(options, ctx)
    options.finish()
    return maker, errors, ctx


class ApiKeyTests(unittest.TestCase):
    """
    Requests with and without a valid key.
    """

    def setUp(self):
        """
        A filter accepting three keys, and a harness running it.
        """
        self.maker, errors, self.ctx = configure({"keys": "alpha-1, beta-2\ngamma-3"})
        self.assertEqual(errors, [])
        self.harness = FilterHarness(self.maker(None))

    def stat(self, name: str) -> int:
        """
        The value of counter C{http.edge.api_key.<name>}.
        """
        return self.ctx.stats.get(f"http.edge.api_key.{name}").value

    def test_validKey(self):
        """
        A valid key reaches the upstream as C{x-acme-client} (the key's position), without the key itself.
        """
        h = self.harness
        h.request(b"GET", b"/orders", [(b"accept", b"*/*"), (b"x-api-key", b"beta-2")])
        self.assertEqual(h.upstream.headers, [(b"accept", b"*/*"), (b"x-acme-client", b"1")])
        h.respond(200, [(b"content-length", b"2")], b"ok")
        self.assertEqual((h.downstream.status, h.downstream.body), (200, b"ok"))
        self.assertTrue(h.completed)
        self.assertEqual((self.stat("allowed"), self.stat("denied")), (1, 0))

    def test_missingKey(self):
        """
        A request without the header gets a 401 local reply with a challenge and never goes upstream.
        """
        h = self.harness
        h.request(b"GET", b"/orders")
        self.assertIsNone(h.upstream.method)
        self.assertEqual(h.downstream.status, 401)
        self.assertIn((b"www-authenticate", b'ApiKey realm="acme", header="x-api-key"'), h.downstream.headers)
        self.assertEqual(h.downstream.body, b"a valid API key is required\n")
        self.assertEqual((h.stream.responseFlags, h.stream.responseCodeDetails), (["UAEX"], "api_key_denied"))
        self.assertTrue(h.completed)
        self.assertEqual((self.stat("allowed"), self.stat("denied")), (0, 1))

    def test_wrongKey(self):
        """
        An unknown key (or a prefix of a valid one) is refused.
        """
        for key in (b"delta-4", b"alpha-", b"alpha-12", b""):
            h = FilterHarness(self.maker(None))
            h.request(headers=[(b"x-api-key", key)])
            self.assertEqual(h.downstream.status, 401, key)
            self.assertIsNone(h.upstream.method)

    def test_keyTwice(self):
        """
        A request carrying the header twice is refused, even if both keys are valid.
        """
        h = self.harness
        h.request(headers=[(b"x-api-key", b"alpha-1"), (b"x-api-key", b"alpha-1")])
        self.assertEqual(h.downstream.status, 401)

    def test_forgedClientHeader(self):
        """
        An C{x-acme-client} header sent by the client is replaced by the one the filter vouches for.
        """
        h = self.harness
        h.request(headers=[(b"x-acme-client", b"0"), (b"x-api-key", b"gamma-3"), (b"x-acme-client", b"7")])
        self.assertEqual(h.upstream.headers, [(b"x-acme-client", b"2")])

    def test_requestBodyFlows(self):
        """
        An accepted request's body goes upstream untouched.
        """
        h = self.harness
        h.request(b"POST", b"/orders", [(b"x-api-key", b"alpha-1")], [b"{", b"}"])
        self.assertEqual((h.upstream.body, h.upstream.ended), (b"{}", True))

    def test_sharedInstance(self):
        """
        Every stream gets the same filter, and streams do not affect each other.
        """
        self.assertIs(self.maker(None), self.maker(None))
        self.assertIsInstance(self.maker(None), ApiKeyFilter)
        first, second = FilterHarness(self.maker(None)), FilterHarness(self.maker(None))
        first.request(headers=[(b"x-api-key", b"alpha-1")])
        second.request()
        self.assertEqual(first.upstream.headers, [(b"x-acme-client", b"0")])
        self.assertEqual(second.downstream.status, 401)


class OptionsTests(unittest.TestCase):
    """
    The options C{header}, C{keys} and C{realm}, and the errors a user sees.
    """

    def test_headerAndRealm(self):
        """
        C{header} (any case) names the key's header and, with C{realm}, appears in the challenge.
        """
        maker, errors, _ = configure({"header": "Authorization-Key", "keys": "k1", "realm": "orders"})
        self.assertEqual(errors, [])
        h = FilterHarness(maker(None))
        h.request(headers=[(b"x-api-key", b"k1")])
        self.assertIn((b"www-authenticate", b'ApiKey realm="orders", header="authorization-key"'),
                      h.downstream.headers)
        h = FilterHarness(maker(None))
        h.request(headers=[(b"authorization-key", b"k1")])
        self.assertEqual(h.upstream.headers, [(b"x-acme-client", b"0")])

    def test_keysRequired(self):
        """
        Without C{keys} the filter would refuse everything: that is a config error.
        """
        _, errors, _ = configure({})
        self.assertEqual([str(e) for e in errors], ["t.ini: [filter:keys] keys: is required: list at least one API key"])

    def test_badKeys(self):
        """
        A key with a space or listed twice is an error (that does not repeat the secret).
        """
        _, errors, _ = configure({"keys": "a b, k1, k1"})
        self.assertEqual([(e.key, e.why) for e in errors], [
            ("keys", "a key is printable ASCII without spaces"), ("keys", "lists a key twice"),
        ])

    def test_badHeader(self):
        """
        C{header} must be a plain header name, not C{host}, a pseudo-header or the filter's own output.
        """
        for header in ("host", ":path", "x-acme-client", "x key"):
            _, errors, _ = configure({"header": header, "keys": "k1"})
            self.assertEqual([e.key for e in errors], ["header"], header)

    def test_badRealm(self):
        """
        A realm with a quote would break the challenge.
        """
        _, errors, _ = configure({"keys": "k1", "realm": 'a"b'})
        self.assertEqual([e.key for e in errors], ["realm"])

    def test_unknownOption(self):
        """
        A misspelled option is reported with a suggestion.
        """
        _, errors, _ = configure({"keys": "k1", "relm": "x"})
        self.assertEqual([str(e) for e in errors], ["t.ini: [filter:keys] relm: unknown key (did you mean `realm`?)"])


class ConfigFileTests(unittest.TestCase):
    """
    The filter configured from an INI file, the way the proxy builds a listener's chain.
    """

    def chain(self, section: str):
        """
        Load a config with an HTTP listener whose chain is the C{[filter:keys]} C{section}, and build the
        chain with this package's factory; return the makers or raise L{ConfigErrors}.
        """
        config = loadString(f"""
[mesh]
admin = off
[listener:edge]
endpoint = tcp:0:interface=127.0.0.1
protocol = http
filters = keys
[filter:keys]
type = api_key
{section}
""", "acme.ini")
        listener = config.listeners["edge"]
        errors: List[ConfigError] = []
        ctx = FilterContext(Clock(), StatsStore(), {}, listener)
        makers = buildChain(config, listener, {"api_key": ApiKeyFactory()}, ctx, errors)
        if errors:
            raise ConfigErrors(errors)
        return makers

    def test_fromINI(self):
        """
        Keys written one per line in the INI file all work.
        """
        [maker] = self.chain("keys =\n    first\n    second\n")
        h = FilterHarness(maker(None))
        h.request(headers=[(b"x-api-key", b"second")])
        self.assertEqual(h.upstream.headers, [(b"x-acme-client", b"1")])

    def test_errorsNameFileSectionKey(self):
        """
        A bad section's errors name the file, the section and the key.
        """
        e = self.assertRaises(ConfigErrors, self.chain, "header = x key\n")
        self.assertEqual([str(err) for err in e.errors], [
            "acme.ini: [filter:keys] header: 'x key' is not a valid header name",
            "acme.ini: [filter:keys] keys: is required: list at least one API key",
        ])
