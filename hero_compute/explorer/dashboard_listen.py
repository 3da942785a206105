"""
The dashboard's listener: behind mutual TLS when asked (the explorer's material, loaded
when it starts), and announced once bound with the URL to open.
"""

from twisted.internet import protocol
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from hero_compute.rpc.listeners import describe
from hero_compute.rpc.tls import tls_server_factory

log = Logger()


class TLSOnStart(protocol.Factory):
    """
    The dashboard's site behind mutual TLS, with the explorer's material: it is loaded
    when the explorer starts, so the TLS wrapper is made when the listener starts.
    """

    def __init__(self, site, tls):
        self._site = site
        self._tls = tls
        self._wrapped = None

    def doStart(self):
        creator = self._tls()
        if creator is None:
            raise ValueError(
                "the dashboard over TLS (EXPLORER_UI_TLS) needs the explorer's TLS "
                "material: EXPLORER_TLS_CERT, EXPLORER_TLS_KEY, EXPLORER_TLS_CA"
            )
        self._wrapped = tls_server_factory(creator, self._site)
        self._wrapped.doStart()

    def doStop(self):
        if self._wrapped is not None:
            self._wrapped.doStop()

    def buildProtocol(self, addr):
        return self._wrapped.buildProtocol(addr)


@implementer(IStreamServerEndpoint)
class Announcing:
    """Logs the dashboard's URL (with its token) once the endpoint is bound."""

    def __init__(self, endpoint, token, token_file, secure=False):
        self._endpoint = endpoint
        self._token = token
        self._token_file = token_file
        self._secure = secure
        self.url = None

    def listen(self, factory):
        d = self._endpoint.listen(factory)
        d.addCallback(self._announce)
        return d

    def _announce(self, port):
        uri = describe(port.getHost())
        scheme = "https" if self._secure else "http"
        url = scheme + uri[len("tcp") :] if uri.startswith("tcp://") else uri
        #: Where the dashboard is, once bound (for the accounts' login URLs).
        self.url = url
        if self._token_file is None:
            log.info(
                "listening on {uri} (dashboard: {url}/?token={token})",
                uri=uri,
                url=url,
                token=self._token,
            )
        else:
            log.info(
                "listening on {uri} (dashboard: {url}/ with the token in {file})",
                uri=uri,
                url=url,
                file=self._token_file,
            )
        return port
