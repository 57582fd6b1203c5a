"""Planner unit tests (single process, no collectives)."""

import keras
import numpy as np
import pytest

import models
import tfshard
from tfshard.layers import even_ranges
from tfshard.plan import Plan, attention_ranges


def test_even_ranges_cover_and_differ_by_at_most_one():
    for total, size in [(50257, 2), (50257, 3), (50257, 4), (4, 3), (7, 7)]:
        r = even_ranges(total, size)
        assert r[0][0] == 0 and r[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(r, r[1:]))
        sizes = [b - a for a, b in r]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        even_ranges(2, 3)


def test_attention_ranges_keep_gqa_groups():
    # More K/V heads than ranks: K/V split, queries follow their group.
    q, kv = attention_ranges(9, 3, 2)
    assert kv == ((0, 2), (2, 3)) and q == ((0, 6), (6, 9))
    # Fewer K/V heads than ranks: each K/V head replicated over its group's ranks.
    q, kv = attention_ranges(6, 2, 3)
    assert kv == ((0, 1), (0, 1), (1, 2)) and q == ((0, 2), (2, 3), (3, 6))
    for (qa, qb), (ka, kb) in zip(q, kv):
        assert ka * 3 <= qa and qb <= kb * 3  # query heads inside their K/V group
    # 4 heads on 3 ranks: whole heads, unevenly.
    assert attention_ranges(4, 4, 3)[0] == ((0, 2), (2, 3), (3, 4))
    with pytest.raises(ValueError):
        attention_ranges(2, 2, 3)


@pytest.mark.parametrize("size", [2, 3, 4])
def test_gpt2_odd_vocab_is_cut_unevenly_without_padding(size):
    model, _ = models.gpt2()
    plan = Plan.auto(model, size)
    emb = next(e for e in plan.entries if e.path.endswith("token_embedding"))
    assert emb.rule == "vocab"
    assert emb.ranges[-1][1] == 50257 and sum(b - a for a, b in emb.ranges) == 50257


def test_auto_plan_pairs_functional_mlp_and_handles_odd_trailing_dense():
    model, _ = models.mlp()
    plan = Plan.auto(model, 2, min_gather_params=0)
    rules = [(e.rule, e.gather_output, e.input_is_parallel) for e in plan.entries]
    assert rules == [("column", False, False), ("row", False, True),
                     ("column", False, False), ("row", False, True),
                     ("column", True, False)]
    # By default a small unpaired head is replicated.
    assert Plan.auto(model, 2).entries[-1].rule == "replicate"


def test_softmax_activation_is_never_paired():
    inp = keras.Input((6,))
    h = keras.layers.Dense(12, activation="softmax")(inp)
    out = keras.layers.Dense(6)(h)
    plan = Plan.auto(keras.Model(inp, out), 2, min_gather_params=0)
    assert [e.gather_output for e in plan.entries if e.rule == "column"] == [True, True]
    assert all(e.rule != "row" for e in plan.entries)


def test_residual_read_of_column_output_is_not_paired():
    inp = keras.Input((8,))
    h = keras.layers.Dense(8)(inp)
    out = keras.layers.Add()([keras.layers.Dense(8)(h), h])  # h is read twice
    plan = Plan.auto(keras.Model(inp, out), 2, min_gather_params=0)
    assert all(e.rule != "row" for e in plan.entries)


def test_llama_plan_by_structure():
    model, _ = models.llama()
    plan = Plan.auto(model, 2)
    by = {e.path.rsplit("/", 1)[-1]: e for e in plan.entries}
    assert by["query"].rule == "column" and by["query"].local_shape(0) == (24, 3, 4)
    assert by["key"].local_shape(0) == (24, 1, 4)
    assert by["attention_output"].rule == "row" and by["attention_output"].input_is_parallel
    assert by["feedforward_gate_dense"].rule == "column"
    assert by["feedforward_output_dense"].rule == "row"


def test_summary_lists_every_layer_with_totals():
    model, _ = models.bert()
    plan = Plan.auto(model, 3)
    text = plan.summary(rank=2)
    for e in plan.entries:
        assert e.path in text
    assert "rank 2 of 3" in text and "replicated" in text and "segment_embedding" in text
    assert plan.local_bytes(0) < plan.total_bytes


@pytest.mark.parametrize("size", [2, 3])
def test_communication_is_megatrons_minimum(size):
    # Per transformer block 2 all-reduces of the hidden width, one for the
    # vocab-parallel lookup, and the tied logits gathered to the full vocab.
    model, _ = models.gpt2()
    plan = Plan.auto(model, size)
    ops = plan.communication()
    reduces = [n for _, op, n in ops if op == "all-reduce"]
    assert reduces == [16] * (2 * 2 + 1)
    assert [(p, n) for p, op, n in ops if op.startswith("all-gather")] == [("token_embedding", 50257)]
    last = plan.summary(rank=0).splitlines()[-1]
    assert last.startswith("per forward: 5 all-reduces (320 B/token), 1 all-gather (logits) "
                           "(196.3 KiB/token)"), last
    # A functional MLP: one all-reduce per column -> row pair, nothing else.
    mlp, _ = models.mlp()
    assert [op for _, op, _ in Plan.auto(mlp, size).communication()] == ["all-reduce"] * 2
    assert Plan.auto(mlp, 1).communication() == []


def test_from_rules_errors_name_the_layer_and_what_works():
    with pytest.raises(ValueError, match="Unknown rule"):
        Plan.from_rules({".*": "diagonal"})
    model, _ = models.llama()
    with pytest.raises(ValueError, match=r"query heads .* sizes that work: 1\.\.6"):
        Plan.from_rules({".*(query|key|value)": "column", ".*attention_output": "row"}).resolve(model, 7)
    with pytest.raises(ValueError, match="takes 'vocab' or 'replicate'"):
        Plan.from_rules({".*token_embedding": "column"}).resolve(model, 2)


def test_unresolved_plan_summary_explains():
    with pytest.raises(ValueError, match="not resolved"):
        Plan.auto().summary()


def test_local_world_is_a_no_op():
    model, x = models.gpt2()
    ref = model.predict(x, verbose=0)
    sharded = tfshard.shard(model)
    assert sharded.size == 1 and not sharded.plan.sharded
    np.testing.assert_array_equal(sharded.predict(x, verbose=0), ref)


def test_rule_objects_resolve_like_their_shorthand():
    """Column(gather=...), Row(), Vocab(), Replicate() (issue 16); strings stay shorthand."""
    model, _ = models.gpt2()
    layers = {
        r".*feedforward_intermediate_dense": ("column", tfshard.Column()),
        r".*feedforward_output_dense": ("row", tfshard.Row()),
        r".*token_embedding": ("vocab", tfshard.Vocab()),
        r".*position_embedding": ("replicate", tfshard.Replicate()),
        r".*attention_output.*": ("column:gather", tfshard.Column(gather=True)),
    }
    as_strings = Plan.from_rules({p: s for p, (s, _) in layers.items()}).resolve(model, 2, 1)
    as_objects = Plan.from_rules({p: o for p, (_, o) in layers.items()}).resolve(model, 2, 1)
    assert as_objects.to_dict() == as_strings.to_dict()
    rules = {e.rule for e in as_objects.sharded}
    assert {"column", "row", "vocab"} <= rules
    assert any(e.gather_output for e in as_objects.sharded), "Column(gather=True) did not gather"
    assert tfshard.Column(gather=True).shorthand() == "column:gather"
    # The auto plan is unchanged by the rules becoming objects.
    assert Plan.auto(model, 2, 1).to_dict() == Plan.auto(model, 2, 1).to_dict()


@pytest.mark.parametrize("rule", ["colum", 3, None, tfshard.rules.Rule()])
def test_unknown_rules_name_the_pattern_and_what_works(rule):
    with pytest.raises(ValueError, match=r"Unknown rule .* for pattern '\.\*x'; expected "
                                         r"Column\(gather=False\|True\), Row\(\)"):
        Plan.from_rules({".*x": rule})


# -- Layout: which collectives cross hosts ---------------------------------------------

from tfshard.plan.layout import Layout, default_group  # noqa: E402


def test_default_group_is_one_hosts_ranks():
    assert default_group(["a"] * 4) == 4
    assert default_group(["a", "a", "b", "b"]) == 2
    assert default_group(["a", "a", "a", "b"]) == 1  # 3 and 1 ranks: only pure DP stays inside
    assert default_group(["a"] * 4 + ["b"] * 2) == 2


def test_layout_inside_hosts_then_across():
    inside = Layout(("a", "a", "b", "b"), tensor_parallel=2)
    crossings = {what: crosses for what, crosses, _ in inside.crossings()}
    assert crossings == {"tensor-parallel all-reduces/all-gathers (every block)": False,
                         "data-parallel gather of outputs (once per round)": True}
    text = "\n".join(inside.lines())
    assert "Hosts: 2 — a: ranks 0-1; b: ranks 2-3" in text
    assert "keeps each group inside a host" not in text

    wide = Layout(("a", "a", "b", "b"), tensor_parallel=4)
    text = "\n".join(wide.lines())
    assert "(every block): CROSSES HOSTS (1 of 1 groups span hosts" in text
    assert "tensor_parallel=2 keeps each group inside a host" in text

    staged = Layout(("a", "a", "b", "b"), tensor_parallel=2, pipeline=2)
    crossings = {what: crosses for what, crosses, _ in staged.crossings()}
    assert crossings["pipeline hand-offs (every micro-batch)"] is True
    assert crossings["tensor-parallel all-reduces/all-gathers (every block)"] is False

    assert Layout(("a", "a"), tensor_parallel=2).lines() == []  # one host: nothing to say


def test_layout_counts_the_bytes_that_must_cross_hosts():
    ops = [("block/out", "all-reduce", 8), ("head", "all-gather (logits)", 100)]
    # TP inside hosts, DP across: only the outputs cross (every rank gets all rows).
    inside = Layout(("a", "a", "b", "b"), tensor_parallel=2)
    assert inside.crossing_bytes(ops, tokens=10, output_bytes=4000) == {
        "tensor-parallel": 0, "data-parallel": 4000, "total": 4000}
    # One group over both hosts: every token's all-reduce twice over, the gather once.
    wide = Layout(("a", "a", "b", "b"), tensor_parallel=4)
    assert wide.crossing_bytes(ops, tokens=10, output_bytes=4000) == {
        "tensor-parallel": 2 * 8 * 10 * 4 + 100 * 10 * 4, "data-parallel": 0,
        "total": 2 * 8 * 10 * 4 + 100 * 10 * 4}
    # 16-bit wire: half the bytes.
    half = {("block/out", "all-reduce"): 2, ("head", "all-gather (logits)"): 2}
    assert wide.crossing_bytes(ops, tokens=10, itemsizes=half)["tensor-parallel"] == (
        2 * 8 * 10 * 2 + 100 * 10 * 2)
