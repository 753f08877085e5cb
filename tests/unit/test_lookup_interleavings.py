"""The scheduler side and the cache index under any interleaving of requests,
lookups, store answers, failed loads and deadlines.

A hypothesis state machine drives :class:`SchedulerSide` through vLLM's own
hook order (``get_num_new_matched_tokens``, then ``update_state_after_alloc``
when vLLM could allocate, then ``build_connector_meta``; load outcomes through
``update_connector_output``), over an in-memory store whose manifest GETs
wait until the machine answers them, in any order. The I/O loop is stepped by
hand and the index reads a clock the machine moves, so every interleaving is
reproducible and shrinks to a short story.

Invariants, checked on every answer and every planned load:

* every block a load fills receives the manifest of the chunk that block
  belongs to (chunk *i*'s KV into chunk *i*'s blocks);
* a hit never reaches past a chunk that is not committed in the store, nor
  past one marked bad before the lookup answered;
* the guard that checks the first invariant inside the scheduler side never
  fires (it is a second line of defence, not a mechanism).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest

pytest.importorskip("vllm")

from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from devtools.memory_store import MemoryStore
from s3kv.config import parse_settings
from s3kv.errors import Unavailable
from s3kv.index import CacheIndex
from s3kv.keys import Fingerprint, KeyLayout, chain_chunk_ids
from s3kv.manifest import ShardEntry, new_manifest
from s3kv.stats import Counters
from s3kv.vllm.metadata import WorkerReport
from s3kv.vllm.scheduler_side import SchedulerSide

T = TypeVar("T")

CT = 32  # tokens per chunk
BS = 16  # vLLM block size: two blocks per chunk
FP = Fingerprint(model="m", weights_id="w", dtype="float32", chunk_tokens=CT, num_layers=1,
                 num_kv_heads=1, head_size=8)
LAYOUT = KeyLayout("s3kv")
SETTINGS = parse_settings({"bucket": "bkt", "chunk_tokens": CT, "min_lookup_wait_s": 0.5,
                           "min_load_wait_s": 0.5})

_BASE = [(7 * i) % 997 + 3 for i in range(6 * CT)]
_OTHER = [(11 * i) % 991 + 5 for i in range(6 * CT)]
PROMPTS = [
    [*_BASE, 1, 2, 3, 4, 5],                 # 6 chunks and a tail
    _BASE[: 3 * CT] + _OTHER[: 3 * CT] + [9],  # shares 3 chunks with the first
    [*_BASE[:4 * CT], 8],                   # shares 4 chunks, one token past them
]
PROMPT_IDS = [chain_chunk_ids(p, CT) for p in PROMPTS]
BLOCKS_PER_REQ = 1000  # block id = request number * 1000 + block index


class SteppedLoop:
    """The index's I/O loop, run only when the machine says so."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        out: Future[T] = Future()
        task = self.loop.create_task(coro)

        def done(t: asyncio.Task[T]) -> None:
            if out.done():
                return
            if t.cancelled():
                out.cancel()
            elif t.exception() is not None:
                out.set_exception(t.exception())  # type: ignore[arg-type]
            else:
                out.set_result(t.result())

        task.add_done_callback(done)
        out.add_done_callback(lambda f: task.cancel() if f.cancelled() else None)
        return out

    def settle(self) -> None:
        for _ in range(30):
            self.loop.run_until_complete(asyncio.sleep(0))

    def close(self) -> None:
        for task in asyncio.all_tasks(self.loop):
            task.cancel()
        self.settle()
        self.loop.close()


class GatedStore(MemoryStore):
    """Manifest GETs wait until the machine answers or fails them."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[tuple[str, asyncio.Future[bool]]] = []

    async def get(self, key: str) -> memoryview:
        if key.endswith("manifest.json"):
            gate: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            self.waiting.append((key, gate))
            try:
                ok = await gate
            finally:
                self.waiting = [(k, g) for k, g in self.waiting if g is not gate]
            if not ok:
                raise Unavailable("injected", key=key)
        return await super().get(key)


@dataclass
class FakeRequest:
    request_id: str
    all_token_ids: list[int]
    lora_request: Any = None
    cache_salt: Any = None
    prompt_embeds: Any = None
    mm_features: Any = None
    kv_transfer_params: Any = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


@dataclass
class FakeBlocks:
    ids: list[int]

    def get_block_ids(self) -> tuple[list[int], ...]:
        return (self.ids,)


@dataclass
class Live:
    request: FakeRequest
    prompt: int
    number: int
    load_blocks: dict[int, str] = field(default_factory=dict)  # block id -> chunk id loaded


def _empty_step() -> Any:
    cached = SimpleNamespace(req_ids=[], new_block_ids=[], resumed_req_ids=set(),
                             num_computed_tokens=[])
    return SimpleNamespace(scheduled_new_reqs=[], scheduled_cached_reqs=cached,
                           num_scheduled_tokens={}, total_num_scheduled_tokens=0)


def commit(store: MemoryStore, prompt: int, i: int) -> None:
    ids = PROMPT_IDS[prompt]
    cid = ids[i]
    entry = ShardEntry(0, LAYOUT.shard(FP.namespace, cid, "tp1-w", 0), 128, "0" * 32,
                       0, 1, 64, ("0" * 32,))
    m = new_manifest(namespace=FP.namespace, chunk_id=cid, parent_id=ids[i - 1] if i else None,
                     chunk_index=i, num_tokens=CT, writer="tp1-w", shards=[entry], tp_size=1)
    store.put_nowait(LAYOUT.manifest(FP.namespace, cid), m.encode())


class LookupInterleavings(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.now = 1000.0
        self.io = SteppedLoop()
        self.store = GatedStore()
        self.counters = Counters()
        index = CacheIndex(SETTINGS, FP, self.counters, self.store, self.io,
                           clock=lambda: self.now)
        self.sched = SchedulerSide(SETTINGS, FP, BS, can_load=True, can_save=False,
                                   counters=self.counters, index=index)
        self.io.settle()
        self.live: dict[str, Live] = {}
        self.numbers = itertools.count()
        self.bad: set[str] = set()

    def teardown(self) -> None:
        if hasattr(self, "io"):
            self.io.close()

    # --- the world --------------------------------------------------------------

    @rule(prompt=st.integers(0, len(PROMPTS) - 1))
    def arrive(self, prompt: int) -> None:
        n = next(self.numbers)
        rid = f"r{n}"
        self.live[rid] = Live(FakeRequest(rid, list(PROMPTS[prompt])), prompt, n)

    @rule(prompt=st.integers(0, len(PROMPTS) - 1), chunk=st.integers(0, 5))
    def writer_commits(self, prompt: int, chunk: int) -> None:
        if chunk < len(PROMPT_IDS[prompt]):
            commit(self.store, prompt, chunk)

    @precondition(lambda self: any(not g.done() for _, g in self.store.waiting))
    @rule(pick=st.integers(0, 100), ok=st.booleans())
    def store_answers(self, pick: int, ok: bool) -> None:
        gates = [g for _, g in self.store.waiting if not g.done()]
        gates[pick % len(gates)].set_result(ok)
        self.io.settle()

    @rule()
    def deadline_passes(self) -> None:
        self.now += 100.0

    # --- vLLM's scheduler -----------------------------------------------------------

    @precondition(lambda self: any(not lv.load_blocks for lv in self.live.values()))
    @rule(pick=st.integers(0, 100), local_blocks=st.integers(0, 12), allocated=st.booleans())
    def schedule(self, pick: int, local_blocks: int, allocated: bool) -> None:
        waiting = [lv for lv in self.live.values() if not lv.load_blocks]
        lv = waiting[pick % len(waiting)]
        req = lv.request
        num_computed = min(local_blocks * BS, (req.num_tokens - 1) // BS * BS)
        bad_before = set(self.bad)
        n, is_async = self.sched.get_num_new_matched_tokens(req, num_computed)  # type: ignore[arg-type]
        self.io.settle()
        if n is None or n == 0:
            return
        assert is_async and n > 0
        ids = PROMPT_IDS[lv.prompt]
        for ci in range(num_computed // CT, (num_computed + n - 1) // CT + 1):
            key = LAYOUT.manifest(FP.namespace, ids[ci])
            assert self.store.keys(key), f"hit past an uncommitted chunk {ci}"
            assert ids[ci] not in bad_before, f"hit past a chunk marked bad ({ci})"
        if not allocated:
            return  # vLLM could not allocate: it asks again in a later step
        blocks = [lv.number * BLOCKS_PER_REQ + b for b in range(req.num_tokens // BS + 1)]
        self.sched.update_state_after_alloc(req, FakeBlocks(blocks), n)  # type: ignore[arg-type]
        meta = self.sched.build_connector_meta(_empty_step())
        loads = [lr for lr in meta.loads if lr.req_id == req.request_id]
        assert len(loads) == 1
        filled = []
        for ch in loads[0].chunks:
            for _, bid in ch.groups[0]:
                ci = (bid % BLOCKS_PER_REQ) // (CT // BS)
                assert ch.manifest.chunk_id == ids[ci], (
                    f"chunk {ci}'s blocks would receive another chunk's KV")
                lv.load_blocks[bid] = ch.manifest.chunk_id
                filled.append(bid % BLOCKS_PER_REQ)
        assert filled == list(range(num_computed // BS, (num_computed + n) // BS))

    @precondition(lambda self: any(lv.load_blocks for lv in self.live.values()))
    @rule(pick=st.integers(0, 100), fail=st.booleans(), which=st.integers(0, 100))
    def loads_finish(self, pick: int, fail: bool, which: int) -> None:
        loading = [lv for lv in self.live.values() if lv.load_blocks]
        lv = loading[pick % len(loading)]
        invalid: set[int] = set()
        report = None
        if fail:
            # As a worker reports it: the blocks to vLLM, the chunk to the scheduler.
            bid = sorted(lv.load_blocks)[which % len(lv.load_blocks)]
            invalid = {bid}
            self.bad.add(lv.load_blocks[bid])
            report = WorkerReport(bad_loads=(lv.load_blocks[bid],))
        out = SimpleNamespace(invalid_block_ids=invalid, failed_recving=None,
                              finished_recving={lv.request.request_id},
                              kv_connector_worker_meta=report)
        self.sched.update_connector_output(out)  # type: ignore[arg-type]
        self.sched.request_finished(lv.request)  # type: ignore[arg-type]
        del self.live[lv.request.request_id]

    @precondition(lambda self: bool(self.live))
    @rule(pick=st.integers(0, 100))
    def aborted(self, pick: int) -> None:
        lv = list(self.live.values())[pick % len(self.live)]
        self.sched.request_finished(lv.request)  # type: ignore[arg-type]
        del self.live[lv.request.request_id]
        self.io.settle()

    @invariant()
    def guard_never_fires(self) -> None:
        if hasattr(self, "counters"):
            assert self.counters.get("hit_misalignments") == 0


LookupInterleavings.TestCase.settings = hsettings(
    max_examples=150, stateful_step_count=40, deadline=None)
test_lookup_interleavings = LookupInterleavings.TestCase


class _ShiftedIndex(CacheIndex):
    """An index that answers one chunk off (what the old pending-lookup bug did)."""

    def lookup(self, key: str, candidates: Any) -> Any:
        got = super().lookup(key, candidates)
        return None if got is None else got[1:]


def test_the_guard_cuts_a_hit_at_the_first_chunk_that_is_not_its_own() -> None:
    io = SteppedLoop()
    try:
        store = GatedStore()
        for i in range(6):
            commit(store, 0, i)
        counters = Counters()
        index = _ShiftedIndex(SETTINGS, FP, counters, store, io)
        sched = SchedulerSide(SETTINGS, FP, BS, can_load=True, can_save=False,
                              counters=counters, index=index)
        req = FakeRequest("r", list(PROMPTS[0]))
        io.settle()
        assert sched.get_num_new_matched_tokens(req, 0) == (None, False)  # type: ignore[arg-type]
        io.settle()
        while store.waiting:
            store.waiting[0][1].set_result(True)
            io.settle()
        # Chunk 1's manifest offered for chunk 0's blocks: nothing is loaded.
        assert sched.get_num_new_matched_tokens(req, 0) == (0, False)  # type: ignore[arg-type]
        assert counters.get("hit_misalignments") == 5
    finally:
        io.close()
