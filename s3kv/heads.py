"""How KV heads split over tensor-parallel ranks, and which rank stores them.

vLLM gives each TP rank ``heads / TP`` KV heads; with fewer KV heads than
ranks it replicates them (rank ``r`` holds head ``r * heads // TP``), and
MLA's one latent is held whole by every rank (one "head"). s3kv stores each
head once: only the lowest rank holding a head range uploads it, the others
join the commit round empty-handed. Readers at any TP size assemble their
own range from whatever ranges the writer stored (``s3kv.reader``).
"""

from __future__ import annotations


def head_range(total_heads: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """The KV heads ``[start, end)`` rank ``tp_rank`` holds at TP ``tp_size``."""
    if total_heads < 1 or tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"no head range for rank {tp_rank} of {tp_size} over {total_heads} heads")
    if total_heads >= tp_size:
        if total_heads % tp_size:
            raise ValueError(f"{total_heads} KV heads do not split over TP {tp_size}")
        per = total_heads // tp_size
        return tp_rank * per, (tp_rank + 1) * per
    h = tp_rank * total_heads // tp_size
    return h, h + 1


def uploads_heads(total_heads: int, tp_rank: int, tp_size: int) -> bool:
    """Whether this rank stores its heads (the lowest rank holding them does)."""
    return tp_rank == 0 or head_range(total_heads, tp_rank - 1, tp_size) != head_range(
        total_heads, tp_rank, tp_size)


def uploading_ranks(total_heads: int, tp_size: int) -> dict[int, tuple[int, int]]:
    """Rank -> head range, for the ranks that store heads at TP ``tp_size``."""
    return {r: head_range(total_heads, r, tp_size) for r in range(tp_size)
            if uploads_heads(total_heads, r, tp_size)}
