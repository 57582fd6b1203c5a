"""The decode kernels (tfshard/layers/kernels/) of every instruction set this CPU runs, against float64 numpy.

Each set's linear kernel (the streaming one for up to 8 input rows, the panel one above) is
called directly (a C entry point, through ctypes) on weights
in every format Keras stores: float32, bfloat16, int8 (exact int32 sums), int4 per
channel and per group, as a Dense kernel `[K, N]` ("kn"), as an embedding table `[N, K]`
("nk") and, for int4, as an untied reverse table `[K, N]` packed along K ("pk").
"generic16" runs the AVX-512 kernels' blocking (16 lanes) on any machine;
"avx512" runs where the CPU has it, "avx2" where it has AVX2 and FMA. The float bound:
float32's accumulation error, K * 2^-24 of the sum of |terms| (int4 is summed as
(q + 8) * x - 8 * sum(x), and per group with its zero point, so its terms are bounded by
those magnitudes).
"""

import ctypes

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tfshard.layers import matvec

ISAS = ("avx512", "avx2", "generic", "generic16")
F32, BF16, I8, I4C, I4G = range(5)
KN, NK, PK = range(3)

pytestmark = pytest.mark.skipif(matvec.kernels_isa() == "unbuilt",
                                reason="tfshard/layers/_kernels.so is not built")


def _entry():
    fn = ctypes.CDLL(matvec.LIBRARY).tfshard_kernels_linear
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    return fn


def _runs_here(isa):
    probe = np.zeros((1, 1), np.float32)
    out = np.zeros((1, 1), np.float32)
    return _entry()(isa.encode(), F32, 0, 1, 1, probe.ctypes.data, None, None, None, 0, None,
                    probe.ctypes.data, None, 1, out.ctypes.data, None) == 0


HERE = [isa for isa in ISAS if _runs_here(isa)]


def _ptr(a):
    return None if a is None else a.ctypes.data


def _pack(q, axis):
    """Keras's int4 packing along `axis`: value 2j in byte j's low nibble, 2j+1 in its high."""
    q = np.moveaxis(q, axis, -1)
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), q.dtype)], axis=-1)
    packed = ((q[..., 0::2] & 0xF) | ((q[..., 1::2] & 0xF) << 4)).astype(np.uint8).view(np.int8)
    return np.ascontiguousarray(np.moveaxis(packed, -1, axis))


def _bf16(a):
    bits = np.asarray(a, np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def _case(fmt, layout, M, K, N, rng, group=16):
    """(weight arrays for the entry, logical float64 weight [K, N], bound terms [K, N])."""
    scale = zero = gidx = None
    groups = 0
    nk = layout == NK
    if fmt == F32:
        w = rng.normal(size=(K, N)).astype(np.float32)
        data, logical = (w.T if nk else w), w.astype(np.float64)
    elif fmt == BF16:
        bits = _bf16(rng.normal(size=(K, N)))
        logical = (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        data = bits.T if nk else bits
    elif fmt == I8:
        q = rng.integers(-127, 128, size=(K, N)).astype(np.int8)
        data, logical = (q.T if nk else q), q.astype(np.float64)
    else:
        q = rng.integers(-8, 8, size=(K, N)).astype(np.int8)
        nk = layout == NK
        data = _pack(q.T, 1) if nk else _pack(q, 0 if layout == PK else 1)
        if fmt == I4C:
            scale = (0.5 + rng.random(N)).astype(np.float32)
            logical = q / scale.astype(np.float64)
            terms = (np.abs(q) + 16.0) / scale
        else:
            groups = -(-K // group)
            shape = (N, groups) if nk else (groups, N)
            scale = (0.1 + rng.random(shape)).astype(np.float32)
            zero = rng.integers(-8, 8, size=shape).astype(np.float32)
            gidx = (np.arange(K) // group).astype(np.int32)
            s = scale.T[gidx] if nk else scale[gidx]
            z = zero.T[gidx] if nk else zero[gidx]
            logical = (q - z.astype(np.float64)) * s
            terms = (np.abs(q) + np.abs(z) + 16.0) * s
        return np.ascontiguousarray(data), logical, terms, scale, zero, gidx, groups
    return np.ascontiguousarray(data), logical, np.abs(logical), scale, zero, gidx, groups


def _run(isa, fmt, layout, M, K, N, seed, bias=True, low=-127):
    if layout == PK and fmt not in (I4C, I4G):
        layout = KN
    rng = np.random.default_rng(seed)
    data, logical, terms, scale, zero, gidx, groups = _case(fmt, layout, M, K, N, rng)
    b = rng.normal(size=N).astype(np.float32) if bias and fmt != I8 else None
    if fmt == I8:
        x = rng.integers(low, 128, size=(M, K)).astype(np.int8)
        if low == -128:  # every int8 value, -128 in the input and in the weight for sure
            x.flat[rng.integers(x.size)] = -128
            data.flat[rng.integers(data.size)] = -128
            logical = (data.T if layout == NK else data).astype(np.float64)
        y = np.full((M, N), -1, np.int32)
        code = _entry()(isa.encode(), fmt, layout, K, N, _ptr(data), _ptr(scale), None, None, 0, None,
                        None, _ptr(x), M, None, _ptr(y))
        assert code == 0
        np.testing.assert_array_equal(y, x.astype(np.int64) @ logical.astype(np.int64))
        return
    x = rng.normal(size=(M, K)).astype(np.float32)
    y = np.full((M, N), np.nan, np.float32)
    code = _entry()(isa.encode(), fmt, layout, K, N, _ptr(data), _ptr(scale), _ptr(zero), _ptr(gidx),
                    groups, _ptr(b), _ptr(x), None, M, _ptr(y), None)
    assert code == 0
    exact = x.astype(np.float64) @ logical + (0 if b is None else b)
    bound = np.abs(x.astype(np.float64)) @ terms + (0 if b is None else np.abs(b))
    tol = (K + 4) * 2.0 ** -24 * bound + 1e-30
    worst = np.max(np.abs(y - exact) - tol)
    assert worst <= 0, f"{isa} fmt {fmt} layout {layout} M {M} K {K} N {N}: over by {worst}"


@pytest.mark.parametrize("isa", HERE)
@settings(max_examples=40, deadline=None)
@given(fmt=st.sampled_from([F32, BF16, I8, I4C, I4G]), layout=st.sampled_from([KN, NK, PK]),
       M=st.integers(1, 24), K=st.integers(1, 300), N=st.integers(1, 300),
       seed=st.integers(0, 2**31 - 1))
def test_linear_matches_float64(isa, fmt, layout, M, K, N, seed):
    _run(isa, fmt, layout, M, K, N, seed)


@pytest.mark.parametrize("isa", HERE)
def test_decode_shapes(isa):
    # SmolLM2's shapes at TP=2 (q/k/v, the MLP both ways, the tied head): M = 1 and 8 (the
    # streaming kernels), 37 (a prompt: the panel kernels).
    for fmt in (F32, BF16, I8, I4C, I4G):
        for K, N, layout in ((576, 320, KN), (576, 768, KN), (768, 576, KN), (576, 1000, NK),
                             (576, 1000, PK)):
            for M in (1, 8, 37):
                _run(isa, fmt, layout, M, K, N, seed=K + N + M + fmt)


@pytest.mark.parametrize("isa", HERE)
@pytest.mark.parametrize("M", [1, 3, 8, 9])
def test_int8_every_value(isa, M):
    # The fast int8 kernels take inputs in [-127, 127] (Keras's quantizer's range); an
    # input of -128 (a general int8 matmul's) takes the exact int16 path, the weight's
    # -128 the fast one. Both exact.
    for K, N, layout in ((576, 320, KN), (37, 70, KN), (576, 1000, NK)):
        _run(isa, I8, layout, M, K, N, seed=K + N + M, low=-128)
        _run(isa, I8, layout, M, K, N, seed=K + N + M + 1)


def test_every_set_this_cpu_has_runs():
    # The portable sets run everywhere; the vector sets wherever the CPU has them.
    assert "generic" in HERE and "generic16" in HERE
    isa = matvec.kernels_isa()
    assert isa in HERE, isa
