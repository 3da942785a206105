"""
``node.images`` and ``image.import`` on a real twistd node, against a local HTTP server
on loopback (``NODE_IMAGE_FETCH_LOCAL=1``), and once through a real explorer.
"""

import os
import signal
import subprocess

import pytest
import pytest_twisted

from hero_compute.node.fetch import RefusedTarget, check_target, refused_target

from .image_server import CHUNK, ImageServer, sha256
from .support import result, rpc, wait_for

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def qcow2(tmp_path_factory):
    """A real qcow2 image of 64 MiB virtual size, as bytes."""
    path = tmp_path_factory.mktemp("img") / "base.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True
    )
    return path.read_bytes()


@pytest.fixture
def server(qcow2):
    """The local HTTP server, with a qcow2 image and plain files of 2 and 3 MiB."""
    files = {
        "base.qcow2": qcow2,
        "two": os.urandom(2 * MIB),
        "three": os.urandom(3 * MIB),
        "slow": os.urandom(8 * CHUNK),
        "stop": os.urandom(8 * CHUNK),
        "kill": os.urandom(8 * CHUNK),
    }
    s = ImageServer(files)
    yield s
    s.close()


@pytest.fixture
def node(twistd, short_tmp):
    """``node(env)`` starts a real node; returns ``(socket URI, image directory)``."""

    def start(env=None, image_dir=None):
        image_dir = image_dir or f"{short_tmp}/images"
        process = twistd(
            [
                "node",
                "--socket",
                f"{short_tmp}/n.sock",
                "--state-dir",
                f"{short_tmp}/st",
                "--explorer",
                f"unix://{short_tmp}/nobody.sock",
                "--interval",
                "5",
            ],
            env={"NODE_IMAGE_DIRS": image_dir, **(env or {})},
        )
        process.listening()
        start.process = process
        return f"unix://{short_tmp}/n.sock", image_dir

    return start


def start_import(uri, url, name, digest):
    """image.import that must start."""
    assert result(uri, "image.import", {"url": url, "name": name, "sha256": digest}) == {
        "name": name,
        "state": "importing",
    }


def refused(uri, url, name, digest="0" * 64):
    """image.import that must be -32005 at once; returns the message."""
    response = rpc(uri, "image.import", {"url": url, "name": name, "sha256": digest})
    assert response["error"]["code"] == -32005, response
    return response["error"]["message"]


def image(uri, name, states=("ready", "failed"), timeout=20):
    """Wait until ``name`` is in one of ``states``; returns its ImageInfo."""

    def done():
        found = [i for i in result(uri, "node.images") if i["name"] == name]
        return found[0] if found and found[0]["state"] in states else None

    return wait_for(done, timeout=timeout, what=f"image {name} in {states}")


def files_in(directory):
    """Every name in the directory, hidden ones included."""
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def test_import_lists_ready_with_format_and_size(node, server, qcow2):
    """An import whose digest matches is listed ready with format, size and virtual
    size; redirects and chunked bodies work; no temporary file is left."""
    uri, images = node({"NODE_IMAGE_FETCH_LOCAL": "1"})
    assert result(uri, "node.images") == []
    start_import(uri, server.url("f", "base.qcow2"), "debian.qcow2", sha256(qcow2))
    info = image(uri, "debian.qcow2")
    assert info == {
        "name": "debian.qcow2",
        "path": os.path.join(images, "debian.qcow2"),
        "format": "qcow2",
        "size_bytes": len(qcow2),
        "virtual_size_bytes": 64 * MIB,
        "state": "ready",
    }
    with open(info["path"], "rb") as f:
        assert f.read() == qcow2
    two = server.files["two"]
    start_import(uri, server.url("redirect/3", "two"), "redirected", sha256(two))
    start_import(uri, server.url("chunked", "two"), "chunked", sha256(two).upper())
    for name in ("redirected", "chunked"):
        ready = image(uri, name)
        assert ready["state"] == "ready" and ready["size_bytes"] == len(two), ready
        assert ready["format"] == "raw"
    assert files_in(images) == ["chunked", "debian.qcow2", "redirected"]
    assert "/redirect/1/two" in server.requests


def test_wrong_digest_cut_and_too_big_leave_nothing(node, server):
    """A wrong digest, a connection cut mid-body, a size over NODE_IMAGE_MAX (announced,
    or only seen as bytes arrive) and too many redirects each leave no file and show
    failed with the reason; importing the name again clears the failure."""
    uri, images = node({"NODE_IMAGE_FETCH_LOCAL": "1", "NODE_IMAGE_MAX": "2M"})
    two, three = server.files["two"], server.files["three"]
    start_import(uri, server.url("f", "two"), "wrong", "ab" * 32)
    start_import(uri, server.url("cut", "two"), "cut", sha256(two))
    cases = {
        "wrong": "wrong digest: expected sha256 " + "ab" * 32,
        "cut": f"connection cut after {MIB} of {2 * MIB} bytes",
    }
    for name, reason in cases.items():
        info = image(uri, name)
        assert info["state"] == "failed" and reason in info["error"], info
        assert info["path"] == os.path.join(images, name)
    start_import(uri, server.url("f", "three"), "big", sha256(three))
    start_import(uri, server.url("chunked", "three"), "bigchunks", sha256(three))
    big = image(uri, "big")
    assert "larger than NODE_IMAGE_MAX" in big["error"] and "3145728" in big["error"]
    assert "larger than NODE_IMAGE_MAX" in image(uri, "bigchunks")["error"]
    start_import(uri, server.url("redirect/9", "two"), "loop", sha256(two))
    assert "redirects" in image(uri, "loop")["error"]
    start_import(uri, server.url("f", "missing"), "missing", sha256(two))
    assert "HTTP 404" in image(uri, "missing")["error"]
    assert files_in(images) == []
    start_import(uri, server.url("f", "two"), "wrong", sha256(two))
    assert image(uri, "wrong")["state"] == "ready"
    assert files_in(images) == ["wrong"]
    states = {i["name"]: i["state"] for i in result(uri, "node.images")}
    assert states == {
        "wrong": "ready",
        "cut": "failed",
        "big": "failed",
        "bigchunks": "failed",
        "loop": "failed",
        "missing": "failed",
    }


def test_full_disk_leaves_nothing(node, server, short_tmp):
    """An import into an image directory that fills up (a 1 MiB tmpfs) fails with
    ENOSPC as the reason and leaves the filesystem empty."""
    mount = f"{short_tmp}/tiny"
    os.makedirs(mount)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mount], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        uri, images = node({"NODE_IMAGE_FETCH_LOCAL": "1"}, image_dir=mount)
        three = server.files["three"]
        start_import(uri, server.url("f", "three"), "full", sha256(three))
        info = image(uri, "full")
        assert info["state"] == "failed" and "disk full (ENOSPC)" in info["error"], info
        assert files_in(mount) == []
        assert os.statvfs(mount).f_bfree == os.statvfs(mount).f_blocks
    finally:
        subprocess.run(["umount", "-l", mount], check=False)


def test_refused_at_once(node, server):
    """An existing name, an importing name, bad URLs and a third import at once are
    -32005 at once, bad params -32602; nothing is fetched or written for them."""
    uri, images = node({"NODE_IMAGE_FETCH_LOCAL": "1"})
    os.makedirs(images, exist_ok=True)
    with open(os.path.join(images, "taken"), "wb") as f:
        f.write(b"x")
    slow = server.files["slow"]
    assert "exists already" in refused(uri, server.url("f", "two"), "taken")
    start_import(uri, server.url("slow", "slow"), "first", sha256(slow))
    assert "being imported" in refused(uri, server.url("f", "two"), "first")
    start_import(uri, server.url("slow", "slow"), "second", sha256(slow))
    assert "imports are running" in refused(uri, server.url("f", "two"), "third")
    for url in (
        f"ftp://127.0.0.1:{server.port}/f/two",
        "http://",
        "not a url",
        f"http://user:pw@127.0.0.1:{server.port}/f/two",
        "http://127.0.0.1:99999/f/two",
        "file:///etc/shadow",
    ):
        assert "bad URL" in refused(uri, url, "bad"), url
    for params, name in (
        ({"name": "../etc"}, "name"),
        ({"name": ".hidden"}, "name"),
        ({"sha256": "abc"}, "sha256"),
        ({"url": 5}, "url"),
    ):
        good = {"url": server.url("f", "two"), "name": "ok", "sha256": "0" * 64}
        error = rpc(uri, "image.import", {**good, **params})["error"]
        assert error["code"] == -32602 and name in error["message"], error
    assert sorted(server.requests) == ["/slow/slow", "/slow/slow"]
    server.release(16)
    for name in ("first", "second"):
        assert image(uri, name)["state"] == "ready"
    assert files_in(images) == ["first", "second", "taken"]


def test_progress_visible_while_streaming(node, server):
    """While a slow server streams, node.images shows the import with bytes_done
    growing and the announced total; then it is ready."""
    uri, images = node({"NODE_IMAGE_FETCH_LOCAL": "1"})
    slow = server.files["slow"]
    start_import(uri, server.url("slow", "slow"), "slow.raw", sha256(slow))
    server.release(2)
    info = image(uri, "slow.raw", states=("importing",))
    info = wait_for(
        lambda: next(
            i
            for i in result(uri, "node.images")
            if i["name"] == "slow.raw" and i.get("bytes_done", 0) >= 2 * CHUNK
        ),
        what="two chunks received",
    )
    assert info["state"] == "importing" and info["bytes_total"] == len(slow)
    assert info["bytes_done"] < len(slow) and info["format"] is None
    hidden = files_in(images)
    assert len(hidden) == 1 and hidden[0].startswith(".import-slow.raw.")
    server.release(6)
    assert image(uri, "slow.raw")["state"] == "ready"
    assert files_in(images) == ["slow.raw"]


def test_node_stop_or_crash_mid_import_leaves_nothing(node, server):
    """A node stopped during an import removes its temporary file before it exits; one
    killed with SIGKILL leaves it, and removes it when it starts again."""
    for how in ("stop", "kill"):
        uri, images = node({"NODE_IMAGE_FETCH_LOCAL": "1"})
        start_import(uri, server.url("slow", how), how, sha256(server.files[how]))
        server.release(1, how)
        wait_for(
            lambda uri=uri: any(i.get("bytes_done") for i in result(uri, "node.images")),
            what="a chunk received",
        )
        if how == "stop":
            assert node.process.stop() == -signal.SIGTERM
            assert "the node stopped during the import" in node.process.output
            assert files_in(images) == []
        else:
            node.process.kill()
            assert len(files_in(images)) == 1
            uri, images = node({"NODE_IMAGE_FETCH_LOCAL": "1"})
            wait_for(lambda d=images: files_in(d) == [], what="leftover removed")
            assert result(uri, "node.images") == []
            node.process.stop()


def test_loopback_refused_without_fetch_local(node, server):
    """Without NODE_IMAGE_FETCH_LOCAL, loopback, link-local, unspecified, multicast and
    cloud metadata targets (literal or by name) are -32005 at once: no request reaches
    the server and nothing is written."""
    uri, images = node()
    for host in ("127.0.0.1", "localhost", "[::1]", "0.0.0.0", "169.254.169.254"):
        message = refused(uri, server.url("f", "two", host=host), "stolen")
        assert "refused by policy" in message, message
    assert "multicast" in refused(uri, "http://224.0.0.1/x", "stolen")
    for url in ("http://100.100.100.200/latest/meta-data", "http://[fd00:ec2::254]/x"):
        assert "cloud metadata address" in refused(uri, url, "stolen")
    assert server.requests == []
    assert files_in(images) == [] and result(uri, "node.images") == []


def test_import_through_explorer(twistd, short_tmp, server, qcow2):
    """explorer.call proxies image.import and node.images to the node."""
    twistd(["explorer", "--socket", f"{short_tmp}/e.sock"]).listening()
    euri = f"unix://{short_tmp}/e.sock"
    twistd(
        [
            "node",
            "--socket",
            f"{short_tmp}/n.sock",
            "--state-dir",
            f"{short_tmp}/st",
            "--explorer",
            euri,
            "--interval",
            "0.5",
            "--node-id",
            "n1",
        ],
        env={"NODE_IMAGE_FETCH_LOCAL": "1"},
    )
    wait_for(lambda: result(euri, "explorer.list_nodes", {"status": "online"}))

    def call(method, params=None):
        message = {"node_id": "n1", "method": method}
        if params is not None:
            message["params"] = params
        return result(euri, "explorer.call", message)

    params = {"url": server.url("f", "base.qcow2"), "name": "b", "sha256": sha256(qcow2)}
    assert call("image.import", params) == {"name": "b", "state": "importing"}
    wait_for(lambda: [i["state"] for i in call("node.images")] == ["ready"])
    assert call("node.images")[0]["path"] == f"{short_tmp}/st/images/b"
    again = rpc(
        euri, "explorer.call", {"node_id": "n1", "method": "image.import", "params": params}
    )
    assert again["error"]["code"] == -32005


@pytest.mark.parametrize(
    "host",
    ["100.100.100.200", "fd00:ec2::254", "::ffff:100.100.100.200", "FD00:EC2:0::254"],
)
def test_refused_target_refuses_cloud_metadata_addresses(host):
    """The import policy refuses the metadata services that are not link-local: AWS's
    IMDS over IPv6 and Alibaba Cloud's, in any spelling."""
    assert refused_target(host) == f"{host} is a cloud metadata address"


@pytest.mark.parametrize(
    "host, refused",
    [
        ("100.100.100.201", None),
        ("fd00:ec2::253", None),
        ("192.0.2.1", None),
        ("169.254.169.254", "169.254.169.254 is a link-local address"),
        ("127.0.0.1", "127.0.0.1 is a loopback address"),
    ],
)
def test_refused_target_keeps_the_proxy_policy(host, refused):
    """Beyond the metadata addresses, the import policy is the proxy's: their
    neighbours pass, the other kinds are refused as before."""
    assert refused_target(host) == refused


@pytest_twisted.ensureDeferred
async def test_check_target_refuses_metadata_addresses():
    """The connect-time check refuses the metadata addresses as literals, unless local
    fetches are allowed."""
    from twisted.internet import reactor

    for host in ("100.100.100.200", "fd00:ec2::254"):
        with pytest.raises(RefusedTarget, match="cloud metadata address"):
            await check_target(reactor, host, 80, allow_local=False)
    assert await check_target(reactor, "fd00:ec2::254", 80, allow_local=True)


@pytest_twisted.ensureDeferred
async def test_check_target_refuses_local_addresses():
    """The connect-time check (used for every connection and redirect) refuses local
    addresses, literal or resolved from a name, unless local fetches are allowed."""
    from twisted.internet import reactor

    for host in ("127.0.0.1", "::1", "0.0.0.0", "169.254.169.254", "ff02::1", "localhost"):
        with pytest.raises(RefusedTarget, match="refused by policy"):
            await check_target(reactor, host, 80, allow_local=False)
    assert await check_target(reactor, "127.0.0.1", 80, allow_local=True) == "127.0.0.1"
    assert await check_target(reactor, "192.0.2.1", 80, allow_local=False) == "192.0.2.1"


@pytest_twisted.ensureDeferred
async def test_download_checks_at_connect_time(server, tmp_path):
    """A download (as each redirect does) resolves and checks its host when it
    connects: a name resolving to loopback is refused, no request is sent, and the
    temporary file is left to its owner to discard."""
    from twisted.internet import reactor

    from hero_compute.node.fetch import Download, FetchError, TempFile

    file = TempFile(str(tmp_path / ".import-x"))
    file.open()
    download = Download(
        reactor,
        server.url("f", "two", host="localhost"),
        file,
        limit=10 * MIB,
        allow_local=False,
        progress=lambda done, total: None,
    )
    with pytest.raises(
        FetchError, match="refused by policy: localhost resolves to a loopback address"
    ):
        await download.done
    file.discard()
    assert server.requests == [] and os.listdir(tmp_path) == []


@pytest_twisted.ensureDeferred
async def test_download_cut_when_the_server_goes_silent(server, tmp_path):
    """A server that stops sending mid-body is cut after the idle time, with the bytes
    received so far in the reason."""
    from twisted.internet import reactor

    from hero_compute.node.fetch import Download, FetchError, TempFile

    file = TempFile(str(tmp_path / ".import-y"))
    file.open()
    server.release(1)
    download = Download(
        reactor,
        server.url("slow", "slow"),
        file,
        limit=10 * MIB,
        allow_local=True,
        progress=lambda done, total: None,
        idle=0.5,
    )
    with pytest.raises(FetchError, match=f"no data for 0.5 s after {CHUNK} bytes"):
        await download.done
    file.discard()
    assert os.listdir(tmp_path) == []
