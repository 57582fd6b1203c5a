"""Property-based inputs for predict and generate, run on every rank in lock step.

    ./horovodrun.sh -np 2 python tests/workers/fuzz.py --out DIR [--examples N]

Hypothesis draws input specs (dtype x rank x shape x value range) for a sharded
GPT-2 (dict of token ids and mask, a position table of 32), a sharded MLP (one
float input) and sharded generation. `derandomize=True`, no database and the
generate phase only make every rank draw the same examples in the same order,
so each example is one SPMD step. For each example every rank records either
the output's agreement with the unsharded model on the same input, or the
error's type and message; tests/test_fuzz.py checks "equal to unsharded, or a
named ValueError on every rank".
"""

import argparse
import json
import os
import sys
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tfshard.cli import import_tensorflow  # noqa: E402

import_tensorflow("keras_hub")  # the collector paused meanwhile, then the heap frozen

import keras  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import models  # noqa: E402
import tfshard  # noqa: E402

DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint32", "uint64", "float16",
          "float32", "float64", "bool", "complex64", "str"]
# Token values: in range, at the edges, and past int32 (which a cast would wrap).
ID_VALUES = st.one_of(st.integers(0, 50256), st.sampled_from(
    [-1, 0, 50256, 50257, 2**31 - 1, 2**31, 2**32 + 3, -(2**31) - 1]))


def settings_for(n):
    return settings(max_examples=n, derandomize=True, database=None, deadline=None,
                    phases=[Phase.generate], suppress_health_check=list(HealthCheck))


def make_array(dtype, shape, values):
    """An array of `shape` filled from `values` (cycled), cast the way a user would."""
    n = int(np.prod(shape)) if shape else 1
    flat = np.resize(np.asarray(values, dtype=object), n) if n else np.zeros(0, object)
    if dtype == "str":
        return flat.astype(str).reshape(shape)
    with np.errstate(all="ignore"):
        try:
            return np.array([int(v) for v in flat], dtype=object).astype(dtype).reshape(shape)
        except OverflowError:  # a value the dtype cannot hold: numpy refuses, so do users
            return np.array([int(v) % 251 for v in flat]).astype(dtype).reshape(shape)


def outcome(fn, reference, shape_note):
    """`{"ok": True, figures...}` or `{"ok": False, "error_type", "message"}`."""
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - recorded for the test to judge
        return {"ok": False, "error_type": type(e).__name__, "message": str(e)[:800],
                "input": shape_note, "traceback": traceback.format_exc()[-1500:]}
    rec = {"ok": True, "input": shape_note}
    try:
        ref = reference()
    except Exception as e:  # noqa: BLE001 - the unsharded model refused what tfshard took
        rec.update(reference_error=f"{type(e).__name__}: {str(e)[:300]}")
        return rec
    a, b = (np.asarray(v) for v in (keras.tree.flatten(ref)[0], keras.tree.flatten(out)[0]))
    rec["same_shape"] = a.shape == b.shape
    if a.shape == b.shape and a.size:
        if a.dtype.kind in "iub":
            rec.update(max_diff=float(np.max(a != b)), tol=0.0)
        else:
            rec.update(max_diff=float(np.max(np.abs(a.astype("float64") - b))),
                       tol=1e-5 * (1 + float(np.max(np.abs(a)))))
    return rec


def run(world, results, examples):
    gpt2, _ = models.gpt2()
    ref_gpt2, _ = models.gpt2()
    sharded = tfshard.shard(gpt2)
    mlp, _ = models.mlp()
    ref_mlp, _ = models.mlp()
    sharded_mlp = tfshard.shard(mlp)
    log = results.setdefault("examples", [])

    @settings_for(examples)
    @given(dtype=st.sampled_from(DTYPES), rows=st.sampled_from([1, 2, 3, 1, 2, 0]),
           seq=st.sampled_from([1, 5, 32, 5, 33, 0]), extra_dim=st.booleans(),
           mask_seq_delta=st.sampled_from([0, 0, 0, -1]),
           ids=st.lists(ID_VALUES, min_size=1, max_size=6), as_list=st.booleans())
    def predict_gpt2(dtype, rows, seq, extra_dim, mask_seq_delta, ids, as_list):
        shape = (rows, seq, 2) if extra_dim else (rows, seq)
        token_ids = make_array(dtype, shape, ids)
        mask = np.ones((rows, max(seq + mask_seq_delta, 0)), "int32")
        x = {"token_ids": token_ids.tolist() if as_list and dtype != "str" else token_ids,
             "padding_mask": mask}
        note = f"gpt2 token_ids {dtype}{shape}{' list' if as_list else ''} mask {mask.shape}"
        log.append({"kind": "predict_gpt2", **outcome(
            lambda: sharded.predict(x, verbose=0),
            lambda: ref_gpt2.predict({"token_ids": np.asarray(token_ids),
                                      "padding_mask": mask}, verbose=0), note)})

    @settings_for(max(4, examples // 2))
    @given(dtype=st.sampled_from(DTYPES), rows=st.sampled_from([1, 4, 2, 0]),
           width=st.sampled_from([12, 12, 11]),
           values=st.lists(st.integers(-5, 5), min_size=1, max_size=4), as_list=st.booleans())
    def predict_mlp(dtype, rows, width, values, as_list):
        x = make_array(dtype, (rows, width), values)
        note = f"mlp x {dtype}{x.shape}{' list' if as_list else ''}"
        arg = x.tolist() if as_list and dtype != "str" else x
        log.append({"kind": "predict_mlp", **outcome(
            lambda: sharded_mlp.predict(arg, verbose=0),
            lambda: ref_mlp.predict(x, verbose=0), note)})

    @settings_for(max(3, examples // 6))
    @given(dtype=st.sampled_from(["int32", "int64", "float32", "uint8", "bool"]),
           rows=st.integers(1, 2), seq=st.sampled_from([6, 40]),
           ids=st.lists(ID_VALUES, min_size=1, max_size=4))
    def generate_gpt2(dtype, rows, seq, ids):
        token_ids = make_array(dtype, (rows, seq), ids)
        mask = np.zeros((rows, seq), bool)
        mask[:, :3] = True
        x = {"token_ids": token_ids, "padding_mask": mask}
        note = f"generate token_ids {dtype}{token_ids.shape}"
        log.append({"kind": "generate_gpt2", **outcome(
            lambda: sharded.generate(x, stop_token_ids=None)["token_ids"],
            lambda: ref_gpt2.generate(x, stop_token_ids=None)["token_ids"], note)})

    for prop in (predict_gpt2, predict_mlp, generate_gpt2):
        prop()
    # Still working after every refusal: a good input, equal to unsharded.
    x = {"token_ids": np.arange(10, dtype="int32").reshape(2, 5), "padding_mask": np.ones((2, 5), "int32")}
    results["after"] = outcome(lambda: sharded.predict(x, verbose=0),
                               lambda: ref_gpt2.predict(x, verbose=0), "after")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--examples", type=int, default=30)
    args = parser.parse_args()
    world = tfshard.init()
    results = {"rank": world.rank, "size": world.size}
    run(world, results, args.examples)
    path = os.path.join(args.out, f"rank{world.rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"rank {world.rank}: {len(results['examples'])} examples written to {path}", flush=True)


if __name__ == "__main__":
    main()
