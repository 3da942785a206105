"""
Listen records: what the taps make of addresses, the endpoints built from them (no
endpoint string in between), and the ``--listen`` strings read once at the boundary.
"""

import pytest
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock

from hero_compute.rpc.addresses import parse_listen
from hero_compute.rpc.listen import Listen
from hero_compute.rpc.listeners import Listeners, StartupFailed


def test_unix_record_listens_with_mode_and_lock_file():
    """A Unix record binds its path, mode 0660, with Twisted's pid lock file."""
    reactor = MemoryReactorClock()
    Listen.unix("/run/h/x.sock", "EXPLORER_SOCKET").server_endpoint(reactor).listen(
        Factory()
    )
    [(path, _, backlog, mode, want_pid)] = reactor.unixServers
    assert (path, backlog, mode, want_pid) == ("/run/h/x.sock", 50, 0o660, True)


def test_tls_record_listens_on_tcp_and_says_tls():
    """A TLS record's endpoint is TCP (the TLS layer is its factory); it reads tls://."""
    reactor = MemoryReactorClock()
    listen = Listen.tls(parse_listen("[::1]:9004"), "NODE_TLS_ADDR")
    listen.server_endpoint(reactor).listen(Factory())
    [(port, _, backlog, interface)] = reactor.tcpServers
    assert (port, backlog, interface) == (9004, 4096, "::1")
    assert listen.secure and listen.where == "tls://[::1]:9004"
    assert listen.source == "NODE_TLS_ADDR"


@pytest.mark.parametrize(
    "description, path, where",
    [
        ("unix:/run/a.sock:mode=600", "/run/a.sock", "unix:///run/a.sock"),
        (r"unix:address=/run/a\:b.sock", "/run/a:b.sock", "unix:///run/a:b.sock"),
        ("tcp:9100:interface=127.0.0.2", None, "tcp://127.0.0.2:9100"),
        (r"tcp6:port=0:interface=\:\:1", None, "tcp://[::1]:0"),
        ("ssl:9443:privateKey=k.pem", None, "tls://0.0.0.0:9443"),
        ("systemd:domain=INET:index=0", None, "systemd:domain=INET:index=0"),
    ],
)
def test_listen_strings_are_read_once(description, path, where):
    """A --listen string is read once into its record: the socket path (to clear a
    stale socket), and where it listens (for messages); it is kept to build from."""
    listen = Listen.endpoint(description)
    assert (listen.kind, listen.path, listen.where) == ("endpoint", path, where)
    assert listen.description == description and listen.source == "--listen"


def test_unusable_listen_string_is_a_startup_failure():
    """A --listen string Twisted cannot use fails start-up, naming it, before binding."""
    with pytest.raises(StartupFailed, match="--listen nonsense:1"):
        Listeners(Factory(), ["nonsense:1"], reactor=MemoryReactorClock())


def test_listeners_take_records_and_strings():
    """Listeners bind records and --listen strings alike, in the order given."""
    reactor = MemoryReactorClock()
    listeners = Listeners(
        Factory(),
        [Listen.tcp(parse_listen("127.0.0.1:0"), "EXPLORER_TCP_ADDR"), "tcp:0"],
        reactor=reactor,
    )
    listeners.startService()
    assert [(t[0], t[3]) for t in reactor.tcpServers] == [(0, "127.0.0.1"), (0, "")]
    assert len(listeners.bound) == 2


@pytest.mark.parametrize(
    "description, expected",
    [
        ("unix:/run/a.sock", ("/run/a.sock", 50, 0o660, True)),
        ("unix:/run/a.sock:mode=600", ("/run/a.sock", 50, 0o600, True)),
        ("unix:/run/a.sock:640:7:0", ("/run/a.sock", 7, 0o640, False)),
        (r"unix:address=/run/a\:b.sock:backlog=9", ("/run/a:b.sock", 9, 0o660, True)),
    ],
)
def test_listen_unix_string_is_0660_unless_narrowed(description, expected):
    """A --listen unix: string binds mode 0660 (not Twisted's 0666) unless its mode=
    narrows it; its backlog and lockfile are Twisted's."""
    reactor = MemoryReactorClock()
    Listen.endpoint(description).server_endpoint(reactor).listen(Factory())
    [(path, _, backlog, mode, want_pid)] = reactor.unixServers
    assert (path, backlog, mode, want_pid) == expected


@pytest.mark.parametrize(
    "description, needle",
    [
        ("unix:/run/a.sock:mode=666", "mode=666 lets other users connect"),
        ("unix:/run/a.sock:mode=4660", "mode=4660 lets other users connect"),
        ("unix:/run/a.sock:mode=rw", "mode=rw is no octal mode"),
        ("unix:/run/a.sock:owner=root", "unknown argument owner="),
        ("unix:/run/a.sock:600:50:1:extra", "unexpected argument 'extra'"),
    ],
)
def test_listen_unix_string_for_others_fails_startup(description, needle):
    """A --listen unix: string whose mode lets other users in, or that Twisted would
    not take, fails start-up naming it, before anything is bound."""
    reactor = MemoryReactorClock()
    with pytest.raises(StartupFailed, match=f"--listen {description}: {needle}"):
        Listeners(Factory(), [description], reactor=reactor)
    assert reactor.unixServers == []
