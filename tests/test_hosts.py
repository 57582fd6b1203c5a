"""Several hosts: network namespaces on this machine (tests/hosts.py), each a host with
its own address, joined by a bridge; jobs start on host 0 and reach the others over ssh
(a stand-in that enters the namespace), as on a cluster.

Checked against the unsharded model: the model zoo at 2 hosts x 1 rank (the six-model
matrix at 2 hosts x 2 ranks) under MPI (tfshard's collectives), Horovod over Gloo and
MultiWorker (`tfshard launch --hosts` on each host; these two on three of the models,
Llama alone at 2 x 2), with the default layout (tensor-parallel groups inside a host,
data parallelism across hosts); GPT-2 with one tensor-parallel group over every rank (its
collectives cross hosts; the summary and a warning say so); a sharded checkpoint written
by two hosts into their own folders (no shared disk) and loaded in one process; and a
host that dies mid-predict.
"""

import os
import shutil
import sys
from pathlib import Path

import pytest

import hosts as hosts_lib
import models
from conftest import (LAUNCH_TIMEOUT, ROOT, launch_ranks, read_ranks, records_ok,
                      require_clean_launch)

REASON = hosts_lib.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no namespaces: {REASON}")

ZOO = tuple(models.EQUIVALENCE)


def _models(per_host, launcher):
    """The models a launch checks against the unsharded ones: the whole zoo under MPI at
    2 hosts x 1, the six-model matrix at 2 x 2; MLP, GPT-2 and Llama under Gloo and
    MultiWorker at 2 x 1, Llama at 2 x 2 (the layout across hosts is the launcher's; the
    layers' collectives are the ones checked at one rank per host)."""
    if launcher == "horovod":
        return ZOO if per_host == 1 else tuple(models.MATRIX)
    return ("mlp", "gpt2", "llama") if per_host == 1 else ("llama",)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Launches of the "hosts" suite, once per (ranks per host, launcher)."""
    cache = {}

    def run(per_host, launcher="horovod"):
        subset = _models(per_host, launcher)
        subset = None if subset == ZOO else subset
        key = (per_host, launcher)
        if key not in cache:
            base = tmp_path_factory.mktemp(f"hosts-{per_host}-{launcher}")
            out, disk = base / "out", base / "disk"
            out.mkdir()
            with hosts_lib.Hosts(2, private=disk) as hosts:
                argv = [ROOT / "tests" / "workers" / "scenarios.py", "--suite", "hosts",
                        "--out", out] + (["--models", ",".join(subset)] if subset else [])
                env = {"TFSHARD_TEST_PRIVATE": str(disk)}
                if launcher == "tfshard":
                    code, output, ranks = _launch_per_host(hosts, per_host, argv, out, env)
                else:
                    # MPI at 2 x 2 is placed round-robin (-H A:1,B:1 -np 4: ranks 0, 2 on
                    # host 0), which tfshard.init() puts back in host-major order.
                    code, output, ranks = launch_ranks(
                        2 * per_host, argv, out, launcher=launcher, hosts=hosts, env=env,
                        host_slots=1 if launcher == "horovod" else None)
                # What each host's own folder holds, before the hosts go away.
                saved = [base / f"host{i}" for i in range(2)]
                for i, folder in enumerate(hosts.private_dirs):
                    shutil.copytree(folder, saved[i])
            cache[key] = (code, output, ranks, saved)
        code, output, ranks, saved = cache[key]
        require_clean_launch(f"hosts suite ({launcher}, 2 hosts x {per_host})",
                             2 * per_host, code, output, ranks)
        return ranks, saved

    return run


def _launch_per_host(hosts, per_host, argv, out, env):
    """A MultiWorker job as on a cluster: `tfshard launch --hosts ... --host-index i` run
    on every host at once. Returns `(code, output, ranks)` like `launch_ranks`."""
    import subprocess

    procs = []
    for i in range(hosts.n):
        cmd = hosts.command(i, [sys.executable, "-m", "tfshard.cli.launch", "--hosts",
                                hosts.hostlist(per_host), "--host-index", i, "--timeout",
                                LAUNCH_TIMEOUT, sys.executable, *argv])
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True,
                                      env={**hosts.env(), "PYTHONUNBUFFERED": "1", **env}))
    outputs = [p.communicate(timeout=LAUNCH_TIMEOUT + 60)[0] for p in procs]
    codes = [p.returncode for p in procs]
    return max(codes, key=abs), "\n".join(outputs), read_ranks(out, hosts.n * per_host)


def _check_equal(rec, where):
    for key, o in rec["outputs"].items():
        assert o["shape_out"] == o["shape_ref"], where
        assert o["max_diff"] <= o["tol"], f"{where} {key}: max|diff| {o['max_diff']:.3g}"
        assert o["argmax_equal"], f"{where} {key}: argmax differs"


def _hosts_of(ranks):
    hosts = ranks[0]["cases"]["hosts"]["hosts"]
    assert len(set(hosts)) == 2, f"the ranks do not see two hosts: {hosts}"
    return hosts


@pytest.mark.parametrize("per_host,launcher", [(1, "horovod"), (2, "horovod"), (1, "gloo"),
                                               (2, "gloo"), (1, "tfshard"), (2, "tfshard")])
def test_zoo_across_hosts_matches_unsharded(runs, per_host, launcher):
    ranks, _ = runs(per_host, launcher)
    hosts = _hosts_of(ranks)
    # Host-major ranks: each host's ranks are consecutive...
    assert hosts == sorted(hosts, key=hosts.index)
    placed = [r["cases"]["hosts"]["launcher_rank"] for r in ranks]
    if launcher == "tfshard":
        assert [r["backend"] for r in ranks] == ["multiworker"] * len(ranks)
    elif launcher == "horovod" and per_host == 2:
        # ...although MPI placed them round-robin: tfshard rank 1 is MPI rank 2.
        assert placed == [0, 2, 1, 3], placed
    else:
        assert placed == list(range(2 * per_host)), placed
    for name in _models(per_host, launcher):
        for rank, rec in enumerate(records_ok(ranks, name)):
            where = f"{name} on rank {rank} ({launcher}, 2 hosts x {per_host})"
            _check_equal(rec, where)
            # The default layout: a tensor-parallel group is one host's ranks.
            assert rec["tensor_parallel"] == per_host, where
            assert rec["groups"] == 2, where
            text = "\n".join(rec["layout"])
            assert "Hosts: 2" in text, text
            if per_host > 1:
                assert "tensor-parallel all-reduces/all-gathers (every block): inside hosts" \
                    in text, text
            assert "data-parallel gather of outputs (once per round): CROSSES HOSTS" in text


@pytest.mark.parametrize("per_host,launcher", [(1, "horovod"), (2, "horovod"), (1, "tfshard")])
def test_tensor_parallel_across_hosts_is_exact_and_reported(runs, per_host, launcher):
    ranks, _ = runs(per_host, launcher)
    for rank, rec in enumerate(records_ok(ranks, "tp_across_hosts")):
        where = f"gpt2, tensor_parallel={2 * per_host} over 2 hosts, rank {rank}"
        _check_equal(rec, where)
        assert rec["tensor_parallel"] == 2 * per_host
        assert "(every block): CROSSES HOSTS" in rec["summary"], rec["summary"]
        assert f"tensor_parallel={per_host} keeps each group inside a host" in rec["summary"]
        if rank == 0:
            assert any("crosses the network" in w for w in rec["warnings"]), rec["warnings"]


@pytest.mark.parametrize("per_host", [1, 2])
def test_pipeline_stages_one_per_host(runs, per_host):
    """pipeline=2 at 2 hosts x N (MPI): stage s on host s, each stage's tensor-parallel
    group inside its host; the hand-offs are what crosses."""
    ranks, _ = runs(per_host)
    hosts = _hosts_of(ranks)
    for rank, rec in enumerate(records_ok(ranks, "stages_across_hosts")):
        _check_equal(rec, f"gpt2 at 2 stages, rank {rank} of 2 hosts x {per_host}")
        assert rec["tensor_parallel"] == per_host
        assert rec["stage"] == hosts.index(hosts[rank]) // per_host, (rank, rec["stage"], hosts)
        text = "\n".join(rec["layout"])
        assert "pipeline hand-offs (every micro-batch): CROSSES HOSTS" in text, text
        if per_host > 1:
            assert "(every block): inside hosts" in text, text


def test_checkpoint_saved_by_two_hosts_loads_in_one(runs, tmp_path):
    """Each host wrote its ranks' files into its own folder (no shared disk); copied
    together, they load in one process and predict what the unsharded model does."""
    ranks, saved = runs(2)
    records_ok(ranks, "tp_across_hosts")
    per_host = [sorted(os.listdir(d / "gpt2-ckpt")) for d in saved]
    assert [f for f in per_host[0] if f != "assets.zip"] == [
        "rank-00000-of-00004.h5", "rank-00001-of-00004.h5", "tfshard.json"], per_host[0]
    assert per_host[1] == ["rank-00002-of-00004.h5", "rank-00003-of-00004.h5"], per_host[1]
    # Nothing half-written is left under a partial name on either host.
    for d in saved:
        assert sorted(os.listdir(d)) == ["gpt2-ckpt"], os.listdir(d)
    merged = tmp_path / "gpt2-ckpt"
    shutil.copytree(saved[0] / "gpt2-ckpt", merged)
    for name in per_host[1]:
        shutil.copy(saved[1] / "gpt2-ckpt" / name, merged / name)
    code = f"""
import sys, numpy as np
sys.path.insert(0, {str(ROOT / 'tests')!r})
import models, tfshard
model, x = models.EQUIVALENCE["gpt2"]()
ref = model.predict(x, batch_size=2, verbose=0)
out = tfshard.load({str(merged)!r}).predict(x, batch_size=2, verbose=0)
diff = float(np.max(np.abs(np.asarray(out) - np.asarray(ref))))
assert diff <= 1e-5 * (1 + float(np.max(np.abs(ref)))), diff
assert (np.argmax(out, -1) == np.argmax(ref, -1)).all()
print("MATCH", diff)
"""
    import subprocess

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 0 and "MATCH" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]


@pytest.mark.alone  # host 1's ranks end at their collective deadline
@pytest.mark.xdist_group("hosts")  # one simulated network at a time
@pytest.mark.parametrize("fault", ["ranks_killed", "link_down"])
def test_lost_host_ends_the_job_with_a_named_error(tmp_path, fault):
    """A host is lost mid-predict (TP=2 over 2 hosts, so every block waits on it): its
    ranks are SIGKILLed, or its link goes down. The job ends, non-zero, within 60 s,
    with the lost host named; host 1's own ranks are gone too; `--output` never
    appears under its final name."""
    import signal
    import subprocess
    import threading
    import time

    output = tmp_path / "logits.npy"
    with hosts_lib.Hosts(2) as hosts:
        cmd = hosts.command(0, [
            ROOT / "horovodrun.sh", "-np", 2, "-H", hosts.hostlist(1),
            Path(sys.executable).parent / "tfshard", "predict", "bert-tiny", "--rows", 6000,
            "--seq-len", 16, "--batch-size", 1, "--tensor-parallel", 2, "--no-compare",
            "--verbose", 0, "--output", output])
        # Host 1's ranks, cut off, end at their collective deadline: 15 s, not 30.
        env = {**hosts.env(), "TFSHARD_COLLECTIVE_TIMEOUT_SECONDS": "15"}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env, cwd=ROOT, start_new_session=True)
        lines, started = [], threading.Event()

        def read():
            for line in proc.stdout:
                lines.append(line)
                if "per forward:" in line:  # sharded; predict starts now
                    started.set()
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            assert started.wait(300), "".join(lines)[-3000:]
            time.sleep(3)  # well inside predict (6000 rows take ~20 s)
            fault_at = time.monotonic()
            if fault == "ranks_killed":
                rank_pids = [p for p in hosts.pids(1) if "tfshard" in _cmdline(p)]
                assert rank_pids, "no rank found on host 1"
                for pid in rank_pids:
                    os.kill(pid, signal.SIGKILL)
            else:
                hosts.link(1, up=False)
            code = proc.wait(timeout=120)
            ended = time.monotonic() - fault_at
            reader.join(10)
            # Host 1's ranks (cut off, in the link case) end too: at their deadline.
            while any("tfshard" in _cmdline(p) for p in hosts.pids(1)) and \
                    time.monotonic() - fault_at < 90:
                time.sleep(1)
            left = [p for p in hosts.pids(1) if "tfshard" in _cmdline(p)]
            host1_ended = time.monotonic() - fault_at
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = "".join(lines)
    print(f"{fault}: job ended {ended:.1f} s after the fault, host 1's ranks by "
          f"{host1_ended:.1f} s, exit {code}")
    assert code != 0, text[-3000:]
    assert ended < 60, f"the job took {ended:.0f} s to end:\n{text[-3000:]}"
    assert not left, f"host 1 still runs {left} {host1_ended:.0f} s after the fault"
    assert host1_ended < 60
    if fault == "ranks_killed":
        assert "BAD TERMINATION" in text and hosts.addresses[1] in text, text[-3000:]
    else:
        assert f"lost the connection to host {hosts.addresses[1]}" in text, text[-3000:]
    assert not output.exists(), "a partial output was left under the final name"
    assert not [f for f in os.listdir(tmp_path) if f.startswith("logits")], os.listdir(tmp_path)


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
