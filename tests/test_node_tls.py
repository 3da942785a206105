"""
The node's side of CONTRACT §6 against a small fake explorer over real loopback TLS:
enrollment with a join token and a CA pin, heartbeats over TLS with the node secret,
renewal on an injected clock, SIGHUP reload, and who may call the node over TLS.
"""

import datetime
import os
import signal
import stat
import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock

from hero_compute import pki
from hero_compute.node.enroll import TLSFiles, renewal_due
from hero_compute.node.service import make_node
from hero_compute.rpc.addresses import parse_address, parse_listen
from hero_compute.rpc.dispatch import Dispatcher
from hero_compute.rpc.errors import RefusedByPolicy, RpcError
from hero_compute.rpc.http_client import RpcClient
from hero_compute.rpc.http_server import make_factory
from hero_compute.rpc.listeners import Listeners
from hero_compute.rpc.tls import (
    ClientTLS,
    Expected,
    ServerTLS,
    TLSMaterial,
)
from hero_compute.rpc.tls_enroll import fetch_peer_chain

from .fakes import MemoryVmManager
from .support import Twistd
from .support import until as support_until

TOKEN = "join-me"
WAIT = 15.0


def cert_for(fleet, role, name):
    """A certificate and key of the fleet: ``(cert path, key path)``."""
    return pki.create_cert(
        fleet["ca_dir"],
        role,
        name,
        out=os.path.join(fleet["dir"], f"{role}-{name}"),
        force=True,
    )


class FakeExplorer:
    """
    Just enough of an explorer over TLS: enroll (a day-old certificate for 3 days, so
    renewal is due in a day), renew, heartbeat, leave; every handled call is recorded.
    """

    def __init__(self, fleet):
        self.authority = fleet["authority"]
        self.calls = []
        rpc = Dispatcher()
        rpc.register("explorer.enroll", self.enroll, context=True)
        rpc.register("explorer.renew", self.renew, context=True)
        rpc.register("explorer.heartbeat", self.heartbeat, context=True)
        rpc.register("explorer.leave", self.leave, context=True)
        factory = make_factory(rpc)
        factory.trust_domain = self.authority.trust_domain
        cert, key = fleet["e1"]
        self.listeners = Listeners(factory, [], reactor=reactor)
        self.listeners.add_tls(
            parse_listen("127.0.0.1:0"),
            ServerTLS(TLSMaterial(cert, key, fleet["ca"])),
            reactor,
        )
        self.listeners.startService()
        self.uri = self.listeners.bound[0]

    def of(self, method):
        """The recorded ``(context, params)`` of one method."""
        return [(c, p) for m, c, p in self.calls if m == method]

    def enroll(self, context, token, csr):
        self.calls.append(("explorer.enroll", context, {"token": token, "csr": csr}))
        if token != TOKEN:
            raise RefusedByPolicy("unknown token")
        then = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
        cert = self.authority.sign_csr(csr, "node", "n1", days=3, now=then)
        return {
            "certificate": pki.dump_certificate(cert).decode(),
            "ca": pki.dump_certificate(self.authority.certificate).decode(),
        }

    def renew(self, context, csr):
        self.calls.append(("explorer.renew", context, {"csr": csr}))
        cert = self.authority.sign_csr(csr, "node", context.identity.name, days=3)
        return {"certificate": pki.dump_certificate(cert).decode()}

    def heartbeat(
        self,
        context,
        node_id,
        socket_path,
        name=None,
        version=None,
        capacity=None,
        usage=None,
        vm_count=None,
        labels=None,
        secret=None,
    ):
        self.calls.append(
            (
                "explorer.heartbeat",
                context,
                {"node_id": node_id, "socket_path": socket_path, "secret": secret},
            )
        )
        return {"accepted": True, "next_heartbeat": 10}

    def leave(self, context, node_id, secret=None):
        self.calls.append(
            ("explorer.leave", context, {"node_id": node_id, "secret": secret})
        )
        return True


@pytest.fixture
def explorer(fleet):
    """A running :class:`FakeExplorer`, stopped at the end."""
    fake = FakeExplorer(fleet)
    yield fake
    pytest_twisted.blockon(fake.listeners.stopService())


@pytest.fixture
def running(short_tmp):
    """``running(node)`` starts a node; whatever a test leaves running is stopped."""
    nodes = []

    def start(node):
        nodes.append(node)
        node.startService()
        return node

    yield start
    for node in nodes:
        if node.running:
            pytest_twisted.blockon(node.stopService())


async def until(predicate, what, timeout=WAIT):
    """Poll ``predicate`` without blocking the reactor; return its value."""
    return await support_until(predicate, timeout=timeout, interval=0.02, what=what)


def node_of(fleet, explorers, clock=reactor, stops=None, interval=0.5, **kwargs):
    """A node n1 in the fleet's tmp dir with a TLS listener on 127.0.0.1:0."""
    state = os.path.join(fleet["dir"], "state")
    return make_node(
        reactor=reactor,
        clock=clock,
        socket_path=os.path.join(fleet["dir"], "n.sock"),
        tcp=None,
        listen=[],
        explorers=[parse_address(u) for u in explorers],
        vms=MemoryVmManager(clock),
        state_dir=state,
        interval=interval,
        node_id="n1",
        name="one",
        tls=parse_listen("127.0.0.1:0"),
        stop=(lambda: stops.append("stopped")) if stops is not None else None,
        **kwargs,
    )


def tls_port(node):
    """The bound port of the node's TLS listener."""
    return next(
        int(u.rsplit(":", 1)[1]) for u in node.listeners.bound if u.startswith("tls://")
    )


def mode(path):
    """The permission bits of a file."""
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest_twisted.ensureDeferred
async def test_enrolls_then_heartbeats_over_tls_with_its_secret(fleet, explorer, running):
    """With a token and the right pin the node enrolls, stores its files 0600, heartbeats
    over TLS as node/n1 with its secret and a tls:// address, and leaves with it too."""
    node = running(node_of(fleet, [explorer.uri], join_token=TOKEN, ca_pin=fleet["pin"]))
    beats = await until(lambda: explorer.of("explorer.heartbeat"), "a TLS heartbeat")
    files = TLSFiles.in_state_dir(os.path.join(fleet["dir"], "state"))
    assert mode(files.cert) == 0o600 and mode(files.key) == 0o600
    assert pki.spki_pin(pki.load_certificate(files.ca)) == fleet["pin"]
    [(context, params)] = explorer.of("explorer.enroll")
    assert context.transport == "tls" and context.identity is None
    assert params["token"] == TOKEN
    context, params = beats[0]
    assert context.transport == "tls" and str(context.identity).endswith("/node/n1")
    secret = open(os.path.join(fleet["dir"], "state", "node_secret")).read().strip()
    assert params["secret"] == secret
    assert params["socket_path"] == f"tls://127.0.0.1:{tls_port(node)}"
    # A goodbye goes only to explorers whose heartbeats are known to be accepted.
    await until(lambda: node.heartbeats[0].state.state == "ok", "the answer")
    await node.stopService()
    [(_, params)] = explorer.of("explorer.leave")
    assert params == {"node_id": "n1", "secret": secret}

    again = running(node_of(fleet, [explorer.uri]))
    await until(
        lambda: len(explorer.of("explorer.heartbeat")) > len(beats) + 1,
        "heartbeats without a token",
    )
    assert len(explorer.of("explorer.enroll")) == 1
    await again.stopService()


@pytest_twisted.ensureDeferred
async def test_wrong_pin_sends_nothing_and_stops(fleet, explorer, running, logged_errors):
    """With the pin of another CA the node sends the explorer nothing (no handler runs),
    writes no certificate, says why, and stops."""
    other = pki.create_ca(os.path.join(fleet["dir"], "other"))
    stops = []
    node = running(
        node_of(fleet, [explorer.uri], stops=stops, join_token=TOKEN, ca_pin=other)
    )
    await until(lambda: stops, "the node to stop")
    assert explorer.calls == []
    files = TLSFiles.in_state_dir(os.path.join(fleet["dir"], "state"))
    assert not os.path.exists(files.cert)
    [event] = logged_errors.flush()
    assert other in event["reason"] and "token was not sent" in event["reason"]
    await node.stopService()


@pytest_twisted.ensureDeferred
async def test_renewal_at_two_thirds_reloads_the_listener(fleet, explorer, running):
    """On an injected clock the renewal is due at two thirds of the certificate's life,
    not before; it renews with a new key, rewrites the files and the listener serves the
    new certificate to a new connection; the next one follows the new certificate."""
    clock = Clock()
    clock.advance(time.time())
    node = running(
        node_of(
            fleet,
            [explorer.uri],
            clock=clock,
            interval=1e6,
            join_token=TOKEN,
            ca_pin=fleet["pin"],
        )
    )
    await until(lambda: node.tls.credentials is not None, "enrollment")
    first = node.tls.credentials.certificate
    files = TLSFiles.in_state_dir(os.path.join(fleet["dir"], "state"))
    first_key = open(files.key).read()
    due = renewal_due(first)
    assert due - clock.seconds() == pytest.approx(86400 - 100, abs=60)
    assert due in [c.getTime() for c in clock.getDelayedCalls()]

    clock.advance(due - clock.seconds() - 1)
    # Only the renewal timer starts a renewal: still pending, nothing was sent.
    assert due in [c.getTime() for c in clock.getDelayedCalls()]
    assert explorer.of("explorer.renew") == []
    clock.advance(1)
    await until(lambda: node.tls.credentials.certificate != first, "the renewal")
    [(context, _)] = explorer.of("explorer.renew")
    assert context.transport == "tls" and str(context.identity).endswith("/node/n1")
    renewed = node.tls.credentials.certificate
    assert pki.load_certificate(files.cert) == renewed
    assert open(files.key).read() != first_key and mode(files.key) == 0o600
    chain = await fetch_peer_chain(reactor, "127.0.0.1", tls_port(node))
    assert chain[0].serial_number == renewed.serial_number
    assert renewal_due(renewed) in [c.getTime() for c in clock.getDelayedCalls()]
    await node.stopService()
    assert renewal_due(renewed) not in [c.getTime() for c in clock.getDelayedCalls()]


async def call_as(node, fleet, who, method):
    """Call the node over its TLS listener as ``role/name`` (None: no certificate)."""
    if who is None:
        material = TLSMaterial(None, None, fleet["ca"])
    else:
        material = TLSMaterial(*cert_for(fleet, *who.split("/")), fleet["ca"])
    client = RpcClient(reactor, tls=ClientTLS(material, Expected("node", "n1")))
    try:
        return await client.call(f"tls://127.0.0.1:{tls_port(node)}", method)
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_roles_over_the_tls_listener(fleet, running):
    """Over the node's TLS listener client/* and explorer/* may call vm.list; node/*
    and a client without a certificate get -32010, though the latter may discover."""
    files = TLSFiles(*cert_for(fleet, "node", "n1"), fleet["ca"])
    node = running(node_of(fleet, [], tls_files=files))
    assert await call_as(node, fleet, "client/x", "vm.list") == []
    assert await call_as(node, fleet, "explorer/e1", "vm.list") == []
    for who in ("node/other", None):
        with pytest.raises(RpcError) as e:
            await call_as(node, fleet, who, "vm.list")
        assert e.value.code == -32010
    discover = await call_as(node, fleet, None, "rpc.discover")
    assert "vm.list" in {m["name"] for m in discover["methods"]}
    await node.stopService()


def start_node(fleet, explorer, **env):
    """A real ``twistd -n node`` enrolling with the fake explorer."""
    return Twistd(
        ["node"],
        env={
            "HERO_SOCKET_DIR": os.path.join(fleet["dir"], "s"),
            "HERO_STATE_DIR": os.path.join(fleet["dir"], "st"),
            "NODE_ID": "n1",
            "EXPLORER_ADDRESSES": explorer.uri,
            "NODE_TLS_ADDR": "127.0.0.1:0",
            "HEARTBEAT_INTERVAL": "0.3",
            "NODE_JOIN_TOKEN": TOKEN,
            **env,
        },
    )


@pytest_twisted.ensureDeferred
async def test_real_node_enrolls_heartbeats_and_reloads_on_sighup(fleet, explorer):
    """A twistd node enrolls, heartbeats over TLS from its listener's address, and on
    SIGHUP serves the certificate files put in place of its own."""
    node = start_node(fleet, explorer, NODE_CA_PIN=fleet["pin"])
    try:
        await until(lambda: explorer.of("explorer.heartbeat"), "a heartbeat")
        uri = await until(
            lambda: [
                line.split()[-1] for line in node.lines if "listening on tls://" in line
            ],
            "the TLS listener",
        )
        context, params = explorer.of("explorer.heartbeat")[0]
        assert params["socket_path"] == uri[0]
        assert str(context.identity).endswith("/node/n1") and params["secret"]
        tls_dir = os.path.join(fleet["dir"], "st", "tls")
        assert mode(f"{tls_dir}/node.pem") == mode(f"{tls_dir}/node-key.pem") == 0o600

        pki.create_cert(fleet["ca_dir"], "node", "n1", out=f"{tls_dir}/node", force=True)
        fresh = pki.load_certificate(f"{tls_dir}/node.pem")
        node.signal(signal.SIGHUP)
        await until(lambda: "SIGHUP: TLS material reloaded" in node.output, "the reload")
        port = int(uri[0].rsplit(":", 1)[1])
        chain = await fetch_peer_chain(reactor, "127.0.0.1", port)
        assert chain[0].serial_number == fresh.serial_number
    finally:
        node.stop()
    assert "Traceback" not in node.output


@pytest_twisted.ensureDeferred
async def test_real_node_with_a_wrong_pin_exits_saying_why(fleet, explorer):
    """A twistd node given a wrong pin exits, says the pin is wrong, sends nothing."""
    node = start_node(fleet, explorer, NODE_CA_PIN="sha256:" + "0" * 64)
    try:
        await until(lambda: node.process.poll() is not None, "the node to exit")
    finally:
        node.stop()
    assert "enrollment refused" in node.output and "NODE_CA_PIN" in node.output
    assert explorer.calls == []
