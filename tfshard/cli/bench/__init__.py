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

Suite `decode`: tfshard's decode step per precision (fp32, bf16, int8, int4) at TP=N,
beside keras-hub's loop (`--keras`) and llama.cpp's llama-bench on the matching GGUF
(`--llamacpp DIR`), interleaved; the bandwidth floor from each rank's bytes and measured
read rate; `--fixed` the fixed cost per step (tiny widths); `--profile` per-op time.

    .venv/bin/python scripts/bench.py decode --np 1 2 --keras --fixed --llamacpp ~/.cache/llamacpp

Suite `serve`: `tfshard serve smollm2` at TP=N under a load generator on loopback: generated
tokens/s, time per output token and time to first token at 1 and at several concurrent streams
(continuous batching), and one request through the server against `generate`.

    .venv/bin/python scripts/bench.py serve --np 1 2 --streams 1 8

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

from tfshard.cli.bench import (comm, decode, forward, generate, hosts, load, plot, precision,
                                serve)


def build_parser(prog=None):
    """The benchmarks' argument parser: one subcommand per suite and measuring job, each
    with `fn`, the function that runs it (each suite's module adds its own, in this order).

    Args:
        prog: the program name in usage lines (default: the script's name).
    """
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="suite", required=True)
    load.add_parsers(sub)
    precision.add_parsers(sub)
    generate.add_parsers(sub)
    decode.add_parsers(sub)
    serve.add_parsers(sub)
    forward.add_parsers(sub)
    comm.add_parsers(sub)
    hosts.add_parsers(sub)
    plot.add_parsers(sub)
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
