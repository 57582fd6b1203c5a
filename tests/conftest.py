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


def launch(np_, argv, timeout=LAUNCH_TIMEOUT, env=None):
    """Runs `./horovodrun.sh -np N python ARGV...`; kills the group on timeout.

    Returns:
        `(returncode, output, seconds)`; returncode is None on timeout.
    """
    cmd = [str(ROOT / "horovodrun.sh"), "-np", str(np_), sys.executable, *map(str, argv)]
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


def launch_ranks(np_, argv, out_dir, env=None):
    """Launches a worker that writes `out_dir/rank{r}.json` on every rank.

    Returns:
        `(returncode, output, ranks)`: ranks[r] is rank r's record or None.
    """
    code, output, _ = launch(np_, argv, env=env)
    ranks = []
    for r in range(np_):
        path = Path(out_dir) / f"rank{r}.json"
        ranks.append(json.loads(path.read_text()) if path.exists() else None)
    return code, output, ranks


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

    def __call__(self, suite, np_):
        key = (suite, np_)
        if key not in self._cache:
            out_dir = self._tmp.mktemp(f"{suite}-np{np_}")
            self._cache[key] = launch_ranks(
                np_, [ROOT / "tests" / "workers" / "scenarios.py", "--suite", suite,
                      "--out", out_dir], out_dir)
        code, output, ranks = self._cache[key]
        self.last_output = output
        return require_clean_launch(suite, np_, code, output, ranks)

    def output(self, suite, np_):
        """The combined, rank-tagged output of a suite's launch."""
        self(suite, np_)
        return self._cache[(suite, np_)][1]


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
