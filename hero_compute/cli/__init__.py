"""
hero-compute: the command-line client of an explorer and, through it, of its nodes.

::

    hero-compute [--explorer URI] [--timeout S] [--json | --table] COMMAND ...
    hero-compute nodes [--status online|offline] [--where KEY=VALUE]...
    hero-compute node ID
    hero-compute vm list [NODE]
    hero-compute vm create [NODE] --name N [--vcpus 2] --memory 512M --disk 10G
                                [--image PATH] [--start [--wait]]
                                [--where KEY=VALUE]... [--strategy spread|binpack]
    hero-compute vm start|stop|delete NODE VM [--wait]     (stop also --force)
    hero-compute vm show NODE VM
    hero-compute call NODE METHOD [PARAMS_JSON]    (a node.* or vm.* method of a node)
    hero-compute rpc METHOD [PARAMS_JSON]          (a method of the explorer itself)
    hero-compute events [--follow] [--since N]
    hero-compute audit [--node NODE] [--limit N] [--since UNIX_TIME]
    hero-compute state copy --from DB --to DB     (SQLite file or postgresql:// URI)
    hero-compute info | --version

NODE and VM: a full id, a unique name, or a unique id prefix of at least 4 characters
(ambiguous: exit 64, listing them).  ``vm create`` without NODE lets the explorer place
the VM.

Results are tables when stdout is a terminal and JSON otherwise (or with ``--json``);
``call`` and ``rpc`` always print JSON.  Global options may come before or after the
command.

Exit status: 0 success; 1 the call failed (a JSON-RPC error); 2 the explorer or the node
could not be reached or did not answer in time; 3 no such node or VM; 4 refused by
policy (-32010); 64 bad usage; 130 interrupted (Ctrl-C); 141 the output pipe was
closed early (``| head``).

Modules: :mod:`.parser` (options), :mod:`.nodes`, :mod:`.vms`, :mod:`.explorer` (one
command group each), :mod:`.output` (tables or JSON), :mod:`.exits` (exit codes and
messages), :mod:`.units` (sizes, times), :mod:`.connect` (the only door to
:mod:`hero_compute.rpc`).
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Mapping

from twisted.internet import defer, task

from . import exits, names, parser, tls
from .connect import Explorer, NodeOffline, RpcError, TransportError, default_explorer
from .nodes import last_seen
from .output import Output
from .units import ago

__all__ = ["main"]

#: Commands whose ``node_id`` names a node that need not exist yet (``token create
#: --node-id``), taken as written rather than resolved to a known node.
NEW_NODE_IDS = frozenset({"token"})


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> None:
    """
    Run the command line and exit the process with its status.

    :param argv: the arguments, ``sys.argv[1:]`` when None
    :param env: the environment, :data:`os.environ` when None
    """
    env = os.environ if env is None else env
    top = parser.build(description=__doc__.split("\n\n")[0].strip())
    try:
        args = top.parse_args(argv)
        if args.command not in ("tls", "state"):
            parser.complete(args, lambda: default_explorer(env), env)
    except SystemExit as e:
        sys.exit(exits.USAGE if e.code else exits.OK)
    except ValueError as e:
        top.print_usage(sys.stderr)
        print(f"hero-compute: error: {e}", file=sys.stderr)
        sys.exit(exits.USAGE)
    if args.command == "tls":
        # The offline PKI works on files alone: no explorer, no reactor.
        sys.exit(tls.run(args))
    if args.command == "state":
        # So does a state copy: on the stores alone.
        from . import state

        sys.exit(state.run(args, sys.stdout, sys.stderr))
    output = Output(sys.stdout, sys.stderr, json_only=args.json, table=args.table)
    try:
        code = _react(args, output)
        sys.stdout.flush()
    except BrokenPipeError:
        code = _closed_pipe()
    sys.exit(code)


def _closed_pipe():
    # As the Python docs advise for SIGPIPE: point stdout at /dev/null so that the
    # interpreter's final flush does not fail again and print a traceback.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return exits.CLOSED_PIPE


def _react(args, output):
    codes: list[int] = []
    stopping: list[bool] = []

    def run(reactor):
        # Ctrl-C stops the reactor, which closes our connections under the call: that
        # is an interruption, not an unreachable explorer.
        reactor.addSystemEventTrigger("before", "shutdown", stopping.append, True)
        d = defer.ensureDeferred(_run(reactor, args, output, stopping))
        return d.addCallback(codes.append)

    try:
        task.react(run)
    except SystemExit as e:
        if e.code:
            return e.code
    return codes[0] if codes else exits.INTERRUPTED


async def _run(reactor, args, output, stopping=()):
    try:
        explorer = Explorer(
            reactor, args.explorer, args.timeout, tls_files=(args.ca, args.cert, args.key)
        )
    except ValueError as e:
        output.error(str(e))
        return exits.USAGE
    try:
        if getattr(args, "node_id", None) and args.command not in NEW_NODE_IDS:
            # Every NODE argument: a full id, a unique name or a unique id prefix.
            args.node_id = await names.node_id(explorer, args.node_id)
        return await args.run(explorer, args, output)
    except BrokenPipeError:
        return _closed_pipe()
    except (RpcError, TransportError, exits.Failure) as e:
        if stopping:
            output.error("interrupted")
            return exits.INTERRUPTED
        if isinstance(e, NodeOffline):
            e.message = await _offline(explorer, e.message, getattr(args, "node_id", None))
        code, message = exits.explain(e, explorer.address.uri)
        output.error(message)
        return code
    finally:
        await explorer.close()


async def _offline(explorer, message, node_id):
    """
    Say ``last seen 3 min ago`` where the explorer's message has a Unix time.
    """
    match = re.search(r"last seen (\d+(?:\.\d+)?)", message)
    if match:
        when = ago(float(match.group(1)), time.time())
        return message[: match.start()] + f"last seen {when}" + message[match.end() :]
    seen = await last_seen(explorer, node_id) if node_id else None
    return f"{message} ({seen})" if seen else message
