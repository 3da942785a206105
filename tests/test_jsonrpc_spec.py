"""
Every example of section 7 of the JSON-RPC 2.0 specification, against the real spec
server (a subprocess) over its Unix socket and its TCP listener, with a plain HTTP client.

Responses are compared structurally: batch responses in any order, and error messages
only checked to be non-empty text (the specification's wording is not normative); codes
and ids must match exactly.
"""

import json

from .support import connect, post


def call(uri, body):
    """
    POST a body (a JSON-able value, or raw text sent as is).

    :return: the decoded response, or None when the server answered 204 with no body
    """
    raw = body if isinstance(body, str) else json.dumps(body)
    status, headers, data = post(uri, raw)
    if status == 204:
        assert data == b""
        return None
    assert status == 200, (status, data)
    assert headers["Content-Type"] == "application/json"
    return json.loads(data)


def normal(response):
    """
    A response with error messages checked and dropped, for comparison; a batch becomes
    a sorted list.
    """
    if isinstance(response, list):
        return sorted((normal(r) for r in response), key=json.dumps)
    assert response["jsonrpc"] == "2.0"
    assert ("result" in response) != ("error" in response), response
    if "error" in response:
        error = dict(response["error"])
        assert isinstance(error.pop("message"), str) and response["error"]["message"]
        error.pop("data", None)
        return {**response, "error": error}
    return response


def error(code, rid):
    """An expected error response, message aside."""
    return {"jsonrpc": "2.0", "error": {"code": code}, "id": rid}


def result(value, rid):
    """An expected result response."""
    return {"jsonrpc": "2.0", "result": value, "id": rid}


def test_positional_params(uri):
    """rpc call with positional parameters: subtract [42, 23] is 19, [23, 42] is -19."""
    assert normal(
        call(uri, {"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": 1})
    ) == result(19, 1)
    assert normal(
        call(uri, {"jsonrpc": "2.0", "method": "subtract", "params": [23, 42], "id": 2})
    ) == result(-19, 2)


def test_named_params(uri):
    """rpc call with named parameters: the order of the names does not matter."""
    assert normal(
        call(
            uri,
            {
                "jsonrpc": "2.0",
                "method": "subtract",
                "params": {"subtrahend": 23, "minuend": 42},
                "id": 3,
            },
        )
    ) == result(19, 3)
    assert normal(
        call(
            uri,
            {
                "jsonrpc": "2.0",
                "method": "subtract",
                "params": {"minuend": 42, "subtrahend": 23},
                "id": 4,
            },
        )
    ) == result(19, 4)


def test_notification(uri, spec_server):
    """A notification gets no response body (HTTP 204), and the method does run."""
    marker = [1, 2, 3, 4, 5, uri]
    assert call(uri, {"jsonrpc": "2.0", "method": "update", "params": marker}) is None
    ran = call(uri, {"jsonrpc": "2.0", "method": "notifications", "id": 1})["result"]
    assert ["update", marker] in ran


def test_notification_of_missing_method(uri):
    """A notification of a method that does not exist gets no response either."""
    assert call(uri, {"jsonrpc": "2.0", "method": "foobar"}) is None


def test_non_existent_method(uri):
    """rpc call of a non-existent method: -32601, with the request's id."""
    assert normal(call(uri, {"jsonrpc": "2.0", "method": "foobar", "id": "1"})) == error(
        -32601, "1"
    )


def test_invalid_json(uri):
    """rpc call with invalid JSON: -32700 with a null id."""
    body = '{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]'
    assert normal(call(uri, body)) == error(-32700, None)


def test_invalid_request_object(uri):
    """rpc call with an invalid Request object: -32600 with a null id."""
    assert normal(call(uri, {"jsonrpc": "2.0", "method": 1, "params": "bar"})) == error(
        -32600, None
    )


def test_batch_invalid_json(uri):
    """rpc call Batch with invalid JSON: a single -32700, not an array."""
    body = (
        '[\n  {"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},\n'
        '  {"jsonrpc": "2.0", "method"\n]'
    )
    assert normal(call(uri, body)) == error(-32700, None)


def test_empty_array(uri):
    """rpc call with an empty Array: a single -32600, not an array."""
    assert normal(call(uri, [])) == error(-32600, None)


def test_invalid_batch_of_one(uri):
    """rpc call with an invalid Batch of one ([1]): an array of one -32600."""
    assert normal(call(uri, [1])) == [error(-32600, None)]


def test_invalid_batch(uri):
    """rpc call with an invalid Batch ([1,2,3]): an array of three -32600."""
    assert normal(call(uri, [1, 2, 3])) == [error(-32600, None)] * 3


def test_mixed_batch(uri, spec_server):
    """rpc call Batch: results, an invalid request and a missing method; the
    notification in it is run but not answered."""
    batch = [
        {"jsonrpc": "2.0", "method": "sum", "params": [1, 2, 4], "id": "1"},
        {"jsonrpc": "2.0", "method": "notify_hello", "params": [7, uri]},
        {"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": "2"},
        {"foo": "boo"},
        {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},
        {"jsonrpc": "2.0", "method": "get_data", "id": "9"},
    ]
    assert normal(call(uri, batch)) == sorted(
        [
            result(7, "1"),
            result(19, "2"),
            error(-32600, None),
            error(-32601, "5"),
            result(["hello", 5], "9"),
        ],
        key=json.dumps,
    )
    ran = call(uri, {"jsonrpc": "2.0", "method": "notifications", "id": 1})["result"]
    assert ["notify_hello", [7, uri]] in ran


def test_all_notification_batch(uri):
    """rpc call Batch of only notifications: no response body at all (HTTP 204)."""
    batch = [
        {"jsonrpc": "2.0", "method": "notify_sum", "params": [1, 2, 4, uri]},
        {"jsonrpc": "2.0", "method": "notify_hello", "params": [7, uri]},
    ]
    assert call(uri, batch) is None
    ran = call(uri, {"jsonrpc": "2.0", "method": "notifications", "id": 1})["result"]
    assert ["notify_sum", [1, 2, 4, uri]] in ran and ["notify_hello", [7, uri]] in ran


def test_same_answers_on_one_connection(uri):
    """The examples also hold on one persistent connection, one after another."""
    conn = connect(uri)
    try:
        for rid in range(3):
            status, _, data = post(
                conn, {"jsonrpc": "2.0", "method": "sum", "params": [rid, 1], "id": rid}
            )
            assert status == 200
            assert json.loads(data) == result(rid + 1, rid)
    finally:
        conn.close()


def test_ipv6_listener_serves_the_same(spec_server):
    """The IPv6 TCP listener answers like the others."""
    assert normal(
        call(
            spec_server.tcp6,
            {"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": 1},
        )
    ) == result(19, 1)
