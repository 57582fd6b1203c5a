"""Collectives sent in 16 bits: `shard(..., comm_dtype="bfloat16")`.

As Horovod's `Compression.fp16` does for gradients, a float32 tensor is cast
to the 16-bit wire dtype before the collective and back to float32 after it,
halving the bytes:

- all-gathers (for a tied LM head, the logits gather that dominates a sharded
  forward) on every backend;
- all-reduces (the row-parallel partial sums, the activations) where the backend
  sums 16-bit floats on a 16-bit wire (`sends_16bit_sums`: tfshard's MPI op adds
  each pair of partials in float32 and rounds once per step). Elsewhere they stay
  float32: Horovod and tf.distribute widen 16-bit sums to float32, so a cast would
  round without saving a byte.

16-bit tensors (a bfloat16 model) are sent in their own dtype. float16 holds
values up to 65504 only: a collective whose result overflowed it fails on every
rank with a named error rather than returning inf.
"""

import tensorflow as tf

from tfshard.comm.base import Wrapper

#: The wire dtypes `comm_dtype` takes.
WIRE_DTYPES = ("bfloat16", "float16")

_FLOATS = (tf.float32, tf.bfloat16, tf.float16)


def check_comm_dtype(comm_dtype):
    """`comm_dtype` as a wire dtype name, or None.

    Raises:
        ValueError: not None and not one of `WIRE_DTYPES`.
    """
    if comm_dtype is None:
        return None
    name = getattr(comm_dtype, "name", comm_dtype)
    if name not in WIRE_DTYPES:
        raise ValueError(f"comm_dtype={comm_dtype!r}: tfshard sends collectives in one of "
                         f"{', '.join(WIRE_DTYPES)} (or None: in the activations' dtype).")
    return name


class CompressedCommunicator(Wrapper):
    """Delegates to `comm`, sending float32 tensors in `dtype` (see the module docstring).

    Args:
        comm: the communicator to wrap (the `MeteredCommunicator` the sharded
            layers call, so the meter counts the bytes actually sent).
        dtype: a name from `WIRE_DTYPES`.
    """

    def __init__(self, comm, dtype):
        super().__init__(comm)
        self.wire_dtype = tf.as_dtype(check_comm_dtype(dtype))

    def allreduce_sum(self, x, name=None):
        x = tf.convert_to_tensor(x)
        if not self.inner.sends_16bit_sums or x.dtype not in _FLOATS:
            return self.inner.allreduce_sum(x, name=name)
        if x.dtype != tf.float32:
            return self.inner.allreduce_sum_16bit(x, name=name)
        summed = self.inner.allreduce_sum_16bit(tf.cast(x, self.wire_dtype), name=name)
        return self._widened(summed, "all-reduce", name)

    def allgather(self, x, axis=0, name=None, sizes=None):
        x = tf.convert_to_tensor(x)
        if x.dtype != tf.float32:
            return self.inner.allgather(x, axis=axis, name=name, sizes=sizes)
        sent = self.inner.allgather(tf.cast(x, self.wire_dtype), axis=axis, name=name,
                                    sizes=sizes)
        return self._widened(sent, "all-gather", name)

    def _widened(self, received, collective, name):
        """`received` (what every rank got) back in float32; float16 overflow is an error."""
        if self.wire_dtype == tf.float16:
            received = tf.debugging.check_numerics(
                received, f"tfshard comm_dtype='float16': the {collective} '{name or ''}' of "
                f"{received.shape} overflowed float16 (|x| > 65504); use "
                "comm_dtype='bfloat16' (float32's range) or None")
        return tf.cast(received, tf.float32)

    def __repr__(self):
        return f"<CompressedCommunicator ({self.wire_dtype.name}) of {self.inner!r}>"


def compressed(comm, comm_dtype):
    """`comm` wrapped to send in `comm_dtype`, or `comm` itself when None."""
    return comm if check_comm_dtype(comm_dtype) is None else CompressedCommunicator(comm,
                                                                                   comm_dtype)
