from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

import pytest

from devtools.memory_store import MemoryStore
from s3kv.breaker import Breaker
from s3kv.errors import AccessDenied, Unavailable
from s3kv.keys import KeyLayout, chain_chunk_ids
from s3kv.lookup import TTLSet, find_committed_prefix
from s3kv.manifest import ShardEntry, new_manifest
from s3kv.stats import Counters
from s3kv.store.counting import CountingStore

LAYOUT = KeyLayout("s3kv")
NS = "ab" * 16
T = TypeVar("T")


class NoProbes:
    """An I/O loop that never runs the breaker's probe: the test plays its answer."""

    def __init__(self) -> None:
        self.submitted = 0

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        self.submitted += 1
        coro.close()
        return Future()


async def _never_called() -> object:
    raise AssertionError("the probe never runs here")


async def _commit(store: MemoryStore, ids: list[str], upto: int) -> None:
    for i, cid in enumerate(ids[:upto]):
        key = LAYOUT.shard(NS, cid, "w1", 0)
        entry = ShardEntry(0, key, 128, "0" * 32, 0, 1, 64, ("0" * 32,))
        m = new_manifest(namespace=NS, chunk_id=cid, parent_id=ids[i - 1] if i else None,
                         chunk_index=i, num_tokens=16, writer="w1", shards=[entry], tp_size=1)
        await store.put(LAYOUT.manifest(NS, cid), m.encode(), mode="create")


def test_cold_prompt_costs_one_get_and_hits_stop_at_first_miss() -> None:
    ids = chain_chunk_ids(list(range(16 * 20)), 16)

    async def go() -> tuple[int, int, int, int]:
        counters = Counters()
        memory = MemoryStore()
        store = CountingStore(memory, counters)
        cold = await find_committed_prefix(store, LAYOUT, NS, ids)
        cold_gets = counters.get("get_requests")
        await _commit(memory, ids, 5)
        counters.snapshot(reset=True)
        hits = await find_committed_prefix(store, LAYOUT, NS, ids)
        return len(cold), int(cold_gets), len(hits), int(counters.get("get_requests"))

    n_cold, cold_gets, n_hits, hit_gets = asyncio.run(go())
    assert (n_cold, cold_gets) == (0, 1)
    assert n_hits == 5
    assert hit_gets == 1 + 2 + 4  # windows 1, 2, 4: the 6th id is the first miss


def test_ttl_set_expires_and_is_bounded() -> None:
    s = TTLSet(ttl_s=1e-9, max_items=3)
    s.add("a")
    assert "a" not in s  # already expired
    s2 = TTLSet(ttl_s=60, max_items=3)
    for k in "abcde":
        s2.add(k)
    assert "a" not in s2 and "b" not in s2 and "e" in s2


def test_breaker_warns_once_per_outage_and_names_refused_credentials(
    caplog: pytest.LogCaptureFixture,
) -> None:
    io = NoProbes()
    b = Breaker(probe=_never_called, io=io)
    with caplog.at_level(logging.WARNING, logger="s3kv.breaker"):
        b.failure(AccessDenied("InvalidAccessKeyId: no such key", code="InvalidAccessKeyId"))
        b.failure(Unavailable("connection refused"))
        assert not b.allow() and io.submitted == 1  # one prober per outage
        b.answered()  # a stray answer never closes it: only the probe does
        assert not b.allow()
        b.success()  # the probe got an answer
        assert b.allow()
        b.failure(Unavailable("connection refused"))
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 3
    assert "refused this engine's credentials" in msgs[0] and "IAM" in msgs[0]
    assert "serving without the cache, probing every 1s" in msgs[0]
    assert "reachable again" in msgs[1]
    assert "object store unavailable (connection refused)" in msgs[2]
