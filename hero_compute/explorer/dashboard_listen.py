"""
The dashboard's listener: behind mutual TLS when asked (the explorer's material, loaded
when it starts), and announced once bound with the URL to open and the file that holds
the token (the token itself is never logged: logs are read by more people than the
explorer's state directory).
"""

import os
from typing import Any

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

    def __init__(self, site, tls, wrap=None, admission=None) -> None:
        self._site = site
        self._tls = tls
        self._wrap = wrap
        self._admission = admission
        self._wrapped: Any = None

    def doStart(self):
        creator = self._tls()
        if creator is None:
            raise ValueError(
                "the dashboard over TLS (EXPLORER_UI_TLS) needs the explorer's TLS "
                "material: EXPLORER_TLS_CERT, EXPLORER_TLS_KEY, EXPLORER_TLS_CA"
            )
        if self._wrap is None:
            self._wrapped = tls_server_factory(creator, self._site)
        else:
            # Admitted at accept, before the TLS layer (CONTRACT §7).
            self._wrapped = self._wrap(creator, self._site, self._admission)
        self._wrapped.doStart()

    def doStop(self) -> None:
        if self._wrapped is not None:
            self._wrapped.doStop()

    def buildProtocol(self, addr):
        # A listener starts its factory before it accepts anything.
        assert self._wrapped is not None, "doStart comes first"
        return self._wrapped.buildProtocol(addr)


def write_token(path, token) -> None:
    """
    Keep the dashboard's token in ``path``, mode 0600 whatever the umask (its directory
    is made 0700 if missing).

    :param path: the file
    :param token: the token (str)
    """
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, token.encode() + b"\n")
    finally:
        os.close(fd)


@implementer(IStreamServerEndpoint)
class Announcing:
    """
    Logs the dashboard's URL once the endpoint is bound, naming the file with the token.

    :param write: write ``token`` to ``token_file`` first (a fresh random one); else it
        was read from there
    """

    def __init__(
        self, endpoint, token, token_file, secure: bool = False, write: bool = False
    ) -> None:
        self._endpoint = endpoint
        self._token = token
        self._token_file = token_file
        self._secure = secure
        self._write = write
        self.url: str | None = None

    def listen(self, factory):
        if self._write and self._token_file is not None:
            write_token(self._token_file, self._token)
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
            # Only an embedder that gave neither a token file nor a state directory.
            log.info("listening on {uri} (dashboard: {url}/)", uri=uri, url=url)
        else:
            log.info(
                "listening on {uri} (dashboard: {url}/ with the token in {file})",
                uri=uri,
                url=url,
                file=self._token_file,
            )
        return port
