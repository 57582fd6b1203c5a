"""Sharded generation under horovodrun (tests/workers/generation.py): greedy
tokens equal the unsharded model's for keras-hub CausalLMs from config and for
real SmolLM2 weights, each rank's KV cache holds only its heads, random
samplers stay in step across ranks, and bad calls fail on every rank."""

import subprocess
import sys

import pytest

from conftest import records_ok, LAUNCH_TIMEOUT, ROOT, launch_ranks, require_clean_launch

WORKER = ROOT / "tests" / "workers" / "generation.py"


class GenerationRuns:
    def __init__(self, tmp_path_factory):
        self._tmp = tmp_path_factory
        self._cache = {}
        self._reference = None

    def reference(self):
        """SmolLM2's unsharded greedy tokens, computed once in one process."""
        if self._reference is None:
            out = self._tmp.mktemp("reference")
            res = subprocess.run([sys.executable, str(WORKER), "--suite", "reference", "--out",
                                  str(out)], cwd=ROOT, capture_output=True, text=True,
                                 timeout=LAUNCH_TIMEOUT)
            assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
            self._reference = out
        return self._reference

    def __call__(self, np_):
        """Records of the launch at `np_` ranks under horovodrun, or of one of
        `DISTRIBUTE`'s runs (MirroredStrategy in one process, tfshard launch)."""
        if np_ not in self._cache:
            real = np_ in (2, "multiworker2")
            ref = self.reference() if real else self._tmp.mktemp("none")
            out = self._tmp.mktemp(f"gen-np{np_}")
            argv = [WORKER, "--out", out, "--reference", ref]
            if np_ in DISTRIBUTE:
                suite, n, launcher = DISTRIBUTE[np_]
                mirrored = ["--mirrored", str(n)] if launcher == "none" else []
                self._cache[np_] = launch_ranks(1 if mirrored else n,
                                                argv + ["--suite", suite] + mirrored, out,
                                                launcher=launcher)
            else:
                self._cache[np_] = launch_ranks(np_, argv + ["--suite", f"np{np_}"], out)
        ranks = require_clean_launch("generation", np_, *self._cache[np_])
        for r in ranks:
            assert "suite_error" not in r, r["suite_error"]
        return ranks


# Under tf.distribute: (worker suite, replicas, launcher).
DISTRIBUTE = {"mirrored2": ("distribute_sampler", 2, "none"),
              "mirrored3": ("distribute_random", 3, "none"),
              "multiworker2": ("distribute", 2, "tfshard")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return GenerationRuns(tmp_path_factory)



def _assert_cache_sliced(recs, name):
    kv = []
    for rank, rec in enumerate(recs):
        assert rec["cache_shape"] == rec["expected_cache_shape"], (name, rank, rec)
        kv.append(rec["cache_shape"][4])
    full = recs[0]["full_kv_heads"]
    # Each rank holds only its K/V heads: a split (sums to the full count) or,
    # with fewer K/V heads than ranks, one replicated head of its group.
    assert all(k < full for k in kv) or full < len(recs) and all(k == 1 for k in kv) or \
        full == 1, (name, kv, full)
    if full >= len(recs):
        assert sum(kv) == full, (name, kv, full)


@pytest.mark.parametrize("np_,name", [(2, n) for n in ("gpt2", "llama", "mistral", "gemma", "opt")]
                         + [(3, n) for n in ("gpt2", "llama", "gemma")])
def test_greedy_tokens_equal_unsharded(runs, np_, name):
    recs = records_ok(runs(np_), f"random_{name}")
    for rank, rec in enumerate(recs):
        assert rec["out"] == rec["ref"], f"{name} rank {rank} of {np_}: {rec['out']} != {rec['ref']}"
        assert rec["mask_equal"] and rec["prompt_kept"], (name, rank)
    _assert_cache_sliced(recs, name)


# At 3 ranks: tests/test_cli.py runs the README main job (SmolLM2, 3 ranks, MATCH).
@pytest.mark.parametrize("np_", [2])
def test_real_smollm2_continues_like_the_unsharded_model(runs, np_):
    recs = records_ok(runs(np_), "smollm2")
    for rank, rec in enumerate(recs):
        assert rec["out"] == rec["ref"], f"rank {rank} of {np_}: tokens differ"
        assert rec["text"] == rec["ref_text"], (rank, rec["text"], rec["ref_text"])
        assert rec["text"].startswith(" Paris"), rec["text"]
    _assert_cache_sliced(recs, "smollm2")


def _per_replica(recs):
    """Under MirroredStrategy one process records every replica's cache: as rank records."""
    if len(recs) > 1:
        return recs
    rec = recs[0]
    return [{**rec, "cache_shape": shape, "expected_cache_shape": expected}
            for shape, expected in zip(rec["replica_cache_shapes"],
                                       rec["replica_expected_cache_shapes"])]


@pytest.mark.parametrize("run,name", [(r, n) for r in DISTRIBUTE for n in ("gpt2", "llama")])
def test_greedy_tokens_equal_unsharded_under_tf_distribute(runs, run, name):
    """keras-hub's loop under MirroredStrategy (2 and 3 replicas: GPT-2's 4 heads split
    2/1/1) and MultiWorker: each replica decodes with its own K/V heads."""
    recs = records_ok(runs(run), f"random_{name}")
    assert runs(run)[0]["replicas"] == DISTRIBUTE[run][1]
    for rank, rec in enumerate(recs):
        assert rec["out"] == rec["ref"], f"{name} {run} process {rank}: {rec['out']} != {rec['ref']}"
        assert rec["mask_equal"] and rec["prompt_kept"], (name, rank)
    replicas = _per_replica(recs)
    assert len(replicas) == DISTRIBUTE[run][1]
    _assert_cache_sliced(replicas, name)


def test_real_smollm2_under_multiworker(runs):
    """Real SmolLM2 under tf.distribute, once: MultiWorker's two processes (the same
    sharded layers run under MirroredStrategy from config above; real MiniLM loads under
    MirroredStrategy in tests/test_checkpoint.py)."""
    recs = records_ok(runs("multiworker2"), "smollm2")
    for rank, rec in enumerate(recs):
        assert rec["out"] == rec["ref"], f"multiworker2 process {rank}: tokens differ"
        assert rec["text"] == rec["ref_text"], (rank, rec["text"], rec["ref_text"])
    _assert_cache_sliced(recs, "smollm2")


@pytest.mark.parametrize("run", ["mirrored2", "multiworker2"])
def test_random_sampler_under_tf_distribute(runs, run):
    # A top-k sampler: every replica draws rank 0's tokens (its own sampler copy on its
    # device under MirroredStrategy, rank 0's seed state under MultiWorker).
    for rank, rec in enumerate(records_ok(runs(run), "sampler_top_k")):
        assert rec["out"] == rec["ref"], f"{run} process {rank}: not the unsharded draws"
    if run == "multiworker2":
        assert records_ok(runs(run), "sampler_top_k")[0]["seed_states_differed"]


def test_random_sampler_draws_alike_on_every_rank(runs):
    recs = records_ok(runs(2), "sampler_top_k")
    assert recs[0]["seed_states_differed"], "the test needs ranks that start from different seeds"
    for rank, rec in enumerate(recs):
        assert rec["out"] == recs[0]["out"], f"rank {rank} sampled other tokens than rank 0"
        assert rec["out"] == rec["ref"], f"rank {rank}: not the unsharded draws with rank 0's seed"


def test_data_parallel_groups_share_prompts(runs):
    recs = records_ok(runs(4), "dp_llama")
    assert sorted({r["group"] for r in recs}) == [0, 1] and recs[0]["groups"] == 2
    for rank, rec in enumerate(recs):
        assert rec["out"] == rec["ref"], f"rank {rank}: {rec['out']} != {rec['ref']}"


@pytest.mark.parametrize("case,words", [
    ("not_causal_lm", ["needs a keras-hub CausalLM", "BertBackbone"]),
    ("strings_without_tokenizer", ["need a tokenizer", "token ids"]),
    ("too_long", ["length 36", "32 positions", "max_length <= 32"]),
    ("bad_token_id", ["token_embedding", "50262", "row 1, position 0", "[0, 50257)"]),
    ("different_prompts", ["prompts differs on rank(s) [1]"]),
])
def test_bad_calls_fail_clearly_on_every_rank(runs, case, words):
    for rank, rec in enumerate(runs(2)[i]["cases"][f"error_{case}"] for i in range(2)):
        assert not rec["ok"] and rec["error_type"] == "ValueError", (case, rank, rec)
        for w in words:
            assert w in rec["message"], (case, rank, w, rec["message"])
