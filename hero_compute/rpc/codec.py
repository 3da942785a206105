"""
The JSON codec of the JSON-RPC transports: bodies parsed and written the way Python's
``json`` does, at ``orjson``'s speed wherever the two agree.

``orjson`` parses a heartbeat about four times as fast as ``json``, and writes a page of
a thousand nodes in a tenth of its time.  Where it decides differently (integers past 64
bits, lone surrogates, nesting, NaN written as ``null``), the body goes through ``json``,
which decides and words the error as it always has: :func:`loads` and :func:`dumps` are
``json``'s functions, only faster (``tests/test_codec.py`` holds them to that).

The server (:mod:`~hero_compute.rpc.dispatch`) and the client
(:mod:`~hero_compute.rpc.http_client`) both read and write through here.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson

__all__ = ["Parsed", "dumps", "dumps_request", "loads", "loads_result"]


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    # 1e400 is valid JSON syntax but no number we could ever send back (it parses as
    # infinity): refused at the door, it can never poison a record that others list.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value


#: A number of 19 digits or more (where a JSON number may start: at the start of the
#: body, after ``[``, ``,``, ``:`` or white space): orjson would read it as a float,
#: where JSON (and Python's json) keep an integer exact; such a body takes the slower
#: parser.  Digits inside a string (a hex secret) do not match, unless a string holds
#: such a number itself, which only costs that body the slower parser.
_LONG_NUMBER = re.compile(rb"(?:^|[\[,:\s])-?[0-9]{19}")

#: Every digit to ``0``, everything else to a space: a body whose translation holds no
#: run of 19 ``0``s has no such number, found in a fifth of the time the pattern takes
#: (1 us against 8 us for a heartbeat; two bodies per proxied call).  Only a body with
#: a run of 19 digits somewhere (a long hex string, or the number) asks the pattern.
_DIGITS = bytes(48 if 48 <= i <= 57 else 32 for i in range(256))
_DIGIT_RUN = b"0" * 19


def loads(body: bytes | str) -> Any:
    """
    Parse a JSON body, strictly: NaN and Infinity are refused, and so is a number too
    large to be finite (1e400).

    ``orjson`` refuses exactly those; anything it does not take (a lone surrogate
    escape, nesting over 1024 deep, an integer past 64 bits, invalid JSON) goes through
    ``json``, which decides and words the error.

    :raise ValueError, UnicodeDecodeError, RecursionError: when it is not JSON we take
    """
    if isinstance(body, bytes) and (
        _DIGIT_RUN not in body.translate(_DIGITS) or _LONG_NUMBER.search(body) is None
    ):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    return json.loads(body, parse_constant=_no_constants, parse_float=_finite)


class Parsed(dict):  # type: ignore[type-arg]
    """
    A JSON object as ``orjson`` read it, passed on as it came (a proxied call's
    result): :func:`dumps` writes it without walking it, since ``orjson`` parses no NaN
    or infinity and makes only plain values.  The walk was 10 us of the explorer's
    Python time per proxied ``node.info`` (its answer holds ``null``s).  Nothing may
    change one after it was parsed.
    """

    __slots__ = ()


def loads_result(body: bytes) -> tuple[Any, bool]:
    """
    :func:`loads`, telling whether ``orjson`` read the body: then every object in it
    may become a :class:`Parsed`.

    :return: ``(value, plain)``
    :raise ValueError, UnicodeDecodeError, RecursionError: as :func:`loads`
    """
    if _DIGIT_RUN not in body.translate(_DIGITS) or _LONG_NUMBER.search(body) is None:
        try:
            return orjson.loads(body), True
        except orjson.JSONDecodeError:
            pass
    return json.loads(body, parse_constant=_no_constants, parse_float=_finite), False


# NaN and Infinity are not JSON: a value holding one is refused (a result holding one is
# an internal error, not a body that strict parsers refuse).
_encode = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, separators=(",", ":")
).encode
_encode_ascii = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode


#: Leaf types ``orjson`` writes exactly as ``json`` does (floats apart, see :func:`_plain`).
_PLAIN = frozenset((str, int, bool, type(None)))
_INFINITIES = (math.inf, -math.inf)


def _plain(value: object) -> bool:
    """
    :return: whether ``value`` is made only of dicts, lists, strings, integers,
        booleans, None and finite floats: then its ``null``s are its Nones

    Anything else (a NaN, a tuple, a subclass, a type only ``orjson`` knows) says no,
    and the value goes through ``json`` as every value holding a ``null`` once did.
    """
    stack = [value]
    pop, extend = stack.pop, stack.extend
    while stack:
        item = pop()
        kind = type(item)
        if kind is dict:
            extend(item.values())  # type: ignore[attr-defined]
        elif kind is list:
            extend(item)  # type: ignore[arg-type]
        elif kind is float:
            if item != item or item in _INFINITIES:
                return False
        elif kind not in _PLAIN and kind is not Parsed:
            return False
    return True


def dumps(value: object) -> bytes:
    """
    :return: the UTF-8 JSON of ``value``, compact
    :raise TypeError, ValueError, RecursionError: when it is not JSON-serialisable
        (NaN and infinities included)

    ``orjson`` refuses what it cannot write as ``json`` would (integers past 64 bits,
    lone surrogates, keys that are not strings, nesting past 254): those go to ``json``.
    The one thing it writes differently, a NaN or infinity (as ``null``), cannot hide:
    output holding a ``null`` is kept only when :func:`_plain` finds every leaf plain
    (a walk: 2 us for an error with ``"id": null``, 70 us for a hundred VMs, a third to
    a half of what writing it again with ``json`` took); otherwise the value goes
    through ``json``, which refuses a NaN.
    """
    try:
        data = orjson.dumps(value)
    except TypeError:
        pass
    else:
        if b"null" not in data or _plain(value):
            return data
    text = _encode(value)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (a legal JSON escape, say in a string id or a method name
        # echoed in an error) has no UTF-8 form: escape it again.
        return _encode_ascii(value).encode("ascii")


#: Request bodies: ASCII (non-ASCII escaped), and NaN written as ``json`` always has.
_encode_request = json.JSONEncoder(separators=(",", ":")).encode


def dumps_request(value: object) -> bytes:
    """
    :return: the ASCII JSON of ``value`` as the client writes it in a request (every
        non-ASCII character escaped; NaN and infinities written as ``json`` writes them)
    :raise TypeError, ValueError, RecursionError: when ``json`` cannot write it
    """
    return _encode_request(value).encode("ascii")
