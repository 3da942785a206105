"""
A short history of each node's heartbeats, for the dashboard's sparkline
(``explorer.node_history``): bounded per node, and one append per heartbeat.
"""

import collections

#: Heartbeat arrival times kept per node: about a minute and a half at the usual pace.
HISTORY = 30


class HeartbeatHistory(dict):
    """
    ``{node_id: deque of Unix seconds}``, oldest first, each at most :data:`HISTORY`
    long; a node's deque is made on its first heartbeat (``history[node_id]``).
    """

    def __missing__(self, node_id):
        times = self[node_id] = collections.deque(maxlen=HISTORY)
        return times

    def times(self, node_id):
        """:return: the node's kept heartbeat times (a list, oldest first)"""
        return list(self.get(node_id, ()))
