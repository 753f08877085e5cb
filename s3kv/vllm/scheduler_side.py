"""Scheduler side: vLLM's requests and steps, translated for the cache index.

This module only speaks vLLM (the index opens the store and makes every
decision about it): it turns requests into chains of chunk ids,
vLLM's block ids into load and save plans, and steps into the per-step
metadata every worker gets. What is cached, what to save and how long to
wait are the index's decisions (:mod:`s3kv.index`). Nothing here waits on
S3: a lookup answers "ask again later" (``None``) until the index has an
answer, and the hit manifests are shipped to the workers, which therefore
never list or probe S3 themselves.

Save planning is also here, so that every TP rank gets exactly the same list
of chunks in the same round: the commit's gather relies on it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from s3kv.admission import REQUEST_FLAG
from s3kv.config import Settings
from s3kv.groups import (
    Checkpoints,
    GroupSpec,
    covered,
    held_start,
    state_stored,
    store_start,
)
from s3kv.index import CacheIndex
from s3kv.keys import ChunkRef, Fingerprint, chunk_id
from s3kv.manifest import Manifest
from s3kv.stats import Counters
from s3kv.vllm.metadata import LoadChunk, LoadRequest, S3KVMetadata, SaveChunk, WorkerReport
from s3kv.vllm.namespace import lora_identity

# vLLM's placeholder in a window group's block table for a block it freed or
# never allocated (``vllm.v1.attention.backends.utils.NULL_BLOCK_ID``); this
# module does not import vLLM, so tests can drive it without an engine.
NULL_BLOCK_ID = 0

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("s3kv.vllm")


@dataclass
class _Req:
    request: Request
    extra_base: dict[str, Any]
    chunk_ids: list[str] = field(default_factory=list)
    block_ids: list[list[int]] = field(default_factory=list)  # per KV cache group
    saved_upto: int = 0  # chunks [0, saved_upto) are planned, committed or skipped
    computed_chunks: int = 0  # full chunks computed so far (for the save accounting)
    hits: tuple[Manifest, ...] = ()
    hit_start_chunk: int = 0
    local_tokens: int = 0
    load_failed: bool = False
    cacheable: bool = True


class SchedulerSide:
    def __init__(
        self, settings: Settings, fingerprint: Fingerprint, block_size: int,
        can_load: bool, can_save: bool, counters: Counters, index: CacheIndex | None = None,
        groups: tuple[GroupSpec, ...] = (), checkpoints: Checkpoints | None = None,
    ) -> None:
        self.settings = settings
        # Where vLLM's Mamba groups also write a state inside a step (s3kv.groups).
        self.checkpoints = checkpoints
        # vLLM's KV cache groups (s3kv.vllm.hybrid); empty: one group of every layer.
        self.groups = groups or (GroupSpec("full", ("*",)),)
        self._windowed = any(g.kind == "window" for g in self.groups)
        self._states = [g for g, spec in enumerate(self.groups) if spec.kind == "state"]
        self.fingerprint = fingerprint
        self.block_size = block_size
        self.chunk_tokens = settings.chunk_tokens
        self.blocks_per_chunk = settings.chunk_tokens // block_size
        self.can_load = can_load
        self.can_save = can_save
        self.counters = counters
        # An index built by the caller (tests: a store and clock they control),
        # or one over the configured store.
        self.index = index or CacheIndex.open(settings, fingerprint, counters)
        self._reqs: dict[str, _Req] = {}
        self._pending_loads: dict[str, LoadRequest] = {}
        self._load_blocks: dict[int, str] = {}  # block id -> the request loading into it
        self._round = 0
        # (when built, tokens scheduled) of steps whose output has not come back.
        self._steps: deque[tuple[float, int]] = deque()
        self._last_step_done = 0.0

    # --- lookup -----------------------------------------------------------------

    def _state(self, request: Request) -> _Req:
        st = self._reqs.get(request.request_id)
        if st is None:
            extra: dict[str, Any] = {}
            # An adapter changes the KV: its chunks are keyed by the adapter's
            # content (never its name, which can be reused for other weights);
            # an adapter whose files cannot be read is not cached at all.
            lora_ok = True
            lora = getattr(request, "lora_request", None)
            if lora is not None:
                ident = lora_identity(lora)
                lora_ok = ident is not None
                if ident is not None:
                    extra["lora"] = ident
            salt = getattr(request, "cache_salt", None)
            if salt:
                extra["salt"] = salt
            st = _Req(request, extra)
            st.cacheable = getattr(request, "prompt_embeds", None) is None and lora_ok
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
        self, request: Request, num_computed: int
    ) -> tuple[int | None, bool]:
        st = self._state(request)
        st.local_tokens = num_computed
        if not self.can_load or st.load_failed or not st.cacheable or not self.index.available:
            return 0, False
        # Leave at least one token to compute, and load whole blocks only.
        limit = (request.num_tokens - 1) // self.block_size * self.block_size
        # Chunks that straddle the limit still count: their blocks below it load.
        ids = self._chunk_ids(st, request.num_tokens)
        first = num_computed // self.chunk_tokens
        hits = self.index.lookup(request.request_id, ids[first:])
        if hits is None:
            return None, False
        hits = self._aligned(request.request_id, hits, ids, first)
        end = min((first + len(hits)) * self.chunk_tokens, limit)
        if self._windowed or self._states:
            end = self._hit_end(hits, first, num_computed, end)
        new = end - num_computed
        if new <= 0:
            return self._miss(st)
        st.hits = hits
        st.hit_start_chunk = first
        self.counters.add("hit_chunks", len(hits))
        self.counters.add("hit_tokens", new)
        return new, True

    def _aligned(self, req_id: str, hits: tuple[Manifest, ...], ids: list[str], first: int
                 ) -> tuple[Manifest, ...]:
        """``hits`` up to the first whose chunk id is not the id of the chunk
        whose blocks it would fill.

        The index answers for exactly the candidates it is given, so this never
        cuts anything; it stands between any future slip and a wrong token,
        and the counter says whether it ever had to."""
        for i, m in enumerate(hits):
            if m.chunk_id != ids[first + i]:
                self.counters.add("hit_misalignments", len(hits) - i)
                log.error("s3kv: request %s: hit chunk %d is %s, expected %s; "
                          "loading only the %d chunks before it (please report)",
                          req_id, first + i, m.chunk_id[:12], ids[first + i][:12], i)
                return hits[:i]
        return hits

    def _hit_end(self, hits: tuple[Manifest, ...], first: int, local: int, end: int) -> int:
        """The longest hit end, up to ``end``, at which the hits hold every block
        the window groups still need and, with state groups, the state there
        (only at the end of a chunk that stored it, ``s3kv.groups``); ``local``
        if there is none."""
        n, c = len(self.groups), self.chunk_tokens
        starts = [m.starts if len(m.starts) == n else (c,) * n for m in hits]
        ends = [end] + [k * c for k in range(first + len(hits), first, -1) if k * c < end]
        found, short_state, short_window = local, False, False
        for e in ends:
            if e <= local:
                break
            if self._states and (e % c or any(starts[e // c - 1 - first][g]
                                              for g in self._states)):
                short_state = True
            elif self._windowed and not covered(self.groups, starts, first, local, e, c,
                                                self.block_size):
                short_window = True
            else:
                found = e
                break
        # Once per request, for each reason it was cut.
        if short_state:
            self.counters.add("state_short_hits")
        if short_window:
            self.counters.add("window_short_hits")
        return found

    def _miss(self, st: _Req) -> tuple[int, bool]:
        st.hits = ()
        self.counters.add("miss_requests")
        return 0, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external: int) -> None:
        st = self._reqs.get(request.request_id)
        if st is None or num_external <= 0 or not st.hits:
            return
        group_ids = blocks.get_block_ids()
        first_block = st.local_tokens // self.block_size
        last_block = (st.local_tokens + num_external) // self.block_size
        bpc = self.blocks_per_chunk
        # Each chunk's blocks get the manifest whose chunk id is that chunk's;
        # from the first chunk without one (or whose window section lacks a
        # block vLLM kept), the blocks are refused (vLLM recomputes them)
        # rather than filled with another chunk's KV.
        hits = {m.chunk_id: m for m in st.hits}
        chunks: list[LoadChunk] = []
        refused: list[int] = []
        for ci in range(first_block // bpc, (last_block + bpc - 1) // bpc):
            lo, hi = max(first_block, ci * bpc), min(last_block, (ci + 1) * bpc)
            m = hits.get(st.chunk_ids[ci]) if ci < len(st.chunk_ids) else None
            pairs = (self._chunk_pairs(group_ids, m, lo, hi, hi == last_block)
                     if m is not None else None)
            if m is None or pairs is None or refused:
                if not refused:
                    self.counters.add("hit_misalignments", 1)
                    log.error("s3kv: request %s: no usable hit manifest for chunk %d; "
                              "recomputing from it (please report)", request.request_id, ci)
                refused.extend(b for ids in group_ids for b in ids[lo:hi] if b != NULL_BLOCK_ID)
                continue
            chunks.append(LoadChunk(m, pairs))
            if len(self.groups) == 1:
                for _, bid in pairs[0]:
                    self._load_blocks[bid] = request.request_id
        deadline = self.index.prepare_load(request.request_id, num_external,
                                           [c.manifest for c in chunks])
        self._pending_loads[request.request_id] = LoadRequest(
            request.request_id, tuple(chunks), deadline_s=deadline,
            refused_blocks=tuple(refused))
        st.saved_upto = max(st.saved_upto, st.hit_start_chunk + len(st.hits))
        st.hits = ()

    def _chunk_pairs(self, group_ids: tuple[list[int], ...], m: Manifest, lo: int, hi: int,
                     last: bool) -> tuple[tuple[tuple[int, int], ...], ...] | None:
        """Per group, (offset in the chunk, block id) of blocks ``[lo, hi)`` to
        fill from ``m``; None if a block vLLM kept lies before its section.

        A state group fills one block, in the hit's ``last`` chunk: the block
        vLLM allocated for the state at the hit's end (every earlier one is
        a null block in "align" mode)."""
        n = len(self.groups)
        if len(group_ids) != n or (n > 1 and len(m.starts) != n):
            return None
        out: list[tuple[tuple[int, int], ...]] = []
        for g, spec in enumerate(self.groups):
            start = m.starts[g] if n > 1 else 0
            if spec.kind == "state":
                if not last:
                    out.append(())
                    continue
                bid = group_ids[g][hi - 1] if hi - 1 < len(group_ids[g]) else NULL_BLOCK_ID
                if start or hi % self.blocks_per_chunk or bid == NULL_BLOCK_ID:
                    return None
                out.append(((self.blocks_per_chunk - 1, bid),))
                continue
            pairs = []
            for bi in range(lo, hi):
                bid = group_ids[g][bi]
                if spec.kind == "window" and bid == NULL_BLOCK_ID:
                    continue  # outside the window at the hit's end: nothing to load
                off = bi % self.blocks_per_chunk
                if off * self.block_size < start:
                    return None
                pairs.append((off, bid))
            out.append(tuple(pairs))
        return tuple(out)

    # --- per-step metadata ------------------------------------------------------

    def build_connector_meta(self, so: SchedulerOutput) -> S3KVMetadata:
        self._steps.append((time.monotonic(), so.total_num_scheduled_tokens))
        meta = S3KVMetadata(loads=list(self._pending_loads.values()))
        self._pending_loads.clear()
        computed: dict[str, int] = {}
        for new in so.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is not None:
                st.block_ids = [list(ids) for ids in new.block_ids or ()]
                computed[new.req_id] = new.num_computed_tokens
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                st.block_ids = [list(ids) for ids in new_ids or ()]
            elif new_ids:
                if len(st.block_ids) < len(new_ids):
                    st.block_ids += [[] for _ in range(len(new_ids) - len(st.block_ids))]
                for row, ids in zip(st.block_ids, new_ids, strict=False):
                    row.extend(ids)
            computed[req_id] = cached.num_computed_tokens[i]
        # While the store is down, saves wait where they are (saved_upto does not
        # move): a request still running when it is back saves them then.
        if self.can_save and self.index.available and self.index.saves_allowed():
            for req_id, before in computed.items():
                self._plan_saves(req_id, before,
                                 before + so.num_scheduled_tokens.get(req_id, 0), meta)
        if meta.saves:
            meta.round_id = self._round
            self._round += 1
            self.counters.add("planned_chunks", len(meta.saves))
        return meta

    def _plan_saves(self, req_id: str, computed_before: int, computed_after: int,
                    meta: S3KVMetadata) -> None:
        st = self._reqs[req_id]
        if not st.cacheable:
            return
        ids = self._chunk_ids(st, computed_after)
        st.computed_chunks = max(st.computed_chunks, len(ids))
        for ci in range(st.saved_upto, len(ids)):
            cid = ids[ci]
            stored = self._stored_blocks(st, ci, computed_before, computed_after)
            if stored is None:
                break
            st.saved_upto = ci + 1
            if not self.index.prepare_store(cid, _requested(st.request)):
                continue
            ref = ChunkRef(cid, ids[ci - 1] if ci else None, ci, self.chunk_tokens)
            blocks, starts = stored
            meta.saves.append(SaveChunk(ref, blocks, starts if len(self.groups) > 1 else ()))

    def _stored_blocks(self, st: _Req, ci: int, computed_before: int, computed_after: int
                       ) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...]] | None:
        """Per group, the blocks of chunk ``ci`` to store and the token they start
        at; None while the chunk's blocks are not all allocated yet.

        A window group stores the chunk's last blocks from ``store_start`` on,
        and only those the request still holds: a block vLLM freed during this
        step may already hold another request's KV (``s3kv.groups``). A state
        group stores the block holding the state at the chunk's end if this
        step wrote it (``state_stored``), else nothing (start at the end)."""
        bpc, bs = self.blocks_per_chunk, self.block_size
        if len(st.block_ids) != len(self.groups):
            return None
        blocks_out: list[tuple[int, ...]] = []
        starts: list[int] = []
        for g, spec in enumerate(self.groups):
            if spec.kind == "state":
                row = st.block_ids[g]
                last = (ci + 1) * bpc - 1
                bid = row[last] if last < len(row) else NULL_BLOCK_ID
                if bid != NULL_BLOCK_ID and self._state_wanted(st, ci) and state_stored(
                        ci, self.chunk_tokens, computed_before, computed_after, bs,
                        self.checkpoints):
                    blocks_out.append((bid,))
                    starts.append(0)
                else:
                    blocks_out.append(())
                    starts.append(self.chunk_tokens)
                continue
            blocks = st.block_ids[g][ci * bpc : (ci + 1) * bpc]
            if len(blocks) < bpc:
                return None
            first = 0
            if spec.kind == "window":
                first = max(store_start(spec.window, self.chunk_tokens, bs),
                            held_start(spec.window, computed_before, ci, self.chunk_tokens,
                                       bs)) // bs
                nulls = [k for k in range(first, bpc) if blocks[k] == NULL_BLOCK_ID]
                first = max([first, *(k + 1 for k in nulls)])
            elif NULL_BLOCK_ID in blocks and len(self.groups) > 1:
                return None  # a full group never frees blocks; do not guess
            blocks_out.append(tuple(blocks[first:]))
            starts.append(first * bs)
        return tuple(blocks_out), tuple(starts)

    def _state_wanted(self, st: _Req, ci: int) -> bool:
        """Whether chunk ``ci`` should carry its SSM state (``ssm_states``): with
        ``prompt_end`` only the last chunk a repeat of the prompt resumes at,
        the one ending at or before vLLM's checkpoint of the prompt (its last
        block boundary before the last token); with ``all`` every chunk."""
        if self.settings.ssm_states == "all":
            return True
        prompt = int(getattr(st.request, "num_prompt_tokens", 0))
        checkpoint = max(0, (prompt - 1) // self.block_size * self.block_size)
        return (ci + 1) * self.chunk_tokens == checkpoint // self.chunk_tokens * self.chunk_tokens

    # --- outcomes ---------------------------------------------------------------

    def step_done(self) -> None:
        """A step's output is in: time it, for the recompute estimate.

        The time attributed to a step runs from when it was scheduled, or
        from the previous step's output if that came later (a step queued
        behind another is not running)."""
        now = time.monotonic()
        if self._steps:
            built, tokens = self._steps.popleft()
            self.index.step_done(tokens, now - max(built, self._last_step_done))
        self._last_step_done = now

    def update_connector_output(self, output: KVConnectorOutput) -> None:
        report = getattr(output, "kv_connector_worker_meta", None)
        if isinstance(report, WorkerReport):
            for cid in report.committed:
                self.index.complete_store(cid, ok=True)
            for cid in report.failed:
                self.index.complete_store(cid, ok=False)
            # The workers name the chunks that failed to load other than by
            # their deadline (slow is not damaged: those are offered again),
            # with one KV cache group or several alike.
            for cid in report.bad_loads:
                self.index.mark_bad(cid)
        failed_blocks = getattr(output, "invalid_block_ids", None) or set()
        failed_reqs = set(getattr(output, "failed_recving", None) or ())
        for bid in failed_blocks:
            owner = self._load_blocks.get(bid)
            if owner is not None:
                failed_reqs.add(owner)
        for req_id in failed_reqs:
            st = self._reqs.get(req_id)
            if st is not None:
                # Remember: vLLM asks again after a failed load, and a second
                # offer of the same blocks would loop forever.
                st.load_failed = True
                self.counters.add("failed_loads")
                # vLLM recomputes the blocks that did not load: offer the
                # chunks for saving again once they are computed. The index
                # skips those it knows are committed; a chunk marked bad (its
                # objects gone after GC, or damaged) is saved anew.
                st.saved_upto = min(st.saved_upto, st.hit_start_chunk)
        for req_id in getattr(output, "finished_recving", None) or ():
            self.index.complete_load(req_id, ok=req_id not in failed_reqs)
            self._forget_load_blocks(req_id)

    def _forget_load_blocks(self, req_id: str) -> None:
        for bid in [b for b, r in self._load_blocks.items() if r == req_id]:
            del self._load_blocks[bid]

    def request_finished(self, request: Request) -> None:
        st = self._reqs.pop(request.request_id, None)
        if st is not None and st.cacheable and st.computed_chunks > st.saved_upto:
            # Full chunks never planned: the store was down while this request ran.
            self.counters.add("saves_skipped_store_down", st.computed_chunks - st.saved_upto)
        self.index.forget(request.request_id)
        self._pending_loads.pop(request.request_id, None)
        self._forget_load_blocks(request.request_id)


def _requested(request: Request) -> bool:
    params = getattr(request, "kv_transfer_params", None) or {}
    return bool(params.get(REQUEST_FLAG))
