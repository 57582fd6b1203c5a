"""Layers another pipeline stage runs: their weights are dropped on this rank.

Under pipeline parallelism each rank runs only its stage's layers. The others
stay in the model (so paths, configs and checkpoints keep their layout) but
hold no weights: `release` turns such a layer in place into a `Released`
layer, as `rebuild_in_place` turns a kernel into its slice. A released layer
reads and writes nothing in checkpoints, `tfshard.load` never gives its
(deferred) variables memory, and calling it names the stage that runs it.
"""

from tfshard.layers.base import sharded_class
from tfshard.layers.tracking import drop_variable, unlocked


class Released:
    """Mixed before a layer's own class by `release` (see the module docstring)."""

    _tfshard_released = True

    def call(self, *args, **kwargs):
        raise RuntimeError(
            f"Layer {self.name!r} belongs to pipeline stage(s) {self._tfshard_stage_text}; "
            f"this rank runs stage {self._tfshard_own_stage} and does not hold its weights.")

    def load_own_variables(self, store):
        del store

    def save_own_variables(self, store):
        del store


def is_released(layer):
    """Whether `release` dropped this layer's weights on this rank."""
    return bool(getattr(layer, "_tfshard_released", False))


def release(layer, own_stage, stage_text="another"):
    """Drops a layer's own weights on a rank whose stage does not run it.

    Its variables are untracked and marked dropped (a deferred one is never
    given memory; a held value is freed with the last reference).

    Args:
        layer: a built Keras layer (its sublayers are released separately).
        own_stage: the stage this rank runs.
        stage_text: the stage(s) that run the layer, for errors.

    Returns:
        The same layer object, released.
    """
    if is_released(layer):
        return layer
    variables = list(layer._trainable_variables) + list(layer._non_trainable_variables)
    with unlocked(layer):
        for var in variables:
            drop_variable(layer, var, *[a for a, v in list(layer.__dict__.items()) if v is var])
        layer.__class__ = sharded_class(Released, type(layer))
        layer.__dict__.pop("quantize", None)
        layer._tfshard_own_stage = own_stage
        layer._tfshard_stage_text = stage_text
    return layer
