"""What to cut: rules matched on layer paths, auto-planning by structure, validation.

A `Plan` maps layer paths to rules -- "column", "row", "vocab" or "replicate" --
and, once resolved against a model and a world size, to the exact slice every
rank holds. Auto-planning reads the model's structure, never its class names:

- attention: a layer owning EinsumDense projections into heads (q/k/v: one
  contracted axis, a heads and a head-dim axis) and one projection out of heads
  (two contracted axes). q/k/v go column by whole heads, the output projection
  row; GQA groups stay together (K/V heads split with their query heads, or
  replicated across the ranks of a group when there are fewer K/V heads than
  ranks). The layer's stored head counts are set to the local ones.
- MLP: inside a functional model (Sequential included), a linear layer whose
  output flows only through element-wise layers into the next linear layer
  forms a column → row pair. Inside a custom layer or a subclassed model, whose
  data flow is not recorded, the transformer FFN shape is required: one layer
  `[F, H]` and one or more `[H, F]` (F != H) and no other reader of width F.
- vocab: embedding tables of at least `min_vocab_rows` rows, and every
  ReversibleEmbedding (whose tied logits are then gathered).
- everything else -- norms, position embeddings, small unpaired heads -- is
  replicated.
"""

import dataclasses
import math
import re

import keras
import numpy as np

from tfshard import rules as rules_lib

from tfshard.layers import ShardSpec, even_ranges, kind_of, walk
from tfshard.layers.einsum_dense import bias_axis, einsum_axes


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


def _full_shape(layer):
    spec = getattr(layer, "shard_spec", None)
    if spec is not None:
        return tuple(spec.full_shape)
    return tuple(int(d) for d in _main_weight(layer).shape)


def _var_bytes(variables):
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


def _linear_dims(layer):
    """`(in, out, in_axis, out_axis)` of a Dense or a 2-D-kernel EinsumDense, else None."""
    kind = kind_of(layer)
    if kind == "Dense":
        k = _full_shape(layer)
        return k[0], k[1], 0, 1
    if kind == "EinsumDense":
        k = _full_shape(layer)
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


def _find_attention(nodes):
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
            shape = _full_shape(n.layer)
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
        dims = _linear_dims(op) if kind_of(op) else None
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
            cdims = _linear_dims(consumer) if kind_of(consumer) else None
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


def _find_pairs(nodes):
    """All column → row pairs of linear layers, per parent container."""
    by_parent, parents = {}, {}
    for n in nodes:
        if _linear_dims(n.layer) is not None:
            by_parent.setdefault(id(n.parent), []).append(n.layer)
            parents[id(n.parent)] = n.parent
    pairs = []
    for pid, layers in by_parent.items():
        graph = _functional_graph(parents[pid])
        if graph is not None:
            pairs.extend(_functional_pairs(graph))
        else:
            pairs.extend(_shape_pairs([(l, _linear_dims(l)) for l in layers]))
    return pairs


# --------------------------------------------------------------------------- #
# Plan
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class PlanEntry:
    """One layer's cut.

    Attributes:
        path: the layer path.
        kind: "Dense", "EinsumDense", "Embedding" or "ReversibleEmbedding".
        rule: "column", "row", "vocab" or "replicate".
        axis: the weight axis cut (None when replicated).
        ranges: per-rank `(start, stop)` along `axis` (None when replicated).
        gather_output: column: gather the output to full width.
        input_is_parallel: row: the input is already this rank's slice.
        full_shape: shape of the unsharded main weight.
        full_bytes: bytes of all the layer's variables, unsharded.
        local_bytes: per-rank bytes of the layer's variables after the cut.
        note: why the planner chose this.
    """

    path: str
    kind: str
    rule: str
    axis: object = None
    ranges: object = None
    gather_output: bool = False
    input_is_parallel: bool = False
    full_shape: tuple = ()
    full_bytes: int = 0
    local_bytes: tuple = ()
    note: str = ""

    def spec(self, rank):
        """This cut as the `ShardSpec` the sharded layer of `rank` is built from."""
        return ShardSpec(rule=self.rule, axis=self.axis, ranges=self.ranges, rank=rank,
                         gather_output=self.gather_output,
                         input_is_parallel=self.input_is_parallel,
                         full_shape=self.full_shape, path=self.path)

    def local_shape(self, rank):
        if self.ranges is None:
            return self.full_shape
        shape = list(self.full_shape)
        a, b = self.ranges[rank]
        shape[self.axis] = b - a
        return tuple(shape)


@dataclasses.dataclass(frozen=True)
class HeadCounts:
    """An attention layer's head counts to set per rank (GQA kept)."""

    path: str
    heads_q: int
    heads_kv: int
    q_ranges: tuple
    kv_ranges: tuple
    head_dim: int = 0

    def local(self, rank):
        """`(query heads, K/V heads)` held by `rank`."""
        q = self.q_ranges[rank][1] - self.q_ranges[rank][0]
        kv = self.kv_ranges[rank][1] - self.kv_ranges[rank][0]
        return q, kv


class Plan:
    """What to cut, by layer path.

    Build one with `Plan.auto(model, size)` or `Plan.from_rules({...})`;
    `tfshard.shard` resolves it against the model and the world size.

    Args:
        rules: ordered mapping of regular expression (matched with
            `re.fullmatch` against layer paths, first match wins) to rule:
            "column", "row", "vocab", "replicate", or "column:gather" to force
            a gathered column output. None for auto-planning.
        min_vocab_rows: auto only: embedding tables with fewer rows are replicated.
        min_gather_params: auto only: a linear layer with no row partner is
            cut column-wise (with a gather) only if its kernel has at least this
            many parameters; smaller ones are replicated.
    """

    def __init__(self, rules=None, min_vocab_rows=64, min_gather_params=1 << 20):
        if rules is not None:
            rules = {pattern: rules_lib.parse(rule, pattern) for pattern, rule in dict(rules).items()}
            for pattern in rules:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(f"Bad pattern {pattern!r}: {e}") from None
        self.rules = rules
        self.min_vocab_rows = min_vocab_rows
        self.min_gather_params = min_gather_params

    # -- construction ------------------------------------------------------ #

    @classmethod
    def from_rules(cls, rules, **kwargs):
        """A plan from `{regex: rule}`; layers no pattern matches are replicated.

        Args:
            rules: mapping of layer-path regex (`re.fullmatch`) to rule.

        Returns:
            An unresolved `Plan` (resolved by `tfshard.shard`).

        Raises:
            ValueError: an unknown rule or an invalid pattern.
        """
        return cls(rules=rules, **kwargs)

    @classmethod
    def auto(cls, model=None, size=None, rank=0, **kwargs):
        """The automatic plan; resolved at once when `model` and `size` are given.

        Args:
            model: a built Keras model (optional).
            size: the number of tensor-parallel ranks.
            rank: the rank whose local shapes `summary()` shows.
            **kwargs: `min_vocab_rows`, `min_gather_params`.

        Returns:
            A `ResolvedPlan` when `model` is given, else the `Plan` to resolve.
        """
        plan = cls(rules=None, **kwargs)
        if model is not None:
            if size is None:
                raise ValueError("Plan.auto(model, size): size is required with a model.")
            return plan.resolve(model, size, rank)
        return plan

    @property
    def resolved(self):
        """False: a `Plan` is a request; `resolve` returns a `ResolvedPlan`."""
        return False

    # -- resolution -------------------------------------------------------- #

    def resolve(self, model, size, rank=0):
        """Resolves the plan against `model` for `size` ranks.

        Four steps: find the structure (attention blocks, column -> row
        pairs), choose a rule per layer (the plan's rules, or the auto plan's),
        cut (attention by heads, pairs, then single layers), and count bytes.

        Args:
            model: a built Keras model.
            size: number of tensor-parallel ranks.
            rank: the rank this plan is for (local shapes, bytes).

        Returns:
            A `ResolvedPlan`.

        Raises:
            ValueError: a rule that cannot apply (a dimension smaller than
                `size`, a rule that does not fit the layer kind); the message
                names the layer, its shape and the sizes that would work.
        """
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int; got {size!r}.")
        if not model.built:
            raise ValueError(
                f"Model {model.name!r} is not built; call it on an input first."
            )
        nodes = walk(model)
        targets = [n for n in nodes if kind_of(n.layer) is not None]
        by_id = {id(n.layer): n.path for n in targets}
        attention = _find_attention(nodes)
        pairs = [([by_id[id(c)] for c in cols], by_id[id(row)])
                 for cols, row in _find_pairs(targets)]

        chosen = self._auto_rules(targets, attention, pairs, size) if self.rules is None \
            else self._match_rules(targets)
        gathered = {p for p, r in chosen.items() if isinstance(r, rules_lib.Column) and r.gather}
        rules = {p: r.shorthand().split(":")[0] for p, r in chosen.items()}

        def fail(path, msg):
            raise ValueError(f"Layer {path!r} (rank {rank} of {size}): {msg}")

        entries, heads = _cut_attention(attention, rules, size, fail)
        _cut_pairs(pairs, rules, gathered, {n.path: n.layer for n in targets}, size, entries,
                   fail)
        _cut_single_layers(targets, rules, size, entries, fail)
        return ResolvedPlan(self, _plan_entries(targets, entries, size), tuple(heads), size,
                            rank, _var_bytes(model.weights))

    def _match_rules(self, targets):
        rules = {}
        for n in targets:
            for pattern, rule in self.rules.items():
                if re.fullmatch(pattern, n.path):
                    rules[n.path] = rule
                    break
        return rules

    def _auto_rules(self, targets, attention, pairs, size):
        rules = {}
        for blk in attention:
            if blk.heads_q >= size and size > 1:
                try:
                    attention_ranges(blk.heads_q, blk.heads_kv, size)
                except ValueError:
                    continue
                for p in blk.q + blk.kv:
                    rules[p] = rules_lib.Column()
                rules[blk.out] = rules_lib.Row()
        taken = set(rules)
        by_path = {n.path: n.layer for n in targets}
        for cols, row in pairs:
            if taken.intersection(cols + [row]):
                continue
            if size > 1 and _linear_dims(by_path[row])[0] >= size:
                rules.update({c: rules_lib.Column() for c in cols})
                rules[row] = rules_lib.Row()
                taken.update(cols + [row])
        for n in targets:
            if n.path in taken or size == 1:
                continue
            kind, shape = kind_of(n.layer), _full_shape(n.layer)
            if kind == "ReversibleEmbedding" and shape[0] >= size:
                rules[n.path] = rules_lib.Vocab()
            elif kind == "Embedding" and shape[0] >= max(size, self.min_vocab_rows):
                rules[n.path] = rules_lib.Vocab()
            elif _linear_dims(n.layer) is not None:
                dims = _linear_dims(n.layer)
                if dims[1] >= size and math.prod(shape) >= self.min_gather_params:
                    rules[n.path] = rules_lib.Column(gather=True)
        return rules

    def _not_resolved(self, *args, **kwargs):
        raise ValueError(
            "This plan is not resolved yet: pass it to tfshard.shard(model, plan=...) "
            "or call plan.resolve(model, size) for a ResolvedPlan."
        )

    # A request has no cuts to report; these say how to get them.
    summary = totals = markdown = communication = local_bytes = to_dict = _not_resolved

    def __repr__(self):
        return f"<Plan {'auto' if self.rules is None else 'rules'} (unresolved)>"


class ResolvedPlan:
    """A plan resolved against a model and a world size: what each layer's cut is.

    Returned by `Plan.resolve` (and `Plan.auto(model, size)`); a sharded
    model's `plan`. Passing it to `tfshard.shard` again resolves its request
    anew for that model.

    Attributes:
        request: the `Plan` it was resolved from.
        entries: one `PlanEntry` per supported layer, in model order.
        attention: `HeadCounts` of the attention blocks cut by heads.
        size: the number of tensor-parallel ranks.
        rank: the rank whose local shapes and bytes the summaries show.
        total_bytes: the unsharded model's bytes.
    """

    resolved = True

    def __init__(self, request, entries, attention, size, rank, total_bytes):
        self.request = request
        self.entries = list(entries)
        self.attention = tuple(attention)
        self.size = size
        self.rank = rank
        self.total_bytes = total_bytes

    @property
    def rules(self):
        """The request's rules (None: the auto plan)."""
        return self.request.rules

    def resolve(self, model, size, rank=0):
        """Resolves this plan's request again (see `Plan.resolve`)."""
        return self.request.resolve(model, size, rank)

    # -- reporting --------------------------------------------------------- #

    @property
    def sharded(self):
        """Entries that are cut (not replicated)."""
        return [e for e in self.entries if e.rule != "replicate"]

    def local_bytes(self, rank=None):
        """Parameter bytes this rank holds after the cut (all variables)."""
        rank = self.rank if rank is None else rank
        sharded_full = sum(e.full_bytes for e in self.sharded)
        return self.total_bytes - sharded_full + sum(e.local_bytes[rank] for e in self.sharded)

    def communication(self):
        """The collectives one forward pass makes, per cut layer, in Megatron's terms.

        A row-parallel layer all-reduces its output; a vocab-parallel lookup
        all-reduces the embeddings; a column-parallel layer that gathers its
        output all-gathers it; a vocab-parallel `ReversibleEmbedding` also
        all-gathers the logits when called with `reverse=True` (tied LM heads).

        Returns:
            A list of `(path, collective, elements_per_token)`, where
            `collective` is "all-reduce", "all-gather" or "all-gather (logits)"
            and `elements_per_token` the size of the full result per token.
        """
        out = []
        for e in self.sharded:
            if e.rule == "row":
                out.append((e.path, "all-reduce", int(e.full_shape[-1])))
            elif e.rule == "vocab":
                out.append((e.path, "all-reduce", int(e.full_shape[-1])))
                if e.kind == "ReversibleEmbedding":
                    out.append((e.path, "all-gather (logits)", int(e.full_shape[0])))
            elif e.gather_output:
                out.append((e.path, "all-gather", int(np.prod(e.full_shape[1:]))))
        return out

    def _rows(self, rank):
        """Header and one row of cells per layer, shared by `summary` and `markdown`."""
        by_path = {}
        for path, op, n in self.communication():
            by_path.setdefault(path, []).append(f"{op} {n}")
        yield ("layer", "kind", "rule", "full shape", "local shape", "bytes here",
               "collective/token", "note")
        for e in self.entries:
            yield (e.path, e.kind, e.rule + (":gather" if e.gather_output else ""),
                   str(e.full_shape), str(e.local_shape(rank)), _fmt_bytes(e.local_bytes[rank]),
                   ", ".join(by_path.get(e.path, [])), e.note)

    def totals(self, rank=None):
        """Two lines: this rank's bytes (sharded, replicated, total) and the collectives
        of one forward pass (count and fp32 bytes per token)."""
        rank = self.rank if rank is None else rank
        sharded_full = sum(e.full_bytes for e in self.sharded)
        sharded_local = sum(e.local_bytes[rank] for e in self.sharded)
        replicated = self.total_bytes - sharded_full
        memory = (
            f"rank {rank} of {self.size}: sharded {_fmt_bytes(sharded_full)} -> "
            f"{_fmt_bytes(sharded_local)} here; replicated {_fmt_bytes(replicated)}; "
            f"total here {_fmt_bytes(sharded_local + replicated)} of "
            f"{_fmt_bytes(self.total_bytes)} unsharded "
            f"({len(self.sharded)} of {len(self.entries)} layers cut)"
        )
        return [memory, _communication_line(self.communication())]

    def markdown(self, rank=None):
        """The plan as a markdown table (TensorBoard's text dashboard renders it).

        Args:
            rank: whose local shapes and bytes to show (default: this plan's rank).

        Returns:
            The table (the columns of `summary`), then the `totals` lines.
        """
        rank = self.rank if rank is None else rank
        header, *rows = self._rows(rank)
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines + [""] + self.totals(rank))

    def summary(self, rank=None):
        """A table of the plan: layer path, rule, full shape, local shape, bytes.

        Args:
            rank: whose local shapes and bytes to show (default: this plan's rank).

        Returns:
            The table as a string, then the `totals` lines: sharded and
            replicated bytes, and the collectives of one forward pass (count
            and fp32 bytes per token).
        """
        rank = self.rank if rank is None else rank
        rows = list(self._rows(rank))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.append("-" * len(lines[0]))
        return "\n".join(lines + self.totals(rank))

    def to_dict(self):
        """A JSON-able description of the resolved plan."""
        return {
            "size": self.size,
            "entries": [
                {"path": e.path, "kind": e.kind, "rule": e.rule, "axis": e.axis,
                 "ranges": [list(r) for r in e.ranges] if e.ranges else None,
                 "gather_output": e.gather_output, "input_is_parallel": e.input_is_parallel,
                 "full_shape": list(e.full_shape)}
                for e in self.entries
            ],
            "attention": [dataclasses.asdict(h) for h in self.attention],
        }

    def __repr__(self):
        return f"<ResolvedPlan size={self.size} cut={len(self.sharded)}/{len(self.entries)}>"


# --------------------------------------------------------------------------- #
# Resolution steps (Plan.resolve)
# --------------------------------------------------------------------------- #


def _cut_attention(attention, rules, size, fail):
    """Attention blocks whose q/k/v are ruled column and output row: cut by heads.

    Returns:
        `(entries, heads)`: `{path: cut}` of the blocks' projections and their
        `HeadCounts`.
    """
    entries, heads = {}, []
    for blk in attention:
        members = blk.q + blk.kv + [blk.out]
        want = all(rules.get(p) == "column" for p in blk.q + blk.kv) and rules.get(blk.out) == "row"
        if not want:
            continue
        try:
            q_r, kv_r = attention_ranges(blk.heads_q, blk.heads_kv, size)
        except ValueError as e:
            fail(blk.parent_path,
                 f"attention with {blk.heads_q} query / {blk.heads_kv} K/V heads cannot be "
                 f"cut over {size} ranks ({e}); sizes that work: 1..{blk.heads_q}. "
                 "Replicate its projections or use fewer ranks.")
        for p in members:
            r = q_r if (p in blk.q or p == blk.out) else kv_r
            entries[p] = dict(rule=rules[p], axis=blk.axes[p], ranges=r,
                              input_is_parallel=(p == blk.out),
                              note=f"attention {blk.heads_q}q/{blk.heads_kv}kv heads")
        heads.append(HeadCounts(blk.parent_path, blk.heads_q, blk.heads_kv, q_r, kv_r,
                                blk.head_dim))
    return entries, heads


def _cut_pairs(pairs, rules, gathered, layers, size, entries, fail):
    """Column -> row pairs ruled so: the column outputs stay local, the row
    input is parallel (Megatron's MLP). Adds to `entries`."""
    in_attention = set(entries)
    for cols, row in pairs:
        if row in in_attention or any(c in in_attention for c in cols):
            continue
        paired = rules.get(row) == "row" and all(rules.get(c) == "column" and c not in gathered
                                                  for c in cols)
        if not paired:
            continue
        width = _linear_dims(layers[row])[0]
        if width < size:
            fail(row, f"the paired width {width} is smaller than {size} ranks; "
                      f"sizes that work: 1..{width}.")
        r = even_ranges(width, size)
        for c in cols:
            entries[c] = dict(rule="column", axis=_linear_dims(layers[c])[3],
                              ranges=r, note=f"pair -> {row.rsplit('/', 1)[-1]}")
        entries[row] = dict(rule="row", axis=_linear_dims(layers[row])[2], ranges=r,
                            input_is_parallel=True, note="pair (input parallel)")


def _cut_single_layers(targets, rules, size, entries, fail):
    """Every other ruled layer on its own: vocab tables, gathered columns, rows
    that slice their own input. Adds to `entries`."""
    for n in targets:
        p, layer, kind = n.path, n.layer, kind_of(n.layer)
        rule = rules.get(p, "replicate")
        if p in entries or rule == "replicate":
            continue
        shape = _full_shape(layer)
        if kind in ("Embedding", "ReversibleEmbedding"):
            if rule != "vocab":
                fail(p, f"{kind} {shape} takes 'vocab' or 'replicate', not {rule!r}.")
            if shape[0] < size:
                fail(p, f"vocab {shape[0]} is smaller than {size} ranks; sizes that work: "
                        f"1..{shape[0]}, or replicate it.")
            entries[p] = dict(rule="vocab", axis=0, ranges=even_ranges(shape[0], size),
                              note="vocab-parallel")
            continue
        if rule == "vocab":
            fail(p, f"{kind} {shape} cannot take 'vocab'; use column, row or replicate.")
        if kind == "Dense":
            axis = 1 if rule == "column" else 0
        else:
            free, contracted = einsum_axes(layer.equation)
            pool = free if rule == "column" else contracted
            if not pool:
                fail(p, f"equation {layer.equation!r} has no {rule} axis to cut.")
            axis = pool[0]
        if shape[axis] < size:
            fail(p, f"kernel {shape} axis {axis} has {shape[axis]} < {size} ranks; sizes "
                    f"that work: 1..{shape[axis]}, or replicate it.")
        entries[p] = dict(rule=rule, axis=axis, ranges=even_ranges(shape[axis], size),
                          gather_output=(rule == "column"), input_is_parallel=False,
                          note="gathered" if rule == "column" else "slices its input")


def _plan_entries(targets, entries, size):
    """A `PlanEntry` for every supported layer (replicated ones too), with bytes."""
    out = []
    for n in targets:
        p, layer = n.path, n.layer
        shape = _full_shape(layer)
        full_bytes = _var_bytes(layer.weights) if getattr(layer, "shard_spec", None) is None else None
        e = entries.get(p)
        if full_bytes is None:
            raise ValueError(f"Layer {p!r} is already sharded; shard a fresh model.")
        if e is None:
            out.append(PlanEntry(p, kind_of(layer), "replicate", full_shape=shape,
                                 full_bytes=full_bytes, local_bytes=(full_bytes,) * size))
            continue
        local = tuple(_local_bytes(layer, e, r) for r in range(size))
        out.append(PlanEntry(p, kind_of(layer), e["rule"], e["axis"], tuple(e["ranges"]),
                             bool(e.get("gather_output", False)),
                             bool(e.get("input_is_parallel", False)),
                             shape, full_bytes, local, e.get("note", "")))
    return out


def _communication_line(ops):
    """One line totalling a forward pass's collectives (fp32 bytes per token)."""
    if not ops:
        return "per forward: no collectives"
    parts = []
    for op in ("all-reduce", "all-gather", "all-gather (logits)"):
        sizes = [n for _, o, n in ops if o == op]
        if sizes:
            parts.append(f"{len(sizes)} {op}{'s' if len(sizes) > 1 and '(' not in op else ''} "
                         f"({_fmt_bytes(4 * sum(sizes))}/token)")
    tied = any(o == "all-gather (logits)" for _, o, _ in ops)
    return ("per forward: " + ", ".join(parts) + " in fp32"
            + ("; the logits gather only when a tied head computes logits" if tied else ""))


def _local_bytes(layer, e, rank):
    a, b = e["ranges"][rank]
    total = 0
    for v in layer.weights:
        n = int(np.prod(v.shape))
        itemsize = np.dtype(v.dtype).itemsize
        vname = v.name.rsplit("/", 1)[-1]
        if vname in ("kernel", "embeddings"):
            total += n // v.shape[e["axis"]] * (b - a) * itemsize
        elif vname == "reverse_embeddings":
            total += n // v.shape[1] * (b - a) * itemsize
        elif vname == "bias" and e["rule"] == "column":
            total += _column_bias_bytes(layer, e, v, a, b)
        else:
            total += n * itemsize
    return total


def _column_bias_bytes(layer, e, var, a, b):
    itemsize = np.dtype(var.dtype).itemsize
    n = int(np.prod(var.shape))
    if kind_of(layer) == "Dense":
        return (b - a) * itemsize
    axis = bias_axis(layer.equation, layer.bias_axes, e["axis"])
    if axis is None:
        return n * itemsize
    return n // var.shape[axis] * (b - a) * itemsize


def _fmt_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
