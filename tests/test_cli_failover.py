"""
CLI failover (CONTRACT §10): ``--explorer`` and ``HERO_EXPLORER`` take a comma list; the
CLI moves to the next explorer when one cannot be reached, and exits 2 only when none
answers.  Against a real ``twistd explorer`` and addresses where nothing listens.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from hero_compute.cli import parser

from .support import ROOT


def cli(*args, env=None):
    """Run ``hero-compute``; the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "hero_compute.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT, **(env or {})},
        timeout=60,
    )


@pytest.fixture
def explorer(twistd, short_tmp):
    """A real explorer on its Unix socket."""
    process = twistd(["explorer"], env={"HERO_SOCKET_DIR": short_tmp})
    process.unix = process.listening()[0]
    return process


@pytest.fixture
def dead_tcp():
    """A loopback TCP address where nothing listens: bound and held, never listening,
    so that a connection is refused and no other socket can take the port meanwhile (a
    port closed before use is free for anyone's listener, in the ephemeral range)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"tcp://127.0.0.1:{s.getsockname()[1]}"


def test_a_comma_list_parses_and_the_environment_is_used():
    """--explorer takes a comma list; HERO_EXPLORER is used when it is not given; a bad
    entry is a usage error naming it."""
    args = parser.complete(
        parser.build().parse_args(
            ["--explorer", "unix:///a.sock, tcp://127.0.0.1:9", "info"]
        ),
        lambda: "unix:///d.sock",
    )
    assert [a.uri for a in args.explorer] == ["unix:///a.sock", "tcp://127.0.0.1:9"]
    args = parser.complete(
        parser.build().parse_args(["info"]),
        lambda: "unix:///d.sock",
        {"HERO_EXPLORER": "unix:///b.sock,unix:///c.sock"},
    )
    assert [a.uri for a in args.explorer] == ["unix:///b.sock", "unix:///c.sock"]
    with pytest.raises(ValueError, match="HERO_EXPLORER.*http://x"):
        parser.complete(
            parser.build().parse_args(["info"]),
            lambda: "unix:///d.sock",
            {"HERO_EXPLORER": "unix:///b.sock,http://x"},
        )


def test_the_next_explorer_answers(explorer, dead_tcp, short_tmp):
    """With the first explorers unreachable (no socket, a closed port), the command is
    answered by the next one, from --explorer and from HERO_EXPLORER alike."""
    listed = f"unix://{short_tmp}/missing.sock,{dead_tcp},{explorer.unix}"
    done = cli("--explorer", listed, "info", "--json")
    assert done.returncode == 0, done.stderr
    assert explorer.unix in json.loads(done.stdout)["listeners"]
    done = cli("nodes", "--json", env={"HERO_EXPLORER": listed})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_exit_2_only_when_none_answers(dead_tcp, short_tmp):
    """When no explorer of the list can be reached: exit 2, naming every one tried."""
    listed = f"unix://{short_tmp}/missing.sock,{dead_tcp}"
    done = cli("--explorer", listed, "info")
    assert done.returncode == 2
    assert "missing.sock" in done.stderr and dead_tcp in done.stderr
