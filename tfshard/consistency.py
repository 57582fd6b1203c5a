"""Cross-rank agreement: ranks compare digests before the first collective.

A rank that runs a different model, plan or input would otherwise wait in a
collective the others never call (a hang) or silently mix unrelated tensors.
Each check is one small all-gather of fixed shape, which cannot itself mismatch.
"""

import hashlib
import json

import numpy as np


def digest(obj):
    """A 64-bit digest of a JSON-able object or of bytes."""
    blob = obj if isinstance(obj, (bytes, bytearray)) else json.dumps(
        obj, sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little", signed=True)


def model_structure(model):
    """A description of a model that two ranks agree on iff they hold the same model.

    Every variable's path, shape and dtype, in order (a differently shaped or
    differently nested model differs here).
    """
    return [(v.path, list(v.shape), str(v.dtype)) for v in model.weights]


def array_digest(array):
    """Digest of an array's dtype, shape and bytes."""
    array = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    h.update(array.view(np.uint8).reshape(-1) if array.size else b"")
    return int.from_bytes(h.digest()[:8], "little", signed=True)


def agree(comm, parts, context):
    """Checks that every rank has the same digest for every part.

    Args:
        comm: the `Communicator`.
        parts: ordered mapping of part name (e.g. "model structure") to a
            64-bit digest (see `digest`).
        context: what is being checked, for the message (e.g. "shard(model)").

    Raises:
        ValueError: on every rank, when any part differs between ranks; the
            message names the parts and the ranks that disagree with rank 0.
    """
    if comm.size == 1:
        return
    names = list(parts)
    mine = np.array([parts[n] for n in names], dtype=np.int64)
    table = comm.allgather_numpy(mine)
    problems = []
    for j, name in enumerate(names):
        odd = [r for r in range(comm.size) if table[r, j] != table[0, j]]
        if odd:
            problems.append(f"{name} differs on rank(s) {odd} from rank 0")
    if problems:
        raise ValueError(
            f"Ranks disagree in {context} (seen from rank {comm.rank} of {comm.size}): "
            + "; ".join(problems)
            + ". Every rank must build the same model, use the same plan and feed the "
            "same inputs (seed your random generators identically)."
        )
