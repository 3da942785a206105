"""
PEM files of the fleet's PKI: certificates and private keys to and from PEM, and atomic
writes with an exact mode (0600 for keys, whatever the umask).
"""

import os
import stat
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from .identity import PkiError

#: A file name, as text or a path object.
StrPath = str | os.PathLike[str]


def dump_certificate(cert: x509.Certificate) -> bytes:
    """:return: ``cert`` as PEM bytes"""
    return cert.public_bytes(serialization.Encoding.PEM)


def dump_private_key(key: PrivateKeyTypes) -> bytes:
    """:return: ``key`` as unencrypted PKCS#8 PEM bytes"""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


#: The largest PEM file :func:`read_pem_file` reads: a CA bundle is a few kB.
MAX_PEM_BYTES = 1 << 20


def read_pem_file(path: StrPath, limit: int = MAX_PEM_BYTES) -> bytes:
    """
    Read a PEM file without ever blocking: it is opened non-blocking and must be a
    regular file of at most ``limit`` bytes.  A reload runs on the reactor thread, where
    a FIFO or a device put in a certificate's place would otherwise stall every
    connection.

    :return: the file's bytes
    :raises PkiError: if it cannot be opened, is not a regular file, or is too big
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise PkiError(f"cannot read {path}: {e.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PkiError(f"cannot read {path}: not a regular file")
        if info.st_size > limit:
            raise PkiError(f"cannot read {path}: over {limit} bytes")
        chunks = []
        size = 0
        # Bounded even if the file grows while it is read.
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise PkiError(f"cannot read {path}: over {limit} bytes")
        return b"".join(chunks)
    except OSError as e:
        raise PkiError(f"cannot read {path}: {e.strerror}") from None
    finally:
        os.close(fd)


def load_certificates(path: StrPath) -> list[x509.Certificate]:
    """
    :return: every certificate in the PEM file ``path``, in order (at least one)
    :raises PkiError: if the file is unreadable or holds no certificate
    """
    try:
        certs = x509.load_pem_x509_certificates(read_pem_file(path))
    except ValueError:
        certs = []
    if not certs:
        raise PkiError(f"{path} holds no PEM certificate")
    return certs


def load_certificate(path: StrPath) -> x509.Certificate:
    """:return: the first certificate in the PEM file ``path``"""
    return load_certificates(path)[0]


def load_private_key(path: StrPath) -> PrivateKeyTypes:
    """
    :return: the (unencrypted) private key in the PEM file ``path``
    :raises PkiError: if it is unreadable or not a private key
    """
    try:
        return serialization.load_pem_private_key(read_pem_file(path), password=None)
    except (ValueError, TypeError) as e:
        raise PkiError(f"{path} holds no usable private key: {e}") from None


def write_file(path: StrPath, data: bytes, mode: int = 0o600, force: bool = True) -> None:
    """
    Write ``data`` to ``path`` atomically (a temporary file renamed over it) with exactly
    ``mode``, whatever the umask: a reader never sees a partial key, nor a key that was
    world-readable for a moment.

    :param force: replace an existing file; when false, an existing file is an error
    :raises PkiError: if ``path`` exists and ``force`` is false
    """
    path = os.fspath(path)
    if not force and os.path.lexists(path):
        raise PkiError(f"{path} exists; refusing to overwrite it (use --force)")
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
