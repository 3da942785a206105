"""
The transport: address URIs, the JSON-RPC 2.0 server resource, the client, listeners,
errors and schema loading.  Knows nothing of explorers or nodes.
"""
