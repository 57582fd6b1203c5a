"""What every sharded layer shares: the shard spec and the in-place rebuild.

A sharded layer is the Keras layer it replaces, holding only one rank's slice
of its big weight and calling one collective where Megatron does. Existing,
built layers are converted in place -- the way Keras's own `Dense.quantize()`
and `enable_lora()` replace the variables of a built layer -- so every
reference to the layer (functional graph nodes, attributes of custom layers,
a tied embedding used twice) sees the sharded computation, and the full
kernel is released.
"""

import dataclasses

import numpy as np

RULES = ("column", "row", "vocab", "replicate")


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """How one layer is cut, as seen from one rank.

    Args:
        rule: "column", "row" or "vocab".
        axis: the axis of the main weight (kernel or embedding table) that is split.
        ranges: per-rank `(start, stop)` along `axis`, in rank order. Ranges of
            a row or vocab layer are disjoint and cover the axis; column ranges
            may overlap (K/V heads replicated across the ranks of one GQA group).
        rank: the rank this spec is for.
        gather_output: column only: all-gather the output so the next layer sees
            the full width.
        input_is_parallel: row only: the input already carries only this rank's
            slice of the contracted axis (it comes from a column layer).
        full_shape: shape of the unsharded main weight.
        path: the layer path, used in error messages.
    """

    rule: str
    axis: int
    ranges: tuple
    rank: int
    gather_output: bool = False
    input_is_parallel: bool = False
    full_shape: tuple = ()
    path: str = ""

    def __post_init__(self):
        if self.rule not in ("column", "row", "vocab"):
            raise ValueError(f"{self.path}: ShardSpec rule must be column, row or vocab; got {self.rule!r}.")
        if not 0 <= self.rank < len(self.ranges):
            raise ValueError(f"{self.path}: rank {self.rank} outside 0..{len(self.ranges) - 1}.")
        for start, stop in self.ranges:
            if not 0 <= start < stop:
                raise ValueError(
                    f"{self.path}: every rank needs a non-empty slice; got ranges {self.ranges}."
                )

    @property
    def size(self):
        """Number of ranks."""
        return len(self.ranges)

    @property
    def start(self):
        return self.ranges[self.rank][0]

    @property
    def stop(self):
        return self.ranges[self.rank][1]

    @property
    def local_size(self):
        return self.stop - self.start

    @property
    def full_size(self):
        return self.full_shape[self.axis] if self.full_shape else max(s for _, s in self.ranges)

    def local_shape(self, shape=None):
        """The local shape of a weight split on `self.axis`."""
        shape = list(self.full_shape if shape is None else shape)
        shape[self.axis] = self.local_size
        return tuple(shape)

    def to_config(self):
        """A JSON-able dict of this spec."""
        return {"rule": self.rule, "axis": self.axis, "ranges": [list(r) for r in self.ranges],
                "rank": self.rank, "gather_output": self.gather_output,
                "input_is_parallel": self.input_is_parallel,
                "full_shape": list(self.full_shape), "path": self.path}

    @classmethod
    def from_config(cls, config):
        """The inverse of `to_config`."""
        return cls(**{**config, "ranges": tuple(tuple(r) for r in config["ranges"]),
                      "full_shape": tuple(config["full_shape"])})

    def take(self, array, axis=None):
        """This rank's slice of `array` along `axis` (default: `self.axis`)."""
        axis = self.axis if axis is None else axis
        index = [slice(None)] * np.ndim(array)
        index[axis] = slice(self.start, self.stop)
        return np.asarray(array)[tuple(index)]


def even_ranges(total, size):
    """Splits `total` items over `size` ranks as evenly as possible.

    The first `total % size` ranks get one item more. Every rank gets at least
    one item.

    Raises:
        ValueError: when `total < size`.
    """
    if total < size:
        raise ValueError(f"cannot split {total} over {size} ranks")
    base, extra = divmod(total, size)
    ranges, start = [], 0
    for r in range(size):
        stop = start + base + (1 if r < extra else 0)
        ranges.append((start, stop))
        start = stop
    return tuple(ranges)


class ShardedLayerMixin:
    """What every sharded layer class shares: its spec, its config, its refusals.

    Put it first among the bases (`class X(ShardedLayerMixin, keras.layers.Dense)`).
    """

    _tfshard_sharded = True

    @property
    def shard_spec(self):
        """This rank's `ShardSpec`."""
        return self._shard_spec

    def get_config(self):
        config = super().get_config()
        spec = getattr(self, "_shard_spec", None)
        config["shard"] = None if spec is None else spec.to_config()
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        shard = config.pop("shard", None)
        layer = super().from_config(config)
        layer._shard_spec = None if shard is None else ShardSpec.from_config(shard)
        layer._comm = None
        return layer

    def enable_lora(self, *args, **kwargs):
        raise NotImplementedError(
            f"Layer {self.path!r} is sharded; enable LoRA (and merge it) before sharding."
        )

    def quantize(self, *args, **kwargs):
        raise NotImplementedError(
            f"Layer {self.path!r} is sharded; quantize the model before sharding it."
        )


_MIXED_CLASSES = {}


def sharded_class(sharded_base, original_cls):
    """The class a converted layer gets: the sharded base mixed with the original.

    Keeping the original class in the MRO keeps `isinstance` checks of the
    surrounding code (e.g. keras-hub's `ReversibleEmbedding`) true.
    """
    if issubclass(original_cls, sharded_base):
        return original_cls
    key = (sharded_base, original_cls)
    if key not in _MIXED_CLASSES:
        if original_cls in sharded_base.__mro__:
            _MIXED_CLASSES[key] = sharded_base
        else:
            _MIXED_CLASSES[key] = type(
                f"{sharded_base.__name__}[{original_cls.__name__}]",
                (sharded_base, original_cls),
                {"__module__": sharded_base.__module__},
            )
    return _MIXED_CLASSES[key]


def check_convertible(layer, keras_base, path):
    """Refuses layers whose computation tfshard cannot reproduce sliced.

    Raises:
        TypeError: the layer overrides `call` of its Keras base class.
        ValueError: the layer is quantized or has LoRA enabled, or is not built.
    """
    if not layer.built:
        raise ValueError(
            f"Layer {path!r} ({type(layer).__name__}) is not built; call the model "
            "on an input (or build it) before sharding."
        )
    for cls in type(layer).__mro__:
        if cls is keras_base:
            break
        if "call" in cls.__dict__ and not getattr(cls, "_tfshard_sharded", False):
            if cls.__module__.startswith(("keras.", "keras_hub.")):
                continue
            raise TypeError(
                f"Layer {path!r} is a {cls.__name__}, which overrides call() of "
                f"{keras_base.__name__}; tfshard cannot shard it faithfully. Replicate "
                f"it with a rule {{{path!r}: 'replicate'}}."
            )
    if getattr(layer, "quantization_mode", None):
        raise ValueError(
            f"Layer {path!r} is quantized ({layer.quantization_mode}); shard the float "
            "model, then quantize."
        )
    if getattr(layer, "lora_enabled", False):
        raise ValueError(
            f"Layer {path!r} has LoRA enabled; merge the LoRA weights into the kernel "
            "before sharding."
        )


def rebuild_in_place(layer, sharded_base, spec, comm, build_local):
    """Turns a built Keras layer into its sharded form without copying the model.

    Args:
        layer: a built Keras layer.
        sharded_base: the sharded class (e.g. `ColumnParallelDense`).
        spec: the `ShardSpec` for this rank.
        comm: the `Communicator` to use.
        build_local: callable `(layer, full_values) -> None` that creates the
            local variables with `layer.add_weight` and assigns the slices;
            `full_values` maps the old variable attribute names to numpy arrays.

    Returns:
        The same layer object, now sharded.
    """
    names = [n for n in ("_kernel", "bias", "_embeddings", "embeddings", "reverse_embeddings")
             if n in layer.__dict__]
    full_values = {n: np.asarray(layer.__dict__[n]) for n in names
                   if layer.__dict__[n] is not None}
    was_locked = layer._tracker.locked
    layer._tracker.unlock()
    try:
        for n in names:
            if layer.__dict__[n] is not None:
                delattr(layer, n)
        layer.__class__ = sharded_class(sharded_base, type(layer))
        # Keras binds a `quantize` wrapper of the *original* class onto each
        # instance at construction; it would bypass the sharded class.
        layer.__dict__.pop("quantize", None)
        layer._shard_spec = spec
        layer._comm = comm
        build_local(layer, full_values)
    finally:
        if was_locked:
            layer._tracker.lock()
    return layer


def add_local_weight(layer, name, value, trainable=True):
    """Adds a weight initialised to `value` (a numpy array) to a built layer."""
    var = layer.add_weight(
        name=name,
        shape=tuple(value.shape),
        initializer="zeros",
        dtype=layer.variable_dtype,
        trainable=trainable,
    )
    var.assign(value.astype(var.dtype))
    return var
