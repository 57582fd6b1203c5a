#!/usr/bin/env bash
# Compiles tfshard's TensorFlow ops against this venv's TensorFlow headers, each only when
# the sha256 recorded beside its library (NAME.so.sha256, which tfshard checks at load)
# differs from its source's (file times do not matter: a git checkout rewrites them):
#   tfshard/comm/mpi_ops.cc    -> tfshard/comm/_mpi_ops.so    MPI collectives (MPICH wheel)
#   tfshard/layers/kernels/    -> tfshard/layers/_kernels.so  the decode kernels and ops: each
#                                 isa_*.cc compiled with its instruction set's flags (AVX-512,
#                                 AVX2+FMA, plain C++), chosen at run time by dispatch.cc
# Also builds tfshard/_loopback.so (tfshard/loopback.c), the bind() shim that keeps a local
# job's listeners on loopback.
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
export TF_CPP_MIN_LOG_LEVEL=3
TF_READ=0
tf_flags() {
  [ "$TF_READ" = 1 ] && return
  read -r -a TF_CFLAGS <<<"$("$PY" -c 'import tensorflow as tf; print(" ".join(tf.sysconfig.get_compile_flags()))' 2>/dev/null)"
  read -r -a TF_LFLAGS <<<"$("$PY" -c 'import tensorflow as tf; print(" ".join(tf.sysconfig.get_link_flags()))' 2>/dev/null)"
  TF_LIB=$("$PY" -c 'import tensorflow as tf; print(tf.sysconfig.get_lib())' 2>/dev/null)
  TF_READ=1
}

# build_op SRC OUT COMPILER [EXTRA LINK FLAGS...]: compiles SRC into OUT (atomically) unless
# OUT.sha256 already records SRC's digest.
build_op() {
  local src=$1 out=$2 cxx=$3
  shift 3
  local digest
  digest=$(sha256sum "$src" | cut -d' ' -f1)
  if [ -f "$out" ] && [ "$(cat "$out.sha256" 2>/dev/null)" = "$digest" ]; then
    return 0
  fi
  tf_flags
  echo "[build_mpi_ops] compiling $src"
  local tmp
  tmp=$(mktemp "$out.tmp-XXXXXX")
  # The rpaths let the library find TensorFlow's framework library (and libmpi) without
  # LD_LIBRARY_PATH.
  if ! "$cxx" -std=c++17 -O2 -fPIC -shared -w "${TF_CFLAGS[@]}" "$src" -o "$tmp" \
      "${TF_LFLAGS[@]}" -Wl,-rpath,"$TF_LIB" "$@"; then
    rm -f "$tmp"
    return 1
  fi
  mv -f "$tmp" "$out"
  printf '%s\n' "$digest" > "$out.sha256.tmp" && mv -f "$out.sha256.tmp" "$out.sha256"
  echo "[build_mpi_ops] built $out"
}

# mpicxx (the MPICH wheel's wrapper) adds MPI's include and library flags.
MPI_LIB=$(cd "$BIN/../lib" && pwd)
build_op "$SRC" "$OUT" "$BIN/mpicxx" -Wl,-rpath,"$MPI_LIB"

# The sha256 recorded for a folder of sources: of sha256sum's listing of its files in name
# order (tfshard.comm.base.source_digest computes the same).
folder_digest() {
  (cd "$1" && find . -maxdepth 1 -type f -printf '%f\n' | LC_ALL=C sort | xargs -d '\n' sha256sum) \
    | sha256sum | cut -d' ' -f1
}

# build_kernels DIR OUT: the decode kernels, one object per file (isa_*.cc with their own
# instruction set's flags), linked into OUT (atomically) unless OUT.sha256 records DIR's digest.
build_kernels() {
  local dir=$1 out=$2 cxx=${CXX:-c++}
  local digest
  digest=$(folder_digest "$dir")
  if [ -f "$out" ] && [ "$(cat "$out.sha256" 2>/dev/null)" = "$digest" ]; then
    return 0
  fi
  tf_flags
  echo "[build_mpi_ops] compiling $dir"
  local objs tmp src flags
  objs=$(mktemp -d)
  for src in "$dir"/*.cc; do
    case "$(basename "$src")" in
      isa_avx512.cc) flags=(-mavx512f -mavx512bw -mavx512vl -mavx512vnni -mfma) ;;
      isa_avx2.cc) flags=(-mavx2 -mfma) ;;
      *) flags=() ;;
    esac
    "$cxx" -std=c++17 -O2 -fPIC -w "${TF_CFLAGS[@]}" ${flags[@]+"${flags[@]}"} -c "$src" \
      -o "$objs/$(basename "$src" .cc).o" &
  done
  if ! wait_all; then rm -rf "$objs"; return 1; fi
  tmp=$(mktemp "$out.tmp-XXXXXX")
  if ! "$cxx" -shared -o "$tmp" "$objs"/*.o "${TF_LFLAGS[@]}" -Wl,-rpath,"$TF_LIB"; then
    rm -rf "$objs" "$tmp"
    return 1
  fi
  rm -rf "$objs"
  mv -f "$tmp" "$out"
  printf '%s\n' "$digest" > "$out.sha256.tmp" && mv -f "$out.sha256.tmp" "$out.sha256"
  echo "[build_mpi_ops] built $out"
}

# Waits for every background job; fails if any failed.
wait_all() {
  local ok=0 pid
  for pid in $(jobs -p); do wait "$pid" || ok=1; done
  return $ok
}

build_kernels "$ROOT/tfshard/layers/kernels" "$ROOT/tfshard/layers/_kernels.so"
