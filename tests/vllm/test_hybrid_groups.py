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
    get_mamba_prefill_checkpoint_position,
    is_mamba_prefill_checkpoint_valid,
)

from s3kv.errors import ConfigError
from s3kv.groups import Checkpoints, first_needed_token
from s3kv.vllm.hybrid import check_state_sharding, group_specs

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


@pytest.mark.parametrize(("hash_block", "hit_alignment", "alignment"),
                         [(16, 16, 1), (16, 16, 8), (8, 16, 1), (16, 8, 1), (16, 16, 0)])
def test_checkpoints_are_where_vllm_writes_them(hash_block: int, hit_alignment: int,
                                                alignment: int) -> None:
    """Every step ``[start, end)``: s3kv takes a state from inside the step
    exactly where vLLM's rule puts its internal checkpoint, and only where it
    lands in the block of its own position (``cdiv(end, BS) - 2``)."""
    cp = Checkpoints(hash_block, hit_alignment, alignment)
    seen = 0
    for start in range(0, 200, 8):
        for end in range(start + 1, start + 140, 3):
            pos = get_mamba_prefill_checkpoint_position(end, hit_alignment, False)
            valid = is_mamba_prefill_checkpoint_valid(
                query_start=start, query_end=end, checkpoint_position=pos,
                hash_block_size=hash_block, mamba_block_size=BS,
                checkpoint_alignment=alignment or None)
            in_own_block = pos % BS == 0 and pos // BS - 1 == -(-end // BS) - 2
            want = pos if valid and in_own_block else 0
            assert cp.position(start, end, BS) == want, (start, end)
            seen += want > 0
    assert seen > 0 or alignment == 0


def test_full_and_window_groups_are_read_in_vllm_order() -> None:
    got = group_specs(config(attn(SlidingWindowSpec, sliding_window=64), attn()), BS)
    assert [(g.kind, g.window, g.layers) for g in got] == [
        ("window", 64, ("layers.0.attn",)), ("full", 0, ("layers.1.attn",))]


def refusal(*specs: Any) -> str:
    with pytest.raises(ConfigError) as err:
        group_specs(config(*specs), BS)
    return str(err.value)


def mamba(mode: str = "align", **kw: Any) -> MambaSpec:
    """A Mamba2 layer's state on one rank: conv (640, 3) and SSM (8, 64, 64), fp32."""
    return MambaSpec(block_size=BS, shapes=((640, 3), (8, 64, 64)),
                     dtypes=(torch.float32, torch.float32), mamba_cache_mode=mode, **kw)


def test_an_align_mode_mamba_group_is_stored_as_state() -> None:
    got = group_specs(config(attn(), mamba()), BS, tp_size=2)
    assert [(g.kind, g.layers) for g in got] == [("full", ("layers.0.attn",)),
                                                 ("state", ("layers.1.attn",))]
    state = got[1]
    assert state.state_bytes == (640 * 3 + 8 * 64 * 64) * 4
    # What decides the state's bytes, TP size included, is in the namespace.
    assert state.describe() == ("state[mamba2:float32[640, 3]+float32[8, 64, 64]:tp2]:"
                                "layers.1.attn")
    assert group_specs(config(attn(), mamba()), BS, tp_size=1)[1].describe() != \
        state.describe()


def test_mamba_without_align_mode_is_refused_naming_the_setting() -> None:
    msg = refusal(attn(), mamba("none"))
    assert "KV cache group 1 (MambaSpec" in msg and "layers.1.attn" in msg
    assert "mamba_cache_mode" in msg and "--mamba-cache-mode align" in msg


def test_mamba_with_speculative_blocks_is_refused() -> None:
    msg = refusal(attn(), mamba(num_speculative_blocks=2))
    assert "speculative" in msg


def test_a_model_without_attention_is_refused() -> None:
    assert "no attention layers" in refusal(mamba())


def test_ranks_sharing_kv_heads_cannot_store_ssm_state() -> None:
    groups = group_specs(config(attn(), mamba()), BS, tp_size=4)
    check_state_sharding(groups, num_kv_heads=4, attention="mha", tp_size=4)  # one head each
    with pytest.raises(ConfigError) as err:
        check_state_sharding(groups, num_kv_heads=2, attention="mha", tp_size=4)
    assert "tensor_parallel_size" in str(err.value) and "at most 2" in str(err.value)
    with pytest.raises(ConfigError):
        check_state_sharding(groups, num_kv_heads=1, attention="mla", tp_size=2)
    # Without a state group, shared heads are fine (the lowest rank uploads them).
    check_state_sharding(group_specs(config(attn()), BS), 1, "mha", 4)


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
