"""Column- and row-parallel `keras.layers.EinsumDense`.

The cut is chosen on a kernel axis, named by its equation letter:

- column: a kernel axis that is not contracted (it appears in the output), e.g.
  the heads axis of a q/k/v projection `"abc,cde->abde"` (kernel
  `[hidden, heads, head_dim]`) or of Gemma's `"btd,ndh->btnh"`. The output is
  local on that axis.
- row: a contracted kernel axis, e.g. the heads axis of an attention output
  projection `"abcd,cde->abe"`; partial products are all-reduced and the bias
  is added once, after the reduction.
"""

import keras
import numpy as np
from keras import ops

from tfshard.layers.base import (
    ShardedLayerMixin,
    add_local_weight,
    check_convertible,
    rebuild_in_place,
    replace_local_weight,
)
from tfshard.layers import int4, matvec
from tfshard.layers.quantized import (AbsMaxQuantizer, global_quantize, kernel_variable_cuts,
                                      mark_int8, quantize_weight)


def parse_equation(equation):
    """Splits an EinsumDense equation into (input, kernel, output) letter strings.

    Ellipses are kept as "." so positions counted from the end stay right.

    Raises:
        ValueError: the equation is not of the form "in,kernel->out".
    """
    try:
        lhs, out = equation.replace(" ", "").split("->")
        inp, ker = lhs.split(",")
    except ValueError:
        raise ValueError(f"Cannot parse EinsumDense equation {equation!r}.") from None
    return inp.replace("...", "."), ker, out.replace("...", ".")


def einsum_axes(equation):
    """Classifies the kernel axes of an EinsumDense equation.

    Returns:
        `(free, contracted)`: kernel axis indices whose letter reaches the output
        (free) and those summed over with the input (contracted), in kernel order.
    """
    inp, ker, out = parse_equation(equation)
    free = [i for i, c in enumerate(ker) if c in out and c not in inp]
    contracted = [i for i, c in enumerate(ker) if c in inp and c not in out]
    return free, contracted


def bias_axis(equation, bias_axes, kernel_axis):
    """The bias axis that follows kernel axis `kernel_axis` of an EinsumDense.

    Keras gives the bias the output axes from the first one named in
    `bias_axes` to the end; a column cut of kernel axis k cuts the bias on the
    position of k's letter among those.

    Returns:
        The bias axis, or None when the bias does not vary along that letter
        (it is then replicated whole).
    """
    _, ker, out = parse_equation(equation)
    char = ker[kernel_axis]
    if not bias_axes or char not in bias_axes:
        return None
    first = min(out.index(c) for c in bias_axes)
    return out[first:].index(char)


class ParallelEinsumDense(ShardedLayerMixin, keras.layers.EinsumDense):
    """An EinsumDense holding one rank's slice of its kernel along one axis.

    Args:
        equation, output_shape, **kwargs: the `keras.layers.EinsumDense`
            arguments, with `output_shape` the *full* output shape.
        shard: the `ShardSpec`; `shard.axis` is the kernel axis cut.
        comm: the `Communicator`.

    Call args:
        inputs: column: the full input. Row: the input holding only this rank's
            slice of the contracted axis when `shard.input_is_parallel`, else
            the full input (sliced here).

    Returns:
        Column: the output, local on the cut axis (gathered if
        `shard.gather_output`). Row: the full output, identical on every rank.
    """

    def _letters(self):
        inp, ker, out = parse_equation(self.equation)
        char = ker[self._shard_spec.axis]
        return inp, ker, out, char

    def _own_slice(self, inputs):
        """The input as this rank's kernel slice contracts it (row: its slice)."""
        spec = self._shard_spec
        if spec.rule != "row" or spec.input_is_parallel:
            return inputs
        inp, _, _, char = self._letters()
        index = [slice(None)] * len(inputs.shape)
        index[inp.index(char) - len(inp)] = slice(*self.shard_range)
        return inputs[tuple(index)]

    def call(self, inputs, training=None):
        return self._float_call(inputs, self._kernel)

    def _float_call(self, inputs, kernel):
        x = matvec.einsum(self.equation, self._own_slice(inputs), kernel)
        if self._shard_spec.rule == "row":
            x = self._comm.allreduce_sum(x)
        return self._finish(x)

    def _int4_call(self, inputs, training=None):
        # As EinsumDense._int4_call on this rank's slice: the 2-D [rows, columns] kernel
        # unpacked, dequantized (per column, or per group with zero points), reshaped.
        shape = self._shard_spec.local_shape(self._shard_rank)
        columns = int(self.kernel_scale.shape[-1])
        kernel = int4.unpack(self._kernel, columns)
        if "kernel_zero" in self.__dict__:
            kernel = int4.dequantize(kernel, self.kernel_scale, self.kernel_zero, self.g_idx,
                                     self.compute_dtype)
        else:
            kernel = ops.divide(ops.cast(kernel, self.compute_dtype), self.kernel_scale)
        return self._float_call(inputs, ops.reshape(kernel, shape))

    def _int8_call(self, inputs, training=None):
        # Column: the input quantized as unsharded; row: with the whole input's scale and
        # the int32 partials summed exactly, then dequantized once (layers/quantized.py).
        spec = self._shard_spec
        row_parallel_input = spec.rule == "row" and spec.input_is_parallel
        scale = self.kernel_scale
        if self.inputs_quantizer and row_parallel_input:
            inputs, inputs_scale = global_quantize(self, inputs, self.quantization_axis,
                                                   self._comm)
        elif self.inputs_quantizer:
            inputs, inputs_scale = self.inputs_quantizer(inputs, axis=self.quantization_axis)
        if self.inputs_quantizer:
            scale = ops.multiply(self._adjust_scale_for_quant(inputs_scale, "input"), scale)
        x = matvec.einsum(self.equation, self._own_slice(inputs), self._kernel)
        if spec.rule == "row":
            x = self._comm.allreduce_sum(x)
        return self._finish(ops.divide(ops.cast(x, self.compute_dtype), scale))

    def _quantize_int8(self):
        # As EinsumDense.quantize("int8"): AbsMax over the kernel's contracted axes, the
        # scale laid out against the output; a row cut gathers the ranks' maxima first.
        spec = self._shard_spec
        row = spec.rule == "row"
        self._set_quantization_info()
        q, scale = quantize_weight(np.asarray(self._kernel), self._kernel_reduced_axes,
                                   self._comm if row else None)
        scale = np.asarray(self._adjust_scale_for_quant(scale, "kernel"))
        axis = _scale_cut_axis(self.equation, spec, scale.shape, self.shard_width)
        full_scale = list(scale.shape)
        if axis is not None:
            full_scale[axis] = spec.full_shape[spec.axis]
        full = self.saved_full_shape(self._kernel)
        replace_local_weight(self, "_kernel", "kernel", q, spec.axis, full)
        replace_local_weight(self, "kernel_scale", "kernel_scale", scale, axis, full_scale)
        self.quantization_axis = tuple(self._input_reduced_axes)
        mark_int8(self, AbsMaxQuantizer())

    def _finish(self, x):
        spec = self._shard_spec
        _, _, out, char = self._letters()
        if self.bias is not None:
            x = ops.add(x, self.bias)
        if spec.rule == "column" and spec.gather_output:
            x = self._comm.allgather(x, axis=out.index(char) - len(out), sizes=spec.sizes)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def compute_output_shape(self, input_shape):
        shape = list(super().compute_output_shape(input_shape))
        spec = self._shard_spec
        if spec.rule == "column" and not spec.gather_output:
            _, _, out, char = self._letters()
            shape[out.index(char) - len(out)] = self.shard_width
        return tuple(shape)


def variable_cuts(layer, spec):
    """How each weight of an EinsumDense (float, int8 or int4) is cut with `spec`.

    Args:
        layer: the unsharded EinsumDense.
        spec: its `ShardSpec`, in the unpacked kernel's shape.

    Returns:
        `[(attribute, name, axis, ranges)]` in Keras's serialization order; axis None
        for a weight held whole.

    Raises:
        ValueError: an int4 cut that is not a block of the packed 2-D kernel, or
            splits a packed byte (`tfshard.layers.int4`).
    """
    cut_bias = bias_axis(layer.equation, layer.bias_axes, spec.axis) \
        if spec.rule == "column" else None
    return kernel_variable_cuts(layer, spec, cut_bias, scale_axis(layer, spec))


def scale_axis(layer, spec):
    """The axis of an int8 EinsumDense's `kernel_scale` cut with `spec`, or None.

    Keras shapes the per-channel scale to broadcast against the output (reduced
    kernel axes of size 1, the rest in output order), so a column cut's letter
    sits at the same distance from the end in the scale as in the output. A row
    cut contracts its letter, whose scale axis has size 1: the scale stays whole.
    """
    if "kernel_scale" not in layer.__dict__:
        return None
    return _scale_cut_axis(layer.equation, spec, tuple(layer.__dict__["kernel_scale"].shape),
                           tuple(layer.__dict__["_kernel"].shape)[spec.axis])


def _scale_cut_axis(equation, spec, scale_shape, width):
    """`scale_axis` from the scale's shape and the cut letter's width in the kernel."""
    if spec.rule != "column":
        return None
    _, ker, out = parse_equation(equation)
    pos = out.index(ker[spec.axis]) - len(out)
    if len(scale_shape) >= -pos and scale_shape[pos] == width:
        return len(scale_shape) + pos
    return None


def shard_einsum_dense(layer, spec, rank, comm, path=""):
    """Converts a built `keras.layers.EinsumDense` in place to its parallel form.

    Args:
        layer: a built EinsumDense.
        spec: `ShardSpec`; rule "column" needs a free kernel axis, "row" a
            contracted one.
        rank: the rank whose slice the layer keeps.
        comm: the `Communicator`.
        path: layer path for error messages.

    Returns:
        The converted layer (the same object).

    Raises:
        ValueError: the axis does not fit the rule.
    """
    check_convertible(layer, keras.layers.EinsumDense, path)
    free, contracted = einsum_axes(layer.equation)
    allowed = free if spec.rule == "column" else contracted if spec.rule == "row" else []
    if spec.axis not in allowed:
        raise ValueError(
            f"EinsumDense {path!r} ({layer.equation!r}, kernel {tuple(layer._kernel.shape)}): "
            f"rule {spec.rule!r} cannot cut kernel axis {spec.axis}; "
            f"column may cut axes {free}, row axes {contracted}."
        )
    cuts = variable_cuts(layer, spec)

    def build_local(lyr, full):
        lyr.bias = None
        for attr, name, axis, ranges in cuts:
            setattr(lyr, attr, add_local_weight(lyr, name, full[attr], axis=axis, ranges=ranges))

    return rebuild_in_place(layer, ParallelEinsumDense, spec, rank, comm, build_local)
