"""
Tests that keep the documentation in step with the code: docs/configuration.md (and the pages its tables
link to) lists exactly the keys the loader and the built-in filters read; every shipped example is
referenced from a page, every page is linked from docs/index.md, and every relative link and anchor in
docs/*.md and README.md leads somewhere.

The keys the code reads are not written down here: they are recorded by instrumenting
L{Options.finish<twistedmesh.config.options.Options.finish>} (an L{Options} knows every key a getter
asked for) while every shipped example, and a configuration holding every documented key, is loaded and
built on a memory reactor.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Dict, Iterator, List, Set, Tuple

from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from twistedmesh.config import ConfigErrors, loadString
from twistedmesh.config.options import Options
from twistedmesh.plugins import factoriesFor
from twistedmesh.service import MeshService

from .support import ROOT

DOCS = os.path.join(ROOT, "docs")
# Key families that configuration.md summarises (`health.*`) and a linked page lists key by key.
FAMILIES = ("http2", "health", "outlier", "breaker", "tracing", "xds", "access_log")
# The [section] kinds whose keys configuration.md documents, by its "## " heading's first word.
KINDS = ("mesh", "listener", "cluster", "route", "tls", "echo")


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _prose(text: str) -> str:
    """
    C{text} (Markdown) without its fenced code blocks: an INI sample's C{# comment} is no heading.
    """
    return re.sub(r"^```.*?^```[^\n]*$", "", text, flags=re.M | re.S)


def _headings(text: str) -> Iterator[Tuple[int, str, int]]:
    """
    The (level, title, offset) of each heading outside code blocks.
    """
    inCode = False
    offset = 0
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            inCode = not inCode
        elif not inCode:
            m = re.match(r"(#{1,6})\s+(.*?)\s*#*\s*$", line)
            if m:
                yield len(m.group(1)), m.group(2), offset
        offset += len(line)


def slug(title: str) -> str:
    """
    GitHub's anchor for a heading: lowercase, punctuation other than C{-} and C{_} dropped, spaces to C{-}.
    """
    title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link in a heading counts by its text
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def anchors(text: str) -> Set[str]:
    """
    The anchors of C{text}'s headings, a repeated one numbered as GitHub numbers it (C{-1}, C{-2}, ...).
    """
    seen: Dict[str, int] = {}
    result = set()
    for _, title, _ in _headings(text):
        s = slug(title)
        n = seen.get(s, 0)
        result.add(s if n == 0 else f"{s}-{n}")
        seen[s] = n + 1
    return result


def section(text: str, anchor: str) -> str:
    """
    The part of C{text} under the heading whose anchor is C{anchor}, up to the next heading of its level
    or above; all of C{text} for no anchor.
    """
    if not anchor:
        return text
    heads = list(_headings(text))
    for i, (level, title, start) in enumerate(heads):
        if slug(title) == anchor:
            end = next((o for lv, _, o in heads[i + 1:] if lv <= level), len(text))
            return text[start:end]
    raise KeyError(anchor)


def ticked(text: str) -> Set[str]:
    """
    Every backticked word of C{text} (code spans only; fenced blocks are left out).
    """
    return set(re.findall(r"`([^`\n]+)`", _prose(text)))


def _links(text: str) -> List[str]:
    return re.findall(r"\]\(([^)\s]+)\)", _prose(text))


def documents(documented: Set[str], key: str) -> bool:
    """
    Whether C{key} is among the C{documented} keys, in which an upper-case part (C{sni.HOSTNAME},
    C{policy.NAME.principals}, C{descriptor.N.key}) stands for any name.
    """
    if key in documented:
        return True
    for d in documented:
        if re.search(r"\.[A-Z][A-Z_]*(\.|$)", d):
            pattern = r"\.".join(".+" if re.fullmatch(r"[A-Z][A-Z_]*", part) else re.escape(part)
                                 for part in d.split("."))
            if re.fullmatch(pattern, key):
                return True
    return False


# -- what configuration.md says --------------------------------------------------------------------------------


def _configuration() -> str:
    return _read(os.path.join(DOCS, "configuration.md"))


def kindSections() -> Dict[str, str]:
    """
    configuration.md's "## [KIND...]" sections, by KIND.
    """
    text = _configuration()
    result = {}
    for level, title, _ in _headings(text):
        m = re.match(r"`\[(\w+)", title)
        if level == 2 and m:
            result[m.group(1)] = section(text, slug(title))
    return result


def tableKeys(text: str) -> List[str]:
    """
    The backticked first cell of every row of C{text}'s key tables (those whose first column is headed
    C{key} or C{option}): the keys they list.
    """
    keys = []
    header = None
    for line in _prose(text).splitlines():
        if not line.startswith("|"):
            header = None
        elif header is None:
            header = line.split("|")[1].strip()
        elif header.lower() in ("key", "option"):
            m = re.match(r"\| `([a-z_][\w.]*)` \|", line)
            if m:
                keys.append(m.group(1))
    return keys


def familyPages(text: str, family: str) -> List[Tuple[str, str]]:
    """
    The pages (and anchors) that a configuration.md section sends a key family to: those linked from its
    table row for C{`family.*`}, or from the subsection whose heading names C{`family.*`}.
    """
    pages = []
    for level, title, _ in _headings(text):
        if f"`{family}.*`" in title:
            pages += pagesOf(section(text, slug(title)))
    for line in _prose(text).splitlines():
        if line.startswith(f"| `{family}.*` |"):
            pages += pagesOf(line)
    return pages


def proseKeys(text: str) -> Set[str]:
    """
    The keys a paragraph lists in backticks (the route and TLS sections list theirs so).
    """
    return {t for t in ticked(text) if re.fullmatch(r"[a-z_][a-z0-9_]*(\.[A-Za-z_][\w]*)*", t)}


def filterRows() -> Dict[Tuple[str, str], str]:
    """
    The built-in filter table of configuration.md: its options cell by (plugin, C{http} or C{tcp}).
    """
    rows = {}
    text = kindSections()["filter"]
    for plugin, kind, options in re.findall(r"^\| `(\w+)` \| ([^|]*) \|[^|]*\| (.*) \|$", text, flags=re.M):
        for word, protocol in (("HTTP", "http"), ("network", "tcp")):
            if word in kind:
                rows[(plugin, protocol)] = options
    return rows


def pagesOf(cell: str) -> List[Tuple[str, str]]:
    """
    The (page text, anchor) of each docs page linked from C{cell}.
    """
    result = []
    for link in _links(cell):
        path, _, anchor = link.partition("#")
        if path.endswith(".md"):
            result.append((_read(os.path.join(DOCS, path)), anchor))
    return result


# -- what the code reads ---------------------------------------------------------------------------------------


class _Recorder:
    """
    Records, through L{Options.finish}, the keys each section's getters asked for: while loading, by
    section title; while building a service, the filters' by section title too (a [filter:NAME] section's
    keys are the plugin's, read at build time).
    """

    def __init__(self) -> None:
        self.loaded: Dict[str, Set[str]] = {}
        self.built: Dict[str, Set[str]] = {}
        # The keys each built-in (and other) filter plugin read, by (plugin, listener protocol).
        self.plugins: Dict[Tuple[str, str], Set[str]] = {}
        self.target = self.loaded

    def install(self, case: unittest.TestCase) -> None:
        original = Options.finish
        recorder = self

        def finish(options: Options) -> None:
            recorder.target.setdefault(options.section, set()).update(options._known)
            original(options)

        case.patch(Options, "finish", finish)

    def run(self, text: str, name: str) -> List[str]:
        """
        Load and build C{text} on a memory reactor; the error messages, or C{[]}. The keys the filters
        read go to C{plugins}.
        """
        self.target = self.loaded
        try:
            config = loadString(text, name)
        except ConfigErrors as e:
            return [str(x) for x in e.errors]
        self.target = self.built
        try:
            MeshService(config, MemoryReactorClock())
        except ConfigErrors as e:
            return [str(x) for x in e.errors]
        finally:
            self.target = self.loaded
            for listener in config.listeners.values():
                for fname in listener.filters:
                    f = config.filters.get(fname)
                    title = f.section if f is not None else f"filter:{fname}"
                    kind = (f.type if f is not None else fname, listener.protocol)
                    self.plugins.setdefault(kind, set()).update(self.built.pop(title, ()))
        return []

    def readKeys(self) -> Dict[str, Set[str]]:
        """
        The keys read, by section kind.
        """
        kinds: Dict[str, Set[str]] = {}
        for title, keys in self.loaded.items():
            kind = title.partition(":")[0]
            if kind != "filter":  # the loader takes all of a filter's keys for the plugin to check
                kinds.setdefault(kind, set()).update(keys)
        return kinds


def _examples() -> List[str]:
    return [os.path.join(ROOT, "etc", "mesh.ini")] + sorted(glob.glob(os.path.join(ROOT, "etc", "examples", "*.ini")))


def makePKI(directory: str) -> None:
    """
    Write the demo PKI of etc/pki/make-demo-pki.py into C{directory}: the TLS examples need its files, which
    a checkout does not hold (keys are never committed).
    """
    import datetime
    import importlib.util

    spec = importlib.util.spec_from_file_location("_demo_pki", os.path.join(ROOT, "etc", "pki", "make-demo-pki.py"))
    pki = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pki)
    os.makedirs(directory)
    now = datetime.datetime.now(datetime.timezone.utc)
    caCert, caKey = pki.makeCA(directory, now)
    for name, (dns, ips, uris) in pki.LEAVES.items():
        pki.makeLeaf(directory, name, dns, ips, uris, caCert, caKey, now)


def builtinPlugins() -> Set[Tuple[str, str]]:
    """
    The (name, protocol) of every filter plugin twistedmesh itself ships.
    """
    found = set()
    for protocol in ("http", "tcp"):
        for name, factory in factoriesFor(protocol, [], "-").items():
            if type(factory).__module__.startswith("twistedmesh."):
                found.add((name, protocol))
    return found


def documentedKeys() -> Dict[str, Set[str]]:
    """
    The keys configuration.md documents for each kind, with those of the family pages it links to.
    """
    sections = kindSections()
    result = {}
    for kind in KINDS:
        text = sections[kind]
        keys = set(tableKeys(text)) | (proseKeys(text) if kind in ("route", "tls") else set())
        for family in FAMILIES:
            for page, anchor in familyPages(text, family):
                keys.update(k for k in tableKeys(section(page, anchor)) if k.startswith(family + "."))
        result[kind] = keys
    return result



def allKeysConfigs() -> List[Tuple[str, str]]:
    """
    Configurations (name, text) with one section of each kind holding every key configuration.md
    documents for it (and the keys of the family pages it links to), all with the dummy value C{1}.

    Keys that apply only in some settings (an HTTP listener; a cluster's policy, protocol, discovery, kind
    of check) are read there and, elsewhere, refused with an error of their own, which marks them known:
    each configuration puts one setting in force, so a key unknown in any of them is unknown.
    """
    documented = documentedKeys()
    title = {"mesh": "mesh", "listener": "listener:l", "cluster": "cluster:c", "route": "route:t/r",
             "tls": "tls:t", "echo": "echo:e"}
    variants = [
        {"listener": {"protocol": "http", "http2": "true", "access_log": "stdout"},
         "cluster": {"discovery": "strict_dns", "protocol": "http2", "lb_policy": "least_request",
                     "health.type": "http"}},
        {"listener": {"protocol": "http", "access_log": "stdout"},
         "cluster": {"discovery": "xds", "protocol": "http2", "lb_policy": "ring_hash", "health.type": "tcp"}},
    ]
    configs = []
    for i, base in enumerate(variants):
        text = ""
        for kind in KINDS:
            items = dict.fromkeys(sorted(documented[kind]), "1")
            items.update(base.get(kind, {}))
            text += f"[{title[kind]}]\n" + "".join(
                f"{k.replace('HOSTNAME', 'a.example').replace('NAME', 'x')} = {v}\n" for k, v in items.items()
            )
        configs.append((f"all-keys-{i}.ini", text))
    return configs


def filterConfigs() -> List[Tuple[str, str]]:
    """
    For each built-in filter in configuration.md's table, a configuration (name, text) whose C{[filter:f]}
    section of that type holds every key the key tables of the page section its row links to list.
    """
    configs = []
    for (plugin, protocol), cell in sorted(filterRows().items()):
        keys = set()
        for page, anchor in pagesOf(cell):
            if anchor:
                keys.update(tableKeys(section(page, anchor)))
        keys.discard("type")
        if not keys or plugin in ("tcp_proxy", "router"):
            continue
        listener = ("[listener:l]\nendpoint = tcp:1:interface=127.0.0.1\nprotocol = http\n"
                    "filters = f, router\nroutes = t\n[route:t/r]\ncluster = c\n" if protocol == "http" else
                    "[listener:l]\nendpoint = tcp:1:interface=127.0.0.1\nfilters = f, tcp_proxy\ncluster = c\n")
        text = (listener + "[cluster:c]\nendpoints = tcp:127.0.0.1:2\n[filter:f]\ntype = " + plugin + "\n"
                + "".join(f"{k.replace('NAME', 'x').replace('.N.', '.x.')} = 1\n" for k in sorted(keys)))
        configs.append((f"{plugin}-{protocol}.ini", text))
    return configs


class ConfigurationKeysTests(unittest.TestCase):
    """
    docs/configuration.md and the pages it links to list every key the loader and the built-in filters
    read, and nothing that they do not.
    """

    maxDiff = None

    def setUp(self) -> None:
        self.recorder = _Recorder()
        self.recorder.install(self)
        # Made before the chdir below, so that it lands in trial's temporary directory, not the checkout.
        self.pkiDir = os.path.abspath(self.mktemp())
        # Relative paths in a config (certificates, say) are relative to where twistd runs: the checkout.
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(ROOT)

    def test_readKeysDocumented(self) -> None:
        """
        Every key the loader reads, loading every shipped example, is in configuration.md's section for its
        kind (a key of a family like C{health.*} on the page that section links to); every key a built-in
        filter reads is on the page configuration.md's built-in filter table links to for it.
        """
        pki = self.pkiDir
        makePKI(pki)
        for path in _examples():
            text = _read(path).replace("etc/pki/", pki + "/")
            self.assertEqual(self.recorder.run(text, path), [], path)
        for name, text in allKeysConfigs() + filterConfigs():
            self.recorder.run(text, name)  # errors expected: these only make conditional keys read
        sections = kindSections()
        missing = []
        for kind, keys in sorted(self.recorder.readKeys().items()):
            text = sections[kind]
            here = ticked(text)
            linked = {family: set().union(*(ticked(section(p, a)) for p, a in familyPages(text, family)))
                      for family in FAMILIES}
            for key in sorted(keys):
                family = key.partition(".")[0]
                if documents(here, key):
                    continue
                if family in FAMILIES and documents(linked[family], key):
                    continue
                missing.append(f"[{kind}] {key}")
        rows = filterRows()
        for (plugin, protocol), keys in sorted(self.recorder.plugins.items()):
            if (plugin, protocol) not in builtinPlugins():
                continue
            cell = rows.get((plugin, protocol))
            if cell is None:
                missing.append(f"[filter] {plugin} ({protocol}): no row in the built-in filter table")
                continue
            documented = ticked(cell)
            for page, anchor in pagesOf(cell):
                documented |= ticked(section(page, anchor))
            missing.extend(f"[filter:{plugin}] ({protocol}) {key}" for key in sorted(keys)
                           if not documents(documented, key))
        self.assertEqual(missing, [])

    def test_everyBuiltinFilterInTable(self) -> None:
        """
        configuration.md's built-in filter table has a row for every filter plugin twistedmesh ships, and
        only for those.
        """
        self.assertEqual(sorted(filterRows()), sorted(builtinPlugins()))

    def test_documentedKeysAccepted(self) -> None:
        """
        A configuration with every key configuration.md documents for a kind (and the keys of the family
        pages it links to), one section per kind, gets no "unknown key" error: the docs list no key the
        loader refuses. Values are dummies: other errors are expected and ignored.
        """
        for kind, keys in documentedKeys().items():
            self.assertGreater(len(keys), 1, kind)
        unknown = set()
        for name, text in allKeysConfigs():
            errors = self.recorder.run(text, name)
            self.assertTrue(errors)  # dummy values: if this ever loads, the check checked nothing
            unknown.update(e for e in errors if "unknown key" in e)
        self.assertEqual(sorted(unknown), [])

    def test_documentedFilterKeysAccepted(self) -> None:
        """
        For each built-in filter, a section with every key its row's linked page section lists in a
        table gets no "unknown key" error from the plugin.
        """
        unknown = []
        for name, text in filterConfigs():
            unknown.extend(e for e in self.recorder.run(text, name) if "unknown key" in e)
        self.assertEqual(unknown, [])


class LinksTests(unittest.TestCase):
    """
    The docs hang together: examples referenced, pages indexed, links and anchors alive.
    """

    maxDiff = None

    def pages(self) -> List[str]:
        return sorted(glob.glob(os.path.join(DOCS, "*.md")))

    def test_examplesReferenced(self) -> None:
        """
        Every etc/examples/*.ini is named on at least one docs page.
        """
        text = "".join(_read(p) for p in self.pages())
        unreferenced = [os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "etc", "examples", "*.ini"))
                        if os.path.basename(p) not in text]
        self.assertEqual(sorted(unreferenced), [])

    def test_pagesIndexed(self) -> None:
        """
        docs/index.md links to every other page of docs/.
        """
        linked = {link.partition("#")[0] for link in _links(_read(os.path.join(DOCS, "index.md")))}
        pages = {os.path.basename(p) for p in self.pages()} - {"index.md"}
        self.assertEqual(sorted(pages - linked), [])

    def test_relativeLinks(self) -> None:
        """
        Every relative link in docs/*.md and README.md names an existing file, and a C{#anchor} a heading of
        the Markdown page it points at.
        """
        broken = []
        for page in self.pages() + [os.path.join(ROOT, "README.md")]:
            text = _read(page)
            for link in _links(text):
                if re.match(r"[a-z]+:", link):
                    continue  # https:, mailto:
                path, _, anchor = link.partition("#")
                target = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
                where = f"{os.path.relpath(page, ROOT)}: {link}"
                if not os.path.exists(target):
                    broken.append(f"{where}: no such file")
                elif anchor and target.endswith(".md") and anchor not in anchors(_read(target)):
                    broken.append(f"{where}: no such anchor")
        self.assertEqual(broken, [])

    def test_slug(self) -> None:
        """
        L{slug} follows GitHub's rules: lowercase, punctuation but C{-} and C{_} dropped, spaces to C{-}.
        """
        self.assertEqual(slug("`[route:TABLE/NAME]`"), "routetablename")
        self.assertEqual(slug("`[echo:NAME]`: the demo upstream"), "echoname-the-demo-upstream")
        self.assertEqual(slug("`local_ratelimit`: token bucket"), "local_ratelimit-token-bucket")
        self.assertEqual(anchors("# A\n```\n# not a heading\n```\n## A\n"), {"a", "a-1"})


def _statNames(text: str) -> Iterator[str]:
    """
    The stat names C{text} presents: the first cell of tables headed C{stat}, C{counter} or C{gauge}, and
    the backticked names after "counter(s)" or "gauge(s)" in prose.
    """
    text = _prose(text)
    header = None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
        elif header is None:
            header = line.split("|")[1].strip().lower()
        elif header in ("stat", "counter", "gauge"):
            m = re.match(r"\| `([^`]+)` \|", line)
            if m:
                yield from re.split(r"`?,\s*`?", m.group(1))
    for m in re.finditer(r"\b(?:counters?|gauges?)\s+((?:`[^`]+`(?:,\s*|\s+and\s+|\s+or\s+)?)+)", text):
        yield from re.findall(r"`([^`]+)`", m.group(1))


def _codeNameParts() -> Tuple[Set[str], List["re.Pattern[str]"]]:
    """
    The dot-separated parts of every string literal in twistedmesh/: as written, and, for an f-string
    part with a C{{placeholder}} and at least three characters of its own, as a pattern.
    """
    static: Set[str] = set()
    templates = []
    for path in glob.glob(os.path.join(ROOT, "twistedmesh", "**", "*.py"), recursive=True):
        for literal in re.findall(r"[\"']([^\"'\n]*)[\"']", _read(path)):
            for part in literal.split("."):
                if "{" not in part:
                    static.add(part)
                elif len(re.sub(r"\{[^}]*\}", "", part)) >= 3:
                    templates.append(re.compile(".+".join(re.escape(p) for p in re.split(r"\{[^}]*\}", part))))
    return static, templates


class StatNamesTests(unittest.TestCase):
    """
    The stat names the docs present are spelled as the code spells them.
    """

    def test_statNamesInCode(self) -> None:
        """
        The last part of every stat name a docs page presents (in a C{stat} table, or after "counter" or
        "gauge") is a part of a string literal in twistedmesh/, or matches an f-string part
        (C{ejections_detected_{kind}}). A spelling check only: it does not prove that the feature emits the
        name under the prefix the page gives.
        """
        static, templates = _codeNameParts()
        unknown = []
        count = 0
        for page in sorted(glob.glob(os.path.join(DOCS, "*.md"))):
            for name in _statNames(_read(page)):
                parts = [p for p in name.split(".") if p and not re.search(r"[<>A-Z{}*]", p)]
                if not parts:
                    continue
                count += 1
                if parts[-1] not in static and not any(t.fullmatch(parts[-1]) for t in templates):
                    unknown.append(f"{os.path.basename(page)}: {name}")
        self.assertGreater(count, 50)  # the pages' stat tables were found
        self.assertEqual(unknown, [])
