"""
How the PostgreSQL store connects: timeouts, TCP keepalives, and what of a connection
string or an error may be logged (never a password).
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

#: Seconds to wait for a connection to the server.
CONNECT_TIMEOUT = 3

#: Milliseconds a running explorer's statement may take (``statement_timeout``): its
#: writes are a chunk of node records or one identity (milliseconds); one cancelled
#: is a :class:`~hero_compute.rpc.errors.StoreUnavailable`, retried.
STATEMENT_TIMEOUT = 10_000

#: TCP keepalives (seconds: idle, then between probes, and probes unanswered) and
#: milliseconds unacknowledged data may wait (``tcp_user_timeout``): a server gone
#: without closing the connection is noticed in about 10 s, not the kernel's 15
#: minutes.  libpq ignores them on a Unix socket.
KEEPALIVES = {"keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3}
TCP_USER_TIMEOUT = 10_000


def redact(dsn: str) -> str:
    """
    :param dsn: a libpq connection string or ``postgresql://`` URI
    :return: ``postgresql://user@host:port/dbname``, safe to log: never a password
    """
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "postgresql://(unparsable URI)"
    user = f"{parts['user']}@" if parts.get("user") else ""
    host = parts.get("host", "")
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{host}{port}/{parts.get('dbname', '')}"


def connect(dsn: str, timeout: int = STATEMENT_TIMEOUT) -> Any:
    """
    Connect (autocommit), the session's statements bounded.

    :param timeout: its ``statement_timeout`` (ms; 0: none)
    """
    given = conninfo_to_dict(dsn)
    # The URI's own options and TCP settings are kept; the statement timeout is added.
    bounds = {
        "keepalives": 1,
        "tcp_user_timeout": TCP_USER_TIMEOUT,
        **KEEPALIVES,
    }
    options = f"{given.get('options', '')} -c statement_timeout={timeout}".strip()
    conninfo = make_conninfo(
        dsn,
        connect_timeout=CONNECT_TIMEOUT,
        options=options,
        **{k: v for k, v in bounds.items() if k not in given},
    )
    return psycopg.connect(conninfo, autocommit=True)


def reason(error: Exception) -> str:
    """What a libpq error says, safe to log."""
    # libpq's messages name host, port and user, never the password; keep the first
    # line only (the rest is hints about the server's log).
    return (
        str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    )
