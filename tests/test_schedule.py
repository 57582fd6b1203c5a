"""Schedules in one process: deterministic shares."""

import pytest

from tfshard.schedule import Scheduler, split_counts, validate


def test_split_counts_proportional_and_complete():
    assert split_counts(12, [1, 1]) == [6, 6]
    assert split_counts(12, [3, 1]) == [9, 3]
    assert split_counts(5, [1, 2]) == [2, 3]
    assert split_counts(1, [1, 1, 1]) == [1, 0, 0]
    for n in range(0, 30):
        assert sum(split_counts(n, [0.3, 1.7, 5])) == n


def test_validate_rejects_bad_requests():
    assert validate("even", None, 3) == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="one of"):
        validate("fastest", None, 2)
    with pytest.raises(ValueError, match="2 entries but there are 3"):
        validate("weighted", [1, 2], 3)
    with pytest.raises(ValueError, match="> 0"):
        validate("weighted", [1, -1], 2)
    with pytest.raises(ValueError, match="only used with schedule='weighted'"):
        validate("even", [1, 1], 2)
    with pytest.raises(ValueError, match="needs weights"):
        validate("weighted", None, 2)


def test_adaptive_moves_work_to_the_faster_group():
    s = Scheduler("adaptive", 2, total_batches=48)
    first = s.assign(s.round_size())
    assert first.count(0) == first.count(1)
    s.observe([(6, 12, 0.1), (6, 12, 0.4)])  # group 1 four times slower
    nxt = s.assign(s.round_size())
    assert nxt.count(0) > 3 * nxt.count(1) - 1
    assert nxt == sorted(nxt)  # contiguous per group, group 0 first
    rep = s.report()
    assert rep["schedule"] == "adaptive" and rep["rounds"][0] == [6, 6]
