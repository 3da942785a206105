"""
The one retry-delay rule (hero_compute.rpc.backoff): exponential steps up to a cap,
each delay between half and all of its step, with the randomness injected.
"""

import pytest

from hero_compute.rpc.backoff import retry_delay, retry_step


def test_steps_double_from_the_first_up_to_the_cap():
    """The step doubles per failure after the first, and stops at the cap."""
    assert [retry_step(n, 0.5, 6.0) for n in range(1, 7)] == [0.5, 1, 2, 4, 6, 6]


def test_equal_jitter_between_half_and_all_of_the_step():
    """rand() = 0 gives half the step, rand() -> 1 the whole step, 0.5 three quarters."""
    assert retry_delay(3, 1.0, 60.0, lambda: 0.0) == 2.0
    assert retry_delay(3, 1.0, 60.0, lambda: 0.5) == 3.0
    assert retry_delay(3, 1.0, 60.0, lambda: 1.0) == 4.0


def test_a_long_outage_stays_at_the_cap():
    """Thousands of failures neither overflow nor pass the cap."""
    assert retry_delay(10_000, 0.2, 5.0, lambda: 1.0) == 5.0
    assert retry_delay(10_000, 0.2, 5.0, lambda: 0.0) == 2.5


def test_jitter_spreads_a_fleet():
    """With the real random source, delays of one failure count differ and stay within
    [step/2, step]."""
    delays = {retry_delay(4, 1.0, 60.0) for _ in range(50)}
    assert len(delays) > 1
    assert all(4.0 <= d <= 8.0 for d in delays)


@pytest.mark.parametrize("failures", [0, 1])
def test_first_failure_waits_about_the_first_step(failures):
    """The first failure (and a count of 0, read as the first) waits up to ``first``."""
    assert retry_delay(failures, 2.0, 60.0, lambda: 1.0) == 2.0
