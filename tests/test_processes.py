"""
Real twistd processes on real sockets: the default Unix setup, TCP and IPv6 listeners,
bind failures, stale sockets, clean shutdown and configuration errors.
"""

import os
import signal
import socket
import stat
import subprocess

from .support import ROOT, TWISTD, result, wait_for


def test_default_unix_setup(twistd, short_tmp):
    """With only HOME set, explorer and node meet on the default sockets, mode 0660."""
    # 1 s, not 0.3: each heartbeat is bounded by the interval, and a loaded machine can
    # make one take 0.3 s; the run below wants a calm fleet, not retries.
    env = {"HOME": short_tmp, "HEARTBEAT_INTERVAL": "1.0"}
    sockets = f"{short_tmp}/hero/var/sockets"
    explorer = twistd(["explorer"], env=env)
    assert explorer.listening() == [f"unix://{sockets}/hero_compute_explorer.sock"]
    node = twistd(["node"], env=env)
    assert node.listening() == [f"unix://{sockets}/hero_compute_server.sock"]
    euri = f"unix://{sockets}/hero_compute_explorer.sock"
    nodes = wait_for(
        lambda: result(euri, "explorer.list_nodes", {"status": "online"}),
        what="node online",
    )
    assert nodes[0]["socket_path"] == f"unix://{sockets}/hero_compute_server.sock"
    assert nodes[0]["transport"] == "unix"
    node_id = open(f"{short_tmp}/hero/var/hero_compute/node_id").read().strip()
    assert nodes[0]["node_id"] == node_id
    info = result(euri, "explorer.call", {"node_id": node_id, "method": "node.info"})
    assert info["node_id"] == node_id
    for name in ("hero_compute_explorer.sock", "hero_compute_server.sock"):
        mode = os.stat(f"{sockets}/{name}").st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660
    # twistd re-raises the signal it stopped on, so SIGTERM is the clean exit status.
    assert node.stop() == -signal.SIGTERM
    assert "Server Shut Down." in node.output
    assert result(euri, "explorer.get_node", {"node_id": node_id})["status"] == "offline"
    assert explorer.stop() == -signal.SIGTERM
    assert os.listdir(sockets) == []


def test_unix_ipv4_ipv6_at_once(twistd, short_tmp):
    """One explorer serves the same methods on Unix, IPv4 and IPv6; each is reachable."""
    explorer = twistd(
        [
            "explorer",
            "--socket",
            f"{short_tmp}/e.sock",
            "--tcp",
            "127.0.0.1:0",
            "--listen",
            r"tcp6:0:interface=\:\:1",
        ]
    )
    uris = explorer.listening(count=3)
    assert uris[0] == f"unix://{short_tmp}/e.sock"
    assert uris[1].startswith("tcp://127.0.0.1:")
    assert uris[2].startswith("tcp://[::1]:")
    for uri in uris:
        info = result(uri, "explorer.info")
        assert info["listeners"] == uris
        discover = result(uri, "rpc.discover")
        assert "explorer.heartbeat" in {m["name"] for m in discover["methods"]}


def test_tcp_listener_that_cannot_bind_exits_nonzero(twistd, short_tmp):
    """A TCP address already in use makes twistd exit non-zero with a clear message."""
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    try:
        explorer = twistd(
            ["explorer", "--socket", f"{short_tmp}/e.sock", "--tcp", f"127.0.0.1:{port}"]
        )
        assert explorer.process.wait(20) != 0
        assert f"127.0.0.1:{port} (--tcp): address already in use" in explorer.output
        assert "Traceback" not in explorer.output
    finally:
        blocker.close()


def test_live_socket_is_not_stolen_but_stale_one_is_replaced(twistd, short_tmp):
    """A second explorer on a live socket fails; after a crash (SIGKILL) a restart works."""
    path = f"{short_tmp}/e.sock"
    first = twistd(["explorer", "--socket", path])
    first.listening()
    second = twistd(["explorer", "--socket", path])
    assert second.process.wait(20) != 0
    assert result(f"unix://{path}", "explorer.info")["version"]
    first.kill()
    assert os.path.exists(path)
    third = twistd(["explorer", "--socket", path])
    assert third.listening() == [f"unix://{path}"]
    assert result(f"unix://{path}", "explorer.info")["nodes"] == {"online": 0, "offline": 0}


def test_stale_socket_with_a_live_pid_in_its_lock_is_replaced(twistd, short_tmp):
    """A socket nothing listens on is replaced even when its lock names a live process
    (in a container a restarted daemon often gets the crashed one's pid)."""
    path = f"{short_tmp}/e.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()
    os.symlink(str(os.getpid()), path + ".lock")
    explorer = twistd(["explorer", "--socket", path])
    assert explorer.listening() == [f"unix://{path}"]
    assert "removing stale socket" in explorer.output
    assert result(f"unix://{path}", "explorer.info")["version"]


def test_non_loopback_tcp_warns(twistd, short_tmp):
    """A plain TCP listener on a non-loopback address logs that it is unauthenticated."""
    explorer = twistd(["explorer", "--socket", f"{short_tmp}/e.sock", "--tcp", "0.0.0.0:0"])
    explorer.wait_for_line("unauthenticated")
    loopback = twistd(
        ["explorer", "--socket", f"{short_tmp}/f.sock", "--tcp", "127.0.0.1:0"]
    )
    loopback.listening(count=2)
    assert "unauthenticated" not in loopback.output


def run_twistd(args, env):
    """Run twistd to completion; returns (exit code, output)."""
    full_env = {"PATH": os.environ["PATH"], "PYTHONPATH": ROOT, **env}
    done = subprocess.run(
        [TWISTD, "-n", "--pidfile=", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return done.returncode, done.stdout + done.stderr


def test_configuration_errors_refuse_to_start(short_tmp):
    """Bad URIs in the environment and a TCP explorer without a TCP listener stop
    start-up."""
    base = {"HOME": short_tmp}
    code, out = run_twistd(["node"], {**base, "EXPLORER_ADDRESSES": "tcp://10.9.9.9:9002"})
    assert code != 0 and "NODE_TCP_ADDR" in out
    code, out = run_twistd(["node"], {**base, "EXPLORER_ADDRESSES": "http://e:1"})
    assert code != 0 and "http://e:1" in out and "accepted forms" in out
    code, out = run_twistd(["explorer"], {**base, "EXPLORER_TCP_ADDR": "nonsense"})
    assert code != 0 and "EXPLORER_TCP_ADDR" in out
    assert not os.path.exists(f"{short_tmp}/hero")


def test_node_over_tcp_and_explorer_restart(twistd, short_tmp):
    """A node reporting over TCP re-registers after the explorer restarts on the same
    port."""
    explorer = twistd(
        ["explorer", "--socket", f"{short_tmp}/e.sock", "--tcp", "127.0.0.1:0"]
    )
    tcp = explorer.tcp_uri()
    node = twistd(
        [
            "node",
            "--socket",
            f"{short_tmp}/n.sock",
            "--tcp",
            "127.0.0.1:0",
            "--explorer",
            tcp,
            "--interval",
            "0.3",
            "--state-dir",
            f"{short_tmp}/st",
        ]
    )
    node_tcp = node.tcp_uri()
    nodes = wait_for(lambda: result(tcp, "explorer.list_nodes"), what="node registered")
    assert nodes[0]["socket_path"] == node_tcp and nodes[0]["transport"] == "tcp"
    explorer.kill()
    port = tcp.rsplit(":", 1)[1]
    explorer = twistd(
        ["explorer", "--socket", f"{short_tmp}/e.sock", "--tcp", f"127.0.0.1:{port}"]
    )
    explorer.listening(count=2)
    nodes = wait_for(
        lambda: result(tcp, "explorer.list_nodes", {"status": "online"}),
        timeout=10,
        what="node back after explorer restart",
    )
    assert nodes[0]["socket_path"] == node_tcp
    info = result(
        tcp, "explorer.call", {"node_id": nodes[0]["node_id"], "method": "node.info"}
    )
    assert info["explorers"][0]["state"] == "ok"
