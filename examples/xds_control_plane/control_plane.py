"""
A small xDS control plane over REST-JSON: it serves endpoint discovery (EDS) to twistedmesh (or any client
that polls C{POST /v3/discovery:endpoints}) from a JSON file it re-reads on every request, and, given a
second file, cluster discovery (CDS, C{POST /v3/discovery:clusters}) from that one.

The endpoints file maps cluster names to their endpoints:

    {"api": [{"address": "127.0.0.1", "port": 9001},
             {"address": "127.0.0.1", "port": 9002, "weight": 3, "health": "DRAINING"}]}

The clusters file is a list of v3 C{Cluster} messages in proto3 JSON, served as they are:

    [{"name": "api", "type": "EDS", "lb_policy": "LEAST_REQUEST", "connect_timeout": "0.5s"}]

Run it with C{python control_plane.py endpoints.json --clusters clusters.json --port 18000}; edit a file and
the proxies polling it follow. The version of an answer is a digest of what it serves, so a proxy that
already has it gets a 304.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from typing import Any, Callable, Dict, List, Optional

from twisted.logger import Logger
from twisted.web import resource

EDS_TYPE_URL = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
CDS_TYPE_URL = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


def assignment(cluster: str, endpoints: List[Dict[str, Any]]) -> Dict[str, Any]:
    """
    The ClusterLoadAssignment (as an Any) of C{cluster}: one locality holding every endpoint.
    """
    lbEndpoints = []
    for e in endpoints:
        lbEndpoint: Dict[str, Any] = {
            "endpoint": {"address": {"socket_address": {"address": e["address"], "port_value": e["port"]}}},
            "load_balancing_weight": e.get("weight", 1),
        }
        if "health" in e:
            lbEndpoint["health_status"] = e["health"]
        lbEndpoints.append(lbEndpoint)
    return {"@type": EDS_TYPE_URL, "cluster_name": cluster, "endpoints": [{"lb_endpoints": lbEndpoints}]}


class EndpointsResource(resource.Resource):
    """
    C{POST /v3/discovery:endpoints}: the assignments of the requested clusters from C{load()} (cluster name
    to endpoint list); with C{clusters}, C{POST /v3/discovery:clusters} too: every cluster C{clusters()}
    lists. Each answer's version is a digest of it, and a client that has it already gets a 304.

    @ivar requests: the discovery requests received, both types, most recent last (ACKs, NACKs and their
        error details).
    """

    isLeaf = True
    log = Logger()

    def __init__(self, load: Callable[[], Dict[str, List[Dict[str, Any]]]],
                 clusters: Optional[Callable[[], List[Dict[str, Any]]]] = None) -> None:
        super().__init__()
        self.load = load
        self.clusters = clusters
        self.requests: List[Dict[str, Any]] = []
        self.nonce = 0

    def render_POST(self, request) -> bytes:
        if request.path == b"/v3/discovery:endpoints":
            typeURL = EDS_TYPE_URL
        elif request.path == b"/v3/discovery:clusters" and self.clusters is not None:
            typeURL = CDS_TYPE_URL
        else:
            request.setResponseCode(404)
            return b"not found\n"
        try:
            discovery = json.loads(request.content.read())
        except ValueError:
            request.setResponseCode(400)
            return b"not JSON\n"
        self.requests.append(discovery)
        if "error_detail" in discovery:
            self.log.warn("{node} rejected version {version}: {detail}", node=discovery.get("node", {}).get("id"),
                          version=discovery.get("version_info"), detail=discovery["error_detail"])
        if typeURL == CDS_TYPE_URL:
            # The state of the world: every cluster, whatever names were asked for.
            resources = [dict(cluster, **{"@type": CDS_TYPE_URL}) for cluster in self.clusters()]
        else:
            names = discovery.get("resource_names", [])
            table = self.load()
            resources = [assignment(name, table[name]) for name in names if name in table]
        version = hashlib.sha256(json.dumps(resources, sort_keys=True).encode()).hexdigest()[:12]
        if discovery.get("version_info") == version and "error_detail" not in discovery:
            request.setResponseCode(304)
            return b""
        self.nonce += 1
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"version_info": version, "resources": resources, "type_url": typeURL,
                           "nonce": str(self.nonce)}).encode()


def fileLoader(path: str) -> Callable[[], Any]:
    """
    Read C{path} on each request (a small file, and a control plane is no hot path).
    """

    def load() -> Any:
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    return load


def main(argv: List[str]) -> None:
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from twisted.web.server import Site

    parser = argparse.ArgumentParser(description="Serve EDS (and CDS) over REST-JSON from JSON files.")
    parser.add_argument("file", help="cluster name -> list of {address, port, weight?, health?}")
    parser.add_argument("--clusters", help="a JSON list of v3 Cluster messages: serve CDS too")
    parser.add_argument("--port", type=int, default=18000)
    parser.add_argument("--interface", default="127.0.0.1")
    args = parser.parse_args(argv)
    fileLoader(args.file)()  # fail now on a bad file, not at the first request
    clusters = None
    if args.clusters is not None:
        clusters = fileLoader(args.clusters)
        clusters()
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])
    site = Site(EndpointsResource(fileLoader(args.file), clusters))
    reactor.listenTCP(args.port, site, interface=args.interface)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
