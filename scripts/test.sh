#!/usr/bin/env bash
# Sets up everything needed (a no-op once done), then runs the whole suite.
#   ./scripts/test.sh              # everything
#   ./scripts/test.sh -k plan      # extra arguments go to pytest
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
exec "$ROOT/.venv/bin/python" -m pytest -p no:cacheprovider -q -rfE --durations=10 "$@"
