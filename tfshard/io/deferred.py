"""Variables with shapes and no memory, filled later (shard-aware loading).

A model built inside `deferred_variables()` gets Keras variables whose
initialisation is postponed (`StatelessScope(initialize_variables=False)`);
`shard()` replaces the big ones by local slices, and `materialize` gives the
rest (norms, biases) their memory just before they are filled from a file.
"""

import contextlib

import keras
import numpy as np
from keras.src.backend.common import global_state
from keras.src.backend.common.variables import Variable as _KerasVariable

from tfshard.layers.base import was_dropped



@contextlib.contextmanager
def deferred_variables():
    """Keras variables created inside get a shape but no memory.

    They stay uninitialised until filled: `shard()` replaces the big ones by
    local slices, and `load` fills the rest. Variables made from a constant
    (an optimizer's iteration counter) are deferred too.

    Yields:
        A list that receives the variables created inside.
    """
    created = []
    original = _KerasVariable.__init__

    def init_deferred(self, initializer, shape=None, dtype=None, *args, **kwargs):
        if not callable(initializer) and not isinstance(initializer, str):
            value = np.asarray(initializer)
            shape = value.shape if shape is None else shape
            dtype = dtype or (value.dtype.name if value.dtype != np.float64 else None)
            initializer = _Constant(value)
        original(self, initializer, shape, dtype, *args, **kwargs)
        created.append(self)

    _KerasVariable.__init__ = init_deferred
    try:
        with keras.StatelessScope(initialize_variables=False):
            yield created
    finally:
        _KerasVariable.__init__ = original


class _Constant:
    def __init__(self, value):
        self.value = value

    def __call__(self, shape, dtype=None):
        return keras.ops.convert_to_tensor(np.asarray(self.value), dtype=dtype or self.value.dtype)


def materialize(created, weights, leave=()):
    """Gives memory to deferred variables that survived sharding.

    Model weights start at zero (the source fills them); other variables
    (optimizer counters, seed states) get their own initial values. Variables
    dropped by `shard()` are forgotten.

    Args:
        created: the variables `deferred_variables()` recorded.
        weights: the model's weights.
        leave: ids of variables to leave without memory: the source creates
            them from the file's values (`tfshard.layers.slices.set_value`), so
            they never hold zeros first.
    """
    weight_ids = {id(v) for v in weights}
    leave = set(leave)
    for v in created:
        if _waiting(v) and id(v) not in leave:
            if id(v) in weight_ids:
                v._initializer = keras.initializers.Zeros()
            v._deferred_initialize()
    pending = global_state.get_global_attribute("uninitialized_variables", [])
    ours = {id(v) for v in created}
    pending[:] = [v for v in pending if id(v) not in ours]


def unfilled(created):
    """Paths of the variables in `created` still without memory (neither filled
    nor dropped): after a fill, a variable the source never reached."""
    return [v.path for v in created if _waiting(v)]


def _waiting(variable):
    """Still without memory, and not dropped by `shard()`."""
    return variable._value is None and not was_dropped(variable)
