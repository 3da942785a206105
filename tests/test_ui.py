"""
The dashboard (``twistd explorer --ui``): its access rules and headers over plain HTTP
against a real explorer, then the page itself in a real headless Chromium, over real
``twistd`` nodes and thousands of simulated ones, checked with axe-core.
"""

import http.client
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse

import attrs
import pytest

from hero_compute.rpc.authz import DASHBOARD_POLICY, UI_OPERATOR, UI_VIEWER
from hero_compute.rpc.errors import RefusedByPolicy

from .support import post, result, rpc, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
#: The axe-core release the accessibility checks run: pinned, so that a new rule never
#: fails CI unasked.
AXE_VERSION = "4.14.1"
#: Where the browser tests find it; installed with npm on first use.
AXE_DIR = os.path.join(tempfile.gettempdir(), f"hero-compute-axe-core-{AXE_VERSION}")


@attrs.frozen
class User:
    """A dashboard user, as :data:`DASHBOARD_POLICY` sees it."""

    role: str
    name: str = "someone"


VIEWER, OPERATOR = User(UI_VIEWER), User(UI_OPERATOR)

#: What either role may call.
READS = [
    ("explorer.info", {}),
    ("explorer.query_nodes", {}),
    ("explorer.summary", {}),
    ("explorer.list_nodes", {}),
    ("explorer.get_node", {"node_id": "a"}),
    ("explorer.node_history", {"node_id": "a"}),
    ("explorer.call", {"node_id": "a", "method": "node.info"}),
    ("explorer.call", {"node_id": "a", "method": "vm.list"}),
    ("explorer.call", {"node_id": "a", "method": "vm.get"}),
]

#: What only an operator may call.
WRITES = [
    ("explorer.create_vm", {"name": "x"}),
    ("explorer.place", {}),
    ("explorer.call", {"node_id": "a", "method": "vm.create"}),
    ("explorer.call", {"node_id": "a", "method": "vm.start"}),
    ("explorer.call", {"node_id": "a", "method": "vm.stop"}),
    ("explorer.call", {"node_id": "a", "method": "vm.delete"}),
    ("explorer.call", {"node_id": "a", "method": "vm.console_log"}),
]

#: What neither may call.
NEVER = [
    ("explorer.remove_node", {"node_id": "a"}),
    ("explorer.heartbeat", {"node_id": "a"}),
    ("explorer.create_token", {}),
    ("explorer.ui_token_create", {"user": "x", "role": "operator"}),
    ("explorer.ui_token_revoke", {"user": "x"}),
    ("explorer.revoke", {"node_id": "a"}),
    ("explorer.call", {"node_id": "a", "method": "image.import"}),
    ("explorer.call", ["a", "vm.list"]),
    ("explorer.call", {"node_id": "a"}),
]


def test_dashboard_policy_by_role():
    """Viewers read; operators also create, start, stop, delete VMs and read consoles;
    neither removes nodes, makes tokens or accounts, or imports images."""
    for method, params in READS:
        DASHBOARD_POLICY.check("tls", VIEWER, method, params)
        DASHBOARD_POLICY.check("tls", OPERATOR, method, params)
    for method, params in WRITES:
        DASHBOARD_POLICY.check("tls", OPERATOR, method, params)
        with pytest.raises(RefusedByPolicy):
            DASHBOARD_POLICY.check("tls", VIEWER, method, params)
    for method, params in NEVER:
        for user in (VIEWER, OPERATOR):
            with pytest.raises(RefusedByPolicy):
                DASHBOARD_POLICY.check("tls", user, method, params)


def start_explorer(twistd, short_tmp, env=None, args=()):
    """
    A real explorer with a Unix socket, a TCP listener and the dashboard.

    :return: ``(process, unix URI, tcp URI, dashboard URL with its token)``
    """
    sock = f"{short_tmp}/e.sock"
    process = twistd(
        [
            "explorer",
            "--socket",
            sock,
            "--tcp",
            "127.0.0.1:0",
            "--ui",
            "127.0.0.1:0",
            "--state-dir",
            f"{short_tmp}/es",
            *args,
        ],
        env=env,
    )
    (match,) = process.wait_for_line(
        r"\(dashboard: (http://\S+)/ with the token in (\S+)\)"
    )
    process.listening(count=3)
    info = result(f"unix://{sock}", "explorer.info")
    tcp = next(u for u in info["listeners"] if u.startswith("tcp://"))
    with open(match.group(2)) as f:
        token = f.read().strip()
    return process, f"unix://{sock}", tcp, f"{match.group(1)}/?token={token}"


def fetch(url, method="GET", path=None, body=None, headers=None):
    """
    One request to the dashboard with a plain HTTP client.

    :return: ``(status, headers as a lower-cased dict, body bytes)``
    """
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        target = (
            path
            if path is not None
            else (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        )
        conn.request(method, target, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return (
            response.status,
            {k.lower(): v for k, v in response.getheaders()},
            data,
        )
    finally:
        conn.close()


#: A session's ``Cookie`` header -> the key (CSRF token) its login redirect handed out.
KEYS = {}


def login(url):
    """:return: the ``Cookie`` header of a session got by the token URL (its key, from
    the redirect's fragment, kept in :data:`KEYS` as the page keeps it)"""
    status, headers, _ = fetch(url)
    assert status == 302, status
    cookie = headers["set-cookie"].split(";", 1)[0]
    assert headers["location"].startswith("/#k="), headers["location"]
    KEYS[cookie] = headers["location"][len("/#k=") :]
    return cookie


def origin(url):
    """:return: the origin of a dashboard URL, as a browser sends it in ``Origin``"""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def csrf_token(url, cookie):
    """:return: the session's CSRF token, as its login redirect handed it to the page
    (the page itself, got with the cookie, never carries it)"""
    status, _, body = fetch(url, path="/", headers={"Cookie": cookie})
    assert status == 200, status
    assert b'<meta name="csrf-token" content="">' in body, body[:500]
    return KEYS[cookie]


def page_headers(url, cookie):
    """The headers the page's own script sends on ``POST /rpc``."""
    return {
        "Content-Type": "application/json",
        "Cookie": cookie,
        "Origin": origin(url),
        "X-CSRF-Token": csrf_token(url, cookie),
    }


def ui_rpc(url, cookie, method, params, headers=None):
    """One JSON-RPC call through the dashboard's ``POST /rpc``; the response object."""
    status, _, data = fetch(
        url,
        "POST",
        "/rpc",
        json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}),
        headers or page_headers(url, cookie),
    )
    assert status == 200, (status, data)
    return json.loads(data)


def test_dashboard_access_and_headers(twistd, short_tmp):
    """
    Without a session every path is 401; the token URL sets an HttpOnly, SameSite=Strict
    cookie and redirects to /; every answer carries a strict CSP and nosniff.
    """
    _, _, _, url = start_explorer(twistd, short_tmp)
    base = url.split("?", 1)[0]
    for method, path in [("GET", "/"), ("GET", "/static/app.js"), ("POST", "/rpc")]:
        status, headers, _ = fetch(
            base, method, path, body=b"{}" if method == "POST" else None
        )
        assert status == 401, (method, path, status)
        assert "default-src 'self'" in headers["content-security-policy"]
    assert fetch(base, path="/?token=wrong")[0] == 401

    status, headers, _ = fetch(url)
    assert status == 302 and re.fullmatch(r"/#k=[\w-]{40,}", headers["location"])
    cookie = headers["set-cookie"]
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower(), cookie
    session = cookie.split(";", 1)[0]

    status, headers, body = fetch(base, path="/", headers={"Cookie": session})
    assert status == 200 and b'<script type="module" src="/static/app.js">' in body
    csp = headers["content-security-policy"]
    for rule in ("default-src 'self'", "script-src 'self'", "frame-ancestors 'none'"):
        assert rule in csp, csp
    assert "unsafe-inline" not in csp and "http" not in csp
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    # No inline script, and nothing from another origin, in what the page is made of.
    assert not re.search(rb"<script(?![^>]*\bsrc=)", body)
    assert not re.search(rb"(src|href)=\"(https?:)?//", body)
    for name, kind in [("app.js", "text/javascript"), ("style.css", "text/css")]:
        status, headers, _ = fetch(
            base, path=f"/static/{name}", headers={"Cookie": session}
        )
        assert status == 200 and headers["content-type"].startswith(kind)
    assert fetch(base, path="/static/../tap.py", headers={"Cookie": session})[0] == 404


def test_dashboard_rpc_reads_only(twistd, short_tmp):
    """
    Through the dashboard's POST /rpc the reading methods answer, while remove_node and
    explorer.call of vm.start are refused with -32010 and change nothing.
    """
    _, unix, _, url = start_explorer(twistd, short_tmp)
    result(
        unix,
        "explorer.heartbeat",
        {"node_id": "n1", "socket_path": f"unix://{short_tmp}/nobody.sock"},
    )
    cookie = login(url)
    assert ui_rpc(url, cookie, "explorer.info", {})["result"]["nodes"]["online"] == 1
    page = ui_rpc(url, cookie, "explorer.query_nodes", {"limit": 10})["result"]
    assert [n["node_id"] for n in page["nodes"]] == ["n1"]
    history = ui_rpc(url, cookie, "explorer.node_history", {"node_id": "n1"})["result"]
    assert history["node_id"] == "n1" and len(history["heartbeats"]) == 1
    for method, params in [
        ("explorer.remove_node", {"node_id": "n1"}),
        ("explorer.call", {"node_id": "n1", "method": "vm.start", "params": ["x"]}),
        ("explorer.call", {"node_id": "n1", "method": "vm.delete", "params": ["x"]}),
        ("explorer.heartbeat", {"node_id": "n2", "socket_path": "unix:///x.sock"}),
        ("explorer.create_token", {}),
    ]:
        error = ui_rpc(url, cookie, method, params)["error"]
        assert error["code"] == -32010, (method, error)
    assert [n["node_id"] for n in result(unix, "explorer.list_nodes")] == ["n1"]
    # A batch is checked call by call.
    status, _, data = fetch(
        url,
        "POST",
        "/rpc",
        json.dumps(
            [
                {"jsonrpc": "2.0", "id": 1, "method": "explorer.info"},
                {
                    "jsonrpc": "2.0",
                    "id": 2,
                    "method": "explorer.remove_node",
                    "params": {"node_id": "n1"},
                },
            ]
        ),
        page_headers(url, cookie),
    )
    answers = {a["id"]: a for a in json.loads(data)}
    assert "result" in answers[1] and answers[2]["error"]["code"] == -32010


def test_first_paint_without_javascript(twistd, short_tmp):
    """
    GET / writes the fleet's summary into the page itself (online and offline nodes,
    VMs, vCPU, memory and disk of the online ones), escaped: readable with JavaScript
    off, and a node named like a tag never becomes one.
    """
    _, unix, _, url = start_explorer(twistd, short_tmp)
    for i, name in enumerate(["<script>alert(1)</script>", '"><img src=x>', "plain"]):
        result(
            unix,
            "explorer.heartbeat",
            {
                "node_id": f"n{i}",
                "socket_path": f"unix://{short_tmp}/n{i}.sock",
                "name": name,
                "capacity": {"vcpus": 16, "memory_mb": 4096, "disk_gb": 100},
                "usage": {"vcpus": 3, "memory_mb": 1536, "disk_gb": 10},
                "vm_count": 2,
            },
        )
    result(unix, "explorer.leave", {"node_id": "n2"})
    cookie = login(url)
    status, headers, body = fetch(
        url.split("?", 1)[0], path="/", headers={"Cookie": cookie}
    )
    assert status == 200 and headers["content-type"].startswith("text/html")
    page = body.decode()
    for field, value in [
        ("s-online", "2"),
        ("s-offline", "1"),
        ("s-vms", "4"),
        ("s-vcpus", "6 of 32"),
        ("s-memory", "3.0 GiB of 8.0 GiB"),
        ("s-disk", "20 GB of 200 GB"),
    ]:
        assert re.search(rf'id="{field}">{re.escape(value)}<', page), (field, value)
    assert "<noscript>" in page
    # The page's own module script, and no other tag from a node's name.
    assert page.count("<script") == 1 and "<img" not in page and "alert(1)" not in page


def test_render_index_escapes():
    """Every value written into the page is HTML-escaped."""
    from hero_compute.explorer.dashboard import load_static, render_index

    totals = dict.fromkeys(("vcpus", "memory_mb", "disk_gb"), 0)
    page = render_index(
        load_static()["index.html"],
        {
            "nodes": {"online": "<b>1</b>", "offline": 0},
            "vms": "&",
            "capacity": totals,
            "usage": totals,
        },
    ).decode()
    assert 'id="s-online">&lt;b&gt;1&lt;/b&gt;<' in page and 'id="s-vms">&amp;<' in page
    assert 'id="s-memory">0 MiB of 0 MiB<' in page


def test_dashboard_refuses_a_huge_body(twistd, short_tmp):
    """A body over 1 MiB is not read: the connection is dropped, and the explorer lives."""
    _, unix, _, url = start_explorer(twistd, short_tmp)
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        conn.request("POST", "/rpc", body=b"x" * (2 << 20))
        conn.getresponse().read()
    conn.close()
    assert fetch(url)[0] == 302
    assert result(unix, "explorer.info")["nodes"] == {"online": 0, "offline": 0}


def test_rpc_listeners_do_not_serve_the_dashboard(twistd, short_tmp):
    """The JSON-RPC listeners (Unix and TCP) answer 404 or 405 for the dashboard's paths."""
    _, unix, tcp, url = start_explorer(twistd, short_tmp)
    token = url.split("token=", 1)[1]
    for uri in (unix, tcp):
        for path in ("/", f"/?token={token}", "/static/app.js", "/static/index.html"):
            status, headers, body = post(uri, None, path=path, method="GET")
            assert status in (404, 405), (uri, path, status)
            assert b"<html" not in body and "set-cookie" not in {k.lower() for k in headers}


def test_token_file(twistd, short_tmp):
    """With EXPLORER_UI_TOKEN_FILE the token is read from it and not logged."""
    token_file = f"{short_tmp}/token"
    with open(token_file, "w") as f:
        f.write("s3cret-token-of-the-operator\n")
    process, _, _, url = start_explorer(
        twistd, short_tmp, env={"EXPLORER_UI_TOKEN_FILE": token_file}
    )
    assert "s3cret" not in process.output and f"token in {token_file}" in process.output
    base = url.split("/?", 1)[0]
    assert fetch(base, path="/?token=s3cret-token-of-the-operator")[0] == 302


def test_short_token_file_is_a_startup_error(twistd, short_tmp):
    """A token file holding a guessable token stops the explorer at start, naming it."""
    token_file = f"{short_tmp}/token"
    with open(token_file, "w") as f:
        f.write("abc\n")
    process = twistd(
        ["explorer", "--socket", f"{short_tmp}/e.sock", "--ui", "127.0.0.1:0"],
        env={"EXPLORER_UI_TOKEN_FILE": token_file},
    )
    assert process.process.wait(15) != 0
    assert "shorter than 16" in process.output


# ---- in a real browser -------------------------------------------------------------


@pytest.fixture
def browser(tmp_path):
    """A headless Chromium driven by chromedriver, with a fresh profile."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs Debian's chromium and chromium-driver (make system-deps)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("needs selenium (requirements-test.txt)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,800",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="session")
def axe_source():
    """axe-core's ``axe.min.js``, installed with npm once; None when npm cannot get it."""
    path = os.path.join(AXE_DIR, "node_modules", "axe-core", "axe.min.js")
    if not os.path.exists(path) and shutil.which("npm"):
        os.makedirs(AXE_DIR, exist_ok=True)
        subprocess.run(
            [
                "npm",
                "install",
                "--no-audit",
                "--no-fund",
                "--prefix",
                AXE_DIR,
                f"axe-core@{AXE_VERSION}",
            ],
            capture_output=True,
            timeout=180,
            check=False,
        )
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def updates(driver):
    """How many updates the page has completed."""
    return int(driver.find_element("tag name", "body").get_attribute("data-updates") or 0)


def next_update(driver, timeout=10):
    """Wait for the page's next completed update (it polls every 2 s)."""
    seen = updates(driver)
    wait_for(lambda: updates(driver) > seen, timeout=timeout, what="a page update")


def rows(driver):
    """The node rows shown: ``{node_id: row text}``."""
    # One round trip, not two per row: 500 rows must not take seconds to read.
    return driver.execute_script(
        "return Object.fromEntries([...document.querySelectorAll("
        "'#nodes-body tr[data-node-id]')].map((r) => [r.dataset.nodeId, r.innerText]))"
    )


def sparkline_points(driver):
    """How many points the node page's heartbeat sparkline (an inline SVG) has."""
    return driver.execute_script(
        "const line = document.querySelector('#node-facts svg.sparkline polyline');"
        "return line ? line.points.numberOfItems : 0;"
    )


def axe(driver, source):
    """:return: axe-core's serious and critical violations on the page as shown"""
    driver.execute_script(source)
    found = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document).then((r) => done(r.violations), (e) => done(String(e)));"
    )
    assert isinstance(found, list), found
    print("axe:", [(v["id"], v["impact"]) for v in found])
    return [
        (v["id"], v["impact"], [n["target"] for n in v["nodes"]][:3])
        for v in found
        if v["impact"] in ("serious", "critical")
    ]


#: The heartbeat interval of a node the test stops and expects shown offline at once:
#: its goodbye is sent only if its last heartbeat succeeded, and each heartbeat is
#: bounded by the interval, which a loaded machine can exceed at 0.5 s (the node would
#: then stay online for the explorer's 30 s).
STOPPED_INTERVAL = "2"


def start_node(twistd, short_tmp, unix, node_id, env=None, interval="0.5"):
    """A real ``twistd node`` heartbeating every ``interval`` s to the explorer (``env``
    added to its environment)."""
    return twistd(
        [
            "node",
            "--socket",
            f"{short_tmp}/{node_id}.sock",
            "--explorer",
            unix,
            "--interval",
            interval,
            "--node-id",
            node_id,
            "--state-dir",
            f"{short_tmp}/{node_id}",
        ],
        env={"NODE_NAME": f"host-{node_id}", **(env or {})},
    )


def test_browser_fleet(twistd, short_tmp, browser, axe_source, tmp_path):
    """
    In Chromium: the token URL logs in; the fleet of real nodes shows; a node stopped
    turns offline within one update; the label filter narrows the table; a node's page
    lists its VMs and its explorers; the views are accessible by axe-core and fit a
    phone's width.
    """
    _, unix, _, url = start_explorer(twistd, short_tmp)
    nodes = {
        "alpha": start_node(twistd, short_tmp, unix, "alpha"),
        "beta": start_node(twistd, short_tmp, unix, "beta", interval=STOPPED_INTERVAL),
    }
    wait_for(
        lambda: len(result(unix, "explorer.list_nodes", {"status": "online"})) == 2,
        what="both nodes online",
    )
    vm = result(
        f"unix://{short_tmp}/alpha.sock",
        "vm.create",
        {"name": "web", "vcpus": 1, "memory_mb": 64, "disk_gb": 1},
        timeout=60,
    )
    for i, rack in enumerate(("r1", "r2", "r2")):
        result(
            unix,
            "explorer.heartbeat",
            {
                "node_id": f"sim-{i}",
                "socket_path": f"unix://{short_tmp}/sim-{i}.sock",
                "name": f"sim {i}",
                "capacity": {"vcpus": 16, "memory_mb": 65536, "disk_gb": 500},
                "usage": {"vcpus": 4 * i, "memory_mb": 8192 * i, "disk_gb": 100},
                "vm_count": i,
                "labels": {"rack": rack},
            },
        )

    # alpha's VM is in its heartbeats before the page is read: the summary counts 4.
    wait_for(
        lambda: result(unix, "explorer.get_node", {"node_id": "alpha"})["vm_count"] == 1,
        what="alpha's VM in its heartbeat",
    )
    browser.get(url)
    assert urllib.parse.urlsplit(browser.current_url).query == ""
    wait_for(lambda: len(rows(browser)) == 5, what="five nodes in the table")
    shown = rows(browser)
    assert "online" in shown["alpha"] and "host-alpha" in shown["alpha"]
    assert browser.find_element("id", "s-online").text == "5"
    wait_for(
        lambda: browser.find_element("id", "s-vms").text == "4", what="four VMs counted"
    )
    browser.save_screenshot(str(tmp_path / "fleet.png"))
    violations = {}
    if axe_source:
        violations["fleet"] = axe(browser, axe_source)

    # A node stops (it says goodbye): offline with its event (or the next poll).
    nodes["beta"].stop()
    wait_for(lambda: "offline" in rows(browser)["beta"], timeout=10, what="beta offline")
    assert browser.find_element("id", "s-offline").text == "1"
    row = browser.find_element("css selector", 'tr[data-node-id="beta"]')
    assert "offline" in row.get_attribute("class")

    # Filter by label (asked of the explorer), then by text (on the page).
    browser.find_element("id", "f-label").send_keys("rack=r2")
    wait_for(lambda: set(rows(browser)) == {"sim-1", "sim-2"}, what="the label filter")
    browser.find_element("id", "f-text").send_keys("sim 2")
    wait_for(lambda: set(rows(browser)) == {"sim-2"}, what="the text filter")
    browser.find_element("id", "f-text").clear()
    browser.find_element("id", "f-label").clear()
    browser.find_element("id", "f-label").send_keys("\b")
    wait_for(lambda: len(rows(browser)) == 5, what="the filters cleared")

    # Keyboard: tab to a node's link and follow it.
    link = browser.find_element("css selector", 'tr[data-node-id="alpha"] a')
    link.send_keys("\n")
    wait_for(lambda: "#/node/alpha" in browser.current_url, what="the node's page")
    wait_for(
        lambda: "ok" in browser.find_element("id", "explorers-body").text,
        what="the node's explorers",
    )
    wait_for(
        lambda: vm["vm_id"] in browser.find_element("id", "vms-body").text,
        what="the node's VM",
    )
    assert "stopped" in browser.find_element("id", "vms-body").text
    assert unix in browser.find_element("id", "explorers-body").text
    wait_for(lambda: sparkline_points(browser) >= 2, what="the node's heartbeat sparkline")
    browser.save_screenshot(str(tmp_path / "node.png"))
    if axe_source:
        violations["node"] = axe(browser, axe_source)

    # A node that heartbeated five times: four gaps, four points on its sparkline.
    for _ in range(4):
        result(
            unix,
            "explorer.heartbeat",
            {"node_id": "sim-0", "socket_path": f"unix://{short_tmp}/sim-0.sock"},
        )
    browser.get(url.split("?", 1)[0] + "#/node/sim-0")
    wait_for(lambda: sparkline_points(browser) == 4, what="four points on sim-0's line")
    # A node's labels and capacity (what VMs may reserve: NODE_CAPACITY, else the
    # host's).
    browser.get(url.split("?", 1)[0] + "#/node/sim-1")
    facts = wait_for(
        lambda: (
            (text := browser.find_element("id", "node-facts").text)
            and "rack=r2" in text
            and text
        ),
        what="sim-1's facts",
    )
    assert "16 vCPU, 64.0 GiB memory, 500 GB disk" in facts

    browser.get(url.split("?", 1)[0] + "#/")
    browser.set_window_size(390, 844)
    wait_for(lambda: len(rows(browser)) == 5, what="the table at phone width")
    width = browser.execute_script("return document.documentElement.scrollWidth")
    assert width <= 390, width
    browser.save_screenshot(str(tmp_path / "phone.png"))
    if axe_source:
        violations["phone"] = axe(browser, axe_source)
    browser.set_window_size(1280, 800)
    if os.environ.get("HERO_UI_SCREENSHOT"):
        browser.get(url.split("?", 1)[0] + "#/")
        wait_for(lambda: updates(browser) > 0, what="the page shown")
        browser.save_screenshot(os.environ["HERO_UI_SCREENSHOT"])
    print("screenshots in", tmp_path, "axe serious/critical:", violations)
    if axe_source is None:
        pytest.skip("axe-core could not be installed with npm: accessibility not checked")
    assert violations == {"fleet": [], "node": [], "phone": []}, violations


def test_browser_pages_through_5000_nodes(twistd, short_tmp, browser, tmp_path):
    """
    5,000 simulated nodes page through query_nodes, pages shown in under 200 ms (18 of 20).
    """
    # Simulated nodes heartbeat once: they must stay online for the whole test.
    _, unix, _, url = start_explorer(
        twistd, short_tmp, env={"HERO_MAX_BATCH": "1000"}, args=["--offline-after", "600"]
    )
    started = time.monotonic()
    sock = unix[len("unix://") :]
    from .support import UnixHTTPConnection

    conn = UnixHTTPConnection(sock, timeout=60)
    for start in range(0, 5000, 1000):
        batch = [
            {
                "jsonrpc": "2.0",
                "id": i,
                "method": "explorer.heartbeat",
                "params": {
                    "node_id": f"sim-{i:05d}",
                    "socket_path": f"unix://{short_tmp}/sim.sock",
                    "name": f"sim {i}",
                    "capacity": {"vcpus": 32, "memory_mb": 131072, "disk_gb": 1000},
                    "usage": {"vcpus": i % 33, "memory_mb": 1024 * (i % 128), "disk_gb": 7},
                    "vm_count": i % 5,
                    "labels": {"rack": f"r{i % 10}", "zone": "z1"},
                },
            }
            for i in range(start, start + 1000)
        ]
        status, _, data = post(conn, batch)
        assert status == 200 and all("result" in a for a in json.loads(data))
    conn.close()
    assert result(unix, "explorer.info")["nodes"]["online"] == 5000
    print(f"5000 heartbeats in {time.monotonic() - started:.1f} s")

    browser.get(url)
    wait_for(lambda: len(rows(browser)) == 50, what="the first page")
    wait_for(lambda: browser.find_element("id", "s-online").text == "5000", what="summary")
    times = []
    seen = set(rows(browser))
    for _ in range(20):
        before = browser.find_element("id", "page-info").text
        browser.execute_script("document.body.dataset.actionMs = ''")
        browser.find_element("id", "next").click()
        wait_for(
            lambda: browser.find_element("tag name", "body").get_attribute(
                "data-action-ms"
            ),
            what="the next page",
        )
        times.append(
            float(browser.find_element("tag name", "body").get_attribute("data-action-ms"))
        )
        page = set(rows(browser))
        assert len(page) == 50 and not page & seen, before
        seen |= page
    browser.save_screenshot(str(tmp_path / "5000.png"))
    times.sort()
    print(f"page times (ms): median {times[len(times) // 2]:.1f} worst {times[-1]:.1f}")
    # All but the two slowest of 20: a page is the claim, a neighbour's burst of CPU on
    # a shared CI machine is not.
    assert times[-3] < 200, times
    # A label filter pages through the explorer too.
    select = browser.find_element("id", "f-label")
    select.send_keys("rack=r3")
    wait_for(
        lambda: rows(browser) and all(n.endswith("3") for n in rows(browser)),
        what="rack r3 only",
    )
    assert rpc(unix, "explorer.info")["result"]["nodes"]["online"] == 5000
    print(f"the whole test in {time.monotonic() - started:.1f} s")


def test_ui_options():
    """--ui and EXPLORER_UI_ADDR name the listener, the command line first; unset, none."""
    from hero_compute.explorer.tap import Options

    def parse(args, env):
        options = Options(env={"HOME": "/nonexistent", **env})
        options.parseOptions(args)
        return options["ui"]

    assert parse([], {}) is None
    assert parse([], {"EXPLORER_UI_ADDR": "127.0.0.1:9200"}) == (
        parse(["--ui", "127.0.0.1:9200"], {})
    )
    assert (
        parse(["--ui", "127.0.0.1:9201"], {"EXPLORER_UI_ADDR": "127.0.0.1:9200"}).port
        == 9201
    )


def test_ui_bind_failure_aborts_start(twistd, short_tmp):
    """A dashboard address already taken stops the explorer with a non-zero exit."""
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        process = twistd(
            ["explorer", "--socket", f"{short_tmp}/e.sock", "--ui", f"127.0.0.1:{port}"]
        )
        assert process.process.wait(15) != 0
    finally:
        taken.close()
