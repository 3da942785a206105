"""
NODE_ACCEL (CONTRACT §8): the KVM probe guest, the fallback to TCG, and what node.info
reports.  A host where KVM works is simulated by a stand-in ``qemu-system-x86_64`` that
exits as the probe guest would; the fallback runs for real wherever KVM does not run a
guest (no /dev/kvm, or a /dev/kvm whose guests hang, as on the machines this was built
on).
"""

import os
import shutil
import subprocess
import time

import pytest
import pytest_twisted
from twisted.internet import reactor

from hero_compute.node.qemu import accel

from .support import result, wait_for

QEMU = shutil.which("qemu-system-x86_64")


def fake_qemu(directory, body):
    """
    :param directory: where to put it
    :param body: shell commands it runs
    :return: the path of an executable ``qemu-system-x86_64`` stand-in
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "qemu-system-x86_64")
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body + "\n")
    os.chmod(path, 0o755)
    return path


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
def test_probe_guest_reaches_long_mode_under_tcg(tmp_path):
    """The probe firmware really goes to long mode and exits through isa-debug-exit:
    under TCG QEMU exits with the probe's code, so a KVM failure is KVM's."""
    firmware = tmp_path / "probe.bin"
    firmware.write_bytes(accel.probe_firmware())
    done = subprocess.run(
        [QEMU, "-machine", "accel=tcg", "-m", "16", "-nodefaults", "-display", "none"]
        + ["-bios", str(firmware), "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"],
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == accel.PROBE_EXIT


@pytest_twisted.ensureDeferred
async def test_kvm_that_runs_the_guest_is_chosen(tmp_path):
    """A QEMU whose KVM guest exits with the probe's code means KVM works."""
    qemu = fake_qemu(str(tmp_path), f"exit {accel.PROBE_EXIT}")
    works, why = await accel.kvm_works(reactor, qemu, timeout=10)
    assert works and "long mode" in why


@pytest_twisted.ensureDeferred
async def test_kvm_guest_that_hangs_means_tcg_and_is_killed(tmp_path):
    """A KVM guest that never exits is given up after the timeout and killed."""
    pidfile = tmp_path / "pid"
    qemu = fake_qemu(str(tmp_path), f"echo $$ > {pidfile}; exec sleep 60")
    started = time.monotonic()
    works, why = await accel.kvm_works(reactor, qemu, timeout=0.5)
    assert not works and "did not reach long mode within 0.5 s" in why
    assert time.monotonic() - started < 5
    pid = int(pidfile.read_text())
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), what="hung probe killed")


@pytest_twisted.ensureDeferred
async def test_kvm_refused_means_tcg_with_qemus_words(tmp_path):
    """A QEMU that cannot use KVM at all: TCG, with QEMU's last line as the reason."""
    qemu = fake_qemu(
        str(tmp_path), "echo 'Could not access KVM kernel module: No such file' >&2; exit 1"
    )
    works, why = await accel.kvm_works(reactor, qemu, timeout=10)
    assert not works and "Could not access KVM kernel module" in why and "1" in why


@pytest_twisted.ensureDeferred
async def test_forced_modes_do_not_probe(tmp_path):
    """NODE_ACCEL=kvm or tcg is taken as given: no probe is run."""
    marker = tmp_path / "ran"
    qemu = fake_qemu(str(tmp_path), f"touch {marker}; exit 1")
    assert await accel.choose_accel(reactor, qemu, "kvm") == "kvm"
    assert await accel.choose_accel(reactor, qemu, "tcg") == "tcg"
    assert not marker.exists()


def node_args(short_tmp):
    """A node on a Unix socket with no explorer to speak of."""
    return [
        "node",
        "--socket",
        f"{short_tmp}/n.sock",
        "--explorer",
        f"unix://{short_tmp}/nobody.sock",
        "--state-dir",
        f"{short_tmp}/st",
    ]


def test_node_on_a_host_where_kvm_works_reports_kvm(twistd, short_tmp):
    """NODE_ACCEL=auto on a (simulated) host where KVM runs the probe: node.info says
    kvm and the log says why."""
    fake = fake_qemu(f"{short_tmp}/bin", f"exit {accel.PROBE_EXIT}")
    node = twistd(
        node_args(short_tmp),
        env={"NODE_ACCEL": "auto", "PATH": f"{os.path.dirname(fake)}:{os.environ['PATH']}"},
    )
    node.wait_for_line(r"VMs run under kvm \(NODE_ACCEL=auto: a KVM guest reached long")
    assert result(f"unix://{short_tmp}/n.sock", "node.info")["accel"] == "kvm"


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
def test_node_auto_on_this_host_reports_what_the_probe_found(twistd, short_tmp):
    """NODE_ACCEL=auto with the real QEMU: node.info reports probing, then the choice
    the log line explains; where KVM cannot run a guest that choice is tcg."""
    node = twistd(node_args(short_tmp), env={"NODE_ACCEL": "auto"})
    node.listening()
    uri = f"unix://{short_tmp}/n.sock"
    assert result(uri, "node.info")["accel"] in ("probing", "kvm", "tcg")
    line = node.wait_for_line(r"VMs run under (kvm|tcg) \(NODE_ACCEL=auto: (.*)\)", 30)[0]
    assert result(uri, "node.info")["accel"] == line.group(1)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        assert line.group(1) == "tcg"
    if line.group(1) == "tcg":
        assert "long mode" in line.group(2) or "KVM" in line.group(2)


def test_node_accel_tcg_is_reported_at_once(twistd, short_tmp):
    """NODE_ACCEL=tcg: node.info says tcg."""
    node = twistd(node_args(short_tmp), env={"NODE_ACCEL": "tcg"})
    node.wait_for_line(r"VMs run under tcg \(NODE_ACCEL=tcg\)")
    assert result(f"unix://{short_tmp}/n.sock", "node.info")["accel"] == "tcg"


def test_bad_node_accel_stops_the_node_with_a_clear_message(twistd, short_tmp):
    """NODE_ACCEL=fast is a start-up error naming the variable."""
    node = twistd(node_args(short_tmp), env={"NODE_ACCEL": "fast"})
    assert node.process.wait(30) != 0
    assert "NODE_ACCEL='fast'" in node.output
