"""Bitwise layer tests, per-rank memory, and bad input: under horovodrun at 2 and 3 ranks."""

import pytest

import models
from conftest import case_on_all_ranks


@pytest.mark.parametrize("np_", [2, 3])
@pytest.mark.parametrize("kind", list(models.BITWISE))
def test_bitwise_with_integer_weights(suite_runs, np_, kind):
    ranks = suite_runs("checks", np_)
    for rank, rec in enumerate(case_on_all_ranks(ranks, f"bitwise_{kind}")):
        assert rec["ok"], f"rank {rank}: {rec.get('message')}\n{rec.get('traceback')}"
        assert rec["cut"] == rec["rules"], f"{kind}: {rec['cut']} layers cut, {rec['rules']} ruled"
        for key, o in rec["outputs"].items():
            assert o["shape_out"] == o["shape_ref"]
            assert o["bitwise"], f"{kind} on rank {rank}: max|diff| {o['max_diff']} (must be exactly 0)"


@pytest.mark.parametrize("np_", [2, 3])
def test_param_bytes_per_rank(suite_runs, np_):
    ranks = suite_runs("checks", np_)
    recs = case_on_all_ranks(ranks, "memory")
    for rank, rec in enumerate(recs):
        assert rec["ok"], rec.get("traceback")
        expected = rec["sharded_full"] / np_ + rec["replicated"]
        assert abs(rec["after"] - expected) <= 0.01 * expected, (rank, rec)
        assert rec["after"] == rec["plan_local_bytes"], "plan.summary bytes disagree with the variables"
    # Slices partition the sharded bytes (row biases are replicated: a few bytes over).
    total = sum(r["local_sharded"] for r in recs)
    assert recs[0]["sharded_full"] <= total <= recs[0]["sharded_full"] * 1.001


ERRORS = {
    "err_id_too_large": ["Token ids", "token_embedding", "50257", "rank"],
    "err_id_negative": ["Token ids", "token_embedding", ">= 0", "rank"],
    "err_float_ids": ["token_ids", "float", "int32", "rank"],
    "err_wrong_rank": ["token_ids", "rank 3", "(5, 8, 1)"],
    "err_empty_batch": ["empty", "(0, 8)"],
    "err_dict_keys": ["Missing", "padding_mask", "unexpected", "mask"],
    "err_n_larger_than_dim": ["narrow", "sizes that work", "rank"],
    "err_ranks_disagree": ["model structure", "rank(s)", "differs"],
    "err_inputs_disagree": ["token_ids", "differs", "rank(s)"],
    "err_weights_disagree": ["weight values differs on rank(s)", "from rank 0"],
    "err_replicated_weight_disagrees": ["weight values differs on rank(s)", "from rank 0"],
}


@pytest.mark.parametrize("np_", [2, 3])
@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_raises_value_error_on_every_rank(suite_runs, np_, case):
    ranks = suite_runs("checks", np_)
    for rank, rec in enumerate(case_on_all_ranks(ranks, case)):
        assert not rec["ok"], f"{case}: rank {rank} raised nothing"
        assert rec["error_type"] == "ValueError", f"{case} rank {rank}: {rec['error_type']}: {rec['message']}"
        for word in ERRORS[case]:
            assert word in rec["message"], f"{case} rank {rank}: {word!r} not in {rec['message']!r}"


def test_quantized_layer_messages_agree(suite_runs):
    """Sharding a quantized model said "shard the float model, then quantize"; quantizing a
    sharded one said "quantize the model before sharding it" (issue 16). Since issue 17,
    int8 works in both orders and int4 when quantized first: a float8 model and int4 on a
    sharded model are refused, each message naming the order that works."""
    ranks = suite_runs("checks", 2)
    before = case_on_all_ranks(ranks, "err_shard_quantized")
    after = case_on_all_ranks(ranks, "err_quantize_sharded")
    for rank, (b, a) in enumerate(zip(before, after)):
        assert not b["ok"] and b["error_type"] == "ValueError", (rank, b)
        # keras.Model.quantize turns a NotImplementedError into a warning and goes on.
        assert not a["ok"] and a["error_type"] == "ValueError", (rank, a)
        assert "is quantized in mode 'float8'" in b["message"], b["message"]
        assert "model.quantize('int8') or ('int4') before tfshard.shard" in b["message"], b
        assert "tfshard quantizes sharded layers to int8 only" in a["message"], a["message"]
        assert "model.quantize('int4'), then tfshard.shard(model)" in a["message"], a["message"]


@pytest.mark.parametrize("np_", [2, 3])
def test_world_still_works_after_errors(suite_runs, np_):
    for rec in case_on_all_ranks(suite_runs("checks", np_), "after_errors"):
        assert rec["ok"], rec.get("traceback")
        o = rec["outputs"]["output"]
        assert o["max_diff"] <= o["tol"]


@pytest.mark.parametrize("np_", [2, 3])
def test_allgather_on_every_axis_with_uneven_lengths(suite_runs, np_):
    # Gathers off axis 0 go through flat rows + concat (no transposes): exact values.
    for case in ("collectives_eager", "collectives_function"):
        for rank, rec in enumerate(case_on_all_ranks(suite_runs("checks", np_), case)):
            assert rec["ok"], f"{case} rank {rank}: {rec.get('message')}\n{rec.get('traceback')}"
            checks = {k: v for k, v in rec.items() if k not in ("ok", "seconds")}
            assert len(checks) == 8 and all(checks.values()), (case, rank, checks)
