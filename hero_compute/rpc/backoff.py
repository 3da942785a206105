"""
Retry delays, the one rule behind every reconnection of the package: heartbeats to an
explorer (:mod:`hero_compute.node.heartbeat`), enrollment and renewal of a node's
certificate (:mod:`hero_compute.node.tls`), a shared store's watcher
(:mod:`hero_compute.explorer.store.watch`).

Exponential steps up to a cap, with *equal jitter*: the delay is between half and all
of the step.  The jitter keeps a fleet that lost its explorer (or its database) from
coming back in lockstep; its fixed half keeps the delay growing with the failures, which
full jitter (anywhere between 0 and the step) does not.
"""

from __future__ import annotations

import random
from collections.abc import Callable


def retry_step(failures: int, first: float, cap: float) -> float:
    """
    The step before jitter: ``first`` doubled per failure after the first, at most
    ``cap``.

    :param failures: consecutive failures so far (1 after the first)
    :param first: the step after the first failure, in seconds
    :param cap: the longest step, in seconds
    """
    # The exponent is bounded so that a long outage does not overflow a float.
    return min(cap, first * 2.0 ** min(max(failures, 1) - 1, 60))


def retry_delay(
    failures: int,
    first: float,
    cap: float,
    rand: Callable[[], float] = random.random,
) -> float:
    """
    Seconds to wait after the ``failures``-th consecutive failure: between half and all
    of :func:`retry_step`.

    :param failures: consecutive failures so far (1 after the first)
    :param first: the step after the first failure, in seconds
    :param cap: the longest step, in seconds
    :param rand: source of uniform numbers in [0, 1), injected by tests
    """
    step = retry_step(failures, first, cap)
    return step / 2 + step / 2 * rand()
