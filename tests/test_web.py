"""
The ``twisted.web`` adapter: a dispatcher served as a resource in a Twisted web site.
"""

import json

import pytest_twisted

from hero_compute.rpc.dispatch import Dispatcher
from hero_compute.rpc.web import RpcResource


@pytest_twisted.ensureDeferred
async def test_resource_in_a_twisted_web_site():
    """RpcResource serves a dispatcher as a twisted.web resource, for embedding: a
    call, a notification (204), and 405 for another verb."""
    from treq.testing import StubTreq
    from twisted.web.resource import Resource

    rpc = Dispatcher()
    rpc.register("echo", lambda value=None: value)
    root = Resource()
    root.putChild(b"rpc", RpcResource(rpc))
    treq = StubTreq(root)
    response = await treq.post(
        "http://example.invalid/rpc",
        data=json.dumps(
            {"jsonrpc": "2.0", "method": "echo", "params": ["hi"], "id": 1}
        ).encode(),
    )
    assert response.code == 200
    assert json.loads(await response.content()) == {
        "jsonrpc": "2.0",
        "result": "hi",
        "id": 1,
    }
    response = await treq.post(
        "http://example.invalid/rpc", data=b'{"jsonrpc":"2.0","method":"echo"}'
    )
    assert response.code == 204
    response = await treq.get("http://example.invalid/rpc")
    assert response.code == 405
    assert response.headers.getRawHeaders(b"allow") == [b"POST"]
