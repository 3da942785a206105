"""
Who may call what: the roles table of CONTRACT §6 as data, checked once per call
between the transport and the dispatcher, never in handlers.

A caller is known by how it reached us (``unix``, ``tcp`` or ``tls``) and, over TLS, by
the SPIFFE identity of its verified certificate (its role and name).  Each service has a
:class:`Policy`: for each kind of caller, the methods it may call, and for some of them a
condition on the params (a ``node/<id>`` certificate may heartbeat only as ``<id>``).
Anything else is refused with -32010 before the handler runs, so nothing changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import attrs

from .errors import RefusedByPolicy

#: Kinds of caller.  A TLS peer without a certificate (or whose certificate names no
#: identity in our trust domain) is ``anonymous``.
UNIX, TCP, ANONYMOUS = "unix", "tcp", "anonymous"
CLIENT, NODE, EXPLORER = "client", "node", "explorer"

#: The dashboard's users (CONTRACT §11), as :data:`DASHBOARD_POLICY` knows them.
UI_VIEWER, UI_OPERATOR = "ui-viewer", "ui-operator"

#: The dashboard's accounts: made, listed and revoked by whoever may make join tokens.
UI_ACCOUNT_METHODS = frozenset(
    {"explorer.ui_token_create", "explorer.ui_token_list", "explorer.ui_token_revoke"}
)

#: Stands for every method of the service.
ALL = "*"


class Identity(Protocol):
    """The verified identity of a TLS peer (see ``hero_compute.rpc.tls.PeerIdentity``)."""

    @property
    def role(self) -> str: ...

    @property
    def name(self) -> str: ...


@attrs.frozen
class OwnName:
    """
    A condition: the named param must equal the caller's certificate name.

    :ivar param: the param holding a node id
    """

    param: str

    def allows(self, identity: Identity | None, params: object) -> bool:
        """:return: whether ``params`` name the caller itself"""
        return (
            identity is not None
            and isinstance(params, Mapping)
            and params.get(self.param) == identity.name
        )


@attrs.frozen
class ParamIn:
    """
    A condition: the named param must be one of these values.

    :ivar param: the param to look at
    :ivar values: the values allowed
    """

    param: str
    values: frozenset[str]

    def allows(self, identity: Identity | None, params: object) -> bool:
        """:return: whether ``params`` hold one of the allowed values"""
        return isinstance(params, Mapping) and params.get(self.param) in self.values


#: A condition on a call's params.
Condition = OwnName | ParamIn


@attrs.frozen
class Grant:
    """
    What one kind of caller may call.

    :ivar methods: method names, or :data:`ALL`
    :ivar excluded: methods refused even when ``methods`` is :data:`ALL`
    :ivar conditions: per method, a condition on its params
    """

    methods: frozenset[str] | str
    excluded: frozenset[str] = frozenset()
    conditions: Mapping[str, Condition] = attrs.field(factory=dict)

    def allows(self, method: str, identity: Identity | None, params: object) -> bool:
        """:return: whether this grant allows the call"""
        if method in self.excluded:
            return False
        if self.methods != ALL and method not in self.methods:
            return False
        condition = self.conditions.get(method)
        return condition is None or condition.allows(identity, params)


NOTHING = Grant(frozenset())
EVERYTHING = Grant(ALL)


def caller_kind(transport: str, identity: Identity | None) -> str:
    """
    :param transport: ``unix``, ``tcp`` or ``tls``
    :param identity: the verified peer identity over TLS, or None
    :return: the kind of caller, a key of a :class:`Policy`
    """
    if transport != "tls":
        return transport
    if identity is None:
        return ANONYMOUS
    return identity.role


@attrs.frozen
class Policy:
    """
    A service's roles table.

    :ivar service: the service's name, for messages
    :ivar grants: per kind of caller, its :class:`Grant`; a kind not listed may call
        nothing
    :ivar routes: per WebSocket route (CONTRACT §8), the method whose callers may open
        it
    """

    service: str
    grants: Mapping[str, Grant]
    routes: Mapping[str, str] = attrs.field(factory=dict)

    def check(
        self, transport: str, identity: Identity | None, method: str, params: Any
    ) -> None:
        """
        Refuse a call the table does not allow.

        :raise RefusedByPolicy: naming the caller and the method
        """
        kind = caller_kind(transport, identity)
        if self.grants.get(kind, NOTHING).allows(method, identity, params):
            return
        if identity is not None:
            who = f"{identity.role}/{identity.name}"
        elif kind == ANONYMOUS:
            who = "a TLS peer without a fleet certificate"
        else:
            who = f"a caller over {transport}"
        raise RefusedByPolicy(f"{method} is not allowed to {who} on the {self.service}")

    def check_route(
        self, transport: str, identity: Identity | None, route: str, params: Any
    ) -> None:
        """
        Refuse opening a WebSocket route to whoever may not call its method.

        :raise RefusedByPolicy: likewise, or for a route not in :attr:`routes`
        """
        method = self.routes.get(route)
        if method is None:
            raise RefusedByPolicy(f"no route {route!r} on the {self.service}")
        self.check(transport, identity, method, params)


#: CONTRACT §6, the explorer's column.
EXPLORER_POLICY = Policy(
    "explorer",
    {
        # Renewal is by the node's own certificate: a Unix caller has none to renew.
        UNIX: Grant(ALL, excluded=frozenset({"explorer.renew"})),
        CLIENT: Grant(
            ALL,
            excluded=frozenset(
                {
                    "explorer.heartbeat",
                    "explorer.leave",
                    "explorer.enroll",
                    "explorer.renew",
                }
            ),
        ),
        NODE: Grant(
            frozenset(
                {"explorer.heartbeat", "explorer.leave", "explorer.renew", "explorer.info"}
            ),
            conditions={
                "explorer.heartbeat": OwnName("node_id"),
                "explorer.leave": OwnName("node_id"),
            },
        ),
        EXPLORER: NOTHING,
        ANONYMOUS: Grant(frozenset({"explorer.enroll", "rpc.discover"})),
        # Plain TCP is as trusted as before, but what could take a fleet apart is kept to
        # callers who proved who they are; heartbeat and leave are bound by the node
        # secret in the service itself (it is per-node state, not a role).  Enrollment
        # would carry the token and the certificate in clear, and there is no
        # certificate to renew.
        TCP: Grant(
            ALL,
            excluded=frozenset(
                {
                    "explorer.remove_node",
                    "explorer.revoke",
                    "explorer.create_token",
                    "explorer.enroll",
                    "explorer.renew",
                    *UI_ACCOUNT_METHODS,
                }
            ),
        ),
    },
    # A console through the explorer is a proxied call held open.
    # The event stream: whoever may read the fleet (CONTRACT §10).
    routes={"console": "explorer.call", "events": "explorer.query_nodes"},
)

#: CONTRACT §6, the node's column.
NODE_POLICY = Policy(
    "node",
    {
        UNIX: EVERYTHING,
        CLIENT: EVERYTHING,
        EXPLORER: EVERYTHING,
        NODE: NOTHING,
        ANONYMOUS: Grant(frozenset({"rpc.discover"})),
        TCP: EVERYTHING,
    },
    # Typing on a VM's console is as much power over it as starting it.
    routes={"console": "vm.start"},
)

#: What a dashboard viewer may call: what the page shows, nothing that changes the fleet.
_UI_READS = frozenset(
    {
        "explorer.info",
        "explorer.summary",
        "explorer.list_nodes",
        "explorer.query_nodes",
        "explorer.get_node",
        "explorer.node_history",
        "explorer.call",
    }
)

#: The node methods a viewer may reach through ``explorer.call``.
_UI_NODE_READS = frozenset({"node.info", "vm.list", "vm.get"})

#: ... and an operator: the VM's lifecycle and its console too (CONTRACT §11).
_UI_NODE_WRITES = frozenset(
    {"vm.create", "vm.start", "vm.stop", "vm.delete", "vm.console_log"}
)

#: The dashboard (``--ui``) acts as a client with the rights of its user's role: a
#: viewer only reads, whatever its session cookie is used for; an operator also
#: creates (placed or on a node), starts, stops and deletes VMs, and nothing else
#: (no tokens, revocations or removals).  Checked before :data:`EXPLORER_POLICY`'s
#: ``client`` row, which still applies.
DASHBOARD_POLICY = Policy(
    "explorer dashboard",
    {
        UI_VIEWER: Grant(
            _UI_READS,
            conditions={"explorer.call": ParamIn("method", _UI_NODE_READS)},
        ),
        UI_OPERATOR: Grant(
            _UI_READS | {"explorer.place", "explorer.create_vm"},
            conditions={
                "explorer.call": ParamIn("method", _UI_NODE_READS | _UI_NODE_WRITES)
            },
        ),
    },
)
