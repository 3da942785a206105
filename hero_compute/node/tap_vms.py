"""
``twistd node``'s options for reaching VMs (CONTRACT §8): the accelerator, bridges VMs
may join, and the host ports and address of ``nat`` forwards.  Part of the tap: each
option also comes from its variable, the command line winning.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping

from twisted.python import usage

from hero_compute.options import from_env

_BRIDGE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


def accel_mode(text: str) -> str:
    """Coerce ``NODE_ACCEL``: ``auto``, ``kvm`` or ``tcg``."""
    mode = text.strip().lower()
    if mode not in ("auto", "kvm", "tcg"):
        raise ValueError(f"{text!r}: expected auto, kvm or tcg")
    return mode


def bridges(text: str) -> tuple[str, ...]:
    """Coerce ``NODE_VM_BRIDGES``: a comma list of interface names."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    for name in names:
        if not _BRIDGE.match(name):
            raise ValueError(f"{name!r} is not an interface name ([A-Za-z0-9_.-]{{1,15}})")
    return names


def port_range(text: str) -> tuple[int, int]:
    """Coerce ``NODE_VM_PORTS``: ``LOW-HIGH``, inclusive, within 1..65535."""
    match = re.fullmatch(r"\s*(\d{1,5})\s*-\s*(\d{1,5})\s*", text)
    if not match:
        raise ValueError(f"{text!r}: expected LOW-HIGH, e.g. 20000-29999")
    low, high = int(match[1]), int(match[2])
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"{text!r}: expected 1 <= LOW <= HIGH <= 65535")
    return (low, high)


def forward_address(text: str) -> str:
    """Coerce ``NODE_VM_FORWARD_ADDR``: an IPv4 address (QEMU forwards IPv4)."""
    try:
        return str(ipaddress.IPv4Address(text.strip()))
    except ValueError:
        raise ValueError(f"{text!r}: expected an IPv4 address, e.g. 127.0.0.1") from None


OPT_PARAMETERS = [
    ["accel", None, None, "auto, kvm or tcg [default: $NODE_ACCEL or auto]", accel_mode],
    [
        "vm-bridges",
        None,
        None,
        "Bridges VMs may join (network bridge:<name>), comma-separated "
        "[default: $NODE_VM_BRIDGES; unset: none]",
        bridges,
    ],
    [
        "vm-ports",
        None,
        None,
        "Host ports for nat VMs' forwards, LOW-HIGH "
        "[default: $NODE_VM_PORTS or 20000-29999]",
        port_range,
    ],
    [
        "vm-forward-addr",
        None,
        None,
        "IPv4 address nat forwards listen on "
        "[default: $NODE_VM_FORWARD_ADDR or 127.0.0.1; 0.0.0.0 exposes them]",
        forward_address,
    ],
]


def post_options(options: usage.Options, env: Mapping[str, str]) -> None:
    """
    Fill the VM options from the environment and defaults, and build the node's
    network policy (``options["vm-network"]``).

    :param options: the node's :class:`~twisted.python.usage.Options`
    :param env: the environment mapping
    :raise usage.UsageError: naming a bad variable
    """
    from .qemu.network import NetworkPolicy

    from_env(options, "accel", env, "NODE_ACCEL", accel_mode)
    from_env(options, "vm-bridges", env, "NODE_VM_BRIDGES", bridges)
    from_env(options, "vm-ports", env, "NODE_VM_PORTS", port_range)
    from_env(options, "vm-forward-addr", env, "NODE_VM_FORWARD_ADDR", forward_address)
    options["accel"] = options["accel"] or "auto"
    if isinstance(options["vm-ports"], str):
        raise usage.UsageError("--vm-ports: expected LOW-HIGH")
    options["vm-network"] = NetworkPolicy(
        bridges=options["vm-bridges"] or (),
        ports=options["vm-ports"] or (20000, 29999),
        forward_address=options["vm-forward-addr"] or "127.0.0.1",
    )
