"""A multi-rank run whose rank dies or never joins a collective must fail, not hang.

A dead rank: horovodrun's Gloo launcher ends the job when any process exits
non-zero. A rank that stays alive but never joins (or joins a different
collective): Horovod 0.28.1's stall shutdown did not fire on Gloo in our runs,
so the launcher's wall clock (tests/conftest.py `launch`) is what ends it; the
test checks that it does, and that no rank reports a result.
"""

import os
import signal

from conftest import ROOT, launch

WORKER = ROOT / "tests" / "workers" / "faults.py"


def _no_orphans():
    out = os.popen("pgrep -f '[t]ests/workers/faults.py' || true").read().split()
    for pid in out:  # leave nothing running even if the assertion below fails
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    return not out


def test_dead_rank_fails_the_job_quickly():
    code, out, secs = launch(2, [WORKER, "die"], timeout=180)
    assert code is not None, f"hung for {secs:.0f} s:\n{out[-3000:]}"
    assert code != 0, out[-3000:]
    assert "rank 1 dying" in out and "rank 0 finished" not in out
    assert secs < 120, f"took {secs:.0f} s to notice a dead rank"
    assert _no_orphans()


def test_stalled_rank_is_ended_by_the_wall_clock():
    code, out, secs = launch(2, [WORKER, "stall"], timeout=30,
                             env={"TFSHARD_STALL_SHUTDOWN": "15", "TFSHARD_GLOO_TIMEOUT": "30"})
    assert code is None or code != 0, out[-3000:]
    assert "rank 0 finished" not in out
    assert secs < 60
    assert _no_orphans()


def test_mismatched_collectives_never_return_a_result():
    code, out, secs = launch(2, [WORKER, "mismatch"], timeout=30,
                             env={"TFSHARD_STALL_SHUTDOWN": "15", "TFSHARD_GLOO_TIMEOUT": "30"})
    assert code is None or code != 0, out[-3000:]
    assert "finished" not in out, "differently named collectives were matched"
    assert secs < 60
    assert _no_orphans()
