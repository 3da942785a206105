"""
A batch's response body, written item by item as the items are answered, within the
response limit (``HERO_MAX_RESPONSE``, CONTRACT §7: one response body, and beyond it
"that item -32603 ``response too large``").

Each item is encoded as soon as its handler has answered, and its result let go: a batch
of a hundred pages each just under the limit holds one page's result and at most a
body's worth of bytes at any time, never a hundred results, and sends one body within
the limit, never a hundred times it.  An item whose answer would take the body past the
limit is answered -32603 ``response too large`` instead, logged and counted as every
refusal is (:meth:`~hero_compute.rpc.dispatch.Dispatcher.refused`).

Every request with an id is owed an answer (JSON-RPC 2.0), and that error is bytes of
the body too: room for it is kept for every item not yet answered, so the errors still
to come always fit.  The body then never passes the limit, unless those errors alone
would (a limit of a few kilobytes, a batch of a hundred): then it is at most their size,
and an answer that fits in that is still given.

Room goes to the items in the order they are answered: a synchronous handler's at
once, in the batch's order; a Deferred's when it fires.  The body lists the answers in
the order of the requests whatever the order they came in (JSON-RPC allows any order).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from .answers import error, too_large, unserialisable, valid_id
from .codec import dumps
from .context import CallContext
from .errors import InternalError

__all__ = ["answer_batch", "room"]

log = Logger()


def answer_batch(
    messages: list[Any],
    context: CallContext,
    handle: Callable[[Any, CallContext], Any],
    limit: int,
    refused: Callable[..., object],
) -> bytes | None | defer.Deferred[bytes | None]:
    """
    Run a batch's requests and write its response body, within ``limit`` bytes.

    :param messages: the batch's requests as parsed (a list, not empty)
    :param context: the :class:`CallContext` of the call
    :param handle: runs one request: returns its response object, None (a
        notification), or a Deferred firing with either (the dispatcher's)
    :param limit: bytes of the body (``max_response``)
    :param refused: :meth:`~hero_compute.rpc.dispatch.Dispatcher.refused`, called for
        each item refused
    :return: the body, None when there is nothing to send (only notifications), or a
        Deferred firing with either once the last item is answered
    """
    body = _Body(messages, limit, context.peer, refused)
    settle, wait = body.settle, body.wait
    for i, message in enumerate(messages):
        response = handle(message, context)
        if isinstance(response, defer.Deferred):
            wait(i, response)
        else:
            settle(i, response)
        # Written: let go before the next one runs.
        del response
    return body.done()


def _answer_id(message: Any) -> Any:
    """:return: the id an answer to ``message`` carries, if it is answered at all"""
    if not isinstance(message, dict):
        return None
    rid = message.get("id")
    kind = type(rid)
    if kind is int or kind is str or rid is None:
        return rid
    return rid if valid_id(rid) else None


#: An item's room beside its id: the rest of its -32603, and a comma or bracket.
_ROOM = len(too_large(None)) - len(b"null") + 1


def _room_of(message: Any) -> int:
    """:return: the :func:`room` of the answer to ``message`` (its usual id at once)"""
    if isinstance(message, dict):
        rid = message.get("id")
        if type(rid) is int:
            return _ROOM + len(str(rid))
    return room(_answer_id(message))


def room(rid: Any) -> int:
    """
    :return: the bytes that the -32603 ``response too large`` answer to ``rid`` takes
        in a batch's body (``len(too_large(rid)) + 1``, reckoned without writing it)
    """
    if rid is None:
        return _ROOM + 4
    if type(rid) is int:
        # As json and orjson write it; an id of over 4,300 digits is no JSON we read.
        return _ROOM + len(str(rid))
    return _ROOM + len(dumps(rid))


class _Body:
    """
    One batch's body as its items are answered: the bytes of those given, and the room
    kept for the -32603 of those not yet answered.

    The body's size is ``1 + sum(len(answer) + 1)`` (the brackets, and a comma between
    two answers), so each item counts one byte beside its answer.
    """

    __slots__ = (
        "_bound",
        "_deferred",
        "_messages",
        "_left",
        "_limit",
        "_parts",
        "_peer",
        "_refused",
        "_reserved",
        "_rooms",
        "_used",
        "_waiting",
    )

    def __init__(
        self, messages: list[Any], limit: int, peer: str, refused: Callable[..., object]
    ) -> None:
        # The requests (the caller holds them anyway): their ids, when an item is refused.
        self._messages = messages
        self._rooms = [_room_of(m) for m in messages]
        self._reserved = sum(self._rooms)
        self._used = 1
        # An answer owed to each item is more than any limit can take back: with too
        # small a limit, the body may grow to what the errors alone would take.
        self._bound = max(limit, 1 + self._reserved)
        self._limit = limit
        self._peer = peer
        self._refused = refused
        self._parts: list[bytes | None] = [None] * len(messages)
        self._left = len(messages)
        self._waiting: dict[int, defer.Deferred[Any]] = {}
        self._deferred: defer.Deferred[bytes | None] | None = None

    def wait(self, i: int, d: defer.Deferred[Any]) -> None:
        """Settle item ``i`` when ``d`` fires."""
        self._waiting[i] = d
        d.addCallback(self._fired, i).addErrback(self._broken, i)

    def _fired(self, response: dict[str, Any] | None, i: int) -> None:
        # Returning None lets the Deferred drop the result.
        del self._waiting[i]
        self.settle(i, response)

    def _broken(self, failure: Failure, i: int) -> None:
        # A bug of ours (the dispatcher's Deferreds answer every failure), or no memory
        # left to encode the answer: the item answered all the same, so that the batch
        # is not left waiting for it forever.
        log.failure("answering an item of a batch failed", failure)
        self._waiting.pop(i, None)
        self.settle(
            i, error(_answer_id(self._messages[i]), InternalError("Internal error"))
        )

    def settle(self, i: int, response: dict[str, Any] | None) -> None:
        """
        Item ``i`` is answered: ``response`` (None for a notification) is encoded, and
        kept if it fits beside the answers given and the room kept for the others;
        otherwise the item is answered -32603 ``response too large``.
        """
        data = None
        if response is not None:
            try:
                data = dumps(response)
            except (TypeError, ValueError, RecursionError):
                data = unserialisable(response)
        self._reserved -= self._rooms[i]
        if data is not None:
            size = len(data) + 1
            if self._used + size + self._reserved > self._bound:
                self._refused(
                    "max_response",
                    "a response of {size} bytes to {peer}: at most {most}",
                    size=self._used + size + self._reserved,
                    peer=self._peer,
                    most=self._limit,
                )
                data = too_large(_answer_id(self._messages[i]))
                size = len(data) + 1
            self._used += size
            self._parts[i] = data
        self._left -= 1
        if not self._left and self._deferred is not None and not self._deferred.called:
            self._deferred.callback(self._join())

    def done(self) -> bytes | None | defer.Deferred[bytes | None]:
        """:return: the body if every item is answered, else a Deferred of it"""
        if not self._left:
            return self._join()
        self._deferred = defer.Deferred(self._cancel)
        return self._deferred

    def _cancel(self, _: defer.Deferred[bytes | None]) -> None:
        # The caller hung up: stop the calls still running (each is then answered
        # -32603, and the last completes the body, which no one reads).
        for d in list(self._waiting.values()):
            d.cancel()

    def _join(self) -> bytes | None:
        parts, self._parts = self._parts, []
        pieces = [b"["]
        for part in parts:
            if part is not None:
                pieces += (part, b",")
        if len(pieces) == 1:
            return None
        # One copy of the body, where b"[" + b",".join(...) + b"]" makes two.
        pieces[-1] = b"]"
        return b"".join(pieces)
