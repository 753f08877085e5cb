#!/usr/bin/env bash
# The whole test suite: installs what it needs (idempotent), lints, then runs
# every test against the embedded moto HTTP server and, where Ceph RGW can be
# installed, the real-server tier against a local single-node Ceph RGW.
#   S3KV_SKIP_CEPH=1   skip the Ceph tier (it needs root and Debian packages)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
export TMPDIR="$PWD/.tmp"
mkdir -p "$TMPDIR"

echo "== lint"
.venv/bin/ruff check s3kv tests bench devtools scripts/check_privates.py
.venv/bin/mypy --explicit-package-bases s3kv tests bench devtools scripts/check_privates.py
.venv/bin/python scripts/check_privates.py

echo "== tests (moto HTTP server)"
.venv/bin/python -m pytest -q "$@"

if [ "$#" -eq 0 ]; then
  echo "== soak (real engines, random faults through the proxy)"
  .venv/bin/python -m tests.faults.soak --engines 4 --seed "${S3KV_SOAK_SEED:-1}" \
    --json .tmp/soak-report.json
fi

if [ "${S3KV_SKIP_CEPH:-0}" != 1 ] && [ -x scripts/ceph_rgw.sh ]; then
  echo "== real-server tier (Ceph RGW)"
  scripts/ceph_rgw.sh start
  trap 'scripts/ceph_rgw.sh stop' EXIT
  eval "$(scripts/ceph_rgw.sh env)"
  # tests/cli/test_scale.py starts a moto server of its own and never uses
  # this endpoint: the moto tier already ran exactly the same test.
  .venv/bin/python -m pytest -q tests/store tests/cli \
    --deselect tests/cli/test_scale.py::test_ls_du_over_10k_chunks \
    "tests/vllm/test_connector_e2e.py::test_a_tp1_second_engine_hits_and_matches" \
    "tests/vllm/test_faults_e2e.py::test_wrong_credentials_serve_without_cache_and_never_log_the_secret"
fi
