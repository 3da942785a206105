"""
The explorer: the registry of nodes, fed by heartbeats, and a proxy for calls to them.
"""
