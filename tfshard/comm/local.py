"""The size-1 communicator: every collective is the identity."""

import tensorflow as tf

from tfshard.comm.base import Communicator


class LocalCommunicator(Communicator):
    """A single rank; used for plain processes and for unsharded references."""

    backend = "local"

    @property
    def rank(self):
        return 0

    @property
    def size(self):
        return 1

    def allreduce_sum(self, x, name=None):
        return tf.identity(x)

    def allgather(self, x, axis=0, name=None, sizes=None):
        return tf.identity(x)

    def broadcast(self, x, root=0, name=None):
        if root != 0:
            raise ValueError(f"root must be 0 on a size-1 communicator; got {root}.")
        return tf.identity(x)

    def barrier(self):
        return None
