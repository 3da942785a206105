"""
Unix sockets from the attacker's side, with real ``twistd`` processes: another local
user (uid 65534) cannot connect to any Unix socket an explorer or node makes, whether
from ``--socket`` or ``--listen unix:`` (mode 0660; a Unix caller may call every
method, CONTRACT §3, §6); and a start that cannot bind leaves whatever was at the
path as it was (a file, a symlink, another program's live socket), while a stale socket
left by a crash is still replaced.
"""

import errno
import os
import shutil
import socket
import stat
import subprocess
import sys

import pytest
import pytest_twisted
from twisted.internet.protocol import Factory

from hero_compute.rpc.listen import Listen

from .support import result
from .test_startup_errors import assert_clean_failure, run_twistd

NOBODY = 65534

as_nobody = pytest.mark.skipif(
    os.getuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to act as another local user",
)

#: Run as uid 65534: connect to argv[1] and ask for a join token; print the errno's
#: name if the connection is refused, else the answer's last line (or ``connected``
#: only, with a second argument).
_CALL = r"""
import errno, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(errno.errorcode[e.errno]); sys.exit()
if sys.argv[2:]:
    print("connected"); sys.exit()
body = b'{"jsonrpc":"2.0","id":1,"method":"explorer.create_token","params":{}}'
s.sendall(b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
          b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
print(s.recv(65536).decode(errors="replace").splitlines()[-1])
"""


def call_as_nobody(path, connect_only=False):
    """
    What uid 65534 gets from ``explorer.create_token`` on a Unix socket.

    :param connect_only: only connect, and say ``connected``
    :return: an errno name (``EACCES``) when the kernel refuses the connection, else
        the answer's body
    """
    done = subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            sys.executable,
            "-c",
            _CALL,
            path,
            *(["connect"] if connect_only else []),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def mode_of(path):
    """The permission bits of a path (not following a symlink)."""
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def open_dir(short_tmp):
    """A short temporary directory every user may search (0755), so that only a
    socket's own mode can keep another user out."""
    os.chmod(short_tmp, 0o755)
    return short_tmp


@pytest.fixture
def open_socket(open_dir):
    """A listening socket of mode 0666 in ``open_dir``: that uid 65534 reaches it shows
    the directory lets it through, so a refusal elsewhere is the socket's mode."""
    path = os.path.join(open_dir, "open.sock")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(path)
    os.chmod(path, 0o666)
    sock.listen()
    yield path
    sock.close()


@as_nobody
def test_listen_unix_socket_refuses_other_users(twistd, open_dir, open_socket):
    """Another local user is refused by the kernel (EACCES) on an explorer's
    --listen unix: socket, as on its --socket: both are 0660; no token is made."""
    main, extra = f"{open_dir}/main.sock", f"{open_dir}/extra.sock"
    explorer = twistd(["explorer", "--socket", main, "--listen", f"unix:{extra}"])
    assert sorted(explorer.listening(count=2)) == [f"unix://{extra}", f"unix://{main}"]
    # The directory lets it in: only the sockets' mode can keep it out.
    assert call_as_nobody(open_socket, connect_only=True) == "connected"
    for path in (main, extra):
        assert call_as_nobody(path) == "EACCES"
        assert mode_of(path) == 0o660
    assert "create_token" not in explorer.output
    assert result(f"unix://{extra}", "explorer.info")["version"]


@as_nobody
def test_node_socket_refuses_other_users(twistd, open_dir, open_socket):
    """Another local user is refused by the kernel (EACCES) on a node's socket, 0660."""
    path = f"{open_dir}/node.sock"
    node = twistd(["node", "--socket", path, "--explorer", f"unix://{open_dir}/none.sock"])
    assert node.listening() == [f"unix://{path}"]
    assert call_as_nobody(open_socket, connect_only=True) == "connected"
    assert mode_of(path) == 0o660
    assert call_as_nobody(path) == "EACCES"
    assert result(f"unix://{path}", "vm.list") == []


def test_listen_unix_mode_may_narrow(twistd, short_tmp):
    """--listen unix:PATH:mode=600 gives 0600: an operator may narrow the mode."""
    path = f"{short_tmp}/x.sock"
    explorer = twistd(
        ["explorer", "--socket", f"{short_tmp}/e.sock", "--listen", f"unix:{path}:mode=600"]
    )
    explorer.listening(count=2)
    assert mode_of(path) == 0o600


@pytest.mark.parametrize("mode", ["666", "662", "0777"])
def test_listen_unix_mode_for_others_is_refused(short_tmp, mode):
    """--listen unix:PATH:mode= letting other users in fails start-up, naming it;
    nothing is left behind."""
    description = f"unix:{short_tmp}/x.sock:mode={mode}"
    status, output = run_twistd(
        ["explorer", "--socket", f"{short_tmp}/e.sock", "--listen", description], {}
    )
    line = assert_clean_failure(status, output, f"--listen {description}")
    assert "0660" in line
    assert os.listdir(short_tmp) == []


def _victim(kind, path, elsewhere):
    """
    Put something that is not ours at ``path``.

    :return: what must still be there afterwards (a listening socket, for that kind)
    """
    if kind == "regular file":
        with open(path, "w") as f:
            f.write("precious\n")
    elif kind == "symlink to a file":
        with open(elsewhere, "w") as f:
            f.write("precious\n")
        os.symlink(elsewhere, path)
    elif kind == "dangling symlink":
        os.symlink(f"{elsewhere}/nowhere", path)
    else:
        live = socket.socket(socket.AF_UNIX)
        live.bind(path)
        live.listen()
        if kind == "another program's socket beside a stale lock":
            # A crashed explorer's lock (a symlink naming a pid no longer running):
            # Twisted takes such a lock and unlinks whatever is at the path to bind.
            dead = subprocess.Popen(["true"])
            dead.wait()
            os.symlink(str(dead.pid), path + ".lock")
        return live
    return None


def _drain(listening):
    """Accept and close the connections waiting on a listening socket."""
    listening.setblocking(False)
    try:
        for _ in range(100):
            accepted, _ = listening.accept()
            accepted.close()
    except BlockingIOError:
        pass
    listening.settimeout(10)


@pytest.mark.parametrize("option", ["--socket", "--listen"])
@pytest.mark.parametrize(
    "kind",
    [
        "regular file",
        "symlink to a file",
        "dangling symlink",
        "another program's socket",
        "another program's socket beside a stale lock",
    ],
)
def test_failed_start_leaves_the_path_alone(short_tmp, kind, option):
    """A start that cannot bind a path holding a file, a symlink or another program's
    live socket fails with one clear line and leaves that path as it was (same inode,
    content, target; the socket still serving), and no lock or socket of its own."""
    path, elsewhere = f"{short_tmp}/x.sock", f"{short_tmp}/victim"
    live = _victim(kind, path, elsewhere)
    try:
        before = os.lstat(path)
        target = os.readlink(path) if os.path.islink(path) else None
        args = ["--socket", path]
        if option == "--listen":
            args = ["--socket", f"{short_tmp}/e.sock", "--listen", f"unix:{path}"]
        status, output = run_twistd(["explorer", *args], {})
        line = assert_clean_failure(status, output, f"cannot listen on unix://{path}")
        assert "address already in use" in line and f"({option})" in line
        if live is None:
            assert "not a socket, and is left as it is" in line
        else:
            assert f"another process serves it (ss -xlp src {path})" in line
        after = os.lstat(path)
        assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
        if target is not None:
            assert os.readlink(path) == target
        if kind in ("regular file", "symlink to a file"):
            with open(path if kind == "regular file" else elsewhere) as f:
                assert f.read() == "precious\n"
        if live is not None:
            _drain(live)  # the start's probe for a stale socket, connected and gone
            with socket.socket(socket.AF_UNIX) as caller:
                caller.connect(path)
                caller.sendall(b"still here")
                accepted, _ = live.accept()
                with accepted:
                    assert accepted.recv(64) == b"still here"
        assert sorted(os.listdir(short_tmp)) == sorted(
            ["x.sock"]
            + (["victim"] if kind == "symlink to a file" else [])
            + (["x.sock.lock"] if "stale lock" in kind else [])
        )
    finally:
        if live is not None:
            live.close()


@pytest.mark.parametrize("option", ["--socket", "--listen"])
def test_socket_of_a_killed_explorer_is_replaced(twistd, short_tmp, option):
    """The socket a SIGKILLed explorer left, its lock naming a dead pid, is replaced on
    start (--socket and --listen unix: alike) and served, mode 0660."""
    path = f"{short_tmp}/x.sock"
    args = ["--socket", path]
    if option == "--listen":
        args = ["--socket", f"{short_tmp}/e.sock", "--listen", f"unix:{path}"]
    count = len(args) // 2
    first = twistd(["explorer", *args])
    assert f"unix://{path}" in first.listening(count=count)
    first.kill()
    assert os.readlink(path + ".lock") == str(first.process.pid)
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    second = twistd(["explorer", *args])
    assert f"unix://{path}" in second.listening(count=count)
    assert os.readlink(path + ".lock") == str(second.process.pid)
    assert mode_of(path) == 0o660
    assert result(f"unix://{path}", "explorer.info")["version"]


@pytest_twisted.ensureDeferred
async def test_mode_is_set_before_anyone_can_connect(short_tmp, monkeypatch):
    """Twisted sets a Unix socket's mode between bind and listen: until then a connect
    is refused whatever the mode, so there is no moment a wider mode lets anyone in."""
    from twisted.internet import reactor

    path = f"{short_tmp}/x.sock"
    seen = []
    chmod = os.chmod

    def spy(target, mode, *args, **kwargs):
        if os.fsdecode(target) == path:
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(path)
                seen.append("connected")
            except OSError as e:
                seen.append(errno.errorcode[e.errno])
            finally:
                probe.close()
        return chmod(target, mode, *args, **kwargs)

    monkeypatch.setattr(os, "chmod", spy)
    port = await Listen.unix(path).server_endpoint(reactor).listen(Factory())
    try:
        assert seen == ["ECONNREFUSED"]
        assert mode_of(path) == 0o660
    finally:
        await port.stopListening()
