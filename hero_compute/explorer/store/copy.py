"""
``hero-compute state copy``: everything one store holds into another (CONTRACT §10),
e.g. an explorer's SQLite file into the PostgreSQL database several explorers will
share: identities, secret hashes, tokens, revocations, node records and the audit log.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from . import is_postgres, open_store
from .schema import COPY_TABLES, StoreError

if TYPE_CHECKING:
    from .interface import IStore


def copy_state(source: IStore, target: IStore) -> dict[str, int]:
    """
    Copy every table of :data:`COPY_TABLES` from one open store into another, which
    must hold nothing yet (a copy never merges two fleets' identities).

    :param source: an open :class:`~hero_compute.explorer.store.IStore`
    :param target: another, empty
    :raises StoreError: the target is not empty
    :return: ``{table: rows copied}``
    """
    for table, columns in COPY_TABLES.items():
        if target.rows(table, columns[:1]):
            raise StoreError(
                f"{target.location}: not empty (table {table} has rows); "
                "copy into a new database"
            )
    counts = {}
    for table, columns in COPY_TABLES.items():
        rows = source.rows(table, columns)
        if rows:
            target.insert_rows(table, columns, rows)
        counts[table] = len(rows)
    return counts


def copy_between(source: str, target: str) -> tuple[str, str, dict[str, int]]:
    """
    Open both stores (the source must exist), copy, close.

    :param source: a path or ``postgresql://`` URI
    :param target: another
    :raises StoreError: either cannot be used, or the target is not empty
    :return: ``(source location, target location, {table: rows copied})``, the
        locations safe to print
    """
    if not is_postgres(source) and not os.path.exists(source):
        raise StoreError(f"{source}: no such file")
    src = open_store(source, **_quiet(source))
    try:
        dst = open_store(target, **_quiet(target))
        try:
            return src.location, dst.location, copy_state(src, dst)
        finally:
            dst.close()
    finally:
        src.close()


def _quiet(location):
    # A copy follows no other explorer's changes.
    return {"watch": False} if is_postgres(location) else {}
