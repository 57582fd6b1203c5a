#!/usr/bin/env bash
# Sets up everything needed (a no-op once done), then runs the whole suite.
#   ./scripts/test.sh              # everything
#   ./scripts/test.sh -k plan      # extra arguments go to pytest (both passes)
#
# Two passes. First every test not marked `alone`, spread over TFSHARD_TEST_WORKERS
# pytest-xdist workers (default 2), a test file to a worker so that one file's shared
# launches stay in one process, the longest files first (tests/conftest.py): one pass
# alone left a core idle a third of the time (ranks waiting on each other, start-up).
# Then, on an otherwise idle machine, the `alone` tests: those that bound a job's
# wall-clock time (a dead rank noticed within N seconds), which the first pass's load
# would make flaky. They mostly wait for a deadline, so two run at a time, test by test
# (a test's own launches in one worker; an `xdist_group` keeps tests that share a
# resource, such as the simulated hosts' network, in one worker).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
PYTEST=("$ROOT/.venv/bin/python" -m pytest -p no:cacheprovider -q -rfE --durations=10)
WORKERS=${TFSHARD_TEST_WORKERS:-2}

# While two workers share the cores, a waiting MPI rank sleeps soon rather than spin
# (the spin assumes a core of its own), and a collective waits longer than its 30 s
# default for a rank that the other worker slows; tests that set either keep theirs.
rc=0
TFSHARD_MPI_SPIN_US=${TFSHARD_MPI_SPIN_US:-20} \
TFSHARD_COLLECTIVE_TIMEOUT_SECONDS=${TFSHARD_COLLECTIVE_TIMEOUT_SECONDS:-120} \
  "${PYTEST[@]}" -n "$WORKERS" --dist loadfile --no-loadscope-reorder -m "not alone" "$@" || rc=$?
# Exit code 5: this pass selected no test (e.g. `-k` named only `alone` tests).
[ "$rc" -eq 5 ] && rc=0
rc2=0
"${PYTEST[@]}" -n "$WORKERS" --dist loadgroup -m alone "$@" || rc2=$?
[ "$rc2" -eq 5 ] && rc2=0
[ "$rc" -ne 0 ] && exit "$rc"
exit "$rc2"
