"""
``twistd node``'s options for base images: the directories whose images may back a
VM's disk, and the limits of ``image.import`` (how their text is read:
:func:`parse_size`, :func:`image_settings`).  Part of the tap: each option also comes
from its variable, the command line winning.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from twisted.python import usage

from .images import DEFAULT_IMAGE_MAX

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """
    :param text: bytes, or a number with ``K``, ``M``, ``G``, ``T`` (binary units,
        optionally followed by ``iB`` or ``B``): ``20G``, ``512MiB``, ``1073741824``
    :return: the size in bytes, at least 1
    :raise ValueError: saying what is accepted
    """
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    value = int(match.group(1)) * _UNITS[match.group(2).upper()] if match else 0
    if value < 1:
        raise ValueError(
            f"{text!r} is not a size: expected bytes, or a number with K, M, G or T "
            "(binary units), e.g. 20G"
        )
    return value


def image_settings(max_text: str | None, local_text: str | None) -> tuple[int, bool]:
    """
    Check ``NODE_IMAGE_MAX`` and ``NODE_IMAGE_FETCH_LOCAL`` (or their options).

    :param max_text: the largest image, as :func:`parse_size` reads it, or None
    :param local_text: ``1`` (or ``true``, ``yes``) to allow local fetches, ``0``,
        empty or None not to
    :return: ``(max_bytes, allow_local)``
    :raise ValueError: naming the variable
    """
    max_bytes = DEFAULT_IMAGE_MAX
    if max_text:
        try:
            max_bytes = parse_size(max_text)
        except ValueError as e:
            raise ValueError(f"NODE_IMAGE_MAX (--image-max): {e}") from None
    local = (local_text or "").strip().lower()
    if local not in ("", "0", "1", "true", "false", "yes", "no"):
        raise ValueError(f"NODE_IMAGE_FETCH_LOCAL={local_text!r}: expected 1 or 0")
    return max_bytes, local in ("1", "true", "yes")


def post_options(options: usage.Options, env: Mapping[str, str]) -> None:
    """
    Fill the image options from the environment: ``options["image-dir"]`` from
    ``NODE_IMAGE_DIRS`` when no ``--image-dir`` was given, and ``options["images"]``.

    :param options: the node's :class:`~twisted.python.usage.Options`
    :param env: the environment mapping
    :raise usage.UsageError: naming a bad variable
    """
    if not options["image-dir"] and env.get("NODE_IMAGE_DIRS"):
        for path in env["NODE_IMAGE_DIRS"].split(":"):
            if not os.path.isabs(path):
                raise usage.UsageError(
                    f"NODE_IMAGE_DIRS={env['NODE_IMAGE_DIRS']!r}: {path!r} is not an "
                    "absolute path"
                )
            options["image-dir"].append(path)
    try:
        options["images"] = image_settings(
            options.get("image-max") or env.get("NODE_IMAGE_MAX"),
            options.get("image-fetch-local") or env.get("NODE_IMAGE_FETCH_LOCAL"),
        )
    except ValueError as e:
        raise usage.UsageError(str(e)) from None
