"""
Getting into a VM (CONTRACT §8), with real twistd processes, real QEMU and the real test
guest (tests/guest.py): SSH keys through the NoCloud seed, nat port forwards, direct
kernel boot, bridge mode with a real bridge and tap in a network namespace, and every bad
input refused with nothing left behind.
"""

import json
import os
import shutil
import signal
import socket
import subprocess

import pytest

from .guest import ssh_argv, ssh_key, ssh_until
from .support import result, rpc, wait_for
from .test_cli import cli

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None,
        reason="qemu-system-x86_64 is not installed",
    ),
    pytest.mark.skipif(shutil.which("ssh") is None, reason="ssh is not installed"),
]


def qemu_pids(state_dir):
    """Pids of QEMU processes whose command line mentions the state dir."""
    done = subprocess.run(
        ["pgrep", "-f", f"qemu-system-x86_64.*{state_dir}"], capture_output=True, text=True
    )
    return {int(p) for p in done.stdout.split()}


@pytest.fixture
def fleet(twistd, short_tmp, guest):
    """
    An explorer and a node on Unix sockets; the node's image directories are its own
    and the guest's.  ``fleet.node(env=..., netns=...)`` starts the node (again);
    every QEMU under its state dir is killed at the end.
    """

    class Fleet:
        state = f"{short_tmp}/st"
        images = f"{short_tmp}/images"
        keys = f"{short_tmp}/keys"
        euri = f"unix://{short_tmp}/e.sock"
        nuri = f"unix://{short_tmp}/n.sock"
        node_id = "node-access"
        process = None

        def node(self, env=None, netns=None):
            full = {
                "NODE_IMAGE_DIRS": f"{self.images}:{guest.directory}",
                "NODE_ACCEL": "tcg",
            }
            full.update(env or {})
            self.process = twistd(
                [
                    "node",
                    "--socket",
                    f"{short_tmp}/n.sock",
                    "--explorer",
                    self.euri,
                    "--interval",
                    "0.5",
                    "--node-id",
                    self.node_id,
                    "--state-dir",
                    self.state,
                ],
                env=full,
                netns=netns,
            )
            # Generous: a loaded machine (the whole suite on 2 cores) starts slowly.
            self.process.listening(timeout=60)
            return self.process

        def call(self, method, **params):
            """A node method through ``explorer.call``; the JSON-RPC response."""
            return rpc(
                self.euri,
                "explorer.call",
                {"node_id": self.node_id, "method": method, "params": params},
                timeout=60,
            )

        def ok(self, method, **params):
            response = self.call(method, **params)
            assert "error" not in response, response
            return response["result"]

    fleet = Fleet()
    os.makedirs(fleet.images)
    os.makedirs(fleet.keys)
    explorer = twistd(["explorer", "--socket", f"{short_tmp}/e.sock"])
    explorer.listening(timeout=60)
    yield fleet
    for pid in qemu_pids(fleet.state):
        os.kill(pid, signal.SIGKILL)


def wait_online(fleet):
    """Wait until the explorer lists the node online."""
    wait_for(
        lambda: result(fleet.euri, "explorer.list_nodes", {"status": "online"}),
        what="node online",
    )


def fingerprint(public_key_file):
    """:return: ``SHA256:...`` as ``ssh-keygen -l`` prints it"""
    out = subprocess.run(
        ["ssh-keygen", "-l", "-f", public_key_file], capture_output=True, text=True
    )
    return out.stdout.split()[1]


def test_ssh_into_a_vm_created_through_the_explorer(fleet, guest):
    """A VM created through the explorer with a key and the guest's kernel answers SSH
    on its forwarded port, with its host name and the caller's user data in its seed."""
    fleet.node()
    wait_online(fleet)
    key, public = ssh_key(fleet.keys)
    vm = fleet.ok(
        "vm.create",
        name="Access_1",
        vcpus=1,
        memory_mb=256,
        disk_gb=1,
        ssh_keys=[public],
        user_data="#!/bin/sh\necho from-user-data\n",
        boot={"kernel": guest.kernel, "initrd": guest.initrd},
    )
    assert vm["hostname"] == "access-1"
    assert vm["ssh_keys"] == [fingerprint(key + ".pub")]
    assert vm["boot"] == {
        "kernel": guest.kernel,
        "initrd": guest.initrd,
        "cmdline": "console=ttyS0",
    }
    network = vm["network"]
    assert network["mode"] == "nat" and network["mac"].startswith("52:54:00:")
    [forward] = network["ports"]
    assert forward["guest"] == 22 and forward["protocol"] == "tcp"
    assert forward["address"] == "127.0.0.1" and 20000 <= forward["host"] <= 29999
    assert "user_data" not in vm and "from-user-data" not in json.dumps(vm)
    assert fleet.ok("vm.get", vm_id=vm["vm_id"]) == vm

    assert fleet.ok("vm.start", vm_id=vm["vm_id"])["state"] == "running"
    run = ssh_until(key, forward["host"], "hostname; cat /seed/user-data")
    lines = run.stdout.decode().splitlines()
    assert lines[0] == "access-1"
    assert "echo from-user-data" in lines
    assert any(public in line for line in lines)
    mac = ssh_until(key, forward["host"], "cat /sys/class/net/eth0/address")
    assert mac.stdout.decode().strip() == network["mac"]

    fleet.ok("vm.stop", vm_id=vm["vm_id"], force=True)
    refused = subprocess.run(
        [*ssh_argv(key, forward["host"]), "true"], capture_output=True, timeout=30
    )
    assert refused.returncode != 0
    # The port is the VM's for good: the same after a restart.
    again = fleet.ok("vm.start", vm_id=vm["vm_id"])
    assert again["network"] == network
    assert ssh_until(key, forward["host"], "hostname").stdout.strip() == b"access-1"


def bad_creates(guest, taken, outside):
    """``(params, code, field)``: every bad access param of vm.create and its answer."""
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDc5le9pF9mSde/gwHBOdRagrPLLx7GaMl5+hqxUpmbU"
    return [
        ({"ssh_keys": ["not a key"]}, -32602, "ssh_keys"),
        ({"ssh_keys": ["ssh-ed25519 !!!notbase64"]}, -32602, "ssh_keys"),
        ({"ssh_keys": ["ssh-rsa " + key.split()[1]]}, -32602, "ssh_keys"),
        ({"ssh_keys": [key] * 33}, -32602, "ssh_keys"),
        ({"ssh_keys": [key + " " + "c" * 8200]}, -32602, "ssh_keys.0"),
        ({"user_data": "#cloud-config\n" + "x" * 65536}, -32602, "user_data"),
        ({"user_data": "#cloud-config\n" + "é" * 33000}, -32602, "user_data"),
        ({"hostname": "Bad_Host"}, -32602, "hostname"),
        ({"hostname": "-dash"}, -32602, "hostname"),
        ({"network": "wifi"}, -32602, "network"),
        ({"network": "none", "ports": [{"guest": 80}]}, -32602, "ports"),
        ({"ports": [{"guest": 22}, {"guest": 22}]}, -32602, "ports"),
        ({"ports": [{"guest": 0}]}, -32602, "ports.0.guest"),
        ({"ports": [{"guest": 22, "host": outside}]}, -32005, None),
        ({"ports": [{"guest": 22, "host": taken}]}, -32005, None),
        ({"network": "bridge:br-not-listed"}, -32010, None),
        ({"boot": {"kernel": "/etc/hostname"}}, -32010, None),
        ({"boot": {"kernel": guest.kernel, "initrd": "/etc/passwd"}}, -32010, None),
        ({"boot": {"kernel": guest.kernel, "cmdline": "x" * 4097}}, -32602, "boot.cmdline"),
        ({"boot": {"kernel": guest.kernel, "cmdline": "é" * 2100}}, -32602, "boot.cmdline"),
        ({"boot": {"initrd": guest.initrd}}, -32602, "boot.kernel"),
    ]


def test_bad_access_params_are_refused_and_leave_nothing(fleet, guest):
    """Every bad key, user data, host name, network, port and boot file is refused with
    its code, naming the param, and no VM, directory or file is left behind."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        low, high = taken - 5, taken + 5
        fleet.node(env={"NODE_VM_PORTS": f"{low}-{high}"})
        wait_online(fleet)
        base = {"name": "bad", "vcpus": 1, "memory_mb": 64, "disk_gb": 1}
        for params, code, field in bad_creates(guest, taken, high + 1):
            response = fleet.call("vm.create", **base, **params)
            assert response.get("error", {}).get("code") == code, (params, response)
            if field is not None:
                error = response["error"]
                assert field in error["message"] or error.get("data", {}).get("field") == (
                    field
                ), (params, error)
            assert fleet.ok("vm.list") == []
            assert os.listdir(f"{fleet.state}/vms") == []
        # The node still serves, and the same name with good params works.
        assert fleet.ok("vm.create", **base)["name"] == "bad"


def test_vm_without_network_or_image_runs_the_kernel(fleet, guest):
    """network none gives QEMU no NIC; a VM with a kernel and no image runs with an
    empty disk, the kernel and no forwards."""
    process = fleet.node()
    wait_online(fleet)
    vm = fleet.ok(
        "vm.create",
        name="quiet",
        vcpus=1,
        memory_mb=256,
        disk_gb=1,
        network="none",
        hostname="quiet-one",
        boot={"kernel": guest.kernel, "initrd": guest.initrd, "cmdline": "console=ttyS0"},
    )
    assert vm["network"]["ports"] == [] and vm["image"] is None
    fleet.ok("vm.start", vm_id=vm["vm_id"])
    pid = next(iter(qemu_pids(fleet.state)))
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    assert b"-netdev" not in argv and b"-kernel" in argv
    assert process.process.poll() is None


def taps(netns):
    """:return: the names of tap devices (``hc*``) in a namespace"""
    out = subprocess.run(
        ["ip", "-n", netns, "-o", "link", "show"], capture_output=True, text=True
    ).stdout
    return sorted(
        line.split(":")[1].strip().split("@")[0]
        for line in out.splitlines()
        if line.split(":")[1].strip().startswith("hc")
    )


@pytest.mark.netns
def test_bridge_mode_with_a_real_bridge_and_tap(fleet, guest, lab):
    """bridge:<name> puts the VM on a tap on that bridge (SSH to 10.0.2.15 across it);
    the tap is gone after a stop, a kill -9 of QEMU, and a node restart after both
    node and QEMU were killed."""
    lab.add_host("vmh", 21)
    ns = lab.ns("vmh")

    def ip(*args):
        subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True)

    ip("link", "add", "vmbr0", "type", "bridge")
    ip("addr", "add", "10.0.2.2/24", "dev", "vmbr0")
    ip("link", "set", "vmbr0", "up")
    env = {"NODE_VM_BRIDGES": "vmbr0"}
    fleet.node(env=env, netns=ns)
    wait_online(fleet)
    key, public = ssh_key(fleet.keys)
    vm = fleet.ok(
        "vm.create",
        name="bridged",
        vcpus=1,
        memory_mb=256,
        disk_gb=1,
        ssh_keys=[public],
        network="bridge:vmbr0",
        boot={"kernel": guest.kernel, "initrd": guest.initrd},
    )
    assert vm["network"]["mode"] == "bridge:vmbr0" and vm["network"]["ports"] == []
    vm_id = vm["vm_id"]
    tap = "hc" + vm_id[:12]
    inside = ("ip", "netns", "exec", ns)

    fleet.ok("vm.start", vm_id=vm_id)
    assert taps(ns) == [tap]
    master = subprocess.run(
        ["ip", "-n", ns, "-o", "link", "show", "master", "vmbr0"],
        capture_output=True,
        text=True,
    ).stdout
    assert tap in master
    run = ssh_until(key, 22, "hostname", host="10.0.2.15", prefix=inside)
    assert run.stdout.strip() == b"bridged"

    fleet.ok("vm.stop", vm_id=vm_id, force=True)
    assert taps(ns) == []

    # QEMU killed: the node sees QMP go, marks the VM error and removes the tap.
    fleet.ok("vm.start", vm_id=vm_id)
    assert taps(ns) == [tap]
    for pid in qemu_pids(fleet.state):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: taps(ns) == [], what="tap removed after QEMU was killed")
    assert fleet.ok("vm.get", vm_id=vm_id)["state"] == "error"

    # Node and QEMU both killed: the restarted node finds the tap and removes it.
    fleet.ok("vm.start", vm_id=vm_id)
    fleet.process.kill()
    for pid in qemu_pids(fleet.state):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not qemu_pids(fleet.state), what="QEMU gone")
    assert taps(ns) == [tap]
    fleet.node(env=env, netns=ns)
    wait_for(lambda: taps(ns) == [], what="tap removed at node start")
    assert fleet.ok("vm.get", vm_id=vm_id)["state"] == "stopped"
    # And it still works after all that.
    fleet.ok("vm.start", vm_id=vm_id)
    assert ssh_until(key, 22, "hostname", host="10.0.2.15", prefix=inside).returncode == 0
    fleet.ok("vm.stop", vm_id=vm_id, force=True)
    # A bridge that went away: the start fails, the VM stays stopped, no tap is left.
    ip("link", "del", "vmbr0")
    assert fleet.call("vm.start", vm_id=vm_id)["error"]["code"] == -32005
    assert fleet.ok("vm.get", vm_id=vm_id)["state"] == "stopped"
    assert taps(ns) == []
    fleet.ok("vm.delete", vm_id=vm_id)
    assert taps(ns) == []


def test_cli_create_with_key_and_kernel_then_vm_ssh(fleet, guest):
    """hero-compute vm create --ssh-key --kernel --initrd --hostname --port --start,
    then vm ssh NODE VM -- COMMAND runs the command in the guest."""
    fleet.node()
    wait_online(fleet)
    key, _ = ssh_key(fleet.keys)
    env = {"HERO_EXPLORER": fleet.euri}
    code, out, err = cli(
        "--explorer",
        fleet.euri,
        "vm",
        "create",
        fleet.node_id,
        "--name",
        "from-cli",
        "--memory",
        "256M",
        "--disk",
        "1G",
        "--ssh-key",
        key + ".pub",
        "--hostname",
        "cli-guest",
        "--port",
        "22",
        "--port",
        "5353/udp",
        "--kernel",
        guest.kernel,
        "--initrd",
        guest.initrd,
        "--start",
        "--wait",
        env=env,
    )
    assert code == 0, err
    vm = json.loads(out)
    assert vm["state"] == "running" and vm["hostname"] == "cli-guest"
    assert [(p["guest"], p["protocol"]) for p in vm["network"]["ports"]] == [
        (22, "tcp"),
        (5353, "udp"),
    ]
    ssh = ["-l", "root", "-i", key, "-o", "BatchMode=yes"]
    ssh += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
    answers = []

    def attempt():
        code, out, err = cli(
            "--explorer",
            fleet.euri,
            "vm",
            "ssh",
            *ssh,
            fleet.node_id,
            "from-cli",
            "--",
            "hostname",
            env=env,
        )
        answers.append((code, out, err))
        if code != 0:
            raise AssertionError(answers[-1])
        return True

    wait_for(attempt, timeout=60, interval=1, what=f"vm ssh {answers[-1:]}")
    assert answers[-1][1].strip() == "cli-guest"
    # Bad CLI arguments never reach the node.
    code, _, err = cli(
        "--explorer", fleet.euri, "vm", "create", fleet.node_id, "--name", "x",
        "--memory", "64M", "--disk", "1G", "--port", "70000", env=env,
    )  # fmt: skip
    assert code == 64 and "HOST:]GUEST" in err


CLOUD_CONFIG = """\
#cloud-config
write_files:
- path: /run/hero-user-data
  content: seen
"""


@pytest.mark.slow
# The first run on a machine builds the image with debootstrap (about 5 minutes).
@pytest.mark.timeout(1800)
def test_stock_cloud_init_in_debian_12_takes_the_seed(fleet, guest, debian):
    """A real Debian 12 with stock cloud-init (debootstrap, NoCloud only) boots from its
    disk image as the VM's base image, takes the seed's host name and puts the key on
    its default user: ssh debian@ through the forward runs a command."""
    fleet.node(
        env={"NODE_IMAGE_DIRS": f"{fleet.images}:{guest.directory}:{debian.directory}"}
    )
    wait_online(fleet)
    key, public = ssh_key(fleet.keys)
    vm = fleet.ok(
        "vm.create",
        name="debian-12",
        vcpus=1,
        memory_mb=1024,
        disk_gb=debian.size_gb,
        image=debian.image,
        ssh_keys=[public],
        hostname="cloud-one",
        user_data=CLOUD_CONFIG,
        boot={"kernel": guest.kernel, "initrd": guest.initrd, "cmdline": debian.cmdline},
    )
    fleet.ok("vm.start", vm_id=vm["vm_id"])
    port = vm["network"]["ports"][0]["host"]
    answers = []

    def attempt():
        run = subprocess.run(
            [*ssh_argv(key, port, user="debian"), "hostname; cat /run/hero-user-data"],
            capture_output=True,
            timeout=30,
        )
        answers.append(run)
        return run.returncode == 0

    # Tried each second: a guest whose sshd is not up yet refuses at once, and each
    # second more between tries was a second more waited after it came up.
    wait_for(attempt, timeout=600, interval=1, what="ssh debian@ into Debian 12")
    lines = answers[-1].stdout.decode().split()
    assert lines == ["cloud-one", "seen"]


def test_boot_file_swapped_for_a_symlink_is_refused_at_start(fleet, guest):
    """A kernel that lay in an image directory at create but is a symlink out of it at
    start: -32010, and the VM stays stopped."""
    kernel, initrd = guest.copy_to(fleet.images)
    fleet.node()
    wait_online(fleet)
    vm = fleet.ok(
        "vm.create",
        name="swapped",
        vcpus=1,
        memory_mb=64,
        disk_gb=1,
        boot={"kernel": kernel, "initrd": initrd},
    )
    assert vm["boot"]["kernel"] == kernel
    os.unlink(kernel)
    os.symlink("/etc/hostname", kernel)
    assert fleet.call("vm.start", vm_id=vm["vm_id"])["error"]["code"] == -32010
    assert fleet.ok("vm.get", vm_id=vm["vm_id"])["state"] == "stopped"
    assert not qemu_pids(fleet.state)
