"""`ShardedModel`: a Keras model whose big kernels live in slices across ranks.

`tfshard.shard` (tfshard/sharding.py) builds one; this module is what it does:
calls, predict, generate, quantize, save and load through the ranks' slices.
"""

import collections

import keras
import tensorflow as tf

from tfshard import consistency
from tfshard import convert
from tfshard import generation
from tfshard import inputs as inputs_lib
from tfshard import predict as predict_lib
from tfshard.comm.strategies import out_of_line
from tfshard.layers.tracking import heap_frozen, set_untracked


Replica = collections.namedtuple("Replica", "model plan comm device meter")
Replica.__doc__ = """One rank's sharded model in this process (several under MirroredStrategy).

Attributes:
    model: the converted Keras model holding this rank's slices.
    plan: the `Plan` resolved for this rank.
    comm: the rank's tensor-parallel `Communicator`.
    device: the device its variables live on (None: TensorFlow's default).
    meter: the `MeteredCommunicator` its sharded layers call (collective
        count, bytes and seconds of its forwards).
"""


class ShardedModel(keras.Model):
    """A Keras model whose big kernels live in slices across ranks.

    Calls, `predict` and `predict_on_batch` have the Keras contract and give
    every rank the global output the unsharded model would give. With several
    data-parallel groups, `predict` shares the batches among the groups.

    Args:
        model: the converted (sharded in place) Keras model.
        plan: the `ResolvedPlan`.
        world: the `World`.
        tp_comm: the `Communicator` of this rank's tensor-parallel group.
        group: the index of this rank's data-parallel group.
        replicas: under a tf.distribute strategy, one `Replica` per replica
            in this process (the first is `model`).
        strategy: the tf.distribute strategy, if any; calls then run through
            `strategy.run`.
        group_models: under a MirroredStrategy split into data-parallel groups,
            one `ShardedModel` per group (over a MirroredStrategy of the
            group's devices); this one then shares the work among them.
        group_comm: the `Communicator` of this rank's whole data-parallel group
            (every pipeline stage of it); default `tp_comm`.
    """

    def __init__(self, model, plan, world, tp_comm=None, group=0, replicas=None, strategy=None,
                 group_models=None, group_comm=None, **kwargs):
        super().__init__(name=kwargs.pop("name", f"sharded_{model.name}"), **kwargs)
        self.inner = model
        self.plan = plan
        self.world = world
        self.tp_comm = tp_comm or world.comm
        self.group_comm = group_comm or self.tp_comm
        self.group = group
        set_untracked(self, group_models=list(group_models or []))
        self.groups = len(self.group_models) or max(1, world.size // self.group_comm.size)
        self.strategy = strategy
        if self.group_models:
            replicas = [r for m in self.group_models for r in m.replicas]
        self.replicas = list(replicas or [Replica(model, plan, self.tp_comm, None, None)])
        self.last_schedule = None
        set_untracked(self, source_config=None,
                      source_config_error="the model was not sharded by tfshard.shard",
                      source=None, tokenizer=None, preprocessor=None, chat_template=None,
                      decode_path=None)  # set by generate: "fused" or why keras-hub's loop ran
        self.built = True
        self._jit_compile = False
        self._predict_step = None
        set_untracked(self, _replica_forwards={})

    def attach_source(self, label, preprocessor=None, chat_template=None):
        """Records where the weights came from and the preprocessor (and tokenizer) and
        chat template the source carried; `tfshard.load` calls it (and `save` writes them
        into a checkpoint).

        Args:
            label: the file or folder read (shown by the CLI and in errors).
            preprocessor: a keras-hub preprocessor, or None.
            chat_template: the model's chat template (Jinja), or None.
        """
        set_untracked(self, source=label, preprocessor=preprocessor,
                      tokenizer=getattr(preprocessor, "tokenizer", None),
                      chat_template=chat_template)

    def settle(self):
        """Called by `tfshard.load` once the weights are filled. Nothing to do here; a
        model whose variables are placed after the cut (stages on devices,
        `tfshard.pipeline.on_devices`) moves the filled ones to their devices."""

    @property
    def rank(self):
        return self.world.rank

    @property
    def size(self):
        return self.world.size

    @property
    def tensor_parallel(self):
        return self.tp_comm.size

    @property
    def group_size(self):
        """Ranks per data-parallel group (pipeline stages x tensor-parallel ranks)."""
        return self.group_comm.size

    @property
    def leads_group(self):
        """Whether this rank is its data-parallel group's first (it hands the group's
        results to the others)."""
        return self.group_comm.rank == 0

    @property
    def local_groups(self):
        """`{group index: ShardedModel}` of the data-parallel groups this process computes:
        its own group, or every group of a MirroredStrategy split into groups."""
        if self.group_models:
            return dict(enumerate(self.group_models))
        return {self.group: self}

    def call(self, inputs, *args, **kwargs):
        if self.group_models:  # every group would give the same output: group 0 computes
            return self.group_models[0].call(inputs, *args, **kwargs)
        if self.strategy is None:
            return self.inner(inputs, *args, **kwargs)
        ctx = tf.distribute.get_replica_context()
        if ctx is not None and ctx.strategy is self.strategy:
            model = self.replica_model(ctx)
            if tf.executing_eagerly():
                return model(inputs, *args, **kwargs)
            return self._forward_of(model)(inputs, *args, **kwargs)
        # Every replica computes the same global output; replica 0's is returned.
        out = self.strategy.run(lambda x: self.call(x, *args, **kwargs), args=(inputs,))
        return tf.nest.map_structure(
            lambda v: self.strategy.experimental_local_results(v)[0], out)

    def collective_counters(self):
        """What the forwards of this process's ranks have sent so far, measured.

        Counted by the `MeteredCommunicator` the sharded layers call, since
        `shard()`, over every forward (predict, calls, generate); host-side
        checks and output gathering are not included.

        Returns:
            `{rank: {"collectives": int, "bytes": int, "seconds": float}}`, one
            entry per rank in this process (every replica under
            MirroredStrategy). `bytes` sums the sizes of the tensors the
            collectives produced; `seconds` the time from each collective's
            input being ready to its output being ready.
        """
        return {rank: r.meter.reading() for rank, r in self.local_replicas().items()
                if r.meter is not None}

    def local_replicas(self):
        """`{rank: Replica}` for the ranks this process computes (world ranks)."""
        if self.group_models:
            return {g * self.tensor_parallel + rank: r for g, m in enumerate(self.group_models)
                    for rank, r in m.local_replicas().items()}
        if self.strategy is None:
            return {self.rank: self.replicas[0]}
        return {r.comm.rank: r for r in self.replicas}

    def _forward_of(self, model):
        """A replica model's forward as a function of its own (see
        `tfshard.comm.strategies.out_of_line`), made once per model."""
        if id(model) not in self._replica_forwards:
            self._replica_forwards[id(model)] = out_of_line(model.__call__)
        return self._replica_forwards[id(model)]

    def replica_model(self, ctx=None):
        """The converted model of the replica whose context `ctx` is (default:
        the current replica context; this process's only model without a strategy)."""
        if self.strategy is None:
            return self.inner
        ctx = ctx or tf.distribute.get_replica_context()
        if len(self.replicas) == 1:
            return self.replicas[0].model
        replica_id = tf.get_static_value(ctx.replica_id_in_sync_group)
        for replica in self.replicas:
            if replica.comm.rank == replica_id:
                return replica.model
        raise ValueError(f"{self.name}: no replica {replica_id} in this process "
                         f"(have {[r.comm.rank for r in self.replicas]}).")

    def _refuse_strategy(self, what):
        if self.strategy is not None:
            raise NotImplementedError(
                f"{self.name}.{what} is not available under tf.distribute yet "
                f"({type(self.strategy).__name__}): quantize the model before sharding it "
                "(model.quantize('int8'), then tfshard.shard(model, strategy=...)), or shard "
                "under horovodrun (./horovodrun.sh -np N) for it."
            )

    def call_site(self, what):
        """How errors name a call on this rank: "NAME.WHAT (rank r of n)"."""
        if len(self.replicas) > 1:
            return (f"{self.name}.{what} ({len(self.replicas)} replicas of "
                    f"{type(self.strategy).__name__} in this process)")
        return f"{self.name}.{what} (rank {self.rank} of {self.size})"

    def agree_on_inputs(self, items, what):
        """All ranks check they were given the same arrays (see `consistency.agree`)."""
        consistency.agree(self.world.comm, {f"input {n!r}": consistency.array_digest(a)
                                            for n, a, _ in items}, f"{self.name}.{what}")

    def run_batch(self, batch, where):
        """One forward pass of a batch on this rank's group; numpy out."""
        if self.group_models:
            return self.group_models[0].run_batch(batch, where)
        preprocessor = getattr(self.inner, "preprocessor", None)
        if preprocessor is not None:
            batch = inputs_lib.unpack_x(preprocessor(batch))
        if self._predict_step is None:
            self._predict_step = tf.function(
                lambda b: self.call(b, training=False), reduce_retracing=True)
        inputs_lib.check_sequence_length(self.inner, batch, where)
        tensors = keras.tree.map_structure(tf.convert_to_tensor, batch)
        step = self._predict_step
        try:
            try:
                out = step(tensors)
            except tf.errors.CancelledError:
                if len(self.replicas) < 2:
                    raise
                # Replicas of one process: when one replica's step fails, TensorFlow may
                # report another's cancellation instead. The step once more, eagerly
                # (replica by replica), raises the failing replica's own error.
                out = self.call(tensors, training=False)
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as err:
            # The model refused its inputs (a shape, a dtype it cannot cast); collective
            # failures (Unavailable, DeadlineExceeded, FailedPrecondition) pass unchanged.
            raise inputs_lib.invalid_argument_to_value_error(err, where, batch) from None
        except ValueError as err:
            if "in user code" not in str(err):
                raise
            raise inputs_lib.invalid_argument_to_value_error(err, where, batch) from None
        return inputs_lib.to_numpy(out)

    def predict(self, x, batch_size=None, verbose="auto", steps=None, callbacks=None,
                schedule="even", weights=None, gather="all"):
        """`keras.Model.predict`, sharded: the same arguments and output structure.

        Args:
            x: numpy array(s) (array, list or dict as the model takes), a
                `tf.data.Dataset`, a `keras.utils.PyDataset` or a generator
                yielding batches (`x` or `(x, y[, sample_weight])`).
            batch_size: rows per batch for array input (default 32).
            verbose: "auto", 0, 1 or 2; a progress bar on world rank 0 only.
            steps: stop after this many batches.
            callbacks: Keras callbacks; `on_predict_batch_*` get the global
                batch index, on the ranks that compute that batch.
            schedule: "even", "weighted" or "adaptive": how batches are shared
                among data-parallel groups (see `tfshard.schedule`).
            weights: with "weighted": one positive weight per group.
            gather: "all" (every rank gets the result) or "rank0" (only world
                rank 0 does; others get None, saving memory).

        Returns:
            The global output, with the structure, dtype and row order of
            `model.predict` (None off rank 0 with `gather="rank0"`).
            `self.last_schedule` then describes each group's share and
            measured throughput.

        Raises:
            ValueError: bad input (keys, rank, shape, dtype, empty, token ids
                out of range), a bad schedule or weights, or ranks given
                different inputs; raised on every rank, before any collective
                that could mismatch.
        """
        with self.world.comm.section(f"{self.name}.predict"):
            out, self.last_schedule = predict_lib.run(
                self, x, batch_size, verbose, steps, callbacks, schedule, weights, gather)
        return out

    def predict_on_batch(self, x):
        """`keras.Model.predict_on_batch`, sharded (every group computes the batch)."""
        where = self.call_site("predict_on_batch")
        specs = inputs_lib.model_input_specs(self.inner)
        with self.world.comm.section(f"{self.name}.predict_on_batch"):
            x = inputs_lib.lists_to_arrays(x, specs, where)
            self.agree_on_inputs(inputs_lib.check_arrays(x, specs, where), "predict_on_batch")
            return self.run_batch(inputs_lib.to_numpy(x), where)

    def decode_step_refusal(self):
        """Why tfshard's fused decode step (`tfshard.decode`) cannot run this model's
        generation, or None when it can (then the model's family and sampler decide)."""
        if self.strategy is not None:
            return "a tf.distribute strategy runs the replicas"
        return None

    def generate(self, inputs, max_length=None, stop_token_ids="auto", strip_prompt=False,
                 sampler=None):
        """keras-hub `CausalLM.generate`, sharded: the same contract and tokens.

        Every rank of a tensor-parallel group runs keras-hub's generation loop
        in lock step, its KV cache holding only its own K/V heads. With several
        data-parallel groups the prompts are shared among them and the results
        gathered back in order. Every rank must call it with the same inputs.

        Args:
            inputs: a string or list of strings (when the model has a
                preprocessor, or the source carried a tokenizer, as `smollm2`
                does), or a dict `{"token_ids", "padding_mask"}` of arrays
                padded to the length to generate up to.
            max_length: the length to generate up to (prompt included), for
                string inputs; default: the preprocessor's sequence length.
            stop_token_ids: "auto" (the tokenizer's end token), None (run to
                `max_length`) or a tuple of token ids.
            strip_prompt: return only the continuation.
            sampler: optional keras-hub sampler or name ("greedy", "top_k",
                ...); as `causal_lm.compile(sampler=...)`. Random samplers
                draw from rank 0's seed state on every rank.

        Returns:
            As keras-hub: strings for string inputs (a string for a string),
            else `{"token_ids", "padding_mask"}` numpy arrays; on every rank.

        Raises:
            ValueError: not a keras-hub CausalLM, strings without a tokenizer,
                bad token ids or shapes, a length past the position
                embeddings, ranks given different inputs, or a failure on any
                rank, e.g. cut attention in a CausalLM whose KV cache layout
                tfshard does not know (raised on every rank).
        """
        with self.world.comm.section(f"{self.name}.generate"):
            return generation.generate(self, inputs, max_length=max_length,
                                       stop_token_ids=stop_token_ids, strip_prompt=strip_prompt,
                                       sampler=sampler)

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """Quantizes the sharded model to int8 in place. Every rank must call it.

        The result equals quantizing the unsharded model and then sharding it,
        bit for bit: each sharded layer quantizes its slice with the scales of
        the whole weight (a row cut gathers each output channel's maximum from
        its group), replicated layers quantize as Keras does. `plan` is updated
        with the new dtypes and bytes.

        Args:
            mode: "int8" (the mode tfshard shards).
            config: must be None (Keras's default int8 configuration).
            filters: must be None.

        Raises:
            ValueError: another mode, a config or filters, or a layer already
                quantized.
            NotImplementedError: under a tf.distribute strategy.
        """
        if filters is not None or kwargs:
            raise ValueError(f"{self.name}.quantize takes mode='int8' only; got filters="
                             f"{filters!r} {sorted(kwargs)}.")
        self._refuse_strategy("quantize")
        with self.world.comm.section(f"{self.name}.quantize"):
            # Before a row layer's gather of channel maxima: every rank quantizes alike.
            consistency.agree(self.world.comm, {"mode": consistency.digest(str(mode))},
                              f"{self.name}.quantize")
            with heap_frozen():  # Keras collects garbage for each variable it drops
                self.inner.quantize(mode, config=config)
            self._predict_step = None
            convert.reset_compiled_functions(self.inner)
            mine = self.plan.measure(self.inner)
            every = self.tp_comm.allgather_object(mine)
            self.plan = self.plan.with_bytes({p: (d, f, [ranks[p][2] for ranks in every])
                                              for p, (d, f, _) in mine.items()})
            self.replicas[0] = self.replicas[0]._replace(plan=self.plan)

    def save(self, filepath, gather=False, overwrite=True, **kwargs):
        """Saves the sharded model. Every rank must call it.

        Args:
            filepath: a folder for a sharded checkpoint (one HDF5 file per
                tensor-parallel rank + `tfshard.json`), or, with
                `gather=True`, a `.keras` file.
            gather: gather the slices and write an ordinary `.keras` file
                that plain `keras.saving.load_model` reads (world rank 0
                writes it).
            overwrite: replace an existing `filepath`.

        Returns:
            The absolute path written.

        Raises:
            ValueError: on every rank, when any rank fails to write (nothing
                is left at `filepath` then), or the model has no config.
        """
        if kwargs:
            raise TypeError(f"ShardedModel.save got unexpected arguments {sorted(kwargs)}.")
        from tfshard import io as tfio

        if self.group_models:  # the groups hold the same slices: group 0's are saved
            return self.group_models[0].save(filepath, gather=gather, overwrite=overwrite)
        with self.world.comm.section(f"{self.name}.save"):
            return tfio.save(self, filepath, gather=gather, overwrite=overwrite)

    def save_weights(self, filepath, overwrite=True, **kwargs):
        """Saves the weights: a sharded checkpoint folder, like `save`."""
        return self.save(filepath, gather=str(filepath).endswith(".keras"), overwrite=overwrite)

    def load_weights(self, filepath, **kwargs):
        """Loads full weights (`.weights.h5` / `.keras`) or a tfshard checkpoint
        into this sharded model, each rank reading only its slices.

        Raises:
            ValueError: on every rank, when any rank cannot read its part.
        """
        from tfshard import io as tfio

        with self.world.comm.section(f"{self.name}.load_weights"):
            tfio.load_into(self, filepath)
