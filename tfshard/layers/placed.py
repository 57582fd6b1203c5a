"""Layers pinned to one device: pipeline stages on the devices of one process.

Under a `tf.distribute.MirroredStrategy` the pipeline stages of a model are its
devices (GPUs, or logical CPUs): `place` moves a layer's own variables to its
stage's device and makes the layer run its `call` there, in place (the class
is mixed as `release` and `rebuild_in_place` do), so the model keeps its
paths, configs and checkpoints, and every caller -- a functional graph, a
keras-hub task's cached decoding -- runs each stage's math on the stage's
device. Inside one traced function the stages of different micro-batches then
run at once (TensorFlow's executor runs every op whose inputs are ready).
"""

import tensorflow as tf

_PLACED_CLASSES = {}


class Placed:
    """Mixed before a layer's own class by `place`: runs `call` on the layer's device."""

    _tfshard_placed = True

    def call(self, *args, **kwargs):
        with tf.device(self._tfshard_device):
            return super().call(*args, **kwargs)


def place(layer, device):
    """Pins a built layer to `device`: its own variables move there (one still
    without memory is skipped; `move_variables` again once it is filled) and its
    `call` runs there. Sublayers are placed separately.

    Args:
        layer: a built Keras layer.
        device: a TensorFlow device name, e.g. "/device:CPU:1".

    Returns:
        The same layer object, placed.
    """
    move_variables(layer, device)
    if not getattr(layer, "_tfshard_placed", False):
        cls = type(layer)
        if cls not in _PLACED_CLASSES:
            mixed = type(cls.__name__, (Placed, cls), {"__module__": cls.__module__})
            mixed.__qualname__ = f"Placed[{cls.__qualname__}]"
            _PLACED_CLASSES[cls] = mixed
        layer.__class__ = _PLACED_CLASSES[cls]
    layer._tfshard_device = device
    return layer


def move_variables(layer, device):
    """Moves `layer`'s own variables (not its sublayers') to `device`.

    A variable already there is left alone; one without memory yet (deferred,
    `tfshard.io.deferred`) is skipped: call again once it is filled.

    Returns:
        The number of variables moved.
    """
    moved = 0
    target = tf.DeviceSpec.from_string(device)
    for var in list(layer._trainable_variables) + list(layer._non_trainable_variables):
        value = var._value
        if value is None or _same_device(value.device, target):
            continue
        with tf.device(device):
            var._value = tf.Variable(value.read_value(), trainable=value.trainable,
                                     name=value.name.split(":")[0])
        moved += 1
    return moved


def bytes_by_device(variables, devices=()):
    """`{device: bytes}` of the filled ones among `variables`, by the device they are
    on (named as in `devices` when one of those, else by the variable's device).
    """
    targets = [(d, tf.DeviceSpec.from_string(d)) for d in devices]
    out = {}
    for var in variables:
        value = var._value
        if value is None:
            continue
        name = next((d for d, spec in targets if _same_device(value.device, spec)), value.device)
        size = 1
        for n in var.shape:
            size *= int(n)
        out[name] = out.get(name, 0) + size * tf.as_dtype(var.dtype).size
    return out


def _same_device(name, target):
    spec = tf.DeviceSpec.from_string(name)
    return (spec.device_type, spec.device_index) == (target.device_type, target.device_index)
