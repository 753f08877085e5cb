"""Request traces: the Mooncake format, read strictly.

One JSON object per line (the format of the Mooncake FAST'25 traces):
``timestamp`` (milliseconds from the start of the trace), ``input_length``
and ``output_length`` (tokens) and ``hash_ids``, the prompt's blocks of
``block_tokens`` tokens (512 in Mooncake) as remapped, prefix-chained hashes:
equal leading ids mean an equal prefix, and the last block may be partial.
The project's own traces use the same keys plus an optional per-line
``block_tokens``; blank lines and lines starting with ``#`` are skipped.

A trace drives a simulation whose figures people size deployments by, so a
malformed line is an error naming its line and field (:class:`TraceError`),
never a silently skipped request or a wrong figure later: a ``hash_ids``
list whose length does not match ``input_length`` would make every chunk id
after it mean something else.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Tokens per hash id in the Mooncake traces, and the default of the own format.
DEFAULT_BLOCK_TOKENS = 512
#: Hash ids become u32 token values of the synthetic chunk contents
#: (:mod:`s3kv.replay.chunks`), so they must fit in 32 bits.
MAX_HASH_ID = 2**32 - 1


class TraceError(ValueError):
    """A malformed trace line; the message names the line number and the field."""

    def __init__(self, line: int, field: str, problem: str) -> None:
        super().__init__(f"line {line}: {field}: {problem}")
        self.line = line
        self.field = field
        self.problem = problem


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request: when it arrives, how long its prompt and output are, its blocks."""

    arrival_s: float
    input_tokens: int
    output_tokens: int
    blocks: tuple[int, ...]
    block_tokens: int = DEFAULT_BLOCK_TOKENS

    def __post_init__(self) -> None:
        # The same checks as the reader's, for requests built in code.
        problem = _check(self.arrival_s, self.input_tokens, self.output_tokens,
                         self.blocks, self.block_tokens)
        if problem is not None:
            raise ValueError(f"{problem[0]}: {problem[1]}")


@dataclass(frozen=True)
class Trace:
    """Requests in arrival order (ties keep their order in the file)."""

    requests: tuple[TraceRequest, ...]
    source: str

    @property
    def input_tokens(self) -> int:
        return sum(r.input_tokens for r in self.requests)

    @property
    def duration_s(self) -> float:
        """First to last arrival (0 for fewer than two requests)."""
        if not self.requests:
            return 0.0
        return self.requests[-1].arrival_s - self.requests[0].arrival_s


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(arrival_s: Any, input_tokens: Any, output_tokens: Any, blocks: Any,
           block_tokens: Any) -> tuple[str, str] | None:
    """The first problem of a request's fields as (field, problem), or None.

    Field names are the trace's keys, so an error points at what is in the file.
    """
    if isinstance(arrival_s, bool) or not isinstance(arrival_s, (int, float)) \
            or not math.isfinite(arrival_s) or arrival_s < 0:
        return "timestamp", f"must be a finite number >= 0, got {arrival_s!r}"
    if not _is_int(input_tokens) or input_tokens < 1:
        return "input_length", f"must be a whole number >= 1, got {input_tokens!r}"
    if not _is_int(output_tokens) or output_tokens < 0:
        return "output_length", f"must be a whole number >= 0, got {output_tokens!r}"
    if not _is_int(block_tokens) or block_tokens < 1:
        return "block_tokens", f"must be a whole number >= 1, got {block_tokens!r}"
    if not isinstance(blocks, (list, tuple)):
        return "hash_ids", f"must be a list of integers, got {type(blocks).__name__}"
    for i, h in enumerate(blocks):
        if not _is_int(h) or not 0 <= h <= MAX_HASH_ID:
            return f"hash_ids[{i}]", f"must be an integer in 0..{MAX_HASH_ID}, got {h!r}"
    expected = -(-input_tokens // block_tokens)
    if len(blocks) != expected:
        return "hash_ids", (f"{len(blocks)} ids for input_length {input_tokens} at "
                            f"{block_tokens} tokens per block; expected {expected}")
    return None


def parse_line(line: int, text: str) -> TraceRequest:
    """One line of a trace as a request; a problem raises :class:`TraceError`."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise TraceError(line, "json", f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise TraceError(line, "json", f"must be a JSON object, got {type(doc).__name__}")
    for key in ("timestamp", "input_length", "output_length", "hash_ids"):
        if key not in doc:
            raise TraceError(line, key, "missing")
    timestamp = doc["timestamp"]
    block_tokens = doc.get("block_tokens", DEFAULT_BLOCK_TOKENS)
    problem = _check(timestamp, doc["input_length"], doc["output_length"], doc["hash_ids"],
                     block_tokens)
    if problem is not None:
        raise TraceError(line, *problem)
    return TraceRequest(timestamp / 1000.0, doc["input_length"], doc["output_length"],
                        tuple(doc["hash_ids"]), block_tokens)


def parse_lines(lines: Iterable[str], source: str, limit: int | None = None) -> Trace:
    """A trace from its lines (numbered from 1), at most ``limit`` requests."""
    if limit is not None and (not _is_int(limit) or limit < 0):
        raise ValueError(f"limit: must be a whole number >= 0 or None, got {limit!r}")
    requests: list[TraceRequest] = []
    for number, raw in enumerate(lines, start=1):
        if limit is not None and len(requests) >= limit:
            break
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        requests.append(parse_line(number, text))
    # Stable: requests arriving in the same millisecond keep the file's order.
    requests.sort(key=lambda r: r.arrival_s)
    return Trace(tuple(requests), source)


def read_trace(path: Path, limit: int | None = None) -> Trace:
    """Read a trace file; :class:`TraceError` for a malformed line, FileNotFoundError
    for a missing file. A file without requests gives an empty trace."""
    with Path(path).open(encoding="utf-8") as f:
        return parse_lines(f, str(path), limit)


def upper_bound_hit_tokens(trace: Trace) -> int:
    """Prefix tokens an unbounded, global cache of whole blocks could serve.

    For each request in arrival order, the longest run of its leading hash
    ids already seen in earlier requests, times the block size, capped at
    its input length. The bound of every fleet: it ignores chunk granularity,
    the last prompt token vLLM always computes, eviction and timing. Block
    ids of different block sizes never match (their hashes cover other spans).
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for r in trace.requests:
        bt = r.block_tokens
        k = 0
        for h in r.blocks:
            if (h, bt) not in seen:
                break
            k += 1
        total += min(k * bt, r.input_tokens)
        seen.update((h, bt) for h in r.blocks)
    return total


__all__ = ["DEFAULT_BLOCK_TOKENS", "Trace", "TraceError", "TraceRequest", "parse_line",
           "parse_lines", "read_trace", "upper_bound_hit_tokens"]
