"""
Replay of the event stream through the dashboard (CONTRACT §10, §11), from the
attacker's side, against a real ``twistd explorer --ui`` with its 10,000-event ring
full: a session's ``?since=0`` readers that never read are closed by the explorer as its
own readers are, and then cut by the dashboard, instead of the kernel taking the whole
replay for each.
"""

import select
import socket
import time
import urllib.parse

from hero_compute.explorer.events import CLOSE_GRACE, SEND_BUFFER, STALL

from .support import result
from .test_events_replay import fill_ring, read_all
from .test_ui import login, start_explorer
from .test_ui_console import upgrade

#: Readers that never read, all of one viewer's session.
READERS = 10


def silent_reader(url, cookie):
    """A browser's ``?since=0`` upgrade through the dashboard on a socket with a small
    receive buffer, which then reads nothing (not even the answer)."""
    parts = urllib.parse.urlsplit(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((parts.hostname, parts.port))
    sock.sendall(upgrade(url, cookie, path="/v1/events?since=0"))
    return sock


def ended_by(socks, deadline):
    """Wait, reading nothing, until every socket's peer has closed or reset it (poll's
    HUP, ERR or RDHUP), or until ``deadline`` (then the reads show what is open)."""
    ended = select.POLLHUP | select.POLLERR | select.POLLRDHUP
    waiting = {s.fileno(): s for s in socks}
    poll = select.poll()
    for fd in waiting:
        poll.register(fd, ended)
    while waiting and time.monotonic() < deadline:
        for fd, _ in poll.poll(max(deadline - time.monotonic(), 0) * 1000):
            poll.unregister(fd)
            waiting.pop(fd, None)


def test_dashboard_replay_readers_that_never_read_are_cut(twistd, short_tmp):
    """With the ring full, 10 dashboard ?since=0 readers of one viewer's session that
    read nothing: explorer.info over Unix still answers within 1 s, and within STALL +
    CLOSE_GRACE + 8 s of opening, having read nothing, each finds its connection cut,
    what was held for it dropped (less than SEND_BUFFER reached it).  The old code: the
    browser's socket took the whole replay, so the explorer never saw it full; it read
    live, never closed, and reading found the whole 1 MB replay."""
    _, unix, _, startup = start_explorer(twistd, short_tmp)
    viewer = login(startup)
    fill_ring(unix)
    socks = []
    try:
        started = time.monotonic()
        socks = [silent_reader(startup, viewer) for _ in range(READERS)]
        took = time.monotonic()
        assert result(unix, "explorer.info", timeout=60)
        took = time.monotonic() - took
        assert took < 1.0, f"explorer.info took {took:.1f} s behind {READERS} replays"
        # Read nothing until the explorer has closed each (STALL after its connections
        # filled, within a second or two) and cut it (CLOSE_GRACE at the latest), and
        # the dashboard has seen that: each connection's end is seen by poll, without
        # reading.  Reading sooner would make it a reader that reads.
        ended_by(socks, started + STALL + CLOSE_GRACE + 8)
        everything = read_all(socks, time.monotonic() + 5)
    finally:
        for s in socks:
            s.close()
    for data in everything:
        assert data.startswith(b"HTTP/1.1 101"), data[:100]
        assert len(data) < SEND_BUFFER, f"{len(data)} bytes held for a reader that left"
    # The explorer serves on, and a reader that reads gets the stream.
    assert result(unix, "explorer.info", timeout=5)
    reader = silent_reader(startup, viewer)
    try:
        reader.settimeout(10)
        assert reader.recv(65536).startswith(b"HTTP/1.1 101")
    finally:
        reader.close()


class _Side:
    """A connection's end as the watcher sees it: its descriptor, and whether it was cut."""

    def __init__(self, fd):
        self.fd, self.aborted = fd, False

    def fileno(self):
        return self.fd

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass

    def abortConnection(self):
        self.aborted = True


def test_a_full_browser_is_cut_when_the_explorers_side_is_already_closed():
    """
    While the browser is full, the watcher finds the explorer's connection closed (lost
    on a failed write, its descriptor gone): the browser's side is cut too, not left
    waiting to drain for ever, and no timer is left.
    """
    from twisted.internet.task import Clock

    from hero_compute.explorer.ui_watch import WATCH, Watched

    clock, explorer, browser = Clock(), _Side(7), _Side(8)
    watched = Watched(explorer, browser, clock)
    watched.pauseProducing()
    explorer.fd = -1
    clock.advance(WATCH)
    assert browser.aborted
    assert clock.getDelayedCalls() == []
