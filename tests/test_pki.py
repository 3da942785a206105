"""
The offline PKI: the CA, pins, issued certificates, CSR signing, file modes, expiry, and
the ``hero-compute tls`` commands run as a real process.
"""

import datetime
import hashlib
import ipaddress
import os
import stat
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hero_compute import pki

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)


@pytest.fixture
def ca(tmp_path):
    """A fresh fleet CA in trust domain ``fleet.example``."""
    pki.create_ca(str(tmp_path / "ca"), "fleet.example")
    return pki.CertificateAuthority.from_directory(str(tmp_path / "ca"))


def mode(path):
    """The permission bits of ``path``."""
    return stat.S_IMODE(os.stat(path).st_mode)


def sans(cert):
    """The SubjectAlternativeName extension value of ``cert``."""
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def test_create_ca_writes_a_ca_with_its_trust_domain(tmp_path):
    """The CA certificate is a CA (pathlen 0, cert sign) naming spiffe://<td>."""
    directory = tmp_path / "new" / "ca"
    pin = pki.create_ca(str(directory), "fleet.example")
    cert = pki.load_certificate(str(directory / "ca.pem"))
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    assert constraints.value.path_length == 0
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert sans(cert).get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://fleet.example"
    ]
    assert pki.trust_domain_of(cert) == "fleet.example"
    assert pin == pki.spki_pin(cert)
    assert isinstance(
        pki.load_private_key(str(directory / "ca-key.pem")), type(pki.make_key())
    )


def test_key_files_are_0600_whatever_the_umask(tmp_path):
    """Keys are written 0600 even under a permissive umask; certificates 0644."""
    old = os.umask(0)
    try:
        pki.create_ca(str(tmp_path / "ca"))
        cert, key = pki.create_cert(
            str(tmp_path / "ca"), "client", "ops", out=str(tmp_path / "ops")
        )
    finally:
        os.umask(old)
    assert mode(tmp_path / "ca" / "ca-key.pem") == 0o600
    assert mode(key) == 0o600
    assert mode(tmp_path / "ca" / "ca.pem") == 0o644
    assert mode(cert) == 0o644
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_pin_is_sha256_of_the_spki_der(ca):
    """The pin is sha256: and the hex SHA-256 of the SubjectPublicKeyInfo DER."""
    der = ca.certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert pki.spki_pin(ca.certificate) == "sha256:" + hashlib.sha256(der).hexdigest()
    assert ca.pin == pki.spki_pin(ca.certificate)
    assert len(ca.pin) == len("sha256:") + 64


def test_create_ca_refuses_to_overwrite(tmp_path):
    """An existing CA is kept unless forced; forcing makes a new key."""
    first = pki.create_ca(str(tmp_path))
    with pytest.raises(pki.PkiError, match="exists"):
        pki.create_ca(str(tmp_path))
    assert pki.spki_pin(pki.load_certificate(str(tmp_path / "ca.pem"))) == first
    assert pki.create_ca(str(tmp_path), force=True) != first


def test_issue_names_exactly_one_identity(ca):
    """An issued certificate has one URI SAN, the DNS and IP SANs asked, both EKUs,
    is no CA, and is signed by the CA."""
    key = pki.make_key()
    cert = ca.issue(
        "explorer",
        "e1",
        key.public_key(),
        dns=["explorer.example"],
        ips=["192.0.2.7", "::1"],
    )
    names = sans(cert)
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://fleet.example/explorer/e1"
    ]
    assert names.get_values_for_type(x509.DNSName) == ["explorer.example"]
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("192.0.2.7"),
        ipaddress.ip_address("::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(ca.certificate)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()


def test_serials_are_random(ca):
    """Two certificates for the same identity get different serial numbers."""
    key = pki.make_key().public_key()
    assert (
        ca.issue("node", "n", key).serial_number != ca.issue("node", "n", key).serial_number
    )


def test_validity_follows_the_injected_clock(ca):
    """``now`` and ``days`` set the validity; it never outlives the CA."""
    issued_at = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    cert = ca.issue("node", "n1", pki.make_key().public_key(), days=90, now=issued_at)
    assert cert.not_valid_after_utc - issued_at == datetime.timedelta(days=90)
    assert cert.not_valid_before_utc == issued_at - datetime.timedelta(minutes=5)
    past = issued_at - datetime.timedelta(days=10)
    expired = ca.issue("node", "n1", pki.make_key().public_key(), days=7, now=past)
    assert expired.not_valid_after_utc == past + datetime.timedelta(days=7) < issued_at
    late = ca.issue(
        "node",
        "n1",
        pki.make_key().public_key(),
        days=90,
        now=ca.certificate.not_valid_after_utc - datetime.timedelta(days=1),
    )
    assert late.not_valid_after_utc == ca.certificate.not_valid_after_utc


@pytest.mark.parametrize(
    "role, name",
    [
        ("admin", "x"),
        ("node", ""),
        ("node", "a/b"),
        ("node", "x" * 65),
        ("node", ".."),
        ("client", "a b"),
        ("explorer", "é"),
    ],
)
def test_invalid_identities_are_refused(ca, role, name):
    """Unknown roles and names outside [A-Za-z0-9._-]{1,64} are refused."""
    with pytest.raises(pki.IdentityError):
        ca.issue(role, name, pki.make_key().public_key())


@pytest.mark.parametrize("trust_domain", ["", "Fleet", "a/b", "a:1", "x%41"])
def test_invalid_trust_domains_are_refused(tmp_path, trust_domain):
    """A trust domain must be lowercase letters, digits, '.', '-', '_'."""
    with pytest.raises(pki.IdentityError):
        pki.create_ca(str(tmp_path), trust_domain)
    assert not os.path.exists(tmp_path / "ca.pem")


def test_spiffe_ids_round_trip_and_reject_extras():
    """Formatted ids parse back; ports, queries, extra segments and other schemes do not."""
    uri = pki.format_spiffe_id("hero-compute", "node", "n-1.x_y")
    assert uri == "spiffe://hero-compute/node/n-1.x_y"
    assert pki.parse_spiffe_id(uri) == pki.SpiffeId("hero-compute", "node", "n-1.x_y")
    assert str(pki.parse_spiffe_id(uri)) == uri
    for bad in (
        "spiffe://hero-compute/node",
        "spiffe://hero-compute:8/node/a",
        "spiffe://hero-compute/node/a/b",
        "spiffe://hero-compute/node/a#f",
        "SPIFFE://hero-compute/node/a",
        "https://hero-compute/node/a",
        "spiffe://u@hero-compute/node/a",
        "spiffe://hero-compute/node/%41",
    ):
        with pytest.raises(pki.IdentityError):
            pki.parse_spiffe_id(bad)


def test_sign_csr_ignores_the_names_asked_for(ca):
    """A CSR asking for another identity and DNS names gets only what the caller says."""
    key = pki.make_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "evil")]))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier("spiffe://fleet.example/explorer/evil"),
                    x509.DNSName("evil.example"),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert = ca.sign_csr(csr.public_bytes(serialization.Encoding.PEM), "node", "n1", now=NOW)
    names = sans(cert)
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://fleet.example/node/n1"
    ]
    assert names.get_values_for_type(x509.DNSName) == []
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert cert.not_valid_after_utc == NOW + datetime.timedelta(days=90)


def test_make_csr_is_signed_by_the_node_key(ca):
    """make_csr gives a PEM CSR that sign_csr accepts, for the node's key."""
    key = pki.make_key()
    csr = pki.make_csr(key, "node-7")
    assert csr.startswith(b"-----BEGIN CERTIFICATE REQUEST-----")
    cert = ca.sign_csr(csr.decode(), "node", "node-7")
    assert pki.public_key_pin(cert.public_key()) == pki.public_key_pin(key.public_key())


def test_sign_csr_refuses_a_bad_signature(ca):
    """A CSR whose signature does not verify (a key the sender lacks) is refused."""
    der = bytearray(
        x509.load_pem_x509_csr(pki.make_csr(pki.make_key(), "n")).public_bytes(
            serialization.Encoding.DER
        )
    )
    der[-3] ^= 0xFF  # inside the signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(pki.PkiError, match="signature"):
        ca.sign_csr(tampered, "node", "n")
    with pytest.raises(pki.PkiError, match="not a PEM"):
        ca.sign_csr(b"hello", "node", "n")


def test_ca_loads_from_pem_and_checks_its_key(tmp_path, ca):
    """A CA loads from PEM and refuses a key that is not its own."""
    again = pki.CertificateAuthority.from_pem(
        pki.dump_certificate(ca.certificate), pki.dump_private_key(ca.key)
    )
    assert again.trust_domain == "fleet.example"
    with pytest.raises(pki.PkiError, match="does not belong"):
        pki.CertificateAuthority(ca.certificate, pki.make_key())


def test_create_cert_defaults_and_refusals(tmp_path, monkeypatch):
    """create_cert writes <role>-<name>.pem in the current directory, refuses to
    overwrite unless forced, and names a missing CA directory."""
    pki.create_ca(str(tmp_path / "ca"))
    monkeypatch.chdir(tmp_path)
    assert pki.create_cert("ca", "node", "n1") == ("node-n1.pem", "node-n1-key.pem")
    before = (tmp_path / "node-n1.pem").read_bytes()
    with pytest.raises(pki.PkiError, match="exists"):
        pki.create_cert("ca", "node", "n1")
    assert (tmp_path / "node-n1.pem").read_bytes() == before
    pki.create_cert("ca", "node", "n1", force=True)
    assert (tmp_path / "node-n1.pem").read_bytes() != before
    with pytest.raises(pki.PkiError, match="does not exist"):
        pki.create_cert("missing", "node", "n1")


def run_cli(*args, cwd):
    """Run ``python -m hero_compute.cli`` with ``args``; return the completed process."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-m", "hero_compute.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_creates_a_ca_and_certificates(tmp_path):
    """tls ca create prints the pin, tls pin agrees, tls cert create writes the files."""
    done = run_cli(
        "tls", "ca", "create", "--dir", "pki", "--trust-domain", "lab", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    pin = done.stdout.strip()
    assert pin.startswith("sha256:") and len(pin) == 71
    assert mode(tmp_path / "pki" / "ca-key.pem") == 0o600

    done = run_cli("tls", "pin", "pki/ca.pem", cwd=tmp_path)
    assert (done.returncode, done.stdout.strip()) == (0, pin)

    done = run_cli(
        "tls",
        "cert",
        "create",
        "--ca-dir",
        "pki",
        "--node",
        "n1",
        "--dns",
        "n1.lab",
        "--ip",
        "10.0.0.1",
        "--days",
        "30",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["node-n1.pem", "node-n1-key.pem"]
    cert = pki.load_certificate(str(tmp_path / "node-n1.pem"))
    assert sans(cert).get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://lab/node/n1"
    ]
    assert mode(tmp_path / "node-n1-key.pem") == 0o600
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=30) <= life <= datetime.timedelta(days=30, minutes=6)

    done = run_cli(
        "tls",
        "cert",
        "create",
        "--ca-dir",
        "pki",
        "--client",
        "ops",
        "--out",
        "keys-ops",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "keys-ops.pem").exists() and (tmp_path / "keys-ops-key.pem").exists()


@pytest.mark.parametrize(
    "args, status, message",
    [
        (
            ["tls", "cert", "create", "--ca-dir", "nowhere", "--node", "n1"],
            1,
            "does not exist",
        ),
        (
            ["tls", "cert", "create", "--ca-dir", "pki", "--node", "a/b"],
            64,
            "invalid node id",
        ),
        (
            [
                "tls",
                "cert",
                "create",
                "--ca-dir",
                "pki",
                "--explorer",
                "e",
                "--ip",
                "300.1.1.1",
            ],
            64,
            "invalid IP address",
        ),
        (
            ["tls", "cert", "create", "--ca-dir", "pki", "--node", "n1"],
            1,
            "refusing to overwrite",
        ),
        (["tls", "ca", "create", "--dir", "pki"], 1, "refusing to overwrite"),
        (
            ["tls", "ca", "create", "--dir", "other", "--trust-domain", "Bad"],
            64,
            "invalid trust domain",
        ),
        (["tls", "pin", "missing.pem"], 1, "cannot read missing.pem"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, args, status, message):
    """Each refusal is one line on stderr, no traceback, with its exit status."""
    assert run_cli("tls", "ca", "create", "--dir", "pki", cwd=tmp_path).returncode == 0
    assert (
        run_cli(
            "tls", "cert", "create", "--ca-dir", "pki", "--node", "n1", cwd=tmp_path
        ).returncode
        == 0
    )
    done = run_cli(*args, cwd=tmp_path)
    assert done.returncode == status, done.stderr
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_cli_force_replaces_files(tmp_path):
    """--force lets tls cert create replace an existing certificate."""
    assert run_cli("tls", "ca", "create", "--dir", "pki", cwd=tmp_path).returncode == 0
    args = ("tls", "cert", "create", "--ca-dir", "pki", "--client", "c")
    assert run_cli(*args, cwd=tmp_path).returncode == 0
    before = (tmp_path / "client-c.pem").read_bytes()
    assert run_cli(*args, "--force", cwd=tmp_path).returncode == 0
    assert (tmp_path / "client-c.pem").read_bytes() != before
