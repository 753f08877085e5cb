"""Hedged GETs: a read that is slow to answer gets one identical second request.

S3 answers most GETs in tens of milliseconds, but a few in hundreds: the slow
ones are slow because of the server or connection that happened to take them,
not because of the object, so the same request sent again is usually fast.
AWS's advice for latency-sensitive reads is therefore to send a second
request once the first has taken longer than reads usually take, and to use
whichever answers first. A lookup round waits for its slowest manifest GET
and a load for its slowest shard, so one slow GET in a round costs the whole
round; hedging cuts that tail for a few percent more requests.

* **Delay.** A read is late once it takes longer than a high quantile
  (``hedge_quantile``) of the recently observed latencies of first requests,
  or :data:`MEDIAN_FACTOR` (3) times their median, whichever is shorter. The
  quantile alone fails when slow answers are common: with a fifth of them
  slow (a hot partition, a struggling node) the 95th percentile lies inside
  the slow mode, and a hedge sent then comes too late to help; three medians
  is already well past a usual answer. Latencies are kept per size class
  (:func:`size_class`: under 64 KiB, which holds every manifest, then classes
  growing fourfold): a shard GET's time depends on its bytes, so a manifest's
  latency says nothing about when a shard is late. A class is hedged once it
  has :data:`MIN_SAMPLES` (8) answers; before that, small reads (manifests,
  known by name from the start) are late after :data:`COLD_FACTOR` (4) times
  the fastest answer the store gave any small request, such as the engine's
  start-up PUT: an engine's first lookups are its most exposed, and large
  reads wait for their own class. Only first requests that were answered
  (a body or NotFound) are observed: a request cancelled because its hedge
  won has no latency to tell.
* **Budget.** A token bucket bounds the extra requests: every first request
  earns ``hedge_budget`` tokens (at most :data:`BUCKET_CAP` are saved up), a
  hedge spends one, and without a whole token there is no hedge. A store that
  is uniformly slow makes every request "late"; without the bucket hedging
  would double its request bill (and load) exactly when it is struggling.
* **Errors.** A first request that fails before the delay fails the call at
  once: the client library already retries errors, and a hedge is for
  slowness. NotFound is an answer like a body (most manifest GETs of a cold
  cache are misses). Once both requests are out, a failure of one waits for
  the other; if both fail, the first request's error is raised.

**Wrapper order.** The intended stack is ``HedgedStore(CountingStore(inner))``
(what :func:`hedged` builds): the counting store then sees, and counts, every
request that goes on the wire, the hedge included. The other order,
``CountingStore(HedgedStore(inner))``, counts one GET per call; the hedged
store notices that no counting store lies beneath it and counts its hedges in
``get_requests`` itself, so either order counts each HTTP request once.

Everything here runs on the process's I/O loop (see :mod:`s3kv.aio`), like
every store call, so the bucket and the windows need no lock.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from typing_extensions import Buffer

from s3kv.config import Settings
from s3kv.errors import NotFound, PreconditionFailed
from s3kv.keys import MANIFEST_NAME, NAMESPACE_NAME
from s3kv.stats import Counters
from s3kv.store.counting import CountingStore
from s3kv.store.protocol import ObjectStore, PutMode
from s3kv.store.wrapper import StoreWrapper

#: Objects below this size (every manifest) share the first latency window.
SMALL_OBJECT_BYTES = 64 * 1024
#: Each further size class holds objects up to this many times larger.
_CLASS_GROWTH = 4
#: Size classes 0..LAST_CLASS; the last holds everything from 64 MiB up.
LAST_CLASS = 6
#: Hedges that may be saved up: a burst of slow answers gets at most this many.
BUCKET_CAP = 10.0
#: Hedges a fresh store may send before its reads have earned any: an engine's
#: first lookups are its most exposed (nothing cached, nothing learned yet).
INITIAL_TOKENS = 3.0
#: Answers of a size class needed before its quantile is trusted.
MIN_SAMPLES = 8
#: A read is also late once it takes this many times the class's median.
MEDIAN_FACTOR = 3.0
#: Before its class has MIN_SAMPLES answers, a small read is late after this
#: many times the fastest answer the store gave to any small request.
COLD_FACTOR = 4.0
_WINDOW = 256
# Sorting the window costs tens of microseconds on the I/O loop; a quantile
# that moves by one sample in eight is still the same delay for this purpose.
_REFRESH_EVERY = 8
# Object names that differ only in digits (r0, r1; manifest.json everywhere)
# are alike in size; this bounds the names remembered.
_MAX_SHAPES = 1024
_DIGITS = re.compile(r"[0-9]+")
# How deep to look through wrappers for a counting store.
_MAX_WRAPPERS = 32

Sleep = Callable[[float], Awaitable[object]]
Clock = Callable[[], float]


def size_class(nbytes: int) -> int:
    """0 below 64 KiB, then one class per fourfold size, up to :data:`LAST_CLASS`."""
    cls, limit = 0, SMALL_OBJECT_BYTES
    while nbytes >= limit and cls < LAST_CLASS:
        cls += 1
        limit *= _CLASS_GROWTH
    return cls


def key_shape(key: str) -> str:
    """The last path component with digit runs folded: whole GETs carry no
    size, so the size of the last answer for a name of this shape stands in."""
    return _DIGITS.sub("#", key.rsplit("/", 1)[-1])


class _Delays:
    """One size class's recent first-request latencies and the delay they give.

    Its own window rather than :class:`s3kv.deadlines.LatencyWindow`, whose
    answer with few samples (the slowest seen) suits a deadline, where too
    long is safe; for a hedge delay too short is the costly side."""

    def __init__(self, quantile: float) -> None:
        self._window: deque[float] = deque(maxlen=_WINDOW)
        self._quantile = quantile
        self._delay: float | None = None
        self._unseen = 0

    def observe(self, seconds: float) -> None:
        self._window.append(seconds)
        self._unseen += 1

    def _quantile_s(self) -> float | None:
        """The ``quantile`` of recent answers, or :data:`MEDIAN_FACTOR` times
        their median if that comes first: when a fifth of answers are slow (a
        hot partition, a struggling node), the 95th percentile lies inside the
        slow mode, where a hedge comes too late to help."""
        if len(self._window) < MIN_SAMPLES:
            return None
        samples = sorted(self._window)
        high = samples[min(len(samples) - 1, math.ceil(self._quantile * len(samples)) - 1)]
        return min(high, MEDIAN_FACTOR * samples[(len(samples) - 1) // 2])

    def delay(self) -> float | None:
        """None until :data:`MIN_SAMPLES` answers: a quantile of a handful of
        samples is noise, and any fixed guess is wrong one way or the other
        (200 ms is too late to help a 20 ms manifest and too early for a large
        shard). Hedging is only an optimisation; the first reads of a class
        simply go unhedged."""
        if self._unseen and (self._delay is None or self._unseen >= _REFRESH_EVERY):
            self._delay = self._quantile_s()
            self._unseen = 0
        return self._delay


def _settle(task: asyncio.Future[Any]) -> None:
    """Cancel a request or timer nobody waits for any more, and make sure its
    outcome is retrieved (an unretrieved error would be logged as a bug)."""
    if task.done():
        if not task.cancelled():
            task.exception()
        return
    task.cancel()
    task.add_done_callback(_retrieve)


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _wraps(store: object, kind: type) -> bool:
    """Whether ``store`` is, or wraps (through ``.inner``), a ``kind``."""
    for _ in range(_MAX_WRAPPERS):
        if isinstance(store, kind):
            return True
        store = getattr(store, "inner", None)
        if store is None:
            return False
    return False


class HedgedStore(StoreWrapper):
    """Wraps any :class:`ObjectStore`; ``get`` and ``get_range`` are hedged,
    everything else is delegated unchanged.

    ``clock`` and ``sleep`` measure latencies and wait out the hedge delay;
    tests replace them to decide when a delay has passed.
    """

    def __init__(self, inner: ObjectStore, counters: Counters, *, quantile: float = 0.95,
                 budget: float = 0.1, clock: Clock = time.monotonic,
                 sleep: Sleep = asyncio.sleep, small_names: Collection[str] = (),
                 initial_tokens: float = INITIAL_TOKENS) -> None:
        super().__init__(inner)
        self._counters = counters
        self._budget = budget
        self._clock = clock
        self._sleep = sleep
        self._tokens = min(BUCKET_CAP, initial_tokens)
        self._delays = [_Delays(quantile) for _ in range(LAST_CLASS + 1)]
        # Names known to be small before any answer (manifests): their very
        # first reads can be hedged too.
        self._shapes: dict[str, int] = {key_shape(n): 0 for n in small_names}
        self._fastest: float | None = None  # quickest answer to a small request
        # Beneath a counting store every hedge is counted there; otherwise here.
        self._count_hedges_as_gets = not _wraps(inner, CountingStore)

    # --- what the hedging knows, for operators and tests -------------------------

    @property
    def tokens(self) -> float:
        """Hedges that may be sent now (whole tokens)."""
        return self._tokens

    def hedge_delay(self, nbytes: int) -> float | None:
        """The current delay for reads of ``nbytes`` bytes (None: not hedged yet)."""
        return self._delays[size_class(nbytes)].delay()

    # --- writes: their answers time the store too --------------------------------

    async def put(self, key: str, data: Buffer, *, mode: PutMode = "overwrite") -> str | None:
        start = self._clock()
        try:
            etag = await self.inner.put(key, data, mode=mode)
        except PreconditionFailed:  # an answer: it says how fast the store is
            self._small_answer(data, start)
            raise
        self._small_answer(data, start)
        return etag

    def _small_answer(self, data: Buffer, start: float) -> None:
        if memoryview(data).nbytes < SMALL_OBJECT_BYTES:
            self._note_fast(self._clock() - start)

    def _note_fast(self, seconds: float) -> None:
        if self._fastest is None or seconds < self._fastest:
            self._fastest = seconds

    # --- hedged reads ---------------------------------------------------------------

    async def get(self, key: str) -> memoryview:
        shape = key_shape(key)
        return await self._read(lambda: self.inner.get(key), self._shapes.get(shape), shape)

    async def get_range(self, key: str, start: int, end: int) -> memoryview:
        if end <= start:  # answered without a request: nothing to hedge
            return await self.inner.get_range(key, start, end)
        return await self._read(lambda: self.inner.get_range(key, start, end),
                                size_class(end - start), None)

    async def _read(self, request: Callable[[], Awaitable[memoryview]], cls: int | None,
                    shape: str | None) -> memoryview:
        """``cls`` is the expected size class (None: unknown, never hedged);
        ``shape`` is the key's shape for whole GETs, whose answers teach it."""
        self._tokens = min(BUCKET_CAP, self._tokens + self._budget)
        delay = None if cls is None else self._delays[cls].delay()
        if delay is None and cls == 0 and self._fastest is not None:
            # The first reads of an engine (its first lookups) go out before any
            # manifest GET has answered; the start-up request already told how
            # fast this store answers a small request (connection set-up
            # included).
            delay = COLD_FACTOR * self._fastest
        start = self._clock()
        if delay is None or self._tokens < 1:  # cannot hedge: no timer, no task
            try:
                body = await request()
            except NotFound:
                self._answered(start, cls, shape, None)
                raise
            self._answered(start, cls, shape, body)
            return body
        primary = asyncio.ensure_future(request())
        timer = asyncio.ensure_future(self._sleep(delay))
        hedge: asyncio.Future[memoryview] | None = None
        try:
            await asyncio.wait((primary, timer), return_when=asyncio.FIRST_COMPLETED)
            # Tokens are checked again: hedges of concurrent reads may have spent them.
            if primary.done() or self._tokens < 1:
                return await self._first(primary, start, cls, shape)
            self._tokens -= 1
            self._counters.add("hedged_gets")
            if self._count_hedges_as_gets:
                self._counters.add("get_requests")
            hedge = asyncio.ensure_future(request())
            return await self._race(primary, hedge, start, cls, shape)
        finally:
            for task in (primary, timer, hedge):
                if task is not None:
                    _settle(task)

    async def _first(self, primary: asyncio.Future[memoryview], start: float,
                     cls: int | None, shape: str | None) -> memoryview:
        try:
            body = await primary
        except NotFound:
            self._answered(start, cls, shape, None)
            raise
        self._answered(start, cls, shape, body)
        return body

    async def _race(self, primary: asyncio.Future[memoryview], hedge: asyncio.Future[memoryview],
                    start: float, cls: int | None, shape: str | None) -> memoryview:
        failed: dict[asyncio.Future[memoryview], BaseException] = {}
        pending = {primary, hedge}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in (primary, hedge):  # the first request first when both answered
                if task not in done:
                    continue
                exc = task.exception()
                if exc is not None and not isinstance(exc, NotFound):
                    failed[task] = exc
                    continue
                if task is hedge:
                    self._counters.add("hedge_wins")
                else:
                    self._answered(start, cls, shape, None if exc is not None else task.result())
                return task.result()  # raises the NotFound
        raise failed[primary]

    def _answered(self, start: float, cls: int | None, shape: str | None,
                  body: memoryview | None) -> None:
        """Record a first request's answer (``body`` None: NotFound)."""
        seconds = self._clock() - start
        if body is not None and shape is not None:  # a whole object: its size is known now
            cls = size_class(len(body))
            if shape in self._shapes or len(self._shapes) < _MAX_SHAPES:
                self._shapes[shape] = cls
        elif cls is None:
            # A miss of a name never seen: the answer is a small error body,
            # and names first met as misses are manifests of a cold cache.
            cls = 0
            if shape is not None and len(self._shapes) < _MAX_SHAPES:
                self._shapes[shape] = cls
        self._delays[cls].observe(seconds)
        if cls == 0:
            self._note_fast(seconds)


def hedged(store: ObjectStore, settings: Settings, counters: Counters) -> ObjectStore:
    """``store`` with its requests counted and, unless ``hedge_reads`` is off,
    its reads hedged: ``HedgedStore(CountingStore(store))``, so that the
    counting store sees the hedges. A store that already counts (or hedges)
    is not wrapped again."""
    counted = store if _wraps(store, CountingStore) else CountingStore(store, counters)
    if not settings.hedge_reads or _wraps(store, HedgedStore):
        return counted
    return HedgedStore(counted, counters, quantile=settings.hedge_quantile,
                       budget=settings.hedge_budget, small_names=(MANIFEST_NAME, NAMESPACE_NAME))


__all__ = ["BUCKET_CAP", "COLD_FACTOR", "INITIAL_TOKENS", "MEDIAN_FACTOR", "MIN_SAMPLES",
           "SMALL_OBJECT_BYTES", "HedgedStore", "hedged", "key_shape", "size_class"]
