"""
VM disks, made with ``qemu-img``: sparse qcow2 files, empty or overlaying a base image.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from hero_compute.rpc.errors import InvalidParams, InvalidVmState, RefusedByPolicy

from .process import last_line
from .store import FILE_MODE
from .tools import ToolTimeout, run

#: Seconds ``qemu-img info`` may take on a base image: it reads a header or two.  A
#: FIFO named by the image as an extent or backing file would block it for ever.
INFO_TIMEOUT = 10.0

#: Seconds ``qemu-img create`` may take: it writes a header, the disk stays sparse.
CREATE_TIMEOUT = 60.0


async def create_disk(
    reactor: Any, qemu_img: str, path: str, disk_gb: int, image: str | None = None
) -> None:
    """
    Make a qcow2 disk, readable and writable by its owner only.

    :param reactor: provides ``IReactorProcess``
    :param qemu_img: the ``qemu-img`` tool
    :param path: the disk file to make
    :param disk_gb: its virtual size in GB
    :param image: a base image to back it (its format is detected), or ``None``
    :raise InvalidParams: when ``image`` is no disk image ``qemu-img`` can read
    :raise InvalidVmState: when ``qemu-img`` fails to make the disk
    """
    args = ["create", "-q", "-f", "qcow2"]
    if image is not None:
        args += ["-b", image, "-F", await image_format(reactor, qemu_img, image)]
    args += [path, f"{disk_gb}G"]
    try:
        out, err, code = await run(
            reactor, qemu_img, args, CREATE_TIMEOUT, path=os.path.dirname(path)
        )
    except ToolTimeout:
        raise InvalidVmState(
            f"could not create the disk: qemu-img took over {CREATE_TIMEOUT:g} s"
        ) from None
    if code != 0:
        raise InvalidVmState(f"could not create the disk: {last_line(err or out)}")
    # qemu-img creates it 0644 less the umask; the directory (0700) kept it private
    # meanwhile.
    os.chmod(path, FILE_MODE)


async def image_format(reactor: Any, qemu_img: str, image: str) -> str:
    """
    :param reactor: provides ``IReactorProcess``
    :param qemu_img: the ``qemu-img`` tool
    :param image: a disk image
    :return: its format, as ``qemu-img`` detects it
    :raise InvalidParams: when it is no image ``qemu-img`` can read
    """
    # -U: the base image may be open in running VMs already; info only reads.
    try:
        out, err, code = await run(
            reactor, qemu_img, ["info", "-U", "--output=json", image], INFO_TIMEOUT
        )
    except ToolTimeout:
        raise InvalidParams(
            f"image {image!r} could not be read within {INFO_TIMEOUT:g} s "
            "(does it name a file that never ends, such as a FIFO?)",
            data={"field": "image"},
        ) from None
    try:
        if code != 0:
            raise ValueError(last_line(err or out))
        fmt = json.loads(out)["format"]
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidParams(
            f"image {image!r} is not a disk image qemu-img can read: {e}"
        ) from None
    if not isinstance(fmt, str) or not re.fullmatch(r"[a-z0-9_-]+", fmt):
        raise InvalidParams(f"image {image!r} has an unusable format {fmt!r}")
    _check_self_contained(image, fmt, json.loads(out))
    return fmt


async def recheck_base(reactor: Any, qemu_img: str, image: str) -> None:
    """
    Check a VM's base image again before QEMU opens it: QEMU follows whatever backing
    file or data file the base names at that moment, and the file may have been
    replaced in place since the VM was created.

    :param reactor: provides ``IReactorProcess``
    :param qemu_img: the ``qemu-img`` tool
    :param image: the base image, as stored at create
    :raise RefusedByPolicy: when it now names another file
    :raise InvalidVmState: when it is no longer a usable base image
    """
    try:
        await image_format(reactor, qemu_img, image)
    except InvalidParams as e:
        raise InvalidVmState(
            f"the VM's base image is no longer usable: {e.message}"
        ) from None


#: Base image formats we back a disk with: what cloud images ship in.  The others
#: (vmdk extents, qed and qcow backing files, ...) may name any file of the host.
BASE_FORMATS = frozenset({"raw", "qcow2"})


def _check_self_contained(image, fmt, info):
    # QEMU follows a base image's backing file and external data file wherever they
    # point, at every start: the guest would read (and, with a data file, write) any
    # file the node may open, its TLS key included, whatever NODE_IMAGE_DIRS says.
    if fmt not in BASE_FORMATS:
        raise InvalidParams(
            f"image {image!r} is {fmt}; a base image is raw or qcow2",
            data={"field": "image"},
        )
    specific = info.get("format-specific")
    data = specific.get("data") if isinstance(specific, dict) else None
    if "backing-filename" in info or "full-backing-filename" in info:
        refers = "a backing file"
    elif isinstance(data, dict) and "data-file" in data:
        refers = "an external data file"
    else:
        return
    raise RefusedByPolicy(
        f"image {image!r} has {refers}: a base image must hold its data itself"
    )
