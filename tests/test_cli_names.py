"""
NODE and VM arguments in the CLI (CONTRACT §9): a full id, then an exact unique name,
then a unique id prefix of at least 4 characters; ambiguous exits 64 listing the
candidates, nothing exits 3.  And ``vm create`` without NODE, which places the VM.
Against a real explorer and real nodes; VMs are only defined (no guest runs).
"""

import json

import pytest

from hero_compute.cli import exits
from hero_compute.cli.names import match

from .support import result, wait_for
from .test_cli import cli

#: The README's node, and one sharing its first four characters.
README_NODE = "b270c09fa945423a912ae365f001cc36"
TWIN = "b2701111222233334444555566667777"

SIZES = ["--vcpus", "1", "--memory", "512M", "--disk", "5G"]


@pytest.fixture
def fleet(twistd, short_tmp):
    """An explorer and two nodes, ``web`` (zone=x) and ``db`` (zone=y); the CLI's env."""
    env = {"HERO_SOCKET_DIR": short_tmp}
    (euri,) = twistd(["explorer"], env=env).listening()
    for node_id, name, zone in ((README_NODE, "web", "x"), (TWIN, "db", "y")):
        twistd(
            [
                "node",
                "--socket",
                f"{short_tmp}/{name}.sock",
                "--explorer",
                euri,
                "--interval",
                "0.5",
                "--state-dir",
                f"{short_tmp}/{name}",
                "--node-id",
                node_id,
                "--name",
                name,
            ],
            env={
                **env,
                "NODE_LABELS": f"zone={zone}",
                "NODE_CAPACITY": "vcpus=4,memory=4G",
            },
        )
    wait_for(
        lambda: len(result(euri, "explorer.list_nodes", {"status": "online"})) == 2,
        what="nodes online",
    )
    return env


def node_of(fleet, text):
    """``hero-compute node TEXT``: (exit status, node id or None, stderr)."""
    code, out, err = cli("node", text, env=fleet)
    return code, (json.loads(out)["node_id"] if code == 0 else None), err


def test_node_by_id_name_and_prefix(fleet):
    """A node is found by its full id, its name, a unique prefix, or the README's cut id."""
    assert node_of(fleet, README_NODE)[:2] == (0, README_NODE)
    assert node_of(fleet, "db")[:2] == (0, TWIN)
    assert node_of(fleet, "b270c0")[:2] == (0, README_NODE)
    assert node_of(fleet, "b270c0…")[:2] == (0, README_NODE)
    assert node_of(fleet, "b2701")[:2] == (0, TWIN)


def test_ambiguous_and_unknown_nodes(fleet):
    """A prefix of both ids exits 64 listing both; no match, or a prefix under 4
    characters, exits 3."""
    code, _, err = node_of(fleet, "b270")
    assert code == exits.USAGE
    assert "ambiguous" in err and README_NODE in err and TWIN in err
    code, _, err = node_of(fleet, "b27")
    assert code == exits.NOT_FOUND and "4 characters" in err
    code, _, err = node_of(fleet, "nowhere")
    assert code == exits.NOT_FOUND and "nowhere" in err
    code, _, err = cli("vm", "list", "b270", env=fleet)
    assert code == exits.USAGE and TWIN in err


def test_readme_create_then_vm_by_name_and_prefix(fleet):
    """The README's ``vm create b270c0… --name web`` works; the VM is then found by
    name and by an id prefix on a node named by its own name."""
    code, out, err = cli("vm", "create", "b270c0…", "--name", "web", *SIZES, env=fleet)
    assert code == 0, err
    vm = json.loads(out)
    code, out, err = cli("vm", "show", "web", "web", env=fleet)
    assert code == 0 and json.loads(out)["vm_id"] == vm["vm_id"], err
    code, out, err = cli("vm", "show", "b270c0", vm["vm_id"][:6], env=fleet)
    assert code == 0 and json.loads(out)["vm_id"] == vm["vm_id"], err
    code, _, err = cli("vm", "show", "web", "nothing", env=fleet)
    assert code == exits.NOT_FOUND and "nothing" in err


def test_create_without_node_places_it(fleet):
    """``vm create`` without NODE places the VM (--where, --strategy); NODE and --where
    together is bad usage; nothing fitting exits 1 with -32006 and its counts."""
    code, out, err = cli(
        "vm", "create", "--name", "p1", *SIZES, "--where", "zone=y", env=fleet
    )
    assert code == 0, err
    assert json.loads(out)["node_id"] == TWIN
    code, out, err = cli(
        "vm", "create", "--name", "p2", *SIZES, "--strategy", "binpack", env=fleet
    )
    assert code == 0 and json.loads(out)["node_id"] == TWIN, err
    code, _, err = cli(
        "vm", "create", "web", "--name", "p3", *SIZES, "--where", "a=b", env=fleet
    )
    assert code == exits.USAGE
    code, _, err = cli(
        "vm", "create", "--name", "p4", "--memory", "64G", "--disk", "1G", env=fleet
    )
    assert code == exits.FAILED and "-32006" in err and '"memory_mb": 2' in err


def test_nodes_where(fleet):
    """``nodes --where k=v`` lists only the nodes with that label."""
    code, out, err = cli("nodes", "--where", "zone=x", env=fleet)
    assert code == 0, err
    assert [n["node_id"] for n in json.loads(out)] == [README_NODE]


def test_match_rules():
    """Full id before name before prefix; a name shared by two is ambiguous (64)."""
    vms = [
        {"vm_id": "abcd1", "name": "abcd2"},
        {"vm_id": "abcd2", "name": "x"},
        {"vm_id": "ffff1", "name": "same"},
        {"vm_id": "ffff2", "name": "same"},
    ]
    assert match("abcd2", vms, "vm_id")["vm_id"] == "abcd2"
    assert match("x", vms, "vm_id")["vm_id"] == "abcd2"
    with pytest.raises(exits.Failure) as caught:
        match("same", vms, "vm_id")
    assert caught.value.code == exits.USAGE and "ffff1" in caught.value.message
    with pytest.raises(exits.Failure) as caught:
        match("abcd", vms, "vm_id")
    assert caught.value.code == exits.USAGE
    with pytest.raises(exits.Failure) as caught:
        match("zzzz", vms, "vm_id")
    assert caught.value.code == exits.NOT_FOUND
