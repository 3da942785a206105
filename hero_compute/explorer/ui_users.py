"""
Who a dashboard call is made as (CONTRACT §11): the roles, the user names a login token
may be made for, a :class:`DashboardUser` and the :class:`Session` a login makes.
:mod:`.ui_accounts` keeps the tokens and sessions themselves.
"""

from __future__ import annotations

import re

import attrs

from hero_compute.rpc.authz import UI_OPERATOR, UI_VIEWER

#: The roles a dashboard user may have, by their name on the command line.
ROLES = {"viewer": UI_VIEWER, "operator": UI_OPERATOR}

#: A user name: what an operator would type, and safe in a log line and the audit.
USER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")

#: The user name of sessions made with the explorer's start-up token.
STARTUP_USER = "startup-token"

#: User names no login token may be made for: the audit's names of built-in callers.
RESERVED_USERS = frozenset({STARTUP_USER})


class SessionsFull(Exception):
    """:data:`~.ui_accounts.MAX_SESSIONS` live sessions: no new login for now."""


@attrs.frozen
class DashboardUser:
    """
    Who a dashboard call is made as: the identity its :class:`CallContext` carries.

    :ivar role: :data:`~hero_compute.rpc.authz.UI_VIEWER` or ``UI_OPERATOR``
    :ivar name: the user's name (or a client certificate's ``client/<name>``)
    """

    role: str
    name: str

    @property
    def uri(self) -> str:
        """Who this is in the audit log (CONTRACT §10: the dashboard user)."""
        return f"dashboard:{self.name}"


@attrs.frozen
class Session:
    """
    One login.

    :ivar user: the :class:`DashboardUser`
    :ivar csrf: the token the page must send back on writes
    :ivar expires_at: Unix seconds after which it is over, or None (start-up token)
    :ivar token_hash: the SHA-256 of the login token it was made from, or None
    :ivar sid: its id (the cookie's value), or None (a client certificate's)
    """

    user: DashboardUser
    csrf: str
    expires_at: float | None = None
    token_hash: str | None = None
    sid: str | None = None


def role_name(role: str) -> str:
    """:return: the name of a role (``viewer``, ``operator``)"""
    return next(k for k, v in ROLES.items() if v == role)
