"""Engine benchmark: TTFT cold vs warm (hit from S3) and decode throughput with
saving on vs no connector, on a real vLLM engine (CPU build) and a random-weight
model shaped so prefill compute dominates.

    .venv/bin/python bench/engine.py [--tokens 8192] [--quick]

Each engine runs in its own process. Ratios are measured in the same run.
Targets: warm TTFT >= 5x faster than cold; saving costs <= 5% throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, ROOT, MotoProcess, machine_info, median
from devtools.tiny_model import TinyModelSpec, create_tiny_model

MODEL = TinyModelSpec(num_layers=6, hidden_size=768, num_heads=12, num_kv_heads=4,
                      intermediate_size=2048, vocab_size=1024, seed=7,
                      max_position_embeddings=16384)
TMP = ROOT / ".tmp"


def engine(job: dict[str, Any]) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    jp, rp = TMP / f"bench-job-{tag}.json", TMP / f"bench-res-{tag}.json"
    jp.write_text(json.dumps(job))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", TMPDIR=str(TMP),
               PYTHONPATH=str(ROOT))  # devtools is not installed: it lives at the root
    p = subprocess.run([sys.executable, "-m", "devtools.engine_run", str(jp), str(rp)],
                       env=env, cwd=TMP, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True)
    if p.returncode:
        sys.stderr.write(p.stderr[-3000:])
        raise SystemExit(f"engine failed ({p.returncode})")
    out = json.loads(rp.read_text())
    jp.unlink()
    rp.unlink()
    return dict(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--quick", action="store_true", help="4k-token prompt, fewer requests")
    args = ap.parse_args()
    tokens = 4096 if args.quick else args.tokens
    TMP.mkdir(exist_ok=True)
    model = create_tiny_model(TMP / "models" / "bench-engine", MODEL)
    rng = random.Random(3)
    long_prompt = [rng.randrange(3, 1024) for _ in range(tokens)]
    n_req = 8 if args.quick else 16
    decode_prompts = [[rng.randrange(3, 1024) for _ in range(512)] for _ in range(n_req)]
    t0 = time.time()
    # The local S3 server stands in for a remote service: at the lowest CPU
    # priority it does not take the engine's two cores, as remote S3 would not.
    with MotoProcess(nice=19) as moto:
        import boto3

        bucket = "bench-engine"
        boto3.client("s3", endpoint_url=moto.url).create_bucket(Bucket=bucket)
        conn = {"bucket": bucket, "endpoint_url": moto.url, "chunk_tokens": 256}
        base = {"model": str(model), "block_size": 128, "max_model_len": tokens + 128,
                "kv_cache_bytes": 1 << 30, "warmup": True, "prefix_caching": False,
                "max_num_batched_tokens": max(8192, tokens)}
        # 1. TTFT of one long prompt: cold (no connector), fill, warm (new process).
        cold = engine({**base, "batches": [[long_prompt]], "ttft": True, "max_tokens": 1})
        fill = engine({**base, "connector": conn, "batches": [[long_prompt]],
                       "max_tokens": 1})
        warm = engine({**base, "connector": conn, "batches": [[long_prompt]], "ttft": True,
                       "max_tokens": 1})
        # 2. Decode throughput: saving on vs no connector, alternating, 3 pairs.
        dec = {**base, "batches": [decode_prompts], "max_tokens": 64}
        off_s: list[float] = []
        on_s: list[float] = []
        hook_s: list[float] = []
        fwd_s: list[float] = []
        for i in range(3):
            off = engine(dec)
            on = engine({**dec, "connector": {**conn, "prefix": f"dec{i}"}})
            if on["outputs"] != off["outputs"]:
                raise SystemExit("outputs differ with the connector saving")
            off_s.append(off["batch_seconds"][0])
            on_s.append(on["batch_seconds"][0])
            fwd_s.append(on["counters"].get("workers.forward_path_seconds", 0.0))
            hook_s.append(on["counters"].get("scheduler_hook_seconds", 0.0))
    gen_tokens = n_req * 64
    tput_off, tput_on = gen_tokens / median(off_s), gen_tokens / median(on_s)
    result = {
        "benchmark": "engine",
        "machine": machine_info(["vllm", "torch", "obstore"]),
        "model": MODEL.__dict__,
        "prompt_tokens": tokens,
        "ttft_cold_s": cold["ttft_seconds"][0],
        "ttft_warm_s": warm["ttft_seconds"][0],
        "ttft_speedup": cold["ttft_seconds"][0] / warm["ttft_seconds"][0],
        "warm_hit_tokens": warm["first_pass_counters"].get("hit_tokens", 0),
        "warm_outputs_equal_cold": warm["outputs"] == cold["outputs"],
        "fill_chunks_committed": fill["counters"].get("workers.chunks_committed", 0),
        "decode_requests": n_req,
        "decode_seconds_no_connector": off_s,
        "decode_seconds_saving": on_s,
        "throughput_no_connector_tok_s": tput_off,
        "throughput_saving_tok_s": tput_on,
        "saving_throughput_ratio": tput_on / tput_off,
        "connector_forward_path_s": fwd_s,
        "connector_scheduler_hooks_s": hook_s,
        "connector_share_of_run": median(f + h for f, h in zip(fwd_s, hook_s, strict=True))
        / median(on_s),
        "wall_seconds": time.time() - t0,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "engine.json").write_text(json.dumps(result, indent=1))
    print(f"prompt {tokens} tokens: TTFT cold {result['ttft_cold_s']:.2f}s, warm "
          f"{result['ttft_warm_s']:.2f}s -> {result['ttft_speedup']:.1f}x (target >= 5x); "
          f"hit {int(result['warm_hit_tokens'])} tokens; outputs equal: "
          f"{result['warm_outputs_equal_cold']}")
    print(f"decode {n_req}x64 tokens: {tput_off:.1f} tok/s without connector, {tput_on:.1f} "
          f"tok/s saving -> ratio {result['saving_throughput_ratio']:.3f} (target >= 0.95)")
    print(f"time inside the connector on the forward path and scheduler loop: "
          f"{median(fwd_s) * 1000:.0f} ms + {median(hook_s) * 1000:.0f} ms per run = "
          f"{result['connector_share_of_run']:.2%} of the run (the rest of any gap is the "
          f"background uploads and the local S3 server sharing the CPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
