"""Keras weight stores over HDF5, and `CheckpointError`.

Keras's own `saving_lib._load_state` / `_save_state` walk a model and talk to a
weights store; these stores give it lazy views (`tfshard.io.views`) instead of
whole arrays, so a sharded layer reads only its slice.
"""

import os

import h5py
from keras.src.saving import saving_lib

from tfshard.io import views as lazy


class CheckpointError(ValueError):
    """A file that cannot be loaded: missing, truncated, corrupt or mismatched."""


class OffsetFile:
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


class Store(saving_lib.H5IOStore):
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


class SliceStore(Store):
    """A Keras weights store (read mode) whose entries also give lazy views.

    Keras's `_load_state` drives it; plain layers read whole arrays with
    `store[key]`, sharded layers read their slice through `store.view(key)`.
    """

    def __init__(self, h5_file, label):
        self._init_store("r", h5_file, label)

    def view(self, key):
        if key not in self._h5_entry_group:
            raise CheckpointError(f"{self.describe()} has no tensor {key!r}.")
        return lazy.H5View(self._h5_entry_group[key], source=self.label)

    def __getitem__(self, key):
        return self.view(key)[()]

    def describe(self):
        return f"{self.label} [{self._h5_entry_path or '/'}]"

    def close(self):
        pass




def open_h5(path):
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: file not found.")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise CheckpointError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {e}") from e


def run_keras_load(model, store, assets=None, label=""):
    """Keras's own traversal (`_load_state`), with errors naming the file."""
    try:
        saving_lib._load_state(model, weights_store=store, assets_store=assets,
                               inner_path="", visited_saveables=set())
    except CheckpointError:
        raise
    except (ValueError, KeyError, OSError, TypeError) as e:
        raise CheckpointError(f"{label}: {e}") from e
