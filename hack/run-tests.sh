#!/usr/bin/env bash
# Bring up a fresh local stack in STATE, run pytest on the given paths, always tear it down.
# Exits with pytest's status (or the stack's, if it did not come up).
# NODE chooses what runs the Pods: process (default) or real (`devstack up --node`).
# NIGHTJAR_STACK_ARGS passes options to `devstack up` (the e2e tier uses --no-operator: the
# operator there is the one the Helm chart installs).
set -uo pipefail
state=$1; shift
node=${NODE:-process}
py=.venv/bin/python
export NIGHTJAR_STATE_DIR=$PWD/$state
cleanup() { "$py" -m nightjar.devstack down --state "$state" >/dev/null 2>&1 || true; }
trap cleanup EXIT INT TERM
# shellcheck disable=SC2086
"$py" -m nightjar.devstack up --state "$state" --node "$node" ${NIGHTJAR_STACK_ARGS:-} || { echo "the local stack did not come up; logs in $state/logs" >&2; exit 1; }
started=$SECONDS
.venv/bin/pytest "$@"
rc=$?
echo "pytest $* on the $node node: $((SECONDS - started)) s" >&2
if [ $rc -ne 0 ]; then
  echo "tests failed; the stack's logs are in $state/logs (the stack is stopped)" >&2
fi
exit $rc
