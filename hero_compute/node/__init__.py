"""
The node: serves the JSON-RPC API for the VMs of one machine and heartbeats explorers.
"""
