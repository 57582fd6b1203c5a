"""The `tfshard` command line.

    tfshard predict SOURCE [--input FILE.npy|.npz|.txt] [--output FILE.npy] [--batch-size B]
                           [--logdir DIR [--profile [N]]]
    tfshard generate SOURCE --prompt TEXT [--max-new-tokens N] [--sampler NAME]
    tfshard inspect SOURCE [--tensor-parallel N] [--pipeline P] [--check [--input FILE]]
    tfshard serve SOURCE [--port 8000] [--host 127.0.0.1] [--slots 8] [--max-len 2048]
    tfshard launch -n N SCRIPT|COMMAND [ARGS]
    tfshard bench SUITE [ARGS]      # = scripts/bench.py: forward, predict, load, comm, generate, ...

Run `predict`, `generate` and `serve` under ./horovodrun.sh -np N, under
`tfshard launch -n N` (tf.distribute multi-worker), or in one process with
`--replicas N` (a MirroredStrategy of N logical CPUs); `inspect` needs one
process only (`inspect --check` runs anywhere those do).

The package is the tools' wing: the commands (commands.py), their files
(files.py), the launcher (launch.py), the drift report (drift.py), precision
envelopes (precision.py) and the benchmark suites (bench/). Nothing here imports
TensorFlow until a command runs: `tfshard --help` and argument errors are instant.
"""

import argparse
import atexit
import gc
import importlib
import os
import sys

from tfshard.cli import commands

#: `--dtype`'s choices: `tfshard.io.FLOAT_POLICIES`, spelled out here so that building
#: the parser imports no TensorFlow (tests/test_cli_inputs.py checks they are equal).
FLOAT_POLICIES = ("float32", "bfloat16", "float16", "mixed_bfloat16", "mixed_float16")


def _stage_arguments(p):
    """--pipeline, --pipeline-split and --pipeline-balance of the commands that shard."""
    p.add_argument("--pipeline", type=int, default=None, metavar="P",
                   help="pipeline stages (MPI): each rank holds one stage's blocks")
    p.add_argument("--pipeline-split", default=None, metavar="N,N,...",
                   help="blocks per stage (default: balanced, see --pipeline-balance)")
    p.add_argument("--pipeline-balance", choices=("compute", "memory"), default="compute",
                   help="balance the stages' estimated FLOPs (default) or the bytes each "
                        "holds")


def _precision_arguments(parser, quantize):
    """--dtype (and --quantize) of the commands that build or load a model."""
    parser.add_argument("--dtype", choices=FLOAT_POLICIES, default=None,
                        help="precision to build or load the model in (default: as saved; "
                        "built-ins: float32); bfloat16 halves every rank's weight bytes")
    if quantize:
        parser.add_argument("--quantize", choices=["int8"], default=None,
                            help="quantize with Keras's int8 (per-channel weights, per-token "
                            "inputs); files are quantized slice by slice as they load")
        parser.add_argument("--comm-dtype", choices=["bfloat16", "float16"], default=None,
                            help="send float32 collectives in 16 bits (all-reduces too over MPI)")


def build_parser():
    """The `tfshard` argument parser; each command's `fn` is in tfshard/cli/commands.py."""
    parser = argparse.ArgumentParser(prog="tfshard", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="sharded inference; run under ./horovodrun.sh -np N, "
                       "tfshard launch -n N, or with --replicas N")
    p.add_argument("source", help="a built-in random-weight model (gpt2, gpt2-tiny, llama-tiny, "
                   "bert-tiny), a real one (smollm2, minilm), or a file/folder tfshard.load reads")
    p.add_argument("--input", help=".npy of token ids, .npz of named inputs, or .txt of "
                   "prompts, one per line (sources with a tokenizer)")
    _precision_arguments(p, quantize=True)
    p.add_argument("--prompt", help="text to feed (sources with a tokenizer: smollm2, .gguf)")
    p.add_argument("--output", help="write the global output here (rank 0, atomically)")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tensor-parallel", type=int, default=None)
    _stage_arguments(p)
    p.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="in one process, without a launcher: shard over a MirroredStrategy of N "
                   "logical CPU devices")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", default=0)
    p.add_argument("--no-compare", action="store_true",
                   help="skip the unsharded reference run")
    p.add_argument("--logdir", help="write TensorBoard logs here (plan, graph, per-batch "
                   "latency and collectives; Horovod timeline under horovodrun)")
    p.add_argument("--profile", type=int, nargs="?", const=2, default=0, metavar="N",
                   help="with --logdir: profile the first N batches (default 2)")
    p.set_defaults(fn=commands.cmd_predict)

    p = sub.add_parser("generate", help="sharded text generation; run under ./horovodrun.sh -np "
                       "N, tfshard launch -n N, or with --replicas N")
    p.add_argument("source", help="a model with a tokenizer: smollm2, a .gguf file, or a .keras "
                   "CausalLM saved with its preprocessor")
    _precision_arguments(p, quantize=True)
    p.add_argument("--prompt", action="append", required=True,
                   help="text to continue (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--sampler", default="greedy",
                   help="keras-hub sampler: greedy, top_k, top_p, ... (seeded from rank 0)")
    p.add_argument("--tensor-parallel", type=int, default=None)
    _stage_arguments(p)
    p.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="in one process, without a launcher: shard over a MirroredStrategy of N "
                   "logical CPU devices")
    p.add_argument("--no-compare", action="store_true",
                   help="skip the unsharded reference run")
    p.set_defaults(fn=commands.cmd_generate)

    p = sub.add_parser("inspect", help="print the plan (one process, no launch); --check: "
                       "per-layer drift of the sharded model against the unsharded one")
    p.add_argument("source", help="a built-in model name or a file/folder tfshard.load reads "
                   "(only its shapes are read)")
    _precision_arguments(p, quantize=False)
    p.add_argument("--tensor-parallel", type=int, default=2)
    _stage_arguments(p)
    p.add_argument("--all-ranks", action="store_true")
    p.add_argument("--check", action="store_true",
                   help="run sharded and unsharded side by side and print each layer's drift "
                   "(in one process: --replicas, default --tensor-parallel, MirroredStrategy "
                   "replicas; or under horovodrun / tfshard launch)")
    p.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="in one process, without a launcher: shard over a MirroredStrategy of N "
                   "logical CPU devices")
    p.add_argument("--input", help="with --check: .npy token ids, .npz named inputs, or .txt "
                   "prompts (one per line)")
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=commands.cmd_inspect)

    p = sub.add_parser("serve", help="an OpenAI- and TF-Serving-compatible HTTP server (rank "
                       "0) with continuous batching; run under ./horovodrun.sh -np N")
    p.add_argument("source", help="smollm2, a .gguf, a checkpoint or .keras CausalLM with its "
                   "tokenizer (text endpoints), or any model tfshard.load reads (:predict)")
    _precision_arguments(p, quantize=True)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default loopback: nothing else can reach it)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--name", default=None,
                   help="the model's name in the API (default: the source's file name)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health "
                   "(default: $TFSHARD_API_KEY, else none)")
    p.add_argument("--slots", type=int, default=8,
                   help="KV-cache slots: requests generating at once (continuous batching)")
    p.add_argument("--max-len", type=int, default=2048,
                   help="most positions per request, prompt included (the KV cache holds "
                   "slots x max-len positions of each rank's K/V heads)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="the most max_tokens a request may ask for (default: --max-len)")
    p.add_argument("--max-waiting", type=int, default=64,
                   help="requests queued for a slot before new ones get 429")
    p.add_argument("--prefill-tokens", type=int, default=256,
                   help="most prompt tokens per step (longer prompts go in chunks)")
    p.add_argument("--batching", choices=("auto", "on", "off"), default="auto",
                   help="continuous batching where tfshard's decode step runs the model "
                   "(auto), required (on), or one request at a time (off)")
    p.add_argument("--tensor-parallel", type=int, default=None)
    _stage_arguments(p)
    p.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="in one process, without a launcher: a MirroredStrategy of N logical "
                   "CPU devices")
    p.add_argument("--seed", type=int, default=0, help="built-in models' weight seed")
    p.set_defaults(fn=commands.cmd_serve)

    # Listed for --help; `main` hands `launch` and `bench` their raw arguments.
    sub.add_parser("bench", help="run a benchmark suite (forward, predict, load, comm, "
                   "generate, ...; also scripts/bench.py): sharded vs unsharded in one run",
                   add_help=False)
    sub.add_parser("launch", help="start N local workers of a tf.distribute multi-worker job "
                   "(TF_CONFIG each), rank-prefixed output, all stopped if one fails",
                   add_help=False)
    return parser


def import_tensorflow(*more):
    """Imports TensorFlow and Keras (and the modules `more` names) with the collector
    paused, then freezes what exists, and at exit everything: a command's process starts
    and ends ~1.6 s sooner.

    Their import makes about a million objects that live as long as the process; the
    collector's passes over them while they are made, then again at exit, cost ~0.8 s
    each (2-core EPYC). Frozen objects are never scanned again, which also makes
    Keras's `gc.collect()` per variable a layer drops (`quantize`) cheap. The test suite's
    worker processes start the same way (`import_tensorflow("keras_hub")`).

    Args:
        *more: names of further modules to import in the same pause.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        for name in ("tensorflow", "keras") + more:
            importlib.import_module(name)
    finally:
        if enabled:
            gc.enable()
    gc.freeze()
    atexit.unregister(gc.freeze)  # once, however many times a process calls this
    atexit.register(gc.freeze)


def main(argv=None):
    """Entry point of the `tfshard` console script.

    Returns:
        The process exit code.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["launch"]:
        from tfshard.cli import launch

        return launch.main(argv[1:])
    if argv[:1] == ["bench"]:
        from tfshard.cli import bench

        return bench.main(argv[1:], prog="tfshard bench")
    args = build_parser().parse_args(argv)
    import_tensorflow()
    try:
        return args.fn(args)
    except ValueError as e:
        print(f"tfshard: error: {e}", file=sys.stderr)
        return 2
