"""
NODE and VM arguments, as Docker and virsh take them (CONTRACT §9): a full id first, then
a name that is unique, then an id prefix of at least :data:`MIN_PREFIX` characters that
is unique.  Ambiguous: exit 64 listing the candidates; nothing: exit 3.

A trailing ``…`` is ignored, so an id copied from a table cut short still works.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import exits
from .connect import NodeNotFound, VmNotFound
from .nodes import fetch_nodes

if TYPE_CHECKING:
    from .connect import Explorer


#: An id prefix must be at least this long (as ``docker`` and ``virsh`` do, shorter
#: prefixes match too much by accident).
MIN_PREFIX = 4


def match(text: str, items: list[dict[str, Any]], id_key: str) -> dict[str, Any]:
    """
    The item ``text`` names among ``items``: its full id, its unique name, or a unique
    id prefix.

    :param text: the argument
    :param items: dicts with ``id_key`` and ``name``
    :param id_key: ``"node_id"`` or ``"vm_id"``
    :return: the item
    :raise exits.Failure: ambiguous (exit 64, listing them) or no match (exit 3)
    """
    text = text.rstrip("…")
    for item in items:
        if item.get(id_key) == text:
            return item
    stages = [[item for item in items if item.get("name") == text]]
    if len(text) >= MIN_PREFIX:
        stages.append([item for item in items if str(item.get(id_key)).startswith(text)])
    kind = "node" if id_key == "node_id" else "VM"
    for found in stages:
        if len(found) == 1:
            return found[0]
        if found:
            listed = "\n".join(
                f"  {item.get(id_key)}  {item.get('name')}"
                for item in sorted(found, key=lambda i: str(i.get(id_key)))
            )
            raise exits.Failure(
                f"{kind} {text!r} is ambiguous: it matches {len(found)} {kind}s\n"
                f"{listed}\ngive more of the id",
                exits.USAGE,
            )
    raise exits.Failure(
        f"no {kind} with id or name {text!r}, nor an id starting with it{_short(text)}",
        exits.NOT_FOUND,
    )


def _short(text: str) -> str:
    if len(text.rstrip("…")) >= MIN_PREFIX:
        return ""
    return f" (id prefixes need {MIN_PREFIX} characters)"


async def node_id(explorer: Explorer, text: str) -> str:
    """
    :param explorer: the :class:`~.connect.Explorer`
    :param text: a NODE argument
    :return: the node id it names
    :raise exits.Failure: ambiguous or unknown
    """
    try:
        await explorer.call("explorer.get_node", {"node_id": text})
        return text
    except NodeNotFound as e:
        unknown = e
    try:
        return match(text, await fetch_nodes(explorer.call), "node_id")["node_id"]
    except exits.Failure as e:
        if e.code != exits.NOT_FOUND:
            raise
        # The explorer's own -32001 (exit 3, and where to look), saying what else was
        # tried.
        unknown.message += f", nor a node named so or whose id starts so{_short(text)}"
        raise unknown from None


async def vm_info(explorer: Explorer, node: str, text: str) -> dict[str, Any]:
    """
    :param node: the node id
    :param text: a VM argument
    :return: the VmInfo of the VM it names on that node
    :raise exits.Failure: ambiguous or unknown
    """
    try:
        return await explorer.node_call(
            node, "vm.get", {"vm_id": text}, timeout=explorer.timeout("vm.get")
        )
    except VmNotFound:
        pass
    try:
        return match(text, await explorer.node_call(node, "vm.list"), "vm_id")
    except exits.Failure as e:
        if e.code == exits.NOT_FOUND:
            e.message += f" on node {node} (hero-compute vm list {node} lists them)"
        raise
