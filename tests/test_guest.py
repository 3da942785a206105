"""
The test guest itself (tests/guest.py), with plain QEMU and no node: it reads a NoCloud
seed written by the node's seed module and lets in the key it names.
"""

import os
import subprocess

from hero_compute.node.qemu import seed

from .guest import free_port, ssh_key, ssh_until
from .support import make_short_tmp, remove_tmp


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
