"""TF Serving's REST API for any Keras model: :predict (rows or columns), status, metadata."""

import json

import fastapi
import numpy as np
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from tfshard.serve import errors
from tfshard.serve import schemas

VERSION = "1"
SIGNATURE = "serving_default"
# numpy dtype names as TF Serving's metadata spells them.
DT_NAMES = {
    "float16": "DT_HALF", "bfloat16": "DT_BFLOAT16", "float32": "DT_FLOAT",
    "float64": "DT_DOUBLE", "int8": "DT_INT8", "int16": "DT_INT16", "int32": "DT_INT32",
    "int64": "DT_INT64", "uint8": "DT_UINT8", "uint16": "DT_UINT16", "uint32": "DT_UINT32",
    "uint64": "DT_UINT64", "bool": "DT_BOOL", "string": "DT_STRING", "object": "DT_STRING",
    "complex64": "DT_COMPLEX64", "complex128": "DT_COMPLEX128",
}


class JSONAnswer(Response):
    """A JSON response that writes NaN and Infinity as TF Serving does (JSON has neither;
    TF Serving and Python's json read them)."""
    media_type = "application/json"

    def render(self, content):
        return json.dumps(content, allow_nan=True, separators=(",", ":")).encode()


def router(front):
    """The TF-Serving-compatible routes over one `front.Front`.

    Args:
        front: the app's `front.Front`.

    Returns:
        A `fastapi.APIRouter` with `POST /v1/models/NAME:predict`, `GET /v1/models/NAME`
        (status) and `GET /v1/models/NAME/metadata`, each also under
        `/v1/models/NAME/versions/1`.
    """
    routes = fastapi.APIRouter()

    async def predict(name, version, body):
        front.check_model(name)
        check_version(version)
        front.check_serving()
        if body.signature_name not in (None, "", SIGNATURE):
            raise errors.ApiError(400, f"signature_name: {body.signature_name!r} is not a "
                                       f"signature of this model; send {SIGNATURE!r} or leave "
                                       "it out", param="signature_name")
        meta = front.engine.metadata()
        inputs, rows = to_arrays(body, meta)
        try:
            outputs = await run_in_threadpool(front.engine.predict, inputs)
        except errors.ENGINE_ERRORS as exc:
            raise errors.from_engine(exc) from None
        return JSONAnswer(to_json(outputs, rows, list(meta.get("outputs") or ())))

    @routes.post("/v1/models/{name}:predict")
    async def predict_latest(name: str, body: schemas.PredictRequest):
        return await predict(name, None, body)

    @routes.post("/v1/models/{name}/versions/{version}:predict")
    async def predict_version(name: str, version: str, body: schemas.PredictRequest):
        return await predict(name, version, body)

    def status(name, version):
        front.check_model(name)
        check_version(version)
        return model_status(front)

    @routes.get("/v1/models/{name}")
    async def status_latest(name: str):
        return status(name, None)

    @routes.get("/v1/models/{name}/versions/{version}")
    async def status_version(name: str, version: str):
        return status(name, version)

    def metadata(name, version):
        front.check_model(name)
        check_version(version)
        return {"model_spec": {"name": name, "signature_name": "", "version": VERSION},
                "metadata": {"signature_def": signature_def(front.engine.metadata())}}

    @routes.get("/v1/models/{name}/metadata")
    async def metadata_latest(name: str):
        return metadata(name, None)

    @routes.get("/v1/models/{name}/versions/{version}/metadata")
    async def metadata_version(name: str, version: str):
        return metadata(name, version)

    return routes


def check_version(version):
    """Raises a 404 unless `version` is None or the one version served ("1")."""
    if version is not None and version != VERSION:
        raise errors.ApiError(404, f"version {version!r} is not served: this server serves "
                                   f"version {VERSION} only", param="version",
                              code="version_not_found")


def model_status(front):
    """TF Serving's model status, with OpenAI's model object's fields beside it.

    `GET /v1/models/NAME` is both TF Serving's status and OpenAI's "retrieve model": the
    answer carries `model_version_status` and `id`, `object`, `owned_by`.

    Args:
        front: the `front.Front`.

    Returns:
        `{"model_version_status": [{"version": "1", "state", "status": {"error_code",
        "error_message"}}], "id", "object": "model", "owned_by"}`: state "AVAILABLE"
        while healthy, "UNLOADING" while draining, "LOADING" (error_code "UNAVAILABLE",
        the reason as message) otherwise.
    """
    ok, reason = front.engine.health()
    if front.draining:
        state, code, message = "UNLOADING", "OK", front.draining
    elif ok:
        state, code, message = "AVAILABLE", "OK", ""
    else:
        state, code, message = "LOADING", "UNAVAILABLE", reason or "not ready"
    return {"model_version_status": [{"version": VERSION, "state": state,
                                      "status": {"error_code": code, "error_message": message}}],
            "id": front.model_name, "object": "model", "owned_by": "tfshard"}


def tensor_info(name, spec, prefix):
    """TF Serving's TensorInfo of one input or output spec ({"dtype", "shape"})."""
    shape = spec.get("shape")
    dims = None if shape is None else [{"size": str(-1 if d is None else int(d)), "name": ""}
                                       for d in shape]
    return {"dtype": DT_NAMES.get(str(spec.get("dtype")), "DT_INVALID"),
            "tensor_shape": {"dim": dims or [], "unknown_rank": shape is None},
            "name": f"{prefix}{name}:0"}


def signature_def(meta):
    """`metadata.signature_def` as TF Serving answers it, from `Engine.metadata()`.

    Args:
        meta: `{"inputs": {name: {"dtype", "shape"}}, "outputs": {...}}`.

    Returns:
        `{"signature_def": {"serving_default": {"inputs", "outputs", "method_name"}}}`.
    """
    sig = {"inputs": {n: tensor_info(n, s, f"{SIGNATURE}_")
                      for n, s in (meta.get("inputs") or {}).items()},
           "outputs": {n: tensor_info(n, s, "StatefulPartitionedCall:")
                       for n, s in (meta.get("outputs") or {}).items()},
           "method_name": "tensorflow/serving/predict", "defaults": {}}
    for n, info in sig["outputs"].items():
        info["name"] = f"StatefulPartitionedCall:{list(sig['outputs']).index(n)}"
    return {"signature_def": {SIGNATURE: sig}}


def bad(field, message):
    """A 400 naming the request field (`instances` or `inputs`)."""
    return errors.ApiError(400, f"{field}: {message}", param=field)


def to_arrays(body, meta):
    """The numpy inputs of a `:predict` body, in the dtypes and shapes of the metadata.

    Args:
        body: the `schemas.PredictRequest`.
        meta: the engine's metadata.

    Returns:
        `(inputs, rows)`: a dict of name -> array (batch first) and whether the body used
        the row format (`instances`).

    Raises:
        errors.ApiError: 400 naming `instances` or `inputs`, the input at fault and what
            would work: neither or both given, missing or unknown input names, ragged
            rows, a float where integers are expected, a wrong row shape.
    """
    specs = meta.get("inputs") or {}
    names = list(specs)
    given = body.model_fields_set & {"instances", "inputs"}
    if len(given) != 1 or (body.instances is None and body.inputs is None):
        raise errors.ApiError(400, "send exactly one of `instances` (rows) or `inputs` "
                                   "(columns)", param="instances" if not given else
                              "inputs")
    rows = "instances" in given
    field = "instances" if rows else "inputs"
    value = body.instances if rows else body.inputs
    if rows:
        if not isinstance(value, list) or not value:
            raise bad(field, "send a non-empty list of rows")
        dicts = [isinstance(r, dict) for r in value]
        if any(dicts) and not all(dicts):
            raise bad(field, "rows mix objects and plain values; send every row the same way")
        if all(dicts):
            columns = {}
            for i, row in enumerate(value):
                check_names(field, row, names, where=f"row {i}: ")
                for n in names:
                    columns.setdefault(n, []).append(row[n])
        elif len(names) == 1:
            columns = {names[0]: value}
        else:
            raise bad(field, f"this model takes {len(names)} inputs ({', '.join(names)}): send "
                             "each row as an object of them")
    else:
        if isinstance(value, dict):
            check_names(field, value, names)
            columns = dict(value)
        elif len(names) == 1:
            columns = {names[0]: value}
        else:
            raise bad(field, f"this model takes {len(names)} inputs ({', '.join(names)}): send "
                             "an object of them")
    arrays = {n: to_array(field, n, columns[n], specs[n]) for n in names}
    sizes = {n: a.shape[0] if a.ndim else None for n, a in arrays.items()}
    if len(set(sizes.values())) > 1:
        raise bad(field, "the inputs have different batch sizes "
                         f"({', '.join(f'{n}: {s}' for n, s in sizes.items())}); send as many "
                         "rows of each")
    return arrays, rows


def check_names(field, row, names, where=""):
    """Raises a 400 naming `field` unless the object `row` has exactly the model's input
    `names` (`where`: which row, for the message)."""
    missing = [n for n in names if n not in row]
    unknown = [n for n in row if n not in names]
    if missing or unknown:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unknown {', '.join(unknown)}"] if unknown else [])
        raise bad(field, f"{where}{'; '.join(parts)}: this model's inputs are "
                         f"{', '.join(names)}")


def to_array(field, name, value, spec):
    """One input as a numpy array of the spec's dtype and shape (batch first).

    Raises:
        errors.ApiError: 400 naming the input: ragged rows, wrong kinds of values, a
            float where integers are expected, values out of the dtype's range, a wrong
            rank or dimension.
    """
    dtype_name = str(spec.get("dtype", "float32"))
    shape = spec.get("shape")
    want = f" of shape [{', '.join('?' if d is None else str(d) for d in shape[1:])}]" \
        if shape else ""
    if isinstance(value, dict) and "b64" in value:
        raise bad(field, f"input {name}: binary (b64) values are not supported")
    try:
        arr = np.asarray(value)
    except ValueError:
        raise bad(field, f"input {name}: rows of different shapes; send every row{want}") \
            from None
    if arr.ndim == 0:
        raise bad(field, f"input {name}: a single value is not a batch; send a list of rows{want}")
    if arr.shape[0] == 0:
        raise bad(field, f"input {name}: no rows; send at least one row{want}")
    kind = arr.dtype.kind
    if dtype_name in ("string", "object"):
        if kind != "U":
            raise bad(field, f"input {name} takes strings; got {describe(arr)}")
        arr = arr.astype(object)
    elif dtype_name == "bool":
        if kind != "b":
            raise bad(field, f"input {name} takes true/false values; got {describe(arr)}")
    else:
        arr = to_number(field, name, arr, dtype_name)
    if shape is not None:
        wrong = arr.ndim != len(shape) or any(
            axis and expect is not None and got != int(expect)
            for axis, (got, expect) in enumerate(zip(arr.shape, shape)))
        if wrong:
            rows = f"[{', '.join(map(str, arr.shape[1:]))}]"
            raise bad(field, f"input {name}: rows of shape {rows}; this model takes rows{want}")
    return arr


def to_number(field, name, arr, dtype_name):
    """A non-empty array of JSON numbers in the numeric dtype `dtype_name`.

    Raises:
        errors.ApiError: 400 naming the input: not numbers, a float where integers are
            expected, a value out of the dtype's range.
    """
    target = np.dtype("float32" if dtype_name == "bfloat16" else dtype_name)
    kind = arr.dtype.kind
    if kind not in "iuf":
        raise bad(field, f"input {name} takes numbers ({dtype_name}); got {describe(arr)}")
    if target.kind in "iu":
        if kind == "f":
            finite = np.isfinite(arr)
            fractional = arr[~finite | (arr != np.floor(np.where(finite, arr, 0)))]
            example = (fractional if fractional.size else arr.ravel())[0]
            raise bad(field, f"input {name} takes integers ({dtype_name}); got a float "
                             f"({example!r}): send whole numbers without a decimal point")
        info = np.iinfo(target)
        low, high = arr.min(), arr.max()
        if low < info.min or high > info.max:
            worst = low if low < info.min else high
            raise bad(field, f"input {name} takes {dtype_name} values in [{info.min}, "
                             f"{info.max}]; got {worst}")
    elif target.kind == "f" and kind == "f":
        finite = arr[np.isfinite(arr)]
        if finite.size and np.abs(finite).max() > np.finfo(target).max:
            raise bad(field, f"input {name}: a value is past {dtype_name}'s range "
                             f"(±{np.finfo(target).max:.3g})")
    return arr.astype(target)


def describe(arr):
    """What kind of JSON values an array holds, for error messages."""
    kinds = {"b": "true/false values", "U": "strings", "O": "mixed values or nulls",
             "f": "floats", "i": "integers", "u": "integers"}
    example = arr.ravel()[0] if arr.size else None
    return f"{kinds.get(arr.dtype.kind, str(arr.dtype))} (e.g. {example!r})"


def plain(value):
    """An output array as JSON-ready Python values (bfloat16 and other numpy kinds JSON
    has no name for as float32)."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "biufUSO":
        arr = arr.astype(np.float32)
    if arr.dtype.kind == "S":
        arr = arr.astype(str)
    return arr.tolist()


def to_json(outputs, rows, names):
    """A `:predict` answer as TF Serving gives it.

    Args:
        outputs: the engine's output: an array or a dict of arrays, batch first.
        rows: whether the request used the row format.
        names: the model's output names (from its metadata).

    Returns:
        Row format: `{"predictions": [...]}`: one value per row for a model of one
        output, one object of named values per row for several. Columnar:
        `{"outputs": value}` for one output, `{"outputs": {name: value}}` for several.
    """
    if isinstance(outputs, dict) and len(outputs) == 1:
        outputs = next(iter(outputs.values()))
    if isinstance(outputs, (list, tuple)):
        outputs = {names[i] if i < len(names) else f"output_{i}": o
                   for i, o in enumerate(outputs)}
    if not isinstance(outputs, dict):
        values = plain(outputs)
        return {"predictions": values} if rows else {"outputs": values}
    columns = {n: plain(v) for n, v in outputs.items()}
    if not rows:
        return {"outputs": columns}
    size = len(next(iter(columns.values())))
    return {"predictions": [{n: columns[n][i] for n in columns} for i in range(size)]}
