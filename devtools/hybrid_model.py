"""Tiny random-weight hybrid-attention models for benchmarks and demos.

Gemma-3 architecture with any mix of sliding-window and full-attention
layers: the ratio and window of real Gemma 3 (five local layers per global
one, 1024-token window) or the alternating 128-token windows of gpt-oss.
Built with transformers from a config and a fixed seed, no downloads; the
same call writes the same model in any process.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class HybridSpec:
    layer_types: tuple[str, ...]  # "sliding_attention" or "full_attention", per layer
    sliding_window: int
    hidden_size: int = 256
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    max_position_embeddings: int = 32768
    seed: int = 0


GEMMA3 = HybridSpec(("sliding_attention",) * 5 + ("full_attention",), 1024)
GPT_OSS = HybridSpec(("sliding_attention", "full_attention") * 2, 128)


def create_hybrid_model(path: Path, spec: HybridSpec) -> Path:
    key = {"arch": "gemma3_text", **asdict(spec)}
    marker = path / "s3kv-test-model.json"
    if marker.exists() and json.loads(marker.read_text()) == json.loads(json.dumps(key)):
        return path
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)
    kwargs: dict[str, Any] = dict(  # a dict: the config classes take loose kwargs
        vocab_size=1024, hidden_size=spec.hidden_size, intermediate_size=2 * spec.hidden_size,
        num_hidden_layers=len(spec.layer_types), num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim,
        sliding_window=spec.sliding_window, layer_types=list(spec.layer_types),
        max_position_embeddings=spec.max_position_embeddings, torch_dtype="float32",
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model: Any = Gemma3ForCausalLM(Gemma3TextConfig(**kwargs))
    model = model.to(torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    marker.write_text(json.dumps(key))
    return path
