"""
Every contract between twistedmesh's rooms, as zope interfaces.

The docstrings here are the specification: an implementation that disagrees with them is wrong. Plugins
(filters, load balancers, ...) are found with L{twisted.plugin.getPlugins} on the factory interfaces, so a
user's package extends the proxy by shipping a module in its own C{twisted/plugins/} directory.
"""

from zope.interface import Attribute, Interface


class INetworkConnection(Interface):
    """
    One downstream connection on a C{protocol = tcp} listener, as a network filter sees it. Each filter
    gets its own handle (so that C{write} knows where in the chain it comes from); the handle is also an
    L{twisted.internet.interfaces.IPushProducer} for the downstream's reading.
    """

    listener = Attribute("The listener's name (C{str}).")
    transport = Attribute("The downstream L{twisted.internet.interfaces.ITCPTransport}.")
    clock = Attribute("The L{twisted.internet.interfaces.IReactorTime} the proxy runs on.")
    state = Attribute(
        "A C{dict} private to this connection where filters may keep per-connection state; "
        "keys should be the filter's name."
    )

    def write(data: bytes) -> None:
        """
        Send C{data} towards the downstream peer, through the C{dataWritten} hooks of the filters that come
        before the caller in the chain (last to first).
        """

    def close(reason: str = "") -> object:
        """
        Close the downstream connection (and so the upstream one, if any).

        @param reason: a short cause for logs, such as C{"rbac_access_denied"}.
        @return: L{twistedmesh.listener.chain.STOP}: a filter hook returns it to end the chain.
        """


class INetworkFilter(Interface):
    """
    An L4 filter: sees the bytes of one downstream connection.

    Each hook returns C{None} to continue with the next filter (passing data on unchanged), C{bytes} (data
    hooks only) to pass a replacement on, a L{twisted.internet.defer.Deferred} to pause the chain (and the
    connection's reading) until it fires with one of these, or L{twistedmesh.listener.chain.STOP} (what
    L{INetworkConnection.close} returns) to end the chain.
    """

    def connectionMade(conn: INetworkConnection) -> object:
        """
        A downstream connection was accepted. Called first to last.
        """

    def dataReceived(conn: INetworkConnection, data: bytes) -> object:
        """
        C{data} arrived from the downstream peer. Called first to last.
        """

    def dataWritten(conn: INetworkConnection, data: bytes) -> object:
        """
        C{data} is about to be written to the downstream peer. Called last to first. A C{Deferred} is not
        allowed here (the upstream is paused by backpressure instead); return C{None} or C{bytes}.
        """

    def readConnectionLost(conn: INetworkConnection) -> None:
        """
        Optional (L{twistedmesh.listener.chain.NetworkFilter} provides a default): the downstream peer
        half-closed its side (sent FIN) and will send no more data. If no filter in the chain defines it,
        a FIN closes the connection.
        """

    def connectionLost(conn: INetworkConnection, reason: object) -> None:
        """
        The downstream connection is gone (C{reason} is a L{twisted.python.failure.Failure}). Called once
        per filter whatever happened, for stats and cleanup; the return value is ignored.
        """


class IFilterContext(Interface):
    """
    What a filter factory may use while it configures itself: narrow handles, never the whole service.
    """

    reactor = Attribute("The reactor: L{IReactorTime} and friends. Tests pass a L{Clock}-based one.")
    stats = Attribute("The L{twistedmesh.observability.stats.StatsStore}.")
    random = Attribute("A L{random.Random}, seeded in tests.")
    clusters = Attribute("A mapping from cluster name to L{twistedmesh.upstream.cluster.Cluster}. It is live: "
                         "a reload or a CDS update changes it in place, so look a cluster up when a stream "
                         "or connection starts rather than keeping one from configure().")
    listener = Attribute("The listener config the filter is built for.")
    routes = Attribute(
        "The listener's compiled route table (L{twistedmesh.http.routes.RouteTable}; C{match(stream)} "
        "gives the route a request would take), or C{None} for TCP listeners."
    )


class INetworkFilterFactory(Interface):
    """
    A plugin that makes network filters. Provide L{twisted.plugin.IPlugin} too so that
    L{twisted.plugin.getPlugins} finds it.
    """

    name = Attribute("The plugin's name (C{str}), which C{type =} in a C{[filter:NAME]} section names.")

    def configure(options, context: IFilterContext):
        """
        Validate C{options} (a L{twistedmesh.config.Options}: the keys of the filter's config section) once,
        at config load.

        @return: a callable taking an L{INetworkConnection} and returning an L{INetworkFilter} for it.
        @raise twistedmesh.config.ConfigError: when an option is missing or invalid.
        """


class IHTTPFilter(Interface):
    """
    An HTTP filter: sees one stream (L{twistedmesh.http.stream.Stream}) whatever protocol it came over.
    Subclass L{twistedmesh.http.stream.HTTPFilter}, which passes everything through, and override the hooks
    you need.

    Request hooks run first to last, response hooks last to first. Each returns:
      - C{None}: go on (data hooks: pass the chunk on unchanged);
      - C{bytes} (data hooks only): pass this replacement chunk on;
      - a L{twisted.internet.defer.Deferred}: pause this direction until it fires with one of these (later
        events wait in order; the client is not read meanwhile);
      - C{stream.respond(status, body, headers)} (request hooks): stop and answer from the proxy; the reply
        runs through the response hooks of the filters before this one (to a gRPC request it is sent
        as a gRPC trailers-only reply; C{grpcStatus=} picks the gRPC status).
    A hook that raises, or whose Deferred fails, is answered with a 500 (or a reset, once the response
    has started) and logged.
    """

    def requestHeaders(stream) -> object:
        """
        The request head: C{stream.method}, C{stream.path}, C{stream.authority}, C{stream.requestHeaders}
        (ordered C{(name, value)} byte pairs, lowercase names), all changeable in place.
        """

    def requestData(stream, data: bytes, end: bool) -> object:
        """
        A chunk of request body; C{end} says it is the last (C{data} may then be empty).
        """

    def requestTrailers(stream, trailers) -> object:
        """
        The request ends with C{trailers} (a list of pairs, changeable in place).
        """

    def responseHeaders(stream) -> object:
        """
        The response head: C{stream.status} and C{stream.responseHeaders}, changeable in place.
        """

    def responseData(stream, data: bytes, end: bool) -> object:
        """
        A chunk of response body.
        """

    def responseTrailers(stream, trailers) -> object:
        """
        The response ends with C{trailers}.
        """

    def streamComplete(stream) -> None:
        """
        The exchange is over (answered, reset, or the client went away; C{stream.responseFlags} and
        C{stream.responseCodeDetails} say how). Called exactly once per stream, for every filter.
        """


class IHTTPFilterFactory(Interface):
    """
    A plugin that makes HTTP filters (see DESIGN.md section 3). Provide L{twisted.plugin.IPlugin} too.
    """

    name = Attribute("The plugin's name (C{str}), which C{type =} in a C{[filter:NAME]} section names.")

    def configure(options, context: IFilterContext):
        """
        Validate C{options} once, at config load.

        @return: a callable taking a stream and returning an L{IHTTPFilter} for it (a new one, or one
            shared stateless instance). If the callable has a C{close} attribute, the service calls it
            (with no arguments; it may return a Deferred) when it stops: the place to close connections a
            filter keeps (to a rate-limit or authorization service, say).
        @raise twistedmesh.config.ConfigError: when an option is missing or invalid.
        """


class ILoadBalancer(Interface):
    """
    Picks a host of a cluster for each new upstream connection or request. Constructed as
    C{Policy(hosts, random, config, panic=counter)}: the cluster's hosts, a L{random.Random}, a
    L{twistedmesh.config.lb.LBConfig} and a counter (anything with an integer C{value}) counting picks made
    in panic mode. See docs/load-balancing.md.
    """

    panic = Attribute("The counter of picks made in panic mode (the cluster's C{lb_healthy_panic}).")
    inPanic = Attribute("Whether the last L{rebuild} found fewer healthy hosts than the panic threshold.")

    def pick(exclude=None, hashKey=None):
        """
        Choose a host. Never picks an unhealthy host outside panic mode. Called per request: no I/O.

        @param exclude: a host not to pick when another is usable (the one that just failed, for a
            retry), or C{None}. It is returned when it is the only usable host.
        @param hashKey: C{bytes} the hashing policies (C{ring_hash}, C{maglev}) map to a host, or C{None}
            (then a random key); the other policies ignore it.
        @return: a L{twistedmesh.upstream.cluster.Host}, or C{None} when no host is healthy.
        """

    def rebuild(hosts=None):
        """
        Take a new snapshot of the hosts' health (and panic mode), after any host's C{healthy} or C{weight}
        changed; with C{hosts}, a new membership. Cheap unless membership or weights changed (then rings
        and tables are rebuilt).
        """
