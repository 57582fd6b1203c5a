"""`ShardedModel.predict`'s loop: batches shared among groups, gathered in input order.

The inputs are checked first (`tfshard.inputs`); `run` then cuts them into
batches (`batch_source`), shares the batches among the data-parallel groups
round by round (`tfshard.schedule`), has each batch computed by the model's
`run_batch`, and gathers the outputs back in input order (`tfshard.outputs`).
"""

import itertools
import math
import time

import keras
import numpy as np
import tensorflow as tf

from tfshard import consistency
from tfshard.inputs import check_arrays, lists_to_arrays, model_input_specs, to_numpy, unpack_x
from tfshard.outputs import gather_outputs, local_outputs, rows_of
from tfshard.schedule import Scheduler, validate as validate_schedule


def _is_stream(x):
    return isinstance(x, (tf.data.Dataset, keras.utils.PyDataset)) or (
        callable(getattr(x, "__next__", None)) and not isinstance(x, (np.ndarray, dict, list, tuple)))


def batch_source(x, batch_size, steps, struct, where):
    """Yields `(index, batch)` from any input `keras.Model.predict` accepts.

    Args:
        x: numpy array(s) (array, list, dict), a `tf.data.Dataset`, a
            `keras.utils.PyDataset` or a Python generator / iterator.
        batch_size: rows per batch for array input (default 32); must be None
            for batched sources, as in Keras.
        steps: stop after this many batches (None: all).
        struct: the model's input structure (for array input checks), or None.
        where: text naming the call and the rank.

    Returns:
        `(iterator, total_batches or None, items)`; `items` is the validated
        flat input list for array input (None for streams).

    Raises:
        ValueError: bad array input (see `validate_arrays`), a batch_size with
            a batched source, or a non-positive batch_size / steps.
    """
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"{where}: batch_size must be a positive int; got {batch_size!r}.")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"{where}: steps must be a positive int; got {steps!r}.")
    if _is_stream(x):
        if batch_size is not None:
            raise ValueError(
                f"{where}: do not pass batch_size with a {type(x).__name__}; it yields batches "
                "already (as in keras.Model.predict)."
            )
        if isinstance(x, keras.utils.PyDataset):
            n = len(x) if steps is None else min(steps, len(x))
            return ((i, unpack_x(x[i])) for i in range(n)), n, None
        if isinstance(x, tf.data.Dataset):
            card = int(x.cardinality())
            total = card if card >= 0 else None
            if steps is not None:
                total = steps if total is None else min(total, steps)
            it = iter(x)
        else:
            total, it = steps, x

        def gen():
            for i, b in enumerate(it):
                if steps is not None and i >= steps:
                    return
                yield i, to_numpy(unpack_x(b))
        return gen(), total, None
    x = lists_to_arrays(x, struct, where)
    items = check_arrays(x, struct, where)
    bs = batch_size or 32
    rows = items[0][1].shape[0]
    n = math.ceil(rows / bs)
    if steps is not None:
        n = min(n, steps)
    arrays = to_numpy(x)

    def gen():
        for i in range(n):
            yield i, keras.tree.map_structure(lambda a: a[i * bs:(i + 1) * bs], arrays)
    return gen(), n, items


def batch_digest(index, batch):
    leaves = keras.tree.flatten(batch)
    return consistency.digest([index] + [consistency.array_digest(np.asarray(a)) for a in leaves])


def run(sharded, x, batch_size, verbose, steps, callbacks, schedule, weights, gather):
    """The loop of `ShardedModel.predict` (see there for the arguments).

    Batches are shared among the data-parallel groups round by round
    (`tfshard.schedule`); each round ends with one small all-gather of every
    rank's counts, times and failure flag, so a failure on any rank raises on
    every rank. Streamed input is agreed on round by round.

    Returns:
    `(outputs, schedule report)`.
    """
    where = sharded.call_site("predict")
    world = sharded.world.comm
    if gather not in ("all", "rank0"):
        raise ValueError(f"{where}: gather must be 'all' or 'rank0'; got {gather!r}.")
    validate_schedule(schedule, weights, sharded.groups)
    source, total, items = batch_source(
        x, batch_size, steps, model_input_specs(sharded.inner), where)
    if items is not None:
        sharded.agree_on_inputs(items, "predict")
    scheduler = Scheduler(schedule, sharded.groups, weights, total)
    cbs = keras.callbacks.CallbackList(callbacks, model=sharded)
    show = verbose not in (0, "0") and sharded.rank == 0
    # Rank 0 counts its own group's batches; with several groups their number
    # is only known as the schedule unfolds.
    target = total if sharded.groups == 1 else None
    bar = keras.utils.Progbar(target, verbose=2 if verbose in (2, "2") else 1) if show else None
    cbs.on_predict_begin()
    done, seen = [], 0
    while True:
        batch_round = list(itertools.islice(source, scheduler.round_size()))
        if items is None:  # streamed input: agree on every round, the last (empty) one too
            consistency.agree(world, {"batches": consistency.digest(
                [batch_digest(i, b) for i, b in batch_round])},
                f"{sharded.name}.predict")
        if not batch_round:
            break
        assignment = scheduler.assign(len(batch_round))
        local = sharded.local_groups
        if len(local) > 1:  # every group in this process: MirroredStrategy's groups
            stats, failure = _run_local_groups(local, batch_round, assignment, where, done,
                                               cbs, bar)
            if failure is not None:
                raise ValueError(f"{where}: {failure}")
            scheduler.observe(stats)
            seen = len(done)
            continue
        n_batches = n_rows = 0
        failure = None
        t0 = time.perf_counter()
        for (index, batch), g in zip(batch_round, assignment):
            if g != sharded.group:
                continue
            cbs.on_predict_batch_begin(index)
            try:
                out = sharded.run_batch(batch, where)
            except ValueError as err:
                # Only this group computes the batch: report through the
                # round's all-gather so every rank raises, none waits.
                failure = f"batch {index}: " + str(err).replace(f"{where}: ", "")
                break
            done.append((index, out))
            n_batches += 1
            n_rows += rows_of(batch)
            cbs.on_predict_batch_end(index, {"outputs": out})
            if bar is not None:
                seen += 1
                bar.update(seen)
        seconds = time.perf_counter() - t0
        table = world.allgather_numpy(
            np.array([n_batches, n_rows, seconds, failure is not None], np.float64))
        failed = consistency.gather_failures(world, failure, bool(table[:, 3].any()))
        if failed:
            raise ValueError(f"{where}: rank {failed[0][0]} failed on {failed[0][1]}")
        leaders = [g * sharded.group_size for g in range(sharded.groups)]
        scheduler.observe([(int(table[r, 0]), int(table[r, 1]), float(table[r, 2]))
                           for r in leaders])
    cbs.on_predict_end()
    report = scheduler.report()
    if sharded.groups == 1 or len(sharded.local_groups) == sharded.groups:
        # Every batch is in this process: nothing to exchange.
        return local_outputs(done, where, gather != "rank0" or world.rank == 0), report
    return gather_outputs(world, sharded.leads_group, done, where, gather), report


def _run_group(model, batches, where):
    """One group's batches of a round, in order.

    Returns:
        `([(index, output)], rows, seconds, failure text or None)`.
    """
    outs, rows, failure = [], 0, None
    t0 = time.perf_counter()
    for index, batch in batches:
        try:
            outs.append((index, model.run_batch(batch, where)))
        except ValueError as err:
            failure = f"batch {index}: " + str(err).replace(f"{where}: ", "")
            break
        rows += rows_of(batch)
    return outs, rows, time.perf_counter() - t0, failure


def _run_local_groups(local, batch_round, assignment, where, done, cbs, bar):
    """A round whose groups all run in this process, each in a thread of its own.

    TensorFlow releases the GIL while it computes, so the groups' batches run at
    the same time. Callbacks and the progress bar see each batch after the round,
    in input order.

    Returns:
        `(per-group (batches, rows, seconds), failure text or None)`.
    """
    from concurrent.futures import ThreadPoolExecutor

    mine = {g: [(i, b) for (i, b), a in zip(batch_round, assignment) if a == g] for g in local}
    with ThreadPoolExecutor(len(local)) as pool:
        results = dict(zip(local, pool.map(lambda g: _run_group(local[g], mine[g], where),
                                           local)))
    stats, failure = [], None
    for g in sorted(local):
        outs, rows, seconds, failed = results[g]
        for index, out in outs:
            cbs.on_predict_batch_begin(index)
            done.append((index, out))
            cbs.on_predict_batch_end(index, {"outputs": out})
            if bar is not None:
                bar.update(len(done))
        if failed is not None and failure is None:
            failure = f"data-parallel group {g} failed on {failed}"
        stats.append((len(outs), rows, seconds))
    return stats, failure
