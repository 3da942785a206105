"""
Attacks on this round's surface (console and event WebSockets, image imports, the audit
log, the PostgreSQL store) that worked before their fix, each made against real
processes and shown refused, with nothing changed.
"""

import pytest

from .test_startup_errors import assert_clean_failure, run_twistd

PASSWORD = "s3cr%zzetpw"


@pytest.mark.parametrize(
    "uri",
    [
        # libpq echoes a bad percent-encoded token, and the whole URI for a bad
        # bracketed host, in its parse errors.
        f"postgresql://hero:{PASSWORD}@127.0.0.1:1/fleet",
        f"postgresql://hero:{PASSWORD}@[127.0.0.1:1/fleet",
    ],
)
def test_unparsable_database_uri_never_prints_its_password(tmp_path, uri):
    """An EXPLORER_DATABASE URI libpq cannot parse fails start-up without its password."""
    status, output = run_twistd(
        ["explorer"],
        {
            "HERO_SOCKET_DIR": str(tmp_path),
            "EXPLORER_STATE_DIR": str(tmp_path / "state"),
            "EXPLORER_DATABASE": uri,
        },
    )
    assert "s3cr" not in output, output
    assert_clean_failure(status, output, "postgresql://")
