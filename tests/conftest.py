"""
Shared fixtures: failing tests on logged errors and on a dirty reactor, real twistd
processes that are always stopped, the JSON-RPC spec server, the fleet's certificates,
and network namespaces for multi-host tests.
"""

import pathlib

import pytest
import pytest_twisted
from twisted.logger import LogLevel, globalLogPublisher

from hero_compute import pki

from .debian_image import debian  # noqa: F401  (session fixture: a Debian 12 disk)
from .guest import guest  # noqa: F401  (session fixture: the test guest)
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


def _reactor_state():
    """:return: the reactor's pending delayed calls and its selectables (sockets), not
    counting its own (the waker that threads use to wake it)"""
    from twisted.internet import reactor

    calls = {c for c in reactor.getDelayedCalls() if c.active()}
    selectables = {
        s
        for s in set(reactor.getReaders()) | set(reactor.getWriters())
        # The reactor's wakers (threads, SIGCHLD) are its own, made once and kept.
        if not type(s).__name__.endswith("Waker")
    }
    return calls, selectables


@pytest.fixture(autouse=True)
def clean_reactor():
    """
    Fail a test that leaves the reactor dirty, as trial does: delayed calls still
    pending, or ports and connections still open, that it made (what was there before
    it, a module's server for instance, does not count).  Closing takes a turn or two,
    so a few turns are given first; what is left is then cleaned up, so that the next
    test starts clean, and named.
    """
    calls, selectables = _reactor_state()
    yield

    def left():
        now_calls, now_selectables = _reactor_state()
        return now_calls - calls, now_selectables - selectables

    new_calls, new_selectables = left()
    if new_calls or new_selectables:
        from twisted.internet import reactor, task

        # A TLS close (close_notify both ways) takes several turns, more on a loaded
        # machine: up to 5 s, polled every 10 ms (only a test that did leave something
        # waits it out; 2 s was little for the turns of a loaded machine).
        for _ in range(500):
            pytest_twisted.blockon(task.deferLater(reactor, 0.01, lambda: None))
            new_calls, new_selectables = left()
            if not (new_calls or new_selectables):
                return
    if new_calls or new_selectables:
        for call in new_calls:
            call.cancel()
        for selectable in new_selectables:
            if hasattr(selectable, "stopListening"):
                selectable.stopListening()
            elif hasattr(selectable, "abortConnection"):
                selectable.abortConnection()
            else:
                selectable.loseConnection()
        named = [f"  pending {c}" for c in new_calls]
        named += [f"  open {s!r}" for s in new_selectables]
        pytest.fail("the test left the reactor dirty:\n" + "\n".join(named))


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


#: The fleet's certificates made once per session: ``role/name`` for each.
FLEET = (
    "explorer/e1",
    "client/c",
    "client/ops",
    "node/a",
    "node/b",
    "node/node-a",
    "node/node-b",
)


@pytest.fixture(scope="session")
def fleet_pki(tmp_path_factory):
    """The fleet CA and its certificates, made once (key generation is the slow part);
    see :func:`fleet`."""
    base = tmp_path_factory.mktemp("fleet")
    ca_dir = base / "ca"
    made = {
        "pin": pki.create_ca(str(ca_dir)),
        "ca_dir": str(ca_dir),
        "ca": str(ca_dir / pki.CA_FILE),
        "ca_key": str(ca_dir / pki.CA_KEY_FILE),
    }
    for who in FLEET:
        role, name = who.split("/")
        made[who] = pki.create_cert(
            str(ca_dir), role, name, ips=["127.0.0.1"], out=str(base / f"{role}-{name}")
        )
    made["e1"] = made["explorer/e1"]
    # Another CA, whose certificates name fleet identities: strangers.
    other = base / "other"
    pki.create_ca(str(other))
    made["other-ca"] = str(other / pki.CA_FILE)
    made["other/node/a"] = pki.create_cert(
        str(other), "node", "a", out=str(base / "other-node-a")
    )
    made["stranger"] = pki.create_cert(
        str(other), "client", "ops", out=str(base / "other-client-ops")
    )
    return made


@pytest.fixture
def fleet(fleet_pki, short_tmp):
    """
    The fleet's certificates, the one fixture for them: ``"ca"``, ``"ca_dir"``,
    ``"ca_key"``, ``"pin"``, ``"authority"`` (a :class:`~hero_compute.pki.
    CertificateAuthority`), ``"role/name"`` -> ``(cert, key)`` paths for each of
    :data:`FLEET` (``"e1"`` the explorer's, naming 127.0.0.1 too), and a foreign CA's
    ``"other-ca"``, ``"other/node/a"`` and ``"stranger"`` (client/ops).  ``"dir"``: a
    short directory (a :class:`pathlib.Path`) of the test's own, for what it writes.
    The dict is the test's: what it adds stays there.
    """
    return {
        **fleet_pki,
        "dir": pathlib.Path(short_tmp),
        "authority": pki.CertificateAuthority.from_directory(fleet_pki["ca_dir"]),
    }


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
