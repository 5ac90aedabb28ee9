"""
Registers ACME's filters with twistedmesh: Twisted's plugin system imports this module (from any
C{twisted/plugins/} directory on C{sys.path}) and offers every object in it that provides
L{twisted.plugin.IPlugin}; twistedmesh keeps those that provide its factory interfaces.

Keep this module tiny: it is imported whenever plugins are scanned. There is no C{__init__.py} next to it.
"""

from acme_filters.apikey import ApiKeyFactory

apiKey = ApiKeyFactory()
