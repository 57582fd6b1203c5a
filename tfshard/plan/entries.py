"""The result of planning one layer (`PlanEntry`) and one attention block (`HeadCounts`)."""

import dataclasses

from tfshard.layers import ShardSpec


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
