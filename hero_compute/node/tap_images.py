"""
``twistd node``'s options for base images: the directories whose images may back a
VM's disk, and the limits of ``image.import``.  Part of the tap: each option also comes
from its variable, the command line winning.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from twisted.python import usage

from .images import image_settings


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
