"""
Base images that try to hang the node: a file that never ends, named by an image.
"""

import os
import shutil
import subprocess
import threading
import time

import pytest

from .support import result, rpc


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
    create = threading.Thread(
        target=lambda: outcome.update(
            answer=rpc(uri, "vm.create", {**vm, "image": f"{images}/fifo.vmdk"}, 60)
        )
    )
    started = time.monotonic()
    create.start()
    # While qemu-img is blocked, the node answers others at once.
    assert result(uri, "node.info")["node_id"]
    create.join(60)
    assert outcome["answer"]["error"]["code"] == -32602, outcome
    assert "could not be read within" in outcome["answer"]["error"]["message"]
    assert time.monotonic() - started < 30
    listed = {i["name"]: i for i in result(uri, "node.images", timeout=60)}
    assert listed["fifo.vmdk"]["format"] is None
    assert result(uri, "vm.list") == []
    left = subprocess.run(["pgrep", "-f", fifo], capture_output=True, text=True)
    assert left.stdout == "", left.stdout
