"""Column- and row-parallel `keras.layers.Dense`.

Megatron's ColumnParallelLinear and RowParallelLinear.
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


class _ParallelDenseBase(ShardedLayerMixin, keras.layers.Dense):
    """Shared plumbing of the two parallel Dense layers.

    Args:
        units: the *full* (unsharded) output width.
        shard: the `ShardSpec` of this rank.
        comm: the `Communicator`.
        **kwargs: the `keras.layers.Dense` arguments.
    """

    def _int8_call(self, inputs, training=None):
        return self._scaled_call(inputs, self._kernel, self.kernel_scale)

    def _int4_call(self, inputs, training=None):
        # As Dense._int4_call on this rank's slice: unpacked, then scaled after the
        # matmul (per channel) or dequantized before it (groups with zero points).
        columns = self.shard_width if self._shard_spec.rule == "column" else self.units
        kernel = int4.unpack(self._kernel, columns)
        if "kernel_zero" not in self.__dict__:
            return self._scaled_call(inputs, kernel, self.kernel_scale)
        return self._float_call(inputs, int4.dequantize(
            kernel, self.kernel_scale, self.kernel_zero, self.g_idx, self.compute_dtype))

    def _quantize_int8(self):
        # As Dense.quantize("int8"): AbsMax over the input axis, one scale per unit. A row
        # cut holds part of that axis, so the ranks' maxima are gathered first.
        spec = self._shard_spec
        row = spec.rule == "row"
        q, scale = quantize_weight(np.asarray(self._kernel), 0, self._comm if row else None)
        full = self.saved_full_shape(self._kernel)
        replace_local_weight(self, "_kernel", "kernel", q, spec.axis, full)
        replace_local_weight(self, "kernel_scale", "kernel_scale", np.squeeze(scale, 0),
                             scale_axis(self, spec), (self.units,))
        mark_int8(self, AbsMaxQuantizer())


class ColumnParallelDense(_ParallelDenseBase):
    """A Dense whose kernel `[in, out]` is split on its output axis.

    This rank computes `x @ W[:, start:stop] + b[start:stop]`, then the
    activation (the planner pairs only element-wise ones). The output stays local -- the input of
    a following row-parallel layer -- unless `shard.gather_output` is set,
    in which case it is all-gathered to the full width.

    Call args:
        inputs: `(..., in)` tensor, the same on every rank.

    Returns:
        `(..., stop - start)` or, when gathering, `(..., units)`.
    """


    def call(self, inputs, training=None):
        return self._float_call(inputs, self._kernel)

    def _float_call(self, inputs, kernel):
        return self._finish(matvec.matmul(inputs, kernel))

    def _scaled_call(self, inputs, kernel, scale):
        # The input is whole on every rank: quantized as unsharded (see layers/quantized.py).
        if self.inputs_quantizer:
            inputs, inputs_scale = self.inputs_quantizer(inputs, axis=-1)
            scale = ops.multiply(scale, inputs_scale)
        x = ops.cast(matvec.matmul(inputs, kernel), self.compute_dtype)
        return self._finish(ops.divide(x, scale))

    def _finish(self, x):
        if self.bias is not None:
            x = ops.add(x, self.bias)
        if self._shard_spec.gather_output:
            x = self._comm.allgather(x, axis=-1, sizes=self._shard_spec.sizes)
        # After the gather: a non-element-wise activation (softmax) needs the
        # full width.
        if self.activation is not None:
            x = self.activation(x)
        return x

    def compute_output_shape(self, input_shape):
        width = self.units if self._shard_spec.gather_output else self.shard_width
        return tuple(input_shape[:-1]) + (width,)


class RowParallelDense(_ParallelDenseBase):
    """A Dense whose kernel `[in, out]` is split on its input axis.

    This rank computes the partial product `x[..., start:stop] @ W[start:stop]`;
    the partials are all-reduced (summed) and the bias is added once, after
    the reduction, then the activation.

    Call args:
        inputs: `(..., stop - start)` when `shard.input_is_parallel`, else the
            full `(..., in)` input, which this rank slices.

    Returns:
        `(..., units)`, identical on every rank.
    """


    def call(self, inputs, training=None):
        return self._float_call(inputs, self._kernel)

    def _float_call(self, inputs, kernel):
        x = self._comm.allreduce_sum(matvec.matmul(self._own_slice(inputs), kernel))
        return self._finish(x)

    def _scaled_call(self, inputs, kernel, scale):
        # The input scale is the whole input's and the int32 partials are summed
        # exactly, then dequantized once: the unsharded result (layers/quantized.py).
        if self.inputs_quantizer and self._shard_spec.input_is_parallel:
            inputs, inputs_scale = global_quantize(self, inputs, -1, self._comm)
        elif self.inputs_quantizer:
            inputs, inputs_scale = self.inputs_quantizer(inputs, axis=-1)
            inputs = self._own_slice(inputs)
        else:
            inputs, inputs_scale = self._own_slice(inputs), None
        x = self._comm.allreduce_sum(matvec.matmul(inputs, kernel))
        if inputs_scale is not None:
            scale = ops.multiply(scale, inputs_scale)
        return self._finish(ops.divide(ops.cast(x, self.compute_dtype), scale))

    def _own_slice(self, inputs):
        if self._shard_spec.input_is_parallel:
            return inputs
        start, stop = self.shard_range
        return inputs[..., start:stop]

    def _finish(self, x):
        if self.bias is not None:
            x = ops.add(x, self.bias)
        if self.activation is not None:
            x = self.activation(x)
        return x


def variable_cuts(layer, spec):
    """How each weight of a Dense (float, int8 or int4) is cut with `spec`.

    Args:
        layer: the unsharded Dense.
        spec: its `ShardSpec`, in the unpacked kernel's shape `[in, units]`.

    Returns:
        `[(attribute, name, axis, ranges)]` in Keras's serialization order; axis None
        for a weight held whole.

    Raises:
        ValueError: an int4 column cut whose boundaries split a packed byte.
    """
    return kernel_variable_cuts(layer, spec, 0 if spec.rule == "column" else None,
                                scale_axis(layer, spec))


def scale_axis(layer, spec):
    """The axis of an int8 Dense's `kernel_scale` (`[units]`) cut with `spec`, or None."""
    return 0 if spec.rule == "column" else None


def shard_dense(layer, spec, rank, comm, path=""):
    """Converts a built `keras.layers.Dense` in place to its parallel form.

    Args:
        layer: a built Dense.
        spec: `ShardSpec` with rule "column" (axis 1) or "row" (axis 0).
        rank: the rank whose slice the layer keeps.
        comm: the `Communicator`.
        path: layer path for error messages.

    Returns:
        The converted layer (the same object).

    Raises:
        ValueError: wrong rule or axis, or a layer that cannot be converted.
    """
    check_convertible(layer, keras.layers.Dense, path)
    expected_axis = {"column": 1, "row": 0}.get(spec.rule)
    if expected_axis is None or spec.axis != expected_axis:
        raise ValueError(
            f"Dense {path!r}: rule {spec.rule!r} on axis {spec.axis} is not a Dense cut; "
            "use 'column' (axis 1), 'row' (axis 0) or 'replicate'."
        )
    sharded_base = ColumnParallelDense if spec.rule == "column" else RowParallelDense

    cuts = variable_cuts(layer, spec)

    def build_local(lyr, full):
        lyr.bias = None
        for attr, name, axis, ranges in cuts:
            setattr(lyr, attr, add_local_weight(lyr, name, full[attr], axis=axis, ranges=ranges))
        in_width = spec.full_shape[0] if spec.full_shape else full["_kernel"].shape[0]
        if spec.rule == "row":
            in_width = lyr.shard_width if spec.input_is_parallel else in_width
        lyr.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: in_width})

    return rebuild_in_place(layer, sharded_base, spec, rank, comm, build_local)
