"""Tiny random-weight models of the attention layouts s3kv must serve.

Built with transformers from a config and a fixed seed (no downloads), like
``devtools.tiny_model``: the same call writes the same model in any process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from devtools.hybrid_model import HybridSpec, create_hybrid_model


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
    return create_hybrid_model(path, HybridSpec(
        ("sliding_attention", "full_attention") * 2, 128, max_position_embeddings=4096))


def create_gpt_oss_model(path: Path) -> Path:
    """gpt-oss shape: sliding (128) / full attention alternating, attention sinks,
    MoE 4 experts top-2. Plain float32 weights (no mxfp4 quantization_config)."""
    key = {"arch": "gpt_oss", "layers": 4, "hidden": 256, "window": 128, "experts": 4,
           "seed": 0}

    def build() -> Any:
        from transformers import GptOssConfig, GptOssForCausalLM

        kwargs: dict[str, Any] = dict(
            vocab_size=1024, hidden_size=256, intermediate_size=256, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, sliding_window=128,
            layer_types=["sliding_attention", "full_attention", "sliding_attention",
                         "full_attention"],
            num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=4096,
            rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                             "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                             "original_max_position_embeddings": 4096},
            torch_dtype="float32", bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
        config = GptOssConfig(**kwargs)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        return GptOssForCausalLM(config)

    return _write(path, key, build)


# Mamba2 mixer: expand 2 -> d_inner 512 = 8 heads x head_dim 64, d_state 64,
# n_groups 1, conv kernel 4, chunk_size 128.
def create_falcon_h1_model(path: Path) -> Path:
    """Falcon-H1 shape: every layer runs attention and Mamba2 in parallel.

    With plain random weights the SSM forgets within a few tokens (decay
    ``exp(A * dt)`` with ``A`` down to -8) and its output is small beside the
    residual stream: a zeroed state changes the next logits by 4e-4 and no
    token. Here ``A`` is near 0 (the state carries the whole prefix) and the
    input projection is 10x larger: a zeroed state at token 768 changes the
    next logits by 1.4 and the greedy token, so a hit that resumed from a
    wrong state would generate other tokens."""
    key = {"arch": "falcon_h1", "layers": 2, "hidden": 256, "d_state": 64, "seed": 0,
           "A_log": -8.0, "in_proj_scale": 10.0}

    def build() -> Any:
        from transformers import FalconH1Config, FalconH1ForCausalLM

        kwargs: dict[str, Any] = dict(
            vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            mamba_d_ssm=512, mamba_n_heads=8, mamba_d_head=64, mamba_n_groups=1,
            mamba_d_state=64, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=128,
            max_position_embeddings=4096, torch_dtype="float32", bos_token_id=1,
            eos_token_id=2, pad_token_id=0,
        )
        return _long_memory(FalconH1ForCausalLM(FalconH1Config(**kwargs)), key)

    return _write(path, key, build)


def _long_memory(model: Any, key: dict[str, Any]) -> Any:
    """Every Mamba2 mixer with ``A_log`` set and its input projection scaled (see
    ``create_falcon_h1_model``): the state carries the prefix, and a wrong one
    changes the tokens."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".A_log"):
                param.fill_(key["A_log"])
                model.get_parameter(name.removesuffix("A_log") + "in_proj.weight").mul_(
                    key["in_proj_scale"])
    return model


def create_nemotron_h_model(path: Path) -> Path:
    """Nemotron-H shape: Mamba2, MLP and attention layers (pattern ``M-*-M-``); vLLM
    gives each Mamba2 layer a KV cache group of its own beside the attention one."""
    key = {"arch": "nemotron_h", "layers": 6, "hidden": 256, "d_state": 64, "seed": 0,
           "A_log": -8.0, "in_proj_scale": 10.0}

    def build() -> Any:
        from transformers import NemotronHConfig, NemotronHForCausalLM

        kwargs: dict[str, Any] = dict(
            vocab_size=1024, hidden_size=256, intermediate_size=512,
            layers_block_type=["linear_attention", "mlp", "full_attention", "mlp",
                               "linear_attention", "mlp"],
            num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            ssm_state_size=64, mamba_num_heads=8, mamba_head_dim=64, n_groups=1,
            conv_kernel=4, expand=2, chunk_size=128, max_position_embeddings=4096,
            torch_dtype="float32", bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
        return _long_memory(NemotronHForCausalLM(NemotronHConfig(**kwargs)), key)

    return _write(path, key, build)


def create_zamba2_model(path: Path) -> Path:
    """Zamba2 shape: Mamba2 layers, every other one also running the one shared
    attention block; 128-token blocks (vLLM's choice for its page sizes)."""
    key = {"arch": "zamba2", "layers": 4, "hidden": 256, "d_state": 64, "seed": 0,
           "A_log": -8.0, "in_proj_scale": 10.0}

    def build() -> Any:
        from transformers import Zamba2Config, Zamba2ForCausalLM

        kwargs: dict[str, Any] = dict(
            vocab_size=1024, hidden_size=256, num_hidden_layers=4,
            layers_block_type=["linear_attention", "hybrid", "linear_attention", "hybrid"],
            mamba_d_state=64, mamba_d_conv=4, mamba_expand=2, mamba_ngroups=1,
            n_mamba_heads=8, chunk_size=128, num_attention_heads=4, num_key_value_heads=4,
            num_mem_blocks=1, use_mem_rope=True, max_position_embeddings=4096,
            torch_dtype="float32", bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
        return _long_memory(Zamba2ForCausalLM(Zamba2Config(**kwargs)), key)

    return _write(path, key, build)


def create_granite_hybrid_model(path: Path) -> Path:
    """Granite 4.0-H shape: Mamba2 layers and one attention layer, MoE 4x top-2."""
    key = {"arch": "granitemoehybrid", "layers": 4, "hidden": 256, "d_state": 64, "seed": 0,
           "A_log": -8.0, "in_proj_scale": 10.0}

    def build() -> Any:
        from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

        kwargs: dict[str, Any] = dict(
            vocab_size=1024, hidden_size=256, intermediate_size=256, num_hidden_layers=4,
            layer_types=["linear_attention", "full_attention", "linear_attention",
                         "linear_attention"],
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
            num_experts_per_tok=2, shared_intermediate_size=256,
            position_embedding_type="rope", mamba_n_heads=8, mamba_d_head=64,
            mamba_n_groups=1, mamba_d_state=64, mamba_d_conv=4, mamba_expand=2,
            mamba_chunk_size=128, max_position_embeddings=4096, torch_dtype="float32",
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
        return _long_memory(GraniteMoeHybridForCausalLM(GraniteMoeHybridConfig(**kwargs)), key)

    return _write(path, key, build)
