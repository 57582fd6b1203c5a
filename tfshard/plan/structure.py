"""What the planner reads from a model: shapes, bytes, attention blocks, column -> row pairs.

Layer shapes and bytes, attention blocks, column -> row pairs (by the functional
graph or by shape), and per-rank slice bytes.
"""

import dataclasses

import keras
import numpy as np

from tfshard.layers import ShardSpec, even_ranges, kind_of, variable_cuts
from tfshard.layers.einsum_dense import einsum_axes
from tfshard.layers.int4 import unpacked_shape


# Parameter-free layers that act element-wise on the feature axis: a column
# output may flow through them into a row layer.
_PASSTHROUGH_LAYERS = (
    keras.layers.Dropout, keras.layers.GaussianNoise, keras.layers.GaussianDropout,
    keras.layers.AlphaDropout, keras.layers.ActivityRegularization, keras.layers.Identity,
    keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.ELU,
)
_ELEMENTWISE_ACTIVATIONS = {
    "linear", "relu", "relu6", "gelu", "silu", "swish", "tanh", "sigmoid", "elu", "selu",
    "softplus", "softsign", "exponential", "leaky_relu", "hard_sigmoid", "hard_silu",
    "hard_swish", "mish", "celu", "squareplus", "sparse_plus", "tanh_shrink",
    "soft_shrink", "hard_shrink", "hard_tanh", "threshold", "log_sigmoid",
}


# --------------------------------------------------------------------------- #
# Model structure
# --------------------------------------------------------------------------- #




def _main_weight(layer):
    kind = kind_of(layer)
    if kind in ("Embedding", "ReversibleEmbedding"):
        return layer.__dict__.get("_embeddings")
    return layer.__dict__.get("_kernel")


def main_dtype(layer):
    """The dtype of a supported layer's main weight (kernel or embedding table):
    "int4" for Keras's int4 layers, whose values are packed two a byte in int8."""
    if getattr(layer, "quantization_mode", None) == "int4":
        return "int4"
    weight = _main_weight(layer)
    return str(weight.dtype) if weight is not None else str(layer.variable_dtype)


def full_shape(layer):
    spec = getattr(layer, "shard_spec", None)
    if spec is not None:
        return tuple(spec.full_shape)
    return unpacked_shape(layer) or tuple(int(d) for d in _main_weight(layer).shape)


def var_bytes(variables):
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)


def _activation_name(layer):
    act = getattr(layer, "activation", None)
    if act is None:
        return "linear"
    return getattr(act, "__name__", type(act).__name__)


_ELEMENTWISE_PROBE = {}


def _is_elementwise_activation(layer):
    """Whether a layer's activation acts element-wise on its last axis.

    Known names answer at once; any other callable is probed: applied to a
    slice of a random input it must give the slice of its output (softmax
    does not; GELU, a lambda around tanh, etc. do).
    """
    act = getattr(layer, "activation", None)
    if act is None or _activation_name(layer) in _ELEMENTWISE_ACTIVATIONS:
        return True
    key = id(act)
    if key not in _ELEMENTWISE_PROBE:
        x = np.random.default_rng(0).normal(size=(3, 8)).astype("float32") * 3
        try:
            full = np.asarray(act(keras.ops.convert_to_tensor(x)))
            part = np.asarray(act(keras.ops.convert_to_tensor(x[:, 3:])))
            _ELEMENTWISE_PROBE[key] = bool(np.allclose(full[:, 3:], part, rtol=1e-6, atol=1e-6))
        except Exception:  # noqa: BLE001 - any failure means "do not pair"
            _ELEMENTWISE_PROBE[key] = False
    return _ELEMENTWISE_PROBE[key]


def linear_dims(layer):
    """`(in, out, in_axis, out_axis)` of a Dense or a 2-D-kernel EinsumDense, else None."""
    kind = kind_of(layer)
    if kind == "Dense":
        k = full_shape(layer)
        return k[0], k[1], 0, 1
    if kind == "EinsumDense":
        k = full_shape(layer)
        free, contracted = einsum_axes(layer.equation)
        if len(k) == 2 and len(free) == 1 and len(contracted) == 1:
            return k[contracted[0]], k[free[0]], contracted[0], free[0]
    return None


def _is_passthrough(layer):
    if isinstance(layer, _PASSTHROUGH_LAYERS):
        return True
    if isinstance(layer, keras.layers.Activation):
        return _is_elementwise_activation(layer)
    return False


@dataclasses.dataclass
class _Attention:
    parent: object
    parent_path: str
    q: list          # paths of in-projections with H_q heads
    kv: list         # paths of in-projections with H_kv heads
    out: str         # path of the output projection
    heads_q: int
    heads_kv: int
    head_dim: int
    axes: dict       # path -> kernel axis of heads


def find_attention(nodes):
    """Attention blocks: a parent with heads in-projections and one out-projection."""
    by_parent = {}
    for n in nodes:
        if kind_of(n.layer) == "EinsumDense":
            by_parent.setdefault(id(n.parent), []).append(n)
    path_of_parent = {id(n.layer): n.path for n in nodes}
    blocks = []
    for members in by_parent.values():
        ins, outs = [], []
        for n in members:
            free, contracted = einsum_axes(n.layer.equation)
            shape = full_shape(n.layer)
            if len(free) == 2 and len(contracted) == 1:
                ins.append((n, free[0], shape[free[0]], shape[free[1]]))
            elif len(free) == 1 and len(contracted) == 2:
                outs.append((n, contracted[0], shape[contracted[0]], shape[contracted[1]]))
        if len(outs) != 1 or not ins:
            continue
        out_node, out_axis, heads_q, head_dim = outs[0]
        if any(d != head_dim for _, _, _, d in ins):
            continue
        heads = {h for _, _, h, _ in ins}
        kv_heads = heads - {heads_q}
        if heads_q not in heads or len(kv_heads) > 1:
            continue
        heads_kv = kv_heads.pop() if kv_heads else heads_q
        if heads_q % heads_kv:
            continue
        parent = members[0].parent
        blocks.append(_Attention(
            parent=parent,
            parent_path=path_of_parent.get(id(parent), getattr(parent, "name", "")),
            q=[n.path for n, _, h, _ in ins if h == heads_q],
            kv=[n.path for n, _, h, _ in ins if h != heads_q],
            out=out_node.path, heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim,
            axes={**{n.path: a for n, a, _, _ in ins}, out_node.path: out_axis},
        ))
    return blocks


def attention_ranges(heads_q, heads_kv, size):
    """Per-rank query-head and K/V-head ranges that keep GQA groups whole.

    With at least as many K/V heads as ranks, K/V heads are split (unevenly if
    need be) and each rank takes the query heads of its K/V heads. With fewer,
    each K/V head is replicated on the ranks of its group, which split that
    group's query heads among themselves.

    Returns:
        `(q_ranges, kv_ranges)`, tuples of `(start, stop)` per rank.

    Raises:
        ValueError: fewer query heads than ranks, or a group with fewer query
            heads than the ranks assigned to it.
    """
    if heads_q < size:
        raise ValueError(f"{heads_q} query heads cannot be split over {size} ranks")
    group = heads_q // heads_kv
    if heads_kv >= size:
        kv = even_ranges(heads_kv, size)
        return tuple((a * group, b * group) for a, b in kv), kv
    q_ranges, kv_ranges = [], []
    for head, (r0, r1) in enumerate(even_ranges(size, heads_kv)):
        n = r1 - r0
        if group < n:
            raise ValueError(
                f"K/V head {head} has {group} query heads for {n} ranks"
            )
        for a, b in even_ranges(group, n):
            q_ranges.append((head * group + a, head * group + b))
            kv_ranges.append((head, head + 1))
    return tuple(q_ranges), tuple(kv_ranges)


def _functional_graph(layer):
    """The keras Functional graph behind a container, or None."""
    if isinstance(layer, keras.Sequential):
        layer = getattr(layer, "_functional", None)
    if layer is not None and hasattr(layer, "_nodes_by_depth") and hasattr(layer, "outputs"):
        return layer
    return None


def _functional_pairs(graph):
    """Column → row pairs read off a functional graph's data flow.

    Returns:
        List of `([column layer], row layer)`.
    """
    consumers, outputs = {}, {id(t) for t in keras.tree.flatten(graph.outputs)}
    nodes = [n for depth in graph._nodes_by_depth.values() for n in depth]
    produced = {}
    for node in nodes:
        for t in node.input_tensors:
            consumers.setdefault(id(t), []).append(node)
        for t in node.output_tensors:
            produced.setdefault(id(node.operation), []).append(t)
    pairs, used = [], set()
    ordered = [op for op in graph.operations]
    for op in ordered:
        dims = linear_dims(op) if kind_of(op) else None
        if dims is None or id(op) in used or not _is_elementwise_activation(op):
            continue
        outs = produced.get(id(op), [])
        if len(outs) != 1:
            continue
        t = outs[0]
        while True:
            if id(t) in outputs:
                break
            nxt = consumers.get(id(t), [])
            if len(nxt) != 1 or len(nxt[0].output_tensors) != 1:
                break
            consumer = nxt[0].operation
            if _is_passthrough(consumer):
                t = nxt[0].output_tensors[0]
                continue
            cdims = linear_dims(consumer) if kind_of(consumer) else None
            if cdims is not None and cdims[0] == dims[1] and id(consumer) not in used:
                pairs.append(([op], consumer))
                used.update({id(op), id(consumer)})
            break
    return pairs


def _shape_pairs(linears):
    """Column → row pairs by the transformer FFN shape (no recorded data flow).

    `linears` is in creation order. Shapes alone cannot tell H→F→H from
    F→H→F, so the column layers must be created before their row layer, as
    in every block that builds its layers in the order it calls them. A layer
    belongs to at most one pair.
    """
    pairs, used = [], set()
    order = {id(l): i for i, (l, _) in enumerate(linears)}
    widths = {d[1] for _, d in linears}
    for f in sorted(widths):
        readers = [(l, d) for l, d in linears if d[0] == f]
        rows = [(l, d) for l, d in readers if d[1] != f]
        cols = [(l, d) for l, d in linears if d[1] == f and d[0] != f]
        if len(readers) != 1 or len(rows) != 1 or not cols:
            continue
        row, rdims = rows[0]
        members = [l for l, _ in cols] + [row]
        if any(id(l) in used for l in members):
            continue
        if any(order[id(l)] > order[id(row)] for l, _ in cols):
            continue
        if all(d[0] == rdims[1] for _, d in cols) and all(_is_elementwise_activation(l) for l, _ in cols):
            pairs.append(([l for l, _ in cols], row))
            used.update(id(l) for l in members)
    return pairs


def find_pairs(nodes):
    """All column → row pairs of linear layers, per parent container."""
    by_parent, parents = {}, {}
    for n in nodes:
        if linear_dims(n.layer) is not None:
            by_parent.setdefault(id(n.parent), []).append(n.layer)
            parents[id(n.parent)] = n.parent
    pairs = []
    for pid, layers in by_parent.items():
        graph = _functional_graph(parents[pid])
        if graph is not None:
            pairs.extend(_functional_pairs(graph))
        else:
            pairs.extend(_shape_pairs([(l, linear_dims(l)) for l in layers]))
    return pairs




def slice_bytes(layer, e, rank):
    """The bytes `rank` holds of an unsharded `layer` cut as the plan entry `e` says."""
    spec = ShardSpec(path=e.get("path", ""), rule=e["rule"], axis=e["axis"],
                     ranges=tuple(e["ranges"]), full_shape=full_shape(layer))
    cuts = {id(layer.__dict__[attr]): (axis, ranges)
            for attr, _, axis, ranges in variable_cuts(layer, spec)}
    total = 0
    for v in layer.weights:
        n = int(np.prod(v.shape))
        itemsize = np.dtype(v.dtype).itemsize
        axis, ranges = cuts.get(id(v), (None, None))
        if axis is None:
            total += n * itemsize
        else:
            a, b = ranges[rank]
            total += n // v.shape[axis] * (b - a) * itemsize
    return total
