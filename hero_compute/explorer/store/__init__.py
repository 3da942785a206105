"""
The explorer's durable state (CONTRACT §6, §10) behind one narrow interface,
:class:`IStore`, with two backends tested by the same tests: SQLite (:mod:`.sqlite`, one
file, the default) and PostgreSQL (:mod:`.postgres`, shared by several explorers).

:func:`open_store` picks the backend from ``EXPLORER_DATABASE``: a path is SQLite, a
``postgresql://`` URI is PostgreSQL.  Only this package speaks SQL.
"""

import os
from typing import Any

from .interface import IStore
from .schema import (
    AUDIT_FIELDS,
    DURABLE_FIELDS,
    NODE_FIELDS,
    SCHEMA_VERSION,
    Identity,
    StoreError,
    TokenRefused,
    needs_save,
)
from .sqlite import Store

__all__ = [
    "AUDIT_FIELDS",
    "DURABLE_FIELDS",
    "NODE_FIELDS",
    "SCHEMA_VERSION",
    "IStore",
    "Identity",
    "Store",
    "StoreError",
    "TokenRefused",
    "is_postgres",
    "needs_save",
    "open_store",
]


def is_postgres(location: object) -> bool:
    """
    :param location: ``EXPLORER_DATABASE``: a path or a ``postgresql://`` URI
    :return: whether it names a PostgreSQL database
    """
    return str(location).startswith(("postgresql://", "postgres://"))


def open_store(location: str | os.PathLike[str], **kwargs: Any) -> IStore:
    """
    Open the store ``location`` names, creating or migrating its schema.

    :param location: a path (SQLite) or a ``postgresql://`` URI
    :param kwargs: passed to the backend's ``open``
    :raises StoreError: it cannot be used (the message says why, never a password)
    :return: an :class:`IStore`
    """
    if is_postgres(location):
        from .postgres import PostgresStore

        return PostgresStore.open(str(location), **kwargs)
    return Store.open(location, **kwargs)
