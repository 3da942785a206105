"""
The boot section (issues 19 and 23): boot to SSH through a node vs plain QEMU, the same
test guest (``tests/guest.py``) under TCG with the same NoCloud seed.  Goal: the node's
median at most 1.25 times plain QEMU's.

Through the node: a real ``twistd node`` (``NODE_ACCEL=tcg``) with one VM defined once
(``ssh_keys``, ``boot`` {kernel, initrd}, a 22 forward); each round times ``vm.start``
until ``ssh -p <forward> root@127.0.0.1 true`` succeeds, then stops the VM (so the
node's seed writing, QEMU's daemonizing and the QMP handshake all count).  Plain: QEMU
with the same kernel, initramfs, command line, memory, CPUs and disk, the seed written
beforehand by the node's own seed writer with the same instance id, host name and key,
and a ``hostfwd`` on a loopback port; timed from its start until the same ``ssh``
succeeds.  Rounds alternate (node, plain, node, plain, ...) so that a change in the
machine's load weighs on both.  SSH is tried every :data:`POLL` s, at most
:data:`BOUND` s a boot.
"""

import os
import signal
import statistics
import subprocess
import sys
import time

from procs import ROOT, log, rpc, twistd_cmd, wait_for

#: The goal: node median / plain QEMU median.
GOAL = 1.25
#: Seconds between SSH attempts, and the most a boot may take.
POLL = 0.1
BOUND = 120.0
VM = {"name": "boot", "vcpus": 1, "memory_mb": 256, "disk_gb": 1}


def _tests():
    """The test guest's module, imported from the tree (as the console section does)."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from tests import guest

    return guest


def _until_ssh(guest_mod, key, port, began):
    """Seconds from ``began`` until ``ssh ... true`` into ``port`` succeeds."""
    argv = guest_mod.ssh_argv(key, port) + ["true"]
    # ConnectTimeout bounds the TCP connect only; a handshake stalled in a booting guest
    # is bounded by the subprocess timeout.
    argv[argv.index("ConnectTimeout=5")] = "ConnectTimeout=2"
    while True:
        tried = time.monotonic()
        try:
            run = subprocess.run(argv, capture_output=True, timeout=10)
            if run.returncode == 0:
                return time.monotonic() - began
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if now - began > BOUND:
            raise RuntimeError(f"no SSH into port {port} within {BOUND:g} s")
        time.sleep(max(0.0, POLL - (now - tried)))


def _kill_vm_qemus(state):
    """SIGKILL every QEMU the node started under ``state`` (its ``qemu.pid`` files),
    for when the node could not stop them: QEMU is daemonized, not our child."""
    vms = os.path.join(state, "vms")
    for vm_id in os.listdir(vms) if os.path.isdir(vms) else ():
        try:
            with open(os.path.join(vms, vm_id, "qemu.pid")) as f:
                pid = int(f.read().split()[0])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"qemu" not in f.read():
                    continue
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass


def _node_round(guest_mod, sock, vm_id, key, port):
    began = time.monotonic()
    rpc(sock, "vm.start", {"vm_id": vm_id}, timeout=90)
    try:
        return _until_ssh(guest_mod, key, port, began)
    finally:
        rpc(sock, "vm.stop", {"vm_id": vm_id, "force": True}, timeout=30)


def _plain_round(procs, guest_mod, guest, seed_iso, disk, key, n):
    port = guest_mod.free_port()
    argv = guest.qemu_argv(seed=seed_iso)
    argv[argv.index("user,id=n0")] = f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22"
    # The node's VM has a qcow2 disk too: the guest sees the same devices.
    argv += ["-smp", "1", "-drive", f"file={disk},format=qcow2,if=virtio"]
    began = time.monotonic()
    qemu = procs.start(["qemu-system-x86_64", *argv], f"boot-plain-{n}")
    try:
        return _until_ssh(guest_mod, key, port, began)
    finally:
        procs.stop(qemu, signal.SIGKILL)


def sec_boot(procs, tmp, res, cfg):
    """Boot to SSH through the node vs plain QEMU."""
    guest_mod = _tests()
    from hero_compute.node.qemu import seed

    guest = guest_mod.build_guest()
    rounds = cfg["boot_rounds"]
    keydir = os.path.join(tmp, "boot-key")
    os.makedirs(keydir)
    key, public = guest_mod.ssh_key(keydir)
    sock = os.path.join(tmp, "boot-node.sock")
    state = os.path.join(tmp, "boot-node-state")
    # Unpinned, like plain QEMU: the node's QEMU inherits its affinity.
    node = procs.start(
        twistd_cmd()
        + ["-n", "--pidfile=", "node", "--socket", sock]
        + ["--state-dir", state, "--node-id", "boot-node"],
        "boot-node",
        env={"NODE_ACCEL": "tcg", "NODE_IMAGE_DIRS": guest.directory},
    )
    times = {"node": [], "plain": []}
    try:
        wait_for(node.logpath, r"listening on unix://", proc=node)
        vm = rpc(
            sock,
            "vm.create",
            dict(
                VM,
                ssh_keys=[public],
                boot={"kernel": guest.kernel, "initrd": guest.initrd},
            ),
        )
        vm_id = vm["vm_id"]
        port = vm["network"]["ports"][0]["host"]
        seed_iso = os.path.join(tmp, "boot-seed.iso")
        seed.write_seed(seed_iso, vm_id, vm["hostname"], [public], None)
        disk = os.path.join(tmp, "boot-disk.qcow2")
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", disk, f"{VM['disk_gb']}G"],
            check=True,
        )
        for n in range(rounds):
            times["node"].append(_node_round(guest_mod, sock, vm_id, key, port))
            times["plain"].append(
                _plain_round(procs, guest_mod, guest, seed_iso, disk, key, n)
            )
            log(
                f"boot round {n + 1}/{rounds}: node {times['node'][-1]:.2f} s, "
                f"plain {times['plain'][-1]:.2f} s"
            )
    finally:
        try:
            procs.stop(node)
        finally:
            _kill_vm_qemus(state)
    medians, rows = {}, {}
    for name, label in (("node", "through the node"), ("plain", "plain QEMU")):
        medians[name] = statistics.median(times[name])
        rows[name] = res.add(
            "boot",
            f"boot to SSH, {label} (TCG)",
            None,
            round(medians[name] * 1000, 1),
            round(max(times[name]) * 1000, 1),
            rounds=rounds,
            runs_s=[round(t, 2) for t in times[name]],
        )
    ratio = medians["node"] / medians["plain"]
    met = ratio <= GOAL
    res.goal(
        "boot",
        f"{ratio:.2f}x (medians of {rounds} rounds each: node {medians['node']:.2f} s, "
        f"plain QEMU {medians['plain']:.2f} s)",
        met,
        row=rows["node"],
        goal=GOAL,
    )
    log(f"boot: node / plain {ratio:.2f} ({'MET' if met else 'MISS'} <= {GOAL:g})")
    res.note(
        "boot: the test guest (kernel + busybox/dropbear initramfs) under TCG, 256 MB, "
        "1 vCPU, a 1 GB qcow2 disk and the same NoCloud seed; from vm.start (node) or "
        f"QEMU's start (plain) until `ssh root@127.0.0.1 true` through the forward "
        f"succeeds, tried every {POLL * 1000:g} ms; rounds alternate node/plain; p50 = "
        "median ms, p99 column = slowest round ms"
    )
