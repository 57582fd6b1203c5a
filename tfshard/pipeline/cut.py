"""Cutting a Keras model into pipeline stages: blocks, cut tensors, stage programs.

A stage boundary is a tensor of the model's graph where exactly one activation
crosses: everything after it depends only on it and on the model's inputs
(which every rank holds). The stages are then Keras models of their own, built
from the original graph (`keras.Model(inputs + [cut], next cut)`), sharing the
original layers, so nothing is copied.

- keras-hub backbones: the outputs of `transformer_layers` (the embeddings go
  with the first stage, the final norm with the last).
- keras-hub tasks (a CausalLM, a classifier): their backbone is cut; the task's
  layers after the backbone (the LM head, the classifier) go with the last stage.
- Plain functional and Sequential models: every layer output that no later
  layer bypasses (no layer would run in two stages).
"""

import dataclasses

import keras
import numpy as np

from tfshard.layers import kind_of, walk
from tfshard.plan.stages import Block
from tfshard.plan.structure import var_bytes


class CutError(ValueError):
    """The model cannot be cut into pipeline stages (the message says why)."""


@dataclasses.dataclass
class Graph:
    """The model seen as a chain of blocks.

    Attributes:
        model: the model.
        trunk: the functional model that is cut (the model, or its backbone).
        head: for a keras-hub task, a Keras model of the task's layers after
            the backbone (inputs: the task's inputs + the backbone's outputs).
        cuts: the cut tensors of `trunk`'s graph, one fewer than the blocks.
        blocks: the `Block`s.
        lookups: `{input name: (layer name, rows)}` of the embeddings that read a
            model input directly (their ids are checked before a batch enters the
            pipeline: only the first stage runs them).
    """

    model: object
    trunk: object
    head: object
    cuts: list
    blocks: list
    lookups: dict = dataclasses.field(default_factory=dict)


def _functional(model):
    """Whether `model` has a graph to cut (functional, Sequential, keras-hub)."""
    if not isinstance(model, keras.Model):
        return False
    try:
        return bool(model.inputs) and bool(model.outputs)
    except (AttributeError, ValueError):
        return False


def _own_layers(model):
    """The layers a functional model runs (not its Input layers), by identity."""
    return {id(l): l for l in model.layers if not isinstance(l, keras.layers.InputLayer)}


def _submodel(inputs, outputs, name):
    return keras.Model(inputs, outputs, name=name)


def _trunk_and_head(model):
    """`(trunk, head)`: a keras-hub task's backbone and its head, or `(model, None)`."""
    if not _functional(model):
        raise CutError(
            f"{model.name!r} is a subclassed {type(model).__name__}; tfshard cuts pipeline "
            "stages from a functional graph (a functional or Sequential model, or a keras-hub "
            "backbone or task). Build it functionally, or use tensor_parallel alone.")
    backbone = getattr(model, "backbone", None)
    if backbone is None or not _functional(backbone) or backbone is model:
        return model, None
    nodes = [n for n in getattr(backbone, "_inbound_nodes", [])]
    if len(nodes) != 1:
        raise CutError(f"{model.name!r}: its backbone {backbone.name!r} is called "
                       f"{len(nodes)} times in its graph; a stage boundary needs one call.")
    names = {t.name for t in model.inputs}
    missing = [t.name for t in backbone.inputs if t.name not in names]
    if missing:
        raise CutError(f"{model.name!r}: the backbone's inputs {missing} are not inputs of the "
                       f"task ({sorted(names)}); tfshard hands each stage the task's inputs.")
    head = _submodel(list(model.inputs) + list(nodes[0].output_tensors), model.outputs,
                     f"{model.name}_head")
    return backbone, head


def _candidates(trunk):
    """Tensors of `trunk` a stage could start after, in order."""
    layers = getattr(trunk, "transformer_layers", None)
    if isinstance(layers, (list, tuple)) and layers:
        return [l.output for l in layers[:-1]], [l.name for l in layers]
    outputs = {id(t) for t in keras.tree.flatten(trunk.outputs)}
    cands, names = [], []
    for layer in trunk.layers:
        if isinstance(layer, keras.layers.InputLayer) or len(layer._inbound_nodes) != 1:
            continue
        out = layer._inbound_nodes[0].output_tensors
        if len(out) != 1 or id(out[0]) in outputs:
            continue
        cands.append(out[0])
        names.append(layer.name)
    return cands, names + [trunk.layers[-1].name]


def check_cut(trunk, tensor):
    """Whether a stage may start after `tensor`: the part after it needs only it and the
    inputs (no layer would run on both sides)."""
    lower = _own_layers(_submodel(trunk.inputs, tensor, "lower"))
    upper = _own_layers(_submodel(list(trunk.inputs) + [tensor], trunk.outputs, "upper"))
    return not set(lower) & set(upper), lower, upper


def _paths(layers):
    out = set()
    for layer in layers:
        for sub in [layer] + [n.layer for n in walk(layer)]:
            out.add(getattr(sub, "path", None) or sub.name)
    return out


def graph_of(model, splits=None):
    """The model as a chain of blocks (see the module docstring).

    Args:
        model: the built model.
        splits: `(producers, consumers)`: paths of the layers whose output the
            tensor-parallel plan leaves cut across ranks (a column layer without
            gather) and of those that take such a cut input (a row layer). No
            stage may start where a producer's output has not met its consumer.

    Raises:
        CutError: the model is subclassed (no graph to cut), or has no point
            where one tensor crosses.
    """
    trunk, head = _trunk_and_head(model)
    candidates, names = _candidates(trunk)
    keras_hub_layers = getattr(trunk, "transformer_layers", None) is not None
    cuts, groups, seen = [], [], set()
    producers, consumers = splits or (set(), set())
    for tensor in candidates:
        ok, lower, _ = (True, None, None) if keras_hub_layers else check_cut(trunk, tensor)
        if not ok:
            continue
        if lower is not None and producers:
            paths = _paths(lower.values())
            if len(paths & set(producers)) != len(paths & set(consumers)):
                continue  # the activation here is cut across the tensor-parallel ranks
        if lower is None:
            lower = _own_layers(_submodel(trunk.inputs, tensor, "lower"))
        groups.append([l for k, l in lower.items() if k not in seen])
        seen |= set(lower)
        cuts.append(tensor)
    rest = [l for k, l in _own_layers(trunk).items() if k not in seen]
    if not cuts:
        raise CutError(
            f"{model.name!r} has no point where a single tensor crosses between its layers "
            "(every later layer also reads an earlier one's output), so it cannot be cut into "
            "pipeline stages; use tensor_parallel alone.")
    block_names = [g[-1].name if g else f"block_{i}" for i, g in enumerate(groups)]
    block_names.append(names[-1] if keras_hub_layers else (rest[-1].name if rest else "output"))
    groups.append(rest)
    head_layers = list(_own_layers(head).values()) if head is not None else []
    blocks = []
    for i, (name, group) in enumerate(zip(block_names, groups)):
        last = i == len(groups) - 1
        cost = sum(_flops(l, reverse=False) for l in group)
        size = sum(var_bytes(l.weights) for l in group)
        paths = [l.name for l in group]
        if last and head_layers:
            cost += sum(_flops(l, reverse=True) for l in head_layers)
            size += sum(var_bytes(l.weights) for l in head_layers if l not in group)
            paths += [f"head:{l.name}" for l in head_layers]
            name = f"{name} + head"
        blocks.append(Block(name, tuple(paths), int(size), float(cost)))
    return Graph(model, trunk, head, cuts, blocks, _lookups(trunk))


def _lookups(trunk):
    """`{input name: (layer name, rows)}` of embeddings reading a trunk input directly."""
    out = {}
    for layer in trunk.layers:
        if kind_of(layer) not in ("Embedding", "ReversibleEmbedding"):
            continue
        for node in layer._inbound_nodes:
            for t in node.input_tensors:
                if any(t is i for i in trunk.inputs):
                    out[t.name] = (layer.name, int(layer.input_dim))
    return out


def _flops(layer, reverse):
    """Multiply-adds x 2 per token of `layer`'s matmuls (embedding lookups cost none;
    an embedding used as the LM head (`reverse`) multiplies by its whole table)."""
    total = 0
    for node in [None] + walk(layer):
        sub = layer if node is None else node.layer
        kind = kind_of(sub)
        if kind in ("Dense", "EinsumDense"):
            kernel = getattr(sub, "kernel", None)
            if kernel is not None:
                total += 2 * int(np.prod(kernel.shape))
        elif kind in ("Embedding", "ReversibleEmbedding") and reverse:
            total += 2 * int(np.prod(sub.embeddings.shape))
    return total


def measure_blocks(graph, batch, repeats=3):
    """Seconds each block takes on `batch`, measured (median of `repeats` after a warm-up).

    Each block runs as a traced Keras model of its own on the previous block's output,
    so the times include what a stage would run (a task's head with the last block).

    Args:
        graph: the model's `Graph`.
        batch: a sample batch in the model's input structure (numpy).
        repeats: timed runs per block.

    Returns:
        One float per block.
    """
    import time

    import tensorflow as tf

    model, trunk, n = graph.model, graph.trunk, len(graph.blocks)
    names = [t.name for t in model.inputs]
    inputs = batch if isinstance(batch, dict) else dict(zip(names, keras.tree.flatten(batch)))
    inputs = {k: tf.convert_to_tensor(v) for k, v in inputs.items()}
    trunk_args = [inputs[t.name] for t in trunk.inputs]
    x, seconds = None, []
    for i in range(n):
        ins = list(trunk.inputs) + ([graph.cuts[i - 1]] if i else [])
        outs = [graph.cuts[i]] if i < n - 1 else keras.tree.flatten(trunk.outputs)
        body = _submodel(ins, outs, f"block_{i}")
        head = graph.head if i == n - 1 else None

        def run(args, body=body, head=head):
            out = keras.tree.flatten(body(args))
            if head is not None:
                out = keras.tree.flatten(head([inputs[t] for t in names] + out))
            return out

        step = tf.function(run)
        args = trunk_args + ([x] if x is not None else [])
        out = step(args)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = step(args)
            _ = [o.numpy() for o in out[:1]]
            times.append(time.perf_counter() - t0)
        seconds.append(sorted(times)[len(times) // 2])
        x = out[0]
    return seconds


def output_structure(model):
    """The model's symbolic output in the structure its calls return."""
    try:
        return model.output
    except AttributeError:  # a Sequential model: built on an Input, never called
        return model.outputs[0] if len(model.outputs) == 1 else list(model.outputs)


class Stage:
    """One stage's program: a Keras model of its blocks (and the head, if last).

    Args:
        graph: the model's `Graph`.
        bounds: `(first block, end block)` of this stage.
        index: the stage's index.
        stages: the number of stages.
    """

    def __init__(self, graph, bounds, index, stages):
        start, stop = bounds
        trunk, n = graph.trunk, len(graph.blocks)
        self.index, self.first, self.last = index, index == 0, index == stages - 1
        self.model = graph.model
        self.trunk_inputs = [t.name for t in trunk.inputs]
        self.model_inputs = [t.name for t in graph.model.inputs]
        inputs = list(trunk.inputs) + ([graph.cuts[start - 1]] if start > 0 else [])
        outputs = [graph.cuts[stop - 1]] if stop < n else keras.tree.flatten(trunk.outputs)
        name = f"{graph.model.name}_stage_{index}"
        self.body = _submodel(inputs, outputs, name)
        self.head = graph.head if self.last else None
        self.receives = graph.cuts[start - 1] if start > 0 else None
        self.sends = graph.cuts[stop - 1] if stop < n else None
        self.block_names = [b.name for b in graph.blocks[start:stop]]
        self.lookups = dict(graph.lookups)

    def check_ids(self, inputs, where):
        """Refuses a batch whose ids fall outside an embedding it feeds, on every rank
        alike (every rank holds the batch; only the first stage runs the lookup, so a
        failure there would leave the other stages waiting for its activations).

        Args:
            inputs: `{input name: array}` (see `inputs_by_name`).
            where: how errors name the call.

        Raises:
            ValueError: naming the input, the layer, the first bad id and what works.
        """
        for name, (layer, rows) in self.lookups.items():
            ids = np.asarray(inputs.get(name))
            if ids.dtype.kind not in "iu" or not ids.size:
                continue
            bad = np.argwhere((ids < 0) | (ids >= rows))
            if len(bad):
                at = tuple(int(i) for i in bad[0])
                raise ValueError(
                    f"{where}: input {name!r} {tuple(ids.shape)} holds id {int(ids[at])} at "
                    f"{at}, outside the {rows} rows of layer {layer!r}; ids must be in "
                    f"[0, {rows}). {len(bad)} id(s) out of range.")

    def held_layers(self):
        """Every layer this stage runs, nested ones included (by identity)."""
        held = {}
        for model in (self.body, self.head):
            if model is None:
                continue
            for layer in _own_layers(model).values():
                held[id(layer)] = layer
                for node in walk(layer):
                    held[id(node.layer)] = node.layer
        return held

    def inputs_by_name(self, batch):
        """`{input name: tensor}` of a batch in the model's input structure."""
        if isinstance(batch, dict):
            return dict(batch)
        flat = keras.tree.flatten(batch)
        if len(flat) != len(self.model_inputs):
            raise ValueError(f"{self.model.name}: got {len(flat)} input tensor(s), the model "
                             f"takes {len(self.model_inputs)} ({self.model_inputs}).")
        return dict(zip(self.model_inputs, flat))

    def __call__(self, inputs, x=None, training=False):
        """Runs the stage.

        Args:
            inputs: `{input name: tensor}` (see `inputs_by_name`).
            x: the activation received from the previous stage (None on the first).

        Returns:
            The activation to send on, or (last stage) the model's output in its
            structure.
        """
        args = [inputs[n] for n in self.trunk_inputs] + ([x] if x is not None else [])
        out = self.body(args, training=training)
        flat = keras.tree.flatten(out)
        if not self.last:
            return flat[0]
        if self.head is not None:
            out = self.head([inputs[n] for n in self.model_inputs] + flat, training=training)
            return keras.tree.pack_sequence_as(output_structure(self.model), keras.tree.flatten(out))
        return keras.tree.pack_sequence_as(output_structure(self.model), flat)
