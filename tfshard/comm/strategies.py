"""tf.distribute strategies as tfshard sees them: which kind, and functions kept out of line.

Helpers for the code that runs models under a strategy (`shard`, `load`,
`ShardedModel`, `generate`); the communicator of a strategy's replicas is the
backend `tfshard.comm.distribute`, reached through `tfshard.comm.for_replicas`.
"""

import tensorflow as tf


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


def out_of_line(fn):
    """`fn` as a function of its own that stays out of line in its caller's graph.

    Each replica's part of a `strategy.run` goes through one: TensorFlow orders
    the stateful ops of a function that take no resource (timestamps) one after
    another, which across the replicas of one process would make one replica's
    collective wait on another's later op; and a loop inlined per replica gets
    a frame name of its own, where its collectives never meet the others'. Out
    of line, each replica's ops are ordered among themselves only, and loops
    are named alike on every replica.
    """
    return tf.function(fn, jit_compile=False, experimental_attributes={"_noinline": True})
