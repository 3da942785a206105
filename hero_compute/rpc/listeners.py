"""
Listeners: one process serves the same site on any number of listeners, each a
:class:`~hero_compute.rpc.listen.Listen` record (its Unix socket, TCP, TLS, and the
operator's ``--listen`` endpoint strings: systemd-passed sockets and the like).

A listener that cannot bind aborts start-up (twistd exits 1) instead of leaving a
process that serves nothing.  That failure is a :class:`StartupFailed` whose message
names the setting (the record's source) and the fix, and what the failed start had
created (sockets, their lock files, the socket directory) is removed first.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from .addresses import ListenAddress
from .listen import Listen, describe, listener_service

if TYPE_CHECKING:
    from .tls import ServerTLS

__all__ = ["Listeners", "StartupFailed", "clear_stale_socket", "describe"]

log = Logger()


class StartupFailed(Exception):
    """
    The process cannot start as configured.  Its message is the whole story for the
    operator, on one line: what failed, the variable or option that set it, and the fix;
    so it is printed as it is, without a traceback.
    """


def _lock_owner(path: str) -> int | None:
    """The pid in a Twisted lock file (a symlink naming it), or None."""
    try:
        return int(os.readlink(path + ".lock"))
    except (OSError, ValueError):
        return None


def _lock_is_live(path: str) -> bool:
    """Whether a path's Twisted lock names a process alive (Twisted then leaves it)."""
    pid = _lock_owner(path)
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _in_the_way(path: str, source: str) -> str:
    """
    What is at a socket path we could not bind, and what to do: another program's
    socket, or something that is no socket (left where it is: it is not ours).
    """
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        mode = stat.S_IFSOCK
    if stat.S_ISSOCK(mode):
        return f"another process serves it (ss -xlp src {path})"
    what = "a symlink" if stat.S_ISLNK(mode) else "a file"
    return (
        f"it is {what}, not a socket, and is left as it is; remove it, or set "
        f"{source} to another path"
    )


def _why(error: BaseException, listen: Listen, role: str) -> str:
    """
    One line for a listener that could not bind: what, which setting, how to fix it.

    :param error: what the endpoint's ``listen`` failed with
    :param listen: its :class:`~hero_compute.rpc.listen.Listen`
    :param role: ``explorer`` or ``node``
    """
    path, where, source = listen.path, listen.where, listen.source
    reason = error.socketError if isinstance(error, CannotListenError) else error
    if path is not None and reason == "Cannot acquire lock":
        pid = _lock_owner(path)
        return (
            f"another {role}, pid {pid}, serves {path} ({source}); stop it, or set "
            f"{source} to another path"
        )
    code = getattr(reason, "errno", None)
    if code == errno.EADDRINUSE:
        if path is not None:
            hint = _in_the_way(path, source)
        else:
            port = where.rsplit(":", 1)[-1]
            hint = f"another process has it (ss -ltnp 'sport = :{port}')"
        return f"cannot listen on {where} ({source}): address already in use; {hint}"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        if path is not None:
            hint = (
                f"set {source} to a place this user (uid {os.getuid()}) may write, or "
                f"make {os.path.dirname(path)} writable for it"
            )
        else:
            hint = "ports below 1024 need root or CAP_NET_BIND_SERVICE; choose another"
        return f"cannot listen on {where} ({source}): permission denied; {hint}"
    if code == errno.EADDRNOTAVAIL:
        return (
            f"cannot listen on {where} ({source}): no interface of this machine has "
            "that address; use one of its addresses, or 0.0.0.0"
        )
    text = getattr(reason, "strerror", None) or str(reason)
    return f"cannot listen on {where} ({source}): {text}"


def _unusable(listen: Listen, error: Exception) -> str:
    """One line for a server endpoint string that names no usable endpoint."""
    description = listen.description
    if listen.kind != "endpoint":
        return f"{listen.where} ({listen.source}): {error}"
    assert description is not None
    if description.startswith("systemd:") and isinstance(error, (KeyError, IndexError)):
        return (
            f"--listen {description}: systemd passed no such socket (LISTEN_FDS, "
            "LISTEN_FDNAMES); start it through its .socket unit (or "
            "systemd-socket-activate), or drop this --listen"
        )
    return f"--listen {description}: {error}"


def clear_stale_socket(path: str) -> None:
    """
    Remove a Unix socket that nothing listens on any more (a crash left it), with its
    lock file, so that it cannot block a restart; a live socket is left alone, and the
    bind then fails clearly.

    Twisted's lock file alone is not enough: it judges a lock by whether its pid is
    alive, and in a container a restarted daemon often gets the very same pid.

    :param path: the socket path
    """
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return
    except OSError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        log.info("removing stale socket {path}: nothing listens on it", path=path)
        for leftover in (path, path + ".lock"):
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                pass
    except OSError:
        pass
    finally:
        probe.close()


def _makedirs(path: str, created: list[str]) -> None:
    """
    ``os.makedirs(path, 0o755)``, adding each directory it creates to ``created``,
    outermost first.
    """
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o755)
        except FileExistsError:
            continue
        except OSError as e:
            e.filename = directory
            raise
        created.append(directory)


class Listeners(service.MultiService):
    """
    The listeners of one process, all serving one factory.

    :param factory: the protocol factory (an HTTP site)
    :param listens: :class:`~hero_compute.rpc.listen.Listen` records; a string is a
        Twisted server endpoint string as an operator gives it to ``--listen``
    :param socket_dirs: directories to create (mode 0755) before binding, for the Unix
        sockets among them
    :param reactor: the reactor
    :param role: what the process is, ``explorer`` or ``node``, for start-up failures
    :raise StartupFailed: for an endpoint string that names no usable endpoint
    """

    def __init__(
        self,
        factory: Factory,
        listens: Iterable[Listen | str],
        socket_dirs: Iterable[str] = (),
        reactor: Any = None,
        role: str = "process",
    ) -> None:
        service.MultiService.__init__(self)
        #: URIs of the bound listeners, in the order they came up.
        self.bound: list[str] = []
        self._socket_dirs = tuple(socket_dirs)
        self._factory = factory
        self._role = role
        #: The :class:`~hero_compute.rpc.listen.Listen` of each child, by child.
        self._listens: dict[service.IService, Listen] = {}
        for listen in listens:
            if isinstance(listen, str):
                listen = Listen.endpoint(listen)
            self._add(listen, factory, reactor)

    def _add(self, listen: Listen, factory: Any, reactor: Any) -> service.Service:
        try:
            svc = listener_service(
                listen, factory, reactor, bound=self.bound, warn_plain=True
            )
        except (ValueError, KeyError, IndexError) as e:
            raise StartupFailed(_unusable(listen, e)) from None
        self._listens[svc] = listen
        svc.setServiceParent(self)
        return svc

    def add_tls(
        self, listen: Listen | ListenAddress, creator: ServerTLS, reactor: Any = None
    ) -> service.Service:
        """
        Also serve mutual TLS on a TCP address, in the same reactor as the others.  Like
        the others, it aborts start-up when it cannot bind.

        :param listen: a ``tls`` :class:`~hero_compute.rpc.listen.Listen` (or a
            :class:`~hero_compute.rpc.addresses.ListenAddress`, as ``--tls``)
        :param creator: a :class:`~hero_compute.rpc.tls.ServerTLS` (reloadable: new
            connections use its current certificate)
        """
        from .admission import AdmittedTLSFactory
        from .tls import tls_server_factory

        if not isinstance(listen, Listen):
            listen = Listen.tls(listen)
        # Admitted at accept, before the TLS layer, by the same limits as plain TCP.
        admission = getattr(self._factory, "admission", None)
        tls = (
            tls_server_factory(creator, self._factory)
            if admission is None
            else AdmittedTLSFactory(creator, self._factory, admission)
        )
        return self._add(listen, tls, reactor)

    def privilegedStartService(self) -> None:
        created: list[str] = []
        try:
            for path in self._socket_dirs:
                _makedirs(path, created)
        except OSError as e:
            self._undo(created, [])
            source = self._dir_source(path)
            raise StartupFailed(
                f"cannot create the socket directory {e.filename or path} ({source}): "
                f"{e.strerror}; set {source} to a directory this user "
                f"(uid {os.getuid()}) may create or write"
            ) from None
        for listen in self._listens.values():
            if listen.path is None:
                continue
            clear_stale_socket(listen.path)
            # Left there, and no live lock: Twisted would take the lock as stale and
            # unlink what is at the path (another program's live socket) to bind.
            if os.path.lexists(listen.path) and not _lock_is_live(listen.path):
                self._undo(created, [])
                in_use = OSError(errno.EADDRINUSE, "address already in use")
                raise StartupFailed(_why(in_use, listen, self._role))
        # Whose lock each path had before we bound: Twisted takes a path's lock before
        # its bind can fail, so a lock naming us is ours only if it did not already.
        owners: dict[str | None, int | None] = {
            listen.path: _lock_owner(listen.path)
            for listen in self._listens.values()
            if listen.path is not None
        }
        # Child by child rather than MultiService's loop: to know which one failed.
        service.Service.privilegedStartService(self)
        bound: list[Listen] = []
        for svc in self:
            listen = self._listens[svc]
            try:
                svc.privilegedStartService()
            except (CannotListenError, OSError) as e:
                self._undo(created, bound, listen, owners.get(listen.path))
                raise StartupFailed(_why(e, listen, self._role)) from None
            bound.append(listen)

    def _dir_source(self, directory: str) -> str:
        """The variable that set a socket directory: that of a socket in it."""
        for listen in self._listens.values():
            if listen.path is not None and os.path.dirname(listen.path) == directory:
                return listen.source
        return "HERO_SOCKET_DIR"

    def _undo(
        self,
        directories: list[str],
        bound: list[Listen],
        failed: Listen | None = None,
        owner: int | None = None,
    ) -> None:
        """
        Remove what a failed start made, and only that: the Unix sockets it bound and
        their lock files (the ports are never closed, as the process exits; their
        sockets go with it), the lock file the listener that failed took, then the
        directories it made, if empty.  Whatever was at the failed listener's path (a
        file, a symlink, another program's socket) is not ours and stays.

        :param directories: the directories it made, outermost first
        :param bound: the listeners that bound
        :param failed: the listener that could not bind, or None
        :param owner: the pid its path's lock named before the start, or None
        """
        ours = []
        for listen in bound:
            if listen.path is not None:
                ours.append(listen.path)
                if _lock_owner(listen.path) == os.getpid():
                    ours.append(listen.path + ".lock")
        path = None if failed is None else failed.path
        if path is not None:
            took_lock = _lock_owner(path) == os.getpid() and owner != os.getpid()
            if took_lock:
                ours.append(path + ".lock")
        for leftover in ours:
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                pass
        for path in reversed(directories):
            try:
                os.rmdir(path)
            except OSError:
                pass

    def stopService(self) -> Deferred[None] | None:
        d: Deferred[None] | None = service.MultiService.stopService(self)
        self.bound.clear()
        return d
