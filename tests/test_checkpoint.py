"""tfshard.load / ShardedModel.save under horovodrun: real weights, formats,
resharding N -> M, and broken files (tests/workers/checkpoints.py)."""

import pytest

from conftest import records_ok, ROOT, launch_ranks, require_clean_launch

WORKER = ROOT / "tests" / "workers" / "checkpoints.py"


class CheckpointRuns:
    """Runs each (suite, np) once per session; launches share one folder."""

    def __init__(self, tmp_path_factory):
        self._tmp = tmp_path_factory
        self.shared = tmp_path_factory.mktemp("shared")
        self._cache = {}

    def __call__(self, np_):
        """The per-rank records of the launch at `np_` ranks.

        Order: Horovod np3 (it saves), then MirroredStrategy 2 (reads np3's
        checkpoints, saves its own), then the Horovod np2 / np1 launches (read
        both); the MultiWorker run reads np3's.
        """
        if "references" not in self._cache:  # the real models' outputs, once, unsharded
            out = self._tmp.mktemp("references")
            self._cache["references"] = launch_ranks(
                1, [WORKER, "--suite", "references", "--out", out, "--shared", self.shared],
                out, launcher="none")
        ranks = require_clean_launch("checkpoint references", 1, *self._cache["references"])
        records_ok(ranks, "reference_minilm")
        records_ok(ranks, "reference_smollm2")
        if np_ != 3 and 3 not in self._cache:
            self(3)
        if np_ in (1, 2) and "mirrored" not in self._cache:
            self("mirrored")
        if np_ not in self._cache:
            out = self._tmp.mktemp(f"np{np_}")
            argv = [WORKER, "--suite", f"np{np_}", "--out", out, "--shared", self.shared]
            if np_ == "mirrored":
                argv[2] = "distribute_save"
                self._cache[np_] = launch_ranks(1, argv + ["--mirrored", "2"], out,
                                                launcher="none")
            elif np_ == "multiworker":
                argv[2] = "distribute"
                self._cache[np_] = launch_ranks(2, argv, out, launcher="tfshard")
            else:
                # A longer Horovod cycle: these launches are compute-bound with few
                # collectives, and 3 ranks share 2 cores.
                self._cache[np_] = launch_ranks(np_, argv, out,
                                                env={"TFSHARD_CYCLE_TIME_MS": "2"})
        return require_clean_launch("checkpoints", np_, *self._cache[np_])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return CheckpointRuns(tmp_path_factory)



def _assert_equal_outputs(ranks, name, sliced=True):
    for rank, rec in enumerate(records_ok(ranks, name)):
        assert rec["keys_out"] == rec["keys_ref"]
        for key, o in rec["outputs"].items():
            where = f"{name} output {key!r} on rank {rank} of {len(ranks)}"
            assert o["shape_out"] == o["shape_ref"] and o["dtype_out"] == o["dtype_ref"], where
            assert o["max_diff"] <= o["tol"], f"{where}: max|diff| {o['max_diff']:.3g} > tol {o['tol']:.3g}"
            assert o["argmax_equal"], f"{where}: argmax differs"
        if sliced and len(ranks) > 1:
            assert rec["cut"] >= 2, f"{name}: only {rec['cut']} layers cut"
            assert rec["local_matches_plan"], f"{name} on rank {rank}: local shapes differ from the plan"
            assert rec["full_kernels_held"] == [], f"{name} on rank {rank} holds full kernels {rec['full_kernels_held']}"


@pytest.mark.parametrize("name,np_", [("minilm", 2), ("minilm", 3), ("smollm2", 2)])
def test_real_weights_load_sharded(runs, np_, name):
    """MiniLM (safetensors via keras-hub's converter) and SmolLM2 (GGUF) equal
    the unsharded model from the same files. (SmolLM2 at 3 ranks: the README main job in
    tests/test_cli.py, which generates at 3 ranks and compares with the unsharded model.)"""
    ranks = runs(np_)
    _assert_equal_outputs(ranks, name)
    local = [r["cases"][name]["local_bytes"] for r in ranks]
    full = {"minilm": 22_713_216 * 4, "smollm2": 134_515_008 * 4}[name]
    # Each rank holds its share of the sharded weights (plus the small replicated ones).
    assert max(local) < full / np_ * 1.25 + 2**20, (name, local, full)


STRATEGIES = [pytest.param("mirrored", id="mirrored2"),
              pytest.param("multiworker", id="multiworker2")]


@pytest.mark.parametrize("backend", STRATEGIES)
def test_every_source_kind_loads_under_tf_distribute(runs, backend):
    """tfshard.load(strategy=...) (MirroredStrategy, 2 replicas in one process) and under
    tfshard launch (MultiWorker, 2 processes): real MiniLM, .keras,
    .weights.h5, a keras-hub preset, load_weights, and the checkpoints Horovod
    saved at TP=3 resharded to 2 (plus its gathered .keras)."""
    ranks = runs(backend)
    assert ranks[0]["backend"] == ("local" if backend == "mirrored" else "multiworker")
    assert ranks[0]["replicas"] == 2
    # Real SmolLM2 under tf.distribute: loaded and generating under MultiWorker in
    # tests/test_generation.py (the GGUF path under a strategy, once).
    for name in ("minilm", "keras_file", "keras_hub_preset", "weights_h5", "reload_minilm",
                        "reload_gpt2"):
        _assert_equal_outputs(ranks, name, sliced=backend == "multiworker")
        if backend == "mirrored":  # one process: both replicas' slices, none whole
            for rec in records_ok(ranks, name):
                assert rec["cut"] >= 2 and rec["local_matches_plan"], (name, rec)
                assert rec["full_kernels_held"] == [], (name, rec["full_kernels_held"])
    for name in ("gathered_gpt2_tfshard", "load_weights"):
        _assert_equal_outputs(ranks, name, sliced=False)
    for rec in records_ok(ranks, "load_weights"):
        assert rec["differed_before"] > 1e-3, "the model loaded into already had the weights"


def test_save_under_mirrored_reloads_under_horovod_and_one_process(runs):
    """Saved under MirroredStrategy (sharded and gathered) after reading Horovod's TP=3
    checkpoint; read back under Horovod at 2 ranks and in one process."""
    for name in ("mirrored-save", "mirrored-save_gpt2"):
        saved = records_ok(runs("mirrored"), name)
        assert saved[0]["files"] == [f"rank-0000{r}-of-00002.h5" for r in range(2)]
        assert saved[0]["leftovers"] == [], "temporary folders left behind"
    _assert_equal_outputs(runs("mirrored"), "mirrored-save_gpt2", sliced=False)
    for m in (2, 1):
        ranks = runs(m)
        _assert_equal_outputs(ranks, "reload_mirrored_gpt2")
        _assert_equal_outputs(ranks, "gathered_mirrored_gpt2")


def test_save_at_three_reload_at_two_and_one(runs):
    for name in ("save", "save_gpt2"):
        saved = records_ok(runs(3), name)
        assert saved[0]["files"] == [f"rank-0000{r}-of-00003.h5" for r in range(3)]
        assert saved[0]["leftovers"] == [], "temporary folders left behind"
        assert saved[0]["running_save_kept"], "removed the folder of a save still running"
    _assert_equal_outputs(runs(3), "save_gpt2", sliced=False)
    for m in (2, 1):
        ranks = runs(m)
        _assert_equal_outputs(ranks, "reload_minilm")
        _assert_equal_outputs(ranks, "reload_gpt2")
        _assert_equal_outputs(ranks, "gathered_gpt2_tfshard")
        # save(gather=True) wrote ordinary .keras files.
        _assert_equal_outputs(ranks, "gathered_minilm_plain_keras", sliced=False)
        _assert_equal_outputs(ranks, "gathered_gpt2_plain_keras", sliced=False)


def test_keras_weights_h5_and_keras_hub_preset_of_gpt2_config(runs):
    ranks = runs(2)
    _assert_equal_outputs(ranks, "keras_file")
    _assert_equal_outputs(ranks, "keras_hub_preset")
    _assert_equal_outputs(ranks, "weights_h5")
    _assert_equal_outputs(ranks, "load_weights", sliced=False)
    for rec in records_ok(ranks, "load_weights"):
        assert rec["differed_before"] > 1e-3, "the model loaded into already had the weights"
    for rank, rec in enumerate(r["cases"]["plain_keras_save_refused"] for r in ranks):
        assert not rec["ok"] and "sharded.save" in rec["message"], (rank, rec)


ERRORS = {
    # case: texts the error message must contain on every rank
    "truncated_keras": ("cut.keras", "truncated or corrupt"),
    "corrupt_keras": ("flipped.keras", "CRC-32"),
    "truncated_weights_h5": ("cut.weights.h5", "truncated or corrupt"),
    "shape_mismatch": ("good.weights.h5", "shape"),
    "missing_tensor": ("good.weights.h5", "transformer_layer_2"),
    "truncated_gguf": ("cut.gguf", "truncated or corrupt"),
    "truncated_safetensors": ("model.safetensors", "truncated or corrupt"),
    "safe_mode": ("lambda.keras", "safe_mode"),
    "missing_file": ("nope.keras", "no such file"),
    # Was a silent wrong answer: each rank read its slices from a different file.
    "source_differs": ("seeded.keras", "source file differs on rank(s) [1] from rank 0"),
    "ckpt-newer": ("tfshard.json", "newer"),
    "ckpt-missing": ("rank-00001-of-00002.h5", "missing"),
    "ckpt-truncated": ("rank-00001-of-00002.h5", "truncated"),
    "ckpt-flipped": ("rank-00001-of-00002.h5", "checksum"),
    # Were silent wrong answers: an index edited by hand loaded and predicted wrongly.
    "ckpt-index-edited": ("tfshard.json", "checksum does not match"),
    "ckpt-ranges-swapped": ("rank-0000", "holds range", "the index says rank"),
    "ckpt-files-swapped": ("rank-0000", "written by rank", "renamed or mixed up"),
    "ckpt-ranges-gap": ("tfshard.json", "do not cover the axis"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_broken_files_fail_on_every_rank(runs, case):
    ranks = runs(2)
    must = ERRORS[case]
    for rank, r in enumerate(ranks):
        rec = r["cases"][case]
        assert not rec["ok"], f"{case}: rank {rank} loaded a broken file"
        assert rec["error_type"] in ("CheckpointError", "ValueError", "GGUFError"), (case, rank, rec)
        for text in must:
            assert text.lower() in rec["message"].lower(), f"{case} on rank {rank}: {rec['message']}"


def test_loading_still_works_after_errors(runs):
    for rec in records_ok(runs(2), "after_errors"):
        assert rec["cut"] >= 2
