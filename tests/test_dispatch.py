"""
The JSON-RPC dispatcher in memory, without HTTP: request validation, ids, notifications,
batches, the call context, the authorization hook, coroutine handlers, and what cannot
be JSON.
"""

import json
import types

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from hero_compute.rpc.dispatch import CallContext, Dispatcher
from hero_compute.rpc.errors import InvalidParams, RefusedByPolicy

from .support import success_result_of

UNIX = CallContext("unix", "unix")


def dispatch(rpc, message, context=UNIX):
    """Run one body through the dispatcher synchronously; decode the answer."""
    body = message if isinstance(message, bytes) else json.dumps(message).encode()
    answer = rpc.answer(body, context)
    if isinstance(answer, defer.Deferred):
        answer = success_result_of(answer)
    return None if answer is None else json.loads(answer)


@pytest.fixture
def memory_rpc():
    """A dispatcher with one method and one that wants the call context."""
    rpc = Dispatcher()
    rpc.register("echo", lambda value=None: value)
    rpc.register("where", lambda context: context.transport, context=True)
    return rpc


@pytest.mark.parametrize(
    "message",
    [
        {"jsonrpc": "2.0", "method": "echo", "id": True},
        {"jsonrpc": "2.0", "method": "echo", "id": {"a": 1}},
        {"jsonrpc": "2.0", "method": "echo", "id": [1]},
        {"jsonrpc": "1.0", "method": "echo", "id": 1},
        {"method": "echo", "id": 1},
        {"jsonrpc": "2.0", "id": 1},
        {"jsonrpc": "2.0", "method": "echo", "params": "x", "id": 1},
        {"jsonrpc": "2.0", "method": "echo", "params": 3, "id": 1},
        {"jsonrpc": "2.0", "method": "echo", "params": None, "id": 1},
        {"jsonrpc": "2.0", "method": "echo", "id": 1, "extra": 1},
        "just a string",
        None,
    ],
)
def test_invalid_requests(memory_rpc, message):
    """Requests that break the JSON-RPC 2.0 rules are -32600."""
    response = dispatch(memory_rpc, message)
    assert response["error"]["code"] == -32600
    assert response["id"] in (None, 1)


@pytest.mark.parametrize("rid", [1, "a", 1.5, None, 0, ""])
def test_ids_are_echoed(memory_rpc, rid):
    """Any valid id (string, number, null) comes back unchanged."""
    response = dispatch(
        memory_rpc, {"jsonrpc": "2.0", "method": "echo", "params": ["v"], "id": rid}
    )
    assert response == {"jsonrpc": "2.0", "result": "v", "id": rid}


def test_notification_with_bad_params_is_silent(memory_rpc):
    """A notification whose params do not fit gets no answer (there is no id to answer)."""
    assert (
        dispatch(memory_rpc, {"jsonrpc": "2.0", "method": "echo", "params": [1, 2, 3]})
        is None
    )


def test_handler_gets_the_context(memory_rpc):
    """A handler registered with context=True gets the CallContext first."""
    assert (
        dispatch(memory_rpc, {"jsonrpc": "2.0", "method": "where", "id": 1})["result"]
        == "unix"
    )


def test_context_is_not_a_param(memory_rpc):
    """The context is not something a caller can fill or must give."""
    response = dispatch(
        memory_rpc, {"jsonrpc": "2.0", "method": "where", "params": ["tcp"], "id": 1}
    )
    assert response["error"]["code"] == -32602


def test_rpc_discover_needs_a_schema(memory_rpc):
    """Without a schema there is no rpc.discover."""
    assert (
        dispatch(memory_rpc, {"jsonrpc": "2.0", "method": "rpc.discover", "id": 1})[
            "error"
        ]["code"]
        == -32601
    )


def test_duplicate_ids_in_a_batch(memory_rpc):
    """A batch is answered request by request, even when ids repeat."""
    response = dispatch(
        memory_rpc,
        [
            {"jsonrpc": "2.0", "method": "echo", "params": [1], "id": 1},
            {"jsonrpc": "2.0", "method": "echo", "params": [2], "id": 1},
        ],
    )
    assert sorted(r["result"] for r in response) == [1, 2]


def test_nested_params_are_answered(memory_rpc):
    """Params nested deep but still parseable (the parser stops at about 1,000 levels)
    reach the handler and are echoed whole."""
    depth = 900
    body = (
        b'{"jsonrpc":"2.0","method":"echo","params":['
        + b"[" * depth
        + b"]" * depth
        + b'],"id":1}'
    )
    result = dispatch(memory_rpc, body)["result"]
    for _ in range(depth):
        assert isinstance(result, list) and len(result) <= 1
        result = result[0] if result else None
    assert result is None


def test_unexpected_error_while_preparing_is_internal_error(logged_errors):
    """An unexpected exception while checking params is -32603, logged, and does not
    take the rest of a batch down."""

    class Exploding:
        def coerce_params(self, params):
            raise RuntimeError("validator bug")

    rpc = Dispatcher(schema=types.SimpleNamespace(methods={"bad": Exploding()}))
    rpc.register("bad", lambda: None)
    rpc.register("good", lambda: "ok")
    response = dispatch(
        rpc,
        [
            {"jsonrpc": "2.0", "method": "bad", "id": 1},
            {"jsonrpc": "2.0", "method": "good", "id": 2},
        ],
    )
    by_id = {r["id"]: r for r in response}
    assert by_id[1]["error"] == {"code": -32603, "message": "Internal error"}
    assert by_id[2]["result"] == "ok"
    assert len(logged_errors.flush(RuntimeError)) == 1


def test_coroutine_handlers_are_awaited(memory_rpc):
    """A handler written as ``async def`` is awaited; its result or error is the answer."""

    async def double(value):
        return value * 2

    async def refuse():
        raise InvalidParams("no")

    memory_rpc.register("double", double)
    memory_rpc.register("refuse", refuse)
    assert (
        dispatch(
            memory_rpc, {"jsonrpc": "2.0", "method": "double", "params": [4], "id": 1}
        )["result"]
        == 8
    )
    assert (
        dispatch(memory_rpc, {"jsonrpc": "2.0", "method": "refuse", "id": 2})["error"][
            "code"
        ]
        == -32602
    )


def test_lone_surrogates_are_answered(memory_rpc):
    """A string holding a lone surrogate (a legal JSON escape with no UTF-8 form) is
    echoed back escaped, alone and in a batch, and so is an unknown method's name."""
    body = b'{"jsonrpc":"2.0","method":"echo","params":["\\ud800"],"id":1}'
    assert dispatch(memory_rpc, body)["result"] == "\ud800"
    assert dispatch(memory_rpc, b"[" + body + b"]")[0]["result"] == "\ud800"
    unknown = b'{"jsonrpc":"2.0","method":"\\udfff","id":2}'
    assert dispatch(memory_rpc, unknown)["error"]["code"] == -32601


@pytest.mark.parametrize(
    "body",
    [
        b'{"jsonrpc":"2.0","method":"echo","params":[NaN],"id":1}',
        b'{"jsonrpc":"2.0","method":"echo","params":[Infinity],"id":1}',
        b'{"jsonrpc":"2.0","method":"echo","params":[-Infinity],"id":1}',
    ],
)
def test_non_json_constants_are_parse_errors(memory_rpc, body):
    """NaN and Infinity are not JSON: -32700."""
    assert dispatch(memory_rpc, body)["error"]["code"] == -32700


@pytest.mark.parametrize(
    "body",
    [
        b'{"jsonrpc":"2.0","method":"echo","id":1e400}',
        b'{"jsonrpc":"2.0","method":"echo","params":[1e400],"id":3}',
        b'{"jsonrpc":"2.0","method":"echo","params":{"value":{"gpu":-1e400}},"id":3}',
    ],
)
def test_non_finite_numbers_are_parse_errors(memory_rpc, body):
    """1e400 (infinite once parsed) anywhere is a parse error (CONTRACT §7): it never
    reaches a handler, so it can never be stored and break a listing."""
    seen = []
    memory_rpc.register("echo", lambda value=None: seen.append(value))
    response = dispatch(memory_rpc, body)
    assert response["error"]["code"] == -32700 and response["id"] is None
    assert seen == []


def test_non_finite_results_are_internal_errors(memory_rpc, logged_errors):
    """A result that is not finite is -32603: nothing that is not JSON goes out."""
    memory_rpc.register("inf", lambda: float("inf"))
    response = dispatch(memory_rpc, {"jsonrpc": "2.0", "method": "inf", "id": 3})
    assert response == {"jsonrpc": "2.0", "id": 3, "error": response["error"]}
    assert response["error"]["code"] == -32603
    assert logged_errors.flush(ValueError)


def test_batch_limit_refuses_the_whole_batch():
    """A batch over the limit is one -32600 and none of it runs."""
    ran = []
    rpc = Dispatcher(max_batch=3)
    rpc.register("one", lambda: ran.append(1) or 1)
    call = {"jsonrpc": "2.0", "method": "one", "id": 1}
    assert len(dispatch(rpc, [call] * 3)) == 3
    ran.clear()
    response = dispatch(rpc, [call] * 4)
    assert (
        response["error"]["code"] == -32600 and "at most 3" in response["error"]["message"]
    )
    assert ran == []


def test_response_size_limit_is_per_item():
    """A response over the limit becomes -32603 'response too large'; in a batch only
    the items that would take the body over it do, the others are answered."""
    rpc = Dispatcher(max_response=1000)
    rpc.register("big", lambda: "x" * 2000)
    rpc.register("small", lambda: "ok")
    alone = dispatch(rpc, {"jsonrpc": "2.0", "method": "big", "id": 1})
    assert alone["error"] == {"code": -32603, "message": "response too large"}
    batch = dispatch(
        rpc,
        [
            {"jsonrpc": "2.0", "method": "big", "id": 1},
            {"jsonrpc": "2.0", "method": "small", "id": 2},
        ],
    )
    by_id = {r["id"]: r for r in batch}
    assert by_id[1]["error"]["message"] == "response too large"
    assert by_id[2]["result"] == "ok"


TCP = CallContext("tcp", "192.0.2.7:4242", host="192.0.2.7")


def refusal_lines(events, limit):
    """The formatted log lines about refusals by ``limit``."""
    return [formatEvent(e) for e in events if f"refused ({limit})" in e["log_format"]]


def test_batch_refusals_are_logged_rate_limited():
    """A batch over the limit is logged at once naming its size and peer, the next ones
    within 10 s only counted and said in the first line after (CONTRACT §7); batches
    within the limit log nothing; each refusal is counted for metrics."""
    clock = Clock()
    rpc = Dispatcher(max_batch=2, clock=clock)
    rpc.register("one", lambda: 1)
    call = {"jsonrpc": "2.0", "method": "one", "id": 1}
    with capturedLogs() as events:
        assert len(dispatch(rpc, [call] * 2, TCP)) == 2
        for _ in range(5):
            assert dispatch(rpc, [call] * 3, TCP)["error"]["code"] == -32600
        clock.advance(9.9)
        dispatch(rpc, [call] * 3, TCP)
        clock.advance(0.1)
        dispatch(rpc, [call] * 4, TCP)
    assert refusal_lines(events, "max_batch") == [
        "refused (max_batch) a batch of 3 requests from 192.0.2.7:4242: at most 2",
        "refused (max_batch) a batch of 4 requests from 192.0.2.7:4242: at most 2 "
        "(and 5 more since the last such line)",
    ]
    assert rpc.refusals == {"max_batch": 7}


def test_responses_too_large_are_logged_rate_limited():
    """Each response item over the limit is logged (size, peer) at most once per 10 s,
    the rest counted into the next line, whether answered at once or later; answers
    within the limit log nothing."""
    clock = Clock()
    rpc = Dispatcher(max_response=1000, clock=clock)
    rpc.register("big", lambda: "x" * 2000)
    rpc.register("later", lambda: defer.succeed("x" * 3000))
    rpc.register("small", lambda: "ok")
    big = {"jsonrpc": "2.0", "method": "big", "id": 1}
    with capturedLogs() as events:
        assert dispatch(rpc, {**big, "method": "small"}, TCP)["result"] == "ok"
        assert dispatch(rpc, big, TCP)["error"]["message"] == "response too large"
        batch = dispatch(rpc, [big, {**big, "id": 2}, {**big, "method": "small"}], TCP)
        assert [a.get("result") for a in batch] == [None, None, "ok"]
        clock.advance(10)
        later = dispatch(rpc, {**big, "method": "later"}, TCP)
        assert later["error"]["message"] == "response too large"
    assert refusal_lines(events, "max_response") == [
        "refused (max_response) a response of 2036 bytes to 192.0.2.7:4242: at most 1000",
        "refused (max_response) a response of 3036 bytes to 192.0.2.7:4242: "
        "at most 1000 (and 2 more since the last such line)",
    ]
    assert rpc.refusals == {"max_response": 4}


def test_synchronous_handlers_are_answered_without_a_deferred(memory_rpc):
    """A call whose handler returns a plain value is answered at once, as bytes."""
    answer = memory_rpc.answer(
        b'{"jsonrpc":"2.0","method":"echo","params":[1],"id":1}', UNIX
    )
    assert answer == b'{"jsonrpc":"2.0","result":1,"id":1}'


def test_authorize_sees_context_and_method_before_params():
    """The authorize hook gets the call context, the method name and the raw params of
    every call to a method that exists, before its params are checked; what it raises is
    the answer."""
    seen = []

    def authorize(context, method, params):
        seen.append((context, method, params))
        if method == "secret":
            raise RefusedByPolicy("not for you")

    rpc = Dispatcher(authorize=authorize)
    rpc.register("secret", lambda: "s")
    rpc.register("open", lambda: "o")
    tcp = CallContext("tcp", "10.0.0.1:5000")
    assert (
        dispatch(rpc, {"jsonrpc": "2.0", "method": "open", "id": 1}, tcp)["result"] == "o"
    )
    refused = dispatch(
        rpc, {"jsonrpc": "2.0", "method": "secret", "params": [1, 2], "id": 2}, tcp
    )
    assert refused["error"]["code"] == RefusedByPolicy.code
    assert (
        dispatch(rpc, {"jsonrpc": "2.0", "method": "nope", "id": 3}, tcp)["error"]["code"]
        == -32601
    )
    assert seen == [(tcp, "open", None), (tcp, "secret", [1, 2])]


def test_big_integer_ids_are_echoed_exactly(memory_rpc):
    """An id of more than 64 bits comes back as sent, not as a float."""
    body = b'{"jsonrpc":"2.0","method":"echo","id":123456789012345678901234567}'
    assert dispatch(memory_rpc, body)["id"] == 123456789012345678901234567


@pytest.mark.parametrize(
    "result",
    [
        {"a": [1, 2.5, "é", None, True]},  # a null: written by json
        2**70,  # past orjson's 64 bits
        "\ud800",  # a lone surrogate
        {1: "one"},  # a key that is not a string
        [
            [
                [
                    [
                        [
                            [
                                [
                                    [
                                        [
                                            [
                                                [
                                                    [
                                                        [
                                                            [
                                                                [
                                                                    [
                                                                        [
                                                                            [
                                                                                [
                                                                                    [
                                                                                        [
                                                                                            [
                                                                                                [
                                                                                                    [
                                                                                                        [
                                                                                                            [
                                                                                                                [
                                                                                                                    [
                                                                                                                        [
                                                                                                                            [
                                                                                                                                [
                                                                                                                                    [
                                                                                                                                        [
                                                                                                                                            [
                                                                                                                                                [
                                                                                                                                                    [
                                                                                                                                                        [
                                                                                                                                                            [
                                                                                                                                                                [
                                                                                                                                                                    [
                                                                                                                                                                        [
                                                                                                                                                                            [
                                                                                                                                                                                [
                                                                                                                                                                                    [
                                                                                                                                                                                        [
                                                                                                                                                                                            [
                                                                                                                                                                                                [
                                                                                                                                                                                                    [
                                                                                                                                                                                                        [
                                                                                                                                                                                                            1
                                                                                                                                                                                                        ]
                                                                                                                                                                                                    ]
                                                                                                                                                                                                ]
                                                                                                                                                                                            ]
                                                                                                                                                                                        ]
                                                                                                                                                                                    ]
                                                                                                                                                                                ]
                                                                                                                                                                            ]
                                                                                                                                                                        ]
                                                                                                                                                                    ]
                                                                                                                                                                ]
                                                                                                                                                            ]
                                                                                                                                                        ]
                                                                                                                                                    ]
                                                                                                                                                ]
                                                                                                                                            ]
                                                                                                                                        ]
                                                                                                                                    ]
                                                                                                                                ]
                                                                                                                            ]
                                                                                                                        ]
                                                                                                                    ]
                                                                                                                ]
                                                                                                            ]
                                                                                                        ]
                                                                                                    ]
                                                                                                ]
                                                                                            ]
                                                                                        ]
                                                                                    ]
                                                                                ]
                                                                            ]
                                                                        ]
                                                                    ]
                                                                ]
                                                            ]
                                                        ]
                                                    ]
                                                ]
                                            ]
                                        ]
                                    ]
                                ]
                            ]
                        ]
                    ]
                ]
            ]
        ],
    ],
)
def test_results_are_written_as_json_would(memory_rpc, result):
    """Whatever the fast writer cannot write exactly is written by json."""
    memory_rpc.register("give", lambda: result)
    response = dispatch(memory_rpc, {"jsonrpc": "2.0", "method": "give", "id": 1})
    assert response == json.loads(json.dumps({"jsonrpc": "2.0", "result": result, "id": 1}))


def test_non_finite_inside_a_result_is_an_internal_error(memory_rpc, logged_errors):
    """A NaN deep in a large result (which orjson would write as null) is -32603."""
    page = {"nodes": [{"load": 0.5}] * 999 + [{"load": float("nan")}]}
    memory_rpc.register("page", lambda: page)
    response = dispatch(memory_rpc, {"jsonrpc": "2.0", "method": "page", "id": 3})
    assert response["error"]["code"] == -32603
    assert logged_errors.flush(ValueError)
