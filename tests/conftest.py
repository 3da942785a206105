"""
Shared fixtures: failing tests on logged errors, real twistd processes that are always
stopped, the JSON-RPC spec server, and network namespaces for multi-host tests.
"""

import pytest
from twisted.logger import LogLevel, globalLogPublisher

from .guest import guest  # noqa: F401  (the session fixture of the test guest)
from .netns import Lab, netns_available
from .pgserver import PgServer, binaries
from .spec_server import SpecServer
from .support import Twistd, make_short_tmp, remove_tmp


class LoggedErrors:
    """Errors logged in this process during a test; a test that expects some flushes
    them."""

    def __init__(self):
        self.events = []

    def __call__(self, event):
        if event.get("log_failure") is not None or event.get("log_level") in (
            LogLevel.error,
            LogLevel.critical,
        ):
            self.events.append(event)

    def flush(self, exception_type=None):
        """
        Take the logged errors (of one exception type, if given) as expected.

        :return: the flushed events
        """
        taken = [
            e
            for e in self.events
            if exception_type is None
            or (e.get("log_failure") is not None and e["log_failure"].check(exception_type))
        ]
        self.events = [e for e in self.events if e not in taken]
        return taken


@pytest.fixture(autouse=True)
def logged_errors():
    """
    Fail a test that logged an error it did not flush: pytest-twisted, unlike trial,
    would otherwise let an unhandled failure pass silently.
    """
    errors = LoggedErrors()
    globalLogPublisher.addObserver(errors)
    yield errors
    globalLogPublisher.removeObserver(errors)
    if errors.events:
        from twisted.logger import formatEvent

        details = "\n".join(
            formatEvent(e)
            + ("\n" + e["log_failure"].getTraceback() if e.get("log_failure") else "")
            for e in errors.events
        )
        pytest.fail(f"errors were logged during the test:\n{details}")


@pytest.fixture
def twistd():
    """
    Start real twistd processes: ``twistd(args, env=..., netns=...)``; all are stopped
    (and their output shown on failure) at the end of the test.
    """
    started = []

    def start(args, env=None, netns=None, cwd=None):
        process = Twistd(args, env=env, netns=netns, cwd=cwd)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def short_tmp():
    """
    A short temporary directory, removed at the end: Unix socket paths are limited to
    107 bytes, which pytest's own tmp_path can exceed.
    """
    path = make_short_tmp()
    yield path
    remove_tmp(path)


@pytest.fixture(scope="module")
def spec_server():
    """The spec server, one process for the whole module."""
    directory = make_short_tmp("spec-")
    server = SpecServer(f"{directory}/spec.sock")
    yield server
    server.stop()
    remove_tmp(directory)


@pytest.fixture(params=["unix", "tcp"])
def uri(request, spec_server):
    """The spec server's Unix socket URI, then its TCP (IPv4) URI."""
    return getattr(spec_server, request.param)


@pytest.fixture
def lab():
    """A fresh switch for test hosts; skipped where namespaces cannot be made."""
    reason = netns_available()
    if reason:
        pytest.skip(reason)
    lab = Lab()
    try:
        yield lab
    finally:
        lab.destroy()


@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL server for the whole session, on a Unix socket in a temporary
    directory; stopped and removed at the end."""
    if binaries() is None:
        pytest.fail("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    server = PgServer()
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.remove()
