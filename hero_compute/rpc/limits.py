"""
The limits of CONTRACT §7 as one frozen record, read once by the taps and passed down,
so that every refusal under hostile load checks a plain attribute (cheap on the hot path)
and a test can build a service with tight limits without touching globals.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import attrs

MiB = 1024 * 1024


@attrs.frozen
class Limits:
    """
    What one peer may take of a process (explorer and node alike for the ``HERO_*``
    ones, the explorer alone for the others).

    :ivar head_timeout: seconds a request head may take to arrive (408 beyond)
    :ivar max_unsent: bytes of a connection's unsent output before we stop reading it
    :ivar max_batch: requests in one JSON-RPC batch (-32600 beyond)
    :ivar max_response: bytes of one response body (that item -32603 beyond)
    :ivar max_conns_per_addr: open connections per TCP source address
    :ivar fd_reserve: file descriptors kept free for the Unix socket
    :ivar calls_per_node: proxied calls in flight to one node (-32003 busy beyond)
    :ivar calls_total: proxied calls in flight in all
    :ivar max_reply: bytes of a proxied reply (-32003 beyond)
    :ivar max_nodes: nodes in the registry (new ids -32010 beyond)
    :ivar new_nodes_per_addr: new node ids per source address per minute
    :ivar forget_after: seconds offline before a node is forgotten
    """

    head_timeout: float = 10.0
    max_unsent: int = 1 * MiB
    max_batch: int = 100
    max_response: int = 16 * MiB
    max_conns_per_addr: int = 1024
    fd_reserve: int = 64
    calls_per_node: int = 16
    calls_total: int = 1024
    max_reply: int = 4 * MiB
    max_nodes: int = 100_000
    new_nodes_per_addr: int = 600
    forget_after: float = 7 * 86400.0


#: The defaults of CONTRACT §7, the one place they are written: what a signature taking
#: a single limit defaults to, and what ``--help`` says.
DEFAULTS = Limits()


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"expected a positive whole number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise ValueError(f"expected a positive number, got {text!r}")
    return value


#: Each limit's variable and how its text is read (CONTRACT §7).
VARIABLES: Mapping[str, tuple[str, Callable[[str], object]]] = {
    "head_timeout": ("HERO_HEAD_TIMEOUT", _positive_float),
    "max_unsent": ("HERO_MAX_UNSENT", _positive_int),
    "max_batch": ("HERO_MAX_BATCH", _positive_int),
    "max_response": ("HERO_MAX_RESPONSE", _positive_int),
    "max_conns_per_addr": ("HERO_MAX_CONNS_PER_ADDR", _positive_int),
    "fd_reserve": ("HERO_FD_RESERVE", _positive_int),
    "calls_per_node": ("EXPLORER_CALLS_PER_NODE", _positive_int),
    "calls_total": ("EXPLORER_CALLS_TOTAL", _positive_int),
    "max_reply": ("EXPLORER_MAX_REPLY", _positive_int),
    "max_nodes": ("EXPLORER_MAX_NODES", _positive_int),
    "new_nodes_per_addr": ("EXPLORER_NEW_NODES_PER_ADDR", _positive_int),
    "forget_after": ("NODE_FORGET_AFTER", _positive_float),
}


def defaults_text(*prefixes: str) -> str:
    """
    The defaults of the limits whose variables start with one of ``prefixes``, as
    ``--limit`` takes them (``max_batch=100, ...``), for ``--help``.

    :param prefixes: ``"HERO_"``, ``"EXPLORER_"``, ``"NODE_"``
    """
    return ", ".join(
        f"{field}={_text(getattr(DEFAULTS, field))}"
        for field, (name, _) in VARIABLES.items()
        if name.startswith(prefixes)
    )


def _text(value: object) -> str:
    """A default as it would be typed: ``10`` for 10.0 seconds, bytes in full."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def limits_from(env: Mapping[str, str], **given: object) -> Limits:
    """
    The limits from the environment, with the command line's values (``given``) first.

    :param env: the environment mapping
    :param given: limits given as options (None: not given)
    :raise ValueError: naming the variable whose value is bad
    """
    values: dict[str, object] = {}
    for field, (name, coerce) in VARIABLES.items():
        if given.get(field) is not None:
            values[field] = given[field]
            continue
        text = env.get(name)
        if text:
            try:
                values[field] = coerce(text)
            except ValueError as e:
                raise ValueError(f"{name}={text!r}: {e}") from None
    return Limits(**values)  # type: ignore[arg-type]  # keys are Limits' fields
