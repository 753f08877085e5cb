"""Run one vLLM engine over a list of token prompts, as its own process.

Used by the demo, the end-to-end tests and the benchmarks: each engine runs
in a fresh process (as a second machine would), greedy, and reports its
outputs, time to first token and the connector's counters as JSON.

    python -m devtools.engine_run job.json result.json
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any


def _connector(llm: Any) -> Any:
    core = llm.llm_engine.engine_core
    core = getattr(core, "engine_core", core)
    return getattr(core.scheduler, "connector", None)


def _kv_cache_report(llm: Any) -> dict[str, Any]:
    """What vLLM sized its KV cache to: the capacity in tokens it reports and
    one entry per KV cache group (spec kind, layer count, block size)."""
    core = llm.llm_engine.engine_core
    core = getattr(core, "engine_core", core)
    cfg = core.scheduler.kv_cache_config
    groups = [{"kind": type(g.kv_cache_spec).__name__, "layers": len(g.layer_names),
               "block_size": g.kv_cache_spec.block_size,
               "window": getattr(g.kv_cache_spec, "sliding_window", None)}
              for g in cfg.kv_cache_groups]
    tokens = getattr(llm.llm_engine.vllm_config.cache_config, "kv_cache_size_tokens", None)
    return {"kv_cache_tokens": tokens, "kv_cache_blocks": cfg.num_blocks,
            "kv_cache_groups": groups}


def run(job: dict[str, Any]) -> dict[str, Any]:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if job.get("tp", 1) > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(
            str(i % (os.cpu_count() or 1)) for i in range(job["tp"])))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs: dict[str, Any] = dict(
        model=job["model"], dtype=job.get("dtype", "float32"), enforce_eager=True,
        max_model_len=job.get("max_model_len", 4096), block_size=job.get("block_size", 128),
        kv_cache_memory_bytes=job.get("kv_cache_bytes", 256 << 20), skip_tokenizer_init=True,
        seed=0, tensor_parallel_size=job.get("tp", 1),
        max_num_batched_tokens=job.get("max_num_batched_tokens", 8192),
        enable_prefix_caching=job.get("prefix_caching", True),
    )
    if job.get("compilation_config"):
        kwargs["compilation_config"] = job["compilation_config"]
    # Any other engine setting, exactly as a user passes it (e.g. hf_overrides).
    kwargs.update(job.get("llm_kwargs") or {})
    if job.get("connector"):
        kwargs["kv_transfer_config"] = {
            "kv_connector": "S3KVConnector", "kv_role": job.get("kv_role", "kv_both"),
            "kv_connector_extra_config": job["connector"],
        }
        if job.get("module_path"):
            kwargs["kv_transfer_config"]["kv_connector_module_path"] = "s3kv.vllm.connector"
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    startup = time.perf_counter() - t0
    extra = ({"kv_transfer_params": job["kv_transfer_params"]}
             if job.get("kv_transfer_params") else None)
    # ``logprobs``: also record the best ``logprobs`` logprobs of every generated
    # token (fp32 logits: the gap of the two best is the logit margin itself).
    top = int(job.get("logprobs") or 0)
    params = SamplingParams(max_tokens=job.get("max_tokens", 8), temperature=0.0,
                            ignore_eos=True, extra_args=extra, logprobs=top or None)
    conn = _connector(llm)
    kv_cache = _kv_cache_report(llm)
    if job.get("warmup"):
        # One unrelated short request first, so one-time start-up costs of the
        # first forward pass are not counted as anyone's time to first token.
        llm.generate([TokensPrompt(prompt_token_ids=[5] * 64)],
                     SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    outputs: list[list[int]] = []
    seconds: list[float] = []
    ttfts: list[float] = []
    batches = job.get("batches") or [job["prompts"]]
    first_pass: dict[str, float] = {}
    top_logprobs: list[list[list[float]]] = []
    batch_counters: list[dict[str, float]] = []
    if job.get("ttft"):
        # Time to first token: a one-token generation per batch, measured alone.
        for batch in batches:
            t = time.perf_counter()
            llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch],
                         SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
            ttfts.append(time.perf_counter() - t)
        first_pass = conn.counters.snapshot() if conn is not None else {}
    for batch in batches:
        t = time.perf_counter()
        res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], params,
                           use_tqdm=False)
        seconds.append(time.perf_counter() - t)
        outputs.extend(list(r.outputs[0].token_ids) for r in res)
        # The scheduler's counters after each batch: tests compare batches.
        batch_counters.append(conn.counters.snapshot() if conn is not None else {})
        if top:
            top_logprobs.extend(_top_logprobs(r, top) for r in res)
    counters = conn.counters.snapshot() if conn is not None else {}
    if conn is not None:
        # The scheduler's connector holds only the scheduler-side counters; the
        # workers' (saves, loads) live in each rank's own connector instance.
        counters.update(_worker_counters(llm))
    result = {"outputs": outputs, "batch_seconds": seconds, "ttft_seconds": ttfts,
              "startup_s": startup, "counters": counters, "first_pass_counters": first_pass,
              "batch_counters": batch_counters, "top_logprobs": top_logprobs,
              "namespace": (conn.fingerprint.namespace
                            if conn is not None and conn.fingerprint is not None else None),
              **kv_cache}
    _shutdown(llm)
    return result


def _top_logprobs(res: Any, top: int) -> list[list[float]]:
    """Per generated token: ``[token, best logprob, second logprob, ...]``."""
    steps = []
    for step in res.outputs[0].logprobs or []:
        ranked = sorted(step.items(), key=lambda kv: kv[1].rank or 0)[:top]
        if len(ranked) < top:
            raise RuntimeError(f"vLLM returned {len(ranked)} logprobs, asked for {top}")
        steps.append([ranked[0][0], *(lp.logprob for _, lp in ranked)])
    return steps


def _worker_counters(llm: Any) -> dict[str, float]:
    """Sum the worker-side counters over every rank (TP>1 runs workers apart)."""
    def grab(worker: Any) -> dict[str, float]:
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        c: Any = get_kv_transfer_group()
        c.flush(60)  # committed chunks are counted only once their manifest is written
        return dict(c.counters.snapshot())

    try:
        per_rank = llm.collective_rpc(grab)
    except Exception:
        return {}
    out: dict[str, float] = {}
    for snap in per_rank:
        for k, v in snap.items():
            out[f"workers.{k}"] = out.get(f"workers.{k}", 0) + v
    return out


def _shutdown(llm: Any) -> None:
    conn = _connector(llm)
    if conn is not None:
        conn.shutdown()
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()


def main(argv: list[str]) -> int:
    # vLLM logs to stdout, which every runner of this script discards; its log
    # (KV cache groups, capacity, warnings) belongs with the engine's stderr.
    sys.stdout.flush()
    os.dup2(2, 1)
    # s3kv's own INFO lines (namespace, how SSM states are stored) go there too.
    s3kv_log = logging.getLogger("s3kv")
    s3kv_log.setLevel(logging.INFO)
    s3kv_log.addHandler(logging.StreamHandler(sys.stderr))
    job = json.loads(Path(argv[0]).read_text())
    result = run(job)
    Path(argv[1]).write_text(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)  # vLLM's atexit teardown can stall on CPU; results are written


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
