"""
Attacks on this round's surface (console and event WebSockets, image imports, the audit
log, the PostgreSQL store) that worked before their fix, each made against real
processes and shown refused, with nothing changed.
"""

import json

import pytest

from .support import result, rpc
from .test_startup_errors import assert_clean_failure, run_twistd

PASSWORD = "s3cr%zzetpw"


@pytest.mark.parametrize(
    "uri",
    [
        # libpq echoes a bad percent-encoded token, and the whole URI for a bad
        # bracketed host, in its parse errors.
        f"postgresql://hero:{PASSWORD}@127.0.0.1:1/fleet",
        f"postgresql://hero:{PASSWORD}@[127.0.0.1:1/fleet",
    ],
)
def test_unparsable_database_uri_never_prints_its_password(tmp_path, uri):
    """An EXPLORER_DATABASE URI libpq cannot parse fails start-up without its password."""
    status, output = run_twistd(
        ["explorer"],
        {
            "HERO_SOCKET_DIR": str(tmp_path),
            "EXPLORER_STATE_DIR": str(tmp_path / "state"),
            "EXPLORER_DATABASE": uri,
        },
    )
    assert "s3cr" not in output, output
    assert_clean_failure(status, output, "postgresql://")


def test_proxied_image_import_is_audited_and_entries_stay_small(twistd, short_tmp):
    """A proxied ``image.import`` is recorded like a VM write, and a caller's huge
    method name or vm_id cannot write a huge audit entry."""
    explorer = twistd(
        ["explorer"],
        env={
            "HERO_SOCKET_DIR": short_tmp,
            "EXPLORER_STATE_DIR": f"{short_tmp}/state",
            "EXPLORER_TCP_ADDR": "127.0.0.1:0",
        },
    )
    tcp = next(u for u in explorer.listening(count=2) if u.startswith("tcp://"))
    unix = next(u for u in explorer.listening(count=2) if u.startswith("unix://"))
    pull = {"url": "http://example.org/a.img", "name": "a.img", "sha256": "0" * 64}
    answer = rpc(
        tcp,
        "explorer.call",
        {"node_id": "victim", "method": "image.import", "params": pull},
    )
    assert answer["error"]["code"] == -32001
    huge = "x" * 500_000
    answer = rpc(
        tcp,
        "explorer.call",
        {"node_id": "victim", "method": "vm." + huge, "params": {"vm_id": huge}},
    )
    assert answer["error"]["code"] == -32001
    entries = result(unix, "explorer.audit", {"node_id": "victim"})["entries"]
    assert [(e["method"], e["target"]) for e in entries][1] == ("image.import", "victim")
    assert entries[1]["caller"].startswith("tcp:127.0.0.1:")
    assert entries[0]["method"].startswith("vm.xxx")
    assert len(json.dumps(entries)) < 2000
