"""
One JSON-RPC call over TLS, run as a process inside a test host's network namespace:
``python -m tests.attacker URI METHOD PARAMS_JSON [--ca CA] [--cert C --key K]``.

Prints the JSON-RPC response, or ``{"handshake": "failed", "reason": ...}`` when the TLS
handshake is refused: the attacker's view, from another host.
"""

import argparse
import json
import ssl
import sys

from .support import rpc_over, tls_connect


def main(argv=None):
    """Make the call and print what came back."""
    p = argparse.ArgumentParser()
    p.add_argument("uri")
    p.add_argument("method")
    p.add_argument("params", nargs="?", type=json.loads)
    p.add_argument("--ca", required=True)
    p.add_argument("--cert")
    p.add_argument("--key")
    args = p.parse_args(argv)
    conn = tls_connect(args.uri, args.ca, args.cert, args.key, timeout=10)
    try:
        print(json.dumps(rpc_over(conn, args.method, args.params)))
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as e:
        print(json.dumps({"handshake": "failed", "reason": str(e)}))
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
