"""Catalog scanning on the in-memory store: both listing paths (one page for a
small namespace, parallel per-spread pages for a large one), ordered and
unordered listings, groups split across pages, foreign keys, early close; and
the bounded concurrency every scan runs under."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from devtools.memory_store import MemoryStore
from s3kv.catalog import Catalog, bounded_map
from s3kv.errors import Unavailable
from s3kv.inventory import ChunkObjects
from s3kv.keys import KeyLayout
from s3kv.store.protocol import ObjectInfo
from tests.helpers_bucket import ChunkWriter, fingerprint

LAYOUT = KeyLayout("s3kv")


class MemoryClient:
    """Just enough of a boto3 client for ChunkWriter to fill a MemoryStore."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    def put_object(self, *, Bucket: str, Key: str, Body: bytes, **_: Any) -> None:
        self.store.put_nowait(Key, Body)


class ShuffledStore(MemoryStore):
    """Lists in no particular order, like an S3 directory bucket."""

    async def list(self, prefix: str, *, page_size: int = 1000
                   ) -> AsyncIterator[list[ObjectInfo]]:
        infos = [info async for page in super().list(prefix) for info in page]
        random.Random(7).shuffle(infos)
        for i in range(0, len(infos), page_size):
            yield infos[i : i + page_size]


def fill(store: MemoryStore, chunks: int, tp: int = 3) -> ChunkWriter:
    w = ChunkWriter(MemoryClient(store), "memory", LAYOUT, fingerprint().namespace, tp=tp)
    w.put_namespace_doc(fingerprint())
    parent = None
    for i in range(chunks):
        cid = hashlib.sha256(str(i).encode()).hexdigest()
        if i % 5 == 4:
            w.put_shards(cid)  # uncommitted
        else:
            w.commit(cid, parent, i)
            parent = cid
    # A foreign object inside a spread, and one beside the spreads.
    store.put_nowait(f"s3kv/{w.ns}/00/notes.txt", b"hi")
    store.put_nowait(f"s3kv/{w.ns}/README", b"hi")
    return w


async def scan(cat: Catalog, ns: str) -> list[ChunkObjects]:
    return [g async for g in cat.chunks(ns)]


@pytest.mark.parametrize("store_cls", [MemoryStore, ShuffledStore])
@pytest.mark.parametrize("page_size", [1, 7, 1000])
def test_groups_are_complete_on_every_path(store_cls: type[MemoryStore], page_size: int) -> None:
    store = store_cls()
    w = fill(store, 60)
    cat = Catalog(store, LAYOUT, page_size=page_size, concurrency=4,
                  ordered_listing=store_cls is MemoryStore)
    groups = asyncio.run(scan(cat, w.ns))
    ids = [g.chunk_id for g in groups]
    assert len(ids) == len(set(ids)) == 60  # each chunk exactly once, never split
    for g in groups:
        assert len(g.shards) == 3
        assert sorted(s.rank for s in g.shards) == [0, 1, 2]
        assert g.writer_tps == {3}  # from the writer id, tp3-test
    assert sum(g.manifest is not None for g in groups) == 48
    assert cat.foreign(w.ns) == (1, 2)  # the fingerprint is not foreign
    usage = asyncio.run(cat.usage(w.ns))
    assert (usage.chunks, usage.uncommitted_chunks, usage.orphan_objects) == (48, 12, 36)
    assert usage.objects == 48 + 180 + 1


def test_small_namespace_is_listed_in_one_request() -> None:
    calls: list[str] = []

    class Counting(MemoryStore):
        async def list(self, prefix: str, *, page_size: int = 1000
                       ) -> AsyncIterator[list[ObjectInfo]]:
            calls.append(prefix)
            async for page in super().list(prefix, page_size=page_size):
                yield page

    store = Counting()
    w = fill(store, 10)
    asyncio.run(scan(Catalog(store, LAYOUT), w.ns))
    assert calls == [LAYOUT.namespace_prefix(w.ns)]
    spreads = asyncio.run(Catalog(store, LAYOUT).spreads(w.ns))
    calls.clear()
    asyncio.run(scan(Catalog(store, LAYOUT, page_size=5), w.ns))
    assert calls[0] == LAYOUT.namespace_prefix(w.ns)
    assert sorted(calls[1:]) == spreads  # then one listing per spread


def test_listing_errors_propagate() -> None:
    class Failing(MemoryStore):
        async def list(self, prefix: str, *, page_size: int = 1000
                       ) -> AsyncIterator[list[ObjectInfo]]:
            if prefix.endswith("/ff/"):
                raise Unavailable("boom")
            async for page in super().list(prefix, page_size=page_size):
                yield page

    store = Failing()
    w = fill(store, 300, tp=1)
    store.put_nowait(f"s3kv/{w.ns}/ff/{'f' * 64}/manifest.json", b"{}")
    with pytest.raises(Unavailable):
        asyncio.run(scan(Catalog(store, LAYOUT, page_size=10, concurrency=4), w.ns))


def test_early_close_leaves_no_tasks_behind() -> None:
    store = MemoryStore()
    w = fill(store, 300, tp=1)

    async def first_only() -> list[asyncio.Task[Any]]:
        gen = Catalog(store, LAYOUT, page_size=10, concurrency=4, queue_size=2).chunks(w.ns)
        async for _ in gen:
            break
        await gen.aclose()
        return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    assert asyncio.run(first_only()) == []


def test_resolve_namespace() -> None:
    store = MemoryStore()
    w = fill(store, 2)
    cat = Catalog(store, LAYOUT)
    assert asyncio.run(cat.resolve_namespace(w.ns[:3].upper())) == w.ns
    assert asyncio.run(cat.fingerprint(w.ns)) == fingerprint().to_json()
    store.put_nowait(LAYOUT.namespace_doc(w.ns), b"not json")
    assert asyncio.run(cat.fingerprint(w.ns)) is None


def test_shards_of_both_key_forms_are_grouped_by_save_attempt() -> None:
    """One writer's shards of one chunk from two save rounds and from the older
    key form: all listed as that chunk's shards, told apart by round; a key that
    is neither form is foreign."""
    store = MemoryStore()
    w = ChunkWriter(MemoryClient(store), "memory", LAYOUT, fingerprint().namespace, tp=2)
    cid = hashlib.sha256(b"resaved").hexdigest()
    first = w.commit(cid, None, 0)  # round 0
    w.put_shards(cid)  # round 1: saved again after its commit
    w.legacy = True
    w.put_shards(cid)  # an engine of an earlier version
    store.put_nowait(f"{LAYOUT.chunk_prefix(w.ns, cid)}{w.writer}.01/r0", b"x")  # not ours
    cat = Catalog(store, LAYOUT)
    group = asyncio.run(cat.chunk(w.ns, cid))
    assert group is not None and group.manifest is not None
    assert group.writers == {w.writer}
    assert group.uploads == {(w.writer, 0), (w.writer, 1), (w.writer, None)}
    assert sorted((s.rank, -1 if s.round_id is None else s.round_id) for s in group.shards) == [
        (0, -1), (0, 0), (0, 1), (1, -1), (1, 0), (1, 1)]
    assert {s.key for s in group.shards if s.round_id == 0} == {e.key for e in first.shards}
    assert cat.foreign(w.ns) == (1, 1)


def test_bounded_map_limits_concurrency() -> None:
    running = peak = 0

    async def source() -> AsyncIterator[int]:
        for i in range(50):
            yield i

    async def work(i: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0)
        running -= 1
        return i * 2

    async def main() -> list[int]:
        return [x async for x in bounded_map(source(), work, 4)]

    out = asyncio.run(main())
    assert sorted(out) == [i * 2 for i in range(50)]
    assert peak <= 4
