"""tfshard's own sharded checkpoint format: the index and its rank files, read.

A checkpoint folder holds `rank-0000r-of-0000N.h5` (Keras's weights layout, that
rank's slices, Fletcher-32 checksums) and `tfshard.json` (format, version, model
config, plan, full shapes, dtypes, per-rank ranges, file sizes and a SHA-256 of
all that). `ShardedStore` reads it at any world size: each full tensor is
assembled from the rank files whose ranges cover the slice asked for, and
every range is checked against what the rank file says it holds.
"""

import hashlib
import json
import os

import numpy as np

from tfshard.io import views as lazy

from tfshard.io.stores import CheckpointError, Store, open_h5


FORMAT = "tfshard-checkpoint"
# 2: the index carries a checksum; every sharded dataset records its rank's range.
# 3: pipeline stages: `pipeline` stages of `tensor_parallel` files each; a tensor's
#    `files` says which file holds each tensor-parallel rank's part.
VERSION = 3
INDEX = "tfshard.json"
# Attributes of each rank file and of each sliced dataset in it, checked on load
# against the index: a file or range moved to another rank is refused.
RANK_ATTR, TP_ATTR, RANGE_ATTR, AXIS_ATTR = ("tfshard_rank", "tfshard_tensor_parallel",
                                             "tfshard_range", "tfshard_axis")


def index_checksum(index):
    """SHA-256 of the index's canonical JSON (every field but the checksum)."""
    body = {k: v for k, v in index.items() if k != "checksum"}
    blob = json.dumps(body, sort_keys=True, default=str, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()



class ShardedView(lazy.TensorView):
    """A full tensor of a sharded checkpoint, assembled from rank files."""

    def __init__(self, key, info, files, label):
        self.key, self.info, self.files = key, info, files
        self.shape = tuple(info["shape"])
        self.dtype = np.dtype(info["dtype"])
        self.name = key
        self.source = label

    def _dataset(self, rank):
        held_in = self.info.get("files")
        f = self.files(held_in[rank] if held_in else rank)
        if self.key not in f:
            raise CheckpointError(
                f"{self.source}: rank file {rank} has no tensor {self.key!r} the index lists.")
        ds = f[self.key]
        axis, ranges = self.info.get("axis"), self.info.get("ranges")
        if axis is not None and RANGE_ATTR in ds.attrs:
            held = [int(x) for x in ds.attrs[RANGE_ATTR]]
            if held != list(ranges[rank]) or int(ds.attrs[AXIS_ATTR]) != axis:
                raise CheckpointError(
                    f"{f.filename}: tensor {self.key!r} holds range {held} on axis "
                    f"{int(ds.attrs[AXIS_ATTR])}, but the index says rank {rank} holds "
                    f"{list(ranges[rank])} on axis {axis}: the index or the rank files were "
                    "edited or mixed from different checkpoints; re-save it.")
        return ds

    def _read(self, ds, index):
        try:
            value = ds[index]
            return lazy.as_bfloat16(value) if lazy.is_bfloat16(ds) else np.asarray(value)
        except OSError as e:
            raise CheckpointError(f"{ds.file.filename}: tensor {self.key!r} cannot be read "
                                  f"(corrupt data, checksum failed?): {e}") from e

    def read(self, index):
        axis, ranges = self.info.get("axis"), self.info.get("ranges")
        if axis is None:
            ds = self._dataset(0)
            if tuple(ds.shape) != self.shape:
                raise CheckpointError(f"{self.source}: {self.key!r} has shape {ds.shape}, index says {self.shape}.")
            return self._read(ds, index if self.shape else ())
        want = index[axis]
        parts, pos = [], want.start
        while pos < want.stop:
            # The rank whose range covers `pos` and reaches furthest (column
            # ranges of replicated K/V heads overlap).
            best = max((r for r, (s, e) in enumerate(ranges) if s <= pos < e),
                       key=lambda r: ranges[r][1], default=None)
            if best is None:
                raise CheckpointError(f"{self.source}: no rank file holds {self.key!r}[{pos}] on axis {axis}.")
            s, e = ranges[best]
            stop = min(e, want.stop)
            ds = self._dataset(best)
            local = list(self.shape)
            local[axis] = e - s
            if tuple(ds.shape) != tuple(local):
                raise CheckpointError(
                    f"{self.source}: rank {best}'s {self.key!r} has shape {ds.shape}, the index says {tuple(local)}.")
            sub = list(index)
            sub[axis] = slice(pos - s, stop - s)
            parts.append(self._read(ds, tuple(sub)))
            pos = stop
        if not parts:
            shape = [len(range(n)[i]) for n, i in zip(self.shape, index)]
            return np.zeros(shape, self.dtype)
        return np.concatenate(parts, axis=axis) if len(parts) > 1 else parts[0]


class ShardedStore(Store):
    """A Keras weights store (read mode) over a sharded checkpoint folder."""

    def __init__(self, folder, index):
        self._init_store("r", label=folder)
        self.folder, self.index = folder, index
        self._open = {}
        self._h5_entry_path = ""
        self._tensors = index["tensors"]

    def _file(self, rank):
        if rank not in self._open:
            name = self.index["files"][rank]
            f = open_h5(os.path.join(self.folder, name))
            held = f.attrs.get(RANK_ATTR)
            of = int(f.attrs.get(TP_ATTR, -1))
            if held is not None and (int(held), of) != (rank, len(self.index["files"])):
                f.close()
                raise CheckpointError(
                    f"{os.path.join(self.folder, name)}: written by rank {int(held)} of {of}, "
                    f"but the index lists it for rank {rank} of {len(self.index['files'])}: "
                    "rank files were renamed or mixed up.")
            self._open[rank] = f
        return self._open[rank]

    def get(self, path):
        self._h5_entry_path = path
        return self

    def _key(self, key):
        return f"{self._h5_entry_path}/vars/{key}" if self._h5_entry_path else f"vars/{key}"

    def has_path(self, path):
        prefix = path.rstrip("/") + "/"
        return any(k.startswith(prefix) for k in self._tensors)

    def keys(self):
        prefix = self._key("")
        return [k[len(prefix):] for k in self._tensors
                if k.startswith(prefix) and "/" not in k[len(prefix):]]

    def __len__(self):
        return len(self.keys())

    def view(self, key):
        full = self._key(key)
        if full not in self._tensors:
            raise CheckpointError(f"{self.describe()}: the index has no tensor {full!r}.")
        return ShardedView(full, self._tensors[full], self._file, self.label)

    def __getitem__(self, key):
        return self.view(key)[()]

    def describe(self):
        return f"{self.label} [{self._h5_entry_path or '/'}]"

    def close(self):
        for f in self._open.values():
            f.close()
        self._open.clear()


def check_index(index, index_path):
    """Refuses an index whose checksum, file list or tensor ranges do not add up.

    Raises:
        CheckpointError: naming the index and, for ranges, the tensor.
    """
    version = int(index.get("version", 0))
    if version >= 2:
        stored = index.get("checksum")
        if stored != index_checksum(index):
            raise CheckpointError(
                f"{index_path}: the index checksum does not match its contents "
                f"({'missing' if stored is None else 'stored ' + str(stored)[:19] + '...'}): "
                "it was edited or damaged after saving; re-save the checkpoint.")
    try:
        size = int(index["tensor_parallel"])
        stages = int(index.get("pipeline", 1))
        files, tensors = list(index["files"]), dict(index["tensors"])
        if len(files) != size * stages or len(index["file_bytes"]) != size * stages:
            raise CheckpointError(f"{index_path}: {len(files)} rank files listed for "
                                  f"tensor_parallel={size} x pipeline={stages}.")
        for key, info in tensors.items():
            held_in = info.get("files")
            if held_in is not None and (len(held_in) != size or not all(
                    isinstance(i, int) and 0 <= i < len(files) for i in held_in)):
                raise CheckpointError(f"{index_path}: tensor {key!r} lists files {held_in}, "
                                      f"not one of the {len(files)} files per rank of {size}.")
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{index_path}: malformed index ({type(e).__name__}: {e}).") from e
    for key, info in tensors.items():
        axis, ranges = info.get("axis"), info.get("ranges")
        if axis is None:
            continue
        shape = info.get("shape") or []
        ok = (isinstance(axis, int) and 0 <= axis < len(shape) and isinstance(ranges, list)
              and len(ranges) == size)
        if ok:
            spans = sorted((int(a), int(b)) for a, b in ranges)
            reach = 0
            for a, b in spans:  # contiguous cover of [0, n); K/V ranges may overlap
                ok = ok and 0 <= a <= reach and a <= b
                reach = max(reach, b)
            ok = ok and reach == shape[axis]
        if not ok:
            raise CheckpointError(
                f"{index_path}: tensor {key!r} (shape {shape}) has ranges {ranges} on axis "
                f"{axis}, which do not cover the axis once per rank of {size}; the index is "
                "damaged.")
