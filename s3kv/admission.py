"""Admission: which chunks are worth a PUT.

Saving every chunk costs as much in requests and storage as it saves in
prefill when most prompts are never seen again. ``second_sighting`` saves a
chunk only when its content id was already seen within a recent window (a
prefix that recurs once tends to recur again); ``requested`` saves only for
requests that ask for it through ``kv_transfer_params``; ``all`` saves every
chunk not yet committed.

The decision is taken in the scheduler and shipped to every rank in the
step's metadata, so all ranks always save exactly the same chunks and the
commit's gather never sees a partial round.

Sightings live in two rotating Bloom filters: the current one takes inserts,
and when it holds ``window`` ids it becomes the previous one and a fresh one
starts. A chunk counts as seen if either filter has it, so the window covers
between ``window`` and ``2 * window`` most recent distinct chunks. Memory is
fixed at two filters of ``ceil(-window * ln(p) / ln(2)^2)`` bits: 2.3 MiB for
the default window of one million ids at a 1% false-positive rate. A false
positive only admits a chunk early (one extra PUT), never a wrong read.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

Mode = Literal["all", "second_sighting", "requested"]
MODES: tuple[Mode, ...] = get_args(Mode)
REQUEST_FLAG = "s3kv_save"


class _Bloom:
    def __init__(self, bits: int, hashes: int) -> None:
        self.bits = bits
        self.hashes = hashes
        self.data = bytearray((bits + 7) // 8)
        self.count = 0

    def _positions(self, key: str) -> list[int]:
        # Chunk ids are uniformly random hex (SHA-256): slice, don't rehash.
        h1, h2 = int(key[:16], 16), int(key[16:32], 16) | 1
        return [(h1 + i * h2) % self.bits for i in range(self.hashes)]

    def __contains__(self, key: str) -> bool:
        return all(self.data[p >> 3] & (1 << (p & 7)) for p in self._positions(key))

    def add(self, key: str) -> None:
        for p in self._positions(key):
            self.data[p >> 3] |= 1 << (p & 7)
        self.count += 1


class SightingTracker:
    def __init__(self, window: int = 1_000_000, fp_rate: float = 0.01) -> None:
        if window <= 0 or not 0 < fp_rate < 1:
            raise ValueError("window must be > 0 and 0 < fp_rate < 1")
        self.window = window
        self.bits = math.ceil(-window * math.log(fp_rate) / math.log(2) ** 2)
        self.hashes = max(1, round(self.bits / window * math.log(2)))
        self._current = _Bloom(self.bits, self.hashes)
        self._previous = _Bloom(self.bits, self.hashes)

    @property
    def nbytes(self) -> int:
        return len(self._current.data) + len(self._previous.data)

    def seen_then_add(self, chunk_id: str) -> bool:
        """Whether ``chunk_id`` was seen in the window; records this sighting."""
        seen = chunk_id in self._current or chunk_id in self._previous
        if chunk_id not in self._current:
            self._current.add(chunk_id)
            if self._current.count >= self.window:
                self._previous = self._current
                self._current = _Bloom(self.bits, self.hashes)
        return seen


class AdmissionPolicy:
    def __init__(self, mode: Mode, window: int = 1_000_000) -> None:
        if mode not in MODES:
            raise ValueError(f"admission mode {mode!r}; valid: {list(MODES)}")
        self.mode = mode
        self.tracker = SightingTracker(window) if mode == "second_sighting" else None

    def admit(self, chunk_id: str, requested: bool) -> bool:
        if self.mode == "all":
            return True
        if self.mode == "requested":
            return requested
        return self.tracker is not None and self.tracker.seen_then_add(chunk_id)
