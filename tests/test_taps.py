"""
twistd options: environment fallbacks, command-line precedence, clear errors for bad
values, and makeService wiring without side effects.
"""

import os

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from hero_compute.explorer import tap as explorer_tap
from hero_compute.explorer.liveness import SWEEPS_PER_OFFLINE
from hero_compute.node import tap as node_tap


def explorer_options(argv=(), **env):
    """Parse explorer options against a given environment."""
    options = explorer_tap.Options(env=env)
    options.parseOptions(list(argv))
    return options


def node_options(argv=(), **env):
    """Parse node options against a given environment."""
    options = node_tap.Options(env=env)
    options.parseOptions(list(argv))
    return options


def test_explorer_defaults(monkeypatch):
    """With no environment the explorer uses ~/hero/var/sockets, no TCP, 30 s."""
    monkeypatch.setenv("HOME", "/home/op")
    options = explorer_options()
    assert options["socket"] == "/home/op/hero/var/sockets/hero_compute_explorer.sock"
    assert options["tcp"] is None
    assert options["offline-after"] == 30.0


def test_explorer_env_and_override():
    """Environment variables apply, and the command line overrides them."""
    options = explorer_options(
        HERO_SOCKET_DIR="/s", EXPLORER_TCP_ADDR="[::1]:9002", NODE_OFFLINE_AFTER="2.5"
    )
    assert options["socket"] == "/s/hero_compute_explorer.sock"
    assert str(options["tcp"]) == "[::1]:9002"
    assert options["offline-after"] == 2.5
    options = explorer_options(
        [
            "--tcp",
            "127.0.0.1:1",
            "--socket",
            "unix:///x/e.sock",
            "--listen",
            "tcp:0",
            "--listen",
            "unix:/y",
        ],
        EXPLORER_TCP_ADDR="0.0.0.0:9002",
        EXPLORER_SOCKET="/z",
    )
    assert str(options["tcp"]) == "127.0.0.1:1"
    assert options["socket"] == "/x/e.sock"
    assert options["listen"] == ["tcp:0", "unix:/y"]


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"EXPLORER_TCP_ADDR": "9002"}, "EXPLORER_TCP_ADDR"),
        ({"EXPLORER_TCP_ADDR": "host:99999"}, "99999"),
        ({"NODE_OFFLINE_AFTER": "-1"}, "NODE_OFFLINE_AFTER"),
        ({"EXPLORER_SOCKET": "relative.sock"}, "EXPLORER_SOCKET"),
        ({"HERO_SOCKET_DIR": "relative/dir"}, "HERO_SOCKET_DIR"),
    ],
)
def test_explorer_bad_env(env, needle):
    """A bad environment value is a usage error naming the variable or value."""
    with pytest.raises(usage.UsageError) as e:
        explorer_options(**env)
    assert needle in str(e.value)


def test_node_defaults(monkeypatch):
    """With no environment the node reports to the local explorer socket over Unix."""
    monkeypatch.setenv("HOME", "/home/op")
    options = node_options()
    assert options["socket"] == "/home/op/hero/var/sockets/hero_compute_server.sock"
    assert [a.uri for a in options["explorer"]] == [
        "unix:///home/op/hero/var/sockets/hero_compute_explorer.sock"
    ]
    assert options["interval"] == 10.0
    assert options["state-dir"] == "/home/op/hero/var/hero_compute"
    assert options["node-id"] is None


def test_node_explorer_list():
    """EXPLORER_ADDRESSES takes several comma-separated URIs of every form."""
    options = node_options(
        EXPLORER_ADDRESSES="unix:///a.sock, /b.sock,tcp://10.1.2.3:9002,tcp://[fd00::1]:9002",
        NODE_TCP_ADDR="0.0.0.0:9003",
        HEARTBEAT_INTERVAL="0.5",
        NODE_ID="abc",
    )
    assert [a.uri for a in options["explorer"]] == [
        "unix:///a.sock",
        "unix:///b.sock",
        "tcp://10.1.2.3:9002",
        "tcp://[fd00::1]:9002",
    ]
    assert options["interval"] == 0.5 and options["node-id"] == "abc"


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"EXPLORER_ADDRESSES": "tcp://x"}, "tcp://x"),
        ({"EXPLORER_ADDRESSES": "http://e:1"}, "accepted forms"),
        ({"EXPLORER_ADDRESSES": "/a.sock,/a.sock"}, "twice"),
        ({"HEARTBEAT_INTERVAL": "0"}, "HEARTBEAT_INTERVAL"),
        ({"NODE_ADVERTISE_ADDR": "unix:///x", "NODE_TCP_ADDR": "0.0.0.0:1"}, "advertise"),
        ({"HERO_SOCKET_DIR": "relative/dir"}, "HERO_SOCKET_DIR"),
    ],
)
def test_node_bad_env(env, needle):
    """A bad node environment value is a usage error that says what is wrong."""
    with pytest.raises(usage.UsageError) as e:
        node_options(**env)
    assert needle in str(e.value)


def test_tcp_explorer_without_tcp_listener_refuses():
    """A tcp:// explorer with no NODE_TCP_ADDR refuses to start, naming what to set."""
    with pytest.raises(usage.UsageError) as e:
        node_options(EXPLORER_ADDRESSES="tcp://10.0.0.1:9002")
    assert "NODE_TCP_ADDR" in str(e.value) and "NODE_ADVERTISE_ADDR" in str(e.value)
    with pytest.raises(usage.UsageError):
        node_options(["--explorer", "tcp://10.0.0.1:9002"])
    assert node_options(["--explorer", "tcp://10.0.0.1:9002", "--tcp", "0.0.0.0:9003"])


def test_make_service_opens_nothing(short_tmp):
    """makeService only wires: no socket or file exists until the service starts."""
    reactor = MemoryReactorClock()
    explorer_tap.makeService(explorer_options(HERO_SOCKET_DIR=f"{short_tmp}/s"), reactor)
    node_tap.makeService(
        node_options(HERO_SOCKET_DIR=f"{short_tmp}/s", HERO_STATE_DIR=f"{short_tmp}/st"),
        reactor,
    )
    assert not os.listdir(short_tmp)
    assert not reactor.unixServers and not reactor.tcpServers
    assert not reactor.getDelayedCalls()


def test_explorer_tree(short_tmp):
    """The explorer's whole tree, built against a memory reactor: its listeners (Unix,
    --tcp, --listen) and the liveness sweep, which starts, listens and stops."""
    reactor = MemoryReactorClock()
    options = explorer_options(
        ["--listen", "tcp:0:interface=127.0.0.2"],
        HERO_SOCKET_DIR=f"{short_tmp}/s",
        EXPLORER_STATE_DIR=f"{short_tmp}/state",
        EXPLORER_TCP_ADDR="127.0.0.1:9002",
        NODE_OFFLINE_AFTER="8",
    )
    explorer = explorer_tap.makeService(options, reactor)
    assert [child.name for child in explorer] == [
        "state",
        "audit",
        "trust",
        "tls",
        "client",
        "listeners",
        "liveness",
        "heap",
    ]
    assert len(list(explorer.getServiceNamed("listeners"))) == 3
    explorer.privilegedStartService()
    explorer.startService()
    assert [u[0] for u in reactor.unixServers] == [
        f"{short_tmp}/s/hero_compute_explorer.sock"
    ]
    assert [(t[0], t[3]) for t in reactor.tcpServers] == [
        (9002, "127.0.0.1"),
        (0, "127.0.0.2"),
    ]
    assert sorted(c.getTime() for c in reactor.getDelayedCalls()) == [
        8 / SWEEPS_PER_OFFLINE,
        3600.0,  # the heap's thaw
    ]
    explorer.stopService()
    assert not reactor.getDelayedCalls()


def test_explorer_tree_starts_in_its_order_and_stops_in_reverse(short_tmp):
    """The explorer's children start in the order the tree lists them (the state is
    open before any listener binds) and stop in the reverse order, each after the one
    below it has stopped (the state store closes last)."""
    reactor = MemoryReactorClock()
    options = explorer_options(
        HERO_SOCKET_DIR=f"{short_tmp}/s", EXPLORER_STATE_DIR=f"{short_tmp}/state"
    )
    explorer = explorer_tap.makeService(options, reactor)
    seen = []
    for child in explorer:
        for step in ("privilegedStartService", "startService", "stopService"):
            original = getattr(child, step)

            def record(original=original, step=step, name=child.name):
                seen.append((step, name, explorer.state.opened))
                return original()

            setattr(child, step, record)
    names = [child.name for child in explorer]
    explorer.privilegedStartService()
    explorer.startService()
    assert [n for s, n, _ in seen if s == "privilegedStartService"] == names
    assert [n for s, n, _ in seen if s == "startService"] == names
    # Every child after "state" found it open; the Unix socket bound after it.
    assert all(opened for s, n, opened in seen if n != "state")
    assert reactor.unixServers
    seen.clear()
    d = explorer.stopService()
    assert d.called
    assert [n for s, n, _ in seen] == list(reversed(names))
    assert not explorer.state.opened


def test_node_tree(short_tmp):
    """The node's whole tree, built against a memory reactor: its listeners, its VM
    manager, its images and one heartbeat loop per explorer; the node id is written
    only at start."""
    reactor = MemoryReactorClock()
    options = node_options(
        HERO_SOCKET_DIR=f"{short_tmp}/s",
        HERO_STATE_DIR=f"{short_tmp}/st",
        NODE_TCP_ADDR="127.0.0.1:9003",
        EXPLORER_ADDRESSES="/e1.sock,tcp://10.0.0.1:9002",
    )
    node = node_tap.makeService(options, reactor)
    assert [child.name for child in node] == [
        "listeners",
        "vms",
        "images",
        "heartbeat unix:///e1.sock",
        "heartbeat tcp://10.0.0.1:9002",
    ]
    assert not os.path.exists(f"{short_tmp}/st")
    node.privilegedStartService()
    node.startService()
    assert node.node_id == open(f"{short_tmp}/st/node_id").read().strip()
    assert [u[0] for u in reactor.unixServers] == [
        f"{short_tmp}/s/hero_compute_server.sock"
    ]
    assert [(t[0], t[3]) for t in reactor.tcpServers] == [(9003, "127.0.0.1")]
    # Both explorers are due a heartbeat at once.
    assert [c.getTime() for c in reactor.getDelayedCalls()] == [0, 0]
    reactor.advance(0)
    assert reactor.unixClients[0][0] == "/e1.sock"
    assert reactor.tcpClients[0][1] == 9002
    d = node.stopService()
    for call in reactor.getDelayedCalls():
        call.cancel()
    assert d.called


def test_state_dir_too_long_is_refused():
    """A state dir whose QMP socket paths could not fit is a usage error, not a crash."""
    with pytest.raises(usage.UsageError) as e:
        node_options(HERO_STATE_DIR="/" + "d" * 80)
    assert "HERO_STATE_DIR" in str(e.value)


def test_image_dirs():
    """NODE_IMAGE_DIRS and --image-dir restrict base images; relative paths are refused."""
    assert node_options(NODE_IMAGE_DIRS="/img:/srv/images")["image-dir"] == [
        "/img",
        "/srv/images",
    ]
    assert node_options(["--image-dir", "/a"], NODE_IMAGE_DIRS="/b")["image-dir"] == ["/a"]
    with pytest.raises(usage.UsageError):
        node_options(NODE_IMAGE_DIRS="rel")


def test_node_explorer_listed_twice_on_the_command_line():
    """--explorer naming the same explorer twice is refused, as in EXPLORER_ADDRESSES."""
    with pytest.raises(usage.UsageError) as e:
        node_options(["--explorer", "/a.sock", "--explorer", "unix:///a.sock"])
    assert "twice" in str(e.value)


def test_socket_dir_may_start_with_tilde(monkeypatch):
    """HERO_SOCKET_DIR=~/x is the operator's home, as the default is."""
    monkeypatch.setenv("HOME", "/home/op")
    options = node_options(HERO_SOCKET_DIR="~/sockets")
    assert options["socket"] == "/home/op/sockets/hero_compute_server.sock"


PIN = "sha256:" + "ab" * 32


def test_tls_explorer_without_tls_listener_refuses():
    """A tls:// explorer with no NODE_TLS_ADDR refuses to start, naming what to set; it
    needs no NODE_TCP_ADDR."""
    with pytest.raises(usage.UsageError) as e:
        node_options(
            EXPLORER_ADDRESSES="tls://10.0.0.1:9004", NODE_JOIN_TOKEN="t", NODE_CA_PIN=PIN
        )
    assert "NODE_TLS_ADDR" in str(e.value) and "NODE_TCP_ADDR" not in str(e.value)
    options = node_options(
        EXPLORER_ADDRESSES="tls://10.0.0.1:9004",
        NODE_JOIN_TOKEN="t",
        NODE_CA_PIN=PIN,
        NODE_TLS_ADDR="0.0.0.0:9004",
    )
    assert options["tcp"] is None and str(options["tls"]) == "0.0.0.0:9004"
    assert options["join-token"] == "t" and options["ca-pin"] == PIN


def test_tls_without_material_or_enrollment_refuses(short_tmp):
    """With TLS but neither certificate files nor a token and pin the node refuses to
    start, naming NODE_JOIN_TOKEN, NODE_CA_PIN and hero-compute tls cert create."""
    env = dict(
        EXPLORER_ADDRESSES="tls://10.0.0.1:9004",
        NODE_TLS_ADDR="0.0.0.0:9004",
        HERO_STATE_DIR=f"{short_tmp}/st",
    )
    for extra in ({}, {"NODE_JOIN_TOKEN": "t"}, {"NODE_CA_PIN": PIN}):
        with pytest.raises(usage.UsageError) as e:
            node_options(**env, **extra)
        message = str(e.value)
        assert "NODE_JOIN_TOKEN" in message and "NODE_CA_PIN" in message
        assert "tls cert create" in message and "\n" not in message
    for name in ("c.pem", "k.pem", "ca.pem"):
        open(f"{short_tmp}/{name}", "w").close()
    options = node_options(
        ["--tls-cert", f"{short_tmp}/c.pem"],
        **env,
        NODE_TLS_KEY=f"{short_tmp}/k.pem",
        NODE_TLS_CA=f"{short_tmp}/ca.pem",
    )
    assert options["tls-files"].cert == f"{short_tmp}/c.pem"
    assert options["tls-files"].ca == f"{short_tmp}/ca.pem"


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"NODE_CA_PIN": "sha256:abc"}, "NODE_CA_PIN"),
        ({"NODE_TLS_ADDR": "9004"}, "NODE_TLS_ADDR"),
        ({"NODE_ADVERTISE_ADDR": "unix:///x", "NODE_TLS_ADDR": "0.0.0.0:1"}, "advertise"),
    ],
)
def test_node_bad_tls_env(env, needle):
    """A bad TLS setting is a usage error naming it."""
    with pytest.raises(usage.UsageError) as e:
        node_options(**env)
    assert needle in str(e.value)


def test_node_tree_with_tls(short_tmp):
    """With a tls:// explorer the tree gets a "tls" service holding that explorer's
    heartbeat loop; makeService opens and reads nothing, and a tls:// advertise address
    is accepted."""
    reactor = MemoryReactorClock()
    options = node_options(
        HERO_SOCKET_DIR=f"{short_tmp}/s",
        HERO_STATE_DIR=f"{short_tmp}/st",
        NODE_TLS_ADDR="127.0.0.1:9004",
        NODE_JOIN_TOKEN="t",
        NODE_CA_PIN=PIN,
        NODE_ADVERTISE_ADDR="tls://node.example:9004",
        EXPLORER_ADDRESSES="/e1.sock,tls://10.0.0.1:9004",
    )
    node = node_tap.makeService(options, reactor)
    assert [child.name for child in node] == [
        "listeners",
        "vms",
        "images",
        "heartbeat unix:///e1.sock",
        "tls",
    ]
    assert [child.name for child in node.getServiceNamed("tls")] == [
        "heartbeat tls://10.0.0.1:9004"
    ]
    assert [loop.address.uri for loop in node.heartbeats] == [
        "unix:///e1.sock",
        "tls://10.0.0.1:9004",
    ]
    assert not os.listdir(short_tmp)
