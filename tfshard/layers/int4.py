"""Keras int4-quantized layers, sharded: the packed layouts, their cuts, the kernels.

`model.quantize("int4")` (Keras 3.15) keeps two 4-bit values in each int8 byte:

- Dense: kernel `[in, ceil(out/2)]`, packed on the output axis.
- EinsumDense: the kernel reshaped to 2-D `[rows, columns]` (rows: the product of
  the contracted axes' sizes), packed on the columns.
- Embedding: table `[vocab, ceil(dim/2)]`; an untied ReversibleEmbedding's reverse
  table `[ceil(dim/2), vocab]` (packed on its rows).

Scales come per output channel (`block_size=-1`) or, by default, per group of 128
contracted rows with a zero point (`kernel_zero`) and each row's group number
(`g_idx`). int4 is weight-only: every call unpacks the kernel and dequantizes it into
the compute dtype (Dense per channel: after the matmul), then multiplies in float.

A `ShardSpec` of an int4 layer is written in the unpacked (logical) shape, as for a
float layer. `flat_cut` finds where a cut lands in the 2-D layout and `packed` halves
ranges on the packed axis -- which needs every boundary between ranks even, since two
values share a byte (the planner aligns column ranges to 2; what cannot be aligned,
e.g. an odd head_dim with an odd head boundary, is refused by name). Group numbers
(`g_idx`) index the whole scale, so a row cut keeps the scale whole and cuts `g_idx`
with its rows. Column and vocab cuts compute the unsharded layer's numbers; a row cut
sums float partials, so sharded int4 is within float32's envelope of the unsharded
int4 model (not bit for bit, as int8's integer sums are).
"""

import math

import keras
from keras import ops
from keras.src.quantizers.quantizers import dequantize_with_sz_map, unpack_int4


def is_int4(layer):
    """Whether `layer` is quantized to int4 (Keras's `quantize("int4")`)."""
    return getattr(layer, "quantization_mode", None) == "int4"


def unpacked_shape(layer):
    """The shape of an int4 layer's main weight before packing (its `ShardSpec`'s),
    or None when the layer is not int4."""
    if not is_int4(layer):
        return None
    if isinstance(layer, keras.layers.Embedding):
        return (int(layer.input_dim), int(layer.output_dim))
    if isinstance(layer, keras.layers.EinsumDense):
        return tuple(int(n) for n in layer.original_kernel_shape)
    return (_rows(layer), int(layer.units))


def _rows(layer):
    """The rows of an int4 kernel's 2-D layout (its packed kernel's first axis: the
    packing is on the columns)."""
    return int(layer.__dict__["_kernel"].shape[0])


def alignment(layer, axis):
    """What a cut of `axis` of an int4 layer's kernel must align its boundaries to:
    2 where the cut lands on the packed axis an odd number of values at a time, else 1."""
    shape = unpacked_shape(layer)
    if shape is None or isinstance(layer, keras.layers.Embedding):
        return 1
    try:
        flat_axis, flat = flat_cut(shape, _rows(layer), axis, ((0, 1),))
    except ValueError:
        return 1  # not a block of the layout: refused by name when the layer is cut
    return 2 if flat_axis == 1 and flat[0][1] % 2 else 1


def flat_cut(shape, rows, axis, ranges, path=""):
    """Where a cut of `axis` of a kernel of `shape` lands in its 2-D layout.

    The 2-D layout is `reshape(kernel, [rows, prod(shape) // rows])`. A cut is a
    rectangle there when the axis and the axes after it span exactly the columns (a
    column cut: `[start * inner, stop * inner)`), or when the axis is the first and
    the axes after it span whole rows (a row cut).

    Args:
        shape: the unpacked kernel's shape.
        rows: the 2-D layout's rows.
        axis: the cut axis of `shape`.
        ranges: every rank's `(start, stop)` on `axis`.
        path: the layer path, for errors.

    Returns:
        `(flat_axis, flat_ranges)`: 0 for rows, 1 for columns, and the ranges there.

    Raises:
        ValueError: the cut is not a rectangle of the 2-D layout.
    """
    columns = math.prod(shape) // rows
    inner = math.prod(shape[axis + 1:])
    if shape[axis] * inner == columns:
        return 1, tuple((a * inner, b * inner) for a, b in ranges)
    if axis == 0 and inner % columns == 0:
        per = inner // columns
        return 0, tuple((a * per, b * per) for a, b in ranges)
    raise ValueError(
        f"Layer {path!r}: int4 kernel {tuple(shape)} is stored as [{rows}, {columns}]; a cut of "
        f"its axis {axis} is not a block of that layout. Replicate the layer with a rule "
        f"{{{path!r}: 'replicate'}}, or quantize it to int8.")


def packed(ranges, total, path=""):
    """Ranges on an axis of `total` int4 values, in bytes of their packed axis.

    Raises:
        ValueError: a boundary between ranks falls inside a byte (an odd start, or an
            odd stop before the end).
    """
    for a, b in ranges:
        if a % 2 or (b % 2 and b != total):
            raise ValueError(
                f"Layer {path!r}: int4 packs two values a byte, so a cut of its packed axis "
                f"({total} values) needs even boundaries; got {list(map(list, ranges))}. "
                "Use a tensor-parallel size that splits it evenly, replicate the layer, or "
                "quantize it to int8.")
    return tuple((a // 2, (b + 1) // 2) for a, b in ranges)


def kernel_cuts(layer, axis, ranges, path=""):
    """How the kernel of an unsharded int4 Dense or EinsumDense, and what comes with it,
    are cut.

    Args:
        layer: the layer (its packed kernel, and which of `kernel_scale`, `kernel_zero`
            and `g_idx` it has).
        axis, ranges: the spec's cut, in the unpacked kernel's shape.
        path: the layer path, for errors.

    Returns:
        `(kernel_cut, rest)`: `(axis, ranges)` of the packed kernel, and `[(attribute,
        axis, ranges)]` of the scale, zero point and group numbers, in Keras's order.
        The scale and zero point are cut with the columns (their last axis) and held
        whole under a cut of rows, whose group numbers are cut with them.

    Raises:
        ValueError: see `flat_cut` and `packed`.
    """
    weights = layer.__dict__
    shape, rows = unpacked_shape(layer), _rows(layer)
    flat_axis, flat = flat_cut(shape, rows, axis, ranges, path)
    columns = math.prod(shape) // rows
    kernel = (flat_axis, packed(flat, columns, path) if flat_axis == 1 else flat)
    rest = []
    for name in ("kernel_scale", "kernel_zero"):
        if name in weights:
            cut = len(weights[name].shape) - 1 if flat_axis == 1 else None
            rest.append((name, cut, flat))
    if "g_idx" in weights:
        rest.append(("g_idx", 0 if flat_axis == 0 else None, flat))
    return kernel, rest


def unpack(packed_values, count, axis=-1):
    """`count` int8 values in [-8, 7] from their packed bytes on `axis`, with the static
    shape a traced graph needs (Keras's unpacking leaves that axis unknown)."""
    packed_values = ops.convert_to_tensor(packed_values)
    values = unpack_int4(packed_values, count, axis=axis, dtype="int8")
    shape = packed_values.shape.as_list()
    shape[axis] = count
    values.set_shape(shape)
    return values


def dequantize(values, scale, zero, g_idx, dtype, group_axis=0):
    """Sub-channel dequantization as Keras's int4 layers do it, in `dtype`."""
    return ops.cast(dequantize_with_sz_map(values, scale, zero, g_idx, group_axis=group_axis),
                    dtype)
