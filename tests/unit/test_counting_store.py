"""CountingStore: one count per S3 request, by the kind S3 bills it as."""

from __future__ import annotations

import asyncio

import pytest

from devtools.memory_store import MemoryStore
from s3kv.errors import AlreadyExists, NotFound
from s3kv.stats import Counters
from s3kv.store import Capabilities, ObjectStore
from s3kv.store.counting import CountingStore

KINDS = ("get_requests", "put_requests", "head_requests", "list_requests", "delete_requests")


def _counts(c: Counters) -> dict[str, float]:
    return {k: c.get(k) for k in KINDS}


def _wrap() -> tuple[CountingStore, MemoryStore, Counters]:
    inner = MemoryStore("bkt")
    counters = Counters()
    return CountingStore(inner, counters), inner, counters


def test_is_an_object_store_and_delegates_attributes() -> None:
    store, inner, _ = _wrap()
    typed: ObjectStore = store  # checked statically by mypy too
    assert isinstance(typed, ObjectStore)
    assert store.bucket == "bkt"
    assert store.capabilities is inner.capabilities
    changed = Capabilities(conditional_create=False)
    store.capabilities = changed
    assert inner.capabilities is changed


def test_each_request_counted_once_by_kind() -> None:
    store, inner, counters = _wrap()

    async def go() -> None:
        await store.put("p/a", b"0123456789")
        await store.put("p/b", b"x", mode="create")
        with pytest.raises(AlreadyExists):  # a refused conditional PUT is still billed
            await store.put("p/b", b"y", mode="create")
        assert bytes(await store.get("p/a")) == b"0123456789"
        assert bytes(await store.get_range("p/a", 2, 5)) == b"234"  # ranged GET is a GET
        assert bytes(await store.get_range("p/a", 3, 3)) == b""  # no request for nothing
        with pytest.raises(NotFound):
            await store.get("p/missing")
        assert (await store.head("p/a")).size == 10
        assert await store.list_dirs("") == ["p/"]
        await store.delete_many(["p/b"])
        await store.delete_many([])  # nothing to delete: no request
        await store.close()

    asyncio.run(go())
    assert _counts(counters) == {"get_requests": 3, "put_requests": 3, "head_requests": 1,
                                 "list_requests": 1, "delete_requests": 1}
    assert inner.keys() == ["p/a"]


def test_list_counts_one_request_per_page_and_one_for_an_empty_listing() -> None:
    store, _, counters = _wrap()

    async def go() -> list[int]:
        for i in range(5):
            await store.put(f"k/{i}", b"v")
        sizes = [len(page) async for page in store.list("k/", page_size=2)]
        assert [p async for p in store.list("none/")] == []
        return sizes

    assert asyncio.run(go()) == [2, 2, 1]
    assert counters.get("list_requests") == 3 + 1
    assert counters.get("put_requests") == 5


def test_delete_counts_one_request_per_thousand_keys() -> None:
    store, _, counters = _wrap()
    asyncio.run(store.delete_many([f"k/{i}" for i in range(2001)]))
    assert counters.get("delete_requests") == 3
    assert _counts(counters)["get_requests"] == 0
