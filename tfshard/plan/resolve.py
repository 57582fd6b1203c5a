"""`Plan`, the request, and `Plan.resolve`: rules by layer path or by structure, then cut.

Resolving matches rules on layer paths or chooses them by structure, then cuts
(attention by heads, column -> row pairs, single layers) and counts the bytes.

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

import math
import re

from tfshard import rules as rules_lib
from tfshard.layers import check_quantization, even_ranges, kind_of, walk
from tfshard.layers.int4 import alignment
from tfshard.layers.einsum_dense import einsum_axes
from tfshard.plan.entries import HeadCounts, PlanEntry
from tfshard.plan.resolved import ResolvedPlan
from tfshard.plan.structure import (attention_ranges, find_attention, find_pairs, full_shape,
                                    linear_dims, main_dtype, slice_bytes, var_bytes)


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
                names the layer, its shape and the sizes that would work. The
                auto plan also refuses layers quantized in a mode tfshard does
                not cut (int4, float8, GPTQ, AWQ); explicit rules may replicate them.
        """
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int; got {size!r}.")
        if not model.built:
            raise ValueError(
                f"Model {model.name!r} is not built; call it on an input first."
            )
        nodes = walk(model)
        targets = [n for n in nodes if kind_of(n.layer) is not None]
        if self.rules is None and size > 1:
            # The auto plan would silently replicate what it cannot cut: say so instead.
            for n in targets:
                check_quantization(n.layer, n.path)
        by_id = {id(n.layer): n.path for n in targets}
        attention = find_attention(nodes)
        pairs = [([by_id[id(c)] for c in cols], by_id[id(row)])
                 for cols, row in find_pairs(targets)]

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
                            rank, var_bytes(model.weights))

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
            if size > 1 and linear_dims(by_path[row])[0] >= size:
                rules.update({c: rules_lib.Column() for c in cols})
                rules[row] = rules_lib.Row()
                taken.update(cols + [row])
        for n in targets:
            if n.path in taken or size == 1:
                continue
            kind, shape = kind_of(n.layer), full_shape(n.layer)
            if kind == "ReversibleEmbedding" and shape[0] >= size:
                rules[n.path] = rules_lib.Vocab()
            elif kind == "Embedding" and shape[0] >= max(size, self.min_vocab_rows):
                rules[n.path] = rules_lib.Vocab()
            elif linear_dims(n.layer) is not None:
                dims = linear_dims(n.layer)
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
        width = linear_dims(layers[row])[0]
        if width < size:
            fail(row, f"the paired width {width} is smaller than {size} ranks; "
                      f"sizes that work: 1..{width}.")
        align = max(alignment(layers[c], linear_dims(layers[c])[3]) for c in cols)
        try:
            r = even_ranges(width, size, align)
        except ValueError as e:
            fail(row, f"the paired width {width} cannot be cut for int4's packed columns ({e}); "
                      "use fewer ranks or replicate the pair.")
        for c in cols:
            entries[c] = dict(rule="column", axis=linear_dims(layers[c])[3],
                              ranges=r, note=f"pair -> {row.rsplit('/', 1)[-1]}")
        entries[row] = dict(rule="row", axis=linear_dims(layers[row])[2], ranges=r,
                            input_is_parallel=True, note="pair (input parallel)")


def _cut_single_layers(targets, rules, size, entries, fail):
    """Every other ruled layer on its own: vocab tables, gathered columns, rows
    that slice their own input. Adds to `entries`."""
    for n in targets:
        p, layer, kind = n.path, n.layer, kind_of(n.layer)
        rule = rules.get(p, "replicate")
        if p in entries or rule == "replicate":
            continue
        shape = full_shape(layer)
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
        align = alignment(layer, axis) if rule == "column" else 1
        try:
            ranges = even_ranges(shape[axis], size, align)
        except ValueError as e:
            fail(p, f"kernel {shape} axis {axis} cannot be cut for int4's packed columns ({e}); "
                    "use fewer ranks or replicate it.")
        entries[p] = dict(rule=rule, axis=axis, ranges=ranges,
                          gather_output=(rule == "column"), input_is_parallel=False,
                          note="gathered" if rule == "column" else "slices its input")


def _plan_entries(targets, entries, size):
    """A `PlanEntry` for every supported layer (replicated ones too), with bytes."""
    out = []
    for n in targets:
        p, layer = n.path, n.layer
        shape = full_shape(layer)
        full_bytes = var_bytes(layer.weights) if getattr(layer, "shard_spec", None) is None else None
        e = entries.get(p)
        dtypes = {"dtype": main_dtype(layer), "compute_dtype": str(layer.compute_dtype)}
        if full_bytes is None:
            raise ValueError(f"Layer {p!r} is already sharded; shard a fresh model.")
        if e is None:
            out.append(PlanEntry(path=p, kind=kind_of(layer), rule="replicate", full_shape=shape,
                                 full_bytes=full_bytes, local_bytes=(full_bytes,) * size,
                                 **dtypes))
            continue
        check_quantization(layer, p)  # before its bytes: a refused mode is named here
        local = tuple(slice_bytes(layer, e, r) for r in range(size))
        out.append(PlanEntry(path=p, kind=kind_of(layer), rule=e["rule"], axis=e["axis"],
                             ranges=tuple(e["ranges"]),
                             gather_output=bool(e.get("gather_output", False)),
                             input_is_parallel=bool(e.get("input_is_parallel", False)),
                             full_shape=shape, full_bytes=full_bytes, local_bytes=local,
                             note=e.get("note", ""), **dtypes))
    return out
