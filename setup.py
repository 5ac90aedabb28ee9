"""
The build's one piece that setup.cfg cannot declare: the optional C accelerator of the access log
(twistedmesh/observability/_linefmt.c). Optional: where it cannot be compiled (no C compiler, no Python
headers) the install goes on and the access log renders its lines in Python, the same bytes, slower.
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("twistedmesh.observability._linefmt", ["twistedmesh/observability/_linefmt.c"], optional=True),
])
