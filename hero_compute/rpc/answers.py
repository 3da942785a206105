"""
What the dispatcher (:mod:`~hero_compute.rpc.dispatch`) answers with, beyond a handler's
result: JSON-RPC error objects, ids it may echo, and a response body brought within the
response limit (``HERO_MAX_RESPONSE``, CONTRACT §7): an item over it becomes -32603
``response too large``, the rest of its batch stands.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from .codec import dumps
from .errors import InternalError, RpcError

log = Logger()


def valid_id(rid: object) -> bool:
    """:return: whether ``rid`` is an id a JSON-RPC response may echo"""
    if isinstance(rid, float):
        return math.isfinite(rid)  # 1e400 parses as inf, which cannot be echoed
    return rid is None or (isinstance(rid, (str, int)) and not isinstance(rid, bool))


def error(rid: Any, error: RpcError) -> dict[str, Any]:
    """:return: the response object carrying ``error`` for the request ``rid``"""
    return {"jsonrpc": "2.0", "error": error.to_wire(), "id": rid}


def over_limit(
    response: dict[str, Any] | list[dict[str, Any]],
    data: bytes,
    limit: int,
    peer: str,
    refused: Callable[..., object],
) -> bytes:
    """
    The body of a response whose encoding ``data`` is over ``limit`` bytes: each item
    over it becomes -32603 ``response too large``; the rest of a batch stands.

    :param peer: the caller, for the log
    :param refused: :meth:`~hero_compute.rpc.dispatch.Dispatcher.refused`, called for
        each item refused, to count and log it
    """
    if isinstance(response, list):
        items, answers = response, [dumps(r) for r in response]
    else:
        items, answers = [response], [data]
    for i, answer in enumerate(answers):
        if len(answer) > limit:
            refused(
                "max_response",
                "a response of {size} bytes to {peer}: at most {most}",
                size=len(answer),
                peer=peer,
                most=limit,
            )
            answers[i] = dumps(
                error(items[i].get("id"), InternalError("response too large"))
            )
    if not isinstance(response, list):
        return answers[0]
    return b"[" + b",".join(answers) + b"]"


def unserialisable(response: dict[str, Any] | list[dict[str, Any]]) -> bytes:
    """The answer to a response that cannot be JSON: its items that can, -32603 others."""
    log.failure("result is not JSON-serialisable")
    if isinstance(response, list):
        return dumps([_one_safely(r) for r in response])
    return dumps(error(response.get("id"), InternalError("Internal error")))


def _one_safely(response: dict[str, Any]) -> dict[str, Any]:
    try:
        dumps(response)
        return response
    except (TypeError, ValueError, RecursionError):
        return error(response.get("id"), InternalError("Internal error"))
