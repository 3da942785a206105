"""
How people get into a VM (CONTRACT §8): the ``vm.create`` params ``ssh_keys``,
``user_data``, ``hostname``, ``network``, ``ports`` and ``boot``, from the request to
what QEMU is given at each start.

At create, :meth:`AccessPolicy.plan` checks them all before anything is made (bad values
are -32602 naming the param, a bridge or a boot file the node does not allow -32010, a
host port outside the range or in use -32005) and returns an :class:`Access`: the
record's new fields, plus the keys and user data, which are kept beside the definition
in ``seed.json`` (0600) and never in the VmInfo.  At each start, :func:`prepare` writes
the seed afresh and checks the boot files again (as the base image is), and makes the
tap of a bridged VM; :func:`release` removes that tap once QEMU is gone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import attrs

from hero_compute.node.vms import DEFAULT_CMDLINE, BootSpec, default_hostname
from hero_compute.rpc.errors import InvalidParams, InvalidVmState, RpcError

from . import network as net
from . import seed
from .images import ImagePolicy
from .store import FILE_MODE

if TYPE_CHECKING:
    from hero_compute.node.vms import VmNetwork, VmRecord


#: Beside ``vm.json``: the SSH keys and user data, which VmInfo never shows.
SECRETS = "seed.json"
MAX_CMDLINE = 4096


@attrs.frozen
class Access:
    """
    A new VM's access, planned.

    :ivar fields: the :class:`~hero_compute.node.vms.VmRecord` fields (``hostname``,
        ``network``, ``ssh_keys`` as fingerprints, ``boot``)
    :ivar secrets: what goes to ``seed.json``: ``ssh_keys`` and ``user_data``
    """

    fields: dict
    secrets: dict


@attrs.frozen
class AccessPolicy:
    """
    :ivar network: the node's :class:`~.network.NetworkPolicy`
    :ivar images: the node's :class:`~.images.ImagePolicy`, for boot files
    """

    network: net.NetworkPolicy
    images: ImagePolicy

    def plan(
        self,
        vm_id: str,
        name: str,
        held_ports: Iterable[tuple[str, int]],
        ssh_keys: list[str] | None = None,
        user_data: str | None = None,
        hostname: str | None = None,
        network: str | None = None,
        ports: list[dict[str, Any]] | None = None,
        boot: dict[str, Any] | None = None,
    ) -> Access:
        """
        Check a new VM's access params and settle its network.

        :param vm_id: the new VM's id (its MAC derives from it)
        :param name: its name (the default host name derives from it)
        :param held_ports: ``(protocol, host)`` pairs other VMs hold
        :return: an :class:`Access`
        :raise InvalidParams: naming the param
        :raise RefusedByPolicy: a bridge or boot file the node does not allow
        :raise InvalidVmState: a host port outside the range or in use
        """
        try:
            fingerprints = seed.check_keys(list(ssh_keys or ()))
            if user_data is not None:
                seed.check_user_data(user_data)
            if hostname is not None:
                seed.check_hostname(hostname)
        except seed.SeedError as e:
            raise InvalidParams(str(e), data={"field": e.param}) from None
        return Access(
            fields={
                "hostname": hostname or default_hostname(name),
                "network": self.network.plan(vm_id, network, ports, held_ports),
                "ssh_keys": tuple(fingerprints),
                "boot": self._boot(boot),
            },
            secrets={"ssh_keys": list(ssh_keys or ()), "user_data": user_data},
        )

    def _boot(self, boot):
        if boot is None:
            return None
        cmdline = boot.get("cmdline", DEFAULT_CMDLINE)
        if len(cmdline.encode()) > MAX_CMDLINE or "\0" in cmdline:
            raise InvalidParams(
                f"boot.cmdline: at most {MAX_CMDLINE} bytes, no NUL",
                data={"field": "boot.cmdline"},
            )
        kernel = self._file(boot.get("kernel"), "kernel")
        initrd = self._file(boot.get("initrd"), "initrd")
        return BootSpec(kernel, initrd, cmdline)

    def _file(self, path, what):
        try:
            return self.images.resolve(path)
        except RpcError as e:
            # The image rules, worded for this param.
            message = e.faultString.replace("image ", f"boot.{what} ", 1)
            raise type(e)(message, data={"field": f"boot.{what}"}) from None

    def check_stored(self, record: VmRecord) -> None:
        """
        Check, before QEMU opens them, that a VM's boot files are still allowed.

        :raise RefusedByPolicy: per :meth:`~.images.ImagePolicy.check_stored`
        """
        if record.boot is not None:
            self.images.check_stored(record.boot.kernel)
            self.images.check_stored(record.boot.initrd)


def save_secrets(directory: str, secrets: dict[str, Any]) -> None:
    """
    Keep a VM's keys and user data in its directory (0600), if it has any.

    :param directory: the VM's directory
    :param secrets: :attr:`Access.secrets`
    """
    if not secrets["ssh_keys"] and secrets["user_data"] is None:
        return
    path = os.path.join(directory, SECRETS)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), FILE_MODE)
        json.dump(secrets, f)


def load_secrets(directory: str) -> dict[str, Any]:
    """
    :param directory: a VM's directory
    :return: its keys and user data (none for a VM defined before seeds)
    """
    try:
        with open(os.path.join(directory, SECRETS)) as f:
            return json.load(f)
    except FileNotFoundError:
        return {"ssh_keys": [], "user_data": None}


async def prepare(
    reactor: Any, policy: AccessPolicy, record: VmRecord, directory: str
) -> None:
    """
    Everything a VM needs before its QEMU starts: the seed, written afresh; its boot
    files checked again; its tap, in bridge mode.

    :param reactor: provides ``IReactorProcess``
    :param policy: the node's :class:`AccessPolicy`
    :param record: the VM's :class:`~hero_compute.node.vms.VmRecord`
    :param directory: the VM's directory
    :raise RefusedByPolicy: a boot file no longer allowed
    :raise InvalidVmState: a seed that cannot be written, a tap that cannot be made
    """
    policy.check_stored(record)
    secrets = load_secrets(directory)
    try:
        seed.write_seed(
            os.path.join(directory, seed.SEED),
            record.vm_id,
            record.hostname,
            secrets.get("ssh_keys") or [],
            secrets.get("user_data"),
        )
    except OSError as e:
        raise InvalidVmState(
            f"cannot write the seed of VM {record.vm_id}: {e.strerror or e}"
        ) from None
    if record.network.bridge is not None:
        await net.create_tap(reactor, record.vm_id, record.network.bridge)


async def release(reactor: Any, record: VmRecord) -> None:
    """
    Remove what :func:`prepare` made outside the VM's directory (its tap), once its
    QEMU is gone.  Safe to call when there is nothing to remove.

    :param reactor: provides ``IReactorProcess``
    :param record: the VM's :class:`~hero_compute.node.vms.VmRecord`
    """
    if record.network.bridge is not None:
        await net.remove_tap(reactor, record.vm_id)


def held_ports(networks: Iterable[VmNetwork]) -> set[tuple[str, int]]:
    """
    :param networks: :class:`~hero_compute.node.vms.VmNetwork` s
    :return: the ``(protocol, host)`` pairs their forwards hold
    """
    return {(p.protocol, p.host) for n in networks for p in n.ports}
