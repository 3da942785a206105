"""
``hero-compute vm ...``: list, create, start, stop, delete and show VMs on nodes.

A VM is named by its id, its name on that node, or a unique id prefix (:mod:`.names`).
``start``, ``stop`` and ``delete`` show a live status line on a terminal while the node
works, and with ``--wait`` return only once the VM has reached its target state (polling
``vm.get``), whatever the node's own call returned.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rich.text import Text
from twisted.internet import defer, task

from . import exits, names, vm_access
from .connect import VmNotFound
from .nodes import fetch_nodes, label
from .output import fields, styled_state, table
from .units import disk_gb, format_mb, memory_mb

if TYPE_CHECKING:
    from rich.table import Table

    from .connect import Explorer
    from .output import Output


#: Seconds between ``vm.get`` polls while waiting.
POLL = 1.0

#: Nodes asked at once by a fleet-wide ``vm list``.
FLEET_CONCURRENCY = 32


def _size(parse: Callable[[str], int]) -> Callable[[str], int]:
    def coerce(text):
        try:
            return parse(text)
        except ValueError as e:  # argparse shows only an ArgumentTypeError's own text
            raise argparse.ArgumentTypeError(str(e)) from None

    return coerce


def add_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """
    Add the ``vm`` group to the subcommands.

    :param sub: the subparsers action of the top parser
    :param common: the parent parser of the global options
    :return: the group's subparsers action, for more commands
    """
    vm = sub.add_parser(
        "vm",
        parents=[common],
        help="VMs: list, create, start, stop, delete, show, ssh",
        description="Manage the VMs of nodes, through the explorer.",
    )
    cmds = vm.add_subparsers(dest="vm_command", required=True, metavar="COMMAND")
    ls = cmds.add_parser(
        "list", parents=[common], help="VMs of a node, or of every online node"
    )
    ls.add_argument("node_id", metavar="NODE", nargs="?")
    ls.set_defaults(run=list_vms)
    create = cmds.add_parser(
        "create",
        parents=[common],
        help="define a new VM, on NODE or where the explorer places it",
    )
    create.add_argument(
        "node_id", metavar="NODE", nargs="?", help="[default: the explorer places it]"
    )
    create.add_argument(
        "--where",
        type=label,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="without NODE: only on nodes with this label (repeat: all must match)",
    )
    create.add_argument(
        "--strategy",
        choices=("spread", "binpack"),
        help="without NODE: spread (the emptiest node, the default) or binpack "
        "(the fullest that fits)",
    )
    create.add_argument("--name", required=True)
    create.add_argument("--vcpus", type=int, default=1, help="[default: 1]")
    create.add_argument(
        "--memory",
        type=_size(memory_mb),
        required=True,
        metavar="SIZE",
        help="e.g. 512M, 2G (binary units; a bare number is MiB)",
    )
    create.add_argument(
        "--disk",
        type=_size(disk_gb),
        required=True,
        metavar="SIZE",
        help="e.g. 10G, 1T (binary units; a bare number is GiB)",
    )
    create.add_argument("--image", metavar="PATH", help="base image on the node")
    create.add_argument("--start", action="store_true", help="start it once created")
    create.add_argument("--wait", action="store_true", help="with --start: until running")
    vm_access.add_create_options(create)
    create.set_defaults(run=create_vm)
    for name, text in (
        ("start", "start a VM"),
        ("stop", "stop a VM (ACPI power-down, forced after the node's grace period)"),
        ("delete", "delete a VM and its disk"),
        ("show", "one VM"),
    ):
        p = cmds.add_parser(name, parents=[common], help=text)
        p.add_argument("node_id", metavar="NODE")
        p.add_argument("vm", metavar="VM", help="VM id or name")
        if name == "stop":
            p.add_argument("--force", action="store_true", help="power off at once")
        if name != "show":
            p.add_argument(
                "--wait",
                action="store_true",
                help="return once the VM is " + TARGETS[name][1],
            )
        p.set_defaults(run=transition if name != "show" else show_vm, action=name)
    vm_access.add_ssh_command(cmds, common, resolve)
    return cmds


#: ``action: (method, target state, verb for the status line)``; None: gone.
TARGETS = {
    "start": ("vm.start", "running", "starting"),
    "stop": ("vm.stop", "stopped", "stopping"),
    "delete": ("vm.delete", "deleted", "deleting"),
}


def vm_fields(vm: dict[str, Any]) -> Table:
    """:return: one VM as a key/value table"""
    placed = [("node", vm["node_id"])] if "node_id" in vm else []
    return fields(
        [
            ("name", vm.get("name")),
            ("id", vm.get("vm_id")),
            *placed,
            ("state", styled_state(vm.get("state"))),
            ("vCPUs", vm.get("vcpus")),
            ("memory", format_mb(vm.get("memory_mb"))),
            ("disk", format_mb((vm.get("disk_gb") or 0) * 1024)),
            ("image", vm.get("image") or "-"),
            *vm_access.access_fields(vm),
            (
                "created",
                time.strftime(
                    "%Y-%m-%d %H:%M:%S", time.localtime(vm.get("created_at") or 0)
                ),
            ),
        ]
    )


#: The NODE column's cells of a table of one node's VMs: none.
_NO_COLUMN: tuple[Any, ...] = ()


def vms_table(vms: list[dict[str, Any]]) -> Table:
    """:return: a table of VMs (with a NODE column when they carry ``node_id``)"""
    fleet = any("node_id" in vm for vm in vms)
    rows = [
        ((vm.get("node_id"),) if fleet else _NO_COLUMN)
        + (
            vm.get("name"),
            vm.get("vm_id"),
            styled_state(vm.get("state")),
            str(vm.get("vcpus")),
            format_mb(vm.get("memory_mb")),
            format_mb((vm.get("disk_gb") or 0) * 1024),
        )
        for vm in vms
    ]
    return table(
        (("NODE",) if fleet else ()) + ("NAME", "ID", "STATE", "VCPUS", "MEMORY", "DISK"),
        rows,
    )


async def list_vms(explorer: Explorer, args: argparse.Namespace, output: Output) -> int:
    """``vm list [NODE]``: one node's VMs, or every online node's."""
    if args.node_id:
        output.emit(await explorer.node_call(args.node_id, "vm.list"), vms_table)
        return 0
    nodes = await fetch_nodes(explorer.call, "online")
    limit = defer.DeferredSemaphore(FLEET_CONCURRENCY)

    async def one(node_id):
        return await explorer.node_call(node_id, "vm.list")

    ids = sorted(n["node_id"] for n in nodes)
    answers = await defer.DeferredList(
        [limit.run(lambda i: defer.ensureDeferred(one(i)), i) for i in ids],
        consumeErrors=True,
    )
    vms: list[dict] = []
    code = 0
    for node_id, (ok, value) in zip(ids, answers, strict=True):
        if ok:
            vms.extend(dict(vm, node_id=node_id) for vm in value)
            continue
        failed, message = exits.explain(value.value, explorer.address.uri)
        output.error(f"node {node_id}: {message}")
        code = code or failed
    output.emit(vms, vms_table)
    return code


async def resolve(explorer: Explorer, node_id: str, vm: str) -> dict[str, Any]:
    """
    :return: the VmInfo of the VM whose id, name or id prefix is ``vm`` on the node
    :raise exits.Failure: no such VM, or several
    """
    return await names.vm_info(explorer, node_id, vm)


async def show_vm(explorer: Explorer, args: argparse.Namespace, output: Output) -> int:
    """``vm show NODE VM``."""
    output.emit(await resolve(explorer, args.node_id, args.vm), vm_fields)
    return 0


async def create_vm(explorer: Explorer, args: argparse.Namespace, output: Output) -> int:
    """``vm create NODE --name N --memory 512M --disk 10G ...``."""
    params = {
        "name": args.name,
        "vcpus": args.vcpus,
        "memory_mb": args.memory,
        "disk_gb": args.disk,
    }
    if args.image:
        params["image"] = args.image
    params.update(vm_access.create_params(args))
    if args.node_id is None:
        if args.where:
            params["where"] = dict(args.where)
        if args.strategy:
            params["strategy"] = args.strategy
        with output.progress(f"placing and creating VM {args.name}"):
            vm = await explorer.call(
                "explorer.create_vm", params, timeout=explorer.timeout("vm.create")
            )
        args.node_id = vm["node_id"]
    elif args.where or args.strategy:
        raise exits.Failure(
            "--where and --strategy place the VM: give them or NODE, not both", exits.USAGE
        )
    else:
        with output.progress(f"creating VM {args.name} on {args.node_id}"):
            vm = await explorer.node_call(args.node_id, "vm.create", params)
    if args.start:
        args.vm, args.action = vm["vm_id"], "start"
        return await transition(explorer, args, output)
    output.emit(vm, vm_fields)
    return 0


async def transition(explorer: Explorer, args: argparse.Namespace, output: Output) -> int:
    """``vm start|stop|delete NODE VM [--force] [--wait]``."""
    method, target, verb = TARGETS[args.action]
    vm = await resolve(explorer, args.node_id, args.vm)
    params = {"vm_id": vm["vm_id"]}
    if getattr(args, "force", False):
        params["force"] = True
    deadline = time.monotonic() + explorer.timeout(method)
    with output.progress(f"{verb} VM {vm['name']} on {args.node_id}: ") as progress:
        progress.update(vm["state"])
        op = defer.ensureDeferred(explorer.node_call(args.node_id, method, params))
        watcher = defer.ensureDeferred(
            _watch(explorer, args.node_id, vm["vm_id"], progress, op)
        )
        watcher.addErrback(lambda f: f.trap(defer.CancelledError))
        try:
            result = await op
        finally:
            watcher.cancel()
        if args.wait:
            result = (
                await _until(
                    explorer, args.node_id, vm["vm_id"], target, deadline, progress
                )
                or result
            )
    if target == "deleted":
        output.emit(True, lambda _: Text(f"VM {vm['name']} deleted"))
    else:
        output.emit(result, vm_fields)
    return 0


async def _watch(explorer, node_id, vm_id, progress, op) -> None:
    # Only worth a poll when someone watches the status line.
    while progress.live and not op.called:
        await task.deferLater(explorer.reactor, POLL, lambda: None)
        try:
            vm = await explorer.node_call(node_id, "vm.get", {"vm_id": vm_id}, timeout=5)
        except Exception:  # a missed poll only delays the status line
            continue
        progress.update(vm["state"])


async def _until(explorer, node_id, vm_id, target, deadline, progress):
    """
    Poll ``vm.get`` until the VM is in ``target`` (``deleted``: gone).

    :return: the last VmInfo, or None once deleted
    :raise exits.Failure: on the ``error`` state, or when the deadline passes
    """
    while True:
        try:
            vm = await explorer.node_call(node_id, "vm.get", {"vm_id": vm_id})
        except VmNotFound:
            if target == "deleted":
                return None
            raise
        progress.update(vm["state"])
        if vm["state"] == target:
            return vm
        if vm["state"] == "error":
            raise exits.Failure(
                f"VM {vm['name']} is in state error (the node's log says why)"
            )
        if time.monotonic() >= deadline:
            raise exits.Failure(
                f"VM {vm['name']} is still {vm['state']}, not {target}, "
                "after the time allowed (raise --timeout)",
                exits.UNREACHABLE,
            )
        await task.deferLater(explorer.reactor, POLL, lambda: None)
