#!/usr/bin/env bash
# Build (or reuse) the Horovod 0.28.1 wheel for this venv's TensorFlow and MPI, and install it.
#
# Horovod is built with both controllers: MPI (against the MPICH wheel in the venv, the
# launcher's default) and Gloo (`./horovodrun.sh --gloo`). The wheel is cached outside the
# repo, keyed on the Python, TF and MPI versions, so a second set-up takes seconds.
# Recipe: ../shared/horovod.md and ../shared/mpi.md (two include paths the TF wheel
# already ships; the recipe's forwarding header served only the XLA ops file, which is
# left out below).
#
# One fix to Horovod's source, on the sdist downloaded from PyPI: a Gloo process set's
# context (every collective of `hvd` runs on one, the global set included) created its TCP
# device from its own, never set, interface instead of the global context's
# HOROVOD_GLOO_IFACE, so it resolved the hostname instead; where that names 127.0.1.1
# (Debian's default /etc/hosts), ranks on other hosts were told a loopback address and
# multi-host Gloo jobs died with "connect [127.0.0.1]: Connection refused".
#
# Two cuts to the build's time, which every fresh machine pays: a Release build instead
# of RelWithDebInfo (the same -O3, without debug info for every TensorFlow header it
# includes), and no horovod/tensorflow/xla_mpi_ops.cc, whose code is all under HAVE_GPU
# (on this CPU-only build it compiled XLA's headers and nothing else). The wheel's cache
# key carries the patches' name.
#
# The `-include` flags make Horovod's headers build with gcc 13+ (they rely on
# <string>/<stdexcept>/<cstdint> arriving transitively, which newer libstdc++ no longer
# does; upstream PR #3957, never released).
set -euo pipefail
PY=${PY:-python}
HOROVOD_VERSION=0.28.1
BIN=$(dirname "$PY")
TF_VER=$("$PY" -c 'import tensorflow as tf; print(tf.__version__)' 2>/dev/null)
PY_TAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
MPI_VER=$("$BIN/mpichversion" --version 2>/dev/null | awk '{print $NF}' || echo none)
PATCH=gloo-iface1-lean1
CACHE=${TFSHARD_CACHE:-$HOME/.cache/tfshard}/horovod-$HOROVOD_VERSION-$PATCH-tf$TF_VER-$PY_TAG-mpich$MPI_VER
mkdir -p "$CACHE"

have_mpi() {  # the installed Horovod has the MPI controller built in
  "$PY" -c 'import horovod.tensorflow as h, sys; sys.exit(0 if h.mpi_built() and h.gloo_built() else 1)' \
    >/dev/null 2>&1
}
# (Empty when Horovod is not installed yet: the file test below then fails, as it should.)
PATCHED="$("$PY" -c 'import horovod, os; print(os.path.dirname(horovod.__file__))' 2>/dev/null || true)/.tfshard-$PATCH"
if [ "$("$PY" -c 'import horovod; print(horovod.__version__)' 2>/dev/null)" = "$HOROVOD_VERSION" ] \
   && have_mpi && [ -f "$PATCHED" ]; then
  echo "[build_horovod] horovod $HOROVOD_VERSION (MPI + Gloo) already installed"
  exit 0
fi

shopt -s nullglob
wheels=("$CACHE"/horovod-*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
  echo "[build_horovod] building horovod $HOROVOD_VERSION ($PATCH) against TF $TF_VER and MPICH $MPI_VER (~2 min on 2 cores)"
  TFINC=$("$PY" -c 'import tensorflow as tf; print(tf.sysconfig.get_include())')
  BUILD=$(mktemp -d)
  trap 'rm -rf "$BUILD"' EXIT
  SRC="$BUILD/horovod-$HOROVOD_VERSION"
  "$PY" -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation \
    -d "$BUILD" "horovod==$HOROVOD_VERSION"
  tar -xzf "$BUILD/horovod-$HOROVOD_VERSION.tar.gz" -C "$BUILD"
  CTX="$SRC/horovod/common/gloo/gloo_context.cc"
  grep -q '  device_attr.iface = gloo_iface_;' "$CTX"
  # In InitializeForProcessSet (the second of the two places): the global context's.
  awk '/void GlooContext::InitializeForProcessSet/ {inside = 1}
       inside && /device_attr.iface = gloo_iface_;/ {
         sub(/gloo_iface_;/, "global_context.gloo_iface_;"); inside = 0}
       {print}' "$CTX" > "$CTX.new" && mv "$CTX.new" "$CTX"
  grep -q 'device_attr.iface = global_context.gloo_iface_;' "$CTX"
  # Release, not RelWithDebInfo; no XLA ops file (GPU-only code) on this CPU build.
  sed -i "s/else 'RelWithDebInfo'/else 'Release'/" "$SRC/setup.py"
  grep -q "else 'Release'" "$SRC/setup.py"
  TFCM="$SRC/horovod/tensorflow/CMakeLists.txt"
  sed -i '/horovod\/tensorflow\/xla_mpi_ops.cc/d' "$TFCM"
  ! grep -q xla_mpi_ops "$TFCM"
  # CMake's FindMPI must see the venv's mpicxx (the MPICH wheel), not a system MPI.
  PATH="$BIN:$PATH" \
  HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
  HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
  MAKEFLAGS=-j2 CMAKE_POLICY_VERSION_MINIMUM=3.5 \
  CXXFLAGS="-include cstdint -include stdexcept -include string -I$TFINC/external/highwayhash -I$TFINC/external/farmhash_archive/src" \
    "$PY" -m pip wheel --no-build-isolation --no-cache-dir --no-deps \
      -w "$BUILD" "$SRC"
  mv "$BUILD"/horovod-*.whl "$CACHE"/
  wheels=("$CACHE"/horovod-*.whl)
fi
echo "[build_horovod] installing ${wheels[0]}"
"$PY" -m pip install --no-deps --force-reinstall --quiet "${wheels[0]}"
touch "$("$PY" -c 'import horovod, os; print(os.path.dirname(horovod.__file__))')/.tfshard-$PATCH"
