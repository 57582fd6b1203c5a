"""Unit tests of the communicator plumbing that needs no ranks: backend detection, the
per-host rank count, the MPI wait policy and the collective timeout."""

import pytest

from tfshard import comm as comm_lib
from tfshard import world as world_lib
from tfshard.comm import base
from tfshard.comm import mpi


@pytest.mark.parametrize("env, want", [
    ({}, "local"),
    ({"PMI_RANK": "0", "PMI_SIZE": "2"}, "mpi"),                # MPICH's mpiexec
    ({"OMPI_COMM_WORLD_RANK": "1"}, "mpi"),                      # Open MPI's mpirun
    ({"HOROVOD_RANK": "0"}, "horovod"),                          # horovodrun --gloo
    ({"TF_CONFIG": "{}"}, "multiworker"),
    ({"PMI_RANK": "0", "TFSHARD_BACKEND": "horovod"}, "horovod"),  # Horovod over MPI
])
def test_detect_backend(env, want):
    assert comm_lib.detect_backend(env) == want


def test_unknown_forced_backend_is_named():
    with pytest.raises(ValueError, match=r"TFSHARD_BACKEND='nccl' is not a backend.*'mpi'"):
        comm_lib.detect_backend({"TFSHARD_BACKEND": "nccl"})


@pytest.mark.parametrize("env, want", [
    ({}, 1), ({"MPI_LOCALNRANKS": "3"}, 3), ({"OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, 2),
    ({"HOROVOD_LOCAL_SIZE": "4"}, 4), ({"TFSHARD_LOCAL_SIZE": "2", "MPI_LOCALNRANKS": "3"}, 2),
])
def test_local_size_from_each_launcher(env, want):
    assert world_lib.local_size(env) == want


def test_spin_only_when_every_rank_has_its_cores(monkeypatch):
    monkeypatch.delenv("TFSHARD_MPI_SPIN_US", raising=False)
    assert mpi.spin_microseconds(2, 2, 1) == 1000.0     # TP=2 on 2 cores
    assert mpi.spin_microseconds(3, 2, 1) == 20.0       # TP=3 on 2 cores: oversubscribed
    assert mpi.spin_microseconds(2, 4, 3) == 20.0       # 2 ranks x 3 threads on 4 cores
    monkeypatch.setenv("TFSHARD_MPI_SPIN_US", "0")
    assert mpi.spin_microseconds(2, 2, 1) == 0.0
    monkeypatch.setenv("TFSHARD_MPI_SPIN_US", "-5")
    with pytest.raises(ValueError, match="TFSHARD_MPI_SPIN_US='-5'"):
        mpi.spin_microseconds(2, 2, 1)


def test_collective_timeout(monkeypatch):
    monkeypatch.delenv(base.TIMEOUT_ENV, raising=False)
    assert base.collective_timeout(30) == 30.0
    monkeypatch.setenv(base.TIMEOUT_ENV, "8")
    assert base.collective_timeout(30) == 8.0
    for bad in ("0", "soon", "-1"):
        monkeypatch.setenv(base.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=f"TFSHARD_COLLECTIVE_TIMEOUT_SECONDS='{bad}'"):
            base.collective_timeout(30)


def test_host_major_orders_each_hosts_ranks_together():
    assert base.host_major(["a", "a", "b", "b"]) == [0, 1, 2, 3]
    assert base.host_major(["a", "b", "a", "b"]) == [0, 2, 1, 3]  # round-robin placement
    assert base.host_major(["b", "a", "a", "b"]) == [0, 3, 1, 2]


def test_host_key_names_the_host_and_a_namespace_of_its_own(monkeypatch):
    import socket

    assert base.host_key({"TFSHARD_HOST": "node7"}) == "node7"
    key = base.host_key({})
    assert key.split("/netns:")[0] == socket.gethostname()
    assert base.host_key({}) == key  # the same process, the same host
    # A local communicator is one host.
    assert comm_lib.create("local").hosts() == [key]
