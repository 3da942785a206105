"""
The console's WebSocket over real loopback mutual TLS, from the attacker's side: who may
open it on a node follows the roles table (whoever may call ``vm.start``), and the
explorer's leg to a node refuses a peer whose certificate names another node before a
byte of the upgrade is sent.
"""

import re
import types

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS

from hero_compute.explorer.console import console_route
from hero_compute.explorer.proxy import Proxy
from hero_compute.rpc.addresses import parse_listen
from hero_compute.rpc.authz import NODE_POLICY
from hero_compute.rpc.dispatch import Dispatcher
from hero_compute.rpc.http_client import RpcClient
from hero_compute.rpc.http_server import make_factory
from hero_compute.rpc.listeners import Listeners
from hero_compute.rpc.tls import ClientTLS, Expected, ServerTLS, TLSMaterial
from hero_compute.rpc.websocket import HTTPRefusal, Route, Routes, UpgradeRequest
from hero_compute.rpc.websocket_client import connect

from .test_node_tls import cert_for


class Recorder:
    """A console route that records every accepted upgrade."""

    def __init__(self):
        self.accepted = []

    def accept(self, request):
        self.accepted.append(request.params)
        return self

    def opened(self, socket):
        socket.send(b"welcome")

    def received(self, data):
        pass

    def closed(self, code):
        pass


@pytest_twisted.async_yield_fixture
async def tls_node(fleet):
    """A TLS listener as node ``n1`` serving the console route: ``(port, recorder)``."""
    recorder = Recorder()
    factory = make_factory(Dispatcher())
    factory.trust_domain = fleet["authority"].trust_domain

    def authorize(context, route, params):
        NODE_POLICY.check_route(context.transport, context.identity, route, params)

    factory.upgrade = Routes(
        [Route("console", re.compile(r"/v1/vms/(?P<vm_id>\w+)/console"), recorder.accept)],
        authorize,
        65536,
    )
    listeners = Listeners(factory, [], reactor=reactor)
    listeners.add_tls(
        parse_listen("127.0.0.1:0"),
        ServerTLS(TLSMaterial(*cert_for(fleet, "node", "n1"), fleet["ca"])),
        reactor,
    )
    listeners.startService()
    port = int(listeners.bound[0].rsplit(":", 1)[1])
    yield port, recorder
    await listeners.stopService()


async def open_as(fleet, port, who):
    """Open the console of VM ``v`` on the node as ``role/name`` (None: no cert)."""
    cert, key = (None, None) if who is None else cert_for(fleet, *who.split("/"))
    creator = ClientTLS(TLSMaterial(cert, key, fleet["ca"]), Expected("node", "n1"))
    endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
    return await connect(
        endpoint, "127.0.0.1", "/v1/vms/v/console", Recorder(), 65536, 5, reactor
    )


@pytest_twisted.ensureDeferred
async def test_who_may_open_a_node_console(fleet, tls_node):
    """node/* certificates and TLS peers without one are refused (403) before the route
    is asked; client/* and explorer/* open it."""
    port, recorder = tls_node
    for who in ("node/other", None):
        with pytest.raises(HTTPRefusal) as refused:
            await open_as(fleet, port, who)
        assert refused.value.status == 403
    assert recorder.accepted == []
    for who in ("client/ops", "explorer/e1"):
        socket = await open_as(fleet, port, who)
        socket.close()
    assert recorder.accepted == [{"vm_id": "v"}, {"vm_id": "v"}]


@pytest_twisted.ensureDeferred
async def test_explorer_leg_checks_the_node_identity(fleet, tls_node):
    """The explorer's console leg to a node registered as ``a`` at an address where
    ``n1`` answers fails with 502 and sends nothing; to ``n1`` there it opens."""
    port, recorder = tls_node
    records = {
        node_id: types.SimpleNamespace(
            socket_path=f"tls://127.0.0.1:{port}", remote=False, last_seen=0
        )
        for node_id in ("a", "n1")
    }
    registry = types.SimpleNamespace(get=records.__getitem__, status=lambda r: "online")
    material = TLSMaterial(*fleet["e1"], fleet["ca"])
    client = RpcClient(reactor, tls=ClientTLS(material, Expected("node")))
    proxy = Proxy(client, registry, 5, resolve=None)
    route = console_route(proxy, reactor, 5, 65536)
    try:
        with pytest.raises(HTTPRefusal) as refused:
            await route.accept(
                UpgradeRequest("console", {"node_id": "a", "vm_id": "v"}, None)
            )
        assert refused.value.status == 502
        assert recorder.accepted == []
        relay_side = await route.accept(
            UpgradeRequest("console", {"node_id": "n1", "vm_id": "v"}, None)
        )
        assert recorder.accepted == [{"vm_id": "v"}]
        relay_side._relay.node.socket.close()
    finally:
        await client.close()
