"""
Name resolution for the proxy that slow names cannot starve (CONTRACT §7).

The system resolver blocks a thread per lookup; a dozen nodes advertising names that
never resolve used to fill the reactor's ten threads, and every other name-addressed
node then waited.  Here lookups run in a pool of their own, one at a time per name
(callers of the same name share it), each bounded by a timeout, and answers are cached,
failures too, for a while: a dead name costs one thread once per ``negative_ttl``.
"""

import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

log = Logger()


class ResolveError(Exception):
    """A name did not resolve (or not in time); the message says which and why."""


def _lookup(host, port):
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


class CachingResolver:
    """
    :param reactor: the reactor (timers, and its shutdown stops the pool)
    :param threads: lookups that may run at once
    :param timeout: seconds a lookup may take before its callers are told it failed
    :param ttl: seconds an answer is reused
    :param negative_ttl: seconds a failure is reused
    :param lookup: ``lookup(host, port) -> [ip, ...]``, blocking (tests inject one)
    """

    def __init__(
        self,
        reactor: Any,
        threads: int = 16,
        timeout: float = 5.0,
        ttl: float = 30.0,
        negative_ttl: float = 30.0,
        lookup: Callable[[str, int], list[str]] = _lookup,
    ) -> None:
        self._reactor = reactor
        self._timeout = timeout
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._lookup = lookup
        self._pool = ThreadPool(minthreads=0, maxthreads=threads, name="hero-resolver")
        self._started = False
        # (host, port) -> (expires, addresses or ResolveError)
        self._cache: dict[tuple[str, int], tuple[float, Any]] = {}
        # (host, port) -> [waiting Deferreds]
        self._pending: dict[tuple[str, int], list[defer.Deferred[Any]]] = {}

    def resolve(self, host: str, port: int) -> defer.Deferred[list[str]]:
        """:return: a Deferred of the addresses of ``host``, failing with ResolveError"""
        key = (host, port)
        now = self._reactor.seconds()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            answer = cached[1]
            if isinstance(answer, ResolveError):
                return defer.fail(answer)
            return defer.succeed(answer)
        waiter: defer.Deferred[list[str]] = defer.Deferred()
        waiting = self._pending.get(key)
        if waiting is not None:
            waiting.append(waiter)
            return waiter
        self._pending[key] = [waiter]
        if not self._started:
            self._pool.start()
            self._reactor.addSystemEventTrigger("during", "shutdown", self._pool.stop)
            self._started = True
        d = threads.deferToThreadPool(self._reactor, self._pool, self._lookup, host, port)
        d.addTimeout(self._timeout, self._reactor)
        d.addCallbacks(
            self._answered, self._failed, callbackArgs=(key,), errbackArgs=(key,)
        )
        return waiter

    def _answered(self, addresses, key) -> None:
        self._settle(key, list(addresses), self._ttl)

    def _failed(self, failure, key) -> None:
        if failure.check(defer.TimeoutError, defer.CancelledError):
            reason = f"no answer within {self._timeout:g} s"
        else:
            reason = failure.getErrorMessage()
        self._settle(
            key, ResolveError(f"cannot resolve {key[0]}: {reason}"), self._negative_ttl
        )

    def _settle(self, key, answer, ttl) -> None:
        self._cache[key] = (self._reactor.seconds() + ttl, answer)
        if len(self._cache) > 10_000:
            # Bounded: a flood of distinct names must not grow the cache for ever.
            now = self._reactor.seconds()
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
        for waiter in self._pending.pop(key, []):
            if isinstance(answer, ResolveError):
                waiter.errback(answer)
            else:
                waiter.callback(answer)
