"""Rank 0 reports every chunk's save outcome exactly once, and the committer
survives a broken gather: real Committers in-process over an in-memory store.

The multi-process GLOO counterparts are in ``test_recovery.py``; here a
scripted peer stands in for rank 1, so each path of the recovery (failed
re-forming attempts, rounds consumed while waiting, a peer that consumed more
rounds) runs deterministically, ordered by events rather than time.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from devtools.memory_store import MemoryStore
from s3kv.aio import LoopThread
from s3kv.commit import (
    ChunkSave,
    Committer,
    LocalGatherer,
    RecoveryImpossible,
    RoundReport,
    ShardReport,
)
from s3kv.errors import Unavailable
from s3kv.keys import ChunkRef, KeyLayout, chain_chunk_ids, new_writer_id
from s3kv.shard import PayloadLayout, ShardSpec, allocate

LAYOUT = KeyLayout("s3kv")
NS = "00112233445566778899aabbccddeeff"
HEADS = 2
PAYLOAD = PayloadLayout("float16", ("l0", "l1"), 16, 8)
CIDS = chain_chunk_ids(list(range(12 * 16)), 16)
REFS = [ChunkRef(c, CIDS[i - 1] if i else None, i, 16) for i, c in enumerate(CIDS)]


def save(i: int, heads: tuple[int, int] = (0, HEADS)) -> ChunkSave:
    buf, view = allocate(ShardSpec(CIDS[i], 0, heads[0], heads[1], PAYLOAD))
    view[:] = random.Random(i).randbytes(len(view))
    return ChunkSave(REFS[i], buf)


def ids(*idx: int) -> set[str]:
    return {CIDS[i] for i in idx}


class FaultStore:
    """A MemoryStore whose PUTs of the named keys fail."""

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.fail: set[str] = set()

    async def put(self, key: str, data: Any, *, mode: str = "overwrite") -> str | None:
        if key in self.fail:
            raise Unavailable("injected", key=key)
        return await self.inner.put(key, data, mode="create" if mode == "create" else "overwrite")

    async def get(self, key: str) -> memoryview:
        return await self.inner.get(key)


@pytest.fixture
def io() -> Iterator[LoopThread]:
    loop = LoopThread("outcomes-io")
    yield loop
    loop.stop()


def take_all(c: Committer) -> tuple[list[str], list[str]]:
    ok, failed = c.take_outcomes()
    assert c.take_outcomes() == ((), ()), "outcomes are handed out once"
    return list(ok), list(failed)


def test_every_chunk_ends_committed_or_failed_exactly_once(io: LoopThread) -> None:
    store = FaultStore()
    writer = new_writer_id(1, "outcomes")
    store.fail.add(LAYOUT.shard(NS, CIDS[2], writer, 0, 1))  # upload fails
    store.inner.put_nowait(LAYOUT.manifest(NS, CIDS[4]), b"{}")  # committed by someone else
    store.fail.add(LAYOUT.manifest(NS, CIDS[5]))  # manifest PUT fails
    store.inner.put_nowait(LAYOUT.shard(NS, CIDS[6], writer, 0, 3), b"other bytes")  # conflict
    c = Committer(io=io, store=store, layout=LAYOUT, namespace=NS, writer_id=writer,
                  gatherer=LocalGatherer(), max_inflight_bytes=1 << 20, num_heads=HEADS)
    try:
        assert c.submit(0, [save(0), save(1)])
        assert c.submit(1, [save(2), save(3)])
        assert c.submit(2, [save(4), save(5)])
        assert c.submit(3, [save(6)])
        c.submit_dropped(4, [REFS[7]])
        assert c.submit(5, [save(8, heads=(0, 1))])  # covers 1 of the model's 2 heads
        assert c.flush(30)  # every upload done: their memory is free again
        assert c.try_reserve((1 << 20) - 100)  # upload memory now full
        assert not c.submit(6, [save(9)])
        assert c.flush(30)
        ok, failed = take_all(c)
    finally:
        c.close()
    assert sorted(ok + failed) == sorted(CIDS[:10])
    assert set(ok) == ids(0, 1, 3, 4)
    assert set(failed) == ids(2, 5, 6, 7, 8, 9)
    snap = c.counters.snapshot()
    assert (snap["chunks_committed"], snap["chunks_already_committed"]) == (3, 1)
    assert (snap["upload_failures"], snap["shard_conflicts"], snap["commit_failures"]) == (1, 1, 1)
    assert (snap["saves_dropped"], snap["chunks_not_committed"]) == (2, 5)


class ScriptedPeer:
    """Rank 0 of two; rank 1 is simulated. Gathers of ``fail_round`` raise (a timeout),
    ``skew_round``'s peer report names the next round (out of step), the first
    ``reform_failures`` re-forming attempts fail once ``may_reform`` is set, and at
    the re-formed group's first exchange the peer has consumed ``ahead`` more rounds."""

    rank = 0
    world_size = 2

    def __init__(self, fail_round: int | None, skew_round: int | None,
                 reform_failures: int, ahead: int) -> None:
        self.fail_round, self.skew_round = fail_round, skew_round
        self.reform_failures, self.ahead = reform_failures, ahead
        self.may_reform = threading.Event()
        self.waits: list[float] = []
        self.impossible = False

    def gather(self, obj: Any) -> list[Any] | None:
        if isinstance(obj, RoundReport):
            if obj.round_id == self.fail_round:
                raise RuntimeError("Timed out waiting 2000ms for recv operation to complete")
            rid = obj.round_id + (obj.round_id == self.skew_round)
            return [obj, RoundReport(rid, 1, tuple(ShardReport(s.ref, True) for s in obj.shards))]
        tag, _, consumed = obj
        return [obj, (tag, 1, consumed + self.ahead)]

    def broadcast(self, obj: Any) -> Any:
        return obj

    def reform(self, wait_s: float) -> None:
        self.waits.append(wait_s)
        if not self.may_reform.wait(30):
            raise RuntimeError("the test never let the group re-form")
        if self.impossible:
            raise RecoveryImpossible("store gone")
        if len(self.waits) <= self.reform_failures:
            raise RuntimeError("wait timeout after 1000ms, keys: .../1/ready")


class Watch:
    """The committer's events, and a threading.Event per event name."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.seen: dict[str, threading.Event] = {
            n: threading.Event() for n in ("broken", "reformed", "recovery_impossible")}

    def __call__(self, name: str, info: dict[str, Any]) -> None:
        self.events.append((name, info))
        if name in self.seen:
            self.seen[name].set()

    def wait(self, name: str) -> None:
        assert self.seen[name].wait(30), f"no {name!r} event"


@pytest.mark.parametrize("cause", ["gather_timeout", "out_of_step"])
def test_broken_group_recovers_and_reports_skipped_rounds(io: LoopThread, cause: str) -> None:
    peer = ScriptedPeer(fail_round=2 if cause == "gather_timeout" else None,
                        skew_round=2 if cause == "out_of_step" else None,
                        reform_failures=3, ahead=1)
    watch = Watch()
    c = Committer(io=io, store=MemoryStore(), layout=LAYOUT, namespace=NS,
                  writer_id=new_writer_id(2, "recover"), gatherer=peer,
                  max_inflight_bytes=1 << 20, num_heads=HEADS, on_event=watch,
                  reform_backoff=(0.001, 0.004))
    try:
        assert c.submit(0, [save(0), save(1)])
        assert c.submit(1, [save(2), save(3)])
        assert c.submit(2, [save(4), save(5)])
        watch.wait("broken")
        reason = c.broken
        assert reason is not None and ("gather of round 2" in reason
                                       if cause == "gather_timeout" else "out of step" in reason)
        # The forward path never waits while the group re-forms; nothing is uploaded.
        assert not c.try_reserve(1)
        assert not c.submit(3, [save(6)])
        c.submit_dropped(4, [REFS[7]])
        peer.may_reform.set()
        watch.wait("reformed")
        assert c.broken is None
        assert c.submit(5, [save(8)])  # the peer had consumed it already: skipped
        assert c.submit(6, [save(9)])
        assert c.flush(30)
        ok, failed = take_all(c)
    finally:
        c.close()
    assert sorted(ok + failed) == sorted(CIDS[:10])
    assert set(ok) == ids(0, 1, 2, 3, 9)
    assert set(failed) == ids(4, 5, 6, 7, 8)
    assert peer.waits == [0.001, 0.002, 0.004, 0.004]  # backing off, bounded
    snap = c.counters.snapshot()
    assert snap.get("commit_gather_failures", 0) == (cause == "gather_timeout")
    assert snap["commit_group_reforms"] == 1 and c.reforms == 1
    assert snap["commit_rounds_skipped"] == 3  # 3 and 4 while waiting, 5 at the resync
    assert snap.get("saves_dropped", 0) == 0  # not for lack of memory
    assert snap["chunks_committed"] == 5
    names = [n for n, _ in watch.events if n in ("broken", "skipped", "reformed")]
    assert names == ["broken", "skipped", "skipped", "reformed", "skipped"]


def test_a_group_that_can_never_reform_stops_saving_for_good(
    io: LoopThread, caplog: pytest.LogCaptureFixture
) -> None:
    peer = ScriptedPeer(fail_round=0, skew_round=None, reform_failures=0, ahead=0)
    peer.impossible = True
    peer.may_reform.set()
    watch = Watch()
    c = Committer(io=io, store=MemoryStore(), layout=LAYOUT, namespace=NS,
                  writer_id=new_writer_id(2, "gone"), gatherer=peer,
                  max_inflight_bytes=1 << 20, num_heads=HEADS, on_event=watch,
                  reform_backoff=(0.001, 0.004))
    try:
        with caplog.at_level(logging.WARNING, logger="s3kv.commit"):
            c.submit(0, [save(0)])
            watch.wait("recovery_impossible")
            assert not c.submit(1, [save(1)])
            assert not c.submit(2, [save(2)])
            assert c.flush(30)
        ok, failed = take_all(c)
    finally:
        c.close()
    assert ok == [] and sorted(failed) == sorted(CIDS[:3])
    assert c.broken is not None and "cannot be re-formed" in c.broken
    assert peer.waits == [0.001]  # tried once, then never again
    assert c.counters.get("commit_rounds_skipped") == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "until the engine restarts" in errors[0].getMessage()
