"""Tiny random-weight models of the attention layouts s3kv must serve.

Built with transformers from a config and a fixed seed (no downloads), like
``devtools.tiny_model``: the same call writes the same model in any process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _write(path: Path, key: dict[str, Any], build: Any) -> Path:
    marker = path / "s3kv-test-model.json"
    if marker.exists() and json.loads(marker.read_text()) == key:
        return path
    import torch

    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(key.get("seed", 0))
    model = build().to(torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    marker.write_text(json.dumps(key))
    return path


def create_mla_model(path: Path) -> Path:
    """DeepSeek-V2 shape: multi-head latent attention, no MoE layers (dense MLP).

    vLLM's CPU MLA backend supports the latent width DeepSeek uses,
    kv_lora_rank 512 + qk_rope_head_dim 64 = 576 elements per token.
    """
    key = {"arch": "deepseek_v2", "layers": 2, "hidden": 256, "kv_lora_rank": 512,
           "rope": 64, "seed": 0}

    def build() -> Any:
        from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

        kwargs: dict[str, Any] = dict(  # a dict: the config classes take loose kwargs
            vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=32,
            v_head_dim=32, first_k_dense_replace=2, n_routed_experts=4, num_experts_per_tok=2,
            n_shared_experts=1, max_position_embeddings=4096, rope_scaling=None,
            torch_dtype="float32", bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        )
        return DeepseekV2ForCausalLM(DeepseekV2Config(**kwargs))

    return _write(path, key, build)


def create_sliding_window_model(path: Path) -> Path:
    """Gemma-3 shape: sliding-window layers (window 128) between full-attention ones."""
    key = {"arch": "gemma3_text", "layers": 4, "hidden": 256, "window": 128, "seed": 0}

    def build() -> Any:
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        kwargs: dict[str, Any] = dict(
            vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, sliding_window=128,
            layer_types=["sliding_attention", "full_attention", "sliding_attention",
                         "full_attention"],
            max_position_embeddings=4096, torch_dtype="float32", bos_token_id=1,
            eos_token_id=2, pad_token_id=0,
        )
        return Gemma3ForCausalLM(Gemma3TextConfig(**kwargs))

    return _write(path, key, build)
