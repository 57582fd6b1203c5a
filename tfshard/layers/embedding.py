"""Vocab-parallel `keras.layers.Embedding` and `keras.layers.ReversibleEmbedding`.

keras-hub's `ReversibleEmbedding` is a subclass of the latter.

Lookup: the table `[vocab, dim]` is split on its vocab axis; a rank looks up
the ids it owns, zeros the rest, and the partial lookups are all-reduced
(exactly one rank contributes each row, so the sum is exact).

Reverse (tied logits): a rank computes the logits of its own vocab slice and
the slices are all-gathered to the exact original vocab size, in rank order.
"""

import keras
import numpy as np
import tensorflow as tf
from keras import ops
from keras.src.backend import set_keras_mask

from tfshard.layers.base import (
    ShardedLayerMixin,
    add_local_weight,
    check_convertible,
    rebuild_in_place,
    replace_local_weight,
)
from tfshard.layers import int4, matvec
from tfshard.layers.quantized import AbsMaxQuantizer, mark_int8, quantize_weight


def _check_ids(layer, ids):
    """Trace-time and run-time checks on token ids, before any collective.

    Raises:
        ValueError: (at trace time) ids of a non-numeric dtype.
        tf.errors.InvalidArgumentError: (at run time) an id outside
            `[0, vocab)` or a float id with a fractional part; the message names
            the layer, the vocab size and the rank. `ShardedModel.predict`
            re-raises it as a ValueError.
    """
    spec = layer.shard_spec
    where = f"layer {layer.path!r} on rank {layer.shard_rank}"
    ids = tf.convert_to_tensor(ids)
    if ids.dtype == tf.bool:  # ids 0 and 1, as keras.layers.Embedding takes them
        ids = tf.cast(ids, tf.int32)
    if not (ids.dtype.is_integer or ids.dtype.is_floating):
        raise ValueError(
            f"Token ids fed to {where} must be integers; got dtype {ids.dtype.name} "
            f"with shape {ids.shape}."
        )
    checks = []
    if ids.dtype.is_floating:
        checks.append(tf.debugging.assert_equal(
            ids, tf.round(ids),
            message=f"Token ids fed to {where} are floats with a fractional part "
                    f"(shape {ids.shape}); pass integer ids.",
        ))
    vocab = spec.full_size
    # Compared in a dtype that holds the vocabulary size: cast to uint8, 50257 is 81, and
    # valid uint8 ids above it were refused (found by tests/test_fuzz.py).
    wide = tf.cast(ids, tf.float64 if ids.dtype.is_floating else tf.int64)
    checks.append(tf.debugging.assert_greater_equal(
        wide, tf.cast(0, wide.dtype),
        message=f"Token ids fed to {where} (shape {ids.shape}) must be >= 0.",
    ))
    checks.append(tf.debugging.assert_less(
        wide, tf.cast(vocab, wide.dtype),
        message=f"Token ids fed to {where} (shape {ids.shape}) must be < the vocabulary "
                f"size {vocab}.",
    ))
    with tf.control_dependencies(checks):
        return tf.identity(ops.cast(ids, "int32"))


class VocabParallelEmbedding(ShardedLayerMixin, keras.layers.Embedding):
    """An Embedding holding the rows `[start, stop)` of its table.

    Args:
        input_dim: the *full* vocab size.
        output_dim, **kwargs: the `keras.layers.Embedding` arguments.
        shard: the `ShardSpec` (rule "vocab", axis 0).
        comm: the `Communicator`.

    Call args:
        inputs: integer ids, the same on every rank.

    Returns:
        `inputs.shape + (output_dim,)`, identical on every rank.
    """

    def _vocab_lookup(self, inputs):
        start, stop = self.shard_range
        ids = _check_ids(self, inputs)
        owned = ops.logical_and(ops.greater_equal(ids, start), ops.less(ids, stop))
        local_ids = ops.where(owned, ids - start, ops.zeros_like(ids))
        rows = ops.take(self._embeddings, local_ids, axis=0)
        if self.quantization_mode == "int4":  # the looked-up rows unpacked (not the table)
            rows = int4.unpack(rows, self.output_dim)
        if "embeddings_zero" in self.__dict__:  # int4 groups: dequantized as Keras does
            rows = int4.dequantize(
                ops.cast(rows, self.compute_dtype), ops.take(self.embeddings_scale, local_ids, 0),
                ops.take(self.embeddings_zero, local_ids, 0), self.g_idx, self.compute_dtype,
                group_axis=-1)
        elif self.quantization_mode in ("int8", "int4"):  # dequantized before the sum
            rows = ops.divide(ops.cast(rows, self.compute_dtype), ops.expand_dims(
                ops.take(self.embeddings_scale, local_ids, axis=0), axis=-1))
        rows = ops.multiply(rows, ops.cast(ops.expand_dims(owned, -1), rows.dtype))
        rows = self._comm.allreduce_sum(rows)
        return ops.cast(rows, self.compute_dtype)

    def call(self, inputs):
        return self._vocab_lookup(inputs)

    def _quantize_int8(self):
        # As (Reversible)Embedding.quantize("int8"): one scale per vocabulary row, and per
        # vocabulary column of an untied reverse table; both are whole on this rank.
        q, scale = quantize_weight(np.asarray(self._embeddings), -1)
        table = replace_local_weight(self, "_embeddings", "embeddings", q, 0,
                                     self.saved_full_shape(self._embeddings))
        replace_local_weight(self, "embeddings_scale", "embeddings_scale", np.squeeze(scale, -1),
                             0, (self.input_dim,), after=table)
        reversible = isinstance(self, keras.layers.ReversibleEmbedding)
        if reversible and not self.tie_weights:
            q, scale = quantize_weight(np.asarray(self.reverse_embeddings), 0)
            replace_local_weight(self, "reverse_embeddings", "reverse_embeddings", q, 1,
                                 self.saved_full_shape(self.reverse_embeddings))
            replace_local_weight(self, "reverse_embeddings_scale", "reverse_embeddings_scale",
                                 np.squeeze(scale, 0), 0, (self.input_dim,))
        mark_int8(self, AbsMaxQuantizer(axis=-1) if reversible else None)

    def _int8_call(self, inputs, training=None):
        return self._vocab_lookup(inputs)

    def _int4_call(self, inputs, training=None):
        return self._vocab_lookup(inputs)


class VocabParallelReversibleEmbedding(VocabParallelEmbedding, keras.layers.ReversibleEmbedding):
    """A ReversibleEmbedding with its table (and reverse table) split on vocab.

    `reverse=False` is the vocab-parallel lookup. `reverse=True` computes the
    logits of this rank's vocab slice and all-gathers them to the full,
    original vocab size (uneven slices allowed; no padding ever reaches the
    output).
    """

    def call(self, inputs, reverse=False):
        if not reverse:
            result = self._vocab_lookup(inputs)
            if self.mask_zero:
                set_keras_mask(result, ops.not_equal(inputs, 0))
            return result
        return self._reverse(inputs)

    def _int8_call(self, inputs, reverse=False):
        if not reverse:
            return self._vocab_lookup(inputs)
        # Keras's int8 logits with this rank's vocab columns and their scales: the input
        # is whole on every rank, so it is quantized as unsharded.
        if self.inputs_quantizer:
            inputs, inputs_scale = self.inputs_quantizer(inputs)
        else:
            inputs_scale = ops.ones((1,), dtype=self.compute_dtype)
        if self.tie_weights:
            scale = self.embeddings_scale
            local = matvec.matmul(inputs, self._embeddings, transpose_b=True)
        else:
            scale = self.reverse_embeddings_scale
            local = matvec.matmul(inputs, self.reverse_embeddings)
        local = ops.cast(local, self.compute_dtype)
        local = ops.divide(local, ops.multiply(inputs_scale, scale))
        return self._soft_cap(self._comm.allgather(local, axis=-1, sizes=self._shard_spec.sizes))

    def _int4_call(self, inputs, reverse=False):
        if not reverse:
            return self._vocab_lookup(inputs)
        # As ReversibleEmbedding._int4_call with this rank's vocab columns: the table
        # `[dim, vocab]` unpacked, scaled after the matmul (per channel) or dequantized
        # before it (groups with zero points).
        if self.tie_weights:
            table, scale = ops.transpose(self._embeddings), self.embeddings_scale
            zero = self.__dict__.get("embeddings_zero")
            if zero is not None:
                scale, zero = ops.transpose(scale), ops.transpose(zero)
        else:
            table, scale = self.reverse_embeddings, self.reverse_embeddings_scale
            zero = self.__dict__.get("reverse_embeddings_zero")
        table = int4.unpack(table, self.output_dim, axis=0)
        # Keras builds an input quantizer when it loads an int4 file (not when it quantizes
        # in memory); the input is whole on every rank, so it is quantized as unsharded.
        if self.inputs_quantizer:
            inputs, inputs_scale = self.inputs_quantizer(inputs)
        else:
            inputs_scale = ops.ones((1,), dtype=self.compute_dtype)
        if zero is None:
            local = ops.divide(ops.cast(ops.matmul(inputs, table), self.compute_dtype),
                               ops.multiply(inputs_scale, scale))
        else:
            local = ops.divide(ops.matmul(inputs, int4.dequantize(
                ops.cast(table, self.compute_dtype), scale, zero, self.g_idx,
                self.compute_dtype)), inputs_scale)
        return self._soft_cap(self._comm.allgather(local, axis=-1, sizes=self._shard_spec.sizes))

    def _soft_cap(self, logits):
        if self.logit_soft_cap is not None:
            cap = self.logit_soft_cap
            logits = ops.multiply(ops.tanh(ops.divide(logits, cap)), cap)
        return logits

    def _reverse(self, inputs):
        # Logits of the local vocab slice, [M, V_local], gathered on the vocab
        # axis (block copies, no transpose of the logits).
        table = self._embeddings if self.tie_weights else ops.transpose(self.reverse_embeddings)
        x = inputs
        if self.reverse_dtype is not None:
            x = ops.cast(x, self.reverse_dtype)
            table = ops.cast(table, self.reverse_dtype)
        lead_shape = tf.shape(x)[:-1]
        x2d = tf.reshape(x, [-1, x.shape[-1]])
        local = matvec.matmul(x2d, table, transpose_b=True)
        logits = self._comm.allgather(local, axis=-1, sizes=self._shard_spec.sizes)
        logits = tf.reshape(logits, tf.concat([lead_shape, [self.input_dim]], axis=0))
        return self._soft_cap(logits)


def variable_cuts(layer, spec):
    """How each weight of an Embedding (float, int8 or int4) is cut with `spec`.

    The vocabulary axis is never the packed one: tables and their per-row scales and
    zero points are cut on it, int4's group numbers (over the embedding dimension)
    are held whole, and an untied reverse table `[dim, vocab]` and its scales are cut
    on their vocabulary axis.

    Args:
        layer: the unsharded Embedding or ReversibleEmbedding.
        spec: its `ShardSpec` (rule "vocab", axis 0).

    Returns:
        `[(attribute, name, axis, ranges)]` in Keras's serialization order.
    """
    ranges, d = spec.ranges, layer.__dict__
    cuts = [("_embeddings", "embeddings", 0, ranges)]
    cuts += [(n, n, 0, ranges) for n in ("embeddings_scale", "embeddings_zero") if n in d]
    if "g_idx" in d:
        cuts.append(("g_idx", "g_idx", None, ranges))
    if d.get("reverse_embeddings") is not None:
        cuts.append(("reverse_embeddings", "reverse_embeddings", 1, ranges))
        for n in ("reverse_embeddings_scale", "reverse_embeddings_zero"):
            if n in d:  # [vocab], or [groups, vocab] for int4 groups
                cuts.append((n, n, len(d[n].shape) - 1, ranges))
    return cuts


def shard_embedding(layer, spec, rank, comm, path=""):
    """Converts a built Embedding / ReversibleEmbedding in place to vocab-parallel.

    Args:
        layer: a built `keras.layers.Embedding` (or subclass).
        spec: `ShardSpec` with rule "vocab", axis 0.
        rank: the rank whose slice the layer keeps.
        comm: the `Communicator`.
        path: layer path for error messages.

    Returns:
        The converted layer (the same object).

    Raises:
        ValueError: a rule other than vocab, or a layer that cannot be converted.
    """
    reversible = isinstance(layer, keras.layers.ReversibleEmbedding)
    base = keras.layers.ReversibleEmbedding if reversible else keras.layers.Embedding
    check_convertible(layer, base, path)
    if spec.rule != "vocab" or spec.axis != 0:
        raise ValueError(
            f"Embedding {path!r}: only the 'vocab' rule (axis 0) or 'replicate' apply; "
            f"got {spec.rule!r} on axis {spec.axis}."
        )
    sharded_base = VocabParallelReversibleEmbedding if reversible else VocabParallelEmbedding

    cuts = variable_cuts(layer, spec)

    def build_local(lyr, full):
        for attr, name, axis, ranges in cuts:
            setattr(lyr, attr, add_local_weight(lyr, name, full[attr], axis=axis, ranges=ranges))

    return rebuild_in_place(layer, sharded_base, spec, rank, comm, build_local)
