"""Loading a model in another float precision than it was saved in.

`tfshard.load(source, dtype="bfloat16")` builds the model under that Keras
dtype policy, so every variable -- each rank's slices included -- is created
in it, and the readers convert the file's tensors into it piece by piece
(`assign_slice` reads a few MiB at a time): a float32 or GGUF tensor is never
held whole in float32 on the way.

Two things decide a Keras layer's dtype: the dtype policy written in its config
(a `.keras` file, a keras-hub preset or a tfshard checkpoint pins one per
layer or backbone) and, where the config has none (a model built in code, a
Hugging Face or GGUF conversion), the global policy. `policy_scope` sets the
latter for the build; `with_float_dtype` rewrites the former.
"""

import contextlib

import keras

#: The float policies `load(dtype=...)` takes: storage and compute in one type,
#: or Keras's mixed policies (float32 storage, 16-bit compute).
FLOAT_POLICIES = ("float32", "bfloat16", "float16", "mixed_bfloat16", "mixed_float16")


def check_dtype(dtype):
    """`dtype` as a policy name `load` can build in (None: as the file says).

    Raises:
        ValueError: `dtype` is not one of `FLOAT_POLICIES`.
    """
    if dtype is None:
        return None
    name = getattr(dtype, "name", dtype)
    if not isinstance(name, str) or name not in FLOAT_POLICIES:
        raise ValueError(f"dtype={dtype!r}: tfshard loads models in one of "
                         f"{', '.join(FLOAT_POLICIES)} (or None: as saved).")
    return name


@contextlib.contextmanager
def policy_scope(dtype):
    """Keras's global dtype policy set to `dtype` inside the block (None: unchanged)."""
    if dtype is None:
        yield
        return
    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy(dtype)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(before)


def _is_float_policy(value):
    """Whether a config's "dtype" value is a serialized float `DTypePolicy` (not a
    quantized policy; not a plain dtype string, which is what an `Input` keeps)."""
    if isinstance(value, dict) and value.get("class_name") == "DTypePolicy":
        return value.get("config", {}).get("name") in FLOAT_POLICIES + ("float64",)
    return False


def with_float_dtype(config, dtype):
    """A copy of a serialized Keras config whose float dtype policies are `dtype`.

    Inputs (their dtype is a plain string), quantized policies and anything
    that is not a layer's serialized `DTypePolicy` are left as they are.

    Args:
        config: a Keras config (nested dicts and lists, as `serialize_keras_object` gives).
        dtype: a name from `FLOAT_POLICIES`, or None to return `config` unchanged.

    Returns:
        The rewritten config.
    """
    if dtype is None:
        return config

    def walk(node):
        if isinstance(node, list):
            return [walk(v) for v in node]
        if not isinstance(node, dict):
            return node
        out = {k: walk(v) for k, v in node.items()}
        if _is_float_policy(out.get("dtype")):
            out["dtype"] = {"module": "keras", "class_name": "DTypePolicy",
                            "config": {"name": dtype}, "registered_name": None}
        return out

    return walk(config)
