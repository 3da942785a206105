"""
An attacker's review of the TLS listeners on the standard library's :mod:`ssl`
(:mod:`hero_compute.rpc.tls_server`), made against a real ``twistd explorer`` over
loopback: resumption of a session issued to another identity (or to a client with a
certificate, then without one), renegotiation to bring a certificate later, client
certificates the fleet CA did not sign or that are out of date, old protocol versions,
a trickled handshake, an idle connection after its handshake, garbage and oversized
records after the handshake, a request in one-byte records, truncation, and the memory
an idle connection holds.  Each attack is refused (or harmless), nothing changes, and
the explorer keeps serving.
"""

import datetime
import json
import re
import socket
import ssl
import struct
import time

import pytest
from OpenSSL import SSL
from OpenSSL._util import lib as _lib

from hero_compute import pki

from .support import bio_handshake, parse_address, result, rss_kb, start_tls_explorer
from .test_trust import _write_pair

#: The explorer's head deadline here: short, so that the slow attacks end quickly.
HEAD_TIMEOUT = 2

#: A method only a ``client/*`` certificate may call over TLS (-32010 for the rest).
PRIVILEGED = "explorer.list_nodes"


@pytest.fixture
def explorer(twistd, short_tmp, fleet):
    """A real explorer with a mutual-TLS listener and a 2 s head deadline."""
    process = start_tls_explorer(
        twistd, short_tmp, fleet, HERO_HEAD_TIMEOUT=str(HEAD_TIMEOUT)
    )
    address = parse_address(process.tls)
    process.addr = (address.host, address.port)
    process.pid = process.process.pid
    return process


def request(method):
    """A JSON-RPC call as one HTTP request that asks for the connection's close."""
    body = json.dumps({"jsonrpc": "2.0", "method": method, "id": 1}).encode()
    return (
        b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )


def answer(raw):
    """:return: the JSON-RPC response in an HTTP response's bytes"""
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), raw[:200]
    return json.loads(body)


def complete(data):
    """:return: whether ``data`` holds a whole HTTP response (with Content-Length)"""
    head, found, body = data.partition(b"\r\n\r\n")
    if not found:
        return False
    length = re.search(rb"(?i)content-length: *(\d+)", head)
    return length is not None and len(body) >= int(length.group(1))


def refused(response):
    """:return: whether a JSON-RPC response is the policy's refusal"""
    return response.get("error", {}).get("code") == -32010


def context(fleet, who=None, version=None):
    """The standard library's client context, presenting ``who``'s certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(fleet["ca"])
    if who is not None:
        ctx.load_cert_chain(*(fleet[who] if isinstance(who, str) else who))
    if version is not None:
        ctx.maximum_version = getattr(ssl.TLSVersion, version)
    return ctx


def call(explorer, ctx, method=PRIVILEGED, session=None):
    """
    One call on a new connection.

    :return: ``(response, session, whether the session was resumed)``
    """
    with socket.create_connection(explorer.addr, timeout=10) as raw:
        with ctx.wrap_socket(raw, session=session) as conn:
            conn.sendall(request(method))
            data = b""
            while not complete(data) and (chunk := conn.recv(65536)):
                data += chunk
            return answer(data), conn.session, conn.session_reused


def pyopenssl_context(fleet, who=None, version=SSL.TLS1_3_VERSION):
    """pyOpenSSL's client context (it resumes and renegotiates as told)."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_max_proto_version(version)
    ctx.load_verify_locations(fleet["ca"])
    ctx.set_verify(SSL.VERIFY_PEER, lambda *args: bool(args[-1]))
    if who is not None:
        cert, key = fleet[who]
        ctx.use_certificate_file(cert)
        ctx.use_privatekey_file(key)
    return ctx


def pyopenssl_call(explorer, ctx, session=None, before=None, message=None):
    """
    One call on a new pyOpenSSL connection (``before(conn)`` run after the handshake).

    :param message: the request's bytes (default: the privileged method's)
    :return: ``(response or None if the connection died, session, resumed)``
    """
    with socket.create_connection(explorer.addr) as raw:
        # Blocking (pyOpenSSL wants it), but bounded all the same.
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 10, 0))
        conn = SSL.Connection(ctx, raw)
        conn.set_connect_state()
        if session is not None:
            # As an attacker would: pyOpenSSL allows only a session of the same context.
            assert _lib.SSL_set_session(conn._ssl, session._session) == 1
        conn.do_handshake()
        resumed = bool(_lib.SSL_session_reused(conn._ssl))
        data = b""
        try:
            if before is not None:
                before(conn)
            conn.sendall(request(PRIVILEGED) if message is None else message)
            while not complete(data):
                data += conn.recv(65536)
        except (SSL.ZeroReturnError, SSL.SysCallError, SSL.Error, OSError):
            pass
        return (answer(data) if data else None), conn.get_session(), resumed


def still_serving(explorer, fleet):
    """The explorer answers a client over TLS and over its Unix socket."""
    assert "result" in call(explorer, context(fleet, "client/ops"))[0]
    assert isinstance(result(explorer.unix, PRIVILEGED), list)


@pytest.mark.parametrize("version", ["TLSv1_3", "TLSv1_2"])
def test_a_session_is_never_resumed_on_the_same_context(explorer, fleet, version):
    """A client offering its previous session gets a full handshake (no ticket or cache
    resumes), and its call is answered as its certificate allows."""
    ctx = context(fleet, "client/ops", version)
    first, session, reused = call(explorer, ctx)
    assert "result" in first and not reused
    assert session is not None
    # TLS 1.3: the server's one ticket came, and is offered back.
    assert session.has_ticket == (version == "TLSv1_3")
    second, _, reused = call(explorer, ctx, session=session)
    assert not reused
    assert "result" in second


@pytest.mark.parametrize("version", [SSL.TLS1_3_VERSION, SSL.TLS1_2_VERSION])
def test_a_session_of_a_client_resumed_without_its_certificate_is_anonymous(
    explorer, fleet, version
):
    """The session of a client/ops connection, offered by a connection with no
    certificate, is not resumed: the caller is anonymous and refused."""
    with_cert = pyopenssl_context(fleet, "client/ops", version)
    first, session, resumed = pyopenssl_call(explorer, with_cert)
    assert first is not None and "result" in first and not resumed
    for ctx in (
        pyopenssl_context(fleet, None, version),
        pyopenssl_context(fleet, "node/a", version),
    ):
        second, _, resumed = pyopenssl_call(explorer, ctx, session=session)
        assert not resumed
        assert second is not None and refused(second), second
    still_serving(explorer, fleet)


def test_renegotiation_cannot_bring_a_certificate_later(explorer, fleet):
    """Over TLS 1.2 a connection made without a certificate that renegotiates with
    client/ops's gets no client's rights: the renegotiation is refused."""
    anonymous = pyopenssl_context(fleet, None, SSL.TLS1_2_VERSION)
    with_cert = pyopenssl_context(fleet, "client/ops", SSL.TLS1_2_VERSION)

    def renegotiate(conn):
        conn.set_context(with_cert)
        assert conn.renegotiate()
        try:
            conn.do_handshake()
        except SSL.Error:
            pass
        # What comes back (the refusal alert) is read with the answer.

    response, _, _ = pyopenssl_call(explorer, anonymous, before=renegotiate)
    assert response is None or refused(response), response
    still_serving(explorer, fleet)


def _self_signed(fleet):
    """The other CA's own certificate and key: self-signed, naming a trust domain."""
    directory = fleet["dir"] / "self"
    pki.create_ca(str(directory))
    return str(directory / pki.CA_FILE), str(directory / pki.CA_KEY_FILE)


def _dated(fleet, name, days_back, days):
    """A client/ops certificate of the fleet CA issued ``days_back`` days ago."""
    key = pki.make_key()
    then = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=days_back)
    cert = fleet["authority"].issue("client", "ops", key.public_key(), days=days, now=then)
    return _write_pair(fleet["dir"], name, pki.dump_certificate(cert).decode(), key)


@pytest.mark.parametrize("kind", ["other-ca", "self-signed", "expired", "not-yet-valid"])
def test_client_certificates_not_valid_in_the_fleet_fail_the_handshake(
    explorer, fleet, kind
):
    """A client certificate of another CA, self-signed, expired or not yet valid
    fails the handshake: nothing is answered, and the explorer keeps serving."""
    pair = {
        "other-ca": lambda: fleet["stranger"],
        "self-signed": lambda: _self_signed(fleet),
        "expired": lambda: _dated(fleet, "expired", 100, 90),
        "not-yet-valid": lambda: _dated(fleet, "future", -30, 90),
    }[kind]()
    before = result(explorer.unix, PRIVILEGED)
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        # TLS 1.3 reports a refused client certificate at the first read.
        call(explorer, context(fleet, pair))
    assert result(explorer.unix, PRIVILEGED) == before
    still_serving(explorer, fleet)


@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
def test_old_protocol_versions_are_refused(explorer, fleet, version):
    """A client that offers only TLS 1.0 or 1.1 is refused with protocol_version."""
    ctx = context(fleet, "client/ops")
    with pytest.warns(DeprecationWarning):
        ctx.minimum_version = ctx.maximum_version = getattr(ssl.TLSVersion, version)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError) as caught:
        call(explorer, ctx)
    assert "PROTOCOL_VERSION" in str(caught.value).upper()
    still_serving(explorer, fleet)


def _client_hello(fleet):
    """The bytes of a real ClientHello (with client/ops's context)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context(fleet, "client/ops").wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def _closed_after(sock, start):
    """:return: seconds from ``start`` until the peer closed ``sock``"""
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, TimeoutError):
        pass
    return time.monotonic() - start


def test_a_trickled_handshake_is_cut_at_the_head_deadline(explorer, fleet):
    """A ClientHello sent a byte every 0.2 s is cut off at HERO_HEAD_TIMEOUT, although
    bytes keep coming."""
    hello = _client_hello(fleet)
    with socket.create_connection(explorer.addr, timeout=10) as sock:
        start = time.monotonic()
        cut = None
        for byte in hello[: int(HEAD_TIMEOUT * 3 / 0.2)]:
            try:
                sock.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                cut = time.monotonic() - start
                break
            time.sleep(0.2)  # fixed wait: the attack's pace, a byte every 0.2 s
        if cut is None:
            sock.settimeout(HEAD_TIMEOUT * 3)
            cut = _closed_after(sock, start)
    assert HEAD_TIMEOUT - 0.5 <= cut <= HEAD_TIMEOUT + 2, cut
    still_serving(explorer, fleet)


def test_a_head_trickled_after_the_handshake_gets_408_at_the_deadline(explorer, fleet):
    """A client that completes its handshake, then trickles a request head a byte
    every 0.2 s, is answered 408 at about HERO_HEAD_TIMEOUT, and closed."""
    with socket.create_connection(explorer.addr, timeout=HEAD_TIMEOUT * 4) as raw:
        with context(fleet, "client/ops").wrap_socket(raw) as conn:
            start = time.monotonic()
            head = request(PRIVILEGED)
            data = b""
            for i in range(int(HEAD_TIMEOUT * 3 / 0.2)):
                try:
                    conn.sendall(head[i : i + 1])
                except (ssl.SSLError, OSError):
                    break
                conn.settimeout(0.2)
                try:
                    data += conn.recv(65536)
                except (TimeoutError, ssl.SSLWantReadError):
                    continue
                except (ssl.SSLError, OSError):
                    break
                if data:
                    break
            took = time.monotonic() - start
            # Then closed, a linger (2 s) later, though we keep our end open.
            conn.settimeout(5)
            try:
                while conn.recv(65536):
                    pass
            except TimeoutError:
                pytest.fail("still open 5 s after the 408")
            except (ssl.SSLError, OSError):
                pass
    assert data.startswith(b"HTTP/1.1 408"), data[:100]
    assert HEAD_TIMEOUT - 0.5 <= took <= HEAD_TIMEOUT + 2, took
    still_serving(explorer, fleet)


def test_an_answer_with_connection_close_ends_the_connection(explorer, fleet):
    """A request asking for ``Connection: close`` over TLS gets its answer, then the
    server's close_notify and the TCP close at once (it does not hold the connection,
    and its admission, until the idle timeout)."""
    with socket.create_connection(explorer.addr, timeout=10) as raw:
        with context(fleet, "client/ops").wrap_socket(raw) as conn:
            conn.sendall(request(PRIVILEGED))
            conn.settimeout(HEAD_TIMEOUT * 2)
            data = b""
            start = time.monotonic()
            try:
                while chunk := conn.recv(65536):
                    data += chunk
            except TimeoutError:
                pass
            took = time.monotonic() - start
            assert "result" in answer(data)
            assert took < HEAD_TIMEOUT, f"still open after {took:.1f} s"


def _established(explorer, fleet, who="client/ops"):
    """A handshake done over a raw socket: ``(socket, SSLObject, incoming, outgoing)``."""
    sock = socket.create_connection(explorer.addr, timeout=10)
    return (sock, *bio_handshake(sock, context(fleet, who)))


@pytest.mark.parametrize(
    "junk",
    [
        b"GET / HTTP/1.1\r\n\r\n",  # plaintext on the TLS connection
        b"\x17\x03\x03\x00\x20" + b"\x00" * 32,  # a record that does not decrypt
        b"\x17\x03\x03\xff\xff" + b"\x00" * 65535,  # a record past TLS's size limit
    ],
    ids=["plaintext", "undecryptable", "oversized"],
)
def test_garbage_after_the_handshake_ends_only_that_connection(explorer, fleet, junk):
    """Bytes that are no TLS record of the session, after a client/ops handshake,
    end that connection with nothing answered; the explorer keeps serving."""
    sock, tls, incoming, _ = _established(explorer, fleet)
    with sock:
        sock.sendall(junk)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    incoming.write(data)
    plain = b""
    try:
        # b"" once the peer's close_notify is read (ssl raises only once ours went too)
        while piece := tls.read(65536):
            plain += piece
    except (ssl.SSLError, ssl.SSLWantReadError):
        pass
    assert b"HTTP" not in plain, plain[:200]
    still_serving(explorer, fleet)


def test_a_request_in_one_byte_records_is_answered(explorer, fleet):
    """A request sent one byte per TLS record is put together and answered as the
    certificate allows."""
    sock, tls, incoming, outgoing = _established(explorer, fleet, "node/a")
    with sock:
        for byte in request(PRIVILEGED):
            tls.write(bytes([byte]))
            sock.sendall(outgoing.read())
        data = b""
        while chunk := sock.recv(65536):
            incoming.write(chunk)
            try:
                # b"" once the explorer's close_notify is read: the loop never ended when
                # the answer and close_notify came in one segment (a hang, now and then)
                while piece := tls.read(65536):
                    data += piece
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                pass
            if complete(data):
                break
    assert refused(answer(data))
    still_serving(explorer, fleet)


def test_truncated_requests_change_nothing(explorer, fleet):
    """Half a request then a TCP close without close_notify, many times over: nothing
    is answered or left behind, and the explorer keeps serving."""
    before = result(explorer.unix, PRIVILEGED)
    for _ in range(20):
        sock, tls, _, outgoing = _established(explorer, fleet)
        tls.write(request("explorer.create_token")[:-10])
        sock.sendall(outgoing.read())
        sock.close()
    assert result(explorer.unix, PRIVILEGED) == before
    still_serving(explorer, fleet)


def test_an_idle_tls_connection_holds_little_memory(twistd, short_tmp, fleet):
    """200 idle connections past their handshake cost the explorer under 64 KiB each
    (OpenSSL's record buffers are released between records)."""
    explorer = start_tls_explorer(twistd, short_tmp, fleet, HERO_HEAD_TIMEOUT="60")
    address = parse_address(explorer.tls)
    explorer.addr, explorer.pid = (address.host, address.port), explorer.process.pid
    ctx = context(fleet, "client/ops")
    # A first batch, so that the allocator's arenas are there before we measure.
    warm = [ctx.wrap_socket(socket.create_connection(explorer.addr)) for _ in range(20)]
    # A call answered on a connection opened after the last flight of every handshake
    # was sent: by then the explorer has read them all (its reactor serves every
    # readable connection at each turn), so what they cost is in its memory.
    assert "result" in call(explorer, ctx)[0]
    before = rss_kb(explorer.pid)
    held = [ctx.wrap_socket(socket.create_connection(explorer.addr)) for _ in range(200)]
    assert "result" in call(explorer, ctx)[0]
    grown = rss_kb(explorer.pid) - before
    for conn in warm + held:
        conn.close()
    assert grown / 200 < 64, f"{grown / 200:.1f} KiB per idle connection"
    still_serving(explorer, fleet)


def _call_as(explorer, ctx, method, params, session=None):
    """One call with params on a new pyOpenSSL connection: ``(response, session)``."""
    body = json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": 1})
    message = (
        b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body.encode())
    )
    response, session, _ = pyopenssl_call(explorer, ctx, session, message=message)
    return response, session


def test_the_audit_names_the_verified_certificate_not_a_resumed_session(explorer, fleet):
    """A token made by client/ops over TLS is audited as its SPIFFE id; the same
    call offering ops's session without a certificate is refused, and audited (if at
    all) as the anonymous TLS address, never as ops."""
    ops = pyopenssl_context(fleet, "client/ops")
    made, session = _call_as(explorer, ops, "explorer.create_token", {"node_id": "x1"})
    assert "result" in made, made
    for who in (None, "node/a"):
        forged, _ = _call_as(
            explorer,
            pyopenssl_context(fleet, who),
            "explorer.create_token",
            {"node_id": "x2"},
            session=session,
        )
        assert refused(forged), forged
    entries = result(explorer.unix, "explorer.audit", {})
    entries = entries.get("entries", entries) if isinstance(entries, dict) else entries
    tokens = [e for e in entries if e["method"] == "explorer.create_token"]
    callers = {e["target"]: e["caller"] for e in tokens}
    assert callers.get("x1", "").endswith("/client/ops"), tokens
    assert not any(
        e["caller"].endswith("/client/ops") for e in tokens if e["target"] == "x2"
    ), tokens


def test_a_peer_that_does_not_read_its_answers_is_not_read(twistd, short_tmp, fleet):
    """Thousands of pipelined calls from a client/ops peer that never reads: the
    explorer stops reading it past HERO_MAX_UNSENT, its memory stays bounded, and it
    keeps answering others."""
    explorer = start_tls_explorer(twistd, short_tmp, fleet, HERO_MAX_UNSENT="65536")
    address = parse_address(explorer.tls)
    explorer.addr, explorer.pid = (address.host, address.port), explorer.process.pid
    before = rss_kb(explorer.pid)
    one = request("rpc.discover").replace(b"Connection: close\r\n", b"")
    sent = 0
    with socket.create_connection(explorer.addr, timeout=10) as raw:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        with context(fleet, "client/ops").wrap_socket(raw) as conn:
            conn.settimeout(0.5)
            deadline = time.monotonic() + 10
            try:
                while sent < 50000 and time.monotonic() < deadline:
                    conn.sendall(one * 10)
                    sent += 10
            except TimeoutError:
                pass  # it stopped reading us: what we wanted
            grown = rss_kb(explorer.pid) - before
            still_serving(explorer, fleet)
    assert sent < 50000, "the explorer read everything a peer that never reads sent"
    assert grown < 64 * 1024, f"{grown} KiB more for one peer that does not read"


@pytest.fixture
def node(twistd, short_tmp, fleet):
    """A real node (id ``a``) with a mutual-TLS listener on 127.0.0.1."""
    cert, key = fleet["node/a"]
    env = {
        "HERO_STATE_DIR": f"{short_tmp}/node",
        "HERO_SOCKET_DIR": f"{short_tmp}/nodesock",
        "NODE_ID": "a",
        "NODE_TLS_ADDR": "127.0.0.1:0",
        "NODE_TLS_CERT": cert,
        "NODE_TLS_KEY": key,
        "NODE_TLS_CA": fleet["ca"],
    }
    process = twistd(["node", "--socket", f"{short_tmp}/node.sock"], env=env)
    uris = process.listening(count=2)
    address = parse_address(next(u for u in uris if u.startswith("tls://")))
    process.addr = (address.host, address.port)
    return process


@pytest.mark.parametrize("version", [SSL.TLS1_3_VERSION, SSL.TLS1_2_VERSION])
def test_a_node_gives_a_resumed_session_no_identity(node, fleet, version):
    """On a node's listener, client/ops's session offered with no certificate or with
    node/b's is not resumed: node.info is refused (only rpc.discover is open)."""
    ops = pyopenssl_context(fleet, "client/ops", version)
    allowed, session = _call_as(node, ops, "node.info", {})
    assert "result" in allowed, allowed
    for who in (None, "node/b"):
        forged, _ = _call_as(
            node, pyopenssl_context(fleet, who, version), "node.info", {}, session=session
        )
        assert refused(forged), forged
    discover, _ = _call_as(
        node, pyopenssl_context(fleet, None, version), "rpc.discover", {}
    )
    assert "result" in discover


@pytest.mark.parametrize(
    "bad",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"POST /rpc HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n",
    ],
    ids=["400", "413"],
)
def test_a_refused_request_is_closed_after_its_linger(explorer, fleet, bad):
    """A request refused with 400 or 413 over TLS, from a client that keeps its end
    open and says nothing more, is closed a linger (2 s) after the answer, as over
    TCP: it does not hold its connection, descriptor and admission for ever."""
    with socket.create_connection(explorer.addr, timeout=10) as raw:
        with context(fleet, "client/ops").wrap_socket(raw) as conn:
            conn.sendall(bad)
            conn.settimeout(6)
            data = b""
            start = time.monotonic()
            try:
                while chunk := conn.recv(65536):
                    data += chunk
            except TimeoutError:
                pass
            except (ssl.SSLError, ConnectionResetError):
                pass  # cut off: what we wanted
            took = time.monotonic() - start
    assert data.startswith((b"HTTP/1.1 400", b"HTTP/1.1 413")), data[:100]
    assert took < 5, f"still open {took:.1f} s after the refusal"
    still_serving(explorer, fleet)
