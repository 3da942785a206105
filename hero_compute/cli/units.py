"""
Sizes and times for people: ``512M`` and ``10G`` in, ``3 s ago`` out.

Sizes are binary, as QEMU and ``qemu-img`` read them: ``M`` is MiB, ``G`` GiB, ``T`` TiB
(``MB``, ``MiB``, ``GB``, ... are accepted as the same).  A bare number is in the unit
of the field it fills (MiB for memory, GiB for disk), as on the wire.
"""

from __future__ import annotations

from hero_compute import options

#: Sizes are parsed where the taps parse them too (``NODE_CAPACITY``).
parse_size = options.parse_size


def memory_mb(text: str) -> int:
    """:return: ``text`` (e.g. ``512M``, ``2G``) in MiB, for ``memory_mb``"""
    return parse_size(text, "M")


def disk_gb(text: str) -> int:
    """:return: ``text`` (e.g. ``10G``, ``1T``) in GiB, for ``disk_gb``"""
    return parse_size(text, "G")


def format_mb(mb: object) -> str:
    """:return: a MiB count for reading: ``512M``, ``1.5G``, ``2T``"""
    if not isinstance(mb, (int, float)):
        return "?"
    if mb == 0:
        return "0"
    for unit, size in (("T", 1024 * 1024), ("G", 1024)):
        if mb >= size:
            return f"{mb / size:.4g}{unit}"
    return f"{mb:g}M"


def ago(then: object, now: float) -> str:
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
