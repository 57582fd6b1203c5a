"""What the benchmark suites share: running measuring jobs, launching them on a backend, reports.

A suite (one module of tfshard/cli/bench/ each) runs measuring jobs in child
processes, `CHILD` + a hidden `_SUITE` command, under ./horovodrun.sh, `tfshard
launch` or as one process of MirroredStrategy replicas (`launch`), reads each
job's `RESULT` line (`run`) and writes its table to bench-results/ (`write_report`).
The jobs run from the repository root, where ./horovodrun.sh and bench-results/ are.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

#: The repository: ./horovodrun.sh, bench-results/ and docs/images/ are there.
ROOT = Path(__file__).resolve().parents[3]

#: The argv that runs a suite's measuring job: `CHILD + ["_child", ...]`.
CHILD = (sys.executable, "-m", "tfshard.cli.bench")

BACKENDS = ("mpi", "horovod-mpi", "gloo", "mirrored", "multiworker")


#: Environment per backend run under ./horovodrun.sh.
BACKEND_ENV = {"mpi": {}, "horovod-mpi": {"TFSHARD_BACKEND": "horovod"}, "gloo": {}}


def run(cmd, timeout, env=None):
    """Runs one measuring job from the repository root and returns its `RESULT` (JSON).

    Raises:
        RuntimeError: the job printed no RESULT line (its output's end is in the message).
    """
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})})
    for line in proc.stdout.splitlines():
        if "RESULT " in line:
            # mpiexec may glue another rank's output after it: read one JSON value.
            return json.JSONDecoder().raw_decode(line.split("RESULT ", 1)[1])[0]
    raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
                       f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def launch(backend, n, child):
    """The command running `child` (a `CHILD + [_SUITE, ...]` argv) on n ranks of `backend`.

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


def write_report(stem, args, runs):
    """Writes bench-results/STEM-TIMESTAMP.json with the arguments and the runs."""
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    path = out / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"args": arguments(args), "runs": runs}, indent=1, default=str))
    os.replace(tmp, path)
    print(f"wrote {path.relative_to(ROOT)}")


def cpu_model():
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


def mirrored_strategy(args):
    """With `--mode mirrored`: a MirroredStrategy over `--replicas` logical CPUs, else None.

    Must run before the child creates any tensor (see `tfshard.cpu_devices`).
    """
    if getattr(args, "mode", None) != "mirrored":
        return None
    import tensorflow as tf

    import tfshard

    return tf.distribute.MirroredStrategy(tfshard.cpu_devices(args.replicas))


def rss_mib():
    """This process's resident memory now, MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def hwm_mib():
    """This process's peak resident memory (VmHWM), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def open_source(source, world, dtype=None, quantize=None, strategy=None):
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


def add_commands(sub, commands, **kwargs):
    """Adds a subcommand for each of `commands` to the parser's `sub`, with `fn` set.

    Args:
        sub: the benchmarks' subparsers.
        commands: `{name: the function the subcommand runs}`, in the order they are listed.
        **kwargs: for each `add_parser` (e.g. `help`).

    Returns:
        `{name: its parser}`, for the arguments.
    """
    parsers = {}
    for name, fn in commands.items():
        parsers[name] = sub.add_parser(name, **kwargs)
        parsers[name].set_defaults(fn=fn)
    return parsers


def arguments(args):
    """A suite's parsed arguments as recorded in its report (the dispatch function left out)."""
    return {k: v for k, v in vars(args).items() if k != "fn"}
