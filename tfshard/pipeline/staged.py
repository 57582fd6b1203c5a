"""`shard(model, pipeline=P)`: each rank runs one stage's blocks, cut for tensor parallelism.

The world is a mesh of `DP x P x T` ranks: data-parallel groups of
consecutive `P * T` ranks, each a pipeline of `P` stages of `T` consecutive
ranks. A rank keeps only its stage's layers (the others are released,
`tfshard.layers.released`), cuts them with the tensor-parallel plan among its
stage's ranks, and hands activations to the next stage point to point
(`tfshard.pipeline.gpipe`).
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from tfshard import convert
from tfshard import inputs as inputs_lib
from tfshard import kv_cache
from tfshard.layers import walk
from tfshard.layers.released import release
from tfshard.layers.tracking import set_untracked
from tfshard.pipeline import cut as cut_lib
from tfshard.pipeline import decode
from tfshard.pipeline import gpipe
from tfshard.plan.stages import plan_stages
from tfshard.plan.structure import var_bytes
from tfshard.sharded_model import Replica, ShardedModel


def plan_pipeline(model, pipeline, pipeline_split=None, plan=None, tensor_parallel=1,
                  measure=None, balance="compute"):
    """The model's blocks and the stage boundaries (every rank computes the same).

    Args:
        model: the built model.
        pipeline: the number of stages.
        pipeline_split: None (balance by estimated cost) or blocks per stage.
        plan: the tensor-parallel `Plan`, so no stage starts between a column layer
            and the row layer that takes its cut output.
        tensor_parallel: ranks per stage.
        measure: `(world, sample batch)`: balance by block times measured on the
            sample by world rank 0 (and shared, so every rank splits alike)
            instead of by estimated FLOPs.
        balance: "compute" (by the blocks' costs) or "memory" (by the bytes
            each stage holds; `measure` is then not used).

    Returns:
        `(graph, stage_plan)`.

    Raises:
        ValueError: the model cannot be cut, or `pipeline`/`pipeline_split` do not fit its
            blocks (the message names the model and what would work).
    """
    splits = None
    if plan is not None and tensor_parallel > 1:
        resolved = plan.resolve(model, tensor_parallel, 0)
        splits = ({e.path for e in resolved.sharded if e.rule == "column" and not e.gather_output},
                  {e.path for e in resolved.sharded if e.input_is_parallel})
    try:
        graph = cut_lib.graph_of(model, splits)
    except cut_lib.CutError as e:
        raise ValueError(f"pipeline={pipeline}: {e}") from None
    if measure is None or pipeline_split is not None or balance == "memory":
        return graph, plan_stages(graph.blocks, pipeline, pipeline_split, by=balance)
    world, sample = measure
    seconds = None
    if world.rank == 0:
        try:
            seconds = cut_lib.measure_blocks(graph, sample)
        except Exception as e:  # noqa: BLE001 - shared, then raised on every rank
            seconds = f"{type(e).__name__}: {e}"
    seconds = world.comm.allgather_object(seconds)[0]
    if isinstance(seconds, str):
        raise ValueError(f"pipeline={pipeline}: timing the blocks on pipeline_sample failed "
                         f"on rank 0: {seconds}")
    blocks = [dataclasses.replace(b, cost=float(t)) for b, t in zip(graph.blocks, seconds)]
    graph.blocks = blocks
    return graph, plan_stages(blocks, pipeline, None, cost_unit="s")


def check_mesh(world, pipeline, tensor_parallel):
    """The tensor-parallel size for `pipeline` stages on this world.

    Raises:
        ValueError: `pipeline` or `tensor_parallel` is not a positive int, or
            `pipeline * tensor_parallel` does not divide the world, or the
            backend has no point-to-point transfers (Horovod over Gloo).
    """
    size, rank = world.size, world.rank
    if not isinstance(pipeline, int) or pipeline < 1:
        raise ValueError(f"pipeline={pipeline!r}: give the number of stages, an int >= 1.")
    if size % pipeline:
        raise ValueError(f"pipeline={pipeline} does not divide the {size} ranks of this job "
                         f"(rank {rank}); stage counts that work: "
                         f"{[d for d in range(1, size + 1) if size % d == 0]}.")
    tp = size // pipeline if tensor_parallel is None else tensor_parallel
    if not isinstance(tp, int) or tp < 1 or size % (pipeline * tp):
        raise ValueError(
            f"pipeline={pipeline} x tensor_parallel={tensor_parallel!r} does not divide the "
            f"{size} ranks of this job (rank {rank}); tensor_parallel values that work with "
            f"{pipeline} stages: {[d for d in range(1, size // pipeline + 1) if (size // pipeline) % d == 0]}.")
    if not hasattr(world.comm, "send"):
        raise ValueError(
            f"pipeline={pipeline}: stages hand activations to each other point to point, "
            f"which the {world.backend!r} backend cannot do. Launch with MPI "
            "(./horovodrun.sh -np N, without --gloo), or use tensor_parallel alone.")
    return tp


def _release_others(model, stages, own, held):
    """Releases every layer of `model` that stage `own` does not run (see `release`)."""
    nodes = walk(model)
    parent = {id(n.layer): n.parent for n in nodes}
    keep = set(held)
    for layer_id in list(held):
        up = parent.get(layer_id)
        while up is not None and id(up) not in keep:
            keep.add(id(up))
            up = parent.get(id(up))
    runs = {}
    for s, stage in enumerate(stages):
        for layer_id in stage.held_layers():
            runs.setdefault(layer_id, []).append(s)
    for node in nodes:
        if id(node.layer) not in keep:
            text = ", ".join(str(s) for s in runs.get(id(node.layer), [])) or "none"
            release(node.layer, own, text)


def shard_stages(model, graph, stage_plan, plan, world, pipeline, tp, comm_dtype=None,
                 micro_batches=None):
    """Cuts `model` in place to this rank's stage and its tensor-parallel slices.

    Args:
        model: the built model, agreed on by every rank.
        graph: `plan_pipeline`'s graph of it.
        stage_plan: `plan_pipeline`'s `StagePlan`.
        plan: the tensor-parallel `Plan`.
        world: the `World`.
        pipeline: the number of stages.
        tp: ranks per stage (tensor parallel).
        comm_dtype: see `tfshard.shard`.
        micro_batches: GPipe micro-batches per batch in `predict` (None: 2 per stage).

    Returns:
        A `PipelinedModel`.
    """
    group_comm, group = world.comm.split(pipeline * tp)
    tp_comm, index = group_comm.split(tp)
    stages = [cut_lib.Stage(graph, stage_plan.bounds[s], s, pipeline) for s in range(pipeline)]
    stage = stages[index]
    held = stage.held_layers()

    def before_cut():
        _release_others(model, stages, index, held)
        return held

    resolved, meter = convert.convert(model, plan, tp_comm, world, comm_dtype, before_cut)
    resolved = resolved.with_stages(stage_plan, index, var_bytes(model.weights))
    links = gpipe.Transfers(group_comm, pipeline, tp)
    _install_decode(model, stage, stage_plan, resolved, links, tp_comm.rank)
    return PipelinedModel(model, resolved, world, tp_comm, group, group_comm=group_comm,
                          replicas=[Replica(model, resolved, tp_comm, None, meter)],
                          stage=stage, links=links, micro_batches=micro_batches)


def _install_decode(model, stage, stage_plan, plan, links, tp_rank):
    """Makes a keras-hub CausalLM generate stage by stage (`tfshard.pipeline.decode`)."""
    if not (hasattr(model, "_build_cache") and hasattr(model, "call_with_cache")):
        return
    layers = list(getattr(model.backbone, "transformer_layers", []))
    start, stop = stage_plan.bounds[stage.index]
    try:
        heads = kv_cache.cache_heads(model, plan, tp_rank)
    except ValueError as e:
        reason = str(e)
    else:
        kv, dim = heads if heads is not None else (None, None)
        reason = decode.install(model, layers[start:stop], links, kv, dim)
    if reason is not None:
        def _build_cache(*args, **kwargs):
            raise ValueError(reason)

        set_untracked(model, _build_cache=_build_cache)


class PipelinedModel(ShardedModel):
    """A `ShardedModel` whose rank runs one pipeline stage.

    `predict` runs each batch through the stages in micro-batches (GPipe) and
    returns the output on every rank; a call (`model(x)`, traceable) sends the
    batch through whole; `generate` decodes with each stage caching its own
    layers' keys and values.

    Args (beyond `ShardedModel`'s):
        stage: this rank's `tfshard.pipeline.cut.Stage`.
        links: its `tfshard.pipeline.gpipe.Transfers`.
        micro_batches: micro-batches per `predict` batch (None: 2 per stage).
    """

    def __init__(self, model, plan, world, tp_comm, group, stage, links, micro_batches=None,
                 **kwargs):
        super().__init__(model, plan, world, tp_comm, group, **kwargs)
        output = cut_lib.output_structure(model)
        set_untracked(self, stage=stage, links=links, _output=output,
                      _output_likes=keras.tree.flatten(output), _stage_step=None)
        self.micro_batches = micro_batches

    @property
    def pipeline(self):
        """The number of pipeline stages."""
        return self.links.stages

    def pipeline_stats(self):
        """This rank's pipeline so far (`Transfers.reading`): bytes sent to the next
        stage, seconds busy and waiting, and the measured bubble fraction of predict."""
        return self.links.reading()

    def call(self, inputs, training=False):
        stage, links = self.stage, self.links
        by_name = stage.inputs_by_name(inputs)
        x = None if links.first else links.recv_prev(stage.receives)
        y = stage(by_name, x, training=training)
        flat = None
        if links.last:
            flat = keras.tree.flatten(y)
        else:
            links.send_next(y)
        flat = links.share_from_last(flat, self._output_likes)
        return keras.tree.pack_sequence_as(self._output, flat)

    def run_batch(self, batch, where):
        """One batch through the stages in micro-batches; numpy out on every rank."""
        preprocessor = getattr(self.inner, "preprocessor", None)
        if preprocessor is not None:
            batch = inputs_lib.unpack_x(preprocessor(batch))
        inputs_lib.check_sequence_length(self.inner, batch, where)
        if self._stage_step is None:
            stage = self.stage
            set_untracked(self, _stage_step=tf.function(
                lambda inputs, x: stage(inputs, x), reduce_retracing=True))
        batch = keras.tree.map_structure(np.asarray, batch)
        self.stage.check_ids(self.stage.inputs_by_name(batch), where)
        try:
            return gpipe.run_gpipe(self.stage, self._stage_step, self.links, batch,
                                   self.micro_batches, self._output)
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as err:
            if "tfshard MPI" in str(err):
                raise
            raise inputs_lib.invalid_argument_to_value_error(err, where, batch) from None

    def predict(self, x, batch_size=None, verbose="auto", steps=None, callbacks=None,
                schedule="even", weights=None, gather="all", micro_batches=None):
        """`ShardedModel.predict` through the pipeline stages.

        Args:
            micro_batches: GPipe micro-batches per batch (None: the model's
                `micro_batches`, by default 2 per stage, at most one row each).
                Every rank must pass the same.
            (the others as `ShardedModel.predict`)
        """
        saved = self.micro_batches
        if micro_batches is not None:
            if not isinstance(micro_batches, int) or micro_batches < 1:
                raise ValueError(f"{self.call_site('predict')}: micro_batches must be an int "
                                 f">= 1; got {micro_batches!r}.")
            self.micro_batches = micro_batches
        try:
            return super().predict(x, batch_size=batch_size, verbose=verbose, steps=steps,
                                   callbacks=callbacks, schedule=schedule, weights=weights,
                                   gather=gather)
        finally:
            self.micro_batches = saved

    def decode_step_refusal(self):
        """The fused decode step runs whole models; stages keep keras-hub's loop."""
        return "pipeline stages run keras-hub's loop stage by stage"

    def generate(self, inputs, max_length=None, stop_token_ids="auto", strip_prompt=False,
                 sampler=None, micro_batches=None):
        """`ShardedModel.generate` through the stages, each caching its own layers.

        Args:
            micro_batches: cut each decode step of several prompts into this many
                micro-batches that follow each other through the stages (None: 1;
                see `tfshard.pipeline.decode.install` for why more is slower on a
                CPU). Every rank must pass the same.
            (the others as `ShardedModel.generate`)
        """
        wanted = self.links.decode_micro_batches if micro_batches is None else micro_batches
        if not isinstance(wanted, int) or wanted < 1:
            raise ValueError(f"{self.call_site('generate')}: micro_batches must be an int >= 1; "
                             f"got {micro_batches!r}.")
        if wanted != self.links.decode_micro_batches:
            self.links.decode_micro_batches = wanted
            self.inner.generate_function = None  # traced with the other count
        return super().generate(inputs, max_length=max_length, stop_token_ids=stop_token_ids,
                                strip_prompt=strip_prompt, sampler=sampler)

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        raise NotImplementedError(
            f"{self.name}.quantize under pipeline stages: quantize the model before sharding "
            "it (model.quantize('int8'), then tfshard.shard(model, pipeline=...)), or load "
            "with tfshard.load(..., quantize='int8') without pipeline stages.")

    def save(self, filepath, gather=False, overwrite=True, **kwargs):
        """Saves a sharded checkpoint: one file per rank of the first pipeline, each
        holding its stage's slices (any layout reloads it).

        Raises:
            NotImplementedError: `gather=True` (a whole `.keras` file) under
                pipeline stages.
        """
        if gather:
            raise NotImplementedError(
                f"{self.name}.save(gather=True) under pipeline stages: not supported yet. "
                "Save a sharded checkpoint (a folder) and load it with "
                "tfshard.load(folder) in any layout, or save the unsharded model.")
        return super().save(filepath, gather=False, overwrite=overwrite, **kwargs)
