"""``s3kv verify`` and ``s3kv doctor``."""

from __future__ import annotations

import json
import os
import time
import types
from pathlib import Path
from typing import Any

import pytest

import s3kv.cli.doctor as doctor_mod
from s3kv.config import StoreSettings
from s3kv.store import open_store
from tests.cli.conftest import Bucket
from tests.cli.test_ls_du import no_credentials_env

A = list(range(12))
B = list(range(100, 112))  # three more chunks, no sharing


def test_verify_finds_and_repairs_broken_chunks(s3: Bucket) -> None:
    w = s3.writer(tp=2)
    a = w.commit_chain(A)
    b = w.commit_chain(B)
    c = s3.client
    # a[1] rank 1: flipped byte, same size.
    key = a[1].shard_for_rank(1).key
    body = bytearray(c.get_object(Bucket=s3.name, Key=key)["Body"].read())
    body[-1] ^= 0xFF
    c.put_object(Bucket=s3.name, Key=key, Body=bytes(body))
    # a[2] rank 0: truncated.
    key = a[2].shard_for_rank(0).key
    c.put_object(Bucket=s3.name, Key=key,
                 Body=c.get_object(Bucket=s3.name, Key=key)["Body"].read()[:-8])
    # b[1]: a shard is missing.
    c.delete_object(Bucket=s3.name, Key=b[1].shard_for_rank(0).key)
    # b[0]: the manifest itself is garbage.
    c.put_object(Bucket=s3.name, Key=s3.layout.manifest(w.ns, b[0].chunk_id), Body=b"{nope")

    res = s3.cli("verify", "--format", "json")
    assert res.exit_code == 1
    doc = json.loads(res.stdout)
    problems = {x["chunk_id"]: x["problem"] for x in doc["broken"]}
    assert set(problems) == {a[1].chunk_id, a[2].chunk_id, b[1].chunk_id, b[0].chunk_id}
    assert "checksum" in problems[a[1].chunk_id]
    assert "bytes" in problems[a[2].chunk_id]
    assert "missing" in problems[b[1].chunk_id]
    assert problems[b[0].chunk_id].startswith("manifest:")
    assert doc["checked_chunks"] == 6
    assert not any(x["repaired"] for x in doc["broken"])

    res = s3.cli("verify")
    assert res.exit_code == 1
    assert "4 broken" in res.stdout and "--repair" in res.stderr

    res = s3.cli("verify", "--repair")
    assert res.exit_code == 0, res.stderr
    for m in (a[1], a[2], b[1], b[0]):
        assert w.read_manifest(m.chunk_id) is None
    for m in (a[0], b[2]):
        assert w.read_manifest(m.chunk_id) is not None
    res = s3.cli("verify", w.ns[:5])
    assert res.exit_code == 0
    assert "checked 2 chunks, 4 shards" in res.stdout


def test_verify_sample(s3: Bucket) -> None:
    w = s3.writer()
    w.commit_chain(list(range(40)))  # ten chunks
    doc = s3.json("verify", "--sample", "3", "--seed", "7")
    assert doc["checked_chunks"] == 3 and doc["broken"] == []
    assert s3.json("verify", "--sample", "50")["checked_chunks"] == 10
    assert s3.cli("verify", "--sample", "0").exit_code == 2


def lines(res: Any) -> dict[str, str]:
    return {line.split()[1]: line.split()[0] for line in res.stdout.splitlines()}


def test_doctor_all_ok(s3_any: Bucket) -> None:
    res = s3_any.cli("doctor")
    assert res.exit_code == 0, res.stdout + res.stderr
    status = lines(res)
    assert list(status) == ["config", "credentials", "endpoint", "bucket", "put", "get", "list",
                            "conditional", "clock", "delete", "uploads"]
    assert set(status.values()) == {"ok"}
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in res.stdout + res.stderr
    assert s3_any.object_keys() == []  # the scratch object is gone
    doc = s3_any.json("doctor")
    assert doc["ok"] is True and len(doc["checks"]) == 11


def test_doctor_failures(s3: Bucket, tmp_path: Path) -> None:
    res = s3.cli("doctor", env=no_credentials_env(tmp_path))
    assert res.exit_code == 3
    assert lines(res)["credentials"] == "FAIL"
    assert "endpoint" not in lines(res)

    res = s3.cli("doctor", "--bucket", "no-such-bucket-doctor")
    assert res.exit_code == 3
    assert lines(res)["bucket"] == "FAIL" and "NoSuchBucket" in res.stdout

    res = s3.cli("doctor", "--endpoint-url", "http://127.0.0.1:9")
    assert res.exit_code == 1
    assert lines(res)["endpoint"] == "FAIL"

    res = s3.cli("doctor", "--backend", "nope")
    assert res.exit_code == 3
    assert lines(res)["config"] == "FAIL"


def test_doctor_detects_ignored_conditional_writes(s3: Bucket,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that accepts If-None-Match and overwrites anyway must FAIL."""

    async def lax_open(settings: StoreSettings) -> Any:
        store = await open_store(settings)
        real_put = store.put

        async def put(key: str, data: Any, *, mode: str = "overwrite") -> str | None:
            return await real_put(key, data, mode="overwrite")

        store.put = put  # type: ignore[method-assign]
        return store

    monkeypatch.setattr(doctor_mod, "open_store", lax_open)
    res = s3.cli("doctor")
    assert res.exit_code == 1
    assert lines(res)["conditional"] == "FAIL"
    assert "ignores conditional writes" in res.stdout


def test_doctor_warns_about_clock_skew(s3: Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.SimpleNamespace(time=lambda: time.time() + 300)
    monkeypatch.setattr(doctor_mod, "time", fake)
    res = s3.cli("doctor")
    assert res.exit_code == 0  # a warning, not a failure
    assert lines(res)["clock"] == "warn"
    assert "60 s" in res.stdout
