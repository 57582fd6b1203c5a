"""bfloat16, int8- and int4-quantized models sharded under ./horovodrun.sh at 2 and 3 ranks
(issue 17).

The oracle is the same model unsharded in bfloat16 (tfshard.cli.precision's envelope:
2 eps_bf16 * (1 + max|ref|), argmax identical wherever the reference's top-two margin
exceeds twice that). Checkpoints: a bf16 sharded save reloads at another layout bit for
bit, reloads in float32, gathers to a plain Keras bf16 file; a float32 file loads straight
into bf16 slices.

int8 (`model.quantize("int8")`, then shard): the oracle is the same quantized model
unsharded, and the sharded output is identical to it bit for bit -- column cuts keep
each channel's scale with its column, row cuts quantize the input with the whole input's
scale and sum the int32 partials exactly (tfshard/layers/quantized.py).

int4 (`model.quantize("int4")`, then shard): weight-only, each rank dequantizes its packed
slice and multiplies in float32, so the oracle's envelope is float32's (row cuts sum float
partials in another order); argmax identical (tfshard/layers/int4.py).
"""

import numpy as np
import pytest

from conftest import case_on_all_ranks
from tfshard.cli import precision

MODELS = ("mlp", "gpt2", "llama", "bert")
# At 3 ranks the models whose cut is uneven there: GPT-2 (50257 vocab rows, 4 heads) and
# Llama (6 query heads, 2 K/V heads: replicated K/V). The MLP and BERT run at 2 (and at 3
# in float32, tests/test_equivalence.py); that keeps the suite within its time budget.
THREE = ("gpt2", "llama")
CASES = [(2, n) for n in MODELS] + [(3, n) for n in THREE]


def _precision_runs(suite_runs, np_):
    return suite_runs("precision", 2) if np_ == 2 else suite_runs("precision", 3, models=THREE)


def _ok(rec, rank):
    assert rec["ok"], f"rank {rank}: {rec.get('error_type')}: {rec.get('message')}\n{rec.get('traceback')}"


def _check_bf16(ranks, name, np_):
    for rank, rec in enumerate(case_on_all_ranks(ranks, f"bf16_{name}")):
        _ok(rec, rank)
        c, where = rec["vs_bf16"], f"{name} on rank {rank} of {np_}"
        assert rec["out_dtype"] == rec["ref_dtype"] == "bfloat16", where
        assert rec["weight_dtypes"] == ["bfloat16"] and rec["plan_dtypes"] == ["bfloat16"], where
        assert c["max_diff"] <= c["tol"], f"{where}: max|diff| {c['max_diff']:.3g} > {c['tol']:.3g}"
        assert c["decided_equal"], f"{where}: argmax differs where the margin is clear"
        # One row of 4 tokens: the decode matmul op (where available) within the envelope.
        d = rec["decode_shaped"]
        assert d["max_diff"] <= d["tol"] and d["decided_equal"], f"{where}, one row: {d}"
        if rec["matvec_available"]:
            assert rec["matvec_placed"] > 0, f"{where}: the bf16 decode op was not used"
        # Every rank holds half the bytes of the same plan in fp32 (±1 %).
        ratio = rec["local_bytes"] / rec["bytes_fp32_plan"]
        assert abs(ratio - 0.5) <= 0.005, f"{where}: bf16/fp32 bytes per rank {ratio:.4f}"


@pytest.mark.parametrize("np_,name", CASES)
def test_bf16_sharded_matches_unsharded_bf16(suite_runs, np_, name):
    _check_bf16(_precision_runs(suite_runs, np_), name, np_)


def _check_int8(ranks, name, np_, bitwise=True):
    """`bitwise=False` (MirroredStrategy): within float32's envelope, argmax identical.
    The integer sums are exact there too, but each replica's step is a function of its
    own, which Grappler fuses differently from the reference's graph (norms, softmax):
    1 ulp apart (1.5e-8 for Llama); with Grappler off, bit for bit (checked by hand)."""
    for rank, rec in enumerate(case_on_all_ranks(ranks, f"int8_{name}")):
        _ok(rec, rank)
        where = f"int8 {name} on rank {rank} of {np_}"
        if bitwise:
            assert rec["bitwise"], f"{where}: max|diff| {rec['max_diff']:.3g} (expected bit for bit)"
        else:
            assert rec["max_diff"] <= rec["tol"] and rec["argmax_equal"], (where, rec["max_diff"])
        # One row of 4 tokens: tfshard's int8 op (exact integer sums), still bit for bit --
        # wherever TensorFlow's softmax rounds a row alike in the rank's share of the heads
        # and in all of them; where it does not (AVX2-only CPUs), the rank's attention can be
        # one ulp off before any sum of tfshard's, and float32's envelope with argmax
        # identical is what holds (the int8 sums are checked exact per layer in
        # tests/test_decode.py and tests/test_matvec.py).
        if rec["softmax_shape_invariant"]:
            assert rec["decode_shaped_bitwise"], f"{where}: one row differs from unsharded int8"
        else:
            fp32 = rec["decode_shaped_fp32"]
            assert fp32["ok"], f"{where}: one row outside float32's envelope: {fp32}"
        if rec["matvec_available"]:
            assert rec["matvec_placed"] > 0, f"{where}: the int8 decode op was not used"
        assert rec["cut"] >= 4 and rec["modes"] == ["int8"], where
        assert rec["held_bytes"] == rec["local_bytes"], f"{where}: holds {rec['held_bytes']} B, plan says {rec['local_bytes']}"
        for path, s in rec["slices"].items():
            assert s["local"] == s["planned"] != s["full"], f"{where}: {path} {s}"
        if "shard_then_quantize_bitwise" in rec:  # Horovod/MPI only
            assert rec["shard_then_quantize_bitwise"], f"{where}: shard, then quantize differs"
            planned, held = rec["shard_then_quantize_plan"]
            assert planned == held == rec["held_bytes"], f"{where}: {planned} {held}"


@pytest.mark.parametrize("np_,name", CASES)
def test_int8_sharded_equals_unsharded_int8_bit_for_bit(suite_runs, np_, name):
    _check_int8(_precision_runs(suite_runs, np_), name, np_)


# The other backends: Horovod over Gloo and MirroredStrategy replicas in one process widen
# bf16 partials to fp32 in Python (MPI does it in its op) and all-reduce int8's int32 sums.
# One model each (the per-model layers run at 2 and 3 ranks under MPI above): GPT-2 over
# Gloo (its odd 50257-row vocabulary gathered unevenly), Llama's GQA under MirroredStrategy.
OTHER_BACKENDS = [("gloo", "gpt2"), ("mirrored", "llama")]


@pytest.mark.parametrize("check", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("backend,name", OTHER_BACKENDS)
def test_over_horovod_gloo_and_mirrored(suite_runs, check, backend, name):
    if backend == "gloo":
        ranks = suite_runs("precision", 2, launcher="gloo", models=(name,))
    else:
        ranks = suite_runs("precision", 1, launcher="none", mirrored=2, models=(name,))
    extra = {"bitwise": False} if backend == "mirrored" and check == "int8" else {}
    {"bf16": _check_bf16, "int8": _check_int8, "int4": _check_int4_default}[check](
        ranks, name, 2, **extra)


def test_int8_checkpoint_load_quantize_and_refusals(suite_runs):
    for rank, rec in enumerate(case_on_all_ranks(suite_runs("precision", 2), "int8_checkpoint")):
        _ok(rec, rank)
        assert rec["bitwise"] and rec["kernel_dtypes"] == ["int8"], rec
        assert rec["load_quantize_bitwise"] and rec["load_quantize_dtypes"] == ["int8"], rec
    for rank, rec in enumerate(case_on_all_ranks(suite_runs("precision", 2), "int8_refusals")):
        _ok(rec, rank)
        # Both orders work for int8; another mode on a sharded model names what works.
        assert "tfshard quantizes sharded layers to int8" in rec["quantize_after"], rec
        assert "For int4, quantize the model before sharding it" in rec["quantize_after"], rec
        # float8 is not cut: a named error, not a silent replication.
        assert "is quantized in mode 'float8'; tfshard shards int8- and int4-quantized" \
            in rec["float8"], rec["float8"]


def test_bf16_bytes_on_the_wire_are_what_the_plan_says(suite_runs):
    for rank, rec in enumerate(case_on_all_ranks(suite_runs("precision", 2), "bf16_wire_bytes")):
        _ok(rec, rank)
        for key in ("gpt2 float32", "gpt2 bfloat16", "llama float32", "llama bfloat16"):
            metered, planned = rec[key]
            assert metered == planned, f"{key} rank {rank}: metered {metered} B, plan {planned} B"
        # The logits gather (most of GPT-2's bytes) halves; the all-reduces stay fp32.
        assert rec["gpt2 bfloat16"][0] < 0.51 * rec["gpt2 float32"][0], rec
        assert rec["llama bfloat16"][0] > 0.5 * rec["llama float32"][0], rec


def test_comm_dtype_sends_collectives_in_16_bits(suite_runs):
    for rank, rec in enumerate(case_on_all_ranks(suite_runs("precision", 2), "comm_dtype")):
        _ok(rec, rank)
        for name in ("gpt2", "llama", "mlp", "gpt2 float16", "gpt2 int8"):
            r, where = rec[name], f"{name} rank {rank}"
            assert r["dtype"] == "float32", where  # the model's output dtype is kept
            assert r["vs_fp32"]["ok"], f"{where}: {r['vs_fp32']}"  # the 16-bit envelope
            assert r["metered"] == r["planned"], f"{where}: {r['metered']} vs {r['planned']}"
        # Over MPI the all-reduces go in 16 bits too; int8's int32 partial sums do not.
        assert "16-bit all-reduces" in rec["gpt2"]["line"], rec["gpt2"]["line"]
        assert "16-bit gathers" in rec["gpt2"]["line"], rec["gpt2"]["line"]
        assert "fp32 all-reduces" in rec["gpt2 int8"]["line"], rec["gpt2 int8"]["line"]
        assert "overflowed float16 (|x| > 65504); use comm_dtype='bfloat16'" in \
            rec["overflow"], rec["overflow"]
    # Against the fp32 run of the wire-bytes case: every collective halves (GPT-2's logits
    # gather and Llama's all-reduces alike).
    wire = case_on_all_ranks(suite_runs("precision", 2), "bf16_wire_bytes")[0]
    got = case_on_all_ranks(suite_runs("precision", 2), "comm_dtype")[0]
    for name in ("gpt2", "llama"):
        assert got[name]["metered"] == wire[f"{name} float32"][0] // 2, (name, got[name],
                                                                         wire)


def test_bf16_checkpoints_reload_across_layouts_and_precisions(suite_runs):
    for rank, rec in enumerate(case_on_all_ranks(suite_runs("precision", 2), "bf16_checkpoints")):
        _ok(rec, rank)
        assert rec["reload_tp1_dtype"] == "bfloat16"
        assert rec["reload_tp1_bitwise"], f"rank {rank}: bf16 save reloaded at TP=1 differs"
        assert rec["gathered_bitwise"], f"rank {rank}: gathered .keras differs in plain Keras"
        assert rec["reload_fp32"]["ok"], rec["reload_fp32"]
        assert rec["reload_fp32_dtypes"] == ["float32"]
        assert rec["fp32_file_as_bf16"]["ok"], rec["fp32_file_as_bf16"]
        assert rec["fp32_file_as_bf16_dtypes"] == ["bfloat16"]


def test_envelope_and_compare():
    # The envelope is the dtype's, relative to the reference's magnitude.
    assert precision.tolerance("float32", 9.0) == pytest.approx(1e-4)
    assert precision.tolerance("bfloat16", 1.0) == pytest.approx(2 * 2 * 2.0 ** -7)
    with pytest.raises(ValueError, match="No accuracy envelope for dtype 'int8'"):
        precision.tolerance("int8", 1.0)
    ref = np.array([[0.0, 1.0, 0.999], [3.0, 0.0, 0.0]])
    near_tie = np.array([[0.0, 0.999, 1.0], [3.0, 0.0, 0.0]])
    bf16 = precision.compare(ref, near_tie, "bfloat16")
    assert bf16["ok"] and bf16["argmax_agree"] == 0.5  # a tie inside the envelope may flip
    assert not precision.compare(ref, near_tie, "float32")["ok"]  # not in float32
    far = precision.compare(ref, ref + np.array([[0, 0, 0], [-3.0, 3.0, 0]]), "bfloat16")
    assert not far["ok"] and not far["within"] and not far["decided_equal"]


def test_load_refuses_a_dtype_it_cannot_build_in(tmp_path):
    import tfshard

    with pytest.raises(ValueError, match="dtype='int8': tfshard loads models in one of float32, bfloat16"):
        tfshard.load("smollm2", dtype="int8")


def _mlp_file(tmp_path):
    import keras

    keras.utils.set_random_seed(3)
    inp = keras.Input((12,))
    model = keras.Model(inp, keras.layers.Dense(6)(keras.layers.Dense(32, activation="relu")(inp)))
    model.save(tmp_path / "mine.keras")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(7, 12)).astype("float32"))
    return tmp_path / "mine.keras", tmp_path / "x.npy"


@pytest.mark.parametrize("flags, says", [
    (["--dtype", "bfloat16"], "bfloat16), argmax agrees at"),
    (["--quantize", "int8"], "float32), argmax identical: True"),
])
def test_predict_cli_in_bf16_and_int8(tmp_path, flags, says):
    from conftest import launch

    model, x = _mlp_file(tmp_path)
    code, out, secs = launch(2, ["-m", "tfshard", "predict", model, "--input", x] + flags,
                             timeout=300)
    assert code == 0, out[-4000:]
    assert "MATCH" in out and "MISMATCH" not in out and says in out, out[-3000:]


def test_generate_cli_real_smollm2_in_bf16_still_says_paris():
    from conftest import launch

    code, out, secs = launch(2, ["-m", "tfshard", "generate", "smollm2", "--dtype", "bfloat16",
                                 "--prompt", "The capital of France is"], timeout=900)
    assert code == 0, out[-4000:]
    assert "total here 136.8 MiB of 256.6 MiB" in out, out[-3000:]  # fp32: 273.5 of 513.1
    assert "'The capital of France is' -> ' Paris" in out, out[-3000:]


@pytest.mark.parametrize("shape,axis", [((300, 70), 0), ((300, 70), -1), ((50, 3, 7), (0,)),
                                        ((40, 3, 7), (1, 2)), ((33,), 0)])
def test_quantize_weight_in_blocks_equals_keras(monkeypatch, shape, axis):
    # Blocks of rows (to bound a load's peak) give Keras's whole-array bits.
    import ml_dtypes
    from keras.src.quantizers.quantizers import abs_max_quantize

    from tfshard.layers import quantized

    monkeypatch.setattr(quantized, "_BLOCK_BYTES", 1000)
    for dtype in (np.float32, ml_dtypes.bfloat16):
        value = np.random.default_rng(0).normal(size=shape).astype(dtype)
        q, scale = quantized.quantize_weight(value, axis)
        want_q, want_scale = (np.asarray(t) for t in abs_max_quantize(value, axis, to_numpy=True))
        assert q.dtype == np.int8 and np.array_equal(q, want_q)
        assert scale.dtype == want_scale.dtype and np.array_equal(scale, want_scale)


def _check_int4(ranks, name, block, np_):
    for rank, rec in enumerate(case_on_all_ranks(ranks, f"int4_{name}_{block}")):
        _ok(rec, rank)
        c, where = rec["vs_int4"], f"int4 {name} (block {block}) on rank {rank} of {np_}"
        assert c["max_diff"] <= c["tol"], f"{where}: max|diff| {c['max_diff']:.3g} > {c['tol']:.3g}"
        assert c["argmax_agree"] == 1.0, f"{where}: argmax differs ({c['argmax_agree']})"
        assert rec["cut"] >= 4 and rec["modes"] == ["int4"], where
        assert rec["held_bytes"] == rec["local_bytes"], f"{where}: holds {rec['held_bytes']} B, plan says {rec['local_bytes']}"
        for path, s in rec["slices"].items():
            # Packed two a byte in a 2-D [rows, ceil(columns / 2)] layout: twice the bytes
            # held is the planned slice's values, plus one per row where columns are odd.
            held, planned = np.prod(s["local"]), np.prod(s["planned"])
            assert s["int4"] and 0 <= 2 * held - planned <= s["local"][0], f"{where}: {path} {s}"
            assert planned < np.prod(s["full"]), f"{where}: {path} {s}"
        # Packed int4 with its scales: well under float32's bytes per rank.
        assert rec["held_bytes"] < 0.5 * rec["fp32_local_bytes"], where


@pytest.mark.parametrize("np_,name,block", [(np_, n, 128) for np_, n in CASES]
                         + [(2, "gpt2", -1)])
def test_int4_sharded_matches_unsharded_int4(suite_runs, np_, name, block):
    """int4 (Keras's default groups of 128 with zero points, and per channel): weight-only,
    so each rank dequantizes its packed slice and multiplies in float32; row cuts sum
    float partials, hence float32's envelope against the unsharded int4 model."""
    _check_int4(_precision_runs(suite_runs, np_), name, block, np_)


def _check_int4_default(ranks, name, np_):
    _check_int4(ranks, name, 128, np_)


def test_int4_checkpoints_and_refusals(suite_runs):
    for rank, rec in enumerate(case_on_all_ranks(suite_runs("precision", 2), "int4_checkpoint")):
        _ok(rec, rank)
        assert rec["reload_tp1_bitwise"], f"rank {rank}: int4 save reloaded at TP=1 differs"
        assert rec["gathered_bitwise"], f"rank {rank}: gathered int4 .keras differs in plain Keras"
        c = rec["file_sharded"]
        assert c["max_diff"] <= c["tol"] and c["argmax_agree"] == 1.0, (rank, c)
        assert rec["file_cut"] >= 4 and rec["file_modes"] == ["int4"], rec
    for rank, rec in enumerate(case_on_all_ranks(suite_runs("precision", 2), "int4_refusals")):
        _ok(rec, rank)
        assert "model.quantize('int4'), then tfshard.shard(model)" in rec["quantize_after"], rec
        assert "quantize='int4': tfshard.load quantizes to 'int8'" in rec["load_quantize"], rec
        assert "int4 files load slice by slice" in rec["load_quantize"], rec
