"""
The factory of a C{protocol = http} listener: an HTTP connection manager per accepted connection.
"""

from __future__ import annotations

from twisted.internet.interfaces import IAddress

from ..http.server import HTTPConnection, HTTPSettings, HTTPStats
from ..observability.stats import StatsStore
from .tcp import ListenerFactory


class HTTPListenerFactory(ListenerFactory):
    """
    Builds the L{HTTPConnection}s of one C{protocol = http} listener; C{http.<name>.*} stats are shared by
    all of them.
    """

    def __init__(self, settings: HTTPSettings, stats: StatsStore) -> None:
        super().__init__(settings.name, stats)
        self.settings = settings
        self.httpStats = HTTPStats(stats.scope("http", settings.name))

    def buildProtocol(self, addr: IAddress) -> HTTPConnection:
        """
        A new connection manager.
        """
        conn = HTTPConnection(self.settings, self.httpStats)
        conn.factory = self
        return conn
