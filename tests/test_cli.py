"""The README's main job (tfshard predict smollm2 under horovodrun) and the CLI."""

import sys

import numpy as np

from conftest import ROOT, launch


def test_predict_cli_under_horovodrun_matches_and_writes_output(tmp_path):
    out_file = tmp_path / "logits.npy"
    code, out, secs = launch(
        2, ["-m", "tfshard", "predict", "gpt2-tiny", "--rows", "3", "--seq-len", "16",
            "--batch-size", "2", "--output", out_file], timeout=300)
    assert code == 0, out[-4000:]
    assert "MATCH" in out and "MISMATCH" not in out
    assert "global output (3, 16, 50257)" in out
    logits = np.load(out_file)
    assert logits.shape == (3, 16, 50257) and np.isfinite(logits).all()


def test_predict_cli_under_tfshard_launch_multiworker(tmp_path):
    # The same command under tf.distribute's multi-worker backend: `tfshard launch`.
    out_file = tmp_path / "logits.npy"
    code, out, secs = launch(
        2, ["-m", "tfshard", "predict", "gpt2-tiny", "--rows", "3", "--seq-len", "16",
            "--batch-size", "2", "--output", out_file], timeout=300, launcher="tfshard")
    assert code == 0, out[-4000:]
    assert "[0] [tfshard] multiworker world of 2 rank(s)" in out, out[-3000:]
    assert "MATCH" in out and "MISMATCH" not in out
    logits = np.load(out_file)
    assert logits.shape == (3, 16, 50257) and np.isfinite(logits).all()


def test_predict_cli_prompt_real_smollm2():
    code, out, secs = launch(2, ["-m", "tfshard", "predict", "smollm2", "--prompt",
                                 "The capital of France is", "--no-compare"], timeout=600)
    assert code == 0, out[-4000:]
    assert "next token after the prompt: ' Paris'" in out, out[-3000:]


def test_readme_main_job_generate_smollm2_on_three_ranks():
    # Exactly the README's main job: real weights, sharded over 3 ranks, compared
    # with the unsharded model generating in one process.
    code, out, secs = launch(3, ["-m", "tfshard", "generate", "smollm2", "--prompt",
                                 "The capital of France is"], timeout=900)
    assert code == 0, out[-4000:]
    assert "MATCH" in out and "MISMATCH" not in out, out[-3000:]
    assert "'The capital of France is' -> ' Paris" in out, out[-3000:]
    # Printed once, by rank 0.
    assert out.count("-> ' Paris") == 1, out[-3000:]


def test_inspect_cli_prints_the_plan_in_one_process():
    import subprocess

    res = subprocess.run([sys.executable, "-m", "tfshard", "inspect", "llama-tiny",
                          "--tensor-parallel", "3", "--all-ranks"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    for rank in range(3):
        assert f"rank {rank} of 3" in res.stdout
    assert "attention 8q/2kv heads" in res.stdout and "vocab" in res.stdout


def test_bench_cli_runs_scripts_bench():
    import subprocess

    res = subprocess.run([sys.executable, "-m", "tfshard", "bench", "--help"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    for suite in ("forward", "predict", "load", "comm", "generate"):
        assert suite in res.stdout, res.stdout
    res = subprocess.run([sys.executable, "-m", "tfshard", "bench", "nonsense"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 2 and "invalid choice: 'nonsense'" in res.stderr


def test_unknown_model_is_a_clear_error():
    import subprocess

    res = subprocess.run([sys.executable, "-m", "tfshard", "inspect", "gpt5"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 2
    assert "Unknown model 'gpt5'" in res.stderr and "gpt2" in res.stderr
