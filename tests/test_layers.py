"""Layer math in one process: with the identity communicator, each rank's column
output is its slice of the reference and row / vocab partials sum to it."""

import keras
import numpy as np
import pytest

from tfshard.comm.local import LocalCommunicator
from tfshard.layers import ShardSpec, even_ranges, shard_layer

COMM = LocalCommunicator()
X = np.random.default_rng(0).normal(size=(3, 5, 12)).astype("float32")


def _fresh(make, x):
    keras.utils.set_random_seed(0)
    layer = make()
    ref = np.asarray(layer(x))
    return layer, ref


def _spec(rule, axis, total, size=2, **kw):
    return ShardSpec(rule=rule, axis=axis, ranges=even_ranges(total, size),
                     full_shape=kw.pop("full_shape"), path="t", **kw)


@pytest.mark.parametrize("size", [2, 3])
def test_column_dense_slices_and_row_dense_partials_sum(size):
    make = lambda: keras.layers.Dense(10, activation="relu")  # noqa: E731
    parts = []
    for rank in range(size):
        layer, ref = _fresh(make, X)
        path_before = [v.path for v in layer.weights]
        shard_layer(layer, _spec("column", 1, 10, size, full_shape=(12, 10)), COMM, rank=rank)
        assert [v.path for v in layer.weights] == path_before
        a, b = even_ranges(10, size)[rank]
        np.testing.assert_allclose(np.asarray(layer(X)), ref[..., a:b], rtol=1e-6, atol=1e-6)
        assert tuple(layer.kernel.shape) == (12, b - a)

        layer, ref = _fresh(lambda: keras.layers.Dense(7), X)
        bias = np.asarray(layer.bias)
        shard_layer(layer, _spec("row", 0, 12, size, full_shape=(12, 7)), COMM, rank=rank)
        parts.append(np.asarray(layer(X)) - bias)  # identity "all-reduce", then bias
    np.testing.assert_allclose(sum(parts) + bias, ref, rtol=1e-5, atol=1e-5)


def test_einsum_heads_column_and_row():
    make_q = lambda: keras.layers.EinsumDense("abc,cde->abde", (None, 4, 3), bias_axes="de")  # noqa: E731
    make_o = lambda: keras.layers.EinsumDense("abde,dec->abc", (None, 6), bias_axes="c")  # noqa: E731
    h = np.random.default_rng(1).normal(size=(3, 5, 4, 3)).astype("float32")
    parts = []
    for rank in range(2):
        layer, ref = _fresh(make_q, X)
        shard_layer(layer, _spec("column", 1, 4, full_shape=(12, 4, 3)), COMM, rank=rank)
        a, b = even_ranges(4, 2)[rank]
        np.testing.assert_allclose(np.asarray(layer(X)), ref[:, :, a:b], rtol=1e-6, atol=1e-6)
        assert tuple(layer.bias.shape) == (b - a, 3)

        layer, ref_o = _fresh(make_o, h)
        bias = np.asarray(layer.bias)
        shard_layer(layer, _spec("row", 0, 4, full_shape=(4, 3, 6)), COMM, rank=rank)  # slices its input
        parts.append(np.asarray(layer(h)) - bias)
    np.testing.assert_allclose(sum(parts) + bias, ref_o, rtol=1e-5, atol=1e-5)


def test_vocab_embedding_partials_sum_and_ids_are_checked():
    ids = np.array([[0, 5, 9, 3]], "int32")
    parts = []
    for rank in range(2):
        layer, ref = _fresh(lambda: keras.layers.Embedding(10, 4), ids)
        shard_layer(layer, _spec("vocab", 0, 10, full_shape=(10, 4)), COMM, rank=rank)
        parts.append(np.asarray(layer(ids)))
    np.testing.assert_array_equal(sum(parts), ref)
    with pytest.raises(Exception, match="must be < the vocabulary size 10"):
        layer(np.array([[10]], "int32"))


def test_spec_config_round_trip_and_refusals():
    layer, _ = _fresh(lambda: keras.layers.Dense(4), X)
    spec = _spec("column", 1, 4, full_shape=(12, 4), gather_output=True)
    shard_layer(layer, spec, COMM, rank=1)
    assert ShardSpec.from_config(layer.get_config()["shard"]) == spec
    # Issue 16: the two quantize messages contradicted each other; issue 17: sharded
    # layers quantize to int8, other modes are a ValueError (keras.Model.quantize turns
    # NotImplementedError into a warning and leaves the layer in float32).
    with pytest.raises(ValueError, match="tfshard quantizes sharded layers to int8"):
        layer.quantize("int4")
    with pytest.raises(ValueError, match="every rank needs a non-empty slice"):
        ShardSpec(rule="column", axis=1, ranges=((0, 0), (0, 4)))


@pytest.mark.parametrize("make, rule, axis, total, full", [
    (lambda: keras.layers.Dense(10, activation="relu"), "column", 1, 10, (12, 10)),
    (lambda: keras.layers.EinsumDense("abc,cde->abde", (None, 4, 3), bias_axes="de"),
     "column", 1, 4, (12, 4, 3)),
])
def test_column_layers_quantized_after_sharding_equal_quantized_then_cut(make, rule, axis,
                                                                          total, full):
    """Issue 17: a column slice quantized on its own is the whole layer's quantization
    cut (each channel's scale needs only its own column), bit for bit."""
    for rank in range(3):
        layer, _ = _fresh(make, X)
        layer.quantize("int8")
        ref = np.asarray(layer(X))
        later, _ = _fresh(make, X)
        shard_layer(later, _spec(rule, axis, total, 3, full_shape=full), COMM, rank=rank)
        later.quantize("int8")
        a, b = even_ranges(total, 3)[rank]
        want = ref[..., a:b] if len(full) == 2 else ref[:, :, a:b]
        assert later.quantization_mode == "int8" and later.kernel.dtype == "int8"
        np.testing.assert_array_equal(np.asarray(later(X)), want)


def test_layer_overriding_call_is_refused():
    class Odd(keras.layers.Dense):
        def call(self, x):
            return super().call(x) * 2

    layer, _ = _fresh(lambda: Odd(4), X)
    with pytest.raises(TypeError, match="overrides call"):
        shard_layer(layer, _spec("column", 1, 4, full_shape=(12, 4)), COMM, "odd", rank=0)


def test_sharded_layers_are_made_only_by_conversion():
    """Their constructor + build path (issue 16: nothing called it) is gone; constructing,
    building or rebuilding one from its config says how sharded models are saved and loaded."""
    from tfshard.layers import ColumnParallelDense, VocabParallelEmbedding

    layer, _ = _fresh(lambda: keras.layers.Dense(4), X)
    shard_layer(layer, _spec("column", 1, 4, full_shape=(12, 4)), COMM, rank=0)
    for make in (lambda: ColumnParallelDense(4), lambda: VocabParallelEmbedding(10, 4),
                 lambda: type(layer).from_config(layer.get_config())):
        with pytest.raises(TypeError, match=r"A sharded \w+ is made by tfshard.shard\(\) / "
                                            r"tfshard.load\(\) converting a built layer in place"):
            make()


# --------------------------------------------------------------------------- #
# int4 (issue 17): Keras's packed layouts cut in one process
# --------------------------------------------------------------------------- #

def _int4(make, x, block_size):
    """A fresh layer quantized to int4 (groups of `block_size` rows; -1: per channel)."""
    from keras.src.quantizers.quantization_config import Int4QuantizationConfig

    layer, _ = _fresh(make, x)
    layer.quantize("int4", config=Int4QuantizationConfig(block_size=block_size))
    return layer, np.asarray(layer(x))


def _int4_spec(rule, axis, total, size, full_shape, align=1, **kw):
    return ShardSpec(rule=rule, axis=axis, ranges=even_ranges(total, size, align),
                     full_shape=full_shape, path="t", **kw)


@pytest.mark.parametrize("block_size", [5, -1])
@pytest.mark.parametrize("size", [2, 3])
def test_int4_dense_column_slices_and_row_partials_sum(size, block_size):
    """An odd width (33) cut on even boundaries: each rank holds its packed bytes and
    computes the unsharded columns; row slices keep the scale whole, cut `g_idx`, and
    their partials sum to the unsharded output (float sums: fp32's envelope)."""
    parts = []
    for rank in range(size):
        layer, ref = _int4(lambda: keras.layers.Dense(33, activation="relu"), X, block_size)
        packed = np.asarray(layer._kernel)
        spec = _int4_spec("column", 1, 33, size, (12, 33), align=2)
        shard_layer(layer, spec, COMM, rank=rank)
        a, b = spec.ranges[rank]
        assert a % 2 == 0 and (b % 2 == 0 or b == 33), spec.ranges
        np.testing.assert_array_equal(np.asarray(layer._kernel), packed[:, a // 2:(b + 1) // 2])
        np.testing.assert_allclose(np.asarray(layer(X)), ref[..., a:b], rtol=1e-6, atol=1e-6)

        layer, ref = _int4(lambda: keras.layers.Dense(7), X, block_size)
        bias = np.asarray(layer.bias)
        shard_layer(layer, _int4_spec("row", 0, 12, size, (12, 7)), COMM, rank=rank)
        assert layer.quantization_mode == "int4" and layer._kernel.shape[1] == 4  # packed
        if block_size > 0:
            assert tuple(layer.g_idx.shape) == (layer.shard_width,)
            assert tuple(layer.kernel_scale.shape) == (3, 7)  # whole: groups of 5 of 12 rows
        parts.append(np.asarray(layer(X)) - bias)
    np.testing.assert_allclose(sum(parts) + bias, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_size", [5, -1])
def test_int4_einsum_heads_column_and_row(block_size):
    """q [12, 4 heads, 3] stored as [12, 12/2]: a heads cut is a block of columns (even
    at 2 ranks); o [4, 3, 6] stored as [12, 6/2]: a heads cut is a block of rows."""
    make_q = lambda: keras.layers.EinsumDense("abc,cde->abde", (None, 4, 3), bias_axes="de")  # noqa: E731
    make_o = lambda: keras.layers.EinsumDense("abde,dec->abc", (None, 6), bias_axes="c")  # noqa: E731
    h = np.random.default_rng(1).normal(size=(3, 5, 4, 3)).astype("float32")
    parts = []
    for rank in range(2):
        layer, ref = _int4(make_q, X, block_size)
        shard_layer(layer, _int4_spec("column", 1, 4, 2, (12, 4, 3)), COMM, rank=rank)
        a, b = even_ranges(4, 2)[rank]
        np.testing.assert_allclose(np.asarray(layer(X)), ref[:, :, a:b], rtol=1e-6, atol=1e-6)
        assert tuple(layer._kernel.shape) == (12, 3)  # 2 heads x 3 values, packed

        layer, ref_o = _int4(make_o, h, block_size)
        bias = np.asarray(layer.bias)
        shard_layer(layer, _int4_spec("row", 0, 4, 2, (4, 3, 6)), COMM, rank=rank)
        parts.append(np.asarray(layer(h)) - bias)
    np.testing.assert_allclose(sum(parts) + bias, ref_o, rtol=1e-5, atol=1e-5)
    # 3 ranks: heads [0,2) [2,3) [3,4) of 3 values are columns [0,6) [6,9) [9,12): the
    # boundary 9 falls inside a byte.
    layer, _ = _int4(make_q, X, block_size)
    with pytest.raises(ValueError, match=r"int4 packs two values a byte, so a cut of its packed "
                                         r"axis \(12 values\) needs even boundaries"):
        shard_layer(layer, _int4_spec("column", 1, 4, 3, (12, 4, 3)), COMM, rank=0)


@pytest.mark.parametrize("block_size", [3, -1])
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("quantized_inputs", [False, True])
def test_int4_reversible_embedding_lookup_and_logits(block_size, tie, quantized_inputs):
    """Vocab cuts: exact lookups, the logits' vocab columns. Keras gives an int4
    ReversibleEmbedding loaded from a file an AbsMax input quantizer for its logits (not
    one quantized in memory); the input is whole on every rank, so it shards too."""
    from keras.src.quantizers.quantizers import AbsMaxQuantizer

    ids = np.array([[0, 5, 9, 3]], "int32")
    h = np.random.default_rng(2).normal(size=(1, 4, 8)).astype("float32")
    make = lambda: keras.layers.ReversibleEmbedding(10, 8, tie_weights=tie)  # noqa: E731
    parts = []
    for rank in range(3):
        layer, ref = _int4(make, ids, block_size)
        if quantized_inputs:
            layer.inputs_quantizer = AbsMaxQuantizer(axis=-1)
        logits = np.asarray(layer(h, reverse=True))
        shard_layer(layer, _int4_spec("vocab", 0, 10, 3, (10, 8)), COMM, rank=rank)
        parts.append(np.asarray(layer(ids)))
        a, b = even_ranges(10, 3)[rank]
        # The identity communicator's "gather" returns this rank's vocab columns.
        np.testing.assert_allclose(np.asarray(layer(h, reverse=True)), logits[..., a:b],
                                   rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(sum(parts), ref)  # one rank holds each row: exact


def test_int4_cut_geometry():
    from tfshard.layers import int4

    assert even_ranges(33, 3, align=2) == ((0, 12), (12, 24), (24, 33))
    assert even_ranges(5, 3, align=2) == ((0, 2), (2, 4), (4, 5))
    with pytest.raises(ValueError, match="cannot split 5 over 4 ranks in blocks of 2"):
        even_ranges(5, 4, align=2)
    # Gemma's "btd,ndh->btnh" kernel [n, d, h] is stored as [d, n * h] (a reshape): a cut
    # of n is a block of its rows only when d * h is a multiple of n * h.
    assert int4.flat_cut((4, 8, 2), 8, 0, ((0, 2), (2, 4))) == (0, ((0, 4), (4, 8)))
    with pytest.raises(ValueError, match=r"stored as \[6, 8\]; a cut of its axis 0 is not a "
                                         r"block of that layout"):
        int4.flat_cut((4, 6, 2), 6, 0, ((0, 2), (2, 4)), "gemma/q")


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_assign_slice_creates_a_deferred_variable_from_the_file_values(axis, monkeypatch):
    """A variable still without memory is created from the slice read in pieces (no
    zeros first); one with memory is assigned. Both hold exactly the slice."""
    from tfshard.io import deferred_variables, materialize, unfilled
    from tfshard.layers import slices

    monkeypatch.setattr(slices, "CHUNK_BYTES", 64)  # many pieces of a few rows
    full = np.arange(40 * 24, dtype="float32").reshape(40, 24)
    start, stop = {None: (None, None), 0: (5, 37), 1: (3, 21)}[axis]
    want = full if axis is None else np.take(full, range(start, stop), axis=axis)
    with deferred_variables() as created:
        deferred = keras.Variable(initializer="zeros", shape=want.shape, name="w")
        held = keras.Variable(initializer="zeros", shape=want.shape, name="h")
    materialize(created, [deferred, held], leave={id(deferred)})
    assert unfilled(created) == [deferred.path]
    for var in (deferred, held):
        slices.assign_slice(var, full, axis, start, stop)
        np.testing.assert_array_equal(np.asarray(var), want)
    assert unfilled(created) == []


def test_set_value_refuses_a_value_of_another_shape():
    from tfshard.io import deferred_variables
    from tfshard.layers import slices

    with deferred_variables():
        var = keras.Variable(initializer="zeros", shape=(4, 3), name="kernel")
    with pytest.raises(ValueError, match=r"kernel: a value of shape \(3, 4\) for a variable "
                                         r"of shape \(4, 3\)"):
        slices.set_value(var, np.zeros((3, 4), "float32"))


HEAP_FROZEN = """
import gc, keras
from tfshard.layers.tracking import heap_frozen
assert gc.get_freeze_count() == 0
layer = keras.layers.Dense(4)
layer.build((None, 3))
with heap_frozen():
    inside = gc.get_freeze_count()
    layer.quantize("int8")  # Keras's gc.collect per dropped variable, on a frozen heap
assert inside > 0 and gc.get_freeze_count() == 0, inside
assert layer.quantization_mode == "int8"
gc.freeze()  # a process that manages its own heap keeps it as it is
before = gc.get_freeze_count()
with heap_frozen():
    pass
assert gc.get_freeze_count() == before
print("ok")
"""


def test_heap_frozen_for_keras_collections_only():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", HEAP_FROZEN], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
