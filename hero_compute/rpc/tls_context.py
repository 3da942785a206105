"""
The standard library's :class:`ssl.SSLContext` for our TLS listeners
(:mod:`.tls_server`), made from the same :class:`~hero_compute.rpc.tls.Credentials` as
pyOpenSSL's context of :mod:`.tls`, to speak the same TLS: 1.2 or later, forward
secrecy and AEAD only, our certificate with the CA behind it, a client certificate of the
fleet CA asked for (by the CA's name) and verified if sent, no session resumption.

Two of those :mod:`ssl` has no setting for, the session cache and the CA's name in the
certificate request: they are set on the context's ``SSL_CTX`` through ``libssl``
(:func:`_ssl_ctx` says how it is found, and checked, before anything is set).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import ssl
from collections.abc import Iterator
from typing import Any

from cryptography.hazmat.primitives import serialization

from hero_compute import pki

#: Forward secrecy and AEAD only, for TLS 1.2 (as :mod:`.tls`'s contexts).
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

# OpenSSL's SSL_CTX_ctrl commands for the session cache (ssl.h).
_SET_SESS_CACHE_MODE, _GET_SESS_CACHE_MODE, _SESS_CACHE_OFF = 44, 45, 0


def server_context(credentials: Any) -> ssl.SSLContext:
    """
    The standard library's context for a TLS listener with our certificate.

    :param credentials: :class:`~hero_compute.rpc.tls.Credentials` with a certificate
    :raises ssl.SSLError: if OpenSSL refuses the material
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS)
    # No session resumption (see .tls._context): no sealed tickets, no session cache;
    # no renegotiation.
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET | ssl.OP_NO_RENEGOTIATION
    # One TLS 1.3 ticket all the same, small, naming a session no cache holds: sent as
    # the handshake ends, it acknowledges the client's last flight at once.  Without
    # it a client that writes its request right after its Finished has it held back
    # by Nagle's algorithm until our delayed ACK, 40 ms later.
    ctx.num_tickets = 1
    # A client certificate is asked for and verified if sent; a client without one
    # may still enroll and discover (what it may call is decided above us).
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(cadata=pki.dump_certificate(credentials.ca).decode())
    pem = (
        pki.dump_certificate(credentials.certificate)
        # The CA goes with the leaf: an enrolling node learns it from the chain.
        + pki.dump_certificate(credentials.ca)
        + credentials.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    # The standard library loads a key only from a file: an anonymous one in memory,
    # so the key is never written anywhere else.
    with _memory_file(pem) as path:
        ctx.load_cert_chain(path)
    _no_session_cache(ctx)
    with _memory_file(pki.dump_certificate(credentials.ca)) as path:
        _client_ca(ctx, path)
    return ctx


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """:return: the path of an anonymous file in memory holding ``data``"""
    fd = os.memfd_create("hero-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


class _LibSSL:
    """OpenSSL's ``libssl``, the one the ``_ssl`` module uses, for what it leaves out."""

    _lib: Any = None

    @classmethod
    def get(cls) -> Any:
        if cls._lib is None:
            lib = ctypes.CDLL("libssl.so.3")
            lib.SSL_CTX_ctrl.restype = ctypes.c_long
            lib.SSL_CTX_ctrl.argtypes = [
                ctypes.c_void_p,
                ctypes.c_int,
                ctypes.c_long,
                ctypes.c_void_p,
            ]
            lib.SSL_CTX_get_options.restype = ctypes.c_uint64
            lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
            lib.OpenSSL_version_num.restype = ctypes.c_ulong
            lib.SSL_load_client_CA_file.restype = ctypes.c_void_p
            lib.SSL_load_client_CA_file.argtypes = [ctypes.c_char_p]
            lib.SSL_CTX_set_client_CA_list.restype = None
            lib.SSL_CTX_set_client_CA_list.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
            lib.SSL_CTX_get_client_CA_list.restype = ctypes.c_void_p
            lib.SSL_CTX_get_client_CA_list.argtypes = [ctypes.c_void_p]
            lib.OPENSSL_sk_num.restype = ctypes.c_int
            lib.OPENSSL_sk_num.argtypes = [ctypes.c_void_p]
            cls._lib = lib
        return cls._lib


def _ssl_ctx(ctx: ssl.SSLContext) -> Any:
    """
    :return: ``libssl`` and the ``SSL_CTX`` of ``ctx``: the first field of its C object
        (CPython's ``PySSLContext``), used only once shown to be that context of this
        library (OpenSSL's version and the context's options read back as :mod:`ssl`
        has them)
    :raises ssl.SSLError: if that cannot be shown
    """
    try:
        lib = _LibSSL.get()
    except (OSError, AttributeError):
        raise ssl.SSLError("no libssl.so.3 to reach the SSL_CTX") from None
    if lib.OpenSSL_version_num() != ssl.OPENSSL_VERSION_NUMBER:
        raise ssl.SSLError("the ssl module does not use the system's libssl.so.3")
    handle = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not handle or lib.SSL_CTX_get_options(handle) != ctx.options:
        raise ssl.SSLError("cannot find the SSL_CTX of an ssl.SSLContext")
    return lib, handle


def _client_ca(ctx: ssl.SSLContext, ca_path: str) -> None:
    """
    Name the fleet CA in our certificate request, as pyOpenSSL's ``add_client_ca``
    did (:mod:`ssl` has no setting for it): a client with several certificates, a
    browser on the dashboard, is offered only those of our CA.

    :raises ssl.SSLError: if it cannot be set
    """
    lib, handle = _ssl_ctx(ctx)
    names = lib.SSL_load_client_CA_file(ca_path.encode())
    if not names:
        raise ssl.SSLError("cannot read the CA's name for the certificate request")
    lib.SSL_CTX_set_client_CA_list(handle, names)  # the context owns them now
    if lib.OPENSSL_sk_num(lib.SSL_CTX_get_client_CA_list(handle)) != 1:
        raise ssl.SSLError("the CA's name is not in the certificate request")


def _no_session_cache(ctx: ssl.SSLContext) -> None:
    """
    Turn off the server's cache of TLS 1.2 sessions (``SSL_SESS_CACHE_OFF``), which
    :mod:`ssl` has no setting for: a client could otherwise resume a session instead of
    a full handshake, and every handshake would leave its session there.

    :raises ssl.SSLError: if the cache stays on
    """
    lib, handle = _ssl_ctx(ctx)
    lib.SSL_CTX_ctrl(handle, _SET_SESS_CACHE_MODE, _SESS_CACHE_OFF, None)
    if lib.SSL_CTX_ctrl(handle, _GET_SESS_CACHE_MODE, 0, None) != _SESS_CACHE_OFF:
        raise ssl.SSLError("the TLS session cache cannot be turned off")
