"""
The CLI's pieces without processes: sizes, times, paging, exit codes, global options.
"""

import pytest
from twisted.internet import defer

from hero_compute.cli import exits, parser
from hero_compute.cli.nodes import fetch_nodes
from hero_compute.cli.units import ago, disk_gb, format_mb, memory_mb
from hero_compute.rpc.addresses import parse_address
from hero_compute.rpc.errors import (
    CallTimedOut,
    ConnectionRefused,
    InvalidParams,
    InvalidVmState,
    MethodNotFound,
    NodeNotFound,
    NodeOffline,
    NodeUnreachable,
    RefusedByPolicy,
    VmNotFound,
)


@pytest.mark.parametrize(
    "text, mb",
    [
        ("512M", 512),
        ("512", 512),
        ("2G", 2048),
        ("1.5G", 1536),
        ("1T", 1024 * 1024),
        ("64MiB", 64),
        ("2gb", 2048),
    ],
)
def test_memory_sizes(text, mb):
    """Memory sizes take M, G, T (binary) and a bare number of MiB."""
    assert memory_mb(text) == mb


@pytest.mark.parametrize(
    "text, gb", [("10G", 10), ("10", 10), ("1T", 1024), ("2048M", 2), ("10GiB", 10)]
)
def test_disk_sizes(text, gb):
    """Disk sizes take M, G, T (binary) and a bare number of GiB."""
    assert disk_gb(text) == gb


@pytest.mark.parametrize(
    "parse, text, words",
    [
        (memory_mb, "512K", "M, G or T"),
        (memory_mb, "abc", "not a size"),
        (memory_mb, "0M", "more than zero"),
        (disk_gb, "512M", "whole number of GiB"),
        (memory_mb, "1.0001M", "whole number of MiB"),
        (disk_gb, "-1G", "not a size"),
    ],
)
def test_bad_sizes(parse, text, words):
    """A size that is malformed, zero or not whole in the field's unit says so."""
    with pytest.raises(ValueError, match=words):
        parse(text)


def test_format_and_ago():
    """Sizes and ages read like an operator writes them."""
    assert [format_mb(v) for v in (0, 64, 1536, 2 * 1024 * 1024)] == [
        "0",
        "64M",
        "1.5G",
        "2T",
    ]
    now = 1_000_000.0
    assert [ago(now - d, now) for d in (3, 180, 7200, 36 * 3600, 3 * 86400)] == [
        "3 s ago",
        "3 min ago",
        "2 h ago",
        "36 h ago",
        "3 d ago",
    ]
    assert ago(None, now) == "never"


def run(coroutine):
    """The result of a coroutine whose awaits all fire at once."""
    d = defer.ensureDeferred(coroutine)
    results = []
    d.addBoth(results.append)
    assert results, "the coroutine waited on something"
    if isinstance(results[0], Exception) or hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def test_fetch_nodes_pages_through_query_nodes():
    """All pages of explorer.query_nodes are read, the filters passed on."""
    fleet = [{"node_id": f"n{i}"} for i in range(5)]
    calls = []

    async def call(method, params):
        calls.append((method, params))
        start = int(params.get("cursor") or 0)
        end = start + params["limit"]
        return {"nodes": fleet[start:end], "next_cursor": str(end) if end < 5 else None}

    nodes = run(fetch_nodes(call, "online", {"zone": "a"}, page=2))
    assert nodes == fleet
    assert [p.get("cursor") for _, p in calls] == [None, "2", "4"]
    assert all(
        m == "explorer.query_nodes"
        and p["status"] == "online"
        and p["labels"] == {"zone": "a"}
        for m, p in calls
    )


def test_fetch_nodes_falls_back_to_list_nodes():
    """An explorer without query_nodes (-32601) is asked list_nodes; labels match here."""
    listed = [
        {"node_id": "a", "labels": {"zone": "a", "x": "1"}},
        {"node_id": "b", "labels": {"zone": "b"}},
        {"node_id": "c"},
    ]

    async def call(method, params):
        if method == "explorer.query_nodes":
            raise MethodNotFound("no such method")
        assert (method, params) == ("explorer.list_nodes", {"status": "online"})
        return listed

    assert run(fetch_nodes(call, "online", {"zone": "a"})) == listed[:1]
    assert run(fetch_nodes(call, "online")) == listed


ADDRESS = parse_address("unix:///tmp/e.sock")


@pytest.mark.parametrize(
    "error, code, words",
    [
        (ConnectionRefused(ADDRESS, "refused"), 2, "is the explorer running"),
        (CallTimedOut(ADDRESS, "no response within 1 s"), 2, "timed out"),
        (NodeOffline("node n is offline"), 2, "node process running"),
        (NodeUnreachable("node n at x is unreachable"), 2, "-32003"),
        (NodeNotFound("no node 'n'"), 3, "hero-compute nodes"),
        (VmNotFound("no VM 'v'"), 3, "vm list"),
        (RefusedByPolicy("not you"), 4, "refused by policy"),
        (
            InvalidParams("missing name, vcpus", data={"missing": ["name"]}),
            1,
            "missing name",
        ),
        (InvalidVmState("it is stopped"), 1, "-32005"),
        (exits.Failure("stuck", exits.UNREACHABLE), 2, "stuck"),
    ],
)
def test_each_failure_has_its_exit_code(error, code, words):
    """Each kind of failure maps to its documented exit code and says what to do."""
    got, message = exits.explain(error, "unix:///tmp/e.sock")
    assert got == code and words in message


@pytest.mark.parametrize(
    "argv",
    [
        ["--json", "nodes"],
        ["nodes", "--json"],
        ["vm", "--json", "list"],
        ["vm", "list", "n1", "--json"],
    ],
)
def test_global_options_anywhere(argv):
    """--json means the same before or after the command; other globals keep defaults."""
    args = parser.complete(parser.build().parse_args(argv), lambda: "unix:///tmp/e.sock")
    assert args.json is True and args.table is False and args.timeout is None
    assert args.explorer[0].uri == "unix:///tmp/e.sock"


def test_option_after_command_wins_only_when_given():
    """--timeout before the command is not reset by the command's own parser."""
    args = parser.complete(
        parser.build().parse_args(["--timeout", "3", "nodes"]), lambda: "unix:///tmp/e.sock"
    )
    assert args.timeout == 3.0
