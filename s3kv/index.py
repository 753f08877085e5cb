"""The scheduler's view of the store: what is committed, what to save, how long to wait.

This is the cache policy, kept apart from vLLM's bookkeeping (which lives in
``s3kv.vllm.scheduler_side`` and only translates vLLM's objects). Its
interface is small, never blocks, and comes in pairs like vLLM's
``OffloadingManager``'s:

* :meth:`CacheIndex.lookup` answers a request's chain of chunk ids with the
  committed prefix (:data:`Hits`; empty for a miss) or ``None``: ask again
  next step; :meth:`CacheIndex.forget` ends a request's lookups. Each
  lookup has a deadline from :mod:`s3kv.deadlines`, restarted by every round
  that finds committed chunks; when it passes, the prefix found so far is
  the answer and the lookup finishes in the background, warming the caches
  for the next request.
* :meth:`CacheIndex.prepare_load` / :meth:`CacheIndex.complete_load` bracket
  a request's loads: the first gives the loads' deadline (and records the
  chunks as committed), the second feeds the transfer-time estimate. A
  failed load costs its request only: it is never evidence of an outage
  (the time it took includes engine steps and queueing; a 404 after GC is
  an answer).
* :meth:`CacheIndex.prepare_store` decides whether a chunk is worth saving, and
  :meth:`CacheIndex.complete_store` closes that plan with the commit's
  outcome: a chunk whose save was dropped or failed is planned again the
  next time it is computed, and a chunk found missing (GC) is saved again.

The breaker (:mod:`s3kv.breaker`) hears every answer the store gives and
every lookup that went unanswered; one late answer never turns the cache off.

Saves also need the server to honour create-only puts (If-None-Match): a
commit is one manifest written create-only, and a server that overwrites
instead would let two engines committing one chunk replace each other's
manifest. The start-up request (in the background, never on the
scheduler's thread) checks it once with a probe object; where the server
overwrites, :meth:`CacheIndex.saves_allowed` stays False for the engine's
life, with one error in the log. Lookups and loads go on: reading is safe.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

from s3kv.admission import AdmissionPolicy
from s3kv.aio import Submitter, io_loop
from s3kv.breaker import Breaker
from s3kv.config import Settings
from s3kv.deadlines import Deadlines
from s3kv.errors import AlreadyExists, ConditionalConflict, StoreError, Unavailable
from s3kv.keys import Fingerprint, KeyLayout
from s3kv.lookup import BoundedCache, LRUSet, TTLSet, find_committed_prefix
from s3kv.manifest import Manifest
from s3kv.stats import Counters
from s3kv.store import ObjectStore
from s3kv.store.engine import open_engine_store

log = logging.getLogger("s3kv.index")

#: A lookup's answer: the manifests of the committed prefix of the chunk ids
#: asked for, in order (``answer[i]`` is the manifest of ``candidates[i]``).
Hits = tuple[Manifest, ...]

# A committed manifest never changes (it is written with If-None-Match); it
# can only disappear (GC), and then the load fails verification and the
# tokens are recomputed. Remembering manifests for a few minutes lets a
# repeated prefix skip its lookup round trips.
_MANIFEST_TTL_S = 300.0
_MANIFEST_CACHE_ITEMS = 20_000
# A planned save whose outcome never comes back (a worker that died, an
# outcome lost) may be planned again after this long past the commit timeout.
_PLAN_GRACE_S = 60.0
_MAX_PLANNED = 200_000


@dataclass
class _Pending:
    future: Future[list[Manifest]]
    fetching: list[str]  # the candidates asked of the store (after the cached prefix)
    started: float
    wait: float  # allowed without progress (s3kv.deadlines)
    deadline: float
    progress: list[Manifest] = field(default_factory=list)
    seen: int = 0  # len(progress) at the last look


@dataclass
class _Load:
    started: float
    deadline_s: float
    tokens: int
    nbytes: int


class CacheIndex:
    def __init__(self, settings: Settings, fingerprint: Fingerprint, counters: Counters,
                 store: ObjectStore | None, io: Submitter,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``clock`` times lookups, loads, save plans and how long a manifest
        once found is trusted without asking the bucket again (a test can
        make time pass at will)."""
        self.settings = settings
        self.fingerprint = fingerprint
        self.ns = fingerprint.namespace
        self.layout = KeyLayout(settings.store.prefix)
        self.counters = counters
        self.store = store
        self.io = io
        # Deadlines are read from this clock: a test can make one pass at will.
        self._clock = clock
        self.deadlines = Deadlines(settings)
        self.breaker = Breaker(
            probe=self._probe, io=io, probe_interval_s=settings.probe_interval_s,
            probe_timeout_s=self.deadlines.probe_s, stall_s=self.deadlines.stall_s,
            counters=counters, clock=clock,
        )
        self.admission = AdmissionPolicy(settings.admission, settings.admission_window)
        self._absent = TTLSet(settings.lookup_ttl_s)
        self._bad = TTLSet(max(60.0, settings.lookup_ttl_s))
        self._committed = LRUSet()
        # Chunks being saved (chunk id -> when planned), until store_finished.
        self._planned: OrderedDict[str, float] = OrderedDict()
        self._plan_ttl = settings.commit_timeout_s + _PLAN_GRACE_S
        self._manifests: BoundedCache[Manifest] = BoundedCache(_MANIFEST_CACHE_ITEMS,
                                                             _MANIFEST_TTL_S, clock)
        self._pending: dict[str, _Pending] = {}
        # Lookups that outlived their deadline, finished on the I/O thread;
        # drained on the scheduler's thread, which owns every set above.
        self._late: deque[tuple[list[str], Future[list[Manifest]]]] = deque()
        self._running_late = 0
        self._loads: dict[str, _Load] = {}
        self._started: Future[None] | None = None
        if store is not None:
            # Awaited only by wait_started, and for a bounded time.
            self._started = io.submit(self._describe_namespace(store))

    @classmethod
    def open(cls, settings: Settings, fingerprint: Fingerprint, counters: Counters
             ) -> CacheIndex:
        """The index over the configured store, for an engine's scheduler: waits
        for the store's first answer at most ``min_load_wait_s`` (start-up may
        block; the scheduler loop may not), and serves without it after that."""
        io = io_loop()
        store = open_engine_store(settings, counters, io)
        index = cls(settings, fingerprint, counters, store, io)
        if not index.wait_started(settings.min_load_wait_s) and store is not None:
            log.info("s3kv: the object store did not answer within %.1fs at start-up; "
                     "serving starts anyway", settings.min_load_wait_s)
        return index

    def wait_started(self, timeout_s: float) -> bool:
        """Give the start-up requests (the namespace document's write, the probe
        of create-only puts, the read-back) up to ``timeout_s`` to answer.

        Called once while the engine starts, never while serving: a store
        that answers gives the first latency sample before the first request
        (an engine can take its first request within milliseconds of building
        its scheduler), so that request's lookup already waits what this store
        takes; one that does not answer costs start-up that long, once."""
        if self._started is None:
            return False
        try:
            self._started.result(timeout_s)
        except Exception:  # timed out; errors went to the breaker
            return False
        return True

    @property
    def available(self) -> bool:
        return self.store is not None

    # --- the store's health -------------------------------------------------------

    async def _describe_namespace(self, store: ObjectStore) -> None:
        # Describe the namespace once (for `s3kv ls`); doubles as a start-up probe,
        # and as the check that the server honours create-only puts (saves
        # depend on it). Then read the document back: on the connection the
        # writes set up, that GET is what a lookup round costs, the first
        # latency sample, so an engine's first lookups wait what this store
        # takes (s3kv.deadlines), not the connection set-up nor the start-up's
        # busy CPU.
        doc = self.layout.namespace_doc(self.ns)
        body = self.fingerprint.document()
        try:
            try:
                await store.put(doc, body, mode="create")
            except AlreadyExists:
                pass  # there already, and the server said so: the condition holds
            else:
                await self._check_conditional_create(store, doc, body)
            self.breaker.answered()
            t0 = time.monotonic()
            await store.get(doc)
        except StoreError as exc:
            self.breaker.failure(exc)
            return
        self.deadlines.observe_round(time.monotonic() - t0)
        self.breaker.answered()

    async def _check_conditional_create(self, store: ObjectStore, doc: str,
                                        body: bytes) -> None:
        """The namespace document was just created (or a server that ignores
        If-None-Match overwrote it): PUT it create-only once more, which must
        fail. Where it succeeds, ``store.capabilities.conditional_create``
        becomes False and this engine saves nothing. The document's bytes
        are the fingerprint's, the same on every engine of the namespace, so
        the check leaves the bucket as it was and needs no delete."""
        try:
            await store.put(doc, body, mode="create")
        except (AlreadyExists, ConditionalConflict):  # 412, or 409: raced another engine
            return
        store.capabilities = replace(store.capabilities, conditional_create=False)
        endpoint = self.settings.store.endpoint_url or "the default AWS S3 endpoint"
        log.error(
            "s3kv: the object store at %s (bucket %r) ignores If-None-Match: a create-only "
            "PUT of %s, which exists, succeeded where it must fail with 412 Precondition "
            "Failed. Two engines committing one chunk could then overwrite each other's "
            "manifest, so this engine saves NOTHING for its whole life; lookups and loads "
            "go on. Use a server that honours conditional writes (`s3kv doctor` checks it).",
            endpoint, store.bucket, doc)

    async def _probe(self) -> object:
        if self.store is None:
            raise Unavailable("no object store")
        return await self.store.get(self.layout.namespace_doc(self.ns))

    # --- lookup ---------------------------------------------------------------------

    def lookup(self, req_id: str, candidates: Sequence[str]) -> Hits | None:
        """The committed prefix of ``candidates`` (empty: a miss), or None: ask again.

        ``req_id`` names the asker (a request) across calls. The answer is always
        for the ``candidates`` of *this* call, matched by chunk id: between a
        lookup's start and its answer vLLM may ask with another candidate list
        (its local prefix-cache hit grew), and a chunk may have been marked
        bad. The answer ends at the first chunk that is not known committed
        or is bad, so answer ``i`` is always the manifest of ``candidates[i]``.
        """
        self._drain_late()
        pending = self._pending.get(req_id)
        if pending is None:
            known = self._cached_prefix(candidates)
            if len(known) == len(candidates) or self._known_missing(candidates[len(known)]):
                return known
            if self.store is None:
                return known
            if not self.breaker.allow():
                self.counters.add("lookups_skipped_store_down")
                return known
            self._start(req_id, list(candidates[len(known):]))
            return None
        now = self._clock()
        if not pending.future.done():
            if len(pending.progress) > pending.seen:
                # A round found committed chunks: the store is answering.
                pending.seen = len(pending.progress)
                pending.deadline = now + pending.wait
            if now < pending.deadline:
                return None
            return self._give_up(req_id, pending, now, candidates)
        del self._pending[req_id]
        self.counters.add("cache_wait_seconds", now - pending.started)
        try:
            found = pending.future.result()
        except Exception as exc:
            self.counters.add("lookup_errors")
            self.breaker.failure(exc)
            return self._cached_prefix(candidates)
        self._learn(pending.fetching, found)
        return self._answer(candidates, found)

    def _answer(self, candidates: Sequence[str], found: Sequence[Manifest]
                ) -> Hits:
        """The committed prefix of ``candidates``, from a lookup's findings and
        the manifest cache, ending at the first unknown or bad chunk."""
        by_id = {m.chunk_id: m for m in found}
        out = []
        for cid in candidates:
            m = by_id.get(cid) or self._manifests.get(cid)
            if m is None or cid in self._bad:
                break
            out.append(m)
        return tuple(out)

    def _start(self, req_id: str, fetching: list[str]) -> None:
        store = self.store
        if store is None:
            return
        wait = self.deadlines.lookup_s(len(fetching) * self.settings.chunk_tokens)
        now = self._clock()
        progress: list[Manifest] = []
        future = self.io.submit(find_committed_prefix(
            store, self.layout, self.ns, fetching, num_heads=self.fingerprint.num_kv_heads,
            progress=progress, on_round=self._on_round,
        ))
        self._pending[req_id] = _Pending(future, fetching, now, wait, now + wait, progress)
        self.counters.add("lookups")

    def _on_round(self, seconds: float) -> None:
        # On the I/O thread: a round the store answered (404s included).
        self.deadlines.observe_round(seconds)
        self.breaker.answered()

    def _give_up(self, req_id: str, pending: _Pending, now: float, candidates: Sequence[str]
                 ) -> Hits:
        """The deadline passed: answer with what is known, let the lookup finish alone."""
        del self._pending[req_id]
        self.counters.add("cache_wait_seconds", now - pending.started)
        found = list(pending.progress)  # whole rounds only: a committed prefix
        fetching = pending.fetching
        self._running_late += 1
        pending.future.add_done_callback(lambda f: self._late.append((fetching, f)))
        if found:
            self.counters.add("lookups_truncated")
        else:
            # Not one round trip answered in the time a recompute can afford:
            # this request goes on without the cache. One such miss is a tail;
            # the breaker decides whether many of them are an outage.
            self.counters.add("lookup_deadline_misses")
            self.breaker.missed(f"no answer within the lookup's {pending.wait:.3f}s deadline")
        for m in found:
            self._committed.add(m.chunk_id)
            self._manifests.put(m.chunk_id, m)
        return self._answer(candidates, found)

    def _cached_prefix(self, candidates: Sequence[str]) -> Hits:
        return self._answer(candidates, ())

    def _known_missing(self, cid: str) -> bool:
        # Recently missing; a chunk this engine has planned to save since is asked again.
        return cid in self._bad or (cid in self._absent and not self._is_planned(cid))

    def _learn(self, fetching: list[str], found: list[Manifest]) -> None:
        for m in found:
            self._committed.add(m.chunk_id)
            self._manifests.put(m.chunk_id, m)
        if len(found) < len(fetching):
            missing = fetching[len(found)]
            self._absent.add(missing)
            # Committed once, gone now (GC, a lifecycle rule): save it again.
            self._committed.discard(missing)
            self._manifests.discard(missing)

    def _drain_late(self) -> None:
        while self._late:
            fetching, future = self._late.popleft()
            self._running_late -= 1
            if future.cancelled():
                continue
            exc = future.exception()
            if exc is not None:
                # The store failed the request in the end (client timeout,
                # refused): that is evidence, where the missed deadline was not.
                self.counters.add("lookup_errors")
                self.breaker.failure(exc)
                continue
            self._learn(fetching, future.result())

    @property
    def background_lookups(self) -> int:
        """Lookups past their deadline whose answers have not been taken in yet."""
        self._drain_late()
        return self._running_late

    def forget(self, req_id: str) -> None:
        """The asker is gone (request finished or aborted)."""
        pending = self._pending.pop(req_id, None)
        if pending is not None:
            pending.future.cancel()
        self._loads.pop(req_id, None)

    # --- loads ------------------------------------------------------------------------

    def prepare_load(self, req_id: str, tokens: int, manifests: Sequence[Manifest]) -> float:
        """A request is about to load ``manifests`` (``tokens`` tokens); returns how
        long the loads may take (seconds). :meth:`complete_load` closes it.

        The chunks are committed (their manifests were just read): never plan
        to save them, unless a failed load marks them bad."""
        nbytes = sum(s.size for m in manifests for s in m.shards)
        wait = self.deadlines.load_s(tokens, nbytes)
        self._loads[req_id] = _Load(self._clock(), wait, tokens, nbytes)
        for m in manifests:
            self._committed.add(m.chunk_id)
        return wait

    def complete_load(self, req_id: str, ok: bool, *, now: float | None = None) -> None:
        """A request's loads ended (``ok``: every chunk loaded): feeds the
        transfer-time estimate."""
        load = self._loads.pop(req_id, None)
        if load is None:
            return
        elapsed = (self._clock() if now is None else now) - load.started
        self.counters.add("cache_wait_seconds", elapsed)
        if ok:
            self.deadlines.observe_load(load.nbytes, elapsed)
            saved = self.deadlines.recompute_s(load.tokens)
            if saved is not None:
                self.counters.add("recompute_seconds_saved_est", saved)
        # A failed load costs its request, never the cache: the time it took
        # runs on the scheduler's clock (steps, queueing behind other loads),
        # and a 404 or a bad checksum is an answer, not an outage.

    def mark_bad(self, chunk_id: str) -> None:
        """A chunk failed to load: never offer it again for a while, and let a
        recompute of it be saved again (its objects may be gone)."""
        self._bad.add(chunk_id)
        self._manifests.discard(chunk_id)
        self._committed.discard(chunk_id)

    # --- saves -------------------------------------------------------------------------

    def prepare_store(self, chunk_id: str, requested: bool) -> bool:
        """Whether to save ``chunk_id`` now; a True opens a plan that
        :meth:`complete_store` closes."""
        if chunk_id in self._committed or self._is_planned(chunk_id):
            return False
        if not self._conditional_create():
            return False  # no saves on this server at all (logged at start-up)
        if not self.breaker.allow():
            # The store is down: uploads would only queue up in memory. The
            # chunk is not remembered, so it is planned again once it is back.
            self.counters.add("saves_skipped_store_down")
            return False
        if not self.admission.admit(chunk_id, requested):
            self.counters.add("admission_skipped")
            return False
        self._planned[chunk_id] = self._clock()
        self._planned.move_to_end(chunk_id)
        while len(self._planned) > _MAX_PLANNED:
            self._planned.popitem(last=False)
        return True

    def saves_allowed(self) -> bool:
        """Saves flow unless the breaker is open: slow lookups do not stop them
        (they are off the forward path and bounded by upload memory). On a
        server found at start-up to ignore create-only puts, never."""
        return self._conditional_create() and self.breaker.allow()

    def _conditional_create(self) -> bool:
        # True until the start-up probe finds otherwise (and with no store).
        return self.store is None or self.store.capabilities.conditional_create

    def complete_store(self, chunk_id: str, ok: bool) -> None:
        """The commit's outcome for a planned chunk: committed, or not (dropped,
        failed, its round lost); a chunk not committed may be planned again."""
        self._planned.pop(chunk_id, None)
        if ok:
            self._committed.add(chunk_id)
            self._absent.discard(chunk_id)
        else:
            self.counters.add("save_plans_failed")

    def _is_planned(self, chunk_id: str) -> bool:
        when = self._planned.get(chunk_id)
        if when is None:
            return False
        if self._clock() - when < self._plan_ttl:
            return True
        # No outcome came back in time: plan it again (and expire older plans).
        now = self._clock()
        while self._planned:
            cid, t = next(iter(self._planned.items()))
            if now - t < self._plan_ttl:
                break
            del self._planned[cid]
            self.counters.add("save_outcomes_lost")
        return False

    # --- engine steps -------------------------------------------------------------------

    def step_done(self, tokens: int, seconds: float) -> None:
        self.deadlines.observe_step(tokens, seconds)
        self._drain_late()
