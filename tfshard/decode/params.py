"""A Keras layer's weights as the decode ops read them: format strings and variable handles.

The decode ops (`tfshard/layers/kernels/decode_ops.cc`) read Keras's variables in place,
through their resource handles, and are told how to read each weight by a format string
"fmt:layout:K:N[:b]": fmt `f32`, `bf16`, `i8` (int8 + a scale per output), `i4c` (int4
packed two a byte + a scale per output) or `i4g` (int4 + per-group scales, zero points
and group numbers); layout `kn` (a Dense kernel, `[K, N]`; int4 packed along N), `nk` (an
embedding table, `[N, K]`) or `pk` (int4 `[K, N]` packed along K: an untied reverse
table); `:b` when a bias follows. A sharded layer is read as this rank's slice.
"""

import math

import keras

from tfshard.layers import int4
from tfshard.layers.einsum_dense import einsum_axes


class Unsupported(Exception):
    """The model has something the decode step does not compute (the message says what);
    generation then runs keras-hub's own loop."""


class Param:
    """One weight's op arguments.

    Attributes:
        format: the format string (see the module docstring).
        handles: the variables' resource handles, in the order the format reads them.
        name: the layer path, for errors.
        K: the contracted size.
        N: the output size (this rank's).
        row_cut: whether the output is a partial sum across ranks (a row-parallel cut).
        column_cut: whether the output is this rank's slice of the columns.
        int8: whether the weight is int8 (its input is quantized per row).
    """

    def __init__(self, fmt, layout, K, N, variables, name, bias=None, row_cut=False,
                 column_cut=False):
        self.K, self.N, self.name = int(K), int(N), name
        self.format = f"{fmt}:{layout}:{self.K}:{self.N}" + (":b" if bias is not None else "")
        self.handles = [handle(v) for v in variables] + ([handle(bias)] if bias is not None else [])
        self.row_cut, self.column_cut, self.int8 = row_cut, column_cut, fmt == "i8"

    def __repr__(self):
        return f"Param({self.name}, {self.format})"


def handle(variable):
    """The resource handle of a Keras (or TensorFlow) variable."""
    try:
        return variable.handle
    except AttributeError:
        raise Unsupported(f"{getattr(variable, 'path', variable)!r} is not a resource "
                          "variable") from None


def _var(layer, attr):
    value = layer.__dict__.get(attr)
    return value if isinstance(value, keras.Variable) else None


def _rule(layer):
    spec = getattr(layer, "shard_spec", None)
    return getattr(spec, "rule", None) if spec is not None and spec.is_cut else None


def logical_shape(layer):
    """The kernel's shape as a float kernel would have it, this rank's part."""
    spec = getattr(layer, "shard_spec", None)
    if spec is not None and spec.is_cut:
        return tuple(int(n) for n in spec.local_shape(layer.shard_rank))
    shape = int4.unpacked_shape(layer)
    if shape is not None:
        return shape
    return tuple(int(n) for n in layer.__dict__["_kernel"].shape)


def _contracted(layer):
    """How many leading kernel axes a Dense or EinsumDense contracts (a matmul shape)."""
    if isinstance(layer, keras.layers.EinsumDense):
        free, contracted = einsum_axes(layer.equation)
        n = len(contracted)
        if contracted != list(range(n)) or free != list(range(n, n + len(free))):
            raise Unsupported(f"{layer.path!r}: equation {layer.equation!r} is not a matmul "
                              "(contracted axes first, free axes after)")
        return n
    return 1


def projection(layer):
    """A Dense or EinsumDense (float32, bfloat16, int8 or int4) as a `kn` Param.

    Raises:
        Unsupported: another layer kind, dtype or quantization, LoRA, or a layer whose
            columns are gathered across ranks.
    """
    name = layer.path
    if not isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)):
        raise Unsupported(f"{name!r} is a {type(layer).__name__}, not a Dense or EinsumDense")
    if getattr(layer, "lora_enabled", False):
        raise Unsupported(f"{name!r} has LoRA enabled")
    spec = getattr(layer, "shard_spec", None)
    if spec is not None and spec.is_cut and getattr(spec, "gather_output", False):
        raise Unsupported(f"{name!r} gathers its columns across ranks")
    if isinstance(layer, keras.layers.Dense) and layer.activation not in (
            None, keras.activations.linear):
        raise Unsupported(f"{name!r} has an activation ({layer.activation.__name__})")
    rule = _rule(layer)
    shape = logical_shape(layer)
    n = _contracted(layer)
    K, N = math.prod(shape[:n]), math.prod(shape[n:])
    mode = getattr(layer, "quantization_mode", None)
    bias = _var(layer, "bias")
    if bias is not None and rule == "row":
        bias = None  # added once, after the all-reduce (the caller's delta bias)
    kernel = layer.__dict__["_kernel"]
    common = dict(name=name, bias=bias, row_cut=rule == "row", column_cut=rule == "column")
    if mode is None:
        dtype = keras.backend.standardize_dtype(kernel.dtype)
        if dtype not in ("float32", "bfloat16"):
            raise Unsupported(f"{name!r}: kernel dtype {dtype}")
        return Param("f32" if dtype == "float32" else "bf16", "kn", K, N, [kernel], **common)
    if mode == "int8":
        quantizer = getattr(layer, "inputs_quantizer", None)
        if quantizer is None or type(quantizer).__name__ != "AbsMaxQuantizer":
            raise Unsupported(f"{name!r}: int8 without Keras's AbsMax input quantizer")
        return Param("i8", "kn", K, N, [kernel, layer.kernel_scale], **common)
    if mode == "int4":
        if getattr(layer, "inputs_quantizer", None) is not None:
            raise Unsupported(f"{name!r}: int4 with an input quantizer")
        if "kernel_zero" in layer.__dict__:
            return Param("i4g", "kn", K, N, [kernel, layer.kernel_scale, layer.kernel_zero,
                                             layer.g_idx], **common)
        return Param("i4c", "kn", K, N, [kernel, layer.kernel_scale], **common)
    raise Unsupported(f"{name!r}: quantization mode {mode!r}")


def row_bias(layer):
    """A row-parallel layer's bias (added once, after the all-reduce), or None."""
    return _var(layer, "bias") if _rule(layer) == "row" else None


def table(embedding, reverse=False):
    """An Embedding's table as an `nk` Param (rows: this rank's vocabulary slice); with
    `reverse`, a ReversibleEmbedding's logits weight (its table when tied, else its
    reverse table as `kn`).

    Raises:
        Unsupported: a quantization or dtype the ops do not read, an input quantizer on
            int4 logits, or soft-capped logits.
    """
    name = embedding.path
    if reverse and getattr(embedding, "logit_soft_cap", None) is not None:
        raise Unsupported(f"{name!r} soft-caps its logits")
    if reverse and getattr(embedding, "reverse_dtype", None) not in (None, embedding.compute_dtype):
        raise Unsupported(f"{name!r} computes its logits in {embedding.reverse_dtype}")
    cut = _rule(embedding) == "vocab"
    mode = getattr(embedding, "quantization_mode", None)
    tied = not reverse or getattr(embedding, "tie_weights", True)
    H = int(embedding.output_dim)
    d = embedding.__dict__
    table_var = d["_embeddings"] if tied else d["reverse_embeddings"]
    rows = int(table_var.shape[0]) if tied else int(table_var.shape[1])
    layout = "nk" if tied else "kn"
    common = dict(name=name, column_cut=cut)
    if mode is None:
        dtype = keras.backend.standardize_dtype(table_var.dtype)
        if dtype not in ("float32", "bfloat16"):
            raise Unsupported(f"{name!r}: table dtype {dtype}")
        return Param("f32" if dtype == "float32" else "bf16", layout, H, rows, [table_var], **common)
    if mode == "int8":
        if reverse and getattr(embedding, "inputs_quantizer", None) is None:
            raise Unsupported(f"{name!r}: int8 logits without an input quantizer")
        scale = d["embeddings_scale"] if tied else d["reverse_embeddings_scale"]
        return Param("i8", layout, H, rows, [table_var, scale], **common)
    if mode == "int4":
        if reverse and getattr(embedding, "inputs_quantizer", None) is not None:
            raise Unsupported(f"{name!r}: int4 logits with an input quantizer")
        if not tied:  # [ceil(dim / 2), vocab], packed along the contracted axis
            scale = d["reverse_embeddings_scale"]
            if "reverse_embeddings_zero" in d:
                return Param("i4g", "pk", H, rows, [table_var, scale, d["reverse_embeddings_zero"],
                                                   d["g_idx"]], **common)
            return Param("i4c", "pk", H, rows, [table_var, scale], **common)
        if "embeddings_zero" in d:
            return Param("i4g", "nk", H, rows, [table_var, d["embeddings_scale"],
                                               d["embeddings_zero"], d["g_idx"]], **common)
        return Param("i4c", "nk", H, rows, [table_var, d["embeddings_scale"]], **common)
    raise Unsupported(f"{name!r}: quantization mode {mode!r}")
