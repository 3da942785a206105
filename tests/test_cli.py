"""
The hero-compute command line against a real explorer.
"""

import json
import subprocess
import sys

from .support import ROOT


def cli(*args, env=None):
    """Run the CLI; returns (exit status, stdout, stderr)."""
    done = subprocess.run([sys.executable, "-m", "hero_compute.cli", *args],
                          capture_output=True, text=True, timeout=30,
                          env={"PYTHONPATH": ROOT, "PATH": "/usr/bin:/bin", **(env or {})})
    return done.returncode, done.stdout, done.stderr


def test_cli_talks_to_explorer(twistd, short_tmp):
    """The CLI reads the default socket from HERO_SOCKET_DIR and maps errors to exit codes."""
    env = {"HERO_SOCKET_DIR": short_tmp}
    explorer = twistd(["explorer"], env=env)
    explorer.listening()
    code, out, _ = cli("info", env=env)
    assert code == 0 and json.loads(out)["nodes"] == {"online": 0, "offline": 0}
    code, out, _ = cli("rpc", "explorer.heartbeat",
                       '{"node_id": "n1", "socket_path": "/tmp/n1.sock"}', env=env)
    assert code == 0 and json.loads(out)["accepted"] is True
    code, out, _ = cli("nodes", "--status", "online", env=env)
    assert [n["node_id"] for n in json.loads(out)] == ["n1"]
    code, _, err = cli("node", "nope", env=env)
    assert code == 1 and "-32001" in err
    code, _, err = cli("call", "n1", "node.info", env=env)
    assert code == 1 and "-32003" in err
    code, _, err = cli("--explorer", "tcp://127.0.0.1:1", "info", env=env)
    assert code == 2 and "refused" in err
    code, _, err = cli("--explorer", "http://x", "info", env=env)
    assert code == 64 and "accepted forms" in err
