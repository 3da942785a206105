"""
The hero-compute command line against a real explorer, run as a subprocess: JSON when
piped, tables on a terminal, and an exit code for each kind of failure.
"""

import json
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest

import hero_compute

from .support import ROOT, connect, post, result

CLI = [sys.executable, "-m", "hero_compute.cli"]


def cli(*args, env=None, timeout=60):
    """Run the CLI with stdout piped; returns (exit status, stdout, stderr)."""
    done = subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PYTHONPATH": ROOT, "PATH": "/usr/bin:/bin", **(env or {})},
    )
    return done.returncode, done.stdout, done.stderr


def cli_tty(*args, env=None, timeout=60):
    """Run the CLI with stdout on a pseudo-terminal; returns (status, stdout, stderr)."""
    master, slave = pty.openpty()
    process = subprocess.Popen(
        [*CLI, *args],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=subprocess.PIPE,
        env={"PYTHONPATH": ROOT, "PATH": "/usr/bin:/bin", "TERM": "xterm", **(env or {})},
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    err = process.stderr.read().decode()
    process.stderr.close()
    code = process.wait(timeout)
    return code, b"".join(chunks).decode(), err


@pytest.fixture
def explorer(twistd, short_tmp):
    """A real explorer on $HERO_SOCKET_DIR; yields (environment for the CLI, its URI)."""
    env = {"HERO_SOCKET_DIR": short_tmp}
    process = twistd(["explorer"], env=env)
    (uri,) = process.listening()
    return env, uri


def heartbeat(uri, node_id, **extra):
    """Register a node with the explorer."""
    return result(
        uri,
        "explorer.heartbeat",
        {"node_id": node_id, "socket_path": f"/tmp/{node_id}.sock", **extra},
    )


def test_cli_talks_to_explorer(explorer):
    """The CLI finds the socket through HERO_SOCKET_DIR and maps errors to exit codes."""
    env, _ = explorer
    code, out, _ = cli("info", env=env)
    assert code == 0 and json.loads(out)["nodes"] == {"online": 0, "offline": 0}
    code, out, _ = cli(
        "rpc",
        "explorer.heartbeat",
        '{"node_id": "n1", "socket_path": "/tmp/n1.sock"}',
        env=env,
    )
    assert code == 0 and json.loads(out)["accepted"] is True
    code, out, _ = cli("nodes", "--status", "online", env=env)
    assert [n["node_id"] for n in json.loads(out)] == ["n1"]
    code, _, err = cli("node", "nope", env=env)
    assert code == 3 and "-32001" in err and "hero-compute nodes" in err
    code, _, err = cli("call", "n1", "node.info", env=env)
    assert code == 2 and "-32003" in err
    code, _, err = cli("--explorer", "tcp://127.0.0.1:1", "info", env=env)
    assert code == 2 and "refused" in err
    code, _, err = cli("--explorer", "http://x", "info", env=env)
    assert code == 64 and "accepted forms" in err


def test_table_on_a_terminal_json_when_piped(explorer):
    """nodes: a table on a terminal (name, status, usage, last seen), JSON in a pipe."""
    env, uri = explorer
    heartbeat(
        uri,
        "n1",
        name="alpha",
        capacity={"vcpus": 8, "memory_mb": 16384, "disk_gb": 500},
        usage={"vcpus": 2, "memory_mb": 1024, "disk_gb": 20},
        vm_count=2,
    )
    code, out, err = cli_tty("nodes", env=env)
    assert code == 0 and err == ""
    lines = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", out).splitlines()
    assert lines[0].split() == [
        "NAME",
        "ID",
        "STATUS",
        "TRANSPORT",
        "ADDRESS",
        "VMS",
        "VCPUS",
        "MEMORY",
        "DISK",
        "LAST",
        "SEEN",
    ]
    row = lines[2].split()
    assert row[:6] == ["alpha", "n1", "online", "unix", "unix:///tmp/n1.sock", "2"]
    assert row[6:9] == ["2/8", "1G/16G", "20G/500G"] and row[-2:] == ["s", "ago"]
    code, out, _ = cli("nodes", env=env)
    assert code == 0 and json.loads(out)[0]["name"] == "alpha"
    code, out, _ = cli("nodes", "--table", env=env)
    assert code == 0 and out.split()[:2] == ["NAME", "ID"] and "\x1b" not in out


@pytest.mark.parametrize("argv", [["--json", "nodes"], ["nodes", "--json"]])
def test_json_anywhere_on_a_terminal(explorer, argv):
    """--json before or after the command gives JSON even on a terminal."""
    env, uri = explorer
    heartbeat(uri, "n1")
    code, out, _ = cli_tty(*argv, env=env)
    assert code == 0 and [n["node_id"] for n in json.loads(out)] == ["n1"]


def test_label_and_status_filters(explorer):
    """--label k=v (repeatable) and --status select nodes."""
    env, uri = explorer
    heartbeat(uri, "a", labels={"zone": "eu", "disk": "ssd"})
    heartbeat(uri, "b", labels={"zone": "us"})
    result(uri, "explorer.leave", {"node_id": "b"})
    code, out, _ = cli("nodes", "--label", "zone=eu", "--label", "disk=ssd", env=env)
    assert code == 0 and [n["node_id"] for n in json.loads(out)] == ["a"]
    code, out, _ = cli("nodes", "--status", "offline", env=env)
    assert [n["node_id"] for n in json.loads(out)] == ["b"]
    code, _, err = cli("nodes", "--label", "zone", env=env)
    assert code == 64 and "KEY=VALUE" in err


def test_unreachable_explorer(short_tmp):
    """No socket: exit 2, and the message says where to look."""
    code, out, err = cli("nodes", env={"HERO_SOCKET_DIR": short_tmp})
    assert code == 2 and out == ""
    assert "cannot reach the explorer" in err and "HERO_SOCKET_DIR" in err
    assert "Traceback" not in err


def test_timeout_is_not_unreachable(short_tmp):
    """A listener that accepts and never answers: exit 2 saying it timed out, in time."""
    path = f"{short_tmp}/silent.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(8)
    held = []
    threading.Thread(target=lambda: held.append(listener.accept()), daemon=True).start()
    try:
        code, _, err = cli(
            "--explorer", f"unix://{path}", "info", "--timeout", "1", timeout=20
        )
    finally:
        listener.close()
    assert code == 2 and "timed out" in err and "within 1 s" in err
    assert "is the explorer running" not in err


def test_policy_refusal_and_not_found(explorer):
    """A refusal by policy exits 4, an unknown node or VM 3."""
    env, uri = explorer
    heartbeat(uri, "n1")
    code, _, err = cli("call", "n1", "explorer.info", env=env)
    assert code == 4 and "refused by policy" in err and "-32010" in err
    for argv in (["node", "ghost"], ["vm", "list", "ghost"], ["vm", "show", "ghost", "v"]):
        code, _, err = cli(*argv, env=env)
        assert (code, "-32001" in err) == (3, True), (argv, err)


def test_offline_says_how_long_ago(explorer):
    """An offline node's error reads "last seen N s ago", not a Unix time."""
    env, uri = explorer
    heartbeat(uri, "n1")
    result(uri, "explorer.leave", {"node_id": "n1"})
    code, _, err = cli("vm", "list", "n1", env=env)
    assert code == 2 and "-32002" in err
    assert re.search(r"last seen \d+ s ago", err) and not re.search(r"\d{9}", err)


def test_usage_errors(explorer):
    """Usage errors exit 64 naming every missing option, or the bad value, at once."""
    env, _ = explorer
    code, _, err = cli("vm", "create", "n1", env=env)
    assert code == 64 and "--name, --memory, --disk" in err
    code, _, err = cli(
        "vm", "create", "n1", "--name", "x", "--memory", "12Q", "--disk", "1G", env=env
    )
    assert code == 64 and "M, G or T" in err
    code, _, err = cli("rpc", "explorer.info", "{not json", env=env)
    assert code == 64 and "params must be JSON" in err
    code, _, err = cli("frobnicate", env=env)
    assert code == 64


def test_missing_params_named_by_the_server(explorer):
    """Raw calls with bad params exit 1 and show the server's message and data as is."""
    env, _ = explorer
    code, _, err = cli("rpc", "explorer.heartbeat", "{}", env=env)
    assert code == 1 and "-32602" in err
    # Today's server names the first missing field only (rpc/schema.py).
    assert "invalid params for explorer.heartbeat: node_id" in err
    assert '"field": "node_id"' in err


def test_closed_pipe_is_quiet(explorer):
    """nodes --json | head -c 1 over a large fleet: no traceback, nothing on stderr."""
    env, uri = explorer
    labels = {f"k{i}": "v" * 100 for i in range(8)}
    conn = connect(uri)
    for batch in range(10):
        status, _, _ = post(
            conn,
            [
                {
                    "jsonrpc": "2.0",
                    "id": i,
                    "method": "explorer.heartbeat",
                    "params": {
                        "node_id": f"n{batch}-{i}",
                        "socket_path": "/tmp/x.sock",
                        "labels": labels,
                    },
                }
                for i in range(100)
            ],
        )
        assert status == 200
    conn.close()
    command = " ".join([*CLI, "nodes", "--json"]) + " | head -c 1"
    done = subprocess.run(
        ["sh", "-c", command],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": ROOT, "PATH": "/usr/bin:/bin", **env},
    )
    assert done.stdout == "[" and done.stderr == ""
    size = len(cli("nodes", "--json", env=env)[1])
    assert size > 1_000_000


def test_version():
    """--version prints the package version."""
    code, out, _ = cli("--version")
    assert code == 0 and out.strip() == f"hero-compute {hero_compute.__version__}"


def test_ctrl_c_is_an_interruption(short_tmp):
    """SIGINT while waiting exits 130 saying so, not "cannot reach the explorer"."""
    path = f"{short_tmp}/silent.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(8)
    process = subprocess.Popen(
        [*CLI, "--explorer", f"unix://{path}", "info"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": ROOT, "PATH": "/usr/bin:/bin"},
    )
    listener.settimeout(20)
    try:
        # Waiting for real: its request is on a connection we accepted and never answer.
        conn, _ = listener.accept()
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=20)
        conn.close()
    finally:
        listener.close()
    assert process.returncode == 130 and "interrupted" in err
    assert "cannot reach" not in err
