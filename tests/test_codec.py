"""
:mod:`hero_compute.rpc.codec`: its fast parser and writer answer as Python's ``json``
does, in orjson's ground and past it (where it falls back to ``json``).
"""

import json
import math
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hero_compute.rpc.codec import Parsed, dumps, dumps_request, loads, loads_result

#: What ``json`` reads back into: the values of a JSON-RPC body, with what orjson
#: decides differently mixed in (big integers, lone surrogates, NaN, deep nesting).
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()
    | st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF))
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=40,
)

_strict = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _json_dumps(value):
    """What ``json`` alone writes for ``value``, as UTF-8 (ASCII for a lone surrogate)."""
    try:
        return _strict.encode(value).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, allow_nan=False, separators=(",", ":")).encode("ascii")


def _outcome(f, *args):
    """``("ok", value)`` or ``("error", exception type)``: what a call decided."""
    try:
        return "ok", f(*args)
    except ValueError:  # UnicodeDecodeError and the parsers' JSONDecodeError too
        return "error", ValueError
    except (RecursionError, TypeError) as e:
        return "error", type(e)


def _no_constants(name):
    raise ValueError(name)


def _finite(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def _json_loads(body):
    return json.loads(body, parse_constant=_no_constants, parse_float=_finite)


@pytest.mark.parametrize(
    "body, expected",
    [
        # orjson's ground: plain JSON.
        (b'{"a":[1,2.5,"x",null,true]}', {"a": [1, 2.5, "x", None, True]}),
        # Past orjson's: integers past 64 bits stay exact; lone surrogate escapes;
        # a byte-order mark; UTF-16 (RFC 8259 allows json to detect it).
        (b"[123456789012345678901234567890]", [123456789012345678901234567890]),
        (b"[-9999999999999999999]", [-9999999999999999999]),
        # A bare number (found by test_loads_reads_what_json_reads: orjson read it as
        # a float, the long-number check looked only after "[", ",", ":" or a space).
        (b"-9223372036854775809", -9223372036854775809),
        (b'["\\ud800"]', ["\ud800"]),
        (b"\xef\xbb\xbf[1]", [1]),
        ('["\u00e9"]'.encode("utf-16"), ["\u00e9"]),
    ],
)
def test_loads_takes_what_json_takes(body, expected):
    """The fast parser's answers are json's, in its ground and past it."""
    assert loads(body) == expected == json.loads(body)


@settings(max_examples=400, deadline=None)
@given(values)
def test_dumps_writes_what_json_writes(value):
    """dumps refuses exactly what json refuses (NaN, infinities), and what it writes
    reads back as json's own output does."""
    ours, theirs = _outcome(dumps, value), _outcome(_json_dumps, value)
    assert ours == theirs if ours[0] == "error" else ours[0] == theirs[0], (ours, theirs)
    if ours[0] == "ok":
        assert json.loads(ours[1]) == json.loads(theirs[1])
        assert isinstance(ours[1], bytes)


@settings(max_examples=400, deadline=None)
@given(values)
def test_loads_reads_what_json_reads(value):
    """Any body json could write (NaN and 1e400 included) is read by loads as by
    json's strict reading, or refused by both."""
    body = json.dumps(value, separators=(",", ":"))
    ours, theirs = (
        _outcome(loads, body.encode("utf-8", "surrogatepass")),
        _outcome(_json_loads, body),
    )
    assert ours == theirs if ours[0] == "error" else ours[0] == theirs[0], (ours, theirs)
    if ours[0] == "ok":
        assert json.dumps(ours[1]) == json.dumps(theirs[1])


@pytest.mark.parametrize(
    "body",
    [b"[NaN]", b"[Infinity]", b"[-Infinity]", b"[1e400]", b"[", b'{"a":1,}', b"\xff"],
)
def test_loads_refuses_what_is_not_strict_json(body):
    """NaN, infinities, a number too large to be finite and invalid JSON are refused
    with ValueError."""
    with pytest.raises(ValueError):
        loads(body)


def test_loads_refuses_nesting_past_json_depth():
    """A body nested deeper than json reads is refused, not a crash."""
    with pytest.raises(RecursionError):
        loads(b"[" * 100_000 + b"]" * 100_000)


@pytest.mark.parametrize(
    "value, body",
    [
        ({"a": "\u00e9"}, b'{"a":"\\u00e9"}'),
        ([float("nan")], b"[NaN]"),
        ("\ud800", b'"\\ud800"'),
    ],
)
def test_request_bodies_are_ascii_as_json_writes_them(value, body):
    """Requests are ASCII with every non-ASCII character escaped, NaN written as json
    writes it."""
    assert dumps_request(value) == body


@pytest.mark.parametrize(
    "value, error",
    [
        ({"id": None, "x": (float("nan"),)}, ValueError),  # a NaN in a tuple
        ({"id": None, "u": uuid.UUID(int=1)}, TypeError),  # orjson writes it, json not
        ({"id": None, "load": float("inf")}, ValueError),
    ],
)
def test_a_null_beside_what_only_orjson_writes_goes_through_json(value, error):
    """Output holding a null is kept only for plain values: anything else is json's to
    decide, as before."""
    with pytest.raises(error):
        dumps(value)


@pytest.mark.parametrize(
    ("body", "plain"),
    [
        (b'{"a":[1,2.5,null],"s":"1234567890123456789012345"}', True),
        (b'{"a":12345678901234567890123}', False),
        (b'{"a":"\\ud800"}', False),
    ],
)
def test_loads_result_says_which_parser_read_it(body, plain):
    """A run of 19 digits inside a string stays with orjson (plain); a 19-digit number
    or a lone surrogate goes to json, and the value is what loads gives either way."""
    value, got = loads_result(body)
    assert got is plain
    assert value == loads(body) == json.loads(body)
    assert type(value["a"]) is type(json.loads(body)["a"])


def test_a_parsed_object_is_written_as_the_dict_it_holds():
    """A Parsed result (nulls and all) is written as json writes the same dict."""
    value = {"node_id": "n1", "explorers": [{"last_error": None, "ok": 1.5}], "x": None}
    response = {"jsonrpc": "2.0", "result": Parsed(value), "id": 3}
    assert (
        dumps(response)
        == json.dumps(
            {"jsonrpc": "2.0", "result": value, "id": 3}, separators=(",", ":")
        ).encode()
    )
