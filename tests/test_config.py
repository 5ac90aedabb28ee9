"""
Tests for L{twistedmesh.config}: value parsers, the loader and every error path.
"""

import operator

from twisted.trial import unittest

from twistedmesh.config import ConfigErrors, loadFile, loadString
from twistedmesh.config import values

GOOD = """
[mesh]
admin = tcp:9901:interface=127.0.0.1
drain_timeout = 250ms

[listener:edge]
endpoint = tcp:10000:interface=127.0.0.1
protocol = tcp            ; a comment
cluster = api
idle_timeout = 2m

[cluster:api]
endpoints =
    tcp:127.0.0.1:9001
    tcp:127.0.0.1:9002  weight=3
lb_policy = round_robin
connect_timeout = 1s

[echo:demo]
endpoint = tcp:10001:interface=127.0.0.1
protocol = tcp
"""


def errorsOf(text: str):
    """
    The error messages loading C{text} gives.
    """
    try:
        loadString(text, "mesh.ini")
    except ConfigErrors as e:
        return [str(err) for err in e.errors]
    raise AssertionError("no error")


class ValueTests(unittest.TestCase):
    """
    The value parsers.
    """

    def test_durations(self):
        """
        Durations take ms, s, m and h units and a bare number means seconds.
        """
        self.assertEqual(
            [values.duration(t) for t in ("250ms", "5s", "2m", "1h", "3", "1.5s")],
            [0.25, 5.0, 120.0, 3600.0, 3.0, 1.5],
        )

    def test_badDuration(self):
        """
        A duration with an unknown unit or no number is rejected with an example of the syntax.
        """
        for text in ("5 minutes", "s", "-1s", "5d"):
            e = self.assertRaises(ValueError, values.duration, text)
            self.assertIn("250ms", str(e))

    def test_sizes(self):
        """
        Sizes take binary and decimal units and a bare number means bytes.
        """
        self.assertEqual(
            [values.size(t) for t in ("512", "64KiB", "1MiB", "1GiB", "10KB", "3B")],
            [512, 65536, 1048576, 1 << 30, 10000, 3],
        )
        self.assertRaises(ValueError, values.size, "64kb")

    def test_booleans(self):
        """
        Booleans accept the usual spellings and nothing else.
        """
        self.assertEqual([values.boolean(t) for t in ("true", "Yes", "on", "1")], [True] * 4)
        self.assertEqual([values.boolean(t) for t in ("false", "NO", "off", "0")], [False] * 4)
        self.assertRaises(ValueError, values.boolean, "maybe")

    def test_lists(self):
        """
        Lists split on commas and new lines and drop blanks.
        """
        self.assertEqual(values.stringList("a, b,\n c,,"), ("a", "b", "c"))


class LoaderTests(unittest.TestCase):
    """
    Loading whole files.
    """

    def test_good(self):
        """
        A valid file loads into frozen objects with parsed values and defaults filled in.
        """
        config = loadString(GOOD, "mesh.ini")
        self.assertEqual(config.mesh.drain_timeout, 0.25)
        edge = config.listeners["edge"]
        self.assertEqual(edge.endpoint, "tcp:10000:interface=127.0.0.1")
        self.assertEqual((edge.protocol, edge.cluster, edge.idle_timeout), ("tcp", "api", 120.0))
        self.assertEqual(edge.filters, ("tcp_proxy",))
        self.assertEqual(edge.max_connect_attempts, 1)
        api = config.clusters["api"]
        self.assertEqual([(h.endpoint, h.weight) for h in api.endpoints],
                         [("tcp:127.0.0.1:9001", 1), ("tcp:127.0.0.1:9002", 3)])
        self.assertEqual(api.connect_timeout, 1.0)
        self.assertEqual(config.echoes["demo"].protocol, "tcp")
        self.assertRaises(Exception, setattr, edge, "cluster", "other")
        self.assertRaises(TypeError, operator.setitem, config.listeners, "x", edge)

    def test_shippedConfig(self):
        """
        The shipped etc/mesh.ini is valid.
        """
        import os

        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        config = loadFile(os.path.join(here, "etc", "mesh.ini"))
        self.assertIn("edge", config.listeners)

    def test_missingFile(self):
        """
        A file that cannot be read is one error naming the file.
        """
        e = self.assertRaises(ConfigErrors, loadFile, "/nonexistent/mesh.ini")
        self.assertIn("/nonexistent/mesh.ini: cannot read the file", str(e))

    def test_misspelledKey(self):
        """
        An unknown key names file, section and key, and suggests the closest valid key.
        """
        text = GOOD.replace("lb_policy", "lb_polcy")
        self.assertEqual(errorsOf(text), ["mesh.ini: [cluster:api] lb_polcy: unknown key (did you mean `lb_policy`?)"])

    def test_misspelledSectionKind(self):
        """
        An unknown section kind suggests the closest valid kind.
        """
        text = GOOD + "\n[clustr:x]\nendpoints = tcp:127.0.0.1:1\n"
        self.assertEqual(errorsOf(text), ["mesh.ini: [clustr:x]: unknown section kind `clustr` (did you mean `cluster`?)"])

    def test_badDuration(self):
        """
        A bad duration names its key and shows the syntax.
        """
        [error] = errorsOf(GOOD.replace("idle_timeout = 2m", "idle_timeout = 2 minutes"))
        self.assertTrue(error.startswith("mesh.ini: [listener:edge] idle_timeout: '2 minutes' is not a duration"), error)

    def test_unknownCluster(self):
        """
        A listener naming a cluster that does not exist is an error at load time, with a suggestion.
        """
        self.assertEqual(
            errorsOf(GOOD.replace("cluster = api", "cluster = apj")),
            ["mesh.ini: [listener:edge] cluster: names no [cluster:apj] section (did you mean `api`?)"],
        )

    def test_badEndpointString(self):
        """
        Server and client endpoint strings are checked by parsing them with Twisted.
        """
        text = GOOD.replace("endpoint = tcp:10000:interface=127.0.0.1", "endpoint = tcpp:10000")
        text = text.replace("tcp:127.0.0.1:9001", "tcp:127.0.0.1")
        errors = errorsOf(text)
        self.assertEqual(len(errors), 2, errors)
        self.assertTrue(errors[0].startswith("mesh.ini: [listener:edge] endpoint: 'tcpp:10000' is not a valid server endpoint"), errors)
        self.assertTrue(errors[1].startswith("mesh.ini: [cluster:api] endpoints: 'tcp:127.0.0.1' is not a valid client endpoint"), errors)

    def test_badWeight(self):
        """
        Weights are whole numbers from 1 to 1000, and only C{weight} is a known endpoint parameter.
        """
        errors = errorsOf(GOOD.replace("weight=3", "weight=0 wieght=2"))
        self.assertEqual(errors, [
            "mesh.ini: [cluster:api] endpoints: weight must be a whole number from 1 to 1000, not '0'",
            "mesh.ini: [cluster:api] endpoints: unknown endpoint parameter 'wieght' in "
            "'tcp:127.0.0.1:9002  weight=0 wieght=2' (did you mean `weight`?)",
        ])

    def test_duplicateSection(self):
        """
        Two sections of the same name are an error naming the line.
        """
        errors = errorsOf(GOOD + "\n[cluster:api]\nendpoints = tcp:127.0.0.1:1\n")
        self.assertEqual(len(errors), 1)
        self.assertRegex(errors[0], r"^mesh.ini: \[cluster:api\]: duplicate section \(line \d+\)$")

    def test_duplicateKey(self):
        """
        A key given twice in a section is an error.
        """
        errors = errorsOf(GOOD.replace("lb_policy = round_robin", "lb_policy = round_robin\nlb_policy = x"))
        self.assertRegex(errors[0], r"^mesh.ini: \[cluster:api\] lb_policy: duplicate key")

    def test_duplicateEndpoint(self):
        """
        Two sections listening on the same endpoint are an error.
        """
        errors = errorsOf(GOOD.replace("tcp:10001:interface=127.0.0.1", "tcp:10000:interface=127.0.0.1"))
        self.assertEqual(errors, ["mesh.ini: [echo:demo] endpoint: 'tcp:10000:interface=127.0.0.1' "
                                  "is already used by [listener:edge]"])

    def test_badChoice(self):
        """
        A value outside a fixed set lists the choices and suggests the closest.
        """
        errors = errorsOf(GOOD.replace("protocol = tcp            ; a comment", "protocol = tpc"))
        self.assertEqual(errors, ["mesh.ini: [listener:edge] protocol: 'tpc' is not one of tcp, http (did you mean `tcp`?)"])

    def test_requiredKey(self):
        """
        A missing required key is named.
        """
        errors = errorsOf(GOOD.replace("endpoint = tcp:10001:interface=127.0.0.1\n", ""))
        self.assertEqual(errors, ["mesh.ini: [echo:demo] endpoint: is required"])

    def test_allErrorsReported(self):
        """
        Every error in a file is reported, not only the first.
        """
        text = GOOD.replace("lb_policy", "lb_polcy").replace("idle_timeout = 2m", "idle_timeout = x")
        text = text.replace("drain_timeout = 250ms", "drain_timeout = forever")
        self.assertEqual(len(errorsOf(text)), 3)

    def test_badSectionName(self):
        """
        Section names are restricted to characters that are safe in stat names.
        """
        errors = errorsOf(GOOD + "\n[cluster:a.b]\nendpoints = tcp:127.0.0.1:1\n")
        self.assertEqual(errors, ["mesh.ini: [cluster:a.b]: a cluster needs a name of letters, digits, _ and -: [cluster:NAME]"])

    def test_adminOff(self):
        """
        C{admin = off} disables the admin endpoint.
        """
        config = loadString(GOOD.replace("admin = tcp:9901:interface=127.0.0.1", "admin = off"))
        self.assertIsNone(config.mesh.admin)

    def test_notIni(self):
        """
        Text that is not INI at all is one clear error.
        """
        errors = errorsOf("just some text\n")
        self.assertEqual(len(errors), 1)
        self.assertIn("not a valid INI file", errors[0])


class ShippedExamplesTests(unittest.TestCase):
    """
    Every configuration the project ships builds a service: the docs never point at a broken example.
    """

    def test_examplesBuild(self):
        """
        etc/mesh.ini and each etc/examples/*.ini load and build (nothing listens).
        """
        import glob
        import os

        from twisted.internet.testing import MemoryReactorClock

        from twistedmesh.service import MeshService

        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        # Relative paths in a config (certificates, say) are relative to where twistd runs: the checkout.
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(here)
        paths = [os.path.join(here, "etc", "mesh.ini")] + sorted(glob.glob(os.path.join(here, "etc", "examples", "*.ini")))
        checked = []
        for path in paths:
            with open(path, encoding="utf-8") as f:
                needsPKI = "etc/pki/" in f.read()
            if needsPKI and not os.path.exists(os.path.join(here, "etc", "pki", "ca.pem")):
                continue  # needs the demo PKI that etc/pki/make-demo-pki.py writes (keys are never committed)
            MeshService(loadFile(path), MemoryReactorClock())
            checked.append(os.path.basename(path))
        self.assertIn("http-proxy.ini", checked)
        self.assertGreaterEqual(len(checked), 7)
