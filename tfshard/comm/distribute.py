"""tf.distribute communicator: collectives through the replica context.

Under `MirroredStrategy` (several replicas in one process) and
`MultiWorkerMirroredStrategy` (one replica per process), each replica is a
rank. Inside `strategy.run` the collectives are the replica context's own
`all_reduce` / `all_gather`, so they work eagerly and inside `tf.function`.

Outside `strategy.run` (host-side checks and gathers in the runtime) a rank can
only reach the others when it is the only replica of its process (the
multi-worker case): the collective is then run through `strategy.run` on the
spot. Several replicas in one process share the host and need no host-side
collective; asking for one raises.
"""


import threading
import zlib

import tensorflow as tf

from tfshard.comm.base import (
    Communicator,
    collective_timeout,
    gather_on_axis,
    normalize_axis,
    sum_in_float32,
)
from tfshard.comm.strategies import strategy_kind

# A collective that a peer never joins fails after this long instead of
# waiting forever (tf.distribute's CommunicationOptions.timeout_seconds).
DEFAULT_TIMEOUT_SECONDS = 30.0

# Collective ops carry these dtypes; the host-side helpers send others widened.
_WIRE_DTYPES = (tf.float16, tf.float32, tf.float64, tf.int32, tf.int64)


def timeout_seconds():
    """The collective timeout from TFSHARD_COLLECTIVE_TIMEOUT_SECONDS (default 30 s)."""
    return collective_timeout(DEFAULT_TIMEOUT_SECONDS)


# TensorFlow's own timeout names no rank: it is set this much later than the
# watchdog's deadline (tfshard.comm.watchdog), whose error does.
WATCHDOG_LEAD_SECONDS = 10.0


def communication_options():
    """`tf.distribute.experimental.CommunicationOptions` with tfshard's timeout
    (plus `WATCHDOG_LEAD_SECONDS`, so the watchdog's named error comes first)."""
    return tf.distribute.experimental.CommunicationOptions(
        timeout_seconds=timeout_seconds() + WATCHDOG_LEAD_SECONDS)


def multiworker_strategy():
    """Creates the `MultiWorkerMirroredStrategy` a `TF_CONFIG` describes.

    Must run before TensorFlow creates any tensor in this process (TF
    configures its collective ops once, at start-up).

    Returns:
        The strategy, with tfshard's collective timeout.

    Raises:
        RuntimeError: TensorFlow was initialised before, with a clear message.
    """
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=communication_options())
    except (RuntimeError, ValueError) as err:
        raise RuntimeError(
            f"Could not join the multi-worker job that TF_CONFIG describes ({err}). Call "
            "tfshard.init() first thing in the script, before creating any tensor, model or "
            "strategy: TensorFlow sets up its collective ops once, at start-up."
        ) from err


def replica_rank(strategy):
    """The global replica id of this process's only replica (multi-worker)."""
    local = strategy.extended.worker_devices
    if len(local) != 1:
        raise ValueError(
            f"tfshard's multi-worker backend needs one replica per process; this worker has "
            f"{len(local)} devices {list(local)}. Start one process per device (tfshard launch "
            "-n N) and hide the others, e.g. with CUDA_VISIBLE_DEVICES."
        )
    ids = strategy.run(lambda: tf.distribute.get_replica_context().replica_id_in_sync_group)
    return int(strategy.experimental_local_results(ids)[0])


# Group keys of tfshard's own collective groups, above those tf.distribute numbers
# from 1 (CollectiveKeys(group_key_start=1 + 10000 per strategy)).
_GROUP_KEY_BASE = 1 << 29


class _CollectiveKeys:
    """Group and instance keys of tfshard's collective ops in this process.

    A group's key is a function of what names its members alone (their ranks
    in the job, or in one process their devices), so every process computes the
    same key for a group and different keys for the others. Instance keys count per (group, device) as in tf.distribute's own
    `CollectiveKeys`: every replica launches the same collectives in the same
    order, so its k-th collective meets the others' k-th.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._next = {}

    @staticmethod
    def group_key(members):
        return _GROUP_KEY_BASE + zlib.crc32(repr(tuple(members)).encode()) % (1 << 28)

    def get_instance_key(self, group_key, device):
        with self._lock:
            key = self._next.get((group_key, device), 1)
            self._next[(group_key, device)] = key + 1
            return key


_KEYS = _CollectiveKeys()


def _launcher(members, device, timeout=None):
    """TensorFlow's collective launcher for one replica of the group `members` (what
    names the group: ranks, or devices).

    tf.distribute's own replica-context collectives go through `merge_call`,
    which MirroredStrategy cannot run inside control flow (the decode loop of
    keras-hub's `generate` is a `tf.while_loop`); this launcher issues the
    collective ops (`all_reduce_v2` / `all_gather_v2`, with ordering tokens)
    straight from each replica's trace, as tf.distribute does under XLA.

    `timeout`: seconds, or None. TensorFlow starts one thread per collective that
    has a timeout, which sleeps for the whole timeout: thousands of decode-step
    collectives exhaust the process's threads. So the collectives of a forward
    or a decode step have none: under MultiWorker the watchdog
    (`tfshard.comm.watchdog`) ends a step a peer never joins, with the rank
    named; under MirroredStrategy a replica that fails cancels the whole step.
    Host-side collectives of a group, few and outside any step's function, keep
    tfshard's timeout.
    """
    from tensorflow.python.distribute import collective_util, cross_device_utils

    return cross_device_utils.CollectiveReplicaLauncher(
        _KEYS.group_key(members), len(members), _KEYS, device,
        collective_util.Options(timeout_seconds=timeout))


def _own(x):
    """This replica's own copy of `x`.

    A tensor that every replica received unchanged (e.g. `strategy.run`'s
    argument) is one object for all of them; tf.distribute then regroups the
    replicas' values into that single tensor and the collective finds no
    per-replica values ("destinations can not be empty").
    """
    return tf.identity(x)


class ReplicaCommunicator(Communicator):
    """One replica of a tf.distribute strategy, as a rank.

    A group of some of the replicas (a tensor-parallel group beside others,
    `split`) reaches its members through TensorFlow's collective ops alone
    (`_launcher`); the whole set of replicas also through the replica context.

    Args:
        strategy: a `MirroredStrategy` or `MultiWorkerMirroredStrategy`.
        rank: this replica's rank in `members`.
        members: the global replica ids (`replica_id_in_sync_group`) of the
            group, in rank order; None: every replica.
    """

    def __init__(self, strategy, rank, members=None):
        self.backend = strategy_kind(strategy)
        self.strategy = strategy
        every = strategy.num_replicas_in_sync
        self._members = tuple(range(every) if members is None else members)
        self._whole = self._members == tuple(range(every))
        self._rank = int(rank)
        self._size = len(self._members)
        self._local = len(strategy.extended.worker_devices)
        self._options = communication_options()
        self._watchdog = None
        local = strategy.extended.worker_devices
        self._device = local[0] if self.backend == "multiworker" else local[self._members[self._rank]]
        # What names the group to TensorFlow: the members' ranks in the job (the same on
        # every worker), or in one process their devices (several MirroredStrategy
        # groups in one process each count their replicas from 0).
        self._group = self._members if self.backend == "multiworker" else tuple(
            local[m] for m in self._members)
        self._launch = self._timed_launch = None  # collective launchers, made when first used

    def _split(self, group_size):
        first = self._members[self._rank // group_size * group_size]
        return ReplicaCommunicator(self.strategy, self._rank % group_size,
                                   range(first, first + group_size))

    @classmethod
    def from_environment(cls):
        """The communicator of this process in the multi-worker job `TF_CONFIG` describes.

        Its `section`s are watched (`tfshard.comm.watchdog`): a worker that dies,
        stops or never joins a step ends the others with its rank named.
        """
        from tfshard.comm import watchdog

        strategy = multiworker_strategy()
        comm = cls(strategy, replica_rank(strategy))
        comm._watchdog = watchdog.start(comm.rank, comm.size, timeout_seconds(), comm.backend)
        return comm

    def section(self, what):
        if self._watchdog is None:
            return super().section(what)
        return self._watchdog.section(what)

    def _replica_context(self):
        """This strategy's replica context, or None when outside `strategy.run`."""
        ctx = tf.distribute.get_replica_context()
        if ctx is not None and ctx.strategy is self.strategy:
            return ctx
        if self._local != 1:
            raise RuntimeError(
                f"Rank {self._rank} of {self._size}: a tf.distribute collective outside "
                f"strategy.run with {self._local} replicas in this process. Call the sharded "
                "model through ShardedModel (predict / __call__), which runs strategy.run."
            )
        return None

    def _launcher(self, timed=False):
        """The launcher of this replica's collectives inside traced steps (no timeout), or
        with `timed`, of its host-side ones (tfshard's timeout)."""
        if timed:
            if self._timed_launch is None:
                self._timed_launch = _launcher(self._group, self._device,
                                               self._options.timeout_seconds)
            return self._timed_launch
        if self._launch is None:
            self._launch = _launcher(self._group, self._device)
        return self._launch

    def _collective(self, op, x, traced_op):
        """Runs `op(replica_context, x)` on this rank's replica.

        Inside `strategy.run` directly: while tracing, as `traced_op(launcher, x)`
        (collective ops without `merge_call`, so they also run inside loops);
        eagerly through the replica context. Outside it (host side, one replica
        per process) through `strategy.run`, widening dtypes collectives do not
        carry; a group of some replicas always through its collective ops.
        """
        x = tf.convert_to_tensor(x)
        ctx = self._replica_context()
        if ctx is not None and not tf.executing_eagerly():
            return traced_op(self._launcher(), x)
        if ctx is not None and self._whole:
            return op(ctx, _own(x))
        wire = x.dtype if x.dtype in _WIRE_DTYPES else (tf.int32 if x.dtype.is_integer
                                                         or x.dtype == tf.bool else tf.float32)
        if not self._whole:
            # A group of some replicas, one per process: its collective ops alone, traced
            # here. (Several replicas of one process never get here eagerly:
            # _replica_context raised, or ShardedModel traced its step.)
            launcher = self._launcher(timed=True)
            out = tf.function(lambda v: traced_op(launcher, v), autograph=False)(
                tf.cast(x, wire))
            return tf.cast(out, x.dtype)
        out = self.strategy.run(
            lambda v: op(tf.distribute.get_replica_context(), v), args=(tf.cast(x, wire),))
        return tf.cast(self.strategy.experimental_local_results(out)[0], x.dtype)

    def allreduce_sum(self, x, name=None):
        return sum_in_float32(lambda v: self._collective(
            lambda ctx, w: ctx.all_reduce(tf.distribute.ReduceOp.SUM, w, options=self._options),
            v, lambda launcher, w: launcher.all_reduce(w)), x)

    def allgather(self, x, axis=0, name=None, sizes=None):
        x = tf.convert_to_tensor(x)
        if x.dtype == tf.bfloat16:
            # tf.distribute's gather takes no bfloat16; widening to float32 is exact.
            return tf.cast(self.allgather(tf.cast(x, tf.float32), axis, name, sizes), tf.bfloat16)
        axis = normalize_axis(axis, x.shape.rank)
        rows = lambda ctx, v: ctx.all_gather(v, 0, options=self._options)  # noqa: E731
        traced_rows = lambda launcher, v: launcher.all_gather(v, 0)  # noqa: E731
        if axis == 0:
            return self._collective(rows, x, traced_rows)
        # tf.distribute would transpose `axis` to the front and back; see gather_on_axis.
        return self._collective(
            lambda ctx, v: gather_on_axis(v, axis, sizes, self._size,
                                          lambda t, part: rows(ctx, t)), x,
            lambda launcher, v: gather_on_axis(v, axis, sizes, self._size,
                                               lambda t, part: traced_rows(launcher, t)))

    def broadcast(self, x, root=0, name=None):
        # Exact (no arithmetic on the values): gather one copy per rank, keep root's.
        x = tf.convert_to_tensor(x)
        return tf.gather(self.allgather(x[None], axis=0), root)

    def barrier(self):
        self.allreduce_sum(tf.zeros([1]))
