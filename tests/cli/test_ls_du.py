"""``s3kv ls`` and ``s3kv du`` against the moto HTTP server, plus the error paths
every command shares (configuration, credentials, bucket, endpoint)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from tests.cli.conftest import Bucket
from tests.helpers_bucket import fingerprint

TOKENS_A = list(range(12))  # three chunks of four tokens
TOKENS_B = [*range(8), 99, 98, 97, 96, 95, 94, 93, 92]  # shares two chunks with A, adds two


def committed_bytes(s3: Bucket, ns: str) -> int:
    total = 0
    for page in s3.client.get_paginator("list_objects_v2").paginate(
        Bucket=s3.name, Prefix=f"s3kv/{ns}/"
    ):
        total += sum(o["Size"] for o in page.get("Contents", [])
                     if not o["Key"].endswith("namespace.json"))
    return total


def test_ls_namespaces_table_and_json(s3: Bucket) -> None:
    a = s3.writer("model-a", tp=2)
    a.commit_chain(TOKENS_A)
    b = s3.writer("model-b", doc=False)  # no namespace.json: id only
    b.commit_chain(TOKENS_B)
    # Another engine of model-b at TP 4 shares the namespace: it finds two of
    # A's chunks committed by b and commits the third.
    b4 = s3.writer("model-b", tp=4, writer="other", doc=False)
    assert b4.ns == b.ns
    b4.commit_chain(TOKENS_A)

    res = s3.cli("ls")
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["NAMESPACE", "MODEL", "TP", "CHUNKS", "SIZE", "OLDEST", "NEWEST"]
    row_a = next(line for line in lines if line.startswith(a.ns)).split()
    assert row_a[1:4] == ["model-a", "2", "3"]
    row_b = next(line for line in lines if line.startswith(b.ns)).split()
    assert row_b[1:4] == ["-", "1,4", "5"]  # TP sizes from the writers, not the fingerprint
    assert "KiB" in res.stdout  # IEC units in tables

    doc = s3.json("ls")
    assert doc["version"] == 1 and doc["bucket"] == s3.name and doc["prefix"] == "s3kv"
    by_ns = {n["namespace"]: n for n in doc["namespaces"]}
    assert by_ns[a.ns]["fingerprint"]["model"] == "model-a"
    assert by_ns[b.ns]["fingerprint"] is None
    assert by_ns[a.ns]["writer_tp_sizes"] == [2]
    assert by_ns[b.ns]["writer_tp_sizes"] == [1, 4]
    assert by_ns[a.ns]["chunks"] == 3
    assert by_ns[b.ns]["chunks"] == 5
    assert by_ns[a.ns]["bytes"] == committed_bytes(s3, a.ns)  # raw bytes in JSON
    assert by_ns[b.ns]["oldest"].endswith("Z")


def test_ls_sort_and_limit(s3: Bucket) -> None:
    small = s3.writer("small")
    small.commit_chain(TOKENS_A[:4])
    big = s3.writer("big", tp=4)
    big.commit_chain(TOKENS_A)
    doc = s3.json("ls", "--sort", "size", "--limit", "1")
    assert [n["namespace"] for n in doc["namespaces"]] == [big.ns]
    doc = s3.json("ls", "--sort", "chunks")
    assert [n["namespace"] for n in doc["namespaces"]] == [big.ns, small.ns]
    doc = s3.json("ls", "--sort", "name")
    assert [n["namespace"] for n in doc["namespaces"]] == sorted([big.ns, small.ns])
    res = s3.cli("ls", "--sort", "tokens")
    assert res.exit_code == 2 and "NAMESPACE" in res.stderr
    res = s3.cli("ls", "--limit", "0")
    assert res.exit_code == 2
    res = s3.cli("ls", "--sort", "bogus")
    assert res.exit_code == 2


def test_ls_namespace_rebuilds_chains(s3: Bucket) -> None:
    w = s3.writer()
    chain_a = w.commit_chain(TOKENS_A)
    chain_b = w.commit_chain(TOKENS_B)
    # Orphan shards of an uncommitted chunk are not a cached prefix.
    w.put_shards("e" * 64)

    doc = s3.json("ls", w.ns[:6])  # a unique prefix of the id is enough
    assert doc["namespace"] == w.ns
    assert doc["writer_tp_sizes"] == [1]
    assert doc["chunks"] == 5  # 3 + 4 - 2 shared
    prefixes = {p["leaf"]: p for p in doc["prefixes"]}
    assert set(prefixes) == {chain_a[-1].chunk_id, chain_b[-1].chunk_id}
    pa, pb = prefixes[chain_a[-1].chunk_id], prefixes[chain_b[-1].chunk_id]
    assert (pa["chunks"], pa["tokens"], pa["complete"]) == (3, 12, True)
    assert (pb["chunks"], pb["tokens"], pb["complete"]) == (4, 16, True)
    assert pa["bytes"] == sum(
        m.total_bytes + len(m.encode()) for m in chain_a
    )
    assert doc["prefix_count"] == 2

    doc = s3.json("ls", w.ns, "--sort", "tokens", "--limit", "1")
    assert [p["leaf"] for p in doc["prefixes"]] == [chain_b[-1].chunk_id]

    # Knock a hole into chain B: its prefix is reported incomplete.
    s3.client.delete_object(Bucket=s3.name,
                            Key=s3.layout.manifest(w.ns, chain_b[2].chunk_id))
    doc = s3.json("ls", w.ns)
    prefixes = {p["leaf"]: p for p in doc["prefixes"]}
    assert prefixes[chain_b[-1].chunk_id]["complete"] is False
    assert prefixes[chain_b[-1].chunk_id]["chunks"] == 1

    res = s3.cli("ls", w.ns)
    assert res.exit_code == 0
    assert res.stdout.splitlines()[0].split()[:4] == ["LEAF", "CHUNKS", "TOKENS", "SIZE"]
    assert "no (hole)" in res.stdout
    assert w.ns in res.stderr  # the summary line is not data
    assert "writer tp 1 " in res.stderr


def test_ls_namespace_argument_errors(s3: Bucket) -> None:
    # Two namespaces whose ids share their first hex digit.
    first: dict[str, int] = {}
    for tag in itertools.count():
        ns = fingerprint(tag=str(tag)).namespace
        if ns[0] in first:
            break
        first[ns[0]] = tag
    s3.writer(tag=str(tag)).commit_chain(TOKENS_A[:4])
    s3.writer(tag=str(first[ns[0]])).commit_chain(TOKENS_A[:4])

    res = s3.cli("ls", ns[0])
    assert res.exit_code == 2
    assert "matches 2 namespaces" in res.stderr

    missing = next(c for c in "0123456789abcdef" if c != ns[0])
    res = s3.cli("ls", missing * 8)
    assert res.exit_code == 1
    assert "no namespace" in res.stderr and "s3kv ls" in res.stderr

    res = s3.cli("ls", "not-hex")
    assert res.exit_code == 2
    assert "hex" in res.stderr


def test_du_committed_and_orphans(s3: Bucket) -> None:
    w = s3.writer(tp=2)
    committed = w.commit_chain(TOKENS_A[:8])  # two committed chunks
    w.put_shards("f" * 64)  # a commit that never finished: 2 orphan shards
    # A losing concurrent writer of an already committed chunk: its shards
    # are orphans even though the chunk has a manifest.
    loser = s3.writer(tp=2, writer="loser", doc=False)
    loser.put_shards(committed[0].chunk_id)
    other = s3.writer("other")
    other.commit_chain(TOKENS_A[:4])

    for extra in ([], ["--exact"]):
        doc = s3.json("du", *extra)
        by_ns = {n["namespace"]: n for n in doc["namespaces"]}
        u = by_ns[w.ns]
        assert u["chunks"] == 2
        assert u["uncommitted_chunks"] == 1
        assert u["manifests"] == 2 and u["shards"] == 8
        assert u["orphan_objects"] == 4
        assert u["committed_bytes"] == sum(m.total_bytes + len(m.encode()) for m in committed)
        assert u["committed_bytes"] + u["orphan_bytes"] == committed_bytes(s3, w.ns)
        assert u["objects"] == 10
        total = doc["total"]
        assert "namespace" not in total
        for field in ("chunks", "objects", "committed_bytes", "orphan_bytes"):
            assert total[field] == sum(n[field] for n in doc["namespaces"])

    res = s3.cli("du")
    assert res.exit_code == 0
    assert res.stdout.splitlines()[-1].startswith("TOTAL")
    doc = s3.json("du", other.ns[:5])
    assert [n["namespace"] for n in doc["namespaces"]] == [other.ns]


@pytest.mark.parametrize("legacy", [False, True], ids=["round-keys", "legacy-keys"])
def test_du_counts_a_resaved_chunk_s_extra_shards_as_orphans(s3: Bucket, legacy: bool) -> None:
    """The same writer saves a committed chunk again in a later round: its new
    shards sit beside the committed ones under keys of their own. One writer but
    two save attempts, so du reads the manifest even without --exact. With
    ``legacy`` the chunk was committed under the older key form."""
    w = s3.writer(tp=2, legacy=legacy)
    committed = w.commit_chain(TOKENS_A[:8])  # two chunks
    w.legacy, w.salt = False, b"recomputed"
    w.put_shards(committed[0].chunk_id)
    for extra in ([], ["--exact"]):
        u = s3.json("du", *extra)["namespaces"][0]
        assert u["namespace"] == w.ns
        assert (u["chunks"], u["uncommitted_chunks"], u["invalid_manifests"]) == (2, 0, 0)
        assert (u["manifests"], u["shards"], u["orphan_objects"]) == (2, 6, 2)
        assert u["committed_bytes"] == sum(m.total_bytes + len(m.encode()) for m in committed)
        assert u["committed_bytes"] + u["orphan_bytes"] == committed_bytes(s3, w.ns)


# --- errors every command shares --------------------------------------------------


COMMANDS = [["ls"], ["du"], ["gc", "--dry-run"], ["verify"]]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_missing_bucket_is_config_error(s3_any: Bucket, cmd: list[str]) -> None:
    res = s3_any.cli(*cmd, env={"S3KV_BUCKET": "no-such-bucket-s3kv"})
    assert res.exit_code == 3, (res.stdout, res.stderr)
    assert "no-such-bucket-s3kv" in res.stderr and "does not exist" in res.stderr
    assert res.stdout == ""


@pytest.mark.parametrize("cmd", COMMANDS)
def test_bad_config_exits_3(s3: Bucket, cmd: list[str]) -> None:
    res = s3.cli(*cmd, env={"S3KV_BUCKET": None})
    assert res.exit_code == 3
    assert "'bucket'" in res.stderr and "required" in res.stderr
    res = s3.cli(*cmd, "--backend", "nope")
    assert res.exit_code == 3
    assert "'backend'" in res.stderr and "aioboto3" in res.stderr
    res = s3.cli(*cmd, "--bucket", "Bad_Bucket")
    assert res.exit_code == 3
    res = s3.cli(*cmd, "--endpoint-url", "ftp://x")
    assert res.exit_code == 3


def no_credentials_env(tmp_path: Path) -> dict[str, str | None]:
    empty = tmp_path / "empty"
    empty.write_text("")
    return {
        "AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SESSION_TOKEN": None,
        "AWS_SECURITY_TOKEN": None, "AWS_PROFILE": None, "AWS_DEFAULT_PROFILE": None,
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": None,
        "AWS_CONTAINER_CREDENTIALS_FULL_URI": None, "AWS_WEB_IDENTITY_TOKEN_FILE": None,
        "AWS_SHARED_CREDENTIALS_FILE": str(empty), "AWS_CONFIG_FILE": str(empty),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@pytest.mark.parametrize("cmd", COMMANDS)
def test_no_credentials_exits_3(s3_any: Bucket, tmp_path: Path, cmd: list[str]) -> None:
    res = s3_any.cli(*cmd, env=no_credentials_env(tmp_path))
    assert res.exit_code == 3, (res.stdout, res.stderr)
    assert "credentials" in res.stderr
    assert "testing-secret" not in res.stderr + res.stdout


def test_unreachable_endpoint_exits_1(s3: Bucket) -> None:
    res = s3.cli("ls", "--endpoint-url", "http://127.0.0.1:9")
    assert res.exit_code == 1
    assert "unreachable" in res.stderr


def test_options_override_environment(s3: Bucket) -> None:
    w = s3.writer()
    w.commit_chain(TOKENS_A[:4])
    res = s3.cli("ls", "--bucket", s3.name, "--prefix", "elsewhere", "--format", "json")
    assert res.exit_code == 0
    assert '"namespaces": []' in res.stdout
    res = s3.cli("ls", "--prefix", "elsewhere")
    assert res.exit_code == 0 and res.stdout == ""
    assert "no namespaces" in res.stderr
