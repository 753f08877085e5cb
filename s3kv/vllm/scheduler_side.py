"""Scheduler side: lookup, save planning and the per-step metadata.

Nothing here waits on S3. A lookup is started on the I/O loop and the
scheduler is told "ask again later" (``None``) until it finishes, up to
``load_timeout_s``; the hit manifests are kept and shipped to the workers,
which therefore never list or probe S3 themselves.

Save planning is also here, so that every TP rank gets exactly the same list
of chunks in the same round: the commit's gather relies on it.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from s3kv.admission import REQUEST_FLAG, AdmissionPolicy
from s3kv.aio import io_loop
from s3kv.config import Settings
from s3kv.errors import AlreadyExists, StoreError, Unavailable
from s3kv.keys import Fingerprint, KeyLayout, chunk_id
from s3kv.lookup import Breaker, LRUSet, TTLSet, find_committed_prefix
from s3kv.manifest import Manifest
from s3kv.stats import Counters
from s3kv.store import ObjectStore, open_store
from s3kv.vllm.metadata import LoadChunk, LoadRequest, S3KVMetadata, SaveChunk

log = logging.getLogger("s3kv.vllm")


@dataclass
class _Req:
    request: Any
    extra_base: dict[str, Any]
    chunk_ids: list[str] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    saved_upto: int = 0  # chunks [0, saved_upto) are planned, committed or skipped
    lookup: Future[list[Manifest]] | None = None
    lookup_started: float = 0.0
    hits: list[Manifest] = field(default_factory=list)
    hit_start_chunk: int = 0
    local_tokens: int = 0
    load_failed: bool = False
    cacheable: bool = True


class SchedulerSide:
    def __init__(
        self, settings: Settings, fingerprint: Fingerprint, block_size: int,
        can_load: bool, can_save: bool, counters: Counters,
    ) -> None:
        self.settings = settings
        self.fingerprint = fingerprint
        self.ns = fingerprint.namespace
        self.layout = KeyLayout(settings.store.prefix)
        self.block_size = block_size
        self.chunk_tokens = settings.chunk_tokens
        self.blocks_per_chunk = settings.chunk_tokens // block_size
        self.can_load = can_load
        self.can_save = can_save
        self.counters = counters
        self.io = io_loop()
        self.breaker = Breaker()
        # Opening a store performs no request (start-up may block; the scheduler
        # loop may not). The namespace write below is the first request.
        self._store: ObjectStore | None = None
        try:
            self._store = self.io.run(open_store(settings.store), timeout=60)
        except Exception as exc:  # missing credentials, bad endpoint: serve without cache
            log.warning("s3kv: cannot open the object store (%s: %s); serving without the cache",
                        type(exc).__name__, exc)
        if self._store is not None:
            self.io.submit(self._describe_namespace(self._store))
        self._reqs: dict[str, _Req] = {}
        self._pending_loads: dict[str, LoadRequest] = {}
        self._load_blocks: dict[int, tuple[str, str]] = {}  # block id -> (req id, chunk id)
        self._absent = TTLSet(settings.lookup_ttl_s)
        self._bad = TTLSet(max(60.0, settings.lookup_ttl_s))
        self._committed = LRUSet()
        self._planned = LRUSet()
        self._round = 0
        self.admission = AdmissionPolicy(settings.admission, settings.admission_window)

    async def _describe_namespace(self, store: ObjectStore) -> None:
        # Describe the namespace once (for `s3kv ls`); doubles as a start-up probe.
        try:
            await store.put(
                self.layout.namespace_doc(self.ns), self.fingerprint.document(),
                mode="create",
            )
            self.breaker.success()
        except AlreadyExists:
            self.breaker.success()
        except StoreError as exc:
            self.breaker.failure(exc)

    # --- lookup -----------------------------------------------------------------

    def _state(self, request: Any) -> _Req:
        st = self._reqs.get(request.request_id)
        if st is None:
            extra: dict[str, Any] = {}
            lora = getattr(request, "lora_request", None)
            if lora is not None:
                extra["lora"] = getattr(lora, "lora_name", None) or str(lora)
            salt = getattr(request, "cache_salt", None)
            if salt:
                extra["salt"] = salt
            st = _Req(request, extra)
            st.cacheable = getattr(request, "prompt_embeds", None) is None
            self._reqs[request.request_id] = st
        return st

    def _extra_for_chunk(self, st: _Req, end: int) -> dict[str, Any] | None:
        mm = [
            f.identifier for f in (getattr(st.request, "mm_features", None) or [])
            if f.mm_position.offset < end
        ]
        if not st.extra_base and not mm:
            return None
        extra = dict(st.extra_base)
        if mm:
            extra["mm"] = mm
        return extra

    def _chunk_ids(self, st: _Req, upto_tokens: int) -> list[str]:
        """Chunk ids for every full chunk within ``upto_tokens`` (cached, incremental)."""
        tokens = st.request.all_token_ids
        n = min(upto_tokens, len(tokens)) // self.chunk_tokens
        while len(st.chunk_ids) < n:
            i = len(st.chunk_ids)
            lo, hi = i * self.chunk_tokens, (i + 1) * self.chunk_tokens
            parent = st.chunk_ids[-1] if st.chunk_ids else None
            st.chunk_ids.append(chunk_id(parent, tokens[lo:hi], self._extra_for_chunk(st, hi)))
        return st.chunk_ids[:n]

    def get_num_new_matched_tokens(
        self, request: Any, num_computed: int
    ) -> tuple[int | None, bool]:
        st = self._state(request)
        st.local_tokens = num_computed
        if not self.can_load or st.load_failed or not st.cacheable or self._store is None:
            return 0, False
        # Leave at least one token to compute, and load whole blocks only.
        limit = (request.num_tokens - 1) // self.block_size * self.block_size
        # Chunks that straddle the limit still count: their blocks below it load.
        ids = self._chunk_ids(st, request.num_tokens)
        first = num_computed // self.chunk_tokens
        candidates = ids[first:]
        if not candidates or candidates[0] in self._bad:
            return self._miss(st)
        if candidates[0] in self._absent and candidates[0] not in self._planned:
            # Recently missing. A chunk this engine saved since is asked again.
            return self._miss(st)
        if st.lookup is None:
            if not self.breaker.allow():
                self.counters.add("lookups_skipped_store_down")
                return self._miss(st)
            st.lookup = self.io.submit(
                find_committed_prefix(self._store, self.layout, self.ns, candidates,
                                      num_heads=self.fingerprint.num_kv_heads)
            )
            st.lookup_started = time.monotonic()
            st.hit_start_chunk = first
            self.counters.add("lookups")
            return None, False
        if not st.lookup.done():
            if time.monotonic() - st.lookup_started > self.settings.load_timeout_s:
                st.lookup.cancel()
                st.lookup = None
                self.counters.add("lookup_timeouts")
                self.breaker.failure(Unavailable(
                    f"lookup took over load_timeout_s={self.settings.load_timeout_s:g}s"))
                return self._miss(st)
            return None, False
        try:
            hits = st.lookup.result()
            self.breaker.success()
        except Exception as exc:
            self.counters.add("lookup_errors")
            self.breaker.failure(exc)
            return self._miss(st)
        finally:
            st.lookup = None
        hits = [m for m in hits if m.chunk_id not in self._bad]
        miss_at = st.hit_start_chunk + len(hits)
        if miss_at < len(ids):
            self._absent.add(ids[miss_at])
        for m in hits:
            self._committed.add(m.chunk_id)
        end = min(miss_at * self.chunk_tokens, limit)
        new = end - num_computed
        if new <= 0:
            return self._miss(st)
        st.hits = hits
        self.counters.add("hit_chunks", len(hits))
        self.counters.add("hit_tokens", new)
        return new, True

    def _miss(self, st: _Req) -> tuple[int, bool]:
        st.hits = []
        self.counters.add("miss_requests")
        return 0, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external: int) -> None:
        st = self._reqs.get(request.request_id)
        if st is None or num_external <= 0 or not st.hits:
            return
        block_ids = list(blocks.get_block_ids()[0])
        first_block = st.local_tokens // self.block_size
        last_block = (st.local_tokens + num_external) // self.block_size
        per_chunk: dict[int, list[tuple[int, int]]] = {}
        for bi in range(first_block, last_block):
            ci = bi // self.blocks_per_chunk
            per_chunk.setdefault(ci, []).append((bi % self.blocks_per_chunk, block_ids[bi]))
        chunks = []
        for ci, pairs in sorted(per_chunk.items()):
            m = st.hits[ci - st.hit_start_chunk]
            chunks.append(LoadChunk(m, tuple(pairs)))
            for _, bid in pairs:
                self._load_blocks[bid] = (request.request_id, m.chunk_id)
        self._pending_loads[request.request_id] = LoadRequest(request.request_id, tuple(chunks))
        # Chunks being loaded are committed: never plan to save them again.
        st.saved_upto = max(st.saved_upto, st.hit_start_chunk + len(st.hits))
        st.hits = []

    # --- per-step metadata ------------------------------------------------------

    def build_connector_meta(self, so: Any) -> S3KVMetadata:
        meta = S3KVMetadata(loads=list(self._pending_loads.values()))
        self._pending_loads.clear()
        computed: dict[str, int] = {}
        for new in so.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is not None:
                st.block_ids = list(new.block_ids[0]) if new.block_ids else []
                computed[new.req_id] = new.num_computed_tokens
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                st.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                st.block_ids.extend(new_ids[0])
            computed[req_id] = cached.num_computed_tokens[i]
        if self.can_save and self._store is not None:
            for req_id, before in computed.items():
                self._plan_saves(req_id, before + so.num_scheduled_tokens.get(req_id, 0), meta)
        if meta.saves:
            meta.round_id = self._round
            self._round += 1
            self.counters.add("planned_chunks", len(meta.saves))
        return meta

    def _plan_saves(self, req_id: str, computed_after: int, meta: S3KVMetadata) -> None:
        st = self._reqs[req_id]
        if not st.cacheable:
            return
        ids = self._chunk_ids(st, computed_after)
        for ci in range(st.saved_upto, len(ids)):
            cid = ids[ci]
            blocks = st.block_ids[ci * self.blocks_per_chunk : (ci + 1) * self.blocks_per_chunk]
            if len(blocks) < self.blocks_per_chunk:
                break
            st.saved_upto = ci + 1
            if cid in self._committed or cid in self._planned:
                continue
            if not self.admission.admit(cid, _requested(st.request)):
                self.counters.add("admission_skipped")
                continue
            self._planned.add(cid)
            meta.saves.append(
                SaveChunk(cid, ids[ci - 1] if ci else None, ci, self.chunk_tokens, tuple(blocks))
            )

    # --- outcomes ---------------------------------------------------------------

    def update_connector_output(self, output: Any) -> None:
        failed_blocks = getattr(output, "invalid_block_ids", None) or set()
        failed_reqs = set(getattr(output, "failed_recving", None) or ())
        for bid in failed_blocks:
            owner = self._load_blocks.get(bid)
            if owner is not None:
                failed_reqs.add(owner[0])
                self._bad.add(owner[1])
        for req_id in failed_reqs:
            st = self._reqs.get(req_id)
            if st is not None:
                # Remember: vLLM asks again after a failed load, and a second
                # offer of the same blocks would loop forever.
                st.load_failed = True
                self.counters.add("failed_loads")
        for req_id in getattr(output, "finished_recving", None) or ():
            self._forget_load_blocks(req_id)

    def _forget_load_blocks(self, req_id: str) -> None:
        for bid in [b for b, (r, _) in self._load_blocks.items() if r == req_id]:
            del self._load_blocks[bid]

    def request_finished(self, request: Any) -> None:
        st = self._reqs.pop(request.request_id, None)
        if st is not None and st.lookup is not None:
            st.lookup.cancel()
        self._pending_loads.pop(request.request_id, None)
        self._forget_load_blocks(request.request_id)


def _requested(request: Any) -> bool:
    params = getattr(request, "kv_transfer_params", None) or {}
    return bool(params.get(REQUEST_FLAG))
