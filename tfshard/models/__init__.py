"""Named models tfshard can build with no download.

Built from keras-hub configurations with random weights (seeded, so every rank
builds the same model). Real pretrained weights: `tfshard.load("smollm2" | "minilm")`
(see tfshard/io/named.py).
"""

import keras

# name -> (keras-hub backbone class, task class, config)
_CONFIGS = {
    "gpt2": ("GPT2Backbone", "GPT2CausalLM", dict(
        vocabulary_size=50257, num_layers=12, num_heads=12, hidden_dim=768,
        intermediate_dim=3072, max_sequence_length=1024)),
    "gpt2-tiny": ("GPT2Backbone", "GPT2CausalLM", dict(
        vocabulary_size=50257, num_layers=2, num_heads=4, hidden_dim=64,
        intermediate_dim=256, max_sequence_length=256)),
    "llama-tiny": ("LlamaBackbone", "LlamaCausalLM", dict(
        vocabulary_size=32000, num_layers=2, num_query_heads=8, num_key_value_heads=2,
        hidden_dim=128, intermediate_dim=384)),
    "bert-tiny": ("BertBackbone", None, dict(
        vocabulary_size=30522, num_layers=2, num_heads=4, hidden_dim=128,
        intermediate_dim=512, max_sequence_length=512)),
}

NAMES = tuple(_CONFIGS)


def build(name, seed=0, dtype=None, quantize=None):
    """Builds a named model from its configuration with seeded random weights.

    Args:
        name: one of `NAMES`.
        seed: the weight seed (must be the same on every rank).
        dtype: a Keras dtype policy name ("bfloat16", ...); None: float32.
        quantize: "int8" to quantize the model (Keras's `model.quantize`), or None.

    Returns:
        `(model, vocabulary_size, input_names)`.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name not in _CONFIGS:
        raise ValueError(f"Unknown model {name!r}; built-in models: {', '.join(NAMES)}.")
    backbone_cls, task_cls, config = _CONFIGS[name]
    model = from_config(backbone_cls, task_cls, seed=seed, **config,
                        **({"dtype": dtype} if dtype else {}))
    if quantize:
        model.quantize(quantize)
    return model, config["vocabulary_size"], [t.name for t in keras.tree.flatten(model.inputs)]


def from_config(backbone_cls, task_cls=None, seed=0, **config):
    """A keras-hub backbone (and task around it) from its config, seeded weights.

    Args:
        backbone_cls: name in `keras_hub.models`, e.g. "GPT2Backbone".
        task_cls: e.g. "GPT2CausalLM" (built with no preprocessor), or None
            for the bare backbone.
        seed: the weight seed (must be the same on every rank).
        **config: the backbone's constructor arguments.

    Returns:
        The model.
    """
    import keras_hub

    keras.utils.set_random_seed(seed)
    backbone = getattr(keras_hub.models, backbone_cls)(**config)
    if task_cls is None:
        return backbone
    return getattr(keras_hub.models, task_cls)(backbone=backbone, preprocessor=None)
