"""`tfshard.TensorBoard(logdir)`: what a sharded `predict` did, per rank, in TensorBoard.

    sharded.predict(x, callbacks=[tfshard.TensorBoard("logs/run1")])
    tensorboard --logdir logs/run1

Each rank writes its own run, `LOGDIR/rank<r>`: the plan as a markdown table
(text dashboard) and, per batch it computes (step = the global batch index),
scalars `batch/latency_ms`, `batch/rows_per_second`, `comm/collectives` and
`comm/bytes` (the collectives one forward makes, from the plan, and their
fp32 bytes for the batch's tokens — Megatron's count, not a measurement).
"""

import os
import time

import keras
import numpy as np
import tensorflow as tf


class TensorBoard(keras.callbacks.Callback):
    """Keras callback writing a sharded model's plan and per-batch figures.

    Args:
        logdir: the folder; each rank writes to `logdir/rank<r>`.
        write_plan: write the plan as a text summary when predict begins.

    Raises:
        ValueError: set on a model that is not a `tfshard.ShardedModel`.
    """

    def __init__(self, logdir, write_plan=True):
        super().__init__()
        self.logdir = os.fspath(logdir)
        self.write_plan = write_plan
        self._writer = None
        self._started = {}
        self._collectives = None  # (count, elements per token) of one forward, from the plan

    def set_model(self, model):
        if not hasattr(model, "plan") or not hasattr(model, "world"):
            raise ValueError(f"tfshard.TensorBoard needs a tfshard.ShardedModel; got "
                             f"{type(model).__name__} {getattr(model, 'name', '')!r}.")
        super().set_model(model)

    @property
    def run_dir(self):
        """This rank's run folder."""
        return os.path.join(self.logdir, f"rank{self.model.rank}")

    def on_predict_begin(self, logs=None):
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.run_dir)
        ops = self.model.plan.communication()
        self._collectives = (len(ops), sum(n for _, _, n in ops))
        if self.write_plan:
            with self._writer.as_default():
                tf.summary.text("plan", self.model.plan.markdown(), step=0)
            self._writer.flush()

    def on_predict_batch_begin(self, batch, logs=None):
        self._started[batch] = time.perf_counter()

    def on_predict_batch_end(self, batch, logs=None):
        seconds = time.perf_counter() - self._started.pop(batch, time.perf_counter())
        first = keras.tree.flatten((logs or {}).get("outputs", []))
        shape = np.shape(first[0]) if first else ()
        rows = int(shape[0]) if shape else 0
        # Positions that carry activations: every output axis but the features.
        tokens = int(np.prod(shape[:-1])) if len(shape) >= 2 else rows
        count, per_token = self._collectives
        with self._writer.as_default():
            tf.summary.scalar("batch/latency_ms", 1e3 * seconds, step=batch)
            tf.summary.scalar("batch/rows_per_second", rows / seconds if seconds else 0.0,
                              step=batch)
            tf.summary.scalar("comm/collectives", count, step=batch)
            tf.summary.scalar("comm/bytes", 4.0 * tokens * per_token, step=batch)

    def on_predict_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()
