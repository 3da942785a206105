"""
The CONTRACT §7 connection limits on the mutual-TLS listeners (issue 17, item 5), from
the attacker's side, against real ``twistd`` processes: the explorer's TLS listener, a
node's, and the explorer's dashboard over TLS.  A peer that opens TCP connections to
the TLS port and never starts the handshake, or stalls inside its ClientHello, is cut
off at ``HERO_HEAD_TIMEOUT``; one address holds at most ``HERO_MAX_CONNS_PER_ADDR`` of
them; and however many there are, ``HERO_FD_RESERVE`` descriptors stay free for the
Unix socket, which keeps answering.
"""

import socket
import ssl
import time

import pytest

from hero_compute import pki

from .support import Twistd, open_fds, rpc, wait_for

KINDS = ["explorer", "node", "dashboard"]

#: The first five bytes of a TLS ClientHello: a record header announcing 512 bytes that
#: never come.
HELLO_START = b"\x16\x03\x01\x02\x00"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A fleet CA, an explorer certificate, a node's (n1) and a client's, for 127.0.0.1."""
    base = tmp_path_factory.mktemp("hostile-tls")
    pki.create_ca(str(base / "ca"))
    out = {"ca": str(base / "ca" / "ca.pem")}
    for role, name in (("explorer", "e1"), ("node", "n1"), ("client", "ops")):
        out[role] = pki.create_cert(
            str(base / "ca"), role, name, ips=["127.0.0.1"], out=str(base / role)
        )
    return out


@pytest.fixture
def server(short_tmp, certs):
    """
    ``server(kind, prefix=None, **variables)``: a real process with a TLS listener on
    127.0.0.1 (``explorer``: EXPLORER_TLS_ADDR; ``node``: NODE_TLS_ADDR; ``dashboard``:
    the explorer's dashboard with EXPLORER_UI_TLS); ``.port`` is that listener's,
    ``.unix`` its Unix socket URI and ``.pid`` twistd's.  All are stopped at the end.
    """
    started = []

    def start(kind, prefix=None, **variables):
        n = len(started)
        sock = f"{short_tmp}/{kind}{n}.sock"
        cert, key = certs["node" if kind == "node" else "explorer"]
        env = {name: str(value) for name, value in variables.items()}
        if kind == "node":
            args = ["node", "--socket", sock]
            env.update(
                HERO_STATE_DIR=f"{short_tmp}/state{n}",
                HERO_SOCKET_DIR=f"{short_tmp}/s{n}",
                NODE_ID="n1",
                NODE_TLS_ADDR="127.0.0.1:0",
                NODE_TLS_CERT=cert,
                NODE_TLS_KEY=key,
                NODE_TLS_CA=certs["ca"],
            )
        else:
            args = ["explorer", "--socket", sock]
            env.update(
                EXPLORER_STATE_DIR=f"{short_tmp}/state{n}",
                EXPLORER_TLS_CERT=cert,
                EXPLORER_TLS_KEY=key,
                EXPLORER_TLS_CA=certs["ca"],
            )
            if kind == "explorer":
                env["EXPLORER_TLS_ADDR"] = "127.0.0.1:0"
            else:
                env.update(EXPLORER_UI_ADDR="127.0.0.1:0", EXPLORER_UI_TLS="1")
        process = Twistd(args, env=env, prefix=prefix)
        started.append(process)
        if kind == "dashboard":
            (line,) = process.wait_for_line(r"dashboard: https://127\.0\.0\.1:(\d+)/")
            process.port = int(line.group(1))
        else:
            uri = next(u for u in process.listening(count=2) if u.startswith("tls://"))
            process.port = int(uri.rsplit(":", 1)[1])
        process.unix = f"unix://{sock}"
        process.pid = process.process.pid
        process.kind = kind
        return process

    yield start
    for process in started:
        process.stop()


def closed_within(sock, timeout):
    """
    :return: seconds until the peer closed (or reset) ``sock``, reading and discarding
        what comes; None if it is still open after ``timeout``
    """
    started = time.monotonic()
    sock.settimeout(0.05)
    while time.monotonic() - started < timeout:
        try:
            if not sock.recv(65536):
                return time.monotonic() - started
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - started
    return None


def tls_request(process, certs, source="127.0.0.1"):
    """
    A well-behaved client: a full handshake from ``source`` with a client certificate
    and one request; :return: the status line of the answer.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(certs["ca"])
    context.load_cert_chain(*certs["client"])
    raw = socket.socket()
    raw.settimeout(10)
    raw.bind((source, 0))
    raw.connect(("127.0.0.1", process.port))
    with context.wrap_socket(raw) as sock:
        if process.kind == "dashboard":
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        else:
            body = b'{"jsonrpc":"2.0","method":"rpc.discover","id":1}'
            sock.sendall(
                b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s" % (len(body), body)
            )
        return sock.recv(65536).split(b"\r\n", 1)[0]


def unix_answers(process):
    """Whether the process's Unix socket answers a call."""
    return "result" in rpc(process.unix, "rpc.discover")


@pytest.mark.parametrize("kind", KINDS)
def test_stalled_and_never_started_handshakes_are_cut_off(server, certs, kind):
    """
    With HERO_HEAD_TIMEOUT=1, ten connections to the TLS port that never send a byte and
    ten that stall after five bytes of a ClientHello are all closed about a second after
    they connect (the idle sweep would keep them 75 s); a full handshake and request is
    served meanwhile, and so is the Unix socket.
    """
    process = server(kind, HERO_HEAD_TIMEOUT=1)
    silent = [socket.create_connection(("127.0.0.1", process.port)) for _ in range(10)]
    stalled = [socket.create_connection(("127.0.0.1", process.port)) for _ in range(10)]
    for sock in stalled:
        sock.sendall(HELLO_START)
    try:
        assert tls_request(process, certs).startswith(b"HTTP/1.1 ")
        for sock in silent + stalled:
            closed = closed_within(sock, 5)
            # 1 s after connecting, plus slack for a loaded machine.
            assert closed is not None and closed < 3.5, closed
        assert unix_answers(process)
    finally:
        for sock in silent + stalled:
            sock.close()
    process.wait_for_line(r"refused \(head_timeout\) a connection from 127\.0\.0\.1")


@pytest.mark.parametrize("kind", KINDS)
def test_connections_per_address_are_capped_on_tls(server, certs, kind):
    """
    HERO_MAX_CONNS_PER_ADDR=20: twenty TCP connections from 127.0.0.1 to the TLS port
    are kept; later ones are closed at accept, before any handshake; 127.0.0.2 is served
    all the same, and 127.0.0.1 again once its connections are gone.
    """
    process = server(kind, HERO_MAX_CONNS_PER_ADDR=20, HERO_HEAD_TIMEOUT=60)
    kept = [socket.create_connection(("127.0.0.1", process.port)) for _ in range(20)]
    try:
        extra = [socket.create_connection(("127.0.0.1", process.port)) for _ in range(5)]
        for sock in extra:
            sock.sendall(HELLO_START)
            closed = closed_within(sock, 5)
            assert closed is not None, "an extra connection was kept"
            sock.close()
        for sock in kept:
            sock.settimeout(0)
            with pytest.raises(BlockingIOError):
                sock.recv(1)  # still open: nothing to read, no EOF
        assert tls_request(process, certs, source="127.0.0.2").startswith(b"HTTP/1.1 ")
        assert unix_answers(process)
    finally:
        for sock in kept:
            sock.close()
    process.wait_for_line(r"refused \(max_conns_per_addr\) a connection from 127\.0\.0\.1")
    wait_for(
        lambda: tls_request(process, certs).startswith(b"HTTP/1.1 "),
        10,
        what="127.0.0.1 served again",
    )


@pytest.mark.parametrize("kind", KINDS)
def test_descriptor_reserve_holds_on_tls(server, certs, kind):
    """
    Under ``ulimit -n 256`` with HERO_FD_RESERVE=64, 300 connections held open on the
    TLS port, none handshaking, do not take the descriptors the Unix socket needs: the
    process stops accepting short of 256 - 64, and its Unix socket answers meanwhile.
    """
    process = server(kind, prefix=["prlimit", "--nofile=256:256", "--"], HERO_FD_RESERVE=64)
    held = []
    try:
        for _ in range(300):
            sock = socket.socket()
            sock.settimeout(5)
            sock.connect(("127.0.0.1", process.port))
            held.append(sock)
        process.wait_for_line(r"refused \(fd_reserve\)")
        fds = open_fds(process.pid)
        assert fds <= 256 - 64 + 1, fds
        assert unix_answers(process)
        print(f"{kind}: {fds} descriptors under 300 connections")
    finally:
        for sock in held:
            sock.close()
    wait_for(
        lambda: tls_request(process, certs).startswith(b"HTTP/1.1 "),
        10,
        what="TLS served again",
    )
