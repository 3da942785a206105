"""
The node secret (CONTRACT §6): 256 random bits made once, kept in
``HERO_STATE_DIR/node_secret`` (0600), sent in every heartbeat and leave.

The explorer binds a node id to the SHA-256 of this text on first sight, so on any
transport no other peer can heartbeat or leave as this node.  Losing the file means the
node must be removed on the explorer (or enroll again) before it is accepted under its
old id.
"""

import errno
import os
import re
import secrets

FILENAME = "node_secret"
_VALID = re.compile(r"[0-9a-f]{64}")


class SecretError(Exception):
    """The secret file exists but cannot be used; the message says what to do."""


def load_or_create_secret(state_dir: str) -> str:
    """
    :param state_dir: the node's state directory (created if missing, 0700)
    :return: the node secret, 64 lowercase hex characters
    :raise SecretError: when the file is unreadable or holds something else
    """
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = os.path.join(state_dir, FILENAME)
    secret = secrets.token_hex(32)
    try:
        # O_EXCL: two nodes started on one state dir at once still end with one secret.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise SecretError(
                f"cannot create the node secret {path}: {e.strerror}"
            ) from None
        return _read(path)
    try:
        os.write(fd, (secret + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return secret


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise SecretError(f"cannot read the node secret {path}: {e}") from None
    if not _VALID.fullmatch(text):
        raise SecretError(
            f"{path} does not hold a node secret (64 lowercase hex characters); "
            "move it away to make a new one, then remove this node on the explorer "
            "(hero-compute remove NODE_ID) so it is accepted under the new secret"
        )
    return text
