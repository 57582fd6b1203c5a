"""The matmuls of a decode step with bfloat16 or int8 weights, through tfshard's ops.

A decode step multiplies a few rows (one per sequence) by every weight, so its
time is the time to read the weights: a bfloat16 model should decode in about
half of float32's time, an int8 one in a quarter. TensorFlow's CPU kernels do
not get there for so few rows (oneDNN's bfloat16 GEMM reads ~7 GiB/s on this
project's machine, float32 13-18 GiB/s; the int8 x int8 -> int32 matmul of
Keras's int8 layers is slower still), so `kernels/matmul_ops.cc` adds two ops that
stream the weight once (through `kernels/kernels.h`'s kernels: AVX-512, AVX2 or plain
C++, whichever the CPU runs; `TFSHARD_KERNELS_ISA` forces one):

- `TfshardBf16Matmul`: each bfloat16 widened to float32 (a shift), float32
  FMAs, the output rounded to bfloat16 once -- what TensorFlow's bfloat16
  matmul computes, in another order of summation (within bfloat16's envelope);
- `TfshardInt8Matmul`: int8 x int8 summed in int32, exact, so the same bits as
  TensorFlow's (the int8 layers stay equal to the unsharded ones bit for bit).

The sharded layers call `matmul` and `einsum` here. They take an op when both
operands are bfloat16 (or both int8), the rows (the product of the input's
leading dimensions) are known when the graph is traced and at most `MAX_ROWS`,
and the op library is built; otherwise Keras's matmul / einsum, unchanged. TFSHARD_DECODE_OPS=0 turns the ops off (for side-by-side
benchmarks).
"""

import ctypes
import os
import warnings

import numpy as np
import tensorflow as tf
from keras import ops

from tfshard.comm.base import built_from

LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_kernels.so")
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")

#: Most rows a matmul may have to go through the op (a decode step's batch).
MAX_ROWS = 8

#: The environment variable that turns the ops off ("0").
ENV = "TFSHARD_DECODE_OPS"

#: How many times an op was put in a graph (or run eagerly); tests read it.
placed = {"count": 0}

_OPS = {tf.bfloat16: "tfshard_bf16_matmul", tf.int8: "tfshard_int8_matmul"}

_state = {}


def _load():
    """The op library loaded into TensorFlow (before any ctypes handle: TensorFlow collects
    the ops a library registers while it loads it), or None when missing or stale (with
    one warning)."""
    if "library" not in _state:
        _state["library"] = None
        if not os.path.exists(LIBRARY):
            warnings.warn(f"tfshard: {LIBRARY} is not built; bfloat16 and int8 decode use "
                          "TensorFlow's matmul. Run ./scripts/setup.sh to build it.")
        elif not built_from(LIBRARY, SOURCE):
            warnings.warn(f"tfshard: {LIBRARY} was not built from this {SOURCE}; bfloat16 "
                          "and int8 decode use TensorFlow's matmul. Run ./scripts/setup.sh.")
        else:
            _state["library"] = tf.load_op_library(LIBRARY)
    return _state["library"]


def _ops():
    """The op library, or None when it cannot be used here (with one warning)."""
    if "ops" not in _state:
        _state["ops"] = None
        library = _load()
        if library is not None:
            isa = kernels_isa()
            if isa.startswith("error: "):
                warnings.warn(f"tfshard: {isa[7:]}; bfloat16 and int8 decode use TensorFlow's "
                              "matmul.")
            else:
                _state["ops"] = library
    return _state["ops"]


def kernels_isa():
    """The instruction set tfshard's kernels run on here ("avx512", "avx2", "generic",
    "generic16"; `TFSHARD_KERNELS_ISA` forces one), or "error: ..." saying why the one
    asked for cannot run, or "unbuilt" when the library is missing or stale."""
    if _load() is None:
        return "unbuilt"
    isa = ctypes.CDLL(LIBRARY).tfshard_kernels_isa
    isa.restype = ctypes.c_char_p
    return isa().decode()


def library():
    """The loaded op library (its decode ops and matmuls), or None when it is not built,
    is stale, or cannot run here (a warning says which)."""
    return _ops()


def available():
    """Whether the ops are used on this machine now (built, not turned off)."""
    return os.environ.get(ENV, "1") != "0" and _ops() is not None


def _rows(x):
    """The product of `x`'s leading dimensions when known, else None."""
    lead = x.shape[:-1]
    if lead.rank is None or not lead.is_fully_defined():
        return None
    return int(np.prod(lead.as_list(), dtype=np.int64))


def _takes(x, w):
    rows = _rows(x)
    return (x.dtype == w.dtype and x.dtype in _OPS and rows is not None
            and rows <= MAX_ROWS and available())


def _op(x, w, transpose_b):
    placed["count"] += 1
    return getattr(_ops(), _OPS[x.dtype])(x, w, transpose_b=transpose_b)


def matmul(x, w, transpose_b=False):
    """`x @ w` (`x @ w^T` with `transpose_b`) for `x [..., K]` and a 2-D `w`.

    Args:
        x: the input, `[..., K]` (2-D when `transpose_b`).
        w: `[K, N]`, or `[N, K]` with `transpose_b`.
        transpose_b: contract with `w`'s last axis.

    Returns:
        `[..., N]`, in the operands' dtype (int32 for int8 operands, as Keras's).
    """
    x, w = ops.convert_to_tensor(x), ops.convert_to_tensor(w)
    if _takes(x, w):
        return _op(x, w, transpose_b)
    if not transpose_b:
        return ops.matmul(x, w)
    if x.dtype != w.dtype or x.dtype == tf.int8:
        return ops.matmul(x, ops.transpose(w))  # Keras's dtype rules (int8 -> int32)
    return tf.matmul(x, w, transpose_b=True)


def einsum(equation, x, w):
    """`ops.einsum(equation, x, w)`; through the op when the equation is a matmul.

    A matmul here: the contracted letters end the input and start the kernel in the
    same order, and the output is the input's other letters, then the kernel's (as
    keras-hub's q/k/v/o projections, "bqm,muh->bquh" and "bquh,uhm->bqm").

    Args:
        equation: an EinsumDense equation "in,kernel->out".
        x: the input.
        w: the kernel.

    Returns:
        The einsum.
    """
    x, w = ops.convert_to_tensor(x), ops.convert_to_tensor(w)
    contracted = _matmul_split(equation)
    if contracted and x.dtype in _OPS and w.shape.is_fully_defined():
        k = int(np.prod(w.shape[:contracted]))
        lead = x.shape[:x.shape.rank - contracted] if x.shape.rank is not None else None
        if lead is not None and lead.is_fully_defined():
            flat = tf.reshape(x, lead.as_list() + [k])
            if _takes(flat, w):
                w2d = tf.reshape(w, [k, -1])
                out = _op(flat, w2d, False)
                return tf.reshape(out, lead.as_list() + w.shape[contracted:].as_list())
    return ops.einsum(equation, x, w)


def _matmul_split(equation):
    """How many contracted letters a matmul-shaped equation has, else 0."""
    try:
        lhs, out = equation.replace(" ", "").split("->")
        inp, ker = lhs.split(",")
    except ValueError:
        return 0
    if "." in ker or any(len(set(s.replace(".", ""))) != len(s.replace(".", ""))
                         for s in (inp, ker, out)):
        return 0
    contracted = "".join(c for c in ker if c in inp and c not in out)
    n = len(contracted)
    if not n or not inp.endswith(contracted) or not ker.startswith(contracted):
        return 0
    return n if out == inp[:-n] + ker[n:] else 0
