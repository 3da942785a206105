"""
The response limit over a batch's whole body (CONTRACT §7, ``HERO_MAX_RESPONSE``: one
response body; an item that would take it past the limit is -32603 ``response too
large``): in memory with a small limit, and against a real ``twistd explorer``.
"""

import gc
import json
import re
import weakref

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from hero_compute.rpc.answers import error, too_large
from hero_compute.rpc.batch import room
from hero_compute.rpc.codec import dumps
from hero_compute.rpc.dispatch import CallContext, Dispatcher
from hero_compute.rpc.errors import InternalError

from .support import connect, post, result, success_result_of
from .test_metrics import metrics_uri, scrape, value

TCP = CallContext("tcp", "192.0.2.7:4242", host="192.0.2.7")
TOO_LARGE = {"code": -32603, "message": "response too large"}
#: Ids of every kind a response may echo, the long and the odd among them.
IDS = [None, 0, -7, 2**70, "a", "\ud800", "null", 1.5, 1e300]


def call(method, rid, **params):
    """One request of a batch."""
    return {"jsonrpc": "2.0", "method": method, "params": params, "id": rid}


def answer(rpc, batch):
    """The raw body the dispatcher answers a batch with, waiting for it if need be."""
    body = rpc.answer(json.dumps(batch).encode(), TCP)
    if isinstance(body, defer.Deferred):
        body = success_result_of(body)
    return body


class Page(list):
    """A handler's result that a weak reference can follow."""


def test_items_each_within_the_limit_together_over_it():
    """Ten answers of ~400 bytes against a limit of 2,000: the first ones are given,
    the later ones -32603 ``response too large`` with their ids, in the batch's order,
    and the body stays within the limit; each refusal is counted."""
    rpc = Dispatcher(max_response=2000, clock=Clock())
    rpc.register("page", lambda n: "x" * n)
    one = dumps({"jsonrpc": "2.0", "result": "x" * 350, "id": 0})
    assert 380 < len(one) < 400
    body = answer(rpc, [call("page", i, n=350) for i in range(10)])
    assert len(body) <= 2000
    items = json.loads(body)
    assert [item["id"] for item in items] == list(range(10))
    given = [item for item in items if "result" in item]
    assert given and items[: len(given)] == given
    assert all(item["error"] == TOO_LARGE for item in items[len(given) :])
    # As many as fit: one more would have taken the body past the limit.
    assert len(body) - len(too_large(len(given))) + len(one) > 2000
    assert rpc.refusals == {"max_response": 10 - len(given)}


def test_the_errors_bytes_count():
    """Ids of 200 characters make each -32603 nearly 300 bytes: the body still stays
    within the limit, every request answered with its own id (room for the errors of
    the items not yet answered is kept from the first one on)."""
    rpc = Dispatcher(max_response=2000, clock=Clock())
    rpc.register("page", lambda n: "x" * n)
    ids = [f"{i:03d}" + "i" * 197 for i in range(6)]
    body = answer(rpc, [call("page", rid, n=300) for rid in ids])
    assert len(body) <= 2000, len(body)
    items = json.loads(body)
    assert [item["id"] for item in items] == ids
    assert "result" in items[0] and items[-1]["error"] == TOO_LARGE


def test_a_body_of_errors_alone_over_the_limit():
    """A limit smaller than the batch's errors alone (a hundred of them): answers
    smaller than their error are all given, and the body is no larger than the errors
    would have been."""
    rpc = Dispatcher(max_response=2000, clock=Clock())
    rpc.register("ping", lambda: "pong")
    batch = [call("ping", i) for i in range(100)]
    errors = 1 + sum(len(too_large(i)) + 1 for i in range(100))
    body = answer(rpc, batch)
    assert len(body) <= errors
    assert [item["result"] for item in json.loads(body)] == ["pong"] * 100
    assert rpc.refusals == {}


def test_each_result_is_let_go_once_written():
    """Results produced one by one (synchronous handlers) are written and let go one
    by one: when a handler runs, no earlier result of the batch is still alive."""
    rpc = Dispatcher(max_response=10_000, clock=Clock())
    alive_at_each_call = []
    results = []

    def page():
        gc.collect()
        alive_at_each_call.append(sum(r() is not None for r in results))
        made = Page(["x" * 100])
        results.append(weakref.ref(made))
        return made

    rpc.register("page", page)
    items = json.loads(answer(rpc, [call("page", i) for i in range(20)]))
    assert [item["result"] for item in items] == [["x" * 100]] * 20
    assert alive_at_each_call == [0] * 20
    gc.collect()
    assert [r() for r in results] == [None] * 20


def test_results_that_come_later_are_let_go_once_written():
    """Results of Deferreds that fire one by one are written and let go as each
    fires, not held until the last one: the body is whole once the last fires."""
    rpc = Dispatcher(max_response=10_000, clock=Clock())
    pending = []
    rpc.register("later", lambda: pending.append(defer.Deferred()) or pending[-1])
    body = rpc.answer(json.dumps([call("later", i) for i in range(5)]).encode(), TCP)
    assert isinstance(body, defer.Deferred) and len(pending) == 5
    for d in pending:
        made = Page(["x" * 100])
        result_ref = weakref.ref(made)
        d.callback(made)
        del made
        gc.collect()
        assert result_ref() is None
        assert not body.called or d is pending[-1]
    items = json.loads(success_result_of(body))
    assert [item["id"] for item in items] == list(range(5))


def test_room_goes_to_the_first_answered():
    """Deferreds fired in the reverse order of the batch: the first to fire get the
    room, the last to fire (the first request) is -32603; the body keeps the batch's
    order."""
    rpc = Dispatcher(max_response=1000, clock=Clock())
    pending = []
    rpc.register("later", lambda: pending.append(defer.Deferred()) or pending[-1])
    body = rpc.answer(json.dumps([call("later", i) for i in range(3)]).encode(), TCP)
    for d in reversed(pending):
        d.callback("x" * 350)
    raw = success_result_of(body)
    assert len(raw) <= 1000
    items = json.loads(raw)
    assert [item["id"] for item in items] == [0, 1, 2]
    assert items[0]["error"] == TOO_LARGE
    assert [item["result"] for item in items[1:]] == ["x" * 350] * 2


def test_notifications_and_bad_items_in_a_bounded_batch(logged_errors):
    """Notifications take no room and get no answer; an invalid item and an
    unserialisable result are answered as before, within the limit."""
    rpc = Dispatcher(max_response=1000, clock=Clock())
    rpc.register("page", lambda n: "x" * n)
    rpc.register("nan", lambda: float("nan"))
    notification = {"jsonrpc": "2.0", "method": "page", "params": {"n": 900}}
    batch = [notification, call("page", 1, n=600), 5, call("nan", 2)]
    body = answer(rpc, batch)
    assert len(body) <= 1000
    items = json.loads(body)
    assert [item["id"] for item in items] == [1, None, 2]
    assert items[0]["result"] == "x" * 600
    assert items[1]["error"]["code"] == -32600
    assert items[2]["error"] == {"code": -32603, "message": "Internal error"}
    assert logged_errors.flush(ValueError)
    assert answer(rpc, [notification] * 3) is None


def test_cancelling_a_batch_cancels_its_calls():
    """A batch whose caller hung up (its Deferred cancelled) cancels the calls still
    running."""
    rpc = Dispatcher(clock=Clock())
    cancelled = []
    rpc.register("hang", lambda: defer.Deferred(cancelled.append))
    rpc.register("now", lambda: 1)
    body = rpc.answer(
        json.dumps([call("hang", 1), call("now", 2), call("hang", 3)]).encode(), TCP
    )
    body.cancel()
    assert len(cancelled) == 2
    # The cancelled calls are answered -32603 and complete the body, which no one reads:
    # the batch's Deferred has fired, nothing is left waiting.
    fired = []
    body.addBoth(fired.append)
    (outcome,) = fired
    codes = [item.get("error", {}).get("code") for item in json.loads(outcome)]
    assert codes == [-32603, None, -32603]


def test_refusals_in_a_batch_are_logged():
    """An item refused for the body's size is logged with the size the body would
    have had and the peer, rate-limited as every refusal."""
    rpc = Dispatcher(max_response=1000, clock=Clock())
    rpc.register("page", lambda n: "x" * n)
    with capturedLogs() as events:
        answer(rpc, [call("page", i, n=350) for i in range(4)])
    (line,) = [formatEvent(e) for e in events if "refused (" in e["log_format"]]
    size = int(re.search(r"a response of (\d+) bytes", line).group(1))
    assert size > 1000
    assert line.endswith("to 192.0.2.7:4242: at most 1000")


@pytest.mark.parametrize("rid", IDS)
def test_too_large_is_the_error_it_stands_for(rid):
    """``too_large`` writes exactly the -32603 error object the dispatcher would."""
    assert too_large(rid) == dumps(error(rid, InternalError("response too large")))


@pytest.mark.parametrize("rid", IDS)
def test_room_is_the_errors_size(rid):
    """The room kept for an item is its -32603's size and one byte beside it."""
    assert room(rid) == len(too_large(rid)) + 1


def test_a_real_explorer_bounds_a_batch_of_reads(twistd, short_tmp):
    """
    A real explorer with HERO_MAX_RESPONSE=16384 and 40 nodes: a batch of ten
    ``explorer.query_nodes`` (each ~12 KB, under the limit; together ~120 KB) over TCP
    is answered with a body within the limit, the later pages -32603 ``response too
    large``, the refusals logged and counted; the same connection and another caller are
    then served.
    """
    sock = f"{short_tmp}/e.sock"
    process = twistd(
        ["explorer", "--socket", sock, "--tcp", "127.0.0.1:0", "--metrics", "127.0.0.1:0"],
        env={"EXPLORER_STATE_DIR": f"{short_tmp}/state", "HERO_MAX_RESPONSE": "16384"},
    )
    metrics = metrics_uri(process)
    unix = f"unix://{sock}"
    listeners = result(unix, "explorer.info")["listeners"]
    tcp = next(u for u in listeners if u.startswith("tcp://"))
    for n in range(40):
        labels = {f"k{j}": f"value-{n}-{j}" for j in range(8)}
        heartbeat = {"node_id": f"n{n:02d}", "socket_path": f"/tmp/n{n}.sock"}
        assert result(unix, "explorer.heartbeat", {**heartbeat, "labels": labels})
    page = result(tcp, "explorer.query_nodes", {"limit": 1000})
    size = len(json.dumps(page, separators=(",", ":")))
    assert 8000 < size < 16000, size
    batch = [call("explorer.query_nodes", i, limit=1000) for i in range(10)]
    conn = connect(tcp)
    status, _, body = post(conn, batch)
    assert status == 200 and len(body) <= 16384, (status, len(body))
    items = json.loads(body)
    assert [item["id"] for item in items] == list(range(10))
    assert len(items[0]["result"]["nodes"]) == 40
    assert all(item["error"] == TOO_LARGE for item in items[1:])
    process.wait_for_line(
        r"refused \(max_response\) a response of \d+ bytes to 127\.0\.0\.1:\d+: "
        r"at most 16384$"
    )
    samples = scrape(metrics)
    assert value(samples, "hero_refusals_total", limit="max_response") == 9
    status, _, body = post(conn, call("explorer.info", 11))
    assert status == 200 and "result" in json.loads(body)
    conn.close()
    assert len(result(tcp, "explorer.query_nodes", {"limit": 10})["nodes"]) == 10
