"""
The dashboard (``--ui HOST:PORT``): a read-only web page of the fleet on a listener of
its own, never on the JSON-RPC listeners.

Access works like Jupyter's: the explorer logs one URL carrying a token (random, or read
from ``EXPLORER_UI_TOKEN_FILE``); ``GET /?token=...`` trades it for a session cookie
(HttpOnly, SameSite=Strict) and redirects to ``/``; without the cookie, 401.  The page
then calls the explorer's JSON-RPC methods as a client would, through ``POST /rpc`` on
this listener, where :data:`~hero_compute.rpc.authz.DASHBOARD_POLICY` lets only the
reading ones through (-32010 for the rest).  The static files ship in the package
(``ui/static``): no build step, no framework, nothing from another origin.
"""

import collections
import hmac
import html
import os
import secrets
from importlib import resources

import attrs
from twisted.application import strports
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger
from twisted.web import resource, server
from twisted.web.http import FOUND, NOT_ALLOWED, UNAUTHORIZED

import hero_compute
from hero_compute.rpc.authz import CLIENT, DASHBOARD_POLICY, EXPLORER_POLICY
from hero_compute.rpc.dispatch import CallContext, Dispatcher
from hero_compute.rpc.schema import load_schema
from hero_compute.rpc.tls import identity_of
from hero_compute.rpc.web import RpcResource

from .dashboard_listen import Announcing, TLSOnStart
from .ui_assets import VENDORED

log = Logger()

COOKIE = b"hero_ui"

#: Sessions kept at once; the oldest is forgotten past it (each costs a few bytes, but
#: whoever holds the token could mint them without end).
MAX_SESSIONS = 1000

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
    "style.css": b"text/css; charset=utf-8",
    **VENDORED,
}


@attrs.frozen
class DashboardIdentity:
    """Who the dashboard's calls are made as: a client, by the roles table."""

    role: str = CLIENT
    name: str = "dashboard"


_IDENTITY = DashboardIdentity()


def _authorize(context, method, params):
    DASHBOARD_POLICY.check(context.transport, context.identity, method, params)
    EXPLORER_POLICY.check(context.transport, context.identity, method, params)


def load_static():
    """:return: ``{name: bytes}`` of the page's files, from the installed package"""
    folder = resources.files("hero_compute.explorer").joinpath("ui", "static")
    return {name: folder.joinpath(name).read_bytes() for name in STATIC}


class Sessions:
    """The session ids handed out for the token, oldest first."""

    def __init__(self, limit=MAX_SESSIONS):
        self._ids = collections.OrderedDict()
        self._limit = limit

    def new(self):
        """:return: a fresh session id"""
        sid = secrets.token_urlsafe(32)
        self._ids[sid] = True
        while len(self._ids) > self._limit:
            self._ids.popitem(last=False)
        return sid

    def valid(self, sid):
        """:return: whether ``sid`` (bytes or str, or None) is a live session"""
        if not sid:
            return False
        if isinstance(sid, bytes):
            sid = sid.decode("ascii", "replace")
        return sid in self._ids


def _mb(value):
    """Memory as the page's script writes it."""
    return f"{value / 1024:.1f} GiB" if value >= 1024 else f"{value} MiB"


def render_index(page, summary):
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


def _secure(request):
    for name, value in SECURITY_HEADERS.items():
        request.setHeader(name, value)


def _refuse(request, code, text):
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
        then stands in for the token
    """

    isLeaf = True

    def __init__(self, token, dispatcher, files, summary=None, tls=None):
        resource.Resource.__init__(self)
        self._token = token.encode()
        # The page acts with a client's rights, read-only, whatever carried it here.
        self._rpc_resource = RpcResource(
            dispatcher, lambda request: CallContext("tls", "dashboard", identity=_IDENTITY)
        )
        self._files = files
        self._summary = summary
        self._tls = tls
        self.sessions = Sessions()

    def render(self, request):
        _secure(request)
        path = request.postpath
        if path in ([], [b""]):
            return self._root(request)
        if len(path) == 2 and path[0] == b"static":
            return self._static(request, path[1].decode("ascii", "replace"))
        if path == [b"rpc"]:
            return self._rpc(request)
        return _refuse(request, 404, "not found")

    def _session(self, request):
        return self.sessions.valid(request.getCookie(COOKIE)) or self._client(request)

    def _client(self, request):
        """Whether the request came over TLS with a verified ``client/*`` certificate."""
        if self._tls is None:
            return False
        transport = request.channel.transport
        if not ISSLTransport.providedBy(transport):
            return False
        cert = transport.getPeerCertificate()
        creator = self._tls()
        if cert is None or creator is None:
            return False
        identity = identity_of(cert, creator.trust_domain)
        return identity is not None and identity.role == CLIENT

    def _root(self, request):
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return _refuse(request, NOT_ALLOWED, "only GET is allowed here")
        token = (request.args or {}).get(b"token")
        if token is not None:
            if not hmac.compare_digest(token[0], self._token):
                return _refuse(request, UNAUTHORIZED, "wrong token")
            request.addCookie(
                COOKIE,
                self.sessions.new().encode(),
                path=b"/",
                httpOnly=True,
                sameSite="strict",
            )
            # Off the address bar and out of the history at once.
            request.setResponseCode(FOUND)
            request.setHeader(b"location", b"/")
            return b""
        if not self._session(request):
            return _refuse(
                request,
                UNAUTHORIZED,
                "open the URL with the token that the explorer logged at start",
            )
        request.setHeader(b"content-type", STATIC["index.html"])
        if self._summary is None:
            return self._files["index.html"]
        return render_index(self._files["index.html"], self._summary())

    def _static(self, request, name):
        if name not in STATIC or name == "index.html":
            return _refuse(request, 404, "not found")
        if not self._session(request):
            return _refuse(request, UNAUTHORIZED, "no session")
        request.setHeader(b"content-type", STATIC[name])
        return self._files[name]

    def _rpc(self, request):
        if request.method != b"POST":
            request.setHeader(b"allow", b"POST")
            return _refuse(request, NOT_ALLOWED, "only POST is allowed on /rpc")
        if not self._session(request):
            return _refuse(request, UNAUTHORIZED, "no session")
        return self._rpc_resource.render_POST(request)


class _BoundedRequest(server.Request):
    """
    A request whose body may not pass :data:`MAX_BODY`: twisted.web would otherwise
    buffer any size, before the session is even checked.  Past it, the connection is
    dropped (the page never sends more than a few hundred bytes).
    """

    _received = 0

    def gotLength(self, length):
        if length is not None and length > MAX_BODY:
            self.channel.transport.abortConnection()
            return
        server.Request.gotLength(self, length)

    def handleContentChunk(self, data):
        self._received += len(data)
        if self._received > MAX_BODY:
            self.channel.transport.abortConnection()
            return
        server.Request.handleContentChunk(self, data)


class _QuietSite(server.Site):
    """A Site that does not log each request: the page polls every 2 s."""

    noisy = False
    requestFactory = _BoundedRequest

    def log(self, request):
        pass


def make_dashboard(
    *, listen, methods, limits, token=None, token_file=None, reactor=None, tls=None
):
    """
    The dashboard on its own listener, a :obj:`strports.service`, so that a bind failure
    aborts start-up.

    :param listen: the Twisted server endpoint string to serve it on
    :param methods: the :class:`~hero_compute.explorer.service.ExplorerMethods`
    :param limits: the :class:`~hero_compute.rpc.limits.Limits`
    :param token: the access token, or None for a random one
    :param token_file: where ``token`` was read from, to name it in the log (it is then
        not logged)
    :param tls: to serve it over mutual TLS, a callable answering the explorer's
        :class:`~hero_compute.rpc.tls.ServerTLS` once it has started; a ``client/*``
        certificate then stands in for the token
    :return: a service; its ``root`` is the :class:`DashboardRoot`
    """
    if token is None:
        token = secrets.token_hex(24)
    rpc = Dispatcher(
        load_schema("explorer"),
        hero_compute.__version__,
        authorize=_authorize,
        max_batch=limits.max_batch,
        max_response=limits.max_response,
    )
    methods.register(rpc)
    root = DashboardRoot(token, rpc, load_static(), summary=methods.summary, tls=tls)
    site = _QuietSite(root)
    site.timeOut = 60
    factory = site if tls is None else TLSOnStart(site, tls)
    svc = strports.service(listen, factory, reactor=reactor)
    svc.endpoint = Announcing(svc.endpoint, token, token_file, secure=tls is not None)
    svc.root = root
    svc.setName("dashboard")
    return svc


def read_token_file(path):
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
