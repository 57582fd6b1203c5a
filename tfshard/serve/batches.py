"""TF-Serving predict requests joined into one batch and split again; commands' payloads.

Requests that arrive together with inputs of one kind (names, dtypes, shapes past the
batch axis) run as one `predict_on_batch`; `dump` / `load` move a batch between ranks as
numpy's own format (no pickle).
"""

import io

import numpy as np


def json_bytes(obj):
    """`obj` as JSON bytes (a command's payload)."""
    import json

    return json.dumps(obj).encode()


def signature(inputs):
    """What a batch's inputs must share to be joined: names, dtypes, shapes past axis 0."""
    if isinstance(inputs, dict):
        return tuple(sorted((k, np.asarray(v).dtype.str, np.asarray(v).shape[1:])
                            for k, v in inputs.items()))
    a = np.asarray(inputs)
    return ("", a.dtype.str, a.shape[1:])


def rows(inputs):
    """Rows (axis 0) of a request's inputs."""
    if isinstance(inputs, dict):
        return int(np.asarray(next(iter(inputs.values()))).shape[0])
    return int(np.asarray(inputs).shape[0])


def join(batch):
    """Requests' inputs of one signature, concatenated on axis 0."""
    if isinstance(batch[0], dict):
        return {k: np.concatenate([np.asarray(x[k]) for x in batch]) for k in batch[0]}
    return np.concatenate([np.asarray(x) for x in batch])


def take(out, start, stop):
    """Rows [start, stop) of a model's output (an array, a dict or a list of arrays)."""
    if isinstance(out, dict):
        return {k: np.asarray(v)[start:stop] for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return [np.asarray(v)[start:stop] for v in out]
    return np.asarray(out)[start:stop]


def dump(x):
    """An array or a dict of arrays as bytes (numpy's .npz)."""
    buf = io.BytesIO()
    if isinstance(x, dict):
        np.savez(buf, **x)
    else:
        np.savez(buf, __array__=x)
    return buf.getvalue()


def load(payload):
    """The inverse of `dump`."""
    with np.load(io.BytesIO(payload), allow_pickle=False) as z:
        if list(z.keys()) == ["__array__"]:
            return z["__array__"]
        return {k: z[k] for k in z.keys()}
