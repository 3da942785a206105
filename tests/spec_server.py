"""
A tiny JSON-RPC server for the transport's end-to-end tests: the example methods of the
JSON-RPC 2.0 specification (section 7), plus a few that misbehave, served by
:class:`hero_compute.rpc.dispatch.Dispatcher` (no schema) on a Unix socket, TCP over IPv4
and TCP over IPv6 at once.

Run as ``python tests/spec_server.py /abs/path.sock``; it logs one ``listening on URI``
line per listener to stdout.  :obj:`SpecServer` runs it as a subprocess for tests.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def build_dispatcher(reactor):
    """
    The dispatcher with the specification's example methods.

    :param reactor: the reactor, for the method whose result comes later
    :return: a :class:`hero_compute.rpc.dispatch.Dispatcher`
    """
    from twisted.internet import task

    from hero_compute.rpc.dispatch import Dispatcher

    rpc = Dispatcher()
    notified = []

    def subtract(minuend, subtrahend):
        return minuend - subtrahend

    def sum_(*numbers):
        return sum(numbers)

    def update(*values):
        notified.append(["update", list(values)])

    def notify_hello(*values):
        notified.append(["notify_hello", list(values)])

    def notify_sum(*values):
        notified.append(["notify_sum", list(values)])

    def get_data():
        return ["hello", 5]

    def boom():
        raise RuntimeError("secret detail /etc/shadow")

    def unserialisable():
        return object()

    def later(delay, value):
        return task.deferLater(reactor, delay, lambda: value)

    def notifications():
        # So that tests can tell a notification really ran, not just went unanswered.
        return notified

    def peer(context):
        return {"transport": context.transport, "peer": context.peer}

    for name, func in [
        ("subtract", subtract),
        ("sum", sum_),
        ("update", update),
        ("notify_hello", notify_hello),
        ("notify_sum", notify_sum),
        ("get_data", get_data),
        ("boom", boom),
        ("unserialisable", unserialisable),
        ("later", later),
        ("notifications", notifications),
    ]:
        rpc.register(name, func)
    rpc.register("peer", peer, context=True)
    return rpc


def main(path):
    """Serve on ``path``, 127.0.0.1 and ::1 (ephemeral ports) until SIGTERM."""
    sys.path.insert(0, ROOT)
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from hero_compute.rpc.http_server import make_factory
    from hero_compute.rpc.listen import Listen
    from hero_compute.rpc.listeners import Listeners

    sys.stdout.reconfigure(line_buffering=True)
    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(sys.stdout)], redirectStandardIO=False
    )
    site = make_factory(build_dispatcher(reactor))
    listeners = Listeners(
        site,
        [
            Listen.unix(path),
            "tcp:0:interface=127.0.0.1",
            r"tcp6:0:interface=\:\:1",
        ],
        reactor=reactor,
    )
    listeners.startService()
    reactor.addSystemEventTrigger("before", "shutdown", listeners.stopService)
    reactor.run()


class SpecServer:
    """
    The spec server as a real subprocess, its output collected line by line.

    :param path: the Unix socket path to serve on
    """

    def __init__(self, path):
        env = dict(os.environ, PYTHONPATH=ROOT)
        self.lines = []
        self._cond = threading.Condition()
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "spec_server.py"), path],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        uris = self.listening(3)
        self.unix = next(u for u in uris if u.startswith("unix://"))
        self.tcp = next(u for u in uris if u.startswith("tcp://") and "[" not in u)
        self.tcp6 = next(u for u in uris if u.startswith("tcp://["))

    def _read(self):
        for line in self.process.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    @property
    def output(self):
        """All output so far."""
        with self._cond:
            return "\n".join(self.lines)

    def listening(self, count, timeout=15.0):
        """:return: the URIs of the first ``count`` ``listening on`` lines"""
        regex = re.compile(r"listening on (\S+)")
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m.group(1) for m in map(regex.search, self.lines) if m]
                if len(found) >= count:
                    return found[:count]
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.process.poll() is not None:
                    raise AssertionError(f"spec server did not listen:\n{self.output}")
                self._cond.wait(min(remaining, 0.2))

    def wait_for_output(self, text, timeout=5.0):
        """Wait until ``text`` appears in the output; raise AssertionError otherwise."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while text not in "\n".join(self.lines):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{text!r} not in output:\n{self.output}")
                self._cond.wait(min(remaining, 0.2))

    def stop(self):
        """SIGTERM, then SIGKILL if it does not exit within 10 s."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        return self.process.returncode


if __name__ == "__main__":
    main(sys.argv[1])
