"""
Exit codes, and the message an operator reads when a command fails.

Each failure says what happened and what to try next; the exit code tells a script which
kind of failure it was (see :data:`CODES`).
"""

from __future__ import annotations

import json

from .connect import (
    CallTimedOut,
    NodeNotFound,
    NodeOffline,
    NodeUnreachable,
    RefusedByPolicy,
    RpcError,
    TransportError,
    VmNotFound,
)

OK = 0
#: The call failed: a JSON-RPC error not listed below (bad params, invalid VM state...).
FAILED = 1
#: The explorer, or the node behind it, could not be reached or did not answer in time.
UNREACHABLE = 2
#: No such node or VM.
NOT_FOUND = 3
#: Refused by policy (-32010).
REFUSED = 4
#: Bad usage: unknown command or option, malformed argument.
USAGE = 64
#: Interrupted by Ctrl-C (SIGINT), as shells report it.
INTERRUPTED = 130
#: The output pipe was closed by its reader (``| head``): quiet, as if killed by SIGPIPE.
CLOSED_PIPE = 141

#: For ``--help`` and the module docstring.
CODES = f"""\
exit status:
  {OK:<4}success
  {FAILED:<4}the call failed (a JSON-RPC error: bad params, invalid VM state, ...)
  {UNREACHABLE:<4}the explorer or the node could not be reached, or did not answer in time
  {NOT_FOUND:<4}no such node or VM
  {REFUSED:<4}refused by policy (-32010)
  {USAGE:<4}bad usage
  {INTERRUPTED:<4}interrupted (Ctrl-C)
  {CLOSED_PIPE:<4}the output pipe was closed early (e.g. | head)"""


class Failure(Exception):
    """
    A command failed in a way the CLI itself detected (a VM stuck in a state, a name
    matching nothing).

    :param message: what happened and what to do
    :param code: the exit code
    """

    def __init__(self, message: str, code: int = FAILED) -> None:
        Exception.__init__(self, message)
        self.message = message
        self.code = code


def explain(error: BaseException, explorer: str) -> tuple[int, str]:
    """
    The exit code and message for a failed command.

    :param error: the exception: :class:`Failure`, an ``RpcError`` or a
        ``TransportError``
    :param explorer: the explorer URI, for the message
    :return: ``(code, message)``
    """
    if isinstance(error, Failure):
        return error.code, error.message
    if isinstance(error, CallTimedOut):
        return UNREACHABLE, (
            f"timed out: {error.reason} from the explorer at {explorer}; the operation "
            "may be slow or the explorer overloaded (raise --timeout)"
        )
    if isinstance(error, TransportError):
        return UNREACHABLE, (
            f"cannot reach the explorer at {explorer}: {error.reason}\n"
            "is the explorer running? check --explorer / HERO_SOCKET_DIR"
        )
    if not isinstance(error, RpcError):
        raise error
    code, hint = FAILED, None
    if isinstance(error, NodeNotFound):
        code, hint = NOT_FOUND, "hero-compute nodes lists the known nodes"
    elif isinstance(error, VmNotFound):
        code, hint = NOT_FOUND, "hero-compute vm list NODE lists its VMs"
    elif isinstance(error, NodeOffline):
        code, hint = UNREACHABLE, "is its node process running?"
    elif isinstance(error, NodeUnreachable):
        code, hint = (
            UNREACHABLE,
            (
                "check that the node runs and that the explorer can "
                "connect to the address it advertises"
            ),
        )
    elif isinstance(error, RefusedByPolicy):
        code, hint = REFUSED, "refused by policy: nothing was changed"
    message = f"error {error.code}: {error.message}"
    if error.data is not None:
        message += f"\n{json.dumps(error.data, indent=2, sort_keys=True)}"
    return code, message + (f"\n{hint}" if hint else "")
