"""
The admin web interface (Envoy's admin paths on C{twisted.web}); see L{twistedmesh.admin.resource}.
"""

from .resource import AdminResource, AdminServer, AdminSite, makeAdminSite, redact, redactEndpoint

__all__ = ["AdminResource", "AdminServer", "AdminSite", "makeAdminSite", "redact", "redactEndpoint"]
