"""
CONTRACT §6's "who may do what", walked end to end: every explorer method and every node
method, called by every kind of caller over a real socket to a real ``twistd explorer``
and a real ``twistd node``.  Each answer must be the table's (allowed: anything but
-32010; refused: -32010), never -32603, and neither process may log a traceback.

The expectations are written out here from the contract's text (with issue 17's
amendments), not read from ``hero_compute.rpc.authz``: the table is checked against the
contract, not against itself.
"""

import contextlib
import os

import pytest

from hero_compute import pki
from hero_compute.rpc.schema import load_schema

from .support import connect, rpc_over, tls_connect, wait_for

EXPLORER_METHODS = frozenset([*load_schema("explorer").methods, "rpc.discover"])
NODE_METHODS = frozenset([*load_schema("node").methods, "rpc.discover"])

#: The real node, and the ids the node certificates of the callers name.
NODE, OWN, OTHER = "m1", "mx", "my"

#: Caller kinds.  "node-own" and "node-other" hold the same ``node/mx`` certificate
#: and name, in a heartbeat's or leave's ``node_id``, themselves or another node.
CALLERS = (
    "unix",
    "client",
    "node-own",
    "node-other",
    "explorer",
    "tls-anonymous",
    "tcp",
)


def _all_but(methods, *names):
    return set(methods) - {f"explorer.{n}" for n in names}


#: The explorer column of §6, one caller per row, as the contract words it.
EXPECTED_EXPLORER = {
    # "Unix socket (local; file permissions decide) | everything" -- but renew is
    # renewal "authenticated by the current certificate", and a Unix caller has none
    # (issue 17: renew over Unix is -32010).
    "unix": _all_but(EXPLORER_METHODS, "renew"),
    # "`client/*` certificate | everything but `heartbeat`, `leave`, `enroll`, `renew`"
    "client": _all_but(EXPLORER_METHODS, "heartbeat", "leave", "enroll", "renew"),
    # "`node/<id>` certificate | `heartbeat`, `leave`, `renew` for that id only; `info`"
    "node-own": {
        "explorer.heartbeat",
        "explorer.leave",
        "explorer.renew",
        "explorer.info",
    },
    "node-other": {"explorer.renew", "explorer.info"},
    # "`explorer/*` certificate | nothing"
    "explorer": set(),
    # "TLS without a certificate | `enroll`, `rpc.discover`"
    "tls-anonymous": {"explorer.enroll", "rpc.discover"},
    # "plain TCP | as before, except: `remove_node`, `revoke`, `token` creation
    # refused" -- and (issue 17) enroll, whose token and certificate would cross in
    # clear, and renew, which has no certificate to renew.
    "tcp": _all_but(
        EXPLORER_METHODS,
        "remove_node",
        "revoke",
        "create_token",
        "enroll",
        "renew",
        "ui_token_create",
        "ui_token_list",
        "ui_token_revoke",
    ),
}

#: The node column of §6.
EXPECTED_NODE = {
    "unix": set(NODE_METHODS),  # everything
    "client": set(NODE_METHODS),  # everything
    "node-own": set(),  # nothing
    "node-other": set(),
    "explorer": set(NODE_METHODS),  # everything (the proxy)
    "tls-anonymous": {"rpc.discover"},
    "tcp": set(NODE_METHODS),  # as before
}


def explorer_params(method, caller):
    """Params a caller could plausibly send: valid where the call is harmless, and
    invalid (-32602, not -32010) where an allowed call would change the fleet."""
    target = OTHER if caller == "node-other" else OWN
    if caller not in ("node-own", "node-other"):
        target = f"hb-{caller}"
    return {
        "explorer.heartbeat": {"node_id": target, "socket_path": "tls://127.0.0.1:9"},
        "explorer.leave": {"node_id": target},
        "explorer.list_nodes": {},
        "explorer.query_nodes": {"limit": 5},
        "explorer.get_node": {"node_id": NODE},
        "explorer.node_history": {"node_id": NODE},
        "explorer.remove_node": {"node_id": "ghost"},
        "explorer.call": {"node_id": NODE, "method": "node.info"},
        "explorer.info": {},
        "explorer.summary": {},
        # Invalid (-32602) where allowed: no account is made or ended.
        "explorer.ui_token_create": {"user": "-", "role": "viewer"},
        "explorer.ui_token_list": {},
        "explorer.ui_token_revoke": {"user": "-"},
        "explorer.create_token": {"ttl": 60, "node_id": "tok"},
        # Not a CSR: an allowed enroll or renew is -32602, a refused one -32010.
        "explorer.enroll": {"token": "aaaaaa.bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", "csr": "x"},
        "explorer.renew": {"csr": "x"},
        "explorer.revoke": {"node_id": "ghost"},
        # No VM fits a node with no capacity (-32006), and a create without its
        # sizes is -32602: nothing is placed or made.
        "explorer.place": {"vcpus": 64, "memory_mb": 1048576, "disk_gb": 65536},
        "explorer.create_vm": {"name": "never"},
        "explorer.audit": {"limit": 5},
        "rpc.discover": {},
    }[method]


def node_params(method):
    """Params for a node method: nothing exists and nothing gets made."""
    return {
        "node.info": {},
        "vm.list": {},
        "vm.create": {"name": "never"},  # no vcpus: -32602 when allowed
        "vm.get": {"vm_id": "nope"},
        "vm.start": {"vm_id": "nope"},
        "vm.stop": {"vm_id": "nope"},
        "vm.delete": {"vm_id": "nope"},
        "vm.console_log": {"vm_id": "nope"},
        "node.images": {},
        # No URL, digest or name: -32602 when allowed, nothing fetched.
        "image.import": {"name": "never"},
        "rpc.discover": {},
    }[method]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One explorer (Unix, TCP, TLS; it signs) and one node (Unix, TCP, TLS) that
    heartbeats to it, with the certificates of every kind of caller."""
    from .support import Twistd, make_short_tmp, remove_tmp

    base = tmp_path_factory.mktemp("matrix")
    ca_dir = str(base / "ca")
    pki.create_ca(ca_dir)
    certs = {}
    for role, name in (
        ("explorer", "e1"),
        ("client", "ops"),
        ("node", OWN),
        ("node", NODE),
    ):
        certs[f"{role}/{name}"] = pki.create_cert(
            ca_dir, role, name, ips=["127.0.0.1"], out=str(base / f"{role}-{name}")
        )
    ca = os.path.join(ca_dir, "ca.pem")
    tmp = make_short_tmp()
    explorer = Twistd(
        ["explorer"],
        env={
            "HERO_SOCKET_DIR": tmp,
            "EXPLORER_STATE_DIR": f"{tmp}/state",
            "EXPLORER_TCP_ADDR": "127.0.0.1:0",
            "EXPLORER_TLS_ADDR": "127.0.0.1:0",
            "EXPLORER_TLS_CERT": certs["explorer/e1"][0],
            "EXPLORER_TLS_KEY": certs["explorer/e1"][1],
            "EXPLORER_TLS_CA": ca,
            "EXPLORER_CA_KEY": os.path.join(ca_dir, "ca-key.pem"),
        },
    )
    node = None
    try:
        euris = explorer.listening(count=3)
        node = Twistd(
            ["node", "--socket", f"{tmp}/n.sock"],
            env={
                "HERO_STATE_DIR": f"{tmp}/node",
                "EXPLORER_ADDRESSES": euris[0],
                "NODE_ID": NODE,
                "NODE_TCP_ADDR": "127.0.0.1:0",
                "NODE_TLS_ADDR": "127.0.0.1:0",
                "NODE_TLS_CERT": certs[f"node/{NODE}"][0],
                "NODE_TLS_KEY": certs[f"node/{NODE}"][1],
                "NODE_TLS_CA": ca,
                "HEARTBEAT_INTERVAL": "1",
            },
        )
        nuris = node.listening(count=3)
        unix = next(u for u in euris if u.startswith("unix://"))
        wait_for(
            lambda: (
                rpc_over(connect(unix), "explorer.get_node", {"node_id": NODE})
                .get("result", {})
                .get("status")
                == "online"
            ),
            what="the node online",
        )
        yield {
            "explorer": explorer,
            "node": node,
            "euris": euris,
            "nuris": nuris,
            "certs": certs,
            "ca": ca,
        }
    finally:
        if node is not None:
            node.stop()
        explorer.stop()
        remove_tmp(tmp)


def connection(world, uris, caller):
    """One connection, kept for every call of this caller to one process."""
    scheme = {"unix": "unix://", "tcp": "tcp://"}.get(caller, "tls://")
    uri = next(u for u in uris if u.startswith(scheme))
    if scheme != "tls://":
        return connect(uri)
    who = {
        "client": "client/ops",
        "node-own": f"node/{OWN}",
        "node-other": f"node/{OWN}",
        "explorer": "explorer/e1",
    }.get(caller)
    cert, key = world["certs"][who] if who else (None, None)
    return tls_connect(uri, world["ca"], cert, key)


def walk(world, uris, methods, params_of, expected):
    """Call every method as every caller; the cells that disagree with ``expected``."""
    wrong = []
    for caller in CALLERS:
        conn = connection(world, uris, caller)
        with contextlib.closing(conn):
            for method in sorted(methods):
                answer = rpc_over(conn, method, params_of(method, caller))
                error = answer.get("error") or {}
                got = error.get("code") != -32010
                if error.get("code") == -32603 or got != (method in expected[caller]):
                    wrong.append((caller, method, answer))
    return wrong


def test_every_explorer_method_by_every_caller(world):
    """Each caller gets exactly its §6 row of the explorer: allowed calls are not
    -32010, the others are; none is -32603; no traceback is logged."""
    wrong = walk(
        world, world["euris"], EXPLORER_METHODS, explorer_params, EXPECTED_EXPLORER
    )
    assert wrong == []
    assert "Traceback" not in world["explorer"].output


def test_every_node_method_by_every_caller(world):
    """Each caller gets exactly its §6 row of the node, over the node's own Unix, TCP
    and TLS listeners; none is -32603; no traceback is logged."""
    wrong = walk(
        world,
        world["nuris"],
        NODE_METHODS,
        lambda method, caller: node_params(method),
        EXPECTED_NODE,
    )
    assert wrong == []
    assert "Traceback" not in world["node"].output


def test_the_table_covers_every_method():
    """Every method the schemas define is in the walk (a new one must find its row)."""
    assert set().union(*EXPECTED_EXPLORER.values()) <= EXPLORER_METHODS
    assert {
        f"explorer.{n}"
        for n in ("heartbeat", "leave", "renew", "enroll", "revoke", "create_token")
    } <= EXPLORER_METHODS
