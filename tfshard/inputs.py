"""Input checks: clear errors before any collective, the same on every rank.

`ShardedModel.predict` / `predict_on_batch` (tfshard/sharded_model.py), the
pipeline stages' batches (tfshard/pipeline/staged.py) and `generate`
(tfshard/generation.py) check what they are given here: keys, rank, shape,
dtype, ranges and lists, before any cast. Every rank runs these checks on the
same inputs (the inputs' digest is agreed on first), so a bad input raises the
same ValueError on every rank instead of leaving some ranks waiting in a
collective. A model that still fails on its inputs has its TensorFlow error
turned into a ValueError naming the node and the inputs' shapes.
"""

import re

import keras
import numpy as np
import tensorflow as tf


def model_input_specs(model):
    """The model's symbolic inputs as `{name: KerasTensor}` plus their structure, or None."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return None
    if not inputs:
        return None
    struct = getattr(model, "_inputs_struct", inputs)
    return struct


def flatten_inputs(x, struct, where):
    """Pairs every input array with its symbolic spec, checking keys and order.

    Args:
        x: the user's inputs.
        struct: the model's input structure (KerasTensor, list or dict), or None.
        where: text naming the call and the rank, for messages.

    Returns:
        List of `(name, numpy array, KerasTensor or None)`.

    Raises:
        ValueError: dict keys that do not match, or a wrong number of inputs.
    """
    if isinstance(struct, dict):
        if not isinstance(x, dict):
            raise ValueError(
                f"{where}: the model takes a dict of inputs with keys {sorted(struct)}; "
                f"got {type(x).__name__}."
            )
        missing = sorted(set(struct) - set(x))
        unexpected = sorted(set(x) - set(struct))
        if missing or unexpected:
            raise ValueError(
                f"{where}: input keys do not match the model. Missing: {missing}; "
                f"unexpected: {unexpected}; expected exactly {sorted(struct)}."
            )
        return [(k, np.asarray(x[k]), struct[k]) for k in sorted(struct)]
    if isinstance(struct, (list, tuple)) and len(struct) > 1:
        if isinstance(x, dict):
            names = [t.name for t in struct]
            if sorted(x) != sorted(names):
                raise ValueError(
                    f"{where}: input keys {sorted(x)} do not match the model's inputs {names}."
                )
            return [(t.name, np.asarray(x[t.name]), t) for t in struct]
        if not isinstance(x, (list, tuple)) or len(x) != len(struct):
            raise ValueError(
                f"{where}: the model takes {len(struct)} inputs "
                f"({[t.name for t in struct]}); got {type(x).__name__}"
                + (f" of length {len(x)}" if isinstance(x, (list, tuple)) else "") + "."
            )
        return [(t.name, np.asarray(a), t) for t, a in zip(struct, x)]
    spec = struct[0] if isinstance(struct, (list, tuple)) else struct
    if isinstance(x, (list, tuple)) and len(x) == 1 and not np.isscalar(x[0]):
        x = x[0]
    if isinstance(x, dict):
        if spec is not None and len(x) == 1:
            x = next(iter(x.values()))
        elif spec is not None:
            raise ValueError(f"{where}: the model takes one input; got a dict with keys {sorted(x)}.")
    if isinstance(x, dict):
        return [(k, np.asarray(v), None) for k, v in sorted(x.items())]
    if isinstance(x, (list, tuple)) and spec is None:
        return [(f"input_{i}", np.asarray(a), None) for i, a in enumerate(x)]
    return [(getattr(spec, "name", "input"), np.asarray(x), spec)]


def lists_to_arrays(x, struct, where):
    """Python lists of numbers in `x` as numpy arrays, input by input.

    Args:
        x: the user's inputs (array, list, tuple or dict).
        struct: the model's input structure, or None.
        where: text naming the call and the rank.

    Returns:
        `x` with each input given as a (nested) list converted by `np.asarray`.

    Raises:
        ValueError: a ragged list (rows of different lengths), naming the input.
    """
    def convert(value, name):
        if not isinstance(value, (list, tuple)):
            return value
        try:
            array = np.asarray(value)
        except ValueError as err:
            raise ValueError(f"{where}: input {name!r} is a ragged list ({err}); give rows of "
                             "one length (pad them), or a numpy array.") from None
        if array.dtype == object:
            raise ValueError(f"{where}: input {name!r} is a ragged or mixed list (numpy made "
                             f"dtype object of shape {array.shape}); give rows of one length.")
        return array

    def is_array(v):
        return isinstance(v, (np.ndarray, tf.Tensor)) or hasattr(v, "__array__")

    if isinstance(x, dict):
        return {k: convert(v, k) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        if isinstance(struct, (list, tuple)) and len(struct) > 1 and len(x) == len(struct):
            return [convert(v, t.name) for t, v in zip(struct, x)]
        if x and all(is_array(v) for v in x):
            return x  # arrays in a list: several inputs, or one wrapped in a list
        spec = struct[0] if isinstance(struct, (list, tuple)) and struct else struct
        return convert(x, getattr(spec, "name", "input"))
    return x


def validate_arrays(items, where):
    """Checks rank, fixed dimensions, dtype and row count of every input.

    Args:
        items: output of `flatten_inputs`.
        where: text naming the call and the rank.

    Raises:
        ValueError: empty input, a wrong rank or fixed dimension, float data
            for an integer input, or differing row counts.
    """
    rows = set()
    for name, array, spec in items:
        if array.dtype == object:
            raise ValueError(f"{where}: input {name!r} is not numeric (dtype object, shape {array.shape}).")
        if array.ndim == 0 or array.size == 0:
            raise ValueError(
                f"{where}: input {name!r} is empty (shape {array.shape}); pass at least one row"
                + (" with at least one position" if array.ndim and array.shape[0] else "") + "."
            )
        rows.add(array.shape[0])
        if spec is None:
            continue
        want = tuple(spec.shape)
        if array.ndim != len(want):
            raise ValueError(
                f"{where}: input {name!r} has rank {array.ndim} (shape {array.shape}); the model "
                f"expects rank {len(want)}, shape {want} (None = any size)."
            )
        for axis, (got, exp) in enumerate(zip(array.shape, want)):
            if exp is not None and got != exp:
                raise ValueError(
                    f"{where}: input {name!r} has shape {array.shape}; axis {axis} must be "
                    f"{exp} (the model expects {want})."
                )
        want_dtype = tf.as_dtype(keras.backend.standardize_dtype(spec.dtype))
        kind = array.dtype.kind
        if kind in "USOVMm" or (kind == "c" and not want_dtype.is_complex):
            raise ValueError(
                f"{where}: input {name!r} holds {array.dtype} data (shape {array.shape}); the "
                f"model takes {want_dtype.name} numbers there"
                + (" (tokenize text first)" if kind in "US" and want_dtype.is_integer else "") + ".")
        if want_dtype.is_integer and kind not in "iub":
            raise ValueError(
                f"{where}: input {name!r} expects integer ids ({want_dtype.name}); got "
                f"{'float' if kind == 'f' else array.dtype.name} data (dtype {array.dtype}, "
                f"shape {array.shape}). Cast the ids to int32 (after rounding, if intended)."
            )
        if want_dtype.is_integer and kind in "iu" and array.size:
            low, high = array.min(), array.max()
            if low < want_dtype.min or high > want_dtype.max:
                bad = int(high) if high > want_dtype.max else int(low)
                raise ValueError(
                    f"{where}: input {name!r} (dtype {array.dtype}, shape {array.shape}) holds "
                    f"{bad}, outside {want_dtype.name} [{want_dtype.min}, {want_dtype.max}] that "
                    "the model takes; it would wrap around in the cast. Token ids must be in "
                    "[0, vocabulary size).")
    if len(rows) > 1:
        raise ValueError(f"{where}: inputs have different row counts {sorted(rows)}.")


def invalid_argument_to_value_error(err, where, batch=None):
    """Turns a TensorFlow error raised inside the model into a ValueError that names it.

    TensorFlow reports a failed `tf.debugging` assertion as "Graph execution
    error: … assertion failed: [<our message>] [Condition …]", and a shape
    error as "{{function_node …}} Incompatible shapes: … [[{{node …}}]]"; the
    message, the node it failed in and the inputs' shapes are what the user
    needs.

    Args:
        err: the `tf.errors.OpError`.
        where: text naming the call and the rank.
        batch: the inputs of the failed call (named in the message), or None.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(getattr(err, "message", err)))  # ANSI colours
    start = text.find("Token ids")
    if start >= 0:
        end = min([i for i in (text.find("]", start), text.find("\n", start)) if i >= 0]
                  or [len(text)])
        return ValueError(f"{where}: {text[start:end].strip()}".replace("\\'", "'"))
    node = re.search(r"\[\[\{\{node ([^}]+)\}\}\]\]", text)
    layer = re.search(r"Exception encountered when calling ([\w.]+)\(\)\.\s*\n\s*\n?\s*(.+)", text)
    if layer:  # an error while tracing (Keras wraps it as "in user code: ...")
        cause = re.sub(r" for '\{\{node [^}]+\}\}[^']*'", "", layer.group(2).strip())
        text = f"{cause}\n[[{{{{node {layer.group(1)}}}}}]]"
        node = re.search(r"\[\[\{\{node ([^}]+)\}\}\]\]", text)
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", ln) for ln in lines
             if ln and not ln.startswith(("Graph execution error", "Detected at node", "File ",
                                          "[[", "Traceback"))]
    cause = next((ln for ln in lines if not ln.startswith("[[")), text.strip()[:300])
    cause = cause.split(" [[{{node")[0].strip()
    shapes = ""
    if batch is not None:
        leaves = keras.tree.flatten(batch)
        named = batch.items() if isinstance(batch, dict) else (
            [(f"input_{i}", a) for i, a in enumerate(leaves)] if len(leaves) > 1
            else [("input", leaves[0])] if leaves else [])
        shapes = "; inputs: " + ", ".join(
            f"{k} {tuple(np.shape(a))} {np.asarray(a).dtype}" for k, a in named)
    return ValueError(
        f"{where}: the model failed on its inputs: {cause}"
        + (f" (in {node.group(1)})" if node else "") + shapes
        + ". Check that the inputs' shapes fit the model and each other.")


def sequence_limit(model):
    """`(backbone name, positions)` of a keras-hub model's position table, or None."""
    backbone = getattr(model, "backbone", model)
    limit = getattr(backbone, "max_sequence_length", None)
    return (type(backbone).__name__, int(limit)) if isinstance(limit, int) else None


def check_sequence_length(model, batch, where):
    """Refuses keras-hub token inputs that do not fit together or the position table.

    Raises:
        ValueError: a padding_mask / segment_ids of another shape than
            token_ids, or an input of rank >= 2 with more positions than the
            backbone's `max_sequence_length`.
    """
    limit = sequence_limit(model)
    if limit is None or not isinstance(batch, dict):
        return
    ids = batch.get("token_ids")
    for key in ("padding_mask", "segment_ids"):  # keras-hub's per-position companions
        if ids is not None and key in batch and np.shape(batch[key]) != np.shape(ids):
            raise ValueError(
                f"{where}: input {key!r} has shape {tuple(np.shape(batch[key]))} but "
                f"'token_ids' has {tuple(np.shape(ids))}; they go position for position, so "
                "their shapes must be equal.")
    name, positions = limit
    for key, value in batch.items():
        shape = np.shape(value)
        if len(shape) >= 2 and shape[1] > positions:
            raise ValueError(
                f"{where}: input {key!r} has {shape[1]} positions (shape {tuple(shape)}), but "
                f"{name} has position embeddings for {positions}; give at most {positions} "
                "tokens per row (truncate, or split the sequence).")


def to_numpy(batch):
    """A structure of tensors or arrays as the same structure of numpy arrays."""
    return keras.tree.map_structure(np.asarray, batch)


def check_arrays(x, struct, where):
    """Flattens array input against the model's inputs and validates it.

    Returns:
        The `flatten_inputs` items.

    Raises:
        ValueError: see `flatten_inputs` and `validate_arrays`.
    """
    if x is None:
        raise ValueError(f"{where}: x is None.")
    items = flatten_inputs(lists_to_arrays(x, struct, where), struct, where)
    validate_arrays(items, where)
    return items


def unpack_x(batch):
    """The `x` of a batch given as `x` or as a tuple `(x, y[, sample_weight])`."""
    x, _, _ = keras.utils.unpack_x_y_sample_weight(batch) if isinstance(batch, tuple) else (batch, None, None)
    return x
