"""Ranks that fail on purpose, to show a launch fails rather than hangs.

    ./horovodrun.sh -np 2 python tests/workers/faults.py die    # rank 1 dies before a collective
    ./horovodrun.sh -np 2 python tests/workers/faults.py stall  # rank 1 never joins a collective
    ./horovodrun.sh -np 2 python tests/workers/faults.py stop   # rank 1 is SIGSTOPped
    ./horovodrun.sh -np 2 python tests/workers/faults.py mismatch  # ranks call different collectives
    tfshard launch -n 2 tests/workers/faults.py killed  # rank 1 is SIGKILLed mid-run
    ./horovodrun.sh -np 2 python tests/workers/faults.py tp_disagree  # tensor_parallel 1 vs 2
    ./horovodrun.sh -np 2 python tests/workers/faults.py listen  # up 6 s: list its sockets
    ./horovodrun.sh -np 2 python tests/workers/faults.py predict_stall  # rank 1 skips predict
    ./horovodrun.sh -np 2 python tests/workers/faults.py predict_stop  # ... SIGSTOPped instead
    ./horovodrun.sh -np 2 python tests/workers/faults.py stage_killed  # pipeline stage 1 dies
    ./horovodrun.sh -np 2 python tests/workers/faults.py stage_stop  # ... is SIGSTOPped

The same worker runs under `./horovodrun.sh --gloo` (Horovod) and `tfshard launch`
(tf.distribute multi-worker).
"""

import os
import signal
import sys
import time

from tfshard.cli import import_tensorflow

import_tensorflow()  # the collector paused meanwhile, then the heap frozen
import tensorflow as tf  # noqa: E402

import tfshard  # noqa: E402

mode = sys.argv[1]
world = tfshard.init()
comm = world.comm
if mode == "tp_disagree":
    import keras

    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, name="a"),
                              keras.layers.Dense(4, name="b")])
    try:
        tfshard.shard(model, tensor_parallel=1 if world.rank == 0 else 2)
    except ValueError as err:
        print(f"rank {world.rank} refused: {err}", flush=True)
        raise SystemExit(1)
    print(f"rank {world.rank} finished: sharded", flush=True)
    raise SystemExit(0)
if mode in ("predict_stall", "predict_stop"):
    # One rank calls predict, the other never does: it sleeps, or is stopped.
    import keras
    import numpy as np

    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, name="a"),
                              keras.layers.Dense(4, name="b")])
    sharded = tfshard.shard(model)
    print(f"rank {world.rank} sharded", flush=True)
    if world.rank == 1:
        if mode == "predict_stop":
            print("rank 1 stopping itself", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
        print("rank 1 stalling", flush=True)
        time.sleep(3600)
    out = sharded.predict(np.ones((4, 8), "float32"), verbose=0)
    print(f"rank {world.rank} finished: {out.shape}", flush=True)
    raise SystemExit(0)
if mode in ("stage_killed", "stage_stop"):
    # Two pipeline stages; the second dies (or stops) after the first batches.
    import keras
    import numpy as np

    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(256, name="a"),
                              keras.layers.Dense(256, name="b"), keras.layers.Dense(4, name="c")])
    sharded = tfshard.shard(model, pipeline=2)
    x = np.ones((64, 64), "float32")
    sharded.predict(x, batch_size=16, verbose=0)
    print(f"rank {world.rank} predicted once", flush=True)

    class GoAway(keras.callbacks.Callback):
        """Stage 1 goes away as batch 2 starts, inside the pipeline's transfers."""

        def on_predict_batch_begin(self, batch, logs=None):
            if world.rank == 1 and batch == 2:
                print("rank 1 (stage 1) going away", flush=True)
                os.kill(os.getpid(), signal.SIGKILL if mode == "stage_killed" else signal.SIGSTOP)

    out = sharded.predict(x, batch_size=16, verbose=0, callbacks=[GoAway()])
    print(f"rank {world.rank} finished: {out.shape}", flush=True)
    raise SystemExit(0)
comm.allreduce_sum(tf.ones([4]))  # everyone is up
if mode == "listen":  # stay up while the test lists the job's listening sockets
    print(f"rank {world.rank} listening-check ready", flush=True)
    time.sleep(6)
    comm.allreduce_sum(tf.ones([4]))
    print(f"rank {world.rank} finished", flush=True)
    raise SystemExit(0)
if world.rank == 1:
    if mode == "die":
        print("rank 1 dying", flush=True)
        os._exit(3)
    if mode == "killed":
        print("rank 1 killing itself", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "stop":
        print("rank 1 stopping itself", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
    if mode == "stall":
        print("rank 1 stalling", flush=True)
        time.sleep(3600)
if mode == "mismatch":
    # Inside tf.function Horovod matches collectives by op name (eager ops are
    # matched by order); tfshard's MPI ops compare a signature of kind, dtype,
    # shape and name. Either way differently named graphs are a true mismatch.
    @tf.function
    def step(x):
        return comm.allreduce_sum(x, name=f"only_on_rank_{world.rank}")

    out = step(tf.ones([4]))
elif mode == "killed":
    for _ in range(600):  # rank 0 keeps computing with the dead rank's peer
        out = comm.allreduce_sum(tf.ones([4]))
        time.sleep(0.1)
else:
    out = comm.allreduce_sum(tf.ones([4]))
print(f"rank {world.rank} finished: {out.numpy()}", flush=True)
