"""`tfshard.load`: a model sharded from the start, each rank reading only its slices.

The runtime's entry point for files. It sits above both the model (`shard`) and the
readers (`tfshard.io`): it resolves the source, builds the model with
deferred variables, has the ranks agree on the file, shards the model, then fills
each rank's slices from the file.
"""

import contextlib
import os

import tensorflow as tf

from tfshard import io as tfio
from tfshard import consistency
from tfshard.comm.strategies import strategy_kind
from tfshard.sharding import shard, shard_replicas
from tfshard.world import init


def load(source, plan="auto", tensor_parallel=None, strategy=None, *, model=None, world=None,
         safe_mode=True, custom_objects=None, dtype=None, quantize=None, comm_dtype=None,
         pipeline=None, pipeline_split=None, micro_batches=None, pipeline_balance="compute"):
    """Loads a model sharded from the start: each rank reads only its slices.

    Args:
        source: a `.keras` file, a `.weights.h5` file (with `model=`), a
            keras-hub preset directory (Keras format or Hugging Face
            safetensors), a GGUF file (Llama architecture), a checkpoint
            folder written by `ShardedModel.save`, or a named real model:
            "smollm2" (SmolLM2-135M-Instruct) or "minilm" (all-MiniLM-L6-v2).
        plan: "auto", a `tfshard.Plan` or a `{regex: rule}` dict.
        tensor_parallel: ranks per tensor-parallel group (see `tfshard.shard`).
        strategy: a `tf.distribute.MirroredStrategy` (each local replica's
            slices are read from the file onto its device, one replica at a
            time) or `MultiWorkerMirroredStrategy` (None under `tfshard launch`
            uses the world's; each worker reads its own slices).
        model: for `.weights.h5` only: a callable that builds the model (it
            is called with deferred variables), or a model config dict.
        world: the `World` (from `tfshard.init()` when None).
        safe_mode: Keras safe mode for configs (refuses stored code such as
            lambda bytecode).
        custom_objects: custom classes needed by the config.
        dtype: the float precision to load in: "float32", "bfloat16",
            "float16", "mixed_bfloat16" or "mixed_float16" (None: as saved).
            The model is built under that Keras dtype policy, so each rank's
            slices are created in it, and the file's tensors (float32, bfloat16,
            GGUF blocks) are converted a few MiB at a time: no rank holds a
            whole tensor in float32 on the way.
        quantize: "int8" to quantize the loaded model (see
            `ShardedModel.quantize`): each rank quantizes its own slices after
            reading them, so no rank holds a whole float kernel; the result
            equals the unsharded model quantized, bit for bit.
        comm_dtype: send float32 collectives in "bfloat16" or "float16" (see
            `tfshard.shard`).
        pipeline, pipeline_split, micro_batches, pipeline_balance: pipeline stages (see
            `tfshard.shard`): each rank reads only its stage's tensors (and of
            those only its tensor-parallel slices); the other stages' weights
            are never given memory.

    Returns:
        A `ShardedModel`.

    Raises:
        CheckpointError: (a ValueError) on every rank when any rank finds the
            file missing, truncated, corrupt, from a newer format, or not
            matching the model (the message names the file and the tensor).
        ValueError: (on every rank) `dtype` is not one of those above, or
            `quantize` is not None or "int8".
    """
    if strategy is not None:
        strategy_kind(strategy)  # a clear error for other strategies, before any work
    world = world or init()
    strategy = strategy or world.strategy
    with world.comm.section(f"tfshard.load({os.fspath(source)!r})"):
        if quantize not in (None, "int8"):
            hint = (" For int4, quantize before sharding: model.quantize('int4'), save it, and "
                    "tfshard.load the file (int4 files load slice by slice)."
                    if quantize == "int4" else "")
            raise ValueError(f"quantize={quantize!r}: tfshard.load quantizes to 'int8' (or "
                             f"None).{hint}")
        if quantize is not None and pipeline not in (None, 1):
            raise ValueError(f"quantize={quantize!r} with pipeline={pipeline}: not supported "
                             "yet; quantize the model, save it and load that file.")
        stages = {"pipeline": pipeline, "pipeline_split": pipeline_split,
                  "micro_batches": micro_batches, "pipeline_balance": pipeline_balance}
        sharded = _load(source, plan, tensor_parallel, model, world, safe_mode, custom_objects,
                        dtype, comm_dtype, quantize, strategy, stages)
        if quantize is not None:
            sharded.quantize(quantize)
        return sharded


def _load(source, plan, tensor_parallel, model, world, safe_mode, custom_objects, dtype,
          comm_dtype, quantize, strategy, stages):
    src, error, inner = None, None, None
    created = []
    further = []  # (model, deferred variables) of MirroredStrategy's further replicas

    def build_replica(device):
        """A further local replica's own deferred model, filled from the file below."""
        built, variables = tfio.build_model(src, dtype)
        further.append((device, built, variables))
        return built
    identity = 0
    try:
        dtype = tfio.check_dtype(dtype)
        src = tfio.resolve_source(source, model=model, safe_mode=safe_mode, custom_objects=custom_objects)
        if world.comm.size > 1:
            identity = consistency.source_identity(src.label)
        inner, created = tfio.build_model(src, dtype)
        src.prepare(inner)
    except Exception as e:  # reported to every rank below
        error = e
    tfio.agree_on_failure(world.comm, error, f"tfshard.load({source!r})")
    try:
        # The variables are still deferred: ranks agree on the file they will read
        # (name, size, sampled contents) instead of on weight values.
        consistency.agree(world.comm, {"source file": identity,
                                       "dtype": consistency.digest(str(dtype)),
                                       "quantize": consistency.digest(str(quantize))},
                          f"tfshard.load({source!r})")
        if strategy is None or stages["pipeline"] not in (None, 1):
            sharded = shard(inner, plan, world=world, strategy=strategy,
                            tensor_parallel=tensor_parallel, check_weights=False,
                            comm_dtype=comm_dtype, **stages)
        else:
            sharded = shard_replicas(inner, plan, strategy, world, tensor_parallel,
                                     check_weights=False, comm_dtype=comm_dtype,
                                     build_replica=build_replica)
    except Exception:
        if src is not None:
            src.close()
        raise
    try:
        # One replica at a time, each on its own device: the process never holds more
        # than one replica's slice of a tensor on the way.
        first = sharded.replicas[0].device
        for device, built, variables in [(first, inner, created)] + further:
            # The build's variables and the slices sharding created (also deferred).
            seen = {id(v) for v in variables}
            variables = list(variables) + [v for v in built.weights if id(v) not in seen]
            with tf.device(device) if device else contextlib.nullcontext():
                # The variables the source creates from the file's values get no
                # memory before: no zeros first, no second whole-size buffer.
                tfio.materialize(variables, built.weights, src.filled_from_values(built))
                src.fill(built)
                missing = tfio.unfilled(variables)
                if missing:
                    raise tfio.CheckpointError(
                        f"{src.label}: the file gave no value for {len(missing)} variable(s) "
                        f"of the model: {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''}.")
    except Exception as e:
        error = e
    finally:
        src.close()
    tfio.agree_on_failure(world.comm, error, f"tfshard.load({source!r})")
    sharded.settle()
    sharded.attach_source(src.label, src.preprocessor(), src.chat_template())
    return sharded
