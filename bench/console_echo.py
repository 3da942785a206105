"""
The console section (issue #19): a key's echo round trip on a VM's serial console
through the explorer's WebSocket vs straight on the node's, with the real test guest
(``tests/guest.py``) under TCG.  Goal: the explorer adds < 2 ms.

One keystroke at a time on the guest's shell line (its line discipline echoes it), the
two paths alternated so that the guest's own pace (most of a round trip under TCG)
weighs the same on both; the line is cleared every few keys.
"""

import os
import statistics
import sys
import time

from procs import ROOT, log, rpc, start_explorer, twistd_cmd, wait_for

#: Round trips per path (alternated).
KEYS = 200
#: Keys typed before the line is cleared (Ctrl-U), so it never wraps.
LINE = 40
#: The goal: milliseconds the explorer may add to a round trip (median).
GOAL_MS = 2.0


def _guest():
    sys.path.insert(0, ROOT)
    from tests.guest import build_guest

    return build_guest()


def _round_trip(client, key):
    start = len(client.received)
    began = time.perf_counter()
    client.send(key)
    client.read_until(key, timeout=30, start=start)
    return (time.perf_counter() - began) * 1000


def sec_console(procs, tmp, res, cfg):
    """Console echo round trip through the explorer vs on the node."""
    from tests.wsclient import WsClient  # after _guest() put ROOT on the path

    guest = _guest()
    exp = start_explorer(procs, tmp, "console-explorer")
    sock = os.path.join(tmp, "console-node.sock")
    state = os.path.join(tmp, "console-node-state")
    node = procs.start(
        twistd_cmd()
        + ["-n", "--pidfile=", "node", "--socket", sock, "--explorer", exp.sock]
        + ["--state-dir", state, "--node-id", "console-node", "--interval", "1"],
        "console-node",
        env={"NODE_ACCEL": "tcg", "NODE_IMAGE_DIRS": guest.directory},
    )
    wait_for(node.logpath, r"listening on unix://", proc=node)
    vm = rpc(
        sock,
        "vm.create",
        {
            "name": "echo",
            "vcpus": 1,
            "memory_mb": 256,
            "disk_gb": 1,
            "network": "none",
            "boot": {"kernel": guest.kernel, "initrd": guest.initrd},
        },
    )
    vm_id = vm["vm_id"]
    try:
        rpc(sock, "vm.start", {"vm_id": vm_id}, timeout=90)
        deadline = time.monotonic() + 180
        while (
            "hero-guest: ready" not in rpc(sock, "vm.console_log", {"vm_id": vm_id})["data"]
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("the guest did not boot within 180 s")
            time.sleep(0.5)
        for _ in range(100):
            if rpc(exp.sock, "explorer.list_nodes", {"status": "online"}):
                break
            time.sleep(0.2)
        direct = WsClient(f"unix://{sock}", f"/v1/vms/{vm_id}/console", timeout=30)
        proxied = WsClient(
            f"unix://{exp.sock}",
            f"/v1/nodes/console-node/vms/{vm_id}/console",
            timeout=30,
        )
        times = {"node": [], "explorer": []}
        for i in range(KEYS):
            # Both viewers see every echo: each path types its own letters, so that
            # one never takes the other's echo for its own.
            letter = i % 26
            pair = [
                ("node", direct, b"abcdefghijklmnopqrstuvwxyz"[letter : letter + 1]),
                ("explorer", proxied, b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"[letter : letter + 1]),
            ]
            for name, client, key in pair if i % 2 == 0 else pair[::-1]:
                times[name].append(_round_trip(client, key))
            if i % LINE == LINE - 1:
                direct.send(b"\x15")
                time.sleep(0.2)
        direct.close()
        proxied.close()
    finally:
        rpc(sock, "vm.stop", {"vm_id": vm_id, "force": True}, timeout=30)
    medians, rows = {}, {}
    for name, samples in times.items():
        samples.sort()
        medians[name] = statistics.median(samples)
        p99 = samples[int(len(samples) * 0.99) - 1]
        rows[name] = res.add(
            "console",
            f"echo round trip via {name} (unix)",
            None,
            round(medians[name], 3),
            round(p99, 3),
            keys=len(samples),
        )
    added = medians["explorer"] - medians["node"]
    met = added < GOAL_MS
    res.goal(
        "console",
        f"+{added:.3f} ms (median, {KEYS} keys each, node {medians['node']:.3f} ms, "
        f"explorer {medians['explorer']:.3f} ms)",
        met,
        row=rows["explorer"],
    )
    log(
        f"console: explorer adds {added:.3f} ms ({'MET' if met else 'MISS'} < {GOAL_MS} ms)"
    )
    res.note(
        "console: one key at a time on the test guest's shell (TCG), echoed by its line "
        "discipline; the node's and the explorer's WebSockets over their Unix sockets, "
        "alternated key by key; p50/p99 in ms"
    )
