"""
The dashboard's login tokens in the explorer's store (CONTRACT §11, §10), from the
outside: real ``twistd explorer`` processes with their dashboards, on an SQLite state
directory that outlives them, and two of them on one real PostgreSQL database.
"""

import glob
import hashlib
import os
import sqlite3
import time

import psycopg
import pytest

from hero_compute.explorer.store.schema import MIGRATIONS, SCHEMA

from .pgserver import PgServer
from .support import make_short_tmp, past, remove_tmp, result, rpc, wait_for
from .test_ui import fetch, login, start_explorer
from .test_ui_operator import cli, make_login


def token_of(url):
    """The login token a login URL carries."""
    return url.split("token=", 1)[1]


def at(dashboard, token):
    """The login URL of ``token`` at another explorer's dashboard (its base URL)."""
    return f"{dashboard.split('/?', 1)[0]}/?token={token}"


def role_of(url, cookie):
    """The role the page is served for with ``cookie``, or the status when refused."""
    status, _, page = fetch(url, path="/", headers={"Cookie": cookie})
    if status != 200:
        return status
    return "operator" if b'content="operator"' in page else "viewer"


def state_bytes(state_dir):
    """Every byte of the explorer's database files (the file, its WAL and shm)."""
    data = b""
    for name in glob.glob(os.path.join(state_dir, "explorer.db*")):
        with open(name, "rb") as f:
            data += f.read()
    return data


@pytest.fixture
def dirs():
    """``dirs()``: a new short temporary directory, removed at the end."""
    made = []

    def new():
        made.append(make_short_tmp())
        return made[-1]

    yield new
    for path in made:
        remove_tmp(path)


def test_login_token_survives_a_restart_and_is_stored_hashed(twistd, short_tmp):
    """A login token made before a restart logs in after it (same state directory);
    one past its ttl is refused; the state file holds the tokens' hashes, never a
    token; the browsers' sessions were the old process's and are gone."""
    process, unix, _, _ = start_explorer(twistd, short_tmp)
    url = make_login(unix, "carol", "operator")
    short = make_login(unix, "carol", "viewer", "1")
    # Made before the CLI printed it: over a second from now, it is past its ttl.
    expires_by = time.time() + 1
    used = make_login(unix, "dave", "viewer")
    cookie = login(used)
    assert role_of(used, cookie) == "viewer"
    process.stop()
    state = f"{short_tmp}/es"
    on_disk = state_bytes(state)
    for u in (url, short, used):
        assert token_of(u).encode() not in on_disk
    assert hashlib.sha256(token_of(url).encode()).hexdigest().encode() in on_disk

    # The dashboard listens on a new port: the same tokens, at its new address.
    _, unix, _, ui = start_explorer(twistd, short_tmp)
    past(expires_by)  # the short token's ttl (a restart takes most of it)
    listed = result(unix, "explorer.ui_token_list")
    assert [(t["user"], t["role"]) for t in listed["tokens"]] == [("carol", "operator")]
    assert listed["sessions"] == []
    assert role_of(ui, login(at(ui, token_of(url)))) == "operator"
    assert fetch(at(ui, token_of(short)))[0] == 401
    assert fetch(at(ui, token_of(used)))[0] == 401  # spent before the restart
    assert role_of(ui, cookie) == 401  # sessions are per process
    for u in (url, short, used):
        assert token_of(u).encode() not in state_bytes(state)


def test_old_state_directory_is_migrated_and_kept(twistd, short_tmp):
    """An explorer started on a state directory of schema 3 migrates it, keeps its
    node records and audit log, and takes login tokens."""
    state = f"{short_tmp}/es"
    os.makedirs(state, mode=0o700)
    raw = sqlite3.connect(f"{state}/explorer.db")
    for statement in (*SCHEMA, *MIGRATIONS[1], *MIGRATIONS[2]):
        raw.execute(statement)
    now = time.time()
    raw.execute(
        "INSERT INTO nodes VALUES ('n-old', 'old one', 'unix:///tmp/hc-nowhere.sock', "
        "'unix', '1', '{}', '{}', 0, '{\"zone\": \"a\"}', ?, ?)",
        (now - 60, now - 30),
    )
    raw.execute(
        "INSERT INTO audit (time, explorer, caller, method, target, outcome) "
        "VALUES (?, 'e0', 'unix:0', 'explorer.revoke', 'n-gone', 'ok')",
        (now - 10,),
    )
    raw.execute("PRAGMA user_version = 3")
    raw.commit()
    raw.close()
    _, unix, _, _ = start_explorer(twistd, short_tmp)
    node = result(unix, "explorer.get_node", {"node_id": "n-old"})
    assert node["name"] == "old one" and node["labels"] == {"zone": "a"}
    entries = result(unix, "explorer.audit", {"node_id": "n-gone"})["entries"]
    assert [(e["explorer"], e["method"]) for e in entries] == [("e0", "explorer.revoke")]
    url = make_login(unix, "erin", "operator")
    assert role_of(url, login(url)) == "operator"
    with sqlite3.connect(f"{state}/explorer.db") as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == 4


def test_shared_database_login_at_b_revoke_at_a(twistd, pg_server, dirs):
    """With two explorers on one PostgreSQL database, a token made at A logs in at B
    (once in the whole fleet); revoking the user at A refuses B's session and the
    user's unused token at B within 2 s; the table holds hashes, never a token."""
    dsn = pg_server.new_database()
    env = {"EXPLORER_DATABASE": dsn}
    _, unix_a, _, ui_a = start_explorer(twistd, dirs(), env=env)
    _, unix_b, _, ui_b = start_explorer(twistd, dirs(), env=env)
    url = make_login(unix_a, "frank", "operator")
    spare = make_login(unix_a, "frank", "viewer")
    other = make_login(unix_a, "gina", "viewer")
    cookie = login(at(ui_b, token_of(url)))
    assert role_of(ui_b, cookie) == "operator"
    assert fetch(url)[0] == 401  # spent at B: refused at A
    gina = login(at(ui_b, token_of(other)))
    listed = result(unix_b, "explorer.ui_token_list")
    assert [(t["user"], t["role"]) for t in listed["tokens"]] == [("frank", "viewer")]

    done = cli("ui", "token", "revoke", "--user", "frank", explorer=unix_a)
    assert done.returncode == 0 and "1 tokens and 0 sessions ended" in done.stdout
    started = time.monotonic()
    wait_for(lambda: role_of(ui_b, cookie) == 401, timeout=2.0, what="B's session ended")
    print(f"revocation at A seen at B after {time.monotonic() - started:.2f} s")
    assert fetch(at(ui_b, token_of(spare)))[0] == 401
    assert role_of(ui_b, gina) == "viewer"

    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT * FROM ui_tokens").fetchall()
    table = repr(rows)
    assert len(rows) == 3
    for u in (url, spare, other):
        assert token_of(u) not in table
        assert hashlib.sha256(token_of(u).encode()).hexdigest() in table

    def audited():
        entries = result(unix_b, "explorer.audit", {})["entries"]
        return [(e["method"], e["target"], e["outcome"]) for e in entries]

    # A's entries, read at B once A has written them (in batches, each second).
    wait_for(
        lambda: ("explorer.ui_token_revoke", "frank", "ok") in audited(),
        timeout=5.0,
        what="A's revocation in the shared audit log",
    )
    assert audited().count(("explorer.ui_token_create", "frank", "ok")) == 2
    assert pg_server.password not in table


def test_database_down_refuses_token_calls_and_logins(twistd, dirs):
    """With the database down, making, listing and revoking login tokens is -32007 and
    a login is 503 with its token left unspent: it logs in once the database is back;
    a session made before goes on."""
    server = PgServer()
    server.init()
    server.start()
    try:
        _, unix, _, ui = start_explorer(
            twistd, dirs(), env={"EXPLORER_DATABASE": server.new_database()}
        )
        url = make_login(unix, "hank", "operator")
        before = login(make_login(unix, "hank", "viewer"))
        server.stop()
        wait_for(
            lambda: result(unix, "explorer.info")["store"]["state"] == "down",
            timeout=10.0,
            what="the store down",
        )
        for method, params in [
            ("explorer.ui_token_create", {"user": "ivy", "role": "viewer"}),
            ("explorer.ui_token_list", {}),
            ("explorer.ui_token_revoke", {"user": "hank"}),
        ]:
            assert rpc(unix, method, params)["error"]["code"] == -32007, method
        status, _, body = fetch(url)
        assert status == 503 and b"state store is unavailable" in body
        assert role_of(ui, before) == "viewer"
        server.start()
        wait_for(
            lambda: result(unix, "explorer.info")["store"]["state"] == "up",
            timeout=15.0,
            what="the store up again",
        )
        assert role_of(ui, login(url)) == "operator"
    finally:
        server.remove()
