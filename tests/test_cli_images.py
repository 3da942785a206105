"""
``hero-compute image ...`` against a real explorer and node, pulling from a local HTTP
server on loopback (``NODE_IMAGE_FETCH_LOCAL=1``).
"""

import json
import os
import pty
import subprocess
import threading

import pytest

from .image_server import CHUNK, ImageServer, sha256
from .support import result, wait_for
from .test_cli import CLI, ROOT, cli


@pytest.fixture
def fleet(twistd, short_tmp):
    """An explorer, one node ``n1`` online and an image server; yields (env, server)."""
    env = {"HERO_SOCKET_DIR": short_tmp}
    (euri,) = twistd(["explorer"], env=env).listening()
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
            f"{short_tmp}/st",
            "--node-id",
            "n1",
        ],
        env={**env, "NODE_IMAGE_FETCH_LOCAL": "1"},
    )
    wait_for(lambda: result(euri, "explorer.list_nodes", {"status": "online"}))
    server = ImageServer(
        {"disk.raw": os.urandom(3 * CHUNK), "slow": os.urandom(16 * CHUNK)}
    )
    yield env, server
    server.close()


def test_pull_then_list(fleet, short_tmp):
    """image pull waits until the image is ready and prints it; image list shows it;
    a wrong digest exits 1 with the node's reason."""
    env, server = fleet
    data = server.files["disk.raw"]
    url = server.url("f", "disk.raw")
    code, out, err = cli(
        "image", "pull", "n1", url, "--sha256", sha256(data), "--name", "d", env=env
    )
    assert code == 0, err
    image = json.loads(out)
    assert image["state"] == "ready" and image["size_bytes"] == len(data)
    assert image["path"] == f"{short_tmp}/st/images/d"
    code, out, _ = cli("image", "list", "n1", env=env)
    assert code == 0 and [i["name"] for i in json.loads(out)] == ["d"]
    code, out, _ = cli("image", "list", "n1", "--table", env=env)
    assert code == 0 and "NAME" in out and "ready" in out and "raw" in out
    code, out, err = cli(
        "image", "pull", "n1", url, "--sha256", "0" * 64, "--name", "e", env=env
    )
    assert code == 1 and "pulling e failed: wrong digest" in err, (out, err)
    code, _, err = cli(
        "image", "pull", "n1", url, "--sha256", "0" * 64, "--name", "d", env=env
    )
    assert code == 1 and "exists already" in err
    code, _, err = cli(
        "image", "pull", "n1", url, "--sha256", "xyz", "--name", "f", env=env
    )
    assert code == 64 and "64 hex digits" in err


def test_pull_shows_progress_on_a_terminal(fleet):
    """On a terminal, image pull shows a progress bar (bytes of the announced total)
    while a slow server streams, then the ready image."""
    env, server = fleet
    data = server.files["slow"]
    master, slave = pty.openpty()
    process = subprocess.Popen(
        [
            *CLI,
            "image",
            "pull",
            "n1",
            server.url("slow", "slow"),
            "--sha256",
            sha256(data),
            "--name",
            "s",
        ],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        env={"PYTHONPATH": ROOT, "PATH": "/usr/bin:/bin", "TERM": "xterm", **env},
    )
    os.close(slave)
    chunks = []
    seen = threading.Event()

    def read():
        while True:
            try:
                piece = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                return
            if not piece:
                return
            chunks.append(piece)
            if b"0.2/1.0 MiB" in b"".join(chunks):
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    server.release(4)
    assert seen.wait(20), b"".join(chunks)
    server.release(12)
    assert process.wait(30) == 0
    reader.join(5)
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert "pulling s" in text and "0.2/1.0 MiB" in text, text
    assert "ready" in text
