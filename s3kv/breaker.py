"""Circuit breaker: one stalled request finds out the store is down, not every one.

Without it every new request would wait out its deadline while S3 is down or
stalled; with it requests are served as misses at once. The breaker opens on
the first availability failure or deadline miss. While open, a background
probe (one small GET) asks the store again, and the first answer that comes
back as fast as the store normally answers closes it: no request ever pays
for finding out that S3 is back.
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


class Breaker:
    """Open/closed switch in front of the store.

    With a ``probe`` it stays open until a probe succeeds; without one (unit
    uses, tools) it reopens for a request after ``cooldown_s``.
    """

    def __init__(
        self, cooldown_s: float = 30.0, *,
        probe: Callable[[], Awaitable[object]] | None = None,
        io: Submitter | None = None,
        probe_interval_s: float = 1.0,
        probe_timeout_s: Callable[[], float] | None = None,
        counters: Counters | None = None,
    ) -> None:
        self._cooldown = cooldown_s
        self._probe = probe
        self._io = io
        self._interval = probe_interval_s
        self._probe_timeout = probe_timeout_s or (lambda: 5.0)
        self._counters = counters
        self._open = False
        self._open_until = 0.0
        self._probing = False
        self._lock = threading.Lock()
        self._warned = False

    def allow(self) -> bool:
        with self._lock:
            if not self._open:
                return True
            # Without a prober, the first request after the cool-down is the probe.
            return self._probe is None and time.monotonic() >= self._open_until

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._open

    def failure(self, exc: BaseException) -> None:
        with self._lock:
            opened = not self._open
            self._open = True
            self._open_until = time.monotonic() + self._cooldown
            start_probe = self._probe is not None and self._io is not None and not self._probing
            if start_probe:
                self._probing = True
            if not self._warned:
                retry = (f"probing every {self._interval:g}s" if self._probe is not None
                         else f"retrying in {self._cooldown:.0f}s")
                if isinstance(exc, AccessDenied):
                    # Wrong keys, an expired token or a missing IAM permission:
                    # retrying will not help, the operator has to act.
                    log.warning("s3kv: S3 refused this engine's credentials or permissions "
                                "(%s); check the AWS credential chain and the IAM policy "
                                "(s3:GetObject, s3:PutObject on the cache prefix); serving "
                                "without the cache, %s", exc, retry)
                else:
                    log.warning("s3kv: object store unavailable (%s); serving without the "
                                "cache, %s", exc, retry)
                self._warned = True
        if opened and self._counters is not None:
            self._counters.add("breaker_opens")
        if start_probe and self._io is not None:
            self._io.submit(self._probe_loop())

    def success(self) -> None:
        with self._lock:
            if self._warned:
                log.warning("s3kv: object store reachable again; cache re-enabled")
            self._open = False
            self._open_until = 0.0
            self._warned = False

    async def _probe_loop(self) -> None:
        interval = self._interval
        while True:
            with self._lock:
                if not self._open or self._probe is None:
                    # Cleared under the lock: a failure from now on starts a new prober.
                    self._probing = False
                    return
                probe = self._probe
            await asyncio.sleep(interval)
            if self._counters is not None:
                self._counters.add("breaker_probes")
            try:
                await asyncio.wait_for(probe(), self._probe_timeout())
            except (NotFound, AlreadyExists):
                pass  # an answer is an answer
            except Exception:  # timed out, refused, denied: still down
                interval = min(_MAX_PROBE_INTERVAL_S, interval * 2)
                continue
            self.success()
