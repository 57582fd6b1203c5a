"""GGUF (llama.cpp) files of the Llama architecture as keras-hub `LlamaCausalLM`.

The tensors stay memory-mapped (`gguf.GGUFReader`); each Keras variable gets a
lazy `MappedView` of its GGUF tensor, so a rank dequantises only the rows
(and quantisation blocks) of its own slice. The mapping, as llama.cpp's
convert_hf_to_gguf.py writes it: q/k rows are put back from llama.cpp's RoPE order
(`unpermute`), kernels are transposed and split into heads; norms copy.
"""

import gc
import os

import numpy as np

from tfshard.io import views as lazy


class GGUFError(ValueError):
    """A GGUF file that cannot be read or is not a Llama model."""


class GGUFFile:
    """What tfshard needs of a GGUF file: metadata and tensor locations.

    `gguf.GGUFReader` turns every metadata array (49k tokens, 49k merges)
    into small numpy objects -- about 160 MiB for SmolLM2 -- so the reader is
    dropped after this copy is taken; tensors are read later by offset.

    Attributes:
        path: the file.
        meta: `{key: value}` of every metadata field.
        tensors: `{name: gguf.ReaderTensor-like}` with `tensor_type`,
            `shape` (GGUF order), `n_bytes`, `data_offset`.
    """

    def __init__(self, path, reader):
        self.path = path
        self.tfshard_path = path
        self.meta = {k: f.contents() for k, f in reader.fields.items()}
        self.tensors = {t.name: _TensorInfo(t) for t in reader.tensors}


class _TensorInfo:
    def __init__(self, t):
        self.name, self.tensor_type = t.name, t.tensor_type
        self.shape = np.array(t.shape)
        self.n_bytes, self.data_offset = int(t.n_bytes), int(t.data_offset)


def open_gguf(path):
    """Reads a GGUF file's metadata and tensor table and checks it is a Llama model.

    Returns:
        A `GGUFFile`.

    Raises:
        GGUFError: unreadable, truncated, or another architecture.
    """
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        info = GGUFFile(path, reader)
    except Exception as e:
        raise GGUFError(f"{path}: not a readable GGUF file (truncated or corrupt?): "
                        f"{type(e).__name__}: {e}") from e
    del reader
    gc.collect()
    end = max((t.data_offset + t.n_bytes for t in info.tensors.values()), default=0)
    if end > os.path.getsize(path):
        raise GGUFError(f"{path}: tensors end at byte {end}, the file has "
                        f"{os.path.getsize(path)} (truncated or corrupt?).")
    arch = field(info, "general.architecture")
    if arch != "llama":
        raise GGUFError(f"{path}: architecture {arch!r}; tfshard maps GGUF files of the "
                        "'llama' architecture (Llama, SmolLM, Mistral-style).")
    return info


def field(info, key, default=None):
    """A metadata value of the GGUF file (`default` when absent)."""
    value = info.meta.get(key)
    return default if value is None else value


def _tensors(info):
    return info.tensors


def config(gguf_file):
    """The `LlamaBackbone` arguments from the GGUF metadata."""
    def need(key):
        value = field(gguf_file, key)
        if value is None:
            raise GGUFError(f"{gguf_file.tfshard_path}: metadata {key!r} is missing.")
        return value

    tensors = _tensors(gguf_file)
    vocab = field(gguf_file, "llama.vocab_size") or len(need("tokenizer.ggml.tokens"))
    return dict(
        vocabulary_size=int(vocab),
        num_layers=int(need("llama.block_count")),
        num_query_heads=int(need("llama.attention.head_count")),
        num_key_value_heads=int(field(gguf_file, "llama.attention.head_count_kv")
                                or need("llama.attention.head_count")),
        hidden_dim=int(need("llama.embedding_length")),
        intermediate_dim=int(need("llama.feed_forward_length")),
        rope_max_wavelength=float(field(gguf_file, "llama.rope.freq_base", 10000.0)),
        layer_norm_epsilon=float(field(gguf_file, "llama.attention.layer_norm_rms_epsilon", 1e-6)),
        tie_word_embeddings="output.weight" not in tensors,
    )


def build_causal_lm(gguf_file):
    """A `LlamaCausalLM` (no preprocessor) with the file's configuration.

    Its weights are whatever the variables' initialisers give; call it inside
    `tfshard.io.deferred_variables()` to give them no memory.
    """
    import keras_hub

    backbone = keras_hub.models.LlamaBackbone(**config(gguf_file))
    return keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)


def unpermute(w, heads):
    """Undoes llama.cpp's per-head RoPE row order of a q/k weight `[heads*head_dim, in]`."""
    return np.reshape(np.swapaxes(np.reshape(w, (heads, w.shape[0] // heads // 2, 2, w.shape[1])),
                                  1, 2), w.shape)


def views(gguf_file, model, path=""):
    """Lazy views of the file's tensors, keyed by the model's variable paths.

    Args:
        gguf_file: from `open_gguf`.
        model: the `LlamaCausalLM` (or `LlamaBackbone`) from `build_causal_lm`,
            not yet sharded (full shapes).
        path: the file path, for messages.

    Returns:
        `{variable path: MappedView}`.

    Raises:
        GGUFError: a tensor the model needs is missing.
    """
    backbone = getattr(model, "backbone", model)
    tensors = _tensors(gguf_file)
    cfg = config(gguf_file)
    hidden, n_q, n_kv = cfg["hidden_dim"], cfg["num_query_heads"], cfg["num_key_value_heads"]
    head_dim = hidden // n_q
    out = {}

    def add(variable, name, transform=lambda w: w):
        if name not in tensors:
            raise GGUFError(f"{path}: tensor {name!r} (for {variable.path!r}) is missing.")
        out[variable.path] = lazy.MappedView(lazy.GGUFView(tensors[name], gguf_file.tfshard_path, source=path),
                                                transform, name=variable.path)

    embedding = backbone.token_embedding
    add(embedding.embeddings, "token_embd.weight")
    if not cfg["tie_word_embeddings"]:
        add(embedding.reverse_embeddings, "output.weight", np.transpose)
    for i, layer in enumerate(backbone.transformer_layers):
        att = layer._self_attention_layer
        blk = f"blk.{i}."
        add(layer._self_attention_layernorm.scale, blk + "attn_norm.weight")
        add(layer._feedforward_layernorm.scale, blk + "ffn_norm.weight")
        add(att._query_dense.kernel, blk + "attn_q.weight",
            lambda w: np.reshape(np.transpose(unpermute(w, n_q)), (hidden, n_q, head_dim)))
        add(att._key_dense.kernel, blk + "attn_k.weight",
            lambda w: np.reshape(np.transpose(unpermute(w, n_kv)), (hidden, n_kv, head_dim)))
        add(att._value_dense.kernel, blk + "attn_v.weight",
            lambda w: np.reshape(np.transpose(w), (hidden, n_kv, head_dim)))
        add(att._output_dense.kernel, blk + "attn_output.weight",
            lambda w: np.reshape(np.transpose(w), (n_q, head_dim, hidden)))
        add(layer._feedforward_gate_dense.kernel, blk + "ffn_gate.weight", np.transpose)
        add(layer._feedforward_intermediate_dense.kernel, blk + "ffn_up.weight", np.transpose)
        add(layer._feedforward_output_dense.kernel, blk + "ffn_down.weight", np.transpose)
    add(backbone.layer_norm.scale, "output_norm.weight")
    return out


def tokenizer(gguf_file):
    """The byte-level BPE tokenizer stored in the GGUF metadata.

    Returns:
        A `keras_hub.tokenizers.BytePairTokenizer` with the file's vocabulary
        and merges; control tokens (`<|im_start|>`, ...) are kept whole.

    Raises:
        GGUFError: the file holds another tokenizer model.
    """
    import keras_hub

    model = field(gguf_file, "tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFError(f"{gguf_file.tfshard_path}: tokenizer model {model!r}; tfshard builds "
                        "byte-level BPE ('gpt2') tokenizers.")
    tokens = field(gguf_file, "tokenizer.ggml.tokens")
    merges = field(gguf_file, "tokenizer.ggml.merges")
    types = field(gguf_file, "tokenizer.ggml.token_type") or [1] * len(tokens)
    special = [t for t, kind in zip(tokens, types) if kind == 3]
    tok = keras_hub.tokenizers.BytePairTokenizer(
        vocabulary={t: i for i, t in enumerate(tokens)}, merges=list(merges),
        unsplittable_tokens=special)
    # keras-hub's packer and generate() read these (start/end/pad token + id).
    # generate() prepends the start token whenever there is one, so there is
    # none unless the file asks for it; and it stops as soon as a stop token
    # appears past the prompt, so padding must not be the end token (SmolLM2
    # pads with it): then the unknown token or id 0 pads instead.
    eos = field(gguf_file, "tokenizer.ggml.eos_token_id")
    if field(gguf_file, "tokenizer.ggml.add_bos_token"):
        tok._add_special_token(tokens[int(field(gguf_file, "tokenizer.ggml.bos_token_id"))],
                               "start_token")
    else:
        tok.start_token, tok.start_token_id = None, None
    if eos is None:
        raise GGUFError(f"{gguf_file.tfshard_path}: no tokenizer.ggml.eos_token_id; generation "
                        "needs an end token.")
    tok._add_special_token(tokens[int(eos)], "end_token")
    pad = next(int(i) for i in (field(gguf_file, "tokenizer.ggml.padding_token_id"),
                                field(gguf_file, "tokenizer.ggml.unknown_token_id"), 0, 1)
               if i is not None and int(i) != int(eos))
    tok._add_special_token(tokens[pad], "pad_token")
    return tok


def preprocessor(gguf_file, sequence_length=1024):
    """A keras-hub `CausalLMPreprocessor` around the file's tokenizer.

    It adds the start token only when the file says to
    (`tokenizer.ggml.add_bos_token`), never an end token: prompts tokenize as
    llama.cpp tokenizes them. See `tokenizer` for the padding token.

    Args:
        gguf_file: from `open_gguf`.
        sequence_length: the default length `generate()` runs up to (capped
            by the model's context length).

    Returns:
        The preprocessor (its `tokenizer` is `tokenizer(gguf_file)`).
    """
    import keras_hub

    context = field(gguf_file, "llama.context_length")
    if context:
        sequence_length = min(sequence_length, int(context))
    tok = tokenizer(gguf_file)
    return keras_hub.models.CausalLMPreprocessor(
        tokenizer=tok, sequence_length=sequence_length,
        add_start_token=tok.start_token_id is not None, add_end_token=False)
