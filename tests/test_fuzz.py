"""Property-based input specs for predict and generate at 2 ranks (tests/workers/fuzz.py).

Hypothesis draws dtype x rank x shape x value range; every example must give, on
every rank, either the unsharded model's answer (fp32 within 1e-5 (1 + max|ref|),
token ids exactly) or a ValueError that names the input and what is wrong with
it, the same on every rank. Before this suite such inputs gave IndexErrors
(Python lists), TensorFlow errors that named nothing (strings, empty sequences),
wrapped ids (int64 >= 2**31) or refused valid ids (uint8 in generate).
"""

import pytest

from conftest import ROOT, launch_ranks, require_clean_launch

WORKER = ROOT / "tests" / "workers" / "fuzz.py"
# What a refusal must say: the input it refuses, by name or shape.
NAMES_THE_INPUT = ("token_ids", "padding_mask", "input", "keras_tensor", "shape", "length")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz")
    return require_clean_launch("fuzz", 2, *launch_ranks(
        2, [WORKER, "--out", out, "--examples", "60"], out))


def test_every_example_equals_unsharded_or_is_a_named_value_error(ranks):
    examples = [r["examples"] for r in ranks]
    assert len(examples[0]) == len(examples[1]) >= 60, "ranks drew different examples"
    kinds = {e["kind"] for e in examples[0]}
    assert kinds == {"predict_gpt2", "predict_mlp", "generate_gpt2"}, kinds
    answered = refused = 0
    for i, (a, b) in enumerate(zip(*examples)):
        assert a["input"] == b["input"], f"example {i}: ranks drew {a['input']} vs {b['input']}"
        assert a["ok"] == b["ok"], f"example {i} ({a['input']}): rank 0 {a} vs rank 1 {b}"
        if a["ok"]:
            answered += 1
            for rank, rec in enumerate((a, b)):
                if "reference_error" in rec:
                    continue  # tfshard answered what plain Keras refuses (e.g. a list)
                assert rec["same_shape"], f"example {i} rank {rank}: {rec}"
                assert rec.get("max_diff", 0.0) <= rec.get("tol", 0.0), \
                    f"example {i} ({rec['input']}) rank {rank}: {rec}"
            continue
        refused += 1
        for rank, rec in enumerate((a, b)):
            assert rec["error_type"] == "ValueError", \
                f"example {i} ({rec['input']}) rank {rank}: {rec['error_type']}: " \
                f"{rec['message']}\n{rec.get('traceback')}"
            assert f"(rank {rank} of 2)" in rec["message"], rec["message"]
            assert any(w in rec["message"] for w in NAMES_THE_INPUT), rec["message"]
            assert "in user code" not in rec["message"], rec["message"]
        # The same refusal on both ranks, up to the rank named in it.
        assert a["message"].replace("rank 0 of 2", "rank R of 2") == \
            b["message"].replace("rank 1 of 2", "rank R of 2"), (a["message"], b["message"])
    assert answered >= 3 and refused >= 10, (answered, refused)


def test_still_answers_after_every_refusal(ranks):
    for rank, r in enumerate(ranks):
        rec = r["after"]
        assert rec["ok"] and rec["same_shape"] and rec["max_diff"] <= rec["tol"], (rank, rec)
