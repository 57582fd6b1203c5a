"""Suite `load`: the peak-memory rise of loading a model, sharded vs unsharded.

VmHWM after the load minus the RSS after imports (the high-water mark reset at
that baseline), for a GPT-2 (124M config) `.keras` checkpoint and for SmolLM2
(GGUF): unsharded and `tfshard.load` at each TP size and backend (the worst
rank), and with pipeline stages (`--pp`).
"""

import json
import os
import subprocess
import sys
import time

from tfshard.cli.bench import common


def load_child(args):
    """One process (or rank): memory rise of one load."""
    import keras
    import numpy as np
    import keras_hub  # noqa: F401  (imports belong to the baseline)

    import tfshard

    strategy = common.mirrored_strategy(args)
    world = tfshard.init() if args.mode in ("sharded", "mirrored") else None
    if world is not None:
        world.comm.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    base = common.rss_mib()
    t0 = time.perf_counter()
    if args.mode == "keras":
        model = keras.saving.load_model(args.source)
        variables = model.weights
    elif args.pp:
        model = tfshard.load(args.source, world=world, pipeline=args.pp, tensor_parallel=1,
                             pipeline_balance=args.balance)
        variables = model.inner.weights
    else:
        model = common.open_source(args.source, world, args.dtype, args.quantize, strategy)
        # Every replica of this process (MirroredStrategy: all of them, in one process).
        variables = [v for r in model.replicas for v in r.model.weights]
    seconds = time.perf_counter() - t0
    # The high-water mark first: reading the variables back would add a copy of the largest.
    rise, after = common.hwm_mib() - base, common.rss_mib() - base
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
    path = common.ROOT / "bench-results" / "cache" / "gpt2-124m.keras"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        code = ("import sys; from tfshard import models; m, _, _ = models.build('gpt2'); "
                f"m.save({str(path) + '.tmp.keras'!r})")
        subprocess.run([sys.executable, "-c", code], check=True, cwd=common.ROOT)
        os.replace(str(path) + ".tmp.keras", path)
    return str(path)


def suite_load(args):
    me = list(common.CHILD)
    report = {}
    for label, source in (("gpt2-124m.keras", _gpt2_checkpoint()), ("smollm2 (GGUF)", "smollm2")):
        child = ["_load", "--source", source]
        rows = []
        if source.endswith(".keras"):
            rows.append(("keras.saving.load_model",
                         common.run(me + child + ["--mode", "keras"], args.timeout)))
        rows.append(("tfshard.load, 1 process",
                     common.run(me + child + ["--mode", "unsharded"], args.timeout)))
        base_row = len(rows) - 1
        for n in args.np:
            for backend in args.backends:
                name = f"tfshard.load TP={n}" + ("" if backend == "mpi" else f" {backend}")
                job = common.launch(backend, n, me + child + ["--mode", "sharded"])
                rows.append((name, common.run(job, args.timeout,
                                              env=common.BACKEND_ENV.get(backend))))
        for pp in args.pp:
            for balance in ("compute", "memory"):
                job = common.launch("mpi", pp, me + child + [
                    "--mode", "sharded", "--pp", str(pp), "--balance", balance])
                rows.append((f"tfshard.load PP={pp} {balance}", common.run(job, args.timeout)))
        base = rows[base_row][1]["rise_mib"]
        print(f"\nload: {label}; peak RSS rise over the post-import baseline (worst process; "
              "a mirrored process holds all its replicas)")
        print(f"{'run':<26} {'rise MiB':>9} {'vs 1 proc':>10} {'held MiB':>9} {'weights MiB':>12} {'s':>7}")
        for name, r in rows:
            print(f"{name:<26} {r['rise_mib']:>9.0f} {r['rise_mib'] / base:>9.2f}x "
                  f"{r['after_mib']:>9.0f} {r['weights_mib']:>12.0f} {r['seconds']:>7.1f}")
        report[label] = dict(rows)
    common.write_report("load", args, report)


def add_parsers(sub):
    """Adds the suite `load` and its measuring job `_load` to the benchmarks' subcommands."""
    parsers = common.add_commands(sub, {"load": suite_load, "_load": load_child})
    p = parsers["load"]
    p.add_argument("--np", type=int, nargs="*", default=[2, 4])
    p.add_argument("--pp", type=int, nargs="*", default=[],
                   help="also load with these pipeline stage counts (MPI, one rank each)")
    p.add_argument("--backends", nargs="+", choices=("mpi", "mirrored", "multiworker"),
                   default=["mpi"])
    p.add_argument("--timeout", type=int, default=1800)
    p = parsers["_load"]
    p.add_argument("--source", required=True)
    p.add_argument("--mode", choices=["keras", "unsharded", "sharded", "mirrored"], required=True)
    p.add_argument("--replicas", type=int, default=0)
    p.add_argument("--pp", type=int, default=0)
    p.add_argument("--balance", choices=("compute", "memory"), default="compute")
    p.add_argument("--dtype", default=None)
    p.add_argument("--quantize", default=None)
