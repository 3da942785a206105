"""
Node records on their way to the state store: kept in memory as heartbeats change
them, written together once a second in bounded transactions, on the store's thread
when the store is shared.  :class:`~hero_compute.explorer.trust.ExplorerTrust` is
built on it.
"""

import itertools
from collections.abc import Callable
from typing import Any

import attrs
from twisted.logger import Logger

from hero_compute.rpc.errors import StoreUnavailable

from .records import NodeRecord

log = Logger()

#: Seconds new and changed node records wait to be written together.
FLUSH_EVERY = 1.0

#: Node records written per transaction, one transaction per reactor turn: a fleet
#: registering at once (50,000 nodes, 5,000 a second) would otherwise stop the reactor
#: ~0.2 s a second; 500 take ~10 ms.
FLUSH_CHUNK = 500


class NodeRecordWriter:
    """
    The record writer; a base of ``ExplorerTrust``, which owns the store, the clock
    and the store's thread.
    """

    store: Any
    _clock: Any
    _pool: Any
    _dirty: dict
    _flusher: Any
    run_on_store: Callable[..., Any]

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
        records = self._take()
        if self._pool is None:
            if self._dirty:
                self._flusher = self._clock.callLater(0, self.flush)
            self._write(records)
            return
        d = self.run_on_store(self._write, records)
        d.addCallback(self._written, records)

    def _written(self, ok, records):
        if not ok:
            for record in records:
                # A newer record taken since wins over the one that failed.
                self._dirty.setdefault(record["node_id"], NodeRecord(**record))
        if self._dirty and self._flusher is None and self.store is not None:
            self._flusher = self._clock.callLater(0 if ok else FLUSH_EVERY, self.flush)

    def _take(self):
        ids = list(itertools.islice(self._dirty, FLUSH_CHUNK))
        # Not recursing: the store serialises the dicts in a record itself.
        return [attrs.asdict(self._dirty.pop(i), recurse=False) for i in ids]

    def _write(self, records):
        try:
            self.store.save_nodes(records)
        except StoreUnavailable:
            return False
        except Exception:
            log.failure("could not keep {count} node records", count=len(records))
        return True

    def forget_record(self, node_id):
        """Drop a forgotten node's stored record; its identity binding stays."""
        self._dirty.pop(node_id, None)
        if self.store is not None:
            d = self.run_on_store(self.store.forget_node, node_id)
            if d is not None:
                # The next flush or heartbeat settles it; nothing waits on this one.
                d.addErrback(lambda f: f.trap(StoreUnavailable))
