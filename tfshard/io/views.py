"""Lazy views of tensors in files, read one slice at a time.

A view has a `shape`, a `dtype` and numpy-style basic indexing; indexing
reads only the requested slice from disk. The sharded layers' loaders call
`view[..., start:stop, ...]` and never see a whole sharded kernel.

- `H5View`: an HDF5 dataset (h5py reads hyperslabs).
- `SafetensorsView`: a safetensors tensor (`safe_open(...).get_slice`).
- `GGUFView`: a GGUF tensor, memory-mapped; rows are cut before
  dequantising, and only the quantisation blocks covering the asked columns
  are dequantised (`gguf.quants.dequantize`).
- `MappedView`: `transform(source)` where the transform is a chain of
  reshapes and transposes (a keras-hub converter hook, or a GGUF mapping);
  a slice on one axis of the result is traced back to a slice of the
  source, which is read and then transformed with local shapes.
"""

import logging
import os

import numpy as np

log = logging.getLogger("tfshard")


def _normalize_index(index, shape):
    """A tuple of `slice`s (steps of 1), one per axis."""
    if not isinstance(index, tuple):
        index = (index,)
    if any(i is Ellipsis for i in index):
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (len(shape) - len(index) + 1) + index[at + 1:]
    index = index + (slice(None),) * (len(shape) - len(index))
    out = []
    for n, i in zip(shape, index):
        if not isinstance(i, slice):
            raise TypeError(f"only slices are supported when reading a tensor; got {i!r}")
        start, stop, step = i.indices(n)
        if step != 1:
            raise TypeError(f"only unit-step slices are supported; got {i!r}")
        out.append(slice(start, max(start, stop)))
    return tuple(out)


class TensorView:
    """Base of the lazy views: `shape`, `dtype`, `name`, `source` and `[index]`."""

    shape = ()
    dtype = np.dtype("float32")
    name = ""
    source = ""

    def read(self, index):
        raise NotImplementedError

    def __getitem__(self, index):
        return self.read(_normalize_index(index, self.shape))

    def __array__(self, dtype=None, copy=None):
        value = self[()]
        return value if dtype is None else value.astype(dtype)

    def __repr__(self):
        return f"<{type(self).__name__} {self.source}:{self.name} {self.shape} {self.dtype}>"


def is_bfloat16(dataset):
    """Whether an HDF5 dataset holds bfloat16: HDF5 has no such type, so Keras (and
    tfshard) store its raw 16 bits with the attribute dtype="bfloat16"."""
    return dataset.attrs.get("dtype", None) == "bfloat16"


def as_bfloat16(raw):
    """The raw 16-bit values of a bfloat16 dataset, read as bfloat16 (no copy)."""
    import ml_dtypes

    return np.asarray(raw).view(ml_dtypes.bfloat16)


class H5View(TensorView):
    """An h5py dataset; bfloat16 ones (see `is_bfloat16`) read as bfloat16."""

    def __init__(self, dataset, source=""):
        self.dataset = dataset
        self.shape = tuple(dataset.shape)
        self.bfloat16 = is_bfloat16(dataset)
        self.dtype = as_bfloat16(np.zeros(0, np.uint16)).dtype if self.bfloat16 else dataset.dtype
        self.name = dataset.name
        self.source = source

    def read(self, index):
        value = self.dataset[index] if self.shape else self.dataset[()]
        return as_bfloat16(value) if self.bfloat16 else np.asarray(value)


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "float32",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
                       "U8": "uint8", "BOOL": "bool"}


class SafetensorsView(TensorView):
    """One tensor of an open `safetensors.safe_open(..., framework="np")` file."""

    def __init__(self, handle, key, source=""):
        self._slice = handle.get_slice(key)
        self.shape = tuple(self._slice.get_shape())
        self.dtype = np.dtype(_SAFETENSORS_DTYPES.get(self._slice.get_dtype(), "float32"))
        self.name = key
        self.source = source

    def read(self, index):
        return np.asarray(self._slice[index] if self.shape else self._slice[:])


class GGUFView(TensorView):
    """One tensor of a `gguf.GGUFReader`, in numpy axis order (GGUF's reversed).

    Rows are read with `os.pread` (not through the reader's memory map, whose
    touched pages would count in the process's resident memory), a bounded
    number at a time, and only the quantisation blocks covering the asked
    columns are dequantised.

    Args:
        tensor: a `gguf.ReaderTensor` (1-D or 2-D).
        path: the GGUF file.
        source: label for messages.
    """

    def __init__(self, tensor, path, source=""):
        import gguf

        self.tensor = tensor
        self.path = path
        self.qtype = tensor.tensor_type
        self.shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        if len(self.shape) > 2:
            raise ValueError(f"{path}: tensor {tensor.name!r} has {len(self.shape)} axes; "
                             "tfshard reads 1-D and 2-D GGUF tensors.")
        self.dtype = np.dtype("float32")
        self.name = tensor.name
        self.source = source or path
        self._plain = {gguf.GGMLQuantizationType.F32: np.float32,
                       gguf.GGMLQuantizationType.F16: np.float16}.get(self.qtype)
        self._rows = self.shape[0] if len(self.shape) == 2 else 1
        self._row_bytes = int(tensor.n_bytes) // self._rows
        self._offset = int(tensor.data_offset)

    def _raw_rows(self, fd, r0, r1):
        n = (r1 - r0) * self._row_bytes
        buf = os.pread(fd, n, self._offset + r0 * self._row_bytes)
        if len(buf) != n:
            raise ValueError(f"{self.path}: tensor {self.name!r} ends past the end of the file "
                             "(truncated file).")
        return np.frombuffer(buf, np.uint8).reshape(r1 - r0, self._row_bytes)

    def read(self, index):
        import gguf

        rows = index[0] if len(self.shape) == 2 else slice(0, 1)
        cols = index[-1]
        out = np.empty((rows.stop - rows.start, cols.stop - cols.start), np.float32)
        if self._plain is not None:
            block, type_size = 1, np.dtype(self._plain).itemsize
        else:
            block, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        b0, b1 = cols.start // block, -(-cols.stop // block)
        step = max(1, (1 << 20) // max(1, (b1 - b0) * block))
        with open(self.path, "rb") as f:
            for r in range(rows.start, rows.stop, step):
                raw = self._raw_rows(f.fileno(), r, min(rows.stop, r + step))
                raw = np.ascontiguousarray(raw[:, b0 * type_size:b1 * type_size])
                if self._plain is not None:
                    values = raw.view(self._plain)
                else:
                    values = gguf.quants.dequantize(raw, self.qtype)
                out[r - rows.start:r - rows.start + len(raw)] = \
                    values[:, cols.start - b0 * block:cols.stop - b0 * block]
        out_shape = tuple(len(range(n)[i]) for n, i in zip(self.shape, index))
        return out.reshape(out_shape)


class _Tracer:
    """Stands in for an array while a transform runs, recording its reshapes
    and transposes (numpy functions reach it through `__array_function__`)."""

    def __init__(self, shape, ops=()):
        self.shape = tuple(int(n) for n in shape)
        self.ops = list(ops)

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def size(self):
        return int(np.prod(self.shape))

    def reshape(self, *shape, order="C"):
        if order != "C":
            raise _Untraceable(f"reshape(order={order!r})")
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        shape = [int(n) for n in shape]
        if -1 in shape:
            known = int(np.prod([n for n in shape if n != -1]))
            shape[shape.index(-1)] = self.size // known
        if int(np.prod(shape)) != self.size:
            raise ValueError(f"cannot reshape {self.shape} to {tuple(shape)}")
        return _Tracer(shape, self.ops + [("reshape", self.shape, tuple(shape))])

    def transpose(self, *axes):
        axes = axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
        perm = tuple(axes) if axes else tuple(reversed(range(self.ndim)))
        perm = tuple(a % self.ndim for a in perm)
        return _Tracer([self.shape[a] for a in perm],
                       self.ops + [("transpose", self.shape, perm)])

    @property
    def T(self):
        return self.transpose()

    def swapaxes(self, a, b):
        perm = list(range(self.ndim))
        perm[a], perm[b] = perm[b], perm[a]
        return self.transpose(perm)

    def astype(self, dtype, **kwargs):
        return self

    def __array_function__(self, func, types, args, kwargs):
        if func is np.reshape:
            shape = kwargs.get("newshape", kwargs.get("shape", args[1] if len(args) > 1 else None))
            return args[0].reshape(shape, order=kwargs.get("order", "C"))
        if func is np.transpose:
            axes = kwargs.get("axes", args[1] if len(args) > 1 else None)
            return args[0].transpose(*(() if axes is None else (axes,)))
        if func is np.swapaxes:
            return args[0].swapaxes(*args[1:3])
        if func in (np.asarray, np.ascontiguousarray, np.array):
            return args[0]
        raise _Untraceable(getattr(func, "__name__", str(func)))

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        raise _Untraceable(ufunc.__name__)

    def __getattr__(self, name):
        raise _Untraceable(name)


class _Untraceable(Exception):
    """The transform did something other than reshape / transpose."""


def _reshape_groups(in_shape, out_shape):
    """Minimal runs of input and output axes holding the same number of elements."""
    groups, i, j = [], 0, 0
    while i < len(in_shape) or j < len(out_shape):
        i0, j0, pi, pj = i, j, 1, 1
        if i < len(in_shape):
            pi, i = pi * in_shape[i], i + 1
        if j < len(out_shape):
            pj, j = pj * out_shape[j], j + 1
        while pi != pj:
            if pi < pj:
                pi, i = pi * in_shape[i], i + 1
            else:
                pj, j = pj * out_shape[j], j + 1
        groups.append((i0, i, j0, j))
    return groups


def _slice_through_reshape(in_shape, out_shape, axis, start, stop):
    """Maps a slice on one axis of `reshape(x, out_shape)` to one axis of `x`.

    Returns:
        `(in_axis, in_start, in_stop)`, or None when the slice is not a single
        contiguous slice of `x` on one axis.
    """
    for i0, i1, j0, j1 in _reshape_groups(in_shape, out_shape):
        if not j0 <= axis < j1:
            continue
        if any(n != 1 for n in out_shape[j0:axis]):
            return None
        inner = int(np.prod(out_shape[axis + 1:j1]))
        first = next((k for k in range(i0, i1) if in_shape[k] != 1), None)
        if first is None:
            return None
        in_inner = int(np.prod(in_shape[first + 1:i1]))
        a, b = start * inner, stop * inner
        if a % in_inner or b % in_inner:
            return None
        return first, a // in_inner, b // in_inner
    return None


class MappedView(TensorView):
    """`transform(source)` for a transform made of reshapes and transposes.

    Args:
        source: a `TensorView`.
        transform: `fn(array) -> array` written with numpy reshape/transpose
            (e.g. a keras-hub converter's `hook_fn` bound to its target shape).
        name: what this view stands for (the Keras variable path).

    A transform that does anything else is applied to the whole source
    tensor (read in full once, with a log line); its result stays correct.
    """

    def __init__(self, source, transform, name=""):
        self.base = source
        self.transform = transform
        self.name = name or source.name
        self.source = source.source
        self.dtype = source.dtype
        try:
            traced = transform(_Tracer(source.shape))
            self.ops = traced.ops
            self.shape = traced.shape
        except _Untraceable as e:
            self.ops = None
            self.why = str(e)
            probe = np.broadcast_to(np.zeros((), np.float32), source.shape)
            self.shape = tuple(np.shape(transform(probe)))

    def read(self, index):
        sliced = [k for k, (n, i) in enumerate(zip(self.shape, index)) if (i.start, i.stop) != (0, n)]
        if self.ops is None or len(sliced) > 1:
            if self.ops is None:
                log.info("%s: transform uses %s; reading %s whole", self.name, self.why, self.base.name)
            return np.asarray(self.transform(self.base[()]))[index]
        if not sliced:
            return self._apply(self.base[()], None)
        axis = sliced[0]
        start, stop = index[axis].start, index[axis].stop
        # Walk the ops backwards, carrying the slice to the source's axes.
        local_shapes = []
        for kind, in_shape, arg in reversed(self.ops):
            out_shape = tuple(in_shape[a] for a in arg) if kind == "transpose" else arg
            local = list(out_shape)
            local[axis] = stop - start
            local_shapes.append(tuple(local))
            if kind == "transpose":
                axis = arg[axis]
            else:
                mapped = _slice_through_reshape(in_shape, out_shape, axis, start, stop)
                if mapped is None:
                    log.info("%s: slice not contiguous in %s; reading it whole",
                             self.name, self.base.name)
                    return np.asarray(self.transform(self.base[()]))[index]
                axis, start, stop = mapped
        src_index = [slice(None)] * len(self.base.shape)
        src_index[axis] = slice(start, stop)
        return self._apply(self.base[tuple(src_index)], list(reversed(local_shapes)))

    def _apply(self, value, local_shapes):
        for k, (kind, in_shape, arg) in enumerate(self.ops):
            if kind == "transpose":
                value = np.transpose(value, arg)
            else:
                value = np.reshape(value, arg if local_shapes is None else local_shapes[k])
        return np.asarray(value)
