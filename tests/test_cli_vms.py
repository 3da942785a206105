"""
``hero-compute vm ...`` against a real explorer and a real node running tiny QEMU VMs
(1 vCPU, 64M, 1G, no image: SeaBIOS boots nothing and ignores ACPI, so a graceful stop
waits out the node's whole 30 s grace period).
"""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from .support import result, wait_for
from .test_cli import cli, cli_tty

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(
        not (shutil.which("qemu-system-x86_64") and shutil.which("qemu-img")),
        reason="qemu-system-x86_64 and qemu-img are not installed",
    ),
]

TINY = ["--vcpus", "1", "--memory", "64M", "--disk", "1G"]


@pytest.fixture
def fleet(twistd, short_tmp):
    """An explorer and one node ``n1`` online; yields the CLI's environment."""
    env = {"HERO_SOCKET_DIR": short_tmp}
    (euri,) = twistd(["explorer"], env=env).listening()
    state = f"{short_tmp}/st"
    twistd(
        [
            "node",
            "--socket",
            f"{short_tmp}/n.sock",
            "--explorer",
            euri,
            "--interval",
            "0.5",
            "--state-dir",
            state,
            "--node-id",
            "n1",
        ],
        env=env,
    )
    wait_for(
        lambda: result(euri, "explorer.list_nodes", {"status": "online"}),
        what="node online",
    )
    yield env
    pids = subprocess.run(
        ["pgrep", "-f", f"qemu-system-x86_64.*{state}"], capture_output=True, text=True
    ).stdout.split()
    for pid in pids:
        os.kill(int(pid), signal.SIGKILL)


def test_vm_lifecycle(fleet):
    """create with sizes, list, start --wait, show by name, stop --wait --force, delete."""
    code, out, err = cli("vm", "create", "n1", "--name", "web", *TINY, env=fleet)
    assert code == 0, err
    vm = json.loads(out)
    assert (vm["state"], vm["memory_mb"], vm["disk_gb"]) == ("stopped", 64, 1)
    code, out, _ = cli("vm", "list", "n1", env=fleet)
    assert [v["name"] for v in json.loads(out)] == ["web"]
    code, out, _ = cli("vm", "list", env=fleet)
    assert [(v["node_id"], v["name"]) for v in json.loads(out)] == [("n1", "web")]
    code, out, err = cli("vm", "start", "n1", "web", "--wait", env=fleet)
    assert code == 0 and json.loads(out)["state"] == "running", err
    code, out, _ = cli_tty("vm", "show", "n1", "web", env=fleet)
    assert code == 0 and "running" in out and vm["vm_id"] in out
    code, _, err = cli("vm", "start", "n1", vm["vm_id"], env=fleet)
    assert code == 1 and "-32005" in err
    started = time.monotonic()
    code, out, err = cli("vm", "stop", "n1", "web", "--wait", "--force", env=fleet)
    assert code == 0 and json.loads(out)["state"] == "stopped", err
    assert time.monotonic() - started < 15
    code, out, _ = cli("vm", "delete", "n1", "web", "--wait", env=fleet)
    assert code == 0 and json.loads(out) is True
    code, _, err = cli("vm", "show", "n1", "web", env=fleet)
    assert code == 3 and "no VM with id or name 'web'" in err


def test_graceful_stop_waits_past_grace(fleet):
    """A graceful stop --wait outlasts the node's 30 s grace and ends stopped, exit 0."""
    code, out, err = cli(
        "vm", "create", "n1", "--name", "slow", *TINY, "--start", "--wait", env=fleet
    )
    assert code == 0 and json.loads(out)["state"] == "running", err
    started = time.monotonic()
    code, out, err = cli("vm", "stop", "n1", "slow", "--wait", env=fleet, timeout=120)
    assert code == 0 and json.loads(out)["state"] == "stopped", err
    assert 25 < time.monotonic() - started < 45
