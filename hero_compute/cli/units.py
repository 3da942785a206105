"""
Sizes and times for people: ``512M`` and ``10G`` in, ``3 s ago`` out.

Sizes are binary, as QEMU and ``qemu-img`` read them: ``M`` is MiB, ``G`` GiB, ``T`` TiB
(``MB``, ``MiB``, ``GB``, ... are accepted as the same).  A bare number is in the unit
of the field it fills (MiB for memory, GiB for disk), as on the wire.
"""

import math
import re

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([MGT]?)(?:i?B)?\s*", re.IGNORECASE)
_MIB = {"M": 1, "G": 1024, "T": 1024 * 1024}


def parse_size(text, unit):
    """
    Parse a size into whole units.

    :param text: e.g. ``512M``, ``1.5G``, ``10G``, ``1T``, or a bare number of ``unit``
    :param unit: ``"M"`` or ``"G"``, the unit of the result (and of a bare number)
    :return: the size as a positive integer number of ``unit``
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
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{text!r}: a size must be more than zero")
    if value != int(value):
        name = {"M": "MiB", "G": "GiB"}[unit]
        raise ValueError(f"{text!r} is not a whole number of {name}")
    return int(value)


def memory_mb(text):
    """:return: ``text`` (e.g. ``512M``, ``2G``) in MiB, for ``memory_mb``"""
    return parse_size(text, "M")


def disk_gb(text):
    """:return: ``text`` (e.g. ``10G``, ``1T``) in GiB, for ``disk_gb``"""
    return parse_size(text, "G")


def format_mb(mb):
    """:return: a MiB count for reading: ``512M``, ``1.5G``, ``2T``"""
    if not isinstance(mb, (int, float)):
        return "?"
    if mb == 0:
        return "0"
    for unit, size in (("T", 1024 * 1024), ("G", 1024)):
        if mb >= size:
            return f"{mb / size:.4g}{unit}"
    return f"{mb:g}M"


def ago(then, now):
    """
    How long ago a Unix time was, coarsely: ``3 s ago``, ``4 min ago``, ``2 h ago``,
    ``5 d ago``.

    :param then: Unix seconds, or None
    :param now: Unix seconds now
    """
    if not isinstance(then, (int, float)):
        return "never"
    delta = max(0.0, now - then)
    for size, name in ((86400, "d"), (3600, "h"), (60, "min")):
        if delta >= size * (2 if size == 86400 else 1):
            return f"{int(delta // size)} {name} ago"
    return f"{int(delta)} s ago"
