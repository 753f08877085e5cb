"""HedgedStore: one second GET for a read slower than usual, within a budget.

The unit tests drive a store whose every GET waits for the test to answer it,
a clock the test sets and a timer the test fires, so "the delay has passed"
and "this request answered first" are decisions of the test, never of the
scheduler. The last test measures the tail through a real HTTP server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

from devtools.memory_store import MemoryStore
from s3kv.config import parse_settings
from s3kv.errors import NotFound, StoreError
from s3kv.stats import Counters
from s3kv.store import Capabilities, ObjectStore
from s3kv.store.counting import CountingStore
from s3kv.store.hedged import (
    BUCKET_CAP,
    INITIAL_TOKENS,
    MIN_SAMPLES,
    HedgedStore,
    hedged,
    key_shape,
    size_class,
)

T = TypeVar("T")
MANIFEST = "s3kv/ns/ab/cid{}/manifest.json"
SHARD = "s3kv/ns/ab/cid{}/tp1-w.7/r0"
KIB, MIB = 1024, 1024 * 1024


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Call:
    """One request the fake store received; the test answers it."""

    key: str
    answer: asyncio.Future[memoryview]
    over: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False

    def reply(self, body: bytes) -> None:
        self.answer.set_result(memoryview(body))

    def fail(self, exc: BaseException) -> None:
        self.answer.set_exception(exc)


class SlowStore(MemoryStore):
    """Every GET is held until the test answers it, unless ``auto`` is set:
    then it answers at once with ``auto_size`` bytes, ``auto`` seconds later
    by the test's clock."""

    def __init__(self, clock: Clock) -> None:
        super().__init__("bkt")
        self.clock = clock
        self.calls: list[Call] = []
        self.auto: float | None = None
        self.auto_size = 100
        self._arrived = asyncio.Condition()

    async def arrived(self, n: int) -> list[Call]:
        """The first ``n`` requests, once they have all arrived."""
        async with self._arrived:
            await self._arrived.wait_for(lambda: len(self.calls) >= n)
        return self.calls[:n]

    async def _request(self, key: str, size: int) -> memoryview:
        call = Call(key, asyncio.get_running_loop().create_future())
        self.calls.append(call)
        async with self._arrived:
            self._arrived.notify_all()
        try:
            if self.auto is not None:
                self.clock.now += self.auto
                return memoryview(bytes(size))
            return await call.answer
        except asyncio.CancelledError:
            call.cancelled = True
            raise
        finally:
            call.over.set()

    async def get(self, key: str) -> memoryview:
        return await self._request(key, self.auto_size)

    async def get_range(self, key: str, start: int, end: int) -> memoryview:
        return await self._request(key, end - start)


class Timer:
    """The hedge delay: it passes when the test fires it."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.fire = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        self.delays.append(seconds)
        try:
            await self.fire.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


@dataclass
class Rig:
    clock: Clock
    inner: SlowStore
    timer: Timer
    counters: Counters
    store: HedgedStore

    async def warm(self, n: int = MIN_SAMPLES, latency: Callable[[int], float] = lambda i: 0.001,
                   key: str = MANIFEST, size: int = 100) -> None:
        """``n`` reads answered at once, ``latency(i)`` seconds each by the clock.
        They count in ``get_requests`` but are dropped from ``inner.calls``."""
        self.inner.auto_size = size
        for i in range(n):
            self.inner.auto = latency(i)
            await self.store.get(key.format(i))
        self.inner.auto = None
        self.timer.delays.clear()
        self.inner.calls.clear()  # what a test counts starts after the warm-up

    async def start(self, request: Awaitable[memoryview] | None = None,
                    ) -> tuple[asyncio.Future[memoryview], Call]:
        """Start a read (of a manifest by default); wait for its first request."""
        task = asyncio.ensure_future(
            self.store.get(MANIFEST.format("x")) if request is None else request)
        return task, await self.next_call()

    async def next_call(self) -> Call:
        """The next request to arrive (a hedge, once the timer fired)."""
        n = len(self.inner.calls)
        return (await self.inner.arrived(n + 1))[n]

    async def both(self, request: Awaitable[memoryview] | None = None,
                   ) -> tuple[asyncio.Future[memoryview], Call, Call]:
        """Start a read, let its delay pass and wait for the hedge to arrive."""
        task, primary = await self.start(request)
        self.timer.fire.set()
        return task, primary, await self.next_call()


def run(body: Callable[[Rig], Coroutine[Any, Any, T]], *, budget: float = 0.5,
        counting_inside: bool = True) -> tuple[T, Rig]:
    """Run ``body`` against ``HedgedStore(CountingStore(SlowStore))`` (or the
    other order) in a fresh loop."""

    async def main() -> tuple[T, Rig]:
        clock, timer, counters = Clock(), Timer(), Counters()
        inner = SlowStore(clock)
        base: ObjectStore = CountingStore(inner, counters) if counting_inside else inner
        store = HedgedStore(base, counters, budget=budget, clock=clock, sleep=timer.sleep,
                            initial_tokens=0.0)
        rig = Rig(clock, inner, timer, counters, store)
        return await asyncio.wait_for(body(rig), 10), rig

    return asyncio.run(main())


def test_size_classes_and_key_shapes() -> None:
    assert [size_class(n) for n in (0, 64 * KIB - 1, 64 * KIB, 256 * KIB - 1, 256 * KIB,
                                    MIB, 64 * MIB, 1 << 40)] == [0, 0, 1, 1, 2, 3, 6, 6]
    assert key_shape(MANIFEST.format(7)) == "manifest.json"
    assert key_shape("s3kv/ns/ab/cid/tp2-w.12/r13") == key_shape("x/r0") == "r#"


def test_everything_but_reads_passes_straight_through() -> None:
    async def go() -> None:
        inner = MemoryStore("bkt")
        store = HedgedStore(inner, Counters())
        typed: ObjectStore = store  # checked statically by mypy too
        assert isinstance(typed, ObjectStore)
        assert store.bucket == "bkt"
        changed = Capabilities(conditional_create=False)
        store.capabilities = changed
        assert inner.capabilities is changed
        await store.put("p/a", b"0123")
        assert (await store.head("p/a")).size == 4
        assert [o.key for page in [p async for p in store.list("p/")] for o in page] == ["p/a"]
        assert await store.list_dirs("") == ["p/"]
        assert bytes(await store.get_range("p/a", 1, 3)) == b"12"
        assert bytes(await store.get_range("p/a", 2, 2)) == b""
        await store.delete_many(["p/a"])
        assert inner.keys() == []
        await store.close()

    asyncio.run(go())


def test_no_hedge_until_enough_answers_of_the_size_class() -> None:
    async def body(rig: Rig) -> None:
        await rig.warm(MIN_SAMPLES - 1, size=MIB)
        assert rig.store.hedge_delay(MIB) is None
        read, call = await rig.start(rig.store.get_range("k", 0, MIB))
        assert rig.timer.delays == []  # no timer armed: nothing can hedge this read
        call.reply(bytes(MIB))
        assert len(await read) == MIB
        assert rig.store.hedge_delay(MIB) is not None  # its answer was the 8th
        assert len(rig.inner.calls) == 1

    run(body)


def test_before_enough_answers_a_small_read_is_late_after_four_times_the_fastest() -> None:
    """An engine's first lookups: no manifest GET has answered yet, but the
    start-up PUT of a small object said how fast the store is."""
    async def body(rig: Rig) -> None:
        read, call = await rig.start()
        assert rig.timer.delays == []  # nothing seen at all: no guess
        call.reply(b"m")
        await read
        rig.inner.calls.clear()
        rig.clock.now += 0.0
        await rig.store.put("ns/namespace.json", b"{}")  # answered at once: 0 s
        rig.clock.now += 1.0
        read, call = await rig.start(rig.store.get(MANIFEST.format("y")))
        assert rig.timer.delays == [pytest.approx(0.0)]
        rig.timer.fire.set()
        hedge = await rig.next_call()
        hedge.reply(b"h")
        assert bytes(await read) == b"h" and call.cancelled
        assert rig.store.hedge_delay(MIB) is None  # large reads wait for their class

    run(body)


def test_hedge_fires_after_the_delay_and_the_faster_answer_wins() -> None:
    async def body(rig: Rig) -> None:
        # Latencies 1..8 ms: the 95th percentile of 8 is the 8th, 8 ms, shorter
        # than 3x the median (4 ms).
        await rig.warm(latency=lambda i: (i + 1) / 1000)
        assert rig.store.hedge_delay(100) == pytest.approx(0.008)
        tokens = min(BUCKET_CAP, rig.store.tokens + 0.5)
        read, primary = await rig.start()
        assert rig.timer.delays == [pytest.approx(0.008)]
        assert len(rig.inner.calls) == 1 and not read.done()  # nothing sent before the delay
        rig.timer.fire.set()
        hedge = await rig.next_call()
        assert hedge.key == primary.key
        hedge.reply(b"second")
        assert bytes(await read) == b"second"
        await primary.over.wait()
        assert primary.cancelled  # the slower request is cancelled, not left running
        assert rig.store.tokens == pytest.approx(tokens - 1)
        assert rig.counters.get("hedged_gets") == 1
        assert rig.counters.get("hedge_wins") == 1
        assert rig.counters.get("get_requests") == MIN_SAMPLES + 2
        assert len(rig.inner.calls) == 2

    run(body)


def test_a_common_slow_mode_is_hedged_at_three_medians_not_at_the_quantile() -> None:
    async def body(rig: Rig) -> None:
        # One answer in five takes 250 ms: the 95th percentile (250 ms) is a
        # slow answer itself; 3x the median (8 ms) is 24 ms.
        await rig.warm(5 * MIN_SAMPLES, latency=lambda i: 0.25 if i % 5 == 4 else 0.008)
        assert rig.store.hedge_delay(100) == pytest.approx(0.024)
        read, _, hedge = await rig.both()
        assert rig.timer.delays == [pytest.approx(0.024)]
        hedge.reply(b"hedge")
        assert bytes(await read) == b"hedge"

    run(body)


def test_first_request_answering_after_the_hedge_still_wins() -> None:
    async def body(rig: Rig) -> None:
        await rig.warm()
        read, primary, hedge = await rig.both()
        primary.reply(b"first")
        assert bytes(await read) == b"first"
        await hedge.over.wait()
        assert hedge.cancelled
        assert rig.counters.get("hedged_gets") == 1
        assert rig.counters.get("hedge_wins") == 0

    run(body)


def test_no_hedge_without_budget() -> None:
    async def body(rig: Rig) -> None:
        await rig.warm()
        assert rig.store.tokens == pytest.approx(MIN_SAMPLES * 0.01)
        read, call = await rig.start()
        assert rig.timer.delays == []
        call.reply(b"slow")
        assert bytes(await read) == b"slow"
        assert rig.counters.get("hedged_gets") == 0
        assert len(rig.inner.calls) == 1

    run(body, budget=0.01)


def test_budget_bounds_the_extra_requests_over_a_run_of_slow_reads() -> None:
    reads = 40

    async def body(rig: Rig) -> int:
        await rig.warm()  # 8 answers earn 2 tokens
        hedges = 0
        for i in range(reads):  # every read is slow: each would hedge if it could
            read, primary = await rig.start(rig.store.get(MANIFEST.format(f"slow{i}")))
            if rig.timer.delays:  # a timer is armed only with a token in hand
                rig.timer.delays.clear()
                rig.timer.fire.set()
                hedge = await rig.next_call()
                rig.timer.fire.clear()
                hedge.reply(b"h")
                hedges += 1
            else:
                primary.reply(b"p")
            await read
        return hedges

    hedges, rig = run(body, budget=0.25)
    # 2 tokens saved during warm-up plus 0.25 for each of the 40 reads.
    assert hedges == 2 + reads * 0.25 == rig.counters.get("hedged_gets")
    assert rig.counters.get("get_requests") == MIN_SAMPLES + reads + hedges

    async def capped(rig: Rig) -> None:
        await rig.warm(3 * MIN_SAMPLES)
        assert rig.store.tokens == BUCKET_CAP

    run(capped, budget=1.0)


def test_errors_are_not_hedged() -> None:
    async def body(rig: Rig) -> None:
        await rig.warm()
        read, call = await rig.start()
        assert len(rig.timer.delays) == 1
        call.fail(StoreError("connection reset", key=call.key))
        with pytest.raises(StoreError, match="connection reset"):
            await read
        await rig.timer.cancelled.wait()  # the timer is gone: it will never hedge
        assert len(rig.inner.calls) == 1
        assert rig.counters.get("hedged_gets") == 0
        assert rig.store.hedge_delay(100) == pytest.approx(0.001)  # errors not observed

    run(body)


@pytest.mark.parametrize("failing", ["primary", "hedge", "both"])
def test_one_failure_waits_for_the_other_request(failing: str) -> None:
    async def body(rig: Rig) -> None:
        await rig.warm()
        read, primary, hedge = await rig.both()
        bad, other = (hedge, primary) if failing == "hedge" else (primary, hedge)
        bad.fail(StoreError("first" if bad is primary else "second"))
        await bad.over.wait()
        if failing == "both":  # the first request's error, as without hedging
            other.fail(StoreError("second"))
            with pytest.raises(StoreError, match="first"):
                await read
            return
        other.reply(b"good")
        assert bytes(await read) == b"good"
        assert rig.counters.get("hedge_wins") == (1 if failing == "primary" else 0)

    run(body)


def test_not_found_is_an_answer() -> None:
    async def body(rig: Rig) -> None:
        # Misses of a name never seen teach the small class (a cold cache's
        # lookups are all 404s).
        for i in range(MIN_SAMPLES):
            read, call = await rig.start(rig.store.get(MANIFEST.format(i)))
            rig.clock.now += 0.002
            call.fail(NotFound("no such key", key=call.key))
            with pytest.raises(NotFound):
                await read
        assert rig.store.hedge_delay(100) == pytest.approx(0.002)
        # Only the first read went unhedged; after it, 4 x the fastest answer.
        assert rig.timer.delays == [pytest.approx(0.008)] * (MIN_SAMPLES - 1)
        # From the first request before the delay: raised at once, no hedge.
        read, call = await rig.start()
        call.fail(NotFound("no such key"))
        with pytest.raises(NotFound):
            await read
        assert rig.counters.get("hedged_gets") == 0
        # From the hedge while the first request is still out: the answer.
        read, primary, hedge = await rig.both(rig.store.get(MANIFEST.format("y")))
        hedge.fail(NotFound("no such key"))
        with pytest.raises(NotFound):
            await read
        await primary.over.wait()
        assert primary.cancelled
        assert rig.counters.get("hedge_wins") == 1

    run(body)


def test_large_reads_wait_for_their_own_size_class() -> None:
    async def body(rig: Rig) -> None:
        await rig.warm()  # small objects: 1 ms
        # A ranged read of 1 MiB and a whole GET of a name never answered: cold.
        for request in (rig.store.get_range("k", 0, MIB), rig.store.get(SHARD.format(0))):
            read, call = await rig.start(request)
            assert rig.timer.delays == []
            call.reply(bytes(MIB))
            await read
        # 1 MiB shards answering in 200 ms warm their class, not the small one.
        await rig.warm(latency=lambda i: 0.2, key=SHARD, size=MIB)
        assert rig.store.hedge_delay(MIB) == pytest.approx(0.2)
        assert rig.store.hedge_delay(100) == pytest.approx(0.001)
        read, call = await rig.start(rig.store.get(SHARD.format("new")))  # r#: 1 MiB
        assert rig.timer.delays == [pytest.approx(0.2)]
        call.reply(bytes(MIB))
        await read

    run(body)


@pytest.mark.parametrize("counting_inside", [True, False], ids=["hedged-outside",
                                                                 "counting-outside"])
def test_every_request_is_counted_once_in_either_wrapper_order(counting_inside: bool) -> None:
    async def body(rig: Rig) -> None:
        outer: ObjectStore = (
            rig.store if counting_inside else CountingStore(rig.store, rig.counters))
        await rig.warm()
        read, _, hedge = await rig.both(outer.get(MANIFEST.format("x")))
        hedge.reply(b"h")
        await read

    _, rig = run(body, counting_inside=counting_inside)
    # Warm-up reads went to the hedged store directly: counted only beneath it.
    warm_counted = MIN_SAMPLES if counting_inside else 0
    assert rig.counters.get("get_requests") == warm_counted + 2
    assert rig.counters.get("hedged_gets") == 1


def test_cancelling_the_read_cancels_both_requests() -> None:
    async def body(rig: Rig) -> None:
        await rig.warm()
        read, primary, hedge = await rig.both()
        read.cancel()
        await primary.over.wait()
        await hedge.over.wait()
        assert primary.cancelled and hedge.cancelled
        assert read.cancelled()

    run(body)


def test_hedged_helper_wraps_counting_beneath_hedging() -> None:
    counters = Counters()
    on = hedged(MemoryStore(), parse_settings({"bucket": "bkt", "hedge_budget": 0.2}), counters)
    assert isinstance(on, HedgedStore) and isinstance(on.inner, CountingStore)
    with pytest.raises(NotFound):
        asyncio.run(on.get("missing"))
    assert on.tokens == pytest.approx(INITIAL_TOKENS + 0.2)  # budget from the settings
    assert counters.get("get_requests") == 1
    off = hedged(MemoryStore(), parse_settings({"bucket": "bkt", "hedge_reads": False}), counters)
    assert isinstance(off, CountingStore) and isinstance(off.inner, MemoryStore)
    settings = parse_settings({"bucket": "bkt"})
    assert hedged(on, settings, counters) is on  # never counted or hedged twice
    again = hedged(off, settings, counters)
    assert isinstance(again, HedgedStore) and again.inner is off


# --- through a real HTTP server ----------------------------------------------------
