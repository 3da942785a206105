"""
The JSON-RPC endpoint as a ``twisted.web`` resource, for embedding in a Twisted web site.

Our own listeners do not use it (see :mod:`hero_compute.rpc.http_server`); it is here for
a service that already runs a ``twisted.web`` ``Site`` and wants ``/rpc`` among its
resources.  It only adapts a request to a :class:`~hero_compute.rpc.dispatch.Dispatcher`.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.address import UNIXAddress
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.http import NO_CONTENT, NOT_ALLOWED

from .dispatch import CallContext, Dispatcher

log = Logger()


def context_of(request: server.Request) -> CallContext:
    """
    :param request: a :class:`twisted.web.server.Request`
    :return: the :class:`~hero_compute.rpc.dispatch.CallContext` of that request
    """
    if isinstance(request.getHost(), UNIXAddress):
        return CallContext("unix", "unix")
    peer = request.getClientAddress()
    host = getattr(peer, "host", None)
    # Embedded under twisted.web, TLS peers are not identified: only the roles of
    # unauthenticated callers apply.
    return CallContext(
        "tls" if request.isSecure() else "tcp",
        f"{host or '?'}:{getattr(peer, 'port', '?')}",
        host=host,
    )


class RpcResource(resource.Resource):
    """
    Serves a dispatcher at this resource: ``POST`` runs the body through it, other verbs
    are 405 and child paths 404.

    :param dispatcher: the :class:`~hero_compute.rpc.dispatch.Dispatcher`
    :param context: ``context(request) -> CallContext``, who is calling; by default
        :func:`context_of` (the transport's)
    """

    isLeaf = True

    def __init__(
        self,
        dispatcher: Dispatcher,
        context: Callable[[server.Request], CallContext] = context_of,
    ) -> None:
        resource.Resource.__init__(self)
        self.dispatcher = dispatcher
        self._context = context

    def render(self, request: server.Request) -> bytes | int:
        if request.postpath not in ([], [b""]):
            page: bytes = resource.NoResource().render(request)
            return page
        if request.method != b"POST":
            # Not left to Resource.render: Twisted answers 501 to verbs outside its
            # supportedMethods (PUT, DELETE, ...), and 500 to HEAD (render_HEAD calls a
            # render_GET we do not have) while its Allow header offers HEAD.
            request.setResponseCode(NOT_ALLOWED)
            request.setHeader(b"allow", b"POST")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"only POST is allowed on /rpc\n"
        return self.render_POST(request)

    def render_POST(self, request: server.Request) -> int:
        """
        Dispatch one HTTP request: a single JSON-RPC request or a batch.
        """
        content = request.content
        assert content is not None  # twisted.web reads every body into it
        content.seek(0)
        answer = self.dispatcher.answer(content.read(), self._context(request))
        d = answer if isinstance(answer, defer.Deferred) else defer.succeed(answer)

        gone: list[bool] = []

        def respond(payload: bytes | None) -> None:
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

        def cancel(_: Failure) -> None:
            # The client hung up: stop the work, and answer no one.
            gone.append(True)
            d.cancel()

        request.notifyFinish().addErrback(cancel)
        d.addCallback(respond)
        d.addErrback(lambda f: log.failure("responding to an RPC request failed", f))
        return server.NOT_DONE_YET
