"""The engines behind `tfshard serve`: continuous batching over the decode step, or one by one.

Every rank runs `engine.run()` from its main thread. Rank 0 takes requests from the HTTP
front (`submit`, thread-safe), decides each step and broadcasts it (protocol.py); the
other ranks follow, each computing with its own K/V heads and weights. The logits come
out of the step's all-gather on every rank; rank 0 alone samples, streams and stops.

- `BatchingEngine`: the scheduler (scheduler.py) admits a request into a free KV-cache
  slot at the next step and frees a finished one at once; each step is
  `tfshard.decode.DecodeStep` over every running sequence's row plus a chunk of new
  prompts. A row's numbers do not depend on the rows beside it, so every request gets
  the tokens it would get alone.
- `SerialEngine` (serial.py): for models the decode step does not run (other families,
  pipeline stages, a tf.distribute strategy): one request at a time.

Both answer TF-Serving's `predict`: requests that arrive within `batch_window` seconds
of each other are joined into one `predict_on_batch` and split again.
"""

import collections
import concurrent.futures
import threading
import time

import numpy as np

from tfshard.serve import api, batches, protocol
from tfshard.serve.sampling import Sampler
from tfshard.serve.scheduler import Scheduler
from tfshard.serve.text import TextStream


class _SeqState:
    """What rank 0 keeps with a running sequence: its sampler and its text."""

    def __init__(self, request, decode, seed):
        self.sampler = Sampler(request.params, seed)
        self.text = TextStream(decode, request.params.stop)


class BaseEngine(api.Engine):
    """What both engines share: state, health, the predict queue, the command loop.

    Args:
        sharded: the `ShardedModel` (every rank's own).
        name: the model's name for clients.
        tokenizer: an `api.Tokenizer` or None.
        max_waiting: most requests queued (429 past it).
        batch_window: seconds a predict waits for others to join its batch.
        heartbeat: most seconds rank 0 stays silent when idle.
        metrics: the front's `Metrics` (set by the app), or None.
    """

    def __init__(self, sharded, name, tokenizer=None, max_waiting=64, batch_window=0.005,
                 heartbeat=1.0, metrics=None):
        self.sharded = sharded
        self.comm = sharded.world.comm  # rank 0 of the world leads; the channel is the world's
        if sharded.groups != 1:
            raise ValueError(
                f"tfshard serve: {sharded.groups} data-parallel groups; a server runs one "
                f"tensor-parallel group. Use tensor_parallel={sharded.world.size} "
                "(--tensor-parallel N, N the number of ranks), or start one server per group.")
        self.lead = self.comm.rank == 0
        self.model_name = name
        self.tokenizer = tokenizer
        self.max_waiting = int(max_waiting)
        self.batch_window = float(batch_window)
        self.heartbeat = float(heartbeat)
        self.metrics = metrics
        self.channel = protocol.Channel(self.comm)
        self._lock = threading.Condition()
        self._incoming = collections.deque()
        self._cancels = set()
        self._predicts = collections.deque()
        self._state, self._reason = "loading", "the engine has not started"
        self._seed = np.random.default_rng()
        self._counted = self._collective_seconds()

    # The front's side (rank 0, any thread).

    def health(self):
        with self._lock:
            return self._state == "running", self._reason

    def _check_open(self):
        if self._state != "running":
            raise api.Unavailable(self._reason)

    def cancel(self, request_id):
        with self._lock:
            self._cancels.add(request_id)
            self._lock.notify()

    def predict(self, inputs):
        future = concurrent.futures.Future()
        with self._lock:
            self._check_open()
            if len(self._predicts) >= self.max_waiting:
                raise api.QueueFull(f"{len(self._predicts)} predict requests are waiting", 1)
            self._predicts.append((inputs, future))
            self._lock.notify()
        return future.result()

    def metadata(self):
        from tfshard import inputs as inputs_lib

        model = self.sharded.inner
        specs = inputs_lib.model_input_specs(model) or []
        ins = {name: {"dtype": str(dtype), "shape": [None if d is None else int(d) for d in shape]}
               for name, shape, dtype in specs}
        outs = {}
        for i, t in enumerate(getattr(model, "outputs", None) or []):
            name = getattr(t, "name", None) or f"output_{i}"
            outs[name.split("/")[0].split(":")[0]] = {
                "dtype": str(t.dtype), "shape": [None if d is None else int(d) for d in t.shape]}
        return {"inputs": ins, "outputs": outs}

    def drain(self):
        """Takes no new requests; `run` returns once the accepted ones are done."""
        with self._lock:
            if self._state == "running":
                self._state, self._reason = "draining", "the server is shutting down"
            self._lock.notify()

    def _down(self, reason):
        with self._lock:
            self._state, self._reason = "down", reason

    # The loop (every rank, main thread).

    def run(self):
        """Serves until drained (rank 0) or told to stop (others).

        Raises:
            Whatever a step raises (a lost rank: the collective's error naming it); rank 0
            first ends every request with an "error" event and turns /health to 503.
        """
        with self._lock:
            self._state, self._reason = "running", ""
        try:
            if self.lead:
                self._lead()
            else:
                self._follow()
        except BaseException as e:
            reason = f"{type(e).__name__}: {e}"
            self._down(f"a rank failed: {reason}")
            self._fail_all(reason)
            raise
        finally:
            with self._lock:
                if self._state != "down":
                    self._state, self._reason = "down", "the server has stopped"

    def _follow(self):
        while True:
            kind, a, b, ints, payload = self.channel.receive(protocol.ints_length)
            if kind == protocol.STOP:
                return
            if kind == protocol.PREDICT:
                self._run_predict(payload)
            elif kind != protocol.IDLE:
                self._follow_command(kind, a, b, ints, payload)

    def _follow_command(self, kind, a, b, ints, payload):
        raise ValueError(f"tfshard serve: rank {self.comm.rank} got an unknown command {kind}")

    def _wait(self):
        """Rank 0 with nothing to run: waits for work, sending IDLE every heartbeat."""
        with self._lock:
            if not (self._incoming or self._cancels or self._predicts
                    or self._state != "running"):
                self._lock.wait(self.heartbeat)
            idle = not (self._incoming or self._cancels or self._predicts
                        or self._state != "running")
        if idle:
            self.channel.send(protocol.IDLE)

    def _take_predicts(self):
        """Rank 0: the predict requests to run now (those that came within the window)."""
        with self._lock:
            if not self._predicts:
                return []
        time.sleep(self.batch_window)
        with self._lock:
            batch = list(self._predicts)
            self._predicts.clear()
        return batch

    def _serve_predicts(self):
        batch = self._take_predicts()
        if not batch:
            return
        groups = collections.OrderedDict()
        for inputs, future in batch:  # only inputs of one kind share a batch
            key = batches.signature(inputs)
            groups.setdefault(key, []).append((inputs, future))
        for items in groups.values():
            joined = batches.join([x for x, _ in items])
            if self.metrics is not None:
                self.metrics.predict_batch_rows.observe(batches.rows(joined))
            payload = batches.dump(joined)
            self.channel.send(protocol.PREDICT, payload=payload)
            try:
                out = self._run_predict(payload)
            except api.BadRequest as e:
                for _, future in items:
                    future.set_exception(e)
                continue
            start = 0
            for inputs, future in items:
                n = batches.rows(inputs)
                future.set_result(batches.take(out, start, start + n))
                start += n

    def _run_predict(self, payload):
        """Every rank: one predict batch (the ranks agree on it before any collective)."""
        x = batches.load(payload)
        try:
            return self.sharded.predict_on_batch(x)
        except ValueError as e:
            raise api.BadRequest(str(e), field="inputs") from None

    def _fail_all(self, reason):
        """Rank 0: every request still open gets an "error" event."""

    def _collective_seconds(self):
        """Time this process has spent in collectives: the backend's count where it keeps
        one (MPI), else the command channel's broadcasts alone."""
        seconds = self.comm.collective_seconds()
        return self.channel.seconds if seconds is None else seconds

    def _count_collectives(self):
        """Rank 0: the collective time since the last call, into the metric."""
        if self.metrics is not None:
            now = self._collective_seconds()
            self.metrics.collective_seconds.inc(max(0.0, now - self._counted))
            self._counted = now

    def _stop_followers(self):
        self.channel.send(protocol.STOP)


class BatchingEngine(BaseEngine):
    """Continuous batching over `tfshard.decode.DecodeStep` (see the module docstring).

    Args:
        sharded: the `ShardedModel` (a keras-hub CausalLM the decode step runs).
        name: the model's name for clients.
        tokenizer: an `api.Tokenizer` (`PreprocessorTokenizer`).
        slots: KV-cache slots: most requests generating at once.
        max_len: most positions per request (prompt + generated); the cache holds
            `slots * max_len` positions of this rank's K/V heads.
        max_tokens_cap: the most `max_tokens` a request may ask for.
        prefill_tokens: most prompt rows per step (chunked prefill).
        **kwargs: see `BaseEngine`.

    Raises:
        tfshard.decode.Unsupported: the decode step cannot run this model.
    """

    generates = True

    def __init__(self, sharded, name, tokenizer, slots=8, max_len=1024, max_tokens_cap=None,
                 prefill_tokens=256, **kwargs):
        import tensorflow as tf

        from tfshard.decode import DecodeStep, Unsupported

        super().__init__(sharded, name, tokenizer, **kwargs)
        why = sharded.decode_step_refusal()
        if why is not None:
            raise Unsupported(why)
        self.step = DecodeStep(sharded.inner, sharded.tp_comm)
        self.slots, self.max_model_len = int(slots), int(max_len)
        self.max_tokens_cap = int(max_tokens_cap or max_len)
        self.stop_ids = set(getattr(tokenizer, "stop_ids", ()) or ())
        self.cache = self.step.new_cache(self.slots, self.max_model_len)
        self.scheduler = Scheduler(self.slots, self.max_waiting, prefill_tokens)
        spec = tf.TensorSpec([None], tf.int32)
        cache, rope = self.cache.handle, self.cache.rope.handle
        self._step = tf.function(
            lambda tokens, slots, positions, rows: self.step.logits(
                cache, rope, tokens, slots, positions, rows),
            input_signature=[spec] * 4, jit_compile=False)
        self._open = {}  # request id -> Sequence or request (rank 0)

    # The front's side.

    def submit(self, request):
        prompt = list(request.prompt_ids)
        if not prompt:
            raise api.BadRequest("the prompt is empty; give at least one token", field="prompt")
        p = request.params
        if len(prompt) + p.max_tokens > self.max_model_len:
            raise api.BadRequest(
                f"the prompt's {len(prompt)} tokens plus max_tokens={p.max_tokens} exceed this "
                f"server's context of {self.max_model_len} positions (--max-len); ask for at "
                f"most {max(0, self.max_model_len - len(prompt))} tokens or shorten the prompt",
                field="max_tokens" if len(prompt) < self.max_model_len else "prompt")
        with self._lock:
            self._check_open()
            # Requests not yet in a slot, against the free slots plus the queue's room.
            unplaced = len(self._incoming) + len(self.scheduler.waiting)
            free = self.slots - self.scheduler.in_use()
            if unplaced >= free + self.max_waiting:
                raise api.QueueFull(
                    f"all {self.slots} slots are busy and {self.max_waiting} requests are "
                    "already waiting (--slots, --max-waiting).", retry_after=1)
            self._incoming.append(request)
            self._lock.notify()

    # Rank 0's loop.

    def _lead(self):
        while True:
            self._admit()
            if self._state != "running" and not self.scheduler.busy() and not self._predicts:
                break
            self._serve_predicts()
            plan = self.scheduler.plan()
            self._record_slots()
            if plan.empty:
                self._wait()
                continue
            self.channel.send(protocol.STEP, len(plan.tokens), len(plan.rows),
                              protocol.step_ints(plan.tokens, plan.slots, plan.positions,
                                                 plan.rows))
            logits = self._run_step(plan.tokens, plan.slots, plan.positions, plan.rows)
            self._count_collectives()
            self._sample(plan, logits)
        self._stop_followers()  # drained: every rank returns (after a failure, none can)

    def _run_step(self, tokens, slots, positions, rows):
        import tensorflow as tf

        out = self._step(tf.constant(tokens), tf.constant(slots), tf.constant(positions),
                         tf.constant(rows))
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(tokens))
        return None if out is None else out.numpy()

    def _follow_command(self, kind, a, b, ints, payload):
        if kind != protocol.STEP:
            super()._follow_command(kind, a, b, ints, payload)
        self._run_step(*protocol.step_arrays(ints, a, b))

    def _admit(self):
        """Rank 0: new requests into the scheduler's queue; cancelled ones out."""
        with self._lock:
            incoming, self._incoming = list(self._incoming), collections.deque()
            cancels, self._cancels = set(self._cancels), set()
        decode = self.tokenizer.decode if self.tokenizer is not None else (lambda ids: "")
        for request in incoming:
            request.engine_state = _SeqState(request, decode, int(self._seed.integers(2**63)))
            self._open[request.id] = request
            self.scheduler.add(request, request.prompt_ids)
        for request_id in cancels:
            request = self.scheduler.drop_waiting(request_id)
            if request is not None:
                self._end(request, "cancelled", 0)
                continue
            for seq in list(self.scheduler.running.values()):
                if seq.request.id == request_id:
                    self._end(seq.request, "cancelled", seq.generated, seq)

    def _sample(self, plan, logits):
        """Rank 0: each logit row's next token; events; finished requests out."""
        for i, seq in enumerate(plan.owners):
            if self.scheduler.running.get(seq.slot) is not seq:
                continue  # cancelled during the step
            request = seq.request
            state = request.engine_state
            token = state.sampler(logits[i])
            self.scheduler.stepped(seq, token)
            generated = seq.tokens[seq.prompt_len:]
            reason = None
            if token in self.stop_ids:
                reason = "stop"
                text_ids = generated[:-1]
            else:
                text_ids = generated
            delta, stopped = state.text.push(text_ids)
            if stopped:
                reason = "stop"
            elif reason is None and (seq.generated >= request.params.max_tokens
                                     or len(seq.tokens) >= self.max_model_len):
                reason = "length"
            if reason is not None and not stopped:
                delta += state.text.finish(text_ids)
            request.on_event(api.Event("token", text=delta, token_ids=(token,)))
            if reason is not None:
                self._end(request, reason, seq.generated, seq)

    def _end(self, request, reason, generated, seq=None):
        if seq is not None:
            self.scheduler.finish(seq)
        self._open.pop(request.id, None)
        request.on_event(api.Event("done", finish_reason=reason,
                                   prompt_tokens=len(request.prompt_ids),
                                   completion_tokens=generated))

    def _record_slots(self):
        m = self.metrics
        if m is not None:
            m.requests_queued.set(len(self.scheduler.waiting) + len(self._incoming))
            m.requests_running.set(self.scheduler.in_use())
            m.kv_cache_slots_in_use.set(self.scheduler.in_use())
            m.kv_cache_slots.set(self.slots)

    def _fail_all(self, reason):
        if not self.lead:
            return
        for request in list(self._open.values()):
            request.on_event(api.Event("error", error=f"the server failed: {reason}"))
        self._open.clear()
        with self._lock:
            for request in self._incoming:
                request.on_event(api.Event("error", error=f"the server failed: {reason}"))
            self._incoming.clear()
            for _, future in self._predicts:
                future.set_exception(api.Unavailable(f"the server failed: {reason}"))
            self._predicts.clear()
