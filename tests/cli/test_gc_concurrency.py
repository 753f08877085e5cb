"""GC next to live writers and readers.

Interleavings are forced with threads and events at the executor's event
hooks (no sleeps): a writer commits, or a reader loads, at exactly the point
under test. The invariants:

* no manifest that exists after GC names a missing shard;
* a reader gets a full verified hit or a clean miss (manifest NotFound, or
  IntegrityError when GC deleted the manifest after the reader fetched it),
  never partial data.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from s3kv.aio import LoopThread
from s3kv.catalog import Catalog
from s3kv.commit import ChunkSave, Committer, LocalGatherer
from s3kv.config import parse_settings
from s3kv.errors import IntegrityError, NotFound
from s3kv.gc import Planner, Policies
from s3kv.gc_executor import Executor, GcResult
from s3kv.keys import ChunkRef, chain_chunk_ids, new_writer_id
from s3kv.manifest import Manifest, ShardEntry, decode_manifest
from s3kv.reader import read_shard
from s3kv.store import ObjectStore, open_store
from tests.cli.conftest import Bucket
from tests.helpers_bucket import NUM_KV_HEADS, PAYLOAD, ChunkWriter, payload_bytes, shard_bytes

WAIT = 60.0  # generous bound on any handshake; never reached when things work


def settings(s3: Bucket) -> Any:
    return parse_settings({"bucket": s3.name, "endpoint_url": s3.endpoint.url,
                           "backend": s3.backend})


class SyncReader:
    """A reader with its own loop, driven step by step from one thread."""

    def __init__(self, s3: Bucket) -> None:
        self._s3 = s3
        self._loop = asyncio.new_event_loop()
        self._store: ObjectStore = self._loop.run_until_complete(
            open_store(settings(s3).store))

    def manifest(self, ns: str, cid: str) -> Manifest | None:
        try:
            data = self._loop.run_until_complete(
                self._store.get(self._s3.layout.manifest(ns, cid)))
        except NotFound:
            return None
        return decode_manifest(data, layout=self._s3.layout, expect_heads=NUM_KV_HEADS)

    def shard(self, m: Manifest, entry: ShardEntry) -> bytes:
        got = self._loop.run_until_complete(read_shard(self._store, m, entry, PAYLOAD))
        return bytes(got)

    def load(self, ns: str, cid: str,
             between: Callable[[str], None] = lambda step: None) -> tuple[str, Any]:
        """('hit', payloads) only if every rank verified; otherwise ('miss', why)."""
        m = self.manifest(ns, cid)
        between("manifest")
        if m is None:
            return "miss", "no manifest"
        payloads = []
        for s in m.shards:
            try:
                payloads.append(self.shard(m, s))
            except IntegrityError as exc:
                return "miss", f"integrity: {exc}"
            between(f"rank{s.rank}")
        return "hit", payloads

    def close(self) -> None:
        self._loop.run_until_complete(self._store.close())
        self._loop.close()


@dataclass
class GcThread:
    """Runs plan + execute in its own thread and loop, calling ``hook`` at each event."""

    s3: Bucket
    policies: Policies
    hook: Callable[[str, dict[str, Any]], None] = lambda name, info: None
    result: GcResult = field(default_factory=GcResult)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._main, name="gc", daemon=True)

    def _main(self) -> None:
        async def go() -> None:
            store = await open_store(settings(self.s3).store)
            try:
                cat = Catalog(store, self.s3.layout)
                plan = await Planner(cat, self.policies).plan()
                await Executor(store, self.s3.layout, grace_s=self.policies.grace_s,
                               on_event=self.hook).execute(plan, self.result)
            finally:
                await store.close()

        try:
            asyncio.run(go())
        except BaseException as exc:  # reported by join()
            self.error = exc

    def start(self) -> GcThread:
        self.thread.start()
        return self

    def join(self) -> GcResult:
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "gc thread hung"
        if self.error is not None:
            raise self.error
        return self.result


def assert_no_live_manifest_lost_a_shard(s3: Bucket) -> int:
    """Every manifest present names shards that exist and verify; returns how many."""
    reader = SyncReader(s3)
    try:
        n = 0
        for key in s3.object_keys():
            if not key.endswith("/manifest.json"):
                continue
            parts = key.split("/")
            m = reader.manifest(parts[1], parts[3])
            assert m is not None
            for s in m.shards:
                reader.shard(m, s)  # raises IntegrityError if missing or corrupt
            n += 1
        return n
    finally:
        reader.close()


def once(name: str, action: Callable[[], None]) -> Callable[[str, dict[str, Any]], None]:
    """A gc hook that runs ``action`` (in another thread) at the first ``name`` event
    and waits for it, so the action lands exactly at that point of the run."""
    fired = threading.Event()

    def hook(event: str, info: dict[str, Any]) -> None:
        if event != name or fired.is_set():
            return
        fired.set()
        t = threading.Thread(target=action, name=f"at-{name}")
        t.start()
        t.join(WAIT)
        assert not t.is_alive()

    return hook


# --- writers ------------------------------------------------------------------------


def test_manifest_landing_during_gc_protects_in_flight_shards(s3: Bucket) -> None:
    """grace 0s makes a commit in flight look like orphans; its manifest appears
    before the re-check, so the re-check protects every shard it names."""
    w = s3.writer(tp=2)
    in_flight = "a" * 64
    entries = w.put_shards(in_flight)  # uploaded, manifest not yet written
    w.put_shards("b" * 64)  # truly abandoned

    def commit() -> None:
        w.put_manifest(w.manifest(in_flight, None, 0, 4, entries))

    res = GcThread(s3, Policies(grace_s=0.0), hook=once("batch", commit)).start().join()
    assert res.protected_shards == 2 and res.deleted_shards == 2
    assert w.read_manifest(in_flight) is not None
    assert assert_no_live_manifest_lost_a_shard(s3) == 1
    assert s3.object_keys(s3.layout.chunk_prefix(w.ns, "b" * 64)) == []


def test_grace_protects_a_commit_that_lands_after_the_recheck(s3: Bucket) -> None:
    """The manifest lands between the re-check and the delete call: only the
    grace period (older than the commit latency) keeps its young shards."""
    w = s3.writer(tp=2)
    in_flight = "c" * 64
    entries = w.put_shards(in_flight)
    old = s3.writer(tp=2, writer="old", doc=False)
    old.put_shards("d" * 64)
    s3.age(7200, s3.layout.chunk_prefix(w.ns, "d" * 64))

    def commit() -> None:
        w.put_manifest(w.manifest(in_flight, None, 0, 4, entries))

    res = GcThread(s3, Policies(grace_s=3600.0), hook=once("rechecked", commit)).start().join()
    assert res.deleted_shards == 2  # the old orphans only
    assert assert_no_live_manifest_lost_a_shard(s3) == 1


KEY_FORMS = pytest.mark.parametrize("legacy", [False, True], ids=["round-keys", "legacy-keys"])


@KEY_FORMS
def test_recommit_of_a_chunk_being_deleted(s3: Bucket, legacy: bool) -> None:
    """--older-than deletes a chunk's manifest; the same writer re-saves the same
    chunk before the re-check (new shard keys, or the same ones for a writer of
    the older key form): nothing it needs is deleted."""
    w = s3.writer(tp=2, legacy=legacy)
    chain = w.commit_chain(list(range(8)))
    s3.age(3 * 86400)
    leaf = chain[-1]

    def recommit() -> None:
        assert w.read_manifest(leaf.chunk_id) is None  # GC deleted it: a miss
        w.commit(leaf.chunk_id, leaf.parent_id, leaf.chunk_index)

    res = GcThread(s3, Policies(older_than_s=86400.0),
                   hook=once("manifests_deleted", recommit)).start().join()
    assert res.deleted_manifests == 2
    live = w.read_manifest(leaf.chunk_id)
    assert live is not None
    assert w.read_manifest(chain[0].chunk_id) is None
    assert assert_no_live_manifest_lost_a_shard(s3) == 1
    # What is left of the chunk is exactly its new commit.
    assert sorted(s3.object_keys(s3.layout.chunk_prefix(w.ns, leaf.chunk_id))) == sorted(
        [s3.layout.manifest(w.ns, leaf.chunk_id), *(s.key for s in live.shards)])


@KEY_FORMS
def test_recommit_whose_manifest_lands_after_the_recheck(s3: Bucket, legacy: bool) -> None:
    """Shards re-saved before the re-check, manifest after it. Rewritten in place
    (older key form), they are newer than the deleted manifest and younger than
    the grace; under keys of their own they are young, and the old shards, named
    only by the deleted manifest, go at once."""
    w = s3.writer(tp=2, legacy=legacy)
    chain = w.commit_chain(list(range(4)))
    s3.age(3 * 86400)
    cid = chain[0].chunk_id
    entries: list[Any] = []

    def upload() -> None:
        entries.extend(w.put_shards(cid))

    def manifest() -> None:
        w.put_manifest(w.manifest(cid, None, 0, 4, entries))

    hooks = [once("manifests_deleted", upload), once("rechecked", manifest)]

    def hook(name: str, info: dict[str, Any]) -> None:
        for h in hooks:
            h(name, info)

    res = GcThread(s3, Policies(older_than_s=86400.0), hook=hook).start().join()
    assert res.protected_shards == 2
    assert res.deleted_shards == (0 if legacy else 2)
    assert assert_no_live_manifest_lost_a_shard(s3) == 1
    assert sorted(s3.object_keys(s3.layout.chunk_prefix(w.ns, cid))) == sorted(
        [s3.layout.manifest(w.ns, cid), *(e.key for e in entries)])


# --- readers ------------------------------------------------------------------------


@pytest.mark.parametrize("reader_at", ["before", "after-manifest-read", "after-rank0",
                                       "after-manifest-delete", "after"])
def test_reader_gets_hit_or_clean_miss(s3: Bucket, reader_at: str) -> None:
    """GC deletes a two-rank chunk while a reader loads it, at every point of the load."""
    w = s3.writer(tp=2)
    (m,) = w.commit_chain(list(range(4)))
    s3.age(3 * 86400)
    reader = SyncReader(s3)
    outcome: list[tuple[str, Any]] = []
    paused, resume = threading.Event(), threading.Event()
    pause_at = {"after-manifest-read": "manifest", "after-rank0": "rank0"}.get(reader_at)

    def between(step: str) -> None:
        if step == pause_at:
            paused.set()
            assert resume.wait(WAIT)

    def read() -> None:
        outcome.append(reader.load(w.ns, m.chunk_id, between))

    def gc(hook: Callable[[str, dict[str, Any]], None] = lambda n, i: None) -> None:
        GcThread(s3, Policies(older_than_s=86400.0), hook=hook).start().join()

    if reader_at == "before":
        read()
        gc()
    elif reader_at == "after":
        gc()
        read()
    elif reader_at == "after-manifest-delete":
        gc(once("manifests_deleted", read))  # the whole load runs inside GC's pause
    else:  # the reader pauses mid-load while GC runs to completion
        rt = threading.Thread(target=read)
        rt.start()
        assert paused.wait(WAIT)
        gc()
        resume.set()
        rt.join(WAIT)
    reader.close()

    kind, detail = outcome[0]
    if reader_at == "before":
        assert kind == "hit" and detail == _payloads(m)
        assert b"".join(detail) == payload_bytes(m.chunk_id, 0, NUM_KV_HEADS)  # every head
    elif reader_at in ("after", "after-manifest-delete"):
        assert (kind, detail) == ("miss", "no manifest")
    else:
        assert kind == "miss" and detail.startswith("integrity:")
    assert s3.object_keys(s3.layout.chunk_prefix(w.ns, m.chunk_id)) == []


def _payloads(m: Manifest) -> list[bytes]:
    return [payload_bytes(m.chunk_id, s.head_start, s.head_end) for s in m.shards]


# --- free running -------------------------------------------------------------------


def test_free_running_writer_reader_and_gc(s3: Bucket) -> None:
    """A Committer-driven writer saves new prefixes, readers load whatever is
    committed and GC deletes committed chunks, all at once, until the writer is done."""
    st = settings(s3)
    ns = s3.writer().ns
    io = LoopThread("test-writer-io")
    store = io.run(open_store(st.store))
    committed: list[str] = []
    lock = threading.Lock()

    def on_event(name: str, info: dict[str, Any]) -> None:
        if name in ("committed", "commit_exists"):
            with lock:
                committed.append(info["chunk_id"])

    committer = Committer(io=io, store=store, layout=s3.layout, namespace=ns,
                          writer_id=new_writer_id(1, "live"), gatherer=LocalGatherer(),
                          max_inflight_bytes=64 << 20, num_heads=NUM_KV_HEADS,
                          on_event=on_event)
    writer_done = threading.Event()
    outcomes: list[tuple[str, Any]] = []
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for rnd in range(30):
                tokens = [10_000 * (rnd + 1) + i for i in range(12)]  # a new prefix per round
                saves, parent = [], None
                for i, cid in enumerate(chain_chunk_ids(tokens, 4)):
                    buf, _, _ = shard_bytes(cid, 0)
                    saves.append(ChunkSave(ChunkRef(cid, parent, i, 4), buf))
                    parent = cid
                assert committer.submit(rnd, saves)
                assert committer.flush(WAIT)
        except BaseException as exc:
            errors.append(exc)
        finally:
            writer_done.set()

    def read() -> None:
        reader = SyncReader(s3)
        rng = random.Random(1)
        try:
            while not writer_done.is_set():
                with lock:
                    cid = rng.choice(committed) if committed else None
                if cid is not None:
                    outcomes.append(reader.load(ns, cid))
        except BaseException as exc:
            errors.append(exc)
        finally:
            reader.close()

    runs: list[GcResult] = []

    def collect() -> None:
        try:
            while not writer_done.is_set() or len(runs) < 2:
                runs.append(GcThread(s3, Policies(older_than_s=0.0)).start().join())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=f) for f in (write, read, collect)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
        assert not t.is_alive()
    committer.close()
    io.run(store.close())
    io.stop()
    assert not errors, errors
    hits = sum(k == "hit" for k, _ in outcomes)
    print(f"gc runs {len(runs)}, manifests deleted {sum(r.deleted_manifests for r in runs)}, "
          f"shards protected {sum(r.protected_shards for r in runs)}, loads {len(outcomes)} "
          f"({hits} hits, {len(outcomes) - hits} clean misses)")
    assert sum(r.deleted_manifests for r in runs) > 0  # GC really raced the writer
    kinds = {k for k, _ in outcomes}
    assert kinds <= {"hit", "miss"}
    for kind, detail in outcomes:
        if kind == "hit":
            assert len(detail) == 1  # every rank, verified
        else:
            assert detail == "no manifest" or detail.startswith("integrity:")
    assert_no_live_manifest_lost_a_shard(s3)
    assert s3.cli("verify").exit_code == 0


def test_writer_helper_is_what_gc_sees(s3: Bucket) -> None:
    """Sanity: the helper's manifests decode and verify through s3kv.reader."""
    w: ChunkWriter = s3.writer(tp=3)
    w.commit_chain(list(range(8)))
    assert assert_no_live_manifest_lost_a_shard(s3) == 2
