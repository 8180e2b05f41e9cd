#!/usr/bin/env bash
# Bring up a fresh local stack in STATE, run the fault-injection driver on it (`devstack chaos`,
# arguments passed on), always tear the stack down. Exits with the driver's status: 1 on any
# invariant violation (or the stack's, if it did not come up).
# NODE chooses what runs the Pods: real (default) or process.
set -uo pipefail
state=$1; shift
node=${NODE:-real}
py=.venv/bin/python
export NIGHTJAR_STATE_DIR=$PWD/$state
cleanup() { "$py" -m nightjar.devstack down --state "$state" >/dev/null 2>&1 || true; }
trap cleanup EXIT INT TERM
started=$SECONDS
"$py" -m nightjar.devstack up --state "$state" --node "$node" >/dev/null || { echo "the local stack did not come up; logs in $state/logs" >&2; exit 1; }
"$py" -m nightjar.devstack chaos --state "$state" "$@"
rc=$?
echo "chaos on the $node node: $((SECONDS - started)) s, the stack's start included" >&2
if [ $rc -ne 0 ]; then
  echo "invariant violations (or the driver failed); the stack's logs are in $state/logs (operator.log: the operator's)" >&2
fi
exit $rc
