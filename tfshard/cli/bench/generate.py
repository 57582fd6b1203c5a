"""Suite `generate`: decode latency and prefill time of keras-hub's loop, sharded vs unsharded.

Greedy generation with keras-hub's loop and KV cache, for SmolLM2 (real weights)
or a built-in model, unsharded (one process, at 1 thread and at every core) and
at TP=N under each of `--backends`, plus pipeline stages (`--pp`). Both figures
are measured inside `generate()` itself: two prompts padded to the same length
L, one leaving 1 token to generate and one leaving 1+K; the difference is
exactly K decode steps, and prefill = the first time minus one step.
"""

import json
import os
import statistics
import time
from pathlib import Path

from tfshard.cli.bench import common


def generate_child(args):
    """One process (or rank): decode latency and prefill time of one model."""
    import numpy as np

    import tfshard
    from tfshard import comm as comm_lib
    from tfshard import models

    strategy = common.mirrored_strategy(args)
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
        target = common.open_source(args.source, world, args.dtype, args.quantize, strategy)
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
    me = list(common.CHILD)
    child = ["_generate", "--source", args.source, "--length", str(args.length),
             "--new-tokens", str(args.new_tokens), "--batch", str(args.batch),
             "--repeats", str(args.repeats)]
    # The unsharded baseline is the better of 1 and all threads (on a small model one
    # thread can win: less synchronisation per tiny op).
    unsharded = [(f"unsharded {t} thread{'s' if t > 1 else ''}",
                  common.run(me + child + ["--mode", "unsharded", "--threads", str(t)],
                             args.timeout))
                 for t in sorted({1, os.cpu_count() or 1})]
    rows = list(unsharded)
    for n in args.np:  # each TP size on every backend, side by side
        for backend in args.backends:
            name = f"TP={n}" + ("" if backend == "mpi" else f" {backend}")
            job = common.launch(backend, n, me + child + ["--mode", "sharded"])
            rows.append((name, common.run(job, args.timeout,
                                          env=common.BACKEND_ENV.get(backend))))
    for pp in args.pp:  # pipeline stages (MPI), one rank each
        rows.append((f"PP={pp}", common.run(common.launch("mpi", pp, me + child + [
            "--mode", "sharded", "--pp", str(pp), "--tp", "1"]), args.timeout)))
    best = min((r for _, r in unsharded), key=lambda r: r["decode_ms"])
    best_prefill = min((r for _, r in unsharded), key=lambda r: r["prefill_s"])
    print(f"\ngenerate: {args.source}, batch {args.batch}, length {args.length} (prefill over all "
          f"of it), {args.new_tokens} decode steps timed, median of {args.repeats}, "
          f"{common.cpu_model()}; ratios against the best unsharded run")
    print(f"{'run':<22} {'decode ms/token':>16} {'vs unsharded':>13} {'decode tok/s':>13} "
          f"{'prefill s':>10} {'prefill tok/s':>14} {'vs unsharded':>13} {'params/rank':>12}")
    for name, r in rows:
        tps = r["prefill_tokens"] / r["prefill_s"]
        base_tps = best_prefill["prefill_tokens"] / best_prefill["prefill_s"]
        print(f"{name:<22} {r['decode_ms']:>16.1f} {r['decode_ms'] / best['decode_ms']:>12.2f}x "
              f"{1e3 * args.batch / r['decode_ms']:>13.1f} "
              f"{r['prefill_s']:>10.3f} {tps:>14.0f} {tps / base_tps:>12.2f}x "
              f"{r['param_bytes_per_rank'] / 2**20:>10.1f}MiB")
    common.write_report(f"generate-{Path(args.source).name}", args, dict(rows))


def add_parsers(sub):
    """Adds the suite `generate` and its job `_generate` to the benchmarks' subcommands."""
    commands = {"generate": suite_generate, "_generate": generate_child}
    for name, p in common.add_commands(sub, commands).items():
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
            p.add_argument("--backends", nargs="+", choices=common.BACKENDS, default=["mpi"])
            p.add_argument("--timeout", type=int, default=1800)
        else:
            p.add_argument("--mode", choices=["sharded", "unsharded", "mirrored"], required=True)
            p.add_argument("--threads", type=int, default=0)
            p.add_argument("--replicas", type=int, default=0)
            p.add_argument("--pp", type=int, default=0)
            p.add_argument("--tp", type=int, default=0)
