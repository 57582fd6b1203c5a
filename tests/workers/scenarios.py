"""Runs a suite of sharding scenarios on every rank; each rank writes JSON.

    horovodrun -np N python tests/workers/scenarios.py --suite equivalence --out DIR

The pytest side (tests/test_*.py) launches this under a wall-clock timeout and
asserts on the numbers each rank recorded: a case that raised records the
error instead, so one broken case does not hide the others.
"""

import argparse
import gc
import json
import os
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tfshard.cli import import_tensorflow  # noqa: E402

import_tensorflow("keras_hub")  # the collector paused meanwhile, then the heap frozen

import keras  # noqa: E402

import models  # noqa: E402
import tfshard  # noqa: E402


def leaves(out):
    """Flattens a predict output into {name: array}, keeping dict keys."""
    if isinstance(out, dict):
        return {k: np.asarray(v) for k, v in sorted(out.items())}
    if isinstance(out, (list, tuple)):
        return {str(i): np.asarray(v) for i, v in enumerate(out)}
    return {"output": np.asarray(out)}


def compare(ref, out):
    """Per-output figures: shapes, dtypes, max |diff|, tolerance, argmax equality."""
    r, o = leaves(ref), leaves(out)
    result = {"keys_ref": sorted(r), "keys_out": sorted(o), "outputs": {}}
    for k in r:
        if k not in o:
            continue
        a, b = r[k], o[k]
        entry = {"shape_ref": list(a.shape), "shape_out": list(b.shape),
                 "dtype_ref": str(a.dtype), "dtype_out": str(b.dtype)}
        if a.shape == b.shape:
            diff = float(np.max(np.abs(a.astype("float64") - b.astype("float64")))) if a.size else 0.0
            entry.update(
                max_diff=diff,
                max_ref=float(np.max(np.abs(a))) if a.size else 0.0,
                tol=1e-5 * (1 + (float(np.max(np.abs(a))) if a.size else 0.0)),
                argmax_equal=bool(np.array_equal(np.argmax(a, -1), np.argmax(b, -1)))
                if a.ndim >= 2 and a.shape[-1] > 1 else True,
                bitwise=bool(np.array_equal(a, b)),
            )
        result["outputs"][k] = entry
    return result


def slices_held(sharded):
    """For every cut layer of every local replica: its main weight's shape vs the plan
    (whose shapes are unpacked: an int4 weight holds two values a byte).

    Keys are layer paths; with several replicas in this process (MirroredStrategy)
    they get the replica's rank appended ("path@rank").
    """
    held = {}
    for rank, replica in sharded.local_replicas().items():
        layers = {}
        for layer in replica.model._flatten_layers(include_self=False):
            if getattr(layer, "path", None):
                layers[layer.path] = layer
        for e in replica.plan.sharded:
            layer = layers[e.path]
            var = layer.__dict__.get("_kernel", None)
            var = layer.__dict__.get("_embeddings") if var is None else var
            key = e.path if len(sharded.replicas) == 1 else f"{e.path}@{rank}"
            held[key] = {"local": list(var.shape),
                         "planned": list(e.local_shape(replica.comm.rank)),
                         "full": list(e.full_shape),
                         "int4": getattr(layer, "quantization_mode", None) == "int4"}
    return held


def placement(sharded):
    """Per local replica: its device and the devices its variables live on."""
    return {str(rank): {"device": r.device, "variables": sorted(
        {getattr(v, "value", v).device for v in r.model.weights})}
        for rank, r in sharded.local_replicas().items()}


def param_bytes(model):
    return int(sum(np.asarray(v).nbytes for v in model.weights))


# How the suites shard: plain `tfshard.shard` (horovodrun, tfshard launch), or
# bound to a MirroredStrategy with `--mirrored N`.
SHARD = tfshard.shard
STRATEGY = None
ONLY = None  # --models: the equivalence models to run (None: all)
OUT = None  # --out


def run_equivalence(world, results, only=None):
    only = only or ONLY
    for name, builder in models.EQUIVALENCE.items():
        if only and name not in only:
            continue
        def case(builder=builder):
            model, x = builder()
            ref = model.predict(x, batch_size=2, verbose=0)
            sharded = SHARD(model)
            out = sharded.predict(x, batch_size=2, verbose=0)
            res = compare(ref, out)
            res["cut"] = len(sharded.plan.sharded)
            res["layers"] = len(sharded.plan.entries)
            res["slices"] = slices_held(sharded)
            res["placement"] = placement(sharded)
            res["tensor_parallel"], res["groups"] = sharded.tensor_parallel, sharded.groups
            layout = getattr(sharded.plan, "layout", None)
            res["layout"] = layout.lines() if layout is not None else []
            # A second call reuses the traced function and must agree too.
            res["call_matches_predict"] = bool(np.allclose(
                leaves(sharded(x))[sorted(leaves(out))[0]] if not isinstance(out, dict)
                else np.asarray(sharded(x)[sorted(out)[0]]),
                leaves(out)[sorted(leaves(out))[0]], rtol=1e-5, atol=1e-5))
            return res
        results[name] = guarded(case)


def run_bitwise(world, results):
    for name, (builder, rules) in models.BITWISE.items():
        def case(builder=builder, rules=rules):
            model, x = builder()
            ref = model.predict(x, batch_size=2, verbose=0)
            sharded = SHARD(model, plan=tfshard.Plan.from_rules(rules))
            out = sharded.predict(x, batch_size=2, verbose=0)
            res = compare(ref, out)
            res["cut"] = len(sharded.plan.sharded)
            res["rules"] = len(rules)
            return res
        results[f"bitwise_{name}"] = guarded(case)


def run_memory(world, results):
    def case():
        model, x = models.gpt2()
        before = param_bytes(model)
        plan = tfshard.Plan.auto(model, world.size)
        sharded_full = sum(e.full_bytes for e in plan.sharded)
        sharded = tfshard.shard(model)
        after = param_bytes(sharded.inner)
        return {"before": before, "after": after, "sharded_full": sharded_full,
                "replicated": before - sharded_full,
                "local_sharded": after - (before - sharded_full),
                "plan_local_bytes": sharded.plan.local_bytes()}
    results["memory"] = guarded(case)


def run_errors(world, results):
    rank, size = world.rank, world.size

    def gpt2_sharded():
        model, x = models.gpt2()
        return tfshard.shard(model), x

    def bad(x_fn):
        def case():
            sharded, x = gpt2_sharded()
            sharded.predict(x_fn(x), batch_size=2, verbose=0)
            return {"no_error": True}
        return case

    def with_id(value):
        def f(x):
            x = dict(x)
            x["token_ids"] = x["token_ids"].copy()
            x["token_ids"][1, 3] = value
            return x
        return f

    results["err_id_too_large"] = guarded(bad(with_id(50257)), expect_error=True)
    results["err_id_negative"] = guarded(bad(with_id(-1)), expect_error=True)
    results["err_float_ids"] = guarded(
        bad(lambda x: {**x, "token_ids": x["token_ids"].astype("float32") + 0.5}), expect_error=True)
    results["err_wrong_rank"] = guarded(
        bad(lambda x: {**x, "token_ids": x["token_ids"][..., None]}), expect_error=True)
    results["err_empty_batch"] = guarded(
        bad(lambda x: {k: v[:0] for k, v in x.items()}), expect_error=True)
    results["err_dict_keys"] = guarded(
        bad(lambda x: {"token_ids": x["token_ids"], "mask": x["padding_mask"]}), expect_error=True)

    def too_many_ranks():
        keras.utils.set_random_seed(30)
        inp = keras.Input((4,))
        out = keras.layers.Dense(size - 1, name="narrow")(keras.layers.Dense(6, name="wide")(inp))
        model = keras.Model(inp, out)
        tfshard.shard(model, plan={".*narrow": "column"})
        return {"no_error": True}
    results["err_n_larger_than_dim"] = guarded(too_many_ranks, expect_error=True)

    def disagree():
        import keras_hub

        keras.utils.set_random_seed(31)
        hidden = 16 if rank == 0 else 24  # rank 0 builds a different model
        model = keras_hub.models.GPT2Backbone(
            vocabulary_size=101, num_layers=1, num_heads=4, hidden_dim=hidden,
            intermediate_dim=32, max_sequence_length=16)
        tfshard.shard(model)
        return {"no_error": True}
    results["err_ranks_disagree"] = guarded(disagree, expect_error=True)

    def different_seed():
        # The same architecture built with another seed on each rank: the
        # structure agrees, the values do not (was a silent wrong answer).
        keras.utils.set_random_seed(40 + rank)
        inp = keras.Input((12,))
        model = keras.Model(inp, keras.layers.Dense(8, name="head")(
            keras.layers.Dense(32, activation="relu", name="body")(inp)))
        tfshard.shard(model)
        return {"no_error": True}
    results["err_weights_disagree"] = guarded(different_seed, expect_error=True)

    def one_replicated_value():
        # One element of one replicated weight (a layer norm's scale) differs.
        model, _ = models.gpt2()
        norm = next(v for v in model.weights if "layer_norm" in v.path and "gamma" in v.path)
        if rank == size - 1:
            value = norm.numpy()
            value[0] += 1e-6
            norm.assign(value)
        tfshard.shard(model)
        return {"no_error": True}
    results["err_replicated_weight_disagrees"] = guarded(one_replicated_value, expect_error=True)

    def different_inputs():
        model, x = models.gpt2()
        sharded = tfshard.shard(model)
        x = dict(x)
        x["token_ids"] = x["token_ids"] + rank  # every rank feeds other ids
        sharded.predict(x, verbose=0)
        return {"no_error": True}
    results["err_inputs_disagree"] = guarded(different_inputs, expect_error=True)

    def small():
        keras.utils.set_random_seed(4)
        inp = keras.Input((8,))
        return keras.Model(inp, keras.layers.Dense(4, name="b")(
            keras.layers.Dense(16, name="a")(inp)))

    def shard_quantized():
        model = small()
        model.quantize("float8")
        # int8 and int4 layers shard (issue 17); a float8 one under an explicit rule is refused.
        tfshard.shard(model, plan={".*a$": "column", ".*b$": "row"})
        return {"no_error": True}
    results["err_shard_quantized"] = guarded(shard_quantized, expect_error=True)

    def quantize_sharded():
        tfshard.shard(small()).quantize("int4")
        return {"no_error": True}
    results["err_quantize_sharded"] = guarded(quantize_sharded, expect_error=True)

    # The world still works after all the errors above.
    results["after_errors"] = guarded(lambda: compare(*_roundtrip(models.mlp)))


def _as_dataset(x, batch):
    import tensorflow as tf

    # As in Keras, a dataset element that is a tuple is (x, y, ...): wrap list inputs.
    return tf.data.Dataset.from_tensor_slices((tuple(x),) if isinstance(x, list) else x).batch(batch)


def _nrows(x):
    return len(keras.tree.flatten(x)[0])


def _as_generator(x, batch):
    rows = _nrows(x)
    for i in range(0, rows, batch):
        yield keras.tree.map_structure(lambda a: a[i:i + batch], x)


class _PyData(keras.utils.PyDataset):
    def __init__(self, x, batch):
        super().__init__()
        self.x, self.batch = x, batch
        self.rows = _nrows(x)

    def __len__(self):
        return -(-self.rows // self.batch)

    def __getitem__(self, i):
        return keras.tree.map_structure(lambda a: a[i * self.batch:(i + 1) * self.batch], self.x)


def _more_rows(x, rows):
    """Tiles a test input to `rows` rows (row count divides neither batch nor groups)."""
    return keras.tree.map_structure(lambda a: np.concatenate([a] * (-(-rows // len(a))))[:rows], x)


DP_MODELS = ("mlp", "two_inputs_two_outputs", "sequential_embedding", "bert", "gpt2", "llama")


def run_dp(world, results, tp=2, names=DP_MODELS, light=False):
    """Under -np 4 with tensor_parallel=2: two groups of two.

    `light`: the schedules and input kinds of `names` only (tf.distribute's run),
    not the slow-group, progress bar and error cases.
    """
    rank = world.rank
    for name in names:
        def case(name=name):
            model, x = models.EQUIVALENCE[name]()
            x = _more_rows(x, 23)
            ref = model.predict(x, batch_size=2, verbose=0)
            sharded = SHARD(model, tensor_parallel=tp)
            res = {"groups": sharded.groups, "tensor_parallel": sharded.tensor_parallel,
                   "group": sharded.group, "runs": {}}
            runs = {
                "numpy_even": lambda: sharded.predict(x, batch_size=2, verbose=0),
                "numpy_weighted": lambda: sharded.predict(x, batch_size=2, verbose=0,
                                                          schedule="weighted", weights=[3, 1]),
                "numpy_adaptive": lambda: sharded.predict(x, batch_size=2, verbose=0,
                                                          schedule="adaptive"),
                "dataset": lambda: sharded.predict(_as_dataset(x, 3), verbose=0),
                "generator_adaptive": lambda: sharded.predict(_as_generator(x, 4), verbose=0,
                                                              schedule="adaptive"),
                "pydataset_weighted": lambda: sharded.predict(_PyData(x, 5), verbose=0,
                                                              schedule="weighted", weights=[1, 2]),
                "steps": lambda: sharded.predict(x, batch_size=4, steps=3, verbose=0),
            }
            for run_name, fn in runs.items():
                out = fn()
                want = ref if run_name != "steps" else keras.tree.map_structure(lambda a: a[:12], ref)
                res["runs"][run_name] = {**compare(want, out), "schedule": sharded.last_schedule}
            out0 = sharded.predict(x, batch_size=2, verbose=0, gather="rank0")
            res["rank0_gets_none_elsewhere"] = (out0 is None) == (rank != 0)
            if rank == 0:
                res["runs"]["gather_rank0"] = compare(ref, out0)
            res["runs"]["predict_on_batch"] = compare(
                keras.tree.map_structure(lambda a: a[:3], ref),
                sharded.predict_on_batch(keras.tree.map_structure(lambda a: a[:3], x)))
            return res
        results[f"dp_{name}"] = guarded(case)
    if light:
        return

    def slow_group():
        import time as _time

        model, x = models.mlp()
        x = _more_rows(x, 96)
        sharded = SHARD(model, tensor_parallel=tp)

        class Slow(keras.callbacks.Callback):
            def on_predict_batch_end(self, batch, logs=None):
                if sharded.group == 1:
                    _time.sleep(0.05)
        out = {}
        for sched in ("even", "adaptive"):
            t0 = _time.perf_counter()
            sharded.predict(x, batch_size=2, verbose=0, schedule=sched, callbacks=[Slow()])
            out[sched] = {**sharded.last_schedule, "wall": _time.perf_counter() - t0}
        return out
    results["dp_slow_group"] = guarded(slow_group)

    def verbose_run():
        model, x = models.mlp()
        sharded = SHARD(model, tensor_parallel=tp)
        print(f"PROGRESS-START rank {rank}", flush=True)
        sharded.predict(_more_rows(x, 40), batch_size=2, verbose=1)
        print(f"PROGRESS-END rank {rank}", flush=True)
        return {}
    results["dp_verbose"] = guarded(verbose_run)

    bad = expect_error

    def sharded_mlp():
        model, x = models.mlp()
        return SHARD(model, tensor_parallel=tp), x

    results["dp_err_tp_not_dividing"] = bad(lambda: SHARD(models.mlp()[0], tensor_parallel=3))
    results["dp_err_weights_length"] = bad(
        lambda: (lambda s, x: s.predict(x, schedule="weighted", weights=[1, 2, 3]))(*sharded_mlp()))
    results["dp_err_weights_nonpositive"] = bad(
        lambda: (lambda s, x: s.predict(x, schedule="weighted", weights=[1, 0]))(*sharded_mlp()))
    results["dp_err_unknown_schedule"] = bad(
        lambda: (lambda s, x: s.predict(x, schedule="fastest"))(*sharded_mlp()))
    results["dp_err_empty"] = bad(lambda: (lambda s, x: s.predict(x[:0]))(*sharded_mlp()))
    results["dp_err_batch_size_with_dataset"] = bad(
        lambda: (lambda s, x: s.predict(_as_dataset(x, 2), batch_size=2))(*sharded_mlp()))
    def bad_id_in_one_group():
        model, x = models.gpt2()
        x = _more_rows(x, 23)
        x["token_ids"] = x["token_ids"].copy()
        x["token_ids"][21, 3] = 50257  # batch 10 of 12: computed by group 1 only
        SHARD(model, tensor_parallel=tp).predict(x, batch_size=2, verbose=0)
    results["dp_err_bad_id_in_one_group"] = bad(bad_id_in_one_group)
    results["dp_after_errors"] = guarded(lambda: compare(*_roundtrip(models.mlp)))


def run_dp_generate_and_save(world, results, tp=2):
    """Two groups of two: greedy generate shares the prompts; the checkpoint the groups
    save (group 0 writes) reloads in this process alone."""
    def case():
        from tfshard import comm as comm_lib

        model, _ = models.llama()
        rng = np.random.default_rng(3)
        mask = np.zeros((3, 12), bool)
        for r, n in enumerate([4, 6, 5]):
            mask[r, :n] = True
        vocab = model.backbone.vocabulary_size
        x = {"token_ids": np.where(mask, rng.integers(1, vocab, (3, 12)), 0).astype("int32"),
             "padding_mask": mask}
        model.compile(sampler="greedy")
        ref = model.generate(dict(x), stop_token_ids=None)
        sharded = SHARD(model, tensor_parallel=tp)
        out = sharded.generate(dict(x), stop_token_ids=None, sampler="greedy")
        path = os.path.join(OUT, "dp-llama-ckpt")
        sharded.save(path)
        alone = tfshard.load(path, world=tfshard.World(comm_lib.create("local"), "local"))
        probe = {k: v[:, :8] for k, v in models.llama()[1].items()}
        # The checkpoint loaded back in groups (every group reads its slices from it).
        again = tfshard.load(path, strategy=STRATEGY, tensor_parallel=tp)
        return {"ref": ref["token_ids"].tolist(), "out": out["token_ids"].tolist(),
                "group": sharded.group, "groups": sharded.groups,
                "files": sorted(os.listdir(path)),
                "reloaded_in_groups": compare(alone.predict(probe, verbose=0),
                                              again.predict(probe, batch_size=1, verbose=0)),
                **compare(sharded.predict(probe, verbose=0), alone.predict(probe, verbose=0))}
    results["dp_generate_save"] = guarded(case)


def _roundtrip(builder):
    model, x = builder()
    ref = model.predict(x, verbose=0)
    return ref, SHARD(model).predict(x, verbose=0)


def guarded(fn, expect_error=False):
    """Runs one case: its record, with "ok", the error if it raised, and the seconds it took
    (what a slow suite is made of).

    What earlier cases left is collected, and the rest frozen (as after the imports,
    tfshard.cli.import_tensorflow), so that the collector's passes during this case walk
    only what this case makes."""
    gc.collect()
    gc.freeze()
    start = time.perf_counter()
    try:
        res = fn()
        res["ok"] = True
    except Exception as e:  # noqa: BLE001 - recorded for the pytest side
        res = {"ok": False, "error_type": type(e).__name__, "message": str(e),
               "traceback": "" if expect_error else traceback.format_exc()}
    res["seconds"] = round(time.perf_counter() - start, 2)
    return res


def expect_error(fn):
    """Runs `fn`, which should raise; the record says what it raised (ok=False)."""
    def case():
        fn()
        return {"no_error": True}
    return guarded(case, expect_error=True)


def run_collectives(world, results):
    """The communicator's collectives, in replica context (eager and in tf.function).

    Each rank r contributes r+1 columns of value r+1 (uneven all-gather sizes);
    the first all-reduce takes strategy.run's argument unchanged.
    """
    import tensorflow as tf

    from tfshard import comm as comm_lib

    strategy = STRATEGY or world.strategy
    if strategy is None:
        run_gathers(world, results)
        return
    comms = {c.rank: c for c in comm_lib.for_replicas(strategy)}

    def per_replica(x):
        ctx = tf.distribute.get_replica_context()
        rank = int(tf.get_static_value(ctx.replica_id_in_sync_group)) if len(comms) > 1 \
            else next(iter(comms))
        comm = comms[rank]
        mine = tf.fill([2, rank + 1], float(rank + 1))
        return (comm.allreduce_sum(x), comm.allgather(mine, axis=-1),
                comm.broadcast(mine[:, :1] * 10, root=comm.size - 1))

    def case(compiled):
        run = lambda x: strategy.run(per_replica, args=(x,))  # noqa: E731
        out = (tf.function(run) if compiled else run)(tf.ones([2, 3]))
        size = strategy.num_replicas_in_sync
        results_ = [np.asarray(strategy.experimental_local_results(o)[0]) for o in out]
        want_gather = np.concatenate([np.full([2, r + 1], r + 1.0) for r in range(size)], -1)
        return {"allreduce": bool(np.array_equal(results_[0], np.full([2, 3], float(size)))),
                "allgather": bool(np.array_equal(results_[1], want_gather)),
                "broadcast": bool(np.array_equal(results_[2], np.full([2, 1], 10.0 * size)))}
    results["collectives_eager"] = guarded(lambda: case(False))
    results["collectives_function"] = guarded(lambda: case(True))
    if world.backend == "multiworker":  # host side: outside strategy.run
        def host():
            got = world.comm.allgather_object({"rank": world.rank})
            return {"objects": got == [{"rank": r} for r in range(world.size)]}
        results["collectives_host"] = guarded(host)


def run_gathers(world, results):
    """Horovod: all-gathers on every axis, uneven lengths, with and without `sizes`."""
    import tensorflow as tf

    comm, rank, size = world.comm, world.rank, world.size
    base = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)

    def mine(axis):  # rank r contributes r + 1 entries on `axis`
        return np.take(base + 100 * rank, np.arange(rank + 1) % base.shape[axis], axis=axis)

    def want(axis):
        return np.concatenate([np.take(base + 100 * r, np.arange(r + 1) % base.shape[axis],
                                       axis=axis) for r in range(size)], axis)

    def case(compiled):
        out = {}
        for axis in (0, 1, 2, -1):
            for sizes in (None, [r + 1 for r in range(size)]):
                fn = lambda x, a=axis, s=sizes: comm.allgather(x, axis=a, sizes=s)  # noqa: E731
                got = np.asarray((tf.function(fn) if compiled else fn)(tf.constant(mine(axis))))
                out[f"axis {axis} sizes {sizes is not None}"] = bool(
                    got.shape == want(axis).shape and np.array_equal(got, want(axis)))
        return out
    results["collectives_eager"] = guarded(lambda: case(False))
    results["collectives_function"] = guarded(lambda: case(True))


def read_tensorboard_run(run_dir):
    """Tags, the plan text and every scalar of one run, with TensorBoard's own reader."""
    import tensorflow as tf
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(
        run_dir, size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    tags = acc.Tags()["tensors"]
    plan_text = acc.Tensors("plan")[0].tensor_proto.string_val[0].decode()
    graphs = [t for t in tags if t == "sharded_forward"]
    scalars = {t: [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors(t)]
               for t in tags if t != "plan" and t not in graphs}
    return {"tags": sorted(tags), "plan_text": plan_text, "scalars": scalars, "graphs": graphs}


def run_tensorboard(world, results, out_dir):
    """predict with tfshard.TensorBoard, read back with TensorBoard's own reader."""

    def case():
        model, x = models.gpt2()
        sharded = SHARD(model)
        callback = tfshard.TensorBoard(os.path.join(out_dir, "tb"))
        sharded.predict(x, batch_size=2, verbose=0, callbacks=[callback])
        return {"runs": {os.path.basename(callback.rank_dir(r)): read_tensorboard_run(
            callback.rank_dir(r)) for r in callback.ranks},
            "counters": {str(r): c for r, c in sharded.collective_counters().items()}}
    results["tensorboard"] = guarded(case)


def run_strategy_errors(world, results):
    """Errors under tf.distribute; the strategy-specific ones only with --mirrored."""
    import tensorflow as tf

    def bad_id():
        model, x = models.gpt2()
        x = dict(x)
        x["token_ids"] = x["token_ids"].copy()
        x["token_ids"][1, 3] = 50257
        SHARD(model).predict(x, batch_size=2, verbose=0)
    results["err_id_too_large"] = expect_error(bad_id)

    def wrong_rank():
        model, x = models.mlp()
        SHARD(model).predict(x[..., None], verbose=0)
    results["err_wrong_rank"] = expect_error(wrong_rank)

    if world.backend == "multiworker":
        def different_inputs():
            model, x = models.mlp()
            SHARD(model).predict(x + world.rank, verbose=0)
        results["err_inputs_disagree"] = expect_error(different_inputs)
    if STRATEGY is None:
        return
    results["err_tensor_parallel_not_dividing"] = expect_error(
        lambda: SHARD(models.mlp()[0], tensor_parallel=5))
    # Stages on a MirroredStrategy's devices take one device each (5 > 2 or 3 here).
    results["err_pipeline_under_strategy"] = expect_error(
        lambda: SHARD(models.mlp()[0], pipeline=5))

    def inside_scope():
        model, _ = models.mlp()
        with STRATEGY.scope():
            SHARD(model)
    results["err_inside_scope"] = expect_error(inside_scope)

    def built_in_scope():
        with STRATEGY.scope():
            model, _ = models.mlp()
        SHARD(model)
    results["err_built_in_scope"] = expect_error(built_in_scope)

    results["err_other_strategy"] = expect_error(lambda: tfshard.shard(
        models.mlp()[0], strategy=tf.distribute.OneDeviceStrategy("/cpu:0")))
    results["err_cpu_devices_too_late"] = expect_error(
        lambda: tfshard.cpu_devices(STRATEGY.num_replicas_in_sync + 1))
    results["after_errors"] = guarded(lambda: compare(*_roundtrip(models.mlp)))


PRECISION_MODELS = ("mlp", "gpt2", "llama", "bert")


def _bf16_twin(builder):
    """`(m32, m16, x)`: the model in float32 and the same weights in bfloat16."""
    import ml_dtypes

    from tfshard.io.dtypes import policy_scope

    m32, x = builder()
    with policy_scope("bfloat16"):
        m16, _ = builder()
    m16.set_weights([np.asarray(w).astype(ml_dtypes.bfloat16) for w in m32.get_weights()])
    return m32, m16, x


def quantize(model, mode, **kwargs):
    """`model.quantize(mode, **kwargs)` on a frozen heap: Keras collects garbage once per
    variable a layer drops, and each collection would walk every model and graph this
    worker has made so far (tfshard.cli.import_tensorflow)."""
    gc.freeze()
    model.quantize(mode, **kwargs)


def _first_output(out):
    ls = leaves(out)
    return ls[sorted(ls)[0]]


def _one_short_row(x):
    """The first row of `x`, cut to its first 4 tokens (a decode step's shape)."""
    if isinstance(x, dict):
        return {k: np.asarray(v)[:1, :4] for k, v in x.items()}
    return np.asarray(x)[:1]


def softmax_is_shape_invariant():
    """Whether TensorFlow's softmax gives a row the same bits whatever else is in the tensor.

    A rank computes attention over its share of the heads; where TensorFlow's softmax
    rounds a row differently in a tensor of 3 heads than in one of 6 (seen on AVX2-only
    CPUs, where its exp is vectorised over the whole tensor), a sharded float path can be
    one ulp from the unsharded one although every sum tfshard adds is exact.
    """
    import keras

    a = np.random.default_rng(0).normal(size=(1, 6, 4, 4)).astype("float32")
    six = np.asarray(keras.layers.Softmax(axis=-1)(a))[:, :3]
    three = np.asarray(keras.layers.Softmax(axis=-1)(a[:, :3]))
    return bool(np.array_equal(six, three))


def _saved_three_ways(world, name, whole, to_shard):
    """Saves under OUT/name/: `whole` as a Keras file (rank 0), then `to_shard` sharded,
    as a sharded checkpoint and gathered to one .keras file.

    Returns:
        `(sharded folder, gathered file, whole file)`.
    """
    base = os.path.join(OUT, name)
    folder, gathered = os.path.join(base, "sharded"), os.path.join(base, "gathered.keras")
    whole_file = os.path.join(base, "whole.keras")
    if world.rank == 0:
        os.makedirs(base, exist_ok=True)
        whole.save(whole_file)
    sharded = SHARD(to_shard)
    sharded.save(folder)
    sharded.save(gathered, gather=True)
    world.comm.barrier()
    return folder, gathered, whole_file


def _extras(world):
    """Whether the precision suite runs its cases beyond the per-model ones (wire bytes,
    checkpoints, refusals): the tests check those at 2 ranks under MPI only."""
    return STRATEGY is None and not ONLY and world.size == 2


def run_precision(world, results):
    """bfloat16 models sharded against the same model unsharded in bfloat16 and in
    float32 (tfshard.cli.precision's envelope), then saved, reloaded and loaded in bf16."""
    import tensorflow as tf

    from tfshard.cli import precision
    from tfshard.layers import matvec

    for name in PRECISION_MODELS:
        if ONLY and name not in ONLY:
            continue
        def case(builder=models.EQUIVALENCE[name]):
            m32, m16, x = _bf16_twin(builder)
            r16 = _first_output(m16.predict(x, batch_size=2, verbose=0))
            # Decode-shaped: one row of at most 4 tokens, so the sharded layers' matmuls
            # take tfshard's bfloat16 op (tfshard.layers.matvec) where it is available.
            small = _one_short_row(x)
            want = _first_output(m16.predict(small, batch_size=1, verbose=0))
            sharded = SHARD(m16)
            out = _first_output(sharded.predict(x, batch_size=2, verbose=0))
            vs16 = precision.compare(r16, out, "bfloat16")
            placed = matvec.placed["count"]
            # Called, not predicted: predict traces for any batch size, so its rows are
            # unknown when traced and the op does not apply; a direct call sees them.
            got = _first_output(sharded(tf.nest.map_structure(tf.constant, small)))
            return {"vs_bf16": vs16,
                    "decode_shaped": precision.compare(want, got, "bfloat16"),
                    "matvec_placed": matvec.placed["count"] - placed,
                    "matvec_available": matvec.available(),
                    "out_dtype": str(out.dtype), "ref_dtype": str(r16.dtype),
                    "weight_dtypes": sorted({str(v.dtype) for v in sharded.inner.weights}),
                    "plan_dtypes": sorted({e.dtype for e in sharded.plan.entries}),
                    "local_bytes": sharded.plan.local_bytes(), "total_bytes": sharded.plan.total_bytes,
                    "bytes_fp32_plan": tfshard.Plan.auto(m32, sharded.plan.size).local_bytes(
                        sharded.plan.rank)}
        results[f"bf16_{name}"] = guarded(case)

    def wire_bytes():
        """Bytes the sharded layers' collectives moved in one predict, metered, against the
        plan's count (bf16: gathers in 16 bits, all-reduces summed in fp32)."""
        out = {}
        for name in ("gpt2", "llama"):
            m32, m16, x = _bf16_twin(models.EQUIVALENCE[name])
            tokens = int(np.prod(x["token_ids"].shape))
            for label, m in (("float32", m32), ("bfloat16", m16)):
                s = SHARD(m)
                before = s.collective_counters()[world.rank]["bytes"]
                s.predict(x, batch_size=2, verbose=0)
                sizes = s.plan.wire_itemsizes()
                out[f"{name} {label}"] = [
                    s.collective_counters()[world.rank]["bytes"] - before,
                    tokens * sum(n * sizes[(p, op)] for p, op, n in s.plan.communication())]
        return out
    if _extras(world):
        results["bf16_wire_bytes"] = guarded(wire_bytes)

    def comm_dtype():
        """float32 models with comm_dtype: collectives sent in 16 bits (all-reduces too
        over MPI), metered against the plan; an int8 model's int32 sums and exact scales
        untouched; float16 overflow a named error on every rank."""
        from tfshard.cli import precision

        out = {}
        for label in ("gpt2", "llama", "mlp", "gpt2 float16", "gpt2 int8"):
            name, _, how = label.partition(" ")
            model, x = models.EQUIVALENCE[name]()
            if how == "int8":
                quantize(model, "int8")
            ref = _first_output(model.predict(x, batch_size=2, verbose=0))
            s = SHARD(model, comm_dtype="float16" if how == "float16" else "bfloat16")
            before = s.collective_counters()[world.rank]["bytes"]
            got = _first_output(s.predict(x, batch_size=2, verbose=0))
            sizes = s.plan.wire_itemsizes()
            tokens = int(np.prod(x["token_ids"].shape)) if isinstance(x, dict) else len(x)
            out[label] = {"vs_fp32": precision.compare(ref, got, how if how == "float16"
                                                       else "bfloat16"),
                          "dtype": str(got.dtype),
                          "metered": s.collective_counters()[world.rank]["bytes"] - before,
                          "planned": tokens * sum(n * sizes[(p, op)]
                                                  for p, op, n in s.plan.communication()),
                          "line": s.plan.totals()[1]}
        model, x = models.EQUIVALENCE["mlp"]()
        s = SHARD(model, comm_dtype="float16")
        try:
            s.predict(x * 1e6, batch_size=2, verbose=0)
            out["overflow"] = "no error"
        except Exception as e:  # noqa: BLE001 - the test reads the message
            out["overflow"] = f"{type(e).__name__}: {e}"
        return out
    if _extras(world):
        results["comm_dtype"] = guarded(comm_dtype)

    def checkpoints():
        from tfshard import comm as comm_lib

        m32, m16, x = _bf16_twin(models.gpt2)
        r16 = _first_output(m16.predict(x, batch_size=2, verbose=0))
        folder, gathered, fp32_file = _saved_three_ways(world, "bf16", m32, m16)
        res = {}
        # Reloaded at another layout (one rank per group): the unsharded bf16 model, exactly.
        again = tfshard.load(folder, tensor_parallel=1)
        out = _first_output(again.predict(x, batch_size=2, verbose=0))
        res["reload_tp1_dtype"] = str(out.dtype)
        res["reload_tp1_bitwise"] = bool(np.array_equal(np.asarray(out), np.asarray(r16)))
        # Reloaded in float32: the bf16 weights widened, against that model unsharded.
        wide = tfshard.load(folder, dtype="float32")
        w32 = tfshard.load(folder, world=tfshard.World(comm_lib.create("local"), "local"),
                           dtype="float32")
        res["reload_fp32"] = precision.compare(
            _first_output(w32.predict(x, batch_size=2, verbose=0)),
            _first_output(wide.predict(x, batch_size=2, verbose=0)), "float32")
        res["reload_fp32_dtypes"] = sorted({str(v.dtype) for v in wide.inner.weights})
        # The gathered file is a plain Keras bf16 model.
        plain = keras.saving.load_model(gathered)
        res["gathered_bitwise"] = bool(np.array_equal(
            np.asarray(_first_output(plain.predict(x, batch_size=2, verbose=0))), np.asarray(r16)))
        # A float32 file loaded straight into bf16 slices: the same as m16 unsharded.
        narrow = tfshard.load(fp32_file, dtype="bfloat16")
        res["fp32_file_as_bf16"] = precision.compare(
            r16, _first_output(narrow.predict(x, batch_size=2, verbose=0)), "bfloat16")
        res["fp32_file_as_bf16_dtypes"] = sorted({str(v.dtype) for v in narrow.inner.weights})
        return res
    if _extras(world):  # saving is Horovod/MPI-only for now
        results["bf16_checkpoints"] = guarded(checkpoints)


def run_int8(world, results):
    """int8-quantized models (model.quantize, then shard) against the same quantized model
    unsharded: bit for bit (see tfshard/layers/quantized.py), and a quantized checkpoint."""
    import tensorflow as tf

    from tfshard.cli import precision
    from tfshard.layers import matvec

    for name in PRECISION_MODELS:
        if ONLY and name not in ONLY:
            continue
        def case(builder=models.EQUIVALENCE[name]):
            model, x = builder()
            quantize(model, "int8")
            ref = _first_output(model.predict(x, batch_size=2, verbose=0))
            small = _one_short_row(x)  # decode-shaped: tfshard's int8 op, where available
            want = _first_output(model(tf.nest.map_structure(tf.constant, small)))
            sharded = SHARD(model)
            out = _first_output(sharded.predict(x, batch_size=2, verbose=0))
            res = compare({"o": ref}, {"o": out})["outputs"]["o"]
            placed = matvec.placed["count"]
            got = _first_output(sharded(tf.nest.map_structure(tf.constant, small)))
            res["decode_shaped_bitwise"] = bool(np.array_equal(got, want))
            res["decode_shaped_fp32"] = precision.compare(want, got, "float32")
            res["softmax_shape_invariant"] = softmax_is_shape_invariant()
            res["matvec_placed"] = matvec.placed["count"] - placed
            res["matvec_available"] = matvec.available()
            res["modes"] = sorted({str(getattr(e, "dtype", "")) for e in sharded.plan.entries})
            res["slices"] = slices_held(sharded)
            res["local_bytes"] = sharded.plan.local_bytes()
            res["held_bytes"] = param_bytes(sharded.inner)
            res["cut"] = len(sharded.plan.sharded)
            # The other order: shard the float model, then quantize the sharded one.
            model2, _ = builder()
            later = SHARD(model2)
            if STRATEGY is None:
                later.quantize("int8")
                got = _first_output(later.predict(x, batch_size=2, verbose=0))
                res["shard_then_quantize_bitwise"] = bool(np.array_equal(np.asarray(got),
                                                                         np.asarray(ref)))
                res["shard_then_quantize_plan"] = [later.plan.local_bytes(),
                                                   param_bytes(later.inner)]
            return res
        results[f"int8_{name}"] = guarded(case)

    def checkpoint():
        model, x = models.llama()
        quantize(model, "int8")
        ref = _first_output(model.predict(x, batch_size=2, verbose=0))
        folder = os.path.join(OUT, "int8-ckpt")
        fp32_file = os.path.join(OUT, "llama-fp32.keras")
        if world.rank == 0:
            models.llama()[0].save(fp32_file)
        SHARD(model).save(folder)
        world.comm.barrier()
        again = tfshard.load(folder, tensor_parallel=1)
        out = _first_output(again.predict(x, batch_size=2, verbose=0))
        # A float file loaded and quantized slice by slice: the same int8 model.
        loaded = tfshard.load(fp32_file, quantize="int8")
        got = _first_output(loaded.predict(x, batch_size=2, verbose=0))
        return {"bitwise": bool(np.array_equal(np.asarray(out), np.asarray(ref))),
                "kernel_dtypes": sorted({str(v.dtype) for v in again.inner.weights
                                         if v.name == "kernel"}),
                "load_quantize_bitwise": bool(np.array_equal(np.asarray(got), np.asarray(ref))),
                "load_quantize_dtypes": sorted({str(v.dtype) for v in loaded.inner.weights
                                                if v.name == "kernel"})}
    if _extras(world):
        results["int8_checkpoint"] = guarded(checkpoint)

    def refusals():
        model, _ = models.mlp()
        sharded = SHARD(model)
        after = float8 = None
        try:
            sharded.quantize("int4")
        except ValueError as e:
            after = str(e)
        model8, _ = models.mlp()
        model8.quantize("float8")
        try:
            SHARD(model8)
        except ValueError as e:
            float8 = str(e)
        return {"quantize_after": after, "float8": float8}
    if _extras(world):
        results["int8_refusals"] = guarded(refusals)


#: int4 cases: Keras's default (groups of 128 contracted rows, zero points) for every
#: model, per channel (block_size=-1) for GPT-2 (Dense, EinsumDense and the tied head).
INT4_CASES = [(name, 128) for name in PRECISION_MODELS] + [("gpt2", -1)]


def _int4_config(block_size):
    from keras.src.quantizers.quantization_config import Int4QuantizationConfig

    return Int4QuantizationConfig(block_size=block_size)


def run_int4(world, results):
    """int4-quantized models (model.quantize("int4"), then shard) against the same model
    unsharded: within float32's envelope (int4 is weight-only: row cuts sum float
    partials), argmax identical; packed slices held as planned; checkpoints."""
    from tfshard.cli import precision

    for name, block in INT4_CASES:
        if ONLY and (name not in ONLY or block != 128):  # other backends: the default only
            continue
        def case(builder=models.EQUIVALENCE[name], block=block):
            model, x = builder()
            size = world.size if STRATEGY is None else STRATEGY.num_replicas_in_sync
            fp32_plan = tfshard.Plan.auto(model, size)
            quantize(model, "int4", config=_int4_config(block))
            ref = _first_output(model.predict(x, batch_size=2, verbose=0))
            sharded = SHARD(model)
            out = _first_output(sharded.predict(x, batch_size=2, verbose=0))
            res = {"vs_int4": precision.compare(ref, out, "float32"),
                   "modes": sorted({e.dtype for e in sharded.plan.entries}),
                   "slices": slices_held(sharded), "cut": len(sharded.plan.sharded),
                   "local_bytes": sharded.plan.local_bytes(),
                   "held_bytes": param_bytes(sharded.inner),
                   "fp32_local_bytes": fp32_plan.local_bytes(sharded.plan.rank)}
            return res
        results[f"int4_{name}_{block}"] = guarded(case)

    def checkpoint():
        """A sharded int4 save reloads at one rank a group, bit for bit the unsharded
        int4 model loaded from its file; that file loads sharded slice by slice; a gathered
        save is a plain Keras int4 file."""
        model, x = models.llama()
        quantize(model, "int4")
        folder, gathered, keras_file = _saved_three_ways(world, "int4", model, model)
        # The oracle is the file as plain Keras loads it: Keras gives a reloaded int4
        # ReversibleEmbedding an input quantizer that the in-memory one does not have.
        ref = _first_output(keras.saving.load_model(keras_file).predict(x, batch_size=2,
                                                                        verbose=0))
        again = tfshard.load(folder, tensor_parallel=1)
        out = _first_output(again.predict(x, batch_size=2, verbose=0))
        loaded = tfshard.load(keras_file)
        got = _first_output(loaded.predict(x, batch_size=2, verbose=0))
        plain = keras.saving.load_model(gathered)
        return {"reload_tp1_bitwise": bool(np.array_equal(out, ref)),
                "file_sharded": precision.compare(ref, got, "float32"),
                "file_cut": len(loaded.plan.sharded),
                "file_modes": sorted({e.dtype for e in loaded.plan.entries}),
                "gathered_bitwise": bool(np.array_equal(
                    _first_output(plain.predict(x, batch_size=2, verbose=0)), ref))}
    if _extras(world):
        results["int4_checkpoint"] = guarded(checkpoint)

    def refusals():
        out = {}
        try:
            SHARD(models.mlp()[0]).quantize("int4")
        except ValueError as e:
            out["quantize_after"] = str(e)
        try:
            tfshard.load(os.path.join(OUT, "int4", "whole.keras"), quantize="int4")
        except ValueError as e:
            out["load_quantize"] = str(e)
        return out
    if _extras(world):
        results["int4_refusals"] = guarded(refusals)


#: The prompt of the real-model pipeline case (tests/test_pipeline.py generates its
#: unsharded reference).
SMOLLM2_PROMPT = "The capital of France is"

# Pipeline layouts per world size: (name, pipeline, tensor_parallel).
PIPELINE_LAYOUTS = {2: [("pp2", 2, 1)], 3: [("pp3", 3, 1)],
                    4: [("pp2tp2", 2, 2), ("dp2pp2", 2, 1)]}
PIPELINE_MODELS = {
    "mlp": models.mlp,
    "two_inputs_two_outputs": models.two_inputs_two_outputs,
    "sequential_embedding": models.sequential_embedding,
    "gpt2": lambda: models.gpt2(num_layers=3),
    "bert": lambda: models.bert(num_layers=3),
    "llama": lambda: models.llama(num_layers=3),
}


def _prompt(x, rows=2, new=5):
    """Token-id prompts of 4 tokens, padded with room for `new` more."""
    ids = x["token_ids"][:rows, :4]
    return {"token_ids": np.concatenate([ids, np.zeros((rows, new), "int32")], 1),
            "padding_mask": np.concatenate([np.ones((rows, 4), bool),
                                            np.zeros((rows, new), bool)], 1)}


def _greedy(name, **shard_args):
    """The unsharded greedy tokens of a 3-layer `name` task on two prompts, the task
    sharded with `shard_args`, and the prompts."""
    model, x = getattr(models, name)(num_layers=3)
    prompt = _prompt(x)
    model.compile(sampler="greedy")
    ref = model.generate(prompt, stop_token_ids=None)["token_ids"].tolist()
    return ref, tfshard.shard(model, **shard_args), prompt


def run_pipeline(world, results):
    """Pipeline stages (alone, with tensor parallelism, with data parallelism) against
    the unsharded model: predict, a call, per-rank bytes, greedy generate."""
    for layout, pp, tp in PIPELINE_LAYOUTS[world.size]:
        for name, builder in PIPELINE_MODELS.items():
            if world.size == 4 and name in ("two_inputs_two_outputs", "sequential_embedding"):
                continue  # cut at PP=2 and PP=3; left out here to keep the launch short
            def case(builder=builder):
                model, x = builder()
                ref = model.predict(x, batch_size=4, verbose=0)
                before = param_bytes(model)
                sharded = tfshard.shard(model, pipeline=pp, tensor_parallel=tp)
                out = sharded.predict(x, batch_size=4, verbose=0)
                res = compare(ref, out)
                # One micro-batch per row, and a traced call of the whole batch.
                res["micro_rows"] = compare(ref, sharded.predict(x, batch_size=4, verbose=0,
                                                                 micro_batches=4))
                res["call"] = compare(ref, sharded(x))
                stages = sharded.plan.stages
                res.update(stage=sharded.stage.index, stages=stages.stages,
                           stage_bytes=stages.bytes(sharded.stage.index), model_bytes=before,
                           rank_bytes=param_bytes(sharded.inner), groups=sharded.groups,
                           summary=sharded.plan.summary(), bubble=sharded.pipeline_stats()["bubble"],
                           sent=sharded.pipeline_stats()["sent_bytes"])
                return res
            results[f"{layout}/{name}"] = guarded(case)
        for name in ("llama", "gpt2"):
            def gen_case(name=name):
                ref, sharded, prompt = _greedy(name, pipeline=pp, tensor_parallel=tp)
                out = sharded.generate(prompt, stop_token_ids=None)
                # The two prompts also in two micro-batches through the stages.
                micro = sharded.generate(prompt, stop_token_ids=None, micro_batches=2)
                return {"ref": ref, "out": out["token_ids"].tolist(),
                        "micro": micro["token_ids"].tolist(),
                        "cache_layers": int(sharded.inner._build_cache(prompt["token_ids"])[1].shape[1])}
            results[f"{layout}/generate/{name}"] = guarded(gen_case)
    if world.size == 4:
        def smollm2():
            """Real SmolLM2 at PP2 x TP2, stages balanced by the bytes they hold (the
            unsharded reference is computed once, by the test)."""
            sharded = tfshard.load("smollm2", pipeline=2, tensor_parallel=2,
                                   pipeline_balance="memory")
            out = sharded.generate(SMOLLM2_PROMPT, max_length=16, strip_prompt=True,
                                   sampler="greedy")
            stages = sharded.plan.stages
            return {"out": out, "summary": stages.summary(), "by": stages.by,
                    "stage_bytes": [stages.bytes(s) for s in range(stages.stages)],
                    "rank_bytes": param_bytes(sharded.inner)}
        results["pp2tp2/smollm2"] = guarded(smollm2)
    if world.size == 2:

        def checkpoint():
            """Saved at PP2xTP1, reloaded at PP1xTP2, at PP2 and in one process."""
            from tfshard import comm as comm_lib

            model, x = models.llama(num_layers=3)
            ref = model.predict(x, verbose=0)
            folder = os.path.join(OUT, "pp2_checkpoint")
            sharded = tfshard.shard(model, pipeline=2, tensor_parallel=1)
            sharded.save(folder)
            with open(os.path.join(folder, "tfshard.json")) as f:
                index = json.load(f)
            tp2 = tfshard.load(folder, tensor_parallel=2)
            pp2 = tfshard.load(folder, pipeline=2, tensor_parallel=1)
            alone = tfshard.load(folder, world=tfshard.World(comm_lib.create("local"), "local"))
            return {"tp2": compare(ref, tp2.predict(x, verbose=0)),
                    "pp2": compare(ref, pp2.predict(x, verbose=0)),
                    "alone": compare(ref, alone.predict(x, verbose=0)),
                    "files": index["files"], "pipeline": index["pipeline"],
                    "rank_files": sorted(os.listdir(folder))}
        results["pp2/checkpoint"] = guarded(checkpoint)

        def tensorboard():
            model, x = models.llama(num_layers=3)
            sharded = tfshard.shard(model, pipeline=2, tensor_parallel=1)
            callback = tfshard.TensorBoard(os.path.join(OUT, "pp2_tb"), write_graph=False)
            sharded.predict(np.concatenate([x] * 3) if not isinstance(x, dict) else
                            {k: np.concatenate([v] * 3) for k, v in x.items()},
                            batch_size=5, verbose=0, callbacks=[callback])
            return read_tensorboard_run(callback.run_dir)
        results["pp2/tensorboard"] = guarded(tensorboard)

        def measured():
            model, x = models.gpt2(num_layers=3)
            ref = model.predict(x, verbose=0)
            sharded = tfshard.shard(model, pipeline=2, tensor_parallel=1, pipeline_sample=x)
            res = compare(ref, sharded.predict(x, verbose=0))
            stages = sharded.plan.stages
            res.update(unit=stages.cost_unit, costs=[b.cost for b in stages.blocks],
                       bounds=[list(b) for b in stages.bounds])
            return res
        results["pp2/measured"] = guarded(measured)
    results["pipeline/too_many_stages"] = expect_error(
        lambda: tfshard.shard(models.mlp()[0], pipeline=world.size + 1))
    results["pipeline/bad_split"] = expect_error(
        lambda: tfshard.shard(models.llama(num_layers=3)[0], pipeline=2, tensor_parallel=1,
                              pipeline_split=[3, 1]))
    results["pipeline/subclassed"] = expect_error(
        lambda: tfshard.shard(models.nested_subclassed()[0], pipeline=2, tensor_parallel=1))
    def bad_id():
        model, x = models.llama(num_layers=3)
        sharded = tfshard.shard(model, pipeline=world.size, tensor_parallel=1)
        x = dict(x, token_ids=x["token_ids"].copy())
        x["token_ids"][1, 2] = 257
        sharded.predict(x, verbose=0)
    results["pipeline/bad_id"] = expect_error(bad_id)
    # Ranks asking for different splits must all refuse before any stage forms.
    results["pipeline/disagree"] = expect_error(
        lambda: tfshard.shard(models.llama(num_layers=3)[0], pipeline=2, tensor_parallel=1,
                              pipeline_split=[1, 2] if world.rank == 0 else [2, 1]))


def run_pipeline_devices(world, results):
    """Pipeline stages on the devices of this process (a MirroredStrategy of 2 and of 3
    logical CPUs, `--mirrored 3`): predict, a call and greedy generate against the
    unsharded model, where each stage's variables and math are, load and save."""
    import tensorflow as tf

    devices = list(STRATEGY.extended.worker_devices)
    # Every model at 2 stages; at 3 (uneven cuts) the functional MLP and Llama; greedy
    # generate of Llama at 2 and GPT-2 at 3.
    for pp, names, generated in ((2, ("mlp", "gpt2", "bert", "llama"), ("llama",)),
                                 (3, ("mlp", "llama"), ("gpt2",))):
        strategy = tf.distribute.MirroredStrategy(devices[:pp])
        for name in names:
            def case(name=name):
                model, x = PIPELINE_MODELS[name]()
                ref = model.predict(x, batch_size=4, verbose=0)
                sharded = tfshard.shard(model, pipeline=pp, strategy=strategy)
                res = compare(ref, sharded.predict(x, batch_size=4, verbose=0))
                # Where the math ran: each traced matmul's device.
                graph = sharded._predict_step.get_concrete_function(
                    {k: tf.convert_to_tensor(v[:4]) for k, v in x.items()} if isinstance(x, dict)
                    else tf.convert_to_tensor(x[:4])).graph
                res["micro_rows"] = compare(ref, sharded.predict(x, batch_size=4, verbose=0,
                                                                 micro_batches=4))
                res["call"] = compare(ref, sharded(x))
                ops = {op.name: op.device.split("device:")[-1] for op in graph.get_operations()
                       if op.type in ("MatMul", "BatchMatMulV2", "Einsum", "_MklMatMul")}
                stages = sharded.stage_plan
                res.update(device_bytes={k.split("device:")[-1]: v
                                         for k, v in sharded.device_bytes().items()},
                           stage_bytes=[stages.bytes(s) for s in range(pp)],
                           model_bytes=param_bytes(model),
                           blocks=[[b.name for b in stages.blocks_of(s)] for s in range(pp)],
                           op_devices=ops,
                           summary=sharded.plan.summary())
                return res
            results[f"devices{pp}/{name}"] = guarded(case)
        for name in generated:
            def gen_case(name=name):
                ref, sharded, prompt = _greedy(name, pipeline=pp, strategy=strategy)
                return {"ref": ref,
                        "out": sharded.generate(prompt, stop_token_ids=None)["token_ids"].tolist()}
            results[f"devices{pp}/generate/{name}"] = guarded(gen_case)
    strategy = tf.distribute.MirroredStrategy(devices[:2])

    def load_and_save():
        """A .keras file loaded into stages on 2 devices, saved whole, reloaded by Keras."""
        import keras

        model, x = models.llama(num_layers=3)
        ref = model.predict(x, verbose=0)
        path = os.path.join(OUT, "devices_llama.keras")
        model.save(path)
        sharded = tfshard.load(path, pipeline=2, strategy=strategy, pipeline_balance="memory")
        whole = os.path.join(OUT, "devices_llama_gathered.keras")
        sharded.save(whole, gather=True)
        return {"load": compare(ref, sharded.predict(x, verbose=0)),
                "gathered": compare(ref, keras.saving.load_model(whole).predict(x, verbose=0)),
                "device_bytes": {k.split("device:")[-1]: v
                                 for k, v in sharded.device_bytes().items()},
                "by": sharded.stage_plan.by}
    results["devices2/load_and_save"] = guarded(load_and_save)
    results["devices/wrong_stage_count"] = expect_error(
        lambda: tfshard.shard(models.llama(num_layers=3)[0], pipeline=3, strategy=strategy))
    results["devices/quantize"] = expect_error(
        lambda: tfshard.shard(models.llama(num_layers=3)[0], pipeline=2,
                              strategy=strategy).quantize("int8"))
    results["devices/tensor_parallel"] = expect_error(
        lambda: tfshard.shard(models.llama(num_layers=3)[0], pipeline=2, tensor_parallel=2,
                              strategy=strategy))


def run_hosts(world, results):
    """Across hosts (tests/hosts.py): the zoo in the default layout (tensor-parallel
    groups inside hosts, data parallelism across), then GPT-2 with one tensor-parallel
    group over every rank (its collectives cross hosts), saved as a sharded
    checkpoint into each host's own folder (TFSHARD_TEST_PRIVATE, no shared disk)."""
    import warnings

    results["hosts"] = {"ok": True, "hosts": world.comm.hosts(), "launcher_rank": int(
        os.environ.get("PMI_RANK", os.environ.get("HOROVOD_RANK", -1)))}
    run_equivalence(world, results)

    def across():
        model, x = models.EQUIVALENCE["gpt2"]()
        ref = model.predict(x, batch_size=2, verbose=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sharded = SHARD(model, tensor_parallel=world.size)
        out = sharded.predict(x, batch_size=2, verbose=0)
        res = compare(ref, out)
        res["tensor_parallel"] = sharded.tensor_parallel
        res["summary"] = sharded.plan.summary()
        res["warnings"] = [str(w.message) for w in caught]
        private = os.environ.get("TFSHARD_TEST_PRIVATE")
        if private:
            res["saved"] = sharded.save(os.path.join(private, "gpt2-ckpt"))
            folder = os.path.join(private, "gpt2-ckpt")
            res["files_here"] = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        return res
    results["tp_across_hosts"] = guarded(across)

    def stages():
        """Two pipeline stages: one per host (the hand-offs cross, every block does not)."""
        model, x = models.EQUIVALENCE["gpt2"]()
        ref = model.predict(x, batch_size=2, verbose=0)
        sharded = SHARD(model, pipeline=2)
        res = compare(ref, sharded.predict(x, batch_size=2, verbose=0))
        res["tensor_parallel"], res["stage"] = sharded.tensor_parallel, sharded.plan.stage
        res["layout"] = sharded.plan.layout.lines()
        return res
    if world.backend == "mpi":
        results["stages_across_hosts"] = guarded(stages)


SUITES = {
    "hosts": [run_hosts],
    "pipeline": [run_pipeline],
    "pipeline_devices": [run_pipeline_devices],
    "precision": [run_precision, run_int8, run_int4],
    "equivalence": [run_equivalence],
    "gpt2": [lambda world, results: run_equivalence(world, results, only={"gpt2"})],
    "dp": [run_dp],
    # MultiWorker (tfshard launch -n 4): groups of processes, as under horovodrun.
    "dp_distribute": [lambda world, results: run_dp(
        world, results, names=[n for n in ("mlp", "gpt2", "llama") if not ONLY or n in ONLY],
        light=True), run_dp_generate_and_save],
    "checks": [run_bitwise, run_memory, run_errors, run_collectives],
    "distribute": [run_collectives, run_equivalence, run_bitwise, run_strategy_errors,
                   lambda world, results: run_tensorboard(world, results, OUT)],
}


def write_results(results, out_dir, rank):
    """Writes this rank's records to `out_dir/rank{rank}.json` atomically."""
    path = os.path.join(out_dir, f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)
    return path


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--suite", required=True, choices=sorted(SUITES))
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default=None,
                        help="comma-separated subset of models.EQUIVALENCE to run")
    parser.add_argument("--mirrored", type=int, default=0,
                        help="shard over a MirroredStrategy of this many logical CPU devices")
    args = parser.parse_args()
    if args.mirrored:
        global SHARD, STRATEGY
        import functools

        import tensorflow as tf

        STRATEGY = tf.distribute.MirroredStrategy(tfshard.cpu_devices(args.mirrored))
        SHARD = functools.partial(tfshard.shard, strategy=STRATEGY)
    world = tfshard.init()
    results = {"rank": world.rank, "size": world.size, "backend": world.backend, "cases": {},
               "replicas": args.mirrored or world.size}
    global OUT
    OUT = args.out
    if args.models:
        global ONLY
        ONLY = set(args.models.split(","))
    for fn in SUITES[args.suite]:
        fn(world, results["cases"])
        path = write_results(results, args.out, world.rank)
    print(f"rank {world.rank}: {len(results['cases'])} cases written to {path}", flush=True)


if __name__ == "__main__":
    main()
