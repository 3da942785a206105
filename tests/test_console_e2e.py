"""
The serial console end to end: real ``twistd`` explorer and node, a real guest
(``tests/guest.py``) booted by QEMU under TCG, WebSockets through the explorer's Unix
and TCP listeners and straight to the node, and the CLI.

One VM serves the whole module (a boot costs seconds of CPU on a shared machine); the
tests run in file order and leave it running for the next.  Small limits make the
bounds observable: ``NODE_CONSOLE_LOG`` 32 KiB, ``NODE_MAX_CONSOLES`` 3,
``HERO_MAX_UNSENT`` 16 KiB.
"""

import os
import select
import signal
import stat
import subprocess
import sys
import time

import pytest

from hero_compute.rpc.schema import load_schema

from .support import ROOT, Twistd, make_short_tmp, remove_tmp, result, rpc, wait_for
from .wsclient import WsClient, refusal

LOG_SIZE = 32 * 1024
MAX_CONSOLES = 3
UNSENT = 16 * 1024

#: Seconds a TCG guest on a busy machine may take to boot, or to answer a command.
BOOT = 120
ANSWER = 60


class Fleet:
    """The explorer, the node and the VM of this module."""

    def __init__(self, home, guest):
        self.home = home
        self.guest = guest
        self.env = {
            "HOME": home,
            "HEARTBEAT_INTERVAL": "0.3",
            "NODE_IMAGE_DIRS": f"{home}/images:{guest.directory}",
            "NODE_ACCEL": "tcg",
            "NODE_CONSOLE_LOG": str(LOG_SIZE),
            "NODE_MAX_CONSOLES": str(MAX_CONSOLES),
            "HERO_MAX_UNSENT": str(UNSENT),
        }
        os.makedirs(f"{home}/images", exist_ok=True)
        self.explorer = Twistd(["explorer", "--tcp", "127.0.0.1:0"], env=self.env)
        self.explorer_unix, self.explorer_tcp = self.explorer.listening(count=2)
        self.node = None
        self.start_node()
        self.node_id = open(f"{home}/hero/var/hero_compute/node_id").read().strip()
        wait_for(
            lambda: result(self.explorer_unix, "explorer.list_nodes", {"status": "online"}),
            what="node online",
        )
        vm = self.call(
            "vm.create",
            {
                "name": "console",
                "vcpus": 1,
                "memory_mb": 256,
                "disk_gb": 1,
                "network": "none",
                "boot": {"kernel": guest.kernel, "initrd": guest.initrd},
            },
        )
        self.vm_id = vm["vm_id"]
        self.vm_dir = f"{home}/hero/var/hero_compute/vms/{self.vm_id}"
        self.call("vm.start", {"vm_id": self.vm_id}, timeout=90)

    def start_node(self):
        """(Re)start the node process."""
        self.node = Twistd(["node"], env=self.env)
        self.node_unix = self.node.listening()[0]

    def call(self, method, params, timeout=30):
        """A node method through ``explorer.call``; its result."""
        return result(
            self.explorer_unix,
            "explorer.call",
            {"node_id": self.node_id, "method": method, "params": params},
            timeout,
        )

    @property
    def path(self):
        """The VM's console path on the explorer."""
        return f"/v1/nodes/{self.node_id}/vms/{self.vm_id}/console"

    def log(self, count=None):
        """``vm.console_log``'s result."""
        params = {"vm_id": self.vm_id}
        if count is not None:
            params["bytes"] = count
        return self.call("vm.console_log", params)

    def close(self):
        """Kill the VM's QEMU and stop both processes."""
        try:
            pid = int(open(f"{self.vm_dir}/qemu.pid").read())
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, AttributeError):
            pass
        if self.node is not None:
            self.node.stop()
        self.explorer.stop()


@pytest.fixture(scope="module")
def fleet(guest):
    """The module's explorer, node and running guest, its boot finished."""
    if "boot" not in [p.name for p in load_schema("node").methods["vm.create"].params]:
        pytest.skip("direct kernel boot (vm.create boot, the vm-access branch) is needed")
    home = make_short_tmp("hcc-")
    fleet = Fleet(home, guest)
    try:
        wait_for(
            lambda: "hero-guest: ready" in fleet.log()["data"],
            timeout=BOOT,
            interval=0.5,
            what="the guest's ready line",
        )
        yield fleet
    finally:
        fleet.close()
        remove_tmp(home)


def shell(client, command, expect, timeout=ANSWER):
    """Type ``command`` on the console and read until ``expect`` comes back."""
    start = len(client.received)
    client.send(command.encode() + b"\n")
    return client.read_until(expect.encode(), timeout=timeout, start=start)


def test_console_log_shows_the_boot(fleet):
    """vm.console_log through the explorer holds the guest's boot, and counts it all."""
    log = fleet.log()
    assert "Linux version" in log["data"] or "hero-guest" in log["data"]
    assert "hero-guest: ready" in log["data"]
    assert log["size"] >= len(log["data"].encode())
    # The guest may print between two calls: the short tail is found in a later log.
    tail = fleet.log(10)
    assert len(tail["data"]) <= 10 and tail["size"] >= log["size"]
    assert tail["data"] in fleet.log()["data"]


def test_type_a_command_through_the_explorer(fleet):
    """A command typed through the explorer's WebSocket (Unix and TCP listeners) runs in
    the guest, and its output comes back."""
    for uri in (fleet.explorer_unix, fleet.explorer_tcp):
        client = WsClient(uri, fleet.path, timeout=ANSWER)
        try:
            shell(client, "echo hc-$((6*7))-ok", "hc-42-ok")
        finally:
            client.close()


def test_two_viewers_both_see_output(fleet):
    """Two viewers attached at once both see what one of them makes the guest print; the
    node's own endpoint serves a viewer too."""
    one = WsClient(fleet.explorer_unix, fleet.path, timeout=ANSWER)
    two = WsClient(fleet.explorer_tcp, fleet.path, timeout=ANSWER)
    direct = WsClient(fleet.node_unix, f"/v1/vms/{fleet.vm_id}/console", timeout=ANSWER)
    try:
        start = len(two.received)
        shell(one, "echo both-$((40+2))", "both-42")
        two.read_until(b"both-42", start=start)
        direct.read_until(b"both-42")
    finally:
        for client in (one, two, direct):
            client.close()


def test_limits_and_not_found(fleet):
    """Beyond NODE_MAX_CONSOLES the upgrade is 429 (through the explorer as on the node);
    an unknown VM or node is 404, an unreachable node 502; a place freed is taken."""
    clients = [WsClient(fleet.explorer_unix, fleet.path) for _ in range(MAX_CONSOLES)]
    try:
        assert refusal(fleet.explorer_unix, fleet.path) == 429
        assert refusal(fleet.node_unix, f"/v1/vms/{fleet.vm_id}/console") == 429
        clients.pop().close()
        wait_for(
            lambda: refusal(fleet.explorer_tcp, fleet.path) is None,
            what="a freed console place",
        )
    finally:
        for client in clients:
            client.close()
    assert (
        refusal(fleet.explorer_unix, f"/v1/nodes/{fleet.node_id}/vms/nope/console") == 404
    )
    assert (
        refusal(fleet.explorer_unix, f"/v1/nodes/nobody/vms/{fleet.vm_id}/console") == 404
    )
    assert refusal(fleet.node_unix, "/v1/vms/nope/console") == 404
    ghost = f"{fleet.home}/ghost.sock"
    result(
        fleet.explorer_unix,
        "explorer.heartbeat",
        {"node_id": "ghost", "socket_path": f"unix://{ghost}"},
    )
    assert refusal(fleet.explorer_unix, f"/v1/nodes/ghost/vms/{fleet.vm_id}/console") == 502


def test_non_reading_viewer_is_dropped(fleet):
    """A viewer that stops reading is dropped once HERO_MAX_UNSENT bytes wait for it,
    while another keeps working and the VM keeps running; the log file stays within
    NODE_CONSOLE_LOG and is 0600."""
    # Over Unix the kernel holds about 200 KiB for a peer that does not read; over
    # loopback TCP it would hold megabytes (the sender's buffer grows regardless).
    slow = WsClient(fleet.explorer_unix, fleet.path, timeout=ANSWER, rcvbuf=4096)
    fast = WsClient(fleet.explorer_tcp, fleet.path, timeout=ANSWER)
    try:
        shell(
            fast, "yes hero-console-flood | head -c 500000; echo flood-$((1+1))", "flood-2"
        )
        assert slow.wait_closed(timeout=10), "the slow viewer was not dropped"
        assert len(slow.received) < 500000
        shell(fast, "echo still-$((3*3))", "still-9")
    finally:
        slow.sock.close()
        fast.close()
    assert fleet.call("vm.get", {"vm_id": fleet.vm_id})["state"] == "running"
    path = f"{fleet.vm_dir}/console.log"
    assert os.path.getsize(path) <= LOG_SIZE + 24
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    log = fleet.log(LOG_SIZE)
    assert log["size"] > 500000 and "still-9" in log["data"]
    too_many = rpc(
        fleet.explorer_unix,
        "explorer.call",
        {
            "node_id": fleet.node_id,
            "method": "vm.console_log",
            "params": {"vm_id": fleet.vm_id, "bytes": LOG_SIZE + 1},
        },
    )
    assert too_many["error"]["code"] == -32602 and "bytes" in too_many["error"]["message"]


def test_cli_console_and_log(fleet):
    """``vm console`` sends what is typed and prints the guest's answer, Ctrl-] detaches
    with status 0; ``vm log`` prints the end of the output."""
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": ROOT,
        "HOME": fleet.home,
    }
    cli = [sys.executable, "-m", "hero_compute.cli", "--explorer", fleet.explorer_unix]
    process = subprocess.Popen(
        [*cli, "vm", "console", fleet.node_id, "console"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    out = b""
    try:
        process.stdin.write(b"echo cli-$((2+3))-ok\n")
        process.stdin.flush()
        deadline = time.monotonic() + ANSWER
        while b"cli-5-ok" not in out and time.monotonic() < deadline:
            ready, _, _ = select.select([process.stdout], [], [], 1)
            if ready:
                chunk = os.read(process.stdout.fileno(), 65536)
                if not chunk:
                    break
                out += chunk
        process.stdin.write(b"\x1d")
        process.stdin.flush()
        rest, err = process.communicate(timeout=30)
        out += rest
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert b"cli-5-ok" in out
    done = subprocess.run(
        [*cli, "vm", "log", fleet.node_id, fleet.vm_id, "--bytes", "2000"],
        capture_output=True,
        env=env,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert b"cli-5-ok" in done.stdout


def test_node_restart_keeps_log_and_console(fleet):
    """A node restarted while QEMU runs keeps the log (and its count), takes the serial
    port back, and a new attach through the explorer works."""
    before = fleet.log()
    assert fleet.node.stop() == -signal.SIGTERM
    fleet.start_node()
    wait_for(
        lambda: fleet.call("vm.get", {"vm_id": fleet.vm_id})["state"] == "running",
        timeout=30,
        what="the VM recovered",
    )
    after = fleet.log()
    assert after["size"] >= before["size"]
    assert before["data"][-200:] in after["data"]
    client = wait_for(
        lambda: WsClient(fleet.explorer_unix, fleet.path, timeout=ANSWER),
        timeout=30,
        what="a console after the restart",
    )
    try:
        shell(client, "echo again-$((5*5))", "again-25")
    finally:
        client.close()
