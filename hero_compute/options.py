"""
Helpers for the command lines' options (the taps' ``Options``, the CLI's defaults):
coercers and environment fallbacks.

The callers pass ``os.environ`` in; nothing here reads the environment by itself.

Long because: every value format the taps and the CLI share (addresses, seconds,
sizes, labels, capacities) is parsed here once, so an operator's ``16G`` or ``zone=a``
means the same everywhere.
"""

import getopt
import math
import os
import re
import sys
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


def limit_help(*prefixes):
    """
    Fill ``{defaults}`` in an ``opt_limit`` docstring with the defaults of the
    :class:`~hero_compute.rpc.limits.Limits` record (the only place they are written)
    whose variables start with ``prefixes``; then fold it as :func:`help_text` does.
    """
    from hero_compute.rpc.limits import defaults_text

    def fill(method):
        method.__doc__ = method.__doc__.format(defaults=defaults_text(*prefixes))
        return help_text(method)

    return fill


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


class _NamedCoerce(usage.CoerceParameter):
    """A coerced parameter whose bad value is reported with the option's name."""

    def dispatch(self, parameterName, value):
        if value is None:
            raise usage.UsageError(f"--{parameterName} requires a value")
        try:
            self.options.opts[parameterName] = self.coerce(value)
        except (ValueError, AddressError) as e:
            raise usage.UsageError(f"--{parameterName} {value!r}: {e}") from None


class TapOptions(usage.Options):
    """
    Options of a twistd plugin, for operators: run by twistd, a bad value (of an option
    or a variable) ends the process with only its message, one line, while a misused
    command line (an unknown option, a stray argument) still shows the usage.  Errors
    the service meets when it starts, and that an operator can fix, are printed the
    same way (:func:`print_startup_errors`).

    Parsed outside twistd (tests, other programs), every error stays a
    :class:`usage.UsageError`.

    :cvar command: the twistd command, e.g. ``explorer``
    """

    command = ""

    def __init__(self) -> None:
        usage.Options.__init__(self)
        # Twisted's own wrapper says "Parameter type enforcement failed" and not which
        # option it was.
        dispatch = self._dispatch
        for name, handler in list(dispatch.items()):
            if isinstance(handler, usage.CoerceParameter):
                dispatch[name] = _NamedCoerce(self, handler.coerce)

    @property
    def under_twistd(self) -> bool:
        """Whether twistd parses us, as the options of its subcommand."""
        return getattr(self, "parent", None) is not None

    def parseOptions(self, options=None):
        if options is None:
            options = sys.argv[1:]
        try:
            _, arguments = getopt.getopt(options, self.shortOpt, self.longOpt)
        except getopt.error as e:
            raise usage.UsageError(str(e)) from None
        if arguments:
            raise usage.UsageError(f"unexpected argument {arguments[0]!r}")
        try:
            usage.Options.parseOptions(self, options)
        except usage.UsageError as e:
            if not self.under_twistd:
                raise
            # Not twistd's UsageError handling: it prints the whole usage first.
            raise SystemExit(f"twistd {self.command}: {e}") from None


def print_startup_errors(command, known, directories=()) -> None:
    """
    Print the errors an operator can fix that stop the service as it starts as one
    line on stderr, without a traceback: twistd lets an exception from starting the
    service propagate (after removing its pid file), and the interpreter hands it to
    :data:`sys.excepthook`, which this replaces.  Anything else keeps its traceback.

    :param command: the twistd command, e.g. ``explorer``
    :param known: exception classes whose message is meant for the operator, or
        ``(class, template)`` pairs to say more than the message (``{error}`` in the
        template stands for it)
    :param directories: ``(directory, variable)`` pairs: an ``OSError`` on a file under
        one of them is reported naming the variable
    """
    previous = sys.excepthook
    templates = [k if isinstance(k, tuple) else (k, "{error}") for k in known]
    # The most specific first: a state directory may well lie in the socket directory.
    directories = sorted(directories, key=lambda d: len(d[0]), reverse=True)

    def hook(kind, value, tb) -> None:
        message = None
        for cls, template in templates:
            if isinstance(value, cls):
                message = template.format(error=value)
                break
        if message is not None:
            pass
        elif isinstance(value, OSError) and value.filename:
            name = os.fsdecode(value.filename)
            for directory, variable in directories:
                if name == directory or name.startswith(directory.rstrip("/") + "/"):
                    message = (
                        f"cannot use {name} ({variable}): {value.strerror}; set "
                        f"{variable} to a directory this user (uid {os.getuid()}) "
                        "may write"
                    )
                    break
        if message is None:
            previous(kind, value, tb)
            return
        # The real stderr: twistd has pointed sys.stderr at its log by now.
        stream = sys.__stderr__ or sys.stderr
        stream.write(f"twistd {command}: {message}\n")
        stream.flush()

    sys.excepthook = hook


def source_of(options, key, env, name):
    """
    Where an option's value comes from, for messages: ``--key`` when the command line
    gave it, else the variable (call it before :func:`from_env` fills the option).

    :param name: the option's variable
    """
    return f"--{key}" if options[key] is not None else name


#: A label key (CONTRACT §7): the explorer refuses a heartbeat carrying any other.
_LABEL_KEY = re.compile(r"[A-Za-z0-9._/-]{1,63}")

#: At most this many labels, of at most this many characters each (CONTRACT §7).
MAX_LABELS = 32
MAX_LABEL_VALUE = 256

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([MGT]?)(?:i?B)?\s*", re.IGNORECASE)
_MIB = {"M": 1, "G": 1024, "T": 1024 * 1024}


def parse_size(text, unit, zero: bool = False):
    """
    Parse a size into whole units.

    :param text: e.g. ``512M``, ``1.5G``, ``10G``, ``1T``, or a bare number of ``unit``
    :param unit: ``"M"`` or ``"G"``, the unit of the result (and of a bare number)
    :param zero: whether zero is a size
    :return: the size as an integer number of ``unit``
    :raise ValueError: naming the text and the accepted forms
    """
    match = _SIZE.fullmatch(text)
    if not match:
        raise ValueError(
            f"{text!r} is not a size: use a number with M, G or T "
            f"(binary units), e.g. 512M, 2G, 1T"
        )
    number, suffix = float(match.group(1)), (match.group(2) or unit).upper()
    value = number * _MIB[suffix] / _MIB[unit]
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise ValueError(f"{text!r}: a size must be more than zero")
    if value != int(value):
        name = {"M": "MiB", "G": "GiB"}[unit]
        raise ValueError(f"{text!r} is not a whole number of {name}")
    return int(value)


def pairs(text):
    """
    Split ``key=value,key=value`` (spaces around items ignored; an empty text is none).

    :return: a list of ``(key, value)``
    :raise ValueError: for an item without ``=``
    """
    found = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r} is not key=value")
        found.append((key.strip(), value.strip()))
    return found


def parse_labels(text):
    """
    Coerce ``NODE_LABELS``: ``key=value,key=value`` under the rules of CONTRACT §7.

    :return: ``{key: value}``
    :raise ValueError: naming the bad item
    """
    labels = {}
    for key, value in pairs(text):
        if not _LABEL_KEY.fullmatch(key):
            raise ValueError(
                f"label key {key!r}: 1 to 63 of the characters A-Z a-z 0-9 . _ / -"
            )
        if len(value) > MAX_LABEL_VALUE:
            raise ValueError(f"label {key}: its value is over {MAX_LABEL_VALUE} characters")
        if key in labels:
            raise ValueError(f"label {key} is given twice")
        labels[key] = value
    if len(labels) > MAX_LABELS:
        raise ValueError(f"{len(labels)} labels: at most {MAX_LABELS}")
    return labels


coerce_doc(parse_labels, "key=value,key=value (at most 32).")

#: ``NODE_CAPACITY``'s keys, and the resource each one caps (with its unit).
_CAPACITY_KEYS = {
    "vcpus": ("vcpus", None),
    "memory": ("memory_mb", "M"),
    "disk": ("disk_gb", "G"),
}

#: The largest amount a heartbeat may carry (CONTRACT §7).
MAX_AMOUNT = 2**31


def parse_capacity(text):
    """
    Coerce ``NODE_CAPACITY``: ``vcpus=8,memory=16G,disk=200G``, any subset (memory a
    bare number of MiB, disk of GiB, or with M, G, T).

    :return: ``{resource: amount}`` with keys among ``vcpus``, ``memory_mb``, ``disk_gb``
    :raise ValueError: naming the bad item
    """
    capacity = {}
    for key, value in pairs(text):
        if key not in _CAPACITY_KEYS:
            raise ValueError(f"{key!r} is not one of vcpus, memory, disk")
        resource, unit = _CAPACITY_KEYS[key]
        if resource in capacity:
            raise ValueError(f"{key} is given twice")
        if unit is None:
            if not value.isdigit():
                raise ValueError(f"vcpus={value!r} is not a whole number")
            amount = int(value)
        else:
            amount = parse_size(value, unit, zero=True)
        if amount > MAX_AMOUNT:
            raise ValueError(f"{key}={value!r} is over {MAX_AMOUNT} {resource[-2:]}")
        capacity[resource] = amount
    if not capacity:
        raise ValueError("no vcpus, memory or disk given")
    return capacity


coerce_doc(parse_capacity, "vcpus=N,memory=SIZE,disk=SIZE, any subset (e.g. memory=16G).")
