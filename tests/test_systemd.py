"""
systemd: the units in contrib/systemd verify and keep the explorer's exposure low,
socket activation works for real (``systemd-socket-activate``), and ``Type=notify``
gets READY=1, WATCHDOG=1 and STOPPING=1 over a NOTIFY_SOCKET.
"""

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest

from hero_compute.rpc.systemd import notify, watchdog_interval

from .support import ROOT, TWISTD, Twistd, make_short_tmp, remove_tmp, result, wait_for

UNITS = os.path.join(ROOT, "contrib", "systemd")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")


@pytest.fixture
def tmp():
    """A short temporary directory (Unix socket paths are short)."""
    path = make_short_tmp()
    yield path
    remove_tmp(path)


@pytest.fixture
def units(tmp):
    """The units, copied with ExecStart pointing at this venv's twistd (verify checks
    that the binary exists)."""
    directory = os.path.join(tmp, "units")
    os.mkdir(directory)
    for path in glob.glob(os.path.join(UNITS, "*.service")) + glob.glob(
        os.path.join(UNITS, "*.socket")
    ):
        with open(path) as f:
            text = f.read().replace("/opt/hero_compute/bin/twistd", TWISTD)
        with open(os.path.join(directory, os.path.basename(path)), "w") as f:
            f.write(text)
    return directory


def test_the_units_are_there():
    """Both services, the explorer's two sockets, sysusers and tmpfiles are shipped."""
    assert sorted(os.listdir(UNITS)) == [
        "hero-compute-explorer-tcp.socket",
        "hero-compute-explorer.service",
        "hero-compute-explorer.socket",
        "hero-compute-node.service",
        "hero-compute.sysusers.conf",
        "hero-compute.tmpfiles.conf",
    ]


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize(
    "unit",
    [
        "hero-compute-explorer.service",
        "hero-compute-explorer.socket",
        "hero-compute-explorer-tcp.socket",
        "hero-compute-node.service",
    ],
)
def test_unit_verifies(units, unit):
    """systemd-analyze verify finds nothing to say about the unit."""
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", unit],
        cwd=units,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_explorer_exposure(units):
    """systemd-analyze security rates the explorer's exposure 4.0 or less."""
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "hero-compute-explorer.service"],
        cwd=units,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "--offline" in done.stderr and "unrecognized" in done.stderr:
        pytest.skip("this systemd-analyze has no --offline")
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) <= 4.0, done.stdout


def test_node_keeps_what_qemu_needs():
    """The node may use /dev/kvm and executable memory (QEMU's JIT)."""
    with open(os.path.join(UNITS, "hero-compute-node.service")) as f:
        text = f.read()
    assert "DeviceAllow=/dev/kvm rw" in text
    assert "\nMemoryDenyWriteExecute=" not in text
    assert "\nPrivateDevices=" not in text
    assert "StateDirectoryMode=0700" in text
    assert "Group=hero" in text


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(SOCKET_ACTIVATE is None, reason="systemd-socket-activate is absent")
def test_socket_activation(tmp):
    """Passed a Unix and a TCP socket, the explorer serves JSON-RPC on both and binds
    no socket of its own."""
    path = os.path.join(tmp, "e.sock")
    sockets = os.path.join(tmp, "sockets")
    port = _free_port()
    process = subprocess.Popen(
        [
            SOCKET_ACTIVATE,
            "-l",
            path,
            "-l",
            f"127.0.0.1:{port}",
            "--fdname=unix:tcp",
            "-E",
            f"PYTHONPATH={ROOT}",
            "-E",
            f"HOME={tmp}",
            "-E",
            f"HERO_SOCKET_DIR={sockets}",
            TWISTD,
            "-n",
            "--pidfile=",
            "explorer",
            "--listen",
            "systemd:domain=UNIX:index=0",
            "--listen",
            "systemd:domain=INET:name=tcp",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(lambda: os.path.exists(path), what="the activation socket")
        # The first connection starts the explorer, which then answers it.
        info = result(path, "explorer.info", timeout=30)
        assert info["listeners"] == [f"unix://{path}", f"tcp://127.0.0.1:{port}"]
        assert result(f"tcp://127.0.0.1:{port}", "explorer.info")["version"]
        assert not os.path.exists(sockets)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        output, _ = process.communicate(timeout=15)
    assert "Traceback" not in output, output


class NotifySocket:
    """A NOTIFY_SOCKET, as systemd binds it: a datagram socket we read."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.messages = []

    def wait_for(self, line, timeout=15.0):
        """Wait for a message holding ``line``; returns it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.messages:
                if line in message.split("\n"):
                    return message
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                pass
        raise AssertionError(f"no {line} in {self.messages}")

    def close(self):
        """Close it."""
        self.sock.close()


def test_notify_ready_watchdog_stopping(tmp):
    """Under Type=notify: READY=1 once the listeners are up (naming them), WATCHDOG=1
    pings with WATCHDOG_USEC set, STOPPING=1 on SIGTERM."""
    notify_socket = NotifySocket(os.path.join(tmp, "notify"))
    explorer = Twistd(
        ["explorer", "--tcp", "127.0.0.1:0"],
        env={
            "HERO_SOCKET_DIR": tmp,
            "NOTIFY_SOCKET": notify_socket.path,
            "WATCHDOG_USEC": "400000",
        },
    )
    try:
        ready = notify_socket.wait_for("READY=1")
        uris = explorer.listening(count=2)
        assert f"STATUS=listening on {', '.join(uris)}" in ready.split("\n")
        assert f"MAINPID={explorer.process.pid}" in ready.split("\n")
        notify_socket.messages.clear()
        notify_socket.wait_for("WATCHDOG=1")
        notify_socket.messages.clear()
        notify_socket.wait_for("WATCHDOG=1", timeout=2)
        explorer.signal(signal.SIGTERM)
        notify_socket.wait_for("STOPPING=1")
    finally:
        explorer.stop()
        notify_socket.close()


def test_node_notifies_ready(tmp):
    """The node says READY=1 too, once its listeners are up."""
    notify_socket = NotifySocket(os.path.join(tmp, "notify"))
    node = Twistd(
        ["node"],
        env={
            "HERO_SOCKET_DIR": tmp,
            "HERO_STATE_DIR": os.path.join(tmp, "state"),
            "NOTIFY_SOCKET": notify_socket.path,
        },
    )
    try:
        notify_socket.wait_for("READY=1")
        node.listening()
        node.signal(signal.SIGTERM)
        notify_socket.wait_for("STOPPING=1")
    finally:
        node.stop()
        notify_socket.close()


def test_notify_without_manager():
    """Without NOTIFY_SOCKET nothing is sent; an unreachable one is not an error."""
    assert notify({}, "READY=1") is False
    assert notify({"NOTIFY_SOCKET": "/nonexistent/notify"}, "READY=1") is False


def test_watchdog_interval():
    """Half of WATCHDOG_USEC, and only for the process WATCHDOG_PID names."""
    assert watchdog_interval({"WATCHDOG_USEC": "4000000"}, 7) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "7"}, 7) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "8"}, 7) is None
    assert watchdog_interval({}, 7) is None
    assert watchdog_interval({"WATCHDOG_USEC": "x"}, 7) is None
