"""The layer tree of a Keras model, as the planner and the runtime walk it."""

import dataclasses

import keras


@dataclasses.dataclass
class Node:
    """A layer found by `walk`: the layer, its path and its parent layer."""

    layer: object
    path: str
    parent: object


def _layer_path(layer, parent_path):
    path = getattr(layer, "path", None)
    if path:
        return path
    return f"{parent_path}/{layer.name}" if parent_path else layer.name


def walk(model):
    """Every layer below `model` once, depth first, with its path and parent."""
    nodes, seen = [], {id(model)}

    def visit(layer, parent_path):
        for child in getattr(layer, "_layers", []):
            if id(child) in seen or not isinstance(child, keras.layers.Layer):
                continue
            seen.add(id(child))
            path = _layer_path(child, parent_path)
            nodes.append(Node(child, path, layer))
            visit(child, path)

    visit(model, "")
    return nodes


def kind_of(layer):
    """The supported kind of a layer, or None."""
    if isinstance(layer, keras.layers.ReversibleEmbedding):
        return "ReversibleEmbedding"
    if isinstance(layer, keras.layers.Embedding):
        return "Embedding"
    if isinstance(layer, keras.layers.EinsumDense):
        return "EinsumDense"
    if isinstance(layer, keras.layers.Dense):
        return "Dense"
    return None
