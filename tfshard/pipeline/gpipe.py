"""Moving activations between pipeline stages, and the GPipe schedule of a batch.

Ranks of one pipeline (one data-parallel group) are laid out stage by stage:
stage `s` holds ranks `[s * T, (s + 1) * T)` of the group, `T` the
tensor-parallel size. Inside a stage every rank of its tensor-parallel group
ends a block with the whole activation, so rank `t` of stage `s` sends it to
rank `t` of stage `s + 1`: one point-to-point transfer per boundary, over MPI,
under the collective deadline (a dead or stopped stage ends the wait with a
named error).

GPipe: a batch is cut into micro-batches; each stage receives micro-batch
`j`, runs its blocks and sends it on, then takes `j + 1`, so stage `s` works on
`j` while stage `s + 1` works on `j - 1`. The last stage's outputs go back to
the other stages' ranks, so every rank of the group returns the batch's output.
"""

import time

import keras
import numpy as np
import tensorflow as tf

from tfshard.layers.base import even_ranges
from tfshard.outputs import rows_of

#: Message tags: activations between stages, outputs back from the last stage.
ACTIVATION_TAG, OUTPUT_TAG = 11, 12


class Transfers:
    """This rank's links to the neighbouring stages, and what went through them.

    Args:
        comm: the `Communicator` of the whole pipeline (one data-parallel group);
            it must have point-to-point `send` and `recv` (MPI).
        stages: the number of stages.
        tensor_parallel: ranks per stage.
    """

    def __init__(self, comm, stages, tensor_parallel):
        self.comm, self.stages, self.tp = comm, stages, tensor_parallel
        self.stage, self.tp_rank = divmod(comm.rank, tensor_parallel)
        self.first, self.last = self.stage == 0, self.stage == stages - 1
        self.issued = None  # a list while a traced decode step records its transfers
        self.decode_micro_batches = 1  # see tfshard.pipeline.decode.install
        self.stats = {"sent_bytes": 0, "sends": 0, "recv_seconds": 0.0, "send_seconds": 0.0,
                      "busy_seconds": 0.0, "wall_seconds": 0.0, "micro_batches": 0}

    def peer(self, stage):
        """The rank in `comm` of this rank's counterpart in `stage`."""
        return stage * self.tp + self.tp_rank

    def _record(self, op):
        if self.issued is not None and op is not None:
            self.issued.append(op)
        return op

    def send_next(self, x, tag=ACTIVATION_TAG, after=()):
        """Sends an activation to the next stage (traceable)."""
        with _after(list(after)):
            self._record(self.comm.send(x, dest=self.peer(self.stage + 1), tag=tag,
                                        name="stage activation", header=True))

    def recv_prev(self, like, tag=ACTIVATION_TAG, after=()):
        """Receives the previous stage's activation; `like` gives its shape and dtype.

        A traced `like` (the stand-in the receiver computed in its place) also
        orders the receive after it: inside a `while_loop` a receive has no
        input, and TensorFlow could post the next step's receive before this
        one's, which MPI would then match to the wrong message. `after`: more
        tensors it must wait for (a decode step's inputs: a stand-in of static
        shape is a constant and orders nothing).
        """
        with _after([like] + list(after)):
            return self._record(self.comm.recv(_dims(like), like.dtype,
                                               source=self.peer(self.stage - 1), tag=tag,
                                               name="stage activation", header=True))

    def share_from_last(self, flat, likes, after=()):
        """The last stage's tensors (a flat list) on every stage's rank (traceable).

        Args:
            flat: the last stage's tensors (ignored elsewhere; may be None).
            likes: per tensor, something with the shape's rank and the dtype.
            after: tensors the receive waits for (see `recv_prev`).

        Returns:
            The last stage's tensors.
        """
        if self.last:
            with _after(list(after)):
                for s in range(self.stages - 1):
                    for x in flat:
                        self._record(self.comm.send(x, dest=self.peer(s), tag=OUTPUT_TAG,
                                                    name="stage output", header=True))
            return flat
        with _after(list(likes) + list(after)):
            return [self._record(self.comm.recv(_dims(k), k.dtype,
                                                source=self.peer(self.stages - 1),
                                                tag=OUTPUT_TAG, name="stage output", header=True))
                    for k in likes]

    def reading(self):
        """What this rank's pipeline did so far: bytes it sent to the next stage, seconds
        busy computing, waiting to receive and to send, wall seconds of batches, and the
        bubble fraction measured (1 - busy / wall)."""
        out = dict(self.stats)
        wall = out["wall_seconds"]
        out["bubble"] = 1.0 - out["busy_seconds"] / wall if wall else 0.0
        return out


def _after(likes):
    """Control dependencies on the traced tensors among `likes` (none eagerly)."""
    traced = [k for k in likes if isinstance(k, (tf.Tensor, tf.Operation))
              and not tf.executing_eagerly() and hasattr(k, "graph")]
    return tf.control_dependencies(traced)


def _dims(like):
    """The static dims of `like` (None where unknown): the receiver checks the known
    ones against the sender's header and keeps them in its traced shapes."""
    return [None if d is None else int(d) for d in list(like.shape)]


def default_micro_batches(rows, stages):
    """GPipe's micro-batch count for a batch of `rows`: 2 per stage, at most one row
    each (a bubble of (P - 1) / (3P - 1): 20 % at P = 2, under a third for any P)."""
    return max(1, min(rows, 2 * stages)) if stages > 1 else 1


def _take(batch, start, stop):
    return keras.tree.map_structure(lambda v: v[start:stop], batch)


def run_gpipe(stage, step, links, batch, micro_batches, output):
    """One batch through the pipeline, GPipe style; its output on every rank.

    Args:
        stage: this rank's `tfshard.pipeline.cut.Stage`.
        step: `(inputs by name, activation or None) -> activation or output`,
            the stage's traced forward.
        links: the rank's `Transfers`.
        batch: the batch (numpy, in the model's input structure).
        micro_batches: how many micro-batches (None: `default_micro_batches`).
        output: the model's symbolic output (its structure, and each tensor's rank
            and dtype for the receivers).

    Returns:
        The model's output for the batch (numpy, in its structure).
    """
    rows = rows_of(batch)
    m = micro_batches or default_micro_batches(rows, links.stages)
    m = max(1, min(int(m), rows))
    stats = links.stats
    outs = []
    t_start = time.perf_counter()
    for start, stop in even_ranges(rows, m):
        part = stage.inputs_by_name(_take(batch, start, stop))
        part = {k: tf.convert_to_tensor(v) for k, v in part.items()}
        x = None
        if not links.first:
            t0 = time.perf_counter()
            x = links.recv_prev(stage.receives)
            stats["recv_seconds"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        y = step(part, x)
        if links.last:
            y = keras.tree.map_structure(np.asarray, y)
        stats["busy_seconds"] += time.perf_counter() - t0
        if links.last:
            outs.append(y)
        else:
            t0 = time.perf_counter()
            links.send_next(y)
            stats["send_seconds"] += time.perf_counter() - t0
            stats["sent_bytes"] += int(np.prod(y.shape)) * y.dtype.size
            stats["sends"] += 1
        stats["micro_batches"] += 1
    flat = None
    if links.last:
        flat = [np.concatenate(parts, axis=0) for parts in
                zip(*[keras.tree.flatten(o) for o in outs])]
        flat = [tf.convert_to_tensor(v) for v in flat]
    t0 = time.perf_counter()
    flat = links.share_from_last(flat, keras.tree.flatten(output))
    stats["recv_seconds" if not links.last else "send_seconds"] += time.perf_counter() - t0
    stats["wall_seconds"] += time.perf_counter() - t_start
    return keras.tree.pack_sequence_as(output, [np.asarray(v) for v in flat])
