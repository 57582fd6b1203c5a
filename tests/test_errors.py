"""Errors that must name their cause (one process; the fuzz suite covers 2 ranks).

Each case gave an unnamed error or a wrong answer before issue 15: an IndexError for Python
lists, a bare numpy concatenate error for batches of different length, "Expected size[0] in
[0, 256], but got 300" for a long sequence, "'str' object is not callable" for a bad
sampler, "in user code: ..." pages for inputs that do not fit together, and int64 ids past
int32 silently wrapped to small ids.
"""

import numpy as np
import pytest

import models
import tfshard
from tfshard import inputs as inputs_lib


@pytest.fixture(scope="module")
def gpt2():
    model, x = models.gpt2()
    reference, _ = models.gpt2()
    return tfshard.shard(model), reference, x


def test_python_lists_are_accepted_as_arrays(gpt2):
    sharded, reference, x = gpt2
    out = sharded.predict({k: v.tolist() for k, v in x.items()}, verbose=0)
    np.testing.assert_allclose(out, reference.predict(x, verbose=0), atol=1e-5)
    mlp, mx = models.mlp()
    ref = mlp.predict(mx, verbose=0)
    np.testing.assert_allclose(tfshard.shard(mlp).predict(mx.tolist(), verbose=0), ref, atol=1e-5)


def test_ragged_list_is_named(gpt2):
    sharded, _, x = gpt2
    with pytest.raises(ValueError, match=r"input 'token_ids' is a ragged"):
        sharded.predict({"token_ids": [[1, 2, 3], [4]], "padding_mask": x["padding_mask"]})


@pytest.mark.parametrize("ids, words", [
    (np.array([[1, 2**32 + 5]], np.int64), ["4294967301", "outside int32", "wrap"]),
    (np.array([[1, 2]], np.complex64), ["complex64", "takes int32 numbers"]),
    (np.array([["a", "b"]]), ["<U1", "tokenize text first"]),
    (np.array([[1.5, 2.0]]), ["expects integer ids", "float"]),
])
def test_ids_are_checked_before_any_cast(gpt2, ids, words):
    sharded, _, _ = gpt2
    with pytest.raises(ValueError) as err:
        sharded.predict({"token_ids": ids, "padding_mask": np.ones(ids.shape, "int32")},
                        verbose=0)
    for word in words:
        assert word in str(err.value), str(err.value)
    assert "input 'token_ids'" in str(err.value)


def test_shapes_that_do_not_fit_together_are_named(gpt2):
    sharded, _, x = gpt2
    with pytest.raises(ValueError, match=r"'padding_mask' has shape \(5, 6\) but 'token_ids' "
                                         r"has \(5, 8\)"):
        sharded.predict({"token_ids": x["token_ids"], "padding_mask": x["padding_mask"][:, :6]},
                        verbose=0)


def test_sequence_longer_than_the_position_table_is_named(gpt2):
    sharded, _, _ = gpt2
    ids = np.ones((2, 40), "int32")
    with pytest.raises(ValueError, match=r"'token_ids' has 40 positions .* GPT2Backbone has "
                                         r"position embeddings for 32"):
        sharded.predict({"token_ids": ids, "padding_mask": np.ones_like(ids)}, verbose=0)


def test_batches_of_different_length_name_both_batches(gpt2):
    sharded, _, x = gpt2

    def batches():
        yield {k: v[:2] for k, v in x.items()}
        yield {k: v[2:4, :6] for k, v in x.items()}

    with pytest.raises(ValueError, match=r"outputs of batch 0 \[\(rows, 8, 50257\) float32\] "
                                         r"and batch 1 \[\(rows, 6, 50257\) float32\] cannot "
                                         r"be joined"):
        sharded.predict(batches(), verbose=0)


def test_bad_sampler_lists_the_samplers(gpt2):
    sharded, _, x = gpt2
    with pytest.raises(ValueError, match=r"sampler='bogus' is not a keras-hub sampler; pass "
                                         r"one of \['greedy'"):
        sharded.generate(x, stop_token_ids=None, sampler="bogus")


def test_uint8_ids_are_valid_ids(gpt2):
    # The in-graph range check compared uint8 ids with the vocabulary cast to uint8 (81).
    sharded, reference, x = gpt2
    ids = np.full((1, 8), 200, np.uint8)
    feed = {"token_ids": ids, "padding_mask": np.ones((1, 8), "int32")}
    np.testing.assert_allclose(sharded.predict(feed, verbose=0),
                               reference.predict(feed, verbose=0), atol=1e-5)


def test_errors_while_tracing_keep_their_cause_and_layer():
    text = ("in user code:\n\n    File \"x.py\", line 1, in f  *\n        y = g()\n\n"
            "    ValueError: Exception encountered when calling TransformerDecoder.call().\n"
            "    \n    \x1b[1mDimensions must be equal, but are 4 and 5 for '{{node a/Minimum}} = "
            "Minimum[T=DT_INT32](a, b)' with input shapes: [1,1,4], [1,5,5].\x1b[0m\n")
    err = inputs_lib.invalid_argument_to_value_error(
        ValueError(text), "W", {"token_ids": np.zeros((1, 5), "int32")})
    message = str(err)
    assert message.startswith("W: the model failed on its inputs: Dimensions must be equal, "
                              "but are 4 and 5 with input shapes: [1,1,4], [1,5,5].")
    assert "(in TransformerDecoder.call)" in message and "token_ids (1, 5) int32" in message
    assert "in user code" not in message and "\x1b" not in message

