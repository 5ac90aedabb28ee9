"""
The built-in filters, registered exactly the way a user's package registers its own: a module in
C{twisted/plugins/} holding instances that provide L{twisted.plugin.IPlugin} and a factory interface.
"""

from twistedmesh.filters.ext_authz import ExtAuthzFactory
from twistedmesh.filters.fault import FaultFactory
from twistedmesh.filters.headers import HeadersFactory
from twistedmesh.filters.health_check import HealthCheckFactory
from twistedmesh.filters.ratelimit import LocalRateLimitFactory
from twistedmesh.filters.ratelimit_global import GlobalRateLimitFactory
from twistedmesh.filters.rbac import RBACFactory, TCPRBACFactory
from twistedmesh.filters.router import RouterFactory
from twistedmesh.filters.tcp_fault import TCPFaultFactory
from twistedmesh.filters.tcp_ratelimit import TCPLocalRateLimitFactory
from twistedmesh.listener.tcp_proxy import TCPProxyFactory

tcpProxy = TCPProxyFactory()
router = RouterFactory()
headers = HeadersFactory()
localRateLimit = LocalRateLimitFactory()
globalRateLimit = GlobalRateLimitFactory()
fault = FaultFactory()
healthCheck = HealthCheckFactory()
tcpFault = TCPFaultFactory()
tcpLocalRateLimit = TCPLocalRateLimitFactory()
extAuthz = ExtAuthzFactory()
rbac = RBACFactory()
tcpRBAC = TCPRBACFactory()
