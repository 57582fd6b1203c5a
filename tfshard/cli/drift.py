"""The equivalence report: where, layer by layer, a sharded model parts from the original.

    from tfshard.cli import drift
    rows = drift.layer_drift(sharded, reference, x)
    print(drift.format_drift(rows))

Both models run `x` once, eagerly, with every layer's output recorded. Each
rank compares its layers with the reference's: a layer whose output has the
full shape (replicated layers, row-parallel outputs after their all-reduce,
gathered outputs) is compared whole; a column-parallel layer whose output is
this rank's slice is compared with the same slice of the reference. The worst
figures over all ranks are reported, in the order the layers ran.
"""

import keras
import numpy as np
import tensorflow as tf

from tfshard.layers import walk
from tfshard.layers.tracking import set_untracked

#: A layer "parts" when max|Δ| exceeds this × (1 + max|reference|).
TOLERANCE = 1e-5


def _record(model, outputs, rank):
    """Makes every layer of `model` record its float outputs in
    `outputs[(rank, layer index, call index)]` (the index in `walk` order,
    which is the same for the model and its sharded copies, whatever names
    Keras gave their layers).

    Returns:
        A function that removes the hooks.
    """
    hooked = []
    for i, node in enumerate(walk(model)):
        layer = node.layer
        original = layer.call

        def call(*args, _original=original, _i=i, **kwargs):
            out = _original(*args, **kwargs)
            calls = [k for k in outputs if k[0] == rank and k[1] == _i]
            outputs[(rank, _i, len(calls))] = [
                np.asarray(t) for t in keras.tree.flatten(out)
                if hasattr(t, "dtype") and tf.as_dtype(t.dtype).is_floating]
            return out

        set_untracked(layer, call=call)
        hooked.append(layer)

    def unhook():
        for layer in hooked:
            layer.__dict__.pop("call", None)
    return unhook


def _run(model, x, hooked):
    """`model(x)` eagerly, recording the layers of each `(rank, layer)` in `hooked`.

    Returns:
        Every layer's float outputs by `(rank, layer index, call index)`.
    """
    outputs = {}
    unhooks = [_record(inner, outputs, rank) for rank, inner in hooked]
    try:
        model(x, training=False)
    finally:
        for unhook in unhooks:
            unhook()
    return outputs


def _compare(got, want, own):
    """`(max_abs, max_ref, how)` of one layer's outputs on one rank, or None.

    `own` is the layer's `(start, stop)` when it is sharded (its outputs may be
    its own slice of the reference), else None."""
    if len(got) != len(want) or not got:
        return None
    worst, ref_max, how = 0.0, 0.0, "full"
    for g, w in zip(got, want):
        if g.shape != w.shape:
            differ = [a for a in range(w.ndim) if g.shape[a] != w.shape[a]] if g.ndim == w.ndim \
                else []
            if len(differ) != 1 or own is None or g.shape[differ[0]] != own[1] - own[0]:
                return None
            axis = differ[0]
            w = np.take(w, np.arange(*own), axis=axis)
            how = f"own slice, axis {axis - w.ndim}"
        worst = max(worst, float(np.max(np.abs(g.astype(np.float64) - w))) if g.size else 0.0)
        ref_max = max(ref_max, float(np.max(np.abs(w))) if w.size else 0.0)
    return worst, ref_max, how


def _worse(old, new):
    """Merges two `[max_abs, max_ref, how]` figures of one layer (None: not compared)."""
    if old is None or new is None:
        return new if old is None else old
    return [max(old[0], new[0]), max(old[1], new[1]), old[2] if old[2] == "full" else new[2]]


def layer_drift(sharded, reference, x):
    """Runs `x` through both models and measures each layer's drift.

    Every rank must call this with the same `x` (a collective gathers the
    ranks' figures).

    Args:
        sharded: a `tfshard.ShardedModel`.
        reference: the same model unsharded, with the same weights.
        x: one batch of inputs (small: every layer's output is kept).

    Returns:
        A list of dicts in call order, one per layer call: `path`, `kind`,
        `rule`, `shape` (the reference output's), `compared` ("full", "own
        slice, axis k" or "not compared"), `max_abs`, `max_ref` and `rel`
        (max_abs / (1 + max_ref)); the worst over all ranks.
    """
    replicas = sharded.local_replicas()
    want = _run(reference, x, [(None, reference)])
    got = _run(sharded, x, [(rank, r.model) for rank, r in replicas.items()])
    rules, specs = {}, {}
    for rank, replica in replicas.items():
        by_path = {e.path: e.rule for e in replica.plan.entries}
        for i, node in enumerate(walk(replica.model)):
            specs[(rank, i)] = getattr(node.layer, "shard_range", None)
            rules[i] = by_path.get(node.path, "")
    mine = {}
    for (rank, i, index), outs in got.items():
        ref = want.get((None, i, index))
        if ref is None:
            continue
        result = _compare(outs, ref, specs.get((rank, i)))
        key = f"{i}#{index}"
        mine[key] = _worse(mine.get(key), None if result is None else list(result))
    merged = {}
    for table in sharded.world.comm.allgather_object(mine):
        for key, value in table.items():
            merged[key] = _worse(merged.get(key), value)
    nodes = walk(reference)
    rows = []
    for (_, i, index), ref in want.items():
        value = merged.get(f"{i}#{index}")
        row = {"path": nodes[i].path + (f" (call {index + 1})" if index else ""),
               "kind": type(nodes[i].layer).__name__, "rule": rules.get(i, ""),
               "shape": tuple(ref[0].shape) if ref else (), "compared": "not compared",
               "max_abs": None, "max_ref": None, "rel": None}
        if value is not None:
            row.update(compared=value[2], max_abs=value[0], max_ref=value[1],
                       rel=value[0] / (1.0 + value[1]))
        rows.append(row)
    return rows


def first_parting(rows, tolerance=TOLERANCE):
    """The first row whose `rel` exceeds `tolerance`, or None."""
    return next((r for r in rows if r["rel"] is not None and r["rel"] > tolerance), None)


def format_drift(rows, tolerance=TOLERANCE):
    """The report as a text table and a verdict line.

    Returns:
        A string: one line per layer (path, kind, rule, output shape, how it
        was compared, max|Δ|, relative drift), then where the models part.
    """
    width = max([len(r["path"]) for r in rows] + [5])
    lines = [f"{'layer':<{width}}  {'kind':<20} {'rule':<9} {'output shape':<18} "
             f"{'compared':<20} {'max|diff|':>10} {'rel':>10}"]
    for r in rows:
        abs_, rel = ("-", "-") if r["rel"] is None else (f"{r['max_abs']:.3g}", f"{r['rel']:.3g}")
        flag = "  <- parts" if r["rel"] is not None and r["rel"] > tolerance else ""
        lines.append(f"{r['path']:<{width}}  {r['kind'][:20]:<20} {r['rule'] or '-':<9} "
                     f"{str(r['shape']):<18} {r['compared']:<20} {abs_:>10} {rel:>10}{flag}")
    compared = [r for r in rows if r["rel"] is not None]
    first = first_parting(rows, tolerance)
    if first is None:
        worst = max(compared, key=lambda r: r["rel"]) if compared else None
        lines.append(f"no layer parts: {len(compared)} of {len(rows)} layer outputs compared, "
                     f"worst rel {worst['rel']:.3g} at {worst['path']} (tolerance {tolerance:g})"
                     if worst else "no layer output could be compared")
    else:
        lines.append(f"first layer where they part: {first['path']} ({first['kind']}, "
                     f"rule {first['rule'] or '-'}): rel {first['rel']:.3g} > {tolerance:g}")
    return "\n".join(lines)
