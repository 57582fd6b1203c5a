"""The KV cache cut by heads: a sharded keras-hub CausalLM's cache of this rank's K/V heads.

keras-hub CausalLMs keep one cache tensor `[batch, layers, 2, length, K/V
heads, head_dim]` sized from the backbone's full head counts. Under tensor
parallelism a rank's attention layers project only its own K/V heads, so the
cache must hold only those: when a model is cut (`tfshard.convert`, and the
pipeline stages of `tfshard.pipeline.staged`), `install_cache` gives the task a
`_build_cache` sized for this rank's heads. Generation itself, at call time, is
`tfshard.generation`.
"""

from tfshard.layers.tracking import set_untracked


# keras-hub CausalLMs whose `_build_cache(token_ids)` allocates the canonical
# `[batch, num_layers, 2, max_length, kv_heads, head_dim]` cache and seeds it
# with `call_with_cache(token_ids, cache, 0)` (read in keras-hub 0.32).
CANONICAL_CACHE = frozenset({
    "GPT2CausalLM", "GPTNeoXCausalLM", "OPTCausalLM", "BloomCausalLM", "FalconCausalLM",
    "LlamaCausalLM", "MistralCausalLM", "MixtralCausalLM", "Phi3CausalLM", "QwenCausalLM",
    "QwenMoeCausalLM", "Qwen3CausalLM", "Qwen3MoeCausalLM", "GemmaCausalLM", "GptOssCausalLM",
})


def _canonical_owner(model):
    """The keras-hub class in `CANONICAL_CACHE` whose `_build_cache` the model runs, or None."""
    build = getattr(type(model), "_build_cache", None)
    for cls in type(model).__mro__:
        if "_build_cache" in vars(cls):
            return cls.__name__ if cls.__name__ in CANONICAL_CACHE and \
                vars(cls)["_build_cache"] is build else None
    return None


def cache_heads(model, plan, rank):
    """This rank's `(K/V heads, head_dim)` in the KV cache, or None if unsharded.

    Args:
        model: the keras-hub CausalLM (sharded in place).
        plan: its `ResolvedPlan`.
        rank: the rank in the tensor-parallel group.

    Returns:
        `(kv_heads, head_dim)` when the plan cuts attention heads, else None.

    Raises:
        ValueError: some attention layers are cut and others not, or cut
            differently (one cache tensor serves every layer), or their number
            is not the backbone's layer count.
    """
    counts = plan.attention
    if not counts:
        return None
    backbone = getattr(model, "backbone", model)
    layers = getattr(backbone, "num_layers", None)
    local = {(c.local(rank)[1], c.head_dim) for c in counts}
    if len(local) != 1 or (layers is not None and len(counts) != layers):
        raise ValueError(
            f"{type(model).__name__} (rank {rank}): keras-hub keeps one KV cache tensor for all "
            f"{layers} layers, but the plan cuts {len(counts)} attention layer(s) into "
            f"{sorted(local)} (K/V heads, head_dim) on this rank. Cut every attention layer "
            "alike (the auto plan does) or replicate them all."
        )
    return local.pop()


def install_cache(model, plan, rank):
    """Makes a sharded keras-hub CausalLM build a KV cache of this rank's heads.

    A no-op for models without `_build_cache`/`call_with_cache` or whose
    attention is not cut. For a CausalLM whose cache layout tfshard does not
    know, `_build_cache` raises a clear NotImplementedError instead of a shape
    error deep inside attention.

    Args:
        model: the task, already sharded in place by `shard()`.
        plan: its `ResolvedPlan`.
        rank: the rank in the tensor-parallel group.
    """
    if not (hasattr(model, "_build_cache") and hasattr(model, "call_with_cache")):
        return
    try:
        heads = cache_heads(model, plan, rank)
    except ValueError as e:
        message = str(e)

        def _build_cache(*args, **kwargs):
            raise ValueError(message)
    else:
        if heads is None:
            return
        kv_heads, head_dim = heads
        name = type(model).__name__
        if _canonical_owner(model) is None:
            def _build_cache(*args, **kwargs):
                raise NotImplementedError(
                    f"{name}.generate with attention cut across ranks: tfshard knows the KV "
                    f"cache layout of {', '.join(sorted(CANONICAL_CACHE))}, not of {name}. "
                    "Replicate the attention layers (plan rules) or use one rank."
                )
        else:
            from keras import ops

            def _build_cache(token_ids):
                batch_size, max_length = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
                shape = [batch_size, model.backbone.num_layers, 2, max_length, kv_heads, head_dim]
                cache = ops.zeros(shape, dtype=model.compute_dtype)
                _, hidden_states, cache = model.call_with_cache(token_ids, cache, 0)
                return hidden_states, cache

    # An instance attribute shadows the class method; Keras must not track it.
    set_untracked(model, _build_cache=_build_cache)
