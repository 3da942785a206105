"""
Explorers that share one PostgreSQL database (CONTRACT §10), from the outside: real
``twistd explorer`` processes on a real server, started by the tests on a Unix socket.
"""

import secrets
import signal
import threading
import time

import psycopg
import pytest

from hero_compute import pki
from hero_compute.explorer.record_writer import FLUSH_EVERY, RETRY_MAX, STOP_WITHIN
from hero_compute.explorer.store import open_store
from hero_compute.explorer.store.migrations import LATEST

from .pgserver import PgServer
from .support import make_short_tmp, remove_tmp, result, rpc, wait_for
from .test_metrics import metrics_uri, scrape, value


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A fleet CA and one explorer certificate, so the explorers can sign enrollments."""
    base = tmp_path_factory.mktemp("pki")
    pki.create_ca(str(base / "ca"))
    cert, key = pki.create_cert(
        str(base / "ca"), "explorer", "e1", ips=["127.0.0.1"], out=str(base / "e1")
    )
    return {
        "cert": cert,
        "key": key,
        "ca": str(base / "ca" / "ca.pem"),
        "ca_key": str(base / "ca" / "ca-key.pem"),
    }


@pytest.fixture
def start_explorer(twistd, fleet):
    """``start_explorer(dsn)``: a real explorer on its own Unix socket and state
    directory, over the database ``dsn``; the process, with ``.unix``."""
    dirs = []

    def start(dsn, expect_listening=True, **extra):
        tmp = make_short_tmp()
        dirs.append(tmp)
        env = {
            "HERO_SOCKET_DIR": tmp,
            "EXPLORER_STATE_DIR": f"{tmp}/state",
            "EXPLORER_DATABASE": dsn,
            "EXPLORER_TLS_CERT": fleet["cert"],
            "EXPLORER_TLS_KEY": fleet["key"],
            "EXPLORER_TLS_CA": fleet["ca"],
            "EXPLORER_CA_KEY": fleet["ca_key"],
            "NODE_OFFLINE_AFTER": "5",
            **extra,
        }
        process = twistd(["explorer"], env=env)
        process.env = env
        if expect_listening:
            (found,) = process.wait_for_line(r"listening on (unix://\S+)")
            process.unix = found.group(1)
        return process

    yield start
    for tmp in dirs:
        remove_tmp(tmp)


@pytest.fixture
def pair(pg_server, start_explorer):
    """Two explorers, A and B, on one new database."""
    dsn = pg_server.new_database()
    a, b = start_explorer(dsn), start_explorer(dsn)
    yield a, b
    for process in (a, b):
        assert pg_server.password not in process.output


def secret():
    """A node secret as a node keeps it: 64 lowercase hex characters."""
    return secrets.token_hex(32)


def beat(explorer, node_id, node_secret, name=None):
    """One heartbeat over the explorer's Unix socket; the whole response."""
    return rpc(
        explorer.unix,
        "explorer.heartbeat",
        {
            "node_id": node_id,
            "socket_path": "unix:///tmp/hc-nowhere.sock",
            "name": name or node_id,
            "secret": node_secret,
        },
    )


def code(response):
    """The error code of a response, or None."""
    return response.get("error", {}).get("code")


def csr(node_id):
    """A CSR for a node id."""
    return pki.make_csr(pki.make_key(), node_id).decode()


def test_token_made_at_a_spent_at_b_is_refused_at_a(pair):
    """A join token created at A enrolls a node at B, and is then refused at A."""
    a, b = pair
    token = result(a.unix, "explorer.create_token", {"node_id": "n-tok"})["token"]
    enrolled = result(b.unix, "explorer.enroll", {"token": token, "csr": csr("n-tok")})
    assert "BEGIN CERTIFICATE" in enrolled["certificate"]
    again = rpc(a.unix, "explorer.enroll", {"token": token, "csr": csr("n-tok")})
    assert code(again) == -32010 and "invalid or expired token" in again["error"]["message"]


def test_revoke_at_a_is_refused_at_b_within_two_seconds(pair):
    """A node revoked at A has its next heartbeat at B refused, within 2 s (measured)."""
    a, b = pair
    s = secret()
    assert "result" in beat(b, "n-rev", s)
    wait_for(lambda: "result" in beat(a, "n-rev", s), what="A knows the binding")
    started = time.monotonic()
    assert result(a.unix, "explorer.revoke", {"node_id": "n-rev"}) is True
    wait_for(lambda: code(beat(b, "n-rev", s)) == -32010, timeout=2.0, interval=0.01)
    took = time.monotonic() - started
    print(f"revoke at A refused at B after {took * 1000:.0f} ms")
    assert took < 2.0


def test_secret_bindings_are_shared(pair):
    """A secret bound at A is the one B accepts; another secret for the id is refused
    at B, and so is a removal's rebinding only after the removal."""
    a, b = pair
    first, other = secret(), secret()
    assert "result" in beat(a, "n-sec", first)
    wait_for(lambda: "result" in beat(b, "n-sec", first), timeout=2.0)
    assert code(beat(b, "n-sec", other)) == -32010
    assert result(a.unix, "explorer.remove_node", {"node_id": "n-sec"}) is True
    # Removed at A: the id is free at B within 2 s, for whichever secret comes first.
    wait_for(lambda: "result" in beat(b, "n-sec", other), timeout=2.0)
    assert code(beat(a, "n-sec", first)) == -32010


def test_restart_shows_the_fleet_from_the_database(pg_server, start_explorer):
    """An explorer restarted with a fresh state directory lists the fleet it had, from
    the database (each node offline until it heartbeats)."""
    dsn = pg_server.new_database()
    a = start_explorer(dsn)
    for i in range(5):
        assert "result" in beat(a, f"n-{i}", secret(), name=f"name-{i}")
    rows = 0

    def stored():
        nonlocal rows
        with psycopg.connect(dsn) as conn:
            rows = conn.execute("SELECT count(*) FROM nodes").fetchone()[0]
        return rows == 5

    wait_for(stored, timeout=5.0, what="the records written")
    a.stop()
    again = start_explorer(dsn)
    listed = result(again.unix, "explorer.list_nodes")
    assert sorted(n["name"] for n in listed) == [f"name-{i}" for i in range(5)]
    assert {n["status"] for n in listed} == {"offline"}
    assert result(again.unix, "explorer.info")["store"] == {
        "kind": "postgresql",
        "state": "up",
    }


def test_a_newer_schema_is_refused_at_start(pg_server, start_explorer):
    """An explorer refuses, in one line and with exit 1, a database of a newer schema."""
    dsn = pg_server.new_database()
    open_store(dsn, watch=False).close()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO hero_schema VALUES (%s)", (LATEST + 1,))
    process = start_explorer(dsn, expect_listening=False)
    assert process.process.wait(30) != 0
    lines = [line for line in process.output.splitlines() if "newer" in line]
    assert len(lines) == 1 and f"schema {LATEST + 1}" in lines[0]
    assert "EXPLORER_DATABASE" in lines[0]
    assert pg_server.password not in process.output


def test_migrations_from_two_explorers_at_once(pg_server):
    """Several explorers opening a new database at once migrate it once, under the
    lock: all open, at the latest version, with one row per step."""
    dsn = pg_server.new_database()
    errors = []

    def open_one():
        try:
            open_store(dsn, watch=False).close()
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with psycopg.connect(dsn) as conn:
        versions = [v for (v,) in conn.execute("SELECT version FROM hero_schema")]
    assert sorted(versions) == list(range(1, LATEST + 1))


@pytest.fixture
def own_server():
    """A PostgreSQL server of this test's own, which it may stop and start."""
    server = PgServer()
    server.init()
    server.start()
    yield server
    server.remove()


def test_database_down_under_load_loses_nothing(own_server, start_explorer):
    """With the database stopped under heartbeat load: known nodes go on, what needs
    the store answers -32007, the store shows down; started again, it is up within
    seconds and every record acknowledged meanwhile is in the database."""
    dsn = own_server.new_database()
    a = start_explorer(dsn, EXPLORER_METRICS_ADDR="127.0.0.1:0")
    metrics = metrics_uri(a)
    assert value(scrape(metrics), "hero_explorer_store_up", kind="postgresql") == 1
    node_secrets = {f"n-{i}": secret() for i in range(20)}
    for node_id, s in node_secrets.items():
        assert "result" in beat(a, node_id, s)
    quiet = secret()
    assert "result" in beat(a, "n-quiet", quiet)
    failures, beats, stop = [], [0], threading.Event()

    def load():
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            for node_id, s in node_secrets.items():
                response = beat(a, node_id, s)
                if "result" not in response:
                    failures.append(response)
                beats[0] += 1

    loader = threading.Thread(target=load)
    loader.start()
    try:
        own_server.stop()
        wait_for(
            lambda: result(a.unix, "explorer.info")["store"]["state"] == "down",
            timeout=10.0,
            what="the store down",
        )
        assert value(scrape(metrics), "hero_explorer_store_up", kind="postgresql") == 0
        down = rpc(a.unix, "explorer.create_token")
        assert code(down) == -32007 and down["error"]["message"] == (
            "state store unavailable"
        )
        assert code(beat(a, "n-new", secret())) == -32007
        # A durable change while down: acknowledged, so it must reach the database.
        assert "result" in beat(a, "n-quiet", quiet, name="renamed")
        acknowledged = time.monotonic()
        before = beats[0]
        # Known nodes went on meanwhile: a hundred more heartbeats answered, waited
        # for rather than expected by a fixed time (a loaded machine makes each slower).
        wait_for(lambda: beats[0] > before + 100, timeout=15.0, what="100 more heartbeats")
        # fixed wait: the record's flush, FLUSH_EVERY after the heartbeat, must fail at
        # least once before the store is back, and a failed flush shows nowhere
        time.sleep(max(0.0, acknowledged + FLUSH_EVERY + 0.5 - time.monotonic()))
        own_server.start()
        wait_for(
            lambda: result(a.unix, "explorer.info")["store"]["state"] == "up",
            timeout=15.0,
            what="the store up again",
        )
        assert "result" in rpc(a.unix, "explorer.create_token")
        assert value(scrape(metrics), "hero_explorer_store_up", kind="postgresql") == 1
    finally:
        stop.set()
        loader.join()
    assert failures == []

    def renamed():
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT name FROM nodes WHERE node_id = 'n-quiet'"
            ).fetchone()
        return row is not None and row[0] == "renamed"

    # Retried with backoff while the store was away: written within RETRY_MAX of it.
    wait_for(renamed, timeout=RETRY_MAX + 5.0, what="the record kept while down written")
    assert own_server.password not in a.output


def test_database_away_at_stop_loses_no_record(own_server, start_explorer):
    """Records changed while the database is away, their writes failing, are all in
    the database after a graceful stop (SIGTERM) during which it comes back: the
    explorer waits for it, within its stop deadline, and says nothing lost."""
    dsn = own_server.new_database()
    a = start_explorer(dsn)
    node_secrets = {f"n-{i}": secret() for i in range(20)}
    for node_id, s in node_secrets.items():
        assert "result" in beat(a, node_id, s)

    def names():
        with psycopg.connect(dsn) as conn:
            return dict(conn.execute("SELECT node_id, name FROM nodes").fetchall())

    wait_for(lambda: len(names()) == 20, timeout=5.0, what="the records written")
    own_server.stop()
    wait_for(
        lambda: result(a.unix, "explorer.info")["store"]["state"] == "down",
        timeout=10.0,
        what="the store down",
    )
    for node_id, s in node_secrets.items():
        assert "result" in beat(a, node_id, s, name=f"renamed-{node_id}")
    # fixed wait: the renamed records' flush, FLUSH_EVERY after the heartbeats, must
    # fail at least once before the stop, and a failed flush shows nowhere
    time.sleep(FLUSH_EVERY * 1.5)
    started = time.monotonic()
    a.signal(signal.SIGTERM)
    own_server.start()
    # twistd ends a graceful stop by raising the signal again: -SIGTERM is a clean exit.
    assert a.process.wait(STOP_WITHIN + 15) == -signal.SIGTERM
    print(f"explorer stopped {time.monotonic() - started:.1f} s after SIGTERM")
    assert names() == {node_id: f"renamed-{node_id}" for node_id in node_secrets}
    assert "node records lost" not in a.output
    assert own_server.password not in a.output


def test_audit_is_shared(pair):
    """A change made at A is in B's audit log (the store's), once A has written it."""
    a, b = pair
    assert result(a.unix, "explorer.revoke", {"node_id": "n-aud"}) is True

    def at_b():
        entries = result(b.unix, "explorer.audit", {"node_id": "n-aud"})["entries"]
        return [(e["method"], e["outcome"]) for e in entries] == [("explorer.revoke", "ok")]

    wait_for(at_b, timeout=5.0, what="A's entry at B")
