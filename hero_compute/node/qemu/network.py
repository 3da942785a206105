"""
A VM's network (CONTRACT §8): ``nat``, ``none`` or ``bridge:<name>``.

- ``nat``: one virtio NIC on QEMU user-mode networking (guest 10.0.2.15, gateway
  10.0.2.2).  Outbound traffic goes out through the node; inbound only through port
  forwards, which listen on ``NODE_VM_FORWARD_ADDR`` at host ports from
  ``NODE_VM_PORTS``.  Host ports are chosen at ``vm.create`` and kept, so a VM's address
  does not move between starts.
- ``none``: no NIC at all.
- ``bridge:<name>``: a virtio NIC on a tap device attached to a bridge the operator made
  and listed in ``NODE_VM_BRIDGES``.  The node creates the tap before QEMU starts and
  removes it when QEMU ends (stop, delete, a QEMU that died, and at start-up for VMs found
  not running), so nothing is left behind.

Each VM's NIC has a stable MAC derived from its id
(:func:`~hero_compute.node.vms.mac_address`).
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import socket
from collections.abc import Iterable
from typing import Any

import attrs
from twisted.internet import utils
from twisted.logger import Logger

from hero_compute.node.vms import PortForward, VmNetwork, mac_address
from hero_compute.rpc.errors import InvalidParams, InvalidVmState, RefusedByPolicy

log = Logger()

#: Linux interface names are at most 15 bytes; ours are ``hc`` + 12 hex of the VM id.
TAP_PREFIX = "hc"


def tap_name(vm_id: str) -> str:
    """:return: the name of VM ``vm_id``'s tap device"""
    return TAP_PREFIX + vm_id[:12]


@attrs.frozen
class NetworkPolicy:
    """
    What networks a node gives its VMs.

    :ivar bridges: bridge names VMs may be attached to (``NODE_VM_BRIDGES``)
    :ivar ports: ``(low, high)``, inclusive: host ports forwards may use
        (``NODE_VM_PORTS``)
    :ivar forward_address: the IPv4 address forwards listen on (``NODE_VM_FORWARD_ADDR``)
    """

    bridges: tuple = ()
    ports: tuple = (20000, 29999)
    forward_address: str = "127.0.0.1"

    def plan(
        self,
        vm_id: str,
        network: str | None,
        ports: list[dict[str, Any]] | None,
        held: Iterable[tuple[str, int]],
    ) -> VmNetwork:
        """
        The network of a new VM.

        :param vm_id: its id
        :param network: ``nat``, ``none``, ``bridge:<name>`` or ``None`` (``nat``)
        :param ports: the ``ports`` param: a list of ``{guest, host?, protocol?}``, or
            ``None`` (guest 22 with ``nat``)
        :param held: ``(protocol, host)`` pairs other VMs of this node hold
        :return: a :class:`~hero_compute.node.vms.VmNetwork`
        :raise InvalidParams: a bad mode, or ports without ``nat``
        :raise RefusedByPolicy: a bridge not in ``NODE_VM_BRIDGES``
        :raise InvalidVmState: a host port outside the range or in use
        """
        mode = "nat" if network is None else network
        mac = mac_address(vm_id)
        if mode.startswith("bridge:"):
            bridge = mode.partition(":")[2]
            if bridge not in self.bridges:
                allowed = ", ".join(self.bridges) or "none"
                raise RefusedByPolicy(
                    f"network: bridge {bridge!r} is not one this node allows "
                    f"(NODE_VM_BRIDGES: {allowed})"
                )
        elif mode not in ("nat", "none"):
            raise InvalidParams(
                f"network must be nat, none or bridge:<name>, not {mode!r}",
                data={"field": "network"},
            )
        if mode != "nat":
            if ports:
                raise InvalidParams(
                    f"ports: forwards need network nat, not {mode}",
                    data={"field": "ports"},
                )
            return VmNetwork(mode, mac, ())
        return VmNetwork(mode, mac, self._forwards(ports, set(held)))

    def _forwards(self, ports, held):
        requests: list[dict] = [{"guest": 22}] if ports is None else ports
        seen = set()
        chosen = []
        for request in requests:
            protocol: str = request.get("protocol") or "tcp"
            guest = request["guest"]
            if (protocol, guest) in seen:
                raise InvalidParams(
                    f"ports: guest {protocol} port {guest} is forwarded twice",
                    data={"field": "ports"},
                )
            seen.add((protocol, guest))
            host = request.get("host") or 0
            if host:
                self._check_host(protocol, host, held)
            else:
                host = self._pick(protocol, held)
            held.add((protocol, host))
            chosen.append(PortForward(guest, host, protocol, self.forward_address))
        return tuple(chosen)

    def _check_host(self, protocol, host, held):
        low, high = self.ports
        if not low <= host <= high:
            raise InvalidVmState(
                f"ports: host port {host} is outside this node's range {low}-{high} "
                f"(NODE_VM_PORTS)"
            )
        if (protocol, host) in held or not port_free(self.forward_address, protocol, host):
            raise InvalidVmState(f"ports: host {protocol} port {host} is in use")

    def _pick(self, protocol, held):
        low, high = self.ports
        # From a random point, so that nodes sharing a host (and their ranges) rarely
        # pick the same port before either VM runs.
        span = high - low + 1
        first = random.randrange(span)
        for offset in range(span):
            host = low + (first + offset) % span
            if (protocol, host) not in held and port_free(
                self.forward_address, protocol, host
            ):
                return host
        raise InvalidVmState(f"ports: no free {protocol} port left in {low}-{high}")


def port_free(address: str, protocol: str, port: int) -> bool:
    """
    :return: whether ``address:port`` can be bound now for ``protocol``
    """
    kind = socket.SOCK_DGRAM if protocol == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind((address, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def netdev_args(vm_id: str, network: VmNetwork) -> list[str]:
    """
    :param vm_id: the VM's id
    :param network: its :class:`~hero_compute.node.vms.VmNetwork`
    :return: QEMU arguments giving it that network (none for ``none``)
    """
    if network.mode == "none":
        return []
    if network.bridge is not None:
        netdev = f"tap,id=net0,ifname={tap_name(vm_id)},script=no,downscript=no"
    else:
        netdev = "user,id=net0" + "".join(
            f",hostfwd={p.protocol}:{p.address}:{p.host}-:{p.guest}" for p in network.ports
        )
    return [
        "-netdev",
        netdev,
        "-device",
        f"virtio-net-pci,netdev=net0,mac={network.mac}",
    ]


def _ip():
    return shutil.which("ip") or "/usr/sbin/ip"


async def _run_ip(reactor, *args):
    out, err, code = await utils.getProcessOutputAndValue(
        _ip(), args, env=os.environ, reactor=reactor
    )
    return code, (err or out).decode("utf-8", "replace").strip()


async def create_tap(reactor: Any, vm_id: str, bridge: str) -> None:
    """
    Create VM ``vm_id``'s tap device, owned by this process's user, on ``bridge``, up.

    :raise InvalidVmState: when it cannot be made (no such bridge, no CAP_NET_ADMIN),
        with ``ip``'s words; nothing is left behind then
    """
    name = tap_name(vm_id)
    await remove_tap(reactor, vm_id)
    steps = (
        ("tuntap", "add", "dev", name, "mode", "tap", "user", str(os.getuid())),
        ("link", "set", "dev", name, "master", bridge),
        ("link", "set", "dev", name, "up"),
    )
    for step in steps:
        code, message = await _run_ip(reactor, *step)
        if code != 0:
            await remove_tap(reactor, vm_id)
            raise InvalidVmState(
                f"network: cannot attach VM {vm_id} to bridge {bridge!r}: {message}"
            )
    log.info(
        "tap {tap} of VM {vm_id} on bridge {bridge}", tap=name, vm_id=vm_id, bridge=bridge
    )


async def remove_tap(reactor: Any, vm_id: str) -> bool:
    """
    Remove VM ``vm_id``'s tap device if it exists.

    :return: whether one was removed
    """
    name = tap_name(vm_id)
    if not os.path.exists(f"/sys/class/net/{name}"):
        return False
    code, message = await _run_ip(reactor, "link", "del", "dev", name)
    if code != 0 and os.path.exists(f"/sys/class/net/{name}"):
        log.warn("cannot remove tap {tap}: {message}", tap=name, message=message)
        return False
    return True
