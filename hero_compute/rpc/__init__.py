"""
The transport: address URIs, the JSON-RPC 2.0 dispatcher, its HTTP/1.1 server (and a
``twisted.web`` adapter), the client, listeners, errors and schema loading.  Knows
nothing of explorers or nodes.
"""
