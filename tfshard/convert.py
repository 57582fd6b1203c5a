"""Converting a built model in place to one rank's slices (`shard()`'s core).

`convert` resolves the plan for a rank, replaces the big layers' kernels by the
rank's slices (`tfshard.layers.shard_layer`), sets attention layers' head counts
to the rank's, gives a keras-hub CausalLM a KV cache of the rank's heads, and
drops traced functions the cut would invalidate.
"""

import gc

import keras

from tfshard import comm as comm_lib
from tfshard import consistency
from tfshard import kv_cache
from tfshard.layers import shard_layer, walk
from tfshard.layers.tracking import set_untracked


def set_head_counts(parent, counts, rank):
    """Sets an attention layer's stored head counts to this rank's local ones.

    Attention layers reshape and repeat K/V with the head counts they stored
    at construction. The attributes are found by name and value: an int
    attribute whose name speaks of heads (K/V heads when it says "kv" or
    "key_value") or groups, and whose value is the full count.
    """
    q_local, kv_local = counts.local(rank)
    group_full = counts.heads_q // counts.heads_kv
    changed = {}
    for name, value in list(vars(parent).items()):
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        low = name.lower()
        if "dim" in low or "size" in low:
            continue
        new = None
        if "group" in low and value == group_full:
            new = q_local // kv_local
        elif "head" in low and ("kv" in low or "key_value" in low):
            new = kv_local if value == counts.heads_kv else None
        elif "head" in low and value == counts.heads_q:
            new = q_local
        if new is not None and new != value:
            set_untracked(parent, **{name: new})
            changed[name] = (value, new)
    return changed


def reset_compiled_functions(model):
    """Drops cached traced functions and XLA, which would bypass or break the cut."""
    for layer in [model] + [n.layer for n in walk(model)]:
        if isinstance(layer, keras.Model):
            for attr in ("predict_function", "test_function", "train_function",
                         "generate_function"):
                if getattr(layer, attr, None) is not None:
                    setattr(layer, attr, None)
            # Horovod ops do not run under XLA on CPU.
            layer._jit_compile = False


def convert(model, plan, comm, world, comm_dtype=None, before_cut=None):
    """Resolves `plan` for `comm`'s rank and cuts `model` in place.

    Args:
        model: the built Keras model (one replica's, under MirroredStrategy).
        plan: the `Plan` to resolve.
        comm: the rank's tensor-parallel `Communicator`.
        world: the `World` whose ranks agree on the resolved plan.
        comm_dtype: None, or the 16-bit dtype collectives send (see `shard`).
        before_cut: under pipeline parallelism, called once the plan is agreed
            on, before any layer is cut; it releases the other stages' layers
            and returns the ids of the layers this rank runs (only those are cut).

    Returns:
        `(plan, meter)`: the resolved plan and the `MeteredCommunicator`
        around `comm` that the sharded layers call.
    """
    plan = plan.resolve(model, comm.size, comm.rank).with_comm_dtype(comm_dtype,
                                                                      comm.sends_16bit_sums)
    meter = comm_lib.metered(comm)
    layer_comm = comm_lib.compressed(meter, comm_dtype)  # metered after the cast
    consistency.agree(world.comm, {"plan": consistency.digest(plan.to_dict())}, "tfshard.shard()")
    by_path = {n.path: n.layer for n in walk(model)}
    held = before_cut() if before_cut is not None else None
    for e in plan.sharded:
        if held is None or id(by_path[e.path]) in held:
            shard_layer(by_path[e.path], e, layer_comm, e.path)
    by_path.setdefault(model.name, model)  # attention owned by the root model itself
    for counts in plan.attention:
        if held is None or id(by_path[counts.path]) in held:
            set_head_counts(by_path[counts.path], counts, comm.rank)
    kv_cache.install_cache(model, plan, comm.rank)
    reset_compiled_functions(model)
    gc.collect()  # release the full kernels the conversion dropped
    return plan, meter
