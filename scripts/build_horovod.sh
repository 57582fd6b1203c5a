#!/usr/bin/env bash
# Build (or reuse) the Horovod 0.28.1 wheel for this venv's TensorFlow and install it.
#
# The wheel is cached outside the repo, keyed on the Python and TF versions, so a
# second set-up takes seconds. Recipe: ../shared/horovod.md (two include paths the TF
# wheel already ships plus a forwarding header; no change to Horovod's source).
set -euo pipefail
PY=${PY:-python}
HOROVOD_VERSION=0.28.1
TF_VER=$("$PY" -c 'import tensorflow as tf; print(tf.__version__)' 2>/dev/null)
PY_TAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
CACHE=${TFSHARD_CACHE:-$HOME/.cache/tfshard}/horovod-$HOROVOD_VERSION-tf$TF_VER-$PY_TAG
mkdir -p "$CACHE"

if "$PY" -c 'import horovod.tensorflow' >/dev/null 2>&1 \
   && [ "$("$PY" -c 'import horovod; print(horovod.__version__)')" = "$HOROVOD_VERSION" ]; then
  echo "[build_horovod] horovod $HOROVOD_VERSION already installed"
  exit 0
fi

shopt -s nullglob
wheels=("$CACHE"/horovod-*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
  echo "[build_horovod] building horovod $HOROVOD_VERSION against TF $TF_VER (~6 min on 2 cores)"
  TFINC=$("$PY" -c 'import tensorflow as tf; print(tf.sysconfig.get_include())')
  SHIM=$(mktemp -d)
  trap 'rm -rf "$SHIM"' EXIT
  mkdir -p "$SHIM/tensorflow/compiler/xla/client"
  printf '#pragma once\n#include "xla/hlo/builder/xla_builder.h"\n' \
    > "$SHIM/tensorflow/compiler/xla/client/xla_builder.h"
  BUILD=$(mktemp -d)
  HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
  HOROVOD_WITHOUT_MPI=1 HOROVOD_WITH_GLOO=1 HOROVOD_CPU_OPERATIONS=GLOO \
  MAKEFLAGS=-j2 CMAKE_POLICY_VERSION_MINIMUM=3.5 \
  CXXFLAGS="-I$SHIM -I$TFINC/external/highwayhash -I$TFINC/external/farmhash_archive/src" \
    "$PY" -m pip wheel --no-build-isolation --no-cache-dir --no-deps \
      -w "$BUILD" "horovod==$HOROVOD_VERSION"
  mv "$BUILD"/horovod-*.whl "$CACHE"/
  rm -rf "$BUILD"
  wheels=("$CACHE"/horovod-*.whl)
fi
echo "[build_horovod] installing ${wheels[0]}"
"$PY" -m pip install --no-deps --quiet "${wheels[0]}"
