"""
Configuration errors: each names the file, the section and the key, says what is wrong, and suggests the
closest valid name when a name looks misspelled.
"""

from __future__ import annotations

import difflib
from typing import Iterable, List, Optional


class ConfigError(Exception):
    """
    One thing wrong with a configuration file.

    @ivar file: the file's path (or C{"<string>"}).
    @ivar section: the section's name as written, or C{None} for the file as a whole.
    @ivar key: the key, or C{None} for the section as a whole.
    @ivar why: what is wrong, in a sentence.
    """

    def __init__(self, file: str, section: Optional[str], key: Optional[str], why: str) -> None:
        self.file = file
        self.section = section
        self.key = key
        self.why = why
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file
        if self.section is not None:
            where += f": [{self.section}]"
        if self.key is not None:
            where += f" {self.key}"
        return f"{where}: {self.why}"


class ConfigErrors(Exception):
    """
    Every error found in a configuration, in file order, so that a user fixes them all in one pass.
    """

    def __init__(self, errors: List[ConfigError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


def suggest(name: str, candidates: Iterable[str]) -> str:
    """
    A "did you mean" clause for C{name} among C{candidates}, or C{""} when none is close.
    """
    close = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""
