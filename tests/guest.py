"""
A real test guest, built offline from Debian packages, once per machine and inputs.

The guest is Debian's cloud kernel (``linux-image-cloud-amd64``) with a small initramfs:
busybox-static, dropbear and ``tests/guest_init.sh`` as ``/init``.  The init loads the
virtio and ISO 9660 modules, reads the NoCloud seed (``meta-data``'s ``local-hostname``,
the ``ssh_authorized_keys`` of ``user-data``, plain or the cloud-config part of a MIME
multipart document), brings up ``eth0`` as 10.0.2.15/24 via 10.0.2.2, starts dropbear on
port 22 with those keys for ``root``, prints ``hero-guest: ready hostname=<name>`` on the
serial console and keeps a shell on it.  Under TCG it reaches SSH in a few seconds.

Nothing is installed on the host: the packages are fetched with ``apt-get download`` from
the configured mirror and unpacked with ``dpkg-deb -x``.  The result is cached under
``/var/tmp/hero-guest-<hash of the inputs>/`` (``HERO_GUEST_CACHE`` overrides
``/var/tmp``), so every test of a run, later runs and other clones share one build; a
lock makes concurrent builders wait for one another.

Fixture API (session scope, available to every test through ``tests/conftest.py``)::

    def test_x(guest):
        guest.kernel      # absolute path of the kernel (vmlinuz)
        guest.initrd      # absolute path of the initramfs (cpio newc, gzip)
        guest.directory   # the directory holding both: add it to NODE_IMAGE_DIRS
        guest.ready_line  # b"hero-guest: ready", printed once SSH listens

A node may boot it when ``guest.directory`` is one of its image directories, e.g.
``env["NODE_IMAGE_DIRS"] = f"{images}:{guest.directory}"``, then ``vm.create`` with
``boot={"kernel": guest.kernel, "initrd": guest.initrd}`` (``cmdline`` defaults to
``console=ttyS0``).  ``guest.copy_to(directory)`` hard-links (or copies) both files into
another image directory and returns the new paths.  ``guest.qemu_argv()`` is the plain
QEMU command line for it, for tests that want no node at all.

When a package cannot be fetched (no mirror), the fixture skips with the reason.

To get in: :func:`ssh_key` makes a key pair, :func:`ssh_argv` is a non-interactive
``ssh`` command line for ``root`` on a forwarded port, :func:`ssh_until` retries it while
the guest boots, :func:`free_port` finds a loopback port.
"""

import fcntl
import gzip
import hashlib
import os
import shutil
import socket
import stat
import subprocess
import tempfile

import attrs
import pytest

from . import support

HERE = os.path.dirname(os.path.abspath(__file__))
INIT_SCRIPT = os.path.join(HERE, "guest_init.sh")

KERNEL_META = "linux-image-cloud-amd64"
#: Unpacked into the initramfs; dropbear's libraries are found with ldd below.
PACKAGES = (
    "busybox-static",
    "dropbear-bin",
    "libtomcrypt1",
    "libtommath1",
    "libgmp10",
    "libcrypt1",
    "zlib1g",
    "libc6",
)
#: Loaded by /init in this order after their dependencies (from modules.dep).
MODULES = ("virtio_pci", "virtio_net", "virtio_blk", "isofs")
READY_LINE = b"hero-guest: ready"
#: Bumped whenever :func:`_build` changes what it makes.
BUILD = 1


@attrs.frozen
class Guest:
    """
    A built test guest.

    :ivar kernel: path of the kernel image
    :ivar initrd: path of the initramfs
    :ivar directory: the cache directory holding both
    """

    kernel: str
    initrd: str
    directory: str
    ready_line: bytes = READY_LINE

    def copy_to(self, directory):
        """
        Put the kernel and initramfs into another directory (hard links where the file
        system allows, else copies).

        :param directory: an existing directory, e.g. a node's image directory
        :return: ``(kernel, initrd)``, the new paths
        """
        paths = []
        for source in (self.kernel, self.initrd):
            target = os.path.join(directory, os.path.basename(source))
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
            paths.append(target)
        return tuple(paths)

    def qemu_argv(self, seed=None, cmdline="console=ttyS0", net="user"):
        """
        :param seed: path of a NoCloud seed ISO, or ``None``
        :param cmdline: the kernel command line
        :param net: ``user`` for a virtio NIC on user networking, or ``None``
        :return: arguments of ``qemu-system-x86_64`` booting the guest under TCG with
            the serial port on stdio
        """
        argv = ["-machine", "accel=tcg", "-m", "256", "-nodefaults", "-no-user-config"]
        argv += ["-display", "none", "-serial", "stdio"]
        argv += ["-kernel", self.kernel, "-initrd", self.initrd, "-append", cmdline]
        if seed:
            argv += ["-drive", f"file={seed},format=raw,if=virtio,readonly=on"]
        if net:
            argv += ["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"]
        return argv


def _run(argv, **kwargs):
    return subprocess.run(argv, check=True, capture_output=True, **kwargs)


def _kernel_package():
    out = _run(["apt-cache", "depends", KERNEL_META], text=True).stdout
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends: linux-image-"):
            return line.split()[1]
    raise RuntimeError(f"no kernel package in `apt-cache depends {KERNEL_META}`")


def _versions(packages):
    out = _run(["apt-cache", "policy", *packages], text=True).stdout
    return [line.split()[-1] for line in out.splitlines() if "Candidate:" in line]


def inputs_digest():
    """
    :return: a short digest of everything the guest is built from (the init script,
        :data:`BUILD`, the package versions the mirror offers), naming its cache
        directory
    """
    digest = hashlib.sha256(f"build {BUILD}".encode())
    with open(INIT_SCRIPT, "rb") as f:
        digest.update(f.read())
    kernel = _kernel_package()
    digest.update(repr([kernel, *PACKAGES, *_versions([kernel, *PACKAGES])]).encode())
    return kernel, digest.hexdigest()[:16]


def _module_order(root, version):
    """Modules of :data:`MODULES` and their dependencies, dependencies first."""
    _run(["depmod", "-b", root, version])
    base = os.path.join(root, "lib", "modules", version)
    deps = {}
    with open(os.path.join(base, "modules.dep")) as f:
        for line in f:
            module, _, rest = line.partition(":")
            deps[module] = rest.split()
    by_name = {os.path.basename(m).split(".ko")[0].replace("-", "_"): m for m in deps}
    order = []

    def visit(path):
        for dep in deps[path]:
            visit(dep)
        if path not in order:
            order.append(path)

    for name in MODULES:
        visit(by_name[name])
    return base, order


def _build(directory, kernel_package):
    work = tempfile.mkdtemp(dir=os.path.dirname(directory), prefix=".build-")
    try:
        debs = os.path.join(work, "debs")
        unpacked = os.path.join(work, "unpacked")
        root = os.path.join(work, "root")
        os.makedirs(debs)
        _run(["apt-get", "download", "-q", kernel_package, *PACKAGES], cwd=debs)
        for deb in sorted(os.listdir(debs)):
            _run(["dpkg-deb", "-x", os.path.join(debs, deb), unpacked])
        version = kernel_package.removeprefix("linux-image-")
        modules_base, order = _module_order(unpacked, version)

        for sub in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "lib/modules"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
        for sub in ("proc", "sys", "dev", "tmp", "run", "seed", "var/log"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
        shutil.copy(os.path.join(unpacked, "bin", "busybox"), os.path.join(root, "bin"))
        applets = _run(
            [os.path.join(root, "bin", "busybox"), "--list"], text=True
        ).stdout.split()
        for applet in applets:
            link = os.path.join(root, "bin", applet)
            if not os.path.lexists(link):
                os.symlink("busybox", link)
        dropbear = os.path.join(unpacked, "usr", "sbin", "dropbear")
        shutil.copy(dropbear, os.path.join(root, "usr", "sbin"))
        for tool in ("dropbearkey",):
            shutil.copy(
                os.path.join(unpacked, "usr", "bin", tool), os.path.join(root, "usr", "bin")
            )
        _copy_libraries(dropbear, unpacked, root)

        loads = []
        for module in order:
            name = os.path.basename(module)
            shutil.copy(
                os.path.join(modules_base, module),
                os.path.join(root, "lib", "modules", name),
            )
            loads.append(name)
        with open(os.path.join(root, "etc", "modules-load"), "w") as f:
            f.write("\n".join(loads) + "\n")
        with open(os.path.join(root, "etc", "passwd"), "w") as f:
            f.write("root:x:0:0:root:/root:/bin/sh\n")
        with open(os.path.join(root, "etc", "group"), "w") as f:
            f.write("root:x:0:\n")
        with open(os.path.join(root, "etc", "shells"), "w") as f:
            f.write("/bin/sh\n")
        shutil.copy(INIT_SCRIPT, os.path.join(root, "init"))
        os.chmod(os.path.join(root, "init"), 0o755)

        out = os.path.join(work, "out")
        os.makedirs(out)
        shutil.copy(
            os.path.join(unpacked, "boot", f"vmlinuz-{version}"),
            os.path.join(out, "vmlinuz"),
        )
        with open(os.path.join(out, "initrd.img"), "wb") as f:
            f.write(gzip.compress(cpio_newc(root), compresslevel=6, mtime=0))
        os.rename(out, directory)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cpio_newc(root):
    """
    :param root: a directory
    :return: its tree as a ``newc`` cpio archive (what the kernel unpacks as an
        initramfs), every file owned by root
    """
    chunks = []
    ino = 0

    def entry(name, mode, data, nlink=1):
        nonlocal ino
        ino += 1
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        header = b"070701" + b"".join(b"%08x" % v for v in fields)
        chunks.append(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
        chunks.append(data + b"\0" * (-len(data) % 4))

    for directory, dirs, files in os.walk(root):
        dirs.sort()
        relative = os.path.relpath(directory, root)
        if relative != ".":
            entry(relative, stat.S_IFDIR | 0o755, b"", nlink=2)
        for name in sorted(files) + [
            d for d in dirs if os.path.islink(os.path.join(directory, d))
        ]:
            path = os.path.join(directory, name)
            archived = os.path.normpath(os.path.join(relative, name))
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                entry(archived, stat.S_IFLNK | 0o777, os.readlink(path).encode())
            else:
                with open(path, "rb") as f:
                    entry(archived, stat.S_IFREG | stat.S_IMODE(info.st_mode), f.read())
    entry("TRAILER!!!", 0, b"", nlink=1)
    return b"".join(chunks)


def _copy_libraries(binary, unpacked, root):
    """Copy the shared libraries ``binary`` needs (as resolved inside the unpacked
    packages) and the dynamic loader into the initramfs."""
    libdirs = [
        os.path.join(unpacked, d)
        for d in ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")
    ]
    out = _run(
        ["ldd", binary], env={"LD_LIBRARY_PATH": ":".join(libdirs)}, text=True
    ).stdout
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts:
            name, path = parts[0], parts[parts.index("=>") + 1]
        elif parts and parts[0].startswith("/"):
            name, path = os.path.basename(parts[0]), parts[0]
        else:
            continue
        if not path.startswith("/"):
            continue
        # Prefer the unpacked package's copy of each library over the host's.
        candidates = [os.path.join(d, name) for d in libdirs] + [path]
        source = next(c for c in candidates if os.path.exists(c))
        for target_dir in (
            ("lib/x86_64-linux-gnu", "lib64")
            if name.startswith("ld-linux")
            else ("lib/x86_64-linux-gnu",)
        ):
            os.makedirs(os.path.join(root, target_dir), exist_ok=True)
            shutil.copy(source, os.path.join(root, target_dir, name))


def build_guest(cache_root=None):
    """
    Build the guest, or find it built.

    :param cache_root: where cache directories live (default ``$HERO_GUEST_CACHE`` or
        ``/var/tmp``)
    :return: a :class:`Guest`
    """
    cache_root = cache_root or os.environ.get("HERO_GUEST_CACHE", "/var/tmp")
    kernel_package, digest = inputs_digest()
    directory = os.path.join(cache_root, f"hero-guest-{digest}")
    with open(os.path.join(cache_root, ".hero-guest.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isdir(directory):
            _build(directory, kernel_package)
    return Guest(
        kernel=os.path.join(directory, "vmlinuz"),
        initrd=os.path.join(directory, "initrd.img"),
        directory=directory,
    )


# -- reaching a guest -------------------------------------------------------------------


def free_port():
    """:return: a TCP port on 127.0.0.1 that was free a moment ago"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ssh_key(directory):
    """
    :param directory: where to put the key pair
    :return: ``(private key path, public key line)`` of a new ed25519 key
    """
    path = os.path.join(directory, "id_ed25519")
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", path],
        check=True,
    )
    with open(path + ".pub") as f:
        return path, f.read().strip()


def ssh_argv(key, port, host="127.0.0.1", user="root"):
    """
    :return: an ``ssh`` command line for ``root`` on a forwarded port, non-interactive
        and trusting the guest's new host key
    """
    return [
        "ssh",
        "-i",
        key,
        "-p",
        str(port),
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "ConnectTimeout=5",
        "-o",
        "LogLevel=ERROR",
        f"{user}@{host}",
    ]


def ssh_until(key, port, command, timeout=60.0, host="127.0.0.1", prefix=()):
    """
    Run ``command`` in the guest over SSH, retrying while the guest boots.

    :param prefix: a command line to run ``ssh`` under (``ip netns exec NS``)
    :return: the completed process of the first successful attempt
    """
    done = []

    def attempt():
        run = subprocess.run(
            [*prefix, *ssh_argv(key, port, host), command], capture_output=True, timeout=20
        )
        if run.returncode == 0:
            done.append(run)
        return bool(done)

    support.wait_for(attempt, timeout=timeout, interval=0.5, what=f"ssh to port {port}")
    return done[0]


@pytest.fixture(scope="session")
def guest():
    """The test guest (:class:`Guest`), built once per machine and inputs."""
    try:
        return build_guest()
    except (subprocess.CalledProcessError, RuntimeError, FileNotFoundError) as e:
        detail = getattr(e, "stderr", b"") or b""
        if isinstance(detail, bytes):
            detail = detail.decode(errors="replace")
        pytest.skip(f"cannot build the test guest: {e} {detail.strip()[-300:]}")
