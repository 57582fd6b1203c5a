"""tfshard's decode matmuls (tfshard/layers/kernels/matmul_ops.cc): bfloat16 against float64 numpy, int8 exactly.

The op widens bfloat16 to float32, accumulates in float32 and rounds the output to
bfloat16 once, so against the exact product of the same bfloat16 operands it is off
by at most one bfloat16 rounding of the result (2^-8 relative) plus float32's
accumulation error (K * 2^-24 of sum |x||w|).
"""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings, strategies as st

from tfshard.layers import matvec

pytestmark = pytest.mark.skipif(not matvec.available(),
                                reason="the op needs a built _kernels.so")


def _bf16(a):
    return tf.cast(tf.constant(a, tf.float32), tf.bfloat16)


def _check(got, x, w, transpose_b):
    x64 = tf.cast(x, tf.float64).numpy()
    w64 = tf.cast(w, tf.float64).numpy()
    w64 = w64.T if transpose_b else w64
    exact = x64.reshape(-1, x64.shape[-1]) @ w64
    bound = np.abs(x64.reshape(-1, x64.shape[-1])) @ np.abs(w64)
    got = tf.cast(got, tf.float64).numpy().reshape(exact.shape)
    tol = 2.0 ** -8 * np.abs(exact) + (x64.shape[-1] + 1) * 2.0 ** -24 * bound + 1e-30
    assert np.all(np.abs(got - exact) <= tol), np.max(np.abs(got - exact) - tol)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, matvec.MAX_ROWS), k=st.integers(1, 70), n=st.integers(1, 300),
       transpose_b=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_matmul_matches_the_exact_product(rows, k, n, transpose_b, seed):
    rng = np.random.default_rng(seed)
    x = _bf16(rng.normal(size=(1, rows, k)) if not transpose_b else rng.normal(size=(rows, k)))
    w = _bf16(rng.normal(size=(n, k) if transpose_b else (k, n)))
    before = matvec.placed["count"]
    got = matvec.matmul(x, w, transpose_b=transpose_b)
    assert matvec.placed["count"] == before + 1  # the op ran, not TensorFlow's matmul
    assert got.dtype == tf.bfloat16 and got.shape[-1] == n
    _check(got, x, w, transpose_b)


def test_wide_and_long_weights_and_graph_mode():
    rng = np.random.default_rng(0)
    for k, n, transpose_b in ((576, 1536, False), (1536, 576, False), (576, 4099, True)):
        x = _bf16(rng.normal(size=(2, k)))
        w = _bf16(rng.normal(size=(n, k) if transpose_b else (k, n)))
        got = tf.function(lambda a, b, t=transpose_b: matvec.matmul(a, b, transpose_b=t))(x, w)
        _check(got, x, w, transpose_b)


def test_einsum_as_a_matmul():
    rng = np.random.default_rng(1)
    x = _bf16(rng.normal(size=(1, 1, 3, 4)))  # b q u h
    w = _bf16(rng.normal(size=(3, 4, 10)))   # u h m
    before = matvec.placed["count"]
    got = matvec.einsum("bquh,uhm->bqm", x, w)
    assert matvec.placed["count"] == before + 1 and got.shape == (1, 1, 10)
    _check(got, tf.reshape(x, [1, 12]), tf.reshape(w, [12, 10]), False)
    q = matvec.einsum("bqm,muh->bquh", _bf16(rng.normal(size=(1, 1, 12))),
                      _bf16(rng.normal(size=(12, 3, 4))))
    assert q.shape == (1, 1, 3, 4) and matvec.placed["count"] == before + 2


def test_falls_back_where_the_op_does_not_apply():
    rng = np.random.default_rng(2)
    before = matvec.placed["count"]
    many = _bf16(rng.normal(size=(matvec.MAX_ROWS + 1, 8)))
    w = _bf16(rng.normal(size=(8, 5)))
    assert matvec.matmul(many, w).shape == (matvec.MAX_ROWS + 1, 5)  # a prefill
    f32 = matvec.matmul(tf.zeros([1, 8]), tf.zeros([8, 5]))  # float32
    gemma = matvec.einsum("btd,ndh->btnh", _bf16(rng.normal(size=(1, 1, 8))),
                          _bf16(rng.normal(size=(2, 8, 3))))  # not matmul-shaped
    unknown = tf.function(lambda a: matvec.matmul(a, w),
                          input_signature=[tf.TensorSpec([None, 8], tf.bfloat16)])
    unknown(_bf16(rng.normal(size=(1, 8))))  # rows unknown when traced
    assert matvec.placed["count"] == before
    assert f32.dtype == tf.float32 and gemma.shape == (1, 1, 2, 3)


def test_mismatched_shapes_name_both():
    lib = matvec._ops()
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"contracts 8 but w \[7,5\]"):
        lib.tfshard_bf16_matmul(_bf16(np.ones((1, 8))), _bf16(np.ones((7, 5))))


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, matvec.MAX_ROWS), k=st.integers(1, 70), n=st.integers(1, 300),
       transpose_b=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_int8_matmul_is_exact(rows, k, n, transpose_b, seed):
    # int8 x int8 summed in int32: the op gives TensorFlow's (Keras's) bits exactly.
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.integers(-128, 128, (rows, k)), tf.int8)
    w = tf.constant(rng.integers(-128, 128, (n, k) if transpose_b else (k, n)), tf.int8)
    before = matvec.placed["count"]
    got = matvec.matmul(x, w, transpose_b=transpose_b)
    assert matvec.placed["count"] == before + 1 and got.dtype == tf.int32
    wn = w.numpy().astype(np.int64)
    want = x.numpy().astype(np.int64) @ (wn.T if transpose_b else wn)
    assert np.array_equal(got.numpy(), want)


def test_int8_einsum_and_off_switch(monkeypatch):
    rng = np.random.default_rng(3)
    x = tf.constant(rng.integers(-127, 128, (1, 1, 12)), tf.int8)
    w = tf.constant(rng.integers(-127, 128, (12, 3, 4)), tf.int8)
    before = matvec.placed["count"]
    got = matvec.einsum("bqm,muh->bquh", x, w)
    assert matvec.placed["count"] == before + 1
    monkeypatch.setenv(matvec.ENV, "0")
    keras_ = matvec.einsum("bqm,muh->bquh", x, w)  # Keras's int8 einsum, the same bits
    assert matvec.placed["count"] == before + 1
    assert got.dtype == keras_.dtype == tf.int32 and np.array_equal(got, keras_)
