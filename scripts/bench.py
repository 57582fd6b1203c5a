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

    .venv/bin/python scripts/bench.py predict --model gpt2 --rows 32
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

    world = tfshard.init() if sharded else None
    model, vocab, names = models.build(args.model, seed=0)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, vocab, (args.rows, args.seq_len)).astype("int32")
    x = {n: (ids if n == "token_ids" else np.ones_like(ids) if n == "padding_mask"
             else np.zeros_like(ids)) for n in names}
    param_bytes = sum(np.asarray(v).nbytes for v in model.weights)
    target = model
    if sharded:
        target = tfshard.shard(model, tensor_parallel=args.tp or None)
        param_bytes = sum(np.asarray(v).nbytes for v in target.inner.weights)
    target.predict(x, batch_size=args.batch_size, verbose=0)  # trace + warm up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        target.predict(x, batch_size=args.batch_size, verbose=0)
        times.append(time.perf_counter() - t0)
    result = {"seconds": statistics.median(times), "all_seconds": times,
              "tokens": args.rows * args.seq_len, "param_bytes_per_rank": int(param_bytes),
              "ranks": world.size if world else 1}
    if not world or world.rank == 0:
        print("RESULT " + json.dumps(result), flush=True)


def _run(cmd, timeout):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    for line in proc.stdout.splitlines():
        if "RESULT " in line:
            return json.loads(line.split("RESULT ", 1)[1])
    raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
                       f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def suite_forward(args, layouts=None):
    common = ["--model", args.model, "--rows", str(args.rows), "--seq-len", str(args.seq_len),
              "--batch-size", str(args.batch_size), "--repeats", str(args.repeats)]
    me = [sys.executable, str(Path(__file__).resolve())]
    rows = [("unsharded", _run(me + ["_child", "--mode", "unsharded"] + common, args.timeout))]
    layouts = layouts or [(f"TP={n}", n, n) for n in args.np]
    for name, n, tp in layouts:
        rows.append((name, _run([str(ROOT / "horovodrun.sh"), "-np", str(n)] + me
                                + ["_child", "--mode", "sharded", "--tp", str(tp)] + common,
                                args.timeout)))
    base = rows[0][1]["tokens"] / rows[0][1]["seconds"]
    print(f"\n{args.suite}: {args.model}, {args.rows} rows x {args.seq_len} tokens, batch "
          f"{args.batch_size}, median of {args.repeats}, {os.cpu_count()} cores")
    print(f"{'run':<10} {'s/predict':>10} {'tokens/s':>10} {'vs unsharded':>13} {'params/rank':>12}")
    for name, r in rows:
        tps = r["tokens"] / r["seconds"]
        print(f"{name:<10} {r['seconds']:>10.3f} {tps:>10.0f} {tps / base:>12.2f}x "
              f"{r['param_bytes_per_rank'] / 2**20:>10.1f}MiB")
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    path = out / f"{args.suite}-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"args": vars(args), "runs": dict(rows)}, indent=1, default=str))
    print(f"wrote {path.relative_to(ROOT)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="suite", required=True)
    for name in ("forward", "predict", "_child"):
        p = sub.add_parser(name)
        p.add_argument("--model", default="gpt2")
        p.add_argument("--rows", type=int, default=8)
        p.add_argument("--seq-len", type=int, default=128)
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--repeats", type=int, default=3)
        if name in ("forward", "predict"):
            p.add_argument("--np", type=int, nargs="+", default=[2])
            p.add_argument("--timeout", type=int, default=1800)
        else:
            p.add_argument("--mode", choices=["sharded", "unsharded"], required=True)
            p.add_argument("--tp", type=int, default=0)
    args = parser.parse_args()
    if args.suite == "_child":
        _measure(args, sharded=args.mode == "sharded")
    elif args.suite == "predict":
        suite_forward(args, [("TP=2", 2, 2), ("DP=2", 2, 1), ("DP2xTP2", 4, 2)])
    else:
        suite_forward(args)


if __name__ == "__main__":
    main()
