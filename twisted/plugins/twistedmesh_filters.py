"""
The built-in filters, registered exactly the way a user's package registers its own: a module in
C{twisted/plugins/} holding instances that provide L{twisted.plugin.IPlugin} and a factory interface.
"""

from twistedmesh.filters.fault import FaultFactory
from twistedmesh.filters.headers import HeadersFactory
from twistedmesh.filters.health_check import HealthCheckFactory
from twistedmesh.filters.ratelimit import LocalRateLimitFactory
from twistedmesh.filters.router import RouterFactory
from twistedmesh.listener.tcp_proxy import TCPProxyFactory

tcpProxy = TCPProxyFactory()
router = RouterFactory()
headers = HeadersFactory()
localRateLimit = LocalRateLimitFactory()
fault = FaultFactory()
healthCheck = HealthCheckFactory()
