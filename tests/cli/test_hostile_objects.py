"""The tools run to completion over a bucket holding hostile objects.

One object of each kind a reader parses, written as an attacker (or a broken
writer) could: a manifest nested deep enough to exhaust the parser, a
manifest and a shard header with numbers no int can hold, a namespace
document of the same kind. ``ls``, ``du``, ``verify`` (and its repair) and
``gc`` report them as broken or skip them, and go on with everything else.
"""

from __future__ import annotations

import json
import struct

from s3kv.manifest import MAX_MANIFEST_BYTES
from tests.cli.conftest import Bucket

A = list(range(1000, 1000 + 3 * 256))
B = list(range(5000, 5000 + 2 * 256))


def _hostile_header(shard: bytes) -> bytes:
    """The same shard with ``"tokens": Infinity`` in its header."""
    n = struct.unpack_from("<I", shard, 10)[0]
    doc = json.loads(shard[14: 14 + n])
    text = json.dumps(dict(doc, tokens="__HOLE__")).encode().replace(b'"__HOLE__"', b"Infinity")
    return shard[:10] + struct.pack("<I", len(text)) + text + shard[14 + n:]


def test_ls_du_verify_and_gc_survive_one_hostile_object_of_each_kind(s3: Bucket) -> None:
    w = s3.writer(tp=1)
    a = w.commit_chain(A)
    b = w.commit_chain(B)
    c = s3.client
    deep = b"[" * 60_000 + b"]" * 60_000
    assert len(deep) <= MAX_MANIFEST_BYTES
    c.put_object(Bucket=s3.name, Key=s3.layout.manifest(w.ns, a[0].chunk_id), Body=deep)
    doc = json.loads(a[1].encode())
    huge = json.dumps(dict(doc, num_tokens="__HOLE__")).encode().replace(b'"__HOLE__"', b"1e400")
    c.put_object(Bucket=s3.name, Key=s3.layout.manifest(w.ns, a[1].chunk_id), Body=huge)
    key = b[0].shard_for_rank(0).key
    body = c.get_object(Bucket=s3.name, Key=key)["Body"].read()
    c.put_object(Bucket=s3.name, Key=key, Body=_hostile_header(body))
    c.put_object(Bucket=s3.name, Key=s3.layout.namespace_doc(w.ns),
                 Body=b'{"fingerprint": {"num_layers": Infinity, "x": '
                 + b"[" * 20_000 + b"]" * 20_000 + b"}}")

    listed = s3.json("ls")
    assert [n["namespace"] for n in listed["namespaces"]] == [w.ns]
    res = s3.cli("ls", w.ns, "--format", "json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["invalid_manifests"] == 2
    res = s3.cli("du", "--format", "json")
    assert res.exit_code == 0, res.stderr

    res = s3.cli("verify", "--format", "json")
    assert res.exit_code == 1, res.stderr
    problems = {x["chunk_id"]: x["problem"] for x in json.loads(res.stdout)["broken"]}
    assert set(problems) == {a[0].chunk_id, a[1].chunk_id, b[0].chunk_id}
    assert problems[a[0].chunk_id].startswith("manifest:")
    assert problems[a[1].chunk_id].startswith("manifest:")

    res = s3.cli("gc", "--max-size", "1", "--yes", "--format", "json")
    assert res.exit_code == 0, res.stderr
    res = s3.cli("verify", "--repair")
    assert res.exit_code == 0, res.stderr
