"""Circuit breaker: the cache turns off only on evidence that the store is down.

A late answer costs only the request that waited for it (its deadline, in
:mod:`s3kv.index`); the breaker is for outages, when every request would pay
its deadline. It therefore opens only on evidence:

* an error the client could not retry away: connection refused or reset,
  5xx and throttling after the client's own retries, a request that ran
  into the client's timeout, refused credentials;
* a stall: several lookups in a row went unanswered past their deadlines
  *and* the store has answered nothing at all (no round, no late answer,
  no probe) for a while longer than it normally takes. A store that answers
  late, even every time, is slow, not down: its late answers keep the
  breaker closed, and they warm the caches for the next request.

While open, a background probe (one small GET) asks the store again with a
deadline from the store's observed latency, and the first answer closes the
breaker: no request pays for finding out that S3 is back. Every transition
is logged once, with its reason, and counted.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable

from s3kv.aio import Submitter
from s3kv.errors import AccessDenied, AlreadyExists, NotFound
from s3kv.stats import Counters

log = logging.getLogger("s3kv.breaker")

_MAX_PROBE_INTERVAL_S = 30.0
# Lookups that must go unanswered in a row, with no answer from the store in
# between, before a stall counts as an outage: one or two late answers are a
# tail, not evidence.
STALL_MISSES = 3


class Breaker:
    """Open/closed switch in front of the store.

    Once open it stays open until ``probe`` (run on ``io`` every
    ``probe_interval_s``, backing off, each try bounded by ``probe_timeout_s``)
    gets an answer. ``stall_s`` gives how long the store may answer nothing
    at all, while lookups miss their deadlines, before that counts as an
    outage.
    """

    def __init__(
        self, *,
        probe: Callable[[], Awaitable[object]],
        io: Submitter,
        probe_interval_s: float = 1.0,
        probe_timeout_s: Callable[[], float] | None = None,
        stall_s: Callable[[], float] | None = None,
        counters: Counters | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._probe = probe
        self._io = io
        self._interval = probe_interval_s
        self._probe_timeout = probe_timeout_s or (lambda: 5.0)
        self._stall_s = stall_s or (lambda: 1.0)
        self._counters = counters
        self._clock = clock
        self._open = False
        self._opened_at = 0.0
        self._probing = False
        self._lock = threading.Lock()
        self._last_answer = clock()
        self._misses = 0  # deadline misses since the store last answered

    def allow(self) -> bool:
        with self._lock:
            return not self._open

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._open

    # --- evidence -------------------------------------------------------------------

    def answered(self) -> None:
        """The store answered a request (a 404 is an answer): it is up.

        Called from the I/O thread as rounds complete. It never closes an
        open breaker by itself: the probe, with its own deadline, decides
        that, so one lucky answer cannot make it flap."""
        with self._lock:
            self._last_answer = self._clock()
            self._misses = 0

    def missed(self, what: str) -> None:
        """A lookup got no answer within its deadline: evidence only in numbers."""
        with self._lock:
            self._misses += 1
            silent = self._clock() - self._last_answer
            stalled = (not self._open and self._misses >= STALL_MISSES
                       and silent >= self._stall_s())
            misses = self._misses
        reason = (f"object store stalled (no answer to {misses} lookups in a row, "
                  f"nothing answered for {silent:.1f}s; last: {what})")
        if stalled and self._trip(reason) and self._counters is not None:
            self._counters.add("breaker_opens_stalled")

    def failure(self, exc: BaseException) -> None:
        """An error the client could not retry away: the store is down or refusing."""
        if isinstance(exc, AccessDenied):
            # Wrong keys, an expired token or a missing IAM permission:
            # retrying will not help, the operator has to act.
            reason = (f"S3 refused this engine's credentials or permissions ({exc}); check "
                      "the AWS credential chain and the IAM policy (s3:GetObject, "
                      "s3:PutObject on the cache prefix)")
        else:
            reason = f"object store unavailable ({exc})"
        if self._trip(reason) and self._counters is not None:
            self._counters.add("breaker_opens_errors")

    def _trip(self, reason: str) -> bool:
        """Open (True), or False if it already was."""
        with self._lock:
            if self._open:
                return False
            self._open = True
            self._opened_at = self._clock()
            start_probe = not self._probing
            self._probing = True
        log.warning("s3kv: %s; serving without the cache, probing every %gs",
                    reason, self._interval)
        if self._counters is not None:
            self._counters.add("breaker_opens")
        if start_probe:
            self._io.submit(self._probe_loop())
        return True

    def success(self) -> None:
        """The store answered a probe in time: close."""
        with self._lock:
            was_open = self._open
            self._open = False
            self._last_answer = self._clock()
            self._misses = 0
            off = self._last_answer - self._opened_at
        if was_open:
            log.warning("s3kv: object store reachable again after %.1fs; cache re-enabled", off)
            if self._counters is not None:
                self._counters.add("breaker_closes")
                self._counters.add("breaker_open_seconds", off)

    async def _probe_loop(self) -> None:
        interval = self._interval
        while True:
            with self._lock:
                if not self._open:
                    # Cleared under the lock: a failure from now on starts a new prober.
                    self._probing = False
                    return
            await asyncio.sleep(interval)
            if self._counters is not None:
                self._counters.add("breaker_probes")
            try:
                await asyncio.wait_for(self._probe(), self._probe_timeout())
            except (NotFound, AlreadyExists):
                pass  # an answer is an answer
            except Exception:  # timed out, refused, denied: still down
                interval = min(_MAX_PROBE_INTERVAL_S, interval * 2)
                continue
            self.success()
