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

Suite `hosts` (needs root): two hosts made of network
namespaces: per-collective latency inside one host against across the two, and the
bytes that crossed between the hosts per predict against the plan's minimum, for the
default layout (TP inside hosts, DP across) and for TP over both hosts.

    .venv/bin/python scripts/bench.py hosts --model gpt2 --rows 8 --seq-len 64

One module per suite (forward.py: forward, predict, pipeline; generate.py; load.py;
precision.py; comm.py; hosts.py; plot.py), each with its measuring job (a hidden
`_SUITE` command the suite runs in child processes), and their shared helpers in
common.py. `scripts/bench.py SUITE ...` and `tfshard bench SUITE ...` run `main`.
"""

import argparse

from tfshard.cli.bench import comm, common, forward, generate, hosts, load, plot, precision

#: What each command runs: the suites, and the measuring jobs (`_...`) they start.
SUITES = {
    "load": load.suite_load, "_load": load.load_child,
    "precision": precision.suite_precision, "_agree": precision.agree_child,
    "generate": generate.suite_generate, "_generate": generate.generate_child,
    "forward": forward.suite_forward, "predict": forward.suite_predict,
    "pipeline": forward.suite_pipeline, "_child": forward.child,
    "comm": comm.suite_comm, "_comm": comm.comm_child,
    "hosts": hosts.suite_hosts, "_hosts": hosts.hosts_child,
    "plot": plot.suite_plot,
}


def build_parser(prog=None):
    """The benchmarks' argument parser: one subcommand per suite and measuring job, each
    with `fn`, the function that runs it.

    Args:
        prog: the program name in usage lines (default: the script's name).
    """
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="suite", required=True)
    p = sub.add_parser("load")
    p.set_defaults(fn=SUITES["load"])
    p.add_argument("--np", type=int, nargs="*", default=[2, 4])
    p.add_argument("--pp", type=int, nargs="*", default=[],
                   help="also load with these pipeline stage counts (MPI, one rank each)")
    p.add_argument("--backends", nargs="+", choices=("mpi", "mirrored", "multiworker"),
                   default=["mpi"])
    p.add_argument("--timeout", type=int, default=1800)
    p = sub.add_parser("_load")
    p.set_defaults(fn=SUITES["_load"])
    p.add_argument("--source", required=True)
    p.add_argument("--mode", choices=["keras", "unsharded", "sharded", "mirrored"], required=True)
    p.add_argument("--replicas", type=int, default=0)
    p.add_argument("--pp", type=int, default=0)
    p.add_argument("--balance", choices=("compute", "memory"), default="compute")
    p.add_argument("--dtype", default=None)
    p.add_argument("--quantize", default=None)
    for name in ("precision", "_agree"):
        p = sub.add_parser(name)
        p.set_defaults(fn=SUITES[name])
        p.add_argument("--source", default="smollm2")
        p.add_argument("--new-tokens", type=int, default=16)
        if name == "precision":
            p.add_argument("--np", type=int, default=2)
            p.add_argument("--repeats", type=int, default=3)
            p.add_argument("--timeout", type=int, default=1800)
    for name in ("generate", "_generate"):
        p = sub.add_parser(name)
        p.set_defaults(fn=SUITES[name])
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
    for name in ("forward", "predict", "pipeline", "_child"):
        p = sub.add_parser(name)
        p.set_defaults(fn=SUITES[name])
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
    for name in ("comm", "_comm"):
        p = sub.add_parser(name)
        p.set_defaults(fn=SUITES[name])
        p.add_argument("--hidden", type=int, default=768)
        p.add_argument("--rows", type=int, default=8)
        p.add_argument("--seq-len", type=int, default=128)
        p.add_argument("--chain", type=int, default=20)
        p.add_argument("--repeats", type=int, default=5)
        if name == "comm":
            p.add_argument("--np", type=int, nargs="+", default=[2])
            p.add_argument("--backends", nargs="+", choices=common.BACKENDS,
                           default=["mpi", "horovod-mpi", "gloo", "mirrored", "multiworker"])
            p.add_argument("--timeout", type=int, default=1800)
        else:
            p.add_argument("--mode", choices=["sharded", "mirrored"], required=True)
            p.add_argument("--replicas", type=int, default=0)
    for name in ("hosts", "_hosts"):
        p = sub.add_parser(name)
        p.set_defaults(fn=SUITES[name])
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
    p.set_defaults(fn=SUITES["plot"])
    p.add_argument("files", nargs="+")
    p.add_argument("--out", default=str(common.ROOT / "docs" / "images"))
    return parser


def main(argv=None, prog=None):
    """Runs the suite (or measuring job) `argv` names: `scripts/bench.py`, `tfshard bench`
    and `python -m tfshard.cli.bench` (the suites' child processes).

    Args:
        argv: the arguments (default: the command line's).
        prog: the program name in usage lines.

    Returns:
        0 (a suite that fails raises).
    """
    args = build_parser(prog).parse_args(argv)
    args.fn(args)
    return 0
