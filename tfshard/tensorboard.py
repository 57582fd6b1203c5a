"""`tfshard.TensorBoard(logdir)`: what a sharded `predict` did, per rank, in TensorBoard.

    sharded.predict(x, callbacks=[tfshard.TensorBoard("logs/run1")])
    tensorboard --logdir logs/run1

Each rank writes its own run, `LOGDIR/rank<r>` (under MirroredStrategy one per
replica):

- text `plan`: the rank's plan as a markdown table (what was cut, local
  shapes, bytes, the collectives per layer);
- graph: the sharded forward as TensorFlow traced it (first batch);
- scalars per batch the rank computes (step = the global batch index):
  `batch/latency_ms`, `batch/rows_per_second`, `comm/collectives` and
  `comm/bytes` (counted by the communicator the sharded layers call),
  `time/collectives_ms` (from each collective's input being ready to its
  output being ready, waiting for peers included) and `time/compute_ms` (the
  rest of the batch's latency);
- under pipeline stages, per batch: `pipeline/busy_ms` (computing the stage's
  blocks), `pipeline/idle_ms` (waiting for the neighbouring stages),
  `pipeline/bubble` (the idle fraction, measured), `pipeline/sent_bytes` (to the
  next stage) and `pipeline/stage`;
- with `profile_batches=n`: a TensorFlow profiler trace of the rank's first n
  batches (profile plugin: `pip install tensorboard-plugin-profile`);
- under horovodrun with `HOROVOD_TIMELINE=DYNAMIC` set before `tfshard.init()`:
  Horovod's timeline, `LOGDIR/horovod_timeline.json` (chrome://tracing).
"""

import os
import time

import keras
import numpy as np
import tensorflow as tf

from tfshard.comm.metered import difference

TIMELINE_FILE = "horovod_timeline.json"


class TensorBoard(keras.callbacks.Callback):
    """Keras callback writing a sharded model's plan, graph, figures and traces.

    Args:
        logdir: the folder; each rank writes to `logdir/rank<r>`.
        write_plan: write the plan as a text summary when predict begins.
        write_graph: write the graph of the sharded forward (first batch).
        profile_batches: profile this many of the rank's first batches with
            the TensorFlow profiler (0: no profile).
        horovod_timeline: under horovodrun, record Horovod's timeline to
            `logdir/horovod_timeline.json` (needs `HOROVOD_TIMELINE=DYNAMIC`).

    Raises:
        ValueError: set on a model that is not a `tfshard.ShardedModel`, or a
            negative `profile_batches`.
    """

    def __init__(self, logdir, write_plan=True, write_graph=True, profile_batches=0,
                 horovod_timeline=True):
        super().__init__()
        if not isinstance(profile_batches, int) or profile_batches < 0:
            raise ValueError(f"profile_batches must be an int >= 0; got {profile_batches!r}.")
        self.logdir = os.fspath(logdir)
        self.write_plan = write_plan
        self.write_graph = write_graph
        self.profile_batches = profile_batches
        self.horovod_timeline = horovod_timeline
        self.timeline_path = None
        self._writers = {}
        self._begun = None  # (perf_counter, counters) at the current batch's start
        self._stage_before = None  # the pipeline counters at the current batch's start
        self._profiled = 0
        self._profiling = False
        self._graph_written = False
        self._tracing = False
        self._timeline_comm = None

    def set_model(self, model):
        if not hasattr(model, "collective_counters") or not hasattr(model, "plan"):
            raise ValueError(f"tfshard.TensorBoard needs a tfshard.ShardedModel; got "
                             f"{type(model).__name__} {getattr(model, 'name', '')!r}.")
        super().set_model(model)

    @property
    def ranks(self):
        """The ranks this process writes runs for."""
        return sorted(self.model.local_replicas())

    def rank_dir(self, rank):
        """The run folder of `rank`."""
        return os.path.join(self.logdir, f"rank{rank}")

    @property
    def run_dir(self):
        """The run folder of this process's first rank."""
        return self.rank_dir(self.ranks[0])

    def _writer(self, rank):
        if rank not in self._writers:
            self._writers[rank] = tf.summary.create_file_writer(self.rank_dir(rank))
        return self._writers[rank]

    def on_predict_begin(self, logs=None):
        if self.write_plan:
            for rank, replica in self.model.local_replicas().items():
                with self._writer(rank).as_default():
                    tf.summary.text("plan", replica.plan.markdown(), step=0)
        self._start_timeline()

    def _start_timeline(self):
        comm = self.model.world.comm
        if not self.horovod_timeline or not hasattr(comm, "start_timeline"):
            return
        os.makedirs(self.logdir, exist_ok=True)
        path = os.path.join(self.logdir, TIMELINE_FILE)
        if comm.start_timeline(path):
            self._timeline_comm, self.timeline_path = comm, path

    def on_predict_batch_begin(self, batch, logs=None):
        if self.write_graph and not self._graph_written:
            tf.summary.trace_on(graph=True, profiler=False)
            self._tracing = True
        if self._profiled < self.profile_batches and not self._profiling:
            tf.profiler.experimental.start(self.run_dir)
            self._profiling = True
        self._begun = (time.perf_counter(), self.model.collective_counters())
        self._stage_before = self._stage_reading()

    def _stage_reading(self):
        """The pipeline's counters (`PipelinedModel.pipeline_stats`), or None."""
        stats = getattr(self.model, "pipeline_stats", None)
        return stats() if stats is not None else None

    def _write_stage(self, batch):
        """Per batch, under pipeline stages: this rank's busy and idle time, the bubble
        fraction measured and the bytes it sent to the next stage."""
        before, after = self._stage_before, self._stage_reading()
        if before is None or after is None:
            return
        wall = after["wall_seconds"] - before["wall_seconds"]
        busy = after["busy_seconds"] - before["busy_seconds"]
        with self._writer(self.ranks[0]).as_default():
            tf.summary.scalar("pipeline/stage", self.model.stage.index, step=batch)
            tf.summary.scalar("pipeline/busy_ms", 1e3 * busy, step=batch)
            tf.summary.scalar("pipeline/idle_ms", 1e3 * max(0.0, wall - busy), step=batch)
            tf.summary.scalar("pipeline/bubble", 1.0 - busy / wall if wall else 0.0, step=batch)
            tf.summary.scalar("pipeline/sent_bytes", after["sent_bytes"] - before["sent_bytes"],
                              step=batch)

    def on_predict_batch_end(self, batch, logs=None):
        started, before = self._begun
        self._write_stage(batch)
        seconds = time.perf_counter() - started
        after = self.model.collective_counters()
        if self._tracing:
            with self._writer(self.ranks[0]).as_default():
                tf.summary.trace_export("sharded_forward", step=batch)
            self._tracing, self._graph_written = False, True
        if self._profiling:
            self._profiled += 1
            if self._profiled >= self.profile_batches:
                tf.profiler.experimental.stop()
                self._profiling = False
        first = keras.tree.flatten((logs or {}).get("outputs", []))
        shape = np.shape(first[0]) if first else ()
        rows = int(shape[0]) if shape else 0
        for rank in self.ranks:
            sent = difference(after[rank], before[rank]) if rank in after else None
            with self._writer(rank).as_default():
                tf.summary.scalar("batch/latency_ms", 1e3 * seconds, step=batch)
                tf.summary.scalar("batch/rows_per_second", rows / seconds if seconds else 0.0,
                                  step=batch)
                if sent is None:
                    continue
                tf.summary.scalar("comm/collectives", sent["collectives"], step=batch)
                tf.summary.scalar("comm/bytes", sent["bytes"], step=batch)
                tf.summary.scalar("time/collectives_ms", 1e3 * sent["seconds"], step=batch)
                tf.summary.scalar("time/compute_ms", 1e3 * max(0.0, seconds - sent["seconds"]),
                                  step=batch)

    def on_predict_end(self, logs=None):
        if self._profiling:
            tf.profiler.experimental.stop()
            self._profiling = False
        if self._tracing:
            tf.summary.trace_off()
            self._tracing = False
        if self._timeline_comm is not None:
            self._timeline_comm.stop_timeline()
            self._timeline_comm = None
        for writer in self._writers.values():
            writer.flush()
