"""
Test helpers: a plain HTTP client for Unix and TCP (deliberately not our own client),
real twistd processes, bounded waiting, short temporary directories, and trial's
checks of fired Deferreds.
"""

import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

from twisted.trial.unittest import SynchronousTestCase

from hero_compute.rpc.addresses import parse_address

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_trial = SynchronousTestCase()

#: ``success_result_of(d)``: the result of a Deferred that has fired; fails the test
#: (with the failure's traceback) if it has not fired or has failed.  Trial's own.
success_result_of = _trial.successResultOf

#: ``failure_result_of(d, *types)``: the :class:`Failure` of a Deferred that has
#: failed with one of ``types``; fails the test otherwise.  Trial's own.
failure_result_of = _trial.failureResultOf


def make_short_tmp(prefix="hc-"):
    """
    A new short temporary directory under /tmp: Unix socket paths are limited to 107
    bytes, which pytest's own ``tmp_path`` can exceed.  The caller removes it
    (:func:`remove_tmp`).

    :return: its path
    """
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def remove_tmp(path):
    """Remove a temporary directory and everything in it."""
    shutil.rmtree(path, ignore_errors=True)


class UnixHTTPConnection(http.client.HTTPConnection):
    """An ``http.client`` connection over a Unix socket."""

    def __init__(self, path, timeout=10):
        http.client.HTTPConnection.__init__(self, "localhost", timeout=timeout)
        self._path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def connect(uri, timeout=10):
    """
    A plain ``http.client`` connection to an address URI.

    :param uri: ``unix:///...``, ``/path`` or ``tcp://host:port``
    """
    address = parse_address(uri)
    if address.is_unix:
        return UnixHTTPConnection(address.path, timeout)
    return http.client.HTTPConnection(address.host, address.port, timeout=timeout)


def tls_connect(uri, ca, cert=None, key=None, timeout=10):
    """
    A plain ``http.client`` connection over TLS to a ``tls://`` URI, verifying the peer
    against the fleet CA (not its host name: fleet peers are named by SPIFFE URIs).

    :param ca: the fleet CA file
    :param cert: our certificate file, or None to present none
    :param key: its key file
    """
    address = parse_address(uri)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(ca)
    if cert is not None:
        context.load_cert_chain(cert, key)
    return http.client.HTTPSConnection(
        address.host, address.port, timeout=timeout, context=context
    )


def rpc_over(conn, method, params=None):
    """
    One JSON-RPC call on an open connection (e.g. from :func:`tls_connect`).

    :return: the whole response object
    """
    message = {"jsonrpc": "2.0", "method": method, "id": 1}
    if params is not None:
        message["params"] = params
    status, _, data = post(conn, message)
    assert status == 200, (status, data)
    return json.loads(data)


def post(uri_or_conn, body, path="/rpc", method="POST", headers=None):
    """
    Send one HTTP request; the body is sent as given (bytes or str), or JSON-encoded.

    :return: ``(status, headers, body bytes)``
    """
    conn = connect(uri_or_conn) if isinstance(uri_or_conn, str) else uri_or_conn
    if not isinstance(body, (bytes, str)) and body is not None:
        body = json.dumps(body)
    conn.request(
        method,
        path,
        body=body,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    response = conn.getresponse()
    data = response.read()
    if isinstance(uri_or_conn, str):
        conn.close()
    return response.status, dict(response.getheaders()), data


def rpc(uri, method, params=None, timeout=10):
    """
    One JSON-RPC call with a plain HTTP client.

    :return: the whole response object
    """
    message = {"jsonrpc": "2.0", "method": method, "id": 1}
    if params is not None:
        message["params"] = params
    conn = connect(uri, timeout)
    try:
        status, _, data = post(conn, message)
    finally:
        conn.close()
    assert status == 200, (status, data)
    return json.loads(data)


def result(uri, method, params=None, timeout=10):
    """One JSON-RPC call that must succeed; returns its result."""
    response = rpc(uri, method, params, timeout)
    assert "result" in response, response
    return response["result"]


def wait_for(predicate, timeout=10.0, interval=0.05, what="condition"):
    """
    Poll until ``predicate()`` is truthy; returns its value.

    :raise AssertionError: after ``timeout`` seconds
    """
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # the peer may not be up yet
            last_error = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} ({last_error!r})")


def past(unix_time):
    """
    Return once the wall clock is past ``unix_time`` (a token's ``expires_at``, say).

    A real process's ttl ends on its real clock and nothing marks the moment, so this is
    the suite's one wait for a ttl: measured from the process's own time stamp, not a
    guess of how long has gone by since.
    """
    # fixed wait: a ttl on a real process's clock; no event marks its end
    time.sleep(max(0.0, unix_time - time.time() + 0.05))


def bio_handshake(sock, context):
    """
    A client TLS handshake over a connected raw socket through memory BIOs, so that the
    test then decides what goes on the wire and when (records split, trickled, cut).

    :param context: the client ``ssl.SSLContext``
    :return: ``(SSLObject, incoming, outgoing)``, the handshake's last flight sent
    :raise ConnectionError: the peer closed during the handshake
    """
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            got = sock.recv(65536)
            if not got:  # cut off (a starved machine): fail, never spin
                raise ConnectionError("closed during the handshake") from None
            incoming.write(got)
    sock.sendall(outgoing.read())
    return tls, incoming, outgoing


async def until(predicate, timeout=10.0, interval=0.005, what="condition"):
    """
    In the reactor: let it turn until ``predicate()`` is truthy; returns its value.
    A wait on a condition, not on the clock: the interval only spaces the looks.

    :raise AssertionError: after ``timeout`` seconds
    """
    from twisted.internet import reactor, task

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await task.deferLater(reactor, interval, lambda: None)


class Twistd:
    """
    A real ``twistd -n`` process, its output collected line by line.

    :param args: the arguments after ``twistd -n --pidfile=``
    :param env: extra environment
    :param netns: run inside this network namespace (``ip netns exec``)
    :param prefix: a command line to run twistd under, which must exec it (``prlimit``)

    Unless ``env`` names a ``HOME``, the process gets a fresh one of its own, removed
    when it is stopped: the default state directories live under it, and no test may
    share state with another, or with the machine's user, by accident.
    """

    def __init__(self, args, env=None, netns=None, cwd=None, prefix=None):
        full_env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("EXPLORER_", "NODE_", "HERO_", "HEARTBEAT_"))
        }
        full_env["PYTHONPATH"] = ROOT
        self._home = None
        if "HOME" not in (env or {}):
            self._home = full_env["HOME"] = tempfile.mkdtemp(prefix="hc-home-")
        full_env.update(env or {})
        command = [TWISTD, "-n", "--pidfile=", *args]
        if netns:
            command = ["ip", "netns", "exec", netns, *command]
        if prefix:
            # A command that execs the rest in its own process (prlimit, unshare), so
            # that the pid stays twistd's.
            command = [*prefix, *command]
        self.args = args
        self.lines = []
        self._cond = threading.Condition()
        self.process = subprocess.Popen(
            command,
            env=full_env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._drained = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self):
        """
        All output so far; once the process has ended, all it wrote: ``wait`` returns
        when it exits, while the reader thread may still be taking its last lines off
        the pipe, and a check of them made at once would then miss them.
        """
        if self.process.poll() is not None and not self._drained:
            # Its end of the pipe is closed; the rest is ours at once (bounded, and
            # waited for once, in case a child of it holds a copy of the pipe).
            self._reader.join(5)
            self._drained = True
        with self._cond:
            return "\n".join(self.lines)

    def wait_for_line(self, pattern, timeout=15.0, count=1):
        """
        Wait until ``count`` lines match the regex ``pattern``.

        :return: the list of matches
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                matches = [m for m in map(regex.search, self.lines) if m]
                if len(matches) >= count:
                    return matches
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (
                    self.process.poll() is not None and not self.process.stdout.readable()
                ):
                    break
                self._cond.wait(min(remaining, 0.2))
        # Outside the lock: reading the whole output may wait for the reader thread.
        raise AssertionError(
            f"no line matching {pattern!r} after {timeout}s in:\n{self.output}"
        )

    def listening(self, count=1, timeout=15.0):
        """
        Wait for ``count`` ``listening on`` lines.

        :return: the URIs, in order
        """
        return [
            m.group(1) for m in self.wait_for_line(r"listening on (\S+)", timeout, count)
        ]

    def tcp_uri(self):
        """The first TCP URI this process listens on."""
        return next(u for u in self.listening(count=2) if u.startswith("tcp://"))

    def signal(self, signum):
        """Send a signal to the process."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signum)

    def stop(self, timeout=10.0):
        """SIGTERM, wait, SIGKILL if needed; returns the exit code."""
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.process.wait(5)
        if self._home is not None:
            shutil.rmtree(self._home, ignore_errors=True)
            self._home = None
        return self.process.returncode

    def kill(self):
        """SIGKILL: no goodbye, no cleanup."""
        self.signal(signal.SIGKILL)
        self.process.wait(5)


def rss_kb(pid):
    """:return: the resident set size of process ``pid``, in KiB"""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def open_fds(pid):
    """:return: how many file descriptors process ``pid`` has open"""
    return len(os.listdir(f"/proc/{pid}/fd"))


#: The longest a well-behaved caller may wait while a process is under attack, in tests
#: whose claim is that it is *served* meanwhile, not how fast: a caller starved of the
#: reactor or of a descriptor waits out its 5 s socket timeout, an error that fails
#: :meth:`Prober.check` all the same, while one call slowed by a loaded machine does
#: not (100 ms was missed at a load average of 9: 111 ms and 418 ms, the test process's
#: own threads as much as the explorer).
SERVED = 1.0


class Prober:
    """
    A well-behaved client in a thread: calls ``method`` on ``uri`` over and over, each
    on a new connection, and records every latency (seconds), to show that a process
    under attack keeps serving everyone else.  Use as a context manager.
    """

    def __init__(self, uri, method="explorer.info", interval=0.005):
        self.uri = uri
        self.method = method
        self.interval = interval
        self.latencies = []
        self.errors = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                result(self.uri, self.method, timeout=5)
            except Exception as e:
                self.errors.append(repr(e))
            self.latencies.append(time.monotonic() - started)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join(10)

    @property
    def worst(self):
        """The longest latency seen (seconds)."""
        return max(self.latencies)

    def check(self, bound, at_least=5):
        """
        Assert every call succeeded, at least ``at_least`` were made, and none took
        ``bound`` seconds or more.

        :return: the worst latency
        """
        assert not self.errors, self.errors[:5]
        assert len(self.latencies) >= at_least, self.latencies
        assert self.worst < bound, (
            f"worst latency {self.worst * 1000:.0f} ms over {len(self.latencies)} "
            f"calls (bound {bound * 1000:.0f} ms)"
        )
        return self.worst


def start_tls_explorer(twistd, short_tmp, material, signing=True, **env):
    """
    A real explorer on Unix, plain TCP and mutual TLS (loopback), the one recipe the
    trust, audit and attack tests share.

    :param twistd: the ``twistd`` fixture
    :param material: a fleet dict: ``"explorer/e1"`` (cert, key), ``"ca"``, ``"ca_key"``
    :param signing: give it the CA key, so that it enrolls and renews
    :param env: more variables (limits, timings)
    :return: the process, with ``.unix``, ``.tcp``, ``.tls`` and ``.env``
    """
    cert, key = material["explorer/e1"]
    env = {
        "HERO_SOCKET_DIR": short_tmp,
        "EXPLORER_STATE_DIR": f"{short_tmp}/state",
        "EXPLORER_TCP_ADDR": "127.0.0.1:0",
        "EXPLORER_TLS_ADDR": "127.0.0.1:0",
        "EXPLORER_TLS_CERT": cert,
        "EXPLORER_TLS_KEY": key,
        "EXPLORER_TLS_CA": material["ca"],
        **({"EXPLORER_CA_KEY": material["ca_key"]} if signing else {}),
        **env,
    }
    process = twistd(["explorer"], env=env)
    uris = process.listening(count=3)
    process.unix = next(u for u in uris if u.startswith("unix://"))
    process.tcp = next(u for u in uris if u.startswith("tcp://"))
    process.tls = next(u for u in uris if u.startswith("tls://"))
    process.env = env
    return process
