"""
The dashboard (``--ui HOST:PORT``): a web page of the fleet on a listener of its own,
never on the JSON-RPC listeners, for viewers and operators (CONTRACT §11).

Access works like Jupyter's, but the token is never logged: the explorer logs the URL
and the file that holds the token (random, kept 0600 in its state directory, or read
from ``EXPLORER_UI_TOKEN_FILE``); ``GET /?token=...`` trades it for a session cookie
(``hero_ui_<port>``; HttpOnly, SameSite=Strict, Secure over TLS) and redirects to
``/#k=<CSRF token>`` (:mod:`.dashboard_login`); without the cookie, 401.  The page then
calls the explorer's JSON-RPC methods as a client would, through ``POST /rpc`` on this
listener, which needs a same-origin ``Origin`` and the session's CSRF token in
``X-CSRF-Token`` (403 otherwise), and where
:data:`~hero_compute.rpc.authz.DASHBOARD_POLICY` lets through what the user's role may
do (-32010 for the rest).  That token is a viewer; the accounts of :mod:`.ui_accounts`
are viewers or operators.  It answers only for its own host names (421 otherwise:
:mod:`.dashboard_guard`).  The static files ship in the package (``ui/static``): no build
step, no framework, nothing from another origin.

Long because: the listener's one resource routes every path (page, token exchange,
static files, RPC, console) and holds each path's checks in one place; the accounts,
the console splice, the guard and the listener live in modules of their own.
"""

from __future__ import annotations

import html
import os
import secrets
from collections.abc import Callable, Iterable
from importlib import resources
from typing import TYPE_CHECKING, Any, cast

import attrs
from twisted.internet.interfaces import IProtocolFactory, ISSLTransport, ITCPTransport
from twisted.logger import Logger
from twisted.web import http, resource, server
from twisted.web.http import FORBIDDEN, NOT_ALLOWED, UNAUTHORIZED

from hero_compute.rpc.admission import AdmittedSite, AdmittedTLSFactory
from hero_compute.rpc.authz import CLIENT, DASHBOARD_POLICY, EXPLORER_POLICY
from hero_compute.rpc.dispatch import CallContext, service_dispatcher
from hero_compute.rpc.listen import listener_service
from hero_compute.rpc.tls import identity_of
from hero_compute.rpc.web import RpcResource

from . import ui_console
from .dashboard_guard import HostGuard, same_origin
from .dashboard_listen import DashboardAnnouncement, TLSOnStart
from .dashboard_login import cookie_name, csrf_ok, exchange, with_session
from .ui_accounts import UiAccounts
from .ui_assets import VENDORED
from .ui_users import Session

if TYPE_CHECKING:
    from cryptography.x509 import Certificate
    from twisted.application.internet import StreamServerEndpointService

    from hero_compute.rpc.admission import Admission
    from hero_compute.rpc.dispatch import Dispatcher
    from hero_compute.rpc.limits import Limits
    from hero_compute.rpc.listen import Listen
    from hero_compute.rpc.tls import ServerTLS

    from .service import ExplorerMethods

log = Logger()

#: The largest request body read, as on the JSON-RPC listeners (CONTRACT §4).
MAX_BODY = 1 << 20

#: Sent with every answer: the page runs only its own script and style, may not be
#: framed, and never leaks the token URL as a referrer.
SECURITY_HEADERS = {
    b"content-security-policy": b"default-src 'self'; script-src 'self'; "
    b"style-src 'self'; img-src 'self' data:; connect-src 'self'; object-src 'none'; "
    b"base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"no-referrer",
    b"cache-control": b"no-store",
}

STATIC = {
    "index.html": b"text/html; charset=utf-8",
    "app.js": b"text/javascript; charset=utf-8",
    "console.js": b"text/javascript; charset=utf-8",
    "style.css": b"text/css; charset=utf-8",
    **VENDORED,
}


@attrs.frozen
class _AsClient:
    """A dashboard user, as the explorer's own roles table sees it: a client."""

    name: str
    role: str = CLIENT


def _authorize(context: CallContext, method: str, params: Any) -> None:
    identity = context.identity
    DASHBOARD_POLICY.check(context.transport, identity, method, params)
    # Refused above without a user: the dashboard's table grants nothing anonymous.
    assert identity is not None
    EXPLORER_POLICY.check(context.transport, _AsClient(identity.name), method, params)


def load_static() -> dict[str, bytes]:
    """:return: ``{name: bytes}`` of the page's files, from the installed package"""
    folder = resources.files("hero_compute.explorer").joinpath("ui", "static")
    return {name: folder.joinpath(name).read_bytes() for name in STATIC}


def _mb(value: float) -> str:
    """Memory as the page's script writes it."""
    return f"{value / 1024:.1f} GiB" if value >= 1024 else f"{value} MiB"


def render_index(page: bytes, summary: dict[str, Any]) -> bytes:
    """
    The page with the fleet's summary written in, so that it reads without JavaScript
    (the script then keeps it up to date); every value is escaped.

    :param page: index.html (bytes), whose summary fields hold a ``–``
    :param summary: what :meth:`ExplorerMethods.summary` answers
    :return: bytes
    """
    use, cap = summary["usage"], summary["capacity"]
    values = {
        "s-online": summary["nodes"]["online"],
        "s-offline": summary["nodes"]["offline"],
        "s-vms": summary["vms"],
        "s-vcpus": f"{use['vcpus']} of {cap['vcpus']}",
        "s-memory": f"{_mb(use['memory_mb'])} of {_mb(cap['memory_mb'])}",
        "s-disk": f"{use['disk_gb']} GB of {cap['disk_gb']} GB",
    }
    text = page.decode("utf-8")
    for name, value in values.items():
        text = text.replace(f'id="{name}">–<', f'id="{name}">{html.escape(str(value))}<', 1)
    return text.encode("utf-8")


def _secure(request: server.Request) -> None:
    for name, value in SECURITY_HEADERS.items():
        request.setHeader(name, value)


def _refuse(request: server.Request, code: int, text: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return text.encode() + b"\n"


class DashboardRoot(resource.Resource):
    """
    ``/`` (the page, or the token exchange), ``/static/<file>`` and ``POST /rpc``.

    :param token: the access token (str)
    :param dispatcher: the read-only :class:`~hero_compute.rpc.dispatch.Dispatcher`
    :param files: ``{name: bytes}`` of the static files
    :param summary: a callable answering the fleet's summary (to write into the page),
        or None to serve the page as it is
    :param tls: over TLS, a callable answering the listener's
        :class:`~hero_compute.rpc.tls.ServerTLS`: a verified ``client/*`` certificate
        then stands in for the token, as an operator
    :param hosts: the ``Host`` names answered for (:class:`.HostGuard`), None for its
        defaults
    :param accounts: the :class:`~hero_compute.explorer.ui_accounts.UiAccounts` whose
        login tokens and sessions are honoured (a private one if None)
    :param console_socket: a callable answering the explorer's Unix socket path (its
        console relay), or None for no console
    """

    isLeaf = True

    def __init__(
        self,
        token: str,
        dispatcher: Dispatcher,
        files: dict[str, bytes],
        summary: Callable[[], dict[str, Any]] | None = None,
        tls: Callable[[], ServerTLS | None] | None = None,
        hosts: Iterable[str] | None = None,
        accounts: UiAccounts | None = None,
        console_socket: Callable[[], str] | None = None,
    ) -> None:
        resource.Resource.__init__(self)
        self._token = token.encode()
        # The page acts with a client's rights, narrowed to its user's role.
        self._rpc_resource = RpcResource(dispatcher, self._context)
        self._files = files
        self._summary = summary
        self._tls = tls
        self._hosts = HostGuard(hosts)
        from twisted.internet import reactor

        self._reactor = reactor
        self._console_socket = console_socket
        #: ``audit(caller, method, target, outcome)``, for console attaches, or None.
        self.audit: Callable[[str, str, str | None, str], None] | None = None
        if accounts is None:
            accounts = UiAccounts(reactor)
        self.sessions = accounts

    @staticmethod
    def _context(request: Any) -> CallContext:
        session = request.dashboard_session
        return CallContext("tls", "dashboard", identity=session.user)

    def render(self, request: server.Request) -> bytes | int:
        """
        Answer any path: the page or the token exchange (``/``), a static file, ``POST
        /rpc`` or the console (``/v1/...``), after the ``Host`` check.

        :return: the body, or ``NOT_DONE_YET`` while an answer is on its way
        """
        _secure(request)
        if not self._hosts.allows(request):
            # Not a name of ours: a rebound DNS name, most likely.  Nothing is done.
            return _refuse(request, 421, "this dashboard does not answer for that host")
        path = request.postpath or []  # a list here: twisted.web sets it before render
        if path in ([], [b""]):
            return self._root(request)
        if len(path) == 2 and path[0] == b"static":
            return self._static(request, path[1].decode("ascii", "replace"))
        if path == [b"rpc"]:
            return self._rpc(request)
        if path[0] == b"v1":
            return ui_console.serve(
                request,
                self._session(request),
                self._console_socket,
                self._reactor,
                self.audit,
                self.sessions.hold,
            )
        return _refuse(request, 404, "not found")

    def _session(self, request: server.Request) -> Session | None:
        """:return: the request's :class:`.ui_users.Session`, or None"""
        return self.sessions.session(
            request.getCookie(cookie_name(request))
        ) or self._client(request)

    def _client(self, request: server.Request) -> Session | None:
        """The operator session of a verified ``client/*`` certificate over TLS, or None."""
        if self._tls is None:
            return None
        transport = request.channel.transport
        if not ISSLTransport.providedBy(transport):
            return None
        cert = transport.getPeerCertificate()
        creator = self._tls()
        if cert is None or creator is None:
            return None
        identity = identity_of(cast("Certificate", cert), creator.trust_domain)
        if identity is None or identity.role != CLIENT:
            return None
        return self.sessions.certificate_session(identity.name)

    def _root(self, request: server.Request) -> bytes | int:
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return _refuse(request, NOT_ALLOWED, "only GET is allowed here")
        token = (request.args or {}).get(b"token")
        if token is not None:
            return exchange(
                request, self.sessions, token[0], self._token, cookie_name(request), _refuse
            )
        session = self._session(request)
        if not session:
            return _refuse(
                request,
                UNAUTHORIZED,
                "open /?token= with the token in the file the explorer named at start",
            )
        request.setHeader(b"content-type", STATIC["index.html"])
        page = with_session(self._files["index.html"], session)
        if self._summary is None:
            return page
        return render_index(page, self._summary())

    def _static(self, request: server.Request, name: str) -> bytes:
        if name not in STATIC or name == "index.html":
            return _refuse(request, 404, "not found")
        if not self._session(request):
            return _refuse(request, UNAUTHORIZED, "no session")
        request.setHeader(b"content-type", STATIC[name])
        return self._files[name]

    def _rpc(self, request: Any) -> bytes | int:
        if request.method != b"POST":
            request.setHeader(b"allow", b"POST")
            return _refuse(request, NOT_ALLOWED, "only POST is allowed on /rpc")
        session = self._session(request)
        if not session:
            return _refuse(request, UNAUTHORIZED, "no session")
        if not same_origin(request):
            # A cross-site form or script sends the session cookie along (a client
            # certificate too): only the page itself may call.
            return _refuse(request, FORBIDDEN, "cross-origin (or Origin-less) POST")
        if not csrf_ok(session, request):
            # The session's cookie rides along with a forged request; its token does not.
            return _refuse(request, FORBIDDEN, "no or wrong X-CSRF-Token")
        request.dashboard_session = session
        return self._rpc_resource.render_POST(request)


class _BoundedRequest(server.Request):
    """
    A request whose body may not pass :data:`MAX_BODY`: twisted.web would otherwise
    buffer any size, before the session is even checked.  Past it, the connection is
    dropped (the page never sends more than a few hundred bytes).
    """

    _received = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > MAX_BODY:
            _abort(self)
            return
        server.Request.gotLength(self, length)

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > MAX_BODY:
            _abort(self)
            return
        server.Request.handleContentChunk(self, data)


def _abort(request: server.Request) -> None:
    """Drop ``request``'s connection at once, whatever is left unsent."""
    cast(ITCPTransport, request.channel.transport).abortConnection()


class _QuietSite(AdmittedSite):
    """A Site that does not log each request: the page polls every 2 s."""

    noisy = False
    requestFactory = _BoundedRequest

    def log(self, request: http.Request) -> None:
        """Nothing: a request is not news."""


def make_dashboard(
    *,
    listen: Listen,
    methods: ExplorerMethods,
    limits: Limits,
    token: str | None = None,
    token_file: str | None = None,
    reactor: Any = None,
    tls: Callable[[], ServerTLS | None] | None = None,
    hosts: Iterable[str] | None = None,
    admission: Admission | None = None,
    console_socket: Callable[[], str] | None = None,
    register: Callable[[Dispatcher], object] | None = None,
    audit: Callable[[str, str, str | None, str], None] | None = None,
) -> StreamServerEndpointService:
    """
    The dashboard on its own listener; a bind failure aborts start-up.

    :param listen: the :class:`~hero_compute.rpc.listen.Listen` to serve it on
    :param methods: the :class:`~hero_compute.explorer.service.ExplorerMethods`
    :param limits: the :class:`~hero_compute.rpc.limits.Limits`
    :param token: the access token, or None for a random one
    :param token_file: where ``token`` was read from, or where the random one is written
        (0600) when the dashboard starts: named in the log, never the token itself
    :param tls: to serve it over mutual TLS, a callable answering the explorer's
        :class:`~hero_compute.rpc.tls.ServerTLS` once it has started; a ``client/*``
        certificate then stands in for the token
    :param hosts: the ``Host`` names answered for (``EXPLORER_UI_HOSTS``), None for
        :data:`~hero_compute.explorer.dashboard_guard.DEFAULT_HOSTS`
    :param console_socket: a callable answering the explorer's Unix socket path, for
        the console (:mod:`.ui_console`)
    :param register: ``register(dispatcher)`` publishing the methods on the
        dashboard's dispatcher (through the audit log and the event log), or None for
        ``methods.register``
    :param audit: ``audit(caller, method, target, outcome)`` (the audit log's
        ``record``), for console attaches
    :param admission: the explorer's :class:`~hero_compute.rpc.admission.Admission`:
        connections are admitted at accept by the limits of its other listeners, and
        the dashboard's refusals are counted in its ``refusals`` (read by the metrics)
    :return: a service; its ``root`` is the :class:`DashboardRoot`
    """
    fresh = token is None
    if token is None:
        token = secrets.token_hex(24)
    clock = None if admission is None else admission.clock
    rpc = service_dispatcher("explorer", limits, _authorize, clock)
    if admission is not None:
        # Its refusals (max_batch, max_response) are counted with the process's others,
        # which the metrics read (hero_refusals_total{limit}, CONTRACT §7): this
        # dispatcher is the dashboard's alone, and no metrics collector knows it.
        rpc.refusals = admission.refusals
    (register or methods.register)(rpc)
    root = DashboardRoot(
        token,
        rpc,
        load_static(),
        summary=methods.summary,
        tls=tls,
        hosts=hosts,
        accounts=methods.accounts,
        console_socket=console_socket,
    )
    site = _QuietSite(root)
    site.timeOut = 60
    site.admission = admission
    factory: IProtocolFactory = site
    if tls is not None:
        wrap = None if admission is None else AdmittedTLSFactory
        factory = TLSOnStart(site, tls, wrap, admission)
    announcement = DashboardAnnouncement(
        token, token_file, secure=tls is not None, write=fresh
    )
    svc = listener_service(
        listen,
        factory,
        reactor,
        before=announcement.before,
        detail=announcement.detail,
    )
    methods.accounts.url_of = lambda: announcement.url
    root.audit = audit
    # Nobody reaches the page's resources through the service but a debugger or a test.
    svc.root = root  # type: ignore[attr-defined]
    svc.setName("dashboard")
    return svc


def read_token_file(path: str) -> str:
    """
    :param path: a file holding the dashboard's token on its first line
    :return: the token
    :raise ValueError: if it cannot be read or is too short to be secret
    """
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            token = f.readline().strip()
    except OSError as e:
        raise ValueError(f"cannot read the dashboard token file {path}: {e}") from e
    if len(token) < 16:
        raise ValueError(
            f"the dashboard token in {path} is shorter than 16 characters: "
            "too easy to guess"
        )
    return token
