"""The README's main job (tfshard predict smollm2 under horovodrun) and the CLI."""

import sys

import numpy as np
import pytest

from conftest import ROOT, launch


@pytest.mark.parametrize("launcher", ["horovod", "gloo"])
def test_predict_cli_under_horovodrun_matches_and_writes_output_and_logs(tmp_path, launcher):
    out_file, logdir = tmp_path / "logits.npy", tmp_path / "tb"
    code, out, secs = launch(
        2, ["-m", "tfshard", "predict", "gpt2-tiny", "--rows", "3", "--seq-len", "16",
            "--batch-size", "2", "--output", out_file, "--logdir", logdir, "--profile", "1"],
        timeout=300, launcher=launcher)
    assert code == 0, out[-4000:]
    assert "MATCH" in out and "MISMATCH" not in out
    assert "global output (3, 16, 50257)" in out
    logits = np.load(out_file)
    assert logits.shape == (3, 16, 50257) and np.isfinite(logits).all()
    # Two forwards (warm-up, timed) of 2 batches: 6 collectives each (2 blocks x 2
    # all-reduces + the lookup's + the logits gather).
    assert "rank 0's forwards so far: 24 collectives" in out, out[-3000:]
    _check_logs(logdir, horovod=launcher == "gloo")


def _check_logs(logdir, horovod):
    """What --logdir wrote under ./horovodrun.sh, read with TensorBoard's own reader,
    then served by `tensorboard --logdir` and read over its HTTP data API.

    `horovod`: launched with --gloo (Horovod's ops and timeline), else an MPI job
    (tfshard's MPI ops, no Horovod timeline)."""
    import json

    sys.path.insert(0, str(ROOT / "tests" / "workers"))
    from scenarios import read_tensorboard_run

    per_token = 4 * (5 * 64 + 50257)
    for rank in range(2):
        run = read_tensorboard_run(str(logdir / f"rank{rank}"))
        scalars = run["scalars"]
        assert [v for _, v in scalars["comm/collectives"]] == [6.0, 6.0], scalars
        assert [v for _, v in scalars["comm/bytes"]] == [32 * per_token, 16 * per_token]
        assert "| token_embedding | ReversibleEmbedding | vocab | (50257, 64) |" in run["plan_text"]
        assert f"rank {rank} of 2" in run["plan_text"]
        assert run["graphs"] == ["sharded_forward"], run["tags"]
        # The profiler trace of the first batch shows the collective ops.
        traces = list((logdir / f"rank{rank}" / "plugins" / "profile").glob("*/*.xplane.pb"))
        assert len(traces) == 1, traces
        prefix = b"Horovod" if horovod else b"TfshardMpi"
        assert prefix + b"Allreduce" in traces[0].read_bytes()
        assert prefix + b"Allgather" in traces[0].read_bytes()
    if not horovod:
        assert not (logdir / "horovod_timeline.json").exists()
        _check_served(logdir)
        return
    # Horovod's timeline (rank 0 writes it): chrome://tracing events of the collectives.
    timeline = (logdir / "horovod_timeline.json").read_text()
    events = json.loads(timeline if timeline.rstrip().endswith("]") else timeline.rstrip().rstrip(",") + "]")
    names = {e.get("name", "") for e in events} | {e.get("args", {}).get("name", "")
                                                   for e in events}
    assert any("ALLREDUCE" in n for n in names) and any("ALLGATHER" in n for n in names), names
    _check_served(logdir)


def _check_served(logdir):
    import json
    import socket
    import subprocess
    import time
    import urllib.parse
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "tensorboard"), "--logdir", str(logdir), "--host",
         "127.0.0.1", "--port", str(port), "--load_fast", "false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"

    def get(path, **query):
        url = f"{base}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                tags = get("/data/plugin/scalars/tags")
                if set(tags) >= {"rank0", "rank1"}:
                    break
            except OSError:
                pass
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "tensorboard did not serve the runs in 60 s"
            time.sleep(0.5)
        assert {"batch/latency_ms", "comm/bytes", "time/collectives_ms"} <= set(tags["rank1"])
        points = get("/data/plugin/scalars/scalars", run="rank1", tag="comm/collectives")
        assert [(step, value) for _, step, value in points] == [(0, 6.0), (1, 6.0)]
        text = get("/data/plugin/text/text", run="rank0", tag="plan")
        assert "token_embedding" in json.dumps(text)
        assert "rank0" in get("/data/plugin/graphs/info")
    finally:
        server.terminate()
        server.wait(timeout=30)


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


def test_predict_cli_on_a_users_own_functional_keras_model(tmp_path):
    """A plain Keras model (Dense layers, no keras-hub backbone) saved as .keras, its input from
    a .npy: crashed on every rank with "'Functional' object has no attribute
    'vocabulary_size'" (issue 16)."""
    import keras

    keras.utils.set_random_seed(3)
    inp = keras.Input((12,))
    model = keras.Model(inp, keras.layers.Dense(6)(keras.layers.Dense(32, activation="relu")(inp)))
    model.save(tmp_path / "mine.keras")
    x = np.random.default_rng(0).normal(size=(7, 12)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    out_file = tmp_path / "out.npy"
    code, out, secs = launch(2, ["-m", "tfshard", "predict", tmp_path / "mine.keras", "--input",
                                 tmp_path / "x.npy", "--output", out_file], timeout=300)
    assert code == 0, out[-4000:]
    assert "MATCH" in out and "MISMATCH" not in out, out[-3000:]
    np.testing.assert_allclose(np.load(out_file), model.predict(x, verbose=0), rtol=0,
                               atol=1e-5 * (1 + float(np.abs(model.predict(x, verbose=0)).max())))


def test_predict_and_inspect_check_of_a_file_with_replicas_in_one_process(tmp_path):
    """`--replicas N`: MirroredStrategy in one process, no launcher; the file is read with
    tfshard.load(strategy=...) (each replica's slices onto its device)."""
    import subprocess

    import keras

    keras.utils.set_random_seed(4)
    inp = keras.Input((12,))
    h = keras.layers.Dense(30, activation="relu")(inp)
    model = keras.Model(inp, keras.layers.Dense(6)(keras.layers.Dense(20)(h)))
    model.save(tmp_path / "mine.keras")
    x = np.random.default_rng(1).normal(size=(5, 12)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    res = subprocess.run([sys.executable, "-m", "tfshard", "predict", str(tmp_path / "mine.keras"),
                          "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "o.npy"),
                          "--replicas", "3"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "3 MirroredStrategy replica(s) in one process" in res.stdout, res.stdout[-2000:]
    assert "MATCH" in res.stdout and "MISMATCH" not in res.stdout, res.stdout[-2000:]
    ref = model.predict(x, verbose=0)
    np.testing.assert_allclose(np.load(tmp_path / "o.npy"), ref, rtol=0,
                               atol=1e-5 * (1 + float(np.abs(ref).max())))
    res = subprocess.run([sys.executable, "-m", "tfshard", "inspect", str(tmp_path / "mine.keras"),
                          "--check", "--replicas", "2", "--input", str(tmp_path / "x.npy")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "(MirroredStrategy, 2 replicas in one process) vs unsharded" in res.stdout
    assert res.stdout.splitlines()[-1].startswith("no layer parts:"), res.stdout[-2000:]
    # The same file under tfshard launch (MultiWorker): each worker loads its slices.
    code, out, secs = launch(2, ["-m", "tfshard", "inspect", tmp_path / "mine.keras", "--check",
                                 "--input", tmp_path / "x.npy"], timeout=300, launcher="tfshard")
    assert code == 0, out[-3000:]
    assert "at TP=2 (multiworker) vs unsharded" in out and "[0] no layer parts:" in out, out[-3000:]


def test_predict_cli_text_prompts_real_smollm2(tmp_path):
    # A .txt of prompts (one per line, different lengths: right-padded), real weights.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\nOne, two, three, four,\n")
    out_file = tmp_path / "logits.npy"
    code, out, secs = launch(2, ["-m", "tfshard", "predict", "smollm2", "--input", prompts,
                                 "--output", out_file, "--no-compare"], timeout=600)
    assert code == 0, out[-4000:]
    assert "next token after prompt 0: ' Paris'" in out, out[-3000:]
    assert "next token after prompt 1: ' five'" in out, out[-3000:]
    # 5 and 8 tokens: the first prompt is right-padded to 8, its next token read at position 4.
    assert np.load(out_file).shape[:2] == (2, 8)


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


def test_inspect_cli_plans_a_real_file_from_its_shapes_alone():
    import subprocess

    res = subprocess.run([sys.executable, "-m", "tfshard", "inspect", "smollm2",
                          "--tensor-parallel", "3"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "transformer_layer_29/self_attention/value" in res.stdout
    assert "attention 9q/3kv heads" in res.stdout
    assert "rank 0 of 3: sharded 513.0 MiB -> 171.0 MiB here" in res.stdout, res.stdout[-2000:]
    assert "per forward: 61 all-reduces" in res.stdout


def test_inspect_cli_shows_pipeline_stages_balanced_by_cost_or_forced():
    import subprocess

    res = subprocess.run([sys.executable, "-m", "tfshard", "inspect", "smollm2",
                          "--tensor-parallel", "1", "--pipeline", "3"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "3 pipeline stages, balanced by FLOPs/token" in res.stdout, res.stdout[-2000:]
    # The LM head (a 49152 x 576 matmul) costs as much as several layers: the last stage
    # takes fewer transformer layers than the first.
    rows = [l for l in res.stdout.splitlines() if l[:1] in "012" and "transformer_layer" in l]
    counts = [int(l.split()[-5]) for l in rows]
    assert len(counts) == 3 and sum(counts) == 30 and counts[2] < counts[0], rows
    forced = subprocess.run([sys.executable, "-m", "tfshard", "inspect", "smollm2",
                             "--tensor-parallel", "1", "--pipeline", "2", "--pipeline-split",
                             "20,10"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "forced by pipeline_split" in forced.stdout


def test_inspect_check_in_one_process_prints_per_layer_drift():
    # --check with no launcher: 2 MirroredStrategy replicas on logical CPUs.
    import subprocess

    res = subprocess.run([sys.executable, "-m", "tfshard", "inspect", "gpt2-tiny", "--check",
                          "--tensor-parallel", "2"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    row = next(ln for ln in lines if ln.startswith("transformer_layer_1/feedforward_output_dense"))
    assert " row " in row and " full " in row, row
    row = next(ln for ln in lines if ln.startswith("transformer_layer_0/self_attention/query"))
    assert "own slice, axis -2" in row, row
    assert lines[-1].startswith("no layer parts: 31 of 35 layer outputs compared"), lines[-1]


DRIFT_SCRIPT = """
import sys
sys.path.insert(0, "tests")
import tensorflow as tf
import tfshard
from tfshard.cli import drift
strategy = tf.distribute.MirroredStrategy(tfshard.cpu_devices(2))
import models
model, x = models.gpt2()
reference, _ = models.gpt2()
sharded = tfshard.shard(model, strategy=strategy)
x = {k: v[:2] for k, v in x.items()}
print("CLEAN", drift.first_parting(drift.layer_drift(sharded, reference, x)))
# Break rank 1's slice of one row-parallel kernel: the report must point at it.
layer = sharded.replicas[1].model.get_layer("gpt2_backbone").get_layer(
    "transformer_layer_1")._feedforward_output_dense
layer._kernel.assign(layer._kernel + 1e-3)
rows = drift.layer_drift(sharded, reference, x)
print("BROKEN", drift.first_parting(rows)["path"])
print(drift.format_drift(rows).splitlines()[-1])
"""


def test_drift_report_names_the_first_layer_that_parts():
    import subprocess

    res = subprocess.run([sys.executable, "-c", DRIFT_SCRIPT],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "CLEAN None" in res.stdout, res.stdout
    assert "BROKEN transformer_layer_1/feedforward_output_dense" in res.stdout, res.stdout
    assert "first layer where they part: transformer_layer_1/feedforward_output_dense (Dense, " \
           "rule row)" in res.stdout


def test_bench_cli_runs_the_bench_suites():
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


def test_launch_hosts_number_workers_host_by_host():
    from tfshard.cli import launch as launch_lib

    hosts = launch_lib.parse_hosts("hostA:2,hostB,10.0.0.3:3")
    assert hosts == [("hostA", 2), ("hostB", 1), ("10.0.0.3", 3)]
    assert launch_lib.cluster(hosts, 23456) == [
        "hostA:23456", "hostA:23457", "hostB:23456", "10.0.0.3:23456", "10.0.0.3:23457",
        "10.0.0.3:23458"]
    for bad in ("", "hostA:0", "hostA:x"):
        with pytest.raises(ValueError, match="--hosts"):
            launch_lib.parse_hosts(bad)


@pytest.mark.parametrize("argv,message", [
    (["--hosts", "a:2,b:2", "echo"], "give --host-index 0 to 1"),
    (["--hosts", "a:2,b:2", "--host-index", "2", "echo"], "give --host-index 0 to 1"),
    (["--hosts", "a:2,b:2", "--host-index", "1", "-n", "3", "echo"], "leave -n out"),
    (["--host-index", "0", "-n", "2", "echo"], "--host-index needs --hosts"),
    (["echo"], "-n must be >= 1"),
])
def test_launch_refuses_an_incomplete_host_list(capsys, argv, message):
    from tfshard.cli import launch as launch_lib

    with pytest.raises(SystemExit) as exit_info:
        launch_lib.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
