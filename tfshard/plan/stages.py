"""Pipeline stages: which contiguous run of blocks each stage holds, balanced by cost.

A model is cut into blocks at tensors where exactly one activation crosses
(`tfshard.pipeline.cut`: the transformer layers of a keras-hub backbone, or
such points of a plain functional graph). This module chooses the stage
boundaries: contiguous runs of blocks whose estimated costs are as even as
possible (the stage with the largest cost sets the pipeline's pace), or the
counts the user forces with `pipeline_split`.
"""

import dataclasses

from tfshard.plan.resolved import format_bytes


@dataclasses.dataclass(frozen=True)
class Block:
    """One block of the model, the unit of a stage.

    Attributes:
        name: the block's name (its last layer, e.g. "transformer_layer_3").
        layers: the paths of the layers it runs.
        bytes: the bytes of its weights (unsharded).
        cost: its estimated cost: multiply-adds per token (2 x the weights its
            matmuls read), or the measured seconds when measured.
    """

    name: str
    layers: tuple
    bytes: int
    cost: float


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """The pipeline: stage `s` runs blocks `bounds[s][0]` to `bounds[s][1] - 1`.

    Attributes:
        blocks: the model's `Block`s, in order.
        bounds: per stage, `(first block, end block)`.
        forced: whether `pipeline_split` set the bounds (else balanced).
        cost_unit: what `Block.cost` counts ("FLOPs/token" or "s").
        by: what the bounds balance: "compute" (the blocks' costs) or "memory"
            (the bytes each stage holds).
    """

    blocks: tuple
    bounds: tuple
    forced: bool = False
    cost_unit: str = "FLOPs/token"
    by: str = "compute"

    @property
    def stages(self):
        return len(self.bounds)

    def blocks_of(self, stage):
        """The `Block`s of `stage`."""
        start, stop = self.bounds[stage]
        return self.blocks[start:stop]

    def cost(self, stage):
        return sum(b.cost for b in self.blocks_of(stage))

    def bytes(self, stage):
        return sum(b.bytes for b in self.blocks_of(stage))

    def imbalance(self, by="compute"):
        """The largest stage's cost (by="memory": bytes) over the mean (1.0: even)."""
        measure = self.bytes if by == "memory" else self.cost
        values = [measure(s) for s in range(self.stages)]
        mean = sum(values) / len(values)
        return max(values) / mean if mean else 1.0

    def rows(self):
        """Header and one row per stage: blocks, bytes, cost and share of the cost."""
        total = sum(self.cost(s) for s in range(self.stages)) or 1.0
        rows = [("stage", "blocks", "count", "bytes", f"cost ({self.cost_unit})", "share")]
        for s in range(self.stages):
            blocks = self.blocks_of(s)
            span = blocks[0].name if len(blocks) == 1 else f"{blocks[0].name} .. {blocks[-1].name}"
            cost = self.cost(s)
            rows.append((str(s), span, str(len(blocks)), format_bytes(self.bytes(s)),
                         f"{cost:.3g}", f"{100 * cost / total:.1f}%"))
        return rows

    def summary(self):
        """The stage table as text, then how even it is and how it was chosen."""
        rows = self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        how = ("forced by pipeline_split" if self.forced else "balanced by bytes held"
               if self.by == "memory" else f"balanced by {self.cost_unit}")
        lines.append(f"{self.stages} pipeline stages, {how}; slowest stage / mean: "
                     f"{self.imbalance():.2f}; largest stage / mean bytes: "
                     f"{self.imbalance('memory'):.2f}")
        return "\n".join(lines)

    def to_dict(self):
        return {"blocks": [b.name for b in self.blocks], "bounds": [list(b) for b in self.bounds],
                "costs": [b.cost for b in self.blocks], "bytes": [b.bytes for b in self.blocks],
                "forced": self.forced, "by": self.by}


def balance(costs, stages):
    """Contiguous runs of `costs` into `stages` parts, minimising the largest part's sum.

    The linear-partition dynamic program (O(stages * n^2)); ties go to the
    earlier boundary, so every rank computes the same split.

    Args:
        costs: one non-negative cost per block.
        stages: the number of parts (1 <= stages <= len(costs)).

    Returns:
        `[(start, stop)]` per part, each non-empty.
    """
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[k][i]: the smallest largest-part sum of blocks [0, i) in k parts.
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i] - 1e-12 * max(1.0, abs(value)):
                    best[k][i], cut[k][i] = value, j
    bounds, i = [], n
    for k in range(stages, 0, -1):
        j = cut[k][i]
        bounds.append((j, i))
        i = j
    return tuple(reversed(bounds))


#: What `plan_stages` can balance: the blocks' costs, or the bytes each stage holds.
BALANCES = ("compute", "memory")


def check_balance(by):
    """Raises ValueError, naming the choices, unless `by` is one of `BALANCES`."""
    if by not in BALANCES:
        raise ValueError(f"pipeline_balance={by!r}: use one of {', '.join(map(repr, BALANCES))}.")


def plan_stages(blocks, stages, split=None, cost_unit="FLOPs/token", by="compute"):
    """Chooses the stage boundaries.

    Args:
        blocks: the model's `Block`s.
        stages: the number of pipeline stages.
        split: None (balance), or one block count per stage, summing to the
            number of blocks (`pipeline_split`).
        cost_unit: what the blocks' costs count.
        by: "compute" balances the blocks' costs (the pipeline's pace);
            "memory" the bytes each stage holds (the largest rank's memory).

    Returns:
        A `StagePlan`.

    Raises:
        ValueError: more stages than blocks, or a `split` of the wrong length,
            with a count below 1, or not summing to the blocks (the message
            lists the blocks), or `by` not in `BALANCES`.
    """
    check_balance(by)
    blocks = tuple(blocks)
    names = [b.name for b in blocks]
    if not isinstance(stages, int) or stages < 1 or stages > len(blocks):
        raise ValueError(
            f"pipeline={stages!r}: the model has {len(blocks)} block(s) a stage can start at "
            f"({_short(names)}); use 1 to {len(blocks)} stages.")
    if split is None:
        costs = [b.bytes for b in blocks] if by == "memory" else [b.cost for b in blocks]
        if not any(costs):
            costs = [b.bytes or 1 for b in blocks]
        return StagePlan(blocks, balance(costs, stages), False, cost_unit, by)
    split = list(split)
    if (len(split) != stages or any(not isinstance(c, int) or c < 1 for c in split)
            or sum(split) != len(blocks)):
        raise ValueError(
            f"pipeline_split={split!r}: give {stages} positive block counts (one per stage) "
            f"summing to the model's {len(blocks)} blocks ({_short(names)}).")
    bounds, start = [], 0
    for c in split:
        bounds.append((start, start + c))
        start += c
    return StagePlan(blocks, tuple(bounds), True, cost_unit, by)


def _short(names, limit=6):
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:3]) + ", ..., " + ", ".join(names[-2:])
