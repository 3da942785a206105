"""
``hero-compute state copy``: an explorer's SQLite state into a real PostgreSQL database,
everything carried, run as the operator would (the CLI in a process of its own).
"""

import hashlib
import os
import subprocess
import sys

import pytest

from hero_compute.explorer.store import Store, TokenRefused, open_store
from hero_compute.explorer.store.schema import COPY_TABLES

from .support import ROOT

NOW = 1_700_000_000.0


def sha(text):
    """The hex SHA-256 of a text."""
    return hashlib.sha256(text.encode()).hexdigest()


def cli(*args):
    """Run ``hero-compute``; the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "hero_compute.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
        timeout=120,
    )


@pytest.fixture
def sqlite_state(tmp_path):
    """An SQLite state file holding something in every table."""
    path = tmp_path / "explorer.db"
    store = Store.open(path)
    store.save_node(
        {
            "node_id": "n1",
            "name": "one",
            "socket_path": "tcp://10.0.0.1:9003",
            "transport": "tcp",
            "version": "1",
            "capacity": {"vcpus": 4},
            "usage": {},
            "vm_count": 0,
            "labels": {"zone": "a"},
            "first_seen": NOW,
            "last_seen": NOW + 5,
        }
    )
    store.bind_secret("n1", sha("s1"))
    store.mark_enrolled("n2", 0xABC, NOW)
    store.renew_serial("n2", 0xABC, 0xDEF, NOW + 1)
    store.bind_secret("n3", sha("s3"))
    store.revoke("n3", NOW + 2)
    store.revoke_serial(0x123, "n5", NOW + 3)
    store.add_token(sha("t-live"), None, NOW + 10**9)
    store.add_token(sha("t-used"), "n4", NOW + 10**9)
    store.redeem_token(sha("t-used"), NOW)
    store.add_ui_token(sha("u-live"), "ann", "operator", NOW, NOW + 10**9, 10)
    store.add_ui_token(sha("u-gone"), "bob", "viewer", NOW, NOW + 10**9, 10)
    store.revoke_ui_user("bob", NOW + 1)
    store.add_audit(
        [
            {
                "time": NOW + i,
                "explorer": "e",
                "caller": "unix:0",
                "method": m,
                "target": "n3",
                "outcome": "ok",
            }
            for i, m in enumerate(["explorer.create_token", "explorer.revoke"])
        ]
    )
    store.close()
    return path


def test_copy_carries_everything_and_refuses_a_second_time(sqlite_state, pg_server):
    """Every table arrives whole (identities, secret hashes, tokens used and unused,
    dashboard login tokens live and revoked, revocations, records, audit in order);
    the password is never printed; copying into a database that holds something is
    refused, exit 1, nothing added."""
    dsn = pg_server.new_database()
    done = cli("state", "copy", "--from", str(sqlite_state), "--to", dsn)
    assert done.returncode == 0, done.stderr
    assert pg_server.password not in done.stdout + done.stderr
    assert "1 nodes" in done.stdout and "2 audit" in done.stdout
    source, target = Store.open(sqlite_state), open_store(dsn, watch=False)
    try:
        for table, columns in COPY_TABLES.items():
            rows = source.rows(table, columns)
            assert rows and sorted(target.rows(table, columns)) == sorted(rows), table
        assert target.identity("n1").secret_sha256 == sha("s1")
        assert target.identity("n2").cert_serial == 0xDEF
        assert target.identity("n3").revoked and target.is_revoked_serial(0x123)
        assert target.bind_secret("n3", sha("s3")) is False
        with pytest.raises(TokenRefused):
            target.redeem_token(sha("t-used"), NOW)
        assert target.redeem_token(sha("t-live"), NOW) is None
        assert target.ui_token_revoked("bob", sha("u-gone"))
        assert target.redeem_ui_token(sha("u-gone"), NOW) is None
        assert target.redeem_ui_token(sha("u-live"), NOW) == (
            "ann",
            "operator",
            NOW + 10**9,
        )
        assert [e["method"] for e in target.audit()] == [
            "explorer.revoke",
            "explorer.create_token",
        ]
    finally:
        source.close()
        target.close()
    again = cli("state", "copy", "--from", str(sqlite_state), "--to", dsn)
    assert again.returncode == 1 and "not empty" in again.stderr
    assert pg_server.password not in again.stderr
    check = open_store(dsn, watch=False)
    try:
        assert len(check.audit()) == 2
    finally:
        check.close()


def test_copy_from_a_missing_file_is_refused(tmp_path, pg_server):
    """A --from file that does not exist is refused (exit 1), and none is created."""
    missing = tmp_path / "nope.db"
    done = cli("state", "copy", "--from", str(missing), "--to", pg_server.dsn())
    assert done.returncode == 1 and "no such file" in done.stderr
    assert not missing.exists()
