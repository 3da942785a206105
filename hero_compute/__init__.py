"""
hero_compute: run a fleet of VM nodes from one explorer.

Two twistd services share one wire contract: ``twistd node`` runs on each machine and
``twistd explorer`` keeps the registry of nodes and proxies calls to them.
"""

__version__ = "0.1.0"
