"""The result of planning one layer (`PlanEntry`) and one attention block (`HeadCounts`)."""

import dataclasses

from tfshard.layers import ShardSpec


@dataclasses.dataclass(frozen=True)
class PlanEntry(ShardSpec):
    """One layer's cut: its `ShardSpec` plus what the planner measured.

    A `PlanEntry` is the spec the sharded layer is built from
    (`shard_layer(layer, entry, comm)`); the fields below are the planner's own.

    Attributes:
        path, rule, axis, ranges, gather_output, input_is_parallel, full_shape:
            the `ShardSpec` (rule "replicate": axis and ranges None).
        kind: "Dense", "EinsumDense", "Embedding" or "ReversibleEmbedding".
        full_bytes: bytes of all the layer's variables, unsharded.
        local_bytes: per-rank bytes of the layer's variables after the cut.
        note: why the planner chose this.
    """

    kind: str = ""
    full_bytes: int = 0
    local_bytes: tuple = ()
    note: str = ""


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
