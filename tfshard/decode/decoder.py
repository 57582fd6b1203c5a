"""What a keras-hub decoder computes per block, read from the (sharded) model for the decode ops.

`read(model)` turns a keras-hub CausalLM of the Llama family (Llama, Llama 3, Mistral
within its sliding window, Qwen; SmolLM2 is a Llama) into a `Decoder`: per block the
norms, the q/k/v/o projections with this rank's heads, the gated MLP, and how each output
is cut across ranks; the token embedding (this rank's vocabulary slice), the final norm
and the logits weight. Anything else raises `Unsupported`, and generation keeps
keras-hub's own loop.
"""

import dataclasses

import keras

from tfshard.decode.params import (Param, Unsupported, handle, logical_shape, projection,
                                   row_bias, table)

#: keras-hub CausalLMs whose blocks `read` knows (same layer attributes and math).
FAMILIES = ("LlamaCausalLM", "Llama3CausalLM", "MistralCausalLM", "QwenCausalLM")


@dataclasses.dataclass
class Block:
    """One transformer block's op arguments."""
    attention_norm: list
    q: Param
    k: Param
    v: Param
    o: Param
    o_bias: object
    heads: int
    kv_heads: int
    head_dim: int
    score_scale: float
    mlp_norm: list
    gate: Param
    up: Param
    down: Param
    down_bias: object
    rotary: object  # the keras-hub rotary embedding layer


@dataclasses.dataclass
class Decoder:
    """A decoder's op arguments and shapes.

    Attributes:
        name: the model's class name.
        hidden: the hidden width.
        vocabulary: the full vocabulary size.
        embed: the token table (`nk`, this rank's rows), with `vocab_start` its first id.
        vocab_sizes: every rank's vocabulary slice (None when not cut).
        blocks: the `Block`s.
        final_norm: the final norm's handles.
        head: the logits weight.
        norm_kind, eps: the norms' kind ("rms") and epsilon.
        rounding: "float32" or "bfloat16" (the compute dtype the ops round to).
        kv_heads, head_dim: this rank's K/V heads and their width (every block alike).
        window: the attention's sliding window (positions), or None.
    """
    name: str
    hidden: int
    vocabulary: int
    embed: Param
    vocab_start: int
    vocab_sizes: tuple
    blocks: list
    final_norm: list
    head: Param
    norm_kind: str
    eps: float
    rounding: str
    kv_heads: int
    head_dim: int
    window: object


def _family(model):
    for cls in type(model).__mro__:
        if cls.__name__ in FAMILIES:
            return cls.__name__
    return None


def _rms(norm, where):
    if type(norm).__name__ not in ("LlamaLayerNorm", "MistralLayerNormalization", "QwenLayerNorm"):
        raise Unsupported(f"{where}: norm {type(norm).__name__} is not an RMS norm the ops know")
    return [handle(norm.scale)], float(norm.epsilon)


def _cut_pair(first, last, where):
    """The column -> row pattern of a block half: all cut, or none."""
    cuts = [p.column_cut for p in first] + [last.row_cut]
    if any(cuts) and not all(cuts):
        raise Unsupported(f"{where}: its projections are cut unlike a Megatron pair "
                          f"({', '.join(p.name for p in first + [last])})")


def _block(layer, index):
    where = f"{layer.path!r} (block {index})"
    att = layer._self_attention_layer  # dropout, if any, is inactive at inference
    if getattr(att, "use_sliding_window_attention", False):
        raise Unsupported(f"{where}: sliding-window attention")
    attention_norm, eps = _rms(layer._self_attention_layernorm, where)
    mlp_norm, eps2 = _rms(layer._feedforward_layernorm, where)
    if eps2 != eps:
        raise Unsupported(f"{where}: its two norms have different epsilons")
    q, k, v = (projection(d) for d in (att._query_dense, att._key_dense, att._value_dense))
    o = projection(att._output_dense)
    _cut_pair([q, k, v], o, where)
    act = getattr(layer, "activation", None)
    if act is not keras.activations.silu and getattr(act, "__name__", "") != "silu":
        raise Unsupported(f"{where}: MLP activation {getattr(act, '__name__', act)}")
    gate = projection(layer._feedforward_gate_dense)
    up = projection(layer._feedforward_intermediate_dense)
    down = projection(layer._feedforward_output_dense)
    _cut_pair([gate, up], down, where)
    q_shape, kv_shape = _heads(att._query_dense), _heads(att._key_dense)
    heads, head_dim = q_shape
    kv_heads, kv_dim = kv_shape
    if kv_dim != head_dim or heads % kv_heads:
        raise Unsupported(f"{where}: {heads} query heads of {head_dim} and {kv_heads} K/V "
                          f"heads of {kv_dim}")
    rotary = getattr(att, "rotary_embedding_layer", None)
    if rotary is None:
        raise Unsupported(f"{where}: no rotary embedding layer")
    return Block(attention_norm, q, k, v, o, row_bias(att._output_dense), heads, kv_heads,
                 head_dim, float(att._inv_norm_factor), mlp_norm, gate, up, down,
                 row_bias(layer._feedforward_output_dense), rotary), eps


def _heads(dense):
    """(heads, head_dim) of a q/k/v EinsumDense "...m,muh->...uh", this rank's."""
    shape = logical_shape(dense)
    if len(shape) != 3:
        raise Unsupported(f"{dense.path!r}: kernel {tuple(shape)} is not [hidden, heads, head_dim]")
    return int(shape[1]), int(shape[2])


def read(model):
    """The `Decoder` of a keras-hub CausalLM (sharded in place, or not).

    Args:
        model: the CausalLM.

    Returns:
        The `Decoder`.

    Raises:
        Unsupported: the model is not of a family in `FAMILIES`, or has a part the decode
            ops do not compute (the message names it).
    """
    family = _family(model)
    if family is None:
        raise Unsupported(f"{type(model).__name__} is not one of {', '.join(FAMILIES)}")
    backbone = model.backbone
    policy = keras.backend.standardize_dtype(model.compute_dtype)
    if policy not in ("float32", "bfloat16"):
        raise Unsupported(f"compute dtype {policy}")
    blocks, eps = [], None
    for i, layer in enumerate(backbone.transformer_layers):
        block, block_eps = _block(layer, i)
        if eps is not None and block_eps != eps:
            raise Unsupported(f"block {i}: epsilon {block_eps} differs from block 0's {eps}")
        eps = block_eps
        blocks.append(block)
    if not blocks:
        raise Unsupported("no transformer blocks")
    if len({(b.kv_heads, b.head_dim) for b in blocks}) != 1:
        raise Unsupported("blocks hold different K/V heads (one cache serves every block)")
    final_norm, final_eps = _rms(backbone.layer_norm, f"{backbone.layer_norm.path!r}")
    embedding = backbone.token_embedding
    embed = table(embedding)
    head = table(embedding, reverse=True)
    spec = getattr(embedding, "shard_spec", None)
    cut = spec is not None and spec.is_cut
    window = getattr(backbone.transformer_layers[0]._self_attention_layer, "_sliding_window", None)
    if final_eps != eps:
        raise Unsupported(f"the final norm's epsilon {final_eps} differs from the blocks' {eps}")
    return Decoder(
        name=type(model).__name__, hidden=int(backbone.hidden_dim),
        vocabulary=int(backbone.vocabulary_size), embed=embed,
        vocab_start=int(embedding.shard_range[0]) if cut else 0,
        vocab_sizes=tuple(int(n) for n in spec.sizes) if cut else None, blocks=blocks,
        final_norm=final_norm, head=head, norm_kind="rms", eps=eps, rounding=policy,
        kv_heads=blocks[0].kv_heads, head_dim=blocks[0].head_dim, window=window)
