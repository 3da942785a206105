"""
The roles table (CONTRACT §6) walked cell by cell, from the side of every caller.
"""

import attrs
import pytest

from hero_compute.rpc.authz import EXPLORER_POLICY, NODE_POLICY
from hero_compute.rpc.errors import RefusedByPolicy
from hero_compute.rpc.schema import load_schema

#: Every method each service serves, from its schema: a method added later is walked
#: too, and must find its place in the expectations below.
EXPLORER_METHODS = sorted([*load_schema("explorer").methods, "rpc.discover"])
NODE_METHODS = sorted([*load_schema("node").methods, "rpc.discover"])


@attrs.frozen
class Who:
    """A verified peer identity, as rpc.tls gives it."""

    role: str
    name: str


NODE_A = Who("node", "a")
CALLERS = {
    "unix": ("unix", None),
    "tcp": ("tcp", None),
    "tls-anonymous": ("tls", None),
    "client": ("tls", Who("client", "ops")),
    "node-a": ("tls", NODE_A),
    "explorer": ("tls", Who("explorer", "e1")),
    "tls-unknown-role": ("tls", Who("printer", "x")),
}

#: The contract's explorer column, written out per caller (params name node "a").
EXPLORER_ALLOWED = {
    # Renewal is by the node's own certificate: none over Unix or plain TCP.
    "unix": set(EXPLORER_METHODS) - {"explorer.renew"},
    "tcp": set(EXPLORER_METHODS)
    - {
        "explorer.remove_node",
        "explorer.revoke",
        "explorer.create_token",
        "explorer.enroll",
        "explorer.renew",
        # Dashboard accounts: Unix socket or client certificate only (CONTRACT §11).
        "explorer.ui_token_create",
        "explorer.ui_token_list",
        "explorer.ui_token_revoke",
    },
    "tls-anonymous": {"explorer.enroll", "rpc.discover"},
    "client": set(EXPLORER_METHODS)
    - {"explorer.heartbeat", "explorer.leave", "explorer.enroll", "explorer.renew"},
    "node-a": {"explorer.heartbeat", "explorer.leave", "explorer.renew", "explorer.info"},
    "explorer": set(),
    "tls-unknown-role": set(),
}
NODE_ALLOWED = {
    "unix": set(NODE_METHODS),
    "tcp": set(NODE_METHODS),
    "tls-anonymous": {"rpc.discover"},
    "client": set(NODE_METHODS),
    "node-a": set(),
    "explorer": set(NODE_METHODS),
    "tls-unknown-role": set(),
}


def allowed(policy, caller, method, params):
    """Whether the policy lets this caller call this method."""
    transport, identity = CALLERS[caller]
    try:
        policy.check(transport, identity, method, params)
    except RefusedByPolicy:
        return False
    return True


@pytest.mark.parametrize("caller", sorted(CALLERS))
def test_explorer_table(caller):
    """Each caller may call exactly the explorer methods of its row, and no other."""
    params = {"node_id": "a"}
    got = {m for m in EXPLORER_METHODS if allowed(EXPLORER_POLICY, caller, m, params)}
    assert got == EXPLORER_ALLOWED[caller]


@pytest.mark.parametrize("caller", sorted(CALLERS))
def test_node_table(caller):
    """Each caller may call exactly the node methods of its row, and no other."""
    got = {m for m in NODE_METHODS if allowed(NODE_POLICY, caller, m, {})}
    assert got == NODE_ALLOWED[caller]


@pytest.mark.parametrize("method", ["explorer.heartbeat", "explorer.leave"])
@pytest.mark.parametrize(
    "params",
    [
        {"node_id": "b"},  # another node
        {},  # none named
        ["a"],  # positional: no name to check, so refused
        {"node_id": "a/../b"},
        {"node_id": ["a"]},
    ],
)
def test_node_certificate_speaks_only_for_itself(method, params):
    """A node/a certificate cannot heartbeat or leave as anyone but a."""
    with pytest.raises(RefusedByPolicy) as e:
        EXPLORER_POLICY.check("tls", NODE_A, method, params)
    assert "node/a" in str(e.value) and method in str(e.value)


def test_refusal_names_caller_and_method():
    """A refusal says who was refused what, so an operator can tell why."""
    with pytest.raises(RefusedByPolicy) as e:
        EXPLORER_POLICY.check("tcp", None, "explorer.remove_node", {"node_id": "a"})
    assert e.value.code == -32010
    assert "explorer.remove_node" in str(e.value) and "tcp" in str(e.value)


@pytest.mark.parametrize("caller", sorted(CALLERS))
def test_console_routes_follow_their_methods(caller):
    """A console may be opened by exactly those who may call vm.start on the node and
    explorer.call on the explorer; an unknown route by no one."""
    transport, identity = CALLERS[caller]
    for policy, method in ((NODE_POLICY, "vm.start"), (EXPLORER_POLICY, "explorer.call")):
        try:
            policy.check_route(transport, identity, "console", {"node_id": "a"})
            opened = True
        except RefusedByPolicy:
            opened = False
        assert opened == allowed(policy, caller, method, {"node_id": "a"})
        with pytest.raises(RefusedByPolicy):
            policy.check_route(transport, identity, "shell", {})
