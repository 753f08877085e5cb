"""The core (verified reader, prefix lookup, commit) over real stores behind the
fault proxy: a fault may cost a hit or a save, never hand back wrong bytes or
leave a manifest that names missing or unverified shards."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from devtools.fault_proxy import (
    Blackhole,
    Drop,
    FlipBytes,
    InternalError,
    SlowDown,
    Truncate,
)
from s3kv.aio import LoopThread
from s3kv.commit import ChunkSave, Committer, LocalGatherer
from s3kv.errors import IntegrityError, NotFound, StoreError
from s3kv.keys import ChunkRef, chain_chunk_ids, new_writer_id
from s3kv.lookup import find_committed_prefix
from s3kv.manifest import Manifest, decode_manifest
from s3kv.reader import read_shard
from s3kv.shard import PayloadLayout, ShardSpec, allocate
from s3kv.store import ObjectStore, open_store
from tests.faults.conftest import Target
from tests.unit.builders import LAYERS, LAYOUT, NS, Chunk, build_chunk

# One head of the big chunk: 3 layers x 128 tokens x 64 elements, fp16: 48 KiB.
BIG = PayloadLayout("float16", LAYERS, 128, 64)


def seed_chunk(target: Target, chunk: Chunk) -> None:
    """Write a chunk's shards and manifest straight to moto."""
    s3 = target.upstream_client()
    for rank, data in chunk.shards.items():
        key = chunk.manifest.shard_for_rank(rank).key
        s3.put_object(Bucket=target.bucket, Key=key, Body=data)
    s3.put_object(Bucket=target.bucket, Key=LAYOUT.manifest(NS, chunk.manifest.chunk_id),
                  Body=chunk.manifest.encode())


def big_chunk(index: int = 0) -> Chunk:
    """One rank, four heads of 48 KiB each: a ~190 KiB shard."""
    chunk = build_chunk(index, tp=1, heads_per_rank=4, payload=BIG)
    assert chunk.manifest.shard_for_rank(0).head_bytes == 48 << 10
    return chunk


async def read_rank0(store: ObjectStore, chunk: Chunk) -> memoryview:
    """Rank 0's whole shard of a big chunk, verified against the big payload layout."""
    m = chunk.manifest
    return await read_shard(store, m, m.shard_for_rank(0), BIG)


def shard_path(chunk: Chunk, rank: int = 0) -> str:
    return "/" + chunk.manifest.shard_for_rank(rank).key + "$"


# --- verified reads ------------------------------------------------------------------


def test_clean_read_through_the_proxy_verifies(target: Target) -> None:
    chunk = big_chunk()
    seed_chunk(target, chunk)
    payload = target.run(lambda s: read_rank0(s, chunk))
    assert bytes(payload) == chunk.payload(0)


def test_truncated_shard_body_is_never_returned(target: Target) -> None:
    chunk = big_chunk()
    seed_chunk(target, chunk)
    rule = target.proxy.add("GET", shard_path(chunk), Truncate())

    async def body(store: ObjectStore) -> None:
        with pytest.raises((IntegrityError, StoreError)):
            await read_rank0(store, chunk)

    target.run(body)
    assert rule.injected >= 1


@pytest.mark.parametrize("offset", [0, 40, -1], ids=["magic", "header", "payload-end"])
def test_flipped_shard_bytes_raise_integrity_error(target: Target, offset: int) -> None:
    chunk = big_chunk()
    seed_chunk(target, chunk)
    target.proxy.add("GET", shard_path(chunk), FlipBytes(offsets=(offset,)))

    async def body(store: ObjectStore) -> None:
        with pytest.raises(IntegrityError):
            await read_rank0(store, chunk)

    target.run(body)


def test_flip_in_the_middle_of_the_payload_raises_integrity_error(target: Target) -> None:
    chunk = big_chunk()
    seed_chunk(target, chunk)
    target.proxy.add("GET", shard_path(chunk), FlipBytes())

    async def body(store: ObjectStore) -> None:
        with pytest.raises(IntegrityError, match="checksum"):
            await read_rank0(store, chunk)

    target.run(body)


# --- prefix lookup -------------------------------------------------------------------


LOOKUP_HEADS = 4


@pytest.fixture
def three_committed(target: Target) -> list[Manifest]:
    chunks = [build_chunk(i, tp=1, heads_per_rank=LOOKUP_HEADS) for i in range(3)]
    for c in chunks:
        seed_chunk(target, c)
    return [c.manifest for c in chunks]


def manifest_path(m: Manifest) -> str:
    return "/" + LAYOUT.manifest(NS, m.chunk_id) + "$"


def lookup(target: Target, manifests: list[Manifest], **settings: Any) -> list[Manifest]:
    ids = [m.chunk_id for m in manifests]
    return target.run(
        lambda s: find_committed_prefix(s, LAYOUT, NS, ids, num_heads=LOOKUP_HEADS), **settings)


def test_lookup_through_the_proxy_finds_the_whole_prefix(
    target: Target, three_committed: list[Manifest]
) -> None:
    assert lookup(target, three_committed) == three_committed


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_dropped_manifest_gets_raise_store_error(
    target: Target, three_committed: list[Manifest], reset: bool
) -> None:
    rule = target.proxy.add("GET", manifest_path(three_committed[1]), Drop(reset=reset))
    with pytest.raises(StoreError):
        lookup(target, three_committed)
    assert rule.injected >= 3  # every attempt was dropped


def test_every_manifest_get_dropped_raises_store_error(
    target: Target, three_committed: list[Manifest]
) -> None:
    target.proxy.add("GET", r"/manifest\.json$", Drop())
    with pytest.raises(StoreError):
        lookup(target, three_committed, max_attempts=2)


def test_one_dropped_manifest_get_is_retried_to_the_right_manifests(
    target: Target, three_committed: list[Manifest]
) -> None:
    rule = target.proxy.add("GET", r"/manifest\.json$", Drop(), nth=2)
    assert lookup(target, three_committed) == three_committed
    assert rule.injected == 1


def test_corrupted_manifest_is_a_miss_never_a_hit(
    target: Target, three_committed: list[Manifest]
) -> None:
    target.proxy.add("GET", manifest_path(three_committed[1]), FlipBytes())
    assert lookup(target, three_committed) == three_committed[:1]


def test_truncated_manifest_is_an_error_or_a_miss(
    target: Target, three_committed: list[Manifest]
) -> None:
    target.proxy.add("GET", manifest_path(three_committed[1]), Truncate())
    try:
        found = lookup(target, three_committed)
    except StoreError:
        return
    assert found == three_committed[:1]


# --- commit --------------------------------------------------------------------------

WRITER = new_writer_id(1, "fault-writer")
CHUNK_IDS = chain_chunk_ids(list(range(64)), 16)
RIG_HEADS = 2
# One head of one 16-token chunk: 2 layers x 16 tokens x 16 elements, fp16: 1 KiB.
RIG_PAYLOAD = PayloadLayout("float16", ("l0", "l1"), 16, 16)


@dataclass
class Rig:
    io: LoopThread
    store: ObjectStore
    committer: Committer
    events: list[tuple[str, dict[str, Any]]]

    def saves(self, n: int) -> list[ChunkSave]:
        out = []
        for i in range(n):
            cid = CHUNK_IDS[i]
            spec = ShardSpec(cid, 0, 0, RIG_HEADS, RIG_PAYLOAD)
            buf, payload = allocate(spec)
            payload[:] = random.Random(i).randbytes(len(payload))
            out.append(ChunkSave(ChunkRef(cid, CHUNK_IDS[i - 1] if i else None, i, 16), buf))
        return out

    def commit(self, n: int) -> None:
        assert self.committer.submit(0, self.saves(n))
        assert self.committer.flush(60)

    def counter(self, name: str) -> float:
        return self.committer.counters.get(name)


MakeRig = Callable[..., Rig]
FAST_FAIL = {"request_timeout_s": 1.0, "max_attempts": 2}


@pytest.fixture
def make_rig(target: Target) -> Iterator[MakeRig]:
    """Builds a committer (world size 1) over a store through the proxy."""
    rigs: list[Rig] = []

    def make(**settings: Any) -> Rig:
        io = LoopThread("fault-commit-io")
        store = io.run(open_store(target.settings(**settings)))
        events: list[tuple[str, dict[str, Any]]] = []
        committer = Committer(
            io=io, store=store, layout=LAYOUT, namespace=NS, writer_id=WRITER,
            gatherer=LocalGatherer(), max_inflight_bytes=64 << 20, num_heads=RIG_HEADS,
            on_event=lambda name, info: events.append((name, dict(info))),
        )
        rigs.append(Rig(io, store, committer, events))
        return rigs[-1]

    yield make
    for r in rigs:
        r.committer.close()
        r.io.run(r.store.close())
        r.io.stop()


def committed(target: Target, n: int) -> dict[str, Manifest]:
    """chunk_id -> manifest for each committed chunk, every shard verified."""

    async def body(store: ObjectStore) -> dict[str, Manifest]:
        out = {}
        for cid in CHUNK_IDS[:n]:
            try:
                doc = await store.get(LAYOUT.manifest(NS, cid))
            except NotFound:
                continue
            m = decode_manifest(doc, layout=LAYOUT, expect_namespace=NS, expect_chunk_id=cid,
                                expect_heads=RIG_HEADS)
            assert (m.tp_size, m.writer) == (1, WRITER)
            await read_shard(store, m, m.shard_for_rank(0), RIG_PAYLOAD)
            out[cid] = m
        return out

    target.proxy.clear()
    return target.run(body)


def manifest_keys(target: Target) -> list[str]:
    return [k for k in target.upstream_keys(LAYOUT.namespace_prefix(NS))
            if k.endswith("manifest.json")]


def test_commit_through_the_proxy_writes_verified_manifests(
    target: Target, make_rig: MakeRig
) -> None:
    rig = make_rig()
    rig.commit(2)
    assert set(committed(target, 2)) == set(CHUNK_IDS[:2])
    assert rig.counter("chunks_committed") == 2


@pytest.mark.parametrize("action", [InternalError(), SlowDown(), Drop(), Blackhole()],
                         ids=["500", "503", "drop", "blackhole"])
def test_failed_shard_puts_leave_no_manifest(
    target: Target, make_rig: MakeRig, action: Any
) -> None:
    rig = make_rig(**FAST_FAIL)
    target.proxy.add("PUT", rf"/{WRITER}\.\d+/r0$", action)
    rig.commit(2)
    assert target.upstream_keys(LAYOUT.namespace_prefix(NS)) == []  # no manifest, no shard
    assert rig.counter("upload_failures") == 2
    assert rig.counter("chunks_not_committed") == 2
    assert rig.counter("chunks_committed") == 0
    assert target.proxy.count("PUT", r"/manifest\.json$") == 0


def test_one_failed_shard_costs_only_its_chunk(target: Target, make_rig: MakeRig) -> None:
    rig = make_rig()
    failing = CHUNK_IDS[1]
    target.proxy.add("PUT", rf"/{failing}/{WRITER}\.\d+/r0$", InternalError())
    rig.commit(3)
    assert set(committed(target, 3)) == {CHUNK_IDS[0], CHUNK_IDS[2]}
    assert rig.counter("chunks_not_committed") == 1
    assert rig.counter("chunks_committed") == 2


@pytest.mark.parametrize("action", [InternalError(), SlowDown(), Drop(), Blackhole()],
                         ids=["500", "503", "drop", "blackhole"])
def test_failed_manifest_put_leaves_no_manifest_and_counts(
    target: Target, make_rig: MakeRig, action: Any
) -> None:
    rig = make_rig(**FAST_FAIL)
    target.proxy.add("PUT", r"/manifest\.json$", action)
    rig.commit(2)
    assert manifest_keys(target) == []
    shards = [k for k in target.upstream_keys(LAYOUT.namespace_prefix(NS)) if k.endswith("/r0")]
    assert len(shards) == 2  # uploaded, now orphans for the GC
    assert rig.counter("commit_failures") == 2
    assert rig.counter("chunks_committed") == 0
    assert [name for name, _ in rig.events].count("commit_failed") == 2


def test_manifest_put_retried_after_one_slowdown_commits(target: Target, make_rig: MakeRig) -> None:
    rig = make_rig()
    rule = target.proxy.add("PUT", r"/manifest\.json$", SlowDown(), nth=1)
    rig.commit(2)
    assert set(committed(target, 2)) == set(CHUNK_IDS[:2])
    assert rule.injected == 1
    assert rig.counter("chunks_committed") == 2
    assert rig.counter("commit_failures") == 0


def test_lost_manifest_put_response_still_leaves_a_valid_manifest(
    target: Target, make_rig: MakeRig
) -> None:
    """The server stored the manifest but its answer was lost: a retry sees
    If-None-Match fail (already committed) or the put is reported failed;
    either way the manifest in the bucket is whole and its shards verify."""
    rig = make_rig()
    target.proxy.add("PUT", r"/manifest\.json$", Drop(after_upstream=True), nth=1)
    rig.commit(1)
    assert set(committed(target, 1)) == {CHUNK_IDS[0]}
    outcomes = [rig.counter(n) for n in
                ("chunks_committed", "chunks_already_committed", "commit_failures")]
    assert sum(outcomes) == 1


def test_uploads_do_not_block_submit_while_the_store_hangs(
    target: Target, make_rig: MakeRig
) -> None:
    """submit() returns while every PUT is blackholed; flush then ends in bounded time."""
    rig = make_rig(**FAST_FAIL)
    target.proxy.add("PUT", r"", Blackhole())
    assert rig.committer.submit(0, rig.saves(2))
    assert target.proxy.wait_for_requests(2, "PUT")
    assert rig.committer.flush(60)
    assert manifest_keys(target) == []
    assert rig.counter("upload_failures") == 2


