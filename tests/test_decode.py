"""tfshard's decode step (tfshard.decode) in one process, against keras-hub's own generation.

Per precision (float32, bfloat16, Keras int8, Keras int4 per group and per channel) and
per instruction set this CPU runs (tests/test_kernels.py's `HERE`): greedy tokens equal
keras-hub's `generate` of the same model (in bfloat16 and int8, up to the first step whose
reference top-two margin is within twice the envelope: there a tie may break either way,
as tfshard.cli.precision says); a prompt's logits are within the envelope of the
model's own forward pass (float32: 1e-5 * (1 + max|ref|); bfloat16: tfshard.cli.precision's
2**-6; int8: 2**-6 as well -- an input that rounds one ulp apart quantizes one step apart,
so int8 moves by a quantum where float32 moves by an ulp; int4 is weight-only, float32's).
Rows at different positions in one step equal each row run alone, bit for bit (the
server's continuous batching relies on it). What the step does not compute falls back to
keras-hub's loop, saying why.
"""

import numpy as np
import pytest
import tensorflow as tf

import models
from test_kernels import HERE
from tfshard import decode
from tfshard.cli.precision import compare
from tfshard.decode import DecodeStep, FusedGenerate

pytestmark = pytest.mark.skipif(not HERE, reason="tfshard/layers/_kernels.so is not built")

VARIANTS = ("float32", "bfloat16", "int8", "int4", "int4c")
ENVELOPE_DTYPE = {"float32": "float32", "bfloat16": "bfloat16", "int8": "bfloat16",
                  "int4": "float32", "int4c": "float32"}


def _model(variant, layers=2):
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    dtype = "bfloat16" if variant == "bfloat16" else None
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=1000, num_layers=layers, num_query_heads=8, num_key_value_heads=2,
        hidden_dim=64, intermediate_dim=96, **({"dtype": dtype} if dtype else {}))
    model = keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)
    if variant == "int4c":
        from keras.src.quantizers.quantization_config import Int4QuantizationConfig

        model.quantize("int4", config=Int4QuantizationConfig(block_size=-1))
    elif variant.startswith("int"):
        model.quantize(variant)
    model.compile(sampler="greedy")
    return model


_MODELS = {}


def model_of(variant):
    if variant not in _MODELS:
        _MODELS[variant] = _model(variant)
    return _MODELS[variant]


def prompts(vocab, rows=3, length=14):
    ids = np.random.default_rng(3).integers(1, vocab, (rows, length)).astype("int32")
    mask = np.zeros((rows, length), bool)
    for r, n in enumerate([4, 7, 5][:rows]):
        mask[r, :n] = True
    return {"token_ids": np.where(mask, ids, 0).astype("int32"), "padding_mask": mask}


@pytest.mark.parametrize("isa", HERE)
@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_tokens_and_logits_equal_keras_hub(variant, isa):
    model = model_of(variant)
    x = prompts(1000)
    ref = model.generate(dict(x), stop_token_ids=None)
    step = DecodeStep(model, isa=isa)
    out = FusedGenerate(model, step)(x, stop_token_ids=None)
    np.testing.assert_array_equal(np.asarray(out["padding_mask"]), ref["padding_mask"])
    decided = _decided(model, ref["token_ids"], x["padding_mask"], ENVELOPE_DTYPE[variant])
    got = np.asarray(out["token_ids"])
    for r in range(len(got)):
        n = decided[r]
        np.testing.assert_array_equal(got[r, :n], ref["token_ids"][r, :n], err_msg=f"row {r}")
    if ENVELOPE_DTYPE[variant] == "float32":
        assert (decided == got.shape[1]).all(), decided
    # A whole prompt's logits, in one step, against the model's own forward pass.
    tokens = x["token_ids"][1, :7]
    expected = model({"token_ids": tokens[None], "padding_mask": np.ones((1, 7), bool)})[0]
    cache = step.new_cache(1, 8)
    got = step.logits(cache.handle, cache.rope.handle, tf.constant(tokens), tf.zeros([7], tf.int32),
                      tf.range(7), tf.range(7))
    result = compare(tf.cast(expected, tf.float32), got, ENVELOPE_DTYPE[variant])
    assert result["ok"], (variant, isa, result)


def _decided(model, tokens, mask, dtype):
    """Per row, how many leading tokens are decided: the prompt, then every generated token
    whose reference logits (keras-hub's forward on the reference tokens) have a top-two
    margin above twice the envelope, up to the first that does not (float32: all)."""
    from tfshard.cli.precision import tolerance

    logits = np.asarray(tf.cast(model({"token_ids": tokens,
                                       "padding_mask": np.ones_like(mask)}), tf.float32))
    out = np.full(len(tokens), tokens.shape[1])
    if dtype == "float32":
        return out
    for r in range(len(tokens)):
        for t in range(int(mask[r].sum()), tokens.shape[1]):
            top2 = np.sort(logits[r, t - 1])[-2:]
            if top2[1] - top2[0] <= 2 * tolerance(dtype, np.max(np.abs(logits[r, t - 1]))):
                out[r] = t
                break
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_rows_at_their_own_positions_equal_each_row_alone(variant):
    # Three sequences in one cache: their prompts in one step (13 rows: the panel kernels,
    # where each alone is 3 to 6 rows: the streaming ones), then decode steps where each row
    # is at its own position (and one sequence waits a step): every row's logits equal the
    # same sequence run alone in a cache of its own, bit for bit.
    model = model_of(variant)
    step = DecodeStep(model)
    rng = np.random.default_rng(5)
    seqs = [rng.integers(1, 1000, n).astype("int32") for n in (3, 6, 4)]
    alone = []
    for s in seqs:
        cache = step.new_cache(1, 16)
        n = len(s)
        first = step.logits(cache.handle, cache.rope.handle, tf.constant(s), tf.zeros([n], tf.int32),
                            tf.range(n), tf.constant([n - 1]))
        nxt = np.array([7], "int32")
        second = step.logits(cache.handle, cache.rope.handle, tf.constant(nxt), tf.zeros([1], tf.int32),
                             tf.constant([n]), tf.constant([0]))
        alone.append((np.asarray(first)[0], np.asarray(second)[0]))
    cache = step.new_cache(3, 16)
    tokens = np.concatenate(seqs)
    slots = np.concatenate([np.full(len(s), i, "int32") for i, s in enumerate(seqs)])
    positions = np.concatenate([np.arange(len(s), dtype="int32") for s in seqs])
    last = np.cumsum([len(s) for s in seqs]).astype("int32") - 1
    first = np.asarray(step.logits(cache.handle, cache.rope.handle, tf.constant(tokens),
                                   tf.constant(slots), tf.constant(positions), tf.constant(last)))
    # Decode: sequences 2 and 0 step (rows in another order); sequence 1 waits.
    second = np.asarray(step.logits(cache.handle, cache.rope.handle, tf.constant([7, 7], tf.int32),
                                    tf.constant([2, 0], tf.int32),
                                    tf.constant([len(seqs[2]), len(seqs[0])], tf.int32),
                                    tf.constant([0, 1], tf.int32)))
    for i in range(3):
        np.testing.assert_array_equal(first[i], alone[i][0])
    np.testing.assert_array_equal(second[0], alone[2][1])
    np.testing.assert_array_equal(second[1], alone[0][1])


def test_sliding_window_attends_to_the_last_window_positions_as_keras_hub():
    # tests/models.py's Mistral has a window of 4 positions, far shorter than the prompt plus
    # its generated tokens: every step past the fourth must drop the oldest position.
    model, _ = models.mistral()
    assert model.backbone.sliding_window == 4
    model.compile(sampler="greedy")
    x = prompts(199)  # prompts of 4, 7 and 5 tokens, generated to 14
    ref = model.generate(dict(x), stop_token_ids=None)
    step = DecodeStep(model)
    assert step.decoder.window == 4
    out = FusedGenerate(model, step)(dict(x), stop_token_ids=None)
    np.testing.assert_array_equal(np.asarray(out["token_ids"]), ref["token_ids"])


def test_int8_projection_is_keras_int8_bit_for_bit():
    # The same input through TfshardDecodeLinear and through Keras's int8 Dense: the
    # quantized input, the int32 sums and the rescale are Keras's, so the bits are too.
    import keras

    from tfshard.decode.params import projection
    from tfshard.layers import matvec

    keras.utils.set_random_seed(1)
    layer = keras.layers.Dense(300, use_bias=False)
    layer.build((None, 70))
    layer.quantize("int8")
    p = projection(layer)
    # 5 rows: the streaming kernels; 37 (a prompt): the panel kernels.
    for rows in (5, 37):
        x = tf.random.normal([rows, 70])
        for isa in HERE:
            got = matvec.library().tfshard_decode_linear(
                x=x, amax=tf.zeros([0, 0]), weights=p.handles, formats=[p.format],
                names=[p.name], isa=isa)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(layer(x)),
                                          err_msg=f"{isa}, {rows} rows")


def test_what_the_step_does_not_compute_keeps_keras_hub_and_says_why():
    import keras_hub

    gpt2, _ = models.gpt2()
    with pytest.raises(decode.Unsupported, match="GPT2CausalLM is not one of"):
        DecodeStep(gpt2)
    model = model_of("float32")
    model.compile(sampler=keras_hub.samplers.BeamSampler(num_beams=2))
    try:
        fn, why = decode.fused_generate(model, None)
        assert fn is None and "BeamSampler keeps its own view of the KV cache" in why
    finally:
        model.compile(sampler="greedy")


def test_bad_rows_fail_with_the_slot_or_position_named():
    step = DecodeStep(model_of("float32"))
    cache = step.new_cache(2, 8)
    run = lambda slots, positions: step.logits(  # noqa: E731
        cache.handle, cache.rope.handle, tf.constant([1, 2], tf.int32), tf.constant(slots, tf.int32),
        tf.constant(positions, tf.int32), tf.constant([0], tf.int32))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"row 1 has slot 2.*slots \[0, 2\)"):
        run([0, 2], [0, 1])
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"row 0 is at position 8.*holds positions \[0, 8\)"):
        run([0, 1], [8, 1])


def test_bad_weight_lists_fail_with_the_layer_and_tensor_named():
    # The formats are parsed once, when the op is built, and the tensors bound on every
    # call: each mistake is still the call's InvalidArgumentError, naming the layer.
    import keras

    from tfshard.decode.params import projection
    from tfshard.layers import matvec

    keras.utils.set_random_seed(2)
    layer = keras.layers.Dense(64, use_bias=True, name="proj")
    layer.build((None, 256))
    layer.quantize("int4")  # groups of 128: 2 groups, scale and zero point [2, 64]
    p = projection(layer)
    assert p.format == "i4g:kn:256:64:b", p.format
    x = tf.random.normal([2, 256])
    lib = matvec.library()

    def run(handles=p.handles, fmt=p.format):
        return lib.tfshard_decode_linear(x=x, amax=tf.zeros([0, 0]), weights=handles,
                                         formats=[fmt], names=[p.name])

    want = np.asarray(layer(x))
    np.testing.assert_allclose(np.asarray(run()), want, rtol=1e-5, atol=1e-5)
    kernel, scale, zero, gidx, bias = p.handles
    cases = [
        (dict(fmt="i4g:kn:256"), r"format 'i4g:kn:256' of proj is not fmt:layout:K:N"),
        (dict(fmt="f64:kn:256:64"), r"format 'f64' of proj is not one of f32, bf16, i8"),
        (dict(handles=[kernel, scale, zero, gidx]), r"proj \(i4g:kn:256:64:b\) needs 5 tensors"),
        (dict(handles=[kernel, tf.Variable(tf.ones([63])).handle, zero, gidx, bias]),
         r"proj scale has 63 values; grouped int4 needs groups x 64"),
        (dict(handles=[kernel, tf.Variable(tf.ones([3, 64])).handle, zero, gidx, bias]),
         r"proj zero point has 128 values; the scale has 192"),
        (dict(handles=[kernel, scale, zero, tf.Variable(tf.fill([256], 5)).handle, bias]),
         r"proj group index 5 at row 0 is outside \[0, 2\)"),
        (dict(handles=[kernel, scale, zero, tf.Variable(tf.fill([256], 2.0)).handle, bias]),
         r"proj group index 2 at row 0 is outside \[0, 2\)"),
        (dict(handles=[kernel, scale, zero, gidx, tf.Variable(tf.zeros([63])).handle]),
         r"proj bias has 63 values; the output has 64"),
        (dict(handles=[kernel, tf.Variable(tf.ones([2, 64], tf.int64)).handle, zero, gidx, bias]),
         r"proj scale: dtype int64 is not a float or small integer type"),
    ]
    for kwargs, message in cases:
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            run(**kwargs)
    # The group index read in place (int32) gives the same values as Keras's float32 one.
    as_int = tf.Variable(tf.cast(layer.g_idx, tf.int32))
    np.testing.assert_array_equal(np.asarray(run([kernel, scale, zero, as_int.handle, bias])),
                                  np.asarray(run()))
