"""
The JSON-RPC 2.0 dispatcher: bodies in, response bodies out, with no HTTP in sight.

It follows the specification (section 7's examples are our tests): batches,
notifications (answered with nothing), ``"jsonrpc": "2.0"`` required, and the standard
codes; an unexpected exception is logged and becomes -32603 without details.  Errors
become JSON-RPC error objects here and nowhere else.

The transports (:mod:`hero_compute.rpc.http_server`, :mod:`hero_compute.rpc.web`) hand it
the raw body and a :class:`CallContext`; between the two sits one optional check, the
``authorize`` hook, given the context, the method name and the raw params before the
params are checked against the schema.

Long because: JSON-RPC 2.0's rules (requests, batches, notifications, errors, what can
be encoded) are one specification, kept in one reading.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Union, cast

import attrs
import orjson
from twisted.internet import defer
from twisted.internet.address import UNIXAddress
from twisted.internet.interfaces import ISSLTransport, ITransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from .errors import (
    InternalError,
    InvalidParams,
    InvalidRequest,
    MethodNotFound,
    ParseError,
    RpcError,
)

if TYPE_CHECKING:
    from OpenSSL.crypto import X509

    from .schema import Schema

log = Logger()

#: What :meth:`Dispatcher.answer` returns: a response body, None (nothing to send), or a
#: Deferred of either.
Answer = Union[bytes, None, "defer.Deferred[bytes | None]"]
#: One request's response object, None for a notification, or a Deferred of either.
_Response = Union[dict[str, Any], None, "defer.Deferred[dict[str, Any] | None]"]

# NaN and Infinity are not JSON: a result holding one is an internal error, not a body
# that strict parsers refuse.
_encode = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, separators=(",", ":")
).encode
_encode_ascii = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    # 1e400 is valid JSON syntax but no number we could ever send back (it parses as
    # infinity): refused at the door, it can never poison a record that others list.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value


#: A number of 19 digits or more (where a JSON number may start: after ``[``, ``,``,
#: ``:`` or white space): orjson would read it as a float, where JSON (and Python's
#: json) keep an integer exact; such a body takes the slower parser.  Digits inside a
#: string (a hex secret) do not match, unless a string holds such a number itself,
#: which only costs that body the slower parser.
_LONG_NUMBER = re.compile(rb"[\[,:\s]-?[0-9]{19}")


def loads(body: bytes | str) -> Any:
    """
    Parse a JSON body, strictly: NaN and Infinity are refused, and so is a number too
    large to be finite (1e400).

    ``orjson`` parses a heartbeat about four times as fast as ``json`` and refuses
    exactly those; anything it does not take (a lone surrogate escape, nesting over 1024
    deep, an integer past 64 bits, invalid JSON) goes through ``json``, which decides
    and words the error as before.

    :raise ValueError, UnicodeDecodeError, RecursionError: when it is not JSON we take
    """
    if isinstance(body, bytes) and _LONG_NUMBER.search(body) is None:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    return json.loads(body, parse_constant=_no_constants, parse_float=_finite)


#: Requests in one batch, and bytes in one response body, unless the service says
#: otherwise (CONTRACT §7: ``HERO_MAX_BATCH``, ``HERO_MAX_RESPONSE``).
MAX_BATCH = 100
MAX_RESPONSE = 16 * 1024 * 1024


@attrs.frozen
class CallContext:
    """
    What a handler (and the ``authorize`` hook) may know of the call besides its params.

    :ivar transport: ``"unix"``, ``"tcp"`` or ``"tls"``: how the request reached us
    :ivar peer: the peer's address, for logs (``host:port``, or ``"unix"``)
    :ivar identity: over TLS, the verified identity of the peer's certificate
        (a :class:`~hero_compute.rpc.tls.PeerIdentity`), or None
    :ivar serial: over TLS, the serial number of the peer's certificate, or None
    :ivar host: the peer's IP address (TCP and TLS), or None
    :ivar not_before: over TLS, the ``not_valid_before`` of the peer's certificate
        (Unix seconds), or None
    :ivar uid: over a Unix socket, the peer process's user id (``SO_PEERCRED``), or
        None
    """

    transport: str
    peer: str
    identity: object = None
    serial: int | None = None
    host: str | None = None
    not_before: float | None = None
    uid: int | None = None

    @property
    def secure(self) -> bool:
        """Whether the connection is TLS."""
        return self.transport == "tls"

    @classmethod
    def from_transport(
        cls, transport: ITransport, trust_domain: str | None = None
    ) -> CallContext:
        """
        :param transport: the transport of a connection whose TLS handshake (if any) is
            done: call this once the first request has arrived
        :param trust_domain: the fleet's trust domain, to read a TLS peer's identity
        :return: the context of the calls on that connection
        """
        if isinstance(transport.getHost(), UNIXAddress):
            return cls("unix", "unix", uid=_peer_uid(transport))
        peer = transport.getPeer()
        host = getattr(peer, "host", None)
        where = f"{host or '?'}:{getattr(peer, 'port', '?')}"
        if not ISSLTransport.providedBy(transport):
            return cls("tcp", where, host=host)
        # Twisted's TLS gives pyOpenSSL's X509; the interface says only "object".
        cert = cast("X509 | None", transport.getPeerCertificate())
        if cert is None or trust_domain is None:
            return cls("tls", where, host=host)
        from .tls import identity_of, not_before

        return cls(
            "tls",
            where,
            identity_of(cert, trust_domain),
            cert.get_serial_number(),
            host,
            not_before(cert),
        )


def _peer_uid(transport: ITransport) -> int | None:
    # Who is at the other end of a Unix socket, for the audit log: the kernel's word
    # (SO_PEERCRED: pid, uid, gid), not anything the peer says.
    try:
        handle = transport.getHandle()  # type: ignore[attr-defined]
        creds = handle.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    except (AttributeError, OSError):
        return None
    return int(struct.unpack("3i", creds)[1])


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
    """

    def __init__(
        self,
        schema: Schema | None = None,
        version: str = "0",
        authorize: Callable[[CallContext, str, Any], object] | None = None,
        max_batch: int = MAX_BATCH,
        max_response: int = MAX_RESPONSE,
    ) -> None:
        self.max_batch = max_batch
        self.max_response = max_response
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
            return _dump(_error(None, ParseError(f"Parse error: {e}")))
        except RecursionError:
            # A megabyte of "[" is well under the body limit and too deep for json.loads.
            return _dump(_error(None, ParseError("Parse error: nested too deeply")))
        limit = self.max_response
        if isinstance(message, list):
            if not message:
                return _dump(
                    _error(None, InvalidRequest("Invalid Request: empty batch")), limit
                )
            if len(message) > self.max_batch:
                # Refused whole, before any of it runs: a batch is how one small request
                # asks for a great deal of work.
                return _dump(
                    _error(
                        None,
                        InvalidRequest(
                            f"Invalid Request: a batch may hold at most {self.max_batch} "
                            f"requests, not {len(message)}"
                        ),
                    ),
                    limit,
                )
            responses = [self._handle_one(item, context) for item in message]
            if any(isinstance(r, defer.Deferred) for r in responses):
                d = defer.gatherResults(
                    [
                        r if isinstance(r, defer.Deferred) else defer.succeed(r)
                        for r in responses
                    ],
                    consumeErrors=True,
                )
                return d.addCallback(_dump_batch, limit)
            # None of them is a Deferred.
            return _dump_batch(cast(list[dict[str, Any] | None], responses), limit)
        response = self._handle_one(message, context)
        if isinstance(response, defer.Deferred):
            return response.addCallback(_dump_single, limit)
        return _dump_single(response, limit)

    def _handle_one(self, message: Any, context: CallContext) -> _Response:
        """
        :return: a response object, None for a notification, or a Deferred firing with
            one of these when the handler answers later
        """
        if not isinstance(message, dict):
            return _error(None, InvalidRequest("Invalid Request: not an object"))
        rid = message.get("id")
        if not _valid_id(rid):
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
        if inspect.iscoroutine(result):
            result = defer.ensureDeferred(result)
        if not isinstance(result, defer.Deferred):
            return None if notification else {"jsonrpc": "2.0", "result": result, "id": rid}
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


def _valid_id(rid: object) -> bool:
    if isinstance(rid, float):
        return math.isfinite(rid)  # 1e400 parses as inf, which cannot be echoed
    return rid is None or (isinstance(rid, (str, int)) and not isinstance(rid, bool))


def _error(rid: Any, error: RpcError) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "error": error.to_wire(), "id": rid}


def _dump_batch(
    responses: list[dict[str, Any] | None], limit: int = MAX_RESPONSE
) -> bytes | None:
    answered = [r for r in responses if r is not None]
    return _dump(answered, limit) if answered else None


def _dump_single(
    response: dict[str, Any] | None, limit: int = MAX_RESPONSE
) -> bytes | None:
    return None if response is None else _dump(response, limit)


def _too_large(response: dict[str, Any]) -> dict[str, Any]:
    return _error(response.get("id"), InternalError("response too large"))


def _serialise(response: object) -> bytes:
    """
    :return: the UTF-8 JSON of ``response``
    :raise TypeError, ValueError, RecursionError: when it is not JSON-serialisable

    ``orjson`` writes a page of a thousand nodes in a tenth of ``json``'s time.  It
    refuses what it cannot write as ``json`` would (integers past 64 bits, lone
    surrogates, keys that are not strings, nesting past 254): those go to ``json``.
    The one thing it writes differently, a NaN or infinity (as ``null``), cannot hide:
    any ``null`` in its output sends the response through ``json``, which refuses it.
    """
    try:
        data = orjson.dumps(response)
    except TypeError:
        pass
    else:
        if b"null" not in data:
            return data
    text = _encode(response)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (a legal JSON escape, say in a string id or a method name
        # echoed in an error) has no UTF-8 form: escape it again.
        return _encode_ascii(response).encode("ascii")


def _dump(
    response: dict[str, Any] | list[dict[str, Any]], limit: int = MAX_RESPONSE
) -> bytes:
    try:
        data = _serialise(response)
    except (TypeError, ValueError, RecursionError):
        log.failure("result is not JSON-serialisable")
        if isinstance(response, list):
            return _serialise([_dump_one_safely(r) for r in response])
        return _serialise(_error(response.get("id"), InternalError("Internal error")))
    if len(data) <= limit:
        return data
    if not isinstance(response, list):
        return _serialise(_too_large(response))
    # Only the items that are too large become errors; the rest of the batch stands.
    items = [_serialise(r) for r in response]
    return (
        b"["
        + b",".join(
            item if len(item) <= limit else _serialise(_too_large(r))
            for item, r in zip(items, response, strict=True)
        )
        + b"]"
    )


def _dump_one_safely(response: dict[str, Any]) -> dict[str, Any]:
    try:
        _serialise(response)
        return response
    except (TypeError, ValueError, RecursionError):
        return _error(response.get("id"), InternalError("Internal error"))
