"""
The framework floor: a bare Twisted web resource answering every POST with a fixed
JSON body, served by the same L{make_site} (channel, request class, idle timeout, no
access log) as the explorer, on a Unix socket and on TCP.

Usage: python bench/bare_server.py SOCKET_PATH  (prints C{listening on ...} lines)
"""

import sys

from twisted.internet import reactor
from twisted.web import resource

from hero_compute.rpc.server import make_site

BODY = (b'{"jsonrpc":"2.0","result":{"version":"0.1.0","uptime_s":1.0,'
        b'"listeners":[],"nodes":{"online":0,"offline":0}},"id":1}')


class Fixed(resource.Resource):
    """Reads the body (as the RPC resource does) and returns a fixed JSON response."""

    isLeaf = True

    def render_POST(self, request):
        request.content.seek(0)
        request.content.read()
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"%d" % len(BODY))
        return BODY


def main():
    site = make_site(Fixed())
    u = reactor.listenUNIX(sys.argv[1], site)
    t = reactor.listenTCP(0, site, interface="127.0.0.1")
    print(f"listening on unix://{u.getHost().name}", flush=True)
    print(f"listening on tcp://127.0.0.1:{t.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
