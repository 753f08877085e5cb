"""The waits the engine allows itself: budget from recompute, ceiling from the store."""

from __future__ import annotations

import pytest

from s3kv.config import parse_settings
from s3kv.deadlines import Deadlines, LatencyWindow

SETTINGS = parse_settings({"bucket": "bkt", "min_lookup_wait_s": 0.05, "min_load_wait_s": 0.05,
                           "max_cache_wait_s": 10.0,
                           "lookup_wait_fraction": 0.1, "load_wait_fraction": 1.0,
                           "latency_factor": 4.0})


def test_nothing_measured_waits_the_floor() -> None:
    d = Deadlines(SETTINGS)
    assert d.recompute_s(4096) is None
    assert d.lookup_s(4096) == pytest.approx(0.05)
    assert d.load_s(4096, 1 << 30) == pytest.approx(0.05)
    assert d.probe_s() == pytest.approx(0.05)  # min_load_wait_s


def test_first_requests_wait_what_the_store_took_at_start_up() -> None:
    """Before a prefill is timed, the budget is unknown: the wait is the floor,
    and the floor already follows the start-up read of a slow but healthy store."""
    d = Deadlines(SETTINGS)
    d.observe_round(0.1)  # the start-up read: slower than min_lookup_wait_s (0.05 s)
    assert d.lookup_s(4096) == pytest.approx(0.125)  # 1.25 x that (at most 4 x 0.05)
    assert d.probe_s() == pytest.approx(0.4)  # latency_factor x that
    d.observe_step(2000, 0.2)  # a fast engine: 0.1 ms per token
    assert d.lookup_s(4096) == pytest.approx(0.125)  # budget 41 ms: the floor rules


def test_budget_is_a_fraction_of_the_recompute_time() -> None:
    d = Deadlines(SETTINGS)
    d.observe_step(10, 1.0)  # too small a step to say anything about prefill
    assert d.recompute_s(100) is None
    d.observe_step(2000, 2.0)  # 1 ms per token
    assert d.recompute_s(4000) == pytest.approx(4.0)
    assert d.lookup_s(4000) == pytest.approx(0.4)  # 10% of 4 s
    assert d.load_s(4000, 1 << 20) == pytest.approx(4.0)  # all of it
    assert d.lookup_s(100) == pytest.approx(0.05)  # never below the floor
    assert d.load_s(100_000, 1 << 20) == pytest.approx(10.0)  # never above max_cache_wait_s


def test_a_store_that_is_normally_fast_is_given_up_on_sooner() -> None:
    d = Deadlines(SETTINGS)
    d.observe_step(2000, 2.0)
    for _ in range(20):
        d.observe_round(0.02)
    # 4 x 20 ms per round < 10% of 8 s.
    assert d.lookup_s(8000) == pytest.approx(0.08)
    assert d.probe_s() == pytest.approx(0.08)  # from the store, not the lookup floor
    d.observe_load(1 << 20, 0.01)
    assert d.load_s(8000, 1 << 20) == pytest.approx(0.05)  # 4 x 10 ms, floored
    assert d.load_s(8000, 10 << 20) == pytest.approx(0.4)


def test_latency_window_needs_samples_and_reports_a_high_percentile() -> None:
    w = LatencyWindow(size=100, min_samples=8)
    assert w.high() is None
    for x in range(7):
        w.observe(x / 100)
    assert w.high() == pytest.approx(0.06)  # few samples: the slowest seen
    for x in range(7, 100):
        w.observe(x / 100)
    assert w.high(0.95) == pytest.approx(0.94)
    assert w.high(0.5) == pytest.approx(0.49)


def test_loads_have_their_own_floor() -> None:
    d = Deadlines(parse_settings({"bucket": "bkt", "min_lookup_wait_s": 0.1,
                                  "min_load_wait_s": 1.5}))
    d.observe_step(2000, 0.2)  # 0.1 ms per token: 1000 tokens recompute in 0.1 s
    d.observe_round(0.01)
    assert d.lookup_s(1000) == pytest.approx(0.1)
    assert d.load_s(1000, 1 << 20) == pytest.approx(1.5)


def test_a_slow_but_healthy_store_raises_the_lookup_floor_to_its_usual_time() -> None:
    """A fast engine's budget is below one round trip to a far-away bucket; the
    floor follows what the store usually takes, so its answers are still hits."""
    d = Deadlines(parse_settings({"bucket": "bkt", "min_lookup_wait_s": 0.1,
                                  "min_load_wait_s": 1.0}))
    d.observe_step(2000, 0.1)  # 50 us per token: 10% of 4096 tokens is 20 ms
    assert d.lookup_s(4096) == pytest.approx(0.1)
    for _ in range(20):
        d.observe_round(0.15)
    assert d.lookup_floor_s() == pytest.approx(0.1875)  # 1.25 x the 99th percentile
    assert d.lookup_s(4096) == pytest.approx(0.1875)
    # Beyond 10 x min_lookup_wait_s a store is stalled, not slow-but-healthy, for a
    # lookup: the floor is min_lookup_wait_s, so a stall costs a request no more.
    for _ in range(40):
        d.observe_round(0.5)
    assert d.lookup_s(4096) == pytest.approx(0.4)  # at most 4 x min_lookup_wait_s
    for _ in range(40):
        d.observe_round(2.0)
    assert d.lookup_s(4096) == pytest.approx(0.1)
