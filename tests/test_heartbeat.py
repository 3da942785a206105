"""
Heartbeat loops: schedule, backoff with jitter, per-explorer independence, clean stop;
and what a heartbeat says: the advertised address and the payload.
"""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock

from hero_compute.node.advertise import Advertiser, HeartbeatPayload
from hero_compute.node.heartbeat import MAX_BACKOFF, HeartbeatLoop, backoff_delay, delta
from hero_compute.node.service import NodeIdentity
from hero_compute.rpc.addresses import Address, parse_address, parse_listen
from hero_compute.rpc.errors import ConnectionRefused, InvalidParams

from .fakes import FakeRpcClient, MemoryVmManager
from .support import failure_result_of, success_result_of


def make_loop(clock, client, uri="unix:///tmp/e.sock", interval=10.0, rand=lambda: 1.0):
    """A loop with a trivial payload."""
    return HeartbeatLoop(
        clock, client, parse_address(uri), lambda a: {"node_id": "n"}, interval, rand=rand
    )


# No deadline, as for every other property here: Hypothesis's default (200 ms an
# example) fails a microsecond example that a loaded machine pauses once.
@settings(deadline=None)
@given(
    interval=st.floats(0.01, 1000), failures=st.integers(1, 200), r=st.floats(0, 0.999999)
)
def test_backoff_bounds(interval, failures, r):
    """Backoff is positive, never over 5 intervals nor 60 s, and at least half its step."""
    delay = backoff_delay(interval, failures, lambda: r)
    cap = min(5 * interval, MAX_BACKOFF)
    assert 0 < delay <= cap
    assert delay >= min(cap, interval * 2 ** (failures - 1)) / 2


def test_backoff_grows_then_caps():
    """Without jitter the steps double until the cap."""
    steps = [backoff_delay(2.0, n, lambda: 1.0) for n in range(1, 6)]
    assert steps == [2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff_delay(30.0, 10, lambda: 1.0) == MAX_BACKOFF


def test_heartbeats_on_schedule():
    """A healthy explorer gets a heartbeat at start and every interval after."""
    clock, client = Clock(), FakeRpcClient()
    loop = make_loop(clock, client)
    loop.startService()
    clock.advance(0)
    assert len(client.calls) == 1
    clock.pump([1] * 35)
    assert len(client.calls) == 4
    assert loop.state.state == "ok" and loop.state.last_ok == 30
    assert client.calls[0][1] == "explorer.heartbeat"
    assert client.calls[0][3] <= 10.0
    loop.stopService()
    assert not clock.getDelayedCalls()


def test_call_timeout_is_no_longer_than_the_interval():
    """Each heartbeat call is bounded by the interval when it is short."""
    clock, client = Clock(), FakeRpcClient()
    loop = make_loop(clock, client, interval=2.0)
    loop.startService()
    clock.advance(0)
    assert client.calls[0][3] <= 2.0
    loop.stopService()
    assert not clock.getDelayedCalls()


def test_backoff_then_recovery_within_one_cap():
    """A down explorer is retried with growing delays, and rejoined within one cap."""
    clock, client = Clock(), FakeRpcClient()
    uri = "tcp://127.0.0.1:9"
    client.down.add(uri)
    loop = make_loop(clock, client, uri, interval=2.0)
    loop.startService()
    clock.advance(0)
    times = [0.0]
    for _ in range(60):
        clock.advance(0.5)
        if len(client.calls) > len(times):
            times.append(clock.seconds())
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert gaps[:4] == [2.0, 4.0, 8.0, 10.0]
    assert max(gaps) <= 10.0
    assert loop.state.state == "failing" and "refused" in loop.state.last_error
    client.down.clear()
    back = clock.seconds()
    while loop.state.state != "ok":
        clock.advance(0.5)
    assert clock.seconds() - back <= 10.0
    loop.stopService()


def test_refusal_is_failure_with_reason():
    """An explorer's JSON-RPC refusal is a failing state carrying the message."""
    clock, client = Clock(), FakeRpcClient()
    client.refuse.add("unix:///tmp/e.sock")
    loop = make_loop(clock, client)
    loop.startService()
    clock.advance(0)
    assert loop.state.state == "failing"
    assert "-32010" in loop.state.last_error
    loop.stopService()


def test_hung_explorer_does_not_delay_another():
    """One loop per explorer: a hung one does not delay heartbeats to a live one."""
    clock, client = Clock(), FakeRpcClient()
    client.hang.add("unix:///tmp/hung.sock")
    live = make_loop(clock, client, "unix:///tmp/live.sock")
    hung = make_loop(clock, client, "unix:///tmp/hung.sock")
    live.startService()
    hung.startService()
    clock.advance(0)
    clock.pump([1] * 40)
    live_calls = [c for c in client.calls if c[0] == "unix:///tmp/live.sock"]
    assert len(live_calls) == 5
    hung.stopService()
    live.stopService()
    assert not clock.getDelayedCalls()


def test_no_overlap_and_a_hung_call_is_bounded():
    """A tick still waiting for its answer is never joined by another; a call that never
    answers (the fake ignores its timeout) is given up after the interval, and retried
    after a backoff."""
    clock, client = Clock(), FakeRpcClient()
    client.hang.add("unix:///tmp/e.sock")
    loop = make_loop(clock, client, interval=2.0)
    loop.startService()
    clock.advance(0)
    clock.pump([0.1] * 19)
    assert len(client.calls) == 1
    clock.pump([0.1] * 2)
    assert loop.state.state == "failing" and "2 s" in loop.state.last_error
    clock.pump([0.1] * 21)
    assert len(client.calls) == 2
    loop.stopService()
    assert not clock.getDelayedCalls()


def test_a_hung_payload_is_bounded():
    """Building the payload (which may connect to the explorer first) counts against the
    same bound: an attempt stuck there fails after the interval and is retried."""
    clock, client = Clock(), FakeRpcClient()
    payloads = []

    def payload(address):
        payloads.append(address)
        return defer.Deferred()

    loop = HeartbeatLoop(
        clock,
        client,
        parse_address("tcp://explorer.example:9002"),
        payload,
        2.0,
        rand=lambda: 1.0,
    )
    loop.startService()
    clock.pump([0.1] * 25)
    assert loop.state.state == "failing"
    clock.pump([0.1] * 25)
    assert len(payloads) == 2 and client.calls == []
    loop.stopService()
    assert not clock.getDelayedCalls()


def test_payload_error_is_survived(logged_errors):
    """A payload that raises is logged once and retried; the loop keeps running."""
    clock, client = Clock(), FakeRpcClient()
    loop = HeartbeatLoop(
        clock,
        client,
        parse_address("unix:///tmp/e.sock"),
        lambda a: 1 / 0,
        1.0,
        rand=lambda: 1.0,
    )
    loop.startService()
    clock.advance(0)
    clock.pump([1] * 20)
    assert loop.state.state == "failing"
    assert "ZeroDivisionError" in loop.state.last_error
    assert len(logged_errors.flush(ZeroDivisionError)) == 1
    assert clock.getDelayedCalls()
    loop.stopService()
    assert not clock.getDelayedCalls()


def test_warns_once_when_interval_exceeds_explorer_expectation():
    """A node slower than the explorer's next_heartbeat warns once that it would flap."""
    from twisted.logger import globalLogPublisher

    seen = []

    def observer(e):
        if "expects a heartbeat" in e.get("log_format", ""):
            seen.append(e)

    globalLogPublisher.addObserver(observer)
    try:
        clock, client = Clock(), FakeRpcClient()
        fast = make_loop(clock, client, interval=10.0)
        fast.startService()
        clock.pump([1] * 30)
        assert seen == []
        fast.stopService()
        slow = make_loop(clock, client, interval=20.0)
        slow.startService()
        clock.pump([1] * 60)
        assert len(seen) == 1
        slow.stopService()
    finally:
        globalLogPublisher.removeObserver(observer)


class Bound:
    """Listeners stand-in: the URIs bound so far."""

    def __init__(self, *uris):
        self.bound = list(uris)


def advertiser(client, tcp="0.0.0.0:9003", advertise=None, bound=()):
    """An Advertiser for a node on /n.sock and the given TCP listener."""
    return Advertiser(
        unix=Address("unix", path="/n.sock"),
        client=client,
        listeners=Bound(*bound),
        tcp=parse_listen(tcp) if tcp else None,
        advertise=parse_address(advertise) if advertise else None,
    )


def test_advertiser_unix_explorer_gets_the_unix_socket():
    """An explorer reached over Unix is told the node's Unix socket URI."""
    d = advertiser(FakeRpcClient()).address_for(parse_address("unix:///e.sock"))
    assert success_result_of(d).uri == "unix:///n.sock"


def test_advertiser_tcp_explorer_gets_the_configured_address():
    """A configured advertise address is what every TCP explorer is told."""
    client = FakeRpcClient()
    d = advertiser(client, advertise="tcp://node.example:7000").address_for(
        parse_address("tcp://10.0.0.1:9002")
    )
    assert success_result_of(d).uri == "tcp://node.example:7000"


def test_advertiser_derives_local_ip_and_bound_port():
    """Without one, a TCP explorer is told the node's own IP towards it and the port its
    TCP listener actually bound."""
    client = FakeRpcClient(host="10.0.0.7")
    a = advertiser(client, tcp="0.0.0.0:0", bound=["unix:///n.sock", "tcp://0.0.0.0:41000"])
    d = a.address_for(parse_address("tcp://10.0.0.1:9002"))
    assert success_result_of(d).uri == "tcp://10.0.0.7:41000"


def test_advertiser_fails_rather_than_raises():
    """An explorer that cannot be reached makes a failed Deferred, never an exception."""
    client = FakeRpcClient()
    client.down.add("tcp://10.0.0.1:9002")
    d = advertiser(client).address_for(parse_address("tcp://10.0.0.1:9002"))
    failure_result_of(d, ConnectionRefused)
    d = advertiser(client, tcp=None).address_for(parse_address("tcp://10.0.0.2:9002"))
    failure_result_of(d, AttributeError)


def test_payload_reports_identity_address_and_vms():
    """The payload carries the node's id and name as they are at heartbeat time, the
    advertised address and the VM counts."""
    clock = Clock()
    vms = MemoryVmManager(clock, host={"vcpus": 4, "memory_mb": 2048, "disk_gb": 20})
    success_result_of(vms.create("a", 1, 128, 2))
    identity = NodeIdentity("/nowhere")
    payload = HeartbeatPayload(
        identity=identity, advertiser=advertiser(FakeRpcClient()), vms=vms
    )
    identity.node_id, identity.name = "n1", "one"
    params = success_result_of(payload.params(parse_address("unix:///e.sock")))
    assert params["node_id"] == "n1" and params["name"] == "one"
    assert params["socket_path"] == "unix:///n.sock"
    assert params["capacity"]["vcpus"] == 4 and params["usage"]["disk_gb"] == 2
    assert params["vm_count"] == 1


def test_payload_carries_the_labels_and_a_delta_leaves_them_out():
    """NODE_LABELS go in every full heartbeat; a delta leaves them out while unchanged
    (the explorer keeps them)."""
    clock = Clock()
    vms = MemoryVmManager(clock, host={"vcpus": 4, "memory_mb": 2048, "disk_gb": 20})
    identity = NodeIdentity("/nowhere", "n1", "one", labels={"zone": "a"})
    payload = HeartbeatPayload(
        identity=identity, advertiser=advertiser(FakeRpcClient()), vms=vms
    )
    params = success_result_of(payload.params(parse_address("unix:///e.sock")))
    assert params["labels"] == {"zone": "a"}
    assert "labels" not in delta(params, dict(params), "s1")
    changed = dict(params, labels={"zone": "b"})
    assert delta(changed, params, "s1")["labels"] == {"zone": "b"}


def test_payload_fails_with_the_first_error():
    """A payload whose address cannot be found fails with that error, unwrapped."""
    client = FakeRpcClient()
    client.down.add("tcp://10.0.0.1:9002")
    payload = HeartbeatPayload(
        identity=NodeIdentity("/nowhere", "n1"),
        advertiser=advertiser(client),
        vms=MemoryVmManager(Clock()),
    )
    failure_result_of(
        payload.params(parse_address("tcp://10.0.0.1:9002")), ConnectionRefused
    )


def test_beat_out_of_schedule_replaces_the_due_one():
    """A heartbeat sent out of schedule replaces the one that was due: one call, and
    the next one an interval later."""
    clock, client = Clock(), FakeRpcClient()
    loop = make_loop(clock, client)
    loop.startService()
    success_result_of(loop.beat())
    clock.advance(0)
    assert len(client.calls) == 1
    assert [c.getTime() for c in clock.getDelayedCalls()] == [10.0]
    loop.stopService()
    assert not clock.getDelayedCalls()


def test_payload_carries_the_secret_once_loaded():
    """A loaded node secret goes in every heartbeat; before it is loaded, none is sent."""
    identity = NodeIdentity("/nowhere", "n1")
    payload = HeartbeatPayload(
        identity=identity,
        advertiser=advertiser(FakeRpcClient()),
        vms=MemoryVmManager(Clock()),
    )
    explorer = parse_address("unix:///e.sock")
    assert "secret" not in success_result_of(payload.params(explorer))
    identity.secret = "ab" * 32
    assert success_result_of(payload.params(explorer))["secret"] == "ab" * 32


def test_advertiser_tls_explorer_gets_the_tls_listener():
    """A tls:// explorer is told tls://<own IP towards it>:<bound TLS port>, whatever the
    TCP listener; a tcp:// one still gets the TCP port."""
    client = FakeRpcClient(host="10.0.0.7")
    a = Advertiser(
        unix=Address("unix", path="/n.sock"),
        client=client,
        listeners=Bound("tcp://0.0.0.0:41000", "tls://0.0.0.0:42000"),
        tcp=parse_listen("0.0.0.0:0"),
        tls=parse_listen("0.0.0.0:0"),
    )
    d = a.address_for(parse_address("tls://10.0.0.1:9004"))
    assert success_result_of(d).uri == "tls://10.0.0.7:42000"
    d = a.address_for(parse_address("tcp://10.0.0.1:9002"))
    assert success_result_of(d).uri == "tcp://10.0.0.7:41000"


def test_advertiser_configured_address_and_tls():
    """A tls:// advertise address is told to tls:// explorers as it is, and its host with
    the TCP port to tcp:// ones; a tcp:// one lends its host to the TLS port."""
    client = FakeRpcClient()
    both = dict(
        unix=Address("unix", path="/n.sock"),
        client=client,
        listeners=Bound(),
        tcp=parse_listen("0.0.0.0:9003"),
        tls=parse_listen("0.0.0.0:9004"),
    )
    a = Advertiser(advertise=parse_address("tls://node.example:7004"), **both)
    assert (
        success_result_of(a.address_for(parse_address("tls://e:1"))).uri
        == "tls://node.example:7004"
    )
    assert (
        success_result_of(a.address_for(parse_address("tcp://e:1"))).uri
        == "tcp://node.example:9003"
    )
    a = Advertiser(advertise=parse_address("tcp://node.example:7003"), **both)
    assert (
        success_result_of(a.address_for(parse_address("tls://e:1"))).uri
        == "tls://node.example:9004"
    )
    assert client.calls == []


# -- delta heartbeats: steady heartbeats carry only what changed


FULL = {
    "node_id": "n",
    "socket_path": "unix:///tmp/n.sock",
    "name": "n",
    "version": "1",
    "capacity": {"vcpus": 4},
    "usage": {"vcpus": 0},
    "vm_count": 0,
    "secret": "ab" * 32,
}


def delta_loop(clock, client, payloads):
    """A loop whose payloads are taken in turn from ``payloads`` (the last repeats)."""
    it = iter(payloads)
    last = {}

    def payload(address):
        last["p"] = next(it, last.get("p"))
        return dict(last["p"])

    return HeartbeatLoop(clock, client, parse_address("unix:///tmp/e.sock"), payload, 10.0)


def sent(client):
    """The params of every heartbeat sent."""
    return [params for _, method, params, _ in client.calls]


def test_delta_after_an_answer_with_a_session():
    """Once the explorer names its session, a heartbeat carries the session, the
    always-sent params and only the fields that changed."""
    clock, client = Clock(), FakeRpcClient()
    client.answer = {"accepted": True, "next_heartbeat": 10, "session": "s1"}
    busy = dict(FULL, usage={"vcpus": 2}, vm_count=1)
    loop = delta_loop(clock, client, [FULL, FULL, busy, busy])
    for _ in range(4):
        success_result_of(loop.beat())
    first, second, third, fourth = sent(client)
    assert first == FULL
    assert second == {
        "node_id": "n",
        "socket_path": "unix:///tmp/n.sock",
        "secret": FULL["secret"],
        "session": "s1",
    }
    assert third == dict(second, usage={"vcpus": 2}, vm_count=1)
    assert fourth == second


def test_no_session_no_delta():
    """An explorer that names no session (an older one) always gets the full record."""
    clock, client = Clock(), FakeRpcClient()
    loop = delta_loop(clock, client, [FULL])
    for _ in range(3):
        success_result_of(loop.beat())
    assert sent(client) == [FULL] * 3


def test_refused_delta_is_resent_whole_at_once():
    """A delta the explorer refuses (it restarted) is followed at once by the full
    heartbeat; after a failed tick, the next heartbeat is full."""
    clock, client = Clock(), FakeRpcClient()
    client.answer = {"accepted": True, "next_heartbeat": 10, "session": "s1"}
    loop = delta_loop(clock, client, [FULL])
    success_result_of(loop.beat())
    uri = "unix:///tmp/e.sock"
    client.refuse.add(uri)
    success_result_of(loop.beat())  # the resend is refused too: the tick fails
    assert loop.state.state == "failing"
    assert [("session" in p) for p in sent(client)] == [False, True, False]
    client.refuse.discard(uri)
    client.calls.clear()
    success_result_of(loop.beat())
    assert sent(client) == [FULL]  # after a failure: full
    success_result_of(loop.beat())
    assert "session" in sent(client)[-1]


def test_transport_failure_forgets_the_session():
    """After a heartbeat that did not get through, the next one is full."""
    clock, client = Clock(), FakeRpcClient()
    client.answer = {"accepted": True, "next_heartbeat": 10, "session": "s1"}
    loop = delta_loop(clock, client, [FULL])
    success_result_of(loop.beat())
    client.down.add("unix:///tmp/e.sock")
    success_result_of(loop.beat())
    client.down.clear()
    success_result_of(loop.beat())
    assert [("session" in p) for p in sent(client)] == [False, True, False]
    assert loop.state.state == "ok"


class RestartedExplorer(FakeRpcClient):
    """An explorer that refuses every delta heartbeat, as one that restarted does."""

    def call(self, address, method, params=None, timeout=None):
        if "session" in params:
            self.calls.append((address.uri, method, params, timeout))
            return defer.fail(InvalidParams("stale", data={"resend": "full"}))
        return FakeRpcClient.call(self, address, method, params, timeout)


def test_explorer_that_lost_our_record_gets_it_in_the_same_tick():
    """An explorer that refuses the delta (restarted) has the full record within the
    same tick, and the loop stays ok."""
    clock = Clock()
    client = RestartedExplorer(answer={"accepted": True, "session": "s"})
    loop = delta_loop(clock, client, [FULL])
    success_result_of(loop.beat())
    success_result_of(loop.beat())
    assert loop.state.state == "ok"
    assert [("session" in p) for p in sent(client)] == [False, True, False]
    assert sent(client)[2] == FULL
