"""
VM definitions on disk: one directory per VM under ``<state_dir>/vms``, holding its
definition (``vm.json``, the VmInfo and nothing else) and its disk.

The definition is written last when a VM is made and removed first when it is deleted,
so a directory without one is the remains of an operation cut short, never a VM.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
from collections.abc import Collection
from typing import Any

import attrs
import jsonschema
from jsonschema.exceptions import best_match
from twisted.logger import Logger

from hero_compute.node.vms import VmRecord, default_hostname, mac_address
from hero_compute.rpc.schema import load_schema

#: The file names inside a VM's directory.
DEFINITION = "vm.json"
DISK = "disk.qcow2"
PIDFILE = "qemu.pid"
QMP_SOCKET = "qmp.sock"

_ID = re.compile(r"\A[0-9a-f]{32}\Z")

#: A VM's directory and everything in it are the node's alone: a guest's disk holds
#: whatever its owner put there.  Set with chmod, so the umask cannot widen them.
DIRECTORY_MODE = 0o700
FILE_MODE = 0o600


def private_directory(path: str) -> None:
    """
    Make ``path`` (or take the existing one) and restrict it to its owner.

    :param path: a directory
    """
    os.makedirs(path, mode=DIRECTORY_MODE, exist_ok=True)
    os.chmod(path, DIRECTORY_MODE)


@functools.cache
def _vm_info_validator():
    types = load_schema("node").types
    schema = dict(types["VmInfo"], components={"schemas": types})
    return jsonschema.Draft202012Validator(schema)


def record_from_wire(data: dict[str, Any]) -> VmRecord:
    """
    A VM record from its definition, checked against the schema's ``VmInfo``: the node
    never reports a record its own schema calls invalid.

    :param data: the decoded ``vm.json``
    :return: a :class:`~hero_compute.node.vms.VmRecord`
    :raise ValueError: when ``data`` is no valid VmInfo
    """
    if isinstance(data, dict) and isinstance(data.get("vm_id"), str):
        data = _upgrade(data)
    error = best_match(_vm_info_validator().iter_errors(data))
    if error is not None:
        where = ".".join(str(part) for part in error.absolute_path)
        raise ValueError(f"not a VmInfo: {where + ': ' if where else ''}{error.message}")
    return VmRecord.from_wire(data)


def _upgrade(data):
    """A definition from before networks and seeds, with what such a VM has: its
    default host name, no network (it had no NIC), no keys, no kernel boot."""
    name = data.get("name")
    defaults: dict[str, object] = {
        "hostname": default_hostname(name) if isinstance(name, str) else "vm",
        "network": {"mode": "none", "mac": mac_address(data["vm_id"]), "ports": []},
        "ssh_keys": [],
        "boot": None,
    }
    return {**defaults, **data}


@attrs.frozen
class VmStore:
    """
    The VM directories under one root.

    :ivar root: ``<state_dir>/vms``
    """

    log = Logger()

    root: str

    def directory(self, vm_id: str) -> str:
        """:return: the directory of VM ``vm_id``"""
        return os.path.join(self.root, vm_id)

    def make_directory(self, vm_id: str) -> str:
        """
        Make a new VM's directory.

        :return: its path
        """
        private_directory(self.root)
        path = self.directory(vm_id)
        os.mkdir(path, DIRECTORY_MODE)
        os.chmod(path, DIRECTORY_MODE)
        return path

    def save(self, record: VmRecord) -> None:
        """
        Write a VM's definition atomically: a crash leaves the old or the new one.

        :param record: the :class:`~hero_compute.node.vms.VmRecord`
        """
        directory = self.directory(record.vm_id)
        path = os.path.join(directory, DEFINITION)
        tmp = path + ".tmp"
        data = json.dumps(record.to_wire(), indent=2, sort_keys=True).encode("utf-8")
        # A few hundred bytes: the synchronous write and fsync cost less than a thread
        # hand-off would, and keep writes for one VM in order.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            os.fchmod(fd, FILE_MODE)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def load(self, known: Collection[str] = ()) -> list[VmRecord]:
        """
        Read every definition, removing directories a crash left without one; a
        definition that cannot be read is logged and left on disk for the operator.
        Directories and disks made by an older node with looser modes are restricted.

        :param known: ids to skip (already loaded)
        :return: the :class:`~hero_compute.node.vms.VmRecord`\\ s found, by id order
        """
        private_directory(self.root)
        records = []
        for entry in sorted(os.listdir(self.root)):
            directory = os.path.join(self.root, entry)
            if not _ID.match(entry) or not os.path.isdir(directory) or entry in known:
                continue
            path = os.path.join(directory, DEFINITION)
            if not os.path.exists(path):
                self.log.warn("removing unfinished VM directory {path}", path=directory)
                shutil.rmtree(directory, ignore_errors=True)
                continue
            try:
                with open(path, "rb") as f:
                    record = record_from_wire(json.load(f))
                if record.vm_id != entry:
                    raise ValueError(f"vm_id {record.vm_id!r} does not match its directory")
            except Exception:
                # Never delete what we cannot read.
                self.log.failure("cannot load VM definition {path}; ignoring it", path=path)
                continue
            _restrict(directory)
            records.append(record)
        return records

    def remove(self, vm_id: str) -> None:
        """Delete a VM's definition, then everything else in its directory."""
        try:
            os.unlink(os.path.join(self.directory(vm_id), DEFINITION))
        except FileNotFoundError:
            pass
        self.discard(vm_id)

    def discard(self, vm_id: str) -> None:
        """Remove a VM directory that holds no definition (a create that failed)."""
        shutil.rmtree(self.directory(vm_id), ignore_errors=True)


def _restrict(directory) -> None:
    """Give a VM directory and its disk the modes a new VM gets."""
    os.chmod(directory, DIRECTORY_MODE)
    try:
        os.chmod(os.path.join(directory, DISK), FILE_MODE)
    except FileNotFoundError:
        pass
