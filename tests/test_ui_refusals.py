"""
The dashboard's ``POST /rpc`` has a JSON-RPC dispatcher of its own, refusing by the same
limits as the explorer's listeners (CONTRACT §7): its refusals are counted in the one
``hero_refusals_total`` family with theirs, summed by limit, as scrapes of a real
explorer show.
"""

import json
import re

from .support import connect, post
from .test_metrics import metrics_uri, scrape, value
from .test_ui import fetch, login, page_headers

#: Between explorer.summary's answer on an empty fleet (183 bytes) and explorer.info's
#: (~220).
MAX_RESPONSE = 200


def ui_post(url, headers, body):
    """:return: the decoded answer to ``body`` posted to the dashboard's ``/rpc``"""
    status, _, data = fetch(url, "POST", "/rpc", json.dumps(body), headers)
    assert status == 200, (status, data)
    return json.loads(data)


def call(method, rid=1):
    """:return: a JSON-RPC request object without params"""
    return {"jsonrpc": "2.0", "id": rid, "method": method}


def refusal_lines(uri):
    """:return: the raw ``hero_refusals_total`` lines of a scrape, one per sample"""
    conn = connect(uri)
    try:
        conn.request("GET", "/metrics")
        body = conn.getresponse().read().decode()
    finally:
        conn.close()
    return [line for line in body.splitlines() if line.startswith("hero_refusals_total{")]


def test_dashboard_refusals_are_counted_with_the_listeners(twistd, short_tmp):
    """A batch over HERO_MAX_BATCH and a response over HERO_MAX_RESPONSE on the
    dashboard's /rpc are refused, logged and counted in hero_refusals_total{limit};
    a refusal of the same limit on a JSON-RPC listener is added to the same sample."""
    process = twistd(
        [
            "explorer",
            "--socket",
            f"{short_tmp}/e.sock",
            "--tcp",
            "127.0.0.1:0",
            "--ui",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--state-dir",
            f"{short_tmp}/es",
        ],
        env={"HERO_MAX_BATCH": "3", "HERO_MAX_RESPONSE": str(MAX_RESPONSE)},
    )
    (match,) = process.wait_for_line(
        r"\(dashboard: (http://\S+)/ with the token in (\S+)\)"
    )
    metrics = metrics_uri(process)
    tcp = next(u for u in process.listening(count=4) if u.startswith("tcp://"))
    with open(match.group(2)) as f:
        url = f"{match.group(1)}/?token={f.read().strip()}"
    samples = scrape(metrics)
    assert value(samples, "hero_refusals_total", limit="max_batch") is None
    assert value(samples, "hero_refusals_total", limit="max_response") is None

    headers = page_headers(url, login(url))
    answer = ui_post(url, headers, [call("explorer.summary", i) for i in range(4)])
    assert answer["error"]["code"] == -32600 and "at most 3" in answer["error"]["message"]
    process.wait_for_line(r"refused \(max_batch\) a batch of 4 requests")
    answer = ui_post(url, headers, call("explorer.info"))
    assert answer["error"] == {"code": -32603, "message": "response too large"}, answer
    process.wait_for_line(r"refused \(max_response\) a response of \d+ bytes")
    # The dashboard still answers what is within the limits.
    answer = ui_post(url, headers, call("explorer.summary"))
    assert answer["result"]["nodes"] == {"online": 0, "offline": 0}, answer

    samples = scrape(metrics)
    assert value(samples, "hero_refusals_total", limit="max_batch") == 1
    assert value(samples, "hero_refusals_total", limit="max_response") == 1

    # The same limit refused on a JSON-RPC listener: one sample, both counted.
    attacker = connect(tcp)
    try:
        status, _, data = post(attacker, [call("explorer.summary", i) for i in range(4)])
    finally:
        attacker.close()
    assert status == 200 and json.loads(data)["error"]["code"] == -32600
    samples = scrape(metrics)
    assert value(samples, "hero_refusals_total", limit="max_batch") == 2
    assert value(samples, "hero_refusals_total", limit="max_response") == 1
    lines = refusal_lines(metrics)
    assert len([line for line in lines if re.search(r'limit="max_batch"', line)]) == 1
    assert len(lines) == len(set(re.sub(r"\}.*", "", line) for line in lines)), lines
