"""How close a sharded output must be to the unsharded one, per precision.

A sharded model computes the same sums as the unsharded one in another order:
a row-parallel layer rounds each rank's partial to the layer's dtype before
the (float32) all-reduce, where the unsharded matmul rounds once. The
difference is therefore a few roundings of the output's own precision, and the
envelope is a multiple of that precision's machine epsilon, relative to the
reference's magnitude:

    |sharded - unsharded| <= ENVELOPE[dtype] * (1 + max|unsharded|)

- float32: 1e-5 (~84 eps32), the project's standard since the first issue.
- bfloat16: 2**-6 = 2 eps (eps = 2**-7: 8 significant bits). One rounding of
  a partial is <= eps/2 of its magnitude; a row layer's output sums `tp`
  rounded partials and is rounded again, so one layer can move an output by
  about eps of the output's scale; the test models have two blocks, and the
  measured worst case at 2 and 3 ranks is 0.03 eps (BERT) to 0.16 eps (GPT-2).
- float16: 2**-9 = 2 eps (eps = 2**-10).

Argmax: in float32 it must be identical everywhere. In 16 bits, ties within
the envelope may break either way, so argmax is required identical only where
the reference's top-two margin exceeds twice the envelope; the agreement over
all positions is reported.
"""

import numpy as np

EPS = {"bfloat16": 2.0 ** -7, "float16": 2.0 ** -10}
ENVELOPE = {"float32": 1e-5, "float64": 1e-5, "bfloat16": 2 * EPS["bfloat16"],
            "float16": 2 * EPS["float16"]}


def compute_dtype(model):
    """The dtype a Keras model computes in ("float32", "bfloat16", ...)."""
    policy = getattr(model, "dtype_policy", None)
    return str(getattr(policy, "compute_dtype", None) or "float32")


def tolerance(dtype, max_ref):
    """The envelope of `dtype` (a name) for a reference of magnitude `max_ref`.

    Raises:
        ValueError: no envelope is stated for `dtype`.
    """
    if str(dtype) not in ENVELOPE:
        raise ValueError(f"No accuracy envelope for dtype {dtype!r}; tfshard states "
                         f"{', '.join(ENVELOPE)}.")
    return ENVELOPE[str(dtype)] * (1.0 + float(max_ref))


def compare(reference, output, dtype="float32"):
    """One output against its reference, by the envelope of `dtype`.

    Args:
        reference: the unsharded model's output (array-like).
        output: the sharded model's output, same shape.
        dtype: the precision the model computes in.

    Returns:
        A dict: `max_diff`, `max_ref`, `tol`, `within` (max_diff <= tol),
        `argmax_agree` (fraction of positions whose argmax over the last axis
        agrees), `argmax_decided` (the same over positions whose reference
        top-two margin exceeds 2 * tol; NaN when none), `decided_equal`
        (argmax identical on all of those) and `ok` (within and decided_equal).
    """
    ref = np.asarray(reference).astype(np.float64)
    out = np.asarray(output).astype(np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"shapes differ: reference {ref.shape}, output {out.shape}")
    max_ref = float(np.max(np.abs(ref))) if ref.size else 0.0
    diff = float(np.max(np.abs(ref - out))) if ref.size else 0.0
    tol = tolerance(dtype, max_ref)
    result = {"max_diff": diff, "max_ref": max_ref, "tol": tol, "within": diff <= tol,
              "argmax_agree": 1.0, "argmax_decided": float("nan"), "decided_equal": True}
    if ref.ndim >= 2 and ref.shape[-1] > 1 and ref.size:
        same = np.argmax(ref, -1) == np.argmax(out, -1)
        top2 = -np.sort(-ref, axis=-1)[..., :2]
        decided = (top2[..., 0] - top2[..., 1]) > 2 * tol
        if str(dtype) in ("float32", "float64"):
            decided = np.ones_like(decided)  # full precision: argmax identical everywhere
        result["argmax_agree"] = float(np.mean(same))
        if np.any(decided):
            result["argmax_decided"] = float(np.mean(same[decided]))
        result["decided_equal"] = bool(np.all(same[decided]))
    result["ok"] = result["within"] and result["decided_equal"]
    return result
