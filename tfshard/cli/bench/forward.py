"""Suites `forward`, `predict` and `pipeline`: a whole forward pass, sharded vs unsharded.

`forward` times the unsharded model in one process using every core, then the
same model under ./horovodrun.sh -np N for each N (each rank gets its share of
the cores), each the median of `--repeats` `predict` calls after a warm-up:
tokens/s, the ratio to unsharded from this same run, parameter bytes per rank,
FLOP/s, the collectives per forward against Megatron's minimum. `predict` runs
the layouts TP=2, DP=2 and DP2xTP2; `pipeline` pipeline stages beside them.
"""

import json
import statistics
import time

from tfshard.cli.bench import common


def measure(args, sharded):
    """One process (or rank): `predict` timed on the model; rank 0 prints the RESULT line."""
    import numpy as np

    import tfshard
    from tfshard import models

    strategy = common.mirrored_strategy(args)
    world = tfshard.init() if sharded else None
    model, vocab, names = models.build(args.model, seed=0)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, vocab, (args.rows, args.seq_len)).astype("int32")
    x = {n: (ids if n == "token_ids" else np.ones_like(ids) if n == "padding_mask"
             else np.zeros_like(ids)) for n in names}
    param_bytes = sum(np.asarray(v).nbytes for v in model.weights)
    flops = forward_flops(model, args.rows, args.seq_len)
    minimum = megatron_minimum(model, args.batch_size, args.seq_len)
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
        result["matmul_flops_per_s"] = matmul_rate(args)
    result["peak_rss_mib"] = common.hwm_mib()
    if world is not None and world.size > 1:
        peaks = world.comm.allgather_object(result["peak_rss_mib"])
        result["peak_rss_mib"] = max(peaks)
        result["peak_rss_mib_per_rank"] = peaks
    if not world or world.rank == 0:
        print("RESULT " + json.dumps(result), flush=True)


def forward_flops(model, rows, seq_len):
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


def megatron_minimum(model, batch, seq_len):
    """Megatron's collectives for one forward of a batch: two all-reduces of B.S.H
    per block, one for the vocab-parallel embedding lookup, and the logits gather."""
    backbone = getattr(model, "backbone", model)
    tokens = batch * seq_len
    reduces = 2 * backbone.num_layers + 1
    return {"collectives": reduces + 1,
            "bytes": 4 * tokens * (reduces * backbone.hidden_dim + backbone.vocabulary_size)}


def matmul_rate(args):
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


def suite_forward(args, layouts=None):
    shared = ["--model", args.model, "--rows", str(args.rows), "--seq-len", str(args.seq_len),
              "--batch-size", str(args.batch_size), "--repeats", str(args.repeats)]
    me = list(common.CHILD)
    backends = getattr(args, "backends", ["mpi"])
    layouts = [(lay[0], lay[1], lay[2], lay[3] if len(lay) > 3 else 0, b)
               for lay in (layouts or []) for b in backends] or [
        (f"TP={n}", n, n, 0, b) for n in args.np for b in backends]
    commands = [("unsharded", me + ["_child", "--mode", "unsharded"] + shared, None)]
    for name, n, tp, pp, backend in layouts:
        child = me + ["_child", "--mode", "sharded", "--tp", str(tp), "--pp", str(pp)] + shared
        label = name if backend == "mpi" else f"{name} {backend}"
        commands.append((label, common.launch(backend, n, child),
                         common.BACKEND_ENV.get(backend)))
        if getattr(args, "comm_dtype", None) and tp > 1:  # the same, sent in 16 bits
            commands.append((f"{label} {args.comm_dtype[:4]} wire",
                             common.launch(backend, n, child + ["--comm-dtype", args.comm_dtype]),
                             common.BACKEND_ENV.get(backend)))
    # Rounds interleave the runs, so a slow spell of a shared machine hits them
    # alike; each run's ratio is taken against the unsharded run of its round.
    rounds = []
    for _ in range(args.rounds):
        rounds.append({name: common.run(cmd, args.timeout, env=env)
                       for name, cmd, env in commands})
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
          f"round(s), {common.cpu_model()}; machine matmul rate {peak / 1e9:.1f} GFLOP/s; "
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
    common.write_report(f"{args.suite}-{args.model}", args, dict(rows))


def _is_minimum(sent, minimum, itemsize=4):
    """Whether a run's per-forward collectives are exactly Megatron's minimum (counted
    in fp32; a 16-bit wire, `itemsize` 2, sends half its bytes)."""
    return (round(sent["collectives"]) == minimum["collectives"]
            and round(sent["bytes"]) == minimum["bytes"] * itemsize // 4)


def suite_predict(args):
    """Suite `predict`: unsharded, TP=2, DP=2 and DP=2 x TP=2."""
    suite_forward(args, [("TP=2", 2, 2), ("DP=2", 2, 1), ("DP2xTP2", 4, 2)])


def suite_pipeline(args):
    """Suite `pipeline`: pipeline stages beside the other cuts, at 2 and 4 ranks."""
    layouts = {2: [("PP=2", 2, 1, 2), ("TP=2", 2, 2), ("DP=2", 2, 1)],
               4: [("DP2xPP2", 4, 1, 2), ("PP2xTP2", 4, 2, 2), ("DP2xTP2", 4, 2)]}
    suite_forward(args, [lay for n in args.np for lay in layouts[n]])


def child(args):
    """The measuring job `_child`: one process (or rank) times the model."""
    measure(args, sharded=args.mode != "unsharded")


def add_parsers(sub):
    """Adds the suites `forward`, `predict`, `pipeline` and their job `_child` to `sub`."""
    commands = {"forward": suite_forward, "predict": suite_predict, "pipeline": suite_pipeline,
                "_child": child}
    for name, p in common.add_commands(sub, commands).items():
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
            p.add_argument("--backends", nargs="+", choices=common.BACKENDS, default=["mpi"])
        elif name == "_child":
            p.add_argument("--mode", choices=["sharded", "unsharded", "mirrored"], required=True)
            p.add_argument("--tp", type=int, default=0)
            p.add_argument("--pp", type=int, default=0)
            p.add_argument("--replicas", type=int, default=0)
