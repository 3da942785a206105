"""
The address grammar of CONTRACT §1: every accepted form, every rejection (with the bad
value and the accepted forms in the message), and properties over generated addresses.
"""

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock

from hero_compute.rpc.addresses import (
    ACCEPTED_FORMS,
    ACCEPTED_LISTEN_FORMS,
    Address,
    AddressError,
    ListenAddress,
    parse_address,
    parse_listen,
)
from hero_compute.rpc.listen import Listen


@pytest.mark.parametrize(
    "text, expected",
    [
        ("unix:///run/hero/x.sock", Address("unix", path="/run/hero/x.sock")),
        ("UNIX:///run/x.sock", Address("unix", path="/run/x.sock")),
        ("/run/hero/x.sock", Address("unix", path="/run/hero/x.sock")),
        ("tcp://10.0.0.5:9002", Address("tcp", host="10.0.0.5", port=9002)),
        ("tcp://127.0.0.1:1", Address("tcp", host="127.0.0.1", port=1)),
        (
            "tcp://explorer.example.com:65535",
            Address("tcp", host="explorer.example.com", port=65535),
        ),
        (
            "tcp://Explorer.Example.COM:80",
            Address("tcp", host="explorer.example.com", port=80),
        ),
        ("tcp://localhost:9002", Address("tcp", host="localhost", port=9002)),
        ("tcp://[::1]:9002", Address("tcp", host="::1", port=9002)),
        ("tcp://[2001:DB8:0:0:0:0:0:1]:443", Address("tcp", host="2001:db8::1", port=443)),
        ("tls://10.0.0.5:9443", Address("tls", host="10.0.0.5", port=9443)),
        (
            "tls://explorer.example.com:9443",
            Address("tls", host="explorer.example.com", port=9443),
        ),
        ("tls://[fd00::5]:9443", Address("tls", host="fd00::5", port=9443)),
    ],
)
def test_accepted_addresses(text, expected):
    """Every accepted form of CONTRACT §1 parses to the expected address."""
    assert parse_address(text) == expected


def test_longest_unix_path_is_accepted():
    """A socket path of exactly 107 bytes (the kernel's limit) is accepted."""
    assert parse_address("/" + "a" * 106).path == "/" + "a" * 106


def test_legacy_bare_path_is_unix_uri():
    """A legacy bare path is the same address as its unix:// URI, and prints as one."""
    address = parse_address("/run/hero/x.sock")
    assert address == parse_address("unix:///run/hero/x.sock")
    assert address.uri == str(address) == "unix:///run/hero/x.sock"
    assert address.is_unix


def test_canonical_uris():
    """URIs come out canonical: lower-case names, compressed and bracketed IPv6."""
    assert parse_address("tcp://Host.Example:80").uri == "tcp://host.example:80"
    assert parse_address("tcp://[0:0::1]:80").uri == "tcp://[::1]:80"
    assert parse_address("tls://1.2.3.4:443").uri == "tls://1.2.3.4:443"
    assert not parse_address("tcp://[::1]:80").is_unix


def test_address_passes_through():
    """An Address given where text is expected is returned as is."""
    address = Address("tcp", host="h", port=1)
    assert parse_address(address) is address


@pytest.mark.parametrize(
    "text",
    [
        "",
        "tcp://10.0.0.5",
        "tcp://10.0.0.5:",
        "tcp://10.0.0.5:0",
        "tcp://10.0.0.5:65536",
        "tcp://10.0.0.5:99999999999999999999",
        "tcp://10.0.0.5:http",
        "tcp://10.0.0.5:-1",
        "tcp://10.0.0.5:+80",
        "tcp://10.0.0.5: 80",
        "tcp://10.0.0.5:８０",
        "tcp://:9002",
        "tcp://[]:9002",
        "tcp://::1:9002",
        "tcp://2001:db8::1:9002",
        "tcp://[::1]",
        "tcp://[::1]9002",
        "tcp://[not-v6]:9002",
        "tcp://[1.2.3.4]:9002",
        "tcp://999.1.1.1:9002",
        "tcp://1.2.3:9002",
        "tcp://-bad-.example:9002",
        "tcp://a_b.example:9002",
        "tcp://a b:9002",
        "tcp://host:9002/rpc",
        "tcp://user@host:9002",
        "tcp://host:9002?x=1",
        "unix://relative.sock",
        "unix://",
        "unix:///run/dir/",
        "unix:///run/x\x00.sock",
        "unix:///" + "a" * 107,
        "/" + "é" * 54,
        "tcp://10.0.0.5:" + "9" * 5000,
        "tcp://10.0.0.5:000009002",
        "relative.sock",
        "./x.sock",
        "http://10.0.0.5:9002",
        "https://10.0.0.5:9002",
        "ssl:host=1.2.3.4:port=1",
        "10.0.0.5:9002",
        "tcp:10.0.0.5:9002",
        "garbage",
        "://",
        "\x00",
    ],
)
def test_rejected_addresses(text):
    """A value outside the grammar is an AddressError naming it and the accepted forms."""
    with pytest.raises(AddressError) as info:
        parse_address(text)
    message = str(info.value)
    assert repr(text) in message
    assert ACCEPTED_FORMS in message
    assert info.value.value == text


@pytest.mark.parametrize("value", [None, 9002, b"/run/x.sock"])
def test_rejected_non_strings(value):
    """A value that is not text is rejected like any other bad value."""
    with pytest.raises(AddressError) as info:
        parse_address(value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0.0.0.0:9002", ListenAddress("0.0.0.0", 9002)),
        ("127.0.0.1:0", ListenAddress("127.0.0.1", 0)),
        ("localhost:65535", ListenAddress("localhost", 65535)),
        ("[::]:9002", ListenAddress("::", 9002)),
        ("[::1]:0", ListenAddress("::1", 0)),
    ],
)
def test_accepted_listen_addresses(text, expected):
    """Listen addresses are host:port or [v6addr]:port; port 0 means any free port."""
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "9002",
        ":9002",
        "0.0.0.0",
        "0.0.0.0:",
        "0.0.0.0:65536",
        "0.0.0.0:x",
        "::1:9002",
        "[::1]",
        "[zz]:1",
        "tcp://0.0.0.0:9002",
        "/run/x.sock",
        "garbage",
    ],
)
def test_rejected_listen_addresses(text):
    """A bad listen address names the value and the listen forms."""
    with pytest.raises(AddressError) as info:
        parse_listen(text)
    assert repr(text) in str(info.value)
    assert ACCEPTED_LISTEN_FORMS in str(info.value)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0.0.0.0:9002", (9002, 4096, "0.0.0.0")),
        ("127.0.0.1:0", (0, 4096, "127.0.0.1")),
        ("[::]:9002", (9002, 4096, "::")),
        ("[::1]:0", (0, 4096, "::1")),
    ],
)
def test_listen_endpoint(text, expected):
    """A listen address's record listens on its interface and port, backlog 4096."""
    listen = parse_listen(text)
    reactor = MemoryReactorClock()
    Listen.tcp(listen).server_endpoint(reactor).listen(Factory())
    [(port, _, backlog, interface)] = reactor.tcpServers
    assert (port, backlog, interface) == expected
    assert listen.is_ipv6 == (":" in expected[2])


def test_listen_address_str():
    """A listen address prints back in its own grammar, IPv6 bracketed."""
    assert str(parse_listen("[::1]:80")) == "[::1]:80"
    assert str(parse_listen("0.0.0.0:80")) == "0.0.0.0:80"


def test_unix_client_endpoint():
    """A unix address connects to its path, with the given connect timeout."""
    reactor = MemoryReactorClock()
    endpoint = parse_address("unix:///run/x.sock").client_endpoint(reactor, timeout=3)
    assert isinstance(endpoint, UNIXClientEndpoint)
    endpoint.connect(Factory())
    path, _, timeout, _ = reactor.unixClients[0]
    assert (path, timeout) == ("/run/x.sock", 3)


@pytest.mark.parametrize(
    "text, kind",
    [
        ("tcp://10.0.0.5:9002", TCP4ClientEndpoint),
        ("tcp://[::1]:9002", TCP6ClientEndpoint),
        ("tcp://explorer.example.com:9002", HostnameEndpoint),
    ],
)
def test_tcp_client_endpoint(text, kind):
    """A tcp address connects straight to an IP address, and through the resolver
    (HostnameEndpoint) to a name; with the timeout given."""
    reactor = MemoryReactorClock()
    endpoint = parse_address(text).client_endpoint(reactor, timeout=3)
    assert type(endpoint) is kind
    if kind is not HostnameEndpoint:
        endpoint.connect(Factory())
        host, port, _, timeout, _ = reactor.tcpClients[0]
        assert (port, timeout) == (9002, 3)
        assert host == parse_address(text).host


def test_tls_client_endpoint():
    """A tls address with fleet TLS material gives a client endpoint that is not plain
    TCP; without material it is refused rather than checked against the system's CAs."""
    from hero_compute.rpc.tls import ClientTLS

    address = parse_address("tls://explorer.example.com:9443")
    with pytest.raises(ValueError, match="no TLS material"):
        address.client_endpoint(MemoryReactorClock())
    creator = ClientTLS.__new__(ClientTLS)  # the endpoint only holds it
    endpoint = address.client_endpoint(MemoryReactorClock(), tls=creator)
    assert IStreamClientEndpoint.providedBy(endpoint)
    assert not isinstance(endpoint, HostnameEndpoint)


# Generated addresses ------------------------------------------------------------------

_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
_top = st.from_regex(r"[a-z]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
dns_names = st.builds(
    lambda labels, top: ".".join([*labels, top]), st.lists(_label, max_size=4), _top
)
ports = st.integers(1, 65535)
ipv4 = st.ip_addresses(v=4).map(str)


@st.composite
def ipv6_texts(draw):
    """IPv6 addresses written compressed, exploded, or with IPv4 tails."""
    addr = draw(st.ip_addresses(v=6))
    form = draw(st.sampled_from(["compressed", "exploded", "upper", "v4tail"]))
    if form == "exploded":
        return addr.exploded
    if form == "upper":
        return addr.compressed.upper()
    if form == "v4tail":
        head = addr.exploded.rsplit(":", 2)[0]
        return f"{head}:{ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)}"
    return addr.compressed


# At most 3 × (8 characters × 4 UTF-8 bytes + "/") = 99 bytes: within the 107-byte limit.
unix_paths = st.lists(
    st.text(st.characters(blacklist_characters="/\x00"), min_size=1, max_size=8),
    min_size=1,
    max_size=3,
).map(lambda parts: "/" + "/".join(parts))


@st.composite
def address_texts(draw):
    """Valid address text of any accepted form."""
    kind = draw(st.sampled_from(["unix", "bare", "v4", "v6", "dns"]))
    if kind == "unix":
        return "unix://" + draw(unix_paths)
    if kind == "bare":
        return draw(unix_paths)
    scheme = draw(st.sampled_from(["tcp", "tls", "TCP"]))
    host = {"v4": ipv4, "v6": ipv6_texts().map(lambda h: f"[{h}]"), "dns": dns_names}[kind]
    return f"{scheme}://{draw(host)}:{draw(ports)}"


@settings(max_examples=300, deadline=None)
@given(address_texts())
def test_round_trip(text):
    """Any valid address parses, and its canonical URI parses back to the same address."""
    address = parse_address(text)
    assert parse_address(address.uri) == address
    assert parse_address(address.uri).uri == address.uri


@settings(max_examples=200, deadline=None)
@given(st.ip_addresses(v=6), ports)
def test_ipv6_any_spelling(addr, port):
    """Every spelling of one IPv6 address is the same address."""
    expected = Address("tcp", host=addr.compressed, port=port)
    assert parse_address(f"tcp://[{addr.compressed}]:{port}") == expected
    assert parse_address(f"tcp://[{addr.exploded}]:{port}") == expected


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(ipv4, st.ip_addresses(v=6).map(lambda a: f"[{a}]"), dns_names),
    st.integers(0, 65535),
)
def test_listen_round_trip(host, port):
    """A listen address prints back to text that parses to the same listen address."""
    listen = parse_listen(f"{host}:{port}")
    assert parse_listen(str(listen)) == listen
    assert listen.port == port


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.text(),
        st.builds(
            lambda s, t: s + t,
            st.sampled_from(["unix://", "tcp://", "tls://", "tcp://[", "/", "http://"]),
            st.text(),
        ),
    )
)
def test_arbitrary_text_parses_or_is_address_error(text):
    """Arbitrary text either parses or raises AddressError, never anything else."""
    for parse in (parse_address, parse_listen):
        try:
            parse(text)
        except AddressError as e:
            assert repr(text) in str(e)
