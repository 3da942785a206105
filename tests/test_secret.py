"""
The node secret file: made once, kept private, refused when broken.
"""

import os
import stat

import pytest

from hero_compute.node.secret import SecretError, load_or_create_secret


def test_made_once_and_kept(tmp_path):
    """The first call makes a 64-hex secret; later calls return the same one."""
    first = load_or_create_secret(str(tmp_path / "state"))
    assert len(first) == 64 and int(first, 16) >= 0 and first == first.lower()
    assert load_or_create_secret(str(tmp_path / "state")) == first


def test_private_whatever_the_umask(tmp_path):
    """The file is 0600 and its directory 0700 even under a permissive umask."""
    old = os.umask(0)
    try:
        load_or_create_secret(str(tmp_path / "state"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "state" / "node_secret").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o700


def test_two_nodes_get_different_secrets(tmp_path):
    """Secrets are random, not derived from anything a peer could know."""
    assert load_or_create_secret(str(tmp_path / "a")) != load_or_create_secret(
        str(tmp_path / "b")
    )


@pytest.mark.parametrize("content", ["", "short", "G" * 64, "A" * 64])
def test_broken_file_is_refused_not_replaced(tmp_path, content):
    """A file that holds no secret is an error naming it, and is left as it was."""
    (tmp_path / "node_secret").write_text(content)
    with pytest.raises(SecretError) as e:
        load_or_create_secret(str(tmp_path))
    assert "node_secret" in str(e.value)
    assert (tmp_path / "node_secret").read_text() == content
