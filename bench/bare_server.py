"""
The floors a JSON-RPC call is measured against, each answering every POST with a fixed
JSON body on a Unix socket and on TCP:

- ``twisted-web``: a bare Twisted web resource on a stock :obj:`twisted.web.server.Site`
  (access log off), the framework floor;
- ``hero-http``: our own HTTP/1.1 protocol (:obj:`make_factory`) with a dispatcher that
  answers without parsing, i.e. the cost of our transport alone.

Usage: python bench/bare_server.py SOCKET_PATH [twisted-web|hero-http]
(prints ``listening on ...`` lines)
"""

import sys

from twisted.internet import reactor
from twisted.web import resource, server

from hero_compute.rpc.http_server import make_factory

BODY = (
    b'{"jsonrpc":"2.0","result":{"version":"0.1.0","uptime_s":1.0,'
    b'"listeners":[],"nodes":{"online":0,"offline":0}},"id":1}'
)


class Fixed(resource.Resource):
    """Reads the body (as the RPC resource does) and returns a fixed JSON response."""

    isLeaf = True

    def render_POST(self, request):
        request.content.seek(0)
        request.content.read()
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"%d" % len(BODY))
        return BODY


class FixedRpc:
    """Stands in for a :obj:`Dispatcher`: every body gets the same answer."""

    def answer(self, body, context):
        return BODY


def main():
    kind = sys.argv[2] if len(sys.argv) > 2 else "twisted-web"
    if kind == "twisted-web":
        site = server.Site(Fixed())
        site.log = lambda request: None
    elif kind == "hero-http":
        site = make_factory(FixedRpc())
    else:
        sys.exit(f"unknown floor {kind!r}: twisted-web or hero-http")
    u = reactor.listenUNIX(sys.argv[1], site)
    t = reactor.listenTCP(0, site, interface="127.0.0.1")
    print(f"listening on unix://{u.getHost().name}", flush=True)
    print(f"listening on tcp://127.0.0.1:{t.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
