"""
The JSON-RPC 2.0 server: one resource, served at C{POST /rpc} on every listener of a
process.

txjsonrpc-ng's stock L{JSONRPC} resource speaks a mix of JSON-RPC 1.0 and 2.0: it has no
batches, answers notifications, accepts requests without C{"jsonrpc": "2.0"}, reports
internal errors as code 8002 with the exception's repr, sends C{"data": ""}, and serves
GET and JSONP.  L{RpcResource} keeps its resource and fault types but replaces the
dispatcher with one that follows the specification (section 7's examples are our tests).
"""

import inspect
import io
import json

import attrs
from twisted.internet import defer
from twisted.internet.address import UNIXAddress
from twisted.logger import Logger
from twisted.web import resource, server
# Names imported once: twisted.web.http is wrapped in a deprecation proxy whose every
# attribute look-up costs microseconds, on the path of every header line.
from twisted.web.http import NO_CONTENT, NOT_ALLOWED, HTTPChannel
from txjsonrpc_ng.web.jsonrpc import JSONRPC

from .errors import (
    InternalError,
    InvalidParams,
    InvalidRequest,
    MethodNotFound,
    ParseError,
    RpcError,
)

#: Request bodies above this many bytes are refused with 413 before being read.
MAX_BODY = 1024 * 1024

#: Seconds a refused oversized body is still read (and discarded) after the 413, so that
#: the client gets to read the 413 instead of a connection reset.
LINGER = 2.0

#: Seconds an idle keep-alive connection is kept open.  Clients' pools close theirs
#: sooner (see L{hero_compute.rpc.client}), so the server rarely closes one under a
#: request in flight.
IDLE_TIMEOUT = 75

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

log = Logger()


@attrs.frozen
class CallContext:
    """
    What a handler may know of the call besides its params.

    :ivar transport: C{"unix"} or C{"tcp"}: how the request reached us
    :ivar peer: the peer's address, for logs (C{host:port}, or C{"unix"})
    :ivar secure: whether the connection is TLS
    """

    transport: str
    peer: str
    secure: bool = False

    @classmethod
    def from_request(cls, request):
        """
        :param request: a L{twisted.web.server.Request}
        :return: the context of that request
        """
        host = request.getHost()
        if isinstance(host, UNIXAddress):
            return cls("unix", "unix", False)
        peer = request.getClientAddress()
        return cls("tcp", f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}",
                   request.isSecure())


@attrs.frozen
class _Handler:
    func: object
    signature: inspect.Signature
    wants_context: bool


class RpcResource(JSONRPC):
    """
    A spec-compliant JSON-RPC 2.0 resource.

    Methods are plain callables registered by name; they take the params as keyword
    arguments (by-position params are mapped to names through the schema) and return a
    result or a Deferred of one.  They signal failure by raising an L{RpcError}; any
    other exception is logged and becomes -32603 without details.

    :param schema: an optional L{hero_compute.rpc.schema.Schema}; when given, params of
        the methods it describes are validated, and C{rpc.discover} serves its OpenRPC
        document
    :param version: the service's version, for C{rpc.discover}
    """

    isLeaf = True

    def __init__(self, schema=None, version="0"):
        JSONRPC.__init__(self)
        self._schema = schema
        self._version = version
        self._handlers = {}
        if schema is not None:
            self.register("rpc.discover", self._discover)

    def register(self, name, func, context=False):
        """
        Publish a callable as a method.

        :param name: the JSON-RPC method name
        :param func: the callable
        :param context: when true, C{func} gets a L{CallContext} as first argument
        """
        signature = inspect.signature(func)
        if context:
            first = next(iter(signature.parameters))
            signature = signature.replace(
                parameters=[p for n, p in signature.parameters.items() if n != first]
            )
        self._handlers[name] = _Handler(func, signature, context)

    def method_names(self):
        """:return: the names of all published methods"""
        return set(self._handlers)

    def param_names(self, name):
        """
        :param name: a published method's name
        :return: the names of the params its handler takes, in order (the call context
            excluded)
        """
        return list(self._handlers[name].signature.parameters)

    def _discover(self):
        return self._schema.openrpc(self._version)

    def render(self, request):
        if request.postpath not in ([], [b""]):
            return resource.NoResource().render(request)
        if request.method != b"POST":
            # Not left to Resource.render: Twisted answers 501 to verbs outside its
            # supportedMethods (PUT, DELETE, ...), and 500 to HEAD (render_HEAD calls a
            # render_GET we do not have) while its Allow header offers HEAD.
            request.setResponseCode(NOT_ALLOWED)
            request.setHeader(b"allow", b"POST")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"only POST is allowed on /rpc\n"
        return self.render_POST(request)

    def render_POST(self, request):
        """
        Dispatch one HTTP request: a single JSON-RPC request or a batch.
        """
        request.content.seek(0)
        body = request.content.read()
        channel = request.channel
        context = (channel.call_context(request) if isinstance(channel, _Channel)
                   else CallContext.from_request(request))
        d = self.handle_body(body, context)

        gone = []

        def respond(payload):
            if request.finished or gone:
                return
            if payload is None:
                # Only notifications: JSON-RPC says send nothing, HTTP says 204.
                request.setResponseCode(NO_CONTENT)
            else:
                request.setHeader(b"content-type", b"application/json")
                request.setHeader(b"content-length", b"%d" % len(payload))
                request.write(payload)
            request.finish()

        def cancel(_):
            # The client hung up: stop the work, and answer no one.
            gone.append(True)
            d.cancel()

        request.notifyFinish().addErrback(cancel)
        d.addCallback(respond)
        d.addErrback(lambda f: log.failure("responding to an RPC request failed", f))
        return server.NOT_DONE_YET

    def handle_body(self, body, context):
        """
        Run the JSON-RPC request(s) in an HTTP body.

        :param body: the raw bytes
        :param context: the L{CallContext}
        :return: a Deferred firing with the response body (bytes), or None when there is
            nothing to send (only notifications)
        """
        try:
            message = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            return defer.succeed(_dump(_error(None, ParseError(f"Parse error: {e}"))))
        except RecursionError:
            # A megabyte of "[" is well under MAX_BODY and too deep for json.loads.
            return defer.succeed(_dump(_error(None, ParseError("Parse error: nested too deeply"))))
        if isinstance(message, list):
            if not message:
                return defer.succeed(
                    _dump(_error(None, InvalidRequest("Invalid Request: empty batch")))
                )
            d = defer.gatherResults(
                [self._handle_one(item, context) for item in message], consumeErrors=True
            )
            d.addCallback(lambda responses: [r for r in responses if r is not None] or None)
        else:
            d = self._handle_one(message, context)
        d.addCallback(lambda response: None if response is None else _dump(response))
        return d

    def _handle_one(self, message, context):
        """
        :return: a Deferred firing with a response object, or None for a notification
        """
        if not isinstance(message, dict):
            return defer.succeed(
                _error(None, InvalidRequest("Invalid Request: not an object"))
            )
        rid = message.get("id")
        if not _valid_id(rid):
            return defer.succeed(
                _error(None, InvalidRequest("Invalid Request: id must be a string, a number or null"))
            )
        notification = "id" not in message
        try:
            handler, args, kwargs = self._prepare(message, context)
        except RpcError as e:
            # A request too broken to run is still answered when it carries an id: the
            # caller could not otherwise tell it was refused.
            return defer.succeed(None if notification and e.code != InvalidRequest.code
                                 else _error(rid, e))
        except Exception:
            # E.g. RecursionError from validating deeply nested params: raised here it
            # would escape render_POST as a 500, and take the rest of a batch with it.
            log.failure("preparing {method} failed", method=message.get("method"))
            return defer.succeed(None if notification else _error(rid, InternalError("Internal error")))
        d = defer.maybeDeferred(handler.func, *args, **kwargs)
        if notification:
            d.addCallbacks(lambda _: None, lambda f: self._log_unexpected(f, message))
            return d
        d.addCallbacks(
            lambda result: {"jsonrpc": "2.0", "result": result, "id": rid},
            lambda f: _error(rid, self._as_rpc_error(f, message)),
        )
        return d

    def _prepare(self, message, context):
        if message.get("jsonrpc") != "2.0":
            raise InvalidRequest('Invalid Request: "jsonrpc" must be exactly "2.0"')
        name = message.get("method")
        if not isinstance(name, str):
            raise InvalidRequest('Invalid Request: "method" must be a string')
        unknown = set(message) - {"jsonrpc", "method", "params", "id"}
        if unknown:
            raise InvalidRequest(f"Invalid Request: unknown members {sorted(unknown)}")
        params = message.get("params")
        if params is not None and not isinstance(params, (list, dict)):
            raise InvalidRequest('Invalid Request: "params" must be an array or an object')
        handler = self._handlers.get(name)
        if handler is None:
            raise MethodNotFound(f"Method not found: {name}")
        spec = self._schema.methods.get(name) if self._schema is not None else None
        if spec is not None:
            # The schema names exactly the handler's params (the drift test holds us to
            # it), so params it accepts always bind.
            kwargs = spec.coerce_params(params)
            args = []
        else:
            args, kwargs = ([], params) if isinstance(params, dict) else (params or [], {})
            try:
                handler.signature.bind(*args, **kwargs)
            except TypeError as e:
                raise InvalidParams(f"invalid params for {name}: {e}") from None
        if handler.wants_context:
            args = [context, *args]
        return handler, args, kwargs

    def _as_rpc_error(self, failure, message):
        if failure.check(RpcError):
            return failure.value
        if failure.check(defer.CancelledError):
            return InternalError("Internal error: the call was cancelled")
        self._log_unexpected(failure, message)
        return InternalError("Internal error")

    def _log_unexpected(self, failure, message):
        if not failure.check(RpcError, defer.CancelledError):
            log.failure("method {method} failed", failure, method=message.get("method"))


def _valid_id(rid):
    return rid is None or (isinstance(rid, (str, int, float)) and not isinstance(rid, bool))


def _error(rid, error):
    return {"jsonrpc": "2.0", "error": error.to_wire(), "id": rid}


def _dump(response):
    try:
        return _encode(response).encode("utf-8")
    except (TypeError, ValueError, RecursionError):
        log.failure("result is not JSON-serialisable")
        if isinstance(response, list):
            return _dump([_dump_one_safely(r) for r in response])
        return _encode(_error(response.get("id"), InternalError("Internal error"))).encode()


def _dump_one_safely(response):
    try:
        _encode(response)
        return response
    except (TypeError, ValueError, RecursionError):
        return _error(response.get("id"), InternalError("Internal error"))


class _Request(server.Request):
    """
    A request whose body is capped at L{MAX_BODY}: a chunked body that grows past it is
    refused as soon as it does, and never buffered beyond that.
    """

    _received = 0
    _refused = False

    def __init__(self, *args, **kwargs):
        server.Request.__init__(self, *args, **kwargs)
        # JSON-RPC bodies are never HTML forms.  Twisted would otherwise parse every
        # POST's Content-Type through the email package, looking for one: a fifth of
        # the explorer's CPU at heartbeat load.  (Set after __init__, which sets it from
        # the Site; a class attribute would be shadowed.)
        self._parsePOSTFormSubmission = False

    def gotLength(self, length):
        # Bodies are small and capped: keep them in memory (Twisted spills bodies over
        # 100 kB, or of unknown length, to a temporary file).
        self.content = io.BytesIO()

    def handleContentChunk(self, data):
        if self._refused:
            return
        self._received += len(data)
        if self._received > MAX_BODY:
            self._refused = True
            self.content = io.BytesIO()
            self.channel.refuse_too_large()
            return
        self.content.write(data)

    def process(self):
        if not self._refused:
            server.Request.process(self)


class _Channel(HTTPChannel):
    """
    An HTTP channel that answers 413 to a declared body over L{MAX_BODY} from its
    headers alone, without reading the body.
    """

    _refused = False
    _context = None

    def call_context(self, request):
        """
        The L{CallContext} of this connection's requests, worked out once: the local
        and peer addresses do not change, and each look-up is a system call.
        """
        if self._context is None:
            self._context = CallContext.from_request(request)
        return self._context

    def allHeadersReceived(self):
        if self.length is not None and self.length > MAX_BODY:
            self.refuse_too_large()
            return
        super().allHeadersReceived()

    _linger = None

    def refuse_too_large(self):
        """
        Answer 413 and close the connection: the rest of the body is never buffered.

        A client usually sends its whole body before reading the answer; closing at once
        with its body unread makes the kernel reset the connection, and the client sees
        a broken pipe instead of the 413.  So, like nginx's lingering close, we close our
        side for writing and discard what still comes, for at most L{LINGER} seconds.
        """
        if self._refused:
            return
        self._refused = True
        body = b"request body larger than %d bytes\n" % MAX_BODY
        self.transport.write(
            b"HTTP/1.1 413 Request Entity Too Large\r\n"
            b"Content-Type: text/plain\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        self.setTimeout(None)
        half_close = getattr(self.transport, "loseWriteConnection", None)
        if half_close is None:
            self.transport.loseConnection()
            return
        half_close()
        self._linger = self.callLater(LINGER, self.transport.abortConnection)

    def connectionLost(self, reason):
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        super().connectionLost(reason)

    def lineReceived(self, line):
        if not self._refused:
            super().lineReceived(line)

    def rawDataReceived(self, data):
        if not self._refused:
            super().rawDataReceived(data)


def make_site(rpc, idle_timeout=IDLE_TIMEOUT):
    """
    The HTTP site serving C{rpc} at C{/rpc}; every other path is 404.

    :param rpc: an L{RpcResource}
    :param idle_timeout: seconds before an idle connection is closed
    :return: a L{twisted.web.server.Site}
    """
    root = resource.Resource()
    root.putChild(b"rpc", rpc)
    site = server.Site(root, timeout=idle_timeout)
    site.protocol = _Channel
    site.requestFactory = _Request
    site.displayTracebacks = False
    # Twisted's access log is one line per request; at thousands of heartbeats a second
    # it would be most of the log and much of the CPU.
    site.log = lambda request: None
    return site
