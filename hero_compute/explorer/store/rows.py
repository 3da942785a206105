"""
Rows into records and back, the same for both backends (:mod:`.sqlite` and
:mod:`.postgres`): only the SQL around them differs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from twisted.logger import Logger

from .schema import AUDIT_FIELDS, JSON_FIELDS, NODE_FIELDS, Identity

log = Logger()

#: Reads ``identities`` rows in the order :func:`identity` takes them.
SELECT_IDENTITY = (
    "SELECT node_id, secret_sha256, enrolled, cert_serial, previous_serial, revoked_at "
    "FROM identities"
)


def identity(row: Sequence[Any]) -> Identity:
    """
    :param row: one row of :data:`SELECT_IDENTITY` from ``identities`` row
    :return: its :class:`~.schema.Identity`
    """
    node_id, secret, enrolled, serial, previous, revoked_at = row
    return Identity(
        node_id=node_id,
        secret_sha256=secret,
        enrolled=bool(enrolled),
        cert_serial=None if serial is None else int(serial, 16),
        previous_serial=None if previous is None else int(previous, 16),
        revoked=revoked_at is not None,
    )


def node_records(rows: Iterable[Sequence[Any]]) -> list[dict[str, Any]]:
    """
    :param rows: ``nodes`` rows of :data:`~.schema.NODE_FIELDS`
    :return: node records (dicts); an undecodable row is logged and skipped, so one
        bad record cannot hide the fleet
    """
    nodes = []
    for row in rows:
        record = dict(zip(NODE_FIELDS, row, strict=True))
        try:
            for field in JSON_FIELDS:
                record[field] = json.loads(record[field])
        except ValueError:
            log.warn(
                "skipping stored node {node_id}: undecodable record",
                node_id=record["node_id"],
            )
            continue
        nodes.append(record)
    return nodes


def node_rows(records: Iterable[Mapping[str, Any]]) -> list[list[Any]]:
    """
    :param records: mappings with at least :data:`~.schema.NODE_FIELDS`
    :return: their ``nodes`` rows, the JSON fields encoded
    """
    # A fleet's equal capacities, usages and labels are one dict each (the registry
    # shares them, and never changes one in place): each is encoded once per call, not
    # once per node; encoding was two thirds of a flush's CPU.  The dict is held beside
    # its text so that its id cannot be reused by another during the call.
    encoded: dict[int, tuple[Any, str]] = {}

    def field(record: Mapping[str, Any], f: str) -> Any:
        value = record[f]
        if f not in JSON_FIELDS:
            return value
        held = encoded.get(id(value))
        if held is None:
            held = encoded[id(value)] = (
                value,
                json.dumps(value, sort_keys=True, allow_nan=False),
            )
        return held[1]

    return [[field(record, f) for f in NODE_FIELDS] for record in records]


def audit_entries(rows: Iterable[Sequence[Any]]) -> list[dict[str, Any]]:
    """:return: audit rows of :data:`~.schema.AUDIT_FIELDS` as dicts"""
    return [dict(zip(AUDIT_FIELDS, row, strict=True)) for row in rows]


def copy_order(table: str) -> str:
    """:return: the ``ORDER BY`` that keeps a copied table's order (the audit log's)"""
    # The audit log keeps its order through a copy (a new id per row).
    return " ORDER BY id" if table == "audit" else ""
