from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from s3kv.errors import IntegrityError
from s3kv.manifest import Manifest, new_manifest
from s3kv.reader import read_head_range, read_shard
from s3kv.shard import ShardSpec
from s3kv.store.memory import MemoryStore
from tests.unit.builders import CIDS, LAYOUT, NS, WRITER, Chunk, build_chunk, build_shard, entry_for

T = TypeVar("T")
HEADS = 4  # per rank


def run(chunk: Chunk, body: Callable[[MemoryStore], Awaitable[T]],
        replace: dict[int, bytes] | None = None) -> T:
    """Store ``chunk``'s shards (some replaced) in a fresh MemoryStore and run ``body``."""

    async def main() -> T:
        store = MemoryStore()
        for rank, data in chunk.shards.items():
            data = (replace or {}).get(rank, data)
            await store.put(chunk.manifest.shard_for_rank(rank).key, data)
        return await body(store)

    return asyncio.run(main())


def flip(data: bytes, i: int) -> bytes:
    out = bytearray(data)
    out[i] ^= 0x80
    return bytes(out)


@pytest.fixture(scope="module")
def chunk() -> Chunk:
    return build_chunk(index=2, tp=2, heads_per_rank=HEADS)


def test_good_read_returns_verified_payload(chunk: Chunk) -> None:
    async def body(store: MemoryStore) -> None:
        for rank in (0, 1):
            got = await read_shard(store, chunk.manifest, rank)
            assert got.spec == chunk.specs[rank]
            assert got.size == len(chunk.shards[rank])
            assert isinstance(got.payload, memoryview)
            assert bytes(got.payload) == chunk.payload(rank)

    run(chunk, body)


def _corrupt_at(chunk: Chunk, rank: int, i: int) -> None:
    async def body(store: MemoryStore) -> None:
        with pytest.raises(IntegrityError):
            await read_shard(store, chunk.manifest, rank)
        other = 1 - rank  # the untouched shard still reads
        assert bytes((await read_shard(store, chunk.manifest, other)).payload) == chunk.payload(
            other
        )

    run(chunk, body, replace={rank: flip(chunk.shards[rank], i)})


def test_flipped_byte_anywhere_is_an_integrity_error(chunk: Chunk) -> None:
    data = chunk.shards[1]
    off = chunk.manifest.shard_for_rank(1).payload_offset
    positions = [0, 9, 20, off - 1, off, off + 1, len(data) // 2, len(data) - 1]
    positions += [off + h * chunk.manifest.shard_for_rank(1).head_bytes for h in range(HEADS)]
    for i in positions:
        _corrupt_at(chunk, 1, i)


@pytest.mark.parametrize("keep", ["all-but-1", "all-but-64", "header-only", "half-header"])
def test_truncated_object_is_an_integrity_error(chunk: Chunk, keep: str) -> None:
    data = chunk.shards[0]
    off = chunk.manifest.shard_for_rank(0).payload_offset
    short = {
        "all-but-1": data[:-1],
        "all-but-64": data[:-64],
        "header-only": data[:off],
        "half-header": data[: off // 2],
    }[keep]

    async def body(store: MemoryStore) -> None:
        with pytest.raises(IntegrityError):
            await read_shard(store, chunk.manifest, 0)

    run(chunk, body, replace={0: short})


def test_longer_object_is_an_integrity_error(chunk: Chunk) -> None:
    async def body(store: MemoryStore) -> None:
        with pytest.raises(IntegrityError, match="bytes, manifest says"):
            await read_shard(store, chunk.manifest, 0)

    run(chunk, body, replace={0: chunk.shards[0] + b"\x00"})


def test_missing_shard_is_an_integrity_error(chunk: Chunk) -> None:
    async def body(store: MemoryStore) -> None:
        await store.delete_many([chunk.manifest.shard_for_rank(1).key])
        with pytest.raises(IntegrityError, match="missing"):
            await read_shard(store, chunk.manifest, 1)
        with pytest.raises(IntegrityError, match="missing"):
            await read_head_range(store, chunk.manifest, 1, HEADS, HEADS + 1)
        assert bytes((await read_shard(store, chunk.manifest, 0)).payload) == chunk.payload(0)

    run(chunk, body)


def _with_shard(chunk: Chunk, rank: int, spec: ShardSpec, seed: int) -> tuple[Manifest, bytes]:
    """A manifest whose entry for ``rank`` matches a shard built from ``spec``."""
    data, off = build_shard(spec, seed)
    key = chunk.manifest.shard_for_rank(rank).key
    entries = [e for e in chunk.manifest.shards if e.rank != rank]
    entry = dataclasses.replace(entry_for(key, spec, data, off), rank=rank)
    m = chunk.manifest
    manifest = new_manifest(namespace=NS, chunk_id=m.chunk_id, parent_id=m.parent_id,
                            chunk_index=m.chunk_index, num_tokens=m.num_tokens,
                            writer=WRITER, shards=[*entries, entry])
    return manifest, data


def test_header_naming_another_chunk_is_an_integrity_error(chunk: Chunk) -> None:
    spec = dataclasses.replace(chunk.specs[0], chunk_id=CIDS[3])
    manifest, data = _with_shard(chunk, 0, spec, seed=9)  # checksums match the bytes

    async def body(store: MemoryStore) -> None:
        with pytest.raises(IntegrityError, match="header names chunk"):
            await read_shard(store, manifest, 0)

    run(chunk, body, replace={0: data})


def test_header_naming_another_rank_is_an_integrity_error(chunk: Chunk) -> None:
    manifest, data = _with_shard(chunk, 0, chunk.specs[1], seed=9)

    async def body(store: MemoryStore) -> None:
        with pytest.raises(IntegrityError, match="rank 1"):
            await read_shard(store, manifest, 0)

    run(chunk, body, replace={0: data})


def test_header_with_other_heads_is_an_integrity_error(chunk: Chunk) -> None:
    spec = dataclasses.replace(chunk.specs[0], head_start=1, head_end=HEADS + 1)
    manifest, data = _with_shard(chunk, 0, spec, seed=9)
    manifest = dataclasses.replace(manifest, shards=tuple(
        dataclasses.replace(e, head_start=0, head_end=HEADS) if e.rank == 0 else e
        for e in manifest.shards
    ))

    async def body(store: MemoryStore) -> None:
        with pytest.raises(IntegrityError, match="heads differ"):
            await read_shard(store, manifest, 0)

    run(chunk, body, replace={0: data})


def test_head_range_reads_exact_bytes(chunk: Chunk) -> None:
    async def body(store: MemoryStore) -> None:
        for rank in (0, 1):
            first = rank * HEADS
            for lo in range(first, first + HEADS):
                for hi in range(lo + 1, first + HEADS + 1):
                    got = await read_head_range(store, chunk.manifest, rank, lo, hi)
                    want = b"".join(chunk.head_bytes(rank, h) for h in range(lo, hi))
                    assert bytes(got) == want, (rank, lo, hi)
        whole = await read_head_range(store, chunk.manifest, 1, HEADS, 2 * HEADS)
        assert bytes(whole) == chunk.payload(1)

    run(chunk, body)


def test_head_range_detects_corruption_in_that_range_only(chunk: Chunk) -> None:
    entry = chunk.manifest.shard_for_rank(1)
    per = entry.head_bytes
    # flip the last byte of global head 6 (local head 2 of rank 1)
    bad = flip(chunk.shards[1], entry.payload_offset + 3 * per - 1)

    async def body(store: MemoryStore) -> None:
        for lo, hi in ((6, 7), (5, 7), (6, 8), (4, 8)):
            with pytest.raises(IntegrityError, match="fails its checksum"):
                await read_head_range(store, chunk.manifest, 1, lo, hi)
        for lo, hi in ((4, 6), (7, 8), (4, 5)):  # ranges that avoid the flipped byte
            got = await read_head_range(store, chunk.manifest, 1, lo, hi)
            assert bytes(got) == b"".join(chunk.head_bytes(1, h) for h in range(lo, hi))

    run(chunk, body, replace={1: bad})


def test_head_range_outside_the_shard_is_rejected(chunk: Chunk) -> None:
    async def body(store: MemoryStore) -> None:
        for lo, hi in ((3, 5), (0, 1), (4, 9), (5, 5), (6, 5)):
            with pytest.raises(IntegrityError, match="not inside"):
                await read_head_range(store, chunk.manifest, 1, lo, hi)

    run(chunk, body)


@pytest.mark.parametrize("keep", ["half", "header-only", "one-byte"])
def test_head_range_of_truncated_object_is_an_integrity_error(chunk: Chunk, keep: str) -> None:
    data = chunk.shards[1]
    off = chunk.manifest.shard_for_rank(1).payload_offset
    short = {"half": data[: len(data) // 2], "header-only": data[:off], "one-byte": data[:1]}[keep]

    async def body(store: MemoryStore) -> None:
        with pytest.raises(IntegrityError):
            await read_head_range(store, chunk.manifest, 1, 2 * HEADS - 1, 2 * HEADS)

    run(chunk, body, replace={1: short})


def test_layout_matches_manifest_keys(chunk: Chunk) -> None:
    for rank in (0, 1):
        parsed = LAYOUT.parse(chunk.manifest.shard_for_rank(rank).key)
        assert parsed is not None
        assert (parsed.kind, parsed.chunk_id, parsed.rank) == ("shard", CIDS[2], rank)
