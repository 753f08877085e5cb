"""The read planner and the verified reads, over every writer and reader TP size."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from devtools.memory_store import MemoryStore
from s3kv.errors import IntegrityError, ManifestError
from s3kv.heads import head_range
from s3kv.manifest import Manifest, decode_manifest
from s3kv.reader import plan_reads, read_heads, read_shard
from s3kv.shard import PayloadLayout
from tests.unit.builders import CIDS, LAYERS, LAYOUT, NS, PAYLOAD, Chunk, build_chunk, head_pattern

T = TypeVar("T")
TPS = (1, 2, 4, 8)
# 1 KV head (and MLA's one latent), 2 (GQA with few heads), 8 (Llama-3-8B).
HEAD_COUNTS = (1, 2, 8)
MLA = PayloadLayout("bfloat16", LAYERS, 8, 576)  # kv_lora_rank 512 + rope 64, one "head"


class RecordingStore(MemoryStore):
    """Records every GET in order: its key and byte range (None: the whole object)."""

    def __init__(self) -> None:
        super().__init__()
        self.gets: list[tuple[str, tuple[int, int] | None]] = []

    async def get(self, key: str) -> memoryview:
        self.gets.append((key, None))
        return await super().get(key)

    async def get_range(self, key: str, start: int, end: int) -> memoryview:
        self.gets.append((key, (start, end)))
        return await super().get_range(key, start, end)


def run(chunk: Chunk, body: Callable[[RecordingStore], Awaitable[T]],
        replace: dict[int, bytes] | None = None) -> T:
    """Store ``chunk``'s shards (some replaced) in a fresh store and run ``body``."""

    async def main() -> T:
        store = RecordingStore()
        for rank, data in chunk.shards.items():
            await store.put(chunk.manifest.shard_for_rank(rank).key,
                            (replace or {}).get(rank, data))
        return await body(store)

    return asyncio.run(main())


def flip(data: bytes, i: int) -> bytes:
    out = bytearray(data)
    out[i] ^= 0x80
    return bytes(out)


def _pairs() -> list[tuple[int, int, int]]:
    return [(h, w, r) for h in HEAD_COUNTS for w in TPS for r in TPS]


@pytest.mark.parametrize(("heads", "writer_tp", "reader_tp"), _pairs())
def test_every_reader_assembles_its_heads_from_any_writer(
    heads: int, writer_tp: int, reader_tp: int
) -> None:
    chunk = build_chunk(3, tp=writer_tp, num_heads=heads)
    m = chunk.manifest
    # Each head stored exactly once, whatever the writer's TP size.
    assert [(s.head_start, s.head_end) for s in m.shards] == [
        (h * max(1, heads // writer_tp), (h + 1) * max(1, heads // writer_tp))
        for h in range(min(heads, writer_tp))
    ]
    assert sum(s.size - s.payload_offset for s in m.shards) == heads * PAYLOAD.head_bytes

    async def body(store: RecordingStore) -> None:
        for rank in range(reader_tp):
            lo, hi = head_range(heads, rank, reader_tp)
            plan = plan_reads(m, lo, hi)
            overlapping = [s for s in m.shards if s.head_start < hi and lo < s.head_end]
            assert [r.entry for r in plan] == overlapping  # the fewest reads, in head order
            store.gets.clear()
            pieces = await read_heads(store, m, lo, hi, PAYLOAD)
            assert b"".join(bytes(p.payload) for p in pieces) == b"".join(
                head_pattern(h, index=3) for h in range(lo, hi))
            assert [(p.head_start, p.head_end) for p in pieces] == [
                (r.head_start, r.head_end) for r in plan]
            # A whole GET (verified against the shard checksum) for a shard that lies
            # inside the range, one ranged GET per shard that only overlaps it.
            for (key, span), r in zip(store.gets, plan, strict=True):
                assert key == r.entry.key
                assert (span is None) == r.whole
                assert r.whole == (lo <= r.entry.head_start and r.entry.head_end <= hi)

    run(chunk, body)


@pytest.mark.parametrize(("writer_tp", "reader_tp"), [(w, r) for w in TPS for r in TPS])
def test_mla_one_shard_read_whole_by_every_rank(writer_tp: int, reader_tp: int) -> None:
    chunk = build_chunk(1, tp=writer_tp, num_heads=1, payload=MLA)
    assert len(chunk.manifest.shards) == 1 and chunk.manifest.shards[0].rank == 0

    async def body(store: RecordingStore) -> None:
        for rank in range(reader_tp):
            assert head_range(1, rank, reader_tp) == (0, 1)
            store.gets.clear()
            (piece,) = await read_heads(store, chunk.manifest, 0, 1, MLA)
            assert bytes(piece.payload) == head_pattern(0, MLA, index=1)
            assert store.gets == [(chunk.manifest.shards[0].key, None)]

    run(chunk, body)


def test_corruption_fails_only_the_reads_that_touch_it() -> None:
    chunk = build_chunk(2, tp=2, heads_per_rank=4)  # heads 0-3 on r0, 4-7 on r1
    entry = chunk.manifest.shard_for_rank(1)
    per = entry.head_bytes
    bad = flip(chunk.shards[1], entry.payload_offset + 3 * per - 1)  # last byte of head 6

    async def body(store: RecordingStore) -> None:
        for lo, hi in ((6, 7), (5, 7), (6, 8), (4, 8), (0, 8), (2, 7)):
            with pytest.raises(IntegrityError, match="checksum"):
                await read_heads(store, chunk.manifest, lo, hi, PAYLOAD)
        for lo, hi in ((4, 6), (7, 8), (0, 4), (2, 5)):  # ranges that avoid the flipped byte
            pieces = await read_heads(store, chunk.manifest, lo, hi, PAYLOAD)
            assert b"".join(bytes(p.payload) for p in pieces) == b"".join(
                head_pattern(h, index=2) for h in range(lo, hi))

    run(chunk, body, replace={1: bad})


@pytest.mark.parametrize("keep", ["all-but-1", "all-but-64", "header-only", "half-header", "more"])
def test_short_or_long_objects_are_integrity_errors(keep: str) -> None:
    chunk = build_chunk(2, tp=2, heads_per_rank=4)
    data = chunk.shards[1]
    off = chunk.manifest.shard_for_rank(1).payload_offset
    changed = {"all-but-1": data[:-1], "all-but-64": data[:-64], "header-only": data[:off],
               "half-header": data[: off // 2], "more": data + b"\x00"}[keep]

    async def body(store: RecordingStore) -> None:
        with pytest.raises(IntegrityError):
            await read_heads(store, chunk.manifest, 4, 8, PAYLOAD)  # whole
        if keep != "more":  # a ranged read of the last head cannot see extra bytes
            with pytest.raises(IntegrityError):
                await read_heads(store, chunk.manifest, 7, 8, PAYLOAD)  # ranged
        with pytest.raises(IntegrityError):
            await read_shard(store, chunk.manifest, chunk.manifest.shard_for_rank(1))

    run(chunk, body, replace={1: changed})


def test_missing_shard_is_an_integrity_error() -> None:
    chunk = build_chunk(2, tp=2, heads_per_rank=4)

    async def body(store: RecordingStore) -> None:
        await store.delete_many([chunk.manifest.shard_for_rank(1).key])
        for lo, hi in ((4, 8), (5, 6), (0, 8)):
            with pytest.raises(IntegrityError, match="missing"):
                await read_heads(store, chunk.manifest, lo, hi, PAYLOAD)
        (piece,) = await read_heads(store, chunk.manifest, 0, 4, PAYLOAD)
        assert bytes(piece.payload) == chunk.payload(0)

    run(chunk, body)


def test_reader_of_another_shape_never_reads_the_bytes() -> None:
    chunk = build_chunk(2, tp=2, heads_per_rank=4)
    other = dataclasses.replace(PAYLOAD, token_elems=PAYLOAD.token_elems // 2)

    async def body(store: RecordingStore) -> None:
        for lo, hi in ((0, 4), (1, 2), (0, 8)):
            with pytest.raises(IntegrityError):
                await read_heads(store, chunk.manifest, lo, hi, other)

    run(chunk, body)


def test_heads_beyond_the_manifest_are_not_planned() -> None:
    m = build_chunk(2, tp=2, heads_per_rank=4).manifest
    for lo, hi in ((0, 9), (8, 9), (3, 3), (-1, 2)):
        with pytest.raises(IntegrityError):
            plan_reads(m, lo, hi)


def _tampered(m: Manifest, ranges: list[tuple[int, int]]) -> bytes:
    """``m`` re-encoded with its shards' head ranges replaced (checksum lists resized)."""
    shards = []
    for s, (lo, hi) in zip(m.shards, ranges, strict=True):
        sums = (s.head_checksums * 8)[: hi - lo]
        size = s.payload_offset + (hi - lo) * s.head_bytes  # self-consistent sizes
        shards.append(dataclasses.replace(s, head_start=lo, head_end=hi, head_checksums=sums,
                                          size=size))
    return dataclasses.replace(m, shards=tuple(shards)).encode()


@pytest.mark.parametrize(("ranges", "problem"), [
    ([(0, 4), (5, 8)], "gap"),
    ([(0, 4), (3, 8)], "overlap"),
    ([(1, 4), (4, 8)], "gap"),
    ([(0, 4), (0, 4)], "overlap"),
    ([(0, 4), (4, 9)], "KV heads"),  # a head outside the model
    ([(0, 2), (2, 4)], "KV heads"),  # fewer heads than the model
])
def test_tampered_head_ranges_are_misses(ranges: list[tuple[int, int]], problem: str) -> None:
    m = build_chunk(2, tp=2, heads_per_rank=4).manifest
    assert decode_manifest(m.encode(), layout=LAYOUT, expect_namespace=NS,
                           expect_chunk_id=CIDS[2], expect_heads=8) == m
    with pytest.raises(ManifestError, match=problem):
        decode_manifest(_tampered(m, ranges), layout=LAYOUT, expect_namespace=NS,
                        expect_chunk_id=CIDS[2], expect_heads=8)


def test_layout_matches_manifest_keys() -> None:
    chunk = build_chunk(2, tp=2, heads_per_rank=4)
    for rank in (0, 1):
        parsed = LAYOUT.parse(chunk.manifest.shard_for_rank(rank).key)
        assert parsed is not None
        assert (parsed.kind, parsed.chunk_id, parsed.rank) == ("shard", CIDS[2], rank)
