"""
Which base images a VM's disk may be made from: only files under the node's image
directories (``NODE_IMAGE_DIRS``, by default ``<state_dir>/images``).

The node runs as root, so without this rule any file on the host (``/etc/shadow``, a
block device, another VM's disk) could be read by a guest.  The rule is checked twice:

- at ``vm.create``, the requested path is resolved (:func:`os.path.realpath`) and the
  resolved path is what is stored and becomes the overlay's backing file, so a symlink
  swapped in later is never followed through the request's name;
- at ``vm.start``, the stored path must still resolve to itself and still lie under the
  image directories, so a directory on the way replaced by a symlink, or an image
  directory the operator has since removed from the list, refuses the start.

A path outside the image directories is refused with one message whether or not it
exists: the node never probes, let alone reports on, files outside them.
"""

from __future__ import annotations

import os

import attrs

from hero_compute.rpc.errors import InvalidParams, RefusedByPolicy

#: The image directory, under the state directory, when none is configured.
DEFAULT_IMAGE_DIR = "images"


def default_image_dirs(state_dir: str) -> tuple[str, ...]:
    """
    :param state_dir: the node's state directory
    :return: the image directories of a node configured with none
    """
    return (os.path.join(os.path.abspath(state_dir), DEFAULT_IMAGE_DIR),)


def _under(path, directory):
    return os.path.commonpath([path, directory]) == directory


@attrs.frozen
class ImagePolicy:
    """
    The base images a node allows.

    :ivar image_dirs: absolute directories base images must lie under (as configured;
        they are resolved at each check, so they may be created, or be symlinks)
    """

    image_dirs: tuple = attrs.field(
        converter=lambda ds: tuple(
            os.path.normpath(os.path.abspath(os.fspath(d))) for d in ds
        )
    )

    def resolve(self, image: str | None) -> str | None:
        """
        The file a requested base image names, if it is allowed.

        :param image: the path from ``vm.create``, or ``None``
        :return: the resolved path, for QEMU to open and the record to keep, or ``None``
        :raise InvalidParams: a relative path, or no regular file inside the image
            directories
        :raise RefusedByPolicy: a path outside the image directories, existing or not
        """
        if image is None:
            return None
        if not isinstance(image, str) or not os.path.isabs(image) or "\0" in image:
            raise InvalidParams(
                f"image must be an absolute path on the node, not {image!r}"
            )
        # Lexically first, so that nothing outside the image directories is even looked
        # at: realpath of "/etc/x/../../images/a" would otherwise tell whether /etc/x is
        # a symlink.
        requested = os.path.normpath(image)
        allowed = self._allowed()
        if not any(_under(requested, d) for d in self.image_dirs + allowed):
            raise self._refused(image)
        resolved = os.path.realpath(requested)
        if not any(_under(resolved, d) for d in allowed):
            # A symlink inside an image directory that points out of it.
            raise self._refused(image)
        # InvalidParams, not InvalidVmState: no VM state is involved and only different
        # params can succeed.  Inside the image directories, saying so reveals nothing.
        if not os.path.isfile(resolved):
            raise InvalidParams(f"image {image!r} does not exist or is not a regular file")
        return resolved

    def check_stored(self, resolved: str | None) -> None:
        """
        Check, before QEMU opens it, that a VM's stored base image is still allowed.

        :param resolved: the path :meth:`resolve` returned at create, or ``None``
        :raise RefusedByPolicy: when a symlink has been swapped in on its way, or it no
            longer lies under the image directories
        """
        if resolved is None:
            return
        if os.path.realpath(resolved) != resolved or not any(
            _under(resolved, d) for d in self._allowed()
        ):
            raise RefusedByPolicy(
                f"base image {resolved!r} is no longer an allowed image (a symlink on its "
                f"path, or outside the allowed image directories); not starting the VM"
            )

    def _allowed(self):
        return tuple(os.path.realpath(d) for d in self.image_dirs)

    @staticmethod
    def _refused(image):
        return RefusedByPolicy(f"image {image!r} is outside the allowed image directories")
