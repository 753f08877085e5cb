#!/usr/bin/env bash
# The GPU check: s3kv's own GPU code (pinned buffers, the save path's copy-out:
# gather on the forward stream, device-to-host on a side stream; stream
# ordering in vLLM's hook order, load stream, every GPU cache layout) on a real
# GPU, without vLLM. Needs only Python with CUDA PyTorch, pytest, xxhash and
# typing_extensions; wheels of missing pure-Python dependencies may lie in
# ./wheels (installed from there, never from the network). Prints one table
# (bench/gpu_forward.py: forward-path host time, copy-out throughput against a
# raw device-to-host copy, its gather and D2H parts, the overwrite-race
# control); exits non-zero if a test failed or the save path lost the race.
# Without a GPU the tests skip with that reason and the CPU variants of the
# copy and worker-side checks still run. Where vLLM and moto are installed it
# then runs the hybrid-model engines end to end (tests/vllm/test_hybrid_e2e.py,
# and the SSM hybrids of tests/vllm/test_ssm_e2e.py, big steps included).
#   scripts/gpu_check.sh [--quick] [--copy-only]   results also under $OUT (or .tmp/gpu-check)
# --copy-only skips the forward-step figures (copy rates and the race only).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
out=${OUT:-.tmp/gpu-check}
mkdir -p "$out"
export TMPDIR=${TMPDIR:-$PWD/.tmp}
mkdir -p "$TMPDIR"

if [ -d wheels ]; then
  "$PY" -m pip install -q --no-index --find-links wheels -r <(ls wheels) >/dev/null 2>&1 || true
fi
missing=$("$PY" - <<'PY'
import importlib
need = ["torch", "pytest", "xxhash", "typing_extensions"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
  echo "gpu_check: missing Python packages: $missing (put their wheels in ./wheels)" >&2
  exit 2
fi

# --confcutdir keeps the suite-wide tests/conftest.py (S3 servers, boto3) out:
# these tests use the in-memory store.
"$PY" -m pytest -q -p no:cacheprovider --confcutdir=tests/gpu tests/gpu \
  --junitxml="$out/gpu-tests.xml" -rfEs >"$out/gpu-tests.log" 2>&1
tests_rc=$?
tail -n 25 "$out/gpu-tests.log"
echo
"$PY" bench/gpu_forward.py --junit "$out/gpu-tests.xml" --json "$out/gpu_forward.json" "$@"
bench_rc=$?

# Hybrid models end to end (sliding-window, full-attention and Mamba KV cache
# groups, vLLM's hybrid manager on) on real engines, where vLLM and moto are installed:
# outputs with the cache equal outputs without it, hits load fewer bytes.
hybrid_rc=0
if "$PY" -c 'import vllm, moto, boto3' 2>/dev/null; then
  echo
  echo "== hybrid models end to end (tests/vllm/test_hybrid_e2e.py, test_ssm_e2e.py)"
  "$PY" -m pytest -q -p no:cacheprovider -s tests/vllm/test_hybrid_e2e.py \
    tests/vllm/test_ssm_e2e.py \
    --junitxml="$out/hybrid-e2e.xml" >"$out/hybrid-e2e.log" 2>&1
  hybrid_rc=$?
  grep -E "bytes loaded per hit|passed|failed|error" "$out/hybrid-e2e.log" | tail -n 5
else
  echo "hybrid end to end: skipped (needs vllm, moto and boto3 in $PY)"
fi
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ] && [ "$hybrid_rc" = 0 ]
