"""
Base images that try to hang the node: a file that never ends, named by an image.
"""

import os
import shutil
import subprocess
import threading
import time

import pytest

from .support import result, rpc, wait_for


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
def test_an_image_naming_a_fifo_cannot_hang_the_node(twistd, short_tmp):
    """A VMDK in the image directory whose extent is a FIFO (qemu-img blocks on it for
    ever) is refused at vm.create within the tool's deadline, node.images still
    answers, the node serves meanwhile, and no qemu-img is left running."""
    state = f"{short_tmp}/st"
    images = f"{state}/images"
    os.makedirs(images)
    fifo = f"{short_tmp}/never"
    os.mkfifo(fifo)
    with open(f"{images}/fifo.vmdk", "w") as f:
        f.write(
            "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
            f'createType="monolithicFlat"\nRW 8 FLAT "{fifo}" 0\n'
        )
    node = twistd(
        ["node", "--socket", f"{short_tmp}/n.sock", "--state-dir", state],
        env={"HOME": short_tmp},
    )
    uri = node.listening()[0]
    vm = {"name": "vm", "vcpus": 1, "memory_mb": 64, "disk_gb": 1}
    outcome = {}
    # vm.create and node.images each wait out the tool's deadline on the FIFO: made
    # together, they wait it out once.
    create = threading.Thread(
        target=lambda: outcome.update(
            answer=rpc(uri, "vm.create", {**vm, "image": f"{images}/fifo.vmdk"}, 60)
        )
    )
    images_listed = threading.Thread(
        target=lambda: outcome.update(listed=result(uri, "node.images", timeout=60))
    )
    started = time.monotonic()
    create.start()
    images_listed.start()
    # While qemu-img is blocked, the node answers others at once.
    assert result(uri, "node.info")["node_id"]
    create.join(60)
    images_listed.join(60)
    assert outcome["answer"]["error"]["code"] == -32602, outcome
    assert "could not be read within" in outcome["answer"]["error"]["message"]
    assert time.monotonic() - started < 30
    listed = {i["name"]: i for i in outcome["listed"]}
    assert listed["fifo.vmdk"]["format"] is None
    assert result(uri, "vm.list") == []
    left = subprocess.run(["pgrep", "-f", fifo], capture_output=True, text=True)
    assert left.stdout == "", left.stdout


@pytest.mark.qemu
@pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None,
    reason="needs qemu-system-x86_64 and qemu-img",
)
def test_a_base_image_swapped_after_create_is_refused_at_start(twistd, short_tmp):
    """A clean base that is rewritten in place after vm.create into one naming another
    file as its backing file (the node's TLS key, say) is refused at the next vm.start
    with -32010: no QEMU runs, the VM stays stopped, the node serves on."""
    state = f"{short_tmp}/st"
    images = f"{state}/images"
    os.makedirs(images)
    base = f"{images}/base.qcow2"
    secret = f"{short_tmp}/secret"
    with open(secret, "wb") as f:
        f.write(b"-----BEGIN PRIVATE KEY-----\n" + b"k" * 4096)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "16M"], check=True)
    node = twistd(
        ["node", "--socket", f"{short_tmp}/n.sock", "--state-dir", state],
        env={"HOME": short_tmp},
    )
    uri = node.listening()[0]
    vm = result(
        uri,
        "vm.create",
        {"name": "vm", "vcpus": 1, "memory_mb": 64, "disk_gb": 1, "image": base},
        60,
    )
    vm_id = vm["vm_id"]

    def qemu_running():
        done = subprocess.run(
            ["pgrep", "-f", f"qemu-system-x86_64.*{state}"], capture_output=True, text=True
        )
        return done.stdout.split()

    try:
        # The clean base starts: what refuses below is the swap, nothing else.
        assert result(uri, "vm.start", {"vm_id": vm_id}, 60)["state"] == "running"
        assert qemu_running()
        result(uri, "vm.stop", {"vm_id": vm_id, "force": True}, 60)
        wait_for(lambda: not qemu_running(), timeout=30, what="QEMU gone")
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", secret, "-F", "raw"]
            + [base, "16M"],
            check=True,
        )
        answer = rpc(uri, "vm.start", {"vm_id": vm_id}, 60)
        assert answer["error"]["code"] == -32010, answer
        assert "backing file" in answer["error"]["message"]
        assert not qemu_running()
        assert result(uri, "vm.get", {"vm_id": vm_id})["state"] == "stopped"
        assert result(uri, "node.info")["node_id"]
    finally:
        for pid in qemu_running():
            os.kill(int(pid), 9)
