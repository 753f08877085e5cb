#!/usr/bin/env bash
# The demo: installs what it needs (idempotent), then runs a cold and a warm
# engine against an embedded local S3 server. Extra arguments are passed on
# (see: .venv/bin/python -m devtools.demo --help).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
export TMPDIR="$PWD/.tmp"
mkdir -p "$TMPDIR"
exec .venv/bin/python -m devtools.demo "$@"
