"""
The record writer when writes fail: a failed chunk is kept and retried with backoff, a
record that fails on its own is dropped after a few tries without holding the others
back, and a stopping explorer writes every record still kept (a chunk in flight that
failed included) or says how many it lost.  In memory, with a Clock; the same stop
against a real PostgreSQL server is in ``test_shared_store``.
"""

import threading
import time

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.threadpool import ThreadPool

from hero_compute.explorer.record_writer import FLUSH_EVERY, NodeRecordWriter
from hero_compute.explorer.state import ExplorerState
from hero_compute.explorer.store import Store
from hero_compute.rpc.errors import StoreUnavailable

from .test_periodic_turns import RecordingState, record


def advance_until(d, clock, steps):
    """Move ``clock`` on by 0.1 s steps, at most ``steps``, until ``d`` has fired."""
    for _ in range(steps):
        if d.called:
            return
        clock.advance(0.1)


def written(state):
    """:return: node id -> name of every row the recording store took, the last wins"""
    return {row["node_id"]: row["name"] for _, rows in state.written for row in rows}


def failing(count, error=StoreUnavailable):
    """:return: a ``refuse`` that fails the next ``count`` transactions with ``error``"""
    left = [count]

    def refuse(rows):
        if left[0] > 0:
            left[0] -= 1
            return error()
        return None

    return refuse


def lines(events):
    """:return: the text of captured log events"""
    return [formatEvent(e) for e in events]


class QueuedState(ExplorerState):
    """An explorer state over a local file that behaves as a shared store's: its store
    calls wait in ``queued`` until the test runs them, as on the store's thread."""

    shared = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.queued = []

    def run_on_store(self, f, *args, **kwargs):
        d = defer.Deferred()
        self.queued.append((d, f, args, kwargs))
        return d

    def run_queued(self):
        """Run the queued store calls in order."""
        while self.queued:
            d, f, args, kwargs = self.queued.pop(0)
            d.callback(f(*args, **kwargs))


class FailingOnce:
    """A store whose next write of node records fails as if the server went away."""

    def __init__(self, store):
        self._store = store
        self.failed = False

    def __getattr__(self, name):
        return getattr(self._store, name)

    def save_nodes(self, records):
        if not self.failed:
            self.failed = True
            raise StoreUnavailable()
        self._store.save_nodes(records)


def test_a_chunk_in_flight_that_fails_at_stop_is_written_before_the_store_closes(
    tmp_path,
):
    """A shared store's chunk whose write is in flight when the explorer stops, and
    fails, is written again before the store closes: every record is stored, nothing
    is said lost."""
    path = tmp_path / "explorer.db"
    clock = Clock()
    state = QueuedState(clock=clock, reactor=clock, db_path=path)
    state.open()
    state.store = FailingOnce(state.store)
    for n in range(3):
        state.records.save_node(record(f"n{n}"))
    clock.advance(FLUSH_EVERY)
    assert len(state.queued) == 1  # the chunk, on the store's thread
    with capturedLogs() as events:
        stopped = defer.maybeDeferred(state.stopService)
        state.run_queued()  # the write in flight fails
        for _ in range(100):
            if stopped.called:
                break
            clock.advance(0.1)
            state.run_queued()
    assert stopped.called and state.store is None
    again = Store.open(path)
    assert sorted(n["node_id"] for n in again.load_nodes()) == ["n0", "n1", "n2"]
    again.close()
    assert not [line for line in lines(events) if "lost" in line]


@pytest.mark.parametrize("shared", [False, True])
def test_a_failed_chunk_is_kept_and_retried_with_backoff(shared):
    """A chunk the store refuses (away) is kept, not dropped: retried after a jittered
    backoff that grows with each failure, then written, a newer version of a record
    saved meanwhile winning over the failed snapshot."""
    from hero_compute.explorer.record_writer import RETRY_MAX

    clock = Clock()
    state = RecordingState(clock, shared)
    writer = NodeRecordWriter(state, clock)
    for n in range(3):
        writer.save_node(record(f"n{n}"))
    refuse = failing(3)

    def refuse_and_change(rows):
        error = refuse(rows)
        if error is not None and not state.refused:
            # A heartbeat while the chunk is being written changes n1.
            writer.save_node(record("n1", name="newer"))
        return error

    state.refuse = refuse_and_change
    clock.advance(FLUSH_EVERY)
    delays = []
    for _ in range(3):
        assert state.written == [] and writer.pending == 3
        (due,) = clock.getDelayedCalls()
        delays.append(due.getTime() - clock.seconds())
        clock.advance(delays[-1])
    steps = [min(RETRY_MAX, FLUSH_EVERY * 2**i) for i in range(3)]
    for delay, step in zip(delays, steps, strict=True):
        assert step / 2 <= delay <= step
    assert written(state) == {"n0": "n0", "n1": "newer", "n2": "n2"}
    assert writer.pending == 0 and not clock.getDelayedCalls()


@pytest.mark.parametrize("shared", [False, True])
def test_a_record_that_fails_on_its_own_is_dropped_and_the_rest_written(
    shared, logged_errors
):
    """A record whose writes fail for a reason of its own (bad data) does not hold the
    others back: its chunk's other records are written, and it is dropped after
    MAX_FAILURES failed writes, logged once and counted; a later change to it is tried
    afresh."""
    from hero_compute.explorer.record_writer import MAX_FAILURES, RETRY_MAX

    clock = Clock()
    state = RecordingState(clock, shared)
    writer = NodeRecordWriter(state, clock)
    ids = ["n0", "n1", "bad", "n2", "n3"]
    for node_id in ids:
        writer.save_node(record(node_id))

    def refuse(rows):
        if any(row["node_id"] == "bad" for row in rows):
            return ValueError("Out of range float values are not JSON compliant")
        return None

    state.refuse = refuse
    clock.advance(FLUSH_EVERY)
    for _ in range(10 * MAX_FAILURES):
        if not clock.getDelayedCalls():
            break
        clock.advance(RETRY_MAX)
    assert written(state) == {i: i for i in ids if i != "bad"}
    assert len(state.refused) == MAX_FAILURES
    assert writer.pending == 0 and writer.dropped == 1
    # The chunk's failure, then the drop, each with the error: nothing in between.
    chunk, dropped = lines(logged_errors.flush(ValueError))
    assert "could not write 5 node records" in chunk
    assert "node record bad dropped after 5 failed writes" in dropped
    writer.save_node(record("bad", name="changed"))
    clock.advance(FLUSH_EVERY)
    assert len(state.refused) == MAX_FAILURES + 1
    logged_errors.flush(ValueError)


@pytest.mark.parametrize("shared", [False, True])
def test_stop_retries_a_store_away_for_a_moment(shared):
    """At stop, records the store refuses for a moment (a transient error) are
    retried with backoff within the deadline and all written; nothing said lost."""
    from hero_compute.explorer.record_writer import STOP_WITHIN

    clock = Clock()
    state = RecordingState(clock, shared)
    writer = NodeRecordWriter(state, clock)
    for n in range(5):
        writer.save_node(record(f"n{n}"))
    state.refuse = failing(3)
    with capturedLogs() as events:
        finished = writer.finish(STOP_WITHIN)
        advance_until(finished, clock, 100)
    assert finished.called and finished.result == 0
    assert clock.seconds() < STOP_WITHIN
    assert written(state) == {f"n{n}": f"n{n}" for n in range(5)}
    assert len(state.refused) == 3
    assert not [line for line in lines(events) if "lost" in line]
    assert not clock.getDelayedCalls()


@pytest.mark.parametrize("shared", [False, True])
def test_stop_gives_up_at_the_deadline_and_says_how_many_are_lost(shared, logged_errors):
    """At stop, with the store away beyond the deadline, the writer retries a bounded
    number of times, gives up by the deadline and logs once how many records are
    lost."""
    from hero_compute.explorer.record_writer import STOP_RETRIES, STOP_WITHIN

    clock = Clock()
    state = RecordingState(clock, shared)
    writer = NodeRecordWriter(state, clock)
    for n in range(7):
        writer.save_node(record(f"n{n}"))
    state.refuse = lambda rows: StoreUnavailable()
    finished = writer.finish(STOP_WITHIN)
    advance_until(finished, clock, 1000)
    assert finished.called and finished.result == 7
    assert clock.seconds() <= STOP_WITHIN + 0.1
    assert 1 < len(state.refused) <= STOP_RETRIES + 1
    (lost,) = lines(logged_errors.flush())
    assert "7 node records lost at shutdown" in lost and "unavailable" in lost
    assert writer.pending == 0 and state.written == []
    assert not clock.getDelayedCalls()


def test_stop_waits_for_the_chunk_in_flight_only_until_the_deadline(logged_errors):
    """A chunk whose write never returns is waited for until the deadline, then its
    records and those still kept are said lost, once."""
    from hero_compute.explorer.record_writer import STOP_WITHIN

    clock = Clock()
    state = RecordingState(clock, shared=True)
    state.held = []
    writer = NodeRecordWriter(state, clock)
    for n in range(3):
        writer.save_node(record(f"n{n}"))
    clock.advance(FLUSH_EVERY)
    writer.save_node(record("n3"))
    assert len(state.held) == 1
    finished = writer.finish(STOP_WITHIN)
    clock.advance(STOP_WITHIN - 0.1)
    assert not finished.called
    clock.advance(0.1)
    assert finished.called and finished.result == 4
    (lost,) = lines(logged_errors.flush())
    assert "4 node records lost at shutdown" in lost and "did not return" in lost


def test_a_record_forgotten_while_its_chunk_is_in_flight_is_not_written_again():
    """A node forgotten while its record's chunk is on the store's thread, when that
    write fails, is not written again (its stored record would come back)."""
    clock = Clock()
    state = RecordingState(clock, shared=True)
    state.held = []
    writer = NodeRecordWriter(state, clock)
    writer.save_node(record("n0"))
    writer.save_node(record("gone"))
    clock.advance(FLUSH_EVERY)
    writer.drop("gone")
    state.refuse = failing(1)
    state.run_held()
    state.held = None
    for _ in range(10):
        clock.advance(FLUSH_EVERY)
    assert written(state) == {"n0": "n0"}
    assert writer.pending == 0


def test_forgetting_a_record_of_a_local_store(tmp_path):
    """Forgetting a node's stored record on a local store drops it, at once and
    without an error (the store's call returns a plain value there)."""
    clock = Clock()
    state = ExplorerState(clock=clock, reactor=clock, db_path=tmp_path / "explorer.db")
    state.open()
    state.records.save_node(record("n0"))
    state.records.save_node(record("n1"))
    clock.advance(FLUSH_EVERY)
    state.records.forget_record("n0")
    assert [n["node_id"] for n in state.load_nodes()] == ["n1"]
    state.close({})


def test_a_state_stopped_and_opened_again_writes_records_again(tmp_path):
    """After a stop, a state store opened again has its records written as before."""
    path = tmp_path / "explorer.db"
    clock = Clock()
    state = ExplorerState(clock=clock, reactor=clock, db_path=path)
    state.open()
    state.records.save_node(record("n0"))
    stopped = state.stopService()
    assert stopped.called and state.store is None
    state.open()
    state.records.save_node(record("n1"))
    clock.advance(FLUSH_EVERY)
    assert [n["node_id"] for n in state.load_nodes()] == ["n0", "n1"]
    state.close({})


def test_stop_ends_at_the_deadline_even_while_writes_succeed(logged_errors):
    """At stop, writes that succeed but slowly are cut at the deadline: the rest is
    said lost, once, as out of time."""
    from hero_compute.explorer.record_writer import FLUSH_CHUNK, STOP_WITHIN

    clock = Clock()
    state = RecordingState(clock, shared=False)
    writer = NodeRecordWriter(state, clock)
    for n in range(2 * FLUSH_CHUNK + 1):
        writer.save_node(record(f"n{n:04d}"))

    def slow(rows):
        clock.rightNow += STOP_WITHIN / 2  # each transaction takes half the deadline
        return None

    state.refuse = slow
    finished = writer.finish(STOP_WITHIN)
    assert finished.called and finished.result == 1
    assert len(written(state)) == 2 * FLUSH_CHUNK
    (lost,) = lines(logged_errors.flush())
    assert "1 node records lost at shutdown" in lost and "out of time" in lost


def test_stop_gives_up_a_write_that_hangs_at_the_deadline(logged_errors):
    """A write made by the stop that never returns (held on the store's thread) does
    not hold the stop past its deadline: it fires then, its records said lost."""
    from hero_compute.explorer.record_writer import STOP_WITHIN

    clock = Clock()
    state = RecordingState(clock, shared=True)
    state.held = []
    writer = NodeRecordWriter(state, clock)
    for n in range(3):
        writer.save_node(record(f"n{n}"))
    finished = writer.finish(STOP_WITHIN)
    assert len(state.held) == 1  # the stop's own chunk, never returning
    clock.advance(STOP_WITHIN - 0.1)
    assert not finished.called
    clock.advance(0.1)
    assert finished.called and finished.result == 3
    (lost,) = lines(logged_errors.flush())
    assert "3 node records lost at shutdown" in lost and "did not return" in lost
    state.run_held()  # the write returning late changes nothing
    assert writer.pending == 0 and not clock.getDelayedCalls()


def test_a_node_dropped_during_the_stop_is_not_written_back():
    """A node dropped while the stop's chunk is on the store's thread, when that write
    fails (the store away), is not written on the stop's retry."""
    clock = Clock()
    state = RecordingState(clock, shared=True)
    state.held = []
    writer = NodeRecordWriter(state, clock)
    writer.save_node(record("keep"))
    writer.save_node(record("gone"))
    state.refuse = failing(1)
    finished = writer.finish(15.0)
    assert len(state.held) == 1
    writer.drop("gone")
    state.run_held()
    for _ in range(200):
        if finished.called:
            break
        clock.advance(0.1)
        state.run_held()
    assert finished.called and finished.result == 0
    assert written(state) == {"keep": "keep"}


class FromThreads:
    """A reactor's ``callFromThread`` that only notes the calls (a test's clock runs
    the rest)."""

    def __init__(self):
        self.calls = []

    def callFromThread(self, f, *args):
        self.calls.append((f, args))


class StuckStore:
    """A shared store whose closing calls are noted."""

    shared = True

    def __init__(self):
        self.touched = []
        self.closed = threading.Event()

    def touch_nodes(self, last_seen):
        self.touched.append(last_seen)

    def close(self):
        self.closed.set()


def test_a_stop_does_not_wait_on_the_reactor_for_a_stuck_store_thread(logged_errors):
    """A stop whose store thread is stuck in a call (a hung database) gives the reactor
    back at once and completes at its deadline, the store forgotten; the store is
    closed once that call returns."""
    from hero_compute.explorer.record_writer import STOP_WITHIN

    clock = Clock()
    state = ExplorerState(clock=clock, reactor=FromThreads(), db_path="unused.db")
    store = state.store = StuckStore()
    state._pool = ThreadPool(minthreads=1, maxthreads=1, name="hero-store-test")
    state._pool.start()
    release = threading.Event()
    state._pool.callInThread(release.wait, 5)
    began = time.monotonic()
    with capturedLogs() as events:
        stopped = state.stopService()
        assert time.monotonic() - began < 1 and not stopped.called
        clock.advance(STOP_WITHIN)
    assert stopped.called and state.store is None
    assert [line for line in lines(events) if "did not return" in line]
    assert store.touched == [] and not store.closed.is_set()
    release.set()
    assert store.closed.wait(10)
