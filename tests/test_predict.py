"""predict as a drop-in under DP x TP: horovodrun -np 4, tensor_parallel=2 (two groups of two)."""

import re
import pytest

from conftest import case_on_all_ranks

NP, TP = 4, 2
MODELS = ["mlp", "two_inputs_two_outputs", "sequential_embedding", "bert", "gpt2", "llama"]
RUNS = ["numpy_even", "numpy_weighted", "numpy_adaptive", "dataset", "generator_adaptive",
        "pydataset_weighted", "steps", "predict_on_batch"]


def _assert_matches(rec, where):
    assert rec["keys_out"] == rec["keys_ref"], f"{where}: output structure differs"
    for key, o in rec["outputs"].items():
        assert o["shape_out"] == o["shape_ref"], f"{where} {key}: {o['shape_out']} != {o['shape_ref']}"
        assert o["dtype_out"] == o["dtype_ref"], f"{where} {key}"
        assert o["max_diff"] <= o["tol"], f"{where} {key}: max|diff| {o['max_diff']:.3g}"
        assert o["argmax_equal"], f"{where} {key}: argmax differs"


@pytest.mark.parametrize("name", MODELS)
def test_every_schedule_and_input_kind_matches_unsharded(suite_runs, name):
    for rank, rec in enumerate(case_on_all_ranks(suite_runs("dp", NP), f"dp_{name}")):
        assert rec["ok"], f"rank {rank}: {rec.get('message')}\n{rec.get('traceback')}"
        assert (rec["groups"], rec["tensor_parallel"], rec["group"]) == (NP // TP, TP, rank // TP)
        for run in RUNS:
            _assert_matches(rec["runs"][run], f"{name}/{run} on rank {rank}")
        assert rec["rank0_gets_none_elsewhere"], f"rank {rank}"
        if rank == 0:
            _assert_matches(rec["runs"]["gather_rank0"], f"{name}/gather_rank0")


def test_shares_follow_the_schedule(suite_runs):
    rec = case_on_all_ranks(suite_runs("dp", NP), "dp_gpt2")[0]
    runs = rec["runs"]
    assert runs["numpy_even"]["schedule"]["batches"] == [6, 6]          # 12 batches of 2 rows
    assert runs["numpy_weighted"]["schedule"]["batches"] == [9, 3]      # weights 3:1
    assert runs["pydataset_weighted"]["schedule"]["batches"] == [2, 3]  # weights 1:2 of 5 batches
    for run in RUNS[:-1]:
        sched = runs[run]["schedule"]
        assert sum(sched["rows"]) == (12 if run == "steps" else 23), run


def test_adaptive_gives_a_slow_group_less_work(suite_runs):
    recs = case_on_all_ranks(suite_runs("dp", NP), "dp_slow_group")
    for rank, rec in enumerate(recs):
        assert rec["ok"], rec.get("traceback")
        even, adaptive = rec["even"], rec["adaptive"]
        assert even["batches"] == [24, 24] and even["share"] == [0.5, 0.5]
        # Group 1 sleeps 50 ms a batch: adaptive must move work to group 0.
        assert adaptive["share"][1] <= 0.4, adaptive
        assert adaptive["batches"][0] > adaptive["batches"][1]
        assert sum(adaptive["batches"]) == 48
        assert adaptive["rounds"][0] == [6, 6]  # first round even, then measured
        # Every rank derived the same assignment from the gathered measurements.
        assert adaptive["rounds"] == recs[0]["adaptive"]["rounds"], f"rank {rank} disagrees"


def test_progress_bar_only_on_rank_zero(suite_runs):
    out = suite_runs.output("dp", NP)
    for rank in range(NP):
        assert f"PROGRESS-END rank {rank}" in out
    # mpiexec prefixes every write (not every line) with "[rank] ": cut the output at
    # the prefixes and attribute each piece to its rank.
    pieces = re.split(r"\[(\d+)\] ", out)
    bars = [(int(rank), text) for rank, text in zip(pieces[1::2], pieces[2::2])
            if "step" in text and "/" in text]
    assert bars, "no progress bar printed"
    assert all(rank == 0 for rank, _ in bars), bars[:5]


ERRORS = {
    "dp_err_tp_not_dividing": ["tensor_parallel=3", "4 ranks", "[1, 2, 4]"],
    "dp_err_weights_length": ["3 entries", "2 data-parallel groups"],
    "dp_err_weights_nonpositive": ["weights[1]", "> 0"],
    "dp_err_unknown_schedule": ["fastest", "even", "adaptive"],
    "dp_err_empty": ["empty", "(0, 12)"],
    "dp_err_batch_size_with_dataset": ["batch_size", "yields batches"],
    # Only group 1 (ranks 2, 3) computes the bad batch; every rank must still raise.
    "dp_err_bad_id_in_one_group": ["batch 10", "Token ids", "50257", "rank 2"],
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_arguments_raise_on_every_rank(suite_runs, case):
    for rank, rec in enumerate(case_on_all_ranks(suite_runs("dp", NP), case)):
        assert not rec["ok"] and rec["error_type"] == "ValueError", (rank, rec)
        for word in ERRORS[case]:
            assert word in rec["message"], (rank, word, rec["message"])


def test_world_still_works_after_dp_errors(suite_runs):
    for rec in case_on_all_ranks(suite_runs("dp", NP), "dp_after_errors"):
        assert rec["ok"], rec.get("traceback")
        o = rec["outputs"]["output"]
        assert o["max_diff"] <= o["tol"]
