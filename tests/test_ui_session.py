"""
A dashboard session's end, from the attacker's side (CONTRACT §11): a revoked or expired
user's open console and event stream are cut at once; one user's logins (the start-up
token's) never log another user out; the start-up token's user name is not for anyone.
"""

import json
import os
import socket
import threading
import time

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Request,
    TextMessage,
)

from .support import result, rpc
from .test_ui import KEYS, fetch, login, start_explorer
from .test_ui_console import status, upgrade
from .test_ui_operator import make_login
from .test_ui_store import dirs  # noqa: F401  (a fixture)

NODE = "n1"


class StandInConsole:
    """
    The node's side of a console (CONTRACT §8) on a Unix socket served by the test: it
    accepts ``/v1/vms/<vm>/console`` and answers every message with ``echo:`` + it;
    ``received`` holds what reached it, as the VM's serial port would.
    """

    def __init__(self, path):
        self.path = path
        self.received = []
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(path)
        self._server.listen(8)
        self._server.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn):
        ws = WSConnection(ConnectionType.SERVER)
        conn.settimeout(0.2)
        with conn:
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, Request):
                        conn.sendall(ws.send(AcceptConnection()))
                    elif isinstance(event, BytesMessage | TextMessage):
                        data = (
                            bytes(event.data, "utf-8")
                            if isinstance(event.data, str)
                            else bytes(event.data)
                        )
                        self.received.append(data)
                        conn.sendall(ws.send(BytesMessage(data=b"echo:" + data)))
                    elif isinstance(event, CloseConnection):
                        return

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self._server.close()


class Client:
    """A browser's WebSocket through the dashboard, opened with a session's cookie."""

    def __init__(self, url, cookie, path, **headers):
        host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.sock.sendall(upgrade(url, cookie, path=path, **headers))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(65536)
            assert chunk, head
            head += chunk
        self.head, self.rest = head.split(b"\r\n\r\n", 1)
        self.status = status(self.head)

    def send(self, data):
        """One masked binary frame, as a browser sends it (``data`` under 126 bytes)."""
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        self.sock.sendall(bytes([0x82, 0x80 | len(data)]) + mask + masked)

    def read_until(self, wanted, timeout=10):
        """What arrives until ``wanted`` is in it (or ``timeout``); b'' once closed."""
        got = self.rest
        self.rest = b""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.2)
        while wanted not in got and time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                break
            got += chunk
        return got

    def closed_within(self, seconds):
        """Whether the dashboard closes this connection within ``seconds``."""
        deadline = time.monotonic() + seconds
        self.sock.settimeout(0.2)
        while time.monotonic() < deadline:
            try:
                if self.sock.recv(65536) == b"":
                    return True
            except TimeoutError:
                continue
            except ConnectionResetError:
                return True
        return False


def console_setup(twistd, short_tmp):
    """A real explorer with its dashboard, and a stand-in node console for VM vm1."""
    _, unix, _, startup = start_explorer(twistd, short_tmp)
    node = StandInConsole(f"{short_tmp}/node.sock")
    result(
        unix,
        "explorer.heartbeat",
        {"node_id": NODE, "socket_path": f"unix://{node.path}"},
    )
    return unix, startup, node


def console_path():
    """The console's path through the dashboard."""
    return f"/v1/nodes/{NODE}/vms/vm1/console"


def never_reaches_the_vm(console, node, received):
    """What the cut console types now never reaches the VM: ``node.received`` stays."""
    try:
        console.send(b"after")
    except OSError:
        pass
    # fixed wait: nothing to wait on; a relayed message arrives within milliseconds.
    time.sleep(0.5)
    assert node.received == received, node.received


def test_revoked_operator_console_and_events_cut(twistd, short_tmp):
    """
    An operator with a console and the event stream open through the dashboard is
    revoked: both connections are closed at once, and what they type afterwards never
    reaches the VM (old code: the console kept relaying, the stream kept delivering).
    """
    unix, startup, node = console_setup(twistd, short_tmp)
    try:
        cookie = login(make_login(unix, "mallory", "operator"))
        console = Client(startup, cookie, console_path())
        events = Client(startup, cookie, "/v1/events")
        assert (console.status, events.status) == (101, 101), (console.head, events.head)
        console.send(b"before")
        assert b"echo:before" in console.read_until(b"echo:before")
        revoked = result(unix, "explorer.ui_token_revoke", {"user": "mallory"})
        assert revoked["sessions"] == 1, revoked
        assert console.closed_within(3) and events.closed_within(3)
        never_reaches_the_vm(console, node, [b"before"])
        assert fetch(startup, path="/", headers={"Cookie": cookie})[0] == 401
        # A new console with the old cookie is refused: nothing reopens it.
        again = Client(startup, cookie.replace("Cookie: ", ""), console_path())
        assert again.status == 401
        assert node.received == [b"before"]
    finally:
        node.close()


def test_expired_session_console_cut(twistd, short_tmp):
    """
    A session whose login token lived 3 s: its open console is closed when it expires,
    with no request made meanwhile, and nothing typed later reaches the VM (old code:
    the console lived on).
    """
    unix, startup, node = console_setup(twistd, short_tmp)
    try:
        cookie = login(make_login(unix, "shorty", "operator", ttl="3s"))
        console = Client(startup, cookie, console_path())
        events = Client(startup, cookie, "/v1/events")
        assert (console.status, events.status) == (101, 101)
        console.send(b"early")
        assert b"echo:early" in console.read_until(b"echo:early")
        assert not console.closed_within(1)
        assert console.closed_within(5) and events.closed_within(2)
        never_reaches_the_vm(console, node, [b"early"])
    finally:
        node.close()


def test_other_users_console_survives_a_revocation(twistd, short_tmp):
    """Revoking one user leaves another operator's open console working."""
    unix, startup, node = console_setup(twistd, short_tmp)
    try:
        kept = Client(startup, login(make_login(unix, "olga", "operator")), console_path())
        gone = Client(
            startup, login(make_login(unix, "mallory", "operator")), console_path()
        )
        assert (kept.status, gone.status) == (101, 101)
        result(unix, "explorer.ui_token_revoke", {"user": "mallory"})
        assert gone.closed_within(3)
        kept.send(b"still")
        assert b"echo:still" in kept.read_until(b"echo:still")
    finally:
        node.close()


def test_viewer_logins_never_evict_an_operator(twistd, short_tmp):
    """
    The start-up token (a reusable viewer credential) redeemed 1,001 times: the
    operator's session still answers 200 and its console stays open; only the start-up
    token's own oldest sessions end (old code: the operator was logged out).
    """
    unix, startup, node = console_setup(twistd, short_tmp)
    try:
        operator = login(make_login(unix, "alice", "operator"))
        console = Client(startup, operator, console_path())
        assert console.status == 101
        first = login(startup)
        for _ in range(1001):
            login(startup)
        assert fetch(startup, path="/", headers={"Cookie": operator})[0] == 200
        assert fetch(startup, path="/", headers={"Cookie": first})[0] == 401
        console.send(b"alive")
        assert b"echo:alive" in console.read_until(b"echo:alive")
        sessions = result(unix, "explorer.ui_token_list")["sessions"]
        assert [s["user"] for s in sessions].count("alice") == 1
        assert [s["user"] for s in sessions].count("startup-token") <= 100
    finally:
        node.close()


@pytest.mark.parametrize("user", ["startup-token"])
def test_reserved_user_name(twistd, short_tmp, user):
    """``ui token create --user startup-token`` is -32602 naming ``user``, and no token
    is made (old code: made, and its writes audited as the start-up token's)."""
    _, unix, _, _ = start_explorer(twistd, short_tmp)
    answer = rpc(unix, "explorer.ui_token_create", {"user": user, "role": "operator"})
    assert answer["error"]["code"] == -32602, answer
    assert "user" in answer["error"]["message"], answer
    assert result(unix, "explorer.ui_token_list")["tokens"] == []


def test_the_per_user_cap_holds_at_one():
    """
    With one session a user, every login ends that user's previous one and the user's
    table keeps the new one, so a revoke finds and ends it (a later login once went into
    a table nothing held: the cap skipped every second login, revoke counted 0).
    """
    from twisted.internet.task import Clock

    from hero_compute.explorer.ui_accounts import UiAccounts
    from hero_compute.explorer.ui_users import DashboardUser
    from hero_compute.rpc.authz import UI_OPERATOR

    accounts = UiAccounts(Clock(), per_user=1)
    user = DashboardUser(UI_OPERATOR, "alice")
    sids = [accounts.new_session(user)[0] for _ in range(6)]
    assert [sid for sid in sids if accounts.session(sid) is not None] == sids[-1:]
    assert len(accounts) == 1


def test_the_sweep_survives_a_failing_look(logged_errors):
    """
    The once-a-second sweep for revocations at other explorers logs a look that fails
    and goes on: a session revoked elsewhere afterwards is still cut (stopped, the sweep
    would have left every such session's sockets open).
    """
    from twisted.internet.task import Clock

    from hero_compute.explorer.ui_live import SWEEP_INTERVAL, LiveSockets

    clock, cut, revoked, looks = Clock(), [], set(), []

    def ended(sid):
        looks.append(sid)
        if len(looks) == 1:
            raise RuntimeError("the mirror is being replaced")
        return sid in revoked

    live = LiveSockets(clock, ended, lambda sid: live.cut(sid))
    live.hold("s1", None, lambda: cut.append("s1"))
    clock.advance(SWEEP_INTERVAL)
    revoked.add("s1")
    clock.advance(SWEEP_INTERVAL)
    assert cut == ["s1"] and len(looks) == 2
    assert clock.getDelayedCalls() == []
    assert logged_errors.flush(RuntimeError)


def test_accounts_hold_unit():
    """
    Without a reactor: a held WebSocket is aborted when its session is revoked, expires
    (by the clock alone) or is found revoked in the store's mirror (another explorer);
    a released one is not; the sweep stops when nothing is held.
    """
    from twisted.internet.task import Clock

    from hero_compute.explorer.ui_accounts import UiAccounts
    from hero_compute.explorer.ui_users import DashboardUser
    from hero_compute.rpc.authz import UI_OPERATOR

    class Mirror:
        revoked = set()

        def ui_token_revoked(self, user, token_hash):
            return (user, token_hash) in self.revoked

        def revoke_ui_user(self, user, now):
            return 0

    clock = Clock()
    clock.advance(1000)
    mirror = Mirror()
    accounts = UiAccounts(clock, lambda: mirror)
    cut = []
    user = DashboardUser(UI_OPERATOR, "ann")
    _, timed = accounts.new_session(user, expires_at=1010, token_hash="a")
    _, other = accounts.new_session(user, expires_at=None, token_hash="b")
    accounts.hold(timed, lambda: cut.append("timed"))
    release = accounts.hold(other, lambda: cut.append("released"))
    release()
    accounts.hold(other, lambda: cut.append("other"))
    clock.advance(9)
    assert cut == []
    clock.advance(1)
    assert cut == ["timed"] and accounts.session(timed.sid) is None
    mirror.revoked.add(("ann", "b"))
    clock.advance(1)
    assert cut == ["timed", "other"] and accounts.session(other.sid) is None
    assert clock.getDelayedCalls() == []
    _, third = accounts.new_session(user, token_hash="c")
    accounts.hold(third, lambda: cut.append("third"))
    accounts.revoke("ann")
    assert cut[-1] == "third" and clock.getDelayedCalls() == []


def test_revocation_at_another_explorer_cuts_console(twistd, pg_server, dirs):  # noqa: F811
    """
    Two explorers on one PostgreSQL database: an operator with a console and the event
    stream open at B's dashboard is revoked at A; B closes both within 3 s, and what is
    typed afterwards never reaches the VM (old code: B kept relaying).
    """
    env = {"EXPLORER_DATABASE": pg_server.new_database()}
    _, unix_a, _, _ = start_explorer(twistd, dirs(), env=env)
    here = dirs()
    _, unix_b, _, ui_b = start_explorer(twistd, here, env=env)
    node = StandInConsole(f"{here}/node.sock")
    try:
        result(
            unix_b,
            "explorer.heartbeat",
            {"node_id": NODE, "socket_path": f"unix://{node.path}"},
        )
        url = make_login(unix_a, "mallory", "operator")
        cookie = login(ui_b.split("/?", 1)[0] + "/?" + url.split("?", 1)[1])
        console = Client(ui_b, cookie, console_path())
        events = Client(ui_b, cookie, "/v1/events")
        assert (console.status, events.status) == (101, 101)
        console.send(b"before")
        assert b"echo:before" in console.read_until(b"echo:before")
        result(unix_a, "explorer.ui_token_revoke", {"user": "mallory"})
        assert console.closed_within(3) and events.closed_within(1)
        never_reaches_the_vm(console, node, [b"before"])
    finally:
        node.close()


def test_cookie_alone_gets_no_call_and_no_socket(twistd, short_tmp):
    """
    The session cookie reaches every port of the host (RFC 6265 §8.5).  With the
    operator's cookie alone and a forged ``Origin``, outside a browser: the page holds
    no CSRF token, ``POST /rpc`` (a read and a write) is 403, the console and the event
    stream are 403; nothing reaches the node and nothing is audited.  With the key the
    login redirect handed the page, the same calls work (old code: the page gave the
    token, and the write ran as the operator).
    """
    unix, startup, node = console_setup(twistd, short_tmp)
    try:
        url = make_login(unix, "alice", "operator")
        status_, headers, _ = fetch(url)
        assert status_ == 302
        port = startup.split("//", 1)[1].split("/", 1)[0].split(":")[1]
        name, sid = headers["set-cookie"].split(";", 1)[0].split("=", 1)
        assert name == f"hero_ui_{port}", name
        key = headers["location"][len("/#k=") :]
        stolen = f"{name}={sid}"
        base = startup.split("/?", 1)[0]
        page = fetch(base, path="/", headers={"Cookie": stolen})
        assert page[0] == 200 and key.encode() not in page[2]
        assert b'<meta name="csrf-token" content="">' in page[2]
        write = json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "explorer.call",
                "params": {
                    "node_id": NODE,
                    "method": "vm.delete",
                    "params": {"vm_id": "v"},
                },
            }
        )
        forged = {
            "Cookie": stolen,
            "Origin": base,
            "Host": base.split("//", 1)[1],
            "Content-Type": "application/json",
        }
        for guess in (None, "", sid):
            sent = forged if guess is None else {**forged, "X-CSRF-Token": guess}
            assert fetch(base, "POST", "/rpc", write, sent)[0] == 403
        for path in (console_path(), "/v1/events"):
            for protocol in (None, "hero-ui", f"hero-ui, k.{sid}", f"k.{key}"):
                refused = Client(
                    startup, stolen, path, **{"Sec-WebSocket-Protocol": protocol}
                )
                assert refused.status == 403, (path, protocol, refused.head)
        # fixed wait: nothing to wait on; a relayed message arrives within milliseconds.
        time.sleep(0.5)
        assert node.received == []
        entries = result(unix, "explorer.audit", {})["entries"]
        assert not [e for e in entries if e["caller"] == "dashboard:alice"], entries
        # The page's own calls, with the key it was handed, still work.
        read = json.dumps({"jsonrpc": "2.0", "id": 2, "method": "explorer.list_nodes"})
        answer = fetch(base, "POST", "/rpc", read, {**forged, "X-CSRF-Token": key})
        assert answer[0] == 200 and "result" in json.loads(answer[2]), answer
        KEYS[stolen] = key
        console = Client(startup, stolen, console_path())
        assert console.status == 101 and b"Sec-WebSocket-Protocol: hero-ui" in console.head
        console.send(b"owner")
        assert b"echo:owner" in console.read_until(b"echo:owner")
    finally:
        node.close()


def test_two_dashboards_on_one_host_keep_their_cookies(twistd, dirs):  # noqa: F811
    """Two explorers' dashboards on 127.0.0.1 name their cookies by port: a browser
    holds both sessions at once, neither overwrites the other (old code: both
    ``hero_ui``)."""
    _, _, _, one = start_explorer(twistd, dirs())
    _, _, _, two = start_explorer(twistd, dirs())
    first, second = login(one), login(two)
    assert first.split("=", 1)[0] != second.split("=", 1)[0]
    both = f"{first}; {second}"
    for url, cookie in ((one, first), (two, second)):
        base = url.split("/?", 1)[0]
        assert fetch(base, path="/", headers={"Cookie": both})[0] == 200
        read = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "explorer.list_nodes"})
        headers = {
            "Cookie": both,
            "Origin": base,
            "Content-Type": "application/json",
            "X-CSRF-Token": KEYS[cookie],
        }
        assert fetch(base, "POST", "/rpc", read, headers)[0] == 200
