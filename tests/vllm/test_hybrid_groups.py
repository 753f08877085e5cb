"""vLLM's KV cache groups as s3kv reads them, from vLLM's own spec classes.

What s3kv stores for a sliding-window group rests on one rule of vLLM's: the
blocks it frees behind the window. These tests check that rule against
vLLM's code, and that every group kind s3kv cannot store is refused when the
connector starts, naming the group and the setting to change.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
from vllm.v1.kv_cache_interface import (
    ChunkedLocalAttentionSpec,
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    MambaSpec,
    SlidingWindowSpec,
)

from s3kv.errors import ConfigError
from s3kv.groups import first_needed_token
from s3kv.vllm.hybrid import group_specs

BS = 16


def attn(cls: Any = FullAttentionSpec, block: int = BS, **kw: Any) -> Any:
    return cls(block_size=block, num_kv_heads=2, head_size=64, dtype=torch.float32, **kw)


def config(*specs: Any) -> KVCacheConfig:
    groups = [KVCacheGroupSpec([f"layers.{i}.attn"], s) for i, s in enumerate(specs)]
    return KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=groups)


@pytest.mark.parametrize("window", [1, 5, 16, 17, 128, 1000])
def test_first_needed_token_is_the_block_vllm_still_holds(window: int) -> None:
    manager = SimpleNamespace(sliding_window=window, extra_retained_tokens=0)
    for end in range(0, 3000, 7):
        skipped = SlidingWindowManager.get_num_skipped_tokens(manager, end)  # type: ignore[arg-type]
        assert first_needed_token(window, end, BS) == skipped // BS * BS, (window, end)


def test_full_and_window_groups_are_read_in_vllm_order() -> None:
    got = group_specs(config(attn(SlidingWindowSpec, sliding_window=64), attn()), BS)
    assert [(g.kind, g.window, g.layers) for g in got] == [
        ("window", 64, ("layers.0.attn",)), ("full", 0, ("layers.1.attn",))]


def refusal(*specs: Any) -> str:
    with pytest.raises(ConfigError) as err:
        group_specs(config(*specs), BS)
    return str(err.value)


def test_mamba_group_is_refused_naming_the_group_and_the_way_out() -> None:
    mamba = MambaSpec(block_size=BS, shapes=((4, 8),), dtypes=(torch.float32,),
                      mamba_cache_mode="align")
    msg = refusal(attn(), mamba)
    assert "KV cache group 1 (MambaSpec" in msg and "layers.1.attn" in msg
    assert "SSM" in msg and "without s3kv" in msg


def test_window_with_extra_retained_tokens_is_refused() -> None:
    msg = refusal(attn(SlidingWindowSpec, sliding_window=64, extra_retained_tokens=3), attn())
    assert "extra tokens" in msg and "--disable-hybrid-kv-cache-manager" in msg


def test_groups_of_different_block_sizes_are_refused() -> None:
    msg = refusal(attn(SlidingWindowSpec, block=32, sliding_window=64), attn())
    assert "block_size" in msg and "blocks of 32 tokens" in msg


def test_chunked_local_attention_is_refused() -> None:
    msg = refusal(attn(ChunkedLocalAttentionSpec, attention_chunk_size=64), attn())
    assert "ChunkedLocalAttentionSpec" in msg and "does not store this kind" in msg


def test_an_engine_without_groups_is_refused() -> None:
    assert "no KV cache groups" in refusal()
