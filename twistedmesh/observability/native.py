"""
The observability hot path's optional C modules: C{_linefmt} (access-log lines) and C{_traceids} (request
and trace ids). setup.py builds them where a C compiler is; elsewhere, or with the environment variable
C{TWISTEDMESH_PURE_PYTHON} set (to anything but C{0} or nothing), the Python code they stand in for runs
instead, giving the same bytes.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Optional

PURE_PYTHON = "TWISTEDMESH_PURE_PYTHON"


def load(name: str) -> Optional[ModuleType]:
    """
    The C module C{twistedmesh.observability.<name>}, or C{None} where it is not built or not wanted.
    """
    if os.environ.get(PURE_PYTHON, "") not in ("", "0"):
        return None
    try:
        return importlib.import_module(f"twistedmesh.observability.{name}")
    except ImportError:
        return None
