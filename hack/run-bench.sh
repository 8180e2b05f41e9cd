#!/usr/bin/env bash
# Bring up a private stack in .local/bench, run the benchmarks, always tear it down.
set -uo pipefail
state=.local/bench
export NIGHTJAR_STATE_DIR=$PWD/$state
trap '.venv/bin/python -m nightjar.devstack down --state "$state" >/dev/null 2>&1 || true' EXIT INT TERM
.venv/bin/python -m nightjar.devstack up --state "$state" --no-operator >/dev/null || { echo "stack did not come up" >&2; exit 1; }
.venv/bin/python -m bench.backup_files
