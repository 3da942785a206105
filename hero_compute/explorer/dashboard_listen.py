"""
The dashboard's listener: behind mutual TLS when asked (the explorer's material, loaded
when it starts), and announced once bound with the URL to open and the file that holds
the token (the token itself is never logged: logs are read by more people than the
explorer's state directory).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import protocol

from hero_compute.rpc.tls import tls_server_factory

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress

    from hero_compute.rpc.admission import Admission
    from hero_compute.rpc.tls import ServerTLS


class TLSOnStart(protocol.Factory):
    """
    The dashboard's site behind mutual TLS, with the explorer's material: it is loaded
    when the explorer starts, so the TLS wrapper is made when the listener starts.

    :param site: the dashboard's ``twisted.web`` site
    :param tls: a callable answering the explorer's
        :class:`~hero_compute.rpc.tls.ServerTLS`, None while it has none
    :param wrap: ``wrap(creator, site, admission)`` making the TLS factory that admits
        connections at accept (:class:`~hero_compute.rpc.admission.AdmittedTLSFactory`),
        or None for a plain one
    :param admission: the explorer's :class:`~hero_compute.rpc.admission.Admission`,
        passed to ``wrap`` (without one, the TLS factory is a plain one)
    """

    def __init__(
        self,
        site: protocol.Factory[Any],
        tls: Callable[[], ServerTLS | None],
        wrap: Callable[[ServerTLS, protocol.Factory[Any], Admission], protocol.Factory[Any]]
        | None = None,
        admission: Admission | None = None,
    ) -> None:
        self._site = site
        self._tls = tls
        self._wrap = wrap
        self._admission = admission
        self._wrapped: protocol.Factory[Any] | None = None

    def doStart(self) -> None:
        """
        Make the TLS wrapper with the material loaded by now.

        :raise ValueError: if the explorer has no TLS material
        """
        creator = self._tls()
        if creator is None:
            raise ValueError(
                "the dashboard over TLS (EXPLORER_UI_TLS) needs the explorer's TLS "
                "material: EXPLORER_TLS_CERT, EXPLORER_TLS_KEY, EXPLORER_TLS_CA"
            )
        if self._wrap is None or self._admission is None:
            self._wrapped = tls_server_factory(creator, self._site)
        else:
            # Admitted at accept, before the TLS layer (CONTRACT §7).
            self._wrapped = self._wrap(creator, self._site, self._admission)
        self._wrapped.doStart()

    def doStop(self) -> None:
        """Stop the TLS wrapper, if it was made."""
        if self._wrapped is not None:
            self._wrapped.doStop()

    def buildProtocol(self, addr: IAddress | None) -> protocol.Protocol | None:
        """:return: the TLS wrapper's protocol for a connection from ``addr``"""
        # A listener starts its factory before it accepts anything.
        assert self._wrapped is not None, "doStart comes first"
        return self._wrapped.buildProtocol(addr)


def write_token(path: str, token: str) -> None:
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


class DashboardAnnouncement:
    """
    What the dashboard's listener says once bound (through
    :class:`~hero_compute.rpc.listen.Announcing`): its URL and the file with the token.

    :param token: the token
    :param token_file: the file it is kept in, or None
    :param secure: it is served over TLS (``https``)
    :param write: write ``token`` to ``token_file`` before binding (a fresh random
        one); else it was read from there
    """

    def __init__(
        self, token: str, token_file: str | None, secure: bool = False, write: bool = False
    ) -> None:
        self._token = token
        self._token_file = token_file
        self._secure = secure
        self._write = write
        #: Where the dashboard is, once bound (for the accounts' login URLs).
        self.url: str | None = None

    def before(self) -> None:
        """Keep a fresh token in its file before the listener binds."""
        if self._write and self._token_file is not None:
            write_token(self._token_file, self._token)

    def detail(self, uri: str) -> str:
        """
        :param uri: the bound listener's URI
        :return: what follows it in the ``listening on`` line
        """
        scheme = "https" if self._secure else "http"
        url = scheme + uri[len("tcp") :] if uri.startswith("tcp://") else uri
        self.url = url
        if self._token_file is None:
            # Only an embedder that gave neither a token file nor a state directory.
            return f" (dashboard: {url}/)"
        return f" (dashboard: {url}/ with the token in {self._token_file})"
