"""The result of planning one layer (`PlanEntry`) and one attention block (`HeadCounts`)."""

import dataclasses

import numpy as np

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
        dtype: the main weight's dtype ("float32", "bfloat16", ...).
        compute_dtype: the dtype of the layer's outputs, which its collectives carry.
    """

    kind: str = ""
    full_bytes: int = 0
    local_bytes: tuple = ()
    note: str = ""
    dtype: str = "float32"
    compute_dtype: str = "float32"

    def wire_itemsize(self, collective):
        """Bytes per element `collective` moves: all-gathers carry the output's
        dtype; all-reduces of 16-bit floats are summed (and sent) in float32."""
        size = np.dtype(self.compute_dtype).itemsize
        return max(size, 4) if collective == "all-reduce" and size < 4 else size


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
