"""
Node records on their way to the state store: kept in memory as heartbeats change
them, written together once a second in bounded transactions, on the store's thread
when the store is shared.  :class:`~hero_compute.explorer.state.ExplorerState` holds
one, and writes what is left when it closes.
"""

import itertools
import operator

from twisted.logger import Logger

from hero_compute.rpc.errors import StoreUnavailable

from .store.schema import NODE_FIELDS

log = Logger()

#: Seconds new and changed node records wait to be written together.
FLUSH_EVERY = 1.0

#: Node records written per transaction to a local store, one transaction per reactor
#: turn: the write runs on the reactor, and a fleet registering at once (100,000
#: changed records) would otherwise stop it for over half a second.  200 take ~1.2 ms
#: of CPU at 100,000 stored nodes (``bench/periodic_turns.py``; 500 took ~7 ms before
#: shared dicts were encoded once), so a placement or a heartbeat arriving behind a
#: turn waits about that long; smaller chunks cost more in all (a commit each).
FLUSH_CHUNK = 200

#: Node records per transaction to a shared store: its thread writes them, the reactor
#: only takes their snapshot (~0.4 ms for 500), and each transaction costs a round trip
#: to the server.
SHARED_FLUSH_CHUNK = 500

#: A record's stored fields, in order: its snapshot.
_STORED = operator.attrgetter(*NODE_FIELDS)


class NodeRecordWriter:
    """
    The record writer of a state store.

    :param state: the :class:`~hero_compute.explorer.state.ExplorerState`: its
        ``store`` (None when closed), ``shared`` and ``run_on_store``
    :param clock: ``IReactorTime``, to gather a second's records
    """

    def __init__(self, state, clock):
        self._state = state
        self._clock = clock
        # node id -> the live record to write (the registry's, changed in place).
        self._dirty = {}
        self._flusher = None

    @property
    def store(self):
        """The open store, or None."""
        return self._state.store

    @property
    def pending(self):
        """How many node records wait to be written."""
        return len(self._dirty)

    def save_node(self, record):
        """
        Keep a node's record (first sight, or a durable field changed): written with
        the others of the same second in one transaction (:meth:`flush`).  A crash loses
        at most that second of records, which their nodes' next heartbeats restore;
        identities are never deferred.
        """
        self._dirty[record.node_id] = record
        if self._flusher is None:
            self._flusher = self._clock.callLater(FLUSH_EVERY, self.flush)

    def flush(self):
        """
        Write up to :data:`FLUSH_CHUNK` (:data:`SHARED_FLUSH_CHUNK` to a shared store)
        of the records kept since the last flush, and the rest a reactor turn later, a
        chunk per turn; never raises.  To a shared store the write runs
        on the store's thread; records it could not write are kept for the next flush.
        """
        self._flusher = None
        if not self._dirty or self.store is None:
            return
        shared = self._state.shared
        taken, rows = self._take(SHARED_FLUSH_CHUNK if shared else FLUSH_CHUNK)
        if not shared:
            if self._dirty:
                self._flusher = self._clock.callLater(0, self.flush)
            self._write(rows)
            return
        d = self._state.run_on_store(self._write, rows)
        d.addCallback(self._written, taken)

    def _written(self, ok, taken):
        if not ok:
            for record in taken:
                # A newer change taken since wins; else the live record, as it is now.
                self._dirty.setdefault(record.node_id, record)
        if self._dirty and self._flusher is None and self.store is not None:
            self._flusher = self._clock.callLater(0 if ok else FLUSH_EVERY, self.flush)

    def _take(self, size):
        """
        :param size: how many records to take at most
        :return: the records taken, and snapshots of their stored fields (dicts): the
            store's thread writes the snapshot while the registry goes on changing the
            live records in place
        """
        ids = list(itertools.islice(self._dirty, size))
        taken = [self._dirty.pop(i) for i in ids]
        # Not copying the dicts in a record: a heartbeat replaces them, never changes
        # them in place; the store serialises them itself.
        return taken, [dict(zip(NODE_FIELDS, _STORED(r), strict=True)) for r in taken]

    def _write(self, records):
        try:
            self.store.save_nodes(records)
        except StoreUnavailable:
            return False
        except Exception:
            log.failure("could not keep {count} node records", count=len(records))
        return True

    def stop(self):
        """No more flushes by the clock (the state is closing)."""
        if self._flusher is not None and self._flusher.active():
            self._flusher.cancel()
        self._flusher = None

    def write_all(self):
        """Write what is left now, in the caller's thread (the state is closing)."""
        while self._dirty and self.store is not None:
            if not self._write(self._take(FLUSH_CHUNK)[1]):
                break

    def drop(self, node_id):
        """Write no record of a node any more (it is being forgotten)."""
        self._dirty.pop(node_id, None)

    def forget_record(self, node_id):
        """Drop a forgotten node's stored record; its identity binding stays."""
        self._dirty.pop(node_id, None)
        if self.store is not None:
            d = self._state.run_on_store(self.store.forget_node, node_id)
            if d is not None:
                # The next flush or heartbeat settles it; nothing waits on this one.
                d.addErrback(lambda f: f.trap(StoreUnavailable))
