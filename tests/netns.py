"""
Test hosts as network namespaces: a switch namespace holding a bridge, and hosts joined
to it by veth pairs, with addresses from TEST-NET-1 (192.0.2.0/24, reserved for
documentation and tests).  Nothing is routed out of them; everything is removed at the
end.
"""

import os
import shutil
import subprocess

SUBNET = "192.0.2"


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def netns_available():
    """
    :return: None when namespaces can be made here, else the reason they cannot
    """
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    probe = f"hcprobe{os.getpid()}"
    done = _ip("netns", "add", probe, check=False)
    if done.returncode != 0:
        return f"cannot create a network namespace: {done.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class Lab:
    """
    A switch and hosts.  ``add_host(name, index)`` gives host ``name`` the address
    ``192.0.2.<index>``; ``cut(name)`` and ``mend(name)`` take its link down and up.
    """

    def __init__(self):
        self.tag = f"{os.getpid() % 100000}"
        self.switch = f"hcsw{self.tag}"
        self.hosts = {}
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        _ip("-n", self.switch, "link", "set", "lo", "up")

    def add_host(self, name, index):
        """Create a host namespace with one interface on the switch; returns its address."""
        ns = f"hc{name}{self.tag}"
        host_if, switch_if = f"h{index}x{self.tag}", f"s{index}x{self.tag}"
        _ip("netns", "add", ns)
        _ip(
            "link",
            "add",
            host_if,
            "netns",
            ns,
            "type",
            "veth",
            "peer",
            "name",
            switch_if,
            "netns",
            self.switch,
        )
        _ip("-n", self.switch, "link", "set", switch_if, "master", "br0")
        _ip("-n", self.switch, "link", "set", switch_if, "up")
        _ip("-n", ns, "addr", "add", f"{SUBNET}.{index}/24", "dev", host_if)
        _ip("-n", ns, "link", "set", host_if, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        self.hosts[name] = (ns, switch_if, f"{SUBNET}.{index}")
        return f"{SUBNET}.{index}"

    def ns(self, name):
        """The namespace name of a host."""
        return self.hosts[name][0]

    def cut(self, name):
        """Take a host's link down at the switch: its packets go nowhere."""
        _ip("-n", self.switch, "link", "set", self.hosts[name][1], "down")

    def mend(self, name):
        """Bring a host's link back."""
        _ip("-n", self.switch, "link", "set", self.hosts[name][1], "up")

    def destroy(self):
        """Remove every namespace (their veth pairs go with them)."""
        for ns, _, _ in self.hosts.values():
            _ip("netns", "del", ns, check=False)
        _ip("netns", "del", self.switch, check=False)
