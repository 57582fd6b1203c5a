"""Shared fixtures: launching scenario suites under horovodrun, with a wall clock.

Every multi-rank launch runs in its own process group with a timeout; on
expiry the whole group (horovodrun and every rank) is killed and the test
fails, so a hang can never stall the suite.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

LAUNCH_TIMEOUT = int(os.environ.get("TFSHARD_TEST_LAUNCH_TIMEOUT", "900"))


def launch(np_, argv, timeout=LAUNCH_TIMEOUT, env=None, launcher="horovod", hosts=None,
           host_slots=None):
    """Runs `python ARGV...` on N ranks; kills the whole group on timeout.

    `hosts`: a `hosts.Hosts`; the job then runs on all of them, `np_ // hosts.n`
    ranks each, started from host 0 as from a login node (see tests/hosts.py);
    `host_slots` ranks per host in the `-H` list (default: all of them, so each
    host's ranks are consecutive; 1 makes MPI place ranks round-robin).

    Args:
        launcher: "horovod" (`./horovodrun.sh -np N`: an MPI job, tfshard's MPI
            collectives), "gloo" (`./horovodrun.sh -np N --gloo`: horovodrun,
            Horovod over Gloo), "tfshard" (`python -m tfshard.cli.launch -n N`,
            tf.distribute multi-worker) or "none" (one process, e.g. a
            MirroredStrategy run; `np_` must be 1).

    Returns:
        `(returncode, output, seconds)`; returncode is None on timeout.
    """
    argv = [str(a) for a in argv]
    if hosts is not None:
        assert launcher in ("horovod", "gloo"), launcher
        cmd = hosts.command(0, [
            ROOT / "horovodrun.sh", "-np", np_, "-H", hosts.hostlist(host_slots or np_ // hosts.n),
            *(["--gloo"] if launcher == "gloo" else []),
            sys.executable, *argv])
        env = {**hosts.env(), **(env or {})}
    elif launcher in ("horovod", "gloo"):
        cmd = [str(ROOT / "horovodrun.sh"), "-np", str(np_),
               *(["--gloo"] if launcher == "gloo" else []), sys.executable, *argv]
    elif launcher == "tfshard":
        cmd = [sys.executable, "-m", "tfshard.cli.launch", "-n", str(np_), *argv]
    else:
        assert launcher == "none" and np_ == 1, (launcher, np_)
        cmd = [sys.executable, *argv]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=full_env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        code = None
    return code, out, time.monotonic() - start


#: The worker that fails on purpose (tests/workers/faults.py), and this pytest process's
#: mark on its command line: `no_faults_orphans` then sees only this process's launches,
#: so the other pytest-xdist worker's may run meanwhile.
FAULTS = ROOT / "tests" / "workers" / "faults.py"
FAULTS_TAG = f"--pytest-pid={os.getpid()}"


def faults_worker(mode):
    """The faults worker's command line in `mode`, tagged as this process's."""
    return [FAULTS, mode, FAULTS_TAG]


def no_faults_orphans():
    """Whether none of this process's faults workers still runs; kills any that do, so that
    nothing is left running even when the test fails."""
    out = subprocess.run(["pgrep", "-f", f"[t]ests/workers/faults.py .*{FAULTS_TAG}"],
                         capture_output=True, text=True).stdout.split()
    for pid in out:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    return not out


def launch_ranks(np_, argv, out_dir, env=None, launcher="horovod", hosts=None, host_slots=None):
    """Launches a worker that writes `out_dir/rank{r}.json` on every rank.

    Returns:
        `(returncode, output, ranks)`: ranks[r] is rank r's record or None.
    """
    code, output, _ = launch(np_, argv, env=env, launcher=launcher, hosts=hosts,
                             host_slots=host_slots)
    return code, output, read_ranks(out_dir, np_)


def read_ranks(out_dir, np_):
    """Every rank's record `out_dir/rank{r}.json`, or None where a rank wrote none."""
    ranks = []
    for r in range(np_):
        path = Path(out_dir) / f"rank{r}.json"
        ranks.append(json.loads(path.read_text()) if path.exists() else None)
    return ranks


def require_clean_launch(what, np_, code, output, ranks):
    """Fails the test when a launch timed out, exited non-zero or lost a rank's record."""
    if code is None:
        pytest.fail(f"{what} at {np_} ranks timed out after {LAUNCH_TIMEOUT} s:\n{output[-4000:]}")
    if code != 0 or any(r is None for r in ranks):
        pytest.fail(f"{what} at {np_} ranks exited {code}:\n{output[-4000:]}")
    return ranks


class SuiteRuns:
    """Runs each (suite, world size) once per session and caches the per-rank results."""

    def __init__(self, tmp_path_factory):
        self._tmp = tmp_path_factory
        self._cache = {}

    def __call__(self, suite, np_, launcher="horovod", mirrored=0, models=None):
        """Rank records of `suite` at `np_` ranks (or one process of `mirrored` replicas).

        `models`: a subset of the equivalence models to run (default: all).
        """
        key = (suite, np_, launcher, mirrored, tuple(models or ()))
        if key not in self._cache:
            out_dir = self._tmp.mktemp(f"{suite}-np{np_}-{launcher}{mirrored or ''}")
            argv = [ROOT / "tests" / "workers" / "scenarios.py", "--suite", suite,
                    "--out", out_dir] + (["--mirrored", mirrored] if mirrored else []) + (
                    ["--models", ",".join(models)] if models else [])
            self._cache[key] = launch_ranks(np_, argv, out_dir, launcher=launcher)
        code, output, ranks = self._cache[key]
        self.last_output = output
        what = f"{suite} ({launcher} launch{f', {mirrored} mirrored replicas' if mirrored else ''})"
        return require_clean_launch(what, np_, code, output, ranks)

    def output(self, suite, np_):
        """The combined, rank-tagged output of a suite's launch."""
        self(suite, np_)
        return self._cache[(suite, np_, "horovod", 0, ())][1]


#: Test files in the order scripts/test.sh's xdist workers take them up (a file to a
#: worker): the longest first, so that no worker starts one near the end while the other
#: waits (durations on a 2-core AVX2 machine, in seconds: about 390, 280, 265, 265, 225,
#: 200, 185, 120, 85); every other file follows in its usual order.
LONGEST_FIRST = ("test_precision.py", "test_pipeline.py", "test_checkpoint.py",
                 "test_distribute.py", "test_hosts.py", "test_cli.py", "test_generation.py",
                 "test_equivalence.py", "test_serve.py")


def pytest_collection_modifyitems(config, items):
    """Orders the files as LONGEST_FIRST says; each file's tests keep their order."""
    first = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))


@pytest.fixture(scope="session")
def suite_runs(tmp_path_factory):
    return SuiteRuns(tmp_path_factory)


def case_on_all_ranks(ranks, name):
    """The per-rank records of one case; fails with the recorded error if any rank raised."""
    records = []
    for r in ranks:
        rec = r["cases"].get(name)
        assert rec is not None, f"case {name} missing on rank {r['rank']}"
        records.append(rec)
    return records


def records_ok(ranks, name):
    """The per-rank records of one case; fails with the recorded error if any rank raised."""
    recs = [r["cases"][name] for r in ranks]
    for rank, rec in enumerate(recs):
        assert rec["ok"], (f"{name} on rank {rank}: {rec.get('error_type')}: {rec.get('message')}"
                           f"\n{rec.get('traceback')}")
    return recs
