"""Runs real vLLM engines (CPU build) as separate processes for end-to-end tests."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TMP = ROOT / ".tmp"
CHUNK = 256
BLOCK = 128


def make_prompts(seed: int = 0, n: int = 3) -> list[list[int]]:
    """Prompts sharing a 520-token prefix, each with its own tail (all ids < 1000)."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, 1000) for _ in range(520)]
    return [shared + [rng.randrange(3, 1000) for _ in range(300 + 37 * i)] for i in range(n)]


def expected_hit_tokens(prompt_len: int, chunks_committed: int | None = None) -> int:
    """External tokens one request can load when its chunks are committed."""
    n = prompt_len // CHUNK if chunks_committed is None else chunks_committed
    return min(n * CHUNK, (prompt_len - 1) // BLOCK * BLOCK)


@dataclass
class EngineResult:
    outputs: list[list[int]]
    counters: dict[str, float]
    namespace: str | None
    stderr: str
    returncode: int
    raw: dict[str, Any]


def run_engine(job: dict[str, Any], *, expect_ok: bool = True, timeout: int = 600,
               env_update: dict[str, str | None] | None = None) -> EngineResult:
    TMP.mkdir(exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    jp, rp = TMP / f"job-{tag}.json", TMP / f"result-{tag}.json"
    jp.write_text(json.dumps(job))
    env = dict(os.environ, TMPDIR=str(TMP), PYTHONPATH=str(ROOT),
               VLLM_ENABLE_V1_MULTIPROCESSING="0")
    for k, v in (env_update or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    proc = subprocess.run(
        [sys.executable, "-m", "s3kv.vllm.engine_run", str(jp), str(rp)],
        cwd=TMP, env=env, capture_output=True, text=True, timeout=timeout,
    )
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"engine failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    raw = json.loads(rp.read_text()) if rp.exists() else {}
    for p in (jp, rp):
        p.unlink(missing_ok=True)
    return EngineResult(raw.get("outputs", []), raw.get("counters", {}), raw.get("namespace"),
                        proc.stderr, proc.returncode, raw)


def job(model: Path, prompts: list[list[int]], connector: dict[str, Any] | None = None,
        **extra: Any) -> dict[str, Any]:
    j: dict[str, Any] = {"model": str(model), "prompts": prompts, "max_tokens": 8,
                         "block_size": BLOCK}
    if connector is not None:
        j["connector"] = {"chunk_tokens": CHUNK, **connector}
    j.update(extra)
    return j
