"""MPI communicator: tfshard's hot path, with no negotiation and a deadline on every wait.

The collectives are TensorFlow ops of tfshard's own (`mpi_ops.cc`, built by set-up
into `_mpi_ops.so`) that call MPI directly: each starts a non-blocking MPI
collective on this communicator and polls it on the calling thread, so a
collective costs what MPI costs (about 10-20 us for a small all-reduce between
two processes of one host) instead of Horovod's negotiation cycle (1-6 ms). The
ops are stateful: inside a `tf.function` they run in program order, the same on
every rank, which is all that tensor-parallel inference needs.

mpi4py initialises MPI (thread level MULTIPLE, since TensorFlow runs ops on its
own threads), duplicates the communicators the ops use (so nothing they send can
match a message of the user's or Horovod's), and sets up the shared-memory board
on which each rank of a host notes the collective it is in; a timed-out
collective reads it to say which rank is missing and where it was last seen.
"""

import atexit
import ctypes
import os
import sys

import numpy as np
import tensorflow as tf

from tfshard.comm.base import (Communicator, built_from, collective_timeout, env_number,
                               gather_on_axis, host_key, host_major, normalize_axis)

LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_mpi_ops.so")
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mpi_ops.cc")

#: Default deadline (seconds) of one collective; TFSHARD_COLLECTIVE_TIMEOUT_SECONDS overrides.
DEFAULT_TIMEOUT = 30.0

_SLOT_BYTES = 128
_state = {}  # the loaded op library, the ctypes handle, the board window


def _library():
    """Loads the op library once; a clear error when set-up has not built it."""
    if "ops" not in _state:
        if not os.path.exists(LIBRARY):
            raise RuntimeError(
                f"tfshard's MPI ops are not built ({LIBRARY} is missing). Run "
                "./scripts/setup.sh (or scripts/build_mpi_ops.sh) from the repository, or "
                "launch with ./horovodrun.sh, which runs it.")
        if not built_from(LIBRARY, SOURCE):
            raise RuntimeError(
                f"{LIBRARY} was not built from this {SOURCE} (its recorded sha256 differs); "
                "rebuild it with scripts/build_mpi_ops.sh (./scripts/setup.sh does).")
        _state["ops"] = tf.load_op_library(LIBRARY)
        lib = ctypes.CDLL(LIBRARY)
        lib.tfshard_mpi_set_board.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                              ctypes.c_int]
        lib.tfshard_mpi_broken.restype = ctypes.c_int
        lib.tfshard_mpi_set_spin.argtypes = [ctypes.c_longlong]
        lib.tfshard_mpi_on_term.argtypes = [ctypes.c_char_p]
        lib.tfshard_mpi_wait_ns.restype = ctypes.c_longlong
        _state["c"] = lib
    return _state["ops"]


def _mpi():
    """mpi4py's MPI module, initialised at thread level MULTIPLE."""
    import mpi4py

    mpi4py.rc.thread_level = "multiple"
    from mpi4py import MPI

    if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
        raise RuntimeError(
            "MPI was initialised without MPI_THREAD_MULTIPLE (level "
            f"{MPI.Query_thread()}); TensorFlow calls MPI from its own threads. Initialise "
            "MPI through tfshard.init() or mpi4py's default, not MPI_Init.")
    return MPI


def spin_microseconds(local_ranks, cores, threads_per_rank=1):
    """How long a waiting rank spins before it sleeps (TFSHARD_MPI_SPIN_US overrides).

    1000 us when every rank of this host has its cores (spinning costs nothing
    and saves a wake-up per collective); 20 us when ranks and their threads
    outnumber the cores, where a spinning rank takes the core the slowest rank
    needs (3 ranks on 2 cores decoded 8.5x slower with spinning).
    """
    forced = env_number("TFSHARD_MPI_SPIN_US", None, "microseconds", allow_zero=True)
    if forced is not None:
        return forced
    return 1000.0 if local_ranks * max(1, threads_per_rank) <= cores else 20.0


def _setup_board(MPI):
    """Creates this host's board (a shared window over the ranks of this host)."""
    if "window" in _state:
        return
    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    # Rank 0 of the host allocates every slot; the others map its segment.
    window = MPI.Win.Allocate_shared(_SLOT_BYTES * node.size if node.rank == 0 else 0, 1,
                                     comm=node)
    buf, _ = window.Shared_query(0)
    base = np.frombuffer(buf, dtype=np.uint8, count=_SLOT_BYTES * node.size)
    address = base.ctypes.data
    _library()
    size = _state["c"].tfshard_mpi_set_board(ctypes.c_void_p(address), node.size, node.rank,
                                              world.rank)
    assert size == _SLOT_BYTES, size
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    # 0 means TensorFlow's default: a pool as large as the machine, shared by the ranks.
    threads = tf.config.threading.get_intra_op_parallelism_threads() or max(1, cores // node.size)
    spin = spin_microseconds(node.size, cores, threads)
    _state["c"].tfshard_mpi_set_spin(int(spin * 1000))
    node.Barrier()  # every slot is initialised before anyone reads the board
    _state.update(window=window, node=node, board=base)
    # mpiexec stops a job with SIGTERM (e.g. after a host was lost): say who stopped, and why.
    _state["c"].tfshard_mpi_on_term(
        f"[tfshard] MPI rank {world.rank} of {world.size} (host {host_key()}, pid "
        f"{os.getpid()}): stopped by the launcher (SIGTERM) before the job finished: another "
        "rank or host of the job failed (the launcher's message names it), or the job was "
        "interrupted.\n".encode())
    atexit.register(_exit_hook)


def _exit_hook():
    """Runs before mpi4py's MPI_Finalize.

    After a failed collective, leaves at once with status 1 (MPI_Finalize would
    wait for the peers). Otherwise frees the board window and the communicators,
    which MPI_Finalize expects to be gone (the OFI transport refuses to close
    while they are open).
    """
    lib = _state.get("c")
    if lib is not None and lib.tfshard_mpi_broken():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    for comm in reversed(_state.pop("comms", [])):
        comm.Free()
    window = _state.pop("window", None)
    if window is not None:
        window.Free()
        _state.pop("node").Free()


class MPICommunicator(Communicator):
    """All MPI ranks (or a sub-group) as a communicator, through tfshard's MPI ops.

    Args:
        comm: an `mpi4py.MPI.Comm` to duplicate; when None, `MPI.COMM_WORLD` with its
            ranks in host-major order (each host's ranks consecutive, so groups of
            consecutive ranks stay inside a host: MPICH places ranks that way by
            default, a round-robin or hand-written host list may not).
        group: an id every member agrees on (0 for the world), shown in errors.
        timeout: seconds a collective may wait; TFSHARD_COLLECTIVE_TIMEOUT_SECONDS
            or 30 when None.
    """

    backend = "mpi"

    def __init__(self, comm=None, group=0, timeout=None):
        MPI = _mpi()
        self._ops = _library()
        _setup_board(MPI)
        base, hosts = comm, None
        if comm is None:
            base = MPI.COMM_WORLD
            if base.Get_size() > 1:
                hosts = base.allgather(host_key())
                order = host_major(hosts)
                if order != list(range(len(hosts))):
                    base = base.Split(0, order.index(base.Get_rank()))
                    _state.setdefault("comms", []).append(base)
                hosts = [hosts[r] for r in order]
        self._comm = base.Dup()
        if hosts is not None:
            self.__dict__["_hosts"] = hosts
        # Errors come back to the op as codes (then a named error), never abort the job.
        self._comm.Set_errhandler(MPI.ERRORS_RETURN)
        _state.setdefault("comms", []).append(self._comm)
        self._handle = int(self._comm.py2f())
        self._group = int(group)
        self._timeout = float(collective_timeout(DEFAULT_TIMEOUT) if timeout is None else timeout)
        self._rank = self._comm.Get_rank()
        self._size = self._comm.Get_size()
        self._subgroups = {}

    @property
    def timeout(self):
        """Seconds one collective may wait before it fails."""
        return self._timeout

    def _attrs(self, name):
        return dict(comm=self._handle, group=self._group, timeout=self._timeout,
                    what=name or "")

    def allreduce_sum(self, x, name=None):
        x = tf.convert_to_tensor(x)
        if x.dtype == tf.bool:
            raise ValueError(f"allreduce_sum of a bool tensor {x.shape}: cast to an int first.")
        return self._ops.tfshard_mpi_allreduce(x, **self._attrs(name))

    sends_16bit_sums = True

    def allreduce_sum_16bit(self, x, name=None):
        x = tf.convert_to_tensor(x)
        if x.dtype not in (tf.bfloat16, tf.float16):
            raise ValueError(f"allreduce_sum_16bit of a {x.dtype.name} tensor {x.shape}: it "
                             "takes bfloat16 or float16; cast first, or use allreduce_sum.")
        return self._ops.tfshard_mpi_allreduce(x, wire16=True, **self._attrs(name))

    def allgather(self, x, axis=0, name=None, sizes=None):
        x = tf.convert_to_tensor(x)
        axis = normalize_axis(axis, x.shape.rank)

        def gather(v, part=None, lengths=None):
            label = name if part is None or name is None else f"{name}_{part}"
            return self._ops.tfshard_mpi_allgather(v, sizes=list(lengths or []),
                                                    **self._attrs(label))

        if axis == 0:
            return gather(x, lengths=[int(s) for s in sizes] if sizes is not None else None)
        if sizes is not None:
            # Flat rows of known lengths: a static output shape, no length exchange.
            inner = int(np.prod(x.shape.as_list()[:axis] + x.shape.as_list()[axis + 1:])) \
                if x.shape.is_fully_defined() else None
            if inner is not None:
                flat = [int(s) * inner for s in sizes]
                return gather_on_axis(x, axis, sizes, self._size,
                                      lambda v, part: gather(v, part, flat if part is None
                                                             else None))
        return gather_on_axis(x, axis, sizes, self._size, gather)

    def abort(self, code=1):
        """Ends the whole MPI job now (MPI_Abort: the launcher stops every rank, a stopped
        one included), after flushing this rank's output."""
        sys.stdout.flush()
        sys.stderr.flush()
        _mpi().COMM_WORLD.Abort(int(code))

    def collective_seconds(self):
        """Seconds this process has spent waiting for tfshard's MPI collectives to
        complete (every group's, every thread's)."""
        _library()
        return _state["c"].tfshard_mpi_wait_ns() / 1e9

    def broadcast(self, x, root=0, name=None):
        if not 0 <= root < self._size:
            raise ValueError(f"broadcast root {root} is not a rank of this group of "
                             f"{self._size}.")
        return self._ops.tfshard_mpi_broadcast(tf.convert_to_tensor(x), root=int(root),
                                               **self._attrs(name))

    def barrier(self):
        self.allreduce_sum(tf.zeros([1], tf.int32), name="barrier")

    def send(self, x, dest, tag=0, name=None, header=False):
        """Sends `x` to rank `dest` of this group (point to point, for pipeline stages).

        Args:
            x: the tensor.
            dest: the receiving rank.
            tag: matches the receiver's `tag`.
            name: optional op name (shown in errors).
            header: send `x`'s shape first, for a receiver that does not know
                every dim (`recv` with None dims and `header=True`).

        Returns:
            The op (eagerly, None once sent).
        """
        return self._ops.tfshard_mpi_send(tf.convert_to_tensor(x), peer=int(dest), tag=int(tag),
                                          header=bool(header), **self._attrs(name))

    def recv(self, shape, dtype, source, tag=0, name=None, header=False):
        """Receives a tensor of `shape` and `dtype` sent by rank `source` of this group.

        Args:
            shape: the tensor's shape; None dims are taken from the sender's
                header (then `header=True`, as the sender's).
            dtype: its dtype.
            source: the sending rank.
            tag: matches the sender's `tag`.
            name: optional op name (shown in errors).
            header: the sender sends the shape first (see `send`).

        Returns:
            The tensor.

        Raises:
            tf.errors.InvalidArgumentError: the sender's shape or dtype differs.
            tf.errors.DeadlineExceededError: nothing came within the deadline.
        """
        shape = tf.TensorShape([None if d is None else int(d) for d in shape])
        return self._ops.tfshard_mpi_recv(shape=shape, dtype=tf.as_dtype(dtype),
                                          peer=int(source), tag=int(tag), header=bool(header),
                                          **self._attrs(name))

    def gather_to_root(self, array):
        array = np.ascontiguousarray(array)
        # Row counts first (a deadline-guarded op), then MPI's Gatherv: only rank 0 holds
        # the whole result. The lengths exchange keeps a missing rank from hanging here.
        lengths = self.allgather_numpy(np.array(array.shape[0], np.int64))
        row = array[0].nbytes if array.shape[0] else int(np.prod(array.shape[1:])) * \
            array.itemsize
        counts = [int(n) * row for n in lengths]
        send = array.view(np.uint8).reshape(-1)
        out = None
        if self._rank == 0:
            out = np.empty((int(sum(lengths)),) + array.shape[1:], array.dtype)
            request = self._comm.Igatherv(send, [out.view(np.uint8).reshape(-1), counts], root=0)
        else:
            request = self._comm.Igatherv(send, None, root=0)
        self._wait(request, f"gather to rank 0 of {array.shape} {array.dtype}")
        return out

    def _wait(self, request, what):
        """Waits for an mpi4py request under the collective deadline.

        Only for transfers that start after a collective op has brought every
        rank together: it polls and yields rather than sleeps, since MPI moves a
        large message only while the ranks poll.
        """
        import time

        deadline = time.monotonic() + self._timeout
        while not request.Test():
            os.sched_yield()
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"tfshard MPI {what} (group {self._group}) did not complete within "
                    f"{self._timeout:g} s on rank {self._rank} of {self._size}: a rank is dead, "
                    "stopped or busy elsewhere. Set TFSHARD_COLLECTIVE_TIMEOUT_SECONDS if a "
                    "rank legitimately needs longer.")

    def _split(self, group_size):
        if group_size not in self._subgroups:
            color = self._rank // group_size
            sub = self._comm.Split(color, self._rank)
            group = self._group * 1000 + group_size * 100 + color + 1
            self._subgroups[group_size] = MPICommunicator(sub, group=group,
                                                          timeout=self._timeout)
            sub.Free()
        return self._subgroups[group_size]

    def __repr__(self):
        return f"<MPICommunicator rank={self._rank} size={self._size} group={self._group}>"
