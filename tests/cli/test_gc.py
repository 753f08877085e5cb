"""``s3kv gc`` policies, plan output, confirmation and exit codes (no concurrency here;
see test_gc_concurrency.py)."""

from __future__ import annotations

import json

import pytest

from s3kv.keys import chain_chunk_ids
from tests.cli.conftest import Bucket
from tests.helpers_bucket import ChunkWriter

A = list(range(12))  # chunks a0 a1 a2
B = [*range(8), 50, 51, 52, 53, 54, 55, 56, 57]  # a0 a1 b2 b3
DAY = 86400.0


def live_keys(s3: Bucket, w: ChunkWriter) -> set[str]:
    """Every key a live manifest needs, plus the namespace document."""
    out = {s3.layout.namespace_doc(w.ns)}
    for key in s3.object_keys(s3.layout.namespace_prefix(w.ns)):
        if key.endswith("/manifest.json"):
            out.add(key)
            m = w.read_manifest(key.split("/")[-2])
            assert m is not None
            out.update(s.key for s in m.shards)
    return out


def setup_orphans(s3: Bucket) -> tuple[ChunkWriter, list[str]]:
    w = s3.writer(tp=2)
    committed = w.commit_chain(A[:8])
    unfinished = w.put_shards("f" * 64)  # a commit that never wrote its manifest
    loser = s3.writer(tp=2, writer="loser", doc=False)
    lost = loser.put_shards(committed[0].chunk_id)  # lost the race for a committed chunk
    assert (w.writer, loser.writer) == ("tp2-test", "tp2-loser")
    orphans = [s3.layout.shard(w.ns, "f" * 64, w.writer, r, 2) for r in range(2)]
    orphans += [s3.layout.shard(w.ns, committed[0].chunk_id, loser.writer, r, 0)
                for r in range(2)]
    assert [e.key for e in unfinished + lost] == orphans
    return w, orphans


@pytest.mark.parametrize("legacy", [False, True], ids=["round-keys", "legacy-keys"])
def test_resaved_chunks_extra_shards_are_collected_and_committed_ones_kept(
    s3: Bucket, legacy: bool
) -> None:
    """The same writer saves committed chunks again (recomputed, not bit-identical)
    in later rounds: the new shards are orphans GC collects after the grace
    period; every object the manifests name stays, byte for byte. With
    ``legacy`` the chunks were committed under the older key form."""
    w = s3.writer(tp=2, legacy=legacy)
    committed = w.commit_chain(A[:8])
    ns_prefix = s3.layout.namespace_prefix(w.ns)

    def bodies() -> dict[str, bytes]:
        return {k: s3.client.get_object(Bucket=s3.name, Key=k)["Body"].read()
                for k in s3.object_keys(ns_prefix)}

    before = bodies()
    w.legacy, w.salt = False, b"recomputed"
    extra = [e.key for m in committed for e in w.put_shards(m.chunk_id)]
    assert len(extra) == 4 and not set(extra) & set(before)
    resaved = bodies()
    assert {k: resaved[k] for k in before} == before  # nothing committed was rewritten
    assert {resaved[k] for k in extra}.isdisjoint(before.values())  # recomputed bytes differ

    res = s3.cli("gc", "--yes")  # young: the grace period protects a commit in flight
    assert res.exit_code == 0 and "nothing to delete" in res.stderr
    s3.age(2 * 3600)
    plan = s3.json("gc", "--dry-run")["plan"]["by_policy"]
    assert (plan["orphans"]["chunks"], plan["orphans"]["objects"]) == (2, 4)
    doc = s3.json("gc", "--yes")["result"]
    assert (doc["deleted_shards"], doc["deleted_manifests"]) == (4, 0)
    assert doc["protected_shards"] == 4
    assert bodies() == before
    assert set(before) == live_keys(s3, w)
    assert s3.cli("verify").exit_code == 0


def test_young_orphans_are_left_alone(s3: Bucket) -> None:
    setup_orphans(s3)
    before = s3.object_keys()
    res = s3.cli("gc", "--yes")
    assert res.exit_code == 0, res.stderr
    assert "nothing to delete" in res.stderr
    assert s3.object_keys() == before


def test_orphans_older_than_grace(s3: Bucket) -> None:
    w, orphans = setup_orphans(s3)
    s3.age(2 * 3600)
    before = set(s3.object_keys())

    plan = s3.json("gc", "--dry-run")
    assert plan["dry_run"] is True and plan["result"] is None
    assert plan["plan"]["by_policy"]["orphans"]["chunks"] == 2
    assert plan["plan"]["by_policy"]["orphans"]["objects"] == 4
    assert plan["plan"]["policies"]["grace_s"] == 3600
    assert set(s3.object_keys()) == before  # a dry run deletes nothing

    res = s3.cli("gc", "--dry-run")
    assert res.exit_code == 0
    assert res.stdout.splitlines()[0].split() == ["POLICY", "CHUNKS", "OBJECTS", "SIZE"]
    assert "orphans" in res.stdout and "KiB" in res.stdout

    res = s3.cli("gc", "--yes")
    assert res.exit_code == 0, res.stderr
    assert "deleted 4 objects" in res.stdout
    assert "\r" not in res.stderr  # no progress bar when stderr is not a terminal
    assert set(s3.object_keys()) == before - set(orphans)
    assert set(s3.object_keys()) == live_keys(s3, w)
    assert s3.cli("verify").exit_code == 0


def test_grace_option(s3: Bucket) -> None:
    _, orphans = setup_orphans(s3)
    res = s3.cli("gc", "--grace", "30m", "--yes")
    assert res.exit_code == 0 and "nothing to delete" in res.stderr
    res = s3.cli("gc", "--grace", "0s", "--yes", "--format", "json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["result"]["deleted_shards"] == 4
    assert doc["result"]["deleted_manifests"] == 0
    assert not set(orphans) & set(s3.object_keys())


def test_confirmation_defaults_to_no(s3: Bucket) -> None:
    setup_orphans(s3)
    s3.age(2 * 3600)
    before = s3.object_keys()
    for answer in ["\n", "", "n\n", "whatever\n"]:
        res = s3.cli("gc", input=answer)
        assert res.exit_code == 1
        assert "[y/N]" in res.stderr and "[y/N]" not in res.stdout
        assert "nothing deleted" in res.stderr
        assert s3.object_keys() == before
    res = s3.cli("gc", input="y\n")
    assert res.exit_code == 0, res.stderr
    assert len(s3.object_keys()) == len(before) - 4


def test_stale_multipart_uploads(s3_any: Bucket) -> None:
    """obstore lacks MultipartAdmin: gc then lists and aborts through aioboto3."""
    c = s3_any.client
    inside = c.create_multipart_upload(Bucket=s3_any.name, Key="s3kv/ns/big-object")
    outside = c.create_multipart_upload(Bucket=s3_any.name, Key="other/object")
    # moto reports every upload as initiated in 2010, a real server as now:
    # a zero grace makes both stale.
    plan = s3_any.json("gc", "--dry-run", "--grace", "0s")
    assert plan["plan"]["uploads"] == 1
    res = s3_any.cli("gc", "--yes", "--grace", "0s", "--format", "json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["result"]["aborted_uploads"] == 1
    left = {u["UploadId"] for u in c.list_multipart_uploads(Bucket=s3_any.name).get("Uploads", [])}
    assert inside["UploadId"] not in left
    assert outside["UploadId"] in left
    assert s3_any.json("gc", "--dry-run", "--no-uploads")["plan"]["uploads"] == 0


def test_older_than_keeps_prefixes_whole(s3: Bucket) -> None:
    w = s3.writer()
    a = w.commit_chain(A)
    s3.age(10 * DAY)
    b = w.commit_chain(B)  # young, extends a0 a1
    assert [m.chunk_id for m in b[:2]] == [m.chunk_id for m in a[:2]]

    assert s3.json("gc", "--dry-run", "--older-than", "30d")["plan"]["total"]["chunks"] == 0
    plan = s3.json("gc", "--dry-run", "--older-than", "7d")
    assert plan["plan"]["by_policy"]["older-than"]["chunks"] == 1  # only a2
    res = s3.cli("gc", "--older-than", "7d", "--yes")
    assert res.exit_code == 0, res.stderr
    assert w.read_manifest(a[2].chunk_id) is None
    assert not s3.object_keys(s3.layout.chunk_prefix(w.ns, a[2].chunk_id))  # shards went too
    for m in b:
        assert w.read_manifest(m.chunk_id) is not None
    doc = s3.json("ls", w.ns)
    assert [p["leaf"] for p in doc["prefixes"]] == [b[-1].chunk_id]
    assert doc["prefixes"][0]["complete"]


def test_max_size_evicts_oldest_leaves_first(s3: Bucket) -> None:
    w = s3.writer()
    a = w.commit_chain(A)
    s3.age(3 * DAY)
    b = w.commit_chain(B)
    size = {m.chunk_id: m.total_bytes + len(m.encode()) for m in [*a, *b]}
    total = sum(size.values())
    keep = [a[0].chunk_id, a[1].chunk_id, b[2].chunk_id]
    budget = sum(size[c] for c in keep) + 10  # room for three chunks of five

    plan = s3.json("gc", "--dry-run", "--max-size", str(budget))
    assert plan["plan"]["committed_bytes"] == total
    assert plan["plan"]["by_policy"]["max-size"]["chunks"] == 2
    assert plan["plan"]["committed_bytes_after"] <= budget
    res = s3.cli("gc", "--max-size", f"{budget}B", "--yes")
    assert res.exit_code == 0, res.stderr
    # a2 is the oldest leaf; then b3 (a1 still has a child, b2): never a hole.
    assert w.read_manifest(a[2].chunk_id) is None
    assert w.read_manifest(b[3].chunk_id) is None
    for cid in keep:
        assert w.read_manifest(cid) is not None
    doc = s3.json("ls", w.ns)
    assert all(p["complete"] for p in doc["prefixes"])
    assert doc["bytes"] <= budget
    assert s3.json("gc", "--dry-run", "--max-size", "1GiB")["plan"]["total"]["chunks"] == 0


def test_max_size_counts_listed_bytes_and_frees_a_lying_chunk_first(s3: Bucket) -> None:
    """A manifest claiming a 10^15-byte shard: GC accounts with the sizes LIST
    reports (the claim would otherwise evict every chunk), and over budget the
    lying chunk, which no reader would load, goes before any honest one."""
    w = s3.writer()
    a = w.commit_chain(A)
    s3.age(3 * DAY)
    b = w.commit_chain(B)
    liar = a[0]  # the oldest chunk, with descendants: never a leaf-first candidate
    doc = json.loads(liar.encode())
    shard = doc["shards"][0]
    shard["size"] = shard["payload_offset"] + (shard["heads"][1] - shard["heads"][0]) * 10**15
    s3.client.put_object(Bucket=s3.name, Key=s3.layout.manifest(w.ns, liar.chunk_id),
                         Body=json.dumps(doc).encode())
    real = {m.chunk_id: m.total_bytes + len(m.encode()) for m in [*a, *b]}
    real[liar.chunk_id] += len(json.dumps(doc).encode()) - len(liar.encode())
    total = sum(real.values())

    plan = s3.json("gc", "--dry-run", "--max-size", str(total))
    assert plan["plan"]["committed_bytes"] == total
    assert plan["plan"]["total"]["chunks"] == 0
    plan = s3.json("gc", "--dry-run", "--max-size", str(total - 1))
    assert plan["plan"]["by_policy"]["max-size"]["chunks"] == 1
    res = s3.cli("gc", "--max-size", f"{total - 1}B", "--yes")
    assert res.exit_code == 0, res.stderr
    assert w.read_manifest(liar.chunk_id) is None
    for m in [*a[1:], *b[2:]]:
        assert w.read_manifest(m.chunk_id) is not None


def test_namespace_policy(s3: Bucket) -> None:
    doomed = s3.writer("doomed", tp=2)
    doomed.commit_chain(A)
    kept = s3.writer("kept")
    kept.commit_chain(A)
    kept_before = s3.object_keys(s3.layout.namespace_prefix(kept.ns))

    res = s3.cli("gc", "--namespace", doomed.ns[:7], "--yes")
    assert res.exit_code == 0, res.stderr
    assert s3.object_keys(s3.layout.namespace_prefix(doomed.ns)) == []
    assert s3.object_keys(s3.layout.namespace_prefix(kept.ns)) == kept_before

    res = s3.cli("gc", "--namespace", "0" * 32, "--yes")
    assert res.exit_code == 1 and "no namespace" in res.stderr


def test_namespace_policy_respects_grace_for_unnamed_shards(s3: Bucket) -> None:
    w = s3.writer()
    w.commit_chain(A[:4])
    (in_flight,) = w.put_shards("e" * 64)  # maybe a commit in flight
    res = s3.cli("gc", "--namespace", w.ns, "--yes", "--format", "json")
    assert res.exit_code == 0, res.stderr
    result = json.loads(res.stdout)["result"]
    assert result["protected_shards"] == 1
    assert result["deleted_namespace_docs"] == 0
    left = s3.object_keys(s3.layout.namespace_prefix(w.ns))
    assert sorted(left) == sorted([s3.layout.namespace_doc(w.ns), in_flight.key])
    res = s3.cli("gc", "--namespace", w.ns, "--grace", "0s", "--yes")
    assert res.exit_code == 0, res.stderr
    assert s3.object_keys(s3.layout.namespace_prefix(w.ns)) == []


def test_policies_combine(s3: Bucket) -> None:
    setup_orphans(s3)
    other = s3.writer("other")
    other.commit_chain(A)
    s3.age(2 * 3600)
    plan = s3.json("gc", "--dry-run", "--namespace", other.ns, "--older-than", "1d")
    by = plan["plan"]["by_policy"]
    assert by["orphans"]["chunks"] == 2
    assert by["namespace"]["chunks"] == 3
    assert by["older-than"]["chunks"] == 0
    assert plan["plan"]["policies"]["namespaces"] == [other.ns]


def test_bad_durations_and_sizes_exit_2(s3: Bucket) -> None:
    for args, option, hint in [
        (["--older-than", "7"], "--older-than", "7d"),
        (["--older-than", "seven days"], "--older-than", "7d"),
        (["--grace", "1x"], "--grace", "90m"),
        (["--max-size", "10G"], "--max-size", "GiB"),
        (["--max-size", "lots"], "--max-size", "10MB"),
    ]:
        res = s3.cli("gc", "--dry-run", *args)
        assert res.exit_code == 2, args
        assert option in res.stderr and hint in res.stderr
        assert res.stdout == ""


def test_chain_ids_used_by_tests_are_distinct() -> None:
    ids_a, ids_b = chain_chunk_ids(A, 4), chain_chunk_ids(B, 4)
    assert ids_a[:2] == ids_b[:2] and len(set(ids_a + ids_b)) == 5
