"""`ResolvedPlan`: a plan resolved for a model and a world size, and how it reports itself.

Its reports: summary, totals, markdown, the collectives per token, to_dict.
"""

import dataclasses

import numpy as np

from tfshard.layers import walk
from tfshard.layers.base import sliced_variables
from tfshard.plan.structure import main_dtype, var_bytes


class ResolvedPlan:
    """A plan resolved against a model and a world size: what each layer's cut is.

    Returned by `Plan.resolve` (and `Plan.auto(model, size)`); a sharded
    model's `plan`. Passing it to `tfshard.shard` again resolves its request
    anew for that model.

    Attributes:
        request: the `Plan` it was resolved from.
        entries: one `PlanEntry` per supported layer, in model order.
        attention: `HeadCounts` of the attention blocks cut by heads.
        size: the number of tensor-parallel ranks.
        rank: the rank whose local shapes and bytes the summaries show.
        total_bytes: the unsharded model's bytes.
        comm_dtype: the 16-bit dtype float32 collectives are sent in (None: as is).
        sums_16bit: whether all-reduces are sent in 16 bits too (the backend's
            `sends_16bit_sums`), else only the all-gathers.
    """

    resolved = True

    def __init__(self, request, entries, attention, size, rank, total_bytes, comm_dtype=None,
                 sums_16bit=False):
        self.request = request
        self.comm_dtype = comm_dtype
        self.sums_16bit = bool(comm_dtype and sums_16bit)
        self.entries = list(entries)
        self.attention = tuple(attention)
        self.size = size
        self.rank = rank
        self.total_bytes = total_bytes
        self.stages = None  # a `StagePlan` under pipeline parallelism
        self.stage = None  # the stage this rank runs
        self.held_bytes = None  # the bytes this rank holds, measured, under stages
        self.devices = None  # stages on one process's devices: stage s on devices[s]
        self.layout = None  # a `Layout`: the ranks' hosts, set by shard()
        self.placement = None  # this rank's cores and threads, set by shard()

    def with_stages(self, stages, stage, held_bytes, devices=None):
        """This plan with the pipeline's `StagePlan`, the stage this rank runs and the
        bytes it holds (measured after the cut); or, for stages on the devices of one
        process (`stage` None), each stage's device and the bytes on it."""
        out = ResolvedPlan(self.request, self.entries, self.attention, self.size, self.rank,
                           self.total_bytes, self.comm_dtype, self.sums_16bit)
        out.stages, out.stage, out.held_bytes = stages, stage, held_bytes
        out.devices = None if devices is None else list(devices)
        out.layout = self.layout
        out.placement = self.placement
        return out

    def _where_stages_run(self):
        """Who runs the stages: this rank's one, or every stage on its own device."""
        if self.devices is None:
            return f"this rank runs stage {self.stage}"
        return "; ".join(f"stage {s} on {d.split('device:')[-1]}"
                         + (f" ({format_bytes(self.held_bytes[s])})" if self.held_bytes else "")
                         for s, d in enumerate(self.devices))

    @property
    def rules(self):
        """The request's rules (None: the auto plan)."""
        return self.request.rules

    def resolve(self, model, size, rank=0):
        """Resolves this plan's request again (see `Plan.resolve`)."""
        return self.request.resolve(model, size, rank)

    def measure(self, model):
        """`{path: (dtype, full bytes, this rank's bytes)}` of the plan's layers as they
        are in `model` now (a sharded model, after quantizing)."""
        layers = {n.path: n.layer for n in walk(model)}
        out = {}
        for e in self.entries:
            layer = layers[e.path]
            local = var_bytes(layer.weights)
            saved = sliced_variables(layer)
            full = local if saved is None else sum(
                int(np.prod(shape)) * np.dtype(var.dtype).itemsize for var, _, shape, _ in saved)
            out[e.path] = (main_dtype(layer), full, local)
        return out

    def with_bytes(self, measured):
        """This plan with layers' dtypes and bytes measured anew (after quantizing).

        Args:
            measured: `{path: (dtype, full_bytes, local_bytes per rank)}`.

        Returns:
            A `ResolvedPlan` with the same cuts.
        """
        entries = [dataclasses.replace(e, dtype=measured[e.path][0], full_bytes=measured[e.path][1],
                                       local_bytes=tuple(measured[e.path][2]))
                   if e.path in measured else e for e in self.entries]
        total = self.total_bytes + sum(a.full_bytes - b.full_bytes
                                       for a, b in zip(entries, self.entries))
        return ResolvedPlan(self.request, entries, self.attention, self.size, self.rank, total,
                            self.comm_dtype, self.sums_16bit)

    def with_comm_dtype(self, comm_dtype, sums_16bit=False):
        """This plan with float32 collectives sent in `comm_dtype` (None: unchanged).

        Args:
            comm_dtype: "bfloat16", "float16" or None.
            sums_16bit: whether the backend sends all-reduces in 16 bits too
                (`Communicator.sends_16bit_sums`).
        """
        if comm_dtype is None:
            return self
        return ResolvedPlan(self.request, self.entries, self.attention, self.size, self.rank,
                            self.total_bytes, comm_dtype, sums_16bit)

    # -- reporting --------------------------------------------------------- #

    @property
    def sharded(self):
        """Entries that are cut (not replicated)."""
        return [e for e in self.entries if e.rule != "replicate"]

    def local_bytes(self, rank=None):
        """Parameter bytes this rank holds after the cut (all variables)."""
        rank = self.rank if rank is None else rank
        sharded_full = sum(e.full_bytes for e in self.sharded)
        return self.total_bytes - sharded_full + sum(e.local_bytes[rank] for e in self.sharded)

    def communication(self):
        """The collectives one forward pass makes, per cut layer, in Megatron's terms.

        A row-parallel layer all-reduces its output; a vocab-parallel lookup
        all-reduces the embeddings; a column-parallel layer that gathers its
        output all-gathers it; a vocab-parallel `ReversibleEmbedding` also
        all-gathers the logits when called with `reverse=True` (tied LM heads).

        Returns:
            A list of `(path, collective, elements_per_token)`, where
            `collective` is "all-reduce", "all-gather" or "all-gather (logits)"
            and `elements_per_token` the size of the full result per token.
        """
        out = []
        for e in self.sharded:
            if e.rule == "row":
                out.append((e.path, "all-reduce", int(e.full_shape[-1])))
            elif e.rule == "vocab":
                out.append((e.path, "all-reduce", int(e.full_shape[-1])))
                if e.kind == "ReversibleEmbedding":
                    out.append((e.path, "all-gather (logits)", int(e.full_shape[0])))
            elif e.gather_output:
                out.append((e.path, "all-gather", int(np.prod(e.full_shape[1:]))))
        return out

    def _rows(self, rank):
        """Header and one row of cells per layer, shared by `summary` and `markdown`."""
        by_path = {}
        for path, op, n in self.communication():
            by_path.setdefault(path, []).append(f"{op} {n}")
        yield ("layer", "kind", "rule", "full shape", "local shape", "dtype", "bytes here",
               "collective/token", "note")
        for e in self.entries:
            yield (e.path, e.kind, e.rule + (":gather" if e.gather_output else ""),
                   str(e.full_shape), str(e.local_shape(rank)), e.dtype,
                   format_bytes(e.local_bytes[rank]),
                   ", ".join(by_path.get(e.path, [])), e.note)

    def totals(self, rank=None):
        """Two lines: this rank's bytes (sharded, replicated, total) and the collectives
        of one forward pass (count and fp32 bytes per token)."""
        rank = self.rank if rank is None else rank
        sharded_full = sum(e.full_bytes for e in self.sharded)
        sharded_local = sum(e.local_bytes[rank] for e in self.sharded)
        replicated = self.total_bytes - sharded_full
        memory = (
            f"rank {rank} of {self.size}: sharded {format_bytes(sharded_full)} -> "
            f"{format_bytes(sharded_local)} here; replicated {format_bytes(replicated)}; "
            f"total here {format_bytes(sharded_local + replicated)} of "
            f"{format_bytes(self.total_bytes)} unsharded "
            f"({len(self.sharded)} of {len(self.entries)} layers cut)"
        )
        comm = communication_line(self.communication(), self.wire_itemsizes())
        if self.stages is not None and self.devices is not None:
            memory = (f"{self.stages.stages} pipeline stages on this process's devices: "
                      f"{self._where_stages_run()}; {format_bytes(self.total_bytes)} unsharded")
            comm = "one copy of the activation to the next device per stage boundary"
        elif self.stages is not None:
            blocks = self.stages.blocks_of(self.stage)
            span = blocks[0].name + (f" .. {blocks[-1].name}" if len(blocks) > 1 else "")
            memory = (f"pipeline stage {self.stage} of {self.stages.stages} ({len(blocks)} "
                      f"block(s): {span}), tensor-parallel rank "
                      f"{rank} of {self.size}: holds {format_bytes(self.held_bytes)} of "
                      f"{format_bytes(self.total_bytes)} unsharded")
            comm += (" (the table counts every stage's layers; a stage runs its own) + one "
                     "send of the activation per stage boundary")
        return [memory, comm]

    def wire_itemsizes(self):
        """`{(path, collective): bytes per element}` of `communication()`'s entries."""
        by_path = {e.path: e for e in self.sharded}
        out = {}
        for p, op, _ in self.communication():
            entry = by_path[p]
            size = entry.wire_itemsize(op.split()[0])
            # CompressedCommunicator's cast (16-bit dtypes are sent as they are); an int8
            # row layer all-reduces int32 partials, which it leaves alone.
            if self.comm_dtype and entry.compute_dtype in ("float32", "bfloat16", "float16") \
                    and (op != "all-reduce" or (self.sums_16bit and entry.dtype != "int8")):
                size = 2
            out[(p, op)] = size
        return out

    def markdown(self, rank=None):
        """The plan as a markdown table (TensorBoard's text dashboard renders it).

        Args:
            rank: whose local shapes and bytes to show (default: this plan's rank).

        Returns:
            The table (the columns of `summary`), then the `totals` lines.
        """
        rank = self.rank if rank is None else rank
        header, *rows = self._rows(rank)
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines += [""] + self.totals(rank)
        if self.stages is not None:
            header, *rows = self.stages.rows()
            lines += ["", f"Pipeline ({self._where_stages_run()}):", "",
                      "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)

    def summary(self, rank=None):
        """A table of the plan: layer path, rule, full shape, local shape, bytes.

        Args:
            rank: whose local shapes and bytes to show (default: this plan's rank).

        Returns:
            The table as a string, then the `totals` lines: sharded and
            replicated bytes, and the collectives of one forward pass (count
            and fp32 bytes per token).
        """
        rank = self.rank if rank is None else rank
        rows = list(self._rows(rank))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.append("-" * len(lines[0]))
        lines += self.totals(rank)
        if self.stages is not None:
            lines += ["", self.stages.summary(), f"{self._where_stages_run()}; the table "
                      "above lists every stage's layers, cut for tensor parallelism"]
        if self.layout is not None and self.layout.lines():
            lines += [""] + self.layout.lines()
        if self.placement is not None:
            lines += ["", self.placement.line()]
        return "\n".join(lines)

    def to_dict(self):
        """A JSON-able description of the resolved plan."""
        return {
            "size": self.size,
            "entries": [
                {"path": e.path, "kind": e.kind, "rule": e.rule, "axis": e.axis,
                 "ranges": [list(r) for r in e.ranges] if e.ranges else None,
                 "gather_output": e.gather_output, "input_is_parallel": e.input_is_parallel,
                 "full_shape": list(e.full_shape)}
                for e in self.entries
            ],
            "attention": [dataclasses.asdict(h) for h in self.attention],
            "stages": self.stages.to_dict() if self.stages is not None else None,
        }

    def __repr__(self):
        return f"<ResolvedPlan size={self.size} cut={len(self.sharded)}/{len(self.entries)}>"



def communication_line(ops, itemsizes=None):
    """One line totalling a forward pass's collectives (bytes per token on the wire).

    Args:
        ops: `ResolvedPlan.communication()`.
        itemsizes: `{(path, collective): bytes per element}`; default 4 (fp32).
    """
    if not ops:
        return "per forward: no collectives"
    itemsizes = itemsizes or {}
    parts, widths = [], set()
    for op in ("all-reduce", "all-gather", "all-gather (logits)"):
        sizes = [n * itemsizes.get((p, o), 4) for p, o, n in ops if o == op]
        widths.update(itemsizes.get((p, o), 4) for p, o, _ in ops if o == op)
        if sizes:
            parts.append(f"{len(sizes)} {op}{'s' if len(sizes) > 1 and '(' not in op else ''} "
                         f"({format_bytes(sum(sizes))}/token)")
    tied = any(o == "all-gather (logits)" for _, o, _ in ops)
    how = " in fp32" if widths == {4} else " (" + ", ".join(_widths_text(ops, itemsizes)) + ")"
    return ("per forward: " + ", ".join(parts) + how
            + ("; the logits gather only when a tied head computes logits" if tied else ""))

def _widths_text(ops, itemsizes):
    """How wide each kind of collective is on the wire, e.g. ["16-bit all-reduces", ...]."""
    out = []
    for kind, label in (("all-reduce", "all-reduces"), ("all-gather", "gathers")):
        widths = {itemsizes.get((p, o), 4) for p, o, _ in ops if o.startswith(kind)}
        if widths:
            out.append(("fp32 " if widths == {4} else "16-bit " if widths == {2} else "mixed ")
                       + label)
    return out


def format_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
