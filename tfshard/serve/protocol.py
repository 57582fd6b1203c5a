"""Rank 0's commands to the other ranks of a serving job, over tfshard's collectives.

Rank 0 owns the HTTP port and decides every step; the other ranks only follow. Each
command is a broadcast from rank 0: a fixed header `[kind, a, b, payload bytes, seq, 0]`
(int32), then, when the kind carries them, `ints` (int32: a decode step's tokens, slots,
positions and logit rows) and a byte payload (a predict batch). Every broadcast runs under
the collectives' deadline, so a lost rank ends the job with its name on every rank that
can still act; an idle rank 0 sends IDLE at least every `heartbeat` seconds, so a
following rank never waits as long as the deadline for work that is not coming.
"""

import time

import numpy as np
import tensorflow as tf

STEP, IDLE, STOP, PREDICT, GENERATE = 1, 2, 3, 4, 5
NAMES = {STEP: "step", IDLE: "idle", STOP: "stop", PREDICT: "predict", GENERATE: "generate"}


class Channel:
    """Broadcasts from rank 0 of `comm` to its other ranks.

    Args:
        comm: the serving group's communicator.
    """

    def __init__(self, comm):
        self.comm = comm
        self.seq = 0
        #: Seconds spent in this channel's broadcasts (rank 0's figure is the metric's).
        self.seconds = 0.0

    def _bcast(self, array):
        if self.comm.size == 1:
            return array
        start = time.perf_counter()
        out = np.asarray(self.comm.broadcast(tf.constant(array), root=0))
        self.seconds += time.perf_counter() - start
        return out

    def send(self, kind, a=0, b=0, ints=None, payload=b""):
        """Rank 0: sends a command (`ints` an int32 array whose length the kind implies
        from `a` and `b`; `payload` bytes)."""
        self.seq += 1
        header = np.array([kind, a, b, len(payload), self.seq, 0], np.int32)
        self._bcast(header)
        if ints is not None and len(ints):
            self._bcast(np.asarray(ints, np.int32))
        if payload:
            self._bcast(_bytes_to_ints(payload))

    def receive(self, ints_length):
        """Other ranks: the next command.

        Args:
            ints_length: `(kind, a, b) -> length of ints` (0: none).

        Returns:
            `(kind, a, b, ints, payload)`.
        """
        header = self._bcast(np.zeros(6, np.int32))
        kind, a, b, nbytes, seq = (int(v) for v in header[:5])
        self.seq = seq
        n = ints_length(kind, a, b)
        ints = self._bcast(np.zeros(n, np.int32)) if n else np.zeros(0, np.int32)
        payload = b""
        if nbytes:
            payload = _ints_to_bytes(self._bcast(np.zeros((nbytes + 3) // 4, np.int32)), nbytes)
        return kind, a, b, ints, payload


def _bytes_to_ints(data):
    padded = data + b"\0" * (-len(data) % 4)
    return np.frombuffer(padded, np.int32).copy()


def _ints_to_bytes(ints, nbytes):
    return np.asarray(ints, np.int32).tobytes()[:nbytes]


def step_ints(tokens, slots, positions, rows):
    """A decode step's rows as the ints a STEP command carries (a = rows, b = logit rows)."""
    return np.concatenate([tokens, slots, positions, rows]).astype(np.int32)


def step_arrays(ints, m, r):
    """The inverse of `step_ints`: `(tokens, slots, positions, rows)`."""
    return ints[:m], ints[m:2 * m], ints[2 * m:3 * m], ints[3 * m:3 * m + r]


def ints_length(kind, a, b):
    """How many ints a command of `kind` carries."""
    return 3 * a + b if kind == STEP else 0
