"""Worker side: copy blocks out for saving, commit, and verified loads.

The forward path touches this module twice per step: ``start_load_kv`` hands
load jobs to the I/O loop, and ``wait_for_save`` copies this step's full
chunks into host buffers (one copy; on GPU a device-to-host copy on a side
stream) and hands them to the committer. Neither waits for S3 or for
another rank.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
import warnings
from concurrent.futures import Future
from typing import Any

import torch

from s3kv.aio import io_loop
from s3kv.commit import ChunkSave, Committer, Gatherer, LocalGatherer
from s3kv.config import Settings
from s3kv.errors import IntegrityError, Unavailable
from s3kv.heads import head_range, uploads_heads
from s3kv.keys import Fingerprint, KeyLayout, new_writer_id
from s3kv.reader import HeadBytes, read_heads
from s3kv.shard import PayloadLayout, ShardSpec, encode_header
from s3kv.stats import Counters
from s3kv.store import ObjectStore, open_store
from s3kv.store.counting import CountingStore
from s3kv.vllm.kv_layout import KVBlocks
from s3kv.vllm.metadata import LoadChunk, LoadRequest, S3KVMetadata

log = logging.getLogger("s3kv.vllm")
# Fetched bodies are read-only buffers; we only read from the tensors we wrap them in.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


class WorkerSide:
    def __init__(
        self, settings: Settings, fingerprint: Fingerprint, num_blocks: int, block_size: int,
        tp_rank: int, tp_size: int, tp_ranks: list[int], can_load: bool, can_save: bool,
        counters: Counters, store: ObjectStore | None = None,
        token_map: torch.Tensor | None = None,
    ) -> None:
        self.settings = settings
        self.fp = fingerprint
        self.ns = fingerprint.namespace
        self.layout = KeyLayout(settings.store.prefix)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.blocks_per_chunk = settings.chunk_tokens // block_size
        self.tp_rank, self.tp_size, self.tp_ranks = tp_rank, tp_size, tp_ranks
        self.heads = head_range(fingerprint.num_kv_heads, tp_rank, tp_size)
        self.uploads = uploads_heads(fingerprint.num_kv_heads, tp_rank, tp_size)
        self.can_load, self.can_save = can_load, can_save
        self.token_map = token_map  # the backend's packing of a block (kv_layout.KVBlocks)
        self.counters = counters
        self.io = io_loop()
        self.kv: KVBlocks | None = None
        self.payload: PayloadLayout | None = None  # one head of one chunk, as stored
        # An already-open store (embedding, tests); otherwise the configured
        # one is opened when the caches are registered.
        self.store: ObjectStore | None = store
        self.committer: Committer | None = None
        self._loads: dict[str, tuple[Future[set[int]], set[int]]] = {}
        self._load_errors: set[int] = set()
        self._load_sem: asyncio.Semaphore | None = None
        self._side_stream: Any = None
        self._load_stream: Any = None
        self._last_save_event: Any = None

    # --- start-up ---------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        n_heads = self.heads[1] - self.heads[0]
        kv = KVBlocks(kv_caches, self.num_blocks, n_heads, self.block_size,
                      mla=self.fp.attention == "mla", token_map=self.token_map)
        if kv.dtype_name != self.fp.dtype or kv.token_elems != self.fp.token_elems:
            log.warning("s3kv: KV cache (%s, %d elements per token) differs from the model's "
                        "(%s, %d); cache disabled", kv.dtype_name, kv.token_elems,
                        self.fp.dtype, self.fp.token_elems)
            return
        self.kv = kv
        self.payload = PayloadLayout(kv.dtype_name, kv.names, self.settings.chunk_tokens,
                                     kv.token_elems)
        if kv.device.type == "cuda":
            self._side_stream = torch.cuda.Stream(device=kv.device)
            self._load_stream = torch.cuda.Stream(device=kv.device)
        try:
            if self.store is None:
                self.store = CountingStore(
                    self.io.run(open_store(self.settings.store), timeout=60), self.counters)
        except Exception as exc:
            log.warning("s3kv: cannot open the object store (%s: %s); serving without the cache",
                        type(exc).__name__, exc)
        if not self.can_save:
            return
        gatherer: Gatherer
        if self.tp_size > 1:
            from s3kv.vllm.gather import GlooGatherer

            gatherer = GlooGatherer(self.tp_ranks, self.settings.commit_timeout_s)
        else:
            gatherer = LocalGatherer()
        writer = gatherer.broadcast(new_writer_id(self.tp_size, uuid.uuid4().hex[:12]))
        if self.store is None:
            # Ranks must agree on saving or their gathers would wait for each
            # other; a rank without a store still joins rounds, empty-handed.
            log.warning("s3kv: rank %d saves nothing (no object store)", self.tp_rank)
        self.committer = Committer(
            io=self.io, store=self.store or _NoStore(), layout=self.layout, namespace=self.ns,
            writer_id=writer, gatherer=gatherer,
            max_inflight_bytes=self.settings.max_inflight_mib << 20,
            max_concurrency=self.settings.store.max_concurrency,
            num_heads=self.fp.num_kv_heads, counters=self.counters,
        )

    # --- save (forward path) ----------------------------------------------------

    def wait_for_save(self, meta: S3KVMetadata) -> None:
        if not meta.saves or self.committer is None or self.kv is None or self.payload is None:
            return
        if not self.uploads:
            # A lower rank stores these heads; join the round empty-handed.
            self.committer.submit(meta.round_id, [
                ChunkSave(s.chunk_id, s.parent_id, s.chunk_index, s.num_tokens, None)
                for s in meta.saves
            ])
            return
        kv = self.kv
        n_heads = self.heads[1] - self.heads[0]
        specs = [ShardSpec(s.chunk_id, self.tp_rank, self.heads[0], self.heads[1], self.payload)
                 for s in meta.saves]
        headers = [encode_header(sp) for sp in specs]
        sizes = [len(h) + sp.payload_bytes for h, sp in zip(headers, specs, strict=True)]
        if not self.committer.try_reserve(sum(sizes)):
            self.committer.submit_dropped(meta.round_id, [
                (s.chunk_id, s.parent_id, s.chunk_index, s.num_tokens) for s in meta.saves
            ])
            return
        on_gpu = kv.device.type == "cuda"
        event = None
        saves = []
        stream_ctx = (torch.cuda.stream(self._side_stream) if on_gpu
                      else contextlib.nullcontext())
        if on_gpu:
            self._side_stream.wait_stream(torch.cuda.current_stream(kv.device))
        dsts = []
        with stream_ctx:
            for s, header, total in zip(meta.saves, headers, sizes, strict=True):
                host = torch.empty(total, dtype=torch.uint8, pin_memory=on_gpu)
                mv = host.numpy().data
                mv[: len(header)] = header
                dsts.append(kv.payload_view(host[len(header):], n_heads, len(s.block_ids)))
                saves.append(ChunkSave(s.chunk_id, s.parent_id, s.chunk_index, s.num_tokens, mv))
            # All of this step's chunks in one gather: the per-layer launches
            # are paid once per step, not once per chunk.
            kv.copy_out([s.block_ids for s in meta.saves], dsts)
            if on_gpu:
                event = torch.cuda.Event()
                event.record(self._side_stream)
        if event is not None:
            self._last_save_event = event
            for cs in saves:
                cs.wait_ready = event.synchronize
        self.committer.submit(meta.round_id, saves, reserved=True)

    # --- load ---------------------------------------------------------------------

    def start_load_kv(self, meta: S3KVMetadata) -> None:
        if self._last_save_event is not None:
            # Blocks being copied out may be reused by this step's forward:
            # order the device stream after the copy (no host wait).
            torch.cuda.current_stream().wait_event(self._last_save_event)
            self._last_save_event = None
        issued = None
        if meta.loads and self._load_stream is not None:
            # Loads write into blocks the scheduler just allocated; kernels
            # queued before this step may still read their previous contents.
            # The load stream waits for them on the device (no host wait).
            issued = torch.cuda.Event()
            issued.record(torch.cuda.current_stream())
        for lr in meta.loads:
            blocks = {bid for ch in lr.chunks for _, bid in ch.blocks}
            if self.kv is None or self.payload is None or self.store is None or not self.can_load:
                fut: Future[set[int]] = Future()
                fut.set_result(blocks)
            else:
                fut = self.io.submit(self._load(lr, issued))
            self._loads[lr.req_id] = (fut, blocks)

    async def _load(self, lr: LoadRequest, issued: Any = None) -> set[int]:
        if self._load_sem is None:
            self._load_sem = asyncio.Semaphore(self.settings.store.max_concurrency)
        # One deadline for all of the request's chunks, from now: past it a
        # recompute would have been faster than waiting (s3kv.deadlines).
        until = asyncio.get_running_loop().time() + min(lr.deadline_s,
                                                        self.settings.load_timeout_s)
        results = await asyncio.gather(*(self._load_chunk(ch, issued, until)
                                         for ch in lr.chunks))
        return set().union(*results) if results else set()

    async def _fetch(self, ch: LoadChunk) -> list[HeadBytes]:
        if self.store is None or self.payload is None:
            raise IntegrityError("KV cache or store not ready")
        async with self._load_sem:  # type: ignore[union-attr]
            return await read_heads(self.store, ch.manifest, self.heads[0], self.heads[1],
                                    self.payload)

    async def _load_chunk(self, ch: LoadChunk, issued: Any, until: float) -> set[int]:
        """Returns the block ids that failed (empty on success)."""
        failed = {bid for _, bid in ch.blocks}
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            try:
                pieces = await asyncio.wait_for(self._fetch(ch), max(0.0, until - loop.time()))
            except TimeoutError:
                self.counters.add("load_deadline_misses")
                raise
            await loop.run_in_executor(None, self._copy_in, pieces, ch, issued)
            self.counters.add("bytes_loaded", sum(len(p.payload) for p in pieces))
            self.counters.add("load_seconds", time.perf_counter() - t0)
            self.counters.add("loaded_chunks")
            return set()
        except Exception as exc:
            self.counters.add("load_failures")
            log.warning("s3kv: load of chunk %s failed (%s: %s); recomputing",
                        ch.manifest.chunk_id[:12], type(exc).__name__,
                        exc or "past its deadline")
            return failed

    def _copy_in(self, pieces: list[HeadBytes], ch: LoadChunk, issued: Any = None) -> None:
        kv = self.kv
        if kv is None:
            raise IntegrityError("KV cache not registered")
        offsets = [o for o, _ in ch.blocks]
        block_ids = [b for _, b in ch.blocks]
        srcs = [(p.head_start - self.heads[0],
                 kv.payload_view(torch.frombuffer(p.payload, dtype=torch.uint8),
                                 p.head_end - p.head_start, self.blocks_per_chunk))
                for p in pieces]
        if kv.device.type == "cuda":
            with torch.cuda.stream(self._load_stream):
                if issued is not None:
                    self._load_stream.wait_event(issued)
                for head_offset, src in srcs:
                    kv.copy_in(src, offsets, block_ids, head_offset)
            self._load_stream.synchronize()  # this executor thread only
        else:
            for head_offset, src in srcs:
                kv.copy_in(src, offsets, block_ids, head_offset)

    def get_finished(self) -> set[str]:
        done = set()
        for req_id, (fut, blocks) in list(self._loads.items()):
            if not fut.done():
                continue
            try:
                failed = fut.result()
            except Exception:
                failed = blocks
            self._load_errors |= failed
            done.add(req_id)
            del self._loads[req_id]
        return done

    def take_load_errors(self) -> set[int]:
        out, self._load_errors = self._load_errors, set()
        return out

    def flush(self, timeout: float) -> bool:
        """Wait until every save submitted so far is committed (or failed) and
        every load started so far has finished. For shutdown and tests; never
        called on the forward path."""
        deadline = time.monotonic() + timeout
        for fut, _ in list(self._loads.values()):
            try:
                fut.result(max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return False
            except Exception:  # a failed load is finished; get_finished reports it
                pass
        if self.committer is None:
            return True
        return self.committer.flush(max(0.0, deadline - time.monotonic()))

    def shutdown(self) -> None:
        if self.committer is not None:
            self.committer.flush(timeout=min(30.0, self.settings.commit_timeout_s))
            self.committer.close()


class _NoStore:
    """Stands in for a store that could not be opened: every put fails, so no
    manifest is ever written, while the rank still takes part in the gathers."""

    async def put(self, key: str, data: object, *, mode: str = "overwrite") -> str | None:
        raise Unavailable("no object store", key=key)
