"""
The explorer's state store: one suite over both backends (SQLite in a temporary
directory, and a real PostgreSQL server started for the session), and the SQLite file's
own properties.
"""

import hashlib
import sqlite3
import stat
import threading
import time

import pytest
from zope.interface.verify import verifyObject

from hero_compute.explorer.store import (
    NODE_FIELDS,
    SCHEMA_VERSION,
    Identity,
    IStore,
    Store,
    StoreError,
    TokenRefused,
    needs_save,
    open_store,
)
from hero_compute.rpc.errors import StoreUnavailable

NOW = 1_700_000_000.0


def sha(text):
    """The hex SHA-256 of a text."""
    return hashlib.sha256(text.encode()).hexdigest()


def node(node_id="n1", **changes):
    """A node record as the registry would hand it over."""
    record = {
        "node_id": node_id,
        "name": node_id,
        "socket_path": "tcp://10.0.0.1:9003",
        "transport": "tcp",
        "version": "1",
        "capacity": {"vcpus": 4},
        "usage": {"vcpus": 1},
        "vm_count": 1,
        "labels": {"zone": "a"},
        "first_seen": NOW,
        "last_seen": NOW + 5,
    }
    record.update(changes)
    return record


@pytest.fixture
def path(tmp_path):
    """Where the state file goes: in a directory that does not exist yet."""
    return tmp_path / "state" / "explorer.db"


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, path):
    """Where a store lives: an SQLite file, or a new database on the test server."""
    if request.param == "sqlite":
        return path
    return request.getfixturevalue("pg_server").new_database()


@pytest.fixture
def store(location):
    """An open store of each backend, closed after the test."""
    s = open_store(location)
    yield s
    s.close()


@pytest.fixture
def sqlite_store(path):
    """An open SQLite store, closed after the test (for what only a file has)."""
    s = Store.open(path)
    yield s
    s.close()


def where(store):
    """The location a store was opened from (for PostgreSQL, with its password)."""
    return store._dsn if store.shared else store.path


def reopen(store):
    """Close a store and open it again, as a restarted explorer would."""
    store.close()
    return open_store(where(store))


def test_both_backends_provide_istore(store):
    """Each backend provides IStore, so either stands in wherever the other does."""
    assert verifyObject(IStore, store)


def test_file_and_directory_are_private(sqlite_store, path):
    """The state file is created 0600 and its missing directory 0700."""
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_wal_mode_and_schema_version(sqlite_store, path):
    """The file is in WAL mode and carries the schema version."""
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        raw.close()


def test_nodes_survive_reopen(store):
    """Saved node records come back, whole and in node id order, after a reopen."""
    store.save_node(node("n2"))
    store.save_node({**node("n1"), "left": True, "status": "online"})
    store = reopen(store)
    try:
        assert store.load_nodes() == [node("n1"), node("n2")]
        assert set(store.load_nodes()[0]) == set(NODE_FIELDS)
    finally:
        store.close()


def test_save_node_replaces_and_forget_node_removes(store):
    """Saving again replaces the record; forgetting drops it and says whether it was
    there."""
    store.save_node(node())
    store.save_node(node(socket_path="tcp://10.0.0.2:9003"))
    assert [r["socket_path"] for r in store.load_nodes()] == ["tcp://10.0.0.2:9003"]
    assert store.forget_node("n1") is True
    assert store.forget_node("n1") is False
    assert store.load_nodes() == []


def test_touch_nodes_only_moves_last_seen_forward(store):
    """touch_nodes records newer last_seen times and ignores older ones and unknown ids."""
    store.save_node(node("n1"))
    store.save_node(node("n2"))
    store.touch_nodes({"n1": NOW + 100, "n2": NOW, "ghost": NOW})
    seen = {r["node_id"]: r["last_seen"] for r in store.load_nodes()}
    assert seen == {"n1": NOW + 100, "n2": NOW + 5}


def test_a_bad_row_does_not_hide_the_fleet(sqlite_store, path):
    """A node row whose JSON is damaged is skipped; the others load."""
    sqlite_store.save_node(node("n1"))
    sqlite_store.save_node(node("n2"))
    raw = sqlite3.connect(path)
    raw.execute("UPDATE nodes SET labels = '{nope' WHERE node_id = 'n1'")
    raw.commit()
    raw.close()
    assert [r["node_id"] for r in sqlite_store.load_nodes()] == ["n2"]


def test_needs_save_only_for_durable_changes():
    """A record needs saving on first sight and on durable changes, not on usage."""
    assert needs_save(None, node())
    assert not needs_save(node(), node(usage={"vcpus": 3}, vm_count=3, last_seen=NOW + 9))
    assert needs_save(node(), node(socket_path="tcp://10.0.0.9:9003"))
    assert needs_save(node(), node(labels={"zone": "b"}))
    assert needs_save(node(), node(name="renamed"))


def test_secret_binds_on_first_sight(store):
    """The first secret binds the id; the same one is accepted and another refused."""
    assert store.identity("n1") is None
    assert store.bind_secret("n1", sha("s1")) is True
    assert store.bind_secret("n1", sha("s1")) is True
    assert store.bind_secret("n1", sha("s2")) is False
    assert store.identity("n1") == Identity("n1", sha("s1"), False, None, None, False)


def test_store_refuses_a_secret_in_clear(store):
    """A value that is not a SHA-256 hex digest is refused, so no secret lands in clear."""
    with pytest.raises(ValueError, match="SHA-256"):
        store.bind_secret("n1", "a" * 63 + "G")
    with pytest.raises(ValueError, match="SHA-256"):
        store.add_token("abcdef.0123456789abcdef0123456789abcdef", None, NOW)


def test_forget_identity_unbinds_the_secret(store):
    """After the id is forgotten, a new secret can bind it."""
    store.bind_secret("n1", sha("s1"))
    store.forget_identity("n1")
    assert store.identity("n1") is None
    assert store.bind_secret("n1", sha("s2")) is True


def test_redeem_is_single_use(store):
    """A token redeems once, returning its node id; the second redeem is refused."""
    store.add_token(sha("t1"), "n1", NOW + 60)
    assert store.peek_token(sha("t1"), NOW) == "n1"
    assert store.redeem_token(sha("t1"), NOW) == "n1"
    with pytest.raises(TokenRefused):
        store.redeem_token(sha("t1"), NOW)
    with pytest.raises(TokenRefused):
        store.peek_token(sha("t1"), NOW)


def test_token_naming_no_node_redeems_to_none(store):
    """A token naming no node id redeems to None."""
    store.add_token(sha("t1"), None, NOW + 60)
    assert store.redeem_token(sha("t1"), NOW) is None


def test_expired_token_is_refused_and_purged(sqlite_store, path):
    """An expired token is refused, and redeeming purges expired rows."""
    sqlite_store.add_token(sha("old"), None, NOW + 60)
    sqlite_store.add_token(sha("new"), None, NOW + 600)
    with pytest.raises(TokenRefused):
        sqlite_store.peek_token(sha("old"), NOW + 60)
    with pytest.raises(TokenRefused):
        sqlite_store.redeem_token(sha("old"), NOW + 60)
    with pytest.raises(TokenRefused):
        sqlite_store.redeem_token(sha("unknown"), NOW + 60)
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("SELECT token_hash FROM tokens").fetchall() == [(sha("new"),)]
    finally:
        raw.close()


def test_used_token_stays_used_after_reopen(store):
    """A redeemed token is still refused after a restart."""
    store.add_token(sha("t1"), None, NOW + 60)
    store.redeem_token(sha("t1"), NOW)
    store = reopen(store)
    try:
        with pytest.raises(TokenRefused):
            store.redeem_token(sha("t1"), NOW)
    finally:
        store.close()


def test_concurrent_redeems_from_two_connections(store):
    """Of several threads, each with its own connection, only one redeems a token."""
    store.add_token(sha("t1"), "n1", NOW + 60)
    threads, start, results = 8, threading.Barrier(8), []

    def attempt():
        mine = open_store(where(store))
        try:
            start.wait()
            mine.redeem_token(sha("t1"), NOW)
            results.append("ok")
        except TokenRefused:
            results.append("refused")
        finally:
            mine.close()

    workers = [threading.Thread(target=attempt) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert sorted(results) == ["ok"] + ["refused"] * (threads - 1)


def test_redeem_holds_the_write_lock_from_the_start(sqlite_store, monkeypatch):
    """A redeem that starts while another is mid-transaction waits, then is refused
    cleanly."""
    sqlite_store.add_token(sha("t1"), "n1", NOW + 60)
    inside, begun, results = threading.Event(), threading.Event(), {}
    purge = Store._purge_tokens

    def slow_purge(self, now):
        purge(self, now)
        if threading.current_thread().name == "first":
            inside.set()
            # The transaction is held open until the second redeem has begun its own.
            begun.wait(5)
            # fixed wait: from its BEGIN to its wait on the lock, for which SQLite has
            # no hook (no statement runs while it waits)
            time.sleep(0.05)

    monkeypatch.setattr(Store, "_purge_tokens", slow_purge)

    def attempt(name):
        mine = Store.open(sqlite_store.path)
        try:
            if name == "second":
                inside.wait(5)
                # Told at the start of each statement, before it takes any lock.
                mine._db.set_trace_callback(
                    lambda sql: sql.startswith("BEGIN") and begun.set()
                )
            results[name] = mine.redeem_token(sha("t1"), NOW)
        except (TokenRefused, sqlite3.Error) as e:
            results[name] = e
        finally:
            mine.close()

    workers = [
        threading.Thread(target=attempt, args=(n,), name=n) for n in ("first", "second")
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert results["first"] == "n1"
    assert isinstance(results["second"], TokenRefused)


def test_enrollment_records_serial_and_revokes_earlier_ones(store):
    """Enrolling records the serial; enrolling again revokes the earlier certificate."""
    big = 2**158 + 12345  # X.509 serials do not fit SQLite integers
    store.bind_secret("n1", sha("s1"))
    store.mark_enrolled("n1", big, NOW)
    assert store.identity("n1") == Identity("n1", sha("s1"), True, big, None, False)
    store.mark_enrolled("n1", 7, NOW)
    assert store.is_revoked_serial(big)
    assert not store.is_revoked_serial(7)


def test_renew_serial_is_compare_and_swap(store):
    """Renewal swaps only from the current serial, keeps it as previous, revokes older."""
    store.mark_enrolled("n1", 1, NOW)
    assert store.renew_serial("n1", 1, 2, NOW)
    assert not store.renew_serial("n1", 1, 3, NOW)
    assert store.renew_serial("n1", 2, 4, NOW)
    identity = store.identity("n1")
    assert (identity.cert_serial, identity.previous_serial) == (4, 2)
    assert store.is_revoked_serial(1)
    assert not store.is_revoked_serial(2)


def test_renew_serial_adopts_an_offline_certificate(store):
    """An id that never enrolled becomes enrolled by renewing its offline certificate."""
    assert store.renew_serial("n1", 10, 11, NOW)
    assert store.identity("n1") == Identity("n1", None, True, 11, 10, False)


def test_revoke_refuses_serials_and_secret_and_survives_reopen(store):
    """Revocation refuses the certificate and the secret, and a restart keeps it."""
    store.bind_secret("n1", sha("s1"))
    store.mark_enrolled("n1", 5, NOW)
    store.renew_serial("n1", 5, 6, NOW)
    store.revoke("n1", NOW)
    store = reopen(store)
    try:
        assert store.is_revoked_serial(5) and store.is_revoked_serial(6)
        assert store.identity("n1") == Identity("n1", None, False, None, None, True)
        assert store.bind_secret("n1", sha("s1")) is False
        assert store.bind_secret("n1", sha("s2")) is False
        assert store.renew_serial("n1", 6, 7, NOW) is False
    finally:
        store.close()


def test_removal_never_undoes_revocation(store):
    """Forgetting a revoked id keeps it revoked, and its old secret stays refused
    anywhere."""
    store.bind_secret("n1", sha("s1"))
    store.revoke("n1", NOW)
    store.forget_identity("n1")
    assert store.identity("n1").revoked
    assert store.bind_secret("n2", sha("s1")) is False


def test_enrolling_lifts_revocation_for_the_new_certificate_only(store):
    """A revoked id that enrolls again is no longer revoked; its old serial still is."""
    store.mark_enrolled("n1", 5, NOW)
    store.revoke("n1", NOW)
    store.mark_enrolled("n1", 9, NOW)
    assert store.identity("n1") == Identity("n1", None, True, 9, None, False)
    assert store.is_revoked_serial(5)
    assert not store.is_revoked_serial(9)


def test_open_twice_in_a_row_and_at_once(path):
    """Opening, closing and opening again works, as do two connections at once."""
    first = Store.open(path)
    first.save_node(node())
    first.close()
    first.close()
    second, third = Store.open(path), Store.open(path)
    try:
        assert second.load_nodes() == third.load_nodes() == [node()]
    finally:
        second.close()
        third.close()


def test_not_a_database_is_a_clear_error(tmp_path):
    """A file that is not SQLite is refused with a message naming it."""
    bogus = tmp_path / "explorer.db"
    bogus.write_bytes(b"this is not a database, just some text " * 100)
    with pytest.raises(StoreError, match="not an SQLite database"):
        Store.open(bogus)
    assert bogus.read_bytes().startswith(b"this is not a database")


def test_newer_schema_is_refused(path):
    """A file from a newer schema version is refused rather than misread."""
    Store.open(path).close()
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(StoreError, match="newer hero_compute"):
        Store.open(path)


def test_foreign_database_is_refused(tmp_path):
    """An SQLite file of some other program is not written into."""
    other = tmp_path / "other.db"
    raw = sqlite3.connect(other)
    raw.execute("CREATE TABLE accounts (id INTEGER)")
    raw.close()
    with pytest.raises(StoreError, match="not hero_compute"):
        Store.open(other)


def test_records_are_written_a_chunk_per_reactor_turn(path):
    """
    A fleet's worth of new records is written :data:`FLUSH_CHUNK` per transaction, the
    rest left to a later reactor turn, so the reactor never waits for all of them;
    closing writes what is left at once.
    """
    from twisted.internet.task import Clock

    from hero_compute.explorer.record_writer import FLUSH_CHUNK, FLUSH_EVERY
    from hero_compute.explorer.records import NodeRecord
    from hero_compute.explorer.state import ExplorerState

    clock = Clock()
    state = ExplorerState(clock=clock, reactor=clock, db_path=path)
    state.open()
    batches = []
    store = state.store

    class Recording:
        """The store, noting each batch and whether the rest is left to a later turn."""

        def __getattr__(self, name):
            return getattr(store, name)

        def save_nodes(self, records):
            batches.append((len(records), len(clock.getDelayedCalls())))
            store.save_nodes(records)

    state.store = Recording()
    total = FLUSH_CHUNK * 2 + 7
    for i in range(total):
        state.records.save_node(NodeRecord(**node(f"n{i:05d}")))
    clock.advance(FLUSH_EVERY)
    assert batches == [(FLUSH_CHUNK, 1), (FLUSH_CHUNK, 1), (7, 0)]
    stored = state.load_nodes()
    assert len(stored) == total and stored[0] == node("n00000")
    batches.clear()
    for i in range(total):
        state.records.save_node(NodeRecord(**node(f"n{i:05d}", name="renamed")))
    state.close({})
    assert [n for n, _ in batches] == [FLUSH_CHUNK, FLUSH_CHUNK, 7]
    assert not clock.getDelayedCalls()
    again = Store.open(path)
    assert {n["name"] for n in again.load_nodes()} == {"renamed"}
    again.close()


def test_id_revocation_outlives_enrollment_and_removal(store):
    """An id's revocation time is kept through re-enrollment, removal and a reopen."""
    store.mark_enrolled("n1", 1, NOW)
    store.revoke("n1", NOW + 10)
    store.mark_enrolled("n1", 2, NOW + 20)
    store.forget_identity("n1")
    store.forget_node("n1")
    assert store.identity("n1") is None
    store = reopen(store)
    try:
        assert store.id_revoked_at("n1") == NOW + 10
        assert store.is_revoked_serial(1)
        assert store.issued_at(2) == NOW + 20 and store.issued_at(99) is None
        assert store.knows("n1")
    finally:
        store.close()


def test_knows_every_kind_of_record(store):
    """An id is known by a node record, a secret binding, or a revocation alone."""
    assert not store.knows("n1")
    store.save_node(node("n1"))
    store.bind_secret("n2", sha("s"))
    store.revoke("n3", NOW)
    assert all(store.knows(n) for n in ("n1", "n2", "n3"))
    assert not store.knows("n4")


def test_schema_1_file_is_migrated(path):
    """A file of schema 1 is brought to the current schema, its revocations kept."""
    path.parent.mkdir(mode=0o700)
    raw = sqlite3.connect(path)
    from hero_compute.explorer.store.schema import SCHEMA

    for statement in SCHEMA:
        raw.execute(statement)
    raw.execute("INSERT INTO identities (node_id, revoked_at) VALUES ('old', ?)", (NOW,))
    raw.execute("PRAGMA user_version = 1")
    raw.commit()
    raw.close()
    store = Store.open(path)
    try:
        assert store.id_revoked_at("old") == NOW
        assert store.identity("old").revoked
    finally:
        store.close()
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    finally:
        raw.close()


def test_audit_entries_newest_first_and_filtered(store):
    """Audit entries come back newest first, limited, and filtered by time and by node
    (its own id or one of its VMs, never another id with the same prefix)."""
    entries = [
        {
            "time": NOW + i,
            "explorer": "e",
            "caller": "unix:0",
            "method": m,
            "target": t,
            "outcome": "ok",
        }
        for i, (m, t) in enumerate(
            [
                ("explorer.revoke", "n1"),
                ("vm.start", "n1/vm-1"),
                ("explorer.revoke", "n10"),
                ("explorer.create_token", ""),
            ]
        )
    ]
    store.add_audit(entries[:2])
    store.add_audit(entries[2:])
    assert [e["method"] for e in store.audit()] == [
        "explorer.create_token",
        "explorer.revoke",
        "vm.start",
        "explorer.revoke",
    ]
    assert store.audit()[0] == entries[3]
    assert [e["target"] for e in store.audit(node_id="n1")] == ["n1/vm-1", "n1"]
    assert [e["target"] for e in store.audit(since=NOW + 2)] == ["", "n10"]
    assert len(store.audit(limit=1)) == 1


def test_ui_tokens_single_use_revoked_listed_and_kept(store):
    """Dashboard login tokens: kept by hash, spent once, revoked per user (used ones
    too, for their sessions), listed without a hash, and all of it kept on reopen."""
    ann_op, ann_view, bob = sha("ann-op"), sha("ann-view"), sha("bob")
    for h, user, role in [
        (ann_op, "ann", "operator"),
        (ann_view, "ann", "viewer"),
        (bob, "bob", "viewer"),
    ]:
        assert store.add_ui_token(h, user, role, NOW, NOW + 3600, 10) is True
    with pytest.raises(ValueError):
        store.add_ui_token("a-token-in-clear", "ann", "viewer", NOW, NOW + 60, 10)
    assert store.redeem_ui_token(ann_op, NOW + 1) == ("ann", "operator", NOW + 3600)
    assert store.redeem_ui_token(ann_op, NOW + 2) is None
    listed = store.ui_tokens(NOW + 2)
    assert [(t["user"], t["role"], t["used"]) for t in listed] == [
        ("ann", "operator", True),
        ("ann", "viewer", False),
        ("bob", "viewer", False),
    ]
    assert not any(h in repr(listed) for h in (ann_op, ann_view, bob))
    assert not store.ui_token_revoked("ann", ann_op)
    assert store.revoke_ui_user("ann", NOW + 3) == 1
    assert store.ui_token_revoked("ann", ann_op) and store.ui_token_revoked("ann", ann_view)
    assert store.redeem_ui_token(ann_view, NOW + 4) is None
    assert not store.ui_token_revoked("bob", bob)
    store = reopen(store)
    try:
        assert store.ui_token_revoked("ann", ann_op)
        assert store.redeem_ui_token(bob, NOW + 5) == ("bob", "viewer", NOW + 3600)
        assert [t["revoked"] for t in store.ui_tokens(NOW + 5)] == [True, True, False]
    finally:
        store.close()


def test_ui_tokens_expire_are_purged_and_bounded(store):
    """An expired login token is refused; expired rows (used, revoked or not) go when
    the next token is made; past the limit of waiting tokens, none is added."""
    store.add_ui_token(sha("old"), "ann", "viewer", NOW, NOW + 10, 10)
    store.add_ui_token(sha("gone"), "bob", "viewer", NOW, NOW + 10, 10)
    store.revoke_ui_user("bob", NOW + 1)
    assert store.redeem_ui_token(sha("old"), NOW + 10) is None
    assert len(store.ui_tokens(0)) == 2
    assert store.add_ui_token(sha("new"), "ann", "viewer", NOW + 11, NOW + 100, 2)
    assert [t["expires_at"] for t in store.ui_tokens(0)] == [NOW + 100]
    assert store.add_ui_token(sha("two"), "ann", "viewer", NOW + 12, NOW + 100, 2)
    assert (
        store.add_ui_token(sha("three"), "ann", "viewer", NOW + 12, NOW + 100, 2) is False
    )
    assert store.redeem_ui_token(sha("three"), NOW + 13) is None


def test_schema_3_file_is_migrated_keeping_its_records(path):
    """A file of schema 3 (before the login tokens) is brought to schema 4 with its
    nodes, identities, join tokens and audit log kept, and takes login tokens."""
    from hero_compute.explorer.store.schema import MIGRATIONS, SCHEMA

    path.parent.mkdir(mode=0o700)
    raw = sqlite3.connect(path)
    for statement in (*SCHEMA, *MIGRATIONS[1], *MIGRATIONS[2]):
        raw.execute(statement)
    raw.execute("PRAGMA user_version = 3")
    raw.commit()
    raw.close()
    # Written as a schema-3 explorer would have: its own statements, on that file.
    with sqlite3.connect(path) as raw:
        raw.execute(
            "INSERT INTO identities (node_id, secret_sha256) VALUES ('n1', ?)", (sha("s"),)
        )
        raw.execute(
            "INSERT INTO tokens (token_hash, node_id, expires_at) VALUES (?, NULL, ?)",
            (sha("join"), NOW + 10**9),
        )
        raw.execute(
            "INSERT INTO audit (time, explorer, caller, method, target, outcome) "
            "VALUES (?, 'e', 'unix:0', 'explorer.revoke', 'n1', 'ok')",
            (NOW,),
        )
    raw.close()
    store = Store.open(path)
    try:
        store.save_node(node("n2"))
        assert store.identity("n1").secret_sha256 == sha("s")
        assert store.peek_token(sha("join"), NOW) is None
        assert [e["method"] for e in store.audit()] == ["explorer.revoke"]
        assert store.add_ui_token(sha("ui"), "ann", "viewer", NOW, NOW + 60, 10)
    finally:
        store.close()
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == 4
    finally:
        raw.close()


def test_postgres_at_step_3_is_migrated_keeping_its_records(pg_server):
    """A PostgreSQL database at step 3 is migrated to step 4 under the lock, its rows
    kept (earlier change rows become node changes), and takes login tokens."""
    import psycopg

    from hero_compute.explorer.store.migrations import LATEST, POSTGRES

    dsn = pg_server.new_database()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE hero_schema (version integer)")
        for step in (1, 2, 3):
            for statement in POSTGRES[step]:
                conn.execute(statement)
            conn.execute("INSERT INTO hero_schema VALUES (%s)", (step,))
        conn.execute(
            "INSERT INTO identities (node_id, secret_sha256) VALUES ('n1', %s)", (sha("s"),)
        )
        conn.execute(
            "INSERT INTO changes (node_id, at) VALUES ('n1', extract(epoch FROM now()))"
        )
        conn.execute(
            "INSERT INTO audit (time, explorer, caller, method, target, outcome) "
            "VALUES (%s, 'e', 'unix:0', 'explorer.revoke', 'n1', 'ok')",
            (NOW,),
        )
    store = open_store(dsn)
    try:
        assert store.identity("n1").secret_sha256 == sha("s")
        assert [e["method"] for e in store.audit()] == ["explorer.revoke"]
        assert store.add_ui_token(sha("ui"), "ann", "viewer", NOW, NOW + 60, 10)
        assert store.redeem_ui_token(sha("ui"), NOW) == ("ann", "viewer", NOW + 60)
    finally:
        store.close()
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT max(version) FROM hero_schema").fetchone()[0] == 4
        assert LATEST == 4
        assert conn.execute("SELECT kind FROM changes").fetchall()[0] == ("node",)


class OnStore:
    """What the record writer needs of the explorer's state: the store, run at once."""

    def __init__(self, store):
        self.store = store
        self.shared = store.shared

    def run_on_store(self, f, *args):
        from twisted.internet import defer

        return defer.succeed(f(*args))


def test_the_record_writers_chunks_reach_each_backend_whole(store):
    """Through the record writer (a chunk a turn, each shared dict encoded once per
    chunk), more than two chunks of records sharing some dicts and not others are all
    stored on each backend, each with its own values."""
    from twisted.internet.task import Clock

    from hero_compute.explorer.record_writer import (
        FLUSH_CHUNK,
        FLUSH_EVERY,
        SHARED_FLUSH_CHUNK,
        NodeRecordWriter,
    )
    from hero_compute.explorer.records import NodeRecord

    clock = Clock()
    writer = NodeRecordWriter(OnStore(store), clock)
    count = 2 * (SHARED_FLUSH_CHUNK if store.shared else FLUSH_CHUNK) + 7
    common = {"vcpus": 4}
    for n in range(count):
        writer.save_node(
            NodeRecord(
                node_id=f"n{n:05d}",
                name=f"n{n:05d}",
                socket_path="tcp://10.0.0.1:9003",
                transport="tcp",
                version="1",
                capacity=common,
                usage={"vcpus": n % 5},
                vm_count=n % 5,
                labels={"zone": "a"} if n % 2 else {},
                first_seen=NOW,
                last_seen=NOW + n,
            )
        )
    for _ in range(10):
        clock.advance(FLUSH_EVERY)
    assert writer.pending == 0
    stored = store.load_nodes()
    assert len(stored) == count
    for n, row in enumerate(stored):
        assert row["node_id"] == f"n{n:05d}"
        assert row["capacity"] == {"vcpus": 4}
        assert (row["usage"], row["vm_count"]) == ({"vcpus": n % 5}, n % 5)
        assert row["labels"] == ({"zone": "a"} if n % 2 else {})


def test_a_record_the_store_refuses_is_dropped_and_the_rest_stored(store, logged_errors):
    """Through the record writer, a record neither backend can store (a NaN in its
    labels) is dropped after MAX_FAILURES tries, logged, and the records of its chunk
    are all stored on each backend."""
    from twisted.internet.task import Clock

    from hero_compute.explorer.record_writer import (
        MAX_FAILURES,
        RETRY_MAX,
        NodeRecordWriter,
    )
    from hero_compute.explorer.records import NodeRecord

    clock = Clock()
    writer = NodeRecordWriter(OnStore(store), clock)
    for n in range(7):
        labels = {"load": float("nan")} if n == 3 else {"zone": "a"}
        writer.save_node(NodeRecord(**node(f"n{n}", labels=labels)))
    for _ in range(10 * MAX_FAILURES):
        clock.advance(RETRY_MAX)
    assert writer.pending == 0 and writer.dropped == 1
    assert [n["node_id"] for n in store.load_nodes()] == [
        f"n{n}" for n in range(7) if n != 3
    ]
    refused = logged_errors.flush(ValueError)
    assert len(refused) == 2  # the chunk's failure, then the drop


def test_postgres_statements_of_a_running_explorer_are_bounded(pg_server):
    """A running explorer's PostgreSQL session has a statement timeout, set after its
    migrations: a statement that hangs comes back as the store away.  ``state copy``'s
    session (no watcher) has none."""
    from hero_compute.explorer.store.pg_connect import STATEMENT_TIMEOUT

    dsn = pg_server.new_database()
    store = open_store(dsn)
    try:
        with store._use() as conn:
            shown = conn.execute("SHOW statement_timeout").fetchone()[0]
        assert shown == f"{STATEMENT_TIMEOUT // 1000}s"
        with pytest.raises(StoreUnavailable), store._use() as conn:
            conn.execute("SET LOCAL statement_timeout = 50")
            conn.execute("SELECT pg_sleep(5)")
    finally:
        store.close()
    copy = open_store(dsn, watch=False)
    try:
        with copy._use() as conn:
            assert conn.execute("SHOW statement_timeout").fetchone()[0] == "0"
    finally:
        copy.close()
