"""A communicator that counts and times the collectives the sharded layers make.

The sharded layers of a model get a `MeteredCommunicator` around their group's
communicator. Each `allreduce_sum` / `allgather` they call adds, to three
counters held in TensorFlow variables (so it works eagerly and inside
`tf.function`, and under `strategy.run`):

- `collectives`: how many collectives ran;
- `bytes`: the size of the tensor each produced (the message Megatron counts:
  B·S·H for a row-parallel all-reduce, the full width for a gather);
- `seconds`: wall time from the moment the collective's input was ready to the
  moment its output was, as seen from this rank (waiting for slower ranks
  included -- that is the cost the forward pays).

Host-side collectives (agreement checks, output gathering) go through the
wrapped communicator unmetered: the counters describe the forward alone.
"""

import tensorflow as tf

from tfshard.comm.base import Wrapper, normalize_axis

COUNTERS = ("collectives", "bytes", "seconds")


class MeteredCommunicator(Wrapper):
    """Delegates to `comm`, metering `allreduce_sum` and `allgather`.

    Args:
        comm: the `Communicator` to wrap.

    Every other attribute (rank, size, broadcast, host-side helpers) is the
    wrapped communicator's own.
    """

    def __init__(self, comm):
        super().__init__(comm)
        # Plain (not Keras) variables: they are not model weights, are never
        # saved, and live on the device the caller's scope names.
        self._collectives = tf.Variable(0, dtype=tf.int64, trainable=False,
                                        name="tfshard_collectives")
        self._bytes = tf.Variable(0, dtype=tf.int64, trainable=False, name="tfshard_bytes")
        self._seconds = tf.Variable(0.0, dtype=tf.float64, trainable=False,
                                    name="tfshard_seconds")

    def allreduce_sum(self, x, name=None):
        x = tf.convert_to_tensor(x)
        # Every backend sums 16-bit floats in float32 (base.sum_in_float32, the MPI op), so
        # that is what crosses the wire.
        wide = 4 if x.dtype in (tf.bfloat16, tf.float16) else None
        return self._metered(x, lambda v: self.inner.allreduce_sum(v, name=name), wide)

    def allreduce_sum_16bit(self, x, name=None):
        itemsize = 2 if self.inner.sends_16bit_sums else 4
        return self._metered(x, lambda v: self.inner.allreduce_sum_16bit(v, name=name),
                             itemsize)

    def allgather(self, x, axis=0, name=None, sizes=None):
        x = tf.convert_to_tensor(x)
        axis = normalize_axis(axis, x.shape.rank)
        return self._metered(
            x, lambda v: self.inner.allgather(v, axis=axis, name=name, sizes=sizes))

    def _metered(self, x, run, itemsize=None):
        x = tf.convert_to_tensor(x)
        if self.inner.size == 1:  # identities, not collectives
            return run(x)
        with tf.control_dependencies([x]):
            start = tf.timestamp()
        with tf.control_dependencies([start]):
            y = run(tf.identity(x))
        with tf.control_dependencies([y]):
            stop = tf.timestamp()
        updates = [
            self._collectives.assign_add(1),
            self._bytes.assign_add(tf.size(y, out_type=tf.int64) * (itemsize or y.dtype.size)),
            self._seconds.assign_add(stop - start),
        ]
        with tf.control_dependencies(updates):
            return tf.identity(y)

    def reading(self):
        """The counters now (eager): a dict with `COUNTERS` as keys."""
        return {"collectives": int(self._collectives.numpy()),
                "bytes": int(self._bytes.numpy()),
                "seconds": float(self._seconds.numpy())}

    def __repr__(self):
        return f"<MeteredCommunicator of {self.inner!r}>"


def metered(comm):
    """`comm` wrapped in a `MeteredCommunicator` (unchanged if it already is one)."""
    return comm if isinstance(comm, MeteredCommunicator) else MeteredCommunicator(comm)


def difference(after, before):
    """`after - before`, counter by counter."""
    return {k: after[k] - before[k] for k in COUNTERS}
