"""`shard(model, pipeline=P, strategy=MirroredStrategy)`: the stages on one process's devices.

Under MPI each pipeline stage is a rank (`tfshard.pipeline.staged`). Under a
`tf.distribute.MirroredStrategy` of P devices (GPUs, or logical CPUs from
`tfshard.cpu_devices`) each stage is a device of this one process: the model
is cut into the same blocks and balanced stages, then every layer a stage runs
is pinned to the stage's device (`tfshard.layers.placed`): its variables move
there and its math runs there. The activation crossing a stage boundary is
copied to the next device by TensorFlow; nothing else moves.

`predict` cuts each batch into micro-batches and runs them all in one traced
function: stage s of micro-batch j and stage s + 1 of micro-batch j - 1 have
no data dependence, so TensorFlow's executor runs them at once (the GPipe
schedule, without a scheduler of our own). `generate` is keras-hub's own loop;
each layer's cache update runs on its stage's device.
"""

import keras
import tensorflow as tf

from tfshard import comm as comm_lib
from tfshard import convert
from tfshard.layers.base import even_ranges
from tfshard.layers.placed import bytes_by_device, move_variables, place
from tfshard.layers.tracking import set_untracked
from tfshard.pipeline import cut as cut_lib
from tfshard.pipeline.gpipe import default_micro_batches
from tfshard.pipeline.staged import plan_pipeline
from tfshard.sharded_model import Replica, ShardedModel
from tfshard.world import World


def shard_on_devices(model, plan, strategy, pipeline, tensor_parallel=None, pipeline_split=None,
                     micro_batches=None, comm_dtype=None, sample=None, balance="compute"):
    """Cuts `model` into `pipeline` stages, stage s on the strategy's device s.

    Args:
        model: a built Keras model (outside any strategy scope).
        plan: the `Plan` (at one rank per stage it cuts nothing; it describes the
            layers in `summary()`).
        strategy: a `tf.distribute.MirroredStrategy` of `pipeline` devices.
        pipeline: the number of stages.
        tensor_parallel: None or 1 (tensor parallelism inside stages needs MPI).
        pipeline_split, sample, balance: see `tfshard.shard` (`pipeline_split`,
            `pipeline_sample`, `pipeline_balance`).
        micro_batches: micro-batches per `predict` batch (None: 2 per stage).
        comm_dtype: see `tfshard.shard`.

    Returns:
        A `DevicePipelinedModel`.

    Raises:
        ValueError: `pipeline` is not the strategy's device count, `tensor_parallel`
            is above 1, the call is inside a strategy scope, or the model cannot be
            cut (the message says what would work).
    """
    devices = list(strategy.extended.worker_devices)
    where = (f"tfshard.shard({model.name!r}, pipeline={pipeline!r}, "
             f"strategy={type(strategy).__name__} of {len(devices)} devices)")
    if not isinstance(pipeline, int) or pipeline != len(devices):
        raise ValueError(
            f"{where}: under a MirroredStrategy each stage takes one device of the "
            f"strategy ({', '.join(devices)}); use pipeline={len(devices)}, or a strategy of "
            f"{pipeline} devices (tf.distribute.MirroredStrategy(tfshard.cpu_devices({pipeline}))).")
    if tensor_parallel not in (None, 1):
        raise ValueError(
            f"{where}: tensor_parallel={tensor_parallel!r} inside the stages of one process is "
            "not supported; use tensor_parallel=1 here, or launch PP x TP ranks with MPI "
            f"(./horovodrun.sh -np {pipeline * tensor_parallel if isinstance(tensor_parallel, int) else 'N'}).")
    if tf.distribute.has_strategy():
        raise ValueError(f"{where} was called inside a strategy scope or strategy.run; call it "
                         "outside: tfshard places each stage on its device itself.")
    world = World(comm_lib.create("local"), "local")
    graph, stage_plan = plan_pipeline(model, pipeline, pipeline_split, None, 1,
                                      measure=None if sample is None else (world, sample),
                                      balance=balance)
    stages = [cut_lib.Stage(graph, stage_plan.bounds[s], s, pipeline) for s in range(pipeline)]
    resolved, meter = convert.convert(model, plan, world.comm, world, comm_dtype)
    # A layer two stages run (a tied embedding) stays with the first.
    owner = {}
    for s, stage in enumerate(stages):
        for layer_id, layer in stage.held_layers().items():
            owner.setdefault(layer_id, (s, layer))
    for s, layer in owner.values():
        place(layer, devices[s])
    sharded = DevicePipelinedModel(
        model, resolved, world, world.comm, 0,
        replicas=[Replica(model, resolved, world.comm, None, meter)],
        devices=devices, stage_plan=stage_plan, layers=owner, micro_batches=micro_batches)
    sharded.settle()
    return sharded


class DevicePipelinedModel(ShardedModel):
    """A `ShardedModel` whose pipeline stages are the devices of this process.

    Args (beyond `ShardedModel`'s):
        devices: stage s runs on `devices[s]`.
        stage_plan: the `StagePlan`.
        layers: `{layer id: (stage, layer)}` of every layer a stage runs.
        micro_batches: micro-batches per `predict` batch (None: 2 per stage).
    """

    def __init__(self, model, plan, world, tp_comm, group, devices, stage_plan, layers,
                 micro_batches=None, **kwargs):
        super().__init__(model, plan, world, tp_comm, group, **kwargs)
        set_untracked(self, devices=list(devices), stage_plan=stage_plan,
                      _stage_layers=dict(layers))
        self.micro_batches = micro_batches

    @property
    def pipeline(self):
        """The number of pipeline stages."""
        return len(self.devices)

    def settle(self):
        """Moves every stage's variables to its device (again after `tfshard.load`, which
        fills the variables after the cut) and records the bytes each device holds."""
        for s, layer in self._stage_layers.values():
            move_variables(layer, self.devices[s])
        held = self.device_bytes()
        self.plan = self.plan.with_stages(self.stage_plan, None,
                                          [held.get(d, 0) for d in self.devices], self.devices)
        self.replicas[0] = self.replicas[0]._replace(plan=self.plan)

    def device_bytes(self):
        """`{device: bytes of the model's variables there}`, measured (keys: the
        strategy's device names, or the variables' own)."""
        return bytes_by_device(self.inner.weights, self.devices)

    def decode_step_refusal(self):
        """The fused decode step keeps one model on one device; stages on several devices
        keep keras-hub's loop (each layer's cache update on its stage's device)."""
        return f"the pipeline stages sit on {len(self.devices)} devices of this process"

    def call(self, inputs, training=False):
        """The model on `inputs` in micro-batches (when the rows are known at trace time),
        each stage on its device; the micro-batches' stages overlap."""
        rows = keras.tree.flatten(inputs)[0].shape[0]
        m = 1 if rows is None else min(rows, self.micro_batches or
                                       default_micro_batches(rows, self.pipeline))
        if m <= 1:
            return self.inner(inputs, training=training)
        outs = [self.inner(keras.tree.map_structure(lambda v, a=a, b=b: v[a:b], inputs),
                           training=training) for a, b in even_ranges(rows, m)]
        return keras.tree.map_structure(lambda *parts: tf.concat(parts, axis=0), *outs)

    def run_batch(self, batch, where):
        if self._predict_step is None:
            # Traced per batch shape (no relaxed shapes): the micro-batches need the rows.
            self._predict_step = tf.function(lambda b: self.call(b, training=False))
        return super().run_batch(batch, where)

    def predict(self, x, batch_size=None, verbose="auto", steps=None, callbacks=None,
                schedule="even", weights=None, gather="all", micro_batches=None):
        """`ShardedModel.predict` through the stages in micro-batches.

        Args:
            micro_batches: micro-batches per batch (None: the model's `micro_batches`,
                by default 2 per stage, at most one row each).
            (the others as `ShardedModel.predict`)
        """
        if micro_batches is not None and (not isinstance(micro_batches, int)
                                          or micro_batches < 1):
            raise ValueError(f"{self.call_site('predict')}: micro_batches must be an int >= 1; "
                             f"got {micro_batches!r}.")
        saved = self.micro_batches
        if micro_batches is not None and micro_batches != saved:
            self.micro_batches, self._predict_step = micro_batches, None
        try:
            return super().predict(x, batch_size=batch_size, verbose=verbose, steps=steps,
                                   callbacks=callbacks, schedule=schedule, weights=weights,
                                   gather=gather)
        finally:
            if self.micro_batches != saved:
                self.micro_batches, self._predict_step = saved, None

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        raise NotImplementedError(
            f"{self.name}.quantize with stages on devices: quantize the model before sharding "
            "it (model.quantize('int8'), then tfshard.shard(model, pipeline=..., "
            "strategy=...)), so each stage's quantized weights are placed with it.")
