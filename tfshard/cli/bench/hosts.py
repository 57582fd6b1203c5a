"""Suite `hosts`: collectives and bytes between two hosts (network namespaces; needs root).

The two hosts are network namespaces joined by veth links and a bridge (see
tests/hosts.py).

1. Per-collective latency inside one host (2 ranks through shared memory) against
   across two hosts (1 rank each, MPI's TCP transport over the veth link): the `comm`
   suite's chains, run from host 0 under ./horovodrun.sh.
2. Bytes that crossed between the hosts per `predict` (the kernel's counters of each
   host's link, transmit side summed over the hosts, so TCP/IP and MPI headers
   included) against the host-level minimum the plan predicts
   (`Layout.crossing_bytes`), at 2 hosts x 2 ranks for the default layout
   (tensor-parallel groups inside a host, data parallelism across) and for one
   tensor-parallel group over all 4 ranks.

    .venv/bin/python scripts/bench.py hosts --model gpt2 --rows 8 --seq-len 64

Needs root (network namespaces).
"""

import json
import os
import statistics
import sys
import time

from tfshard.cli.bench import common


def _link_bytes(iface):
    """Bytes this host has sent on `iface` so far (None when it has no such link)."""
    try:
        with open(f"/sys/class/net/{iface}/statistics/tx_bytes") as f:
            return int(f.read())
    except OSError:
        return None


def hosts_child(args):
    """One layout's predicts at 2 hosts x N ranks; rank 0 prints the RESULT line."""
    import numpy as np

    import tfshard
    from tfshard import models

    world = tfshard.init()
    model, vocab, names = models.build(args.model, seed=0)
    ids = np.random.default_rng(1).integers(0, vocab, (args.rows, args.seq_len)).astype("int32")
    x = {n: (ids if n == "token_ids" else np.ones_like(ids) if n == "padding_mask"
             else np.zeros_like(ids)) for n in names}
    sharded = tfshard.shard(model, tensor_parallel=args.tp or None)
    out = sharded.predict(x, batch_size=args.batch_size, verbose=0)  # trace + warm up
    hosts = world.comm.hosts()
    iface = os.environ.get("FI_TCP_IFACE", "tfs0")
    reads = hosts.index(hosts[world.rank]) == world.rank  # the first rank of each host
    world.comm.barrier()
    before = _link_bytes(iface) if reads else None
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = sharded.predict(x, batch_size=args.batch_size, verbose=0)
        times.append(time.perf_counter() - t0)
    world.comm.barrier()
    after = _link_bytes(iface) if reads else None
    sent = world.comm.allgather_object(
        None if before is None or after is None else after - before)
    plan = sharded.plan
    out = np.asarray(out["logits"] if isinstance(out, dict) else out)
    predicted = plan.layout.crossing_bytes(plan.communication(), args.rows * args.seq_len,
                                           plan.wire_itemsizes(), out.nbytes)
    if world.rank == 0:
        measured = sum(s for s in sent if s is not None) / args.repeats
        print("RESULT " + json.dumps({
            "seconds": statistics.median(times), "tensor_parallel": sharded.tensor_parallel,
            "groups": sharded.groups, "hosts": sorted(set(hosts), key=hosts.index),
            "crossed_bytes_per_predict": measured, "predicted_minimum": predicted,
            "ratio": measured / predicted["total"] if predicted["total"] else None,
            "layout": plan.layout.lines(), "output_bytes": out.nbytes}), flush=True)


def suite_hosts(args):
    """Runs both parts in two fresh namespace hosts; prints the tables."""
    sys.path.insert(0, str(common.ROOT / "tests"))
    import hosts as hosts_lib

    reason = hosts_lib.unavailable()
    if reason:
        raise SystemExit(f"bench.py hosts: cannot make hosts here: {reason}")
    me = list(common.CHILD)
    comm = me + ["_comm", "--mode", "sharded", "--hidden", str(args.hidden), "--rows",
                 str(args.rows), "--seq-len", str(args.seq_len), "--chain", str(args.chain),
                 "--repeats", str(args.repeats)]
    child = me + ["_hosts", "--model", args.model, "--rows", str(args.rows), "--seq-len",
                  str(args.seq_len), "--batch-size", str(args.batch_size), "--repeats",
                  str(args.repeats)]
    runs = {}
    with hosts_lib.Hosts(2) as hosts:
        a, b = hosts.addresses
        env = hosts.env()

        def job(n, hostlist, argv):
            return common.run(hosts.command(0, [common.ROOT / "horovodrun.sh", "-np", n, "-H",
                                                hostlist, *argv]), args.timeout, env=env)

        runs["latency inside one host"] = job(2, f"{a}:2", comm)
        runs["latency across hosts"] = job(2, f"{a}:1,{b}:1", comm)
        for label, tp in (("TP=2 in hosts, DP=2 across", 0), ("TP=4 across hosts", 4)):
            runs[label] = job(4, f"{a}:2,{b}:2", child + ["--tp", str(tp)])
    inside, across = runs["latency inside one host"], runs["latency across hosts"]
    print(f"\nhosts: per-collective latency, 2 ranks, float32, median of {args.repeats} chains "
          f"of {args.chain}; {common.cpu_model()}")
    print(f"{'collective':<58} {'inside (us)':>12} {'across (us)':>12} {'across/inside':>14}")
    for name, cell in inside["collectives"].items():
        far = across["collectives"].get(name)
        if far:
            print(f"{name:<58} {1e3 * cell['ms']:>12.1f} {1e3 * far['ms']:>12.1f} "
                  f"{far['ms'] / cell['ms']:>13.1f}x")
    print(f"\nhosts: bytes between the hosts per predict ({args.model}, {args.rows} rows x "
          f"{args.seq_len} tokens, 2 hosts x 2 ranks, MPI)")
    print(f"{'layout':<30} {'s/predict':>10} {'crossed (MiB)':>14} {'plan minimum (MiB)':>19} "
          f"{'crossed/minimum':>16}")
    for label in ("TP=2 in hosts, DP=2 across", "TP=4 across hosts"):
        r = runs[label]
        minimum = r["predicted_minimum"]["total"]
        print(f"{label:<30} {r['seconds']:>10.3f} {r['crossed_bytes_per_predict'] / 2**20:>14.2f} "
              f"{minimum / 2**20:>19.2f} {r['ratio'] or 0:>15.2f}x")
    common.write_report("hosts", args, runs)


def add_parsers(sub):
    """Adds the suite `hosts` and its measuring job `_hosts` to the benchmarks' subcommands."""
    commands = {"hosts": suite_hosts, "_hosts": hosts_child}
    for name, p in common.add_commands(sub, commands).items():
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
