"""Keras int8-quantized layers, sharded: the pieces every parallel layer kind shares.

`model.quantize("int8")` gives a Dense / EinsumDense kernel int8 values and one
float scale per output channel (`kernel_scale`), an embedding table one scale
per row (`embeddings_scale`), and -- by default -- quantizes each input on the
fly per token with an AbsMax quantizer (scale 127 / max|x|). Cut in the
Megatron way, every rank computes exactly the unsharded model's numbers:

- column (and vocab): the kernel and its per-channel scale are cut together;
  the input, the same on every rank, is quantized as unsharded, so a rank's
  outputs are the unsharded outputs' slice, bit for bit.
- row: the kernel is cut on the contracted axis and its scale kept whole. The
  input's scale must be that of the *whole* input: a rank that holds only a
  slice of it (the output of a column layer) all-gathers the per-token max |x|
  of its slice -- one number per token and rank -- and takes the largest. The
  int32 partial products are then summed exactly by the all-reduce and
  dequantized once, as the unsharded layer does, so the sum is bit for bit
  the unsharded one too.

int4 layers (weight-only) shard as `tfshard.layers.int4` describes; float8, GPTQ
and AWQ layers are refused by name (`check_convertible`).
"""

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras.src.quantizers.quantizers import AbsMaxQuantizer, standardize_axis_for_numpy

from tfshard.layers import int4

#: The quantization modes tfshard shards.
SHARDED_MODES = ("int8", "int4")


#: Attributes holding what int8 and int4 quantization add besides the integer weights:
#: per-channel (or per-group) scales, int4's zero points and group indices.
QUANTIZED_NAMES = ("kernel_scale", "embeddings_scale", "reverse_embeddings_scale",
                   "kernel_zero", "embeddings_zero", "reverse_embeddings_zero", "g_idx")


def global_quantize(layer, inputs, axis, comm):
    """Quantizes `inputs`, one rank's slice of the contracted axes, with the scale
    of the whole input, as `layer.inputs_quantizer` would quantize the whole input.

    Args:
        layer: the quantized layer (its `inputs_quantizer` an `AbsMaxQuantizer`).
        inputs: this rank's slice of the input.
        axis: the axes the quantizer reduces (an int or a tuple).
        comm: the tensor-parallel group's communicator.

    Returns:
        `(quantized, scale)` as the quantizer returns them.

    Raises:
        ValueError: the layer's input quantizer is not an AbsMax quantizer (its
            scale cannot be assembled from per-rank maxima).
    """
    quantizer = layer.inputs_quantizer
    if not isinstance(quantizer, AbsMaxQuantizer):
        raise ValueError(
            f"Layer {layer.path!r}: row-parallel with an input quantizer "
            f"{type(quantizer).__name__}; tfshard assembles the input scale from per-rank "
            "maxima, which only the AbsMax quantizer (Keras's default) allows. Replicate "
            "the layer with a rule {path: 'replicate'} or quantize with the default config.")
    low, high = quantizer.value_range
    local = ops.max(ops.abs(inputs), axis=axis, keepdims=True)
    # Moved as integer bits, so a 16-bit comm_dtype (which casts float gathers) never
    # rounds a scale: the maxima arrive exactly as each rank computed them.
    bits = tf.bitcast(ops.expand_dims(local, -1), tf.int32 if local.dtype.size == 4 else tf.int16)
    every = tf.bitcast(comm.allgather(bits, axis=-1, sizes=[1] * comm.size), local.dtype)
    amax = ops.max(every, axis=-1)
    # The arithmetic of keras.quantizers.abs_max_quantize, with the global maximum.
    scale = ops.divide(high, ops.add(amax, quantizer.epsilon))
    scale = ops.cast(scale, inputs.dtype)
    outputs = ops.clip(ops.round(ops.multiply(inputs, scale)), low, high)
    return ops.cast(outputs, quantizer.output_dtype), scale


def quantize_weight(value, axis, comm=None):
    """int8 values and scale of one rank's slice of a weight, as Keras's default
    int8 weight quantizer (`AbsMaxQuantizer(axis)`) gives them for the whole weight.

    The arithmetic of `abs_max_quantize(..., to_numpy=True)`, run over blocks of rows
    of about `_BLOCK_BYTES` so no more than one block's float temporaries exist at a time
    (the whole-array version held about four copies of a 56 MiB tied embedding slice).
    Maxima are exact and the rest is element-wise, so the bits are the same.

    Args:
        value: this rank's slice (numpy).
        axis: the axes the quantizer reduces (one scale per other index).
        comm: None when the slice holds the reduced axes whole (column and vocab
            cuts); else the group whose ranks hold the other parts of them (a row
            cut), whose per-channel maxima are gathered first.

    Returns:
        `(int8 values, scale)`, the scale with the reduced axes kept (size 1) and
        `value`'s dtype.
    """
    value = np.asarray(value)
    axes = standardize_axis_for_numpy(axis)
    axes = tuple(a % value.ndim for a in (axes if isinstance(axes, tuple) else (axes,)))
    rows = max(1, _BLOCK_BYTES // max(1, value[:1].nbytes))
    blocks = [slice(i, i + rows) for i in range(0, max(1, value.shape[0]), rows)]
    reduced_rows = 0 in axes
    parts = [np.max(np.abs(value[b]), axis=axes, keepdims=True) for b in blocks]
    amax = np.maximum.reduce(parts) if reduced_rows else np.concatenate(parts, axis=0)
    if comm is not None:
        amax = np.max(comm.allgather_numpy(amax), axis=0)
    scale = np.divide(127, np.add(amax, keras.backend.epsilon()))
    q = np.empty(value.shape, np.int8)
    for b in blocks:
        s = scale if reduced_rows else scale[b]
        q[b] = np.clip(np.round(np.multiply(value[b], s)), -127, 127).astype("int8")
    return q, scale.astype(value.dtype)


#: Bytes of float rows `quantize_weight` works on at a time.
_BLOCK_BYTES = 8 << 20


def mark_int8(layer, inputs_quantizer):
    """Sets what Keras's `quantize("int8")` sets besides the variables: the input
    quantizer, the `int8_from_...` dtype policy, the quantized flag."""
    from keras import dtype_policies

    layer.quantization_config = None
    layer.inputs_quantizer = inputs_quantizer
    layer._is_quantized = True
    layer.dtype_policy = dtype_policies.get(f"int8_from_{layer.dtype_policy.name}")


def _is_default_int8(config):
    """Whether `config` is None or Keras's default `Int8QuantizationConfig` (which
    `keras.Model.quantize("int8")` hands every layer)."""
    if config is None:
        return True
    from keras.src.quantizers.quantization_config import Int8QuantizationConfig

    act = getattr(config, "activation_quantizer", None)
    return (isinstance(config, Int8QuantizationConfig) and config.weight_quantizer is None
            and isinstance(act, AbsMaxQuantizer) and act.axis is None
            and tuple(act.value_range) == (-127, 127) and act.epsilon == keras.backend.epsilon()
            and act.output_dtype == "int8")


def check_quantize_args(layer, mode, config):
    """Refuses what a sharded layer's `quantize` cannot do.

    Raises:
        ValueError: a mode other than int8 (int4: quantize before sharding), a
            custom config, or a layer already quantized.
    """
    if mode == "int4":
        raise ValueError(
            f"Layer {layer.path!r} is sharded; tfshard quantizes sharded layers to int8 only. "
            "For int4, quantize the model before sharding it: model.quantize('int4'), then "
            "tfshard.shard(model) (or save it and tfshard.load the file).")
    if mode != "int8" or not _is_default_int8(config):
        raise ValueError(
            f"Layer {layer.path!r} is sharded; tfshard quantizes sharded layers to int8 with "
            f"Keras's default config (got mode={mode!r}"
            f"{', a custom config' if config is not None else ''}). Use quantize('int8'), or "
            "quantize the model before sharding it (int8 is the mode tfshard shards).")
    if layer.quantization_mode is not None:
        raise ValueError(f"Layer {layer.path!r} is already quantized "
                         f"({layer.quantization_mode}).")


def check_quantization(layer, path):
    """Refuses a quantized layer tfshard cannot cut.

    Raises:
        ValueError: the layer is quantized in a mode other than `SHARDED_MODES`, or
            is a Dense or EinsumDense in int4 with an input quantizer.
    """
    mode = getattr(layer, "quantization_mode", None)
    if mode and mode not in SHARDED_MODES:
        raise ValueError(
            f"Layer {path!r} is quantized in mode {mode!r}; tfshard shards int8- and "
            "int4-quantized layers (and float ones). Quantize with model.quantize('int8') or "
            f"('int4') before tfshard.shard, or replicate this layer with a rule "
            f"{{{path!r}: 'replicate'}}.")
    if (mode == "int4" and getattr(layer, "inputs_quantizer", None) is not None
            and not isinstance(layer, keras.layers.Embedding)):
        # (A ReversibleEmbedding's logits input is whole on every rank, quantized as unsharded.)
        raise ValueError(
            f"Layer {path!r} is int4 with an input quantizer "
            f"({type(layer.inputs_quantizer).__name__}); tfshard shards Keras's default "
            "weight-only int4. Quantize with model.quantize('int4') and no activation "
            f"quantizer, or replicate this layer with a rule {{{path!r}: 'replicate'}}.")


def kernel_variable_cuts(layer, spec, bias_axis, scale_axis):
    """`[(attribute, name, axis, ranges)]` of a Dense or EinsumDense cut with `spec`:
    kernel, bias, then what quantization added, in Keras's serialization order.

    Args:
        bias_axis: the bias's cut axis (None: held whole).
        scale_axis: an int8 `kernel_scale`'s cut axis (int4's come from
            `int4.kernel_cuts`).
    """
    ranges = spec.ranges
    bias = [("bias", "bias", bias_axis, ranges)] if layer.bias is not None else []
    if int4.is_int4(layer):
        (axis, kernel_ranges), rest = int4.kernel_cuts(layer, spec.axis, ranges,
                                                       spec.path or layer.path)
        return ([("_kernel", "kernel", axis, kernel_ranges)] + bias
                + [(name, name, a, r) for name, a, r in rest])
    cuts = [("_kernel", "kernel", spec.axis, ranges)] + bias
    if "kernel_scale" in layer.__dict__:
        cuts.append(("kernel_scale", "kernel_scale", scale_axis, ranges))
    return cuts
