"""
The node's base images (CONTRACT §8 "Images"): ``node.images`` lists what lies under
``NODE_IMAGE_DIRS``, and ``image.import`` downloads one by URL into the first of them.

An import is all or nothing: the bytes go into a hidden temporary file beside the
destination (``.import-<name>.<random>``), hashed as they arrive; only when the digest
matches is the file synced and linked into place under its name (``link``, so a file
that appeared meanwhile is never replaced), and its directory synced.  Anything else
(a wrong digest, a size over ``NODE_IMAGE_MAX``, a cut connection, a full disk, a node
stopping) removes the temporary file and shows the name as ``failed`` with the reason
until the name is imported again.  Temporary files a crash left behind are removed when
the node starts.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application import service
from twisted.internet import defer, threads
from twisted.logger import Logger

from hero_compute.rpc.errors import InvalidVmState

from .fetch import (
    HEAD_TIMEOUT,
    MIN_RATE,
    RATE_WINDOW,
    Download,
    FetchError,
    TempFile,
    check_target,
    check_url,
)
from .qemu.disks import INFO_TIMEOUT
from .qemu.images import ImagePolicy, default_image_dirs
from .qemu.tools import ToolTimeout, run

if TYPE_CHECKING:
    from hero_compute.rpc.dispatch import Dispatcher


log = Logger()

#: ``NODE_IMAGE_MAX`` when unset: 20 GiB.
DEFAULT_IMAGE_MAX = 20 * 2**30

#: Imports running at once on one node; beyond it ``image.import`` is -32005.
MAX_IMPORTS = 2

#: Prefix of the temporary files imports write (hidden, never a valid image name).
TEMP_PREFIX = ".import-"

#: ``qemu-img info`` runs at once while listing.
INFO_CONCURRENCY = 4

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")


def make_images(
    reactor: Any, image_dirs: Sequence[str], state_dir: str, settings: tuple[int, bool]
) -> Images:
    """
    :param image_dirs: ``NODE_IMAGE_DIRS``, or empty for ``state_dir/images``
    :param settings: what :func:`~.tap_images.image_settings` returned
    :return: the node's :class:`Images`
    """
    max_bytes, allow_local = settings
    return Images(
        reactor,
        image_dirs or default_image_dirs(state_dir),
        max_bytes=max_bytes,
        allow_local=allow_local,
    )


@attrs.define
class _Import:
    """One import in progress."""

    path: str
    bytes_done: int = 0
    bytes_total: int | None = None
    download: Download | None = None
    finished: defer.Deferred | None = None

    def to_wire(self, name):
        return {
            "name": name,
            "path": self.path,
            "format": None,
            "size_bytes": self.bytes_done,
            "virtual_size_bytes": None,
            "state": "importing",
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
        }


class Images(service.Service):
    """
    The base images of one node, and their imports.

    :param reactor: the reactor (processes for ``qemu-img``, the thread pool for file
        work and name lookups, connections for downloads)
    :param image_dirs: the image directories (``NODE_IMAGE_DIRS``); imports go into
        the first
    :param max_bytes: the largest image an import may bring (``NODE_IMAGE_MAX``)
    :param allow_local: fetch from loopback and the other addresses the policy refuses
        (``NODE_IMAGE_FETCH_LOCAL=1``)
    :param qemu_img: the ``qemu-img`` tool, for formats and virtual sizes
    :param max_imports: imports at once
    :param idle: seconds without a byte before a download is cut
    :param min_rate: the least average bytes per second of a download over each
        ``rate_window`` seconds, or 0 for no minimum
    :param rate_window: seconds the rate is averaged over
    :param head_timeout: seconds from a download's request to its response head,
        redirects included
    """

    def __init__(
        self,
        reactor: Any,
        image_dirs: Sequence[str],
        *,
        max_bytes: int = DEFAULT_IMAGE_MAX,
        allow_local: bool = False,
        qemu_img: str = "qemu-img",
        max_imports: int = MAX_IMPORTS,
        idle: float = 60.0,
        min_rate: float = MIN_RATE,
        rate_window: float = RATE_WINDOW,
        head_timeout: float = HEAD_TIMEOUT,
    ) -> None:
        self._reactor = reactor
        self._policy = ImagePolicy(image_dirs)
        self.directory = self._policy.image_dirs[0]
        self.max_bytes = max_bytes
        self.allow_local = allow_local
        self._qemu_img = qemu_img
        self._max_imports = max_imports
        self._idle = idle
        self._min_rate = min_rate
        self._rate_window = rate_window
        self._head_timeout = head_timeout
        #: Imports in progress, by name.
        self.importing: dict[str, _Import] = {}
        #: Failed imports, by name: ``{"path", "error"}``.
        self.failed: dict[str, dict[str, str]] = {}
        #: ``resolved path -> ((mtime, size, inode), (format, virtual size))``
        self._info: dict[str, tuple[Any, Any]] = {}
        self._info_limit = defer.DeferredSemaphore(INFO_CONCURRENCY)

    def register(self, rpc: Dispatcher) -> None:
        """Publish ``node.images`` and ``image.import`` on a dispatcher."""
        rpc.register("node.images", self.list)
        rpc.register(
            "image.import",
            lambda url, name, sha256: defer.ensureDeferred(self.start(url, name, sha256)),
        )

    def startService(self) -> None:
        service.Service.startService(self)
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        for name in names:
            if name.startswith(TEMP_PREFIX):
                path = os.path.join(self.directory, name)
                log.info("removing {path}, left by an interrupted import", path=path)
                try:
                    os.unlink(path)
                except OSError as e:
                    log.warn("cannot remove {path}: {e}", path=path, e=e)

    def stopService(self) -> defer.Deferred[Any]:
        service.Service.stopService(self)
        waits = []
        for entry in self.importing.values():
            if entry.download is not None:
                entry.download.abort("the node stopped during the import")
            if entry.finished is not None:
                waits.append(entry.finished)
        return defer.DeferredList(waits)

    # -- node.images

    def list(self) -> defer.Deferred[list[dict[str, Any]]]:
        """
        :return: a Deferred of the ImageInfo list: ready images of every directory
            (a name in several directories is listed once per directory), imports in
            progress, and failed ones
        """
        found = []
        for directory in self._policy.image_dirs:
            try:
                entries = sorted(os.scandir(directory), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                if entry.name.startswith(".") or (
                    directory == self.directory and entry.name in self.importing
                ):
                    continue
                try:
                    resolved = self._policy.resolve(entry.path)
                    assert resolved is not None  # a path resolves to a path
                    stat = os.stat(resolved)
                except Exception:  # a symlink out of the directories, a subdirectory
                    continue
                found.append((entry.name, entry.path, resolved, stat))
        for gone in set(self._info) - {item[2] for item in found}:
            del self._info[gone]  # the cache stays the size of the directories
        d = defer.gatherResults(
            [
                self._info_limit.run(lambda i: defer.ensureDeferred(self._ready(*i)), item)
                for item in found
            ],
            consumeErrors=True,
        )

        def others(ready):
            live = [entry.to_wire(name) for name, entry in sorted(self.importing.items())]
            failed = [
                {
                    "name": name,
                    "path": entry["path"],
                    "format": None,
                    "size_bytes": 0,
                    "virtual_size_bytes": None,
                    "state": "failed",
                    "error": entry["error"],
                }
                for name, entry in sorted(self.failed.items())
            ]
            return ready + live + failed

        return d.addCallback(others)

    async def _ready(self, name, path, resolved, stat):
        key = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        cached = self._info.get(resolved)
        if cached is None or cached[0] != key:
            cached = self._info[resolved] = (key, await self._qemu_info(resolved))
        fmt, virtual = cached[1]
        return {
            "name": name,
            "path": path,
            "format": fmt,
            "size_bytes": stat.st_size,
            "virtual_size_bytes": virtual,
            "state": "ready",
        }

    async def _qemu_info(self, path):
        """:return: ``(format, virtual size)``, both None when qemu-img cannot say"""
        try:
            # -U: the image may be open in running VMs; info only reads.
            args = ["info", "-U", "--output=json", path]
            out, _, code = await run(self._reactor, self._qemu_img, args, INFO_TIMEOUT)
            info = json.loads(out) if code == 0 else {}
        except (OSError, ValueError, ToolTimeout):
            info = {}
        info = info if isinstance(info, dict) else {}
        fmt, virtual = info.get("format"), info.get("virtual-size")
        return (
            fmt if isinstance(fmt, str) else None,
            virtual if isinstance(virtual, int) and virtual >= 0 else None,
        )

    # -- image.import

    async def start(self, url: str, name: str, sha256: str) -> dict[str, Any]:
        """
        Start importing ``url`` as ``name``; answers once the download has started.

        :return: ``{"name", "state": "importing"}``
        :raise InvalidVmState: -32005 at once for an existing or importing name, a bad
            URL, an address the policy refuses, or too many imports
        """
        if not _NAME.match(name):
            raise InvalidVmState(f"bad image name {name!r}")
        host, port = check_url(url)
        if name in self.importing:
            raise InvalidVmState(f"image {name!r} is being imported already")
        path = os.path.join(self.directory, name)
        if os.path.lexists(path):
            raise InvalidVmState(
                f"image {name!r} exists already ({path}): pick another name, or remove "
                "the file first"
            )
        if len(self.importing) >= self._max_imports:
            raise InvalidVmState(
                f"{len(self.importing)} imports are running on this node, the most at "
                "once; try again when one is done"
            )
        entry = self.importing[name] = _Import(path)
        try:
            # Checked now so that a refused address is an error at once; checked again
            # at connect time (and at each redirect) on the address connected to.
            await check_target(self._reactor, host, port, self.allow_local)
            file = await threads.deferToThreadPool(
                self._reactor, self._reactor.getThreadPool(), self._open, name
            )
        except FetchError as e:
            del self.importing[name]
            raise InvalidVmState(f"cannot import {url!r}: {e.reason}") from None
        except OSError as e:
            del self.importing[name]
            raise InvalidVmState(
                f"cannot write into {self.directory}: {e.strerror or e}"
            ) from None
        self.failed.pop(name, None)
        log.info("importing {url} as {path}", url=url, path=path)
        entry.download = Download(
            self._reactor,
            url,
            file,
            limit=self.max_bytes,
            allow_local=self.allow_local,
            progress=lambda done, total: self._progress(entry, done, total),
            idle=self._idle,
            min_rate=self._min_rate,
            rate_window=self._rate_window,
            head_timeout=self._head_timeout,
        )
        entry.finished = defer.ensureDeferred(
            self._complete(name, entry, file, sha256.lower())
        )
        return {"name": name, "state": "importing"}

    def _open(self, name):
        os.makedirs(self.directory, mode=0o755, exist_ok=True)
        file = TempFile(
            os.path.join(self.directory, f"{TEMP_PREFIX}{name}.{secrets.token_hex(4)}")
        )
        file.open()
        return file

    @staticmethod
    def _progress(entry, done, total) -> None:
        entry.bytes_done = done
        entry.bytes_total = total

    async def _complete(self, name, entry, file, sha256):
        pool = self._reactor.getThreadPool()
        try:
            try:
                await entry.download.done
                got = file.digest.hexdigest()
                if got != sha256:
                    raise FetchError(f"wrong digest: expected sha256 {sha256}, got {got}")
                await threads.deferToThreadPool(
                    self._reactor, pool, self._install, file, entry.path
                )
            except FetchError as e:
                reason = e.reason
            except OSError as e:
                reason = f"cannot install the image: {e.strerror or e}"
            else:
                log.info("imported {path}", path=entry.path)
                return
            log.warn("import of {name} failed: {reason}", name=name, reason=reason)
            await threads.deferToThreadPool(self._reactor, pool, file.discard)
            self.failed[name] = {"path": entry.path, "error": reason}
        finally:
            del self.importing[name]

    @staticmethod
    def _install(file, path):
        file.finish()
        try:
            # Not rename: a file that took the name meanwhile must not be replaced.
            os.link(file.path, path)
        except FileExistsError:
            raise FetchError(
                f"a file named {os.path.basename(path)} appeared during the import"
            ) from None
        finally:
            os.unlink(file.path)
        directory = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
