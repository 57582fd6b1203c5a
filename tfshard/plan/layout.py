"""`Layout`: which host each rank runs on, and which collectives cross between hosts.

A job's ranks form tensor-parallel groups of consecutive ranks; with pipeline
stages, consecutive groups form a pipeline; pipelines (or groups) are the
data-parallel replicas. The launchers place each host's ranks consecutively
(MPI jobs are put in that order by `tfshard.init()`), so a group of ranks that
divides every host's rank count stays inside one host. A tensor-parallel group
that spans hosts puts every block's all-reduce on the network; the summary
says so, and which other collectives cross.
"""

import dataclasses
import math


def default_group(hosts):
    """The tensor-parallel size that keeps every group inside one host: the ranks of
    one host (the greatest common divisor of the hosts' rank counts when they differ).

    Args:
        hosts: the host of every rank, in rank order.

    Returns:
        `len(hosts)` on one host.
    """
    counts = {}
    for h in hosts:
        counts[h] = counts.get(h, 0) + 1
    return math.gcd(*counts.values()) if counts else 1


@dataclasses.dataclass(frozen=True)
class Layout:
    """The ranks of a sharded model on their hosts.

    Attributes:
        hosts: the host of every rank of the job, in rank order.
        tensor_parallel: ranks per tensor-parallel group.
        pipeline: stages per pipeline (1 without stages).
    """

    hosts: tuple
    tensor_parallel: int
    pipeline: int = 1

    @property
    def host_count(self):
        return len(set(self.hosts))

    def _spans(self, ranks):
        return sorted({self.hosts[r] for r in ranks}, key=self.hosts.index)

    def tensor_groups(self):
        """The ranks of every tensor-parallel group."""
        tp = self.tensor_parallel
        return [list(range(s, s + tp)) for s in range(0, len(self.hosts), tp)]

    def wide_groups(self):
        """The tensor-parallel groups whose ranks are on more than one host."""
        return [g for g in self.tensor_groups() if len(self._spans(g)) > 1]

    def replicas(self):
        """The ranks of every data-parallel replica (a group, or a pipeline of groups)."""
        n = self.tensor_parallel * self.pipeline
        return [list(range(s, s + n)) for s in range(0, len(self.hosts), n)]

    def crossings(self):
        """Each kind of collective and whether it crosses hosts.

        Returns:
            A list of `(what, crosses, detail)`: `crosses` is True when some
            instance of that collective joins ranks of different hosts.
        """
        out = []
        wide = self.wide_groups()
        if self.tensor_parallel > 1:
            detail = (f"{len(wide)} of {len(self.tensor_groups())} groups span hosts "
                      f"(group of ranks {wide[0]} on {', '.join(self._spans(wide[0]))})"
                      if wide else "every group inside one host")
            out.append(("tensor-parallel all-reduces/all-gathers (every block)", bool(wide),
                        detail))
        if self.pipeline > 1:
            hops = []
            for pipe in self.replicas():
                stages = [pipe[s * self.tensor_parallel:(s + 1) * self.tensor_parallel]
                          for s in range(self.pipeline)]
                hops += [s for s in range(self.pipeline - 1)
                         if self._spans(stages[s]) != self._spans(stages[s + 1])]
            out.append(("pipeline hand-offs (every micro-batch)", bool(hops),
                        f"stage(s) {sorted(set(hops))} -> next on another host" if hops
                        else "every hand-off inside one host"))
        replicas = self.replicas()
        if len(replicas) > 1:
            out.append(("data-parallel gather of outputs (once per round)",
                        self.host_count > 1, f"{len(replicas)} replicas"))
        return out

    def crossing_bytes(self, ops, tokens, itemsizes=None, output_bytes=0):
        """The bytes that must cross between hosts for one `predict` of `tokens` tokens,
        both directions summed: a host-level minimum (each host sends or receives a
        piece once; a collective that delivers a copy to every rank of a host moves
        more).

        An all-reduce of n bytes over a group on H hosts costs 2(H-1)n (a ring
        between the hosts), an all-gather (H-1)n; the data-parallel gather of the
        outputs (every rank gets all rows) (H-1) times the outputs' bytes.

        Args:
            ops: `ResolvedPlan.communication()`: (path, collective, elements per token).
            tokens: the tokens of the whole predict, shared by the data-parallel groups.
            itemsizes: `ResolvedPlan.wire_itemsizes()` (default 4 bytes per element).
            output_bytes: the global output's bytes.

        Returns:
            `{"tensor-parallel": bytes, "data-parallel": bytes, "total": bytes}`.
        """
        itemsizes = itemsizes or {}
        groups = self.tensor_groups()
        per_group = tokens / max(1, len(self.replicas()))
        tensor = 0.0
        for g in groups:
            spread = len(self._spans(g))
            for path, op, n in ops:
                size = n * per_group * itemsizes.get((path, op), 4)
                tensor += (2 if op == "all-reduce" else 1) * (spread - 1) * size
        data = (self.host_count - 1) * output_bytes if len(self.replicas()) > 1 else 0
        return {"tensor-parallel": int(tensor), "data-parallel": int(data),
                "total": int(tensor + data)}

    def lines(self):
        """The summary's lines about hosts; none on one host."""
        if self.host_count < 2:
            return []
        by_host = {}
        for r, h in enumerate(self.hosts):
            by_host.setdefault(h, []).append(r)
        lines = [f"Hosts: {self.host_count} — " + "; ".join(
            f"{h}: ranks {_ranges(rs)}" for h, rs in by_host.items())]
        for what, crosses, detail in self.crossings():
            lines.append(f"  {what}: {'CROSSES HOSTS' if crosses else 'inside hosts'} "
                         f"({detail})")
        if self.wide_groups():
            keep = default_group(self.hosts)
            lines.append(f"  every block's all-reduce goes over the network; "
                         f"tensor_parallel={keep} keeps each group inside a host")
        return lines


def _ranges(ranks):
    """"0-3, 6" for [0, 1, 2, 3, 6]."""
    parts, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            parts.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    return ", ".join(parts)
