"""Copies of a Keras model for the replicas of a MirroredStrategy.

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

import tensorflow as tf
from keras.src.saving.keras_saveable import KerasSaveable
from keras.src.utils import tracking

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
