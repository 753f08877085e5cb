"""The chunk ids s3kv would compute for a trace's prompts.

A trace has no tokens, only one hash id per block of ``block_tokens``. Chunk
``j`` of a request covers tokens ``[j*C, (j+1)*C)`` (C = ``chunk_tokens``)
and exists only when full. Its id is s3kv's own
:func:`s3kv.keys.chunk_id`, chained over the request's chunks exactly as
:func:`s3kv.keys.iter_chunk_ids` chains them, over a two-value stand-in for
the chunk's tokens: the hash id of the block holding its last token, and how
many tokens of that block it reaches. Hash ids are prefix-chained, so these
two values name every token up to the chunk's end.

Conservative where a chunk ends inside a block: it is shared only with
requests that share that whole block, although their prompts may agree on
the chunk's tokens and part ways later in the block. At the trace's own
granularity nothing finer is known. Hash ids of other block sizes hash
other spans of tokens, so the block size enters the id (as ``extra``)
whenever it is not Mooncake's 512.

A table of every request's chunks is built once per (trace, chunk size) and
kept for the next replay of the same trace object: sweeps replay one trace
many times, and the SHA-256 chain is most of a replay's setup.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

from s3kv.keys import chunk_id
from s3kv.replay.trace import DEFAULT_BLOCK_TOKENS, Trace, TraceRequest

_CACHE_SIZE = 4


def _extra(block_tokens: int) -> dict[str, int] | None:
    return None if block_tokens == DEFAULT_BLOCK_TOKENS else {"block_tokens": block_tokens}


def _stand_in(req: TraceRequest, j: int, chunk_tokens: int) -> tuple[int, int]:
    """(hash id of the block holding chunk ``j``'s last token, tokens of it reached)."""
    end = (j + 1) * chunk_tokens
    b = (end - 1) // req.block_tokens
    return req.blocks[b], end - b * req.block_tokens


def iter_request_chunk_ids(req: TraceRequest, chunk_tokens: int) -> Iterator[str]:
    """Ids of the request's full chunks in order (no memo; for a few requests)."""
    extra = _extra(req.block_tokens)
    parent: str | None = None
    for j in range(req.input_tokens // chunk_tokens):
        parent = chunk_id(parent, _stand_in(req, j, chunk_tokens), extra)
        yield parent


def trace_chunk_ids(req: TraceRequest, chunk_tokens: int) -> list[str]:
    """Ids of every full chunk of ``req`` at ``chunk_tokens``, as s3kv computes them."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens: must be >= 1, got {chunk_tokens!r}")
    return list(iter_request_chunk_ids(req, chunk_tokens))


@dataclass
class ChunkTable:
    """Every distinct chunk of a trace, numbered; each request as its chunk numbers.

    Numbers keep the simulation's per-chunk state in flat lists and its caches
    keyed by small ints; ``ids`` maps them back to the hex ids S3 keys carry.
    """

    chunk_tokens: int
    ids: list[str] = field(default_factory=list)  # number -> hex chunk id
    parent: list[int] = field(default_factory=list)  # number -> parent's number, -1 at 0
    index: list[int] = field(default_factory=list)  # number -> position in its chain
    partition: list[int] = field(default_factory=list)  # number -> int(id[:2], 16)
    requests: list[tuple[int, ...]] = field(default_factory=list)  # full chunks of each
    _numbers: dict[str, int] | None = None

    def number(self, cid: str) -> int:
        """The number of a hex chunk id (the map is built on first use)."""
        if self._numbers is None:
            self._numbers = {c: i for i, c in enumerate(self.ids)}
        return self._numbers[cid]

    def __len__(self) -> int:
        return len(self.ids)


def build_table(trace: Trace, chunk_tokens: int) -> ChunkTable:
    """The chunk table of ``trace``; ids memoized by (parent, stand-in), so a
    prefix shared by many requests is hashed once."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens: must be >= 1, got {chunk_tokens!r}")
    table = ChunkTable(chunk_tokens)
    memo: dict[tuple[int, int, int, int], int] = {}
    ids, parents, index, partition = table.ids, table.parent, table.index, table.partition
    for req in trace.requests:
        bt = req.block_tokens
        extra = _extra(bt)
        blocks = req.blocks
        parent = -1
        mine: list[int] = []
        end = chunk_tokens
        for j in range(req.input_tokens // chunk_tokens):
            b = (end - 1) // bt
            h, reach = blocks[b], end - b * bt
            key = (parent, h, reach, bt)
            n = memo.get(key)
            if n is None:
                cid = chunk_id(ids[parent] if parent >= 0 else None, (h, reach), extra)
                n = len(ids)
                memo[key] = n
                ids.append(cid)
                parents.append(parent)
                index.append(j)
                partition.append(int(cid[:2], 16))
            mine.append(n)
            parent = n
            end += chunk_tokens
        table.requests.append(tuple(mine))
    return table


_tables: dict[tuple[int, int], tuple[weakref.ref[Trace], ChunkTable]] = {}


def chunk_table(trace: Trace, chunk_tokens: int) -> ChunkTable:
    """:func:`build_table`, kept for the last few (trace, chunk size) pairs.

    Keyed by the trace object itself (a weak reference checks it is still the
    same one), never by its contents: hashing every request would cost as
    much as the table.
    """
    key = (id(trace), chunk_tokens)
    hit = _tables.get(key)
    if hit is not None and hit[0]() is trace:
        return hit[1]
    table = build_table(trace, chunk_tokens)
    while len(_tables) >= _CACHE_SIZE:
        del _tables[next(iter(_tables))]
    _tables[key] = (weakref.ref(trace), table)
    return table


def distinct_chunk_bytes(trace: Trace, chunk_tokens: int, kv_bytes_per_token: int) -> int:
    """KV bytes of every distinct full chunk of the trace: what an unbounded cache holds."""
    return len(chunk_table(trace, chunk_tokens)) * chunk_tokens * kv_bytes_per_token


__all__ = ["ChunkTable", "build_table", "chunk_table", "distinct_chunk_bytes",
           "iter_request_chunk_ids", "trace_chunk_ids"]
