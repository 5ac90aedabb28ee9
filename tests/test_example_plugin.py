"""
The example plugin package in C{examples/acme_filters}: its own tests run as part of this suite, and its
plugin is found the way a user's would be, both in this process and in a fresh one whose C{sys.path} holds
the example directory, where C{twistd twistedmesh --validate} accepts a config using it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import types

from twisted.plugin import getPlugins
from twisted.trial import unittest

from twistedmesh.interfaces import IHTTPFilterFactory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "acme_filters")
PLUGINS = os.path.join(EXAMPLE, "twisted", "plugins")

# The example's package must be importable, as it would be once installed. Appended, not prepended: the
# example's own `tests` package must not shadow this suite's.
if EXAMPLE not in sys.path:
    sys.path.append(EXAMPLE)


def _loadExampleTests() -> types.ModuleType:
    """
    Import C{examples/acme_filters/tests/test_apikey.py} under a name of its own (the example's C{tests}
    package would clash with this suite's).
    """
    name = "twistedmesh_example_acme_filters_tests"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLE, "tests", "test_apikey.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


def _adopt(module: types.ModuleType) -> None:
    """
    Re-declare every TestCase of C{module} here, so that trial names them after this module (and
    C{trial tests.test_example_plugin.ApiKeyTests} selects one).
    """
    for attr in dir(module):
        value = getattr(module, attr)
        if isinstance(value, type) and issubclass(value, unittest.TestCase) and value.__module__ == module.__name__:
            globals()[attr] = type(attr, (value,), {"__module__": __name__, "__doc__": value.__doc__})


_adopt(_loadExampleTests())


def pythonPath() -> str:
    """
    C{PYTHONPATH} for a child process: the example directory, then this checkout, then what was there.
    """
    entries = [EXAMPLE, ROOT]
    if os.environ.get("PYTHONPATH"):
        entries.append(os.environ["PYTHONPATH"])
    return os.pathsep.join(entries)


class ExamplePluginTests(unittest.TestCase):
    """
    The example's C{twisted/plugins/acme_filters_plugin.py} registers C{api_key}.
    """

    def test_foundInProcess(self):
        """
        Once the example's C{twisted/plugins} directory is part of C{twisted.plugins} (as it is in a process
        started with the example on C{sys.path}), the proxy's plugin scan finds its C{api_key} factory.
        """
        import twisted.plugins

        from acme_filters.apikey import ApiKeyFactory

        # twisted.plugins computes its __path__ from sys.path once, when first imported: too early for the
        # sys.path entry this module added, so add the directory the way that computation would have.
        self.patch(twisted.plugins, "__path__", list(twisted.plugins.__path__) + [PLUGINS])
        self.addCleanup(sys.modules.pop, "twisted.plugins.acme_filters_plugin", None)
        found = {p.name: p for p in getPlugins(IHTTPFilterFactory)}
        self.assertIsInstance(found.get("api_key"), ApiKeyFactory)
        self.assertIn("headers", found)

    def runPython(self, code: str, *args: str) -> subprocess.CompletedProcess:
        """
        Run C{code} in a fresh interpreter with the example on C{PYTHONPATH}, from a neutral directory.
        """
        env = dict(os.environ, PYTHONPATH=pythonPath())
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                              cwd=tempfile.gettempdir(), env=env, timeout=120)

    def test_foundOnSysPath(self):
        """
        With the example directory on C{sys.path}, the default plugin scan (the one the proxy does)
        finds C{api_key} beside the built-in filters.
        """
        out = self.runPython(
            "import sys\n"
            "from twisted.plugin import getPlugins\n"
            "from twistedmesh.interfaces import IHTTPFilterFactory\n"
            "sys.stdout.write(' '.join(sorted(p.name for p in getPlugins(IHTTPFilterFactory))))\n"
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        names = out.stdout.split()
        self.assertIn("api_key", names)
        self.assertIn("headers", names)
        self.assertIn("router", names)

    def test_twistdValidates(self):
        """
        C{twistd twistedmesh --validate} accepts a config whose chain uses C{type = api_key}, and reports
        the plugin's own errors with file, section and key.
        """
        good = """
[mesh]
admin = off
[listener:edge]
endpoint = tcp:0:interface=127.0.0.1
protocol = http
filters = keys, router
routes = main
[filter:keys]
type = api_key
keys = k-1, k-2
[route:main/all]
prefix = /
cluster = app
[cluster:app]
endpoints = tcp:127.0.0.1:8080
"""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(good)
        code = ("import sys\nfrom twisted.scripts.twistd import run\n"
                "sys.argv = ['twistd', '-n', 'twistedmesh', '--config', sys.argv[1], '--validate']\nrun()\n")
        out = self.runPython(code, os.path.abspath(path))
        self.assertEqual((out.returncode, out.stdout), (0, "OK\n"), out.stderr)

        with open(path, "w") as f:
            f.write(good.replace("keys = k-1, k-2", "keys = k-1, k-1"))
        out = self.runPython(code, os.path.abspath(path))
        self.assertEqual(out.returncode, 1)
        self.assertIn("[filter:keys] keys: lists a key twice", out.stderr)
