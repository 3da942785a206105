"""
A short history of each node's heartbeats, for the dashboard's sparkline
(``explorer.node_history``): bounded per node, and one append per heartbeat.
"""

import array

#: Heartbeat arrival times kept per node: about a minute and a half at the usual pace.
HISTORY = 30


class HeartbeatHistory(dict):
    """
    ``{node_id: array of Unix seconds}``, oldest first, each at most :data:`HISTORY`
    long.

    An ``array('d')`` of 30 times takes about 300 bytes, where a ``deque`` of float
    objects took 1.3 kB: at 100,000 nodes that is most of what the registry holds.
    """

    def add(self, node_id: str, when: float) -> None:
        """Note a heartbeat of ``node_id`` at ``when`` (the oldest goes past the bound)."""
        times = self.get(node_id)
        if times is None:
            self[node_id] = array.array("d", (when,))
            return
        if len(times) >= HISTORY:
            del times[0]
        times.append(when)

    def times(self, node_id: str) -> list[float]:
        """:return: the node's kept heartbeat times (a list, oldest first)"""
        return list(self.get(node_id, ()))
