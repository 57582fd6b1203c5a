"""Pipeline stages: shard(model, pipeline=P, tensor_parallel=T) against the unsharded model.

One launch per world size (tests/workers/scenarios.py, suite "pipeline"): PP=2 at 2
ranks, PP=3 at 3, PP2xTP2 and DP2xPP2 at 4; GPT-2, Llama (GQA) and BERT with three
transformer layers and three plain Keras models (functional, two inputs and outputs,
Sequential); greedy generate of random-config Llama and GPT-2 at every layout, and of
the real SmolLM2 at PP2xTP2 (stages balanced by memory). The balancing itself is
checked without ranks.
"""

import itertools
import re
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import case_on_all_ranks, records_ok
from tfshard.plan.stages import Block, balance, plan_stages

MODELS = ["mlp", "two_inputs_two_outputs", "sequential_embedding", "gpt2", "bert", "llama"]
LAYOUTS = {2: ["pp2"], 3: ["pp3"], 4: ["pp2tp2", "dp2pp2"]}
CASES = [(np_, layout) for np_, layouts in LAYOUTS.items() for layout in layouts]
# At 4 ranks the two further plain Keras models (their cuts are checked at PP=2 and 3) are
# left out to keep the launch short.
PREDICT_CASES = [(np_, layout, name) for np_, layout in CASES for name in MODELS
                 if np_ < 4 or name not in ("two_inputs_two_outputs", "sequential_embedding")]


def _close(rec, where):
    assert rec["keys_out"] == rec["keys_ref"], f"{where}: output structure differs"
    for key, o in rec["outputs"].items():
        assert o["shape_out"] == o["shape_ref"] and o["dtype_out"] == o["dtype_ref"], (where, key)
        assert o["max_diff"] <= o["tol"], f"{where} {key}: max|diff| {o['max_diff']:.3g} > {o['tol']:.3g}"
        assert o["argmax_equal"], f"{where} {key}: argmax differs"


@pytest.mark.parametrize("np_,layout,name", PREDICT_CASES)
def test_pipelined_predict_matches_unsharded(suite_runs, np_, layout, name):
    recs = records_ok(suite_runs("pipeline", np_), f"{layout}/{name}")
    pp = int(layout[layout.index("pp") + 2])
    for rank, rec in enumerate(recs):
        where = f"{name} at {layout}, rank {rank}"
        _close(rec, where)
        _close(rec["micro_rows"], where + " (one micro-batch per row)")
        _close(rec["call"], where + " (a call)")
        assert rec["stages"] == pp, where
        tp = 2 if "tp2" in layout else 1
        assert rec["stage"] == (rank // tp) % pp, f"{where}: ranks are laid out stage by stage"
        assert rec["groups"] == (2 if layout.startswith("dp2") else 1), where
        if tp == 1:
            # The rank holds its stage's weights and nothing else (+-1 %).
            assert abs(rec["rank_bytes"] - rec["stage_bytes"]) <= 0.01 * rec["stage_bytes"], (
                where, rec["rank_bytes"], rec["stage_bytes"])
            assert rec["rank_bytes"] < rec["model_bytes"], where
        if rec["stage"] < pp - 1:
            assert rec["sent"] > 0, f"{where}: nothing was sent to the next stage"
        assert "pipeline stages" in rec["summary"], where


@pytest.mark.parametrize("np_", [2, 4])
def test_pipelined_ranks_hold_a_share_of_the_weights(suite_runs, np_):
    """No rank holds the whole model; with tensor parallelism inside the stages each rank
    holds about half its stage (the exact per-stage share at TP=1 is checked above)."""
    layout = LAYOUTS[np_][0]
    recs = records_ok(suite_runs("pipeline", np_), f"{layout}/llama")
    model = recs[0]["model_bytes"]
    assert max(r["rank_bytes"] for r in recs) < model, [r["rank_bytes"] for r in recs]
    if layout == "pp2tp2":
        for r in recs:
            assert r["rank_bytes"] < 0.6 * r["stage_bytes"], (r["rank_bytes"], r["stage_bytes"])


@pytest.mark.parametrize("np_,layout", CASES)
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_pipelined_greedy_generate_matches_unsharded(suite_runs, np_, layout, name):
    recs = records_ok(suite_runs("pipeline", np_), f"{layout}/generate/{name}")
    layers = 3
    for rank, rec in enumerate(recs):
        assert rec["out"] == rec["ref"], f"{name} at {layout}, rank {rank}"
        assert rec["micro"] == rec["ref"], f"{name} at {layout}, rank {rank}, 2 micro-batches"
        # Each stage caches only its own layers' keys and values.
        assert 1 <= rec["cache_layers"] < layers, rec["cache_layers"]


def test_pipelined_generate_of_real_smollm2_at_pp2_tp2_balanced_by_memory(suite_runs):
    """Real SmolLM2 at PP2 x TP2 with `pipeline_balance="memory"`: greedy tokens equal
    the unsharded model's (generated here, once), and every rank holds a quarter of the
    model plus its stage's share of the tied embedding."""
    import tfshard
    from tfshard import comm as comm_lib

    sys.path.insert(0, str(Path(__file__).resolve().parent / "workers"))
    from scenarios import SMOLLM2_PROMPT

    recs = records_ok(suite_runs("pipeline", 4), "pp2tp2/smollm2")
    alone = tfshard.load("smollm2", world=tfshard.World(comm_lib.create("local"), "local"))
    ref = alone.generate(SMOLLM2_PROMPT, max_length=16, strip_prompt=True, sampler="greedy")
    assert ref.startswith(" Paris"), ref
    for rank, rec in enumerate(recs):
        assert rec["out"] == ref, (rank, rec["out"], ref)
        assert rec["by"] == "memory", rec["summary"]
    # Balanced by bytes: the two stages hold the same (15 layers each, the tied
    # embedding in both), so a TP rank holds as much in either stage (ranks 0 and 2,
    # 1 and 3; TP rank 0 holds more: 9 query heads and 3 K/V heads cut in two), and
    # no rank more than 0.6 of its stage.
    low, high = sorted(recs[0]["stage_bytes"])
    assert high / low < 1.01, recs[0]["summary"]
    rank_bytes = [r["rank_bytes"] for r in recs]
    for tp_rank in (0, 1):
        a, b = rank_bytes[tp_rank], rank_bytes[2 + tp_rank]
        assert max(a, b) / min(a, b) < 1.01, rank_bytes
    assert max(rank_bytes) < 0.6 * high, (rank_bytes, high)


def _devices(suite_runs):
    """The stages-on-devices run: one process, a MirroredStrategy of 3 logical CPUs."""
    return suite_runs("pipeline_devices", 1, launcher="none", mirrored=3)


@pytest.mark.parametrize("pp,name", [(2, "mlp"), (2, "gpt2"), (2, "bert"), (2, "llama"),
                                     (3, "mlp"), (3, "llama")])
def test_stages_on_devices_match_unsharded_and_run_on_their_devices(suite_runs, pp, name):
    """Under a MirroredStrategy of `pp` devices, stage s is device s: its variables
    live there (every weight on exactly one device) and its matmuls run there."""
    rec = records_ok(_devices(suite_runs), f"devices{pp}/{name}")[0]
    for what in (rec, rec["micro_rows"], rec["call"]):
        _close(what, f"{name} on {pp} devices")
    held = rec["device_bytes"]
    assert sorted(held) == [f"CPU:{s}" for s in range(pp)], held
    assert sum(held.values()) == rec["model_bytes"], (held, rec["model_bytes"])
    for s in range(pp - 1):  # the last stage's tied head stays with the first stage
        assert held[f"CPU:{s}"] == rec["stage_bytes"][s], (s, held, rec["stage_bytes"])
    checked = 0
    for s, blocks in enumerate(rec["blocks"]):
        for block in blocks:
            block = block.replace(" + head", "")
            pattern = re.compile(rf"(^|/){re.escape(block)}(_\d+)?/")
            for op, device in rec["op_devices"].items():
                if pattern.search(op):
                    assert device == f"CPU:{s}", (op, device, s)
                    checked += 1
    assert checked >= pp, rec["op_devices"]


@pytest.mark.parametrize("pp,name", [(2, "llama"), (3, "gpt2")])
def test_greedy_generate_with_stages_on_devices_matches_unsharded(suite_runs, pp, name):
    rec = records_ok(_devices(suite_runs), f"devices{pp}/generate/{name}")[0]
    assert rec["out"] == rec["ref"], (name, pp)


def test_stages_on_devices_load_a_file_and_save_it_whole(suite_runs):
    rec = records_ok(_devices(suite_runs), "devices2/load_and_save")[0]
    _close(rec["load"], "llama .keras loaded into 2 device stages")
    _close(rec["gathered"], "saved whole from 2 device stages, reloaded by Keras")
    assert sorted(rec["device_bytes"]) == ["CPU:0", "CPU:1"] and rec["by"] == "memory", rec


@pytest.mark.parametrize("case,needle", [
    ("devices/wrong_stage_count", "use pipeline=2, or a strategy of 3 devices"),
    ("devices/tensor_parallel", "tensor_parallel=2 inside the stages of one process"),
    ("devices/quantize", "quantize the model before sharding it"),
])
def test_stages_on_devices_errors_say_what_works(suite_runs, case, needle):
    rec = _devices(suite_runs)[0]["cases"][case]
    want = "NotImplementedError" if case == "devices/quantize" else "ValueError"
    assert not rec["ok"] and rec["error_type"] == want, rec
    assert needle in rec["message"], rec["message"]


def test_checkpoint_saved_at_pp2_reloads_at_tp2_pp2_and_alone(suite_runs):
    for rank, rec in enumerate(records_ok(suite_runs("pipeline", 2), "pp2/checkpoint")):
        assert rec["pipeline"] == 2 and len(rec["files"]) == 2, rec
        assert set(rec["files"]) <= set(rec["rank_files"]), rec
        for layout in ("tp2", "pp2", "alone"):
            _close(rec[layout], f"the PP=2 checkpoint loaded as {layout}, rank {rank}")
            # Same weights, reassembled exactly: the float32 math differs only by the cut.
            assert all(o["max_diff"] <= o["tol"] for o in rec[layout]["outputs"].values())


def test_stages_balanced_by_measured_block_times(suite_runs):
    recs = records_ok(suite_runs("pipeline", 2), "pp2/measured")
    for rank, rec in enumerate(recs):
        _close(rec, f"GPT-2 balanced by measured times, rank {rank}")
        assert rec["unit"] == "s" and all(c > 0 for c in rec["costs"]), rec
        # Rank 0 timed the blocks; every rank split alike on its times.
        assert rec["costs"] == recs[0]["costs"] and rec["bounds"] == recs[0]["bounds"]


def test_tensorboard_shows_each_stage_busy_idle_bubble_and_bytes(suite_runs):
    for rank, rec in enumerate(records_ok(suite_runs("pipeline", 2), "pp2/tensorboard")):
        scalars = rec["scalars"]
        for tag in ("pipeline/busy_ms", "pipeline/idle_ms", "pipeline/bubble",
                    "pipeline/sent_bytes", "pipeline/stage"):
            assert [step for step, _ in scalars[tag]] == [0, 1, 2], (rank, tag, scalars.get(tag))
        assert {v for _, v in scalars["pipeline/stage"]} == {rank}
        bubbles = [v for _, v in scalars["pipeline/bubble"]]
        assert all(0.0 < b < 1.0 for b in bubbles), bubbles  # every stage waits some
        sent = [v for _, v in scalars["pipeline/sent_bytes"]]
        # Stage 0 sends each batch's activations (5 rows x 8 tokens x 24 floats); the last
        # stage sends its outputs back, counted by the collective meters instead.
        assert sent == ([5 * 8 * 24 * 4.0] * 3 if rank == 0 else [0.0] * 3), sent
        assert "this rank runs stage" in rec["plan_text"] and "| stage |" in rec["plan_text"]


@pytest.mark.parametrize("case,needle", [
    ("too_many_stages", "does not divide the"),
    ("bad_split", "pipeline_split=[3, 1]"),
    ("subclassed", "subclassed"),
    ("disagree", "pipeline differs"),
    # Only the first stage runs the lookup: checked on every rank before the batch enters.
    ("bad_id", "holds id 257 at (1, 2), outside the 257 rows of layer 'token_embedding'"),
])
def test_pipeline_errors_on_every_rank(suite_runs, case, needle):
    for rec in case_on_all_ranks(suite_runs("pipeline", 2), f"pipeline/{case}"):
        assert not rec["ok"] and rec["error_type"] == "ValueError", rec
        assert needle in rec["message"], rec["message"]


# -- balancing, without ranks ------------------------------------------------- #

def _brute(costs, stages):
    n, best = len(costs), None
    for cuts in itertools.combinations(range(1, n), stages - 1):
        edges = (0,) + cuts + (n,)
        worst = max(sum(costs[a:b]) for a, b in zip(edges, edges[1:]))
        best = worst if best is None else min(best, worst)
    return best


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=9), st.integers(1, 4))
def test_balance_is_optimal_and_contiguous(costs, stages):
    stages = min(stages, len(costs))
    bounds = balance(costs, stages)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(costs)
    assert all(a < b for a, b in bounds) and all(x[1] == y[0] for x, y in zip(bounds, bounds[1:]))
    assert max(sum(costs[a:b]) for a, b in bounds) == _brute(costs, stages)


def test_memory_balance_evens_the_bytes_each_stage_holds():
    """An embedding costs no FLOPs to look up but holds bytes: by compute it shares the
    first stage with most layers, by memory it gets a stage of its own."""
    blocks = [Block("embed", (), 100, 0.0)] + [Block(f"l{i}", (), 20, 10.0) for i in range(5)]
    by_compute = plan_stages(blocks, 2)
    by_memory = plan_stages(blocks, 2, by="memory")
    assert by_compute.bounds == ((0, 3), (3, 6)), by_compute.bounds
    assert by_memory.bounds == ((0, 1), (1, 6)), by_memory.bounds
    assert by_memory.imbalance("memory") == 1.0 and by_memory.by == "memory"
    assert "balanced by bytes held" in by_memory.summary()
    with pytest.raises(ValueError, match="pipeline_balance='speed'.*'compute', 'memory'"):
        plan_stages(blocks, 2, by="speed")


def test_stages_follow_cost_not_layer_count():
    # A head as dear as four blocks: the last stage gets two blocks, the first five.
    blocks = [Block(f"b{i}", (), 10, 1.0) for i in range(6)] + [Block("head", (), 10, 4.0)]
    plan = plan_stages(blocks, 2)
    assert plan.bounds == ((0, 5), (5, 7)) and plan.imbalance() == 1.0
    forced = plan_stages(blocks, 2, split=[6, 1])
    assert forced.bounds == ((0, 6), (6, 7)) and forced.forced
    assert "forced by pipeline_split" in forced.summary()
    with pytest.raises(ValueError, match="summing to the model's 7 blocks"):
        plan_stages(blocks, 2, split=[3, 3])
    with pytest.raises(ValueError, match="use 1 to 7 stages"):
        plan_stages(blocks, 8)


def test_backends_without_point_to_point_are_refused_with_what_works():
    """Horovod over Gloo has no send/recv: the error says to launch with MPI."""
    from tfshard.pipeline.staged import check_mesh
    from tfshard.world import World

    class NoPointToPoint:
        rank, size = 0, 2

    with pytest.raises(ValueError, match=r"Launch with MPI \(./horovodrun.sh -np N, without "
                                         r"--gloo\)"):
        check_mesh(World(comm=NoPointToPoint(), backend="horovod"), 2, 1)
    with pytest.raises(ValueError, match="tensor_parallel values that work with 2 stages"):
        check_mesh(World(comm=NoPointToPoint(), backend="mpi"), 2, 2)
