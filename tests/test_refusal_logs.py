"""
Refusals by the limits of a request's body and of answers (CONTRACT §7: HERO_MAX_BATCH,
HERO_MAX_RESPONSE, EXPLORER_MAX_REPLY), made by an attacker against a real ``twistd
explorer``: each is refused on the wire, logged once, counted in ``hero_refusals``, and a
flood of them is one line and then one ``and N more``, not a line each.
"""

import http.server
import json
import re
import threading
import time

import pytest

from hero_compute.rpc.throttle import REFUSALS_EVERY

from .support import Twistd, connect, post, result, rpc
from .test_metrics import metrics_uri, scrape, value

#: Refused requests sent after the first, within one window of the refusal log.
FLOOD = 60


@pytest.fixture
def explorers(short_tmp):
    """
    ``explorers(*variable_sets)``: real explorers, one per dict of variables, each on its
    Unix socket, on TCP (127.0.0.1) and with a metrics listener; ``.unix``, ``.tcp`` and
    ``.metrics`` are set.  All are started before any is waited for: they start
    together, not one after the other.
    """
    started = []

    def start(*variable_sets):
        processes = []
        for variables in variable_sets:
            sock = f"{short_tmp}/e{len(started)}.sock"
            process = Twistd(
                ["explorer", "--socket", sock, "--tcp", "127.0.0.1:0"]
                + ["--metrics", "127.0.0.1:0"],
                env={
                    "EXPLORER_STATE_DIR": f"{short_tmp}/state{len(started)}",
                    **{name: str(value) for name, value in variables.items()},
                },
            )
            process.unix = f"unix://{sock}"
            started.append(process)
            processes.append(process)
        for process in processes:
            process.metrics = metrics_uri(process)
            listeners = result(process.unix, "explorer.info")["listeners"]
            process.tcp = next(u for u in listeners if u.startswith("tcp://"))
        return processes

    yield start
    for process in started:
        process.stop()


class Flood:
    """
    Make the refused request once and FLOOD times more at once (:meth:`start`), then,
    after the refusal log's window, once more (:meth:`finish`): the log must hold exactly
    two lines about ``limit``, the second saying how many were held in between.  The
    three cases below start their floods together and share one wait for the window.

    :param refuse: makes one refused request and checks its answer on the wire
    """

    def __init__(self, process, limit, refuse):
        self.process, self.limit, self.refuse = process, limit, refuse
        self.pattern = rf"refused \({limit}\) "

    def start(self):
        """The first refusal, logged, then the flood: still one line."""
        self.refuse()
        self.first = time.monotonic()
        self.process.wait_for_line(self.pattern)
        for _ in range(FLOOD):
            self.refuse()
        assert time.monotonic() - self.first < REFUSALS_EVERY - 1, "the flood was too slow"
        assert len(self.process.wait_for_line(self.pattern)) == 1

    def finish(self):
        """:return: the two log lines, once one more refusal came after the window"""
        # fixed wait: the claim is a line per window of the real process's clock; the
        # window opened before the first refusal was answered (``first``)
        time.sleep(max(0.0, self.first + REFUSALS_EVERY + 0.1 - time.monotonic()))
        self.refuse()
        process, pattern = self.process, self.pattern
        process.wait_for_line(pattern + r".*\(and \d+ more since the last such line\)$")
        lines = [line for line in process.lines if re.search(pattern, line)]
        assert len(lines) == 2, lines
        assert "more since" not in lines[0]
        assert f"(and {FLOOD} more since the last such line)" in lines[1], lines[1]
        samples = scrape(process.metrics)
        assert value(samples, "hero_refusals_total", limit=self.limit) == FLOOD + 2
        return lines


def batches(process):
    """
    ``process``, an explorer with HERO_MAX_BATCH=3: a batch of 4 from a TCP peer is
    -32600 with none of it run, logged ``refused (max_batch) a batch of 4 requests from
    127.0.0.1:PORT: at most 3``; a flood of them is that line and then one ``and N
    more``, and a batch of 3 is still served.
    """
    attacker = connect(process.tcp)
    batch = [{"jsonrpc": "2.0", "method": "explorer.info", "id": i} for i in range(4)]

    def refuse():
        status, _, data = post(attacker, batch)
        answer = json.loads(data)
        assert status == 200 and answer["error"]["code"] == -32600, answer
        assert "at most 3" in answer["error"]["message"]

    lines = yield Flood(process, "max_batch", refuse)
    port = attacker.sock.getsockname()[1]
    assert lines[0].endswith(
        f"refused (max_batch) a batch of 4 requests from 127.0.0.1:{port}: at most 3"
    ), lines[0]
    status, _, data = post(attacker, batch[:3])
    assert status == 200 and all("result" in a for a in json.loads(data))
    attacker.close()


def responses(process):
    """
    ``process``, an explorer with HERO_MAX_RESPONSE=4096: ``rpc.discover`` (the
    OpenRPC document, larger) from a TCP peer is -32603 ``response too large``, logged
    ``refused (max_response) a response of N bytes to 127.0.0.1:PORT: at most 4096``; a
    flood of them is that line and then one ``and N more``, and smaller answers are
    still given.
    """
    attacker = connect(process.tcp)
    message = {"jsonrpc": "2.0", "method": "rpc.discover", "id": 7}

    def refuse():
        status, _, data = post(attacker, message)
        answer = json.loads(data)
        assert status == 200 and answer["id"] == 7, answer
        assert answer["error"] == {"code": -32603, "message": "response too large"}

    lines = yield Flood(process, "max_response", refuse)
    port = attacker.sock.getsockname()[1]
    assert re.search(
        rf"refused \(max_response\) a response of \d+ bytes to 127\.0\.0\.1:{port}: "
        r"at most 4096$",
        lines[0],
    ), lines[0]
    assert "result" in rpc(process.tcp, "explorer.info")
    attacker.close()


class FatNode:
    """A node that answers every call with a megabyte: a hostile node, on 127.0.0.1."""

    def __init__(self):
        body = json.dumps({"jsonrpc": "2.0", "result": "x" * (1 << 20), "id": 1}).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass  # the explorer hung up once it had read its fill

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self):
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()


def replies(process, fat):
    """
    ``process``, an explorer with EXPLORER_MAX_REPLY=65536, and a node answering every
    call with 1 MiB: each ``explorer.call`` to it is -32003 (the reply read no
    further), logged ``refused (max_reply) the reply of node fat at
    tcp://127.0.0.1:PORT: over 65536 bytes``; a flood of them is that line and then one
    ``and N more``, and the explorer serves on.
    """
    address = f"tcp://127.0.0.1:{fat.port}"
    heartbeat = {"node_id": "fat", "socket_path": address, "name": "fat"}
    assert result(process.unix, "explorer.heartbeat", heartbeat)["accepted"]
    attacker = connect(process.tcp)
    call = {
        "jsonrpc": "2.0",
        "method": "explorer.call",
        "params": {"node_id": "fat", "method": "node.info"},
        "id": 1,
    }

    def refuse():
        status, _, data = post(attacker, call)
        answer = json.loads(data)
        assert status == 200 and answer["error"]["code"] == -32003, answer
        assert "larger than 65536 bytes" in answer["error"]["message"]
        assert "xxxx" not in answer["error"]["message"]

    lines = yield Flood(process, "max_reply", refuse)
    assert lines[0].endswith(
        f"refused (max_reply) the reply of node fat at {address}: over 65536 bytes"
    ), lines[0]
    assert result(process.tcp, "explorer.get_node", {"node_id": "fat"})
    attacker.close()


def test_refusals_are_logged_rate_limited(explorers):
    """
    The three refusals (a batch over HERO_MAX_BATCH, a response over HERO_MAX_RESPONSE,
    a node's reply over EXPLORER_MAX_REPLY), each against its own explorer, flooded
    together: each is one line, then one ``and N more`` after the window (one wait for
    the three, 10 s on the real clock), counted in hero_refusals_total.
    """
    fat = FatNode()
    try:
        processes = explorers(
            {"HERO_MAX_BATCH": 3},
            {"HERO_MAX_RESPONSE": 4096},
            {"EXPLORER_MAX_REPLY": 65536},
        )
        cases = [
            batches(processes[0]),
            responses(processes[1]),
            replies(processes[2], fat),
        ]
        floods = [next(case) for case in cases]
        for flood in floods:
            flood.start()
        for case, flood in zip(cases, floods, strict=True):
            with pytest.raises(StopIteration):
                case.send(flood.finish())
    finally:
        fat.close()
