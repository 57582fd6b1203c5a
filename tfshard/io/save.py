"""Saving a sharded model: a sharded checkpoint folder, or a gathered `.keras` file.

Written into `PATH.incomplete-HOST-PID-ID` and renamed into place after every
rank has finished and the index is on disk, so a crash never leaves a folder
that loads at PATH; the next save of PATH removes what dead saves left.

Several hosts need no shared file system: a host that does not see rank 0's
folder writes its ranks' files into a folder of its own at the same PATH (and
renames it into place itself). Copy every host's `rank-*.h5` into rank 0's
folder to load the checkpoint on one host.
"""

import datetime
import json
import os
import shutil
import socket
import uuid
import zipfile

import h5py
import keras
import numpy as np
from keras.src.saving import saving_lib

from tfshard.io.formats import agree_on_failure
from tfshard.io.sharded import AXIS_ATTR, FORMAT, INDEX, RANGE_ATTR, RANK_ATTR, TP_ATTR, VERSION, index_checksum
from tfshard.io.stores import Store


class _WriteStore(Store):
    """A Keras weights store (write mode) that sharded layers write slices to.

    Args:
        path: the HDF5 file to write, or None on ranks that write nothing.
        gather: True: sharded weights are gathered to full tensors (written by
            the rank with a file); False: each rank writes its own slices and
            replicated weights are written only where `write_replicated`.
        write_replicated: write the weights of plain (replicated) layers.
        pieces: with `gather`, when several ranks live in this process
            (MirroredStrategy): `{key: {rank: rows}}` the other local ranks'
            slices were collected into (a store without a file collects;
            one with a file assembles from them instead of a collective).
    """

    def __init__(self, path, gather, write_replicated, pieces=None):
        self._init_store("w", h5py.File(path, "w") if path else None, label=path)
        self.path_or_io = path
        self.gather, self.write_replicated = gather, write_replicated
        self.pieces = pieces
        self.tensors = {}

    def make(self, path, metadata=None):
        self._h5_entry_path = path
        self._h5_entry_group = {}
        self._h5_entry_initialized = False
        self._metadata = metadata
        return self

    def _key(self, key):
        return f"{self._h5_entry_path}/vars/{key}" if self._h5_entry_path else f"vars/{key}"

    def _write(self, key, value):
        if self.h5_file is None:
            return
        if not self._h5_entry_initialized:
            self._create_h5_group(self._h5_entry_path, metadata=self._metadata)
        value = np.asarray(value)
        if value.ndim and value.size:
            ds = self._h5_entry_group.create_dataset(key, data=value, chunks=True,
                                                     fletcher32=not self.gather)
        else:
            self._h5_entry_group[key] = value
            ds = self._h5_entry_group[key]
        if value.dtype.name == "bfloat16":
            ds.attrs["dtype"] = "bfloat16"  # as Keras marks it (HDF5 has no bfloat16)

    def __setitem__(self, key, value):
        value = keras.ops.convert_to_numpy(value)
        self.tensors[self._key(key)] = {"shape": list(value.shape), "dtype": value.dtype.name,
                                        "axis": None, "ranges": None}
        if self.gather or self.write_replicated:
            self._write(key, value)

    def write_shard(self, key, value, axis, ranges, rank, full_shape, comm, name):
        """Called by sharded layers: this rank's slice of one weight."""
        if axis is None:
            self.__setitem__(key, value)
            return
        self.tensors[self._key(key)] = {"shape": list(full_shape), "dtype": value.dtype.name,
                                        "axis": axis, "ranges": [list(r) for r in ranges]}
        if not self.gather:
            self._write(key, value)
            if self.h5_file is not None and value.ndim and value.size:
                ds = self._h5_entry_group[key]
                ds.attrs[RANGE_ATTR] = np.asarray(ranges[rank], dtype=np.int64)
                ds.attrs[AXIS_ATTR] = int(axis)
            return
        moved = np.ascontiguousarray(np.moveaxis(value, axis, 0))
        if self.pieces is not None:  # the ranks of this process: no collective
            if self.h5_file is None:
                self.pieces.setdefault(self._key(key), {})[rank] = moved
                return
            mine = {**self.pieces.pop(self._key(key), {}), rank: moved}
            missing = sorted(set(range(len(ranges))) - set(mine))
            if missing:
                raise ValueError(f"{name}: no slice of rank(s) {missing} in this process.")
            rows = np.concatenate([mine[r] for r in range(len(ranges))])
        else:
            rows = comm.gather_to_root(moved)
        if rows is None or self.h5_file is None:
            return
        full = np.empty(np.moveaxis(np.empty(full_shape, dtype=np.bool_), axis, 0).shape, value.dtype)
        offset = 0
        for start, stop in ranges:
            full[start:stop] = rows[offset:offset + stop - start]
            offset += stop - start
        self._write(key, np.moveaxis(full, 0, axis))

    def close(self):
        if self.h5_file is not None:
            self.h5_file.flush()
            self.h5_file.close()
            self.h5_file = None


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(sharded, path, gather=False, overwrite=True):
    """Saves a `ShardedModel`; see `ShardedModel.save`."""
    if not all(hasattr(sharded, a) for a in ("inner", "plan", "world", "tp_comm", "group")):
        raise TypeError(f"tfshard save needs a ShardedModel; got {type(sharded).__name__}.")
    path = os.path.abspath(os.fspath(path))
    world = sharded.world
    comm = world.comm
    config = sharded.source_config
    if config is None:
        raise ValueError(
            f"{path}: model {sharded.inner.name!r} has no serializable config "
            f"({sharded.source_config_error}); tfshard saves models that keras.saving can "
            "serialize (implement get_config on custom layers).")
    if gather and not path.endswith(".keras"):
        raise ValueError(f"{path}: save(gather=True) writes a .keras file; end the path with .keras.")
    if not gather and path.endswith((".keras", ".h5")):
        raise ValueError(f"{path}: a sharded checkpoint is a folder; use a path without .keras/.h5, "
                         "or gather=True for a single .keras file.")
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"{path} exists; pass overwrite=True to replace it.")
    if comm.rank == 0:
        remove_stale_partials(path)
    # The name says what it is, and who wrote it: a save killed midway leaves
    # PATH.incomplete-HOST-PID-ID, which loads never read and the next save of
    # PATH removes once that process is gone.
    token = comm.allgather_object(
        f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}" if comm.rank == 0 else None)[0]
    tmp = f"{path}{PARTIAL}{token}"
    error = tensors = None
    own, written = comm.rank == 0, {}
    try:
        if gather:
            _save_gathered(sharded, tmp, config)
        else:
            own = _make_folders(comm, tmp, sharded.group == 0)
            tensors, written = _save_sharded(sharded, tmp, config)
            if comm.rank == 0:
                _save_preprocessor(sharded, tmp)
    except Exception as e:
        error = e
    try:
        agree_on_failure(comm, error, f"save({path!r})")
    except Exception:
        if own:
            shutil.rmtree(tmp, ignore_errors=True) if os.path.isdir(tmp) else (
                os.path.exists(tmp) and os.remove(tmp))
        raise
    sizes = {} if gather else {
        f: n for part in comm.allgather_object(written) for f, n in part.items()}
    if comm.rank == 0 and not gather:
        _write_index(sharded, tmp, config, tensors, sizes)
    error = None
    if own:
        try:
            _replace(tmp, path)
        except Exception as e:
            error = e
    agree_on_failure(comm, error, f"save({path!r})")
    return path


def _save_preprocessor(sharded, tmp):
    """The preprocessor (tokenizer) and chat template the model came with, into the
    checkpoint, as keras-hub presets keep them (`tfshard.io.preprocessors`)."""
    from tfshard.io import preprocessors

    preprocessor = getattr(sharded.inner, "preprocessor", None) or sharded.preprocessor
    if preprocessor is not None and hasattr(preprocessor, "tokenizer"):
        preprocessors.save(preprocessor, os.path.join(tmp, preprocessors.FOLDER),
                           getattr(sharded, "chat_template", None))


def _make_folders(comm, tmp, writes):
    """Creates the folder `tmp` on rank 0, and on every host that cannot see it (no
    shared file system) but has ranks that write (`writes`), by that host's first
    writing rank.

    Every rank raises the same error if a folder cannot be made.

    Returns:
        Whether this rank renames its host's folder into place at the end.
    """
    def make():
        try:
            os.makedirs(tmp)
        except OSError as e:
            return f"rank {comm.rank} cannot create {tmp}: {e}"
        return None

    failed = [m for m in comm.allgather_object(make() if comm.rank == 0 else None) if m]
    seen = comm.allgather_object(os.path.isdir(tmp)) if not failed else []
    own = comm.rank == 0
    if not failed and not all(seen):
        hosts = comm.hosts()
        writers = comm.allgather_object(bool(writes))
        leaders = {hosts[r]: r for r in reversed(range(comm.size))
                   if not seen[r] and writers[r]}
        own = own or comm.rank in leaders.values()
        failed = [m for m in comm.allgather_object(
            make() if comm.rank in leaders.values() else None) if m]
    if failed:
        raise OSError("; ".join(failed))
    return own


PARTIAL = ".incomplete-"


def remove_stale_partials(path):
    """Removes what killed saves of `path` left: `PATH.incomplete-HOST-PID-ID[.old]`
    written by a process of this host that no longer runs.

    Returns:
        The paths removed.
    """
    folder, base = os.path.split(os.path.abspath(path))
    removed = []
    try:
        names = os.listdir(folder or ".")
    except OSError:
        return removed
    host = socket.gethostname()
    for name in names:
        if not name.startswith(base + PARTIAL):
            continue
        owner = name[len(base + PARTIAL):].rsplit("-", 2)
        if len(owner) != 3 or owner[0] != host or not owner[1].isdigit():
            continue  # another host's save, or not ours: leave it
        if _alive(int(owner[1])):
            continue  # a save in progress
        full = os.path.join(folder, name)
        shutil.rmtree(full, ignore_errors=True) if os.path.isdir(full) else os.remove(full)
        removed.append(full)
    return removed


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _replace(tmp, path):
    """Moves `tmp` to `path`; an existing `path` is removed only after."""
    if os.path.isdir(tmp):
        old = None
        if os.path.exists(path):
            old = f"{tmp}.old"
            os.rename(path, old)
        os.rename(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)
    else:
        os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _rank_file(rank, size):
    return f"rank-{rank:05d}-of-{size:05d}.h5"


def _save_sharded(sharded, tmp, config):
    """Writes this rank's file of a sharded checkpoint into `tmp`.

    Returns:
        `(table, written)`: the index's tensor table (`{key: shape, dtype, axis,
        ranges}`) on ranks that wrote a file, else None; and `{file name: bytes}`
        of the files this rank wrote.
    """
    stages = getattr(sharded, "pipeline", 1)
    if stages > 1:
        # Pipeline stages: every rank of group 0 writes its stage's part; rank 0 learns
        # which file holds what.
        table = None
        if sharded.group == 0:
            group = sharded.group_comm
            table = _save_rank(sharded.inner, sharded.tp_comm, tmp, group.rank, group.size)
        tables = sharded.world.comm.allgather_object(table)
        return (_merge_stage_tables(tables[:sharded.group_size], sharded.tensor_parallel),
                _sizes(tmp, [_rank_file(group.rank, group.size)] if table is not None else []))
    if sharded.group != 0:
        return None, {}  # data-parallel replicas hold the same slices as group 0
    # One file per rank of this process: several under MirroredStrategy.
    tables = [_save_rank(replica.model, replica.comm, tmp) for replica in sharded.replicas]
    return tables[0], _sizes(tmp, [_rank_file(r.comm.rank, r.comm.size)
                                   for r in sharded.replicas])


def _sizes(folder, names):
    return {n: os.path.getsize(os.path.join(folder, n)) for n in names}


def _merge_stage_tables(tables, tp):
    """One tensor table from the tables of a pipeline's ranks (stage by stage, `tp`
    ranks each): every tensor records the file of each tensor-parallel rank's part
    (a layer both the first and the last stage run, a tied embedding, is taken from
    the first)."""
    merged = {}
    for index, table in enumerate(tables):
        stage, rank = divmod(index, tp)
        for key, info in table.items():
            entry = merged.setdefault(key, dict(info, files=[None] * tp, stage=stage))
            if entry["stage"] != stage:
                continue
            if info["axis"] is None:
                if rank == 0:  # written by the stage's first rank only
                    entry["files"] = [index] * tp
            else:
                entry["files"][rank] = index
    for entry in merged.values():
        entry.pop("stage")
    return merged


def _save_rank(model, tp, tmp, file_index=None, files=None):
    """Writes one rank's file (`model` holds its slices, `tp` is its tensor-parallel
    group) into `tmp`; returns its tensor table.

    Args:
        file_index, files: under pipeline stages, the file's index among the
            pipeline's `files` (default: the tensor-parallel rank and size).
    """
    file_index = tp.rank if file_index is None else file_index
    files = tp.size if files is None else files
    name = os.path.join(tmp, _rank_file(file_index, files))
    store = _WriteStore(name, gather=False, write_replicated=tp.rank == 0)
    store.h5_file.attrs[RANK_ATTR] = file_index
    store.h5_file.attrs[TP_ATTR] = files
    assets = archive = None
    try:
        if file_index == 0:
            archive = zipfile.ZipFile(os.path.join(tmp, "assets.zip"), "w")
            assets = saving_lib.DiskIOStore("assets", archive=archive, mode="w")
        saving_lib._save_state(model, weights_store=store, assets_store=assets,
                               inner_path="", visited_saveables=set())
    finally:
        store.close()
        if assets is not None:
            assets.close()
            empty = not archive.namelist()
            archive.close()
            if empty:
                os.remove(os.path.join(tmp, "assets.zip"))
    _fsync(name)
    return store.tensors


def _write_index(sharded, tmp, config, tensors, sizes):
    tp = sharded.tp_comm
    stages = getattr(sharded, "pipeline", 1)
    files = [_rank_file(r, tp.size * stages) for r in range(tp.size * stages)]
    index = {
        "format": FORMAT,
        "version": VERSION,
        "tensor_parallel": tp.size,
        "pipeline": stages,
        "files": files,
        "file_bytes": [sizes[f] for f in files],
        "keras_version": keras.__version__,
        "date_saved": datetime.datetime.now().isoformat(timespec="seconds"),
        "model_config": config,
        "plan": sharded.plan.to_dict(),
        "tensors": tensors,
    }
    index = json.loads(json.dumps(index, default=str))  # the checksum covers what is written
    index["checksum"] = index_checksum(index)
    with open(os.path.join(tmp, INDEX + ".tmp"), "w") as f:
        json.dump(index, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.rename(os.path.join(tmp, INDEX + ".tmp"), os.path.join(tmp, INDEX))


def _save_gathered(sharded, tmp, config):
    root = sharded.world.comm.rank == 0
    weights = f"{tmp}.weights.h5" if root else None
    pieces = None
    if len(sharded.replicas) > 1:
        # Several ranks in this process (MirroredStrategy): the others' slices are
        # collected first, then assembled as rank 0's store writes each weight.
        pieces = {}
        for replica in sharded.replicas[1:]:
            saving_lib._save_state(replica.model, weights_store=_WriteStore(
                None, gather=True, write_replicated=False, pieces=pieces),
                assets_store=None, inner_path="", visited_saveables=set())
    store = _WriteStore(weights, gather=True, write_replicated=False, pieces=pieces)
    zf = zipfile.ZipFile(tmp, "w") if root else None
    assets = saving_lib.DiskIOStore("assets", archive=zf, mode="w") if root else None
    try:
        saving_lib._save_state(sharded.inner, weights_store=store, assets_store=assets,
                               inner_path="", visited_saveables=set())
        store.close()
        if root:
            meta = {"keras_version": keras.__version__,
                    "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S")}
            zf.writestr("metadata.json", json.dumps(meta))
            zf.writestr("config.json", json.dumps(config, default=str))
            zf.write(weights, "model.weights.h5")
    finally:
        store.close()
        if assets is not None:
            assets.close()
        if zf is not None:
            zf.close()
        if weights and os.path.exists(weights):
            os.remove(weights)
    if root:
        _fsync(tmp)
