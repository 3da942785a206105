"""
A real Debian 12 system disk with stock cloud-init, built offline from the configured
Debian mirror, for the slow test that shows cloud-init picking up the node's seed.

``debootstrap`` (with ``--include=python3-cffi-backend,cloud-init,openssh-server``:
cloud-init's cryptography needs the cffi backend spelled out) makes the root file system;
``/etc/cloud/cloud.cfg.d/90_hero.cfg`` says ``datasource_list: [NoCloud, None]`` so
cloud-init looks for our seed and nothing else; ``mkfs.ext4 -d`` turns the tree into a raw
disk image without mounting anything.  No kernel is installed in it: the VM boots the
test guest's kernel and initramfs (tests/guest.py) with ``hero.root=/dev/vda``, which
loads the virtio drivers and hands over to the disk's systemd.

Cached like the guest, under ``/var/tmp/hero-debian-<digest>/debian.raw``.

Fixture API (session scope)::

    def test_x(debian, guest):
        debian.image       # the raw ext4 disk image (a base image for vm.create)
        debian.directory   # add it to NODE_IMAGE_DIRS
        debian.size_gb     # the image's size: disk_gb must be at least this
        debian.cmdline     # the kernel command line that boots it
"""

import fcntl
import hashlib
import os
import shutil
import subprocess

import attrs
import pytest

SUITE = "bookworm"
INCLUDE = "python3-cffi-backend,cloud-init,openssh-server"
SIZE_GB = 3
#: Bumped whenever :func:`_build` changes what it makes.
BUILD = 1
CLOUD_CFG = """\
datasource_list: [NoCloud, None]
"""


@attrs.frozen
class DebianImage:
    """A built Debian disk image; see the module docstring."""

    image: str
    directory: str
    size_gb: int = SIZE_GB
    cmdline: str = "console=ttyS0 hero.root=/dev/vda rw"


def mirror():
    """
    :return: the Debian mirror apt is configured with (deb822 or one-line sources)
    """
    for directory, names in (("/etc/apt/sources.list.d", None), ("/etc/apt", None)):
        if not os.path.isdir(directory):
            continue
        for name in sorted(names or os.listdir(directory)):
            if not name.endswith((".sources", ".list")):
                continue
            with open(os.path.join(directory, name)) as f:
                for line in f:
                    words = line.split()
                    if line.startswith("URIs:") and "security" not in line:
                        return words[1]
                    if words[:1] == ["deb"] and "debian" in line and "security" not in line:
                        return next(w for w in words[1:] if "://" in w)
    return "http://deb.debian.org/debian"


def _digest(source):
    return hashlib.sha256(
        f"{BUILD} {SUITE} {INCLUDE} {source} {CLOUD_CFG}".encode()
    ).hexdigest()[:16]


def _build(directory, source):
    work = directory + ".build"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    try:
        root = os.path.join(work, "root")
        subprocess.run(
            ["debootstrap", f"--include={INCLUDE}", SUITE, root, source],
            check=True,
            capture_output=True,
        )
        with open(os.path.join(root, "etc/cloud/cloud.cfg.d/90_hero.cfg"), "w") as f:
            f.write(CLOUD_CFG)
        # No fstab entry is needed (the kernel mounts / from the command line), and the
        # apt caches only make the image bigger.
        shutil.rmtree(os.path.join(root, "var/cache/apt/archives"), ignore_errors=True)
        os.makedirs(os.path.join(root, "var/cache/apt/archives/partial"))
        image = os.path.join(work, "debian.raw")
        subprocess.run(
            ["mkfs.ext4", "-q", "-L", "root", "-d", root, image, f"{SIZE_GB}G"],
            check=True,
            capture_output=True,
        )
        os.makedirs(os.path.join(work, "out"))
        os.rename(image, os.path.join(work, "out", "debian.raw"))
        os.rename(os.path.join(work, "out"), directory)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_debian(cache_root=None):
    """
    Build the image, or find it built.

    :param cache_root: where cache directories live (default ``$HERO_GUEST_CACHE`` or
        ``/var/tmp``)
    :return: a :class:`DebianImage`
    """
    cache_root = cache_root or os.environ.get("HERO_GUEST_CACHE", "/var/tmp")
    source = mirror()
    directory = os.path.join(cache_root, f"hero-debian-{_digest(source)}")
    with open(os.path.join(cache_root, ".hero-debian.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isdir(directory):
            _build(directory, source)
    return DebianImage(os.path.join(directory, "debian.raw"), directory)


@pytest.fixture(scope="session")
def debian():
    """The Debian image (:class:`DebianImage`), built once per machine and inputs."""
    if os.geteuid() != 0:
        pytest.skip("debootstrap needs root")
    if not (shutil.which("debootstrap") and shutil.which("mkfs.ext4")):
        pytest.skip("debootstrap and mkfs.ext4 are needed (apt-get install debootstrap)")
    try:
        return build_debian()
    except subprocess.CalledProcessError as e:
        detail = (e.stderr or b"").decode(errors="replace").strip()[-500:]
        pytest.skip(f"cannot build the Debian image: {e} {detail}")
