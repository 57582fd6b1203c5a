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


import tensorflow as tf

from tfshard.comm.base import (
    Communicator,
    collective_timeout,
    gather_on_axis,
    normalize_axis,
    sum_in_float32,
)

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


def strategy_kind(strategy):
    """Names a supported strategy: "mirrored" or "multiworker".

    Raises:
        ValueError: any other strategy, naming the ones that work.
    """
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "multiworker"
    if isinstance(strategy, tf.distribute.MirroredStrategy):
        return "mirrored"
    raise ValueError(
        f"tfshard shards over tf.distribute.MirroredStrategy or "
        f"tf.distribute.MultiWorkerMirroredStrategy; got {type(strategy).__name__}. "
        "For one device use no strategy; for TPUs or parameter servers there is no tfshard "
        "backend."
    )


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

    Args:
        strategy: a `MirroredStrategy` or `MultiWorkerMirroredStrategy`.
        rank: this replica's id in sync group (`replica_id_in_sync_group`).
    """

    def __init__(self, strategy, rank):
        self.backend = strategy_kind(strategy)
        self.strategy = strategy
        self._rank = int(rank)
        self._size = strategy.num_replicas_in_sync
        self._local = len(strategy.extended.worker_devices)
        self._options = communication_options()
        self._watchdog = None

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

    def _collective(self, op, x):
        """Runs `op(replica_context, x)` on this rank's replica.

        Inside `strategy.run` directly; outside it (host side, one replica per
        process) through `strategy.run`, widening dtypes collectives do not carry.
        """
        x = tf.convert_to_tensor(x)
        ctx = self._replica_context()
        if ctx is not None:
            return op(ctx, _own(x))
        wire = x.dtype if x.dtype in _WIRE_DTYPES else (tf.int32 if x.dtype.is_integer
                                                         or x.dtype == tf.bool else tf.float32)
        out = self.strategy.run(
            lambda v: op(tf.distribute.get_replica_context(), v), args=(tf.cast(x, wire),))
        return tf.cast(self.strategy.experimental_local_results(out)[0], x.dtype)

    def allreduce_sum(self, x, name=None):
        return sum_in_float32(lambda v: self._collective(
            lambda ctx, w: ctx.all_reduce(tf.distribute.ReduceOp.SUM, w, options=self._options), v),
            x)

    def allgather(self, x, axis=0, name=None, sizes=None):
        x = tf.convert_to_tensor(x)
        if x.dtype == tf.bfloat16:
            # tf.distribute's gather takes no bfloat16; widening to float32 is exact.
            return tf.cast(self.allgather(tf.cast(x, tf.float32), axis, name, sizes), tf.bfloat16)
        axis = normalize_axis(axis, x.shape.rank)
        rows = lambda ctx, v: ctx.all_gather(v, 0, options=self._options)  # noqa: E731
        if axis == 0:
            return self._collective(rows, x)
        # tf.distribute would transpose `axis` to the front and back; see gather_on_axis.
        return self._collective(
            lambda ctx, v: gather_on_axis(v, axis, sizes, self._size,
                                          lambda t, part: rows(ctx, t)), x)

    def broadcast(self, x, root=0, name=None):
        # Exact (no arithmetic on the values): gather one copy per rank, keep root's.
        x = tf.convert_to_tensor(x)
        return tf.gather(self.allgather(x[None], axis=0), root)

    def barrier(self):
        self.allreduce_sum(tf.zeros([1]))
