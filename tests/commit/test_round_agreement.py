"""Rank 0 commits a chunk only when every rank's report names the same chunk ref.

Every rank gets the same save plan, so the refs agree unless something
upstream is broken; then the chunk's parent, index or token count in the
manifest would be whichever rank happened to come first. A real Committer
(rank 0 of two) against the moto HTTP server; the other rank is a gather
that answers with an empty-handed rank 1's report (what a rank whose heads a
lower rank stores sends), pickled both ways as the GLOO gather does.
"""

from __future__ import annotations

import pickle
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from s3kv.aio import LoopThread
from s3kv.commit import ChunkSave, Committer, RoundReport, ShardReport
from s3kv.config import StoreSettings
from s3kv.errors import NotFound
from s3kv.keys import ChunkRef, KeyLayout, chain_chunk_ids, new_writer_id
from s3kv.manifest import decode_manifest
from s3kv.shard import PayloadLayout, ShardSpec, allocate
from s3kv.store import ObjectStore, open_store
from tests.s3server import S3Endpoint

LAYOUT = KeyLayout("s3kv")
NS = "00112233445566778899aabbccddeeff"
HEADS = 2
PAYLOAD = PayloadLayout("float16", ("l0", "l1"), 16, 16)
CIDS = chain_chunk_ids(list(range(48)), 16)
REFS = [ChunkRef(c, CIDS[i - 1] if i else None, i, 16) for i, c in enumerate(CIDS)]

PeerRef = Callable[[ChunkRef], ChunkRef]


class PeerGatherer:
    """Rank 0 of two: rank 1 joins every round empty-handed, naming ``peer(ref)``."""

    rank = 0
    world_size = 2

    def __init__(self, peer: PeerRef) -> None:
        self.peer = peer
        self.rounds: list[list[RoundReport]] = []

    def gather(self, obj: Any) -> list[Any] | None:
        own: RoundReport = pickle.loads(pickle.dumps(obj))
        other = RoundReport(own.round_id, 1,
                            tuple(ShardReport(self.peer(s.ref), True) for s in own.shards))
        self.rounds.append([own, pickle.loads(pickle.dumps(other))])
        return self.rounds[-1]

    def broadcast(self, obj: Any) -> Any:
        return obj

    def reform(self, wait_s: float) -> None:
        return None


def save(ref: ChunkRef) -> ChunkSave:
    buf, view = allocate(ShardSpec(ref.chunk_id, 0, 0, HEADS, PAYLOAD))
    view[:] = random.Random(ref.chunk_id).randbytes(len(view))
    return ChunkSave(ref, buf)


@pytest.fixture
def io_store(s3_endpoint: S3Endpoint, bucket: str) -> Iterator[tuple[LoopThread, ObjectStore]]:
    io = LoopThread("agreement-io")
    store = io.run(open_store(StoreSettings(bucket=bucket, endpoint_url=s3_endpoint.url)))
    yield io, store
    io.run(store.close())
    io.stop()


def run_round(io_store: tuple[LoopThread, ObjectStore], peer: PeerRef
              ) -> tuple[Committer, PeerGatherer, list[tuple[str, dict[str, Any]]]]:
    io, store = io_store
    gatherer = PeerGatherer(peer)
    events: list[tuple[str, dict[str, Any]]] = []
    committer = Committer(
        io=io, store=store, layout=LAYOUT, namespace=NS, writer_id=new_writer_id(2, "agree"),
        gatherer=gatherer, max_inflight_bytes=64 << 20, num_heads=HEADS,
        on_event=lambda name, info: events.append((name, dict(info))),
    )
    assert committer.submit(4, [save(r) for r in REFS])
    assert committer.flush(60)
    committer.close()
    return committer, gatherer, events


def test_agreeing_ranks_commit_the_ref_they_all_report(
    io_store: tuple[LoopThread, ObjectStore],
) -> None:
    committer, gatherer, _ = run_round(io_store, lambda ref: ref)
    assert [[s.ref for s in r.shards] for r in gatherer.rounds[0]] == [REFS, REFS]
    assert committer.counters.get("chunks_committed") == len(REFS)
    io, store = io_store
    for ref in REFS:
        m = decode_manifest(bytes(io.run(store.get(LAYOUT.manifest(NS, ref.chunk_id)))),
                            layout=LAYOUT, expect_namespace=NS, expect_chunk_id=ref.chunk_id,
                            expect_heads=HEADS)
        assert (m.chunk_id, m.parent_id, m.chunk_index, m.num_tokens, m.tp_size) == (
            ref.chunk_id, ref.parent_id, ref.index, ref.num_tokens, 2)


@pytest.mark.parametrize(
    "peer",
    [
        lambda ref: ChunkRef(ref.chunk_id, ref.parent_id, ref.index, 8),  # other token count
        lambda ref: ChunkRef(ref.chunk_id, REFS[2].chunk_id, 3, 16),  # other place in a chain
    ],
    ids=["num_tokens", "parent_and_index"],
)
def test_ranks_disagreeing_on_a_chunk_ref_commit_nothing(
    io_store: tuple[LoopThread, ObjectStore], peer: PeerRef,
) -> None:
    moved = REFS[1]  # the only chunk the peer names differently
    committer, _, events = run_round(
        io_store, lambda ref: peer(ref) if ref == moved else ref)
    refused = [i for n, i in events if n == "not_committed"]
    assert [i["chunk_id"] for i in refused] == [moved.chunk_id]
    assert "ranks disagree on the chunk" in refused[0]["error"]
    assert committer.counters.get("chunks_not_committed") == 1
    assert committer.counters.get("chunks_committed") == len(REFS) - 1
    io, store = io_store
    with pytest.raises(NotFound):
        io.run(store.get(LAYOUT.manifest(NS, moved.chunk_id)))
