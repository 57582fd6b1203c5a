"""tfshard's MPI ops against numpy, on every rank (./horovodrun.sh -np 3).

Exits non-zero on the first wrong value; prints "MPI-OPS OK rank R" at the end.
"""

import numpy as np
import tensorflow as tf

import tfshard

world = tfshard.init()
comm, rank, size = world.comm, world.rank, world.size
assert world.backend == "mpi" and comm.backend == "mpi", world


def data(r, shape, dtype=np.float32):
    """Rank r's integer-valued tensor (sums are exact in every dtype)."""
    n = int(np.prod(shape))
    return (np.arange(n).reshape(shape) % 7 + 3 * r - 4).astype(dtype)


def check(name, got, want):
    got = np.asarray(got)
    assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, got.dtype,
                                                                want.shape, want.dtype)
    assert np.array_equal(got, want), (name, got, want)


graph = tf.function
for mode, wrap in (("eager", lambda f: f), ("tf.function", graph)):
    for dtype in (np.float32, np.float64, np.int32, np.int64):
        shape = (2, 3, 5)
        out = wrap(lambda x: comm.allreduce_sum(x))(tf.constant(data(rank, shape, dtype)))
        check(f"{mode} allreduce {dtype.__name__}", out,
              sum(data(r, shape, dtype) for r in range(size)))
    # bfloat16 and float16: summed in float32, rounded once.
    for tf_dtype in (tf.bfloat16, tf.float16):
        x = tf.cast(data(rank, (4, 6)), tf_dtype)
        out = wrap(lambda v: comm.allreduce_sum(v))(x)
        want = tf.cast(sum(data(r, (4, 6)) for r in range(size)), tf_dtype)
        assert out.dtype == tf_dtype and np.array_equal(out.numpy(), want.numpy()), mode
    # 16 bits on the wire: each step adds two partials in float32 and rounds once. Every
    # rank gets the same bits; with 2 ranks that is the float32 sum rounded once, with
    # more it is within one rounding per step of it. Small and large (MPICH switches from
    # recursive doubling to reduce-scatter + all-gather) tensors.
    for tf_dtype, eps in ((tf.bfloat16, 2.0 ** -8), (tf.float16, 2.0 ** -11)):
        for n in (37, 300_000):
            parts = [np.random.default_rng(r).normal(size=n).astype(np.float32)
                     for r in range(size)]
            x = tf.cast(parts[rank], tf_dtype)
            out = wrap(lambda v: comm.allreduce_sum_16bit(v))(x)
            assert out.dtype == tf_dtype, (mode, out.dtype)
            got = tf.cast(out, tf.float32).numpy()
            every = comm.allgather_numpy(got)
            assert all(np.array_equal(every[0], e) for e in every), f"{mode}: ranks differ"
            sent = [tf.cast(tf.cast(p, tf_dtype), tf.float32).numpy() for p in parts]
            exact = sum(sent)
            if size == 2:
                once = tf.cast(tf.cast(exact, tf_dtype), tf.float32).numpy()
                assert np.array_equal(got, once), (mode, tf_dtype, n)
            bound = (size - 1) * eps * sum(np.abs(p) for p in sent)
            assert np.all(np.abs(got - exact) <= bound), (mode, tf_dtype, n)
    try:
        comm.allreduce_sum_16bit(tf.zeros([2], tf.float32))
        raise AssertionError("allreduce_sum_16bit took float32")
    except ValueError as e:
        assert "takes bfloat16 or float16" in str(e), e
    # Gathers on every axis, lengths differing per rank, with and without sizes=.
    for axis in range(3):
        def part(r):
            shape = [2, 3, 4]
            shape[axis] = r + 1
            return data(r, shape)
        want = np.concatenate([part(r) for r in range(size)], axis)
        sizes = [r + 1 for r in range(size)]
        for given in (None, sizes):
            fn = wrap(lambda v, s=given, a=axis: comm.allgather(v, axis=a, sizes=s))
            check(f"{mode} allgather axis {axis} sizes {given}", fn(tf.constant(part(rank))), want)
    for root in range(size):
        out = wrap(lambda v, root=root: comm.broadcast(v, root=root))(
            tf.constant(data(rank, (3,), np.int64)))
        check(f"{mode} broadcast root {root}", out, data(root, (3,), np.int64))

# Static shapes: a gather with sizes= has a known output shape inside a traced graph.
spec = tf.TensorSpec([None, 4], tf.float32)
traced = tf.function(lambda v: comm.allgather(v, axis=1, sizes=[4] * size),
                     input_signature=[spec]).get_concrete_function()
assert traced.structured_outputs.shape.as_list() == [None, 4 * size], traced.structured_outputs

# Point to point, in a ring.
nxt, prv = (rank + 1) % size, (rank - 1) % size
if rank % 2 == 0:
    comm.send(tf.constant(data(rank, (5,))), dest=nxt, tag=7)
    got = comm.recv([5], tf.float32, source=prv, tag=7)
else:
    got = comm.recv([5], tf.float32, source=prv, tag=7)
    comm.send(tf.constant(data(rank, (5,))), dest=nxt, tag=7)
check("recv", got, data(prv, (5,)))

# Point to point with a shape header: the receiver learns the batch dim, also traced.
sent = data(rank, (2 + rank, 3))


@tf.function
def send(v):
    comm.send(v, dest=nxt, tag=8, header=True)


recv = tf.function(lambda: comm.recv([None, 3], tf.float32, source=prv, tag=8, header=True))
if rank % 2 == 0:
    send(tf.constant(sent))
    got = recv()
else:
    got = recv()
    send(tf.constant(sent))
check("recv with header", got, data(prv, (2 + prv, 3)))

# Host-side helpers and sub-groups.
rows = np.full((rank + 1, 2), rank, np.float32)
root = comm.gather_to_root(rows)
if rank == 0:
    check("gather_to_root", root, np.concatenate([np.full((r + 1, 2), r, np.float32)
                                                  for r in range(size)]))
else:
    assert root is None
assert comm.allgather_object({"rank": rank}) == [{"rank": r} for r in range(size)]
group, index = comm.split(1)
assert group.size == 1 and index == rank
check("allreduce in a group of one", group.allreduce_sum(tf.constant([float(rank)])),
      np.array([float(rank)], np.float32))
comm.barrier()
print(f"MPI-OPS OK rank {rank}", flush=True)
