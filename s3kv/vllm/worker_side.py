"""Worker side: the composition of the save path, the load path and their store.

The forward path touches it twice per step: ``start_load_kv`` hands load
jobs to the I/O loop (``s3kv.vllm.loader``), and ``wait_for_save`` queues the
copy of this step's full chunks out of the KV cache and hands them to the
committer (``s3kv.vllm.saver``). Neither waits for S3, for another rank, or
for the device. This module opens the store, checks the cache against the
model, and wires the commit group at start-up.
"""

from __future__ import annotations

import logging
import time
import uuid

import torch

from s3kv.aio import io_loop
from s3kv.commit import Committer, Gatherer, LocalGatherer
from s3kv.config import Settings
from s3kv.errors import Unavailable
from s3kv.groups import GroupSpec
from s3kv.heads import head_range, uploads_heads
from s3kv.keys import Fingerprint, KeyLayout, new_writer_id
from s3kv.shard import PayloadLayout
from s3kv.stats import Counters
from s3kv.store import ObjectStore
from s3kv.store.engine import open_engine_store
from s3kv.vllm.kv_layout import KVBlocks
from s3kv.vllm.loader import Loader
from s3kv.vllm.metadata import S3KVMetadata, WorkerReport
from s3kv.vllm.saver import Saver
from s3kv.vllm.state_layout import GroupCache, StateBlocks

log = logging.getLogger("s3kv.vllm")


class WorkerSide:
    def __init__(
        self, settings: Settings, fingerprint: Fingerprint, num_blocks: int, block_size: int,
        tp_rank: int, tp_size: int, tp_ranks: list[int], can_load: bool, can_save: bool,
        counters: Counters, store: ObjectStore | None = None,
        token_map: torch.Tensor | None = None, groups: tuple[GroupSpec, ...] = (),
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
        # vLLM's KV cache groups (s3kv.vllm.hybrid); empty: one group of every layer.
        self.groups = groups
        self.counters = counters
        self.io = io_loop()
        self.kvs: list[GroupCache] = []  # one per group, in group order
        self.payload: PayloadLayout | None = None  # one head of one chunk, as stored
        # An already-open store (embedding, tests); otherwise the configured
        # one is opened when the caches are registered.
        self.store: ObjectStore | None = store
        self.committer: Committer | None = None
        self.saver: Saver | None = None
        self.loader = Loader(settings, self.heads, block_size, counters, self.io)

    # --- start-up ---------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        n_heads = self.heads[1] - self.heads[0]
        mla = self.fp.attention == "mla"
        # One group: the engine's layer order, as every single-group shard has it.
        layer_groups = ([g.layers for g in self.groups] if len(self.groups) > 1
                        else [tuple(kv_caches)])
        missing = [n for layers in layer_groups for n in layers if n not in kv_caches]
        if missing:
            log.warning("s3kv: layers %s have no KV cache tensor; cache disabled", missing[:3])
            return
        state_bytes = [g.state_bytes for g in self.groups] or [0]
        kvs: list[GroupCache] = [
            StateBlocks({n: kv_caches[n] for n in layers}, nbytes, n_heads) if nbytes else
            KVBlocks({n: kv_caches[n] for n in layers}, self.num_blocks, n_heads,
                     self.block_size, mla=mla, token_map=self.token_map)
            for layers, nbytes in zip(layer_groups, state_bytes, strict=True)]
        attn = [k for k in kvs if isinstance(k, KVBlocks)]
        kv = attn[0]
        if any(k.dtype_name != self.fp.dtype or k.token_elems != self.fp.token_elems
               for k in attn):
            log.warning("s3kv: KV cache (%s, %d elements per token) differs from the model's "
                        "(%s, %d); cache disabled", kv.dtype_name, kv.token_elems,
                        self.fp.dtype, self.fp.token_elems)
            return
        self.kvs = kvs
        self.payload = PayloadLayout(kv.dtype_name, tuple(n for k in kvs for n in k.names),
                                     self.settings.chunk_tokens, kv.token_elems,
                                     groups=tuple(len(k.names) for k in kvs),
                                     state_bytes=tuple(k.slice_bytes if isinstance(
                                         k, StateBlocks) else 0 for k in kvs))
        if self.store is None:
            self.store = open_engine_store(self.settings, self.counters, self.io)
        if self.can_load and self.store is not None:
            self.loader.attach(kvs, self.payload, self.store)
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
        self.saver = Saver(kvs, self.payload, self.committer, self.tp_rank, self.heads,
                           self.uploads)

    # --- forward path ------------------------------------------------------------

    def wait_for_save(self, meta: S3KVMetadata) -> None:
        if self.saver is not None:
            self.saver.save(meta)

    def start_load_kv(self, meta: S3KVMetadata) -> None:
        self.loader.start(meta)

    # --- outcomes -------------------------------------------------------------------

    def get_finished(self) -> set[str]:
        return self.loader.finished()

    def take_load_errors(self) -> set[int]:
        """Blocks that failed to load. vLLM takes them only from an engine with
        one KV cache group (block ids repeat across groups); with several, a
        failed load fails its request (``take_failed_requests``)."""
        errors = self.loader.take_errors()
        return errors if len(self.groups) <= 1 else set()

    def take_failed_requests(self) -> set[str]:
        failed = self.loader.take_failed()
        return failed if len(self.groups) > 1 else set()

    def take_report(self) -> WorkerReport | None:
        """Commit outcomes (rank 0) and late loads since the last step."""
        committed: tuple[str, ...] = ()
        failed: tuple[str, ...] = ()
        if self.committer is not None:
            committed, failed = self.committer.take_outcomes()
        late = self.loader.take_late()
        bad = self.loader.take_bad()
        if not committed and not failed and not late and not bad:
            return None
        return WorkerReport(tuple(committed), tuple(failed), tuple(late), tuple(bad))

    def flush(self, timeout: float) -> bool:
        """Wait until every save submitted so far is committed (or failed) and
        every load started so far has finished. For shutdown and tests; never
        called on the forward path."""
        deadline = time.monotonic() + timeout
        if not self.loader.wait(deadline):
            return False
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
