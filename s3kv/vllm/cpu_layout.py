"""Where vLLM's CPU attention kernel keeps each token's K and V inside a block.

The CPU backend hands the connector ``[blocks, heads, block_size, 2 * head_size]``
tensors, but its kernel treats each (block, head) slab as its own packed
layout, chosen per instruction set and block size (keys transposed to
``[head_size, block_size]`` for the vector kernels, values after them, ...).
Rather than hard-code layouts that change with vLLM's kernels, s3kv asks the
kernel: it writes coded keys and values for one block through vLLM's own
``cpu_attn_reshape_and_cache`` and reads back where each landed. The result
maps s3kv's canonical order (token, then K/V, then element) to positions in
the slab, so a chunk is stored in the same bytes whatever the block size,
instruction set or device that wrote it.
"""

from __future__ import annotations

import torch

_BASE = 128  # integers below 256 are exact in every 16-bit float type


def cpu_token_map(dtype: torch.dtype, block_size: int, head_size: int) -> torch.Tensor:
    """For canonical position ``p`` of one (block, head) slab, the slab offset holding it.

    Raises RuntimeError if the kernel's writes are not a permutation (then the
    layout cannot be mapped and the cache must stay off).
    """
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(dtype, block_size, head_size)
    n = block_size * 2 * head_size
    canonical = torch.arange(n, dtype=torch.long)
    where = torch.zeros(n, dtype=torch.long)
    scale = 1
    while scale < n:
        digit = (canonical // scale % _BASE).to(dtype).view(block_size, 2, head_size)
        cache = torch.zeros(1, 1, block_size, 2 * head_size, dtype=dtype)
        k_cache, v_cache = cache.view(1, 1, 2 * block_size, head_size).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(
            digit[:, 0].unsqueeze(1).contiguous(), digit[:, 1].unsqueeze(1).contiguous(),
            k_cache, v_cache, torch.arange(block_size, dtype=torch.long), isa,
        )
        where += cache.view(-1).to(torch.float32).round().long() * scale
        scale *= _BASE
    # where[m] = canonical position stored at slab offset m; invert it.
    if not torch.equal(torch.sort(where).values, canonical):
        raise RuntimeError(f"vLLM's CPU attention ({isa}, block size {block_size}) does not "
                           "store a block as a permutation of its keys and values")
    out = torch.empty(n, dtype=torch.long)
    out[where] = canonical
    return out
