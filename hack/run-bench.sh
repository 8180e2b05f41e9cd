#!/usr/bin/env bash
# Bring up a private stack in .local/bench, run the benchmarks, always tear it down.
# BENCH=files,scale,replicate,datapath (default all); see bench/*.py for their knobs.
set -uo pipefail
state=.local/bench
export NIGHTJAR_STATE_DIR=$PWD/$state
trap '.venv/bin/python -m nightjar.devstack down --state "$state" >/dev/null 2>&1 || true' EXIT INT TERM
rc=0
for b in ${BENCH//,/ }; do
  .venv/bin/python -m nightjar.devstack up --state "$state" --no-operator >/dev/null || { echo "stack did not come up" >&2; exit 1; }
  echo "== $b"
  case $b in
    files) .venv/bin/python -m bench.backup_files || rc=1 ;;
    scale) .venv/bin/python -m bench.scale || rc=1 ;;
    replicate) .venv/bin/python -m bench.replicate || rc=1 ;;
    datapath) .venv/bin/python -m bench.datapath || rc=1 ;;
    *) echo "unknown benchmark $b" >&2; rc=1 ;;
  esac
  .venv/bin/python -m nightjar.devstack down --state "$state" >/dev/null
done
exit $rc
