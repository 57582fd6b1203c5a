"""What every sharded layer shares: the shard spec and the in-place rebuild.

A sharded layer is the Keras layer it replaces, holding only one rank's slice
of its big weight and calling one collective where Megatron does. Existing,
built layers are converted in place -- the way Keras's own `Dense.quantize()`
and `enable_lora()` replace the variables of a built layer -- so every
reference to the layer (functional graph nodes, attributes of custom layers,
a tied embedding used twice) sees the sharded computation, and the full
kernel is released.
"""

import contextlib
import dataclasses

import keras
import numpy as np

from tfshard.layers import quantized
from tfshard.layers.slices import Placeholder, assign_slice, full_value, read_slice
from tfshard.layers.tracking import drop_variable, unlocked


RULES = ("column", "row", "vocab", "replicate")


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """How one layer is cut across the ranks of its tensor-parallel group.

    The one description of a cut: the planner's `PlanEntry` is a `ShardSpec`
    plus what the planner measured, and a sharded layer holds the spec with its
    rank. It says nothing about any one rank; `bounds(rank)` and friends give a
    rank's view.

    Args:
        path: the layer path, used in error messages.
        rule: "column", "row", "vocab" or "replicate".
        axis: the axis of the main weight (kernel or embedding table) that is
            split (None when replicated).
        ranges: per-rank `(start, stop)` along `axis`, in rank order (None when
            replicated). Ranges of a row or vocab layer are disjoint and cover
            the axis; column ranges may overlap (K/V heads replicated across the
            ranks of one GQA group).
        gather_output: column only: all-gather the output so the next layer sees
            the full width.
        input_is_parallel: row only: the input already carries only this rank's
            slice of the contracted axis (it comes from a column layer).
        full_shape: shape of the unsharded main weight.

    Raises:
        ValueError: an unknown rule, or a cut rule whose ranges leave a rank
            with an empty slice.
    """

    path: str = ""
    rule: str = "replicate"
    axis: object = None
    ranges: object = None
    gather_output: bool = False
    input_is_parallel: bool = False
    full_shape: tuple = ()

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"{self.path}: ShardSpec rule must be one of {', '.join(RULES)}; "
                             f"got {self.rule!r}.")
        if self.rule == "replicate":
            return
        if self.axis is None or not self.ranges:
            raise ValueError(f"{self.path}: a {self.rule} cut needs an axis and per-rank ranges.")
        for start, stop in self.ranges:
            if not 0 <= start < stop:
                raise ValueError(
                    f"{self.path}: every rank needs a non-empty slice; got ranges {self.ranges}."
                )

    @property
    def is_cut(self):
        """False for a replicated layer."""
        return self.rule != "replicate"

    @property
    def size(self):
        """Number of ranks (None when replicated)."""
        return None if self.ranges is None else len(self.ranges)

    @property
    def sizes(self):
        """Every rank's length along `axis`, in rank order."""
        return [stop - start for start, stop in self.ranges]

    @property
    def full_size(self):
        return self.full_shape[self.axis] if self.full_shape else max(s for _, s in self.ranges)

    def bounds(self, rank):
        """`(start, stop)` of `rank` along `axis`.

        Raises:
            ValueError: `rank` is outside the spec's ranks.
        """
        if not 0 <= rank < len(self.ranges):
            raise ValueError(f"{self.path}: rank {rank} outside 0..{len(self.ranges) - 1}.")
        return tuple(self.ranges[rank])

    def local_size(self, rank):
        start, stop = self.bounds(rank)
        return stop - start

    def local_shape(self, rank, shape=None):
        """`rank`'s shape of a weight split on `axis` (default: the main weight)."""
        shape = list(self.full_shape if shape is None else shape)
        if self.is_cut:
            shape[self.axis] = self.local_size(rank)
        return tuple(shape)

    def to_config(self):
        """A JSON-able dict of this spec (a `PlanEntry`'s planner facts left out)."""
        return {"path": self.path, "rule": self.rule, "axis": self.axis,
                "ranges": None if self.ranges is None else [list(r) for r in self.ranges],
                "gather_output": self.gather_output,
                "input_is_parallel": self.input_is_parallel,
                "full_shape": list(self.full_shape)}

    @classmethod
    def from_config(cls, config):
        """The inverse of `to_config`."""
        ranges = config.get("ranges")
        return cls(**{**config, "ranges": None if ranges is None else tuple(tuple(r) for r in ranges),
                      "full_shape": tuple(config["full_shape"])})


def even_ranges(total, size, align=1):
    """Splits `total` items over `size` ranks as evenly as possible.

    The first ranks get one item (one `align` block) more. Every rank gets at least
    one item.

    Args:
        total: the number of items.
        size: the number of ranks.
        align: every boundary between ranks falls on a multiple of it (int4 packs
            two values a byte); the last rank's range ends at `total`.

    Raises:
        ValueError: when there are fewer items (blocks) than ranks.
    """
    blocks = -(-total // align)
    if blocks < size:
        raise ValueError(f"cannot split {total} over {size} ranks"
                         + (f" in blocks of {align}" if align > 1 else ""))
    base, extra = divmod(blocks, size)
    ranges, start = [], 0
    for r in range(size):
        stop = start + base + (1 if r < extra else 0)
        ranges.append((start * align, min(stop * align, total)))
        start = stop
    return tuple(ranges)


_MADE_BY_SHARD = (
    "A sharded {name} is made by tfshard.shard() / tfshard.load() converting a built layer in "
    "place (it needs the rank's communicator); it cannot be constructed, built or rebuilt from "
    "a config. Save a sharded model with sharded.save(path) and load it with tfshard.load(path).")


class ShardedLayerMixin:
    """What every sharded layer class shares: its spec, its config, its refusals.

    Put it first among the bases (`class X(ShardedLayerMixin, keras.layers.Dense)`).
    """

    _tfshard_sharded = True

    @property
    def shard_spec(self):
        """The layer's `ShardSpec` (the cut across all ranks)."""
        return self._shard_spec

    @property
    def shard_rank(self):
        """The rank, within the tensor-parallel group, whose slice this layer holds."""
        return self._shard_rank

    @property
    def shard_range(self):
        """`(start, stop)` of this layer's slice on `shard_spec.axis`."""
        return self._shard_spec.bounds(self._shard_rank)

    @property
    def shard_width(self):
        """`stop - start` of this layer's slice."""
        start, stop = self.shard_range
        return stop - start

    def get_config(self):
        config = super().get_config()
        spec = getattr(self, "_shard_spec", None)
        config["shard"] = None if spec is None else spec.to_config()
        config["shard_rank"] = getattr(self, "_shard_rank", None)
        return config

    def __init__(self, *args, **kwargs):
        # Sharded layers are made only by converting a built layer in place
        # (`rebuild_in_place` swaps the class and never calls a constructor).
        raise TypeError(_MADE_BY_SHARD.format(name=type(self).__name__))

    def build(self, input_shape=None):
        raise TypeError(_MADE_BY_SHARD.format(name=type(self).__name__))

    @classmethod
    def from_config(cls, config):
        raise TypeError(_MADE_BY_SHARD.format(name=cls.__name__))

    def _saved_entries(self):
        entries = getattr(self, "_tfshard_saved", None)
        if entries is None:
            raise ValueError(
                f"Layer {self.path!r} is a sharded layer that was not made by "
                "tfshard.shard()/tfshard.load(); it has no record of its full shapes."
            )
        return entries

    def load_own_variables(self, store):
        """Loads this rank's slices from a store holding the *full* weights.

        The store is the one Keras passes for this layer while loading a
        checkpoint of the unsharded model (same keys "0", "1", ... in Keras's
        serialization order). When the store offers `view(key)` (tfshard's
        slice-reading stores), only this rank's slice is read from disk.

        Args:
            store: a Keras weights-store entry.

        Raises:
            ValueError: the number of weights, a full shape or a dtype differs
                from this layer's (the message names the layer and the key).
        """
        entries = self._saved_entries()
        keys = sorted(store.keys(), key=int) if store is not None else []
        source = getattr(store, "describe", lambda: "the checkpoint")()
        if len(keys) != len(entries):
            raise ValueError(
                f"Layer {self.path!r} expects {len(entries)} weights "
                f"({', '.join(v.name for v, *_ in entries)}) but {source} has "
                f"{len(keys)} for it; the checkpoint does not match the model."
            )
        for i, (var, axis, full_shape, ranges) in enumerate(entries):
            start, stop = ranges[self.shard_rank] if ranges else (None, None)
            src = store.view(str(i)) if hasattr(store, "view") else store[str(i)]
            if tuple(src.shape) != tuple(full_shape):
                raise ValueError(
                    f"Layer {self.path!r}, weight {var.name!r} (key {i}): {source} holds "
                    f"shape {tuple(src.shape)}, the model needs {tuple(full_shape)} "
                    f"(rank {self.shard_rank} would read [{start}:{stop}] on axis {axis})."
                )
            kind = np.dtype(src.dtype).kind
            if kind not in "fiu" and str(src.dtype) != "bfloat16":
                raise ValueError(
                    f"Layer {self.path!r}, weight {var.name!r}: {source} holds dtype "
                    f"{src.dtype}, not a number type the model ({var.dtype}) can take."
                )
            assign_slice(var, src, axis, start, stop)

    def save_own_variables(self, store):
        """Writes this rank's slices through a tfshard store.

        Plain Keras stores would receive one slice as if it were the whole
        weight, so they are refused.

        Raises:
            ValueError: `store` is not a tfshard store.
        """
        write = getattr(store, "write_shard", None)
        if write is None:
            raise ValueError(
                f"Layer {self.path!r} is sharded (rank {self.shard_rank} holds "
                f"[{self.shard_range[0]}:{self.shard_range[1]}] of axis "
                f"{self._shard_spec.axis}); Keras's save would write one slice as the whole "
                "weight. Use sharded.save(path) for a sharded checkpoint or "
                "sharded.save(path, gather=True) for a .keras file plain Keras loads."
            )
        for i, (var, axis, full_shape, ranges) in enumerate(self._saved_entries()):
            write(str(i), np.asarray(var), axis=axis, ranges=ranges, rank=self.shard_rank,
                  full_shape=full_shape, comm=self._comm, name=f"{self.path}/{var.name}")

    def enable_lora(self, *args, **kwargs):
        raise NotImplementedError(
            f"Layer {self.path!r} is sharded; enable LoRA (and merge it) before sharding."
        )

    def quantize(self, mode=None, type_check=True, config=None):
        """Quantizes this rank's slice to int8, exactly as quantizing the whole layer
        and then cutting it would (see `tfshard.layers.quantized`).

        Every rank of the group must call it (a row cut gathers each output
        channel's maximum); `ShardedModel.quantize` does.

        Raises:
            ValueError: a mode other than "int8", a custom config, or a layer
                already quantized. A ValueError, not NotImplementedError:
                `keras.Model.quantize` turns the latter into a warning and goes
                on, leaving the layer in float.
        """
        quantized.check_quantize_args(self, mode, config)
        self._quantize_int8()

    def _quantize_int8(self):
        raise NotImplementedError

    def saved_full_shape(self, variable):
        """The unsharded shape of one of this layer's variables."""
        for var, _, full_shape, _ in self._saved_entries():
            if var is variable:
                return full_shape
        raise KeyError(f"{self.path}: {variable.name} is not one of its sharded weights")


_MIXED_CLASSES = {}


def sharded_class(sharded_base, original_cls):
    """The class a converted layer gets: the sharded base mixed with the original.

    Keeping the original class in the MRO keeps `isinstance` checks of the
    surrounding code (e.g. keras-hub's `ReversibleEmbedding`) true, and
    keeping its `__name__` keeps Keras's checkpoint paths (which name
    layers in lists by their class) those of the unsharded model, so a
    sharded layer reads and writes the same entries.
    """
    if getattr(original_cls, "_tfshard_sharded", False):
        return original_cls
    key = (sharded_base, original_cls)
    if key not in _MIXED_CLASSES:
        bases = (sharded_base,) if original_cls in sharded_base.__mro__ else (sharded_base, original_cls)
        cls = type(original_cls.__name__, bases, {"__module__": sharded_base.__module__})
        cls.__qualname__ = f"{sharded_base.__name__}[{original_cls.__name__}]"
        _MIXED_CLASSES[key] = cls
    return _MIXED_CLASSES[key]


def was_dropped(variable):
    """Whether `shard()` dropped this full variable for a local slice (so it must
    never be given memory)."""
    return bool(getattr(variable, "_tfshard_dropped", False))


def sliced_variables(layer):
    """`[(variable, axis, full_shape, ranges)]` of a sharded layer's weights, in Keras's
    serialization order, or None when the layer is not sharded by tfshard.

    `ranges` are every rank's `(start, stop)` on the variable's own `axis` (None with
    axis None: held whole). They are the layer's `ShardSpec.ranges` except where a
    variable's layout differs from the main weight's (int4's packed and flattened
    kernels, `tfshard.layers.int4`)."""
    if getattr(layer, "shard_spec", None) is None:
        return None
    return getattr(layer, "_tfshard_saved", None)


def check_convertible(layer, keras_base, path):
    """Refuses layers whose computation tfshard cannot reproduce sliced.

    Raises:
        TypeError: the layer overrides `call` of its Keras base class.
        ValueError: the layer is quantized in a mode other than int8, has LoRA enabled,
            or is not built.
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
    quantized.check_quantization(layer, path)
    if getattr(layer, "lora_enabled", False):
        raise ValueError(
            f"Layer {path!r} has LoRA enabled; merge the LoRA weights into the kernel "
            "before sharding."
        )


def rebuild_in_place(layer, sharded_base, spec, rank, comm, build_local):
    """Turns a built Keras layer into its sharded form without copying the model.

    Args:
        layer: a built Keras layer.
        sharded_base: the sharded class (e.g. `ColumnParallelDense`).
        spec: the layer's `ShardSpec`.
        rank: the rank whose slice the layer keeps.
        comm: the `Communicator` to use.
        build_local: callable `(layer, full_values) -> None` that creates the
            local variables with `layer.add_weight` and assigns the slices;
            `full_values` maps the old variable attribute names to numpy arrays.

    Returns:
        The same layer object, now sharded.
    """
    names = [n for n in ("_kernel", "bias", "_embeddings", "embeddings", "reverse_embeddings")
             + quantized.QUANTIZED_NAMES if n in layer.__dict__]
    full_values = {n: full_value(layer.__dict__[n]) for n in names
                   if layer.__dict__[n] is not None}
    with unlocked(layer):
        for n in names:
            if layer.__dict__[n] is not None:
                drop_variable(layer, layer.__dict__[n], n)
        layer.__class__ = sharded_class(sharded_base, type(layer))
        # Keras binds a `quantize` wrapper of the *original* class onto each
        # instance at construction; it would bypass the sharded class.
        layer.__dict__.pop("quantize", None)
        layer._shard_spec = spec
        layer._shard_rank = rank
        layer._comm = comm
        layer._tfshard_saved = []
        build_local(layer, full_values)
    return layer


def replace_local_weight(layer, attr, name, value, axis, full_shape, after=None, ranges=None):
    """Puts a new variable holding `value` at `layer.<attr>`, in the place of the
    one there (if any) in the layer's checkpoint order, or right after `after`.

    Args:
        layer: a sharded layer.
        attr: the attribute ("_kernel", "kernel_scale", ...).
        name: the variable name.
        value: this rank's value (numpy).
        axis: its cut axis (None: held whole).
        full_shape: the unsharded shape.
        after: for a new variable, the variable it follows in the checkpoint order
            (None: last).
        ranges: every rank's range on `axis` (default: the layer's spec ranges).

    Returns:
        The new variable.
    """
    old = layer.__dict__.get(attr)
    with unlocked(layer):
        if old is not None:
            drop_variable(layer, old, attr)
        var = layer.add_weight(name=name, shape=value.shape, initializer="zeros",
                               dtype=np.dtype(value.dtype).name, trainable=False)
        var.assign(value)
        setattr(layer, attr, var)
    entries = layer._tfshard_saved
    entry = (var, axis, tuple(full_shape), _entry_ranges(layer, axis, ranges))
    held = [e[0] for e in entries]
    if old is not None and any(v is old for v in held):
        entries[next(i for i, v in enumerate(held) if v is old)] = entry
    elif after is not None:
        entries.insert(next(i for i, v in enumerate(held) if v is after) + 1, entry)
    else:
        entries.append(entry)
    return var


def add_local_weight(layer, name, full, axis=None, trainable=None, ranges=None):
    """Adds this rank's slice of `full` as a weight of a layer being converted.

    The weight is also recorded, in Keras's serialization order, with its full
    shape, cut axis and every rank's range, so the layer can load its slice from
    (and save it to) a checkpoint of the unsharded model.

    Args:
        layer: the layer being converted (its spec and rank set).
        name: the weight name ("kernel", "bias", ...).
        full: the full value: a numpy array or a lazy view (only the slice is
            read).
        axis: the axis of `full` that is cut; None keeps it whole.
        trainable: passed to `add_weight`; default: float weights are trainable,
            quantized (integer) ones are not, as Keras makes them.
        ranges: every rank's `(start, stop)` on `axis`; default the layer's spec
            ranges (another layout's, e.g. int4's packed kernel, passes its own).

    Returns:
        The new variable.
    """
    ranges = _entry_ranges(layer, axis, ranges)
    value = read_slice(full, axis, *ranges[layer.shard_rank]) if axis is not None else None
    shape = value.shape if value is not None else tuple(full.shape)
    dtype = np.dtype(full.dtype).name  # int8 kernels stay int8; scales keep theirs
    if trainable is None:
        trainable = np.dtype(full.dtype).kind == "f" and name not in quantized.QUANTIZED_NAMES
    # A model being loaded (deferred variables): the slice gets no memory until the
    # file's values create it (`tfshard.layers.slices.set_value`).
    deferred = isinstance(full, Placeholder)
    with keras.StatelessScope(initialize_variables=False) if deferred else contextlib.nullcontext():
        var = layer.add_weight(name=name, shape=shape, initializer="zeros",
                               dtype=dtype, trainable=trainable)
    if not deferred:
        var.assign((value if value is not None else np.asarray(full)).astype(var.dtype))
    layer._tfshard_saved.append((var, axis, tuple(full.shape), ranges))
    return var


def _entry_ranges(layer, axis, ranges):
    """A variable's recorded ranges: None when held whole, else `ranges` or the spec's."""
    return None if axis is None else tuple(
        tuple(r) for r in (layer.shard_spec.ranges if ranges is None else ranges))
