"""How long waiting for the cache is worth it.

A lookup or a load pays off only while it can still beat recomputing the same
tokens, and the engine knows both sides of that comparison: its own prefill
speed (seconds per token of the steps it runs) and the store's latency and
transfer time (from the requests it makes). Every wait is therefore bounded
by

* a budget: a fraction of the estimated recompute time of the tokens at stake
  (``lookup_wait_fraction``, ``load_wait_fraction``);
* a ceiling: ``latency_factor`` times what the store normally takes (a high
  percentile of recent lookup round trips; the usual seconds per byte of loads),
  so a store that has stalled is noticed long before the budget runs out;
* a floor, ``min_lookup_wait_s`` for lookups and ``min_load_wait_s`` for
  loads, so that short prompts on fast engines still get a chance at a hit,
  and an absolute bound on any wait, ``max_cache_wait_s``, for operators. A
  chance at a hit means at least what the store takes to answer 99 rounds in
  100 (hedged reads, :mod:`s3kv.store.hedged`, have already cut its tail):
  against a store that is slow but healthy (a bucket in another region,
  disks under load, a share of slow answers), the lookup floor rises to
  ``TYPICAL_FACTOR`` times the 99th percentile of its round trips. Only so
  far, though: up to ``FLOOR_STRETCH`` times ``min_lookup_wait_s``. A store
  whose usual round trip is beyond ``STALLED_STRETCH`` times
  ``min_lookup_wait_s`` is not "slow but healthy" for a lookup but stalled,
  and waiting for it is what the floor exists to bound: the floor is
  ``min_lookup_wait_s`` again.

Before the engine has timed a prefill, the recompute side is unknown and
the wait is the floor, which follows the store's latency from its first
sample on: the engine reads its namespace document back at start-up, on the
connection its write set up, so a healthy cold start against a slow but
healthy store is not a miss.
"""

from __future__ import annotations

import math
import threading
from collections import deque

from s3kv.config import Settings

# Steps this small are dominated by fixed per-step costs: they say little
# about what a prefill costs per token.
_MIN_STEP_TOKENS = 256
_EWMA_ALPHA = 0.2
# A round trip within this many times the store's 99th percentile is "as usual".
TYPICAL_FACTOR = 1.25
TYPICAL_QUANTILE = 0.99
# The lookup floor follows a slow store up to this many times min_lookup_wait_s;
# a store whose usual round trip is beyond STALLED_STRETCH times
# min_lookup_wait_s is not slow but stalled, and gets min_lookup_wait_s.
FLOOR_STRETCH = 4.0
STALLED_STRETCH = 10.0


class _Ewma:
    """Exponentially weighted mean: follows drift (clocks, load) without a window."""

    def __init__(self, alpha: float = _EWMA_ALPHA) -> None:
        self._alpha = alpha
        self._value: float | None = None
        self._lock = threading.Lock()

    def observe(self, x: float) -> None:
        with self._lock:
            self._value = x if self._value is None else (
                self._value + self._alpha * (x - self._value))

    @property
    def value(self) -> float | None:
        with self._lock:
            return self._value


class LatencyWindow:
    """Recent latency samples; a high percentile of them is "normal, at worst".

    Samples arrive from the I/O thread and are read from the scheduler's: a
    bounded deque is safe for that, and copying it out costs microseconds.
    """

    def __init__(self, size: int = 256, min_samples: int = 8) -> None:
        self._samples: deque[float] = deque(maxlen=size)
        self._min = min_samples

    def observe(self, seconds: float) -> None:
        self._samples.append(seconds)

    def high(self, q: float = 0.95) -> float | None:
        """The ``q`` quantile; with few samples, the slowest seen (None: no samples)."""
        samples = sorted(self._samples)
        if not samples:
            return None
        if len(samples) < self._min:
            return samples[-1]
        return samples[min(len(samples) - 1, math.ceil(q * len(samples)) - 1)]


class Deadlines:
    """The engine's estimates of recompute and store time, and the waits they allow."""

    def __init__(self, settings: Settings) -> None:
        self._s = settings
        self._seconds_per_token = _Ewma()
        self._seconds_per_byte = _Ewma()
        self.rounds = LatencyWindow()

    # --- measurements -----------------------------------------------------------

    def observe_step(self, tokens: int, seconds: float) -> None:
        """One engine step: ``tokens`` scheduled, ``seconds`` from schedule to output."""
        if tokens >= _MIN_STEP_TOKENS and seconds > 0:
            self._seconds_per_token.observe(seconds / tokens)

    def observe_round(self, seconds: float) -> None:
        """One lookup round trip (a window of manifest GETs, answered)."""
        self.rounds.observe(seconds)

    def observe_load(self, nbytes: int, seconds: float) -> None:
        """One request's loads, from issue to reported done."""
        if nbytes > 0 and seconds > 0:
            self._seconds_per_byte.observe(seconds / nbytes)

    # --- estimates ----------------------------------------------------------------

    def recompute_s(self, tokens: int) -> float | None:
        """Estimated prefill time of ``tokens`` on this engine (None until measured)."""
        spt = self._seconds_per_token.value
        return None if spt is None else spt * tokens

    def _bounded(self, budget: float | None, ceiling: float | None,
                 floor: float | None = None) -> float:
        floor = self._s.min_lookup_wait_s if floor is None else floor
        wait = math.inf
        if budget is not None:
            wait = budget
        if ceiling is not None:
            wait = min(wait, ceiling)
        if math.isinf(wait):
            wait = floor  # nothing measured yet: the conservative default
        return min(self._s.max_cache_wait_s, max(floor, wait))

    def lookup_s(self, tokens: int) -> float:
        """How long a lookup that could save ``tokens`` tokens may go without progress.

        The clock restarts at every round that finds committed chunks: a round
        that answers saves far more recompute than it took, so only a round
        that does not answer is waiting that may be wasted."""
        recompute = self.recompute_s(tokens)
        budget = None if recompute is None else self._s.lookup_wait_fraction * recompute
        high = self.rounds.high()
        ceiling = None if high is None else self._s.latency_factor * high
        floor = self.lookup_floor_s()
        if budget is None:
            # No prefill timed yet (the first requests): nothing says a recompute
            # is slow, so the wait is the floor (what the store usually takes).
            return min(self._s.max_cache_wait_s, floor)
        return self._bounded(budget, ceiling, floor)

    def lookup_floor_s(self) -> float:
        """``min_lookup_wait_s``, or what the store usually takes if it is slower.

        The first sample is the start-up read (s3kv.index), so the first
        lookups of an engine already wait what this store takes."""
        floor = self._s.min_lookup_wait_s
        typical = self.rounds.high(TYPICAL_QUANTILE)
        if typical is None:
            return floor
        usual = TYPICAL_FACTOR * typical
        if usual <= floor or usual > STALLED_STRETCH * floor:
            return floor
        return min(usual, FLOOR_STRETCH * floor)

    def load_s(self, tokens: int, nbytes: int) -> float:
        """How long a request's loads of ``tokens`` tokens (``nbytes`` bytes) may take."""
        recompute = self.recompute_s(tokens)
        budget = None if recompute is None else self._s.load_wait_fraction * recompute
        spb = self._seconds_per_byte.value
        ceiling = None if spb is None else self._s.latency_factor * spb * nbytes
        # Loads follow a lookup the store just answered in time: a stall now is
        # a second, rarer fault, and cutting a healthy transfer short wastes
        # what it already fetched. Their floor is min_load_wait_s.
        return self._bounded(budget, ceiling, self._s.min_load_wait_s)

    def probe_s(self) -> float:
        """How fast a probe must be answered for the store to count as healthy.

        From the store's observed latency, never the lookup floor: a store
        that is slow but answering is up, and a probe held to a lookup's
        0.1 s would keep the cache off against a healthy far-away bucket."""
        high = self.rounds.high()
        ceiling = 0.0 if high is None else self._s.latency_factor * high
        return min(self._s.max_cache_wait_s, max(self._s.min_load_wait_s, ceiling))

    def stall_s(self) -> float:
        """How long the store may answer nothing at all, while lookups miss their
        deadlines, before the breaker calls it down (see s3kv.breaker)."""
        return self.probe_s()
