"""Keras's tracking, worked around: variables dropped in place, attributes Keras must not see.

Converting a built layer in place (`rebuild_in_place`, `replace_local_weight`,
`release`) is what Keras itself does in `Dense.quantize()` and `enable_lora()`:
open the layer's tracker, drop or replace variables, lock it again (`unlocked`,
`drop_variable`). And sharded models keep bookkeeping in attributes that Keras
must not track (`set_untracked`). Keras's own conversions collect garbage once per
variable they drop; `heap_frozen` makes each of those collections cheap.
"""

import contextlib
import gc

import keras


@contextlib.contextmanager
def unlocked(layer):
    """Opens a built layer's tracker for the body, so variables may be added, dropped and
    replaced; locks it again afterwards (if it was locked), also on an error.

    Args:
        layer: a Keras layer.

    Yields:
        The layer.
    """
    was_locked = layer._tracker.locked
    layer._tracker.unlock()
    try:
        yield layer
    finally:
        if was_locked:
            layer._tracker.lock()


@contextlib.contextmanager
def heap_frozen():
    """Freezes the objects that exist (`gc.freeze`) for the body, then collects once.

    Keras's `Layer.__delattr__` calls `gc.collect()` for every variable a conversion
    such as `model.quantize()` drops, and each call walks the whole heap of TensorFlow,
    Keras and the model: 0.15 s a variable, 31 of the 38 s SmolLM2-135M took to quantize
    to int8 here. Frozen objects are not walked, so each call only sees what the body
    made (3.1 s in all). The dropped variables' memory still goes with their refcounts;
    what only a collection frees is freed by the one after the body. A process that has
    frozen its heap itself (`gc.get_freeze_count()`) is left as it is.

    Yields:
        None.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.collect()


def drop_variable(layer, variable, *attrs):
    """Drops one of a layer's variables: marks it dropped, untracks it and deletes the
    layer's attributes `attrs` that hold it. Call it inside `unlocked(layer)`.

    This is what Keras's `Layer.__delattr__` does, without its `gc.collect()` per
    variable (~1 s each in a big model): `shard()` collects once at the end. A dropped
    variable (`_tfshard_dropped`) is never given memory by `tfshard.load`.

    Args:
        layer: the layer owning `variable`.
        variable: the variable to drop.
        *attrs: names of the layer's attributes holding it (none: it stays reachable
            where it is, untracked).
    """
    variable._tfshard_dropped = True
    layer._untrack_variable(variable)
    for attr in attrs:
        super(keras.layers.Layer, layer).__delattr__(attr)


def set_untracked(obj, **values):
    """Sets attributes of a Keras layer or model past Keras's tracking.

    `Layer.__setattr__` tracks what it is given: a layer becomes a sublayer (its
    weights counted, saved and summarised with the model), lists and dicts are
    wrapped in tracked containers, and a built model's locked tracker refuses new
    layers and variables. What tfshard keeps on a model or layer is bookkeeping that
    must stay out of all that: the source's preprocessor and config, the groups'
    models, traced functions, a method shadowed on one instance (a KV cache of this
    rank's heads, a layer's recording `call`), a stored head count.

    Args:
        obj: the layer or model.
        **values: the attributes to set, by name.
    """
    for name, value in values.items():
        object.__setattr__(obj, name, value)
