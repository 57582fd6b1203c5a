"""`tfshard.shard(model)` and the `ShardedModel` it returns."""

import keras
import tensorflow as tf

from tfshard import consistency
from tfshard import predict as predict_lib
from tfshard.layers import ShardSpec, shard_layer
from tfshard.plan import Plan, _walk, kind_of
from tfshard.world import init


def _set_head_counts(parent, counts, rank):
    """Sets an attention layer's stored head counts to this rank's local ones.

    Attention layers reshape and repeat K/V with the head counts they stored
    at construction. The attributes are found by name and value: an int
    attribute whose name speaks of heads (K/V heads when it says "kv" or
    "key_value") or groups, and whose value is the full count.
    """
    q_local, kv_local = counts.local(rank)
    group_full = counts.heads_q // counts.heads_kv
    changed = {}
    for name, value in list(vars(parent).items()):
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        low = name.lower()
        if "dim" in low or "size" in low:
            continue
        new = None
        if "group" in low and value == group_full:
            new = q_local // kv_local
        elif "head" in low and ("kv" in low or "key_value" in low):
            new = kv_local if value == counts.heads_kv else None
        elif "head" in low and value == counts.heads_q:
            new = q_local
        if new is not None and new != value:
            object.__setattr__(parent, name, new)
            changed[name] = (value, new)
    return changed


def _reset_compiled_functions(model):
    """Drops cached traced functions and XLA, which would bypass or break the cut."""
    for layer in [model] + [n.layer for n in _walk(model)]:
        if isinstance(layer, keras.Model):
            for attr in ("predict_function", "test_function", "train_function",
                         "generate_function"):
                if getattr(layer, attr, None) is not None:
                    setattr(layer, attr, None)
            # Horovod ops do not run under XLA on CPU.
            layer._jit_compile = False


def shard(model, plan="auto", *, world=None, strategy=None, tensor_parallel=None):
    """Cuts a built Keras model's big kernels across the ranks of this job.

    The model is converted in place (as Keras's own `quantize()` does): each
    sharded layer keeps its name, path and place in the model but holds only
    this rank's slice, and the full kernels are released. Every rank must call
    `shard` with the same model and plan.

    Args:
        model: a built Keras 3 model (Sequential, functional, subclassed, or a
            keras-hub backbone or task).
        plan: "auto", a `tfshard.Plan`, or a `{regex: rule}` dict.
        world: the `World` from `tfshard.init()` (initialised when None).
        strategy: a tf.distribute strategy (not available yet).
        tensor_parallel: the tensor-parallel degree; None or the world size
            (data-parallel groups are not available yet).

    Returns:
        A `ShardedModel` wrapping the converted model.

    Raises:
        ValueError: the ranks disagree on the model or plan, the model is not
            built, or a rule cannot apply (the message names the layer, its
            shape, the rank and the sizes that would work).
        NotImplementedError: `strategy` or a `tensor_parallel` below the world size.
    """
    if strategy is not None:
        raise NotImplementedError(
            "tfshard.shard(strategy=...) (MirroredStrategy / MultiWorker) is not available "
            "yet; launch with ./horovodrun.sh -np N instead."
        )
    world = world or init()
    comm = world.comm
    if tensor_parallel not in (None, comm.size):
        raise NotImplementedError(
            f"tensor_parallel={tensor_parallel} with {comm.size} ranks needs data-parallel "
            f"groups, which are not available yet; use tensor_parallel=None (all "
            f"{comm.size} ranks in one tensor-parallel group)."
        )
    if isinstance(model, ShardedModel):
        raise ValueError(f"Model {model.name!r} is already sharded.")
    if not isinstance(model, keras.layers.Layer) or not model.built:
        raise ValueError(
            f"tfshard.shard needs a built Keras model; got {type(model).__name__} "
            f"(built={getattr(model, 'built', None)}). Call it on an input first."
        )
    consistency.agree(
        comm,
        {"model structure": consistency.digest(consistency.model_structure(model)),
         "model class": consistency.digest(type(model).__qualname__)},
        "tfshard.shard()",
    )
    if plan is None or (isinstance(plan, str) and plan == "auto"):
        plan = Plan.auto()
    elif isinstance(plan, dict):
        plan = Plan.from_rules(plan)
    elif not isinstance(plan, Plan):
        raise ValueError(f"plan must be 'auto', a dict of rules or a tfshard.Plan; got {plan!r}.")
    plan = plan.resolve(model, comm.size, comm.rank)
    consistency.agree(comm, {"plan": consistency.digest(plan.to_dict())}, "tfshard.shard()")

    layers = {n.path: n.layer for n in _walk(model) if kind_of(n.layer)}
    for e in plan.sharded:
        spec = ShardSpec(rule=e.rule, axis=e.axis, ranges=e.ranges, rank=comm.rank,
                         gather_output=e.gather_output, input_is_parallel=e.input_is_parallel,
                         full_shape=e.full_shape, path=e.path)
        shard_layer(layers[e.path], spec, comm, e.path)
    parents = {n.path: n.layer for n in _walk(model)}
    parents.setdefault(model.name, model)  # attention owned by the root model itself
    for counts in plan.attention:
        _set_head_counts(parents[counts.path], counts, comm.rank)
    _reset_compiled_functions(model)
    return ShardedModel(model, plan, world)


class ShardedModel(keras.Model):
    """A Keras model whose big kernels live in slices across ranks.

    Calls, `predict` and `predict_on_batch` have the Keras contract and give
    every rank the global output the unsharded model would give.

    Args:
        model: the converted (sharded in place) Keras model.
        plan: the resolved `Plan`.
        world: the `World`.
    """

    def __init__(self, model, plan, world, **kwargs):
        super().__init__(name=kwargs.pop("name", f"sharded_{model.name}"), **kwargs)
        self.inner = model
        self.plan = plan
        self.world = world
        self.built = True
        self._jit_compile = False

    @property
    def rank(self):
        return self.world.rank

    @property
    def size(self):
        return self.world.size

    def call(self, inputs, *args, **kwargs):
        return self.inner(inputs, *args, **kwargs)

    def _where(self, what):
        return f"{self.name}.{what} (rank {self.rank} of {self.size})"

    def _check_inputs(self, x, what):
        """Validates numpy-like inputs and agrees on their digest across ranks."""
        where = self._where(what)
        if isinstance(x, (tf.data.Dataset, keras.utils.PyDataset)) or callable(
                getattr(x, "__next__", None)):
            raise NotImplementedError(
                f"{where}: datasets and generators are not supported yet; pass numpy arrays "
                "(or a dict / list of them)."
            )
        if x is None:
            raise ValueError(f"{where}: x is None.")
        items = predict_lib.flatten_inputs(x, predict_lib.model_input_specs(self.inner), where)
        predict_lib.validate_arrays(items, where)
        consistency.agree(
            self.world.comm,
            {f"input {name!r}": consistency.array_digest(a) for name, a, _ in items},
            f"{self.name}.{what}",
        )

    def predict(self, x, batch_size=None, verbose="auto", steps=None, callbacks=None, **kwargs):
        """`keras.Model.predict`, sharded: the same arguments and output structure.

        Args:
            x: numpy array, or a list / dict of them, as the model takes.
            batch_size: rows per batch (default 32).
            verbose: "auto", 0, 1 or 2; progress is shown on rank 0 only.
            steps, callbacks: as in `keras.Model.predict`.

        Returns:
            The global output, on every rank, with the structure, dtype and row
            order of `model.predict`.

        Raises:
            ValueError: bad input (keys, rank, shape, dtype, empty, token ids
                out of range), or ranks given different inputs; raised on
                every rank, before any collective.
        """
        self._check_inputs(x, "predict")
        if self.rank != 0:
            verbose = 0
        try:
            return self.inner.predict(x, batch_size=batch_size, verbose=verbose, steps=steps,
                                      callbacks=callbacks, **kwargs)
        except tf.errors.InvalidArgumentError as err:
            raise predict_lib.invalid_argument_to_value_error(err, self._where("predict")) from None

    def predict_on_batch(self, x):
        """`keras.Model.predict_on_batch`, sharded (see `predict`)."""
        self._check_inputs(x, "predict_on_batch")
        try:
            return self.inner.predict_on_batch(x)
        except tf.errors.InvalidArgumentError as err:
            raise predict_lib.invalid_argument_to_value_error(
                err, self._where("predict_on_batch")) from None

    def save(self, *args, **kwargs):
        raise NotImplementedError(
            "Saving a ShardedModel is not available yet: Keras would write local slices "
            "under the full model's config. Save the model before sharding it."
        )

    def save_weights(self, *args, **kwargs):
        raise NotImplementedError(
            "save_weights on a ShardedModel is not available yet (it would write only "
            "this rank's slices). Save the weights before sharding."
        )
