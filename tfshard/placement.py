"""Which cores each rank on a host runs on: disjoint blocks, a NUMA node's cores together.

Every CPU tensor-parallel engine runs one rank per set of cores (vLLM's CPU backend binds
each worker's OpenMP threads; llama.cpp's RPC servers are started one per NUMA node):
ranks that share cores take turns at every collective, and a rank whose threads wander
across NUMA nodes reads its weights over the interconnect. `plan` splits the cores this
process may run on (its affinity mask, so `taskset` and container limits hold) into one
contiguous block per rank on the host, in NUMA-node order, so with as many ranks as nodes
each rank gets one node; `pin` applies this rank's block to every thread of the process.
TFSHARD_PIN=0 turns pinning off.
"""

import dataclasses
import os

ENV = "TFSHARD_PIN"
NODE_ROOT = "/sys/devices/system/node"


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where this rank runs.

    Attributes:
        local_rank: this rank's index among the ranks on its host.
        local_size: how many ranks run on this host.
        cores: the cores this rank is pinned to (empty when it is not pinned).
        nodes: the NUMA nodes those cores are on.
        threads: the size of this rank's intra-op thread pool.
        why_not: why it is not pinned ("" when it is).
    """

    local_rank: int
    local_size: int
    cores: tuple
    nodes: tuple
    threads: int
    why_not: str = ""

    def line(self):
        """One line for the plan summary."""
        where = (f"cores {format_cpulist(self.cores)}"
                 + (f" (NUMA node {format_cpulist(self.nodes)})" if self.nodes else "")
                 if self.cores else f"not pinned: {self.why_not}")
        return (f"Placement: local rank {self.local_rank} of {self.local_size} on this host, "
                f"{where}, {self.threads} intra-op thread(s)")


def parse_cpulist(text):
    """Linux's cpu list ("0-3,8,10-11") as a sorted list of ints."""
    cores = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cores.update(range(int(lo), int(hi or lo) + 1))
    return sorted(cores)


def format_cpulist(cores):
    """The inverse of `parse_cpulist`: [0, 1, 2, 3, 8] -> "0-3,8"."""
    cores, parts = sorted(cores), []
    i = 0
    while i < len(cores):
        j = i
        while j + 1 < len(cores) and cores[j + 1] == cores[j] + 1:
            j += 1
        parts.append(str(cores[i]) if i == j else f"{cores[i]}-{cores[j]}")
        i = j + 1
    return ",".join(parts)


def numa_nodes(root=NODE_ROOT):
    """`{node: [cores]}` from sysfs; `{}` where the kernel does not say."""
    nodes = {}
    try:
        names = os.listdir(root)
    except OSError:
        return nodes
    for name in names:
        if name.startswith("node") and name[4:].isdigit():
            try:
                with open(os.path.join(root, name, "cpulist")) as f:
                    nodes[int(name[4:])] = parse_cpulist(f.read())
            except OSError:
                continue
    return nodes


def blocks(available, local_size, nodes=None):
    """Each local rank's cores: `local_size` disjoint, contiguous blocks of `available`.

    Args:
        available: the cores this process may run on.
        local_size: how many ranks share them.
        nodes: `{node: [cores]}`; the cores are ordered by node first, so blocks stay
            inside a node whenever the counts allow.

    Returns:
        A list of `local_size` tuples (the first `len(available) % local_size` blocks one
        core larger), or None when there are fewer cores than ranks.
    """
    if local_size < 1 or len(available) < local_size:
        return None
    node_of = {c: n for n, cs in (nodes or {}).items() for c in cs}
    order = sorted(available, key=lambda c: (node_of.get(c, -1), c))
    per, extra = divmod(len(order), local_size)
    out, start = [], 0
    for r in range(local_size):
        size = per + (1 if r < extra else 0)
        out.append(tuple(order[start:start + size]))
        start += size
    return out


# Each launcher's names for (the ranks on this host, this rank's index among them):
# tfshard's own (set by hand), MPICH's Hydra, Open MPI, horovodrun.
LAUNCHER_KEYS = (("TFSHARD_LOCAL_SIZE", "TFSHARD_LOCAL_RANK"),
                 ("MPI_LOCALNRANKS", "MPI_LOCALRANKID"),
                 ("OMPI_COMM_WORLD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
                 ("HOROVOD_LOCAL_SIZE", "HOROVOD_LOCAL_RANK"))


def _env_int(env, key, what):
    """`env[key]` as an int; a ValueError naming the variable and what works otherwise."""
    raw = env[key]
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{key}={raw!r}: expected {what}, a whole number such as 2 "
                         "(or unset it)") from None


def local_size(environ=None):
    """How many ranks of this job run on this host, from the launcher's environment
    (`LAUNCHER_KEYS`, the first set); 1 otherwise."""
    env = os.environ if environ is None else environ
    for key, _ in LAUNCHER_KEYS:
        if env.get(key):
            return max(1, _env_int(env, key, "the number of ranks on this host"))
    return 1


def local_rank(environ=None):
    """This rank's index on its host, from the launcher's environment (`LAUNCHER_KEYS`,
    the first set), or None."""
    env = os.environ if environ is None else environ
    for _, key in LAUNCHER_KEYS:
        if env.get(key, "").isdigit():
            return int(env[key])
    return None


def plan(rank, local_size, available=None, nodes=None, environ=None):
    """This rank's `Placement` (nothing is applied).

    Args:
        rank: this rank's index on its host (None: unknown).
        local_size: how many ranks run on this host.
        available: the cores this process may use (default: its affinity mask).
        nodes: `{node: [cores]}` (default: sysfs).
        environ: the environment (default: os.environ), for TFSHARD_PIN and
            TFSHARD_THREADS.
    """
    env = os.environ if environ is None else environ
    available = sorted(os.sched_getaffinity(0) if available is None else available)
    nodes = numa_nodes() if nodes is None else nodes
    threads_env = _env_int(env, "TFSHARD_THREADS", "threads per rank") \
        if env.get("TFSHARD_THREADS") else 0
    shared = max(1, len(available) // max(1, local_size))
    unpinned = dict(local_rank=rank if rank is not None else 0, local_size=local_size,
                    cores=(), nodes=(), threads=threads_env or shared)
    if env.get(ENV, "1") == "0":
        return Placement(**unpinned, why_not=f"{ENV}=0")
    if local_size <= 1:
        return Placement(**unpinned, why_not="one rank on this host")
    if rank is None or not 0 <= rank < local_size:
        return Placement(**unpinned, why_not="the launcher does not say this rank's index "
                         "on its host (set TFSHARD_LOCAL_RANK)")
    split = blocks(available, local_size, nodes)
    if split is None:
        return Placement(**unpinned, why_not=f"{local_size} ranks share {len(available)} "
                         "core(s): each would not get one of its own")
    mine = split[rank]
    on = sorted({n for n, cs in nodes.items() for c in mine if c in cs})
    return Placement(local_rank=rank, local_size=local_size, cores=mine, nodes=tuple(on),
                     threads=threads_env or len(mine))


def pin(placement):
    """Applies `placement` to every thread of this process (threads started later
    inherit it). Returns the placement, or an unpinned copy saying why when the
    kernel refused."""
    if not placement.cores:
        return placement
    cores = set(placement.cores)
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    try:
        for tid in tids:
            try:
                os.sched_setaffinity(tid, cores)
            except ProcessLookupError:
                continue  # the thread ended meanwhile
    except OSError as e:
        return dataclasses.replace(placement, cores=(), nodes=(),
                                   why_not=f"sched_setaffinity failed: {e}")
    return placement
