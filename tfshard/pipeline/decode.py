"""Generation through pipeline stages: each stage caches the K/V of its own layers.

keras-hub's CausalLMs decode with `call_with_cache(token_ids, cache, index)`,
which embeds the tokens, runs `backbone.transformer_layers[i]` with
`cache[:, i]`, then the final norm and the LM head. `install` gives the
(sharded, released) task a `call_with_cache` that runs keras-hub's own method
on a view of the backbone holding only this stage's transformer layers:

- the cache has one slot per layer of the stage (`_build_cache` sizes it so),
  so no rank holds another stage's keys and values;
- the first own layer takes the previous stage's activation (received) in
  place of the embeddings, the last sends its output to the next stage;
- layers of other stages that keras-hub's method calls around the loop (the
  embeddings before it, the norm and head after) are stand-ins returning zeros
  of the right shape, so the code path stays keras-hub's;
- the last stage's logits go to every rank, whose samplers then pick the same
  token: keras-hub's loop runs unchanged on every rank, in lock step.
"""

import tensorflow as tf
from keras import ops

from tfshard.layers.base import even_ranges
from tfshard.layers.released import is_released
from tfshard.layers.tracking import set_untracked

#: keras-hub CausalLMs whose `call_with_cache` has the shape described above (read in
#: keras-hub 0.32).
PIPELINED_CAUSAL_LMS = frozenset({
    "GPT2CausalLM", "LlamaCausalLM", "MistralCausalLM", "GemmaCausalLM", "Qwen3CausalLM",
    "QwenCausalLM", "Phi3CausalLM",
})


def _owner(model):
    """The class whose `call_with_cache` the model runs."""
    method = getattr(type(model), "call_with_cache", None)
    return next((cls for cls in type(model).__mro__ if vars(cls).get("call_with_cache") is method),
                None)


class _Zeros:
    """A stand-in for a layer of another stage: zeros shaped like its first input."""

    def __init__(self, name):
        self.name = name

    def __call__(self, *args, **kwargs):
        from keras import tree

        first = tree.flatten(args)[0]
        return ops.zeros_like(first)


class _Embedding:
    """The token embedding as a stage sees it: the lookup on the first stage, the LM
    head (`reverse=True`) on the last; zeros of the right shape otherwise."""

    def __init__(self, layer, lookup, head, compute_dtype):
        self.layer, self.lookup, self.head, self.dtype = layer, lookup, head, compute_dtype

    def __call__(self, x, reverse=False):
        if (reverse and self.head) or (not reverse and self.lookup):
            return self.layer(x, reverse=reverse) if reverse else self.layer(x)
        shape = ops.shape(x)
        if reverse:
            return ops.zeros((shape[0], shape[1], self.layer.input_dim), self.dtype)
        return ops.zeros((shape[0], shape[1], self.layer.output_dim), self.dtype)


class _Receiving:
    """The stage's first transformer layer: its input is the previous stage's output.

    `gate` holds the step's inputs (token ids, cache): the receive waits for them.
    """

    def __init__(self, layer, links, receive, send):
        self.layer, self.links, self.receive, self.send = layer, links, receive, send
        self.gate = []

    def __call__(self, x, *args, **kwargs):
        if self.receive:
            x = self.links.recv_prev(x, after=list(self.gate) + list(self.links.issued or []))
        out = self.layer(x, *args, **kwargs)
        if self.send:
            y = out[0] if isinstance(out, tuple) else out
            self.links.send_next(y, after=list(self.links.issued or []))
        return out


class _Backbone:
    """The backbone as one stage's `call_with_cache` sees it."""

    def __init__(self, backbone, layers, links, compute_dtype):
        self._backbone = backbone
        self.num_layers = len(layers)
        wrapped = list(layers)
        wrapped[0] = _Receiving(wrapped[0], links, not links.first, False)
        last = wrapped[-1]
        if isinstance(last, _Receiving):
            last.send = not links.last
        else:
            wrapped[-1] = _Receiving(last, links, False, not links.last)
        self.transformer_layers = wrapped
        self.token_embedding = _Embedding(backbone.token_embedding, links.first, links.last,
                                          compute_dtype)

    def __getattr__(self, name):
        value = getattr(self._backbone, name)
        if is_released(value):
            return _Zeros(name)
        return value


class _Task:
    """The task as its class's `call_with_cache` sees it: the backbone view above."""

    def __init__(self, task, backbone):
        self._task, self.backbone = task, backbone

    def __getattr__(self, name):
        return getattr(self._task, name)


def install(task, stage_layers, links, kv_heads=None, head_dim=None):
    """Makes a pipelined keras-hub CausalLM decode stage by stage (see the module docstring).

    Args:
        task: the CausalLM (its other stages' layers released on this rank).
        stage_layers: this stage's transformer layers, in order.
        links: the rank's `tfshard.pipeline.gpipe.Transfers`.
        kv_heads: the K/V heads this rank's cache holds (None: the backbone's).
        head_dim: the head size (None: the backbone's).

    A decode step of several prompts can go through in `links.decode_micro_batches`
    micro-batches, so stage s decodes one while stage s + 1 decodes the one before.
    The default is 1: on a CPU a decode step reads every weight of the stage once
    per call whatever its rows, so m micro-batches read them m times; SmolLM2 at
    PP=2 with 4 prompts took 66 ms a step whole, 110 ms in 2 micro-batches, 183 ms
    in 4.

    Returns:
        None, or the reason this task cannot generate through stages (its
        `generate` then raises it).
    """
    owner = _owner(task)
    name = owner.__name__ if owner is not None else None
    if name not in PIPELINED_CAUSAL_LMS:
        return (f"{type(task).__name__}.generate through pipeline stages: tfshard runs "
                f"keras-hub's decode loop stage by stage for {', '.join(sorted(PIPELINED_CAUSAL_LMS))}"
                f"; not for {type(task).__name__} ({name}). Use tensor_parallel alone for it.")
    backbone = task.backbone
    if not stage_layers:
        return "this stage holds no transformer layer"
    original = vars(owner)["call_with_cache"]
    dtype = task.compute_dtype
    view = _Task(task, _Backbone(backbone, stage_layers, links, dtype))
    kv = kv_heads or getattr(backbone, "num_key_value_heads", None) or backbone.num_heads
    dim = head_dim or getattr(backbone, "head_dim", None) or backbone.hidden_dim // getattr(
        backbone, "num_query_heads", getattr(backbone, "num_heads", 1))

    first = view.backbone.transformer_layers[0]

    def call_with_cache(token_ids, cache, cache_update_index, share_logits=True):
        # A step's transfers must run in order, and after the previous step's: TensorFlow
        # orders ops by data only (the prompt's send and the decode loop's first one
        # were seen swapped, which MPI then matched to the wrong receives). So each
        # receive waits for the step's inputs and the transfers before it, and the
        # cache the step returns (the loop's carried state) waits for all of them.
        # A decode step of several prompts goes through in micro-batches, GPipe's fill
        # and drain: every stage hands micro-batch j on, then takes j + 1; the last
        # stage's logits go back once all have passed (no transfer waits on a later one).
        rows, parts = token_ids.shape[0], links.decode_micro_batches
        m = min(parts, rows) if share_logits and rows is not None and token_ids.shape[1] == 1 \
            else 1
        links.issued = []
        try:
            outs = []
            for start, stop in even_ranges(rows if m > 1 else 1, m):
                ids, past = (token_ids, cache) if m == 1 else (token_ids[start:stop],
                                                               cache[start:stop])
                first.gate = [ids, past]
                outs.append(original(view, ids, past, cache_update_index))
            logits, hidden_states, cache = (outs[0] if m == 1 else
                                            [ops.concatenate(list(t), axis=0) for t in zip(*outs)])
            if share_logits:
                parts_logits = [o[0] for o in outs]
                shared = links.share_from_last(parts_logits, parts_logits,
                                               after=[cache] + links.issued)
                logits = shared[0] if m == 1 else ops.concatenate(shared, axis=0)
            if links.issued and not tf.executing_eagerly():
                with tf.control_dependencies(links.issued):
                    cache, logits = tf.identity(cache), tf.identity(logits)
        finally:
            links.issued = None
        return logits, hidden_states, cache

    def _build_cache(token_ids):
        batch_size, max_length = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
        shape = [batch_size, len(stage_layers), 2, max_length, kv, dim]
        cache = ops.zeros(shape, dtype=dtype)
        # The prompt's logits are not used: not sending them also leaves no receive
        # that nothing waits for, which the decode loop's first receive could overtake.
        _, hidden_states, cache = call_with_cache(token_ids, cache, 0, share_logits=False)
        return hidden_states, cache

    # Instance attributes shadow the class's methods; Keras must not track them.
    set_untracked(task, call_with_cache=call_with_cache, _build_cache=_build_cache)
    return None
