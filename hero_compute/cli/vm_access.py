"""
Getting into VMs from the command line (CONTRACT §8): the access options of
``vm create`` (keys, user data, host name, network, ports, direct kernel boot) and
``vm ssh NODE VM [-- COMMAND...]``, which runs ``ssh`` to the node's forward of the
guest's port 22.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from . import exits
from .connect import parse_address

if TYPE_CHECKING:
    from .connect import Explorer
    from .output import Output


_PORT = re.compile(r"^(?:(\d{1,5}):)?(\d{1,5})(?:/(tcp|udp))?$")


def port_spec(text: str) -> dict[str, Any]:
    """
    Coerce ``--port [HOST:]GUEST[/udp]`` into a ``ports`` item.

    :raise argparse.ArgumentTypeError: when it is not one
    """
    match = _PORT.match(text.strip())
    if not match or not all(1 <= int(p) <= 65535 for p in match.groups()[:2] if p):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected [HOST:]GUEST[/tcp|/udp], e.g. 22, 8080:80, 53/udp"
        )
    host, guest, protocol = match.groups()
    spec: dict[str, int | str] = {"guest": int(guest)}
    if host:
        spec["host"] = int(host)
    if protocol:
        spec["protocol"] = protocol
    return spec


def add_create_options(create: argparse.ArgumentParser) -> None:
    """
    Add the access options to ``vm create``.

    :param create: its argparse parser
    """
    create.add_argument(
        "--ssh-key",
        action="append",
        default=[],
        metavar="FILE",
        help="OpenSSH public key file (one or more keys) for the image's default user; "
        "may repeat",
    )
    create.add_argument(
        "--user-data", metavar="FILE", help="cloud-init user data (#cloud-config or script)"
    )
    create.add_argument("--hostname", help="guest host name [default: from the name]")
    create.add_argument(
        "--network",
        metavar="nat|none|bridge:BR",
        help="[default: nat, with guest port 22 forwarded]",
    )
    create.add_argument(
        "--port",
        action="append",
        type=port_spec,
        default=[],
        metavar="[HOST:]GUEST[/udp]",
        help="forward a guest port (nat); HOST from the node's range when left out; "
        "may repeat [default: 22]",
    )
    create.add_argument("--kernel", metavar="FILE", help="direct kernel boot: on the node")
    create.add_argument("--initrd", metavar="FILE", help="with --kernel: on the node")
    create.add_argument("--cmdline", help="with --kernel [default: console=ttyS0]")


def _read(path: str, what: str) -> str:
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise exits.Failure(f"{what} {path}: {e}", exits.USAGE) from None


def create_params(args: argparse.Namespace) -> dict[str, Any]:
    """
    :param args: the parsed ``vm create`` arguments
    :return: the ``vm.create`` params its access options give
    :raise exits.Failure: an unreadable file, or --initrd/--cmdline without --kernel
    """
    params: dict = {}
    keys = []
    for path in args.ssh_key:
        lines = _read(path, "--ssh-key").splitlines()
        keys += [
            line.strip() for line in lines if line.strip() and not line.startswith("#")
        ]
    if args.ssh_key:
        params["ssh_keys"] = keys
    if args.user_data:
        params["user_data"] = _read(args.user_data, "--user-data")
    for key in ("hostname", "network"):
        if getattr(args, key):
            params[key] = getattr(args, key)
    if args.port:
        params["ports"] = args.port
    if args.kernel:
        boot = {"kernel": args.kernel}
        if args.initrd:
            boot["initrd"] = args.initrd
        if args.cmdline is not None:
            boot["cmdline"] = args.cmdline
        params["boot"] = boot
    elif args.initrd or args.cmdline is not None:
        raise exits.Failure("--initrd and --cmdline need --kernel", exits.USAGE)
    return params


def access_fields(vm: dict[str, Any]) -> list[tuple[str, Any]]:
    """
    :param vm: a VmInfo
    :return: ``(label, value)`` pairs of its access, for ``vm show``
    """
    network = vm.get("network") or {}
    forwards = ", ".join(
        f"{p['address']}:{p['host']}->{p['guest']}/{p['protocol']}"
        for p in network.get("ports", ())
    )
    boot = vm.get("boot")
    return [
        ("hostname", vm.get("hostname") or "-"),
        ("network", f"{network.get('mode', '-')} {network.get('mac', '')}".strip()),
        ("ports", forwards or "-"),
        ("ssh keys", ", ".join(vm.get("ssh_keys") or ()) or "-"),
        ("boot", f"{boot['kernel']} {boot.get('cmdline') or ''}".strip() if boot else "-"),
    ]


def add_ssh_command(
    cmds: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
    resolve: Callable[[Explorer, str, str], Awaitable[dict[str, Any]]],
) -> None:
    """
    Add ``vm ssh`` to the ``vm`` group.

    :param cmds: the ``vm`` group's subparsers action
    :param common: the parent parser of the global options
    :param resolve: ``resolve(explorer, node_id, vm)`` -> VmInfo
    """
    ssh = cmds.add_parser(
        "ssh",
        parents=[common],
        help="ssh into a VM through its node's forward of port 22",
        usage="hero-compute vm ssh [-l USER] [-i FILE] [-o OPTION]... NODE VM "
        "[-- COMMAND...]",
        description="Run ssh to the node's forward of the VM's port 22 (network nat). "
        "Options go before NODE; everything after VM is the command. Known host keys "
        "are kept per VM (HostKeyAlias), not per forwarded port.",
    )
    ssh.add_argument("node_id", metavar="NODE")
    ssh.add_argument("vm", metavar="VM", help="VM id or name")
    ssh.add_argument("-l", "--login", metavar="USER", help="user in the guest")
    ssh.add_argument("-i", "--identity", metavar="FILE", help="private key file")
    ssh.add_argument(
        "-o",
        "--ssh-option",
        action="append",
        default=[],
        metavar="OPTION",
        help="passed to ssh as -o OPTION; may repeat",
    )
    # As with docker exec, ssh's own options go before NODE VM: everything after VM
    # is the command (argparse drops a "--" only before the subcommand's positionals).
    ssh.add_argument(
        "remote_command", nargs=argparse.REMAINDER, metavar="COMMAND", help="-- COMMAND..."
    )
    ssh.set_defaults(run=ssh_vm, resolve=resolve)


def ssh_target(node: dict[str, Any], vm: dict[str, Any]) -> tuple[str, int]:
    """
    Where ``ssh`` reaches a VM's port 22.

    :param node: the NodeInfo of its node (``socket_path`` tells its host)
    :param vm: the VmInfo
    :return: ``(host, port)``
    :raise exits.Failure: no forward of port 22, or one the caller cannot reach
    """
    network = vm.get("network") or {}
    forward = next(
        (
            p
            for p in network.get("ports", ())
            if p.get("guest") == 22 and p.get("protocol", "tcp") == "tcp"
        ),
        None,
    )
    if forward is None:
        raise exits.Failure(
            f"VM {vm.get('name')} has no forward of port 22 (network "
            f"{network.get('mode', 'none')}): reach it by its own address",
        )
    address = parse_address(node["socket_path"])
    local = address.is_unix
    listen = forward["address"]
    if listen in ("0.0.0.0", "::"):
        # A TCP or TLS address always has a host; a Unix one means this machine.
        return (address.host if not local and address.host else "127.0.0.1"), forward[
            "host"
        ]
    if not local and listen.startswith("127."):
        raise exits.Failure(
            f"VM {vm.get('name')}'s port 22 is forwarded on {listen}:{forward['host']} of "
            f"node {node.get('name') or node.get('node_id')}, which only that host can "
            "reach: ssh from there, or set NODE_VM_FORWARD_ADDR on the node"
        )
    return listen, forward["host"]


async def ssh_vm(explorer: Explorer, args: argparse.Namespace, output: Output) -> int:
    """``vm ssh NODE VM [-- COMMAND...]``: replaces this process with ``ssh``."""
    vm = await args.resolve(explorer, args.node_id, args.vm)
    node = await explorer.call("explorer.get_node", {"node_id": args.node_id})
    host, port = ssh_target(node, vm)
    argv = ["ssh", "-p", str(port), "-o", f"HostKeyAlias=hero-{vm['vm_id']}"]
    if args.identity:
        argv += ["-i", args.identity]
    for option in args.ssh_option:
        argv += ["-o", option]
    argv.append(f"{args.login}@{host}" if args.login else host)
    command = args.remote_command
    command = command[1:] if command[:1] == ["--"] else command
    if command:
        argv += ["--", *command]
    output.out.flush()
    output.err.flush()
    try:
        os.execvp("ssh", argv)
    except OSError as e:
        raise exits.Failure(
            f"cannot run ssh: {e} (apt-get install openssh-client)"
        ) from None
    return exits.FAILED  # not reached: exec replaces this process
