"""The communicator interface every backend implements.

Collectives are named by their math, as in Megatron: `allreduce_sum` is the
reduction a row-parallel layer needs after its partial matmul, `allgather` the
concatenation a column-parallel layer needs when the next consumer wants the
whole output.
"""

import abc
import contextlib
import json
import os

import numpy as np


class Communicator(abc.ABC):
    """A group of ranks that run the same sharded computation.

    All methods taking tensors must work eagerly and inside `tf.function`.
    Every rank must call the same collectives in the same order with tensors
    of the same dtype (and, except on the gather axis, the same shape).
    """

    #: Short backend name, e.g. "horovod", "local".
    backend = "abstract"

    @property
    def rank(self):
        """This process's rank within the group (0-based); backends set `_rank`."""
        return self._rank

    @property
    def size(self):
        """Number of ranks in the group; backends set `_size`."""
        return self._size

    @abc.abstractmethod
    def allreduce_sum(self, x, name=None):
        """Element-wise sum of `x` over all ranks.

        Args:
            x: a tensor, same shape and dtype on every rank.
            name: optional op name (must be identical on all ranks).

        Returns:
            The sum, on every rank.
        """

    #: Whether `allreduce_sum_16bit` sends 16 bits per element (else it widens to float32).
    sends_16bit_sums = False

    def allreduce_sum_16bit(self, x, name=None):
        """Element-wise sum of a bfloat16 or float16 `x`, sent in 16 bits where the backend can.

        Each step of the reduction adds two partials in float32 and rounds the sum to
        `x`'s dtype, so with two ranks the result equals `allreduce_sum`'s (summed in
        float32, rounded once) and with more it is rounded once per step. Backends
        without such a reduction (`sends_16bit_sums` False) run `allreduce_sum`.

        Args:
            x: a bfloat16 or float16 tensor, same shape on every rank.
            name: optional op name (must be identical on all ranks).

        Returns:
            The sum, in `x`'s dtype, on every rank.
        """
        return self.allreduce_sum(x, name=name)

    @abc.abstractmethod
    def allgather(self, x, axis=0, name=None, sizes=None):
        """Concatenates every rank's `x` along `axis`, in rank order.

        Sizes along `axis` may differ per rank; every other dimension must
        agree.

        Args:
            x: a tensor.
            axis: the axis to concatenate on (negative values count from the end).
            name: optional op name (must be identical on all ranks).
            sizes: optional, every rank's length along `axis` (in rank order)
                when the caller knows them, as a sharded layer does from its
                ranges; saves exchanging them and gives a static output shape.

        Returns:
            The concatenation, on every rank.
        """

    @abc.abstractmethod
    def broadcast(self, x, root=0, name=None):
        """Returns rank `root`'s `x` on every rank."""

    @abc.abstractmethod
    def barrier(self):
        """Blocks until every rank has reached this point."""

    def allgather_numpy(self, array):
        """Gathers a small numpy array from every rank (eager, host side).

        Args:
            array: a numpy array with the same shape and dtype on every rank.

        Returns:
            A numpy array of shape `(size,) + array.shape`, row `r` from rank `r`.
        """
        import tensorflow as tf

        array = np.asarray(array)
        gathered = self.allgather(tf.constant(array[None]), axis=0)
        return np.asarray(gathered)

    def allgather_object(self, obj):
        """Gathers one JSON-able object from every rank (eager, host side).

        Returns:
            A list with rank `r`'s object at index `r`.
        """
        if self.size == 1:
            return [obj]
        blob = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)
        lengths = self.allgather_numpy(np.array(len(blob), np.int64))
        import tensorflow as tf

        data = np.asarray(self.allgather(tf.constant(blob), axis=0)).tobytes()
        out, start = [], 0
        for n in lengths:
            out.append(json.loads(data[start:start + int(n)].decode()))
            start += int(n)
        return out

    def hosts(self):
        """The host of every rank of this group (`host_key()` of each), gathered once.

        Every rank must call it at the same point the first time (it is a
        collective then); later calls return the recorded list.

        Returns:
            A list with rank `r`'s host at index `r`.
        """
        known = self.__dict__.get("_hosts")
        if known is None:
            known = list(self.allgather_object(host_key()))
            self.__dict__["_hosts"] = known
        return list(known)

    def gather_to_root(self, array):
        """Concatenates every rank's rows (axis 0) on rank 0 only (eager).

        Returns:
            The concatenation on rank 0, None elsewhere. The default all-gathers
            and drops the result off rank 0; backends override it to save memory.
        """
        import tensorflow as tf

        out = np.asarray(self.allgather(tf.constant(array), axis=0))
        return out if self.rank == 0 else None

    def abort(self, code=1):
        """Ends this rank at once with `code` after flushing its output; backends whose
        launcher could leave the other ranks running (MPI) end the whole job."""
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(code))

    def collective_seconds(self):
        """Seconds this process has spent waiting in collectives, where the backend
        counts them (tfshard's MPI ops do), else None."""
        return None

    def section(self, what):
        """A context around one step every rank takes in the same order (a predict
        round, a generate call, a check, a save).

        Backends whose collectives wait without a deadline that names ranks
        (Horovod over Gloo, tf.distribute across processes) watch their peers
        during it (`tfshard.comm.watchdog`); MPI's ops have their own deadline,
        and one process needs none: those return a no-op context.

        Args:
            what: what the step is, shown in errors (e.g. "predict round 2").
        """
        del what
        return contextlib.nullcontext()

    def split(self, group_size):
        """Splits the ranks into consecutive groups of `group_size`.

        Every rank must call this with the same `group_size`. Group `g` holds
        ranks `[g * group_size, (g + 1) * group_size)`.

        Returns:
            `(group, index)`: a `Communicator` over this rank's group, and the
            group's index.

        Raises:
            ValueError: `group_size` does not divide `size`.
        """
        if group_size < 1 or self.size % group_size:
            raise ValueError(
                f"group size {group_size} does not divide {self.size} ranks; "
                f"sizes that work: {[d for d in range(1, self.size + 1) if self.size % d == 0]}."
            )
        if group_size == self.size:
            return self, 0
        return self._split(group_size), self.rank // group_size

    def _split(self, group_size):
        raise NotImplementedError(f"{type(self).__name__} cannot form sub-groups.")

    def __repr__(self):
        return f"<{type(self).__name__} rank={self.rank} size={self.size}>"


class Wrapper:
    """A communicator around `inner` that delegates all it does not override.

    The base of `MeteredCommunicator` and `CompressedCommunicator`: they change
    what a collective counts or sends, and keep rank, size, broadcast and the
    host-side helpers of the communicator they wrap.
    """

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)


def gather_on_axis(x, axis, sizes, size, gather_rows):
    """A gather on any `axis` from a gather of flat rows: no transposes.

    Collective libraries concatenate on axis 0. Moving another axis to the
    front costs two transposes of the tensor (for a logits gather, ~1.6 s of
    a 7 s GPT-2 forward on this project's 2-core machine). Instead every rank's
    tensor is flattened and gathered as is, cut back into per-rank pieces and
    concatenated on `axis`, which copies contiguous blocks.

    Args:
        x: this rank's tensor (known rank).
        axis: a non-negative axis other than 0.
        sizes: every rank's length along `axis` (ints), or None to exchange
            them with one small gather first.
        size: the number of ranks.
        gather_rows: the backend's axis-0 gather (uneven lengths allowed),
            called as `gather_rows(tensor, part)` with `part` None for the
            data and "sizes" for the size exchange (for distinct op names).

    Returns:
        The concatenation on `axis`.
    """
    import tensorflow as tf

    shape = tf.shape(x)
    sizes_t = (gather_rows(shape[axis:axis + 1], "sizes") if sizes is None
               else tf.constant(sizes, tf.int32))
    inner = tf.reduce_prod(shape[axis + 1:]) if axis + 1 < x.shape.rank else 1
    outer = tf.reduce_prod(shape[:axis]) if axis > 0 else 1
    flat = gather_rows(tf.reshape(x, [-1]), None)
    pieces = tf.split(flat, sizes_t * outer * inner, num=size)
    parts = []
    for r, piece in enumerate(pieces):
        part_shape = tf.tensor_scatter_nd_update(shape, [[axis]], sizes_t[r:r + 1])
        part = tf.reshape(piece, part_shape)
        if sizes is not None:
            static = x.shape.as_list()
            static[axis] = int(sizes[r])
            part = tf.ensure_shape(part, static)
        parts.append(part)
    return tf.concat(parts, axis)


def sum_in_float32(reduce_sum, x):
    """`reduce_sum(x)`, with 16-bit floats summed in float32 and rounded once.

    Partial sums of a bfloat16 (or float16) row-parallel layer are widened
    before the all-reduce and the total is rounded back once, as DeepSpeed's
    CPU all-reduce and tfshard's MPI op do: summing in 16 bits would round at
    every step of the reduction, so the result would depend on the number of
    ranks.

    Args:
        reduce_sum: the backend's all-reduce (sum) of one tensor.
        x: this rank's partial.

    Returns:
        The sum, in `x`'s dtype.
    """
    import tensorflow as tf

    x = tf.convert_to_tensor(x)
    if x.dtype in (tf.bfloat16, tf.float16):
        return tf.cast(reduce_sum(tf.cast(x, tf.float32)), x.dtype)
    return reduce_sum(x)


def source_digest(source):
    """The sha256 scripts/build_mpi_ops.sh records for `source`: of the file, or for a
    folder of sources, of `sha256sum`'s listing of its files in name order (the digest of
    the lines "HEX  NAME")."""
    import hashlib

    def file_hex(path):
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    if not os.path.isdir(source):
        return file_hex(source)
    names = sorted((n for n in os.listdir(source) if os.path.isfile(os.path.join(source, n))),
                   key=lambda n: n.encode())
    listing = "".join(f"{file_hex(os.path.join(source, n))}  {n}\n" for n in names)
    return hashlib.sha256(listing.encode()).hexdigest()


def built_from(library, source):
    """Whether the compiled `library` was built from `source` as it is now.

    scripts/build_mpi_ops.sh writes the sha256 of the source it compiled beside
    each library (`library + ".sha256"`, see `source_digest`); file times cannot
    tell, since a git checkout rewrites them.

    Args:
        library: path of the shared library (e.g. tfshard/comm/_mpi_ops.so).
        source: path of its C++ source, or of the folder of its sources.

    Returns:
        False when the record is missing or names another source.
    """
    try:
        with open(library + ".sha256") as f:
            return f.read().strip() == source_digest(source)
    except OSError:
        return False


def host_key(environ=None):
    """Names the host this process runs on, as the ranks of a job tell hosts apart.

    TFSHARD_HOST when set; otherwise the hostname, followed by the network
    namespace when the process has one of its own (two namespaces of one
    machine are two hosts to the network, e.g. containers, or the test
    harness's hosts).
    """
    env = os.environ if environ is None else environ
    if env.get("TFSHARD_HOST"):
        return env["TFSHARD_HOST"]
    import socket

    name = socket.gethostname()
    try:
        mine = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return name
    try:
        machine = os.stat("/proc/1/ns/net").st_ino
    except OSError:
        machine = None  # not ours to read: name the namespace anyway
    return name if mine == machine else f"{name}/netns:{mine}"


def host_major(hosts):
    """The ranks in host-major order: every host's ranks together, hosts in the order
    their first rank appears, ranks in order within a host.

    Args:
        hosts: the host of every rank (e.g. `Communicator.hosts()`).

    Returns:
        A list of ranks; equal to `range(len(hosts))` when each host's ranks are
        already consecutive (the launchers' default placement).
    """
    first = {}
    for r, h in enumerate(hosts):
        first.setdefault(h, r)
    return sorted(range(len(hosts)), key=lambda r: (first[hosts[r]], r))


#: The environment variable that bounds how long one collective may wait, in seconds.
TIMEOUT_ENV = "TFSHARD_COLLECTIVE_TIMEOUT_SECONDS"


def env_number(name, default, what, allow_zero=False):
    """A number from environment variable `name`, or `default` when it is unset.

    Args:
        name: the variable.
        default: returned when the variable is unset.
        what: the unit for the message, e.g. "seconds".
        allow_zero: whether 0 is allowed (negative values never are).

    Raises:
        ValueError: the variable holds something else, naming it and what works.
    """
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name}={raw!r}: expected a number of {what} "
                         f"{'>= 0' if allow_zero else '> 0'}, e.g. 30.")
    return value


def collective_timeout(default):
    """Seconds one collective may wait before it fails: TFSHARD_COLLECTIVE_TIMEOUT_SECONDS,
    else the backend's `default`.

    Raises:
        ValueError: the variable is set to something other than a positive number.
    """
    return float(env_number(TIMEOUT_ENV, default, "seconds"))


def normalize_axis(axis, ndim, what="tensor"):
    """Turns a possibly negative axis into a positive one, or raises ValueError."""
    if ndim is None:
        raise ValueError(f"allgather needs a {what} of known rank; got unknown rank.")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for a {what} of rank {ndim}.")
    return axis % ndim
