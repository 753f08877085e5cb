"""The commit group's health: outcomes, and recovery after a failed gather.

A gather that times out or loses a peer used to stop saving on that rank
until the engine restarted, and nothing told the scheduler which saves never
landed. Here the committer thread instead re-forms the group among the TP
ranks and resumes, while the forward path keeps queuing rounds without
waiting:

1. On a failed gather (or ranks out of step) the round's chunks are reported
   failed and :class:`Recovery` marks the group broken. Rounds submitted from
   then on carry no data (nothing is uploaded for a round that cannot commit).
2. The committer thread calls the gatherer's ``reform`` until every TP rank
   has joined a fresh group (the transport's job, see
   :mod:`s3kv.vllm.gather`). Between attempts it consumes the rounds queued
   meanwhile as failed, so their outcomes reach the scheduler and the queue
   stays short, and backs off (1 s doubling to 60 s). It never waits on a
   collective of anything but the TP ranks.
3. The first exchange on the new group settles where to resume: ranks may
   have failed at different rounds (a slow rank at r+1 while rank 0 gave up
   at r), and some have consumed more rounds while waiting. Every rank sends
   how many rounds it has consumed; all skip, as failed, up to the largest.
   Rounds are queued in the same order on every rank (the scheduler sends
   every rank the same plan), so counts name the same rounds everywhere.

If the transport says re-forming can never work (its rendezvous store is
gone with the process that hosted it), saving stays off on this rank, said
once, and every later round is reported failed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from s3kv.stats import Counters

log = logging.getLogger("s3kv.commit")

EventHook = Callable[[str, dict[str, Any]], None]


class Emit(Protocol):
    def __call__(self, name: str, **info: Any) -> None: ...

BACKOFF_S = (1.0, 60.0)  # first and longest wait between re-forming attempts


class RecoveryImpossible(Exception):
    """The group can never be re-formed in this process (raised by ``reform``)."""


class Gatherer(Protocol):
    """Collective transport for commit reports (GLOO in production)."""

    rank: int
    world_size: int

    def gather(self, obj: Any) -> list[Any] | None:
        """All ranks call in the same order; rank 0 gets every rank's object.

        Raises on timeout, a dead peer, or a group a peer has already left.
        """
        ...

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        ...

    def reform(self, wait_s: float) -> None:
        """Replace the group after a failed collective with a new one of the same ranks.

        Waits up to about ``wait_s`` for every rank to join and raises if they
        did not (call again later; joining is remembered), or
        :class:`RecoveryImpossible`.
        """
        ...


class LocalGatherer:
    """World size 1: the gather is the identity, and there is nothing to re-form."""

    rank = 0
    world_size = 1

    def gather(self, obj: Any) -> list[Any] | None:
        return [obj]

    def broadcast(self, obj: Any) -> Any:
        return obj

    def reform(self, wait_s: float) -> None:
        return None


class Outcomes:
    """Chunk ids whose save ended, committed or failed, since the last ``take``.

    Filled from the committer thread and the I/O loop (manifest writes),
    taken from the worker's main thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._committed: list[str] = []
        self._failed: list[str] = []

    def committed(self, chunk_id: str) -> None:
        with self._lock:
            self._committed.append(chunk_id)

    def failed(self, chunk_ids: Iterable[str]) -> None:
        with self._lock:
            self._failed.extend(chunk_ids)

    def take(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        with self._lock:
            out = (tuple(self._committed), tuple(self._failed))
            self._committed.clear()
            self._failed.clear()
            return out


class Recovery:
    """Broken or healthy, and the way back. Only the committer thread calls
    :meth:`fail` and :meth:`recover`; the forward path only reads :attr:`broken`."""

    def __init__(self, gatherer: Gatherer, counters: Counters, emit: Emit,
                 backoff: tuple[float, float] = BACKOFF_S) -> None:
        self._gatherer = gatherer
        self._counters = counters
        self._emit = emit
        self._backoff = backoff
        self._stop = threading.Event()
        # The reason while recovering (or for good, when ``permanent``); None when healthy.
        self.broken: str | None = None
        self.permanent = False
        # Rounds with a sequence number below this are consumed without a gather.
        self.skip_until = 0
        self.reforms = 0

    def fail(self, reason: str, **info: Any) -> None:
        if self.broken is None:
            log.warning("s3kv: commit group broken (%s); re-forming it, saves fail meanwhile, "
                        "serving continues", reason)
        self.broken = reason
        self._emit("broken", error=reason, **info)

    def stop(self) -> None:
        """Ends a recovery in progress at its next step (shutdown)."""
        self._stop.set()

    def recover(self, consumed: Callable[[], int], drain: Callable[[], bool]) -> bool:
        """Re-form the group; False if asked to stop first.

        ``consumed`` is how many rounds this rank has consumed so far,
        ``drain`` consumes (as failed) every round queued now and returns False
        once the queue says stop.
        """
        delay, longest = self._backoff
        attempts = 0
        while not self._stop.is_set():
            started = time.monotonic()
            attempts += 1
            try:
                self._gatherer.reform(max(delay, 0.001))
                resume = self._resync(consumed())
            except RecoveryImpossible as exc:
                self.permanent = True
                self.broken = f"{self.broken}; the commit group cannot be re-formed: {exc}"
                log.error("s3kv: the commit group cannot be re-formed (%s); saving stays off on "
                          "this rank until the engine restarts, serving continues", exc)
                self._emit("recovery_impossible", error=str(exc))
                return True
            except Exception as exc:  # a peer not (yet) there: try again later
                log.debug("s3kv: re-forming the commit group failed (attempt %d): %s",
                          attempts, exc)
                if not drain():
                    return False
                if self._stop.wait(max(0.0, delay - (time.monotonic() - started))):
                    return False
                delay = min(delay * 2, longest)
                continue
            self.skip_until = max(self.skip_until, resume)
            reason, self.broken = self.broken, None
            self.reforms += 1
            self._counters.add("commit_group_reforms")
            log.warning("s3kv: commit group re-formed after %d attempt(s) (it broke: %s); "
                        "saving resumes", attempts, reason)
            self._emit("reformed", attempts=attempts, resume=resume)
            return True
        return False

    def _resync(self, consumed: int) -> int:
        """The first exchange of a new group: the largest count of rounds any
        rank has consumed, which is where every rank resumes."""
        got = self._gatherer.gather(("resync", self._gatherer.rank, consumed))
        most: int | None = None
        if got is not None:
            if any(not (isinstance(g, tuple) and len(g) == 3 and g[0] == "resync"
                        and isinstance(g[2], int)) for g in got):
                raise RuntimeError(f"unexpected first message on a new commit group: {got!r}")
            most = max(g[2] for g in got)
        resume = self._gatherer.broadcast(most)
        if not isinstance(resume, int):
            raise RuntimeError(f"unexpected resume point from rank 0: {resume!r}")
        return resume
