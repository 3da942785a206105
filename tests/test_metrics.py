"""
Prometheus metrics: the cheap histogram in memory (the reactor's lag: test_lag), then real
``twistd explorer`` and ``twistd node`` processes scraped over HTTP, and a real
Prometheus server scraping an explorer where one is installed.
"""

import http.client
import json
import os
import shutil
import socket
import subprocess
import tempfile
import urllib.parse

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.python.failure import Failure

from hero_compute.explorer.metrics import call_outcome
from hero_compute.rpc.errors import NodeOffline, NodeUnreachable, VmNotFound
from hero_compute.rpc.metrics import Histogram

from .support import connect, result, rpc, wait_for

PROMETHEUS = "/usr/bin/prometheus"


def test_histogram_buckets_are_cumulative_and_inclusive():
    """An observation on a bound counts in that bucket; buckets add up to +Inf."""
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 2.0):
        histogram.observe(value)
    assert histogram.buckets() == [("0.1", 2.0), ("1.0", 3.0), ("+Inf", 4.0)]
    assert histogram.sum == pytest.approx(2.65)


def test_call_outcomes():
    """A proxied call's outcome is named by its error's code; busy wins over the code."""
    assert call_outcome({"x": 1}, False) == "ok"
    assert call_outcome(Failure(NodeOffline("gone")), False) == "offline"
    assert call_outcome(Failure(NodeUnreachable("no")), False) == "unreachable"
    assert call_outcome(Failure(NodeUnreachable("busy")), True) == "busy"
    assert call_outcome(Failure(VmNotFound("no such VM")), False) == "node_error"
    assert call_outcome(Failure(ZeroDivisionError()), False) == "internal"


def scrape(uri):
    """
    ``GET /metrics`` with a plain HTTP client, parsed by prometheus_client's parser.

    :return: ``{(sample name, frozenset of label items): value}``
    """
    conn = connect(uri)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        body = response.read().decode()
        assert response.status == 200, (response.status, body)
        assert response.getheader("content-type").startswith("text/plain")
    finally:
        conn.close()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def value(samples, name, **labels):
    """The value of the one sample of ``name`` with exactly these labels, or None."""
    return samples.get((name, frozenset(labels.items())))


def metrics_uri(process):
    """The ``tcp://`` URI of a process's metrics listener, from its log."""
    (match,) = process.wait_for_line(r"listening on (\S+) \(Prometheus metrics")
    return match.group(1)


def test_explorer_and_node_metrics(twistd, short_tmp):
    """
    A real explorer and node count heartbeats, refusals, proxied calls, connections and
    VMs, as a scrape of each shows.
    """
    esock = f"{short_tmp}/e.sock"
    explorer = twistd(
        [
            "explorer",
            "--socket",
            esock,
            "--tcp",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
        ],
        # One connection per address, so that a second one is refused and counted.
        env={"HERO_MAX_CONNS_PER_ADDR": "1"},
    )
    explorer_metrics = metrics_uri(explorer)
    euri = f"unix://{esock}"
    info = result(euri, "explorer.info")
    assert explorer_metrics not in info["listeners"]
    tcp_uri = next(u for u in info["listeners"] if u.startswith("tcp://"))
    node = twistd(
        [
            "node",
            "--socket",
            f"{short_tmp}/n.sock",
            "--explorer",
            euri,
            "--interval",
            "0.5",
            "--node-id",
            "n1",
            "--state-dir",
            f"{short_tmp}/state",
        ],
        env={"NODE_METRICS_ADDR": "127.0.0.1:0"},
    )
    node_metrics = metrics_uri(node)
    wait_for(
        lambda: result(euri, "explorer.list_nodes", {"status": "online"}), what="online"
    )

    # Refused heartbeats: an unusable address, and a secret that is not the node's.
    bad_address = rpc(
        euri, "explorer.heartbeat", {"node_id": "x1", "socket_path": "http://x:1"}
    )
    assert bad_address["error"]["code"] == -32602
    wrong_secret = rpc(
        euri,
        "explorer.heartbeat",
        {"node_id": "n1", "socket_path": f"unix://{short_tmp}/n.sock", "secret": "0" * 64},
    )
    assert wrong_secret["error"]["code"] == -32010
    # Proxied calls: one answered, one the node refuses, one for nobody.
    result(euri, "explorer.call", {"node_id": "n1", "method": "node.info"})
    assert (
        rpc(euri, "explorer.call", {"node_id": "n1", "method": "vm.get", "params": ["x"]})[
            "error"
        ]["code"]
        == -32004
    )
    assert (
        rpc(euri, "explorer.call", {"node_id": "ghost", "method": "node.info"})["error"][
            "code"
        ]
        == -32001
    )
    # A second TCP connection from this address is refused at accept.
    held = connect(tcp_uri)
    held.request("POST", "/rpc", body=json.dumps({"jsonrpc": "2.0", "method": "x"}))
    held.getresponse().read()
    second = socket.create_connection(("127.0.0.1", int(tcp_uri.rsplit(":", 1)[1])), 5)
    second.settimeout(5)
    assert second.recv(1) == b""  # closed at once
    second.close()

    samples = wait_for(
        lambda: (
            (s := scrape(explorer_metrics))
            and value(s, "hero_reactor_lag_seconds_count")
            and s
        ),
        what="a reactor lag measurement",
    )
    assert value(samples, "hero_explorer_nodes", status="online", transport="unix") == 1
    assert value(samples, "hero_explorer_nodes", status="offline", transport="tcp") == 0
    accepted = value(samples, "hero_explorer_heartbeats_accepted_total")
    assert accepted >= 1
    # Rendered in the reactor thread: the histogram and the counter agree exactly.
    assert value(samples, "hero_explorer_heartbeat_seconds_count") == accepted
    refused = "hero_explorer_heartbeats_refused_total"
    assert value(samples, refused, reason="socket_path") == 1
    assert value(samples, refused, reason="identity") == 1
    calls = "hero_explorer_calls_total"
    assert value(samples, calls, method="node.info", outcome="ok") == 1
    assert value(samples, calls, method="vm.get", outcome="node_error") == 1
    assert value(samples, calls, method="node.info", outcome="not_found") == 1
    assert value(samples, "hero_explorer_call_seconds_count", method="node.info") == 2
    assert value(samples, "hero_explorer_calls_in_flight") == 0
    assert value(samples, "hero_refusals_total", limit="max_conns_per_addr") == 1
    assert value(samples, "hero_refusals_total", limit="calls_in_flight") == 0
    assert value(samples, "hero_connections_open", transport="network") == 1
    assert value(samples, "hero_connection_peers") == 1
    assert value(samples, "process_open_fds") > 0
    # The lag histogram, with the buckets the bench reads, ticking every 20 ms.
    for le in ("0.05", "0.2", "+Inf"):
        assert value(samples, "hero_reactor_lag_seconds_bucket", le=le) > 0
    assert value(samples, "hero_reactor_lag_seconds_count") >= 10
    held.close()

    samples = scrape(node_metrics)
    assert value(samples, "hero_node_explorer_up", explorer=euri) == 1
    assert 0 <= value(samples, "hero_node_explorer_last_ok_age_seconds", explorer=euri) < 5
    assert value(samples, "hero_node_vms", state="running") == 0
    assert value(samples, "hero_node_capacity_vcpus") == os.cpu_count()
    assert value(samples, "hero_node_usage_vcpus") == 0
    assert value(samples, "hero_node_qemu_starts_total") == 0
    assert value(samples, "hero_node_qemu_start_failures_total") == 0
    # The node's lag histogram too: ticking (how late its ticks run depends on the
    # machine's load, so only that they are counted, in the buckets the bench reads).
    wait_for(
        lambda: (value(scrape(node_metrics), "hero_reactor_lag_seconds_count") or 0) >= 5,
        what="the node's lag monitor ticking",
    )
    node_samples = scrape(node_metrics)
    assert value(node_samples, "hero_reactor_lag_seconds_bucket", le="0.2") is not None
    if shutil.which("qemu-img"):
        result(
            f"unix://{short_tmp}/n.sock",
            "vm.create",
            {"name": "v", "vcpus": 1, "memory_mb": 64, "disk_gb": 1},
        )
        samples = scrape(node_metrics)
        assert value(samples, "hero_node_vms", state="stopped") == 1
        assert value(samples, "hero_node_usage_disk_bytes") == 2**30

    # The explorer going away shows on the node as a failing explorer.
    explorer.stop()
    samples = wait_for(
        lambda: (
            (s := scrape(node_metrics))
            and value(s, "hero_node_explorer_up", explorer=euri) == 0
            and s
        ),
        what="the explorer failing",
    )
    assert value(samples, "hero_node_explorer_last_ok_age_seconds", explorer=euri) >= 0


def test_metrics_listener_that_cannot_bind_exits_nonzero(twistd, short_tmp):
    """A metrics address already in use makes twistd exit non-zero, like any listener."""
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    try:
        explorer = twistd(
            [
                "explorer",
                "--socket",
                f"{short_tmp}/e.sock",
                "--metrics",
                f"127.0.0.1:{port}",
            ],
        )
        assert explorer.process.wait(20) != 0
        assert "Address already in use" in explorer.output
    finally:
        blocker.close()


def test_no_metrics_unless_asked(twistd, short_tmp):
    """Without --metrics or EXPLORER_METRICS_ADDR, the explorer opens no metrics port."""
    explorer = twistd(["explorer", "--socket", f"{short_tmp}/e.sock"])
    explorer.listening()
    result(f"unix://{short_tmp}/e.sock", "explorer.info")
    assert "Prometheus" not in explorer.output


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prometheus_api(port, path, **query):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", f"{path}?{urllib.parse.urlencode(query)}")
        response = conn.getresponse()
        return json.loads(response.read())
    finally:
        conn.close()


@pytest.mark.skipif(
    not os.access(PROMETHEUS, os.X_OK),
    reason=f"{PROMETHEUS} is not installed (apt-get install prometheus)",
)
def test_real_prometheus_scrapes_the_explorer(twistd, short_tmp):
    """A real Prometheus server scrapes an explorer's /metrics and can query it."""
    explorer = twistd(
        ["explorer", "--socket", f"{short_tmp}/e.sock", "--metrics", "127.0.0.1:0"]
    )
    target = metrics_uri(explorer).removeprefix("tcp://")
    work = tempfile.mkdtemp(prefix="hc-prom-")
    port = _free_port()
    config = os.path.join(work, "prometheus.yml")
    with open(config, "w") as f:
        f.write(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n  - job_name: hero_explorer\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
    log = open(os.path.join(work, "prometheus.log"), "w")
    server = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={work}/data",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=work,
    )
    try:

        def target_up():
            targets = _prometheus_api(port, "/api/v1/targets")["data"]["activeTargets"]
            return [t for t in targets if t["health"] == "up"]

        try:
            (up,) = wait_for(target_up, timeout=60, interval=0.5, what="target up")
        except AssertionError:
            log.flush()
            raise AssertionError(open(log.name).read()[-3000:]) from None
        assert up["scrapeUrl"] == f"http://{target}/metrics"

        def online():
            answer = _prometheus_api(
                port, "/api/v1/query", query='hero_explorer_nodes{status="online"}'
            )
            return answer["status"] == "success" and answer["data"]["result"]

        series = wait_for(online, timeout=30, interval=0.5, what="a query answered")
        assert {s["metric"]["transport"] for s in series} == {"unix", "tcp", "tls"}
        assert all(s["value"][1] == "0" for s in series)
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)
        log.close()
        shutil.rmtree(work, ignore_errors=True)
