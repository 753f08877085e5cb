"""Creates small random-weight Llama models for the demo, tests and benchmarks.

No weights are downloaded: a ``LlamaForCausalLM`` is built from a config with
a fixed seed and saved with transformers, next to a word-level tokenizer
trained in-process. The same seed and shape give the same weights, so two
processes can create "the same model" independently.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TinyModelSpec:
    num_layers: int = 2
    hidden_size: int = 256
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    vocab_size: int = 1024
    max_position_embeddings: int = 4096
    seed: int = 0
    dtype: str = "float32"

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads


def create_tiny_model(path: Path, spec: TinyModelSpec | None = None) -> Path:
    """Write a random-weight Llama to ``path`` (idempotent for the same spec)."""
    spec = spec or TinyModelSpec()
    marker = path / "s3kv-tiny-model.json"
    if marker.exists() and json.loads(marker.read_text()) == asdict(spec):
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    config_kwargs: dict[str, Any] = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        torch_dtype=spec.dtype,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    config = LlamaConfig(**config_kwargs)
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config).to(getattr(torch, spec.dtype))
    model.save_pretrained(path, safe_serialization=True)
    _write_tokenizer(path, spec.vocab_size)
    marker.write_text(json.dumps(asdict(spec)))
    return path


def _write_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(path)
