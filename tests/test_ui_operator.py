"""
The dashboard's accounts and operators (CONTRACT §11): login tokens made with the CLI,
single use, revoked with their sessions; the CSRF token; a viewer's writes refused; and
in a real headless Chromium, an operator driving a real QEMU VM's life from the page.
"""

import json
import os
import re
import shutil
import subprocess
import urllib.parse

import pytest

from .support import result, wait_for
from .test_ui import (
    axe,
    axe_source,  # noqa: F401  (a fixture)
    browser,  # noqa: F401  (a fixture)
    fetch,
    login,
    page_headers,
    start_explorer,
    start_node,
    ui_rpc,
)


def cli(*args, explorer):
    """Run ``hero-compute`` against ``explorer``; the finished process."""
    return subprocess.run(
        [
            shutil.which("hero-compute") or ".venv/bin/hero-compute",
            *args,
            "--explorer",
            explorer,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def make_login(unix, user, role, ttl=None):
    """``ui token create`` over the Unix socket; the login URL it prints."""
    args = ["ui", "token", "create", "--user", user, "--role", role]
    if ttl:
        args += ["--ttl", ttl]
    done = cli(*args, explorer=unix)
    assert done.returncode == 0, done.stderr
    url = done.stdout.strip()
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/\?token=[\w-]{40,}", url), url
    return url


def test_login_tokens_single_use_listed_and_revoked(twistd, short_tmp):
    """A token made with the CLI logs in once as its role; the listing never shows a
    token; revoking the user ends its unused tokens and its live session at once."""
    _, unix, tcp, startup = start_explorer(twistd, short_tmp)
    url = make_login(unix, "alice", "operator", "1h")
    spare = make_login(unix, "alice", "viewer")
    token = url.split("token=", 1)[1]
    cookie = login(url)
    assert fetch(url)[0] == 401  # spent
    status, _, page = fetch(url, path="/", headers={"Cookie": cookie})
    assert status == 200 and b'<meta name="ui-role" content="operator">' in page
    viewer = login(startup)
    _, _, page = fetch(url, path="/", headers={"Cookie": viewer})
    assert b'<meta name="ui-role" content="viewer">' in page

    done = cli("ui", "token", "list", "--json", explorer=unix)
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assert [(t["user"], t["role"]) for t in listed["tokens"]] == [("alice", "viewer")]
    assert ("alice", "operator") in [(s["user"], s["role"]) for s in listed["sessions"]]
    assert token not in done.stdout and spare.split("=", 1)[1] not in done.stdout

    # Plain TCP may not make, list or end accounts.
    for method, params in [
        ("explorer.ui_token_create", {"user": "mallory", "role": "operator"}),
        ("explorer.ui_token_list", {}),
        ("explorer.ui_token_revoke", {"user": "alice"}),
    ]:
        from .support import rpc

        assert rpc(tcp, method, params)["error"]["code"] == -32010, method

    done = cli("ui", "token", "revoke", "--user", "alice", explorer=unix)
    assert done.returncode == 0 and "1 tokens and 1 sessions ended" in done.stdout
    assert fetch(url, path="/", headers={"Cookie": cookie})[0] == 401
    assert fetch(spare)[0] == 401
    assert fetch(url, path="/", headers={"Cookie": viewer})[0] == 200
    entries = result(unix, "explorer.audit", {})["entries"]
    made = [(e["method"], e["target"], e["outcome"]) for e in entries]
    assert made.count(("explorer.ui_token_create", "alice", "ok")) == 2, made
    assert ("explorer.ui_token_revoke", "alice", "ok") in made
    assert token not in json.dumps(entries)


def test_bad_accounts_refused(twistd, short_tmp):
    """A bad user name, role or ttl is -32602 naming it, and makes no token."""
    _, unix, _, _ = start_explorer(twistd, short_tmp)
    from .support import rpc

    for params, name in [
        ({"user": "a b", "role": "viewer"}, "user"),
        ({"user": "bob", "role": "admin"}, "role"),
        ({"user": "bob", "role": "viewer", "ttl": 0}, "ttl"),
    ]:
        error = rpc(unix, "explorer.ui_token_create", params)["error"]
        assert error["code"] == -32602 and name in error["message"], error
    assert result(unix, "explorer.ui_token_list") == {"tokens": [], "sessions": []}


def test_csrf_and_viewer_writes_refused(twistd, short_tmp):
    """Without the session's CSRF token (or with another session's) POST /rpc is 403 and
    nothing runs; a viewer's writes with it are -32010, and nothing changed."""
    _, unix, _, startup = start_explorer(twistd, short_tmp)
    result(
        unix,
        "explorer.heartbeat",
        {"node_id": "n1", "socket_path": f"unix://{short_tmp}/nobody.sock"},
    )
    viewer = login(startup)
    operator = login(make_login(unix, "bob", "operator"))
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "explorer.info"})
    headers = page_headers(startup, operator)
    for change in (
        {"X-CSRF-Token": None},
        {"X-CSRF-Token": "x" * 43},
        {"X-CSRF-Token": page_headers(startup, viewer)["X-CSRF-Token"]},
    ):
        sent = {k: v for k, v in {**headers, **change}.items() if v is not None}
        status, _, data = fetch(startup, "POST", "/rpc", body, sent)
        assert status == 403 and b"CSRF" in data, (change, status)
    assert "result" in ui_rpc(startup, operator, "explorer.info", {})
    for method, params in [
        (
            "explorer.call",
            {
                "node_id": "n1",
                "method": "vm.create",
                "params": {"name": "x", "vcpus": 1, "memory_mb": 64, "disk_gb": 1},
            },
        ),
        (
            "explorer.call",
            {"node_id": "n1", "method": "vm.start", "params": {"vm_id": "x"}},
        ),
        ("explorer.create_vm", {"name": "x", "vcpus": 1, "memory_mb": 64, "disk_gb": 1}),
        ("explorer.remove_node", {"node_id": "n1"}),
    ]:
        error = ui_rpc(startup, viewer, method, params)["error"]
        assert error["code"] == -32010, (method, error)
    # An operator still may not remove nodes from the page.
    error = ui_rpc(startup, operator, "explorer.remove_node", {"node_id": "n1"})["error"]
    assert error["code"] == -32010
    assert [n["node_id"] for n in result(unix, "explorer.list_nodes")] == ["n1"]


# ---- in a real browser -------------------------------------------------------------


def open_page(driver, url):
    """Log in with ``url`` and wait for the page's first update."""
    driver.get(url)
    wait_for(
        lambda: driver.find_element("tag name", "body").get_attribute("data-updates"),
        what="the page's first update",
    )


def vm_row(driver, name):
    """``(vm_id, state)`` of the VM called ``name`` in the node page, or None."""
    return driver.execute_script(
        "for (const r of document.querySelectorAll('#vms-body tr[data-vm-id]'))"
        "  if (r.cells[0].textContent === arguments[0])"
        "    return [r.dataset.vmId, r.dataset.state];"
        "return null;",
        name,
    )


def click_action(driver, vm_id, action):
    """Click a VM's action button (or link) in the node page."""
    driver.execute_script(
        'document.querySelector(`tr[data-vm-id="${arguments[0]}"] '
        '[data-action="${arguments[1]}"]`).click()',
        vm_id,
        action,
    )


def foreign_requests(driver, origin):
    """Every resource the page loaded or called from another origin."""
    return driver.execute_script(
        "return performance.getEntriesByType('resource').map((e) => e.name)"
        ".filter((u) => !u.startsWith(arguments[0] + '/'));",
        origin,
    )


@pytest.mark.qemu
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU")
def test_browser_operator_drives_a_vm(twistd, short_tmp, browser, axe_source):  # noqa: F811
    """
    In Chromium, as an operator: the VM form creates a VM on a real node; Start runs it
    and the page shows it running without a reload; Force stop stops it; Delete asks
    first (Cancel keeps it), then deletes it; each step's outcome is in the status line;
    nothing is fetched from another origin; axe finds nothing serious on the form and
    the node page.
    """
    _, unix, _, _ = start_explorer(twistd, short_tmp)
    start_node(twistd, short_tmp, unix, "gamma")
    wait_for(
        lambda: result(unix, "explorer.list_nodes", {"status": "online"}),
        what="the node online",
    )
    url = make_login(unix, "carol", "operator")
    parts = urllib.parse.urlsplit(url)
    origin = f"{parts.scheme}://{parts.netloc}"
    open_page(browser, url)
    wait_for(lambda: browser.find_element("id", "s-online").text == "1", what="the fleet")
    if axe_source:
        assert axe(browser, axe_source) == []  # the fleet view, as an operator
    # CONTRACT §11: the page has the session's CSRF token in <meta name="csrf-token">
    # (put there from the login's fragment; the served page carries it empty).
    token = browser.execute_script(
        "return document.querySelector('meta[name=\"csrf-token\"]').content"
    )
    assert token and token == browser.execute_script(
        "return sessionStorage.getItem('hero-ui-key')"
    )
    # Marks this document: a reload would lose it.
    browser.execute_script("window.__sameDocument = true;")
    browser.execute_script("location.hash = '#/create/gamma'")
    wait_for(
        lambda: (
            browser.execute_script("return document.getElementById('c-node').value")
            == "gamma"
        ),
        what="the form with the node chosen",
    )
    if axe_source:
        assert axe(browser, axe_source) == []
    form = {"c-name": "webby", "c-vcpus": "1", "c-memory": "64", "c-disk": "1"}
    for field, value in form.items():
        element = browser.find_element("id", field)
        element.clear()
        element.send_keys(value)
    browser.find_element("id", "c-submit").click()
    wait_for(lambda: vm_row(browser, "webby"), timeout=60, what="the VM in the page")
    assert browser.execute_script("return location.hash") == "#/node/gamma"
    status = browser.find_element("id", "action-status")
    assert "Created webby" in status.text
    vm_id, state = vm_row(browser, "webby")
    assert state == "stopped"
    if axe_source:
        assert axe(browser, axe_source) == []

    click_action(browser, vm_id, "start")
    wait_for(
        lambda: vm_row(browser, "webby")[1] == "running",
        timeout=90,
        what="the VM running in the page",
    )
    assert "Starting webby: done." in status.text
    if os.environ.get("HERO_UI_SCREENSHOTS"):
        # The README's picture of the operator view: HERO_UI_SCREENSHOTS=docs.
        browser.set_window_size(1100, 620)
        browser.execute_script("document.getElementById('vms-title').scrollIntoView()")
        browser.save_screenshot(
            os.path.join(os.environ["HERO_UI_SCREENSHOTS"], "dashboard-operator.png")
        )
    # The console view: xterm.js from this origin, the log's tail, then the live stream
    # (reconnecting while there is none).
    click_action(browser, vm_id, "console")
    wait_for(
        lambda: browser.execute_script(
            "return document.querySelector('#terminal .xterm-rows') !== null"
        ),
        what="the terminal",
    )
    wait_for(
        lambda: (
            browser.execute_script("return document.body.dataset.console")
            in ("live", "down")
        ),
        timeout=20,
        what="the console connected or not",
    )
    print("console:", browser.find_element("id", "console-state").text)
    print(
        "terminal:",
        browser.execute_script(
            "return document.querySelector('#terminal .xterm-rows').innerText"
        ),
    )
    if axe_source:
        assert axe(browser, axe_source) == []
    browser.execute_script("history.back()")
    wait_for(lambda: vm_row(browser, "webby"), what="back on the node page")
    click_action(browser, vm_id, "force-stop")
    wait_for(
        lambda: vm_row(browser, "webby")[1] == "stopped",
        timeout=60,
        what="the VM stopped in the page",
    )
    assert "Forcing webby off: done." in status.text

    click_action(browser, vm_id, "delete")
    wait_for(
        lambda: browser.execute_script("return document.getElementById('confirm').open"),
        what="the confirmation",
    )
    assert vm_id in browser.find_element("id", "confirm-text").text
    # Cancel, then Delete again in the same task: the cancelled dialog's "close" event
    # comes after the new one has opened, and must not answer it.
    browser.execute_script(
        "document.getElementById('confirm-cancel').click();"
        'document.querySelector(`tr[data-vm-id="${arguments[0]}"] '
        '[data-action="delete"]`).click()',
        vm_id,
    )
    assert vm_row(browser, "webby") is not None
    node = f"unix://{short_tmp}/gamma.sock"
    assert [v["vm_id"] for v in result(node, "vm.list")] == [vm_id]
    wait_for(
        lambda: browser.execute_script("return document.getElementById('confirm').open"),
        what="the confirmation",
    )
    browser.find_element("id", "confirm-ok").click()
    wait_for(
        lambda: vm_row(browser, "webby") is None,
        timeout=60,
        what="the VM gone from the page",
    )
    assert "Deleting webby: done." in status.text
    assert result(node, "vm.list") == []
    # Placed by the explorer (explorer.create_vm): the only node that fits gets it.
    browser.execute_script("location.hash = '#/create'")
    wait_for(
        lambda: browser.find_element("id", "create-view").is_displayed(), what="the form"
    )
    for field, value in {**form, "c-name": "placed", "c-where": ""}.items():
        element = browser.find_element("id", field)
        element.clear()
        element.send_keys(value)
    assert browser.find_element("id", "c-node").get_attribute("value") == ""
    browser.find_element("id", "c-submit").click()
    wait_for(lambda: vm_row(browser, "placed"), timeout=60, what="the placed VM")
    assert "on node gamma" in status.text
    assert [v["name"] for v in result(node, "vm.list")] == ["placed"]
    assert browser.execute_script("return window.__sameDocument") is True
    assert foreign_requests(browser, origin) == []
    # Every write is in the audit log with the dashboard user.
    entries = result(unix, "explorer.audit", {"limit": 50})["entries"]
    done = [
        (e["method"], e["outcome"]) for e in entries if e["caller"] == "dashboard:carol"
    ]
    for method in ("vm.create", "vm.start", "vm.stop", "vm.delete", "explorer.create_vm"):
        assert (method, "ok") in done, (method, entries)


def test_browser_viewer_has_no_controls(twistd, short_tmp, browser, axe_source):  # noqa: F811
    """
    In Chromium, as a viewer: no create link, no action column or buttons on a node's
    page, the form's route shows the fleet; a write made from the page's own context
    (its cookie, its CSRF token, its Origin) is -32010 and changes nothing.
    """
    _, unix, _, startup = start_explorer(twistd, short_tmp)
    start_node(twistd, short_tmp, unix, "delta")
    wait_for(
        lambda: result(unix, "explorer.list_nodes", {"status": "online"}),
        what="the node online",
    )
    node = f"unix://{short_tmp}/delta.sock"
    vm = result(
        node,
        "vm.create",
        {"name": "kept", "vcpus": 1, "memory_mb": 64, "disk_gb": 1},
        timeout=60,
    )
    open_page(browser, startup)
    assert not browser.find_element("id", "operator-links").is_displayed()
    browser.execute_script("location.hash = '#/node/delta'")
    wait_for(lambda: vm_row(browser, "kept"), what="the VM listed")
    assert (
        browser.execute_script(
            "return document.querySelectorAll('#vms-body button, #vms-head th').length"
        )
        == 7
    )  # the seven headings, no Actions, no buttons
    assert not browser.find_element("id", "create-here").is_displayed()
    if axe_source:
        assert axe(browser, axe_source) == []
    browser.execute_script("location.hash = '#/create/delta'")
    wait_for(
        lambda: browser.find_element("id", "fleet-view").is_displayed(),
        what="the fleet instead of the form",
    )
    answer = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('/rpc', {method: 'POST', headers: {'content-type': 'application/json',"
        " 'x-csrf-token': sessionStorage.getItem('hero-ui-key')},"
        " body: JSON.stringify({jsonrpc: '2.0', id: 1, method: 'explorer.call',"
        " params: {node_id: 'delta', method: 'vm.delete', params: {vm_id: arguments[0]}}})"
        "}).then((r) => r.json()).then(done, (e) => done(String(e)));",
        vm["vm_id"],
    )
    assert answer["error"]["code"] == -32010, answer
    assert [v["vm_id"] for v in result(node, "vm.list")] == [vm["vm_id"]]


@pytest.mark.slow
def test_browser_first_paint_at_100000_nodes(twistd, short_tmp, browser):  # noqa: F811
    """
    At 100,000 simulated nodes the fleet view's first paint (summary and first page of
    nodes, measured in the browser from navigation start) is under 1 s, and the summary
    it shows is explorer.summary's.
    """
    from .support import UnixHTTPConnection, post

    _, unix, _, url = start_explorer(
        twistd, short_tmp, env={"HERO_MAX_BATCH": "2000"}, args=["--offline-after", "900"]
    )
    conn = UnixHTTPConnection(unix[len("unix://") :], timeout=120)
    for start in range(0, 100_000, 2000):
        batch = [
            {
                "jsonrpc": "2.0",
                "id": i,
                "method": "explorer.heartbeat",
                "params": {
                    "node_id": f"sim-{i:06d}",
                    "socket_path": f"unix://{short_tmp}/sim.sock",
                    "capacity": {"vcpus": 32, "memory_mb": 131072, "disk_gb": 1000},
                    "usage": {"vcpus": i % 33, "memory_mb": 0, "disk_gb": 7},
                    "vm_count": i % 5,
                    "labels": {"rack": f"r{i % 10}"},
                },
            }
            for i in range(start, start + 2000)
        ]
        status, _, data = post(conn, batch)
        assert status == 200 and b'"error"' not in data
    conn.close()
    summary = result(unix, "explorer.summary")
    assert summary["nodes"] == {"online": 100_000, "offline": 0}
    assert summary["labels"]["rack"]["r3"] == 10_000
    browser.get(url)  # the token URL, then the page itself
    times = []
    for _ in range(3):
        browser.get(url.split("/?", 1)[0] + "/")
        wait_for(
            lambda: browser.find_element("tag name", "body").get_attribute("data-updates"),
            what="the first update",
        )
        painted = browser.execute_script("return performance.now()")
        times.append(painted)
        assert browser.find_element("id", "s-online").text == "100000"
        assert browser.find_element("id", "s-vms").text == str(summary["vms"])
    print(f"first paint at 100,000 nodes (ms): {[round(t) for t in times]}")
    assert sorted(times)[1] < 1000, times


def test_dashboard_user_names_itself_for_the_audit():
    """A dashboard user's calls name it as ``dashboard:<user>`` (its identity's uri)."""
    from hero_compute.explorer.ui_accounts import UiAccounts
    from hero_compute.explorer.ui_users import DashboardUser
    from hero_compute.rpc.authz import UI_OPERATOR

    assert DashboardUser(UI_OPERATOR, "alice").uri == "dashboard:alice"
    session = UiAccounts(None).certificate_session("ops")
    assert session.user.uri == "dashboard:client/ops" and session.user.role == UI_OPERATOR


def test_accounts_expire_and_are_bounded(tmp_path):
    """A login token past its ttl is refused and dropped; the session it made ends when
    the token would have; past the per-user bound the user's own oldest session goes,
    past the total a new login is refused."""
    from twisted.internet.task import Clock

    from hero_compute.explorer.store import Store
    from hero_compute.explorer.ui_accounts import UiAccounts
    from hero_compute.explorer.ui_users import DashboardUser, SessionsFull
    from hero_compute.rpc.authz import UI_VIEWER

    clock = Clock()
    clock.advance(1_700_000_000)
    store = Store.open(tmp_path / "explorer.db")
    accounts = UiAccounts(clock, lambda: store, limit=3, per_user=2)
    late = accounts.create("ann", "viewer", ttl=60)["token"]
    used = accounts.create("ann", "operator", ttl=60)["token"]
    sid, session = accounts.redeem(used)
    assert accounts.session(sid) is session and accounts.redeem(used) is None
    clock.advance(61)
    assert accounts.redeem(late) is None
    assert accounts.session(sid) is None
    assert accounts.list() == {"tokens": [], "sessions": []}
    accounts.create("bob", "viewer", ttl=60)
    # Made after the expiry: the expired rows are purged on the way.
    assert [t["user"] for t in store.ui_tokens(0)] == ["bob"]
    # Per user, its own oldest goes; in all, a new login is refused (never another's).
    mine = [accounts.new_session(DashboardUser(UI_VIEWER, "u"))[0] for _ in range(3)]
    assert accounts.session(mine[0]) is None
    other = accounts.new_session(DashboardUser(UI_VIEWER, "v"))[0]
    with pytest.raises(SessionsFull):
        accounts.new_session(DashboardUser(UI_VIEWER, "w"))
    assert all(accounts.session(s) for s in [*mine[1:], other])
    store.close()
