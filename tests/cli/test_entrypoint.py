"""The installed entry points, run as real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

import pytest

from s3kv.store.s3_aioboto3 import Aioboto3Store
from s3kv.store.s3_obstore import ObstoreStore
from tests.cli.conftest import Bucket


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_python_m_s3kv_cli(s3: Bucket) -> None:
    s3.writer().commit_chain(list(range(8)))
    res = run("-m", "s3kv.cli", "ls", env=s3.env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("NAMESPACE")
    res = run("-m", "s3kv.cli", "gc", "--older-than", "7", env=s3.env)
    assert res.returncode == 2
    assert "--older-than" in res.stderr and res.stdout == ""
    res = run("-m", "s3kv.cli", "bogus-command")
    assert res.returncode == 2


def test_console_script(s3: Bucket) -> None:
    script = os.path.join(os.path.dirname(sys.executable), "s3kv")
    if not os.path.exists(script):
        pytest.skip("package not installed into this environment")
    res = subprocess.run([script, "du", "--format", "json"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, **s3.env})
    assert res.returncode == 0, res.stderr
    assert '"version": 1' in res.stdout


def test_cli_imports_neither_torch_nor_vllm() -> None:
    code = ("import sys, s3kv.cli.app, s3kv.catalog, s3kv.gc, s3kv.gc_executor; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'vllm')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    res = run("-c", code)
    assert res.returncode == 0, res.stdout


def test_interrupted_gc_exits_130(s3: Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    w = s3.writer()
    w.commit_chain(list(range(8)))

    async def interrupted(self: object, keys: Sequence[str]) -> None:
        raise KeyboardInterrupt  # Ctrl-C during gc's first delete request

    for backend in (ObstoreStore, Aioboto3Store):
        monkeypatch.setattr(backend, "delete_many", interrupted)
    res = s3.cli("gc", "--older-than", "0s", "--yes")
    assert res.exit_code == 130
    assert "interrupted" in res.stderr and "a new run picks up the rest" in res.stderr
