"""keras-hub's `generate_step` on the decode step: the same loop and samplers, fused blocks.

`FusedGenerate` replaces a CausalLM's `generate_function` (keras-hub's compiled
`generate_step`). It keeps keras-hub's contract and its sampler loop -- every row steps
from the shortest prompt's end, a longer prompt's own tokens are kept where it has them,
the loop stops when every row has produced a stop token -- and changes how a step is
computed: the prompts' first tokens are written to a KV cache of tfshard's in one pass
(`DecodeStep` with every prompt token a row), then each step is the decode step for one
row per sequence. Greedy tokens equal keras-hub's (the same math in another order of
summation); samplers that keep their own view of the cache (beam, contrastive) keep
keras-hub's loop.
"""

import os

import tensorflow as tf
from keras import ops

from tfshard.decode.params import Unsupported
from tfshard.decode.step import DecodeStep

#: keras-hub samplers that treat the cache as opaque (the decode step owns it).
SAMPLERS = ("GreedySampler", "TopKSampler", "TopPSampler", "RandomSampler")

#: TFSHARD_DECODE: "auto" (the decode step where it applies, else keras-hub's loop),
#: "keras" (always keras-hub's loop), "fused" (the decode step, or an error saying why not).
ENV = "TFSHARD_DECODE"


def mode():
    """The decode mode TFSHARD_DECODE asks for ("auto", "keras" or "fused").

    Raises:
        ValueError: another value.
    """
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "keras", "fused"):
        raise ValueError(f"{ENV}={value!r}: use auto, keras or fused")
    return value


def check_sampler(sampler):
    """Raises `Unsupported` for a sampler that reorders or reads the cache itself."""
    name = type(sampler).__name__
    if not any(cls.__name__ in SAMPLERS for cls in type(sampler).__mro__):
        raise Unsupported(f"the {name} keeps its own view of the KV cache; the decode step "
                          f"runs {', '.join(SAMPLERS)}")


class FusedGenerate:
    """A CausalLM's `generate_function` computed by a `DecodeStep`.

    Args:
        model: the keras-hub CausalLM (sharded in place, or not).
        step: its `DecodeStep`.
    """

    def __init__(self, model, step):
        self.model, self.step = model, step
        self.cache = None
        self._function = tf.function(self._generate, jit_compile=False, reduce_retracing=True)
        self._tfshard = True  # generation.py's mark: a generate function of tfshard's

    def __call__(self, inputs, stop_token_ids=None):
        token_ids = tf.convert_to_tensor(inputs["token_ids"])
        mask = tf.convert_to_tensor(inputs["padding_mask"])
        rows, length = int(token_ids.shape[0]), int(token_ids.shape[1])
        if self.cache is None or self.cache.slots < rows or self.cache.length < length:
            if self.cache is not None:
                self.cache.close()
            self.cache = self.step.new_cache(rows, length)
        stop = None if stop_token_ids is None else tuple(int(t) for t in stop_token_ids)
        return self._function(token_ids, mask, self.cache.handle, self.cache.rope.handle, stop)

    def _generate(self, token_ids, padding_mask, cache, rope, stop_token_ids):
        step, model = self.step, self.model
        ids = tf.cast(token_ids, tf.int32)
        batch = tf.shape(ids)[0]
        row_lengths = tf.reduce_sum(tf.cast(padding_mask, tf.int32), axis=-1)
        index = tf.reduce_min(row_lengths)
        # Every row's tokens before the shortest prompt's last one, in one pass.
        before = index - 1
        step.logits(cache, rope, tf.reshape(ids[:, :before], [-1]),
                    tf.repeat(tf.range(batch), before), tf.tile(tf.range(before), [batch]),
                    rows=None)

        def next(prompt, carry, index):
            position = index - 1
            tokens = tf.cast(prompt[:, position], tf.int32)
            logits = step.logits(cache, rope, tokens, tf.range(batch),
                                 tf.fill([batch], position), tf.range(batch))
            return logits, None, carry

        token_ids = model.sampler(next=next, prompt=token_ids, cache=tf.zeros([]), index=index,
                                  mask=padding_mask, stop_token_ids=stop_token_ids,
                                  hidden_states=None, model=model)
        return {"token_ids": token_ids,
                "padding_mask": output_mask(token_ids, padding_mask, stop_token_ids)}


def output_mask(token_ids, padding_mask, stop_token_ids):
    """keras-hub's output padding mask: every token, or those up to each row's first new
    stop token."""
    if stop_token_ids is None:
        return ops.ones_like(token_ids, dtype="bool")
    from keras_hub.src.utils.tensor_utils import any_equal

    end_locations = ops.cast(any_equal(token_ids, stop_token_ids,
                                       ops.logical_not(padding_mask)), "int32")
    overflow = ops.cast(ops.cumsum(end_locations, axis=-1), "int32") - end_locations
    return ops.logical_not(ops.cast(overflow, "bool"))


def fused_generate(model, comm):
    """A `FusedGenerate` for `model`, or the reason the decode step cannot run it.

    Args:
        model: the keras-hub CausalLM (its sampler set).
        comm: the rank's tensor-parallel communicator.

    Returns:
        `(FusedGenerate or None, reason or None)`.
    """
    try:
        check_sampler(model.sampler)
        return FusedGenerate(model, DecodeStep(model, comm)), None
    except Unsupported as why:
        return None, str(why)
