"""
The JSON-RPC 2.0 dispatcher: bodies in, response bodies out, with no HTTP in sight.

It follows the specification (section 7's examples are our tests): batches,
notifications (answered with nothing), ``"jsonrpc": "2.0"`` required, and the standard
codes; an unexpected exception is logged and becomes -32603 without details.  Errors
become JSON-RPC error objects here and nowhere else.

The transports (:mod:`~hero_compute.rpc.http_server`, :mod:`~hero_compute.rpc.web`) hand
it the body and a :class:`CallContext`; the ``authorize`` hook sees the context, method
and raw params before the schema does.  :mod:`~hero_compute.rpc.codec` reads and writes
bodies, :mod:`~hero_compute.rpc.answers` has error objects and the response limit, and
:mod:`~hero_compute.rpc.batch` writes a batch's body within that limit.
"""

from __future__ import annotations

import collections
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Union

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from .answers import error as _error
from .answers import over_limit, unserialisable, valid_id
from .batch import answer_batch
from .codec import dumps, loads
from .context import CallContext
from .errors import (
    InternalError,
    InvalidParams,
    InvalidRequest,
    MethodNotFound,
    ParseError,
    RpcError,
)
from .limits import DEFAULTS, Limits
from .throttle import REFUSALS_EVERY, Throttle, log_refusal

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from .schema import Schema

# CallContext is part of the dispatcher's interface (handlers and the authorize hook
# receive one): importable from here, as the transports do.
__all__ = [
    "MAX_BATCH",
    "MAX_RESPONSE",
    "Answer",
    "CallContext",
    "Dispatcher",
    "service_dispatcher",
]

log = Logger()

#: What :meth:`Dispatcher.answer` returns: a response body, None (nothing to send), or a
#: Deferred of either.
Answer = Union[bytes, None, "defer.Deferred[bytes | None]"]
#: One request's response object, None for a notification, or a Deferred of either.
_Response = Union[dict[str, Any], None, "defer.Deferred[dict[str, Any] | None]"]

#: Requests in one batch, and bytes in one response body, unless the service says
#: otherwise (CONTRACT §7: ``HERO_MAX_BATCH``, ``HERO_MAX_RESPONSE``).
MAX_BATCH = DEFAULTS.max_batch
MAX_RESPONSE = DEFAULTS.max_response


@attrs.frozen
class _Handler:
    func: Callable[..., Any]
    signature: inspect.Signature
    wants_context: bool


class Dispatcher:
    """
    Runs the JSON-RPC request(s) of a body against the methods registered on it.

    Methods are plain callables registered by name; they take the params as keyword
    arguments (by-position params are mapped to names through the schema) and return a
    result, a Deferred of one, or a coroutine.  They signal failure by raising an
    :class:`~hero_compute.rpc.errors.RpcError`; any other exception is logged and becomes
    -32603 without details.

    :param schema: an optional :class:`hero_compute.rpc.schema.Schema`; when given, params
        of the methods it describes are validated, and ``rpc.discover`` serves its
        OpenRPC document
    :param version: the service's version, for ``rpc.discover``
    :param authorize: an optional callable ``(context, method_name, params)``, called
        once a call's method is known to exist and before its params are checked (they
        are the raw params: a dict, a list or None); it refuses
        the call by raising an :class:`~hero_compute.rpc.errors.RpcError` (for instance
        :class:`~hero_compute.rpc.errors.RefusedByPolicy`).  Handlers never check
        permissions themselves.
    :param max_batch: requests in one batch; a larger batch is refused whole (-32600)
    :param max_response: bytes of one response body; a larger answer is -32603, and so
        is each item of a batch that would take the batch's body past it
    :param clock: the ``IReactorTime`` on which refusal lines are rate-limited (the
        global reactor when None)
    :ivar refusals: requests refused by a limit (``max_batch``, ``max_response``), by
        limit, for metrics
    """

    def __init__(
        self,
        schema: Schema | None = None,
        version: str = "0",
        authorize: Callable[[CallContext, str, Any], object] | None = None,
        max_batch: int = MAX_BATCH,
        max_response: int = MAX_RESPONSE,
        clock: IReactorTime | None = None,
    ) -> None:
        self.max_batch = max_batch
        self.max_response = max_response
        self.refusals: collections.Counter[str] = collections.Counter()
        self._clock = clock
        # Made at the first refusal: nothing of it on the way of an answer.
        self._log: Throttle | None = None
        self._schema = schema
        self._version = version
        self._authorize = authorize
        self._handlers: dict[str, _Handler] = {}
        if schema is not None:
            self.register("rpc.discover", self._discover)

    def register(self, name: str, func: Callable[..., Any], context: bool = False) -> None:
        """
        Publish a callable as a method.

        :param name: the JSON-RPC method name
        :param func: the callable
        :param context: when true, ``func`` gets a :class:`CallContext` as first argument
        """
        signature = inspect.signature(func)
        if context:
            first = next(iter(signature.parameters))
            signature = signature.replace(
                parameters=[p for n, p in signature.parameters.items() if n != first]
            )
        self._handlers[name] = _Handler(func, signature, context)

    def method_names(self) -> set[str]:
        """:return: the names of all published methods"""
        return set(self._handlers)

    def param_names(self, name: str) -> list[str]:
        """
        :param name: a published method's name
        :return: the names of the params its handler takes, in order (the call context
            excluded)
        """
        return list(self._handlers[name].signature.parameters)

    def _discover(self) -> dict[str, Any]:
        assert self._schema is not None  # registered only with a schema
        return self._schema.openrpc(self._version)

    def answer(self, body: bytes | str, context: CallContext) -> Answer:
        """
        Run the JSON-RPC request(s) in a body; answer at once when every handler did.

        :param body: the raw bytes of the body
        :param context: the :class:`CallContext` of the call
        :return: the response body (bytes), None when there is nothing to send (only
            notifications), or a Deferred firing with either when a handler answers later
        """
        try:
            message = loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            return dumps(_error(None, ParseError(f"Parse error: {e}")))
        except RecursionError:
            # A megabyte of "[" is well under the body limit and too deep for json.loads.
            return dumps(_error(None, ParseError("Parse error: nested too deeply")))
        if isinstance(message, list):
            if not message:
                return dumps(_error(None, InvalidRequest("Invalid Request: empty batch")))
            if len(message) > self.max_batch:
                # Refused whole, before any of it runs: a batch is how one small request
                # asks for a great deal of work.
                self.refused(
                    "max_batch",
                    "a batch of {count} requests from {peer}: at most {most}",
                    count=len(message),
                    peer=context.peer,
                    most=self.max_batch,
                )
                return dumps(
                    _error(
                        None,
                        InvalidRequest(
                            f"Invalid Request: a batch may hold at most {self.max_batch} "
                            f"requests, not {len(message)}"
                        ),
                    )
                )
            return answer_batch(
                message, context, self._handle_one, self.max_response, self.refused
            )
        response = self._handle_one(message, context)
        if isinstance(response, defer.Deferred):
            return response.addCallback(self._dump_single, context)
        return self._dump_single(response, context)

    def refused(self, limit: str, what: str, **fields: object) -> None:
        """
        Count a request refused by a limit, and log it rate-limited (CONTRACT §7): one
        line per limit every :data:`~hero_compute.rpc.throttle.REFUSALS_EVERY` seconds at
        most, the others counted into the next (``and N more``).

        :param limit: the limit's name, as in metrics
        :param what: the rest of the line after ``refused (<limit>)``, a format string of
            ``fields``
        """
        self.refusals[limit] += 1
        if self._log is None:
            clock = self._clock
            if clock is None:
                from twisted.internet import reactor as clock
            self._log = Throttle(clock, REFUSALS_EVERY)  # type: ignore[arg-type]
        log_refusal(log, self._log, limit, what, **fields)

    def _dump_single(
        self, response: dict[str, Any] | None, context: CallContext
    ) -> bytes | None:
        return None if response is None else self._dump(response, context)

    def _dump(self, response: dict[str, Any], context: CallContext) -> bytes:
        try:
            data = dumps(response)
        except (TypeError, ValueError, RecursionError):
            return unserialisable(response)
        limit = self.max_response
        if len(data) <= limit:
            return data
        return over_limit(response, data, limit, context.peer, self.refused)

    def _handle_one(self, message: Any, context: CallContext) -> _Response:
        """
        :return: a response object, None for a notification, or a Deferred firing with
            one of these when the handler answers later
        """
        if not isinstance(message, dict):
            return _error(None, InvalidRequest("Invalid Request: not an object"))
        rid = message.get("id")
        if not valid_id(rid):
            return _error(
                None,
                InvalidRequest("Invalid Request: id must be a string, a number or null"),
            )
        notification = "id" not in message
        try:
            handler, args, kwargs = self._prepare(message, context)
        except RpcError as e:
            # A request too broken to run is still answered when it carries an id: the
            # caller could not otherwise tell it was refused.
            return (
                None if notification and e.code != InvalidRequest.code else _error(rid, e)
            )
        except RecursionError:
            # Params nested nearly as deep as json.loads allows (a 970-deep array) pass
            # the parser but not the validator, which recurses deeper (CONTRACT §7):
            # the caller's mistake, answered -32602 without a traceback in the log per
            # request (an attacker's log flood).
            return (
                None
                if notification
                else _error(rid, InvalidParams("Invalid params: nested too deeply"))
            )
        except Exception:
            # A bug of ours: raised here it would escape to the transport as a 500, and
            # take the rest of a batch with it.
            log.failure("preparing {method} failed", method=message.get("method"))
            return None if notification else _error(rid, InternalError("Internal error"))
        try:
            result = handler.func(*args, **kwargs)
        except Exception:
            failure = Failure()
            if notification:
                _log_unexpected(failure, message)
                return None
            return _error(rid, _as_rpc_error(failure, message))
        if not isinstance(result, defer.Deferred):
            if not inspect.iscoroutine(result):
                return (
                    None
                    if notification
                    else {"jsonrpc": "2.0", "result": result, "id": rid}
                )
            result = defer.ensureDeferred(result)
        d = result
        if notification:
            d.addCallbacks(lambda _: None, lambda f: _log_unexpected(f, message))
            return d
        d.addCallbacks(
            lambda result: {"jsonrpc": "2.0", "result": result, "id": rid},
            lambda f: _error(rid, _as_rpc_error(f, message)),
        )
        return d

    def _prepare(
        self, message: dict[str, Any], context: CallContext
    ) -> tuple[_Handler, list[Any], dict[str, Any]]:
        if message.get("jsonrpc") != "2.0":
            raise InvalidRequest('Invalid Request: "jsonrpc" must be exactly "2.0"')
        name = message.get("method")
        if not isinstance(name, str):
            raise InvalidRequest('Invalid Request: "method" must be a string')
        unknown = set(message) - {"jsonrpc", "method", "params", "id"}
        if unknown:
            raise InvalidRequest(f"Invalid Request: unknown members {sorted(unknown)}")
        params = message.get("params")
        if "params" in message and not isinstance(params, (list, dict)):
            raise InvalidRequest('Invalid Request: "params" must be an array or an object')
        handler = self._handlers.get(name)
        if handler is None:
            raise MethodNotFound(f"Method not found: {name}")
        if self._authorize is not None:
            # The one place a permission is checked: who (the context) may call what.
            self._authorize(context, name, params)
        spec = self._schema.methods.get(name) if self._schema is not None else None
        if spec is not None:
            # The schema names exactly the handler's params (the drift test holds us to
            # it), so params it accepts always bind.
            kwargs = spec.coerce_params(params)
            args: list[Any] = []
        else:
            args, kwargs = ([], params) if isinstance(params, dict) else (params or [], {})
            try:
                handler.signature.bind(*args, **kwargs)
            except TypeError as e:
                raise InvalidParams(f"invalid params for {name}: {e}") from None
        if handler.wants_context:
            args = [context, *args]
        return handler, args, kwargs


def service_dispatcher(
    service: str,
    limits: Limits,
    authorize: Callable[[CallContext, str, Any], object] | None,
    clock: IReactorTime | None = None,
) -> Dispatcher:
    """
    The dispatcher of a service, as the explorer, its dashboard and the node each build
    theirs: the service's schema, the package's version for ``rpc.discover``, its
    authorize hook and the batch and response limits.

    :param service: ``"explorer"`` or ``"node"``, the schema's name
    :param limits: the :class:`~hero_compute.rpc.limits.Limits`
    :param authorize: the authorize hook (see :class:`Dispatcher`)
    :param clock: the reactor, on which its refusal lines are rate-limited
    """
    import hero_compute

    # The schema's validators are compiled at load: not at import of the transport.
    from .schema import load_schema

    return Dispatcher(
        load_schema(service),
        hero_compute.__version__,
        authorize=authorize,
        max_batch=limits.max_batch,
        max_response=limits.max_response,
        clock=clock,
    )


def _as_rpc_error(failure: Failure, message: dict[str, Any]) -> RpcError:
    if isinstance(failure.value, RpcError):
        return failure.value
    if failure.check(defer.CancelledError):
        return InternalError("Internal error: the call was cancelled")
    _log_unexpected(failure, message)
    return InternalError("Internal error")


def _log_unexpected(failure: Failure, message: dict[str, Any]) -> None:
    if not failure.check(RpcError, defer.CancelledError):
        log.failure("method {method} failed", failure, method=message.get("method"))
