"""vLLM's CPU attention packs each block its own way; s3kv's map reads it in token order."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="the vLLM CPU build is installed by scripts/bootstrap.sh")

from vllm import _custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from s3kv.vllm.cpu_layout import cpu_token_map
from s3kv.vllm.kv_layout import KVBlocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("block_size", "head_size"), [(32, 64), (128, 64), (256, 128)])
def test_kernel_written_blocks_come_out_token_major(
    dtype: torch.dtype, block_size: int, head_size: int
) -> None:
    """Keys and values written by vLLM's own kernel into two blocks of a 2-head
    cache come out of KVBlocks.copy_out as [heads, layers, blocks, tokens, K|V]."""
    heads, blocks, tokens = 2, 4, 2 * block_size
    tmap = cpu_token_map(dtype, block_size, head_size)
    assert torch.equal(tmap.sort().values, torch.arange(block_size * 2 * head_size))
    cache = torch.zeros(blocks, heads, block_size, 2 * head_size, dtype=dtype)
    g = torch.Generator().manual_seed(block_size)
    key = torch.randn(tokens, heads, head_size, generator=g).to(dtype)
    value = torch.randn(tokens, heads, head_size, generator=g).to(dtype)
    k_cache, v_cache = cache.view(blocks, heads, 2 * block_size, head_size).chunk(2, dim=2)
    slots = torch.cat([torch.arange(block_size) + 3 * block_size,  # block 3, then block 1
                       torch.arange(block_size) + 1 * block_size])
    ops.cpu_attn_reshape_and_cache(key, value, k_cache, v_cache, slots,
                                   _get_attn_isa(dtype, block_size, head_size))
    kv = KVBlocks({"layer": cache}, blocks, heads, block_size, token_map=tmap)
    buf = torch.empty(heads * tokens * 2 * head_size * key.element_size(), dtype=torch.uint8)
    dst = kv.payload_view(buf, heads, 2)
    kv.copy_out([[3, 1]], [dst])
    want = torch.stack([key, value], dim=2).transpose(0, 1)  # [heads, tokens, 2, D]
    assert torch.equal(dst.reshape(heads, tokens, 2, head_size), want)
    # And back: a copy into fresh blocks is read by the kernel's layout unchanged.
    fresh = torch.zeros_like(cache)
    back = KVBlocks({"layer": fresh}, blocks, heads, block_size, token_map=tmap)
    back.copy_in(dst, [0, 1], [0, 2])
    assert torch.equal(fresh[0], cache[3]) and torch.equal(fresh[2], cache[1])


def test_packing_depends_on_the_block_size() -> None:
    """Why the map exists: the same token lands elsewhere at another block size."""
    a = cpu_token_map(torch.float32, 128, 64)
    b = cpu_token_map(torch.float32, 256, 64)
    assert not torch.equal(a[: 128 * 128], b[: 128 * 128])
