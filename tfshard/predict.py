"""Input checks for `ShardedModel.predict`: clear errors before any collective.

Every rank runs these checks on the same inputs (the inputs' digest is agreed
on first), so a bad input raises the same ValueError on every rank instead of
leaving some ranks waiting in a collective.
"""

import numpy as np
import tensorflow as tf
import keras


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
        if array.ndim == 0 or array.shape[0] == 0:
            raise ValueError(
                f"{where}: input {name!r} is empty (shape {array.shape}); pass at least one row."
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
        if want_dtype.is_integer and np.issubdtype(array.dtype, np.floating):
            raise ValueError(
                f"{where}: input {name!r} expects integer ids ({want_dtype.name}); got float "
                f"data (dtype {array.dtype}, shape {array.shape}). Cast the ids to int32."
            )
    if len(rows) > 1:
        raise ValueError(f"{where}: inputs have different row counts {sorted(rows)}.")


def invalid_argument_to_value_error(err, where):
    """Turns an in-graph check failure into a ValueError with the check's own message.

    TensorFlow reports a failed `tf.debugging` assertion as
    "Graph execution error: … assertion failed: [<our message>] [Condition …]";
    the message between the brackets is what the user needs.
    """
    text = str(getattr(err, "message", err))
    start = text.find("Token ids")
    if start >= 0:
        end = min([i for i in (text.find("]", start), text.find("\n", start)) if i >= 0]
                  or [len(text)])
        return ValueError(f"{where}: {text[start:end].strip()}".replace("\\'", "'"))
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), text)
    return ValueError(f"{where}: {first}")
