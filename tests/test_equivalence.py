"""shard(model).predict(x) equals model.predict(x) under ./horovodrun.sh at 2 and 3 ranks.

The launcher's default is an MPI job (tfshard's MPI collectives); the same suite also
runs once at 2 ranks under `--gloo` (Horovod over Gloo), which stays supported, on the
six-model matrix (models.MATRIX; the further families' code past the communicator is the
one the MPI runs check)."""

import pytest

import models
from conftest import case_on_all_ranks


def _check_equivalence(ranks, name, np_):
    for rank, rec in enumerate(case_on_all_ranks(ranks, name)):
        assert rec["ok"], f"rank {rank}: {rec.get('error_type')}: {rec.get('message')}\n{rec.get('traceback')}"
        assert rec["keys_out"] == rec["keys_ref"], f"rank {rank}: output structure differs"
        for key, o in rec["outputs"].items():
            where = f"{name} output {key!r} on rank {rank} of {np_}"
            assert o["shape_out"] == o["shape_ref"], where
            assert o["dtype_out"] == o["dtype_ref"], where
            assert o["max_diff"] <= o["tol"], f"{where}: max|diff| {o['max_diff']:.3g} > {o['tol']:.3g}"
            assert o["argmax_equal"], f"{where}: argmax differs"
        assert rec["call_matches_predict"], f"rank {rank}: sharded(x) differs from predict(x)"
        # Something was actually cut, and every cut layer holds only its slice.
        assert rec["cut"] >= 2, f"{name}: only {rec['cut']} layers cut"
        for path, s in rec["slices"].items():
            assert s["local"] == s["planned"], f"{path} on rank {rank}: holds {s['local']}, plan says {s['planned']}"
            assert s["local"] != s["full"], f"{path} on rank {rank} still holds the full kernel {s['full']}"


@pytest.mark.parametrize("np_", [2, 3])
@pytest.mark.parametrize("name", list(models.EQUIVALENCE))
def test_sharded_predict_matches_unsharded(suite_runs, np_, name):
    _check_equivalence(suite_runs("equivalence", np_), name, np_)


@pytest.mark.parametrize("name", models.MATRIX)
def test_sharded_predict_matches_unsharded_over_horovod_gloo(suite_runs, name):
    _check_equivalence(suite_runs("equivalence", 2, launcher="gloo", models=models.MATRIX),
                       name, 2)


def test_gpt2_odd_vocab_on_four_ranks(suite_runs):
    # 50257 = 4 * 12564 + 1: rank 0 holds one row more; heads 4 -> one per rank.
    _check_equivalence(suite_runs("gpt2", 4), "gpt2", 4)


@pytest.mark.parametrize("np_", [2, 3])
def test_ranks_get_identical_outputs(suite_runs, np_):
    ranks = suite_runs("equivalence", np_)
    for name in models.EQUIVALENCE:
        diffs = [rec["outputs"] for rec in case_on_all_ranks(ranks, name) if rec["ok"]]
        for other in diffs[1:]:
            for key in diffs[0]:
                assert other[key]["max_diff"] == diffs[0][key]["max_diff"], name
