"""
TLS files that are not regular files (red team finding 9): the reader opens them
without blocking and refuses a FIFO, a device, a directory or an oversized file, so a
SIGHUP reload on the reactor thread never stalls a process.  A real explorer whose key
is replaced by a FIFO keeps serving and keeps its old certificate; the node reads its
files through the same :class:`~hero_compute.rpc.tls.TLSMaterial`.
"""

import hashlib
import os
import shutil
import signal
import time

import pytest

from hero_compute import pki
from hero_compute.node.enroll import TLSFiles
from hero_compute.rpc.tls import TLSConfigError, TLSMaterial

from .support import Twistd, result, rpc_over, tls_connect, wait_for


@pytest.fixture
def fleet(short_tmp):
    """A fleet CA and two certificates for explorer e1 (old and new), and a client's."""
    ca_dir = f"{short_tmp}/ca"
    pki.create_ca(ca_dir)
    out = {"ca": f"{ca_dir}/ca.pem", "dir": short_tmp}
    for label, role, name in (("e1", "explorer", "e1"), ("e1b", "explorer", "e1")):
        out[label] = pki.create_cert(
            ca_dir, role, name, ips=["127.0.0.1"], out=f"{short_tmp}/{label}"
        )
    out["ops"] = pki.create_cert(ca_dir, "client", "ops", out=f"{short_tmp}/ops")
    return out


def test_reader_refuses_a_fifo_a_device_a_directory_and_a_big_file(tmp_path):
    """read_pem_file returns a regular file's bytes and refuses, at once, a FIFO
    nothing writes, /dev/zero, a directory and a file over its limit."""
    good = tmp_path / "good.pem"
    good.write_bytes(b"x" * 100)
    assert pki.read_pem_file(good) == b"x" * 100
    fifo = tmp_path / "fifo.pem"
    os.mkfifo(fifo)
    started = time.monotonic()
    for path, why in (
        (fifo, "not a regular file"),
        ("/dev/zero", "not a regular file"),
        (tmp_path, "not a regular file"),
        (tmp_path / "missing.pem", "No such file"),
    ):
        with pytest.raises(pki.PkiError, match=why):
            pki.read_pem_file(path)
    with pytest.raises(pki.PkiError, match="over 99 bytes"):
        pki.read_pem_file(good, limit=99)
    big = tmp_path / "big.pem"
    with open(big, "wb") as f:
        f.truncate(pki.pem.MAX_PEM_BYTES + 1)
    with pytest.raises(pki.PkiError, match="over"):
        pki.load_certificate(big)
    assert time.monotonic() - started < 2


def test_node_material_with_a_fifo_key_is_a_config_error(fleet):
    """The node's TLS files (TLSFiles.material, read on start and on SIGHUP) with the
    key a FIFO: a TLSConfigError naming it, at once, not a read that never returns."""
    files = TLSFiles.in_state_dir(f"{fleet['dir']}/node-state")
    tls_dir = os.path.dirname(files.cert)
    os.makedirs(tls_dir)
    shutil.copy(fleet["ca"], files.ca)
    cert, _ = pki.create_cert(f"{fleet['dir']}/ca", "node", "n1", out=f"{tls_dir}/n1")
    shutil.copy(cert, files.cert)
    os.mkfifo(files.key)
    started = time.monotonic()
    with pytest.raises(TLSConfigError, match="not a regular file"):
        files.material().load()
    assert time.monotonic() - started < 2
    with pytest.raises(TLSConfigError, match="not a regular file"):
        TLSMaterial(files.cert, files.key, files.ca).load()


def served(uri, fleet):
    """The fingerprint of the certificate the explorer's TLS listener serves, after a
    successful explorer.info over it."""
    conn = tls_connect(uri, fleet["ca"], *fleet["ops"])
    try:
        assert "result" in rpc_over(conn, "explorer.info")
        return hashlib.sha256(conn.sock.getpeercert(binary_form=True)).hexdigest()
    finally:
        conn.close()


def test_sighup_with_a_fifo_key_keeps_serving_the_old_certificate(fleet):
    """SIGHUP with the key replaced by a FIFO: a warning, explorer.info over Unix still
    answers promptly, and the old certificate is still served; good files then load."""
    tmp = fleet["dir"]
    live = f"{tmp}/live"
    os.makedirs(live)
    shutil.copy(fleet["e1"][0], f"{live}/cert.pem")
    shutil.copy(fleet["e1"][1], f"{live}/key.pem")
    shutil.copy(fleet["ca"], f"{live}/ca.pem")
    explorer = Twistd(
        ["explorer", "--socket", f"{tmp}/e.sock"],
        env={
            "EXPLORER_STATE_DIR": f"{tmp}/state",
            "EXPLORER_TLS_ADDR": "127.0.0.1:0",
            "EXPLORER_TLS_CERT": f"{live}/cert.pem",
            "EXPLORER_TLS_KEY": f"{live}/key.pem",
            "EXPLORER_TLS_CA": f"{live}/ca.pem",
        },
    )
    try:
        uris = explorer.listening(count=2)
        tls = next(u for u in uris if u.startswith("tls://"))
        unix = f"unix://{tmp}/e.sock"
        before = served(tls, fleet)
        os.unlink(f"{live}/key.pem")
        os.mkfifo(f"{live}/key.pem")
        shutil.copy(fleet["e1b"][0], f"{live}/cert.pem")
        explorer.signal(signal.SIGHUP)
        explorer.wait_for_line(r"SIGHUP: TLS material not reloaded.*not a regular file")
        started = time.monotonic()
        assert result(unix, "explorer.info", timeout=5)
        assert time.monotonic() - started < 2
        assert served(tls, fleet) == before
        # The explorer is not wedged: good files put back are loaded on the next SIGHUP.
        os.unlink(f"{live}/key.pem")
        shutil.copy(fleet["e1b"][1], f"{live}/key.pem")
        explorer.signal(signal.SIGHUP)
        explorer.wait_for_line(r"SIGHUP: TLS material reloaded")
        wait_for(lambda: served(tls, fleet) != before, what="the new certificate")
    finally:
        explorer.stop()
    assert "Traceback" not in explorer.output
