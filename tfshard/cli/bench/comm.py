"""Suite `comm`: the cost of one collective on each backend.

A chain of `--chain` all-reduces (or all-gathers) in one `tf.function` (inside
`strategy.run` for tf.distribute), timed per collective, for a small [1, H]
tensor and a [B*S, H] activation; over MPI, mpi4py through tf.numpy_function
is timed beside tfshard's own op.
"""

import json
import statistics
import time

from tfshard.cli.bench import common


def comm_child(args):
    """Times collectives on this backend: a chain of K in one tf.function, per collective."""
    import numpy as np

    import tensorflow as tf

    import tfshard
    from tfshard import comm as comm_lib

    strategy = common.mirrored_strategy(args)

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
    me = [*common.CHILD, "_comm", "--mode", "sharded",
          "--hidden", str(args.hidden), "--rows", str(args.rows), "--seq-len", str(args.seq_len),
          "--chain", str(args.chain), "--repeats", str(args.repeats)]
    runs = {}
    for n in args.np:
        for backend in args.backends:
            runs[f"{backend} {n}"] = common.run(common.launch(backend, n, me), args.timeout,
                                          env=common.BACKEND_ENV.get(backend))
    print(f"\ncomm: us per collective (median of {args.repeats} chains of {args.chain} inside "
          f"one tf.function), float32, {common.cpu_model()}")
    names = sorted({n for r in runs.values() for n in r["collectives"]},
                   key=lambda n: (n.split(" ")[0] != "allreduce_sum", "small" not in n, n))
    print(f"{'collective':<58}" + "".join(f" {label:>14}" for label in runs))
    for n in names:
        cells = [r["collectives"].get(n) for r in runs.values()]
        print(f"{n:<58}" + "".join(f" {1e3 * c['ms']:>14.1f}" if c else f" {'-':>14}"
                                    for c in cells))
    common.write_report("comm", args, runs)


def add_parsers(sub):
    """Adds the suite `comm` and its measuring job `_comm` to the benchmarks' subcommands."""
    commands = {"comm": suite_comm, "_comm": comm_child}
    for name, p in common.add_commands(sub, commands).items():
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
