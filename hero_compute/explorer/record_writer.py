"""
Node records on their way to the state store: kept in memory as heartbeats change
them, written together once a second in bounded transactions, on the store's thread
when the store is shared.  :class:`~hero_compute.explorer.state.ExplorerState` holds
one, and writes what is left when it closes.
"""

import itertools

import attrs
from twisted.logger import Logger

from hero_compute.rpc.errors import StoreUnavailable

log = Logger()

#: Seconds new and changed node records wait to be written together.
FLUSH_EVERY = 1.0

#: Node records written per transaction, one transaction per reactor turn: a fleet
#: registering at once (50,000 nodes, 5,000 a second) would otherwise stop the reactor
#: ~0.2 s a second; 500 take ~10 ms.
FLUSH_CHUNK = 500


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
        Write up to :data:`FLUSH_CHUNK` of the records kept since the last flush, and
        the rest a reactor turn later; never raises.  To a shared store the write runs
        on the store's thread; records it could not write are kept for the next flush.
        """
        self._flusher = None
        if not self._dirty or self.store is None:
            return
        taken, rows = self._take()
        if not self._state.shared:
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

    def _take(self):
        """
        :return: up to :data:`FLUSH_CHUNK` records taken, and their snapshots (dicts):
            the store's thread writes the snapshot while the registry goes on changing
            the live records in place
        """
        ids = list(itertools.islice(self._dirty, FLUSH_CHUNK))
        taken = [self._dirty.pop(i) for i in ids]
        # Not recursing: the store serialises the dicts in a record itself.
        return taken, [attrs.asdict(r, recurse=False) for r in taken]

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
            if not self._write(self._take()[1]):
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
