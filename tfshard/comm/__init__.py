"""Communicators: one interface, one file per backend.

The backends (mpi.py, horovod.py, distribute.py, local.py) are leaves: nothing
imports one except the factories here, `create` and `for_replicas`, and a
backend imports only the shared modules of this package (base.py, watchdog.py,
strategies.py, ...). `tests/test_imports.py` checks it.
"""

import os

from tfshard.comm.base import Communicator
from tfshard.comm.compressed import WIRE_DTYPES, check_comm_dtype, compressed
from tfshard.comm.metered import MeteredCommunicator, metered

BACKENDS = ("mpi", "horovod", "local", "multiworker")


def detect_backend(environ=None):
    """Names the backend the environment asks for.

    `./horovodrun.sh` (the default, an MPI job started by `mpiexec`) exports
    PMI_RANK (MPICH) or OMPI_COMM_WORLD_RANK (Open MPI): "mpi", tfshard's own
    MPI collectives. `./horovodrun.sh --gloo` (horovodrun over Gloo) exports
    HOROVOD_RANK: "horovod". A `TF_CONFIG` means a tf.distribute multi-worker
    job; otherwise "local". TFSHARD_BACKEND overrides all of these (e.g.
    `TFSHARD_BACKEND=horovod` under `./horovodrun.sh`: Horovod over its MPI
    controller).

    Returns:
        One of "mpi", "horovod", "multiworker", "local".

    Raises:
        ValueError: TFSHARD_BACKEND names no backend.
    """
    env = os.environ if environ is None else environ
    forced = env.get("TFSHARD_BACKEND")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"TFSHARD_BACKEND={forced!r} is not a backend; expected one of "
                             f"{BACKENDS}.")
        return forced
    if "HOROVOD_RANK" in env or "HOROVOD_GLOO_RENDEZVOUS_ADDR" in env:
        return "horovod"
    if "PMI_RANK" in env or "OMPI_COMM_WORLD_RANK" in env:
        return "mpi"
    if "TF_CONFIG" in env:
        return "multiworker"
    return "local"


def create(backend=None):
    """Creates the communicator for `backend` (detected when None).

    Args:
        backend: "mpi", "horovod", "local", "multiworker", or None to detect.

    Returns:
        A `Communicator`.

    Raises:
        ValueError: for an unknown backend name.
        RuntimeError: "multiworker" after TensorFlow has initialised.
    """
    backend = backend or detect_backend()
    if backend == "mpi":
        from tfshard.comm.mpi import MPICommunicator

        return MPICommunicator()
    if backend == "horovod":
        from tfshard.comm.horovod import HorovodCommunicator

        return HorovodCommunicator()
    if backend == "local":
        from tfshard.comm.local import LocalCommunicator

        return LocalCommunicator()
    if backend == "multiworker":
        from tfshard.comm.distribute import ReplicaCommunicator

        return ReplicaCommunicator.from_environment()
    raise ValueError(f"Unknown backend {backend!r}; expected one of {BACKENDS}.")


def for_replicas(strategy):
    """Communicators for the replicas of `strategy` that run in this process.

    Args:
        strategy: a `tf.distribute.MirroredStrategy` (all replicas local) or
            `MultiWorkerMirroredStrategy` (one replica per process).

    Returns:
        A list with one `Communicator` per local replica, in device order.

    Raises:
        ValueError: another kind of strategy, or a multi-worker process
            with several replicas.
    """
    from tfshard.comm import distribute
    from tfshard.comm.strategies import strategy_kind

    kind = strategy_kind(strategy)
    if kind == "multiworker":
        return [distribute.ReplicaCommunicator(strategy, distribute.replica_rank(strategy))]
    return [distribute.ReplicaCommunicator(strategy, i)
            for i in range(len(strategy.extended.worker_devices))]


__all__ = ["Communicator", "MeteredCommunicator", "create", "detect_backend", "for_replicas",
           "metered", "compressed", "check_comm_dtype", "WIRE_DTYPES", "BACKENDS"]
