"""
What a node or an operator hands the explorer to be trusted, in the form the explorer
checks and keeps: join tokens (made, and hashed for the store), node secrets (hashed),
token lifetimes, node ids, and the node id a CSR asks for.  What the explorer decides
with them is :mod:`.enroll`'s.

A token is ``<6 chars>.<32 chars>`` of ``[a-z0-9]`` (like a kubeadm bootstrap token,
with a 165-bit secret part instead of 83); only its SHA-256 is stored.
"""

import hashlib
import math
import re
import secrets
import string

from cryptography import x509
from cryptography.x509.oid import NameOID

from hero_compute.rpc.errors import InvalidParams

#: Token lifetime bounds and default, in seconds.
MIN_TTL = 1
MAX_TTL = 30 * 24 * 3600
DEFAULT_TTL = 3600

TOKEN_ALPHABET = string.ascii_lowercase + string.digits
TOKEN_PATTERN = re.compile(r"[a-z0-9]{6}\.[a-z0-9]{32}")
NODE_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")


def new_token() -> str:
    """:return: a fresh random join token, ``<6 chars>.<32 chars>``"""

    def part(n: int) -> str:
        return "".join(secrets.choice(TOKEN_ALPHABET) for _ in range(n))

    return f"{part(6)}.{part(32)}"


def hash_token(token: str) -> str:
    """:return: the hex SHA-256 of a whole token, the only form the store keeps"""
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def hash_secret(secret: str) -> str:
    """:return: the hex SHA-256 of a node secret's text, the only form the store keeps"""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def check_ttl(ttl: object) -> float:
    """
    :param ttl: a token lifetime in seconds
    :return: ``ttl``, when it is a finite number within :data:`MIN_TTL`..:data:`MAX_TTL`
    :raises InvalidParams: otherwise
    """
    if (
        not isinstance(ttl, (int, float))
        or isinstance(ttl, bool)
        or not math.isfinite(ttl)
        or not MIN_TTL <= ttl <= MAX_TTL
    ):
        raise InvalidParams(
            f"ttl must be a number of seconds from {MIN_TTL} to "
            f"{MAX_TTL} (30 days), not {ttl!r}"
        )
    return ttl


def check_node_id(node_id: object) -> str:
    """
    :return: ``node_id``, when it is 1 to 64 of ``[A-Za-z0-9._-]``
    :raises InvalidParams: otherwise
    """
    if not isinstance(node_id, str) or not NODE_ID_PATTERN.fullmatch(node_id):
        raise InvalidParams(
            f"node_id must be 1 to 64 of A-Z a-z 0-9 . _ -, not {node_id!r}"
        )
    return node_id


def csr_node_id(csr_pem: str) -> str:
    """
    :param csr_pem: a PEM certificate signing request
    :return: the node id it asks for (its subject's common name)
    :raise InvalidParams: not a CSR, or no valid node id in it
    """
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode("ascii", "replace"))
        names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        raise InvalidParams("csr: not a PEM certificate signing request") from None
    if len(names) != 1:
        raise InvalidParams("csr: its subject must hold one common name, the node id")
    return check_node_id(names[0].value)
