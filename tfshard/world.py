"""`tfshard.init()`: the process's place among the ranks."""

import dataclasses
import os

from tfshard import comm as comm_lib
from tfshard import placement as placement_lib

_WORLD = None


@dataclasses.dataclass(frozen=True)
class World:
    """The ranks this process computes with.

    Attributes:
        comm: the `Communicator` of all ranks.
        backend: "mpi", "horovod", "local", "multiworker" or "mirrored".
        placement: this process's cores and threads (`tfshard.placement.Placement`), or
            None for a world made by hand.
    """

    comm: object
    backend: str
    placement: object = None

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
    placement = _place()
    _WORLD = World(comm=comm_lib.create(wanted), backend=wanted, placement=placement)
    return _WORLD


local_size = placement_lib.local_size  # (how many ranks run on this host)


def _place():
    """Pins this rank to its own cores (`tfshard.placement`) and sizes TensorFlow's
    thread pools to them, so the ranks on a host do not take turns at one core.

    The pools can only be sized before TensorFlow creates its context; later they are
    left as they are. An explicit TFSHARD_THREADS wins. One rank on a host keeps
    TensorFlow's defaults.

    Returns:
        The `Placement`.
    """
    local = local_size()
    placement = placement_lib.pin(placement_lib.plan(placement_lib.local_rank(), local))
    if local <= 1 and "TFSHARD_THREADS" not in os.environ:
        return placement
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(placement.threads)
        tf.config.threading.set_inter_op_parallelism_threads(placement.threads)
    except RuntimeError:
        pass  # TensorFlow already initialised: keep its settings.
    return placement
