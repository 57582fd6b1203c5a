"""Copies of a Keras model, one per further MirroredStrategy replica, and its saved config.

The model's config is what `shard` records for `save(gather=True)`.

Each replica of a `MirroredStrategy` computes with its own converted copy of
the model, whose variables are created on the replica's device. Keras's own
copy (`copy.deepcopy` → `__reduce__` → `.keras` serialisation) needs every
custom class registered and drops state that `get_config()` leaves out, so the
first choice here is a structural copy: every Keras object is rebuilt from its
`__dict__` (as `copy.deepcopy` does for plain objects) and every TensorFlow
variable is copied by TensorFlow (`ResourceVariable.__deepcopy__`, which
creates the new variable under the current device scope). Keras's tracking
containers are filled without re-running their tracking hooks, and each
tracker's id sets are remapped to the copies. When the structural copy fails,
Keras's serialising copy is tried.
"""

import copy
import types
import warnings

import keras
import tensorflow as tf
from keras.src.saving.keras_saveable import KerasSaveable
from keras.src.utils import tracking

from tfshard.layers import walk

# Keras's tracked containers and the builtin type that holds their items.
_TRACKED = {
    tracking.TrackedList: list,
    tracking.TrackedDict: dict,
    tracking.TrackedOrderedDict: dict,
    tracking.TrackedSet: set,
}
# Traced functions are not copied; the copy traces its own.
_COMPILED = ("predict_function", "test_function", "train_function", "generate_function",
             "_predict_step")


def copy_model(model):
    """A deep copy of a Keras model, its variables created on the current device.

    Args:
        model: a built Keras model.

    Returns:
        The copy: same class, same weights (independent variables), same
        Python state; traced functions dropped.

    Raises:
        ValueError: neither copy works; the message gives both reasons.
    """
    try:
        new = _structural_copy(model)
    except Exception as structural:  # noqa: BLE001 - fall back to Keras's copy
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Keras's notes on not re-compiling
                new = copy.deepcopy(model)
        except Exception as serialised:  # noqa: BLE001 - both reasons are reported
            raise ValueError(
                f"Cannot copy model {model.name!r}: structurally ({type(structural).__name__}: "
                f"{structural}) nor by Keras serialisation ({type(serialised).__name__}: "
                f"{serialised})."
            ) from None
    if [tuple(v.shape) for v in new.weights] != [tuple(v.shape) for v in model.weights]:
        raise ValueError(f"The copy of model {model.name!r} has other weights than the model.")
    return new


def _structural_copy(model):
    trackers = []

    def copy_object(x, memo):
        y = type(x).__new__(type(x))
        memo[id(x)] = y
        y.__dict__.update(copy.deepcopy(x.__dict__, memo))
        if isinstance(x, tracking.Tracker):
            trackers.append((x, y))
        return y

    def copy_tracked(x, memo):
        y = type(x).__new__(type(x))
        memo[id(x)] = y
        base = next(b for t, b in _TRACKED.items() if isinstance(x, t))
        if base is list:
            list.extend(y, [copy.deepcopy(v, memo) for v in x])
        elif base is dict:
            dict.update(y, {copy.deepcopy(k, memo): copy.deepcopy(v, memo) for k, v in x.items()})
        else:
            set.update(y, {copy.deepcopy(v, memo) for v in x})
        y.__dict__.update(copy.deepcopy(x.__dict__, memo))
        return y

    memo = {}
    for layer in [model] + list(model._flatten_layers(include_self=False)):
        for attr in _COMPILED:
            fn = layer.__dict__.get(attr)
            if fn is not None:
                memo[id(fn)] = None
    shared = lambda x, memo: x  # noqa: E731 - singletons are shared, not copied
    dispatch = copy._deepcopy_dispatch
    saved = dict(dispatch)
    had_own = "__deepcopy__" in KerasSaveable.__dict__
    KerasSaveable.__deepcopy__ = copy_object
    try:
        dispatch.update({t: copy_tracked for t in _TRACKED})
        dispatch[tracking.Tracker] = copy_object
        dispatch[types.ModuleType] = shared
        dispatch[type(tf.distribute.get_strategy())] = shared
        new = copy.deepcopy(model, memo)
    finally:
        if not had_own:
            del KerasSaveable.__deepcopy__
        dispatch.clear()
        dispatch.update(saved)
    for old, new_tracker in trackers:
        new_tracker.stored_ids = {name: {id(memo[i]) for i in ids if i in memo}
                                  for name, ids in old.stored_ids.items()}
    return new


def same_device(a, b):
    """Whether two device strings can name the same device (unset fields match)."""
    a, b = tf.DeviceSpec.from_string(a or ""), tf.DeviceSpec.from_string(b or "")
    for field in ("job", "replica", "task", "device_type", "device_index"):
        x, y = getattr(a, field), getattr(b, field)
        if x is not None and y is not None and x != y:
            return False
    return True


def placed_on(model, device):
    """Whether every variable of `model` lives on `device`."""
    return all(same_device(getattr(v, "value", v).device, device) for v in model.weights)


def copy_to(model, where, device):
    """A copy of `model` (weights included) whose variables live on `device`."""
    try:
        with tf.device(device):
            return copy_model(model)
    except ValueError as err:
        raise ValueError(
            f"{where}: each replica needs its own copy of the model on {device}. {err} Use "
            "horovodrun or tfshard launch (one process per rank), which need no copy."
        ) from None


def serialize_model(model):
    """The unsharded model's Keras config (for saving), or None and why not."""
    try:
        config = keras.saving.serialize_keras_object(model)
    except Exception as e:  # a custom layer without get_config, ...
        return None, f"{type(e).__name__}: {e}"
    _restore_missing_arguments(config, model)
    return config, None


# Constructor arguments some keras-hub 0.32 backbones keep as attributes but
# leave out of get_config() (LlamaBackbone drops tie_word_embeddings, so a
# saved tied model reloads untied with a reverse table the file lacks).
_DROPPED_ARGUMENTS = ("tie_word_embeddings",)


def _restore_missing_arguments(config, model):
    layers = [model] + [n.layer for n in walk(model)]
    for layer in layers:
        missing = [a for a in _DROPPED_ARGUMENTS if hasattr(layer, a)]
        if not missing:
            continue
        try:
            own = layer.get_config()
        except Exception:  # noqa: BLE001 - nothing to restore
            continue
        missing = [a for a in missing if a not in own]
        if not missing:
            continue
        for entry in _config_entries(config):
            if entry.get("class_name") == type(layer).__name__ and \
                    entry.get("config", {}).get("name") == layer.name:
                for a in missing:
                    entry["config"][a] = getattr(layer, a)


def _config_entries(tree):
    if isinstance(tree, dict):
        if "class_name" in tree and isinstance(tree.get("config"), dict):
            yield tree
        for value in tree.values():
            yield from _config_entries(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _config_entries(value)
