"""
hero-compute: the command-line client of an explorer.

    hero-compute [--explorer URI] info
    hero-compute nodes [--status online|offline]
    hero-compute node NODE_ID
    hero-compute call NODE_ID METHOD ['{"json": "params"}']
    hero-compute rpc METHOD ['{"json": "params"}']      (a method of the explorer itself)

Results are printed as JSON.  Exit status: 0 success, 1 a JSON-RPC error, 2 the explorer
could not be reached, 64 bad usage.
"""

import argparse
import json
import os
import sys

from twisted.internet import defer, task

from hero_compute.cli_tls import add_tls_commands, run as run_tls
from hero_compute.rpc.addresses import AddressError, parse_address
from hero_compute.rpc.http_client import RpcClient
from hero_compute.options import socket_dir
from hero_compute.rpc.errors import RpcError, TransportError


def _params(text):
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"params must be JSON: {e}")
    if not isinstance(value, (dict, list)):
        raise argparse.ArgumentTypeError("params must be a JSON object or array")
    return value


def _address(text):
    try:
        return parse_address(text)
    except AddressError as e:
        raise argparse.ArgumentTypeError(str(e))


def parser(env):
    """
    The argument parser.

    :param env: the environment, for the default explorer address
    """
    default = os.path.join(socket_dir(env), "hero_compute_explorer.sock")
    p = argparse.ArgumentParser(prog="hero-compute", description=__doc__.split("\n\n")[0])
    p.add_argument("--explorer", type=_address, default=default,
                   help=f"explorer address URI [default: unix://{default}]")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="the explorer's version, listeners and node counts")
    nodes = sub.add_parser("nodes", help="list nodes")
    nodes.add_argument("--status", choices=("online", "offline"))
    node = sub.add_parser("node", help="one node")
    node.add_argument("node_id")
    call = sub.add_parser("call", help="call a node.* or vm.* method on a node")
    call.add_argument("node_id")
    call.add_argument("method")
    call.add_argument("params", nargs="?", type=_params)
    raw = sub.add_parser("rpc", help="call a method of the explorer itself")
    raw.add_argument("method")
    raw.add_argument("params", nargs="?", type=_params)
    add_tls_commands(sub)
    return p


def request(args):
    """
    :return: C{(method, params)} of the explorer call for parsed arguments
    """
    if args.command == "info":
        return "explorer.info", None
    if args.command == "nodes":
        return "explorer.list_nodes", {"status": args.status} if args.status else None
    if args.command == "node":
        return "explorer.get_node", {"node_id": args.node_id}
    if args.command == "call":
        params = {"node_id": args.node_id, "method": args.method}
        if args.params is not None:
            params["params"] = args.params
        return "explorer.call", params
    return args.method, args.params


async def _run(reactor, args, out, err):
    method, params = request(args)
    client = RpcClient(reactor, timeout=args.timeout)
    try:
        result = await client.call(args.explorer, method, params)
    except RpcError as e:
        print(f"error {e.code}: {e.message}", file=err)
        if e.data is not None:
            print(json.dumps(e.data, indent=2), file=err)
        return 1
    except TransportError as e:
        print(f"cannot reach {args.explorer}: {e.reason}", file=err)
        return 2
    finally:
        await client.close()
    print(json.dumps(result, indent=2, sort_keys=True), file=out)
    return 0


def main(argv=None, env=None):
    """Run the command line; exits the process with its status."""
    env = os.environ if env is None else env
    try:
        args = parser(env).parse_args(argv)
    except SystemExit as e:
        sys.exit(64 if e.code else 0)
    if args.command == "tls":
        sys.exit(run_tls(args))

    def run(reactor):
        d = defer.ensureDeferred(_run(reactor, args, sys.stdout, sys.stderr))
        return d.addCallback(lambda code: sys.exit(code) if code else None)

    task.react(run)


if __name__ == "__main__":
    main()
