"""
The test guest itself (tests/guest.py), with plain QEMU and no node: it reads a NoCloud
seed written by the node's seed module and lets in the key it names.
"""

import os
import socket
import subprocess

from hero_compute.node.qemu import seed

from .support import make_short_tmp, remove_tmp, wait_for


def free_port():
    """:return: a TCP port on 127.0.0.1 that was free a moment ago"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ssh_key(directory):
    """
    :param directory: where to put the key pair
    :return: ``(private key path, public key line)`` of a new ed25519 key
    """
    path = os.path.join(directory, "id_ed25519")
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", path],
        check=True,
    )
    with open(path + ".pub") as f:
        return path, f.read().strip()


def ssh_argv(key, port, host="127.0.0.1"):
    """
    :return: an ``ssh`` command line for ``root`` on a forwarded port, non-interactive
        and trusting the guest's new host key
    """
    return [
        "ssh",
        "-i",
        key,
        "-p",
        str(port),
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "ConnectTimeout=5",
        "-o",
        "LogLevel=ERROR",
        f"root@{host}",
    ]


def ssh_until(key, port, command, timeout=60.0):
    """
    Run ``command`` in the guest over SSH, retrying while the guest boots.

    :return: the completed process of the first successful attempt
    """
    done = []

    def attempt():
        run = subprocess.run(
            [*ssh_argv(key, port), command], capture_output=True, timeout=20
        )
        if run.returncode == 0:
            done.append(run)
        return bool(done)

    wait_for(attempt, timeout=timeout, interval=0.5, what=f"ssh to port {port}")
    return done[0]


def test_guest_boots_with_seed_and_lets_the_key_in(guest):
    """The guest reads the seed's host name and key, and SSH into it runs a command."""
    tmp = make_short_tmp()
    try:
        key, public = ssh_key(tmp)
        iso = os.path.join(tmp, "seed.iso")
        seed.write_seed(iso, "vm-guest-test", "plain-guest", [public], None)
        port = free_port()
        argv = guest.qemu_argv(seed=iso)
        argv[argv.index("user,id=n0")] = f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22"
        console = open(os.path.join(tmp, "console.log"), "wb")
        qemu = subprocess.Popen(
            ["qemu-system-x86_64", *argv], stdout=console, stderr=subprocess.STDOUT
        )
        try:
            run = ssh_until(key, port, "hostname; cat /proc/cmdline")
            assert run.stdout.decode().splitlines()[0] == "plain-guest"
            with open(os.path.join(tmp, "console.log"), "rb") as f:
                assert guest.ready_line in f.read()
        finally:
            qemu.kill()
            qemu.wait()
            console.close()
    finally:
        remove_tmp(tmp)
