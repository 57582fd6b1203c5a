"""A multi-rank run whose rank dies, stops or never joins a collective must fail, not hang.

MPI (the launcher's default): every collective runs under a deadline
(TFSHARD_COLLECTIVE_TIMEOUT_SECONDS); a rank that waits for one that is dead or
stopped fails within seconds, one that waits for a rank busy elsewhere at the
deadline, each with an error naming the missing rank and where it was last
seen; ranks that call different collectives fail by a signature check; and
mpiexec ends the job when a rank exits with an error.

Gloo (`./horovodrun.sh --gloo`): horovodrun ends the job when any process exits
non-zero. A rank that stays alive but never joins: Horovod 0.28.1's stall
shutdown did not fire on Gloo in our runs, so the launcher's wall clock
(tests/conftest.py `launch`) is what ends it; the test checks that it does, and
that no rank reports a result.
"""

import pytest

from conftest import ROOT, faults_worker, launch, no_faults_orphans

FAST = {"TFSHARD_COLLECTIVE_TIMEOUT_SECONDS": "8"}


@pytest.mark.alone
@pytest.mark.parametrize("launcher", ["horovod", "gloo"])
def test_dead_rank_fails_the_job_quickly(launcher):
    code, out, secs = launch(2, faults_worker("die"), timeout=180, launcher=launcher)
    assert code is not None, f"hung for {secs:.0f} s:\n{out[-3000:]}"
    assert code != 0, out[-3000:]
    assert "rank 1 dying" in out and "rank 0 finished" not in out
    assert secs < 120, f"took {secs:.0f} s to notice a dead rank"
    assert no_faults_orphans()


@pytest.mark.alone
def test_mpi_killed_rank_ends_the_job_within_seconds():
    code, out, secs = launch(2, faults_worker("killed"), timeout=60, env=FAST)
    assert code is not None and code != 0, out[-3000:]
    assert "rank 1 killing itself" in out and "rank 0 finished" not in out
    assert secs < 30, f"took {secs:.0f} s to notice a killed rank"
    assert no_faults_orphans()


@pytest.mark.alone
def test_mpi_stopped_rank_is_named_within_seconds():
    """SIGSTOP: the rank is alive, so only tfshard's wait can notice it."""
    code, out, secs = launch(2, faults_worker("stop"), timeout=60, env={
        "TFSHARD_COLLECTIVE_TIMEOUT_SECONDS": "40"})
    assert code is not None and code != 0, out[-3000:]
    assert "rank 0 finished" not in out
    assert "cannot complete: a rank it needs is stopped on rank 0 of 2" in out, out[-3000:]
    assert "Missing: rank 1 [pid" in out and "stopped;" in out, out[-3000:]
    assert "UnavailableError" in out, out[-3000:]
    assert secs < 30, f"took {secs:.0f} s; the deadline was 40 s, a stop must be seen sooner"
    assert no_faults_orphans()


@pytest.mark.alone
def test_mpi_stalled_rank_fails_at_the_deadline_with_a_named_error():
    code, out, secs = launch(2, faults_worker("stall"), timeout=60, env=FAST)
    assert code is not None and code != 0, out[-3000:]
    assert "rank 0 finished" not in out
    assert "DeadlineExceededError" in out and "did not complete within 8 s on rank 0 of 2" in out, \
        out[-3000:]
    # Where the missing rank was last seen: leaving the first all-reduce.
    assert "Missing: rank 1 [pid" in out and "last seen after all-reduce [4] float" in out, \
        out[-3000:]
    assert secs < 45
    assert no_faults_orphans()


@pytest.mark.alone
def test_mpi_mismatched_collectives_fail_on_every_rank():
    code, out, secs = launch(2, faults_worker("mismatch"), timeout=60, env=FAST)
    assert code is not None and code != 0, out[-3000:]
    assert "finished" not in out, "differently named collectives were matched"
    for rank in (0, 1):
        assert (f"all-reduce 'only_on_rank_{rank}' [4] float (group 0 #1) does not match what the "
                f"other ranks called") in out, out[-3000:]
    assert secs < 45
    assert no_faults_orphans()


# These two bound nothing tighter than the launch's own 20 s wall clock, so they run
# beside the other worker's tests (scripts/test.sh), not in the `alone` pass.
def test_gloo_stalled_rank_is_ended_by_the_wall_clock():
    code, out, secs = launch(2, faults_worker("stall"), timeout=20, launcher="gloo",
                             env={"TFSHARD_STALL_SHUTDOWN": "15", "TFSHARD_GLOO_TIMEOUT": "30"})
    assert code is None or code != 0, out[-3000:]
    assert "rank 0 finished" not in out
    assert secs < 60
    assert no_faults_orphans()


def test_gloo_mismatched_collectives_never_return_a_result():
    code, out, secs = launch(2, faults_worker("mismatch"), timeout=20, launcher="gloo",
                             env={"TFSHARD_STALL_SHUTDOWN": "15", "TFSHARD_GLOO_TIMEOUT": "30"})
    assert code is None or code != 0, out[-3000:]
    assert "finished" not in out, "differently named collectives were matched"
    assert secs < 60
    assert no_faults_orphans()


def test_mpi_ops_equal_numpy_on_three_ranks():
    """Every MPI op, eagerly and in tf.function, against numpy (exact: integer values)."""
    code, out, _ = launch(3, [ROOT / "tests" / "workers" / "mpi_ops.py"], timeout=300)
    assert code == 0, out[-4000:]
    for rank in range(3):
        assert f"MPI-OPS OK rank {rank}" in out, out[-3000:]


@pytest.mark.alone
@pytest.mark.parametrize("launcher", ["horovod", "gloo"])
def test_ranks_disagreeing_on_tensor_parallel_fail_before_any_group_forms(launcher):
    """Was a hang under Gloo (process sets were created before the agreement) and a 30 s
    timeout under MPI (Comm.Split on one rank only)."""
    code, out, secs = launch(2, faults_worker("tp_disagree"), timeout=120, launcher=launcher)
    assert code is not None and code != 0, out[-3000:]
    assert "finished" not in out
    assert "refused: Ranks disagree in tfshard.shard()" in out, out[-3000:]
    assert "tensor_parallel differs on rank(s) [1] from rank 0" in out, out[-3000:]
    assert secs < 60, f"took {secs:.0f} s"
    assert no_faults_orphans()


@pytest.mark.parametrize("launcher", ["horovod", "gloo", "tfshard"])
def test_local_jobs_listen_on_loopback_only(launcher):
    """mpiexec's control port, horovodrun's rendezvous server and TensorFlow's gRPC
    servers bound 0.0.0.0 during local jobs; tfshard/_loopback.so keeps them on
    loopback. Lists every listening socket of the job's processes while it runs."""
    import ipaddress
    import threading

    import psutil

    result = {}
    job = threading.Thread(target=lambda: result.update(
        zip(("code", "out", "secs"), launch(2, faults_worker("listen"), timeout=120,
                                            launcher=launcher))))
    job.start()
    listeners = set()
    while job.is_alive():
        for proc in psutil.Process().children(recursive=True):
            try:
                for c in proc.net_connections(kind="inet"):
                    if c.status == psutil.CONN_LISTEN:
                        listeners.add((proc.name(), c.laddr.ip, c.laddr.port))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        job.join(0.3)
    assert result["code"] == 0, result["out"][-3000:]
    assert listeners, "saw no listening socket at all: the check cannot fail as written"
    def loopback(ip):
        ip = ipaddress.ip_address(ip)
        return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback  # ::ffff:127.0.0.1 too

    outside = [x for x in listeners if not loopback(x[1])]
    assert not outside, f"listening beyond loopback: {outside} (all: {sorted(listeners)})"


@pytest.mark.alone
@pytest.mark.parametrize("launcher", ["horovod", "gloo", "tfshard"])
def test_rank_that_never_calls_predict_is_named_at_the_deadline(launcher):
    """Under Gloo this was a hang (Horovod's stall check never fired): rank 0 waited in
    predict for ever. Now every backend ends it at the deadline naming rank 1."""
    code, out, secs = launch(2, faults_worker("predict_stall"), timeout=120, launcher=launcher,
                             env=FAST)
    assert code is not None and code != 0, f"hung {secs:.0f} s:\n{out[-3000:]}"
    assert "rank 0 finished" not in out
    assert "DeadlineExceededError" in out, out[-3000:]
    if launcher == "horovod":  # MPI: the op's own deadline and board
        assert "Missing: rank 1 [pid" in out, out[-3000:]
    else:
        assert "predict (step" in out and "rank 1 never joined it" in out, out[-3000:]
        assert "within 8 s" in out and "[pid" in out, out[-3000:]
    assert secs < 60, f"took {secs:.0f} s"
    assert no_faults_orphans()


@pytest.mark.alone
@pytest.mark.parametrize("launcher", ["gloo", "tfshard"])
def test_stopped_rank_is_named_within_seconds_on_every_backend(launcher):
    """SIGSTOP under Gloo ended only at the 120 s Gloo timeout, naming no rank."""
    code, out, secs = launch(2, faults_worker("predict_stop"), timeout=120, launcher=launcher,
                             env={"TFSHARD_COLLECTIVE_TIMEOUT_SECONDS": "60"})
    assert code is not None and code != 0, f"hung {secs:.0f} s:\n{out[-3000:]}"
    assert "rank 0 finished" not in out
    assert "UnavailableError" in out and "rank 1 is stopped" in out, out[-3000:]
    assert secs < 40, f"took {secs:.0f} s; the deadline was 60 s, a stop must be seen sooner"
    assert no_faults_orphans()


@pytest.mark.alone
@pytest.mark.parametrize("mode", ["stage_killed", "stage_stop"])
def test_dead_or_stopped_pipeline_stage_is_named_within_seconds(mode):
    """Stage 1 of two goes away between two predicts: stage 0, waiting to hand it
    activations or to receive its outputs, fails with a named error, never hangs."""
    code, out, secs = launch(2, faults_worker(mode), timeout=90, env=FAST)
    assert code is not None and code != 0, out[-3000:]
    assert "rank 0 predicted once" in out and "rank 0 finished" not in out, out[-3000:]
    assert "rank 1 (stage 1) going away" in out, out[-3000:]
    if mode == "stage_stop":  # alive but stopped: tfshard's wait names it (a killed rank
        # makes the launcher end the job at once)
        assert "from rank 1" in out and "'stage output'" in out, out[-3000:]
        assert "Missing: rank 1 [pid" in out and "stopped" in out, out[-3000:]
    assert secs < 60, f"took {secs:.0f} s"
    assert no_faults_orphans()
