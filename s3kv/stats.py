"""Thread-safe counters shared by the commit machinery and the connector.

Kept free of vLLM so the core can count; the vLLM package adapts a snapshot
into vLLM's KV connector stats (and so Prometheus). Only names declared in
:mod:`s3kv.metrics` are accepted: an undeclared name would never be exported,
so it is a bug to surface at once, not a counter to keep.
"""

from __future__ import annotations

import threading
from collections import defaultdict

from s3kv.metrics import METRICS, undeclared


class Counters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: defaultdict[str, float] = defaultdict(float)
        self._last: dict[str, float] = {}

    def add(self, name: str, value: float = 1) -> None:
        """Raises ValueError for a name not declared in s3kv/metrics.py."""
        if name not in METRICS:
            raise undeclared(name)
        with self._lock:
            self._values[name] += value

    def get(self, name: str) -> float:
        """Raises ValueError for an undeclared name, so a misspelt read does not
        pass a test by returning 0."""
        if name not in METRICS:
            raise undeclared(name)
        with self._lock:
            return self._values.get(name, 0.0)

    def delta(self) -> dict[str, float]:
        """Changes since the previous ``delta()`` call (totals stay intact)."""
        with self._lock:
            last = self._last
            out = {k: v - last.get(k, 0.0) for k, v in self._values.items()
                   if v != last.get(k, 0.0)}
            self._last = dict(self._values)
            return out

    def snapshot(self, reset: bool = False) -> dict[str, float]:
        """Totals so far; ``reset`` starts them (and ``delta``'s baseline) at zero,
        so a later delta is never negative."""
        with self._lock:
            out = dict(self._values)
            if reset:
                self._values.clear()
                self._last.clear()
            return out
