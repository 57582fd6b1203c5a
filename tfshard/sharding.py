"""`tfshard.shard(model)`: the factory that cuts a built model across the ranks.

It checks the request, has the ranks agree on the model, splits the world into
groups, converts the model in place (`tfshard.convert`; pipeline stages:
`tfshard.pipeline`) and wraps it in the `ShardedModel` of tfshard/sharded_model.py.
"""

import keras
import tensorflow as tf

from tfshard import comm as comm_lib
from tfshard import consistency
from tfshard import convert
from tfshard import copying
from tfshard.comm.strategies import strategy_kind
from tfshard.layers.tracking import set_untracked
from tfshard.pipeline import on_devices, staged
from tfshard.plan import Plan, ResolvedPlan
from tfshard.plan.layout import Layout, default_group
from tfshard.plan.stages import check_balance
from tfshard.sharded_model import Replica, ShardedModel
from tfshard.world import World, init

__all__ = ["shard", "shard_replicas", "default_tensor_parallel"]


def shard(model, plan="auto", *, world=None, strategy=None, tensor_parallel=None,
          check_weights=True, comm_dtype=None, pipeline=None, pipeline_split=None,
          micro_batches=None, pipeline_sample=None, pipeline_balance="compute"):
    """Cuts a built Keras model's big kernels across the ranks of this job.

    The model is converted in place (as Keras's own `quantize()` does): each
    sharded layer keeps its name, path and place in the model but holds only
    this rank's slice, and the full kernels are released. Every rank must call
    `shard` with the same model and plan.

    Under a `tf.distribute.MirroredStrategy` every replica is a rank: the
    model is copied once per further replica (`tfshard.copying.copy_model`)
    and each copy is cut and placed on its replica's device, so a device holds
    only its own slices; the original becomes replica 0. Under a
    `MultiWorkerMirroredStrategy` (`tfshard launch`) each process is one rank,
    as under horovodrun.

    Args:
        model: a built Keras 3 model (Sequential, functional, subclassed, or a
            keras-hub backbone or task), built outside any `strategy.scope()`.
        plan: "auto", a `tfshard.Plan`, or a `{regex: rule}` dict.
        world: the `World` from `tfshard.init()` (initialised when None).
        strategy: a `tf.distribute.MirroredStrategy` or
            `MultiWorkerMirroredStrategy`; None uses the world's (a
            "multiworker" world has one).
        tensor_parallel: ranks per tensor-parallel group; the world splits into
            `world.size // tensor_parallel` data-parallel groups of consecutive
            ranks (Horovod process sets), which share the rows in `predict`.
            None: the ranks of one host, so that every block's collectives
            stay inside a host and only the data-parallel gather crosses
            between hosts (all ranks when the job runs on one host;
            `plan.summary()` says which collectives cross hosts).
        check_weights: before cutting, ranks compare a digest of every weight
            (XXH3 over paths, shapes, dtypes and values; 70 ms for GPT-2)
            and refuse to go on if any rank holds other values. False skips
            it (`tfshard.load` does, and agrees on the source file instead).
        comm_dtype: "bfloat16" or "float16" to send float32 collectives in 16
            bits, halving their bytes: all-gathers (the tied head's logits,
            gathered column outputs) on every backend, all-reduces where the
            backend sums on a 16-bit wire (MPI; `tfshard.comm.compressed`).
            The outputs are then rounded to that precision
            (`tfshard.cli.precision`'s envelope for it). None (default):
            collectives carry the activations' own dtype.
        pipeline: the number of pipeline stages (None or 1: none). The world is
            then a mesh of DP x pipeline x tensor_parallel ranks (tensor_parallel
            None: world size // pipeline, one pipeline); each rank holds one
            stage's blocks only (a keras-hub model's transformer layers, or a
            functional model cut where one tensor crosses), cut for tensor
            parallelism among its stage's ranks. Needs the MPI backend; under a
            `MirroredStrategy` of `pipeline` devices the stages are its devices
            instead (`tfshard.pipeline.on_devices`; one device per stage).
        pipeline_split: blocks per stage (a list of `pipeline` ints summing to
            the model's blocks); None balances the stages by estimated FLOPs.
        micro_batches: GPipe micro-batches per predict batch (None: 2 per stage).
        pipeline_sample: a sample batch (the model's input structure, numpy):
            the stages are then balanced by each block's time measured on it
            (by world rank 0, shared with every rank) instead of by estimated
            FLOPs. Ignored with `pipeline_split`.
        pipeline_balance: what the stages balance: "compute" (default; the
            estimated FLOPs, or the times measured on `pipeline_sample`: the
            pipeline's pace) or "memory" (the bytes each stage holds: the
            largest rank's memory, e.g. to load a model that only just fits).

    Returns:
        A `ShardedModel` wrapping the converted model(s).

    Raises:
        ValueError: the ranks disagree on the model, its weights or the plan, the model is not
            built, `tensor_parallel` does not divide the world size, a rule
            cannot apply (the message names the layer, its shape, the rank and
            the sizes that would work), or the strategy is of another kind,
            or the model cannot be copied per replica.
    """
    if strategy is None:
        world = world or init()
        strategy = world.strategy
    if isinstance(model, ShardedModel):
        raise ValueError(f"Model {model.name!r} is already sharded.")
    if not isinstance(model, keras.layers.Layer) or not model.built:
        raise ValueError(
            f"tfshard.shard needs a built Keras model; got {type(model).__name__} "
            f"(built={getattr(model, 'built', None)}). Call it on an input first."
        )
    if pipeline not in (None, 1):
        if strategy is not None and strategy_kind(strategy) == "mirrored":
            check_balance(pipeline_balance)
            source_config, config_error = copying.serialize_model(model)
            sharded = on_devices.shard_on_devices(
                model, _as_plan(plan), strategy, pipeline, tensor_parallel, pipeline_split,
                micro_batches, comm_lib.check_comm_dtype(comm_dtype), pipeline_sample,
                pipeline_balance)
            return _record_source(sharded, source_config, config_error)
        if strategy is not None:
            raise ValueError(
                f"tfshard.shard({model.name!r}, pipeline={pipeline!r}) under "
                f"{type(strategy).__name__}: pipeline stages run under MPI (./horovodrun.sh "
                "-np N), or on the devices of one process under a MirroredStrategy; not "
                "across MultiWorker processes yet. Use tensor_parallel there.")
        sharded = _shard_pipeline(model, plan, world, pipeline, tensor_parallel,
                                  pipeline_split, micro_batches, check_weights, comm_dtype,
                                  pipeline_sample, pipeline_balance)
        return _record_layout(sharded, world, sharded.tensor_parallel, pipeline)
    if strategy is not None:
        return shard_replicas(model, _as_plan(plan), strategy, world, tensor_parallel,
                              check_weights, comm_lib.check_comm_dtype(comm_dtype))
    if tensor_parallel is not None and (not isinstance(tensor_parallel, int) or tensor_parallel < 1
                                        or world.size % tensor_parallel):
        raise ValueError(
            f"tensor_parallel={tensor_parallel!r} does not divide the {world.size} ranks of this "
            f"job (rank {world.rank}); values that work: "
            f"{[d for d in range(1, world.size + 1) if world.size % d == 0]} (None = {world.size})."
        )
    plan = _as_plan(plan)
    source_config, config_error = copying.serialize_model(model)
    tp = tensor_parallel or default_tensor_parallel(world)
    # Agree before splitting: ranks that disagree on tensor_parallel would otherwise form
    # different groups (MPI) or process sets (Horovod) and wait for each other there.
    comm_dtype = comm_lib.check_comm_dtype(comm_dtype)
    _agree_on_model(world, model, tp, check_weights, comm_dtype)
    comm, group = world.comm.split(tp)
    plan, meter = convert.convert(model, plan, comm, world, comm_dtype)
    sharded = ShardedModel(model, plan, world, comm, group,
                           replicas=[Replica(model, plan, comm, None, meter)])
    return _record_layout(_record_source(sharded, source_config, config_error), world, tp)


def default_tensor_parallel(world, size=None):
    """`tensor_parallel=None`: the ranks of one host (every rank on one host).

    A collective of the world's ranks the first time (they exchange their hosts).
    """
    size = world.size if size is None else size
    if size == 1:
        return 1
    return default_group(world.comm.hosts())


def _record_layout(sharded, world, tp, pipeline=1):
    """Notes on `sharded.plan` which host each rank runs on and this rank's cores (for
    its summary); warns once, on rank 0, when tensor-parallel groups span hosts."""
    if world is None or world.size == 1:
        return sharded
    sharded.plan.placement = world.placement
    layout = Layout(tuple(world.comm.hosts()), tp, pipeline)
    sharded.plan.layout = layout
    if layout.wide_groups() and world.rank == 0:
        import warnings

        warnings.warn(
            f"tfshard.shard: tensor_parallel={tp} puts ranks of different hosts in one "
            f"tensor-parallel group ({layout.host_count} hosts), so every block's all-reduce "
            f"crosses the network; tensor_parallel={default_group(layout.hosts)} keeps each "
            "group inside a host (data parallelism across hosts).", stacklevel=3)
    return sharded


def _shard_pipeline(model, plan, world, pipeline, tensor_parallel, pipeline_split, micro_batches,
                    check_weights, comm_dtype, sample=None, balance="compute"):
    """`shard()` with pipeline stages (see `tfshard.pipeline.staged`)."""
    tp = staged.check_mesh(world, pipeline, tensor_parallel)
    check_balance(balance)
    if micro_batches is not None and (not isinstance(micro_batches, int) or micro_batches < 1):
        raise ValueError(f"micro_batches must be an int >= 1; got {micro_batches!r}.")
    plan = _as_plan(plan)
    source_config, config_error = copying.serialize_model(model)
    comm_dtype = comm_lib.check_comm_dtype(comm_dtype)
    # Agree on the request first: a measured split is a collective of its own.
    _agree_on_model(world, model, tp, check_weights, comm_dtype, {"pipeline": consistency.digest(
        [pipeline, pipeline_split, micro_batches, sample is not None, balance])})
    graph, stage_plan = staged.plan_pipeline(
        model, pipeline, pipeline_split, plan, tp,
        measure=None if sample is None else (world, sample), balance=balance)
    sharded = staged.shard_stages(model, graph, stage_plan, plan, world, pipeline, tp,
                                  comm_dtype, micro_batches)
    return _record_source(sharded, source_config, config_error)


def _record_source(sharded, config, error):
    """Keeps the unsharded model's config (serialized before the cut) on `sharded`,
    for `save(gather=True)`; returns `sharded`."""
    set_untracked(sharded, source_config=config, source_config_error=error)
    return sharded


def _as_plan(plan):
    if plan is None or (isinstance(plan, str) and plan == "auto"):
        return Plan.auto()
    if isinstance(plan, dict):
        return Plan.from_rules(plan)
    if isinstance(plan, ResolvedPlan):
        return plan.request
    if not isinstance(plan, Plan):
        raise ValueError(f"plan must be 'auto', a dict of rules or a tfshard.Plan; got {plan!r}.")
    return plan


def _agree_on_model(world, model, tp_size, check_weights, comm_dtype=None, extra=None):
    """Ranks agree on the model (class, structure and, unless told not to, its
    weight values) and on the mesh (and `extra` digests) before anything else collective."""
    if world.comm.size == 1:
        return
    parts = {"model structure": consistency.digest(consistency.model_structure(model)),
             "model class": consistency.digest(type(model).__qualname__),
             "world size": consistency.digest(world.comm.size),
             "tensor_parallel": consistency.digest(tp_size),
             "comm_dtype": consistency.digest(str(comm_dtype))}
    parts.update(extra or {})
    if check_weights:
        parts["weight values"] = consistency.weights_digest(model)
    consistency.agree(world.comm, parts, "tfshard.shard()")


def shard_replicas(model, plan, strategy, world, tensor_parallel, check_weights,
                   comm_dtype=None, build_replica=None):
    """`shard()` under a tf.distribute strategy: one converted model per local replica.

    Args:
        model: replica 0's model (built outside any strategy scope).
        plan: a `Plan`.
        strategy: a `MirroredStrategy` or `MultiWorkerMirroredStrategy`.
        world: the `World`, or None.
        tensor_parallel: None or the number of replicas.
        check_weights: compare weight digests across ranks first.
        comm_dtype: see `shard`.
        build_replica: `device -> model` for each further local replica; None
            copies `model` (weights included) onto the replica's device.
            `tfshard.load` passes a builder of deferred models, which each
            replica then fills from the file.

    Returns:
        The `ShardedModel`; `replicas[i].model` is local replica i's model.
    """
    plan, comm_dtype = _as_plan(plan), comm_lib.check_comm_dtype(comm_dtype)
    comms = comm_lib.for_replicas(strategy)
    size, kind = strategy.num_replicas_in_sync, comms[0].backend
    where = f"tfshard.shard({model.name!r}, strategy={type(strategy).__name__})"
    if tensor_parallel is not None and (not isinstance(tensor_parallel, int)
                                        or tensor_parallel < 1 or size % tensor_parallel):
        raise ValueError(
            f"{where}: tensor_parallel={tensor_parallel!r} does not divide the {size} replicas; "
            f"values that work: {[d for d in range(1, size + 1) if size % d == 0]} (None = "
            f"{size}).")
    tp = tensor_parallel or size
    if tf.distribute.has_strategy():
        raise ValueError(
            f"{where} was called inside a strategy scope or strategy.run; call it outside: "
            "tfshard places each replica's slices on its device itself.")
    # (A model of deferred variables, from tfshard.load, was built here outside any scope.)
    distributed = [] if build_replica is not None else [
        v.path for v in model.weights
        if isinstance(getattr(v, "value", v), tf.distribute.DistributedValues)]
    if distributed:
        raise ValueError(
            f"{where}: the model's variables were created under a strategy scope (e.g. "
            f"{distributed[0]!r} is mirrored on every device). Build the model outside "
            "strategy.scope(); tfshard puts each replica's slices on its own device.")
    if world is None or world.strategy is not strategy:
        world = World(comm=comms[0] if kind == "multiworker" else comm_lib.create("local"),
                      backend=kind)
    if kind == "multiworker" and tensor_parallel is None:
        tp = default_tensor_parallel(world, size)
    if tp != size and kind == "mirrored":
        return _shard_groups(model, plan, strategy, world, tp, comm_dtype, build_replica, where)
    source_config, config_error = copying.serialize_model(model)
    _agree_on_model(world, model, tp, check_weights, comm_dtype)
    group = 0
    if tp != size:  # MultiWorker: this process's replica in its group of tp
        comms[0], group = comms[0].split(tp)
    devices = list(strategy.extended.worker_devices)
    replicas = [None] * len(comms)
    # The copies are made from the whole model, so it is cut last (as replica 0).
    for i in reversed(range(len(comms))):
        own = i == 0 and (build_replica is not None or copying.placed_on(model, devices[0]))
        with tf.device(devices[i]):
            if own:
                replica_model = model
            elif build_replica is not None:
                replica_model = build_replica(devices[i])
            else:
                replica_model = copying.copy_to(model, where, devices[i])
            local_plan, meter = convert.convert(replica_model, plan, comms[i], world, comm_dtype)
            replicas[i] = Replica(replica_model, local_plan, comms[i], devices[i], meter)
    sharded = ShardedModel(replicas[0].model, replicas[0].plan, world, comms[0], group,
                           replicas=replicas, strategy=strategy)
    if kind == "multiworker":
        _record_layout(sharded, world, tp)
    return _record_source(sharded, source_config, config_error)


def _shard_groups(model, plan, strategy, world, tp, comm_dtype, build_replica, where):
    """MirroredStrategy replicas in data-parallel groups of `tp`: each group a
    MirroredStrategy of its own devices, sharded as one tensor-parallel group.

    Group 0 cuts `model`; the others a copy of it (or, from `tfshard.load`, a model
    `build_replica` builds) placed on their first device. Each group's collectives
    run among its own replicas only; `predict` and `generate` share the work among
    the groups, which run at the same time in threads of this process.
    """
    devices = list(strategy.extended.worker_devices)
    groups = [None] * (len(devices) // tp)
    # The copies are made from the whole model, so it is cut last (as group 0).
    for g in reversed(range(len(groups))):
        mine = devices[g * tp:(g + 1) * tp]
        if g == 0:
            base = model
        elif build_replica is not None:
            base = build_replica(mine[0])
        else:
            base = copying.copy_to(model, where, mine[0])
        groups[g] = shard_replicas(base, plan, tf.distribute.MirroredStrategy(mine), None,
                                   None, False, comm_dtype, build_replica)
    first = groups[0]
    sharded = ShardedModel(first.inner, first.plan, world, first.tp_comm, 0,
                           strategy=strategy, group_models=groups)
    _record_source(sharded, first.source_config, first.source_config_error)
    return sharded
