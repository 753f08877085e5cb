"""s3kv's GPU save and load path: forward-path time and copy rates, against raw copies.

    python -m bench.gpu_forward [--json PATH] [--junit PATH] [--quick] [--copy-only]

One Llama-3.1-8B-shaped chunk (32 layers, 8 KV heads, head size 128, bf16,
256 tokens: 32 MiB of KV) in vLLM's FlashAttention cache layout, saved and
loaded through s3kv's worker side (in-memory store, TP=1), all in one run:

* step: the GPU time of a representative forward step, the bf16 matmuls of
  a Llama-3.1-8B prefill of 256 tokens (the smallest step that fills a
  chunk, so the least time to hide a save behind) and of 2,048 tokens
  (a common prefill budget per step: 8 chunks);
* forward path: host time inside ``start_load_kv`` + ``wait_for_save``
  (called in vLLM's order, after the step's launch: ``Rig.step``) with that
  step still queued on the stream, as a fraction of the step, and whether
  the step was still running when they returned;
* interference: the step's GPU time when every step saves its chunks (their
  device-to-host copy overlaps the next step; their gather, queued on the
  same stream between two steps, is measured apart under copy-out) over
  the step's time without saving;
* copy-out: the save path's copy (``s3kv.vllm.saver.CopyOut``: gather on the
  current stream, device-to-host on a side stream into pinned memory) of 1
  and of 8 chunks, from issue to completion, over a raw
  ``pinned.copy_(contiguous, non_blocking)`` of the same bytes; and its two
  parts alone: the gather's GPU time, and the device-to-host copy from the
  staging buffer; copy-in: ``KVBlocks.copy_in`` from a pageable buffer (a
  fetched body, as loads get it) and from a pinned one, over raw copies;
* ordering control: the overwrite race of ``tests/gpu`` (the next step's
  forward writes the saved blocks right after ``wait_for_save``) run with
  the old scheme, the whole copy-out on a side stream, and with the save
  path's: how often the saved bytes are wrong (the old scheme's count shows
  the test can fail; the save path's must be 0).

Prints one table; ``--junit`` adds the outcome of the GPU tests to it.
``--copy-only`` measures only the copy rates and the ordering control.
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

# The rig first: on a GPU host without vLLM it stands in for vLLM's metadata base class.
from devtools.gpu_rig import Rig, chunk_id  # noqa: E402, I001
from s3kv.vllm.kv_layout import KVBlocks  # noqa: E402
from s3kv.vllm.metadata import S3KVMetadata  # noqa: E402
from s3kv.vllm.saver import CopyOut  # noqa: E402
from devtools.gpu_layouts import GPU_LAYOUTS  # noqa: E402

HIDDEN, INTER, Q_HEADS, KV_HEADS, HEAD, LAYERS, TOKENS = 4096, 14336, 32, 8, 128, 32, 256


class Step:
    """The matmuls of one Llama-3.1-8B prefill of ``tokens`` tokens (weights shared by layers)."""

    def __init__(self, tokens: int) -> None:
        dev, dt = "cuda", torch.bfloat16
        self.x = torch.randn(tokens, HIDDEN, device=dev, dtype=dt)
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


def _events() -> tuple[torch.cuda.Event, torch.cuda.Event]:
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


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


class Bench:
    def __init__(self, reps: int) -> None:
        self.reps = reps
        self.rig = Rig(GPU_LAYOUTS[0], "cuda", layers=LAYERS, heads=KV_HEADS, head_size=HEAD,
                       block_size=16, chunk_tokens=TOKENS, num_blocks=512,
                       max_inflight_mib=16384)
        if self.rig.worker is None:
            raise RuntimeError("worker side not built")
        self.w = self.rig.worker
        self.rig.canonical(seed=0)
        self.n = 0
        self.cycles_per_ms = _cycles_per_ms()

    def chunks(self, count: int) -> list[tuple[str, list[int]]]:
        k = self.rig.blocks_per_chunk
        out = [(chunk_id(10_000 + self.n + c), list(range(c * k, (c + 1) * k)))
               for c in range(count)]
        self.n += count
        return out

    def settle(self) -> None:
        if not self.w.flush(timeout=300):
            raise RuntimeError("saves did not settle")

    def forward_path(self, chunks: int) -> dict[str, Any]:
        """One step of ``chunks`` x 256 tokens; host time in s3kv's two forward-path calls."""
        step = Step(chunks * TOKENS)
        for _ in range(3):
            step.run()
        step_ms = statistics.median(_gpu_ms(step.run, self.reps))
        host_ms: list[float] = []
        still_busy = 0
        for i in range(self.reps + 5):  # 5 warm-up rounds: first pinned allocations
            torch.cuda.synchronize()
            # Keep the stream busy well past the host's calls, so "still running"
            # means s3kv did not wait for it, not that the step was short.
            torch.cuda._sleep(int(20 * self.cycles_per_ms))
            step.run()
            end = torch.cuda.Event()
            end.record()
            meta = self.rig.save_meta(self.chunks(chunks))
            t0 = time.perf_counter()
            self.rig.step(meta)  # the hooks, after the step's launch
            dt = (time.perf_counter() - t0) * 1e3
            busy = not end.query()
            if i >= 5:
                host_ms.append(dt)
                still_busy += busy
            self.settle()
        host_ms.sort()

        def steps(save: bool) -> list[float]:
            pairs = []
            for _ in range(self.reps):
                a, b = _events()

                def forward(a: Any = a, b: Any = b) -> None:
                    a.record()
                    step.run()
                    b.record()

                self.rig.step(self.rig.save_meta(self.chunks(chunks)) if save
                              else S3KVMetadata(), forward)
                pairs.append((a, b))
            torch.cuda.synchronize()
            ms = [a.elapsed_time(b) for a, b in pairs]
            self.settle()
            return ms

        plain, saving = steps(False), steps(True)
        return {
            "chunks_per_step": chunks,
            "step_ms": step_ms,
            "host_ms_median": statistics.median(host_ms),
            "host_ms_max": host_ms[-1],
            "fraction_of_step": statistics.median(host_ms) / step_ms,
            "returned_while_step_running": f"{still_busy}/{len(host_ms)}",
            "step_slowdown_saving": statistics.median(saving) / statistics.median(plain),
        }

    def copy_rates(self) -> dict[str, Any]:
        rig = self.rig
        kv = KVBlocks(rig.caches, rig.num_blocks, rig.heads, rig.block_size)
        copy = CopyOut(kv)
        nbytes = rig.chunk_payload_bytes
        k = rig.blocks_per_chunk
        other, offsets = list(range(100, 100 + k)), list(range(k))
        side, load = torch.cuda.Stream(), torch.cuda.Stream()
        pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        pageable = torch.empty(nbytes, dtype=torch.uint8)
        dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        dst = kv.payload_view(pinned, rig.heads, k)
        dst_pageable = kv.payload_view(pageable, rig.heads, k)

        def timed(fn: Any, stream: torch.cuda.Stream) -> list[float]:
            out = []
            for _ in range(self.reps):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.cuda.stream(stream):
                    fn()
                stream.synchronize()
                out.append((time.perf_counter() - t0) * 1e3)
            return out

        def copy_out(chunks: list[list[int]], dsts: list[torch.Tensor]) -> list[float]:
            """The save path's copy, issue (host) to the last byte in pinned memory."""
            out = []
            for _ in range(self.reps):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                done = copy.start(chunks, dsts)
                if done is not None:
                    done()
                out.append((time.perf_counter() - t0) * 1e3)
            return out

        r: dict[str, Any] = {}
        for n in (1, 8):
            chunks = [list(range(c * k, (c + 1) * k)) for c in range(n)]
            hosts = [pinned] + [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
                                for _ in range(n - 1)]
            dsts = [kv.payload_view(h, rig.heads, k) for h in hosts]
            dev_n = torch.empty(n * nbytes, dtype=torch.uint8, device="cuda")
            pinned_n = torch.empty(n * nbytes, dtype=torch.uint8, pin_memory=True)
            staging = kv.gather(chunks)
            sfx = "" if n == 1 else f"_{n}"
            r[f"copy_out{sfx}_GBps"] = _rate(n * nbytes, copy_out(chunks, dsts))
            r[f"raw_d2h_pinned{sfx}_GBps"] = _rate(
                n * nbytes, timed(lambda p=pinned_n, d=dev_n: p.copy_(d, non_blocking=True),
                                  side))
            r[f"copy_out{sfx}_vs_raw"] = r[f"copy_out{sfx}_GBps"] / r[f"raw_d2h_pinned{sfx}_GBps"]
            # The parts: the gather (GPU time on the current stream) ...
            r[f"gather{sfx}_GBps"] = _rate(
                n * nbytes, _gpu_ms(lambda c=chunks: kv.gather(c), self.reps))
            # ... and the device-to-host copy out of a gathered staging buffer.
            r[f"d2h_from_staging{sfx}_GBps"] = _rate(n * nbytes, timed(
                lambda g=staging, c=chunks, d=dsts: kv.unpack(g, [len(x) for x in c], d), side))
        r.update({
            "copy_in_pageable_GBps": _rate(
                nbytes, timed(lambda: kv.copy_in(dst_pageable, offsets, other), load)),
            "copy_in_pinned_GBps": _rate(
                nbytes, timed(lambda: kv.copy_in(dst, offsets, other), load)),
            "raw_h2d_pageable_GBps": _rate(nbytes, timed(lambda: dev.copy_(pageable), load)),
            "raw_h2d_pinned_GBps": _rate(
                nbytes, timed(lambda: dev.copy_(pinned, non_blocking=True), load)),
        })
        r["copy_in_vs_raw_pageable"] = r["copy_in_pageable_GBps"] / r["raw_h2d_pageable_GBps"]
        return r

    def ordering_control(self, rounds: int) -> dict[str, str]:
        """The overwrite race of tests/gpu in vLLM's hook order: a step's forward
        writes a chunk, the copy-out is queued, and the next step's forward
        overwrites the chunk's blocks at once. ``side_stream_gather`` is the old
        scheme (the whole copy-out on a side stream that waited for the
        forward stream): nothing orders the overwrite after it.
        ``save_path`` is ``CopyOut`` (gather on the forward stream)."""
        rig = self.rig
        kv = KVBlocks(rig.caches, rig.num_blocks, rig.heads, rig.block_size)
        copy = CopyOut(kv)
        side = torch.cuda.Stream()
        k = rig.blocks_per_chunk
        chunks = [list(range(c * k, (c + 1) * k)) for c in range(8)]
        hosts = [torch.empty(rig.chunk_payload_bytes, dtype=torch.uint8, pin_memory=True)
                 for _ in chunks]
        dsts = [kv.payload_view(h, rig.heads, k) for h in hosts]
        every = torch.tensor([b for c in chunks for b in c]).pin_memory().to(
            "cuda", non_blocking=True)
        first = torch.tensor(chunks[0]).pin_memory().to("cuda", non_blocking=True)

        def fill(idx: torch.Tensor, value: float) -> None:
            for t in rig.caches.values():
                t.index_fill_(rig.layout.block_dim, idx, value)

        def old_scheme() -> None:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                kv.copy_out(chunks, dsts)

        out = {}
        for name, start in (("side_stream_gather", old_scheme),
                            ("save_path", lambda: copy.start(chunks, dsts))):
            wrong = 0
            for i in range(rounds):
                torch.cuda.synchronize()
                torch.cuda._sleep(int(20 * self.cycles_per_ms))  # step t, still running
                fill(every, float(i + 1))  # its KV
                start()  # wait_for_save (start_load_kv of step t+1 comes after its launch)
                fill(first, -2.0)  # step t+1's forward, in the reallocated blocks
                torch.cuda.synchronize()
                wrong += not bool((dsts[0].float() == i + 1).all())
            out[name] = f"{wrong}/{rounds}"
        return out

    def profile(self, chunks: int, out: Path) -> None:
        """Where the forward-path host time goes (cProfile, top functions)."""
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        for _ in range(10):
            meta = self.rig.save_meta(self.chunks(chunks))
            prof.enable()
            self.rig.step(meta)
            prof.disable()
            self.settle()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(20)
        out.write_text(buf.getvalue())


def measure(quick: bool, profile_to: Path | None, copy_only: bool = False) -> dict[str, Any]:
    b = Bench(reps=10 if quick else 30)
    res: dict[str, Any] = {"chunk_bytes": b.rig.chunk_payload_bytes}
    if not copy_only:
        res["step_1_chunk"] = b.forward_path(1)
        res["step_8_chunks"] = b.forward_path(8)
    res.update(b.copy_rates())
    res["overwrite_wrong_rounds"] = b.ordering_control(10 if quick else 20)
    if profile_to is not None and not copy_only:
        b.profile(8, profile_to)
    res["saves_dropped"] = b.w.counters.get("saves_dropped")
    b.rig.close()
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
    ap.add_argument("--copy-only", action="store_true",
                    help="only the copy rates and the ordering control (no forward steps)")
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
    res = measure(args.quick, args.json.with_suffix(".profile.txt"), args.copy_only)
    info["results"] = res
    rows.append(("chunk (Llama-3.1-8B, 256 tok, bf16)", f"{res['chunk_bytes'] / 2**20:.0f} MiB"))
    for key in ("step_1_chunk", "step_8_chunks"):
        if key not in res:
            continue
        f = res[key]
        c = f["chunks_per_step"]
        rows += [
            (f"step: {c * TOKENS}-token prefill matmuls", f"{f['step_ms']:.2f} ms"),
            (f"  forward path, {c} chunk(s) saved",
             f"median {f['host_ms_median']:.3f} ms, max {f['host_ms_max']:.3f} ms"
             f" = {f['fraction_of_step']:.3f} of the step"),
            ("  returned while the step still ran", f["returned_while_step_running"]),
            ("  step GPU time saving / not saving", f"{f['step_slowdown_saving']:.3f}"),
        ]
    for sfx, what in (("", "1 chunk"), ("_8", "8 chunks")):
        rows += [
            (f"copy-out, {what} (gather + D2H to pinned)",
             f"{res[f'copy_out{sfx}_GBps']:.1f} GB/s vs raw "
             f"{res[f'raw_d2h_pinned{sfx}_GBps']:.1f} GB/s ({res[f'copy_out{sfx}_vs_raw']:.2f}x)"),
            ("  gather alone (forward stream, GPU time)", f"{res[f'gather{sfx}_GBps']:.1f} GB/s"),
            ("  D2H from the staging buffer (side stream)",
             f"{res[f'd2h_from_staging{sfx}_GBps']:.1f} GB/s"),
        ]
    ctl = res["overwrite_wrong_rounds"]
    rows += [
        ("copy-in from pageable (load path)",
         f"{res['copy_in_pageable_GBps']:.1f} GB/s vs raw {res['raw_h2d_pageable_GBps']:.1f} GB/s"
         f" ({res['copy_in_vs_raw_pageable']:.2f}x)"),
        ("copy-in from pinned",
         f"{res['copy_in_pinned_GBps']:.1f} GB/s vs raw {res['raw_h2d_pinned_GBps']:.1f} GB/s"),
        ("saves dropped (upload memory full)", f"{res['saves_dropped']:.0f}"),
        ("overwrite race: old side-stream gather", f"{ctl['side_stream_gather']} rounds wrong"),
        ("overwrite race: save path (must be 0)", f"{ctl['save_path']} rounds wrong"),
    ]
    _print(rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    ordered = ctl["save_path"].startswith("0/")
    return 0 if ordered and not info.get("gpu_tests", {}).get("failed") else 1


def _print(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"{'s3kv GPU check':<{width}} | result")
    print(f"{'-' * width}-|-{'-' * 40}")
    for k, v in rows:
        print(f"{k:<{width}} | {v}")


if __name__ == "__main__":
    raise SystemExit(main())
