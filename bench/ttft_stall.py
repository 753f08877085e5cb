"""TTFT when S3 stalls: with the cache on a healthy server, on a stalled one, and
without the connector, for a prefill-heavy prompt, in one run.

    .venv/bin/python bench/ttft_stall.py [--tokens 8192] [--prompts 4] [--quick]

Every engine is its own process (bench/engine.py's model: prefill compute
dominates), each prompt its own request, timed alone after a warm-up request.
The stalled servers sit behind the fault proxy in front of moto:

* blackholed: connections accepted, never answered (probes included);
* slow: every answer 5 s late.

The rule under test: waiting for the cache never costs more than recomputing
would, so stalled ÷ no-connector must stay <= 1.1 for every request (the first
request pays the lookup deadline; the breaker spares the rest). The healthy
warm run shows the cache still pays off. Results go to
``bench/results/ttft_stall.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, MotoProcess, machine_info, median
from bench.engine import MODEL, TMP, engine
from devtools.fault_proxy import Blackhole, Delay, FaultProxy
from devtools.tiny_model import create_tiny_model

TARGET = 1.1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="4k-token prompts, 3 of them")
    args = ap.parse_args()
    tokens = 4096 if args.quick else args.tokens
    n = 3 if args.quick else args.prompts
    TMP.mkdir(exist_ok=True)
    model = create_tiny_model(TMP / "models" / "bench-engine", MODEL)
    rng = random.Random(11)
    prompts = [[rng.randrange(3, 1024) for _ in range(tokens)] for _ in range(n)]
    t0 = time.time()
    with MotoProcess(nice=19) as moto:
        import boto3

        bucket = "bench-ttft-stall"
        boto3.client("s3", endpoint_url=moto.url).create_bucket(Bucket=bucket)
        base: dict[str, Any] = {
            "model": str(model), "block_size": 128, "max_model_len": tokens + 128,
            "kv_cache_bytes": 1 << 30, "warmup": True, "prefix_caching": False,
            "max_num_batched_tokens": max(8192, tokens), "batches": [[p] for p in prompts],
            "ttft": True, "max_tokens": 1,
        }
        conn = {"bucket": bucket, "endpoint_url": moto.url, "chunk_tokens": 256}
        runs: dict[str, dict[str, Any]] = {}
        runs["no connector"] = engine(base)
        runs["cache, cold (fills the bucket)"] = engine({**base, "connector": conn})
        runs["cache, healthy server (hits)"] = engine({**base, "connector": conn})
        for name, action in (("cache, server blackholed", Blackhole()),
                             ("cache, server answers 5 s late", Delay(ms=5000))):
            with FaultProxy(moto.url) as proxy:
                proxy.add(None, "", action)
                runs[name] = engine({**base, "connector": {**conn, "endpoint_url": proxy.url,
                                                           "request_timeout_s": 10.0}})
    ref = runs["no connector"]["ttft_seconds"]
    result: dict[str, Any] = {
        "benchmark": "ttft_stall", "machine": machine_info(["vllm", "torch", "obstore"]),
        "model": MODEL.__dict__, "prompt_tokens": tokens, "requests": n, "runs": {},
        "wall_seconds": 0.0,
    }
    ok = True
    print(f"{n} requests of {tokens} tokens each, TTFT in seconds (ratio to no connector)")
    for name, res in runs.items():
        ttft = res["ttft_seconds"]
        ratios = [t / r for t, r in zip(ttft, ref, strict=True)]
        if res["outputs"] != runs["no connector"]["outputs"]:
            raise SystemExit(f"{name}: outputs differ from the engine without the connector")
        c = res.get("first_pass_counters", {})
        result["runs"][name] = {
            "ttft_s": ttft, "ratio": ratios, "median_ratio": median(ratios),
            "max_ratio": max(ratios), "hit_tokens": c.get("hit_tokens", 0),
            "lookup_deadline_misses": c.get("lookup_deadline_misses", 0),
            "lookups_skipped_store_down": c.get("lookups_skipped_store_down", 0),
            "cache_wait_seconds": c.get("cache_wait_seconds", 0.0),
        }
        verdict = ""
        if "blackholed" in name or "late" in name:
            passed = max(ratios) <= TARGET
            ok &= passed
            verdict = f"  max {max(ratios):.3f} (target <= {TARGET}) {'ok' if passed else 'FAIL'}"
        cells = "  ".join(f"{t:6.3f} ({q:.2f})" for t, q in zip(ttft, ratios, strict=True))
        print(f"  {name:34s} {cells}{verdict}")
    result["wall_seconds"] = time.time() - t0
    result["stalled_within_target"] = ok
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ttft_stall.json").write_text(json.dumps(result, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
