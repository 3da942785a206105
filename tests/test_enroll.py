"""
Join tokens, enrollment, renewal, revocation and the node credential check, with a fake
signer and a fake clock over a real state file.
"""

import re

import pytest
from twisted.internet.task import Clock

from hero_compute.explorer.credentials import DEFAULT_TTL, MAX_TTL, TOKEN_PATTERN
from hero_compute.explorer.enroll import INVALID_TOKEN, Enrollment
from hero_compute.explorer.store import Store
from hero_compute.rpc.errors import InvalidParams, RefusedByPolicy

SECRET = "ab" * 32


class FakeSigner:
    """Signs by numbering certificates: serials 1, 2, 3... and records each request."""

    def __init__(self):
        self.signed = []

    def __call__(self, csr_pem, node_id):
        self.signed.append((csr_pem, node_id))
        serial = len(self.signed)
        return f"CERT {node_id} #{serial}", serial


@pytest.fixture
def clock():
    """A clock at a realistic Unix time."""
    c = Clock()
    c.advance(1_700_000_000)
    return c


@pytest.fixture
def store(tmp_path):
    """A real state file, closed after the test."""
    s = Store.open(tmp_path / "explorer.db")
    yield s
    s.close()


@pytest.fixture
def signer():
    """The fake signer."""
    return FakeSigner()


@pytest.fixture
def enrollment(store, clock, signer):
    """An Enrollment that can sign."""
    return Enrollment(store, clock, signer)


def refused(match=None):
    """Expect a RefusedByPolicy (-32010)."""
    return pytest.raises(RefusedByPolicy, match=match)


def test_token_format_and_expiry(enrollment, clock):
    """A token is <6>.<32> of [a-z0-9], fresh each time, and expires after an hour by
    default."""
    first = enrollment.create_token()
    second = enrollment.create_token()
    assert TOKEN_PATTERN.fullmatch(first["token"])
    assert first["token"] != second["token"]
    assert first["expires_at"] == clock.seconds() + DEFAULT_TTL


@pytest.mark.parametrize(
    "ttl", [0, 0.5, MAX_TTL + 1, -5, True, "1h", float("nan"), float("inf"), None]
)
def test_ttl_out_of_bounds_is_invalid(enrollment, ttl):
    """A ttl that is not a number from 1 s to 30 days is refused as -32602."""
    with pytest.raises(InvalidParams, match="ttl must be"):
        enrollment.create_token(ttl)


def test_token_node_id_is_checked(enrollment):
    """A token cannot be made for an invalid node id."""
    with pytest.raises(InvalidParams, match="node_id"):
        enrollment.create_token(60, node_id="bad id")


def test_enroll_with_a_general_token(enrollment, store, signer):
    """A token naming no id enrolls the CSR's id and records the certificate's serial."""
    token = enrollment.create_token()["token"]
    assert enrollment.enroll(token, "CSR", "n1") == "CERT n1 #1"
    assert signer.signed == [("CSR", "n1")]
    identity = store.identity("n1")
    assert identity.enrolled and identity.cert_serial == 1


def test_token_is_single_use(enrollment):
    """A second enrollment with the same token is refused."""
    token = enrollment.create_token()["token"]
    enrollment.enroll(token, "CSR", "n1")
    with refused(INVALID_TOKEN):
        enrollment.enroll(token, "CSR", "n2")


def test_token_expires(enrollment, clock, signer):
    """A token is refused once its ttl has passed, and nothing is signed."""
    token = enrollment.create_token(60)["token"]
    clock.advance(60)
    with refused(INVALID_TOKEN):
        enrollment.enroll(token, "CSR", "n1")
    assert signer.signed == []


@pytest.mark.parametrize(
    "token",
    [
        "",
        "nope",
        "abcdef.0123456789abcdef0123456789abcdef",
        "ABCDEF.0123456789ABCDEF0123456789ABCDEF",
        None,
    ],
)
def test_unknown_tokens_all_read_the_same(enrollment, token):
    """Garbage and unknown tokens get exactly the message an expired one does."""
    with pytest.raises(RefusedByPolicy) as caught:
        enrollment.enroll(token, "CSR", "n1")
    assert caught.value.message == INVALID_TOKEN


def test_wrong_node_id_is_refused_without_spending_the_token(enrollment, signer):
    """A CSR for another id than the token names is refused, and the token still works."""
    token = enrollment.create_token(node_id="n1")["token"]
    with refused("does not allow node id 'n2'"):
        enrollment.enroll(token, "CSR", "n2")
    assert signer.signed == []
    assert enrollment.enroll(token, "CSR", "n1") == "CERT n1 #1"


def test_invalid_csr_node_id_is_invalid_params(enrollment):
    """A CSR asking for a malformed node id is -32602."""
    token = enrollment.create_token()["token"]
    with pytest.raises(InvalidParams):
        enrollment.enroll(token, "CSR", "../etc")


def test_enrolled_id_needs_a_token_naming_it(enrollment, store):
    """A general token cannot take an enrolled id; one created for that id can."""
    enrollment.enroll(enrollment.create_token()["token"], "CSR", "n1")
    general = enrollment.create_token()["token"]
    with refused("already enrolled"):
        enrollment.enroll(general, "CSR", "n1")
    enrollment.enroll(general, "CSR", "n2")  # not spent by the refusal
    enrollment.enroll(enrollment.create_token(node_id="n1")["token"], "CSR", "n1")
    assert store.identity("n1").cert_serial == 3
    assert store.is_revoked_serial(1)


def test_revoked_then_enrolled_again(enrollment, store):
    """A revoked id is refused until it enrolls with a token made for it; the old cert stays
    refused."""
    enrollment.enroll(enrollment.create_token()["token"], "CSR", "n1")
    enrollment.revoke("n1")
    with refused("revoked"):
        enrollment.check_node("n1", cert_serial=1)
    with refused("revoked"):
        enrollment.enroll(enrollment.create_token()["token"], "CSR", "n1")
    enrollment.enroll(enrollment.create_token(node_id="n1")["token"], "CSR", "n1")
    enrollment.check_node("n1", cert_serial=2)
    with refused("revoked"):
        enrollment.check_node("n1", cert_serial=1)


def test_signing_failure_spends_the_token(enrollment, store):
    """If signing fails the token is used up and nothing is recorded: one token, at most one
    certificate."""

    def broken(csr_pem, node_id):
        raise RuntimeError("CA key unreadable")

    enrollment.sign = broken
    token = enrollment.create_token()["token"]
    with pytest.raises(RuntimeError):
        enrollment.enroll(token, "CSR", "n1")
    assert store.identity("n1") is None
    enrollment.sign = FakeSigner()
    with refused(INVALID_TOKEN):
        enrollment.enroll(token, "CSR", "n1")


def test_no_ca_key_refuses_enroll_and_renew(store, clock):
    """An explorer without a signer refuses enrollment and renewal, saying why."""
    enrollment = Enrollment(store, clock)
    token = enrollment.create_token()["token"]
    with refused("no CA key"):
        enrollment.enroll(token, "CSR", "n1")
    with refused("no CA key"):
        enrollment.renew("n1", 1, "CSR")


def test_renew_from_the_current_certificate(enrollment, store):
    """Renewal with the current certificate returns a new one and records it."""
    enrollment.enroll(enrollment.create_token()["token"], "CSR", "n1")
    assert enrollment.renew("n1", 1, "CSR2") == "CERT n1 #2"
    identity = store.identity("n1")
    assert (identity.cert_serial, identity.previous_serial) == (2, 1)


def test_renew_with_a_stale_serial_is_refused(enrollment, signer):
    """A certificate that has already been renewed cannot renew again, and nothing is
    signed."""
    enrollment.enroll(enrollment.create_token()["token"], "CSR", "n1")
    enrollment.renew("n1", 1, "CSR")
    with refused("not the current one"):
        enrollment.renew("n1", 1, "CSR")
    assert len(signer.signed) == 2


def test_renew_with_a_revoked_certificate_is_refused(enrollment):
    """A revoked node cannot renew."""
    enrollment.enroll(enrollment.create_token()["token"], "CSR", "n1")
    enrollment.revoke("n1")
    with refused("revoked"):
        enrollment.renew("n1", 1, "CSR")


def test_renewal_lost_race_revokes_what_it_signed(enrollment, store, signer):
    """If the serial changes while signing, the fresh certificate is revoked, not handed
    out."""
    enrollment.enroll(enrollment.create_token()["token"], "CSR", "n1")

    def racing(csr_pem, node_id):
        store.renew_serial("n1", 1, 99, 0)  # another renewal lands first
        return signer(csr_pem, node_id)

    enrollment.sign = racing
    with refused("renewed meanwhile"):
        enrollment.renew("n1", 1, "CSR")
    assert store.is_revoked_serial(2)
    assert store.identity("n1").cert_serial == 99


def test_check_node_secret_rules(enrollment):
    """No secret is fine until one binds; then only that secret is accepted."""
    enrollment.check_node("n1")
    enrollment.check_node("n1", secret=SECRET)
    enrollment.check_node("n1", secret=SECRET)
    with refused("another secret"):
        enrollment.check_node("n1", secret="cd" * 32)
    with refused("carries none"):
        enrollment.check_node("n1")


def test_enrolled_node_is_refused_without_tls(enrollment):
    """Once enrolled, an id is refused over non-TLS transports even with its secret."""
    enrollment.check_node("n1", secret=SECRET)
    enrollment.enroll(enrollment.create_token(node_id="n1")["token"], "CSR", "n1")
    with refused("only over TLS"):
        enrollment.check_node("n1", secret=SECRET)
    enrollment.check_node("n1", secret=SECRET, cert_serial=1)


def test_tls_accepts_current_and_previous_but_not_older(enrollment):
    """Over TLS the current certificate and the one it renewed pass; older ones do not."""
    enrollment.enroll(enrollment.create_token()["token"], "CSR", "n1")
    enrollment.renew("n1", 1, "CSR")
    enrollment.check_node("n1", cert_serial=1)
    enrollment.check_node("n1", cert_serial=2)
    enrollment.renew("n1", 2, "CSR")
    with refused("revoked"):
        enrollment.check_node("n1", cert_serial=1)
    with refused("superseded"):
        enrollment.check_node("n1", cert_serial=77)


def test_offline_certificate_of_a_new_id_is_accepted(enrollment):
    """A certificate made offline for an id that never enrolled is accepted over TLS."""
    enrollment.check_node("n1", cert_serial=12345)


def test_revoked_node_secret_is_refused(enrollment):
    """After revocation the node's secret is refused, and no new one can bind the id."""
    enrollment.check_node("n1", secret=SECRET)
    enrollment.revoke("n1")
    with refused("revoked"):
        enrollment.check_node("n1", secret=SECRET)
    with refused("revoked"):
        enrollment.check_node("n1", secret="cd" * 32)
    with refused("revoked"):
        enrollment.check_node("n1")


def test_tokens_and_secrets_never_stored_in_clear(enrollment, store, tmp_path):
    """Neither a token, nor its secret half, nor a node secret appears in the state
    files."""
    token = enrollment.create_token(node_id="n1")["token"]
    used = enrollment.create_token()["token"]
    enrollment.enroll(used, "CSR", "n2")
    enrollment.check_node("n3", secret=SECRET)
    store.close()
    written = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert written  # the files were read
    for clear in (token, token.split(".")[1], used, used.split(".")[1], SECRET):
        assert clear.encode() not in written
    assert re.search(rb"n1", written)  # and the table is there to be searched


def _for(enrollment, node_id):
    return enrollment.create_token(node_id=node_id)["token"]


@pytest.mark.parametrize("known", ["secret", "registry", "revoked", "removed"])
def test_generic_token_refuses_every_known_id(enrollment, store, known):
    """A generic token is refused for an id bound to a secret, in the registry, revoked,
    or removed after an enrollment; a token made for the id enrolls it."""
    registered = False
    if known == "secret":
        enrollment.check_node("n1", secret=SECRET)
    elif known == "registry":
        registered = True
    elif known == "revoked":
        enrollment.revoke("n1")
    else:
        enrollment.enroll(_for(enrollment, "n1"), "CSR", "n1")
        store.forget_identity("n1")
    with refused("n1"):
        enrollment.enroll(enrollment.create_token()["token"], "CSR", "n1", registered)
    assert enrollment.enroll(_for(enrollment, "n1"), "CSR", "n1", registered)


def test_proxy_accepts_only_the_current_certificate(enrollment, clock):
    """The proxy's check: the current certificate passes; the one it renewed (still
    accepted inbound) and one made offline before the enrollment do not."""
    now = clock.seconds()
    assert enrollment.certificate_refusal("n1", 50, now - 10) is None  # made offline
    enrollment.enroll(_for(enrollment, "n1"), "CSR", "n1")
    enrollment.renew("n1", 1, "CSR", now)
    assert enrollment.certificate_refusal("n1", 2, now) is None
    enrollment.check_node("n1", cert_serial=1, not_before=now)
    assert "not the current" in enrollment.certificate_refusal("n1", 1, now)
    assert "not the current" in enrollment.certificate_refusal("n1", 50, now - 10)


def test_id_revocation_covers_offline_certificates_for_good(enrollment, store, clock):
    """Revoking an id refuses a certificate of it made offline before, through
    re-enrollment and removal; the certificate signed after the revocation passes,
    backdated as it is."""
    made = clock.seconds() - 60
    enrollment.check_node("n1", cert_serial=500, not_before=made)
    clock.advance(10)
    enrollment.revoke("n1")
    clock.advance(1)
    enrollment.enroll(_for(enrollment, "n1"), "CSR", "n1")
    store.forget_identity("n1")
    store.forget_node("n1")
    with refused("before the node was revoked"):
        enrollment.check_node("n1", cert_serial=500, not_before=made)
    with refused("before the node was revoked"):
        enrollment.renew("n1", 500, "CSR", made)
    assert enrollment.certificate_refusal("n1", 500, made)
    backdated = clock.seconds() - 300
    enrollment.check_node("n1", cert_serial=1, not_before=backdated)
    assert enrollment.certificate_refusal("n1", 1, backdated) is None
    # Made offline after the revocation: a new certificate, accepted.
    enrollment.check_node("n1", cert_serial=600, not_before=clock.seconds())
