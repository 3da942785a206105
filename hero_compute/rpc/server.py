"""
The JSON-RPC 2.0 server: one resource, served at C{POST /rpc} on every listener of a
process.

txjsonrpc-ng's stock L{JSONRPC} resource speaks a mix of JSON-RPC 1.0 and 2.0: it has no
batches, answers notifications, accepts requests without C{"jsonrpc": "2.0"}, reports
internal errors as code 8002 with the exception's repr, sends C{"data": ""}, and serves
GET and JSONP.  L{RpcResource} keeps its resource and fault types but replaces the
dispatcher with one that follows the specification (section 7's examples are our tests).
"""

import collections
import inspect
import json
import math
import time
from email.utils import formatdate

import attrs
import httptools
from twisted.internet import defer, protocol
from twisted.internet.address import UNIXAddress
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.protocols import policies
from twisted.web import resource, server
from twisted.web.http import NO_CONTENT, NOT_ALLOWED
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

# NaN and Infinity are not JSON: a result holding one is an internal error, not a body
# that strict parsers refuse.
_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
_encode_ascii = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode


def _no_constants(name):
    raise ValueError(f"{name} is not JSON")

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

    @classmethod
    def from_transport(cls, transport):
        """
        :param transport: the transport of a connection
        :return: the context of the calls on that connection
        """
        if isinstance(transport.getHost(), UNIXAddress):
            return cls("unix", "unix", False)
        peer = transport.getPeer()
        return cls("tcp", f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}",
                   ISSLTransport.providedBy(transport))


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
        d = self.handle_body(body, CallContext.from_request(request))

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
        answer = self.answer(body, context)
        return answer if isinstance(answer, defer.Deferred) else defer.succeed(answer)

    def answer(self, body, context):
        """
        Like L{handle_body}, but answers at once when every handler did: the response
        body (bytes), None when there is nothing to send, or a Deferred of either.
        """
        try:
            message = json.loads(body, parse_constant=_no_constants)
        except (ValueError, UnicodeDecodeError) as e:
            return _dump(_error(None, ParseError(f"Parse error: {e}")))
        except RecursionError:
            # A megabyte of "[" is well under MAX_BODY and too deep for json.loads.
            return _dump(_error(None, ParseError("Parse error: nested too deeply")))
        if isinstance(message, list):
            if not message:
                return _dump(_error(None, InvalidRequest("Invalid Request: empty batch")))
            responses = [self._handle_one(item, context) for item in message]
            if any(isinstance(r, defer.Deferred) for r in responses):
                d = defer.gatherResults(
                    [r if isinstance(r, defer.Deferred) else defer.succeed(r) for r in responses],
                    consumeErrors=True)
                return d.addCallback(_dump_batch)
            return _dump_batch(responses)
        response = self._handle_one(message, context)
        if isinstance(response, defer.Deferred):
            return response.addCallback(_dump_single)
        return _dump_single(response)

    def _handle_one(self, message, context):
        """
        :return: a response object, None for a notification, or a Deferred firing with
            one of these when the handler answers later
        """
        if not isinstance(message, dict):
            return _error(None, InvalidRequest("Invalid Request: not an object"))
        rid = message.get("id")
        if not _valid_id(rid):
            return _error(None, InvalidRequest(
                "Invalid Request: id must be a string, a number or null"))
        notification = "id" not in message
        try:
            handler, args, kwargs = self._prepare(message, context)
        except RpcError as e:
            # A request too broken to run is still answered when it carries an id: the
            # caller could not otherwise tell it was refused.
            return (None if notification and e.code != InvalidRequest.code
                    else _error(rid, e))
        except Exception:
            # E.g. RecursionError from validating deeply nested params: raised here it
            # would escape render_POST as a 500, and take the rest of a batch with it.
            log.failure("preparing {method} failed", method=message.get("method"))
            return None if notification else _error(rid, InternalError("Internal error"))
        try:
            result = handler.func(*args, **kwargs)
        except Exception:
            failure = Failure()
            if notification:
                self._log_unexpected(failure, message)
                return None
            return _error(rid, self._as_rpc_error(failure, message))
        if inspect.iscoroutine(result):
            result = defer.ensureDeferred(result)
        if not isinstance(result, defer.Deferred):
            return None if notification else {"jsonrpc": "2.0", "result": result, "id": rid}
        d = result
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
        if "params" in message and not isinstance(params, (list, dict)):
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
    if isinstance(rid, float):
        return math.isfinite(rid)  # 1e400 parses as inf, which cannot be echoed
    return rid is None or (isinstance(rid, (str, int)) and not isinstance(rid, bool))


def _error(rid, error):
    return {"jsonrpc": "2.0", "error": error.to_wire(), "id": rid}


def _dump_batch(responses):
    answered = [r for r in responses if r is not None]
    return _dump(answered) if answered else None


def _dump_single(response):
    return None if response is None else _dump(response)


def _serialise(response):
    """
    :return: the UTF-8 JSON of C{response}
    :raise TypeError, ValueError, RecursionError: when it is not JSON-serialisable
    """
    text = _encode(response)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (a legal JSON escape, say in a string id or a method name
        # echoed in an error) has no UTF-8 form: escape it again.
        return _encode_ascii(response).encode("ascii")


def _dump(response):
    try:
        return _serialise(response)
    except (TypeError, ValueError, RecursionError):
        log.failure("result is not JSON-serialisable")
        if isinstance(response, list):
            return _serialise([_dump_one_safely(r) for r in response])
        return _serialise(_error(response.get("id"), InternalError("Internal error")))


def _dump_one_safely(response):
    try:
        _serialise(response)
        return response
    except (TypeError, ValueError, RecursionError):
        return _error(response.get("id"), InternalError("Internal error"))


class _Refused(Exception):
    """Raised from a parser callback to stop reading a request we will not serve."""

    def __init__(self, status, message):
        Exception.__init__(self, status, message)
        self.status = status
        self.message = message


#: Reason phrases of the statuses we send.
_REASONS = {200: b"OK", 204: b"No Content", 400: b"Bad Request", 404: b"Not Found",
            405: b"Method Not Allowed", 413: b"Content Too Large",
            414: b"URI Too Long", 431: b"Request Header Fields Too Large",
            500: b"Internal Server Error"}

#: Limits on what precedes a body: generous for JSON-RPC, small enough that a peer
#: cannot make us buffer much.
MAX_URL = 8 * 1024
MAX_HEADERS = 64 * 1024

#: Pipelined requests parsed ahead of the one being answered before we stop reading.
MAX_QUEUED = 16


@attrs.frozen
class _Message:
    """One parsed HTTP request."""

    method: bytes
    url: bytes
    keep_alive: bool
    http10: bool
    body: bytes


class _HTTPDate:
    """The Date header value, formatted at most once a second."""

    def __init__(self):
        self._second = None
        self._value = b""

    def __call__(self):
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode("ascii")
        return self._value


_http_date = _HTTPDate()


class RpcHTTPProtocol(protocol.Protocol, policies.TimeoutMixin):
    """
    HTTP/1.1 for one connection to an L{RpcResource}: C{POST /rpc} runs the body through
    the dispatcher; other paths are 404, other verbs 405.

    We parse with C{httptools} (llhttp, the parser of Node.js) rather than through
    C{twisted.web.server}: a call costs about a third of the CPU it took there (see the
    README's performance section), and nothing of twisted.web's resource tree, sessions
    or forms applies to one JSON endpoint.  The rules kept:
    persistent connections (HTTP/1.1 by default, HTTP/1.0 on request), pipelined
    requests answered in order, chunked bodies, C{Expect: 100-continue}, bodies over
    C{max_body} refused with 413 from the headers alone or as soon as they grow past
    it, never buffered beyond it, idle connections closed, and a call cancelled when
    its client hangs up.
    """

    factory = None
    _parser = None
    _context = None
    _closing = False
    _lost = False
    _linger = None
    _inflight = None
    _refusal = None
    _answering = False

    def connectionMade(self):
        self.callLater = self.factory.clock.callLater  # TimeoutMixin's timer
        self._parser = httptools.HttpRequestParser(self)
        self._queue = collections.deque()
        self._paused = False
        self.setTimeout(self.factory.idle_timeout)

    # -- parsing (httptools callbacks)

    def on_message_begin(self):
        self._url = b""
        self._head = 0
        self._length = None
        self._continue = False
        self._body = []
        self._size = 0

    def on_url(self, url):
        self._url += url
        if len(self._url) > MAX_URL:
            raise _Refused(414, b"request target longer than %d bytes\n" % MAX_URL)

    def on_header(self, name, value):
        self._head += len(name) + len(value)
        if self._head > MAX_HEADERS:
            raise _Refused(431, b"request headers larger than %d bytes\n" % MAX_HEADERS)
        name = name.lower()
        if name == b"content-length":
            self._length = int(value) if value.strip().isdigit() else None
        elif name == b"expect" and value.lower() == b"100-continue":
            self._continue = True

    def on_headers_complete(self):
        if self._length is not None and self._length > self.factory.max_body:
            raise _Refused(413, b"request body larger than %d bytes\n" % self.factory.max_body)
        if (self._continue and self._parser.get_http_version() == "1.1"
                and self._inflight is None and not self._queue):
            # curl and others wait for this (a second, or forever) before sending
            # the body.  Not while an earlier answer is due: it would come first.
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body):
        self._size += len(body)
        if self._size > self.factory.max_body:
            self._body = []
            raise _Refused(413, b"request body larger than %d bytes\n" % self.factory.max_body)
        self._body.append(body)

    def on_message_complete(self):
        parser = self._parser
        self._queue.append(_Message(parser.get_method(), self._url, parser.should_keep_alive(),
                                    parser.get_http_version() == "1.0", b"".join(self._body)))
        self._body = []

    # -- the connection

    def dataReceived(self, data):
        if self._closing or self._refusal is not None:
            return  # refused: read and discard
        if self._inflight is None:
            self.resetTimeout()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            refused = e.__context__
            if not isinstance(refused, _Refused):
                raise
            self._refusal = (refused.status, refused.message)
        except httptools.HttpParserUpgrade:
            # We speak nothing but HTTP/1.1, and llhttp leaves the body of an upgrade
            # request unread (it would be the other protocol's): refuse it whole.
            self._queue.pop()
            self._refusal = (400, b"protocol upgrades are not supported\n")
        except httptools.HttpParserError as e:
            self._refusal = (
                400, b"malformed HTTP request: %s\n" % str(e).encode("ascii", "replace"))
        if len(self._queue) > MAX_QUEUED and not self._paused:
            self._paused = True
            self.transport.pauseProducing()
        self._next()

    def _next(self):
        if self._answering:
            return  # an answer that came at once, inside the loop below: it goes on
        self._answering = True
        try:
            while self._queue and self._inflight is None and not self._closing:
                self._answer(self._queue.popleft())
        finally:
            self._answering = False
        if self._closing or self._inflight is not None:
            return
        if self._refusal is not None and not self._queue:
            # Every request before the bad one is answered: now the refusal.
            self._refuse(*self._refusal)
            return
        if self._paused and len(self._queue) <= MAX_QUEUED // 2:
            self._paused = False
            self.transport.resumeProducing()
        if self.timeOut is None:
            self.setTimeout(self.factory.idle_timeout)

    def _answer(self, message):
        path = message.url.split(b"?", 1)[0]
        if not path.startswith(b"/"):
            try:
                path = httptools.parse_url(message.url).path or b"/"
            except httptools.HttpParserInvalidURLError:
                self._send(message, 400, b"text/plain; charset=utf-8", b"malformed URL\n")
                return
        if path not in (b"/rpc", b"/rpc/"):
            self._send(message, 404, b"text/plain; charset=utf-8", b"no such resource\n")
            return
        if message.method != b"POST":
            self._send(message, 405, b"text/plain; charset=utf-8",
                       b"only POST is allowed on /rpc\n", b"Allow: POST\r\n")
            return
        if self._context is None:
            # The addresses of a connection do not change: one system call each, once.
            self._context = CallContext.from_transport(self.transport)
        try:
            answer = self.factory.rpc.answer(message.body, self._context)
        except Exception:
            # The dispatcher answers every error itself; this is a bug, not a caller's.
            log.failure("answering an RPC request failed")
            self._send(message, 500, b"text/plain; charset=utf-8", b"internal error\n")
            return
        if not isinstance(answer, defer.Deferred):
            self._respond(answer, message)
            return
        # A call in progress is bounded by its own timeouts, not the idle one.
        self.setTimeout(None)
        self._inflight = answer
        answer.addCallbacks(self._answered, self._failed, callbackArgs=(message,),
                            errbackArgs=(message,))

    def _answered(self, payload, message):
        self._inflight = None
        if self._lost or self._closing:
            # Refused or closed meanwhile: an answer now would come after the refusal.
            return
        self._respond(payload, message)
        self._next()

    def _respond(self, payload, message):
        if payload is None:
            # Only notifications: JSON-RPC says send nothing, HTTP says 204.
            self._send(message, 204, None, b"")
        else:
            self._send(message, 200, b"application/json", payload)

    def _failed(self, failure, message):
        self._inflight = None
        if self._lost or self._closing or failure.check(defer.CancelledError):
            return
        log.failure("answering an RPC request failed", failure)
        self._send(message, 500, b"text/plain; charset=utf-8", b"internal error\n")
        self._next()

    def _send(self, message, status, ctype, body, extra=b""):
        head = [b"HTTP/1.1 %d %s\r\nDate: %s\r\n" % (status, _REASONS[status], _http_date())]
        if ctype is not None:
            head.append(b"Content-Type: %s\r\n" % ctype)
        if status != 204:
            head.append(b"Content-Length: %d\r\n" % len(body))
        if extra:
            head.append(extra)
        if not message.keep_alive:
            head.append(b"Connection: close\r\n")
        elif message.http10:
            head.append(b"Connection: keep-alive\r\n")
        head.append(b"\r\n")
        if message.method != b"HEAD":
            head.append(body)
        self.transport.write(b"".join(head))
        if not message.keep_alive:
            self._closing = True
            # The idle timer stays: a peer that never reads its answer is cut off.
            self.resetTimeout()
            self.transport.loseConnection()

    def _refuse(self, status, body):
        """
        Answer an error and close the connection; the rest of the request is never
        buffered.

        A client usually sends its whole body before reading the answer; closing at
        once with its body unread makes the kernel reset the connection, and the client
        sees a broken pipe instead of our status.  So, like nginx's lingering close, we
        close our side for writing and discard what still comes, for at most
        L{LINGER} seconds.
        """
        if self._closing:
            return
        self._closing = True
        self._queue.clear()
        self.setTimeout(None)
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nDate: %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (status, _REASONS[status], _http_date(), len(body), body))
        if self._paused:
            self.transport.resumeProducing()
        if ISSLTransport.providedBy(self.transport):
            # TLS cannot half-close (the lookup would reach the TCP socket under it):
            # go on discarding what comes, then close.
            self._linger = self.factory.clock.callLater(LINGER, self.transport.loseConnection)
            return
        half_close = getattr(self.transport, "loseWriteConnection", None)
        if half_close is None:
            self.transport.loseConnection()
            return
        half_close()
        self._linger = self.factory.clock.callLater(LINGER, self.transport.abortConnection)

    def timeoutConnection(self):
        # Abort, not close: a peer that stopped reading would keep a close waiting on
        # our unsent answer for ever.
        self.transport.abortConnection()

    def connectionLost(self, reason=protocol.connectionDone):
        self._lost = True
        # The parser holds our callbacks: without this cycle a closed connection is
        # freed at once, not at the next full collection (at fleet scale those are
        # the explorer's longest pauses).
        self._parser = None
        self.setTimeout(None)
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._queue.clear()
        if self._inflight is not None:
            # The client hung up: stop the work, and answer no one.
            self._inflight.cancel()


class RpcHTTPFactory(protocol.Factory):
    """
    Serves an L{RpcResource} over HTTP/1.1 with L{RpcHTTPProtocol}.

    :ivar rpc: the L{RpcResource}
    :ivar idle_timeout: seconds before an idle connection is closed
    :ivar max_body: request bodies above this many bytes are refused with 413
    :ivar clock: the reactor, for timers
    """

    protocol = RpcHTTPProtocol
    # One "Starting factory" line per listener is noise in an operator's log.
    noisy = False

    def __init__(self, rpc, idle_timeout=IDLE_TIMEOUT, max_body=MAX_BODY, clock=None):
        from twisted.internet import reactor

        self.rpc = rpc
        self.idle_timeout = idle_timeout
        self.max_body = max_body
        self.clock = reactor if clock is None else clock


def make_site(rpc, idle_timeout=IDLE_TIMEOUT):
    """
    The HTTP server of C{rpc}: C{POST /rpc} answers JSON-RPC, every other path is 404.

    :param rpc: an L{RpcResource}
    :param idle_timeout: seconds before an idle connection is closed
    :return: a protocol factory to listen with
    """
    return RpcHTTPFactory(rpc, idle_timeout)
