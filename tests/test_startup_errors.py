"""
Operator mistakes at start-up, with real ``twistd -n explorer`` / ``twistd -n node``
processes: each ends the process non-zero with one line naming the variable or option
and the fix, no traceback, the usage text only for a misused command line, and nothing
left behind (no socket, no lock file, no socket directory it made).
"""

import os
import shutil
import socket
import subprocess

import pytest

from hero_compute import pki

from .support import ROOT, TWISTD, Twistd, make_short_tmp, remove_tmp, result

#: A line of twistd's usage text.
USAGE = "Usage: twistd"


def run_twistd(args, env, prefix=(), timeout=30):
    """
    Run ``twistd -n --pidfile= ARGS`` to its end, with a fresh HOME and only the given
    hero_compute variables.

    :param prefix: a command to run it under (e.g. ``setpriv ...``)
    :return: ``(exit status, stdout and stderr)``
    """
    home = make_short_tmp("hc-home-")
    os.chmod(home, 0o755)
    full_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("EXPLORER_", "NODE_", "HERO_", "HEARTBEAT_", "LISTEN_"))
        and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
    }
    full_env.update(PYTHONPATH=ROOT, HOME=home, **env)
    try:
        done = subprocess.run(
            [*prefix, TWISTD, "-n", "--pidfile=", *args],
            env=full_env,
            cwd=home,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    finally:
        remove_tmp(home)
    return done.returncode, done.stdout + done.stderr


def assert_clean_failure(status, output, *needles):
    """
    The process failed with one line holding every needle, no traceback and no usage.
    """
    assert status != 0, output
    lines = [line for line in output.splitlines() if all(n in line for n in needles)]
    assert len(lines) == 1, output
    assert "Traceback" not in output, output
    assert USAGE not in output, output
    return lines[0]


def leftovers(directory):
    """Sockets and lock files in a directory (none if it does not exist)."""
    if not os.path.isdir(directory):
        return []
    return [n for n in os.listdir(directory) if n.endswith((".sock", ".lock"))]


@pytest.fixture
def tmp():
    """A short temporary directory (Unix socket paths are short)."""
    path = make_short_tmp()
    yield path
    remove_tmp(path)


@pytest.fixture
def taken_port():
    """A TCP port on 127.0.0.1 that something else listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize(
    "command, variable",
    [("explorer", "EXPLORER_TCP_ADDR"), ("node", "NODE_TCP_ADDR")],
)
def test_port_in_use(tmp, taken_port, command, variable):
    """A TCP port in use: one line with the address, the variable and how to find the
    owner; the Unix socket bound before it, its lock and its new directory are gone."""
    sockets = os.path.join(tmp, "sockets")
    status, output = run_twistd(
        [command],
        {
            "HERO_SOCKET_DIR": sockets,
            "HERO_STATE_DIR": os.path.join(tmp, "state"),
            variable: f"127.0.0.1:{taken_port}",
        },
    )
    line = assert_clean_failure(
        status, output, f"cannot listen on tcp://127.0.0.1:{taken_port} ({variable})"
    )
    assert "address already in use" in line
    assert f"ss -ltnp 'sport = :{taken_port}'" in line
    assert not os.path.exists(sockets)


def test_port_in_use_by_option(tmp, taken_port):
    """Given by --tcp, the port in use is reported against --tcp."""
    status, output = run_twistd(
        ["explorer", "--tcp", f"127.0.0.1:{taken_port}"], {"HERO_SOCKET_DIR": tmp}
    )
    assert_clean_failure(status, output, f"tcp://127.0.0.1:{taken_port} (--tcp)")
    assert leftovers(tmp) == []


def test_second_explorer_on_the_same_socket(tmp):
    """A second explorer on a served socket names the first one's pid and the
    variable, and leaves the first one's socket and lock alone."""
    path = os.path.join(tmp, "x.sock")
    first = Twistd(["explorer"], env={"EXPLORER_SOCKET": path})
    try:
        first.listening()
        status, output = run_twistd(["explorer"], {"EXPLORER_SOCKET": path})
        assert_clean_failure(
            status,
            output,
            f"another explorer, pid {first.process.pid}, serves {path} (EXPLORER_SOCKET)",
        )
        assert sorted(leftovers(tmp)) == ["x.sock", "x.sock.lock"]
        assert result(path, "explorer.info")["version"]
    finally:
        first.stop()
    assert leftovers(tmp) == []


@pytest.mark.parametrize("command", ["explorer", "node"])
def test_socket_dir_uncreatable(tmp, command):
    """A HERO_SOCKET_DIR that cannot be created (a file is in the way) is named."""
    blocker = os.path.join(tmp, "file")
    open(blocker, "w").close()
    status, output = run_twistd(
        [command],
        {
            "HERO_SOCKET_DIR": os.path.join(blocker, "sockets"),
            "HERO_STATE_DIR": os.path.join(tmp, "state"),
        },
    )
    assert_clean_failure(status, output, "HERO_SOCKET_DIR", "cannot create")


@pytest.mark.skipif(
    os.getuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to run as another user",
)
def test_socket_dir_unwritable(tmp):
    """A HERO_SOCKET_DIR this user may not write: permission denied, named, and the
    fix said; nothing left in it."""
    sockets = os.path.join(tmp, "sockets")
    state = os.path.join(tmp, "state")
    os.mkdir(sockets, 0o755)
    os.mkdir(state)
    os.chmod(state, 0o777)
    os.chmod(tmp, 0o755)
    status, output = run_twistd(
        ["explorer"],
        {"HERO_SOCKET_DIR": sockets, "EXPLORER_STATE_DIR": state},
        prefix=["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"],
    )
    line = assert_clean_failure(status, output, "HERO_SOCKET_DIR", "permission denied")
    assert "uid 65534" in line
    assert leftovers(sockets) == []


def test_bad_explorer_addresses(tmp):
    """A bad EXPLORER_ADDRESSES: only the message, naming it and the accepted forms."""
    status, output = run_twistd(
        ["node"], {"HERO_SOCKET_DIR": tmp, "EXPLORER_ADDRESSES": "http://x:1"}
    )
    line = assert_clean_failure(status, output, "EXPLORER_ADDRESSES='http://x:1'")
    assert "accepted forms" in line
    assert leftovers(tmp) == []


@pytest.mark.parametrize(
    "variable, value, needle",
    [
        ("NODE_LABELS", "zone", "is not key=value"),
        ("NODE_LABELS", "bad key!=x", "label key"),
        ("NODE_LABELS", "a=1,a=2", "twice"),
        ("NODE_CAPACITY", "cpus=4", "not one of vcpus, memory, disk"),
        ("NODE_CAPACITY", "memory=lots", "is not a size"),
        ("NODE_CAPACITY", "vcpus=-1", "not a whole number"),
    ],
)
def test_bad_labels_or_capacity(tmp, variable, value, needle):
    """A bad NODE_LABELS or NODE_CAPACITY: one line naming the variable, nothing left."""
    status, output = run_twistd(["node"], {"HERO_SOCKET_DIR": tmp, variable: value})
    assert_clean_failure(status, output, f"{variable}={value!r}", needle)
    assert leftovers(tmp) == []


def test_bad_option_value(tmp):
    """A bad option value: only the message, naming the option."""
    status, output = run_twistd(["explorer", "--tcp", "nowhere"], {"HERO_SOCKET_DIR": tmp})
    assert_clean_failure(status, output, "--tcp 'nowhere'", "host:port")


def test_unknown_option_shows_usage(tmp):
    """An unknown option is a usage error: the usage, then what was wrong."""
    status, output = run_twistd(["explorer", "--bogus"], {"HERO_SOCKET_DIR": tmp})
    assert status != 0
    assert USAGE in output and "--bogus" in output
    assert "Traceback" not in output


def test_tls_material_missing(tmp):
    """An explorer told to serve TLS without its material says which variables."""
    status, output = run_twistd(
        ["explorer"],
        {
            "HERO_SOCKET_DIR": tmp,
            "EXPLORER_STATE_DIR": os.path.join(tmp, "state"),
            "EXPLORER_TLS_ADDR": "127.0.0.1:0",
        },
    )
    assert_clean_failure(status, output, "TLS material unusable", "EXPLORER_TLS_CERT")
    assert leftovers(tmp) == []


def test_tls_material_unusable(tmp):
    """Files that hold no certificate: one line, naming them and the variables."""
    junk = os.path.join(tmp, "junk.pem")
    with open(junk, "w") as f:
        f.write("not a certificate\n")
    status, output = run_twistd(
        ["explorer"],
        {
            "HERO_SOCKET_DIR": tmp,
            "EXPLORER_STATE_DIR": os.path.join(tmp, "state"),
            "EXPLORER_TLS_ADDR": "127.0.0.1:0",
            "EXPLORER_TLS_CERT": junk,
            "EXPLORER_TLS_KEY": junk,
            "EXPLORER_TLS_CA": junk,
        },
    )
    assert_clean_failure(status, output, junk, "EXPLORER_TLS_CERT")
    assert leftovers(tmp) == []


def test_tls_key_that_is_a_fifo(tmp):
    """A key file replaced by a FIFO (nothing writes it) is refused at once, naming the
    file, instead of blocking start-up in open()."""
    ca_dir = os.path.join(tmp, "ca")
    pki.create_ca(ca_dir)
    cert, _ = pki.create_cert(
        ca_dir, "explorer", "e1", ips=["127.0.0.1"], out=os.path.join(tmp, "e1")
    )
    fifo = os.path.join(tmp, "key.pem")
    os.mkfifo(fifo)
    status, output = run_twistd(
        ["explorer"],
        {
            "HERO_SOCKET_DIR": tmp,
            "EXPLORER_STATE_DIR": os.path.join(tmp, "state"),
            "EXPLORER_TLS_ADDR": "127.0.0.1:0",
            "EXPLORER_TLS_CERT": cert,
            "EXPLORER_TLS_KEY": fifo,
            "EXPLORER_TLS_CA": os.path.join(ca_dir, "ca.pem"),
        },
        timeout=20,
    )
    assert_clean_failure(status, output, fifo, "not a regular file", "EXPLORER_TLS_KEY")
    assert leftovers(tmp) == []


def test_explorer_state_unusable(tmp):
    """An explorer state that cannot be opened names EXPLORER_STATE_DIR."""
    state = os.path.join(tmp, "state")
    os.makedirs(os.path.join(state, "explorer.db"))
    status, output = run_twistd(
        ["explorer"], {"HERO_SOCKET_DIR": tmp, "EXPLORER_STATE_DIR": state}
    )
    assert_clean_failure(status, output, "explorer.db", "EXPLORER_STATE_DIR")
    assert leftovers(tmp) == []


def test_node_state_dir_unusable(tmp):
    """A node state directory that cannot be created names HERO_STATE_DIR."""
    blocker = os.path.join(tmp, "file")
    open(blocker, "w").close()
    status, output = run_twistd(
        ["node"],
        {"HERO_SOCKET_DIR": tmp, "HERO_STATE_DIR": os.path.join(blocker, "state")},
    )
    assert_clean_failure(status, output, "HERO_STATE_DIR")
    assert leftovers(tmp) == []


@pytest.mark.parametrize(
    "listen, needle",
    [
        ("systemd:domain=UNIX:index=0", "systemd passed no such socket"),
        ("systemd:domain=UNIX:name=unix", "systemd passed no such socket"),
        ("nowhere:1", "--listen nowhere:1"),
    ],
)
def test_unusable_listen(tmp, listen, needle):
    """A --listen naming no usable endpoint (a systemd socket not passed, an unknown
    kind): one line naming it, and no Unix socket of its own bound meanwhile."""
    status, output = run_twistd(["explorer", "--listen", listen], {"HERO_SOCKET_DIR": tmp})
    assert_clean_failure(status, output, needle)
    assert leftovers(tmp) == []
