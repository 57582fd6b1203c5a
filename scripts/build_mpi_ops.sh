#!/usr/bin/env bash
# Compiles tfshard's MPI collective ops (tfshard/comm/mpi_ops.cc) into
# tfshard/comm/_mpi_ops.so, against this venv's TensorFlow headers and MPICH wheel, and
# records the source's sha256 beside it (_mpi_ops.so.sha256), which tfshard checks at load.
# A no-op when the recorded digest matches the source (file times do not matter: a git
# checkout rewrites them). Also builds tfshard/_loopback.so (tfshard/loopback.c), the
# bind() shim that keeps a local job's listeners on loopback.
#   PY=.venv/bin/python bash scripts/build_mpi_ops.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
BIN=$(dirname "$PY")
SRC="$ROOT/tfshard/comm/mpi_ops.cc"
OUT="$ROOT/tfshard/comm/_mpi_ops.so"
LOOP_SRC="$ROOT/tfshard/loopback.c"
LOOP_OUT="$ROOT/tfshard/_loopback.so"
LOOP_DIGEST=$(sha256sum "$LOOP_SRC" | cut -d' ' -f1)
if [ ! -f "$LOOP_OUT" ] || [ "$(cat "$LOOP_OUT.sha256" 2>/dev/null)" != "$LOOP_DIGEST" ]; then
  ltmp=$(mktemp "$LOOP_OUT.tmp-XXXXXX")
  ${CC:-cc} -O2 -fPIC -shared -Wall -o "$ltmp" "$LOOP_SRC" -ldl
  mv -f "$ltmp" "$LOOP_OUT"
  printf '%s\n' "$LOOP_DIGEST" > "$LOOP_OUT.sha256"
  echo "[build_mpi_ops] built $LOOP_OUT"
fi
DIGEST=$(sha256sum "$SRC" | cut -d' ' -f1)
if [ -f "$OUT" ] && [ "$(cat "$OUT.sha256" 2>/dev/null)" = "$DIGEST" ]; then
  exit 0
fi
export TF_CPP_MIN_LOG_LEVEL=3
read -r -a TF_CFLAGS <<<"$("$PY" -c 'import tensorflow as tf; print(" ".join(tf.sysconfig.get_compile_flags()))' 2>/dev/null)"
read -r -a TF_LFLAGS <<<"$("$PY" -c 'import tensorflow as tf; print(" ".join(tf.sysconfig.get_link_flags()))' 2>/dev/null)"
TF_LIB=$("$PY" -c 'import tensorflow as tf; print(tf.sysconfig.get_lib())' 2>/dev/null)
MPI_LIB=$(cd "$BIN/../lib" && pwd)
echo "[build_mpi_ops] compiling $SRC"
tmp=$(mktemp "$OUT.tmp-XXXXXX")
trap 'rm -f "$tmp"' EXIT
# mpicxx (the MPICH wheel's wrapper) adds MPI's include and library flags; the rpaths let
# the library find libmpi and TensorFlow's framework library without LD_LIBRARY_PATH.
"$BIN/mpicxx" -std=c++17 -O2 -fPIC -shared -w \
  "${TF_CFLAGS[@]}" "$SRC" -o "$tmp" "${TF_LFLAGS[@]}" \
  -Wl,-rpath,"$MPI_LIB" -Wl,-rpath,"$TF_LIB"
mv -f "$tmp" "$OUT"
trap - EXIT
printf '%s\n' "$DIGEST" > "$OUT.sha256.tmp" && mv -f "$OUT.sha256.tmp" "$OUT.sha256"
echo "[build_mpi_ops] built $OUT"
