"""Cross-rank agreement: ranks compare digests before the first collective.

A rank that runs a different model, plan or input would otherwise wait in a
collective the others never call (a hang) or silently mix unrelated tensors.
Each check is one small all-gather of fixed shape, which cannot itself mismatch.

Array and weight digests are xxHash XXH3 (~28 GB/s on one core here, against
1.6 GB/s for SHA-256): they catch accidents (another seed, another file, a
different input), not an adversary who crafts collisions.
"""

import hashlib
import json
import os
import zipfile

import numpy as np
import xxhash


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


def _signed(value):
    return value - (1 << 64) if value >= 1 << 63 else value


def _update(h, array):
    array = np.ascontiguousarray(array)
    h.update(f"{array.dtype.name}{array.shape}".encode())
    if array.size:
        h.update(array.reshape(-1).view(np.uint8))


def array_digest(array):
    """Digest of an array's dtype, shape and bytes."""
    h = xxhash.xxh3_64()
    _update(h, np.asarray(array))
    return _signed(h.intdigest())


def weights_digest(model):
    """Digest of every weight's path, shape, dtype and values, in order.

    Two ranks that built the same architecture with different seeds, or
    loaded different files into it, differ here. Costs one pass over the
    weights: 70 ms for GPT-2's 475 MiB in float32 on this project's 2-vCPU
    machine (XXH3 itself runs at ~28 GB/s; the rest is reading each variable
    into numpy).
    """
    h = xxhash.xxh3_64()
    for v in model.weights:
        h.update(v.path.encode())
        _update(h, np.asarray(v.numpy() if hasattr(v, "numpy") else v))
    return _signed(h.intdigest())


# A file's identity: its size and sampled blocks (the head, the tail and
# evenly spaced blocks in between), so checking a 500 MB file reads ~1.1 MB.
_SAMPLE_BLOCK = 64 * 1024
_SAMPLE_BLOCKS = 16


# Files that record when, not what, was saved: two saves of one model differ
# only there, so they are left out of a source's identity.
_VOLATILE = ("metadata.json",)


def _file_identity(h, path):
    if os.path.basename(path) == "tfshard.json":
        with open(path, "rb") as f:
            index = json.loads(f.read())
        index.pop("date_saved", None)
        index.pop("checksum", None)
        h.update(json.dumps(index, sort_keys=True, default=str).encode())
        return
    if zipfile.is_zipfile(path):  # .keras: each member's CRC-32 and size
        with zipfile.ZipFile(path) as z:
            for info in sorted(z.infolist(), key=lambda i: i.filename):
                if info.filename not in _VOLATILE:
                    h.update(f"{info.filename}:{info.CRC}:{info.file_size}".encode())
        return
    size = os.path.getsize(path)
    h.update(f"{os.path.basename(path)}:{size}".encode())
    with open(path, "rb") as f:
        if size <= (_SAMPLE_BLOCKS + 2) * _SAMPLE_BLOCK:
            h.update(f.read())
            return
        offsets = [0] + [int(size * i / (_SAMPLE_BLOCKS + 1)) for i in range(1, _SAMPLE_BLOCKS + 1)]
        offsets.append(size - _SAMPLE_BLOCK)
        for off in offsets:
            f.seek(off)
            h.update(f.read(_SAMPLE_BLOCK))


def source_identity(path):
    """Digest that tells two copies of a source file or folder from different ones.

    Hashes each file's name (relative to the folder), size, head, tail and
    16 evenly spaced 64 KiB blocks; a folder's files in sorted order; for a
    zip (.keras) each member's CRC-32 and size; a tfshard index's contents.
    Save dates (`metadata.json`, the index's `date_saved`) are left out, and
    so are paths: copies of one checkpoint at different places (on different
    hosts) agree, and so do two saves of the same model.

    Raises:
        OSError: a file cannot be read.
    """
    h = xxhash.xxh3_64()
    if os.path.isdir(path):
        for folder, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                if name in _VOLATILE:
                    continue
                full = os.path.join(folder, name)
                h.update(os.path.relpath(full, path).encode())
                _file_identity(h, full)
    else:
        _file_identity(h, path)
    return _signed(h.intdigest())


def gather_failures(comm, failure, any_failed=None):
    """Which ranks failed, and why: the same list on every rank.

    The one way tfshard reports a failure that happened on some ranks only (a
    batch only one group computed, a file one rank cannot read): every rank
    takes part, so none is left waiting in a collective, and every rank can
    raise the same error.

    Args:
        comm: the `Communicator`.
        failure: this rank's message, or None when it succeeded.
        any_failed: whether any rank failed, when the caller already gathered
            that (e.g. as a column of a table it exchanges anyway); False
            skips the exchange.

    Returns:
        `[(rank, message)]` of the ranks that failed, in rank order.
    """
    if comm.size == 1:
        return [(0, failure)] if failure else []
    if any_failed is False:
        return []
    return [(r, m) for r, m in enumerate(comm.allgather_object(failure)) if m]


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
    with comm.section(f"check of {context}"):
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
