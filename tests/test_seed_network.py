"""
The NoCloud seed, network planning and the CLI's access helpers, without QEMU: what goes
into the ISO and how cloud-init would read it, keys and their fingerprints, ports chosen
and kept, bridges allowed, the argv parts.
"""

import email
import io
import os
import socket
import subprocess

import pycdlib
import pytest

from hero_compute.cli import exits
from hero_compute.cli.vm_access import port_spec, ssh_target
from hero_compute.node.qemu import network, seed
from hero_compute.node.qemu.network import NetworkPolicy, netdev_args
from hero_compute.node.vms import VmNetwork, VmRecord, default_hostname, mac_address
from hero_compute.rpc.errors import InvalidParams, InvalidVmState, RefusedByPolicy


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Public key lines of each type ssh-keygen makes, with their fingerprints."""
    made = {}
    directory = tmp_path_factory.mktemp("keys")
    for kind, bits in (("ed25519", []), ("rsa", ["-b", "2048"]), ("ecdsa", [])):
        path = str(directory / kind)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", kind, *bits, "-N", "", "-C", "me@x", "-f", path],
            check=True,
        )
        line = open(path + ".pub").read().strip()
        out = subprocess.run(
            ["ssh-keygen", "-l", "-f", path + ".pub"], capture_output=True, text=True
        ).stdout
        made[kind] = (line, out.split()[1])
    return made


def test_fingerprints_match_ssh_keygen(keys):
    """Each key's fingerprint is the one ssh-keygen -l prints."""
    for line, fingerprint in keys.values():
        assert seed.key_fingerprint(line) == fingerprint


@pytest.mark.parametrize(
    "line",
    [
        "",
        "ssh-ed25519",
        "ssh-foo AAAA",
        "ssh-ed25519 not*base64",
        "ssh-ed25519 AAAAB3NzaC1yc2EAAAADAQABAAABAQ",
        "ssh-ed25519 AAAA\nssh-ed25519 AAAA",
    ],
)
def test_bad_keys_are_refused_naming_ssh_keys(line):
    """A line that is no OpenSSH public key is refused, naming ssh_keys."""
    with pytest.raises(seed.SeedError) as info:
        seed.key_fingerprint(line)
    assert info.value.param == "ssh_keys"


def test_key_under_the_wrong_type_is_refused(keys):
    """An ed25519 key's data presented as ssh-rsa does not pass."""
    blob = keys["ed25519"][0].split()[1]
    with pytest.raises(seed.SeedError, match="does not match its type"):
        seed.key_fingerprint("ssh-rsa " + blob)


def test_limits(keys):
    """33 keys, user data over 64 KiB in UTF-8, and bad host names are refused."""
    with pytest.raises(seed.SeedError):
        seed.check_keys([keys["ed25519"][0]] * 33)
    assert len(seed.check_keys([keys["ed25519"][0]] * 32)) == 32
    seed.check_user_data("x" * 65536)
    with pytest.raises(seed.SeedError):
        seed.check_user_data("é" * 32769)
    for bad in ("A", "a_b", "-a", "a-", "a" * 64, "a.b", ""):
        with pytest.raises(seed.SeedError):
            seed.check_hostname(bad)
    seed.check_hostname("a" * 63)


def test_default_hostname():
    """The default host name is the VM name as a host label."""
    assert default_hostname("Web_Server.1") == "web-server-1"
    assert default_hostname("___") == "vm"
    assert len(default_hostname("x" * 80)) == 63


def read_iso(path):
    """:return: ``(volume label, {joliet name: bytes})``"""
    iso = pycdlib.PyCdlib()
    iso.open(path)
    label = iso.pvd.volume_identifier.decode().strip()
    files = {}
    for name in ("meta-data", "user-data", "vendor-data"):
        out = io.BytesIO()
        iso.get_file_from_iso_fp(out, joliet_path="/" + name)
        files[name] = out.getvalue()
    iso.close()
    return label, files


def test_seed_volume_is_cidata_with_meta_and_user_data(tmp_path, keys):
    """The seed is an ISO labelled cidata with meta-data (instance id, host name) and a
    cloud-config user-data listing the keys; 0600; replaced whole on rewrite."""
    path = str(tmp_path / "seed.iso")
    line = keys["ed25519"][0]
    seed.write_seed(path, "vm-1", "host-1", [line], None)
    assert os.stat(path).st_mode & 0o777 == 0o600
    label, files = read_iso(path)
    assert label == "cidata"
    assert files["meta-data"] == b"instance-id: vm-1\nlocal-hostname: host-1\n"
    assert files["user-data"].startswith(b"#cloud-config\nssh_authorized_keys:\n")
    assert line.encode() in files["user-data"]
    seed.write_seed(path, "vm-1", "host-2", [], None)
    assert read_iso(path)[1]["meta-data"].endswith(b"local-hostname: host-2\n")
    assert not os.path.exists(path + ".partial")


def test_user_data_alone_is_passed_as_is():
    """Without keys, the caller's user data is the whole user-data."""
    assert seed.user_data_document([], "#!/bin/sh\necho hi\n") == b"#!/bin/sh\necho hi\n"


def test_keys_and_user_data_are_mime_multipart(keys):
    """Keys and user data together: MIME multipart with the caller's part (its type
    from its first line) and ours, which appends its keys rather than replacing."""
    line = keys["rsa"][0]
    document = seed.user_data_document([line], "#cloud-config\npackages: [htop]\n")
    message = email.message_from_bytes(document)
    assert message.is_multipart()
    theirs, ours = message.get_payload()
    assert theirs.get_content_type() == "text/cloud-config"
    assert theirs.get_payload(decode=True) == b"#cloud-config\npackages: [htop]\n"
    assert ours.get_content_type() == "text/cloud-config"
    assert "list(append)" in ours["Merge-Type"]
    assert line.encode() in ours.get_payload(decode=True)
    script = email.message_from_bytes(seed.user_data_document([line], "#!/bin/sh\n"))
    assert script.get_payload()[0].get_content_type() == "text/x-shellscript"


def test_callers_own_multipart_is_merged(keys):
    """A caller's MIME multipart user data keeps its parts, ours added after them."""
    theirs = (
        'Content-Type: multipart/mixed; boundary="B"\nMIME-Version: 1.0\n\n'
        "--B\nContent-Type: text/x-shellscript\n\n#!/bin/sh\necho a\n--B--\n"
    )
    message = email.message_from_bytes(seed.user_data_document([keys["rsa"][0]], theirs))
    kinds = [p.get_content_type() for p in message.get_payload()]
    assert kinds == ["text/x-shellscript", "text/cloud-config"]


def test_mac_is_stable_and_local():
    """The MAC is 52:54:00 plus three bytes of the id's hash, the same every time."""
    assert mac_address("a" * 32) == mac_address("a" * 32)
    assert mac_address("a" * 32) != mac_address("b" * 32)
    assert mac_address("a" * 32).startswith("52:54:00:")


def _free_range_outside_ephemeral(count):
    """A run of free loopback ports above the kernel's ephemeral range.

    A fixed range inside it (40100-40103 once) fails whenever some connection of a
    neighbouring test happens to hold one of its ports (seen in CI).
    """
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        high = int(f.read().split()[1])
    for low in range(max(high + 1, 1024), 65536 - count, count):
        if all(network.port_free("127.0.0.1", "tcp", p) for p in range(low, low + count)):
            return low
    pytest.fail("no free run of ports above the ephemeral range")


def test_ports_are_picked_in_range_and_not_reused():
    """Without a host port the node picks free ones in its range, none twice."""
    low = _free_range_outside_ephemeral(4)
    policy = NetworkPolicy(ports=(low, low + 3))
    held = set()
    picked = []
    for i in range(4):
        net = policy.plan(f"{i}" * 32, None, None, held)
        (forward,) = net.ports
        assert (forward.guest, forward.protocol, forward.address) == (
            22,
            "tcp",
            "127.0.0.1",
        )
        picked.append(forward.host)
        held.add(("tcp", forward.host))
    assert sorted(picked) == [low, low + 1, low + 2, low + 3]
    with pytest.raises(InvalidVmState, match="no free tcp port"):
        policy.plan("9" * 32, None, None, held)
    # udp ports are another space.
    assert policy.plan("9" * 32, None, [{"guest": 53, "protocol": "udp"}], held).ports


def test_host_port_outside_range_or_taken_is_invalid_state():
    """A host port outside the range, held by a VM, or bound by anyone: -32005."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        policy = NetworkPolicy(ports=(busy - 2, busy + 2))
        with pytest.raises(InvalidVmState, match="in use"):
            policy.plan("a" * 32, "nat", [{"guest": 22, "host": busy}], set())
        with pytest.raises(InvalidVmState, match="in use"):
            policy.plan(
                "a" * 32, "nat", [{"guest": 22, "host": busy + 1}], {("tcp", busy + 1)}
            )
        with pytest.raises(InvalidVmState, match="outside"):
            policy.plan("a" * 32, "nat", [{"guest": 22, "host": busy + 3}], set())


def test_modes():
    """none has no ports, a listed bridge is allowed, others -32010, junk -32602."""
    policy = NetworkPolicy(bridges=("br0",))
    assert policy.plan("a" * 32, "none", None, set()).ports == ()
    assert policy.plan("a" * 32, "bridge:br0", None, set()).bridge == "br0"
    with pytest.raises(RefusedByPolicy, match="NODE_VM_BRIDGES"):
        policy.plan("a" * 32, "bridge:br1", None, set())
    with pytest.raises(InvalidParams):
        policy.plan("a" * 32, "nat6", None, set())
    with pytest.raises(InvalidParams):
        policy.plan("a" * 32, "bridge:br0", [{"guest": 22}], set())


def test_netdev_args():
    """nat: user netdev with one hostfwd per forward; bridge: the VM's tap; none: none."""
    port = _free_range_outside_ephemeral(1)
    policy = NetworkPolicy(ports=(port, port))
    vm_id = "c" * 32
    nat = policy.plan(vm_id, None, [{"guest": 22, "host": port}], set())
    args = netdev_args(vm_id, nat)
    assert args[1] == f"user,id=net0,hostfwd=tcp:127.0.0.1:{port}-:22"
    assert args[3] == f"virtio-net-pci,netdev=net0,mac={mac_address(vm_id)}"
    bridged = netdev_args(vm_id, VmNetwork("bridge:br0", mac_address(vm_id)))
    assert bridged[1].startswith(f"tap,id=net0,ifname={network.tap_name(vm_id)},")
    assert netdev_args(vm_id, VmNetwork("none", mac_address(vm_id))) == []


def test_record_round_trip():
    """A record with every access field survives to_wire/from_wire."""
    port = _free_range_outside_ephemeral(1)
    vm = VmRecord(
        "d" * 32,
        "n",
        1,
        64,
        1,
        None,
        "stopped",
        1.0,
        network=NetworkPolicy(ports=(port, port)).plan("d" * 32, None, None, set()),
        ssh_keys=("SHA256:x",),
    )
    assert VmRecord.from_wire(vm.to_wire()) == vm


def test_cli_port_spec():
    """--port [HOST:]GUEST[/udp] becomes a ports item; junk is a usage error."""
    assert port_spec("22") == {"guest": 22}
    assert port_spec("8080:80") == {"guest": 80, "host": 8080}
    assert port_spec("53/udp") == {"guest": 53, "protocol": "udp"}
    for bad in ("", "0", "70000", "a:22", "22/sctp", "1:2:3"):
        with pytest.raises(Exception, match="HOST:]GUEST"):
            port_spec(bad)


def test_cli_ssh_target():
    """vm ssh goes to the forward's address for a local node, to the node's host for a
    forward on 0.0.0.0, and refuses a loopback forward of a remote node."""
    vm = {
        "name": "v",
        "network": {"mode": "nat", "ports": [{"guest": 22, "host": 20001,
                                              "protocol": "tcp", "address": "127.0.0.1"}]},
    }  # fmt: skip
    local = {"socket_path": "unix:///run/n.sock"}
    remote = {"socket_path": "tcp://192.0.2.5:9003", "name": "far"}
    assert ssh_target(local, vm) == ("127.0.0.1", 20001)
    with pytest.raises(exits.Failure, match="NODE_VM_FORWARD_ADDR"):
        ssh_target(remote, vm)
    vm["network"]["ports"][0]["address"] = "0.0.0.0"
    assert ssh_target(remote, vm) == ("192.0.2.5", 20001)
    with pytest.raises(exits.Failure, match="no forward of port 22"):
        ssh_target(local, {"name": "v", "network": {"mode": "none", "ports": []}})
