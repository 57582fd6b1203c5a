"""Horovod (Gloo) communicator: core ops only, never Horovod's Keras wrappers.

Horovod's Keras wrappers are broken on Keras 3 (they import `keras.optimizers.legacy`); its core
TensorFlow ops work eagerly and inside `tf.function`. Two facts shape this file:
`hvd.allreduce` averages by default (we always pass `op=hvd.Sum`), and
`hvd.allgather` concatenates on axis 0 only (other axes: `gather_on_axis`).
"""

import os

import tensorflow as tf

from tfshard.comm.base import (
    Communicator,
    collective_timeout,
    gather_on_axis,
    normalize_axis,
    sum_in_float32,
)

#: Seconds a rank may be absent from a step the others wait in (watchdog).
WATCHDOG_TIMEOUT_SECONDS = 30.0

# Local-run defaults that keep a stuck collective from hanging forever and keep
# per-collective latency low. Users override them through the environment.
HOROVOD_ENV_DEFAULTS = {
    "HOROVOD_CYCLE_TIME": "0.1",
    "HOROVOD_STALL_CHECK_TIME_SECONDS": "30",
    "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "120",
    "HOROVOD_GLOO_TIMEOUT_SECONDS": "120",
    # Sub-groups (tensor-parallel groups inside a data-parallel world) are
    # Horovod process sets added after init.
    "HOROVOD_DYNAMIC_PROCESS_SETS": "1",
}


class HorovodCommunicator(Communicator):
    """All Horovod ranks (or one Horovod process set) as a communicator.

    Args:
        process_set: optional `hvd.ProcessSet`; the global set when None.
    """

    backend = "horovod"

    def __init__(self, process_set=None):
        for key, value in HOROVOD_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        import horovod.tensorflow as hvd

        self._hvd = hvd
        if not hvd.is_initialized():
            hvd.init()
        self._process_set = process_set if process_set is not None else hvd.global_process_set
        self._rank = self._process_set.rank()
        self._size = self._process_set.size()
        self._global_ranks = list(self._process_set.ranks or range(hvd.size()))
        self._subgroups = {}
        self._watchdog = None
        if process_set is None:  # the world: watch this host's ranks during tfshard's steps
            from tfshard.comm import watchdog

            self._watchdog = watchdog.start(self._rank, self._size,
                                            collective_timeout(WATCHDOG_TIMEOUT_SECONDS), "horovod")

    def section(self, what):
        if self._watchdog is None:
            return super().section(what)
        return self._watchdog.section(what)


    def allreduce_sum(self, x, name=None):
        return sum_in_float32(lambda v: self._hvd.allreduce(
            v, op=self._hvd.Sum, name=name, process_set=self._process_set), x)

    def allgather(self, x, axis=0, name=None, sizes=None):
        x = tf.convert_to_tensor(x)
        if x.dtype == tf.bfloat16:
            # Horovod's ops take no bfloat16; a gather moves bits, so send them as uint16.
            return tf.bitcast(self.allgather(tf.bitcast(x, tf.uint16), axis, name, sizes),
                              tf.bfloat16)
        axis = normalize_axis(axis, x.shape.rank)
        def gather(v, part=None):
            op_name = name if name is None or part is None else f"{name}_{part}"
            return self._hvd.allgather(v, name=op_name, process_set=self._process_set)

        if axis == 0:
            return gather(x)
        return gather_on_axis(x, axis, sizes, self._size, gather)

    def broadcast(self, x, root=0, name=None):
        x = tf.convert_to_tensor(x)
        if x.dtype == tf.bfloat16:
            return tf.bitcast(self.broadcast(tf.bitcast(x, tf.uint16), root, name), tf.bfloat16)
        # Horovod names the root by its global rank, even inside a process set.
        return self._hvd.broadcast(
            x, root_rank=self._global_ranks[root], name=name, process_set=self._process_set
        )

    def start_timeline(self, path):
        """Starts Horovod's timeline (chrome://tracing JSON) into `path`.

        Horovod writes it from rank 0 only; every rank must call this. It needs
        `HOROVOD_TIMELINE=DYNAMIC` in the environment before `hvd.init()` (the
        CLI's `--logdir` sets it).

        Returns:
            True if recording started; False when dynamic timelines are off.
        """
        if os.environ.get("HOROVOD_TIMELINE") != "DYNAMIC":
            return False  # off, or a static timeline of the user's own: leave it
        try:
            self._hvd.start_timeline(os.fspath(path), mark_cycles=False)
        except ValueError:
            return False
        return True

    def stop_timeline(self):
        """Stops the timeline `start_timeline` began and closes its file."""
        self._hvd.stop_timeline()

    def gather_to_root(self, array):
        # An all-to-all in which every rank sends all its rows to rank 0 and
        # nothing elsewhere: only rank 0 ever holds the whole result.
        import numpy as np

        splits = tf.constant([np.shape(array)[0]] + [0] * (self._size - 1), tf.int32)
        out = self._hvd.alltoall(tf.constant(array), splits=splits, process_set=self._process_set)
        if isinstance(out, tuple):
            out = out[0]
        return np.asarray(out) if self._rank == 0 else None

    def _split(self, group_size):
        if group_size not in self._subgroups:
            mine = None
            for start in range(0, self._size, group_size):
                ranks = self._global_ranks[start:start + group_size]
                ps = self._hvd.add_process_set(ranks)  # collective: every rank adds every set
                if self._hvd.rank() in ranks:
                    mine = ps
            self._subgroups[group_size] = HorovodCommunicator(process_set=mine)
        return self._subgroups[group_size]

    def barrier(self):
        # horovod.tensorflow 0.28 has no barrier op: a one-element allreduce
        # returns only once every rank of the set has joined.
        self._hvd.allreduce(tf.zeros([1]), op=self._hvd.Sum, process_set=self._process_set,
                            name=None)
