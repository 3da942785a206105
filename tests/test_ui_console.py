"""
The console through the dashboard (CONTRACT §11): who may open it (operators, same
origin), and that the browser's connection is only ever joined to the explorer's console
relay, never to the rest of the Unix socket it reaches it by.
"""

import base64
import json
import os
import socket
import urllib.parse

import pytest

from .support import result, wait_for
from .test_ui import (
    KEYS,
    STOPPED_INTERVAL,
    axe,
    axe_source,  # noqa: F401  (a fixture)
    browser,  # noqa: F401  (a fixture)
    login,
    start_explorer,
    start_node,
)
from .test_ui_operator import (
    click_action,
    foreign_requests,
    make_login,
    open_page,
    vm_row,
)

NODE = "n1"


def raw(url, head, extra=b"", timeout=10):
    """Send ``head`` (and ``extra`` in the same write) to the dashboard; all it answers
    until it closes the connection (or ``timeout``)."""
    parts = urllib.parse.urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as s:
        s.sendall(head + extra)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except TimeoutError:
            got += b"<timeout>"
        return got


def upgrade(url, cookie, path=f"/v1/nodes/{NODE}/vms/vm1/console", origin=None, **more):
    """A browser's WebSocket upgrade request for ``path`` (bytes)."""
    parts = urllib.parse.urlsplit(url)
    headers = {
        "Host": parts.netloc,
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
        "Origin": origin or f"http://{parts.netloc}",
        "Cookie": cookie,
        # What the page offers: its subprotocol and its session's key.
        "Sec-WebSocket-Protocol": f"hero-ui, k.{KEYS[cookie]}" if cookie in KEYS else None,
        **more,
    }
    lines = [f"GET {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers.items() if v]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def status(answer):
    """The HTTP status of an answer's first line."""
    return int(answer.split(b" ", 2)[1])


def test_console_refusals(twistd, short_tmp):
    """No session 401, a viewer 403, another origin or none 403, a POST 405, another
    path 404, no upgrade 400: each answered by the dashboard, nothing relayed."""
    _, unix, _, startup = start_explorer(twistd, short_tmp)

    def raw(url, head):
        # The dashboard keeps a refused connection open for the next request: close it.
        return globals()["raw"](
            url, head.replace(b"Connection: Upgrade", b"Connection: Upgrade, close")
        )

    viewer = login(startup)
    operator = login(make_login(unix, "olga", "operator"))
    assert status(raw(startup, upgrade(startup, None))) == 401
    assert status(raw(startup, upgrade(startup, viewer))) == 403
    for origin in ("http://evil.example", "null"):
        assert status(raw(startup, upgrade(startup, operator, origin=origin))) == 403
    answer = raw(startup, upgrade(startup, operator, Origin=None))
    assert status(answer) == 403, answer
    post = upgrade(startup, operator).replace(b"GET ", b"POST ", 1)
    assert status(raw(startup, post)) == 405
    other = upgrade(startup, operator, path="/v1/nodes/n1/vms/vm1/consolex")
    assert status(raw(startup, other)) == 404
    plain = upgrade(startup, operator, Upgrade=None)
    assert status(raw(startup, plain)) == 400


def test_refused_upgrade_joins_nothing(twistd, short_tmp):
    """
    An operator's upgrade the explorer does not take (no such node, or no relay) is
    answered with its status alone and the connection closed: a request sent behind it
    on the same connection never reaches the explorer's Unix socket.
    """
    _, unix, _, startup = start_explorer(twistd, short_tmp)
    result(
        unix,
        "explorer.heartbeat",
        {"node_id": NODE, "socket_path": f"unix://{short_tmp}/nobody.sock"},
    )
    operator = login(make_login(unix, "olga", "operator"))
    body = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "explorer.remove_node",
            "params": {"node_id": NODE},
        }
    ).encode()
    smuggled = (
        b"POST /rpc HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    answer = raw(
        startup, upgrade(startup, operator, path="/v1/nodes/ghost/vms/x/console"), smuggled
    )
    assert status(answer) in (400, 404, 502), answer
    assert answer.count(b"HTTP/1.1") == 1 and b"jsonrpc" not in answer, answer
    assert [n["node_id"] for n in result(unix, "explorer.list_nodes")] == [NODE]
    answer = raw(startup, upgrade(startup, operator), smuggled)
    assert status(answer) in (400, 404, 502), answer
    assert answer.count(b"HTTP/1.1") == 1 and b"jsonrpc" not in answer, answer
    assert [n["node_id"] for n in result(unix, "explorer.list_nodes")] == [NODE]
    # Each attempt is in the audit log with the dashboard user and its outcome.
    entries = result(unix, "explorer.audit", {})["entries"]
    mine = [
        (e["target"], e["outcome"])
        for e in entries
        if e["caller"] == "dashboard:olga" and e["method"] == "console.attach"
    ]
    assert ("ghost/x", "refused 404") in mine and (f"{NODE}/vm1", "refused 502") in mine, (
        entries
    )


def terminal_text(driver):
    """What the console view's terminal holds (its whole buffer, scrollback too)."""
    return driver.execute_script(
        "const rows = document.querySelector('#terminal .xterm-accessibility-tree')"
        " || document.querySelector('#terminal .xterm-rows');"
        "return rows ? rows.textContent : '';"
    )


@pytest.mark.qemu
def test_browser_console_of_the_test_guest(twistd, short_tmp, browser, axe_source, request):  # noqa: F811
    """
    In Chromium, as an operator: a VM made from the form with the test guest's kernel
    boots; its console view shows the boot output (the log's tail, then live), a typed
    command's echo and its output come back, a dropped stream reconnects; axe finds
    nothing serious on the console view; nothing is fetched from another origin.
    """
    try:
        guest = request.getfixturevalue("guest")
    except pytest.FixtureLookupError:
        pytest.skip("needs the test guest (tests/guest.py)")
    _, unix, _, _ = start_explorer(twistd, short_tmp)
    start_node(
        twistd,
        short_tmp,
        unix,
        "eps",
        env={"NODE_IMAGE_DIRS": guest.directory, "NODE_ACCEL": "tcg"},
    )
    wait_for(
        lambda: result(unix, "explorer.list_nodes", {"status": "online"}),
        what="the node online",
    )
    url = make_login(unix, "olga", "operator")
    parts = urllib.parse.urlsplit(url)
    open_page(browser, url)
    browser.execute_script("location.hash = '#/create/eps'")
    wait_for(
        lambda: (
            browser.execute_script("return document.getElementById('c-node').value")
            == "eps"
        ),
        what="the form with the node chosen",
    )
    for field, value in {
        "c-name": "tty",
        "c-vcpus": "1",
        "c-memory": "256",
        "c-disk": "1",
        "c-kernel": guest.kernel,
        "c-initrd": guest.initrd,
    }.items():
        element = browser.find_element("id", field)
        element.clear()
        element.send_keys(value)
    browser.find_element("id", "c-submit").click()
    wait_for(lambda: vm_row(browser, "tty"), timeout=60, what="the VM in the page")
    vm_id, _ = vm_row(browser, "tty")
    click_action(browser, vm_id, "start")
    wait_for(
        lambda: vm_row(browser, "tty")[1] == "running", timeout=90, what="the VM running"
    )
    click_action(browser, vm_id, "console")
    wait_for(
        lambda: browser.execute_script("return document.body.dataset.console") == "live",
        timeout=30,
        what="the console live",
    )
    wait_for(
        lambda: guest.ready_line.decode() in terminal_text(browser),
        timeout=120,
        what="the guest's boot output in the terminal",
    )
    if axe_source:
        assert axe(browser, axe_source) == []
    typed = browser.find_element("css selector", "#terminal .xterm-helper-textarea")

    def answered():
        return "sum-42" in terminal_text(browser).replace("echo sum-$((40+2))", "")

    # The shell may start a moment after the ready line: type again if it missed it.
    for _ in range(3):
        typed.send_keys("echo sum-$((40+2))\n")
        try:
            wait_for(answered, timeout=15, what="the command's output")
            break
        except AssertionError:
            continue
    assert answered(), terminal_text(browser)[-2000:]
    assert "echo sum-$((40+2))" in terminal_text(browser)
    attaches = [
        e["outcome"]
        for e in result(unix, "explorer.audit", {})["entries"]
        if e["caller"] == "dashboard:olga" and e["method"] == "console.attach"
    ]
    assert "ok" in attaches, attaches
    if os.environ.get("HERO_UI_SCREENSHOTS"):
        # The README's picture of the console: HERO_UI_SCREENSHOTS=docs.
        browser.set_window_size(1000, 640)
        browser.execute_script("document.getElementById('console-title').scrollIntoView()")
        browser.save_screenshot(
            os.path.join(os.environ["HERO_UI_SCREENSHOTS"], "dashboard-console.png")
        )
    # A drop: the page reconnects by itself and the log's tail is shown again.
    browser.execute_script("document.getElementById('console-reconnect').click()")
    wait_for(
        lambda: browser.execute_script("return document.body.dataset.console") == "live",
        timeout=30,
        what="the console live again",
    )
    wait_for(lambda: "sum-42" in terminal_text(browser), what="the tail again")
    assert foreign_requests(browser, f"{parts.scheme}://{parts.netloc}") == []
    browser.execute_script("history.back()")
    wait_for(lambda: vm_row(browser, "tty"), what="back on the node page")
    click_action(browser, vm_id, "force-stop")
    wait_for(
        lambda: vm_row(browser, "tty")[1] == "stopped", timeout=60, what="the VM stopped"
    )


def test_events_stream_refusals(twistd, short_tmp):
    """/v1/events through the dashboard: no session 401, another origin 403, a bad
    since 400; a viewer's is passed on to the explorer (its status alone when it is
    refused there), nothing joined behind it."""
    _, unix, _, startup = start_explorer(twistd, short_tmp)
    viewer = login(startup)

    def close(head):
        return head.replace(b"Connection: Upgrade", b"Connection: Upgrade, close")

    assert status(raw(startup, close(upgrade(startup, None, path="/v1/events")))) == 401
    evil = upgrade(startup, viewer, path="/v1/events", origin="http://evil.example")
    assert status(raw(startup, close(evil))) == 403
    bad = upgrade(startup, viewer, path="/v1/events?since=x")
    assert status(raw(startup, close(bad))) == 400
    answer = raw(startup, upgrade(startup, viewer, path="/v1/events?since=0"))
    assert status(answer) in (101, 400, 404), answer


def rpc_requests(driver):
    """How many ``POST /rpc`` the page has made so far."""
    return driver.execute_script(
        "return performance.getEntriesByType('resource')"
        ".filter((e) => e.name.endsWith('/rpc')).length;"
    )


def test_browser_follows_events(twistd, short_tmp, browser):  # noqa: F811
    """
    In Chromium, with the explorer's event stream up: the page makes no periodic RPC
    (counted over 10 s); a node that stops shows offline after its event, without
    polling; with the stream down (no such route) the page polls instead.
    """
    _, unix, _, startup = start_explorer(twistd, short_tmp)
    nodes = {
        "mu": start_node(twistd, short_tmp, unix, "mu"),
        "nu": start_node(twistd, short_tmp, unix, "nu", interval=STOPPED_INTERVAL),
    }
    wait_for(
        lambda: len(result(unix, "explorer.list_nodes", {"status": "online"})) == 2,
        what="both nodes online",
    )
    browser.get(startup)
    wait_for(
        lambda: browser.execute_script("return document.body.dataset.events"),
        what="the event stream tried",
    )
    if browser.execute_script("return document.body.dataset.events") != "live":
        # No event stream on this explorer: the page polls, as before.
        before = rpc_requests(browser)
        wait_for(
            lambda: rpc_requests(browser) >= before + 4,
            timeout=10,
            what="polling while the stream is down",
        )
        pytest.skip("the explorer has no event stream (GET /v1/events)")
    wait_for(
        lambda: browser.find_element("id", "s-online").text == "2", what="both nodes shown"
    )
    before = rpc_requests(browser)
    # Heartbeats of steady nodes make no event: nothing to ask for 10 s.
    browser.execute_script("return new Promise((r) => setTimeout(r, 10000))")
    assert rpc_requests(browser) - before <= 2, "periodic RPC polling with events up"
    nodes["nu"].stop()
    wait_for(
        lambda: (
            browser.execute_script("return document.body.dataset.lastEvent")
            == "node.offline"
        ),
        timeout=15,
        what="nu's offline event",
    )
    wait_for(
        lambda: browser.find_element("id", "s-offline").text == "1",
        timeout=5,
        what="nu offline in the page",
    )
