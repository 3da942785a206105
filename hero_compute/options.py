"""
Helpers for the command lines' options (the taps' ``Options``, the CLI's defaults):
coercers and environment fallbacks.

The callers pass ``os.environ`` in; nothing here reads the environment by itself.
"""

import os
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.python import usage

from hero_compute.rpc.addresses import AddressError, parse_address, parse_listen

_Coercer = TypeVar("_Coercer", bound=Callable[..., Any])


def coerce_doc(coerce: _Coercer, doc: str) -> _Coercer:
    """
    Give a coercer the text ``--help`` shows for its values (``usage.Options`` reads
    its ``coerceDoc``).

    :return: ``coerce``
    """
    # setattr: a function has no such attribute as far as mypy knows.
    setattr(coerce, "coerceDoc", doc)  # noqa: B010
    return coerce


def socket_dir(env):
    """
    :param env: the environment mapping
    :return: ``HERO_SOCKET_DIR``, or ``~/hero/var/sockets``
    :raise usage.UsageError: when it is not an absolute path
    """
    path = os.path.expanduser(env.get("HERO_SOCKET_DIR") or "~/hero/var/sockets")
    if not os.path.isabs(path):
        raise usage.UsageError(
            f"HERO_SOCKET_DIR={path!r}: must be an absolute path (sockets are named by "
            "unix:///abs/path URIs)"
        )
    return path


def help_text(method):
    """
    Fold an ``opt_`` method's docstring onto one line: ``--help`` shows it verbatim, with
    the source's indentation in the middle of a sentence otherwise.
    """
    method.__doc__ = " ".join(method.__doc__.split())
    return method


def seconds(text):
    """
    Coerce a positive, possibly fractional, number of seconds.

    :raise ValueError: for anything else
    """
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise ValueError(f"expected a positive number of seconds, got {text!r}")
    return value


coerce_doc(seconds, "A positive number of seconds (may be fractional).")


def absolute_socket(text):
    """
    Coerce a Unix socket location: an absolute path or a ``unix://`` URI.

    :return: the absolute path
    """
    address = parse_address(text)
    if not address.is_unix:
        raise ValueError(f"{text!r} is not a Unix socket path or unix:/// URI")
    return address.path


coerce_doc(absolute_socket, "An absolute path, or unix:///abs/path.sock.")


def listen_address(text):
    """Coerce a TCP listen address, ``host:port`` or ``[v6addr]:port``."""
    return parse_listen(text)


coerce_doc(listen_address, "host:port or [v6addr]:port.")


def from_env(options, key, env, name, coerce):
    """
    Fill an option from the environment when the command line did not give it.

    :param options: the :class:`twisted.python.usage.Options`
    :param key: the option's key
    :param env: the environment mapping
    :param name: the variable's name
    :param coerce: the option's coercer
    :raise usage.UsageError: naming the variable when its value is bad
    """
    if options[key] is not None:
        return
    text = env.get(name)
    if text is None or text == "":
        return
    try:
        options[key] = coerce(text)
    except (ValueError, AddressError) as e:
        raise usage.UsageError(f"{name}={text!r}: {e}") from None


def absolute_path(text):
    """Coerce an absolute file or directory path (``~`` is expanded)."""
    path = os.path.expanduser(text)
    if not os.path.isabs(path):
        raise ValueError(f"{text!r} is not an absolute path")
    return path


coerce_doc(absolute_path, "An absolute path.")


def state_dir(env, name, default):
    """
    :param env: the environment mapping
    :param name: the variable naming the directory (e.g. ``EXPLORER_STATE_DIR``)
    :param default: its default, e.g. ``~/hero/var/hero_compute_explorer``
    :return: the absolute directory
    :raise usage.UsageError: naming the variable when it is not absolute
    """
    text = env.get(name) or default
    try:
        return absolute_path(text)
    except ValueError as e:
        raise usage.UsageError(f"{name}={text!r}: {e}") from None


def limits(options, env):
    """
    The limits of CONTRACT §7: ``--limit NAME=VALUE`` options first (NAME as in
    :class:`~hero_compute.rpc.limits.Limits`, or its variable's name), then the
    environment.

    :raise usage.UsageError: naming the option or variable whose value is bad
    """
    from hero_compute.rpc.limits import VARIABLES, limits_from

    given = {}
    by_variable = {name: field for field, (name, _) in VARIABLES.items()}
    for item in options["limit"]:
        name, eq, text = item.partition("=")
        field = by_variable.get(name, name.replace("-", "_"))
        if not eq or field not in VARIABLES:
            raise usage.UsageError(
                f"--limit {item!r}: expected NAME=VALUE with NAME one of "
                f"{', '.join(sorted(VARIABLES))}"
            )
        try:
            given[field] = VARIABLES[field][1](text)
        except ValueError as e:
            raise usage.UsageError(f"--limit {item!r}: {e}") from None
    try:
        return limits_from(env, **given)
    except ValueError as e:
        raise usage.UsageError(str(e)) from None
