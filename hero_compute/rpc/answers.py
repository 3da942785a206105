"""
What the dispatcher (:mod:`~hero_compute.rpc.dispatch`) answers with, beyond a handler's
result: JSON-RPC error objects, ids it may echo, and the -32603 ``response too large``
of an answer over the response limit (``HERO_MAX_RESPONSE``, CONTRACT §7).  A single
response is checked here once written; a batch's body is bounded as it is written, item
by item, in :mod:`~hero_compute.rpc.batch`.
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


#: The body of :func:`too_large` up to its id: the error is the same for every item.
_TOO_LARGE_HEAD = (
    b'{"jsonrpc":"2.0","error":{"code":-32603,"message":"response too large"},"id":'
)


def too_large(rid: Any) -> bytes:
    """
    :return: the encoded -32603 ``response too large`` answer to the request ``rid``,
        the one an item over ``HERO_MAX_RESPONSE`` (CONTRACT §7) gets: the same bytes
        as ``dumps(error(rid, InternalError("response too large")))``, without building
        the error (a batch reckons the size of one for each of its items)
    """
    return b"%s%s}" % (_TOO_LARGE_HEAD, b"null" if rid is None else dumps(rid))


def over_limit(
    response: dict[str, Any],
    data: bytes,
    limit: int,
    peer: str,
    refused: Callable[..., object],
) -> bytes:
    """
    The body of a single response whose encoding ``data`` is over ``limit`` bytes:
    -32603 ``response too large`` (a batch's body is bounded as it is written, in
    :mod:`~hero_compute.rpc.batch`).

    :param peer: the caller, for the log
    :param refused: :meth:`~hero_compute.rpc.dispatch.Dispatcher.refused`, to count and
        log the refusal
    """
    refused(
        "max_response",
        "a response of {size} bytes to {peer}: at most {most}",
        size=len(data),
        peer=peer,
        most=limit,
    )
    return too_large(response.get("id"))


def unserialisable(response: dict[str, Any]) -> bytes:
    """
    The answer to a response that cannot be JSON: -32603 without details, the cause
    logged (called where the encoder raised, so that the log has its traceback).
    """
    log.failure("result is not JSON-serialisable")
    return dumps(error(response.get("id"), InternalError("Internal error")))
