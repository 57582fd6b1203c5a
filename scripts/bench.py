#!/usr/bin/env python
"""Benchmarks: sharded vs unsharded, measured side by side in one run.

    .venv/bin/python scripts/bench.py forward --model gpt2 --np 2 3 --rows 8 --seq-len 128

Suite `forward`: the unsharded model in one process using every core, then
the same model under ./horovodrun.sh -np N for each N (each rank gets its share
of the cores), each timed as the median of `--repeats` `predict` calls after a
warm-up. Prints a table of tokens/s, the ratio to unsharded from this same run,
and parameter bytes per rank; writes JSON to bench-results/.

Suite `predict`: the same, over several batches, for the layouts unsharded,
TP=2 (2 ranks), DP=2 (2 ranks, tensor_parallel=1) and DP=2 x TP=2 (4 ranks).
`--comm-dtype bfloat16` adds each tensor-parallel layout again with its float32
collectives sent in 16 bits (`shard(..., comm_dtype=...)`: the logits gather on
every backend, the all-reduces too over MPI).

    .venv/bin/python scripts/bench.py predict --model gpt2 --rows 32

Suite `pipeline`: the same for pipeline stages beside the other cuts: at 2 ranks
PP=2, TP=2 and DP=2; at 4 ranks DP2xPP2, PP2xTP2 and DP2xTP2; the bubble column
is the idle fraction the stages measured (mean over ranks) beside GPipe's
(P-1)/(m+P-1) for the m micro-batches of a batch. `generate --pp 2` and
`load --pp 2` add pipelined rows to those suites.

    .venv/bin/python scripts/bench.py pipeline --model gpt2 --np 2 4 --rows 32 --seq-len 64
    .venv/bin/python scripts/bench.py generate --np 2 --pp 2 --batch 4

Suite `load`: peak-memory rise while loading (VmHWM after the load minus the
RSS after imports, the high-water mark reset at that baseline), for a GPT-2
(124M config) `.keras` checkpoint and for SmolLM2 (GGUF): unsharded
(`keras.saving.load_model` for the `.keras`; `tfshard.load` in one process for
both) and `tfshard.load` at TP=2 and TP=4 (the worst rank). Ratios are
against the unsharded `tfshard.load` of the same run.

    .venv/bin/python scripts/bench.py load --np 2 4
    .venv/bin/python scripts/bench.py load --np 2 --backends mpi mirrored multiworker

Suite `generate`: greedy generation with keras-hub's loop and KV cache, for
SmolLM2 (real weights) or a built-in model: per-token decode latency and
prefill throughput, unsharded (one process, every core) and at TP=N under
each of `--backends` (mpi: tfshard's MPI ops under ./horovodrun.sh; horovod-mpi:
Horovod's ops over its MPI controller; gloo: horovodrun --gloo; mirrored:
MirroredStrategy replicas in one process; multiworker: `tfshard launch`). The unsharded
model runs at 1 thread and at every core; ratios are against the faster.
Both are measured inside `generate()` itself: two prompts padded to the same
length L, one leaving 1 token to generate and one leaving 1+K; keras-hub's
prefill runs over all L positions either way, so the difference is exactly K
decode steps, and prefill = the first time minus one step.

    .venv/bin/python scripts/bench.py generate --np 2 3
    .venv/bin/python scripts/bench.py generate --np 2 --backends mpi mirrored multiworker

Suite `precision`: SmolLM2 at TP=N (MPI) loaded in float32, bfloat16, int8
(`quantize="int8"`) and int4 (loaded whole, `quantize("int4")` by Keras, sharded): weight bytes held per rank, the load's peak RSS rise, decode
latency per token and prefill time (as `generate`), and the greedy agreement of 22
fixed prompts x 16 new tokens of each against float32. "bf16 tf-mm" and "int8 tf-mm" are
bfloat16 and int8 again with tfshard's decode matmuls off (TFSHARD_DECODE_OPS=0:
TensorFlow's own).

    .venv/bin/python scripts/bench.py precision --np 2

Suite `plot`: PNG charts (matplotlib) of the JSON files the other suites wrote, into
docs/images/ by default.

    .venv/bin/python scripts/bench.py plot bench-results/forward-gpt2-*.json

Suite `comm`: the cost of one collective on each backend (mpi: tfshard's MPI ops
under ./horovodrun.sh, plus mpi4py through tf.numpy_function for comparison;
horovod-mpi: Horovod's ops over its MPI controller in the same kind of job;
gloo: horovodrun over Gloo; MirroredStrategy replicas in one process;
MultiWorker processes under `tfshard launch`): a chain of `--chain` all-reduces (or
all-gathers) in one `tf.function` (inside `strategy.run` for tf.distribute),
timed per collective, for a small [1, H] tensor and a [B*S, H] activation.
`forward --backends mpi gloo mirrored multiworker` times a whole forward pass
on each backend next to the unsharded model.

    .venv/bin/python scripts/bench.py comm --np 2
    .venv/bin/python scripts/bench.py forward --model gpt2 --np 2 --backends mpi gloo mirrored multiworker

Suite `hosts` (scripts/bench_hosts.py; needs root): two hosts made of network
namespaces: per-collective latency inside one host against across the two, and the
bytes that crossed between the hosts per predict against the plan's minimum, for the
default layout (TP inside hosts, DP across) and for TP over both hosts.

    .venv/bin/python scripts/bench.py hosts --model gpt2 --rows 8 --seq-len 64
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _measure(args, sharded):
    import numpy as np

    import tfshard
    from tfshard import models

    strategy = _mirrored_strategy(args)
    world = tfshard.init() if sharded else None
    model, vocab, names = models.build(args.model, seed=0)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, vocab, (args.rows, args.seq_len)).astype("int32")
    x = {n: (ids if n == "token_ids" else np.ones_like(ids) if n == "padding_mask"
             else np.zeros_like(ids)) for n in names}
    param_bytes = sum(np.asarray(v).nbytes for v in model.weights)
    flops = _forward_flops(model, args.rows, args.seq_len)
    minimum = _megatron_minimum(model, args.batch_size, args.seq_len)
    target = model
    if sharded:
        target = tfshard.shard(model, tensor_parallel=args.tp or None, strategy=strategy,
                               comm_dtype=args.comm_dtype, pipeline=args.pp or None)
        param_bytes = sum(np.asarray(v).nbytes for v in target.inner.weights)
    target.predict(x, batch_size=args.batch_size, verbose=0)  # trace + warm up
    before = target.collective_counters() if sharded else {}
    stages = getattr(target, "pipeline_stats", None)
    stage_before = stages() if stages else None
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        target.predict(x, batch_size=args.batch_size, verbose=0)
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    result = {"seconds": seconds, "all_seconds": times,
              "tokens": args.rows * args.seq_len, "param_bytes_per_rank": int(param_bytes),
              "ranks": strategy.num_replicas_in_sync if strategy else world.size if world else 1,
              "forward_flops": flops, "achieved_flops_per_s": flops / seconds,
              "megatron_minimum_per_forward": minimum}
    if sharded:
        # Per forward of one full batch, on the first rank of this process.
        rank, after = next(iter(sorted(target.collective_counters().items())))
        forwards = args.repeats * -(-args.rows // args.batch_size) // max(1, target.groups)
        sent = {k: (after[k] - before[rank][k]) / forwards for k in after}
        result["collectives_per_forward"] = sent
        result["collective_seconds_share"] = sent["seconds"] * forwards / sum(times)
    if stage_before is not None:
        from tfshard.pipeline.gpipe import default_micro_batches

        after = stages()
        busy = after["busy_seconds"] - stage_before["busy_seconds"]
        wall = after["wall_seconds"] - stage_before["wall_seconds"]
        bubbles = world.comm.allgather_object(1.0 - busy / wall if wall else 0.0)
        m = default_micro_batches(args.batch_size, args.pp)
        result["bubble"] = sum(bubbles) / len(bubbles)
        result["bubble_per_rank"] = bubbles
        result["bubble_gpipe"] = (args.pp - 1) / (m + args.pp - 1)
        result["micro_batches"] = m
    else:
        result["matmul_flops_per_s"] = _matmul_rate(args)
    result["peak_rss_mib"] = _hwm_mib()
    if world is not None and world.size > 1:
        peaks = world.comm.allgather_object(result["peak_rss_mib"])
        result["peak_rss_mib"] = max(peaks)
        result["peak_rss_mib_per_rank"] = peaks
    if not world or world.rank == 0:
        print("RESULT " + json.dumps(result), flush=True)


def _forward_flops(model, rows, seq_len):
    """Multiply-adds x 2 of one forward over rows x seq_len tokens.

    Every Dense / EinsumDense kernel and a tied output embedding is one
    matmul per token (2 FLOPs per weight); attention adds Q.K^T and P.V,
    2 x 2 x S x (heads x head size) per token and layer.
    """
    import keras

    tokens = rows * seq_len
    weights = 0
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)):
            weights += int(keras.ops.size(layer.kernel))
        elif isinstance(layer, keras.layers.ReversibleEmbedding):
            weights += int(keras.ops.size(layer.embeddings))  # the tied logits matmul
    backbone = getattr(model, "backbone", model)
    layers, hidden = backbone.num_layers, backbone.hidden_dim
    return 2 * weights * tokens + 4 * layers * rows * seq_len * seq_len * hidden


def _megatron_minimum(model, batch, seq_len):
    """Megatron's collectives for one forward of a batch: two all-reduces of B.S.H
    per block, one for the vocab-parallel embedding lookup, and the logits gather."""
    backbone = getattr(model, "backbone", model)
    tokens = batch * seq_len
    reduces = 2 * backbone.num_layers + 1
    return {"collectives": reduces + 1,
            "bytes": 4 * tokens * (reduces * backbone.hidden_dim + backbone.vocabulary_size)}


def _matmul_rate(args):
    """The machine's matmul FLOP/s in this process: [B.S, H] x [H, 4H] float32."""
    import tensorflow as tf

    m, k, n = args.rows * args.seq_len, 768, 3072
    a, b = tf.random.normal([m, k]), tf.random.normal([k, n])
    run = tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)))
    run()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        run().numpy()
        times.append(time.perf_counter() - t0)
    return 2 * m * k * n / statistics.median(times)


def _generate_child(args):
    """One process (or rank): decode latency and prefill time of one model."""
    import numpy as np

    import tfshard
    from tfshard import comm as comm_lib
    from tfshard import models

    strategy = _mirrored_strategy(args)
    if args.mode in ("sharded", "mirrored"):
        world = tfshard.init()
    else:
        if args.threads:
            import tensorflow as tf

            tf.config.threading.set_intra_op_parallelism_threads(args.threads)
            tf.config.threading.set_inter_op_parallelism_threads(args.threads)
        world = tfshard.World(comm_lib.create("local"), "local")
    if args.source in models.NAMES:
        model, vocab, _ = models.build(args.source, seed=0, dtype=args.dtype)
        target = tfshard.shard(model, world=world, strategy=strategy)
    elif args.pp:
        target = tfshard.load(args.source, world=world, pipeline=args.pp,
                              tensor_parallel=args.tp or None)
        vocab = target.inner.backbone.vocabulary_size
    else:
        target = _open(args.source, world, args.dtype, args.quantize, strategy)
        vocab = target.inner.backbone.vocabulary_size
    length, new = args.length, args.new_tokens
    ids = np.random.default_rng(1).integers(1, vocab, (args.batch, length)).astype("int32")

    def prompt(n):
        mask = np.zeros_like(ids, dtype=bool)
        mask[:, :n] = True
        return {"token_ids": np.where(mask, ids, 0).astype("int32"), "padding_mask": mask}

    one, many = prompt(length - 1), prompt(length - 1 - new)
    run = lambda x: target.generate(x, stop_token_ids=None, sampler="greedy")  # noqa: E731
    run(one), run(many)  # trace + warm up both
    t_one, t_many = [], []
    for _ in range(args.repeats):
        for x, times in ((one, t_one), (many, t_many)):
            t0 = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - t0)
    a, b = statistics.median(t_one), statistics.median(t_many)
    step = (b - a) / new
    result = {"decode_ms": step * 1e3, "prefill_s": a - step, "generate_s": b,
              "prefill_tokens": args.batch * length, "new_tokens": new + 1,
              "all_one_s": t_one, "all_many_s": t_many, "ranks": target.size,
              "param_bytes_per_rank": int(sum(np.asarray(v).nbytes for v in target.inner.weights))}
    if world.rank == 0:
        print("RESULT " + json.dumps(result), flush=True)


def suite_generate(args):
    me = [sys.executable, str(Path(__file__).resolve())]
    child = ["_generate", "--source", args.source, "--length", str(args.length),
             "--new-tokens", str(args.new_tokens), "--batch", str(args.batch),
             "--repeats", str(args.repeats)]
    # The unsharded baseline is the better of 1 and all threads (on a small model one
    # thread can win: less synchronisation per tiny op).
    unsharded = [(f"unsharded {t} thread{'s' if t > 1 else ''}",
                  _run(me + child + ["--mode", "unsharded", "--threads", str(t)], args.timeout))
                 for t in sorted({1, os.cpu_count() or 1})]
    rows = list(unsharded)
    for n in args.np:  # each TP size on every backend, side by side
        for backend in args.backends:
            name = f"TP={n}" + ("" if backend == "mpi" else f" {backend}")
            rows.append((name, _run(_launch(backend, n, me + child + ["--mode", "sharded"]),
                                    args.timeout, env=BACKEND_ENV.get(backend))))
    for pp in args.pp:  # pipeline stages (MPI), one rank each
        rows.append((f"PP={pp}", _run(_launch("mpi", pp, me + child + [
            "--mode", "sharded", "--pp", str(pp), "--tp", "1"]), args.timeout)))
    best = min((r for _, r in unsharded), key=lambda r: r["decode_ms"])
    best_prefill = min((r for _, r in unsharded), key=lambda r: r["prefill_s"])
    print(f"\ngenerate: {args.source}, batch {args.batch}, length {args.length} (prefill over all "
          f"of it), {args.new_tokens} decode steps timed, median of {args.repeats}, "
          f"{_cpu_model()}; ratios against the best unsharded run")
    print(f"{'run':<22} {'decode ms/token':>16} {'vs unsharded':>13} {'decode tok/s':>13} "
          f"{'prefill s':>10} {'prefill tok/s':>14} {'vs unsharded':>13} {'params/rank':>12}")
    for name, r in rows:
        tps = r["prefill_tokens"] / r["prefill_s"]
        base_tps = best_prefill["prefill_tokens"] / best_prefill["prefill_s"]
        print(f"{name:<22} {r['decode_ms']:>16.1f} {r['decode_ms'] / best['decode_ms']:>12.2f}x "
              f"{1e3 * args.batch / r['decode_ms']:>13.1f} "
              f"{r['prefill_s']:>10.3f} {tps:>14.0f} {tps / base_tps:>12.2f}x "
              f"{r['param_bytes_per_rank'] / 2**20:>10.1f}MiB")
    _write_report(f"generate-{Path(args.source).name}", args, dict(rows))


def _rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _hwm_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _load_child(args):
    """One process (or rank): memory rise of one load."""
    import keras
    import numpy as np
    import keras_hub  # noqa: F401  (imports belong to the baseline)

    import tfshard

    strategy = _mirrored_strategy(args)
    world = tfshard.init() if args.mode in ("sharded", "mirrored") else None
    if world is not None:
        world.comm.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    base = _rss_mib()
    t0 = time.perf_counter()
    if args.mode == "keras":
        model = keras.saving.load_model(args.source)
        variables = model.weights
    elif args.pp:
        model = tfshard.load(args.source, world=world, pipeline=args.pp, tensor_parallel=1,
                             pipeline_balance=args.balance)
        variables = model.inner.weights
    else:
        model = _open(args.source, world, args.dtype, args.quantize, strategy)
        # Every replica of this process (MirroredStrategy: all of them, in one process).
        variables = [v for r in model.replicas for v in r.model.weights]
    seconds = time.perf_counter() - t0
    # The high-water mark first: reading the variables back would add a copy of the largest.
    rise, after = _hwm_mib() - base, _rss_mib() - base
    held = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)
    result = {"rise_mib": rise, "after_mib": after,
              "baseline_mib": base, "seconds": seconds, "weights_mib": held / 2**20}
    if world is not None:
        rows = world.comm.allgather_object(result)
        if world.rank != 0:
            return
        worst = max(rows, key=lambda r: r["rise_mib"])
        result = {**worst, "per_rank_rise_mib": [r["rise_mib"] for r in rows],
                  "seconds": max(r["seconds"] for r in rows), "ranks": world.size}
    print("RESULT " + json.dumps(result), flush=True)


def _gpt2_checkpoint():
    """A GPT-2 (124M config, seeded random weights) .keras file, made once."""
    path = ROOT / "bench-results" / "cache" / "gpt2-124m.keras"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        code = ("import sys; from tfshard import models; m, _, _ = models.build('gpt2'); "
                f"m.save({str(path) + '.tmp.keras'!r})")
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
        os.replace(str(path) + ".tmp.keras", path)
    return str(path)


def suite_load(args):
    me = [sys.executable, str(Path(__file__).resolve())]
    report = {}
    for label, source in (("gpt2-124m.keras", _gpt2_checkpoint()), ("smollm2 (GGUF)", "smollm2")):
        child = ["_load", "--source", source]
        rows = []
        if source.endswith(".keras"):
            rows.append(("keras.saving.load_model", _run(me + child + ["--mode", "keras"], args.timeout)))
        rows.append(("tfshard.load, 1 process", _run(me + child + ["--mode", "unsharded"], args.timeout)))
        base_row = len(rows) - 1
        for n in args.np:
            for backend in args.backends:
                name = f"tfshard.load TP={n}" + ("" if backend == "mpi" else f" {backend}")
                rows.append((name, _run(_launch(backend, n, me + child + ["--mode", "sharded"]),
                                        args.timeout, env=BACKEND_ENV.get(backend))))
        for pp in args.pp:
            for balance in ("compute", "memory"):
                rows.append((f"tfshard.load PP={pp} {balance}", _run(_launch("mpi", pp, me + child + [
                    "--mode", "sharded", "--pp", str(pp), "--balance", balance]), args.timeout)))
        base = rows[base_row][1]["rise_mib"]
        print(f"\nload: {label}; peak RSS rise over the post-import baseline (worst process; "
              "a mirrored process holds all its replicas)")
        print(f"{'run':<26} {'rise MiB':>9} {'vs 1 proc':>10} {'held MiB':>9} {'weights MiB':>12} {'s':>7}")
        for name, r in rows:
            print(f"{name:<26} {r['rise_mib']:>9.0f} {r['rise_mib'] / base:>9.2f}x "
                  f"{r['after_mib']:>9.0f} {r['weights_mib']:>12.0f} {r['seconds']:>7.1f}")
        report[label] = dict(rows)
    _write_report("load", args, report)


#: Fixed prompts for the precision suite's greedy agreement (>= 20, varied).
PROMPTS = [
    "The capital of France is", "Water boils at", "The largest planet in the solar system is",
    "def fibonacci(n):", "Once upon a time", "The chemical symbol for gold is",
    "In 1969, the first man to walk on the moon was", "The square root of 144 is",
    "My favourite recipe for pancakes", "The theory of relativity was proposed by",
    "import numpy as np\n", "The quick brown fox", "To be or not to be,",
    "The main ingredient of guacamole is", "The speed of light is about",
    "Photosynthesis is the process", "The Great Wall of China", "A haiku about autumn:",
    "The best way to learn a language is", "Mount Everest is located in",
    "The tallest animal on Earth is the", "SELECT name FROM users WHERE",
]


#: The precisions the precision suite compares: name -> tfshard.load arguments (int4: see
#: `_open`).
VARIANTS = {"float32": {"dtype": "float32"}, "bfloat16": {"dtype": "bfloat16"},
            "int8": {"quantize": "int8"}, "int4": {"quantize": "int4"}}


def _open(source, world, dtype=None, quantize=None, strategy=None):
    """`tfshard.load(source, ...)`; for int4, which tfshard quantizes only before sharding,
    each rank loads the whole model, quantizes it with Keras and shards it. (Not through a
    saved int4 file: keras-hub 0.32's LlamaBackbone.get_config drops tie_word_embeddings,
    so SmolLM2 saved to .keras reloads untied and its weights no longer match.)"""
    import tfshard

    if quantize != "int4":
        return tfshard.load(source, world=world, dtype=dtype, quantize=quantize, strategy=strategy)
    from tfshard import comm as comm_lib

    whole = tfshard.load(source, world=tfshard.World(comm_lib.create("local"), "local"),
                         dtype=dtype)
    whole.inner.quantize("int4")
    sharded = tfshard.shard(whole.inner, world=world, strategy=strategy)
    sharded.attach_source(source, whole.preprocessor)
    return sharded


#: Timed beside them: bfloat16 and int8 with tfshard's decode matmuls off (TensorFlow's own).
TF_MATMUL = [("bf16 tf-mm", {"dtype": "bfloat16"}, {"TFSHARD_DECODE_OPS": "0"}),
             ("int8 tf-mm", {"quantize": "int8"}, {"TFSHARD_DECODE_OPS": "0"})]


def _agree_child(args):
    """Greedy continuations of PROMPTS in every VARIANT, against float32, on these ranks."""
    import tfshard
    from tfshard.generation import decode_text

    world = tfshard.init()
    texts, ids = {}, {}
    for name, kwargs in VARIANTS.items():
        model = _open(args.source, world, **kwargs)
        tok = (model.inner.preprocessor or model.preprocessor).tokenizer
        out = model.generate(PROMPTS, max_length=48, strip_prompt=True, sampler="greedy")
        texts[name] = [decode_text(t) for t in out]
        ids[name] = [[int(i) for i in list(tok(t))[:args.new_tokens]] for t in texts[name]]
        del model
    result = {}
    a = ids["float32"]
    for name in VARIANTS:
        b = ids[name]
        prefix = [next((k for k, (x, y) in enumerate(zip(ra, rb)) if x != y),
                       min(len(ra), len(rb))) for ra, rb in zip(a, b)]
        result[name] = {
            "prompts": len(PROMPTS),
            "tokens_compared": sum(min(len(ra), len(rb)) for ra, rb in zip(a, b)),
            "tokens_same": sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)),
            "identical_continuations": sum(ra == rb for ra, rb in zip(a, b)),
            "mean_common_prefix": sum(prefix) / len(prefix), "paris": texts[name][0]}
    if world.rank == 0:
        print("RESULT " + json.dumps(result), flush=True)


def suite_precision(args):
    """SmolLM2 at TP=n in float32 and bf16: bytes, load memory, decode, greedy agreement."""
    me = [sys.executable, str(Path(__file__).resolve())]
    n = args.np
    rows = {}
    runs = [(name, kwargs, None) for name, kwargs in VARIANTS.items()] + TF_MATMUL
    for name, kwargs, env in runs:
        flags = [f"--{k}={v}" for k, v in kwargs.items()]
        rows[f"load {name}"] = _run(_launch("mpi", n, me + [
            "_load", "--source", args.source, "--mode", "sharded"] + flags), args.timeout, env)
        rows[f"generate {name}"] = _run(_launch("mpi", n, me + [
            "_generate", "--source", args.source, "--mode", "sharded",
            "--repeats", str(args.repeats)] + flags), args.timeout, env)
    rows["agreement"] = _run(_launch("mpi", n, me + [
        "_agree", "--source", args.source, "--new-tokens", str(args.new_tokens)]), args.timeout)
    names = [name for name, _, _ in runs]
    print(f"\nprecision: {args.source} at TP={n} (MPI), {_cpu_model()}; ratios against float32")
    print(f"{'':<38} " + " ".join(f"{v:>10}" for v in names) + "  "
          + " ".join(f"{v + '/fp32':>13}" for v in names[1:]))
    for label, key, field in (
            ("weights held per rank (MiB)", "load", "weights_mib"),
            ("load: peak RSS rise, worst rank (MiB)", "load", "rise_mib"),
            ("decode per token (ms)", "generate", "decode_ms"),
            ("prefill of 64 tokens (s)", "generate", "prefill_s")):
        vals = [rows[f"{key} {v}"][field] for v in names]
        print(f"{label:<38} " + " ".join(f"{x:>10.2f}" for x in vals) + "  "
              + " ".join(f"{x / vals[0]:>12.2f}x" for x in vals[1:]))
    for name in list(VARIANTS)[1:]:
        g = rows["agreement"][name]
        print(f"greedy, {g['prompts']} prompts x {args.new_tokens} new tokens, {name} vs float32: "
              f"{g['tokens_same']}/{g['tokens_compared']} tokens the same "
              f"({g['tokens_same'] / g['tokens_compared']:.1%}), {g['identical_continuations']} "
              f"continuations identical, mean common prefix {g['mean_common_prefix']:.1f} tokens; "
              f"'The capital of France is' -> {g['paris']!r}")
    print(f"float32: 'The capital of France is' -> {rows['agreement']['float32']['paris']!r}")
    _write_report(f"precision-{Path(args.source).name}", args, rows)


def _write_report(stem, args, runs):
    """Writes bench-results/STEM-TIMESTAMP.json with the arguments and the runs."""
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    path = out / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1, default=str))
    os.replace(tmp, path)
    print(f"wrote {path.relative_to(ROOT)}")


def _cpu_model():
    """The CPU's model name (and its bf16/AMX flags), from /proc/cpuinfo."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    extra = sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f"))
    return f"{model}, {os.cpu_count()} cores" + (f" ({' '.join(extra)})" if extra else "")


def _run(cmd, timeout, env=None):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})})
    for line in proc.stdout.splitlines():
        if "RESULT " in line:
            # mpiexec may glue another rank's output after it: read one JSON value.
            return json.JSONDecoder().raw_decode(line.split("RESULT ", 1)[1])[0]
    raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
                       f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


BACKENDS = ("mpi", "horovod-mpi", "gloo", "mirrored", "multiworker")
#: Environment per backend run under ./horovodrun.sh.
BACKEND_ENV = {"mpi": {}, "horovod-mpi": {"TFSHARD_BACKEND": "horovod"}, "gloo": {}}


def _launch(backend, n, child):
    """The command running `child` (a `python bench.py _...` argv) on n ranks of `backend`.

    "mpi": ./horovodrun.sh (an MPI job, tfshard's MPI collectives); "horovod-mpi":
    the same job with Horovod's ops over its MPI controller (run it with
    `BACKEND_ENV`); "gloo": ./horovodrun.sh --gloo (horovodrun, Horovod over Gloo);
    "mirrored" runs one process of n replicas (`--mode mirrored --replicas n`).
    """
    if backend in ("mpi", "horovod-mpi"):
        return [str(ROOT / "horovodrun.sh"), "-np", str(n)] + child
    if backend == "gloo":
        return [str(ROOT / "horovodrun.sh"), "-np", str(n), "--gloo"] + child
    if backend == "multiworker":
        return [sys.executable, "-m", "tfshard.cli.launch", "-n", str(n)] + child
    child = list(child)
    child[child.index("--mode") + 1] = "mirrored"
    return child + ["--replicas", str(n)]


def _mirrored_strategy(args):
    """With `--mode mirrored`: a MirroredStrategy over `--replicas` logical CPUs, else None.

    Must run before the child creates any tensor (see `tfshard.cpu_devices`).
    """
    if getattr(args, "mode", None) != "mirrored":
        return None
    import tensorflow as tf

    import tfshard

    return tf.distribute.MirroredStrategy(tfshard.cpu_devices(args.replicas))


def _comm_child(args):
    """Times collectives on this backend: a chain of K in one tf.function, per collective."""
    import numpy as np

    import tensorflow as tf

    import tfshard
    from tfshard import comm as comm_lib

    strategy = _mirrored_strategy(args)

    if strategy is None:
        world = tfshard.init()
        comms, strategy, rank = [world.comm], world.strategy, world.rank
    else:
        comms, rank = comm_lib.for_replicas(strategy), 0
    size = comms[0].size

    class _Own:
        """The calling replica's own communicator (each replica of a MirroredStrategy
        launches its collectives from its own device, with its own keys)."""

        def __getattr__(self, name):
            if len(comms) == 1:
                return getattr(comms[0], name)
            ctx = tf.distribute.get_replica_context()
            return getattr(comms[int(tf.get_static_value(ctx.replica_id_in_sync_group))], name)

    comm = _Own()

    def chain(op):
        def steps(x):
            for _ in range(args.chain):
                x = op(x)
            return x
        if strategy is None:
            return tf.function(steps)
        return tf.function(lambda x: strategy.experimental_local_results(
            strategy.run(steps, args=(x,)))[0])

    def ops(shape):
        extra = {}
        if comms[0].backend == "mpi":
            # The simpler design measured against tfshard's op: mpi4py through
            # tf.numpy_function (each call crosses into Python and takes the GIL).
            from mpi4py import MPI

            def host_sum(a):
                out = np.empty_like(a)
                MPI.COMM_WORLD.Allreduce(a, out)
                return out

            extra["allreduce_sum via numpy_function+mpi4py"] = lambda x: tf.ensure_shape(
                tf.numpy_function(host_sum, [x], tf.float32, stateful=True), shape) / size
        return {
            **extra,
            "allreduce_sum": lambda x: comm.allreduce_sum(x) / size,
            # Gather the last axis and keep the first share: the shape stays fixed
            # (a collective's output shape is not static, so it is restored).
            "allgather": lambda x: tf.ensure_shape(
                comm.allgather(x, axis=-1)[..., : shape[-1]], shape),
        }

    result = {"ranks": size, "chain": args.chain, "collectives": {}}
    for label, shape in (("small", [1, args.hidden]),
                         ("activation", [args.rows * args.seq_len, args.hidden])):
        for name, op in ops(shape).items():
            fn = chain(op)
            x = tf.ones(shape)
            fn(x)  # trace + warm up
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                np.asarray(fn(x))
                times.append((time.perf_counter() - t0) / args.chain)
            result["collectives"][f"{name} {label} {shape}"] = {
                "ms": 1e3 * statistics.median(times), "bytes": int(np.prod(shape)) * 4}
    if rank == 0:
        print("RESULT " + json.dumps(result), flush=True)


def suite_comm(args):
    me = [sys.executable, str(Path(__file__).resolve()), "_comm", "--mode", "sharded",
          "--hidden", str(args.hidden), "--rows", str(args.rows), "--seq-len", str(args.seq_len),
          "--chain", str(args.chain), "--repeats", str(args.repeats)]
    runs = {}
    for n in args.np:
        for backend in args.backends:
            runs[f"{backend} {n}"] = _run(_launch(backend, n, me), args.timeout,
                                          env=BACKEND_ENV.get(backend))
    print(f"\ncomm: us per collective (median of {args.repeats} chains of {args.chain} inside "
          f"one tf.function), float32, {_cpu_model()}")
    names = sorted({n for r in runs.values() for n in r["collectives"]},
                   key=lambda n: (n.split(" ")[0] != "allreduce_sum", "small" not in n, n))
    print(f"{'collective':<58}" + "".join(f" {label:>14}" for label in runs))
    for n in names:
        cells = [r["collectives"].get(n) for r in runs.values()]
        print(f"{n:<58}" + "".join(f" {1e3 * c['ms']:>14.1f}" if c else f" {'-':>14}"
                                    for c in cells))
    _write_report("comm", args, runs)


def suite_forward(args, layouts=None):
    common = ["--model", args.model, "--rows", str(args.rows), "--seq-len", str(args.seq_len),
              "--batch-size", str(args.batch_size), "--repeats", str(args.repeats)]
    me = [sys.executable, str(Path(__file__).resolve())]
    backends = getattr(args, "backends", ["mpi"])
    layouts = [(lay[0], lay[1], lay[2], lay[3] if len(lay) > 3 else 0, b)
               for lay in (layouts or []) for b in backends] or [
        (f"TP={n}", n, n, 0, b) for n in args.np for b in backends]
    commands = [("unsharded", me + ["_child", "--mode", "unsharded"] + common, None)]
    for name, n, tp, pp, backend in layouts:
        child = me + ["_child", "--mode", "sharded", "--tp", str(tp), "--pp", str(pp)] + common
        label = name if backend == "mpi" else f"{name} {backend}"
        commands.append((label, _launch(backend, n, child), BACKEND_ENV.get(backend)))
        if getattr(args, "comm_dtype", None) and tp > 1:  # the same, sent in 16 bits
            commands.append((f"{label} {args.comm_dtype[:4]} wire",
                             _launch(backend, n, child + ["--comm-dtype", args.comm_dtype]),
                             BACKEND_ENV.get(backend)))
    # Rounds interleave the runs, so a slow spell of a shared machine hits them
    # alike; each run's ratio is taken against the unsharded run of its round.
    rounds = []
    for _ in range(args.rounds):
        rounds.append({name: _run(cmd, args.timeout, env=env) for name, cmd, env in commands})
    rows = []
    for name, _, _ in commands:
        runs = [r[name] for r in rounds]
        result = dict(sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2])
        result["seconds"] = statistics.median(r["seconds"] for r in runs)
        result["round_seconds"] = [r["seconds"] for r in runs]
        result["round_ratios"] = [r["unsharded"]["seconds"] / r[name]["seconds"] for r in rounds]
        result["ratio"] = statistics.median(result["round_ratios"])
        rows.append((name, result))
    peak = rows[0][1]["matmul_flops_per_s"]
    minimum = rows[0][1]["megatron_minimum_per_forward"]
    print(f"\n{args.suite}: {args.model}, {args.rows} rows x {args.seq_len} tokens, batch "
          f"{args.batch_size}, median of {args.repeats} predicts x {args.rounds} interleaved "
          f"round(s), {_cpu_model()}; machine matmul rate {peak / 1e9:.1f} GFLOP/s; "
          f"Megatron minimum per forward: {minimum['collectives']} collectives, "
          f"{minimum['bytes'] / 2**20:.2f} MiB")
    print(f"{'run':<22} {'s/predict':>10} {'tokens/s':>10} {'vs unsharded':>13} "
          f"{'params/rank':>12} {'peak RSS':>10} {'GFLOP/s':>8} {'of matmul':>10} "
          f"{'coll/fwd':>9} {'MiB/fwd':>8} {'= min':>6} {'in coll':>8} {'bubble':>14}")
    for name, r in rows:
        tps = r["tokens"] / r["seconds"]
        sent = r.get("collectives_per_forward")
        comm = (f"{sent['collectives']:>9.0f} {sent['bytes'] / 2**20:>8.2f} "
                f"{str(_is_minimum(sent, minimum, 2 if ' wire' in name else 4)):>6} {100 * r['collective_seconds_share']:>7.1f}%"
                if sent and sent["collectives"] else f"{'-':>9} {'-':>8} {'-':>6} {'-':>8}")
        bubble = (f"{r['bubble']:>6.0%} (GPipe {r['bubble_gpipe']:.0%})" if "bubble" in r
                  else f"{'-':>14}")
        print(f"{name:<22} {r['seconds']:>10.3f} {tps:>10.0f} {r['ratio']:>12.2f}x "
              f"{r['param_bytes_per_rank'] / 2**20:>10.1f}MiB {r['peak_rss_mib']:>7.0f}MiB "
              f"{r['achieved_flops_per_s'] / 1e9:>8.1f} {r['achieved_flops_per_s'] / peak:>9.0%} "
              f"{comm} {bubble}")
    _write_report(f"{args.suite}-{args.model}", args, dict(rows))


def _is_minimum(sent, minimum, itemsize=4):
    """Whether a run's per-forward collectives are exactly Megatron's minimum (counted
    in fp32; a 16-bit wire, `itemsize` 2, sends half its bytes)."""
    return (round(sent["collectives"]) == minimum["collectives"]
            and round(sent["bytes"]) == minimum["bytes"] * itemsize // 4)


def suite_plot(args):
    """PNG charts of bench-results JSON files (forward/predict, comm, generate, load)."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("bench.py plot needs matplotlib: .venv/bin/pip install matplotlib "
                         "(or pip install -e '.[bench]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in args.files:
        data = json.loads(Path(path).read_text())
        stem, runs = Path(path).stem, data["runs"]
        fig, ax = plt.subplots(figsize=(7, 3.2))
        if stem.startswith(("forward", "predict")):
            names = list(runs)
            tps = [r["tokens"] / r["seconds"] for r in runs.values()]
            bars = ax.bar(names, tps, color=["#888"] + ["#3a7"] * (len(names) - 1))
            for bar, v, r in zip(bars, tps, runs.values()):
                ax.annotate(f"{r.get('ratio', v / tps[0]):.2f}x",
                            (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom")
            ax.set_ylabel("tokens/s")
            ax.set_ylim(0, max(tps) * 1.2)
            a = data["args"]
            ax.set_title(f"{a['model']}: {a['rows']}x{a['seq_len']} tokens, batch "
                         f"{a['batch_size']} (ratio to unsharded, same run)")
        elif stem.startswith("comm"):
            # The collectives every backend ran (the MPI run adds a numpy_function row).
            labels = [n for n in next(iter(runs.values()))["collectives"]
                      if all(n in r["collectives"] for r in runs.values())]
            width = 0.8 / len(runs)
            for i, (backend, r) in enumerate(runs.items()):
                ax.bar([j + i * width for j in range(len(labels))],
                       [1e3 * r["collectives"][n]["ms"] for n in labels], width, label=backend)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))],
                          [n.replace(" [", "\n[") for n in labels], fontsize=7)
            ax.set_ylabel("µs per collective")
            ax.set_yscale("log")
            ax.legend(fontsize=7)
            ax.set_title("one collective, float32 (median of chains in one tf.function)")
        elif stem.startswith("generate"):
            names = list(runs)
            ax.bar(names, [r["decode_ms"] for r in runs.values()], color="#37a")
            ax.tick_params(axis="x", labelsize=7)
            ax.set_ylabel("decode ms/token")
            ax.set_title(f"generate: {stem.split('-')[1]} (lower is better)")
        elif stem.startswith("load"):
            for label, rows in runs.items():
                ax.bar([f"{n}\n{label}" for n in rows], [r["rise_mib"] for r in rows.values()])
            ax.set_ylabel("peak RSS rise, MiB (worst rank)")
            ax.tick_params(axis="x", labelsize=6)
        else:
            plt.close(fig)
            continue
        fig.tight_layout()
        target = out / f"{stem.rsplit('-', 2)[0]}.png"
        fig.savefig(target, dpi=110)
        plt.close(fig)
        print(f"wrote {target}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="suite", required=True)
    p = sub.add_parser("load")
    p.add_argument("--np", type=int, nargs="*", default=[2, 4])
    p.add_argument("--pp", type=int, nargs="*", default=[],
                   help="also load with these pipeline stage counts (MPI, one rank each)")
    p.add_argument("--backends", nargs="+", choices=("mpi", "mirrored", "multiworker"),
                   default=["mpi"])
    p.add_argument("--timeout", type=int, default=1800)
    p = sub.add_parser("_load")
    p.add_argument("--source", required=True)
    p.add_argument("--mode", choices=["keras", "unsharded", "sharded", "mirrored"], required=True)
    p.add_argument("--replicas", type=int, default=0)
    p.add_argument("--pp", type=int, default=0)
    p.add_argument("--balance", choices=("compute", "memory"), default="compute")
    p.add_argument("--dtype", default=None)
    p.add_argument("--quantize", default=None)
    for name in ("precision", "_agree"):
        p = sub.add_parser(name)
        p.add_argument("--source", default="smollm2")
        p.add_argument("--new-tokens", type=int, default=16)
        if name == "precision":
            p.add_argument("--np", type=int, default=2)
            p.add_argument("--repeats", type=int, default=3)
            p.add_argument("--timeout", type=int, default=1800)
    for name in ("generate", "_generate"):
        p = sub.add_parser(name)
        p.add_argument("--source", default="smollm2")
        p.add_argument("--length", type=int, default=64)
        p.add_argument("--new-tokens", type=int, default=32)
        p.add_argument("--batch", type=int, default=1)
        p.add_argument("--repeats", type=int, default=3)
        p.add_argument("--dtype", default=None)
        p.add_argument("--quantize", default=None)
        if name == "generate":
            p.add_argument("--np", type=int, nargs="*", default=[2, 3])
            p.add_argument("--pp", type=int, nargs="*", default=[],
                           help="also run these pipeline stage counts (MPI, one rank each)")
            p.add_argument("--backends", nargs="+", choices=BACKENDS, default=["mpi"])
            p.add_argument("--timeout", type=int, default=1800)
        else:
            p.add_argument("--mode", choices=["sharded", "unsharded", "mirrored"], required=True)
            p.add_argument("--threads", type=int, default=0)
            p.add_argument("--replicas", type=int, default=0)
            p.add_argument("--pp", type=int, default=0)
            p.add_argument("--tp", type=int, default=0)
    for name in ("forward", "predict", "pipeline", "_child"):
        p = sub.add_parser(name)
        p.add_argument("--model", default="gpt2")
        p.add_argument("--rows", type=int, default=8)
        p.add_argument("--seq-len", type=int, default=128)
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--repeats", type=int, default=3)
        if name in ("forward", "predict", "pipeline"):
            p.add_argument("--np", type=int, nargs="+", default=[2])
            p.add_argument("--timeout", type=int, default=1800)
            p.add_argument("--rounds", type=int, default=1,
                           help="interleaved rounds of every run (ratios: median over rounds)")
        p.add_argument("--comm-dtype", choices=["bfloat16", "float16"], default=None,
                       help="also run each TP layout with its collectives sent in this dtype")
        if name in ("forward", "predict", "pipeline"):
            p.add_argument("--backends", nargs="+", choices=BACKENDS, default=["mpi"])
        elif name == "_child":
            p.add_argument("--mode", choices=["sharded", "unsharded", "mirrored"], required=True)
            p.add_argument("--tp", type=int, default=0)
            p.add_argument("--pp", type=int, default=0)
            p.add_argument("--replicas", type=int, default=0)
    for name in ("comm", "_comm"):
        p = sub.add_parser(name)
        p.add_argument("--hidden", type=int, default=768)
        p.add_argument("--rows", type=int, default=8)
        p.add_argument("--seq-len", type=int, default=128)
        p.add_argument("--chain", type=int, default=20)
        p.add_argument("--repeats", type=int, default=5)
        if name == "comm":
            p.add_argument("--np", type=int, nargs="+", default=[2])
            p.add_argument("--backends", nargs="+", choices=BACKENDS,
                           default=["mpi", "horovod-mpi", "gloo", "mirrored", "multiworker"])
            p.add_argument("--timeout", type=int, default=1800)
        else:
            p.add_argument("--mode", choices=["sharded", "mirrored"], required=True)
            p.add_argument("--replicas", type=int, default=0)
    for name in ("hosts", "_hosts"):
        p = sub.add_parser(name)
        p.add_argument("--model", default="gpt2")
        p.add_argument("--rows", type=int, default=8)
        p.add_argument("--seq-len", type=int, default=64)
        p.add_argument("--batch-size", type=int, default=4)
        p.add_argument("--repeats", type=int, default=5)
        if name == "hosts":
            p.add_argument("--hidden", type=int, default=768)
            p.add_argument("--chain", type=int, default=20)
            p.add_argument("--timeout", type=int, default=1800)
        else:
            p.add_argument("--tp", type=int, default=0)
    p = sub.add_parser("plot", help="PNG charts of bench-results/*.json (needs matplotlib)")
    p.add_argument("files", nargs="+")
    p.add_argument("--out", default=str(ROOT / "docs" / "images"))
    args = parser.parse_args()
    if args.suite in ("hosts", "_hosts"):
        import bench_hosts

        if args.suite == "hosts":
            bench_hosts.suite_hosts(args, _run, _cpu_model, _write_report)
        else:
            bench_hosts.hosts_child(args)
    elif args.suite == "plot":
        suite_plot(args)
    elif args.suite == "comm":
        suite_comm(args)
    elif args.suite == "_comm":
        _comm_child(args)
    elif args.suite == "load":
        suite_load(args)
    elif args.suite == "generate":
        suite_generate(args)
    elif args.suite == "_generate":
        _generate_child(args)
    elif args.suite == "_load":
        _load_child(args)
    elif args.suite == "precision":
        suite_precision(args)
    elif args.suite == "_agree":
        _agree_child(args)
    elif args.suite == "_child":
        _measure(args, sharded=args.mode != "unsharded")
    elif args.suite == "predict":
        suite_forward(args, [("TP=2", 2, 2), ("DP=2", 2, 1), ("DP2xTP2", 4, 2)])
    elif args.suite == "pipeline":
        layouts = {2: [("PP=2", 2, 1, 2), ("TP=2", 2, 2), ("DP=2", 2, 1)],
                   4: [("DP2xPP2", 4, 1, 2), ("PP2xTP2", 4, 2, 2), ("DP2xTP2", 4, 2)]}
        suite_forward(args, [lay for n in args.np for lay in layouts[n]])
    else:
        suite_forward(args)


if __name__ == "__main__":
    main()
