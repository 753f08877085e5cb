"""Load path of the worker side: verified reads into the KV cache, with deadlines.

``start`` hands each request's chunks to the I/O loop and returns; reads run
in the background, are verified byte for byte (``s3kv.reader``), and are
abandoned at the request's deadline (past it a recompute would have been
faster, ``s3kv.deadlines``). A chunk that fails for any reason leaves its
blocks as they were and is reported as a load error, so vLLM recomputes it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import warnings
from concurrent.futures import Future
from typing import Any

import torch

from s3kv.aio import LoopThread
from s3kv.config import Settings
from s3kv.errors import IntegrityError
from s3kv.reader import HeadBytes, read_heads
from s3kv.shard import PayloadLayout
from s3kv.stats import Counters
from s3kv.store import ObjectStore
from s3kv.vllm.metadata import LoadChunk, LoadRequest, S3KVMetadata
from s3kv.vllm.state_layout import GroupCache, StateBlocks

log = logging.getLogger("s3kv.vllm")
# Fetched bodies are read-only buffers; we only read from the tensors we wrap them in.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


class Loader:
    """Load jobs and their outcomes until vLLM collects them.

    Until ``attach`` (or when the cache is off) every load fails at once, so
    vLLM recomputes and never waits for blocks nobody will write.
    """

    def __init__(self, settings: Settings, heads: tuple[int, int], block_size: int,
                 counters: Counters, io: LoopThread) -> None:
        self.settings = settings
        self.heads = heads
        self.block_size = block_size
        self.counters = counters
        self.io = io
        self.kvs: list[GroupCache] = []  # one per KV cache group
        self.payload: PayloadLayout | None = None
        self.store: ObjectStore | None = None
        self._jobs: dict[str, tuple[Future[set[int]], set[int]]] = {}
        self._errors: set[int] = set()
        # Chunks abandoned at their deadline, and chunks that failed otherwise
        # (missing, corrupt: the scheduler sets those aside). Both are added
        # on the I/O thread and taken on the worker's, under ``_lock``.
        self._late: set[str] = set()
        self._bad: set[str] = set()
        self._lock = threading.Lock()
        self._failed_reqs: set[str] = set()
        self._sem: asyncio.Semaphore | None = None
        self._stream: Any = None

    def attach(self, kvs: list[GroupCache], payload: PayloadLayout, store: ObjectStore) -> None:
        self.kvs, self.payload, self.store = list(kvs), payload, store
        if kvs[0].device.type == "cuda":
            self._stream = torch.cuda.Stream(device=kvs[0].device)

    def start(self, meta: S3KVMetadata) -> None:
        issued = None
        if meta.loads and self._stream is not None:
            # Loads write into blocks the scheduler just allocated; kernels
            # queued before this call (earlier steps' forwards, their save
            # gathers, this step's forward when vLLM launched it first) may
            # still read their previous contents. The load stream waits for
            # them on the device (no host wait).
            issued = torch.cuda.Event()
            issued.record(torch.cuda.current_stream())
        for lr in meta.loads:
            blocks = {bid for ch in lr.chunks for bid in ch.block_ids} | set(lr.refused_blocks)
            if not self.kvs or self.payload is None or self.store is None:
                fut: Future[set[int]] = Future()
                fut.set_result(blocks)
            else:
                fut = self.io.submit(self._load(lr, issued))
            self._jobs[lr.req_id] = (fut, blocks)

    async def _load(self, lr: LoadRequest, issued: Any = None) -> set[int]:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.settings.store.max_concurrency)
        # One deadline for all of the request's chunks, from now: past it a
        # recompute would have been faster than waiting (s3kv.deadlines).
        until = asyncio.get_running_loop().time() + min(lr.deadline_s,
                                                        self.settings.max_cache_wait_s)
        results = await asyncio.gather(*(self._load_chunk(ch, issued, until)
                                         for ch in lr.chunks))
        return set(lr.refused_blocks).union(*results)

    async def _fetch(self, ch: LoadChunk) -> list[HeadBytes]:
        if self.store is None or self.payload is None or self._sem is None:
            raise IntegrityError("KV cache or store not ready")
        wanted = [g for g, pairs in enumerate(ch.groups) if pairs]
        async with self._sem:
            return await read_heads(self.store, ch.manifest, self.heads[0], self.heads[1],
                                    self.payload, wanted)

    async def _load_chunk(self, ch: LoadChunk, issued: Any, until: float) -> set[int]:
        """Returns the block ids that failed (empty on success)."""
        failed = ch.block_ids
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            try:
                pieces = await asyncio.wait_for(self._fetch(ch), max(0.0, until - loop.time()))
            except TimeoutError:
                self.counters.add("load_deadline_misses")
                with self._lock:
                    self._late.add(ch.manifest.chunk_id)
                raise
            await loop.run_in_executor(None, self._copy_in, pieces, ch, issued)
            self.counters.add("bytes_loaded", sum(len(p.payload) for p in pieces))
            self.counters.add("load_seconds", time.perf_counter() - t0)
            self.counters.add("loaded_chunks")
            return set()
        except Exception as exc:
            if not isinstance(exc, TimeoutError):
                with self._lock:
                    self._bad.add(ch.manifest.chunk_id)
            self.counters.add("load_failures")
            log.warning("s3kv: load of chunk %s failed (%s: %s); recomputing",
                        ch.manifest.chunk_id[:12], type(exc).__name__,
                        exc or "past its deadline")
            return failed

    def _copy_in(self, pieces: list[HeadBytes], ch: LoadChunk, issued: Any = None) -> None:
        if not self.kvs:
            raise IntegrityError("KV cache not registered")
        copies = [self._source(p, ch) for p in pieces]
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                if issued is not None:
                    self._stream.wait_event(issued)
                for kv, src, offsets, block_ids, head_offset in copies:
                    kv.copy_in(src, offsets, block_ids, head_offset)
            self._stream.synchronize()  # this executor thread only
        else:
            for kv, src, offsets, block_ids, head_offset in copies:
                kv.copy_in(src, offsets, block_ids, head_offset)

    def _source(self, p: HeadBytes, ch: LoadChunk
                ) -> tuple[GroupCache, torch.Tensor, list[int], list[int], int]:
        """One piece's blocks as ``copy_in`` takes them: its section holds the
        chunk's tokens from the section's start, and the blocks to fill begin
        at or after it (the scheduler loads no block the section lacks)."""
        if not 0 <= p.section < len(self.kvs):
            raise IntegrityError(f"no KV cache group {p.section} in this engine")
        if self.payload is None:
            raise IntegrityError("KV cache not registered")
        kv, pairs = self.kvs[p.section], ch.groups[p.section]
        src = torch.frombuffer(p.payload, dtype=torch.uint8) if len(p.payload) else None
        if isinstance(kv, StateBlocks):
            # The writer's TP size is the reader's (the namespace holds it for
            # state groups): the section is this rank's whole state.
            if src is None or (p.head_start, p.head_end) != self.heads:
                raise IntegrityError(f"chunk {ch.manifest.chunk_id[:12]} holds no state for "
                                     f"heads {self.heads} in group {p.section}")
            return kv, src, [0] * len(pairs), [b for _, b in pairs], 0
        tokens = self.payload.tokens
        start = ch.manifest.starts[p.section] if ch.manifest.starts else 0
        bs = self.block_size
        first = min(o for o, _ in pairs) * bs
        if first < start or tokens % bs:
            raise IntegrityError(f"chunk {ch.manifest.chunk_id[:12]} group {p.section} starts "
                                 f"at token {start}, after block {first // bs}")
        if src is None:
            raise IntegrityError(f"chunk {ch.manifest.chunk_id[:12]} group {p.section} is empty")
        src = kv.section_view(src, p.head_end - p.head_start, tokens - start)
        src = src.narrow(2, first - start, tokens - first).unflatten(2, (-1, bs))
        return (kv, src, [o - first // bs for o, _ in pairs], [b for _, b in pairs],
                p.head_start - self.heads[0])

    def finished(self) -> set[str]:
        """Requests whose loads ended since the last call; their failed blocks go
        to ``take_errors``, and the requests with any to ``take_failed``."""
        done = set()
        for req_id, (fut, blocks) in list(self._jobs.items()):
            if not fut.done():
                continue
            try:
                failed = fut.result()
            except Exception:
                failed = blocks
            self._errors |= failed
            if failed:
                self._failed_reqs.add(req_id)
            done.add(req_id)
            del self._jobs[req_id]
        return done

    def take_failed(self) -> set[str]:
        """Requests with a failed load since the last call (for engines with
        several KV cache groups, where vLLM takes failures per request)."""
        out, self._failed_reqs = self._failed_reqs, set()
        return out

    def take_bad(self) -> set[str]:
        """Chunks whose loads failed other than by their deadline since the last call."""
        with self._lock:
            out, self._bad = self._bad, set()
        return out

    def take_late(self) -> set[str]:
        """Chunks whose loads were abandoned at their deadline since the last call."""
        with self._lock:
            out, self._late = self._late, set()
        return out

    def take_errors(self) -> set[int]:
        out, self._errors = self._errors, set()
        return out

    def wait(self, deadline: float) -> bool:
        """Wait (``time.monotonic`` deadline) until every load started so far has
        ended; False if one has not. Never called on the forward path."""
        for fut, _ in list(self._jobs.values()):
            try:
                fut.result(max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return False
            except Exception:  # a failed load has ended; finished() reports it
                pass
        return True
