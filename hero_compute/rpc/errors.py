"""
Errors that cross the wire, and errors of the transport underneath.

A handler raises one of the :class:`RpcError` subclasses; the dispatcher turns it into a
JSON-RPC error object, and the client turns such an object back into the same class.
Anything else a handler raises is a bug and becomes -32603 without details.
"""

from __future__ import annotations

from typing import Any

from txjsonrpc_ng.jsonrpclib import Fault


class RpcError(Fault):
    """
    A JSON-RPC error object: ``code``, ``message`` and optional ``data``.

    It is a txjsonrpc ``Fault``, so code written against txjsonrpc's fault handling
    understands it too.

    :param message: human-readable text for the caller
    :param data: optional JSON-serialisable details
    :param code: the error code; defaults to the class's own
    """

    code = -32603
    #: The standard message of the class's code (the specification's for its own codes,
    #: ours for the application's), listed in the OpenRPC document's ``errors``.
    summary = "error"

    def __init__(self, message: str, data: Any = None, code: int | None = None) -> None:
        if code is not None:
            self.code = code
        Fault.__init__(self, self.code, message)
        self.message = message
        self.data = data

    def to_wire(self) -> dict[str, Any]:
        """
        :return: the JSON-RPC error object for this error
        """
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error

    @classmethod
    def from_wire(cls, error: dict[str, Any]) -> RpcError:
        """
        Rebuild the exception for an error object received from a peer, as the most
        specific class that carries its code.

        :param error: a JSON-RPC error object (a dict)
        :return: an :class:`RpcError` instance
        """
        code = error.get("code")
        if not isinstance(code, int) or isinstance(code, bool):
            code = InternalError.code
        message = error.get("message")
        if not isinstance(message, str):
            message = "error without a message"
        klass = _BY_CODE.get(code, RpcError)
        return klass(message, data=error.get("data"), code=code)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.code}: {self.message!r}>"

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ParseError(RpcError):
    """The body is not valid JSON."""

    code = -32700
    summary = "Parse error"


class InvalidRequest(RpcError):
    """The JSON is not a valid JSON-RPC 2.0 request object."""

    code = -32600
    summary = "Invalid Request"


class MethodNotFound(RpcError):
    """No such method."""

    code = -32601
    summary = "Method not found"


class InvalidParams(RpcError):
    """The params do not match the method's schema."""

    code = -32602
    summary = "Invalid params"


class InternalError(RpcError):
    """The server failed; details are in its log, never on the wire."""

    code = -32603
    summary = "Internal error"


class NodeNotFound(RpcError):
    """The explorer has no node by that id."""

    code = -32001
    summary = "node not found"


class NodeOffline(RpcError):
    """The node is known but has stopped heartbeating."""

    code = -32002
    summary = "node offline"


class NodeUnreachable(RpcError):
    """Connecting to the node failed or the call timed out."""

    code = -32003
    summary = "node unreachable"


class VmNotFound(RpcError):
    """The node has no VM by that id."""

    code = -32004
    summary = "VM not found"


class InvalidVmState(RpcError):
    """The VM's state (or the node's capacity) does not allow this operation."""

    code = -32005
    summary = "invalid VM state for this operation"


class NoNodeFits(RpcError):
    """No online node fits a placement (CONTRACT §9); ``data`` counts the nodes set
    aside by each reason."""

    code = -32006
    summary = "no node fits"


class StoreUnavailable(RpcError):
    """The explorer's shared state store cannot be reached; what needs it waits for it."""

    code = -32007
    summary = "state store unavailable"

    def __init__(
        self,
        message: str = "state store unavailable",
        data: Any = None,
        code: int | None = None,
    ) -> None:
        RpcError.__init__(self, message, data, code)


class RefusedByPolicy(RpcError):
    """The request is well-formed but not allowed."""

    code = -32010
    summary = "refused by policy"


_BY_CODE: dict[int, type[RpcError]] = {
    klass.code: klass
    for klass in (
        ParseError,
        InvalidRequest,
        MethodNotFound,
        InvalidParams,
        InternalError,
        NodeNotFound,
        NodeOffline,
        NodeUnreachable,
        VmNotFound,
        InvalidVmState,
        StoreUnavailable,
        RefusedByPolicy,
    )
}

#: The standard message of every code we define, by code.
ERROR_MESSAGES = {code: klass.summary for code, klass in _BY_CODE.items()}


class TransportError(Exception):
    """
    The call did not produce a JSON-RPC response: the peer could not be reached, the
    connection broke, or what came back was not JSON-RPC.

    :param address: the :class:`~hero_compute.rpc.addresses.Address` that was called
    :param reason: what went wrong, for people
    """

    def __init__(self, address: object, reason: str) -> None:
        Exception.__init__(self, f"{address}: {reason}")
        self.address = address
        self.reason = reason


class ConnectionRefused(TransportError):
    """Nothing accepted the connection (refused, no such socket, no route)."""


class CallTimedOut(TransportError):
    """No complete response arrived within the call's timeout."""


class ConnectTimedOut(CallTimedOut):
    """No connection could be made within the connect timeout: nothing was sent."""


class ConnectionClosed(TransportError):
    """The connection closed after the request was sent and before the response."""


class BadResponse(TransportError):
    """The peer answered, but not with a JSON-RPC response (HTTP error, bad JSON)."""


class ResponseTooLarge(BadResponse):
    """
    The peer's response body grew past the limit of the call; it was read no further.

    :param limit: that limit, in bytes
    """

    def __init__(self, address: object, limit: int) -> None:
        BadResponse.__init__(self, address, f"response body larger than {limit} bytes")
        self.limit = limit
