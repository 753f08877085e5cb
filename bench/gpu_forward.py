"""s3kv's GPU save and load path: forward-path time and copy rates, against raw copies.

    python -m bench.gpu_forward [--json PATH] [--junit PATH] [--quick]

One Llama-3.1-8B-shaped chunk (32 layers, 8 KV heads, head size 128, bf16,
256 tokens: 32 MiB of KV) in vLLM's FlashAttention cache layout, saved and
loaded through s3kv's worker side (in-memory store, TP=1), all in one run:

* step: the GPU time of a representative forward step, the bf16 matmuls of
  a 256-token Llama-3.1-8B prefill (the smallest step that fills a chunk, so
  the least time to hide a save behind);
* forward path: host time inside ``wait_for_save`` + ``start_load_kv`` with
  that step still queued on the stream, as a fraction of the step, and
  whether the step was still running when they returned;
* interference: the step's GPU time when every step saves a chunk (its
  copy-out overlaps the next step) over the step's time without saving;
* copy-out: ``KVBlocks.copy_out`` on a side stream into pinned memory, from
  issue to completion, over a raw ``pinned.copy_(contiguous, non_blocking)``
  of the same bytes; copy-in: ``KVBlocks.copy_in`` from a pageable buffer (a
  fetched body, as loads get it) and from a pinned one, over raw copies;
* ordering control: the overwrite race of ``tests/gpu`` run *without* the
  ordering ``start_load_kv`` establishes: how often the saved bytes are
  wrong when that ordering is missing (shows the test can fail).

Prints one table; ``--junit`` adds the outcome of the GPU tests to it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from s3kv.vllm.kv_layout import KVBlocks  # noqa: E402
from s3kv.vllm.metadata import S3KVMetadata  # noqa: E402
from tests.gpu.layouts import GPU_LAYOUTS  # noqa: E402
from tests.gpu.rig import Rig, chunk_id  # noqa: E402

HIDDEN, INTER, Q_HEADS, KV_HEADS, HEAD, LAYERS, TOKENS = 4096, 14336, 32, 8, 128, 32, 256


def _events() -> tuple[torch.cuda.Event, torch.cuda.Event]:
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


class Step:
    """The matmuls of one Llama-3.1-8B prefill of ``TOKENS`` tokens (weights shared by layers)."""

    def __init__(self) -> None:
        dev, dt = "cuda", torch.bfloat16
        self.x = torch.randn(TOKENS, HIDDEN, device=dev, dtype=dt)
        self.w_qkv = torch.randn(HIDDEN, (Q_HEADS + 2 * KV_HEADS) * HEAD, device=dev, dtype=dt)
        self.w_o = torch.randn(HIDDEN, HIDDEN, device=dev, dtype=dt)
        self.w_up = torch.randn(HIDDEN, 2 * INTER, device=dev, dtype=dt)
        self.w_down = torch.randn(INTER, HIDDEN, device=dev, dtype=dt)

    def run(self) -> None:
        h = self.x
        for _ in range(LAYERS):
            qkv = h @ self.w_qkv
            h = qkv[:, :HIDDEN] @ self.w_o
            up = h @ self.w_up
            h = (up[:, :INTER] * up[:, INTER:]) @ self.w_down
            h = h * 1e-3


def _gpu_ms(fn: Any, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        a, b = _events()
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return out


def _cycles_per_ms() -> float:
    torch.cuda._sleep(1_000_000)
    a, b = _events()
    a.record()
    torch.cuda._sleep(50_000_000)
    b.record()
    b.synchronize()
    return float(50_000_000 / a.elapsed_time(b))


def _rate(nbytes: int, ms: list[float]) -> float:
    return nbytes / (statistics.median(ms) / 1e3) / 1e9


def measure(quick: bool) -> dict[str, Any]:
    reps = 10 if quick else 30
    rig = Rig(GPU_LAYOUTS[0], "cuda", layers=LAYERS, heads=KV_HEADS, head_size=HEAD,
              block_size=16, chunk_tokens=TOKENS, num_blocks=512, max_inflight_mib=8192)
    w = rig.worker
    if w is None:
        raise RuntimeError("worker side not built")
    rig.canonical(seed=0)
    chunk = list(range(rig.blocks_per_chunk))
    nbytes = rig.chunk_payload_bytes
    step = Step()
    for _ in range(3):
        step.run()
    torch.cuda.synchronize()
    res: dict[str, Any] = {"chunk_bytes": nbytes}

    # Step alone.
    step_ms = _gpu_ms(step.run, reps)
    res["step_ms"] = statistics.median(step_ms)

    # Forward path: host time in wait_for_save + start_load_kv with the step queued.
    # Warm-up rounds first (first pinned allocations), then measured rounds.
    host_ms: list[float] = []
    still_busy = 0
    n = 0
    cycles_per_ms = _cycles_per_ms()
    for i in range(reps + 5):
        torch.cuda.synchronize()
        # Keep the stream busy well past the host's calls, so "still running"
        # means s3kv did not wait for it, not that the step was short.
        torch.cuda._sleep(int(20 * cycles_per_ms))
        step.run()
        end = torch.cuda.Event()
        end.record()
        t0 = time.perf_counter()
        w.wait_for_save(rig.save_meta([(chunk_id(10_000 + n), chunk)]))
        w.start_load_kv(S3KVMetadata())
        dt = (time.perf_counter() - t0) * 1e3
        busy = not end.query()
        n += 1
        if i >= 5:
            host_ms.append(dt)
            still_busy += busy
        if not w.flush(timeout=120):
            raise RuntimeError("saves did not settle")
    host_ms.sort()
    res["forward_path_ms_median"] = statistics.median(host_ms)
    res["forward_path_ms_max"] = host_ms[-1]
    res["forward_path_fraction_of_step"] = statistics.median(host_ms) / res["step_ms"]
    res["returned_while_step_running"] = f"{still_busy}/{len(host_ms)}"

    # Interference: back-to-back steps, each followed by a save, against none.
    def steps(save: bool) -> list[float]:
        nonlocal n
        ms = []
        pairs = []
        for _ in range(reps):
            a, b = _events()
            a.record()
            step.run()
            b.record()
            pairs.append((a, b))
            if save:
                w.wait_for_save(rig.save_meta([(chunk_id(10_000 + n), chunk)]))
                n += 1
            w.start_load_kv(S3KVMetadata())
        torch.cuda.synchronize()
        ms = [a.elapsed_time(b) for a, b in pairs]
        if not w.flush(timeout=120):
            raise RuntimeError("saves did not settle")
        return ms

    plain, saving = steps(False), steps(True)
    res["step_ms_saving_every_step"] = statistics.median(saving)
    res["step_slowdown_saving"] = statistics.median(saving) / statistics.median(plain)

    # Copy rates, idle GPU.
    kv = KVBlocks(rig.caches, rig.num_blocks, rig.heads, rig.block_size)
    side, load = torch.cuda.Stream(), torch.cuda.Stream()
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(nbytes, dtype=torch.uint8)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = kv.payload_view(pinned, rig.heads, len(chunk))
    dst_pageable = kv.payload_view(pageable, rig.heads, len(chunk))
    other = list(range(100, 100 + len(chunk)))
    offsets = list(range(len(chunk)))

    def timed(fn: Any, stream: torch.cuda.Stream) -> list[float]:
        out = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.cuda.stream(stream):
                fn()
            stream.synchronize()
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    res["copy_out_GBps"] = _rate(nbytes, timed(lambda: kv.copy_out(chunk, dst), side))
    res["raw_d2h_pinned_GBps"] = _rate(
        nbytes, timed(lambda: pinned.copy_(dev, non_blocking=True), side))
    res["copy_in_pageable_GBps"] = _rate(
        nbytes, timed(lambda: kv.copy_in(dst_pageable, offsets, other), load))
    res["copy_in_pinned_GBps"] = _rate(
        nbytes, timed(lambda: kv.copy_in(dst, offsets, other), load))
    res["raw_h2d_pageable_GBps"] = _rate(nbytes, timed(lambda: dev.copy_(pageable), load))
    res["raw_h2d_pinned_GBps"] = _rate(
        nbytes, timed(lambda: dev.copy_(pinned, non_blocking=True), load))
    res["copy_out_vs_raw"] = res["copy_out_GBps"] / res["raw_d2h_pinned_GBps"]
    res["copy_in_vs_raw_pageable"] = res["copy_in_pageable_GBps"] / res["raw_h2d_pageable_GBps"]

    # Ordering control: the overwrite race without start_load_kv's wait.
    rounds, wrong = (10 if quick else 20), 0
    idx = torch.tensor(chunk).pin_memory().to("cuda", non_blocking=True)
    for i in range(rounds):
        for t in rig.caches.values():
            t.index_fill_(rig.layout.block_dim, idx, float(i + 1))
        cid = chunk_id(20_000 + i)
        w.wait_for_save(rig.save_meta([(cid, chunk)]))
        for t in rig.caches.values():  # the next step overwrites, not ordered after the copy
            t.index_fill_(rig.layout.block_dim, idx, -2.0)
        if not w.flush(timeout=120):
            raise RuntimeError("saves did not settle")
        entry = rig.manifest(cid).shard_for_rank(0)
        body = bytearray(rig.get(entry.key))
        payload = torch.frombuffer(body, dtype=torch.uint8)[entry.payload_offset:]
        wrong += not bool((payload.view(torch.bfloat16).float() == i + 1).all())
        w.start_load_kv(S3KVMetadata())  # drop the pending wait before the next round
    res["unordered_overwrite_wrong_rounds"] = f"{wrong}/{rounds}"
    res["saves_dropped"] = w.counters.get("saves_dropped")
    rig.close()
    return res


def junit_summary(path: Path) -> dict[str, Any]:
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        raise ValueError(f"{path}: no testsuite")
    a = suite.attrib
    total, fail, err, skip = (int(a.get(k, 0)) for k in ("tests", "failures", "errors",
                                                          "skipped"))
    failed = [f"{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return {"tests": total, "passed": total - fail - err - skip, "failed": fail + err,
            "skipped": skip, "failed_names": failed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "gpu_forward.json")
    ap.add_argument("--junit", type=Path, help="the GPU tests' junit XML, summarized in the table")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    rows: list[tuple[str, str]] = []
    if args.junit is not None and args.junit.exists():
        t = junit_summary(args.junit)
        info["gpu_tests"] = t
        rows.append(("GPU tests (tests/gpu)", f"{t['passed']} passed, {t['failed']} failed, "
                     f"{t['skipped']} skipped"))
        rows += [("  failed", name) for name in t["failed_names"]]
    if not torch.cuda.is_available():
        rows.append(("GPU", "none: torch.cuda.is_available() is False; figures not measured"))
        _print(rows)
        return 0 if not info.get("gpu_tests", {}).get("failed") else 1
    info["gpu"] = torch.cuda.get_device_name(0)
    info["cuda"] = torch.version.cuda
    rows += [("GPU", f"{info['gpu']} (torch {torch.__version__}, CUDA {info['cuda']})")]
    res = measure(args.quick)
    info["results"] = res
    rows += [
        ("chunk (Llama-3.1-8B, 256 tok, bf16)", f"{res['chunk_bytes'] / 2**20:.0f} MiB"),
        ("step: 256-token prefill matmuls", f"{res['step_ms']:.2f} ms"),
        ("forward path (wait_for_save+start_load_kv)",
         f"median {res['forward_path_ms_median']:.3f} ms, max {res['forward_path_ms_max']:.3f} ms"),
        ("  fraction of the step", f"{res['forward_path_fraction_of_step']:.4f}"),
        ("  returned while the step still ran", res["returned_while_step_running"]),
        ("step time saving every step / not saving", f"{res['step_slowdown_saving']:.3f}"),
        ("copy-out (side stream -> pinned)",
         f"{res['copy_out_GBps']:.1f} GB/s vs raw {res['raw_d2h_pinned_GBps']:.1f} GB/s "
         f"({res['copy_out_vs_raw']:.2f}x)"),
        ("copy-in from pageable (load path)",
         f"{res['copy_in_pageable_GBps']:.1f} GB/s vs raw {res['raw_h2d_pageable_GBps']:.1f} GB/s"
         f" ({res['copy_in_vs_raw_pageable']:.2f}x)"),
        ("copy-in from pinned",
         f"{res['copy_in_pinned_GBps']:.1f} GB/s vs raw {res['raw_h2d_pinned_GBps']:.1f} GB/s"),
        ("saves dropped (upload memory full)", f"{res['saves_dropped']:.0f}"),
        ("control: overwrite without the ordering", f"{res['unordered_overwrite_wrong_rounds']}"
         " rounds saved wrong bytes"),
    ]
    _print(rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    return 0 if not info.get("gpu_tests", {}).get("failed") else 1


def _print(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"{'s3kv GPU check':<{width}} | result")
    print(f"{'-' * width}-|-{'-' * 40}")
    for k, v in rows:
        print(f"{k:<{width}} | {v}")


if __name__ == "__main__":
    raise SystemExit(main())
