"""The KV cache tensors vLLM hands ``register_kv_caches`` on GPU, built by hand.

vLLM allocates each layer in the backend's physical (stride) order and
passes the logical view (``get_kv_cache_shape``) permuted from it. Each
layout here is written independently of ``s3kv.vllm.kv_layout``: a physical
allocation, the permutation vLLM applies, and how canonical
``[blocks, heads, block_size, 2, head_size]`` values are written into it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Layout:
    name: str
    physical: Callable[[int, int, int, int], tuple[int, ...]]  # (B, H, N, D) -> shape
    to_logical: tuple[int, ...] | None  # permutation vLLM applies to the physical tensor
    # canonical [B, H, N, 2, D] -> the logical tensor's index order
    from_canonical: Callable[[torch.Tensor], torch.Tensor]
    block_dim: int  # block axis of the logical tensor
    packed: bool = False  # a kernel-specific packing of each slab (see token_map)
    mla: bool = False  # canonical [B, 1, N, C]: one latent per token, C = "head size"

    def canonical_shape(self, b: int, h: int, n: int, d: int) -> tuple[int, ...]:
        return (b, 1, n, d) if self.mla else (b, h, n, 2, d)

    def allocate(self, b: int, h: int, n: int, d: int, dtype: torch.dtype,
                 device: str) -> torch.Tensor:
        t = torch.zeros(self.physical(b, h, n, d), dtype=dtype, device=device)
        return t if self.to_logical is None else t.permute(*self.to_logical)

    def token_map(self, n: int, d: int) -> torch.Tensor | None:
        """Slab offset of each canonical (token, K/V, element) position, for packed
        layouts: here a block's keys, then its values (vLLM's CPU kernels pack
        differently per instruction set; s3kv asks the kernel, see cpu_layout)."""
        if not self.packed:
            return None
        canonical = torch.arange(n * 2 * d).view(n, 2, d)
        return canonical.permute(1, 0, 2).reshape(-1).argsort()

    def fill(self, logical: torch.Tensor, canonical: torch.Tensor) -> None:
        logical.copy_(self.from_canonical(canonical))

    def blocks(self, logical: torch.Tensor, ids: list[int]) -> torch.Tensor:
        idx = torch.tensor(ids, device=logical.device)
        return logical.index_select(self.block_dim, idx)


LAYOUTS = [
    # FlashAttention: [2, B, N, H, D], NHD and HND physical orders.
    Layout("flash_attn NHD", lambda b, h, n, d: (2, b, n, h, d), None,
           lambda c: c.permute(3, 0, 2, 1, 4), 1),
    Layout("flash_attn HND", lambda b, h, n, d: (2, b, h, n, d), (0, 1, 3, 2, 4),
           lambda c: c.permute(3, 0, 2, 1, 4), 1),
    # FlashInfer (and Triton): [B, 2, N, H, D], NHD and HND physical orders.
    Layout("flashinfer NHD", lambda b, h, n, d: (b, 2, n, h, d), None,
           lambda c: c.permute(0, 3, 2, 1, 4), 0),
    Layout("flashinfer HND", lambda b, h, n, d: (b, 2, h, n, d), (0, 1, 3, 2, 4),
           lambda c: c.permute(0, 3, 2, 1, 4), 0),
    # A backend exposing HND as its logical shape: [B, 2, H, N, D].
    Layout("[B,2,H,N,D]", lambda b, h, n, d: (b, 2, h, n, d), None,
           lambda c: c.permute(0, 3, 1, 2, 4), 0),
    # vLLM >= 0.32 hands every backend a logical [B, H, N, C] view, C = K then V of
    # one token, with the strides of the resolved KVCacheLayout: LBNHC (the GPU
    # default, physically [B, N, H, C]) ...
    Layout("[B,H,N,C] LBNHC", lambda b, h, n, d: (b, n, h, 2 * d), (0, 2, 1, 3),
           lambda c: c.reshape(c.shape[0], c.shape[1], c.shape[2], -1), 0),
    # ... and LBHNC, contiguous [B, H, N, 2*D], which vLLM's CPU attention reads as
    # [B, H, 2N, D] split in two: a block's keys, then its values.
    Layout("cpu [B,H,N,C] LBHNC", lambda b, h, n, d: (b, h, n, 2 * d), None,
           lambda c: c.permute(0, 1, 3, 2, 4).reshape(c.shape[0], c.shape[1], c.shape[2], -1),
           0, packed=True),
    # MLA, every GPU backend (FlashMLA, CUTLASS, Triton, FlashInfer, FlashAttention
    # MLA): [B, N, C]; vLLM's CPU MLA backend: [B, 1, N, C].
    Layout("MLA [B,N,C]", lambda b, h, n, d: (b, n, d), None, lambda c: c[:, 0], 0, mla=True),
    Layout("cpu MLA [B,1,N,C]", lambda b, h, n, d: (b, 1, n, d), None, lambda c: c, 0,
           mla=True),
]

# The layouts vLLM's GPU backends produce (the CPU one is tested on GPU too:
# the code path is the same).
GPU_LAYOUTS = [lay for lay in LAYOUTS if not lay.name.startswith("cpu")]
MHA_LAYOUTS = [lay for lay in LAYOUTS if not lay.mla]
MLA_LAYOUTS = [lay for lay in LAYOUTS if lay.mla]


def canonical_bytes(canonical: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """Expected payload bytes of one layer's blocks ``ids``: ``[H, k, N, ...]``."""
    return canonical[ids].transpose(0, 1).contiguous()
