"""
Real QEMU VMs on a node on another host, driven through an explorer reached over TCP.
"""

import os
import shutil
import signal
import subprocess

import pytest

from .support import result, rpc, wait_for

pytestmark = [
    pytest.mark.netns,
    pytest.mark.qemu,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None,
        reason="qemu-system-x86_64 is not installed",
    ),
]


def qemu_pids(state_dir):
    """Pids of QEMU processes whose command line mentions the state dir."""
    done = subprocess.run(
        ["pgrep", "-f", f"qemu-system-x86_64.*{state_dir}"], capture_output=True, text=True
    )
    return {int(p) for p in done.stdout.split()}


@pytest.fixture
def state_dir(short_tmp):
    """The node's state dir; every QEMU started under it is killed at the end."""
    path = f"{short_tmp}/st"
    yield path
    for pid in qemu_pids(path):
        os.kill(pid, signal.SIGKILL)


def test_vm_lifecycle_through_explorer(lab, twistd, short_tmp, state_dir):
    """create, start, running with a real qemu, stop, start, kill -9 the node, delete."""
    explorer_ip = lab.add_host("ex", 1)
    lab.add_host("n1", 11)
    explorer = twistd(
        ["explorer", "--socket", f"{short_tmp}/e.sock", "--tcp", f"{explorer_ip}:9002"],
        netns=lab.ns("ex"),
    )
    euri = f"unix://{short_tmp}/e.sock"
    explorer.listening(count=2)
    node_args = [
        "node",
        "--socket",
        f"{short_tmp}/n.sock",
        "--tcp",
        "0.0.0.0:9003",
        "--explorer",
        f"tcp://{explorer_ip}:9002",
        "--interval",
        "0.5",
        "--state-dir",
        state_dir,
        "--node-id",
        "n1",
    ]
    node = twistd(node_args, netns=lab.ns("n1"))
    wait_for(
        lambda: result(euri, "explorer.list_nodes", {"status": "online"}),
        what="node online",
    )

    def call(method, **params):
        return rpc(
            euri,
            "explorer.call",
            {"node_id": "n1", "method": method, "params": params},
            timeout=60,
        )

    def ok(method, **params):
        response = call(method, **params)
        assert "result" in response, response
        return response["result"]

    vm = ok("vm.create", name="web", vcpus=1, memory_mb=64, disk_gb=1)
    assert vm["state"] == "stopped"
    vm_id = vm["vm_id"]
    other = ok("vm.create", name="db", vcpus=1, memory_mb=64, disk_gb=1)["vm_id"]
    assert (
        call("vm.create", name="web", vcpus=1, memory_mb=64, disk_gb=1)["error"]["code"]
        == -32005
    )
    assert call("vm.stop", vm_id=vm_id)["error"]["code"] == -32005
    assert call("vm.get", vm_id="nope")["error"]["code"] == -32004
    assert (
        call("vm.create", name="x", vcpus=-1, memory_mb=64, disk_gb=1)["error"]["code"]
        == -32602
    )

    ok("vm.start", vm_id=vm_id)
    wait_for(
        lambda: ok("vm.get", vm_id=vm_id)["state"] == "running",
        timeout=30,
        what="VM running",
    )
    assert len(qemu_pids(state_dir)) == 1
    node_info = ok("node.info")
    assert node_info["vm_count"] == 2 and node_info["usage"]["memory_mb"] >= 64
    listed = result(euri, "explorer.get_node", {"node_id": "n1"})
    assert listed["vm_count"] == 2 or wait_for(
        lambda: result(euri, "explorer.get_node", {"node_id": "n1"})["vm_count"] == 2
    )

    # The node dies hard and comes back: the VM kept running and is found again.
    pids = qemu_pids(state_dir)
    node.kill()
    node = twistd(node_args, netns=lab.ns("n1"))
    wait_for(
        lambda: ok("vm.get", vm_id=vm_id)["state"] == "running",
        timeout=30,
        what="VM found again after node restart",
    )
    assert qemu_pids(state_dir) == pids
    assert {v["vm_id"] for v in ok("vm.list")} == {vm_id, other}

    stopped = ok("vm.stop", vm_id=vm_id, force=True)
    assert stopped["state"] == "stopped"
    wait_for(lambda: not qemu_pids(state_dir), timeout=10, what="qemu gone")
    ok("vm.start", vm_id=vm_id)
    wait_for(
        lambda: ok("vm.get", vm_id=vm_id)["state"] == "running",
        timeout=30,
        what="VM running again",
    )
    assert ok("vm.delete", vm_id=vm_id) is True
    wait_for(lambda: not qemu_pids(state_dir), timeout=15, what="qemu gone after delete")
    assert call("vm.get", vm_id=vm_id)["error"]["code"] == -32004
    assert [v["vm_id"] for v in ok("vm.list")] == [other]
    assert not os.path.exists(f"{state_dir}/vms/{vm_id}")
