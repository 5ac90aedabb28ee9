"""
The twistd plugin: C{twistd -n twistedmesh --config etc/mesh.ini}. All the work is in L{twistedmesh.tap}.
"""

from twisted.application.service import ServiceMaker

twistedmesh = ServiceMaker(
    "twistedmesh",
    "twistedmesh.tap",
    "A service proxy: the data plane of a service mesh",
    "twistedmesh",
)
