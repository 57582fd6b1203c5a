"""Where ranks run (tfshard/placement.py): disjoint blocks of cores, NUMA nodes kept
together, nothing pinned where it cannot be (and saying why); an MPI job's two ranks
pinned to different cores of this machine, as its plan summary says."""

import json
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from conftest import launch
from tfshard import placement


@settings(max_examples=200, deadline=None)
@given(cores=st.sets(st.integers(0, 255), min_size=1, max_size=64),
       local_size=st.integers(1, 80), node_count=st.integers(1, 4))
def test_blocks_are_disjoint_and_cover(cores, local_size, node_count):
    cores = sorted(cores)
    nodes = {n: [c for c in cores if c % node_count == n] for n in range(node_count)}
    split = placement.blocks(cores, local_size, nodes)
    if local_size > len(cores):
        assert split is None
        return
    assert len(split) == local_size and all(split)
    flat = [c for b in split for c in b]
    assert sorted(flat) == cores  # every core given, none twice
    sizes = {len(b) for b in split}
    assert max(sizes) - min(sizes) <= 1


def test_one_rank_per_numa_node():
    nodes = {0: [0, 1, 2, 3, 8, 9, 10, 11], 1: [4, 5, 6, 7, 12, 13, 14, 15]}
    split = placement.blocks(range(16), 2, nodes)
    assert [sorted(b) for b in split] == [nodes[0], nodes[1]]
    split = placement.blocks(range(16), 4, nodes)  # two ranks a node, never across
    assert all(set(b) <= set(nodes[0]) or set(b) <= set(nodes[1]) for b in split)


def test_cpulist_round_trip():
    assert placement.parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert placement.format_cpulist([11, 10, 8, 3, 2, 1, 0]) == "0-3,8,10-11"
    assert placement.parse_cpulist("") == []


def test_plan_says_why_it_does_not_pin():
    env = {}
    p = placement.plan(1, 2, available=[0, 1, 2, 3], nodes={}, environ=env)
    assert p.cores == (2, 3) and p.threads == 2 and not p.why_not
    assert "cores 2-3" in p.line() and "2 intra-op thread(s)" in p.line()
    off = placement.plan(1, 2, available=[0, 1, 2, 3], nodes={}, environ={"TFSHARD_PIN": "0"})
    assert off.cores == () and "TFSHARD_PIN=0" in off.line() and off.threads == 2
    crowded = placement.plan(2, 3, available=[0, 1], nodes={}, environ=env)
    assert crowded.cores == () and "3 ranks share 2 core(s)" in crowded.why_not
    assert crowded.threads == 1
    unknown = placement.plan(None, 2, available=[0, 1], nodes={}, environ=env)
    assert unknown.cores == () and "TFSHARD_LOCAL_RANK" in unknown.why_not
    alone = placement.plan(0, 1, available=[0, 1], nodes={}, environ=env)
    assert alone.cores == () and alone.threads == 2
    forced = placement.plan(0, 2, available=[0, 1, 2, 3], nodes={},
                            environ={"TFSHARD_THREADS": "3"})
    assert forced.cores == (0, 1) and forced.threads == 3


def test_local_rank_from_each_launcher():
    assert placement.local_rank({"MPI_LOCALRANKID": "1"}) == 1
    assert placement.local_rank({"OMPI_COMM_WORLD_LOCAL_RANK": "2"}) == 2
    assert placement.local_rank({"HOROVOD_LOCAL_RANK": "3"}) == 3
    assert placement.local_rank({"TFSHARD_LOCAL_RANK": "0", "MPI_LOCALRANKID": "1"}) == 0
    assert placement.local_rank({}) is None


PIN_EVERY_THREAD = """
import json, os, threading, time
from tfshard import placement
stop = threading.Event()
worker = threading.Thread(target=stop.wait)  # a thread started before the pin
worker.start()
cores = sorted(os.sched_getaffinity(0))
p = placement.pin(placement.plan(1, 2, available=cores, nodes={}, environ={}))
after = threading.Thread(target=stop.wait)  # and one after
after.start()
masks = {t: sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")}
stop.set()
print(json.dumps({"cores": list(p.cores), "masks": masks}))
"""


def test_pin_applies_to_every_thread():
    # In a child process: pinning the test process would pin every later test.
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one core: nothing to split (plan's refusal is tested above)")
    out = subprocess.run([sys.executable, "-c", PIN_EVERY_THREAD], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    rec = json.loads(out.strip().splitlines()[-1])
    assert rec["cores"] and len(rec["masks"]) >= 3
    assert all(m == rec["cores"] for m in rec["masks"].values()), rec


SHOW = """
import json, os, tfshard
w = tfshard.init()
print("PLACED " + json.dumps({"rank": w.rank, "cores": list(w.placement.cores),
                              "mask": sorted(os.sched_getaffinity(0)),
                              "line": w.placement.line()}))
"""


def test_mpi_ranks_get_their_own_cores():
    code, out, _ = launch(2, ["-c", SHOW], timeout=300)
    assert code == 0, out
    recs = [json.loads(line.split("PLACED ", 1)[1]) for line in out.splitlines()
            if "PLACED " in line]
    assert sorted(r["rank"] for r in recs) == [0, 1], out
    if len(os.sched_getaffinity(0)) < 2:
        assert all("not pinned" in r["line"] for r in recs), out
        return
    a, b = (set(r["cores"]) for r in recs)
    assert a and b and not a & b, recs
    assert all(r["mask"] == r["cores"] for r in recs), recs
    assert all("Placement: local rank" in r["line"] for r in recs)


def test_a_launcher_variable_that_is_not_a_number_is_named():
    with pytest.raises(ValueError, match=r"MPI_LOCALNRANKS='two': expected the number of ranks"):
        placement.local_size({"MPI_LOCALNRANKS": "two"})
    with pytest.raises(ValueError, match=r"TFSHARD_THREADS='4x': expected threads per rank"):
        placement.plan(0, 2, available=[0, 1], nodes={}, environ={"TFSHARD_THREADS": "4x"})
    assert placement.local_size({"MPI_LOCALNRANKS": "0"}) == 1  # as before: at least 1
