"""Runs real vLLM engines (CPU build) as separate processes for end-to-end tests."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from s3kv.config import Settings
from tests.vllm.forker import kill_tree, read_message, socket_address

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


class _Forker:
    """The session's :mod:`tests.vllm.forker`: started on first use, ended with
    the session (its stdin closes when this process exits)."""

    _proc: subprocess.Popen[bytes] | None = None
    _name = f"s3kv-forker-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    @classmethod
    def submit(cls, req: dict[str, Any], base_env: dict[str, str]) -> _ForkedProcess:
        if cls._proc is None or cls._proc.poll() is not None:
            TMP.mkdir(exist_ok=True)
            with (TMP / "forker-stderr.txt").open("wb") as err:
                cls._proc = subprocess.Popen(
                    [sys.executable, "-m", "tests.vllm.forker", cls._name],
                    cwd=TMP, env=base_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=err)
            out = cls._proc.stdout
            if out is None or out.readline().strip() != b"ready":
                raise RuntimeError("the engine forker did not start: see "
                                   f"{TMP / 'forker-stderr.txt'}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(socket_address(cls._name))
        sock.sendall(json.dumps(req).encode() + b"\n")
        return _ForkedProcess(sock, int(read_message(sock, 120)["pid"]))


class _ForkedProcess:
    """An engine the forker started, with the part of :class:`subprocess.Popen`'s
    interface the harness uses (the forker, its parent, reports its exit code)."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self._sock = sock
        self.pid = pid
        self.returncode: int | None = None

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            try:
                self.returncode = int(read_message(self._sock, timeout)["rc"])
            except TimeoutError:
                raise subprocess.TimeoutExpired(f"engine {self.pid}", timeout or 0) from None
            self._sock.close()
        return self.returncode


class RunningEngine:
    """An engine process started by :func:`start_engine`; :meth:`wait` reads its result.

    Engines are forked from :mod:`tests.vllm.forker` (vLLM already imported);
    ``S3KV_TEST_FRESH_ENGINES=1`` starts each as a fresh interpreter instead.
    """

    def __init__(self, job: dict[str, Any], env_update: dict[str, str | None] | None) -> None:
        TMP.mkdir(exist_ok=True)
        tag = uuid.uuid4().hex[:8]
        self._jp, self._rp = TMP / f"job-{tag}.json", TMP / f"result-{tag}.json"
        self._err = TMP / f"stderr-{tag}.txt"
        self._jp.write_text(json.dumps(job))
        # Models are local directories: never ask the Hugging Face hub (a lookup
        # that cannot connect cost one model 48 s at start-up).
        base = dict(os.environ, TMPDIR=str(TMP), PYTHONPATH=str(ROOT),
                    VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1")
        env = dict(base)
        for k, v in (env_update or {}).items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        self.proc: subprocess.Popen[bytes] | _ForkedProcess
        if os.environ.get("S3KV_TEST_FRESH_ENGINES") == "1":
            with self._err.open("wb") as err:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "devtools.engine_run", str(self._jp), str(self._rp)],
                    cwd=TMP, env=env, stdout=subprocess.DEVNULL, stderr=err,
                )
        else:
            self.proc = _Forker.submit(
                {"job": str(self._jp), "result": str(self._rp), "stderr": str(self._err),
                 "cwd": str(TMP), "env": env}, base)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill_all(self) -> None:
        """SIGKILL the engine and every process it started."""
        kill_tree(self.proc.pid)

    def wait(self, timeout: float = 600, *, expect_ok: bool = True) -> EngineResult:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            rc = self.proc.wait()
        stderr = self._err.read_text(errors="replace")
        if expect_ok and rc != 0:
            raise AssertionError(f"engine failed ({rc}):\n{stderr[-6000:]}")
        raw = json.loads(self._rp.read_text()) if self._rp.exists() else {}
        # Keep every engine's log for the last test session: the first place to
        # look when an end-to-end assertion fails.
        logs = TMP / "engine-logs"
        logs.mkdir(exist_ok=True)
        self._err.replace(logs / self._err.name)
        for p in (self._jp, self._rp):
            p.unlink(missing_ok=True)
        return EngineResult(raw.get("outputs", []), raw.get("counters", {}),
                            raw.get("namespace"), stderr, rc, raw)


def start_engine(job: dict[str, Any], *,
                 env_update: dict[str, str | None] | None = None) -> RunningEngine:
    return RunningEngine(job, env_update)


def run_engine(job: dict[str, Any], *, expect_ok: bool = True, timeout: int = 600,
               env_update: dict[str, str | None] | None = None) -> EngineResult:
    return start_engine(job, env_update=env_update).wait(timeout, expect_ok=expect_ok)


def distinct_prompts(seed: int, n: int, chunks: int = 2, tail: int = 50) -> list[list[int]]:
    """``n`` prompts that share no chunk: each ``chunks`` full chunks plus a tail."""
    rng = random.Random(seed)
    return [[rng.randrange(3, 1000) for _ in range(chunks * CHUNK + tail)] for _ in range(n)]


def job(model: Path, prompts: list[list[int]], connector: dict[str, Any] | None = None,
        **extra: Any) -> dict[str, Any]:
    j: dict[str, Any] = {"model": str(model), "prompts": prompts, "max_tokens": 8,
                         "block_size": BLOCK}
    if connector is not None:
        # These engines check what is served, not how fast: on a 2-core box
        # whose TP=2 workers spin on every core, a store's answer can take far
        # longer than the default floor of the cache deadlines, and a deadline
        # miss would turn an expected hit into a (correct) recompute. Tests of
        # the deadlines themselves pass their own floors.
        floor = min(5.0, float(connector.get("max_cache_wait_s", Settings.max_cache_wait_s)))
        j["connector"] = {"chunk_tokens": CHUNK, "min_lookup_wait_s": floor,
                          "min_load_wait_s": floor, **connector}
    j.update(extra)
    return j


def bucket_keys(s3: Any, bucket: str) -> list[str]:
    """Every key in the bucket (a boto3 client, all pages)."""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def audit(endpoint_url: str, bucket: str, prefix: str = "s3kv") -> dict[str, str]:
    """Every manifest in the bucket, read back and every shard it names verified:
    chunk id -> ``"ok"`` or what is wrong with it."""
    from tests.faults.kv_audit import read_bucket

    return {cid: got if isinstance(got, str) else "ok"
            for cid, got in read_bucket(endpoint_url, bucket, prefix).items()}


def committed_prefix(prompt: list[int], committed: set[str]) -> int:
    """How many leading chunks of ``prompt`` have a manifest."""
    from s3kv.keys import chain_chunk_ids

    n = 0
    for cid in chain_chunk_ids(prompt, CHUNK):
        if cid not in committed:
            break
        n += 1
    return n
