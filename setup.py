"""
The build's one piece that setup.cfg cannot declare: the optional C modules of the observability hot path,
twistedmesh/observability/_linefmt.c (access-log lines) and _traceids.c (request and trace ids). Optional:
where they cannot be compiled (no C compiler, no Python headers) the install goes on and the Python code
they stand in for runs instead (twistedmesh/observability/native.py), the same bytes, slower.
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension(f"twistedmesh.observability.{name}", [f"twistedmesh/observability/{name}.c"], optional=True)
    for name in ("_linefmt", "_traceids")
])
