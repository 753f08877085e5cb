from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from s3kv.keys import (
    FORMAT_VERSION,
    HASH_SCHEME,
    ChunkRef,
    Fingerprint,
    KeyLayout,
    ParsedKey,
    canonical_extra,
    chain_chunk_ids,
    chunk_id,
    is_chunk_id,
    is_namespace,
    is_writer_id,
    iter_chunk_ids,
    new_writer_id,
    writer_tp,
)

ROOT = Path(__file__).resolve().parents[2]

# chain_chunk_ids(list(range(512)), 256), computed once: these must never change,
# or every stored chunk becomes unreachable.
KNOWN_IDS = [
    "dae160888e704d8d739ab607589b925fe3d266f1efa340ea8b86449cd016f65d",
    "6dd8cd5cca36783e61a50076466da2b3793ec5880ab982f1da93dee312c9bcb3",
]

FP = Fingerprint(
    model="meta-llama/Llama-3.1-8B",
    weights_id="sha256:abc",
    dtype="bfloat16",
    chunk_tokens=256,
    num_layers=32,
    num_kv_heads=8,
    head_size=128,
)
# FP.namespace (format 2, with the ``engine`` field), computed once.
KNOWN_NAMESPACE = "ca619d0afea518582c33695ac80b340d"

NS = "0123456789abcdef0123456789abcdef"
CID = "ab" + "c" * 62
LAYOUT = KeyLayout("s3kv/prod")


# --- chunk ids -------------------------------------------------------------------


def test_known_answer() -> None:
    assert chain_chunk_ids(list(range(512)), 256) == KNOWN_IDS


def test_ids_follow_the_documented_encoding() -> None:
    tokens = list(range(512))
    parent = b"\x00" * 32
    expected = []
    for off in (0, 256):
        h = hashlib.sha256(parent)
        h.update(struct.pack("<I", 256))
        h.update(b"".join(struct.pack("<I", t) for t in tokens[off : off + 256]))
        expected.append(h.hexdigest())
        parent = bytes.fromhex(expected[-1])
    assert expected == KNOWN_IDS


def test_ids_are_stable_and_well_formed() -> None:
    tokens = list(range(1000, 1000 + 1024))
    a = chain_chunk_ids(tokens, 256)
    assert a == chain_chunk_ids(tuple(tokens), 256)
    assert len(a) == 4
    assert len(set(a)) == 4
    assert all(is_chunk_id(c) for c in a)


def test_partial_tail_excluded() -> None:
    tokens = list(range(767))
    assert chain_chunk_ids(tokens, 256) == chain_chunk_ids(tokens[:512], 256)
    assert len(chain_chunk_ids(tokens, 256)) == 2
    assert chain_chunk_ids(list(range(255)), 256) == []
    assert chain_chunk_ids([], 256) == []
    assert chain_chunk_ids(list(range(256)), 256) == KNOWN_IDS[:1]


def test_ids_chain_over_the_whole_prefix() -> None:
    a = list(range(512))
    b = [7, *a[1:]]  # differs only in the first token
    ids_a, ids_b = chain_chunk_ids(a, 256), chain_chunk_ids(b, 256)
    assert ids_a[0] != ids_b[0]
    assert ids_a[1] != ids_b[1]  # same tokens in chunk 1, different history
    assert chunk_id(ids_a[0], a[256:], None) == ids_a[1]
    assert chunk_id(None, a[256:], None) != ids_a[1]
    last = [*a[:-1], 10 ** 6]
    assert chain_chunk_ids(last, 256)[0] == ids_a[0]
    assert chain_chunk_ids(last, 256)[1] != ids_a[1]


def test_parent_changes_the_id() -> None:
    tokens = list(range(256))
    other_parent = "f" * 64
    assert chunk_id(None, tokens, None) == KNOWN_IDS[0]
    assert chunk_id(other_parent, tokens, None) != KNOWN_IDS[0]
    assert chunk_id(KNOWN_IDS[0], tokens, None) != chunk_id(other_parent, tokens, None)


def test_extra_keys_change_the_id_canonically() -> None:
    tokens = list(range(512))
    plain = chain_chunk_ids(tokens, 256)
    lora = chain_chunk_ids(tokens, 256, {"lora": "adapter-a"})
    assert lora[0] != plain[0]
    assert chain_chunk_ids(tokens, 256, {"lora": "adapter-b"})[0] != lora[0]
    assert chain_chunk_ids(tokens, 256, {"salt": "adapter-a"})[0] != lora[0]
    # empty extra is no extra; key order does not matter
    assert chain_chunk_ids(tokens, 256, {}) == plain
    assert chain_chunk_ids(tokens, 256, None) == plain
    ab = chain_chunk_ids(tokens, 256, {"a": 1, "b": [1, 2]})
    assert ab == chain_chunk_ids(tokens, 256, {"b": [1, 2], "a": 1})
    assert canonical_extra({"b": 1, "a": 2}) == b'{"a":2,"b":1}'
    assert canonical_extra({"mm": {"y", "x"}}) == b'{"mm":["x","y"]}'


def test_iter_chunk_ids_resumes_from_a_known_parent() -> None:
    tokens = list(range(1024))
    full = chain_chunk_ids(tokens, 256)
    resumed = list(iter_chunk_ids(tokens, 256, parent=full[1], start=512))
    assert resumed == full[2:]


def test_token_ids_above_u32_are_rejected() -> None:
    with pytest.raises(struct.error):
        chunk_id(None, [2**32], None)


_SUBPROCESS = """
import json, sys
from s3kv.keys import Fingerprint, chain_chunk_ids
fp = Fingerprint(**json.loads(sys.argv[1]))
tokens = [(i * 7919) % 151_936 for i in range(2048)]
extra = {"lora": "adapter", "salt": "s", "mm": ["h1", "h2"], "tags": {"x", "y", "z", "w"}}
print(json.dumps({
    "plain": chain_chunk_ids(tokens, 256),
    "extra": chain_chunk_ids(tokens, 128, extra),
    "namespace": fp.namespace,
    "seed_probe": list({"x", "y", "z", "w", "v", "u"}),
}))
"""


def _ids_in_subprocess(seed: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONHASHSEED": seed}
    out = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS, json.dumps(FP.to_json())],
        env=env, cwd=ROOT, capture_output=True, text=True, check=True, timeout=120,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_ids_agree_across_processes_with_different_hash_seeds() -> None:
    a, b = _ids_in_subprocess("1"), _ids_in_subprocess("4242")
    assert a["seed_probe"] != b["seed_probe"]  # the seeds really differ in effect
    for field in ("plain", "extra", "namespace"):
        assert a[field] == b[field], field
    assert len(a["plain"]) == 8
    assert len(a["extra"]) == 16
    assert a["namespace"] == FP.namespace


# --- fingerprint / namespace -------------------------------------------------------


def _changed(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    raise TypeError(type(value))


def test_namespace_changes_when_any_field_changes() -> None:
    names = list(FP.to_json())
    assert {"model", "weights_id", "dtype", "chunk_tokens", "num_layers", "num_kv_heads",
            "head_size", "attention", "tag", "format_version", "hash_scheme",
            "engine"} == set(names)
    seen = {FP.namespace: "base"}
    for name in names:
        other = dataclasses.replace(FP, **{name: _changed(getattr(FP, name))})
        ns = other.namespace
        assert is_namespace(ns)
        assert ns not in seen, (name, seen.get(ns))
        seen[ns] = name
    assert len(seen) == len(names) + 1


def test_engine_settings_document_the_namespace_without_changing_it() -> None:
    """The readable settings go into namespace.json; their digest (``engine``) is hashed."""
    settings = '{"hf_overrides":{"rope_theta":100.0},"max_model_len":4096}'
    fp = dataclasses.replace(FP, engine="e" * 32, engine_settings=settings)
    assert fp.namespace == dataclasses.replace(fp, engine_settings="{}").namespace
    assert fp.namespace != FP.namespace
    assert "engine_settings" not in fp.to_json()
    doc = json.loads(fp.document())
    assert doc["namespace"] == fp.namespace
    assert doc["fingerprint"] == fp.to_json()
    assert doc["engine_settings"] == json.loads(settings)
    assert "engine_settings" not in json.loads(FP.document())


def test_parallel_layout_is_not_part_of_the_namespace() -> None:
    """TP size, block size and the backend's tensor layout do not change the bytes."""
    names = {f.name for f in dataclasses.fields(Fingerprint)}
    assert not names & {"tp_size", "pp_size", "pp_rank", "block_size", "kv_layout"}


def test_writer_ids_record_the_writer_tp_size() -> None:
    for tp in (1, 2, 8, 16, 1024):
        w = new_writer_id(tp, "0123456789ab")
        assert is_writer_id(w) and writer_tp(w) == tp
    for w in ("0123456789abcdef", "tp0-x", "tpx-1", "writer-1", "tp2"):
        assert writer_tp(w) is None


def test_namespace_is_stable_and_hex() -> None:
    same = Fingerprint(**FP.to_json())
    assert same.namespace == FP.namespace == KNOWN_NAMESPACE
    assert is_namespace(FP.namespace)
    assert FP.format_version == FORMAT_VERSION
    assert FP.hash_scheme == HASH_SCHEME
    doc = json.dumps(FP.to_json(), sort_keys=True, separators=(",", ":"))
    assert FP.namespace == hashlib.sha256(doc.encode()).hexdigest()[:32]


# --- key layout ----------------------------------------------------------------------


def test_layout_builds_the_documented_keys() -> None:
    assert LAYOUT.root() == "s3kv/prod/"
    assert LAYOUT.namespace_prefix(NS) == f"s3kv/prod/{NS}/"
    assert LAYOUT.namespace_doc(NS) == f"s3kv/prod/{NS}/namespace.json"
    assert LAYOUT.chunk_prefix(NS, CID) == f"s3kv/prod/{NS}/ab/{CID}/"
    assert LAYOUT.manifest(NS, CID) == f"s3kv/prod/{NS}/ab/{CID}/manifest.json"
    assert LAYOUT.shard(NS, CID, "w-1", 3, 17) == f"s3kv/prod/{NS}/ab/{CID}/w-1.17/r3"
    # The form written before shard keys were unique per save round.
    assert LAYOUT.shard(NS, CID, "w-1", 3) == f"s3kv/prod/{NS}/ab/{CID}/w-1/r3"


def test_parse_classifies_own_keys() -> None:
    assert LAYOUT.parse(LAYOUT.namespace_doc(NS)) == ParsedKey("namespace", NS, None, None, None)
    assert LAYOUT.parse(LAYOUT.manifest(NS, CID)) == ParsedKey("manifest", NS, CID, None, None)
    assert LAYOUT.parse(LAYOUT.shard(NS, CID, "host-7", 0)) == ParsedKey(
        "shard", NS, CID, "host-7", 0
    )
    assert LAYOUT.parse(LAYOUT.shard(NS, CID, "w", 1023)) == ParsedKey(
        "shard", NS, CID, "w", 1023
    )
    assert LAYOUT.parse(LAYOUT.shard(NS, CID, "tp2-3f9a0c1b2d4e", 1, 42)) == ParsedKey(
        "shard", NS, CID, "tp2-3f9a0c1b2d4e", 1, 42
    )


@pytest.mark.parametrize("round_id", [None, 0, 1, 9, 10, 12345, 10**20 - 1])
@pytest.mark.parametrize("rank", [0, 7, 9999])
@pytest.mark.parametrize("writer", ["w", "tp8-0123456789ab", "x" * 64])
def test_shard_keys_round_trip(writer: str, rank: int, round_id: int | None) -> None:
    key = LAYOUT.shard(NS, CID, writer, rank, round_id)
    parsed = LAYOUT.parse(key)
    assert parsed == ParsedKey("shard", NS, CID, writer, rank, round_id)
    assert parsed is not None and parsed.writer is not None and parsed.rank is not None
    assert LAYOUT.shard(NS, CID, parsed.writer, parsed.rank, parsed.round_id) == key
    assert writer_tp(parsed.writer) == (8 if writer.startswith("tp8-") else None)


def test_every_round_has_keys_of_its_own() -> None:
    """What keeps a re-save from overwriting committed bytes: no two rounds (and
    no round and the older form) share a key."""
    keys = {LAYOUT.shard(NS, CID, "tp2-w", r, n) for r in range(2) for n in range(50)}
    keys |= {LAYOUT.shard(NS, CID, "tp2-w", r) for r in range(2)}
    assert len(keys) == 2 * 50 + 2


@pytest.mark.parametrize(("rank", "round_id"), [(-1, 0), (10000, 0), (0, -1), (0, 10**20)])
def test_shard_rejects_what_no_key_can_carry(rank: int, round_id: int) -> None:
    with pytest.raises(ValueError):
        LAYOUT.shard(NS, CID, "w", rank, round_id)


@pytest.mark.parametrize(
    "key",
    [
        f"other/{NS}/namespace.json",
        f"s3kv/prodx/{NS}/namespace.json",
        f"s3kv/{NS}/namespace.json",
        f"s3kv/prod/{NS}/namespace.json.bak",
        f"s3kv/prod/{NS.upper()}/namespace.json",
        f"s3kv/prod/{NS[:-1]}/namespace.json",
        f"s3kv/prod/{NS}/ab/{CID}/manifest.json.tmp",
        f"s3kv/prod/{NS}/cd/{CID}/manifest.json",  # spread does not match the id
        f"s3kv/prod/{NS}/ab/{CID[:-1]}/manifest.json",
        f"s3kv/prod/{NS}/ab/{CID}/",
        f"s3kv/prod/{NS}/ab/{CID}/w/r",
        f"s3kv/prod/{NS}/ab/{CID}/w/r12345",
        f"s3kv/prod/{NS}/ab/{CID}/w/rank0",
        f"s3kv/prod/{NS}/ab/{CID}/W_1/r0",
        f"s3kv/prod/{NS}/ab/{CID}/w/r0/extra",
        f"s3kv/prod/{NS}/ab/{CID}/w.01/r0",  # not canonical: would not build back
        f"s3kv/prod/{NS}/ab/{CID}/w./r0",
        f"s3kv/prod/{NS}/ab/{CID}/.5/r0",
        f"s3kv/prod/{NS}/ab/{CID}/w.5.6/r0",
        f"s3kv/prod/{NS}/ab/{CID}/w.-1/r0",
        f"s3kv/prod/{NS}/ab/{CID}/w.5/r",
        f"s3kv/prod/{NS}/ab/{CID}/w.5/r0/extra",
        f"s3kv/prod/{NS}/ab/{CID}/W.5/r0",
        f"s3kv/prod/{NS}/ab/{CID}/w.{'1' * 21}/r0",
        f"s3kv/prod/{NS}/ab/{CID}/w.5/r0\n",
        f"s3kv/prod/{NS}/ab/{CID}/w.\u0665/r0",  # a non-ASCII digit
        f"s3kv/prod/{NS}/ab/{CID}/w/r\u0665",
        f"s3kv/prod/{NS}/ab",
        "s3kv/prod/",
        "",
    ],
)
def test_parse_rejects_foreign_keys(key: str) -> None:
    assert LAYOUT.parse(key) is None


REF_IDS = chain_chunk_ids(list(range(32)), 16)


def test_chunk_ref_is_a_value_that_pickles_back_to_itself() -> None:
    ref = ChunkRef(REF_IDS[1], REF_IDS[0], 1, 16)
    back = pickle.loads(pickle.dumps(ref))
    assert back == ref and hash(back) == hash(ref)
    assert (back.chunk_id, back.parent_id, back.index, back.num_tokens) == (
        REF_IDS[1], REF_IDS[0], 1, 16)
    assert ChunkRef(REF_IDS[0], None, 0, 16) != ChunkRef(REF_IDS[0], None, 0, 8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ref.index = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((REF_IDS[0], REF_IDS[1], 0, 16), "a parent exactly when"),  # parent at index 0
        ((REF_IDS[1], None, 1, 16), "a parent exactly when"),  # index 1 without one
        ((REF_IDS[0], REF_IDS[0], 1, 16), "bad parent"),  # the chunk as its own parent
        ((REF_IDS[1], "r-17", 1, 16), "bad parent"),  # a request id for the parent
        (("tp1-abc", None, 0, 16), "is not a chunk id"),  # a writer id for the chunk
        ((REF_IDS[1], REF_IDS[0], -1, 16), "index -1"),
        ((REF_IDS[1], REF_IDS[0], 1, 0), "0 tokens"),
    ],
)
def test_chunk_ref_refuses_mixed_up_fields(args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ChunkRef(*args)
