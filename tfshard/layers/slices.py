"""Reading one rank's slice of a weight, and giving a variable its value.

A sharded layer holds one slice of each big weight. These helpers read that
slice from a numpy array or a lazy view of a file (only the slice is read, a
few MiB at a time) and give it to the variable without the extra whole-size
copies a plain `var.assign(numpy)` makes: a load's peak memory is set by the
largest tensor's transient, so a SmolLM2 embedding table (108 MiB) costs one
extra copy on the way, not three.
"""

import numpy as np
import tensorflow as tf


def read_slice(array, axis, start, stop):
    """`array[..., start:stop, ...]` on `axis`, reading only that slice.

    Args:
        array: a numpy array or a lazy view (`shape` + numpy-style indexing).
        axis: the axis to cut, or None for the whole array.
        start, stop: the range on `axis`.

    Returns:
        A numpy array.
    """
    if axis is None:
        return np.asarray(array[()] if not isinstance(array, np.ndarray) else array)
    index = [slice(None)] * len(array.shape)
    index[axis] = slice(start, stop)
    return np.asarray(array[tuple(index)])


CHUNK_BYTES = 4 << 20


def assign_slice(var, source, axis, start, stop):
    """`var.assign(source[..., start:stop, ...])`, read in pieces along `axis`.

    A large slice is read from `source` a few MiB at a time; each piece becomes
    a small tensor and the pieces are joined once (`set_value` then hands that
    tensor to the variable). Never by TensorFlow's sliced assignment
    (`var[a:b].assign`): that puts the variable in copy-on-read mode for good,
    after which every read in a forward pass copies the whole weight (a
    vocab-parallel SmolLM2 embedding lookup went from 0.6 ms to 50 ms).

    Args:
        var: a Keras variable of the slice's shape (with memory, or still
            deferred: see `set_value`).
        source: a numpy array or a lazy view of the full weight.
        axis: the cut axis of `source` (None: assign it whole).
        start, stop: this rank's range on `axis`.
    """
    dtype = np.dtype(var.dtype)
    if axis is None:
        # Read whole (a view's transform may need the whole tensor), converted in
        # pieces, so that a copy read from a view is gone before the pieces are joined.
        whole = read_slice(source, None, None, None)
        pieces = _pieces_of(whole, dtype)
        del whole
        set_value(var, _joined(pieces, 0))
        return
    count = stop - start
    row_bytes = int(np.prod(var.shape)) * dtype.itemsize // max(count, 1)
    step = max(1, CHUNK_BYTES // max(row_bytes, 1))
    pieces = [tf.constant(np.asarray(read_slice(source, axis, start + a, start + min(count, a + step)),
                                     dtype=dtype))
              for a in range(0, count, step)]
    set_value(var, _joined(pieces, axis))


def _pieces_of(array, dtype):
    """`array` as tensors of a few MiB each along axis 0 (a 0-d array: one)."""
    if array.ndim == 0 or array.nbytes <= CHUNK_BYTES:
        return [tf.constant(np.asarray(array, dtype=dtype))]
    row_bytes = max(1, array.nbytes // max(1, array.shape[0]))
    step = max(1, CHUNK_BYTES // row_bytes)
    return [tf.constant(np.asarray(array[a:a + step], dtype=dtype))
            for a in range(0, array.shape[0], step)]


def _joined(pieces, axis):
    """One tensor from `pieces` (emptied on the way, so they are freed with it)."""
    if len(pieces) == 1:
        return pieces.pop()
    joined = tf.concat(pieces, axis)
    pieces.clear()
    return joined


def set_value(var, value):
    """`var.assign(value)`, or, for a variable still without memory, its creation.

    A deferred variable (`tfshard.io.deferred`) is created from `value` itself:
    TensorFlow's variable then shares the tensor's buffer, so it never holds
    zeros first and no whole-size copy is made. A variable with memory is
    assigned as usual.

    Args:
        var: a Keras variable.
        value: a tensor of its shape and dtype.

    Raises:
        ValueError: `value`'s shape is not the variable's (names the variable).
    """
    if tuple(value.shape) != tuple(var.shape):
        raise ValueError(f"{var.path}: a value of shape {tuple(value.shape)} for a variable of "
                         f"shape {tuple(var.shape)}.")
    if getattr(var, "_value", True) is None:
        var._initializer = _Given(value)
        var._deferred_initialize()
    else:
        var.assign(value)


class _Given:
    """An initializer that returns one given tensor (and forgets it)."""

    def __init__(self, value):
        self.value = value

    def __call__(self, shape, dtype=None):
        value, self.value = self.value, None
        return value


class Placeholder:
    """A lazy all-zeros array: the value of a variable created without memory.

    Layers built inside `keras.StatelessScope(initialize_variables=False)`
    hold uninitialised variables; converting them reads this instead, so a
    rank allocates only its slice (filled from a checkpoint afterwards).
    """

    def __init__(self, shape, dtype):
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        shape = [len(range(n)[i]) if isinstance(i, slice) else n
                 for n, i in zip(self.shape, index + (slice(None),) * (len(self.shape) - len(index)))]
        return np.zeros(shape, self.dtype)


def full_value(variable):
    """The full value of a Keras variable, or a `Placeholder` if uninitialised."""
    if getattr(variable, "_value", True) is None:
        return Placeholder(variable.shape, variable.dtype)
    return np.asarray(variable)
