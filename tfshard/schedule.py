"""Which data-parallel group computes which batches.

Batches are handed out in rounds. In each round a group gets a contiguous run
of batches (group 0 first), so every group's outputs are contiguous and the
global result is reassembled in input order. The schedule decides the sizes:

- "even": equal shares;
- "weighted": shares proportional to declared `weights` (e.g. capacities 3:1);
- "adaptive": equal shares in the first round, then shares proportional to
  each group's measured throughput (rows per second) so far: a slow group gets
  less work. The throughputs every rank uses are the gathered measurements, so
  all ranks compute the same assignment.

The schedule changes only who computes what, never the outputs.
"""

import math

SCHEDULES = ("even", "weighted", "adaptive")


def validate(schedule, weights, groups):
    """Checks a schedule request and returns the normalised initial weights.

    Args:
        schedule: one of `SCHEDULES`.
        weights: for "weighted", one positive number per group; else None.
        groups: the number of data-parallel groups.

    Returns:
        A list of `groups` positive floats.

    Raises:
        ValueError: unknown schedule, weights given without "weighted", or
            weights of the wrong length, non-finite or not positive.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown schedule {schedule!r}; expected one of {SCHEDULES}.")
    if schedule != "weighted":
        if weights is not None:
            raise ValueError(f"weights= is only used with schedule='weighted' (got schedule={schedule!r}).")
        return [1.0] * groups
    if weights is None:
        raise ValueError(f"schedule='weighted' needs weights=[...], one per group ({groups} groups).")
    weights = list(weights)
    if len(weights) != groups:
        raise ValueError(
            f"weights has {len(weights)} entries but there are {groups} data-parallel groups; "
            f"pass exactly {groups}."
        )
    for i, w in enumerate(weights):
        if not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise ValueError(f"weights[{i}] = {w!r}; every weight must be a finite number > 0.")
    return [float(w) for w in weights]


def split_counts(n, weights):
    """Splits `n` items into counts proportional to `weights` (largest remainder).

    Deterministic: ties go to the lower group index. Counts sum to `n`.
    """
    total = sum(weights)
    exact = [n * w / total for w in weights]
    counts = [int(math.floor(e)) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


class Scheduler:
    """Hands out batches to groups, round by round.

    Args:
        schedule: "even", "weighted" or "adaptive".
        groups: number of data-parallel groups.
        weights: for "weighted".
        total_batches: the number of batches if known, else None (streamed input).
    """

    def __init__(self, schedule, groups, weights=None, total_batches=None):
        self.schedule = schedule
        self.groups = groups
        self.weights = validate(schedule, weights, groups)
        self.total_batches = total_batches
        self.batches = [0] * groups
        self.rows = [0] * groups
        self.seconds = [0.0] * groups
        self.rounds = []

    def round_size(self):
        """How many batches the next round hands out."""
        g = self.groups
        if self.schedule != "adaptive":
            return self.total_batches if self.total_batches else 8 * g
        if self.total_batches:
            return max(g, min(8 * g, math.ceil(self.total_batches / 4)))
        return 4 * g

    def current_weights(self):
        if self.schedule != "adaptive":
            return self.weights
        if not all(self.seconds[i] > 0 and self.rows[i] > 0 for i in range(self.groups)):
            return self.weights
        return [self.rows[i] / self.seconds[i] for i in range(self.groups)]

    def assign(self, n):
        """Group index of each of the next `n` batches (contiguous per group)."""
        counts = split_counts(n, self.current_weights())
        out = []
        for g, c in enumerate(counts):
            out.extend([g] * c)
        self.rounds.append(counts)
        return out

    def observe(self, per_group):
        """Records one round's measurements: `[(batches, rows, seconds)]` per group."""
        for g, (b, r, s) in enumerate(per_group):
            self.batches[g] += b
            self.rows[g] += r
            self.seconds[g] += s

    def report(self):
        """The schedule used, each group's share and measured throughput."""
        total = sum(self.rows) or 1
        return {
            "schedule": self.schedule,
            "groups": self.groups,
            "weights": self.weights,
            "batches": list(self.batches),
            "rows": list(self.rows),
            "share": [r / total for r in self.rows],
            "seconds": [round(s, 6) for s in self.seconds],
            "throughput": [r / s if s > 0 else None for r, s in zip(self.rows, self.seconds)],
            "rounds": [list(c) for c in self.rounds],
        }
