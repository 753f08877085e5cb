"""GC's pieces on plain records and the in-memory store: cached prefixes rebuilt
from parent ids, eviction order, stale multipart uploads, and what is left of a
namespace before its document goes (``s3kv gc`` itself: tests/cli/test_gc.py)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

from devtools.memory_store import MemoryStore
from s3kv.catalog import Catalog
from s3kv.gc import Planner, Policies, evict_oldest_leaves, select_chain_deletions
from s3kv.gc_executor import Executor
from s3kv.inventory import ChunkRecord, build_prefixes, subtree_newest
from s3kv.keys import KeyLayout
from s3kv.store.protocol import UploadInfo
from tests.helpers_bucket import fingerprint


def rec(cid: str, parent: str | None, index: int, modified: float, size: int = 10,
        ns: str = "n" * 32) -> ChunkRecord:
    return ChunkRecord(ns, cid, parent, index, 4, size, 2, modified)


def test_build_prefixes_tree_and_hole() -> None:
    # a -> b -> c ; a -> b -> d ; x (parent missing) -> y
    records = [
        rec("a", None, 0, 1.0), rec("b", "a", 1, 2.0), rec("c", "b", 2, 3.0),
        rec("d", "b", 2, 5.0), rec("y", "x", 3, 4.0),
    ]
    got = {p.leaf: p for p in build_prefixes(records)}
    assert set(got) == {"c", "d", "y"}
    assert (got["c"].chunks, got["c"].tokens, got["c"].bytes) == (3, 12, 30)
    assert got["c"].complete and got["d"].complete
    assert (got["d"].oldest, got["d"].newest) == (1.0, 5.0)
    assert got["y"].chunks == 1 and not got["y"].complete


def test_subtree_newest() -> None:
    records = [rec("a", None, 0, 1.0), rec("b", "a", 1, 2.0), rec("c", "b", 2, 9.0),
               rec("d", "a", 1, 3.0)]
    newest = subtree_newest(records)
    assert newest == {"a": 9.0, "b": 9.0, "c": 9.0, "d": 3.0}


def test_eviction_takes_leaves_first() -> None:
    """Oldest first, but never a chunk that something live still extends."""
    ns = "n" * 32
    # root r (oldest) <- m <- leaf l (newest); a lone old chunk o.
    records = {ns: [rec("r", None, 0, 1.0, 100), rec("m", "r", 1, 2.0, 100),
                    rec("l", "m", 2, 9.0, 100), rec("o", None, 0, 5.0, 100)]}
    doomed: list[str] = []
    evict_oldest_leaves(records, {}, lambda r, reason: doomed.append(r.chunk_id), 150, 400)
    # Leaves are o (t=5) and l (t=9): o goes first, then l, then m; r stays.
    assert doomed == ["o", "l", "m"]
    chosen = select_chain_deletions(records, Policies(max_bytes=150), now=10.0)
    assert [cid for _, cid in chosen] == ["o", "l", "m"]
    assert {p.reason for p in chosen.values()} == {"max-size"}


def test_young_uploads_are_kept() -> None:
    now = datetime.now(UTC).timestamp()

    class Admin:
        async def list_multipart_uploads(self, prefix: str) -> list[UploadInfo]:
            return [UploadInfo(f"{prefix}young", "u1", datetime.fromtimestamp(now - 60, UTC)),
                    UploadInfo(f"{prefix}old", "u2", datetime.fromtimestamp(now - 7200, UTC))]

        async def abort_multipart_upload(self, key: str, upload_id: str) -> None:
            raise AssertionError("planning never aborts")

    cat = Catalog(MemoryStore(), KeyLayout("p"))
    plan = asyncio.run(Planner(cat, Policies(), uploads_store=Admin(), now=now).plan())
    assert [u.upload_id for u in plan.uploads] == ["u2"]


LAYOUT = KeyLayout("s3kv")


def test_a_foreign_object_still_keeps_the_namespace_document() -> None:
    store = MemoryStore()
    ns = fingerprint().namespace
    store.put_nowait(LAYOUT.namespace_doc(ns), fingerprint().document())
    store.put_nowait(f"s3kv/{ns}/README", b"hi")

    async def run() -> int:
        plan = await Planner(Catalog(store, LAYOUT), Policies(namespaces=(ns,))).plan()
        res = await Executor(store, LAYOUT, grace_s=0.0,
                             clock=lambda: time.time() + 7200).execute(plan)
        return res.deleted_namespace_docs

    assert asyncio.run(run()) == 0
    assert len(store.keys(LAYOUT.namespace_prefix(ns))) == 2
