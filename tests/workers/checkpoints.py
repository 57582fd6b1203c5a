"""Loading and saving scenarios run on every rank; each rank writes JSON.

    horovodrun -np N python tests/workers/checkpoints.py --suite real --out DIR --shared DIR

`--shared` is a folder every rank sees (checkpoints written by one launch are
read by the next). The real models' references are computed with plain Keras /
keras-hub / an independent GGUF mapping, never with tfshard's loaders: once, by
`--suite references` in one process, into the shared folder (else on every rank).
"""

import argparse
import json
import os
import shutil
import socket
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tfshard.cli import import_tensorflow  # noqa: E402

import_tensorflow("keras_hub")  # the collector paused meanwhile, then the heap frozen

import keras  # noqa: E402

import tfshard  # noqa: E402
from scenarios import compare, guarded, slices_held, write_results  # noqa: E402


def _held(sharded):
    """Every cut layer's local weights against their full shapes."""
    held = slices_held(sharded)
    full_kernels = [p for p, s in held.items() if s["local"] == s["full"]]
    return {"cut": len(held), "full_kernels_held": full_kernels,
            "local_matches_plan": all(s["local"] == s["planned"] for s in held.values())}


# ---------------------------------------------------------------- references

def minilm_inputs():
    rng = np.random.default_rng(0)
    return {"token_ids": rng.integers(0, 30522, (5, 24)).astype("int32"),
            "segment_ids": np.zeros((5, 24), "int32"),
            "padding_mask": (np.arange(24)[None] < np.array([[24], [20], [9], [24], [1]])).astype("int32")}


def smollm2_inputs():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 49152, (3, 12)).astype("int32")
    ids[0, :5] = [504, 3575, 282, 4649, 314]  # "The capital of France is"
    return {"token_ids": ids, "padding_mask": np.ones((3, 12), "int32")}


def minilm_reference():
    import keras_hub

    from tfshard.io import named

    model = keras_hub.models.BertBackbone.from_preset(named.path_of("minilm"))
    return model.predict(minilm_inputs(), verbose=0)


def smollm2_reference():
    """SmolLM2 built unsharded, weights dequantised whole (no tfshard loader code)."""
    import gguf

    from tfshard.io import gguf_llama, named

    from tfshard.io import deferred_variables, materialize

    reader = gguf.GGUFReader(named.path_of("smollm2"))
    with deferred_variables() as created:  # skip 135M random draws; every weight is assigned
        model = gguf_llama.build_causal_lm(gguf_llama.open_gguf(named.path_of("smollm2")))
    materialize(created, model.weights)
    t = {x.name: x for x in reader.tensors}

    def w(name):
        x = t[name]
        return gguf.quants.dequantize(x.data, x.tensor_type).reshape(tuple(reversed(x.shape.tolist())))

    def unperm(a, n):
        return a.reshape(n, a.shape[0] // n // 2, 2, a.shape[1]).swapaxes(1, 2).reshape(a.shape)

    bb = model.backbone
    hidden, nq, nkv = 576, 9, 3
    bb.token_embedding.embeddings.assign(w("token_embd.weight"))
    for i, layer in enumerate(bb.transformer_layers):
        att, b = layer._self_attention_layer, f"blk.{i}."
        layer._self_attention_layernorm.scale.assign(w(b + "attn_norm.weight"))
        layer._feedforward_layernorm.scale.assign(w(b + "ffn_norm.weight"))
        att._query_dense.kernel.assign(unperm(w(b + "attn_q.weight"), nq).T.reshape(hidden, nq, 64))
        att._key_dense.kernel.assign(unperm(w(b + "attn_k.weight"), nkv).T.reshape(hidden, nkv, 64))
        att._value_dense.kernel.assign(w(b + "attn_v.weight").T.reshape(hidden, nkv, 64))
        att._output_dense.kernel.assign(w(b + "attn_output.weight").T.reshape(nq, 64, hidden))
        layer._feedforward_gate_dense.kernel.assign(w(b + "ffn_gate.weight").T)
        layer._feedforward_intermediate_dense.kernel.assign(w(b + "ffn_up.weight").T)
        layer._feedforward_output_dense.kernel.assign(w(b + "ffn_down.weight").T)
    bb.layer_norm.scale.assign(w("output_norm.weight"))
    return model.predict(smollm2_inputs(), verbose=0)


def gpt2_builder():
    from tfshard.models import from_config

    return from_config("GPT2Backbone", "GPT2CausalLM", seed=7, vocabulary_size=1003, num_layers=2,
                       num_heads=6, hidden_dim=48, intermediate_dim=96, max_sequence_length=32)


def gpt2_inputs():
    rng = np.random.default_rng(2)
    return {"token_ids": rng.integers(0, 1003, (7, 10)).astype("int32"),
            "padding_mask": np.ones((7, 10), "int32")}


# ---------------------------------------------------------------- suites

# `--mirrored N`: the suites load and shard over a MirroredStrategy of N logical
# CPUs in this one process. Under `tfshard launch` the world's
# MultiWorkerMirroredStrategy is used without being named.
STRATEGY = None


def load(source, **kwargs):
    return tfshard.load(source, strategy=STRATEGY, **kwargs)


def shard(model, **kwargs):
    return tfshard.shard(model, strategy=STRATEGY, **kwargs)


REFERENCES = {"minilm": minilm_reference, "smollm2": smollm2_reference}


def run_references(world, results, shared):
    """The real models' unsharded outputs, computed once (in one process) into
    `shared/reference-NAME-out.npz` for every later launch's `run_real` to read."""
    def case(name):
        out = REFERENCES[name]()
        path = os.path.join(shared, f"reference-{name}-out.npz")  # as `_saved` reads it
        np.savez(path + ".tmp.npz", **_as_dict(out))
        os.replace(path + ".tmp.npz", path)
        return {"written": path}
    for name in REFERENCES:
        results[f"reference_{name}"] = guarded(lambda name=name: case(name))


def _reference(shared, name):
    """`name`'s reference output: `run_references`' file where one was written (the
    tests write it once per session), else computed on this rank."""
    if os.path.exists(os.path.join(shared, f"reference-{name}-out.npz")):
        return _saved(shared, f"reference-{name}")
    return REFERENCES[name]()


def run_real(world, results, shared, names=("minilm", "smollm2")):
    """tfshard.load of the real models equals plain keras-hub / an independent mapping."""
    def case(name, inputs):
        ref = _reference(shared, name)
        sharded = _LOADED[name] = load(name)
        res = compare(ref, sharded.predict(inputs(), verbose=0))
        res.update(_held(sharded))
        res["local_bytes"] = int(sum(np.asarray(v).nbytes for v in sharded.inner.weights))
        return res
    for name, inputs in (("minilm", minilm_inputs), ("smollm2", smollm2_inputs)):
        if name in names:
            results[name] = guarded(lambda name=name, inputs=inputs: case(name, inputs))


def run_minilm(world, results, shared):
    """run_real for MiniLM alone (real SmolLM2 loads where SUITES says)."""
    run_real(world, results, shared, names=("minilm",))


def run_save(world, results, shared, prefix=""):
    """At N ranks: save MiniLM (real weights) and a GPT-2 config sharded and gathered;
    rank 0 keeps the outputs the reloads must reproduce."""
    def save(name, sharded, out):
        name = prefix + name
        path = os.path.join(shared, f"{name}-ckpt")
        host = socket.gethostname()
        if world.rank == 0:  # what a killed save of a gone process (and a running one) leaves
            os.makedirs(f"{path}.incomplete-{host}-{_dead_pid()}-deadbeef/x", exist_ok=True)
            os.makedirs(f"{path}.incomplete-{host}-1-livesave", exist_ok=True)
        world.comm.barrier()
        sharded.save(path)
        sharded.save(os.path.join(shared, f"{name}.keras"), gather=True)
        if world.rank == 0:
            np.savez(os.path.join(shared, f"{name}-out.npz"), **_as_dict(out))
        world.comm.barrier()
        index = json.load(open(os.path.join(shared, f"{name}-ckpt", "tfshard.json")))
        result = {"files": index["files"], "tensor_parallel": index["tensor_parallel"],
                  "leftovers": sorted(f for f in os.listdir(shared)
                                      if ".incomplete-" in f and not f.endswith("livesave"))}
        result["running_save_kept"] = os.path.isdir(f"{path}.incomplete-{host}-1-livesave")
        world.comm.barrier()
        if world.rank == 0:
            os.rmdir(f"{path}.incomplete-{host}-1-livesave")
        return result

    def minilm():
        sharded = _LOADED.get("minilm") or load("minilm")
        return save("minilm", sharded, sharded.predict(minilm_inputs(), verbose=0))
    results[f"{prefix}save"] = guarded(minilm)

    def gpt2():
        model = gpt2_builder()
        ref = model.predict(gpt2_inputs(), verbose=0)
        sharded = shard(model)
        res = save("gpt2", sharded, ref)
        res.update(compare(ref, sharded.predict(gpt2_inputs(), verbose=0)))
        return res
    results[f"{prefix}save_gpt2"] = guarded(gpt2)


def _dead_pid():
    """The pid of a process that has exited."""
    import subprocess

    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _as_dict(out):
    return dict(out) if isinstance(out, dict) else {"output": np.asarray(out)}


def _saved(shared, name):
    data = np.load(os.path.join(shared, f"{name}-out.npz"))
    out = {k: data[k] for k in data.files}
    return out["output"] if list(out) == ["output"] else out


def run_reload(world, results, shared):
    """At M ranks: the checkpoints written at N give the same outputs."""
    def case(path, name, inputs):
        sharded = load(os.path.join(shared, path))
        res = compare(_saved(shared, name), sharded.predict(inputs(), verbose=0))
        res.update(_held(sharded) if len(sharded.replicas) > 1 or world.size > 1 else {})
        return res
    results["reload_minilm"] = guarded(lambda: case("minilm-ckpt", "minilm", minilm_inputs))
    if os.path.exists(os.path.join(shared, "mirrored-gpt2-ckpt")):
        # Saved under MirroredStrategy (the "distribute" suite), read here under another backend.
        results["reload_mirrored_gpt2"] = guarded(
            lambda: case("mirrored-gpt2-ckpt", "mirrored-gpt2", gpt2_inputs))
        results["gathered_mirrored_gpt2"] = guarded(
            lambda: case("mirrored-gpt2.keras", "mirrored-gpt2", gpt2_inputs))
    results["reload_gpt2"] = guarded(lambda: case("gpt2-ckpt", "gpt2", gpt2_inputs))
    results["gathered_gpt2_tfshard"] = guarded(lambda: case("gpt2.keras", "gpt2", gpt2_inputs))

    def plain_keras(name, inputs):
        # The gathered file is an ordinary .keras: plain Keras loads it.
        import keras_hub  # noqa: F401

        model = keras.saving.load_model(os.path.join(shared, f"{name}.keras"))
        return compare(_saved(shared, name), model.predict(inputs(), verbose=0))
    results["gathered_minilm_plain_keras"] = guarded(lambda: plain_keras("minilm", minilm_inputs))
    results["gathered_gpt2_plain_keras"] = guarded(lambda: plain_keras("gpt2", gpt2_inputs))


def run_formats(world, results, shared):
    """Plain-Keras .keras and .weights.h5 of a GPT-2 config load sharded."""
    mine = os.path.join(shared, f"formats-rank{world.rank}")
    os.makedirs(mine, exist_ok=True)
    model = gpt2_builder()
    ref = model.predict(gpt2_inputs(), verbose=0)
    model.save(os.path.join(mine, "gpt2.keras"))
    model.save_weights(os.path.join(mine, "gpt2.weights.h5"))
    del model

    def from_keras():
        sharded = load(os.path.join(mine, "gpt2.keras"))
        res = compare(ref, sharded.predict(gpt2_inputs(), verbose=0))
        res.update(_held(sharded))
        return res

    def from_weights():
        sharded = load(os.path.join(mine, "gpt2.weights.h5"), model=gpt2_builder)
        res = compare(ref, sharded.predict(gpt2_inputs(), verbose=0))
        res.update(_held(sharded))
        return res

    def load_weights_into_sharded():
        from tfshard.models import from_config

        other = from_config("GPT2Backbone", "GPT2CausalLM", seed=99, vocabulary_size=1003,
                            num_layers=2, num_heads=6, hidden_dim=48, intermediate_dim=96,
                            max_sequence_length=32)
        sharded = shard(other)
        before = compare(ref, sharded.predict(gpt2_inputs(), verbose=0))
        sharded.load_weights(os.path.join(mine, "gpt2.weights.h5"))
        res = compare(ref, sharded.predict(gpt2_inputs(), verbose=0))
        res["differed_before"] = before["outputs"]["output"]["max_diff"]
        return res

    def from_keras_hub_preset():
        # A keras-hub preset directory in Keras format (save_to_preset).
        backbone = gpt2_builder().backbone
        ref_bb = backbone.predict(gpt2_inputs(), verbose=0)
        backbone.save_to_preset(os.path.join(mine, "preset"))
        sharded = load(os.path.join(mine, "preset"))
        res = compare(ref_bb, sharded.predict(gpt2_inputs(), verbose=0))
        res.update(_held(sharded))
        return res

    results["keras_file"] = guarded(from_keras)
    results["keras_hub_preset"] = guarded(from_keras_hub_preset)
    results["weights_h5"] = guarded(from_weights)
    results["load_weights"] = guarded(load_weights_into_sharded)

    def plain_save_refused():
        sharded = tfshard.load(os.path.join(mine, "gpt2.keras"))
        sharded.inner.save(os.path.join(mine, "refused.keras"))
        return {}
    results["plain_keras_save_refused"] = guarded(plain_save_refused, expect_error=True)


def _truncate(src, dst, keep=0.5):
    data = open(src, "rb").read()
    with open(dst, "wb") as f:
        f.write(data[:int(len(data) * keep)])


def _flip(path, offset_fraction):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(int(size * offset_fraction))
        b = f.read(1)
        f.seek(int(size * offset_fraction))
        f.write(bytes([b[0] ^ 0xFF]))


def run_errors(world, results, shared):
    """Broken files fail on every rank with the file and tensor named; nothing hangs."""
    from tfshard.io import named

    work = os.path.join(shared, f"errors-rank{world.rank}")
    os.makedirs(work, exist_ok=True)
    model = gpt2_builder()
    model.save(os.path.join(work, "good.keras"))
    model.save_weights(os.path.join(work, "good.weights.h5"))
    _truncate(os.path.join(work, "good.keras"), os.path.join(work, "cut.keras"))
    _truncate(os.path.join(work, "good.weights.h5"), os.path.join(work, "cut.weights.h5"))
    shutil.copy(os.path.join(work, "good.keras"), os.path.join(work, "flipped.keras"))
    _flip(os.path.join(work, "flipped.keras"), 0.6)
    _truncate(named.path_of("smollm2"), os.path.join(work, "cut.gguf"), keep=0.3)
    hf = os.path.join(work, "minilm-cut")
    shutil.copytree(named.path_of("minilm"), hf, dirs_exist_ok=True)
    _truncate(os.path.join(named.path_of("minilm"), "model.safetensors"),
              os.path.join(hf, "model.safetensors"))

    def wrong_shape_model():
        from tfshard.models import from_config

        return from_config("GPT2Backbone", "GPT2CausalLM", seed=7, vocabulary_size=1003,
                           num_layers=2, num_heads=6, hidden_dim=48, intermediate_dim=120,
                           max_sequence_length=32)

    def more_layers_model():
        from tfshard.models import from_config

        return from_config("GPT2Backbone", "GPT2CausalLM", seed=7, vocabulary_size=1003,
                           num_layers=3, num_heads=6, hidden_dim=48, intermediate_dim=96,
                           max_sequence_length=32)

    from tfshard.models import from_config

    # The same architecture, other values: what each rank loads differs (rank 0 its good.keras).
    from_config("GPT2Backbone", "GPT2CausalLM", seed=8 + world.rank, vocabulary_size=1003,
                num_layers=2, num_heads=6, hidden_dim=48, intermediate_dim=96,
                max_sequence_length=32).save(os.path.join(work, "seeded.keras"))
    lam = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
                            keras.layers.Lambda(lambda t: t * 2.0)])
    lam.save(os.path.join(work, "lambda.keras"))

    cases = {
        "truncated_keras": lambda: tfshard.load(os.path.join(work, "cut.keras")),
        "corrupt_keras": lambda: tfshard.load(os.path.join(work, "flipped.keras")),
        "truncated_weights_h5": lambda: tfshard.load(os.path.join(work, "cut.weights.h5"),
                                                     model=gpt2_builder),
        "shape_mismatch": lambda: tfshard.load(os.path.join(work, "good.weights.h5"),
                                               model=wrong_shape_model),
        "missing_tensor": lambda: tfshard.load(os.path.join(work, "good.weights.h5"),
                                               model=more_layers_model),
        "truncated_gguf": lambda: tfshard.load(os.path.join(work, "cut.gguf")),
        "truncated_safetensors": lambda: tfshard.load(hf),
        "safe_mode": lambda: tfshard.load(os.path.join(work, "lambda.keras")),
        "missing_file": lambda: tfshard.load(os.path.join(work, "nope.keras")),
        "source_differs": lambda: tfshard.load(os.path.join(work, "seeded.keras")),
    }
    # A sharded checkpoint, then broken copies of it.
    world.comm.barrier()
    ckpt = os.path.join(shared, "errors-ckpt")
    tfshard.shard(gpt2_builder()).save(ckpt)
    tampered = ("ckpt-index-edited", "ckpt-ranges-swapped", "ckpt-files-swapped",
                "ckpt-ranges-gap")
    if world.rank == 0:
        for name in ("ckpt-newer", "ckpt-missing", "ckpt-truncated", "ckpt-flipped") + tampered:
            shutil.copytree(ckpt, os.path.join(shared, name), dirs_exist_ok=True)
        _tamper(ckpt, shared)
        idx = json.load(open(os.path.join(ckpt, "tfshard.json")))
        idx["version"] = 99
        json.dump(idx, open(os.path.join(shared, "ckpt-newer", "tfshard.json"), "w"))
        last = idx["files"][-1]
        os.remove(os.path.join(shared, "ckpt-missing", last))
        p = os.path.join(shared, "ckpt-truncated", last)
        _truncate(p, p + ".x", keep=0.5)
        os.replace(p + ".x", p)
        _flip_dataset(os.path.join(shared, "ckpt-flipped", last))
    world.comm.barrier()
    for name in ("ckpt-newer", "ckpt-missing", "ckpt-truncated", "ckpt-flipped") + tampered:
        cases[name] = (lambda n: lambda: tfshard.load(os.path.join(shared, n)))(name)
    for name, fn in cases.items():
        def run(fn=fn):
            fn()
            return {}
        results[name] = guarded(run, expect_error=True)
    # Still usable afterwards: a good load on every rank.
    results["after_errors"] = guarded(
        lambda: {"cut": _held(tfshard.load(os.path.join(work, "good.keras")))["cut"]})


def _tamper(ckpt, shared):
    """Index edits a checksum alone catches, and ones made with the checksum redone."""
    from tfshard import io as tfio

    def write(name, index, redo_checksum=True):
        if redo_checksum:
            index["checksum"] = tfio.index_checksum(index)
        json.dump(index, open(os.path.join(shared, name, "tfshard.json"), "w"))

    def index():
        return json.load(open(os.path.join(ckpt, "tfshard.json")))

    def first_sharded(idx):
        return next(k for k, v in idx["tensors"].items()
                    if v["axis"] is not None and v["ranges"][0] != v["ranges"][1])

    idx = index()  # one range edited, checksum left as it was
    key = first_sharded(idx)
    idx["tensors"][key]["ranges"][0], idx["tensors"][key]["ranges"][1] = (
        idx["tensors"][key]["ranges"][1], idx["tensors"][key]["ranges"][0])
    write("ckpt-index-edited", idx, redo_checksum=False)
    write("ckpt-ranges-swapped", idx)  # the same edit, checksum recomputed
    idx = index()  # rank files swapped (names and sizes in the index follow)
    idx["files"][0], idx["files"][1] = idx["files"][1], idx["files"][0]
    idx["file_bytes"][0], idx["file_bytes"][1] = idx["file_bytes"][1], idx["file_bytes"][0]
    write("ckpt-files-swapped", idx)
    idx = index()  # a range that leaves a gap
    key = first_sharded(idx)
    idx["tensors"][key]["ranges"][0][1] -= 1
    write("ckpt-ranges-gap", idx)


def _flip_dataset(path):
    """Flips one byte inside the largest dataset's stored data (not the metadata)."""
    import h5py

    best = None
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            nonlocal best
            if isinstance(obj, h5py.Dataset) and obj.chunks:
                size = obj.id.get_storage_size()
                if best is None or size > best[1]:
                    info = obj.id.get_chunk_info(0)
                    best = (info.byte_offset, size)
        f.visititems(visit)
    with open(path, "r+b") as f:
        f.seek(best[0] + 10)
        b = f.read(1)
        f.seek(best[0] + 10)
        f.write(bytes([b[0] ^ 0xFF]))


_LOADED = {}

# One launch per world size (launches are the expensive part): the np3 launch
# writes the checkpoints the np2 and np1 launches read.
# Real SmolLM2 loads sharded at 2 ranks here; at 3 ranks it is the README main job
# (tests/test_cli.py: generate, MATCH against the unsharded model), under tf.distribute
# the MultiWorker generation (tests/workers/generation.py).
SUITES = {"references": [run_references],
          "np3": [run_minilm, run_save],
          "np2": [run_real, run_reload, run_formats, run_errors],
          "np1": [run_reload],
          # Under tf.distribute (--mirrored N, or tfshard launch): every source kind,
          # the Horovod np3 checkpoints resharded; MirroredStrategy saves too (read
          # back by the Horovod np2 and the np1 runs).
          "distribute": [run_minilm, run_reload, run_formats],
          "distribute_save": [run_minilm, run_reload, run_formats,
                              lambda w, r, s: run_save(w, r, s, prefix="mirrored-")],
          **{name: [fn] for name, fn in (("real", run_real), ("save", run_save),
                                         ("reload", run_reload), ("formats", run_formats),
                                         ("errors", run_errors))}}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--suite", required=True, choices=sorted(SUITES))
    parser.add_argument("--out", required=True)
    parser.add_argument("--shared", required=True)
    parser.add_argument("--mirrored", type=int, default=0,
                        help="load over a MirroredStrategy of this many logical CPU devices")
    args = parser.parse_args()
    if args.mirrored:
        global STRATEGY
        import tensorflow as tf

        STRATEGY = tf.distribute.MirroredStrategy(tfshard.cpu_devices(args.mirrored))
    world = tfshard.init()
    os.makedirs(args.shared, exist_ok=True)
    results = {"rank": world.rank, "size": world.size, "backend": world.backend,
               "replicas": args.mirrored or world.size, "cases": {}}
    for fn in SUITES[args.suite]:
        fn(world, results["cases"], args.shared)
    path = write_results(results, args.out, world.rank)
    print(f"rank {world.rank}: {len(results['cases'])} cases written to {path}", flush=True)


if __name__ == "__main__":
    main()
