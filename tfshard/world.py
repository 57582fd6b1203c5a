"""`tfshard.init()`: the process's place among the ranks."""

import dataclasses
import os

from tfshard import comm as comm_lib

_WORLD = None


@dataclasses.dataclass(frozen=True)
class World:
    """The ranks this process computes with.

    Attributes:
        comm: the `Communicator` of all ranks.
        backend: "mpi", "horovod", "local", "multiworker" or "mirrored".
    """

    comm: object
    backend: str

    @property
    def strategy(self):
        """The tf.distribute strategy of a "multiworker" world, else None."""
        return getattr(self.comm, "strategy", None)

    @property
    def rank(self):
        return self.comm.rank

    @property
    def size(self):
        return self.comm.size

    def __repr__(self):
        return f"<World backend={self.backend} rank={self.rank} size={self.size}>"


def init(backend=None):
    """Joins the ranks of this job (idempotent).

    The backend comes from the environment: under `./horovodrun.sh` (an MPI
    job) it is "mpi", under `./horovodrun.sh --gloo` "horovod", with a
    `TF_CONFIG` (`tfshard launch`) "multiworker" (a
    `tf.distribute.MultiWorkerMirroredStrategy`, one replica per process, which
    must be created before any tensor: call `init()` first), otherwise "local"
    (one rank). TFSHARD_BACKEND names one explicitly.

    Args:
        backend: force a backend: "mpi", "horovod", "local" or "multiworker".

    Returns:
        The `World`.

    Raises:
        ValueError: unknown backend, or a different backend than the one
            already initialised in this process.
        RuntimeError: "multiworker" after TensorFlow created its first tensor.
    """
    global _WORLD
    wanted = backend or comm_lib.detect_backend()
    if _WORLD is not None:
        if _WORLD.backend != wanted:
            raise ValueError(
                f"tfshard is already initialised with backend {_WORLD.backend!r}; "
                f"cannot switch to {wanted!r} in the same process."
            )
        return _WORLD
    _budget_threads()
    _WORLD = World(comm=comm_lib.create(wanted), backend=wanted)
    return _WORLD


def local_size(environ=None):
    """How many ranks of this job run on this host, from the launcher's environment.

    MPICH's mpiexec sets MPI_LOCALNRANKS, Open MPI OMPI_COMM_WORLD_LOCAL_SIZE,
    horovodrun HOROVOD_LOCAL_SIZE; TFSHARD_LOCAL_SIZE names it by hand. 1 otherwise.
    """
    env = os.environ if environ is None else environ
    for key in ("TFSHARD_LOCAL_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE",
                "HOROVOD_LOCAL_SIZE"):
        if env.get(key):
            return max(1, int(env[key]))
    return 1


def _budget_threads():
    """Gives each of the ranks on this host its share of the cores.

    Only possible before TensorFlow creates its context; later it is left as is.
    An explicit TFSHARD_THREADS wins.
    """
    local = local_size()
    threads = int(os.environ.get("TFSHARD_THREADS", 0)) or max(1, (os.cpu_count() or 1) // local)
    if local <= 1 and "TFSHARD_THREADS" not in os.environ:
        return
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        pass  # TensorFlow already initialised: keep its settings.
