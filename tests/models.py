"""Small models and inputs the tests shard, built identically on every rank.

Each builder seeds Keras, builds a model and returns `(model, x)`. Sizes are
tiny (the tests run several ranks on two cores) but keep the structure of the
real thing: GPT-2 keeps its odd vocabulary of 50257, Llama keeps GQA.
"""

import gc

import keras
import keras_hub  # noqa: F401 - imported before the freeze below
import numpy as np

from tfshard.models import from_config

# The objects of the imports above live as long as the process: keep them out of the
# collector's scans. Keras calls gc.collect() for every variable a layer drops (each
# layer of model.quantize), which otherwise walks TensorFlow's and Keras's whole import
# heap every time (~0.15-0.2 s a call here; tens of seconds per worker).
gc.freeze()

SEQ = 8
ROWS = 5  # rows in a test input: divides neither the batch size nor 2 or 3


def _ids(vocab, rows=ROWS, seq=SEQ, seed=1):
    return np.random.default_rng(seed).integers(0, vocab, (rows, seq)).astype("int32")


def _lm_inputs(vocab, rows=ROWS, seq=SEQ):
    mask = np.ones((rows, seq), "int32")
    mask[0, seq - 2:] = 0  # one padded row
    return {"token_ids": _ids(vocab, rows, seq), "padding_mask": mask}


def mlp():
    """Functional MLP: two column→row pairs and an odd trailing softmax Dense."""
    keras.utils.set_random_seed(10)
    inp = keras.Input((12,))
    h = keras.layers.Dense(32, activation="relu")(inp)
    h = keras.layers.Dropout(0.1)(h)
    h = keras.layers.Dense(24)(h)
    h = keras.layers.Dense(40, activation="gelu")(h)
    h = keras.layers.Dense(24)(h)
    out = keras.layers.Dense(9, activation="softmax")(h)
    model = keras.Model(inp, out)
    return model, np.random.default_rng(2).normal(size=(ROWS, 12)).astype("float32")


def two_inputs_two_outputs():
    """Functional model taking a list of two inputs and returning a list of two outputs."""
    keras.utils.set_random_seed(19)
    a = keras.Input((6,), name="a")
    b = keras.Input((SEQ,), dtype="int32", name="b")
    h = keras.layers.Concatenate()([
        a, keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(97, 6)(b))])
    h = keras.layers.Dense(28, activation="relu")(h)
    h = keras.layers.Dense(12)(h)
    model = keras.Model([a, b], [keras.layers.Dense(3, name="o1")(h), keras.layers.Dense(2, name="o2")(h)])
    rng = np.random.default_rng(5)
    return model, [rng.normal(size=(ROWS, 6)).astype("float32"), _ids(97)]


def sequential_embedding():
    """Sequential: Embedding (vocab-parallel) → pooling → Dense pair → head."""
    keras.utils.set_random_seed(11)
    model = keras.Sequential([
        keras.Input((SEQ,), dtype="int32"),
        keras.layers.Embedding(301, 16),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(48, activation="tanh"),
        keras.layers.Dense(16),
        keras.layers.Dense(7),
    ])
    return model, _ids(301)


class _Block(keras.layers.Layer):
    """A custom layer owning an FFN; its data flow is not recorded anywhere."""

    def __init__(self, hidden, inner, **kwargs):
        super().__init__(**kwargs)
        self.norm = keras.layers.LayerNormalization()
        self.up = keras.layers.Dense(inner, activation="relu")
        self.gate = keras.layers.Dense(inner, activation="sigmoid")
        self.down = keras.layers.Dense(hidden)

    def call(self, x):
        h = self.norm(x)
        return x + self.down(self.up(h) * self.gate(h))


class _Nested(keras.Model):
    """Subclassed model with nested custom layers."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.embed = keras.layers.Embedding(130, 20)
        self.blocks = [_Block(20, 36, name=f"block_{i}") for i in range(2)]
        self.head = keras.layers.Dense(11)

    def call(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def nested_subclassed():
    keras.utils.set_random_seed(12)
    model = _Nested(name="nested")
    x = _ids(130)
    model(x[:1])
    return model, x


def gpt2(num_layers=2):
    """GPT-2 CausalLM (tied logits, vocab 50257), tiny otherwise."""
    return from_config("GPT2Backbone", "GPT2CausalLM", seed=13, vocabulary_size=50257,
                       num_layers=num_layers, num_heads=4, hidden_dim=16, intermediate_dim=32,
                       max_sequence_length=32), _lm_inputs(50257)


def bert(num_layers=2):
    """BERT backbone: dict inputs, dict outputs (sequence + pooled)."""
    model = from_config("BertBackbone", seed=14, vocabulary_size=211, num_layers=num_layers,
                        num_heads=4, hidden_dim=24, intermediate_dim=48, max_sequence_length=32)
    x = _lm_inputs(211)
    x["segment_ids"] = np.zeros_like(x["token_ids"])
    x["segment_ids"][:, SEQ // 2:] = 1
    return model, x


def llama(num_layers=2):
    """Llama CausalLM with GQA: 6 query heads, 2 K/V heads (3 ranks replicate K/V)."""
    return from_config("LlamaBackbone", "LlamaCausalLM", seed=15, vocabulary_size=257,
                       num_layers=num_layers, num_query_heads=6, num_key_value_heads=2, hidden_dim=24,
                       intermediate_dim=40), _lm_inputs(257)


def mistral():
    return from_config("MistralBackbone", "MistralCausalLM", seed=16, vocabulary_size=199,
                       num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=16,
                       intermediate_dim=36, sliding_window=4), _lm_inputs(199)


def opt():
    return from_config("OPTBackbone", "OPTCausalLM", seed=17, vocabulary_size=233, num_layers=2,
                       num_heads=4, hidden_dim=16, intermediate_dim=32,
                       max_sequence_length=32), _lm_inputs(233)


def gemma():
    return from_config("GemmaBackbone", "GemmaCausalLM", seed=18, vocabulary_size=181,
                       num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=16,
                       intermediate_dim=64, head_dim=8), _lm_inputs(181)


# Models the equivalence tests run; the first six are the matrix, the
# rest are families the planner was not written against.
EQUIVALENCE = {
    "mlp": mlp,
    "two_inputs_two_outputs": two_inputs_two_outputs,
    "sequential_embedding": sequential_embedding,
    "nested_subclassed": nested_subclassed,
    "gpt2": gpt2,
    "bert": bert,
    "llama": llama,
    "mistral": mistral,
    "opt": opt,
    "gemma": gemma,
}


# The matrix: the six shapes of model every backend must handle.
MATRIX = ["mlp", "sequential_embedding", "nested_subclassed", "gpt2", "bert", "llama"]


# --------------------------------------------------------------------------- #
# Integer-valued models for bitwise tests: every partial sum is an exact
# integer in float32, so the sharded result must equal the reference bit for bit.
# --------------------------------------------------------------------------- #


def integerize(model, low=-2, high=3, seed=0):
    """Replaces every float weight with small integers (exact in float32)."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        if "float" in str(v.dtype):
            v.assign(rng.integers(low, high, v.shape).astype(v.dtype))
    return model


def int_dense_pair():
    """Dense column → row pair plus a gathered column head (plan: explicit rules)."""
    keras.utils.set_random_seed(20)
    inp = keras.Input((10,))
    h = keras.layers.Dense(12, activation="relu", name="col")(inp)
    h = keras.layers.Dense(8, name="row")(h)
    out = keras.layers.Dense(6, name="head")(h)
    model = integerize(keras.Model(inp, out))
    x = np.random.default_rng(3).integers(-3, 4, (ROWS, 10)).astype("float32")
    return model, x


def int_einsum():
    """EinsumDense heads projection (column) → output projection (row), and a
    row layer that slices its own full input."""
    keras.utils.set_random_seed(21)
    inp = keras.Input((SEQ, 12))
    q = keras.layers.EinsumDense("abc,cde->abde", (None, 6, 4), bias_axes="de", name="heads_in")(inp)
    o = keras.layers.EinsumDense("abde,dec->abc", (None, 12), bias_axes="c", name="heads_out")(q)
    r = keras.layers.EinsumDense("abc,cd->abd", (None, 5), bias_axes="d", name="row_full")(o)
    model = integerize(keras.Model(inp, r))
    x = np.random.default_rng(4).integers(-3, 4, (ROWS, SEQ, 12)).astype("float32")
    return model, x


def int_embedding():
    """Embedding lookup (vocab-parallel) feeding a Dense pair."""
    keras.utils.set_random_seed(22)
    inp = keras.Input((SEQ,), dtype="int32")
    h = keras.layers.Embedding(97, 8, name="emb")(inp)
    out = keras.layers.Dense(5, name="head")(h)
    model = integerize(keras.Model(inp, out))
    return model, _ids(97)


def int_reversible():
    """ReversibleEmbedding lookup and tied reverse logits (odd vocab)."""
    keras.utils.set_random_seed(23)
    inp = keras.Input((SEQ,), dtype="int32")
    emb = keras.layers.ReversibleEmbedding(101, 8, name="tied")
    logits = emb(emb(inp), reverse=True)
    model = integerize(keras.Model(inp, logits))
    return model, _ids(101)


BITWISE = {
    "dense": (int_dense_pair, {".*col": "column", ".*row": "row", ".*head": "column"}),
    "einsum_dense": (int_einsum, {".*heads_in": "column", ".*heads_out": "row",
                                  ".*row_full": "row"}),
    "embedding": (int_embedding, {".*emb": "vocab", ".*head": "column"}),
    "reversible_embedding": (int_reversible, {".*tied": "vocab"}),
}
