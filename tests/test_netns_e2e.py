"""
The heart of the product, end to end: one explorer host and two node hosts as network
namespaces on a bridge, real twistd processes, no socat.
"""

import time

import pytest

from .support import result, rpc, wait_for

OFFLINE_AFTER = 3.0
INTERVAL = 1.0

pytestmark = pytest.mark.netns


def node_env(explorer_ip, node_id):
    """Environment of a remote node reporting to the explorer over TCP."""
    return {
        "EXPLORER_ADDRESSES": f"tcp://{explorer_ip}:9002",
        "NODE_TCP_ADDR": "0.0.0.0:9003",
        "HEARTBEAT_INTERVAL": str(INTERVAL),
        "NODE_ID": node_id,
    }


def test_three_hosts(lab, twistd, short_tmp):
    """Remote nodes over TCP and a local one over Unix; link cuts, recovery, explorer
    restart."""
    explorer_ip = lab.add_host("ex", 1)
    n1_ip = lab.add_host("n1", 11)
    n2_ip = lab.add_host("n2", 12)
    home = f"{short_tmp}/ex"
    explorer_env = {
        "HOME": home,
        "EXPLORER_TCP_ADDR": f"{explorer_ip}:9002",
        "NODE_OFFLINE_AFTER": str(OFFLINE_AFTER),
    }
    explorer = twistd(["explorer"], env=explorer_env, netns=lab.ns("ex"))
    euri = f"unix://{home}/hero/var/sockets/hero_compute_explorer.sock"
    assert explorer.listening(count=2) == [euri, f"tcp://{explorer_ip}:9002"]
    # The local node has no transport configuration at all, as before TCP existed; only
    # its interval is shortened to suit this test's short NODE_OFFLINE_AFTER.
    local = twistd(
        ["node"],
        env={"HOME": home, "HEARTBEAT_INTERVAL": str(INTERVAL), "NODE_ID": "local"},
        netns=lab.ns("ex"),
    )
    local.listening()
    for name in ("n1", "n2"):
        twistd(
            [
                "node",
                "--state-dir",
                f"{short_tmp}/{name}",
                "--socket",
                f"{short_tmp}/{name}.sock",
            ],
            env={**node_env(explorer_ip, name), "HOME": f"{short_tmp}/{name}"},
            netns=lab.ns(name),
        ).listening(count=2)

    def online():
        return {
            n["node_id"]: n
            for n in result(euri, "explorer.list_nodes", {"status": "online"})
        }

    nodes = wait_for(lambda: len(online()) == 3 and online(), what="three nodes online")
    assert (
        nodes["local"]["socket_path"]
        == f"unix://{home}/hero/var/sockets/hero_compute_server.sock"
    )
    assert nodes["local"]["transport"] == "unix"
    assert nodes["n1"]["socket_path"] == f"tcp://{n1_ip}:9003"
    assert nodes["n2"]["socket_path"] == f"tcp://{n2_ip}:9003"
    assert nodes["n1"]["transport"] == nodes["n2"]["transport"] == "tcp"
    for node_id in ("local", "n1", "n2"):
        info = result(euri, "explorer.call", {"node_id": node_id, "method": "node.info"})
        assert info["node_id"] == node_id

    # Cut n2 off: it goes offline within NODE_OFFLINE_AFTER plus one interval.
    lab.cut("n2")
    cut_at = time.monotonic()
    wait_for(
        lambda: "n2" not in online(),
        timeout=OFFLINE_AFTER + INTERVAL + 1,
        interval=0.05,
        what="n2 offline after its link was cut",
    )
    assert time.monotonic() - cut_at <= OFFLINE_AFTER + INTERVAL + 0.5
    started = time.monotonic()
    error = rpc(euri, "explorer.call", {"node_id": "n2", "method": "node.info"})["error"]
    assert error["code"] in (-32002, -32003)
    assert time.monotonic() - started < 1.0
    assert set(online()) == {"local", "n1"}

    # The link returns: n2 is back within one backoff cap (5 intervals).
    lab.mend("n2")
    wait_for(lambda: "n2" in online(), timeout=5 * INTERVAL + 2, what="n2 back online")
    assert (
        result(euri, "explorer.call", {"node_id": "n2", "method": "node.info"})["node_id"]
        == "n2"
    )

    # The explorer restarts with an empty registry; every node registers again.
    explorer.kill()
    explorer = twistd(["explorer"], env=explorer_env, netns=lab.ns("ex"))
    explorer.listening(count=2)
    nodes = wait_for(
        lambda: len(online()) == 3 and online(),
        timeout=5 * INTERVAL + 3,
        what="all nodes re-registered after the explorer restart",
    )
    assert nodes["n1"]["socket_path"] == f"tcp://{n1_ip}:9003"
