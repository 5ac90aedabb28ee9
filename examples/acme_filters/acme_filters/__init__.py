"""
ACME's HTTP filters for twistedmesh, shipped as their own package: an example of a third-party filter plugin.

The filters live in ordinary modules (L{acme_filters.apikey}); C{twisted/plugins/acme_filters_plugin.py}
instantiates their factories so that twistedmesh finds them with L{twisted.plugin.getPlugins}.
"""

from .apikey import ApiKeyFactory, ApiKeyFilter

__all__ = ["ApiKeyFactory", "ApiKeyFilter"]
