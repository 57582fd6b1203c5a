"""Sharded generation scenarios; each rank writes JSON (see scenarios.py).

    horovodrun -np N python tests/workers/generation.py --suite npN --out DIR
    python tests/workers/generation.py --suite reference --out DIR   # one process

The `reference` suite runs SmolLM2 unsharded once, in one process, and saves
its greedy tokens; the multi-rank suites compare against that file (and
compute the small random models' references themselves).
"""

import argparse
import faulthandler
import json
import signal
import os
import sys
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tfshard.cli import import_tensorflow  # noqa: E402

import_tensorflow("keras_hub")  # the collector paused meanwhile, then the heap frozen
import tensorflow as tf  # noqa: E402

import keras  # noqa: E402

import models  # noqa: E402
import tfshard  # noqa: E402
from scenarios import expect_error, guarded, write_results  # noqa: E402
from tfshard import comm as comm_lib  # noqa: E402

PROMPT = "The capital of France is"
NEW_TOKENS = 8
LENGTH = 12  # random models: prompts padded to this, 4..6 real tokens


def prompts(vocab, rows=3):
    """Token-id prompts of different lengths (4, 6, 5), padded to LENGTH."""
    ids = np.random.default_rng(3).integers(1, vocab, (rows, LENGTH)).astype("int32")
    mask = np.zeros((rows, LENGTH), bool)
    for r, n in enumerate([4, 6, 5][:rows]):
        mask[r, :n] = True
    return {"token_ids": np.where(mask, ids, 0).astype("int32"), "padding_mask": mask}


def cache_record(sharded, x):
    """This rank's KV cache shape, next to the one the plan says it must have (and,
    under MirroredStrategy, every local replica's)."""
    counts = sharded.plan.attention
    backbone = sharded.inner.backbone
    ids = x["token_ids"]
    if len(sharded.replicas) > 1:  # MirroredStrategy: every replica's, through strategy.run
        per_replica = sharded.strategy.run(
            lambda: tf.shape(sharded.replica_model()._build_cache(tf.identity(ids))[1]))
        shapes = [np.asarray(s).tolist() for s in
                  sharded.strategy.experimental_local_results(per_replica)]
    else:
        shapes = [list(sharded.inner._build_cache(ids)[1].shape)]
    expected = []
    for replica in sharded.replicas:
        expected.append([x["token_ids"].shape[0], backbone.num_layers, 2, x["token_ids"].shape[1],
                         counts[0].local(replica.comm.rank)[1], counts[0].head_dim])
    return {"cache_shape": shapes[0], "expected_cache_shape": expected[0],
            "replica_cache_shapes": shapes, "replica_expected_cache_shapes": expected,
            "full_kv_heads": counts[0].heads_kv}


def run_random(world, results, names, sampler="greedy"):
    """keras-hub CausalLMs from config: sharded token ids == unsharded token ids."""
    for name in names:
        def case(name=name):
            model, _ = models.EQUIVALENCE[name]()
            x = prompts(model.backbone.vocabulary_size)
            model.compile(sampler="greedy")
            ref = model.generate(dict(x), stop_token_ids=None)
            sharded = tfshard.shard(model, strategy=STRATEGY)
            out = sharded.generate(dict(x), stop_token_ids=None, sampler="greedy")
            return {"ref": ref["token_ids"].tolist(), "out": out["token_ids"].tolist(),
                    "mask_equal": bool(np.array_equal(ref["padding_mask"], out["padding_mask"])),
                    "prompt_kept": bool(np.array_equal(out["token_ids"][x["padding_mask"]],
                                                       x["token_ids"][x["padding_mask"]])),
                    **cache_record(sharded, x)}
        results[f"random_{name}"] = guarded(case)


def run_sampler(world, results):
    """A top-k sampler with no seed (a different seed state on every rank):
    generate makes the ranks draw alike, and the draws equal an unsharded
    model's with rank 0's seed state."""
    import keras_hub

    def case():
        model, _ = models.gpt2()
        x = prompts(model.backbone.vocabulary_size)
        sampler = keras_hub.samplers.TopKSampler(k=3, seed=None)
        # As in unseeded processes (here Keras's global seed made them equal).
        var = sampler.variables[0]
        var.assign((np.arange(np.prod(var.shape)) + 1000 * (world.rank + 1)).reshape(var.shape)
                   .astype(np.asarray(var.numpy()).dtype))
        state = np.asarray(var.numpy())
        rank0_state = world.comm.allgather_numpy(state.astype(np.int64))[0]
        ref_sampler = keras_hub.samplers.TopKSampler(k=3, seed=None)
        ref_sampler.variables[0].assign(rank0_state.astype(state.dtype))
        model.compile(sampler=ref_sampler)
        ref = model.generate(dict(x), stop_token_ids=None)
        sharded = tfshard.shard(model, strategy=STRATEGY)
        out = sharded.generate(dict(x), stop_token_ids=None, sampler=sampler)
        return {"ref": ref["token_ids"].tolist(), "out": out["token_ids"].tolist(),
                "seed_states_differed": bool(
                    (world.comm.allgather_numpy(state.astype(np.int64)) != rank0_state).any())}
    results["sampler_top_k"] = guarded(case)


def run_smollm2(world, results, reference_dir, tensor_parallel=None):
    """Real SmolLM2 weights, string in, string out: the unsharded tokens and text."""
    def case():
        sharded = tfshard.load("smollm2", tensor_parallel=tensor_parallel, strategy=STRATEGY)
        expected = json.loads(open(os.path.join(reference_dir, "smollm2.json")).read())
        preprocessor = sharded.preprocessor
        x = preprocessor.generate_preprocess([PROMPT], sequence_length=expected["max_length"])
        x = {k: np.asarray(v) for k, v in x.items()}
        ids = sharded.generate(x, stop_token_ids=None, sampler="greedy")
        if STRATEGY is None and world.backend != "multiworker":
            text = sharded.generate(PROMPT, max_length=expected["max_length"], strip_prompt=True)
        else:  # keras-hub's loop under tf.distribute: the string path once, as strip_prompt does
            made = np.asarray(ids["padding_mask"]).astype(bool) & ~x["padding_mask"].astype(bool)
            text = preprocessor.generate_postprocess({"token_ids": ids["token_ids"],
                                                      "padding_mask": made})[0]  # one prompt
        return {"out": ids["token_ids"].tolist(), "ref": expected["token_ids"],
                "text": str(text), "ref_text": expected["text"],
                **cache_record(sharded, x)}
    results["smollm2" if tensor_parallel is None else f"smollm2_tp{tensor_parallel}"] = guarded(case)


def run_dp(world, results):
    """2 data-parallel groups x TP=2: the prompts are shared out, the result is whole."""
    def case():
        model, _ = models.llama()
        x = prompts(model.backbone.vocabulary_size)
        model.compile(sampler="greedy")
        ref = model.generate(dict(x), stop_token_ids=None)
        sharded = tfshard.shard(model, tensor_parallel=2)
        out = sharded.generate(dict(x), stop_token_ids=None, sampler="greedy")
        return {"ref": ref["token_ids"].tolist(), "out": out["token_ids"].tolist(),
                "group": sharded.group, "groups": sharded.groups}
    results["dp_llama"] = guarded(case)


def run_errors(world, results):
    """Bad calls raise the same clear ValueError on every rank, and never hang."""
    def gpt2():
        model, _ = models.gpt2()
        return tfshard.shard(model), model.backbone.vocabulary_size

    def not_causal_lm():
        model, x = models.bert()
        tfshard.shard(model).generate(x, stop_token_ids=None)

    def strings_without_tokenizer():
        gpt2()[0].generate("hello", stop_token_ids=None)

    def too_long():
        sharded, vocab = gpt2()
        x = prompts(vocab)
        x = {k: np.concatenate([v] * 3, axis=1) for k, v in x.items()}  # 36 > 32 positions
        sharded.generate(x, stop_token_ids=None)

    def bad_token_id():
        sharded, vocab = gpt2()
        x = prompts(vocab)
        x["token_ids"][1, 0] = vocab + 5
        sharded.generate(x, stop_token_ids=None)

    def different_prompts():
        sharded, vocab = gpt2()
        x = prompts(vocab)
        x["token_ids"][0, 0] = 1 + world.rank
        sharded.generate(x, stop_token_ids=None)

    for name, fn in [("not_causal_lm", not_causal_lm),
                     ("strings_without_tokenizer", strings_without_tokenizer),
                     ("too_long", too_long), ("bad_token_id", bad_token_id),
                     ("different_prompts", different_prompts)]:
        results[f"error_{name}"] = expect_error(fn)


def reference(out_dir):
    """SmolLM2 unsharded, in this one process: greedy tokens and text."""
    world = tfshard.World(comm_lib.create("local"), "local")
    model = tfshard.load("smollm2", world=world)
    preprocessor = model.preprocessor
    length = int(np.asarray(preprocessor.generate_preprocess(
        [PROMPT], sequence_length=64)["padding_mask"]).sum()) + NEW_TOKENS
    x = preprocessor.generate_preprocess([PROMPT], sequence_length=length)
    x = {k: np.asarray(v) for k, v in x.items()}
    inner = model.inner
    inner.compile(sampler="greedy", jit_compile=False)
    ids = inner.generate(x, stop_token_ids=None)  # keras-hub's own generate, unsharded
    text = model.generate(PROMPT, max_length=length, strip_prompt=True)  # greedy: compiled above
    path = os.path.join(out_dir, "smollm2.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"token_ids": np.asarray(ids["token_ids"]).tolist(), "text": str(text),
                   "max_length": length}, f)
    os.replace(path + ".tmp", path)
    print(f"reference: {text!r} written to {path}", flush=True)


# `--mirrored N`: shard over a MirroredStrategy of N logical CPUs in this process.
STRATEGY = None

SUITES = {
    # Under tf.distribute: --mirrored N, or tfshard launch (MultiWorker).
    "distribute": lambda w, r, d: (run_random(w, r, ["gpt2", "llama"]), run_sampler(w, r),
                                   run_smollm2(w, r, d)),
    # Real SmolLM2 under tf.distribute runs once, under MultiWorker (two processes);
    # MirroredStrategy runs keras-hub's loop on the same layers from config.
    "distribute_sampler": lambda w, r, d: (run_random(w, r, ["gpt2", "llama"]),
                                           run_sampler(w, r)),
    "distribute_random": lambda w, r, d: run_random(w, r, ["gpt2", "llama"]),
    "np2": lambda w, r, d: (run_random(w, r, ["gpt2", "llama", "mistral", "gemma", "opt"]),
                            run_sampler(w, r), run_errors(w, r), run_smollm2(w, r, d)),
    # Real SmolLM2 at 3 ranks is the README main job (tests/test_cli.py).
    "np3": lambda w, r, d: run_random(w, r, ["gpt2", "llama", "gemma"]),
    "np4": lambda w, r, d: run_dp(w, r),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--suite", required=True, choices=sorted(SUITES) + ["reference"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--reference", help="folder holding the reference suite's output")
    parser.add_argument("--mirrored", type=int, default=0,
                        help="shard over a MirroredStrategy of this many logical CPU devices")
    args = parser.parse_args()
    if args.mirrored:
        global STRATEGY
        import tensorflow as tf

        STRATEGY = tf.distribute.MirroredStrategy(tfshard.cpu_devices(args.mirrored))
    if args.suite == "reference":
        reference(args.out)
        return
    world = tfshard.init()
    results = {"rank": world.rank, "size": world.size, "backend": world.backend,
               "replicas": args.mirrored or world.size, "cases": {}}
    try:
        SUITES[args.suite](world, results["cases"], args.reference)
    except Exception:  # noqa: BLE001 - recorded; the test fails on it
        results["suite_error"] = traceback.format_exc()
    path = write_results(results, args.out, world.rank)
    print(f"rank {world.rank}: {len(results['cases'])} cases written to {path}", flush=True)


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints every thread's stack
    keras.config.disable_interactive_logging()
    main()
