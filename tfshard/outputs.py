"""Assembling predict's outputs: batches back into one structure, in input order.

`local_outputs` joins the batches one process computed; `gather_outputs` brings
every data-parallel group's batches together over the world's collectives.
"""

import keras
import numpy as np
import tensorflow as tf


def rows_of(batch):
    """Rows (leading dimension) of a batch structure."""
    return int(np.shape(keras.tree.flatten(batch)[0])[0])


def _template(out):
    """A JSON-able copy of an output structure with leaf positions as leaves."""
    counter = iter(range(1 << 30))
    return keras.tree.map_structure(lambda _: next(counter), out)


def _pack(template, leaves):
    """The output structure `template` (from `_template`) filled with `leaves`."""
    return keras.tree.pack_sequence_as(template, leaves) if not isinstance(template, int) \
        else leaves[0]


def _concat(batches, k, trailing=None, dtype=None):
    """Leaf `k` of `batches` (a list of output structures) concatenated on the rows."""
    if not batches:
        return np.zeros([0] + list(trailing), dtype=dtype)
    return np.concatenate([np.asarray(keras.tree.flatten(o)[k]) for o in batches], axis=0)


def _spec(out):
    """Shapes past the rows and dtypes of an output structure's leaves."""
    return [(list(np.shape(a)[1:]), np.asarray(a).dtype.name) for a in keras.tree.flatten(out)]


def _check_joinable(specs, where):
    """Raises unless every batch's outputs can be concatenated along the rows.

    Args:
        specs: `[(batch_index, _spec(output))]` in batch order.

    Raises:
        ValueError: naming the first two batches whose output shapes or dtypes
            differ past the row axis (e.g. batches of different sequence length).
    """
    if not specs:
        return
    first_index, first = specs[0]
    for index, spec in specs[1:]:
        if spec != first:
            def show(sp):
                return ", ".join(f"(rows, {', '.join(map(str, shape))}) {np.dtype(dt).name}"
                                 if shape else f"(rows,) {np.dtype(dt).name}" for shape, dt in sp)
            raise ValueError(
                f"{where}: the outputs of batch {first_index} [{show(first)}] and batch {index} "
                f"[{show(spec)}] cannot be joined along the rows: predict concatenates "
                "batches, so every batch must give outputs of one shape past the batch axis "
                "(batches of different sequence length do not). Pad the batches to one length, "
                "or call predict once per length.")


def local_outputs(done, where, keep=True):
    """The outputs of a job with one data-parallel group, without any collective.

    Every rank of a single tensor-parallel group computed every batch and holds
    the global output of each, so each rank concatenates its own.

    Args:
        done: this rank's `[(batch_index, output structure of numpy arrays)]`.
        where: text for messages.
        keep: False on ranks that return nothing (`gather="rank0"` off rank 0).

    Returns:
        The output structure in batch order, or None when not `keep`.

    Raises:
        ValueError: no batch was computed (the same on every rank).
    """
    if not done:
        raise ValueError(f"{where}: no batch was computed (empty input?).")
    if not keep:
        return None
    done = sorted(done, key=lambda t: t[0])
    _check_joinable([(i, _spec(o)) for i, o in done], where)
    batches = [o for _, o in done]
    leaves = len(keras.tree.flatten(batches[0]))
    return _pack(_template(batches[0]), [_concat(batches, k) for k in range(leaves)])


def gather_outputs(world, is_leader, done, where, gather="all"):
    """Reassembles every group's outputs in input order.

    Args:
        world: the world `Communicator`.
        is_leader: whether this rank contributes its group's outputs (tensor
            rank 0 of its group).
        done: this rank's `[(batch_index, output structure of numpy arrays)]`.
        where: text for messages.
        gather: "all" (every rank gets the result) or "rank0".

    Returns:
        The output structure with all batches concatenated in index order
        (None on ranks other than 0 when `gather="rank0"`).

    Raises:
        ValueError: no rank computed any batch.
    """
    mine = sorted(done, key=lambda t: t[0]) if is_leader else []
    first = done[0][1] if done else None
    metas = world.allgather_object({
        "batches": [i for i, _ in mine],
        "rows": [rows_of(o) for _, o in mine],
        "spec": None if first is None else [
            (list(np.shape(a)[1:]), np.asarray(a).dtype.name) for a in keras.tree.flatten(first)],
        "template": None if first is None else _template(first),
        "specs": [(i, _spec(o)) for i, o in mine],
    })
    ref = next((m for m in metas if m["spec"] is not None), None)
    if ref is None:
        raise ValueError(f"{where}: no batch was computed (empty input?).")
    # Every rank sees every group's output shapes: all raise the same error, none
    # enters a gather whose shapes differ between ranks.
    _check_joinable(sorted(s for m in metas for s in m["specs"]), where)
    order = [(b, r) for m in metas for b, r in zip(m["batches"], m["rows"])]
    starts, pos = {}, 0
    for b, r in sorted(order):
        starts[b] = pos
        pos += r
    perm = np.concatenate([np.arange(starts[b], starts[b] + r) for b, r in order]) \
        if order else np.zeros(0, np.int64)
    results = []
    for k, (trailing, dtype) in enumerate(ref["spec"]):
        dtype = np.dtype(dtype)
        local = _concat([o for _, o in mine], k, trailing, dtype)
        wire = local.astype(np.uint8) if dtype == np.bool_ else local
        if gather == "rank0":
            got = world.gather_to_root(wire)
        else:
            got = np.asarray(world.allgather(tf.constant(wire), axis=0))
        if got is None:
            continue
        out = np.empty((pos,) + tuple(trailing), dtype=dtype)
        out[perm] = got.astype(dtype)
        results.append(out)
    if gather == "rank0" and world.rank != 0:
        return None
    return _pack(ref["template"], results)
