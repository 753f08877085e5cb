"""The demo: a cold engine fills the cache, a warm engine in a new process reuses it.

    python -m devtools.demo [--endpoint-url URL --bucket NAME] [--prompts N] [--tokens N]

Without an endpoint it starts an embedded local S3 server (moto) on
127.0.0.1 and creates the bucket. It creates a small random-weight model
(shaped so prefill compute dominates), runs a cold engine with the
connector, then a warm engine in a fresh process on the same prompts, and
prints tokens hit, time to first token cold vs warm, whether the outputs
are identical, and the cached prefixes as ``s3kv ls`` shows them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from devtools.tiny_model import TinyModelSpec, create_tiny_model

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = TinyModelSpec(num_layers=6, hidden_size=768, num_heads=12, num_kv_heads=4,
                           intermediate_size=2048, vocab_size=1024, seed=7)


def _engine(job: dict[str, Any], workdir: Path) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    jp, rp = workdir / f"demo-job-{tag}.json", workdir / f"demo-result-{tag}.json"
    jp.write_text(json.dumps(job))
    # The engine runs in ``workdir``: the repository root on PYTHONPATH keeps
    # devtools importable there (it is not installed with s3kv).
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", TMPDIR=str(workdir),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "devtools.engine_run", str(jp), str(rp)],
                          env=env, cwd=workdir, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"engine failed with exit code {proc.returncode}")
    for line in proc.stderr.splitlines():
        if "s3kv:" in line and ("WARNING" in line or "unavailable" in line):
            print("  engine:", line.split("s3kv:", 1)[1].strip())
    return dict(json.loads(rp.read_text()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m devtools.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint-url", default=os.environ.get("S3KV_ENDPOINT_URL"))
    ap.add_argument("--bucket", default=os.environ.get("S3KV_BUCKET"))
    ap.add_argument("--prefix", default="s3kv-demo")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=2048, help="prompt length in tokens")
    ap.add_argument("--workdir", default=os.environ.get("S3KV_DEMO_DIR", ".tmp/demo"))
    args = ap.parse_args(argv)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(workdir)

    server = None
    if not args.endpoint_url:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "demo")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "demo-secret")
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        args.endpoint_url = f"http://{host}:{port}"
        args.bucket = args.bucket or "s3kv-demo"
        import boto3

        boto3.client("s3", endpoint_url=args.endpoint_url).create_bucket(Bucket=args.bucket)
        print(f"embedded S3 server at {args.endpoint_url}, bucket {args.bucket}")
    if not args.bucket:
        raise SystemExit("--bucket (or S3KV_BUCKET) is required with --endpoint-url")

    print("creating a random-weight model (6 layers, hidden 768) ...")
    model = create_tiny_model(workdir / "models" / "demo", DEMO_MODEL)
    rng = random.Random(11)
    system = [rng.randrange(3, 1024) for _ in range(args.tokens * 3 // 4)]
    prompts = [system + [rng.randrange(3, 1024) for _ in range(args.tokens // 4)]
               for _ in range(args.prompts)]
    connector = {"bucket": args.bucket, "prefix": args.prefix, "endpoint_url": args.endpoint_url,
                 "chunk_tokens": 256}
    base = {"model": str(model), "max_tokens": 16, "block_size": 128,
            "max_model_len": args.tokens + 64, "batches": [[p] for p in prompts],
            "ttft": True, "warmup": True, "kv_cache_bytes": 512 << 20,
            "prefix_caching": False}

    print(f"first engine: {args.prompts} prompts of {args.tokens} tokens, saving to S3 ...")
    cold = _engine({**base, "connector": connector}, workdir)
    print("second engine, new process, empty local cache, loading from S3 ...")
    warm = _engine({**base, "connector": connector}, workdir)
    print("reference engine without the connector (cold prefill) ...")
    ref = _engine(base, workdir)

    c, w = cold["counters"], warm["first_pass_counters"]
    print()
    print(f"namespace            {warm['namespace']}")
    print(f"chunks committed     {int(c.get('workers.chunks_committed', 0))} "
          f"({c.get('workers.bytes_saved', 0) / 2**20:.1f} MiB)")
    print(f"tokens hit (warm)    {int(w.get('hit_tokens', 0))} of {sum(map(len, prompts))} "
          "(the last partial block of each prompt is always computed)")
    print(f"load failures        {int(warm['counters'].get('workers.load_failures', 0))}")
    print("TTFT per prompt      cold        warm       speed-up")
    for i, (tc, tw) in enumerate(zip(ref["ttft_seconds"], warm["ttft_seconds"], strict=True)):
        print(f"  prompt {i}         {tc * 1000:8.1f} ms {tw * 1000:8.1f} ms   {tc / tw:6.1f}x")
    same = cold["outputs"] == warm["outputs"] == ref["outputs"]
    print(f"outputs identical to an engine without the connector: {'yes' if same else 'NO'}")
    print()
    print("cached prefixes (s3kv ls):")
    env = dict(os.environ, S3KV_BUCKET=args.bucket, S3KV_ENDPOINT_URL=args.endpoint_url,
               S3KV_PREFIX=args.prefix)
    subprocess.run([sys.executable, "-m", "s3kv.cli", "ls", warm["namespace"]], env=env)
    if server is not None:
        server.stop()
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
