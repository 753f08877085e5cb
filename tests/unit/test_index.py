"""The cache index against a store that stalls: deadlines, the breaker, its probe."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator

import pytest
from typing_extensions import Buffer

from devtools.memory_store import MemoryStore
from s3kv.aio import LoopThread
from s3kv.config import parse_settings
from s3kv.errors import Unavailable
from s3kv.index import CacheIndex
from s3kv.keys import Fingerprint, KeyLayout, chain_chunk_ids
from s3kv.manifest import ShardEntry, new_manifest
from s3kv.stats import Counters
from s3kv.store.protocol import PutMode

FP = Fingerprint(model="m", weights_id="w", dtype="float32", chunk_tokens=16, num_layers=2,
                 num_kv_heads=1, head_size=8)
LAYOUT = KeyLayout("s3kv")
IDS = chain_chunk_ids(list(range(16 * 12)), 16)
SETTINGS = parse_settings({"bucket": "bkt", "chunk_tokens": 16, "min_lookup_wait_s": 0.2,
                           "min_load_wait_s": 0.2, "probe_interval_s": 0.02})


class StallingStore(MemoryStore):
    """GETs of chunk ``i`` (by position in IDS) wait ``delay(i)`` seconds; -1: forever."""

    def __init__(self) -> None:
        super().__init__()
        self.delay: Callable[[str], float] = lambda key: 0.0
        self.gets = 0

    async def get(self, key: str) -> memoryview:
        self.gets += 1
        d = self.delay(key)
        await asyncio.sleep(3600 if d < 0 else d)
        return await super().get(key)


def stall(*chunks: int, seconds: float = -1) -> Callable[[str], float]:
    keys = {IDS[i] for i in chunks}
    return lambda key: seconds if any(c in key for c in keys) else 0.0


def stall_everything(key: str) -> float:
    return -1


@pytest.fixture
def io() -> Iterator[LoopThread]:
    loop = LoopThread("test-index")
    yield loop
    loop.stop()


def commit(store: MemoryStore, n: int) -> None:
    for i, cid in enumerate(IDS[:n]):
        entry = ShardEntry(0, LAYOUT.shard(FP.namespace, cid, "tp1-w", 0), 128, "0" * 32,
                           0, 1, 64, ("0" * 32,))
        m = new_manifest(namespace=FP.namespace, chunk_id=cid, parent_id=IDS[i - 1] if i else None,
                         chunk_index=i, num_tokens=16, writer="tp1-w", shards=[entry], tp_size=1)
        store.put_nowait(LAYOUT.manifest(FP.namespace, cid), m.encode())


def until_answer(index: CacheIndex, key: str, ids: list[str], limit_s: float = 10.0
                 ) -> tuple[tuple[str, ...], float]:
    """Ask as vLLM's scheduler does, every step, until the index answers."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        got = index.lookup(key, ids)
        if got is not None:
            return tuple(m.chunk_id for m in got), time.monotonic() - t0
        time.sleep(0.002)  # one scheduler step
    raise AssertionError("no answer")


def wait_for(cond: Callable[[], bool], limit_s: float = 10.0) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > limit_s:
            raise AssertionError("condition not reached")
        time.sleep(0.005)


def make(io: LoopThread, store: MemoryStore, clock: Callable[[], float] = time.monotonic
         ) -> tuple[CacheIndex, Counters]:
    counters = Counters()
    index = CacheIndex(SETTINGS, FP, counters, store, io, clock=clock)
    # The start-up write and read-back are answered: the first latency sample.
    wait_for(lambda: index.deadlines.rounds.high() is not None)
    return index, counters


def test_healthy_store_hits_and_a_repeat_needs_no_round_trip(io: LoopThread) -> None:
    store = StallingStore()
    commit(store, 5)
    index, counters = make(io, store)
    hits, _ = until_answer(index, "r1", IDS)
    assert hits == tuple(IDS[:5])
    gets = store.gets
    hits2, _ = until_answer(index, "r2", IDS[:5])
    assert hits2 == tuple(IDS[:5]) and store.gets == gets  # all remembered
    assert counters.get("lookup_deadline_misses") == 0 and not index.breaker.is_open


def test_a_stalled_store_costs_each_request_its_deadline_then_opens_the_breaker(
        io: LoopThread) -> None:
    store = StallingStore()
    commit(store, 5)
    index, counters = make(io, store)
    store.delay = stall_everything
    # One unanswered lookup is a tail, not an outage: that request is a miss,
    # and the cache stays on. Lookups unanswered in a row, with nothing answered
    # for longer than the store normally takes, are an outage.
    for i in range(3):
        hits, waited = until_answer(index, f"r{i}", IDS[i:])
        assert hits == ()
        assert 0.2 <= waited < 1.0  # min_lookup_wait_s, not max_cache_wait_s (30 s)
        assert index.breaker.is_open == (i == 2)
    assert counters.get("lookup_deadline_misses") == 3
    assert counters.get("breaker_opens_stalled") == 1
    # Every later request is a miss at once; no save is planned while it is open.
    hits, waited = until_answer(index, "r9", IDS[3:])
    assert hits == () and waited < 0.05
    assert counters.get("lookups_skipped_store_down") == 1
    assert not index.prepare_store(IDS[7], requested=False)
    assert counters.get("saves_skipped_store_down") == 1
    # The store comes back: the background probe closes the breaker, no request pays.
    store.delay = lambda key: 0.0
    wait_for(lambda: not index.breaker.is_open)
    assert counters.get("breaker_probes") >= 1 and counters.get("breaker_opens") == 1
    assert counters.get("breaker_closes") == 1 and counters.get("breaker_open_seconds") > 0
    hits, _ = until_answer(index, "r10", IDS[:3])
    assert hits == tuple(IDS[:3])


def test_a_store_that_always_answers_late_never_turns_the_cache_off(io: LoopThread) -> None:
    """Slow but healthy: every GET takes longer than the lookup may wait. Each
    request that waits is a miss, its late answer warms the next request, and
    the breaker stays closed (saves keep flowing)."""
    store = StallingStore()
    commit(store, 6)
    index, counters = make(io, store)
    # 0.9 s: beyond what the floor follows (4 x min_lookup_wait_s), so every lookup waits
    # only the floor and misses.
    store.delay = lambda key: 0.9 if "manifest" in key else 0.0
    # A fast engine: recomputing these chunks costs less than a round trip, so
    # the budget (not the store's latency) sets the wait: the floor, 0.2 s.
    index.step_done(1000, 0.1)
    for i in range(4):
        assert until_answer(index, f"slow{i}", IDS[i + 6:])[0] == ()  # cold chunks: late
        wait_for(lambda: index.background_lookups == 0)
    assert counters.get("lookup_deadline_misses") == 4
    assert not index.breaker.is_open and counters.get("breaker_opens") == 0
    assert index.prepare_store(IDS[11], requested=False)
    # A late answer is learned: the same prefix asked again hits without a round trip.
    assert until_answer(index, "warm0", IDS[:6])[0] == ()
    wait_for(lambda: index.background_lookups == 0)
    gets = store.gets
    hits, waited = until_answer(index, "warm1", IDS[:6])
    assert hits == tuple(IDS[:6]) and store.gets == gets and waited < 0.05


def test_errors_open_the_breaker_at_once(io: LoopThread) -> None:
    class Refusing(StallingStore):
        refusing = False

        async def get(self, key: str) -> memoryview:
            if self.refusing:
                raise Unavailable("connection refused", key=key)
            return await super().get(key)

    store = Refusing()
    index, counters = make(io, store)
    store.refusing = True
    assert until_answer(index, "r1", IDS)[0] == ()
    assert index.breaker.is_open
    assert counters.get("lookup_errors") == 1 and counters.get("breaker_opens_errors") == 1


def test_deadline_with_a_partial_answer_uses_the_prefix_found(io: LoopThread) -> None:
    store = StallingStore()
    commit(store, 8)
    index, counters = make(io, store)
    store.delay = stall(3, 4, 5, 6, seconds=-1)  # rounds: [0], [1, 2], [3..6] stalls
    hits, waited = until_answer(index, "r1", IDS)
    assert hits == tuple(IDS[:3]) and waited < 1.0
    assert counters.get("lookups_truncated") == 1
    assert counters.get("lookup_deadline_misses") == 0 and not index.breaker.is_open


def test_a_late_answer_warms_the_next_request(io: LoopThread) -> None:
    store = StallingStore()
    commit(store, 4)
    index, _counters = make(io, store)
    store.delay = stall(0, 1, 2, 3, 4, seconds=0.5)
    assert until_answer(index, "r1", IDS)[0] == ()
    store.delay = lambda key: 0.0
    wait_for(lambda: not index.breaker.is_open)
    # The first request's lookup finishes in the background after its deadline.
    wait_for(lambda: index.background_lookups == 0)
    gets = store.gets
    hits, _waited = until_answer(index, "r2", IDS[:4])
    assert hits == tuple(IDS[:4]) and store.gets == gets


def test_loads_deadline_and_outcome(io: LoopThread) -> None:
    store = StallingStore()
    commit(store, 2)
    index, counters = make(io, store)
    hits = until_answer(index, "r1", IDS[:2])[0]
    assert len(hits) == 2
    got = index.lookup("r1b", IDS[:2])
    assert got is not None
    deadline = index.prepare_load("r1", 32, got)
    assert deadline == pytest.approx(0.2)  # nothing measured: the floor
    index.complete_load("r1", ok=True)
    assert counters.get("cache_wait_seconds") > 0
    assert not index.breaker.is_open
    # A failed load costs its request, never the cache: not a corrupt shard, not
    # a 404 after GC, not a load that ran past its deadline on the scheduler's
    # clock (engine steps and queueing count there, not only the store).
    index.prepare_load("r2", 32, got)
    index.complete_load("r2", ok=False, now=time.monotonic() + 0.1)
    assert not index.breaker.is_open
    index.prepare_load("r3", 32, got)
    index.complete_load("r3", ok=False, now=time.monotonic() + 1.0)
    assert not index.breaker.is_open and counters.get("breaker_opens") == 0


def test_a_lookup_that_keeps_finding_chunks_is_not_cut_short(io: LoopThread) -> None:
    store = StallingStore()
    commit(store, 12)
    index, counters = make(io, store)
    # Each round takes 60 ms, well under the 200 ms floor, but the four rounds
    # of a 12-chunk lookup take over 200 ms in all: every answered round restarts
    # the clock.
    store.delay = lambda key: 0.06 if "manifest" in key else 0.0
    hits, waited = until_answer(index, "r1", IDS)
    assert hits == tuple(IDS) and waited >= 0.22
    assert counters.get("lookups_truncated") == 0 and counters.get("lookup_deadline_misses") == 0


def test_save_plans_close_with_their_outcome(io: LoopThread) -> None:
    store = StallingStore()
    skipped = [0.0]  # seconds the index's clock is ahead of the real one
    index, counters = make(io, store, clock=lambda: time.monotonic() + skipped[0])
    a, b, c = IDS[:3]
    assert index.prepare_store(a, requested=False)
    assert not index.prepare_store(a, requested=False)  # being saved
    # Dropped (upload memory full), failed, its round lost: planned again.
    index.complete_store(a, ok=False)
    assert counters.get("save_plans_failed") == 1
    assert index.prepare_store(a, requested=False)
    index.complete_store(a, ok=True)
    assert not index.prepare_store(a, requested=False)  # committed
    # A plan whose outcome never comes back is planned again after the
    # commit timeout (plus a grace period).
    assert index.prepare_store(b, requested=False) and not index.prepare_store(b, requested=False)
    skipped[0] += SETTINGS.commit_timeout_s + 61
    assert index.prepare_store(b, requested=False)
    assert counters.get("save_outcomes_lost") == 1
    assert index.prepare_store(c, requested=False)


def test_a_chunk_gc_deleted_is_saved_again(io: LoopThread) -> None:
    store = StallingStore()
    commit(store, 3)
    skipped = [0.0]  # seconds the index's clock is ahead of the real one
    index, _counters = make(io, store, clock=lambda: time.monotonic() + skipped[0])
    assert until_answer(index, "r1", IDS[:3])[0] == tuple(IDS[:3])
    assert not index.prepare_store(IDS[2], requested=False)  # known committed
    # GC deletes chunk 2's manifest; the next lookup that asks the store learns it.
    io.run(store.delete_many([LAYOUT.manifest(FP.namespace, IDS[2])]))
    skipped[0] += 301  # the manifest cache's 300 s TTL runs out
    assert until_answer(index, "r2", IDS[:3])[0] == tuple(IDS[:2])
    assert index.prepare_store(IDS[2], requested=False)
    # Found through the manifest cache instead, the load fails and marks it bad.
    assert not index.prepare_store(IDS[1], requested=False)
    index.mark_bad(IDS[1])
    assert index.prepare_store(IDS[1], requested=False)


class Overwriting(StallingStore):
    """A server that ignores If-None-Match, as some S3-compatible ones do: a
    create-only put silently overwrites. Records every put (key, mode)."""

    def __init__(self, honour: bool = False) -> None:
        super().__init__()
        self.honour = honour
        self.puts: list[tuple[str, str]] = []

    async def put(self, key: str, data: Buffer, *, mode: PutMode = "overwrite") -> str | None:
        self.puts.append((key, mode))
        return await super().put(key, data, mode=mode if self.honour else "overwrite")


def doc_puts(store: Overwriting) -> list[str]:
    """The modes of the start-up's PUTs of the namespace document."""
    return [m for k, m in store.puts if k == LAYOUT.namespace_doc(FP.namespace)]


def test_a_server_that_ignores_create_only_puts_gets_no_saves_for_the_engines_life(
        io: LoopThread, caplog: pytest.LogCaptureFixture) -> None:
    store = Overwriting()
    commit(store, 3)
    before = set(store.keys(LAYOUT.root()))
    with caplog.at_level(logging.ERROR, logger="s3kv.index"):
        index, counters = make(io, store)
        assert index.wait_started(5.0)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "ignores If-None-Match" in errors[0] and "saves NOTHING" in errors[0]
    assert "default AWS S3 endpoint" in errors[0] and "'memory'" in errors[0]
    # The check: the namespace document PUT create-only twice; both went through.
    assert doc_puts(store) == ["create", "create"]
    assert set(store.keys(LAYOUT.root())) == before | {LAYOUT.namespace_doc(FP.namespace)}
    assert not store.capabilities.conditional_create
    assert not index.saves_allowed()
    assert not index.prepare_store(IDS[5], requested=True)
    assert counters.get("saves_skipped_store_down") == 0  # not an outage
    # Reading is safe: lookups still hit, and the breaker has nothing to say.
    assert until_answer(index, "r1", IDS[:3])[0] == tuple(IDS[:3])
    assert not index.breaker.is_open
    # An outage and its end change nothing: saves stay off.
    index.breaker.failure(Unavailable("connection reset"))
    wait_for(lambda: not index.breaker.is_open)
    assert not index.saves_allowed()
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1


@pytest.mark.parametrize("exists", [False, True], ids=["new-namespace", "known-namespace"])
def test_a_server_that_honours_create_only_puts_keeps_saves_on(
        io: LoopThread, caplog: pytest.LogCaptureFixture, exists: bool) -> None:
    """A new namespace: its document is created, and a second create-only PUT
    is refused. A known one: the first PUT is refused already. Either way no
    object but the document, no error, saves on."""
    store = Overwriting(honour=True)
    if exists:
        store.put_nowait(LAYOUT.namespace_doc(FP.namespace), FP.document())
    with caplog.at_level(logging.ERROR, logger="s3kv.index"):
        index, _counters = make(io, store)
        assert index.wait_started(5.0)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert doc_puts(store) == (["create"] if exists else ["create", "create"])
    assert set(store.keys(LAYOUT.root())) == {LAYOUT.namespace_doc(FP.namespace)}
    assert store.capabilities.conditional_create and index.saves_allowed()
    assert index.prepare_store(IDS[0], requested=False)
