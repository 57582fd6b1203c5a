"""Sharded layers: one layer kind a file, each converting a built Keras layer in place."""

import keras

from tfshard.layers.base import ShardSpec, even_ranges
from tfshard.layers import dense, einsum_dense, embedding
from tfshard.layers.dense import ColumnParallelDense, RowParallelDense, shard_dense
from tfshard.layers.einsum_dense import ParallelEinsumDense, einsum_axes, shard_einsum_dense
from tfshard.layers.embedding import (
    VocabParallelEmbedding,
    VocabParallelReversibleEmbedding,
    shard_embedding,
)
from tfshard.layers.quantized import check_quantization
from tfshard.layers.tree import Node, kind_of, walk


def shard_layer(layer, spec, comm, path="", rank=None):
    """Converts one built layer in place according to `spec`.

    Args:
        layer: a built Dense, EinsumDense, Embedding or ReversibleEmbedding.
        spec: its `ShardSpec` (a `PlanEntry` is one), with a cut rule.
        comm: the `Communicator` of the tensor-parallel group.
        path: layer path for error messages.
        rank: the rank whose slice the layer keeps; default `comm.rank`.

    Returns:
        The same layer object, sharded.

    Raises:
        TypeError: the layer is not of a supported kind.
        ValueError: `spec` replicates the layer, or has no range for `rank`.
    """
    rank = comm.rank if rank is None else rank
    if not spec.is_cut:
        raise ValueError(f"Layer {path!r}: its spec replicates it; there is nothing to cut.")
    spec.bounds(rank)  # a rank outside the spec's ranges is named here
    if isinstance(layer, keras.layers.Embedding):
        return shard_embedding(layer, spec, rank, comm, path)
    if isinstance(layer, keras.layers.EinsumDense):
        return shard_einsum_dense(layer, spec, rank, comm, path)
    if isinstance(layer, keras.layers.Dense):
        return shard_dense(layer, spec, rank, comm, path)
    raise TypeError(
        f"Layer {path!r} is a {type(layer).__name__}; tfshard shards Dense, EinsumDense, "
        "Embedding and ReversibleEmbedding. Use the 'replicate' rule for it."
    )


def variable_cuts(layer, spec):
    """How each weight of a layer is cut with `spec` (float, int8 or int4).

    Args:
        layer: a built, unsharded Dense, EinsumDense, Embedding or ReversibleEmbedding.
        spec: its `ShardSpec` (a cut rule), in the unpacked main weight's shape.

    Returns:
        `[(attribute, name, axis, ranges)]` in Keras's serialization order: each
        weight's cut axis (None: held whole) and every rank's range on it -- the
        spec's ranges, or int4's packed and flattened ones (`tfshard.layers.int4`).

    Raises:
        ValueError: an int4 cut that splits a packed byte or is not a block of the
            packed kernel.
    """
    if isinstance(layer, keras.layers.Embedding):
        return embedding.variable_cuts(layer, spec)
    if isinstance(layer, keras.layers.EinsumDense):
        return einsum_dense.variable_cuts(layer, spec)
    return dense.variable_cuts(layer, spec)


__all__ = [
    "variable_cuts", "check_quantization",
    "ShardSpec", "even_ranges", "shard_layer", "Node", "kind_of", "walk",
    "ColumnParallelDense", "RowParallelDense", "ParallelEinsumDense",
    "VocabParallelEmbedding", "VocabParallelReversibleEmbedding", "einsum_axes",
]
