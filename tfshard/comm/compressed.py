"""All-gathers sent in 16 bits: `shard(..., comm_dtype="bfloat16")`.

As Horovod's `Compression.fp16` does for gradients, a float32 tensor is cast
to the 16-bit wire dtype before the all-gather and back to float32 after it,
halving the bytes -- for a tied LM head, the logits gather that dominates a
sharded forward. All-reduces are left in float32: every backend sums 16-bit
partials in float32 (`base.sum_in_float32`, the MPI op), so casting them would
round without saving a byte.
"""

import tensorflow as tf

from tfshard.comm.base import Wrapper

#: The wire dtypes `comm_dtype` takes.
WIRE_DTYPES = ("bfloat16", "float16")


def check_comm_dtype(comm_dtype):
    """`comm_dtype` as a wire dtype name, or None.

    Raises:
        ValueError: not None and not one of `WIRE_DTYPES`.
    """
    if comm_dtype is None:
        return None
    name = getattr(comm_dtype, "name", comm_dtype)
    if name not in WIRE_DTYPES:
        raise ValueError(f"comm_dtype={comm_dtype!r}: tfshard sends all-gathers in one of "
                         f"{', '.join(WIRE_DTYPES)} (or None: in the activations' dtype).")
    return name


class CompressedCommunicator(Wrapper):
    """Delegates to `comm`, all-gathering float32 tensors in `dtype`.

    Args:
        comm: the communicator to wrap (the `MeteredCommunicator` the sharded
            layers call, so the meter counts the bytes actually sent).
        dtype: a name from `WIRE_DTYPES`.
    """

    def __init__(self, comm, dtype):
        super().__init__(comm)
        self.wire_dtype = tf.as_dtype(check_comm_dtype(dtype))

    def allreduce_sum(self, x, name=None):
        return self.inner.allreduce_sum(x, name=name)

    def allgather(self, x, axis=0, name=None, sizes=None):
        x = tf.convert_to_tensor(x)
        if x.dtype != tf.float32:
            return self.inner.allgather(x, axis=axis, name=name, sizes=sizes)
        sent = self.inner.allgather(tf.cast(x, self.wire_dtype), axis=axis, name=name,
                                    sizes=sizes)
        return tf.cast(sent, tf.float32)

    def __repr__(self):
        return f"<CompressedCommunicator ({self.wire_dtype.name}) of {self.inner!r}>"


def compressed(comm, comm_dtype):
    """`comm` wrapped to all-gather in `comm_dtype`, or `comm` itself when None."""
    return comm if check_comm_dtype(comm_dtype) is None else CompressedCommunicator(comm,
                                                                                   comm_dtype)
