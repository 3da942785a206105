"""
The proxy in memory: calls in flight bounded per node and in all, addresses of nodes on
other hosts checked after resolution, and a resolver that slow names cannot starve.
"""

import threading

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from hero_compute.explorer.proxy import Proxy, forbidden_target
from hero_compute.explorer.records import Heartbeat
from hero_compute.explorer.registry import Registry
from hero_compute.explorer.resolver import CachingResolver, ResolveError
from hero_compute.rpc.addresses import parse_address
from hero_compute.rpc.errors import (
    ConnectionRefused,
    InvalidParams,
    NodeUnreachable,
    RefusedByPolicy,
    ResponseTooLarge,
    VmNotFound,
)

from .support import failure_result_of, success_result_of


class HeldClient:
    """An RpcClient whose calls wait until the test answers them."""

    def __init__(self):
        self.calls = []

    def call(self, address, method, params=None, timeout=None, expect=None):
        d = defer.Deferred()
        self.calls.append((address, method, d))
        return d


def registry_with(clock, *nodes):
    """A registry with these (node id, address, remote) nodes online."""
    registry = Registry(clock, 30)
    for node_id, address, remote in nodes:
        registry.heartbeat(
            Heartbeat(
                node_id=node_id,
                socket_path=address,
                transport="tcp",
                name=node_id,
                version="1",
                capacity={},
                usage={},
                vm_count=0,
                labels={},
                remote=remote,
            )
        )
    return registry


def never(host, port):
    """A resolver that must not be asked."""
    raise AssertionError("resolved")


def test_calls_in_flight_are_bounded_per_node_and_in_all():
    """Past the per-node or total limit a call is -32003 busy at once, without a
    connection; as calls finish, room comes back."""
    clock = Clock()
    registry = registry_with(
        clock, ("a", "tcp://192.0.2.1:1", False), ("b", "tcp://192.0.2.2:1", False)
    )
    client = HeldClient()
    proxy = Proxy(client, registry, 5, never, calls_per_node=2, calls_total=3)
    held = [proxy.call("a", "vm.list"), proxy.call("a", "vm.list")]
    with pytest.raises(NodeUnreachable, match="busy"):
        proxy.call("a", "vm.list")
    held.append(proxy.call("b", "vm.list"))
    with pytest.raises(NodeUnreachable, match="in all"):
        proxy.call("b", "vm.list")
    assert len(client.calls) == 3 and proxy.busy == 2
    client.calls[0][2].callback("ok")
    assert success_result_of(held[0]) == "ok"
    proxy.call("a", "vm.list")
    assert len(client.calls) == 4 and proxy.total == 3


def test_busy_refusals_are_logged_rate_limited():
    """A busy refusal is logged at once, the next ones within 10 s only counted, and
    the count said in the first line after them (CONTRACT §7)."""
    clock = Clock()
    registry = registry_with(clock, ("a", "tcp://192.0.2.1:1", False))
    proxy = Proxy(HeldClient(), registry, 5, never, calls_per_node=1)
    proxy.call("a", "vm.list")
    with capturedLogs() as events:
        for _ in range(4):
            with pytest.raises(NodeUnreachable, match="busy"):
                proxy.call("a", "vm.list")
        clock.advance(10)
        with pytest.raises(NodeUnreachable, match="busy"):
            proxy.call("a", "vm.list")
    lines = [formatEvent(e) for e in events if "calls_in_flight" in e["log_format"]]
    assert lines == [
        "refused (calls_in_flight) a call to node a: busy",
        "refused (calls_in_flight) a call to node a: busy "
        "(and 3 more since the last such line)",
    ]
    assert proxy.busy == 5


def test_replies_too_large_are_logged_rate_limited():
    """A node's reply over the client's limit is -32003 and logged at once naming the
    node, the next ones within 10 s only counted and said in the first line after
    (CONTRACT §7); other transport failures are not such lines; each is counted."""
    clock = Clock()
    registry = registry_with(clock, ("a", "tcp://192.0.2.1:1", False))
    client = HeldClient()
    proxy = Proxy(client, registry, 5, never)
    address = parse_address("tcp://192.0.2.1:1")

    def fail(error):
        d = proxy.call("a", "vm.list")
        client.calls[-1][2].errback(error)
        return failure_result_of(d, NodeUnreachable).value

    with capturedLogs() as events:
        assert "larger than 4096 bytes" in str(fail(ResponseTooLarge(address, 4096)))
        for _ in range(3):
            fail(ResponseTooLarge(address, 4096))
        fail(ConnectionRefused(address, "cannot connect: no"))
        clock.advance(10)
        fail(ResponseTooLarge(address, 4096))
    lines = [formatEvent(e) for e in events if "max_reply" in e["log_format"]]
    assert lines == [
        "refused (max_reply) the reply of node a at tcp://192.0.2.1:1: over 4096 bytes",
        "refused (max_reply) the reply of node a at tcp://192.0.2.1:1: over 4096 bytes "
        "(and 3 more since the last such line)",
    ]
    assert proxy.too_large == 5 and proxy.total == 0


def test_outcomes_pass_through_and_free_their_room():
    """A node's result and its JSON-RPC error come back unchanged, a transport failure
    is -32003 naming the node and why, and every outcome frees its place."""
    clock = Clock()
    registry = registry_with(clock, ("a", "unix:///run/a.sock", False))
    client = HeldClient()
    proxy = Proxy(client, registry, 5, never, calls_per_node=3)
    calls = [proxy.call("a", "vm.get", {"vm_id": "x"}) for _ in range(3)]
    assert proxy.in_flight["a"] == 3 and proxy.total == 3
    client.calls[0][2].callback({"vm_id": "x"})
    client.calls[1][2].errback(VmNotFound("no VM x"))
    client.calls[2][2].errback(
        ConnectionRefused(parse_address("unix:///run/a.sock"), "cannot connect: no")
    )
    assert success_result_of(calls[0]) == {"vm_id": "x"}
    assert failure_result_of(calls[1], VmNotFound).value.message == "no VM x"
    unreachable = failure_result_of(calls[2], NodeUnreachable).value
    assert "node a at unix:///run/a.sock is unreachable: cannot connect: no" in str(
        unreachable
    )
    assert proxy.total == 0 and not proxy.in_flight


def test_remote_node_on_a_forbidden_literal_takes_no_room():
    """A node on another host advertising a loopback literal is -32010 at once:
    nothing is connected and nothing is counted in flight."""
    clock = Clock()
    registry = registry_with(clock, ("a", "tcp://127.0.0.1:6379", True))
    client = HeldClient()
    proxy = Proxy(client, registry, 5, never)
    failure = failure_result_of(proxy.call("a", "vm.list"), RefusedByPolicy)
    assert "loopback" in str(failure.value)
    assert client.calls == [] and proxy.total == 0 and not proxy.in_flight


@pytest.mark.parametrize(
    "resolved",
    [["127.0.0.1"], ["192.0.2.5", "::1"], ["169.254.169.254"], ["::ffff:127.0.0.1"]],
)
def test_remote_node_names_are_checked_after_resolution(resolved):
    """A node registered from another host whose name resolves to this host's own
    addresses is refused (-32010) and nothing is connected."""
    clock = Clock()
    registry = registry_with(clock, ("a", "tcp://sneaky.example:6379", True))
    client = HeldClient()
    proxy = Proxy(client, registry, 5, lambda host, port: defer.succeed(resolved))
    failure = failure_result_of(proxy.call("a", "vm.list"), RefusedByPolicy)
    assert "sneaky.example" in str(failure.value)
    assert client.calls == [] and proxy.total == 0


def test_checked_address_is_the_one_connected_to():
    """The proxy connects to the address it checked, not to the name again."""
    clock = Clock()
    registry = registry_with(clock, ("a", "tls://node.example:9444", True))
    client = HeldClient()
    proxy = Proxy(client, registry, 5, lambda host, port: defer.succeed(["192.0.2.7"]))
    proxy.call("a", "vm.list")
    assert client.calls[0][0].uri == "tls://192.0.2.7:9444"


def test_local_nodes_may_use_loopback():
    """A node registered from this host may be reached on loopback."""
    clock = Clock()
    registry = registry_with(clock, ("a", "tcp://127.0.0.1:7000", False))
    client = HeldClient()
    Proxy(client, registry, 5, never).call("a", "vm.list")
    assert client.calls[0][0].uri == "tcp://127.0.0.1:7000"


@pytest.mark.parametrize(
    "host, bad",
    [
        ("127.0.0.2", True),
        ("::1", True),
        ("0.0.0.0", True),
        ("224.0.0.1", True),
        ("fe80::1", True),
        ("192.0.2.1", False),
        ("node.example", False),
    ],
)
def test_forbidden_targets(host, bad):
    """Loopback, link-local, unspecified and multicast are forbidden; the rest is not."""
    assert (forbidden_target(host) is not None) is bad


@pytest_twisted.inlineCallbacks
def test_resolver_shares_lookups_and_caches_failures():
    """Callers of one name share one lookup; a name that does not answer fails within
    the timeout, and then fails at once (no thread) until the negative cache expires,
    while other names resolve meanwhile."""
    from twisted.internet import reactor

    clock = reactor
    release = threading.Event()
    asked = []

    def lookup(host, port):
        asked.append(host)
        if host == "dead.example":
            release.wait(5)
            raise OSError("no such name")
        return ["192.0.2.9"]

    resolver = CachingResolver(
        clock, threads=2, timeout=0.2, negative_ttl=60, lookup=lookup
    )

    async def scenario():
        first = resolver.resolve("dead.example", 1)
        second = resolver.resolve("dead.example", 1)
        good = await resolver.resolve("live.example", 1)
        assert good == ["192.0.2.9"]
        for d in (first, second):
            with pytest.raises(ResolveError, match="no answer within"):
                await d
        with pytest.raises(ResolveError):
            await resolver.resolve("dead.example", 1)
        assert asked.count("dead.example") == 1
        release.set()

    yield defer.ensureDeferred(scenario())


@pytest_twisted.ensureDeferred
async def test_params_the_encoder_refuses_free_their_slot(short_tmp):
    """An attacker's params nested 1,000 deep (orjson reads them, json's encoder does
    not) are -32602 and give their in-flight slot back: after more of them than
    EXPLORER_CALLS_PER_NODE, a normal call to the node is tried, not refused busy."""
    from twisted.internet import reactor

    from hero_compute.rpc.http_client import RpcClient

    client = RpcClient(reactor)
    registry = registry_with(Clock(), ("n1", f"unix://{short_tmp}/absent.sock", None))
    proxy = Proxy(client, registry, 5.0, never)
    nested: list = []
    for _ in range(1000):
        nested = [nested]
    try:
        for _ in range(20):
            with pytest.raises(InvalidParams, match="cannot be encoded"):
                await proxy.call("n1", "node.info", {"x": nested})
        assert (dict(proxy.in_flight), proxy.total) == ({}, 0)
        with pytest.raises(NodeUnreachable) as e:
            await proxy.call("n1", "node.info")
        assert "busy" not in str(e.value)
        assert (dict(proxy.in_flight), proxy.total) == ({}, 0)
    finally:
        await client.close()
