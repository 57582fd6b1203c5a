"""Sharded generation: keras-hub `CausalLM.generate` on every rank in lock step.

The KV cache holds only this rank's K/V heads (`tfshard.kv_cache`, installed
when the model is cut). Everything else is keras-hub's own generation loop,
run on every rank of a tensor-parallel group in lock step: every rank sees the
same gathered logits, so every rank picks the same token and stops on the same
step. Random samplers draw from a seed state that `generate` makes equal on all
ranks first.

With several data-parallel groups, the prompts are shared among the groups
(contiguous rows) and the continuations gathered back in input order.
"""

import numpy as np
import tensorflow as tf

from tfshard import consistency
from tfshard import decode
from tfshard import inputs as inputs_lib
from tfshard.comm.strategies import out_of_line
from tfshard.layers.base import even_ranges
from tfshard.layers.tracking import set_untracked


def _generate_function(sharded):
    """keras-hub's compiled generate step, without XLA (Horovod ops do not run under XLA).

    Under a tf.distribute strategy the step runs through `strategy.run`: each
    local replica runs its own model's `generate_step` (its K/V heads, its
    cache) in lock step with the others, and replica 0's tokens are returned
    (every replica picks the same ones from the same gathered logits).
    """
    model = sharded.inner
    fn = getattr(model, "generate_function", None)
    if fn is not None and getattr(fn, "_tfshard", False):
        return fn
    strategy = sharded.strategy
    if strategy is None:
        fn = _fused(sharded) or tf.function(model.generate_step, jit_compile=False)
    else:
        # Each replica's step is a function of its own, out of line: its decode loop then
        # runs in a frame named alike on every replica, where the collectives inside
        # the loop find each other.
        steps = {id(r.model): out_of_line(r.model.generate_step)
                 for r in sharded.replicas}

        def replica_step(inputs, stop_token_ids):
            return steps[id(sharded.replica_model())](inputs, stop_token_ids=stop_token_ids)

        def step(inputs, stop_token_ids=None):
            out = strategy.run(replica_step, args=(inputs, stop_token_ids))
            return tf.nest.map_structure(lambda v: strategy.experimental_local_results(v)[0],
                                         out)

        fn = tf.function(step, jit_compile=False)
    fn._tfshard = True
    model.generate_function = fn
    return fn


def _fused(sharded):
    """tfshard's decode step as the model's generate function (`tfshard.decode`), or None
    when keras-hub's loop runs instead (TFSHARD_DECODE=keras, or the step does not apply:
    `sharded.decode_path` says why).

    Raises:
        ValueError: TFSHARD_DECODE=fused and the step does not apply (the reason named).
    """
    wanted = decode.mode()
    why = "TFSHARD_DECODE=keras" if wanted == "keras" else sharded.decode_step_refusal()
    fn = None
    if why is None:
        fn, why = decode.fused_generate(sharded.inner, sharded.tp_comm)
    set_untracked(sharded, decode_path="fused" if fn is not None else f"keras-hub ({why})")
    if fn is None and wanted == "fused":
        raise ValueError(f"{sharded.call_site('generate')}: TFSHARD_DECODE=fused, but the decode "
                         f"step cannot run this model: {why}. Unset TFSHARD_DECODE (or set it "
                         "to auto) to run keras-hub's loop instead.")
    return fn


def sync_sampler(sampler, comm):
    """Sets every rank's sampler seed state to rank 0's, so random draws agree."""
    for v in getattr(sampler, "variables", []):
        state = comm.allgather_numpy(np.asarray(v.numpy()).astype(np.int64).reshape(-1))[0]
        v.assign(state.reshape(v.shape).astype(v.dtype))


def _share_sampler(sharded):
    """Gives every further local replica (MirroredStrategy) its own copy of replica 0's
    sampler, in the same seed state: each replica draws on its own device, and all
    draw the same tokens."""
    first = sharded.inner.sampler
    for replica in sharded.replicas[1:]:
        own = getattr(replica.model, "sampler", None)
        if own is None or own is first or type(own) is not type(first) or \
                own.get_config() != first.get_config():
            replica.model.compile(sampler=_sampler_copy(first))
            sharded.inner.generate_function = None  # its trace holds the replicas' samplers
        else:
            _copy_seed_state(own, first)


def _copy_seed_state(to, sampler):
    """Sets sampler `to`'s seed state (its variables) to `sampler`'s."""
    for mine, theirs in zip(getattr(to, "variables", []), getattr(sampler, "variables", [])):
        mine.assign(theirs.numpy())


def _sampler_copy(sampler):
    """A new sampler of `sampler`'s kind and config, in its seed state."""
    import keras

    own = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(sampler))
    _copy_seed_state(own, sampler)
    return own


_SAMPLER_NAMES = ("greedy", "top_k", "top_p", "random", "beam", "contrastive")


def _check_sampler(sampler, where):
    """Raises unless `sampler` is a keras-hub sampler or the name of one."""
    from keras_hub.samplers import Sampler, get as get_sampler

    if isinstance(sampler, Sampler):
        return
    resolved = None
    if isinstance(sampler, str):
        try:
            resolved = get_sampler(sampler)
        except Exception:  # noqa: BLE001 - named below
            resolved = None
    if not isinstance(resolved, Sampler):
        raise ValueError(
            f"{where}: sampler={sampler!r} is not a keras-hub sampler; pass one of "
            f"{list(_SAMPLER_NAMES)} or a keras_hub.samplers.Sampler instance "
            "(e.g. keras_hub.samplers.TopKSampler(k=5, seed=1)).")


def _same_sampler(model, sampler):
    """Whether `sampler` (a name or a keras-hub sampler) is the model's current one."""
    current = getattr(model, "sampler", None)
    if current is None:
        return False
    if isinstance(sampler, str):
        from keras_hub.samplers import get as get_sampler

        wanted = get_sampler(sampler)
        return type(wanted) is type(current) and wanted.get_config() == current.get_config()
    return sampler is current


def _rows(inputs):
    """`(rows, is_scalar, kind)` of generate inputs: strings or a dict of arrays."""
    if isinstance(inputs, (str, bytes)):
        return 1, True, "strings"
    if isinstance(inputs, tf.Tensor) and inputs.dtype == tf.string:
        return (1, True, "strings") if inputs.shape.rank == 0 else \
            (int(inputs.shape[0]), False, "strings")
    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(s, (str, bytes)) for s in inputs):
        return len(inputs), False, "strings"
    if isinstance(inputs, dict):
        first = np.asarray(next(iter(inputs.values())))
        return (first.shape[0] if first.ndim else 0), False, "ids"
    return None, False, None


def _take(inputs, kind, start, stop):
    if kind == "strings":
        if isinstance(inputs, tf.Tensor):
            return inputs[start:stop]
        return list(inputs[start:stop])
    return {k: np.asarray(v)[start:stop] for k, v in inputs.items()}


def _concat(parts, kind):
    if kind == "strings":
        return [s for p in parts for s in p]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def generate(sharded, inputs, max_length=None, stop_token_ids="auto", strip_prompt=False,
             sampler=None):
    """`ShardedModel.generate` (see there)."""
    if sharded.group_models:
        return _generate_in_groups(sharded, inputs, max_length=max_length,
                                   stop_token_ids=stop_token_ids, strip_prompt=strip_prompt,
                                   sampler=sampler)
    model = sharded.inner
    where = sharded.call_site("generate")
    if not (hasattr(model, "generate_step") and hasattr(model, "call_with_cache")):
        raise ValueError(
            f"{where}: generate() needs a keras-hub CausalLM (GPT2CausalLM, LlamaCausalLM, ...); "
            f"{type(model).__name__} has no generation loop. Use predict() for a forward pass."
        )
    rows, is_scalar, kind = _rows(inputs)
    preprocessor = model.preprocessor or getattr(sharded, "preprocessor", None)
    if kind is None:
        raise ValueError(
            f"{where}: inputs must be a string, a list of strings, or a dict "
            "{'token_ids': int array [batch, length], 'padding_mask': bool array} (padded to "
            f"the length to generate up to); got {type(inputs).__name__}."
        )
    if kind == "strings" and preprocessor is None:
        raise ValueError(
            f"{where}: string prompts need a tokenizer; {sharded.source or type(model).__name__} "
            "has none attached. Pass token ids as {'token_ids', 'padding_mask'} arrays padded "
            "to the length to generate up to, with stop_token_ids=None or a tuple of ids."
        )
    if kind == "ids":
        items = inputs_lib.check_arrays(
            inputs, inputs_lib.model_input_specs(model), where)
        inputs = {name: array for name, array, _ in items}
        _check_length(model, inputs["token_ids"].shape[1] if "token_ids" in inputs else None, where)
        _check_token_ids(model, inputs.get("token_ids"), where)
    elif max_length is not None:
        _check_length(model, max_length, where)
    if stop_token_ids == "auto" and preprocessor is None:
        raise ValueError(
            f"{where}: stop_token_ids='auto' needs a tokenizer (its end token); pass None (run "
            "to the padded length) or a tuple of token ids."
        )
    if sampler is not None:
        _check_sampler(sampler, where)
    if sampler is not None and not _same_sampler(model, sampler):
        model.compile(sampler=sampler)  # drops the traced generate function
    world = sharded.world.comm
    consistency.agree(world, {
        "prompts": _inputs_digest(inputs, kind),
        "arguments": consistency.digest([max_length, stop_token_ids, bool(strip_prompt)]),
        "sampler": consistency.digest(type(model.sampler).__name__),
    }, f"{sharded.name}.generate")
    sync_sampler(model.sampler, world)
    _share_sampler(sharded)
    _generate_function(sharded)

    start, stop = even_ranges(rows, sharded.groups)[sharded.group]
    mine = inputs if sharded.groups == 1 else _take(inputs, kind, start, stop)
    out, failure = None, None
    if stop > start:
        attached = model.preprocessor is None and kind == "strings"
        if attached:  # the tokenizer tfshard built for the source (GGUF)
            set_untracked(model, _preprocessor=preprocessor)
        try:
            out = model.generate(mine, max_length=max_length, stop_token_ids=stop_token_ids,
                                 strip_prompt=strip_prompt)
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as err:
            failure = str(inputs_lib.invalid_argument_to_value_error(err, where, mine))
        except (ValueError, NotImplementedError) as err:
            failure = (str(inputs_lib.invalid_argument_to_value_error(err, where, mine))
                       if "in user code" in str(err) else f"{type(err).__name__}: {err}")
        finally:
            if attached:
                set_untracked(model, _preprocessor=None)
    if failure is not None:  # the failing rank is named once, by the rank reporting it
        failure = failure.replace(f"{where}: ", "")
    # Every rank reports (success, digest) so a failure in one group, or ranks
    # of one group that diverged, raises everywhere instead of leaving a wait.
    digest = consistency.digest(_describe(out)) if failure is None else 0
    table = world.allgather_numpy(np.array([failure is not None, digest], np.int64))
    failed = consistency.gather_failures(world, failure, bool(table[:, 0].any()))
    if failed:
        raise ValueError(f"{where}: rank {failed[0][0]} failed: {failed[0][1]}")
    tp = sharded.group_size
    for g in range(sharded.groups):
        group_digests = table[g * tp:(g + 1) * tp, 1]
        if (group_digests != group_digests[0]).any():
            raise ValueError(
                f"{where}: the ranks of data-parallel group {g} generated different tokens "
                f"(digests {group_digests.tolist()}); their logits differed. This is a bug: "
                "please report it with the model and inputs.")
    if sharded.groups == 1:
        return out
    parts = world.allgather_object(_to_wire(out) if sharded.leads_group else None)
    parts = [_from_wire(p) for p in parts[::tp] if p is not None]
    if is_scalar:
        return parts[0]
    return _concat(parts, kind)


def _generate_in_groups(sharded, inputs, sampler=None, **kwargs):
    """MirroredStrategy's data-parallel groups, all in this process: the prompts are
    shared out as under horovodrun (contiguous rows), each group generates its share
    in a thread of its own (TensorFlow releases the GIL while it computes), and the
    results are joined in input order. Each group gets its own copy of a sampler
    object, in the same seed state."""
    from concurrent.futures import ThreadPoolExecutor

    groups = sharded.group_models
    rows, is_scalar, kind = _rows(inputs)
    if kind is None or is_scalar or rows < 2:  # one prompt (or a bad input): group 0
        work = [(groups[0], inputs)]
    else:
        work = [(groups[g], _take(inputs, kind, start, stop))
                for g, (start, stop) in enumerate(even_ranges(rows, len(groups))) if stop > start]

    def own_sampler(group):
        if sampler is None or isinstance(sampler, str) or group is groups[0]:
            return sampler
        return _sampler_copy(sampler)

    # Made before any group starts drawing from `sampler`.
    work = [(group, part, own_sampler(group)) for group, part in work]
    for group, _, _ in work:
        if group.preprocessor is None and sharded.preprocessor is not None:
            group.attach_source(sharded.source, sharded.preprocessor)

    def run(item):
        group, part, own = item
        return group.generate(part, sampler=own, **kwargs)

    with ThreadPoolExecutor(len(work)) as pool:
        parts = list(pool.map(run, work))
    return parts[0] if len(parts) == 1 else _concat(parts, kind)


def _to_wire(out):
    """A group's result as JSON (strings, or token arrays with their dtypes)."""
    if out is None:
        return None
    if isinstance(out, dict):
        return {"arrays": {k: [np.asarray(v).tolist(), str(np.asarray(v).dtype)]
                           for k, v in out.items()}}
    if isinstance(out, (str, bytes)):
        return {"scalar": decode_text(out)}
    return {"strings": [decode_text(s) for s in out]}


def _from_wire(part):
    if "arrays" in part:
        return {k: np.asarray(v, dtype=dtype) for k, (v, dtype) in part["arrays"].items()}
    return part["scalar"] if "scalar" in part else part["strings"]


def decode_text(s):
    """A generated string as `str` (keras-hub returns bytes from TensorFlow)."""
    return s.decode("utf-8", "replace") if isinstance(s, bytes) else str(s)


def _inputs_digest(inputs, kind):
    if kind == "ids":
        return consistency.digest([consistency.array_digest(a) for _, a in sorted(inputs.items())])
    if isinstance(inputs, tf.Tensor):
        inputs = inputs.numpy().tolist()
    return consistency.digest([str(s) for s in ([inputs] if isinstance(inputs, (str, bytes))
                                                 else inputs)])


def _describe(out):
    if isinstance(out, dict):
        return {k: consistency.array_digest(np.asarray(v)) for k, v in out.items()}
    if isinstance(out, (str, bytes)):
        return str(out)
    if out is None:
        return None
    return [str(s) for s in out]


def _check_token_ids(model, ids, where):
    """Token ids in range, checked here: a failed in-graph check on one rank
    could leave another inside the generation loop."""
    backbone = getattr(model, "backbone", model)
    vocab = getattr(backbone, "vocabulary_size", None)
    if ids is None or vocab is None or ids.size == 0:
        return
    bad = np.argwhere((ids < 0) | (ids >= vocab))
    if len(bad):
        row, col = (int(i) for i in bad[0])
        raise ValueError(
            f"{where}: token id {int(ids[row, col])} at row {row}, position {col} is outside the "
            f"vocabulary of {type(backbone).__name__}'s token_embedding (size {vocab}, shape "
            f"{tuple(ids.shape)} given); ids must be in [0, {vocab}). {len(bad)} id(s) out of range."
        )


def _check_length(model, length, where):
    limit = inputs_lib.sequence_limit(model)
    if length is not None and limit is not None and length > limit[1]:
        raise ValueError(
            f"{where}: cannot generate up to length {length}: {limit[0]} has "
            f"position embeddings for {limit[1]} positions. Use max_length <= {limit[1]}."
        )
