"""Commit across ranks: per-rank shard uploads, a background gather, one manifest.

How every rank learns that all ranks finished, without a barrier on the
forward path:

1. ``Committer.submit(round)`` is called on the forward path with this
   rank's filled shard buffers. It starts the uploads on the I/O loop and
   returns at once. It never waits on S3 or on another rank. Each shard goes
   to a key of its own save round (``<writer>.<round>/r<rank>``, see
   :mod:`s3kv.keys`), create-only: bytes a manifest names are never
   overwritten, even when this engine saves a chunk it committed before. A
   key that already holds other bytes (a repeated round id, or a foreign
   writer under this writer id: a bug) is left alone and its chunk's round
   does not commit.
2. A committer thread per rank takes rounds in submission order, waits for
   *its own* uploads (durable once S3 answers 200), checksums them, and
   joins a ``gather`` of per-shard reports over a dedicated GLOO group.
   Rounds are issued in the same order on every rank because the scheduler
   sends every rank the same save plan; each report carries its round id and
   rank 0 refuses to commit a round whose ids disagree.
3. Rank 0 writes one manifest per chunk whose shards every rank reported as
   stored and checksummed, with ``If-None-Match: *``. A rank whose KV heads
   another (lower) rank already uploads (KV heads < TP, or MLA's one shared
   latent) joins the round empty-handed: it reports "nothing to store", so
   each head is stored once and the protocol is the same. A 412 means someone
   already committed that chunk: success. Any rank failing, or a gather that
   times out, means no manifest; the shards are orphans for the GC.

A round that cannot be accepted (upload memory full, group re-forming) is
still submitted as an empty-handed placeholder so ranks stay in step.

Rank 0 reports how every chunk of every round ended (:meth:`Committer.take_outcomes`),
so the scheduler can plan a failed save again; a failed gather is survived
by re-forming the group (:mod:`s3kv.commit_group`).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from typing_extensions import Buffer

from s3kv.aio import LoopThread
from s3kv.commit_group import (
    BACKOFF_S,
    EventHook,
    Gatherer,
    LocalGatherer,
    Outcomes,
    Recovery,
    RecoveryImpossible,
)
from s3kv.errors import AlreadyExists, ManifestError
from s3kv.keys import ChunkRef, KeyLayout
from s3kv.manifest import ShardEntry, new_manifest
from s3kv.shard import seal
from s3kv.stats import Counters
from s3kv.store.protocol import Get, Put

log = logging.getLogger("s3kv.commit")

__all__ = ["ChunkSave", "Committer", "Gatherer", "LocalGatherer", "RecoveryImpossible",
           "RoundReport", "ShardReport"]


@dataclass(frozen=True)
class ChunkSave:
    """One rank's shard of one chunk, already filled in a host buffer.

    The committer treats ``data`` as opaque: ``s3kv.shard.seal`` reads what it
    needs from the shard's own header. ``data=None`` says this rank stores
    nothing for the chunk (another rank uploads its heads) but takes part.
    """

    ref: ChunkRef
    data: Buffer | None  # the whole shard object: header + payload
    # Blocks until ``data`` is filled (a device-to-host copy on a side stream);
    # called on an executor thread, never on the forward path.
    wait_ready: Callable[[], None] | None = None


# Slotted, like ChunkRef: the gather pickles one per shard every round.
@dataclass(frozen=True, slots=True)
class ShardReport:
    ref: ChunkRef
    ok: bool
    entry: ShardEntry | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class RoundReport:
    round_id: int
    rank: int
    shards: tuple[ShardReport, ...]


@dataclass
class _Round:
    round_id: int
    chunks: list[str] = field(default_factory=list)  # chunk ids, as submitted
    uploads: list[tuple[ChunkSave, Future[ShardReport]]] = field(default_factory=list)
    placeholders: list[ShardReport] = field(default_factory=list)
    recovering: bool = False  # submitted while the group was broken: fails for that


_STOP = object()


class Committer:
    """One per rank. ``submit`` is the only method the forward path calls."""

    def __init__(
        self,
        *,
        io: LoopThread,
        store: Put,
        layout: KeyLayout,
        namespace: str,
        writer_id: str,
        gatherer: Gatherer,
        max_inflight_bytes: int,
        max_concurrency: int = 16,
        num_heads: int | None = None,
        counters: Counters | None = None,
        on_event: EventHook | None = None,
        reform_backoff: tuple[float, float] = BACKOFF_S,
    ) -> None:
        self.rank = gatherer.rank
        self.world_size = gatherer.world_size
        self._io = io
        self._store = store
        self._layout = layout
        self._ns = namespace
        self._writer = writer_id
        self._gatherer = gatherer
        self._max_inflight = max_inflight_bytes
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        self._sem: asyncio.Semaphore | None = None
        self._max_concurrency = max_concurrency
        self._num_heads = num_heads
        self.counters = counters or Counters()
        self._on_event = on_event
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._recovery = Recovery(gatherer, self.counters, self._emit, reform_backoff)
        self._outcomes = Outcomes()
        self._seq = 0  # rounds consumed by the committer thread (its own counter)
        self._failures_unreported = 0
        self._next_failure_report = 0.0
        self._conflicts_unreported = 0
        self._next_conflict_report = 0.0
        self._manifest_futures: list[Future[None]] = []
        self._mf_lock = threading.Lock()
        self._progress = threading.Condition()
        self._submitted = 0
        self._processed = 0
        self._thread = threading.Thread(
            target=self._run, name=f"s3kv-commit-r{self.rank}", daemon=True
        )
        self._thread.start()

    # --- forward path ---------------------------------------------------------

    def try_reserve(self, nbytes: int) -> bool:
        """Reserve upload memory before filling buffers; False means drop the round."""
        if self._recovery.broken is not None:
            return False
        with self._inflight_lock:
            if self._inflight + nbytes > self._max_inflight:
                return False
            self._inflight += nbytes
            return True

    def submit(
        self, round_id: int, saves: Sequence[ChunkSave], *, reserved: bool = False
    ) -> bool:
        """Queue one round; returns False if its data was dropped. Never blocks.

        ``reserved`` says the caller already holds a :meth:`try_reserve` for
        exactly these buffers. A round whose data is dropped is still queued,
        empty-handed, so this rank joins the round's gather and ranks stay in step.
        """
        rnd = _Round(round_id, [s.ref.chunk_id for s in saves])
        total = sum(memoryview(s.data).nbytes for s in saves if s.data is not None)
        accepted = reserved or self.try_reserve(total)
        if accepted and self._recovery.broken is not None:
            with self._inflight_lock:
                self._inflight -= total
            accepted = False
        if accepted:
            for s in saves:
                if s.data is None:
                    rnd.placeholders.append(ShardReport(s.ref, True))
                else:
                    rnd.uploads.append(
                        (s, self._io.submit(self._upload(round_id, s, s.data))))
        else:
            self._drop(rnd, [s.ref for s in saves])
        self._enqueue(rnd)
        self._emit("submitted", round_id=round_id, chunks=len(saves), accepted=accepted)
        return accepted

    def submit_dropped(self, round_id: int, chunks: Sequence[ChunkRef]) -> None:
        """Join a round without data (no memory was reserved): keeps ranks in step."""
        rnd = _Round(round_id, [ref.chunk_id for ref in chunks])
        self._drop(rnd, chunks)
        self._enqueue(rnd)

    def _drop(self, rnd: _Round, chunks: Sequence[ChunkRef]) -> None:
        # While re-forming nothing is uploaded: the round cannot commit anyway.
        rnd.recovering = self._recovery.broken is not None
        error = "recovering" if rnd.recovering else "dropped"
        rnd.placeholders.extend(ShardReport(ref, False, error=error) for ref in chunks)
        if chunks and not rnd.recovering:
            self.counters.add("saves_dropped", len(chunks))
            self._emit("dropped", round_id=rnd.round_id, chunks=len(chunks))

    def _enqueue(self, rnd: _Round) -> None:
        with self._progress:
            self._submitted += 1
        self._queue.put(rnd)

    # --- uploads (I/O loop) ---------------------------------------------------

    async def _upload(self, round_id: int, s: ChunkSave, data: Buffer) -> ShardReport:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self._max_concurrency)
        size = memoryview(data).nbytes
        cid = s.ref.chunk_id
        key = f"chunk {cid[:12]} round {round_id}"  # for messages until the key is built
        try:
            key = self._layout.shard(self._ns, cid, self._writer, self.rank, round_id)
            loop = asyncio.get_running_loop()
            if s.wait_ready is not None:
                await loop.run_in_executor(None, s.wait_ready)
            entry: ShardEntry = await loop.run_in_executor(None, seal, data, key)
            async with self._sem:
                t0 = time.perf_counter()
                try:
                    await self._store.put(key, data, mode="create")
                except AlreadyExists:
                    if not await self._holds(key, data):
                        raise
                self.counters.add("save_seconds", time.perf_counter() - t0)
            self.counters.add("bytes_saved", size)
            self._emit("uploaded", chunk_id=cid, key=key)
            return ShardReport(s.ref, True, entry)
        except AlreadyExists:
            # Never overwritten: whatever holds the key may be named by a manifest.
            self.counters.add("shard_conflicts")
            self._emit("shard_conflict", chunk_id=cid, key=key, round_id=round_id)
            self._warn_conflict(key)
            return ShardReport(s.ref, False, error="AlreadyExists")
        except Exception as exc:  # every failure becomes "this rank not ok"
            self.counters.add("upload_failures")
            self._emit("upload_failed", chunk_id=cid, error=str(exc))
            log.debug("shard upload failed for %s: %s", key, exc)
            self._warn_upload_failure(exc)
            return ShardReport(s.ref, False, error=type(exc).__name__)
        finally:
            with self._inflight_lock:
                self._inflight -= size

    async def _holds(self, key: str, data: Buffer) -> bool:
        """Whether ``key`` already holds exactly ``data``.

        A create whose first attempt was stored but whose answer was lost is
        answered 412 when the client retries it: the shard is ours and stored.
        Anything else there is a conflict. A failed read raises (a plain
        upload failure).
        """
        if not isinstance(self._store, Get):
            return False
        stored = await self._store.get(key)
        return stored.tobytes() == memoryview(data).tobytes()

    def _warn_conflict(self, key: str) -> None:
        # A bug, never an S3 hiccup: say so at once, then at most once a minute.
        self._conflicts_unreported += 1
        now = time.monotonic()
        if now >= self._next_conflict_report:
            log.warning("s3kv: shard key %s already holds other bytes (%d such conflicts since "
                        "the last report); not overwritten, that chunk is not committed. A "
                        "repeated save round id or another engine using this writer id?",
                        key, self._conflicts_unreported)
            self._conflicts_unreported = 0
            self._next_conflict_report = now + 60.0

    def _warn_upload_failure(self, exc: Exception) -> None:
        # S3 down or refusing: say so at once, then at most once a minute.
        self._failures_unreported += 1
        now = time.monotonic()
        if now >= self._next_failure_report:
            log.warning("s3kv: shard uploads failing (%d since the last report; last: %s: %s); "
                        "those chunks stay uncached, serving continues",
                        self._failures_unreported, type(exc).__name__, exc)
            self._failures_unreported = 0
            self._next_failure_report = now + 60.0

    # --- committer thread -----------------------------------------------------

    def _run(self) -> None:
        while True:
            rnd = self._queue.get()
            if rnd is _STOP:
                return
            self._consume(rnd, skip=False)
            rec = self._recovery
            if (rec.broken is not None and not rec.permanent
                    and not rec.recover(lambda: self._seq, self._drain)):
                return

    def _consume(self, rnd: _Round, *, skip: bool) -> None:
        seq = self._seq
        self._seq += 1
        try:
            rec = self._recovery
            if skip or rec.permanent or seq < rec.skip_until:
                self.counters.add("commit_rounds_skipped")
                self._report_failed(rnd)
                self._emit("skipped", round_id=rnd.round_id, chunks=len(rnd.chunks))
            else:
                self._process(rnd)
        except Exception:  # a bug; the thread must go on, or every later round stalls
            log.exception("s3kv: commit round %d failed unexpectedly", rnd.round_id)
        finally:
            with self._progress:
                self._processed += 1
                self._progress.notify_all()

    def _drain(self) -> bool:
        """Consume every queued round as failed, while the group is re-forming;
        False once the queue says stop."""
        while True:
            try:
                rnd = self._queue.get_nowait()
            except queue.Empty:
                return True
            if rnd is _STOP:
                self._queue.put(_STOP)
                return False
            self._consume(rnd, skip=True)

    def _report_failed(self, rnd: _Round) -> None:
        if self.rank == 0:
            self._outcomes.failed(dict.fromkeys(rnd.chunks))

    def _process(self, rnd: _Round) -> None:
        reports = list(rnd.placeholders)
        for _, fut in rnd.uploads:
            reports.append(fut.result())
        if rnd.recovering:
            self.counters.add("commit_rounds_skipped")
        report = RoundReport(rnd.round_id, self.rank, tuple(reports))
        try:
            gathered = self._gatherer.gather(report)
        except Exception as exc:
            self.counters.add("commit_gather_failures")
            self._report_failed(rnd)
            self._recovery.fail(f"gather of round {rnd.round_id} failed: {exc}",
                                round_id=rnd.round_id)
            return
        self._emit("gathered", round_id=rnd.round_id)
        if self.rank == 0:
            self._commit_round(rnd, gathered or [])

    def _commit_round(self, rnd: _Round, gathered: list[RoundReport]) -> None:
        round_id = rnd.round_id
        mine = set(rnd.chunks)  # outcomes are for what this rank was asked to save
        if sorted(r.rank for r in gathered) != list(range(self.world_size)) or any(
            r.round_id != round_id for r in gathered
        ):
            self._report_failed(rnd)
            self._recovery.fail(f"round {round_id}: ranks out of step", round_id=round_id)
            return
        by_chunk: dict[str, list[ShardReport]] = {}
        for r in gathered:
            for s in r.shards:
                by_chunk.setdefault(s.ref.chunk_id, []).append(s)
        for cid, shards in by_chunk.items():
            if not self._commit_chunk(cid, shards) and cid in mine:
                self._outcomes.failed([cid])

    def _commit_chunk(self, cid: str, shards: list[ShardReport]) -> bool:
        """Start the manifest write; False if the chunk cannot commit."""
        entries = [s.entry for s in shards if s.ok and s.entry is not None]
        if len(shards) != self.world_size or not all(s.ok for s in shards):
            self.counters.add("chunks_not_committed")
            self._emit("not_committed", chunk_id=cid)
            return False
        ref = shards[0].ref
        try:
            if any(s.ref != ref for s in shards):  # every rank got the same plan: a bug
                raise ManifestError("ranks disagree on the chunk's parent, index or tokens")
            manifest = new_manifest(
                namespace=self._ns, chunk_id=cid, parent_id=ref.parent_id,
                chunk_index=ref.index, num_tokens=ref.num_tokens,
                writer=self._writer, shards=entries, tp_size=self.world_size,
            )
            if self._num_heads is not None and manifest.num_heads != self._num_heads:
                raise ManifestError(f"shards cover {manifest.num_heads} KV heads, "
                                    f"the model has {self._num_heads}")
            fut = self._io.submit(self._put_manifest(cid, manifest.encode()))
        except Exception as exc:  # ranks disagree on the heads or on the chunk
            self.counters.add("chunks_not_committed")
            self._emit("not_committed", chunk_id=cid, error=str(exc))
            log.warning("s3kv: chunk %s not committed: %s", cid[:12], exc)
            return False
        with self._mf_lock:
            self._manifest_futures = [f for f in self._manifest_futures if not f.done()]
            self._manifest_futures.append(fut)
        return True

    async def _put_manifest(self, cid: str, doc: bytes) -> None:
        key = self._layout.manifest(self._ns, cid)
        self._emit("committing", chunk_id=cid, key=key)
        try:
            await self._store.put(key, doc, mode="create")
            self.counters.add("chunks_committed")
            self._emit("committed", chunk_id=cid, key=key)
        except AlreadyExists:
            self.counters.add("chunks_already_committed")
            self._emit("commit_exists", chunk_id=cid, key=key)
        except Exception as exc:
            self.counters.add("commit_failures")
            self._emit("commit_failed", chunk_id=cid, error=str(exc))
            log.warning("s3kv: manifest write for chunk %s failed: %s", cid[:12], exc)
            self._outcomes.failed([cid])
            return
        self._outcomes.committed(cid)

    # --- lifecycle ------------------------------------------------------------

    @property
    def broken(self) -> str | None:
        """Why saving is off (while the group re-forms, or for good); None when healthy."""
        return self._recovery.broken

    @property
    def reforms(self) -> int:
        return self._recovery.reforms

    def take_outcomes(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(committed, failed) chunk ids learned since the previous call.

        Every chunk of every round submitted on rank 0 appears in exactly one
        of the two, exactly once, once its save has ended; committed includes
        a chunk another writer committed first. Only rank 0 learns outcomes:
        other ranks always get ``((), ())``.
        """
        return self._outcomes.take()

    def flush(self, timeout: float) -> bool:
        """Wait until every round submitted so far is gathered and its manifests
        written. For shutdown and tests; never called on the forward path."""
        deadline = time.monotonic() + timeout
        with self._progress:
            target = self._submitted
            if not self._progress.wait_for(lambda: self._processed >= target, timeout):
                return False
        with self._mf_lock:
            futs = list(self._manifest_futures)
        for f in futs:
            try:
                f.result(max(0.0, deadline - time.monotonic()))
            except Exception:
                return False
        return True

    def close(self, timeout: float = 10.0) -> None:
        self._recovery.stop()
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _emit(self, name: str, **info: Any) -> None:
        if self._on_event is not None:
            try:
                self._on_event(name, info)
            except Exception:  # a test hook must never break the commit path
                log.exception("s3kv event hook failed")
