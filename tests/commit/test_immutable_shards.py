"""Committed bytes are immutable: a later save of a committed chunk, a repeated
round id or a foreign object at a shard key never replaces bytes a manifest names.

A real Committer (world size 1) against the moto HTTP server; what is in the
bucket afterwards is read back through the verifying reader and, for the
leftovers, collected by the real GC planner and executor.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from devtools.fault_proxy import Drop, FaultProxy
from s3kv.aio import LoopThread
from s3kv.catalog import Catalog
from s3kv.commit import ChunkSave, Committer, LocalGatherer
from s3kv.config import Backend, StoreSettings
from s3kv.errors import NotFound
from s3kv.gc import Planner, Policies
from s3kv.gc_executor import Executor
from s3kv.keys import ChunkRef, KeyLayout, chain_chunk_ids, new_writer_id
from s3kv.manifest import Manifest, decode_manifest
from s3kv.reader import read_heads
from s3kv.shard import PayloadLayout, ShardSpec, allocate, seal
from s3kv.store import ObjectStore, open_store
from tests.s3server import S3Endpoint

LAYOUT = KeyLayout("s3kv")
NS = "00112233445566778899aabbccddeeff"
HEADS = 2
# One head of one 16-token chunk: 2 layers x 16 tokens x 16 elements, fp16: 1 KiB.
PAYLOAD = PayloadLayout("float16", ("l0", "l1"), 16, 16)
CIDS = chain_chunk_ids(list(range(32)), 16)
GRACE_S = 3600.0


def payload(cid: str, salt: str) -> bytes:
    """Both heads of ``cid``; two saves with different salts are a recompute
    that is not bit-identical."""
    return random.Random(f"{cid}/{salt}").randbytes(HEADS * PAYLOAD.head_bytes)


def shard(cid: str, salt: str) -> bytearray:
    """A whole shard object of ``cid`` (header and both heads)."""
    buf, view = allocate(ShardSpec(cid, 0, 0, HEADS, PAYLOAD))
    view[:] = payload(cid, salt)
    return buf


def save(i: int, salt: str) -> ChunkSave:
    return ChunkSave(ChunkRef(CIDS[i], CIDS[i - 1] if i else None, i, 16), shard(CIDS[i], salt))


@dataclass
class Rig:
    io: LoopThread
    store: ObjectStore
    committer: Committer
    writer: str
    events: list[tuple[str, dict[str, Any]]]

    def round(self, round_id: int, saves: list[ChunkSave]) -> None:
        assert self.committer.submit(round_id, saves)
        assert self.committer.flush(60)

    def counter(self, name: str) -> float:
        return self.committer.counters.get(name)

    def named(self, event: str) -> list[dict[str, Any]]:
        return [info for name, info in self.events if name == event]

    def get(self, key: str) -> bytes:
        return bytes(self.io.run(self.store.get(key)))

    def keys(self, cid: str) -> list[str]:
        async def listing() -> list[str]:
            return [o.key async for page in self.store.list(LAYOUT.chunk_prefix(NS, cid))
                    for o in page]

        return sorted(self.io.run(listing()))

    def manifest(self, cid: str) -> tuple[Manifest, bytes] | None:
        try:
            doc = self.get(LAYOUT.manifest(NS, cid))
        except NotFound:
            return None
        m = decode_manifest(doc, layout=LAYOUT, expect_namespace=NS, expect_chunk_id=cid,
                            expect_heads=HEADS)
        return m, doc

    def read(self, m: Manifest) -> bytes:
        """What a loading reader gets: every head, verified against the manifest."""
        parts = self.io.run(read_heads(self.store, m, 0, HEADS, PAYLOAD))
        return b"".join(bytes(p.payload) for p in parts)

    def put(self, key: str, data: bytes) -> None:
        self.io.run(self.store.put(key, data))


@pytest.fixture
def make_rig(s3_endpoint: S3Endpoint, bucket: str) -> Iterator[Any]:
    rigs: list[Rig] = []

    def make(endpoint_url: str = s3_endpoint.url, bucket: str = bucket,
             backend: Backend = "obstore") -> Rig:
        io = LoopThread("immutable-io")
        store = io.run(open_store(StoreSettings(bucket=bucket, endpoint_url=endpoint_url,
                                                backend=backend)))
        events: list[tuple[str, dict[str, Any]]] = []
        writer = new_writer_id(1, "resaver")
        committer = Committer(
            io=io, store=store, layout=LAYOUT, namespace=NS, writer_id=writer,
            gatherer=LocalGatherer(), max_inflight_bytes=64 << 20, num_heads=HEADS,
            on_event=lambda name, info: events.append((name, dict(info))),
        )
        rigs.append(Rig(io, store, committer, writer, events))
        return rigs[-1]

    yield make
    for r in rigs:
        r.committer.close()
        r.io.run(r.store.close())
        r.io.stop()


def test_resave_of_a_committed_chunk_never_touches_its_bytes(make_rig: Any) -> None:
    rig: Rig = make_rig()
    original = payload(CIDS[0], "first")
    rig.round(0, [save(0, "first")])
    found = rig.manifest(CIDS[0])
    assert found is not None
    m0, doc0 = found
    committed = {s.key: rig.get(s.key) for s in m0.shards}
    assert list(committed) == [LAYOUT.shard(NS, CIDS[0], rig.writer, 0, 0)]

    # The same engine saves the chunk again, recomputed, in a later round.
    assert payload(CIDS[0], "recomputed") != original
    rig.round(7, [save(0, "recomputed")])

    assert rig.counter("chunks_committed") == 1
    assert rig.counter("chunks_already_committed") == 1
    assert rig.counter("upload_failures") == 0
    assert [i["key"] for i in rig.named("uploaded")] == [
        LAYOUT.shard(NS, CIDS[0], rig.writer, 0, 0), LAYOUT.shard(NS, CIDS[0], rig.writer, 0, 7)]
    found = rig.manifest(CIDS[0])
    assert found is not None and found[1] == doc0  # the manifest itself is untouched
    assert {k: rig.get(k) for k in committed} == committed  # byte-identical shards
    assert rig.read(found[0]) == original  # verifies, and is the first save's bytes
    late = LAYOUT.shard(NS, CIDS[0], rig.writer, 0, 7)
    assert rig.get(late) == shard(CIDS[0], "recomputed")
    assert rig.keys(CIDS[0]) == sorted([LAYOUT.manifest(NS, CIDS[0]), *committed, late])

    # The late save's shard is an orphan: GC collects it after the grace
    # period and never touches what the manifest names.
    async def collect(now: float) -> tuple[list[tuple[str, str, int]], int, int]:
        cat = Catalog(rig.store, LAYOUT)
        plan = await Planner(cat, Policies(grace_s=GRACE_S, uploads=False), now=now).plan()
        res = await Executor(rig.store, LAYOUT, grace_s=GRACE_S,
                             clock=lambda: now).execute(plan)
        rows = [(p.chunk_id, str(p.reason), p.objects) for p in plan.chunks]
        return rows, res.deleted_shards, res.protected_shards

    assert rig.io.run(collect(time.time())) == ([], 0, 0)  # younger than the grace period
    assert rig.io.run(collect(time.time() + 2 * GRACE_S)) == ([(CIDS[0], "orphans", 1)], 1, 1)
    assert rig.keys(CIDS[0]) == sorted([LAYOUT.manifest(NS, CIDS[0]), *committed])
    assert {k: rig.get(k) for k in committed} == committed
    assert rig.read(found[0]) == original


def test_repeated_round_id_is_a_conflict_never_an_overwrite(make_rig: Any) -> None:
    """A round id used twice by one writer (a bug) reaches a key that is taken:
    the shard is reported failed and counted, the chunk's round does not commit,
    and the committed bytes stay."""
    rig: Rig = make_rig()
    rig.round(3, [save(0, "first")])
    found = rig.manifest(CIDS[0])
    assert found is not None
    key = LAYOUT.shard(NS, CIDS[0], rig.writer, 0, 3)
    before = rig.get(key)

    rig.round(3, [save(0, "recomputed"), save(1, "first")])

    assert [i["key"] for i in rig.named("shard_conflict")] == [key]
    assert rig.counter("shard_conflicts") == 1
    assert rig.counter("chunks_not_committed") == 1
    assert rig.counter("chunks_committed") == 2  # round 3's first use, then chunk 1
    assert rig.get(key) == before
    after = rig.manifest(CIDS[0])
    assert after is not None and after[1] == found[1]
    assert rig.read(after[0]) == payload(CIDS[0], "first")
    assert rig.manifest(CIDS[1]) is not None  # the other chunk of the round is unaffected


@pytest.mark.parametrize("backend", ["obstore", "aioboto3"])
def test_foreign_bytes_at_the_key_mean_no_manifest(make_rig: Any, backend: Backend) -> None:
    """Another writer's object already holds this round's key (never for a
    correct writer id): nothing is overwritten and no manifest names bytes this
    committer did not store."""
    rig: Rig = make_rig(backend=backend)
    key = LAYOUT.shard(NS, CIDS[0], rig.writer, 0, 0)
    foreign = bytes(shard(CIDS[0], "foreign"))
    rig.put(key, foreign)

    rig.round(0, [save(0, "mine")])

    assert rig.get(key) == foreign
    assert rig.manifest(CIDS[0]) is None
    assert [i["key"] for i in rig.named("shard_conflict")] == [key]
    assert rig.counter("shard_conflicts") == 1
    assert rig.counter("chunks_not_committed") == 1
    assert rig.counter("chunks_committed") == 0
    assert rig.named("committing") == []


def test_own_bytes_already_at_the_key_commit(make_rig: Any) -> None:
    """A create answered 412 because this very upload's first attempt was stored
    (its answer lost, the client retried) holds exactly our bytes: stored, commit."""
    rig: Rig = make_rig()
    key = LAYOUT.shard(NS, CIDS[0], rig.writer, 0, 0)
    rig.put(key, bytes(shard(CIDS[0], "mine")))
    expected = seal(shard(CIDS[0], "mine"), key)

    rig.round(0, [save(0, "mine")])

    assert rig.named("shard_conflict") == []
    assert rig.counter("chunks_committed") == 1
    found = rig.manifest(CIDS[0])
    assert found is not None and found[0].shards == (expected,)
    assert rig.read(found[0]) == payload(CIDS[0], "mine")


def test_lost_answer_then_retried_create_commits(
    make_rig: Any, fault_proxy: FaultProxy, moto_endpoint: S3Endpoint, fault_bucket: str
) -> None:
    """The server stores the shard but the answer is lost; the client retries
    the create and gets 412 for its own object. The committer reads it back,
    finds its own bytes and commits (aioboto3: botocore retries a PUT whose
    connection dropped)."""
    rig: Rig = make_rig(endpoint_url=fault_proxy.url, bucket=fault_bucket, backend="aioboto3")
    rule = fault_proxy.add("PUT", r"/r0$", Drop(after_upstream=True), nth=1)

    rig.round(0, [save(0, "mine")])

    assert rule.injected == 1
    assert fault_proxy.count("PUT", r"/r0$") == 2  # the retry reached the server
    assert rig.named("shard_conflict") == []
    assert rig.counter("upload_failures") == 0
    assert rig.counter("chunks_committed") == 1
    found = rig.manifest(CIDS[0])
    assert found is not None
    assert rig.read(found[0]) == payload(CIDS[0], "mine")
