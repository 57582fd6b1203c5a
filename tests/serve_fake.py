"""A fake engine for the HTTP front's tests: a deterministic toy model behind `api.Engine`.

The "model": token ids 0..94 are the printable ASCII characters (id = ord(c) - 32), id 95
is the end-of-sequence token; after token t comes (t * 31 + 7) % 96 (greedy), plus a
seeded offset in 0..2 when the temperature is above 0. A thread steps every running
request by one token per `delay` seconds (a toy continuous batch), honours stop
strings, cancels, a bounded queue, unavailability, injected errors, and `predict` for a
model of one input and output (y = 2x) or of two of each.
"""

import random
import threading
import time

import numpy as np

from tfshard.serve import api

VOCAB = 96
EOS = 95


def next_token(t, rng=None):
    """The toy model's next token after `t` (`rng`: a seeded `random.Random` to sample)."""
    offset = rng.randrange(3) if rng is not None else 0
    return (t * 31 + 7 + offset) % VOCAB


class CharTokenizer(api.Tokenizer):
    """Printable ASCII characters <-> ids 0..94; id 95 is the end of sequence (no text).

    Args:
        chat: whether it has a chat template.
    """
    vocab_size = VOCAB

    def __init__(self, chat=True):
        self.chat = chat

    def encode(self, text):
        bad = [c for c in text if not 32 <= ord(c) < 127]
        if bad:
            raise api.BadRequest(f"the characters {bad[:3]!r} are not in the vocabulary "
                                 "(printable ASCII only)", field="prompt")
        return [ord(c) - 32 for c in text]

    def decode(self, ids):
        return "".join(chr(i + 32) for i in ids if i != EOS)

    def apply_chat_template(self, messages):
        if not self.chat:
            raise api.BadRequest("this model has no chat template: use /v1/completions",
                                 field="messages")
        return "".join(f"<{m['role']}> {m['content']} " for m in messages) + "<assistant> "


def expected(prompt_ids, max_tokens, stop=(), seed=None, temperature=0.0):
    """What the fake engine generates for a prompt alone.

    Returns:
        `(text, finish_reason, completion_tokens)`.
    """
    rng = random.Random(seed) if temperature > 0 else None
    tok = CharTokenizer()
    t, text, n = prompt_ids[-1], "", 0
    while n < max_tokens:
        t = next_token(t, rng)
        n += 1
        if t == EOS:
            return text, "stop", n
        text += tok.decode([t])
        for s in stop:
            if s in text:
                return text[:text.index(s)], "stop", n
    return text, "length", n


class Running:
    """One request in the fake engine's batch."""

    def __init__(self, request):
        self.request = request
        self.rng = random.Random(request.params.seed) if request.params.temperature > 0 \
            else None
        self.last = request.prompt_ids[-1]
        self.text = ""      # generated so far
        self.sent = 0       # characters of it sent
        self.count = 0
        self.pending_ids = []


class FakeEngine(api.Engine):
    """A deterministic engine on a thread of its own.

    Args:
        delay: seconds per decode step.
        max_queue: requests running or waiting past which `submit` raises `QueueFull`.
        max_model_len, max_tokens_cap: the limits the front checks.
        chat: whether the tokenizer has a chat template.
        outputs: 1 (input "x" float32 [None, 4] -> output "y" = 2x) or 2 (inputs "a"
            float32 [None, 2] and "b" int32 [None] -> outputs "sum" = a.sum(1) + b
            (float32) and "twice" = 2b (int32)).
        generates: whether it generates text.
        name: the model's name.

    Attributes:
        available: False makes `submit` and `predict` raise `Unavailable`.
        reject: `(message, field)`: `submit` raises `BadRequest(message, field)`.
        fail_after: a prompt containing "FAIL" gets an "error" event after this many
            tokens.
        cancelled: ids of the requests cancelled.
        submitted: every request submitted.
        predicted: every `predict` input.
    """

    def __init__(self, delay=0.002, max_queue=64, max_model_len=64, max_tokens_cap=40,
                 chat=True, outputs=1, generates=True, name="toy"):
        self.model_name = name
        self.max_model_len = max_model_len
        self.max_tokens_cap = max_tokens_cap
        self.tokenizer = CharTokenizer(chat=chat)
        self.generates = generates
        self.delay = delay
        self.max_queue = max_queue
        self.outputs = outputs
        self.available = True
        self.reject = None
        self.healthy = (True, "")
        self.fail_after = 2
        self.cancelled = []
        self.submitted = []
        self.predicted = []
        self._lock = threading.Lock()
        self._running = {}
        self._cancel = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fake-engine", daemon=True)
        self._thread.start()

    # The api.Engine interface.

    def submit(self, request):
        if not self.available:
            raise api.Unavailable("the fake engine is loading")
        if self.reject is not None:
            raise api.BadRequest(*self.reject)
        if len(request.prompt_ids) + request.params.max_tokens > self.max_model_len:
            raise api.BadRequest("prompt plus max_tokens past the context", field="max_tokens")
        with self._lock:
            if len(self._running) >= self.max_queue:
                raise api.QueueFull(f"{len(self._running)} requests in the queue",
                                    retry_after=2)
            self.submitted.append(request)
            self._running[request.id] = Running(request)
        self._gauges()

    def cancel(self, request_id):
        with self._lock:
            self.cancelled.append(request_id)
            self._cancel.add(request_id)

    def predict(self, inputs):
        if not self.available:
            raise api.Unavailable("the fake engine is loading")
        self.predicted.append(inputs)
        if self.outputs == 1:
            x = inputs["x"] if isinstance(inputs, dict) else inputs
            return 2 * x
        a, b = inputs["a"], inputs["b"]
        if b.dtype != np.int32:
            raise api.BadRequest(f"b must be int32, got {b.dtype}", field="inputs")
        return {"sum": a.sum(axis=1) + b.astype(np.float32), "twice": 2 * b}

    def metadata(self):
        if self.outputs == 1:
            return {"inputs": {"x": {"dtype": "float32", "shape": [None, 4]}},
                    "outputs": {"y": {"dtype": "float32", "shape": [None, 4]}}}
        return {"inputs": {"a": {"dtype": "float32", "shape": [None, 2]},
                           "b": {"dtype": "int32", "shape": [None]}},
                "outputs": {"sum": {"dtype": "float32", "shape": [None]},
                            "twice": {"dtype": "int32", "shape": [None]}}}

    def health(self):
        return self.healthy

    # The toy scheduler.

    def running(self):
        """How many requests are running."""
        with self._lock:
            return len(self._running)

    def close(self):
        """Stops the engine's thread."""
        self._stop.set()
        self._thread.join(5)

    def _gauges(self):
        if self.metrics is not None:
            with self._lock:
                n = len(self._running)
            self.metrics.requests_running.set(n)
            self.metrics.kv_cache_slots_in_use.set(n)

    def _loop(self):
        while not self._stop.wait(self.delay):
            with self._lock:
                batch = list(self._running.values())
                cancelled, self._cancel = self._cancel, set()
            if self.metrics is not None and batch:
                self.metrics.batch_size.observe(len(batch))
            for run in batch:
                if run.request.id in cancelled:
                    self._finish(run, api.Event("done", finish_reason="cancelled",
                                                prompt_tokens=len(run.request.prompt_ids),
                                                completion_tokens=run.count))
                else:
                    self._step(run)
            self._gauges()

    def _finish(self, run, event):
        with self._lock:
            self._running.pop(run.request.id, None)
        run.request.on_event(event)

    def _step(self, run):
        req, params = run.request, run.request.params
        usage = {"prompt_tokens": len(req.prompt_ids)}
        prompt_text = self.tokenizer.decode(req.prompt_ids)
        if "FAIL" in prompt_text and run.count >= self.fail_after:
            self._finish(run, api.Event("error", error="injected failure", **usage,
                                        completion_tokens=run.count))
            return
        run.last = next_token(run.last, run.rng)
        run.count += 1
        run.pending_ids.append(run.last)
        if run.last == EOS:
            self._finish(run, api.Event("done", text=run.text[run.sent:],
                                        token_ids=tuple(run.pending_ids), finish_reason="stop",
                                        completion_tokens=run.count, **usage))
            return
        run.text += self.tokenizer.decode([run.last])
        for s in params.stop:
            if s in run.text:
                run.text = run.text[:run.text.index(s)]
                self._finish(run, api.Event("done", text=run.text[run.sent:],
                                            token_ids=tuple(run.pending_ids),
                                            finish_reason="stop", completion_tokens=run.count,
                                            **usage))
                return
        if run.count >= params.max_tokens:
            self._finish(run, api.Event("done", text=run.text[run.sent:],
                                        token_ids=tuple(run.pending_ids), finish_reason="length",
                                        completion_tokens=run.count, **usage))
            return
        # Hold back a tail that could start a stop string.
        hold = max((k for s in params.stop for k in range(1, len(s))
                    if run.text.endswith(s[:k])), default=0)
        visible = len(run.text) - hold
        if visible > run.sent:
            text, run.sent = run.text[run.sent:visible], visible
            ids, run.pending_ids = tuple(run.pending_ids), []
            req.on_event(api.Event("token", text=text, token_ids=ids))
