"""Sharded layers: one layer kind a file, each converting a built Keras layer in place."""

import keras

from tfshard.layers.base import ShardSpec, even_ranges
from tfshard.layers.dense import ColumnParallelDense, RowParallelDense, shard_dense
from tfshard.layers.einsum_dense import ParallelEinsumDense, einsum_axes, shard_einsum_dense
from tfshard.layers.embedding import (
    VocabParallelEmbedding,
    VocabParallelReversibleEmbedding,
    shard_embedding,
)
from tfshard.layers.tree import Node, kind_of, walk


def shard_layer(layer, spec, comm, path=""):
    """Converts one built layer in place according to `spec`.

    Args:
        layer: a built Dense, EinsumDense, Embedding or ReversibleEmbedding.
        spec: its `ShardSpec` on this rank.
        comm: the `Communicator`.
        path: layer path for error messages.

    Returns:
        The same layer object, sharded.

    Raises:
        TypeError: the layer is not of a supported kind.
    """
    if isinstance(layer, keras.layers.Embedding):
        return shard_embedding(layer, spec, comm, path)
    if isinstance(layer, keras.layers.EinsumDense):
        return shard_einsum_dense(layer, spec, comm, path)
    if isinstance(layer, keras.layers.Dense):
        return shard_dense(layer, spec, comm, path)
    raise TypeError(
        f"Layer {path!r} is a {type(layer).__name__}; tfshard shards Dense, EinsumDense, "
        "Embedding and ReversibleEmbedding. Use the 'replicate' rule for it."
    )


__all__ = [
    "ShardSpec", "even_ranges", "shard_layer", "Node", "kind_of", "walk",
    "ColumnParallelDense", "RowParallelDense", "ParallelEinsumDense",
    "VocabParallelEmbedding", "VocabParallelReversibleEmbedding", "einsum_axes",
]
