"""What the HTTP front asks of an engine: requests, the events they stream, the engine's state.

The front (tfshard/serve/http.py) runs on rank 0 in a thread of its own with its own
asyncio loop; an engine (tfshard/serve/engine.py: continuous batching over the decode
step; or one request at a time through `generate`) runs the model on every rank from
the main thread. They meet here: `Engine.submit` is called from the front's thread and
returns at once; the engine calls the request's `on_event` from its own thread as
tokens are made, ending with exactly one "done" or "error" event.
"""

import dataclasses
import time
from typing import Callable, Optional


class QueueFull(Exception):
    """The engine's queue is full: answer 429 with `Retry-After: retry_after` seconds."""

    def __init__(self, message, retry_after=1):
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(Exception):
    """The engine takes no new work (loading, draining, or a rank was lost): answer 503
    with the message as the reason."""


class BadRequest(Exception):
    """A request the engine cannot run as asked: answer 400 naming `field`.

    Attributes:
        field: the request field at fault (e.g. "max_tokens", "prompt").
    """

    def __init__(self, message, field=None):
        super().__init__(message)
        self.field = field


@dataclasses.dataclass
class SamplingParams:
    """How one request's tokens are chosen and when it stops.

    Attributes:
        max_tokens: most tokens to generate.
        temperature: 0 for greedy (argmax; the same tokens as `generate(sampler="greedy")`),
            else the softmax temperature.
        top_p: nucleus sampling's mass (1: off).
        top_k: keep the k likeliest tokens (0: off).
        seed: the request's own random seed (None: drawn by the engine); the same seed,
            prompt and parameters give the same tokens.
        stop: strings that end the text (not included in it).
    """
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: tuple = ()


@dataclasses.dataclass
class Event:
    """One step of a request's output.

    Attributes:
        kind: "token" (one generated token, and the text it settles, maybe ""), "done"
            (the last event: `finish_reason` and usage set) or
            "error" (the last event: `error` says what happened; the request is over).
        text: the text added since the previous event (may be "" while a multi-byte
            character or a possible stop string is held back).
        token_ids: the token ids added since the previous event.
        finish_reason: "stop" (a stop token or string), "length" (max_tokens or the
            context), "cancelled"; None on "token" events.
        prompt_tokens, completion_tokens: usage counts.
        error: the error message of an "error" event.
    """
    kind: str
    text: str = ""
    token_ids: tuple = ()
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Optional[str] = None


@dataclasses.dataclass
class Request:
    """One generation request as the engine receives it.

    Attributes:
        id: unique, e.g. "cmpl-...".
        prompt_ids: the prompt's token ids (the front tokenizes with `Engine.tokenizer`).
        params: its `SamplingParams`.
        on_event: called from the engine's thread with each `Event`.
        created: when it arrived (time.time()).
    """
    id: str
    prompt_ids: list
    params: SamplingParams
    on_event: Callable[[Event], None]
    created: float = dataclasses.field(default_factory=time.time)


class Tokenizer:
    """Text <-> token ids for the front (an engine provides one when its model has one)."""

    def encode(self, text):
        """Token ids of `text` (no special tokens added)."""
        raise NotImplementedError

    def decode(self, ids):
        """The text of token ids."""
        raise NotImplementedError

    def apply_chat_template(self, messages):
        """The prompt text for chat `messages` ([{"role", "content"}]), by the model's chat
        template; raises `BadRequest` when the model has none."""
        raise NotImplementedError


class Engine:
    """The interface the front uses; implementations: tfshard/serve/engine.py.

    Attributes:
        model_name: the name clients use (`--name`, else the source's file name).
        max_model_len: the most positions a request may use (prompt + generated).
        max_tokens_cap: the most `max_tokens` a request may ask for.
        tokenizer: a `Tokenizer`, or None for a model without one (then only `:predict`).
        generates: whether the model generates text (a CausalLM); else only `:predict`.
        metrics: the server's `tfshard.serve.metrics.Metrics`, set by the front
            (`http.create_app`) before it serves; None until then. An engine records its
            side (requests queued and running, batch size per step, KV-cache slots,
            time in collectives, `:predict` batch rows) only when it is set.
    """
    model_name = "model"
    max_model_len = 0
    max_tokens_cap = 0
    tokenizer = None
    generates = False
    metrics = None

    def submit(self, request):
        """Queues a generation request; returns at once (thread-safe).

        Raises:
            QueueFull: too many requests waiting.
            Unavailable: loading, draining or down.
            BadRequest: the prompt plus max_tokens does not fit the context, or an
                empty prompt.
        """
        raise NotImplementedError

    def cancel(self, request_id):
        """Ends a request (its client went away): its slot is freed at the next step and
        its last event is "done" with finish_reason "cancelled" (thread-safe)."""
        raise NotImplementedError

    def predict(self, inputs):
        """TF-Serving's predict: the model's output for a batch (thread-safe, blocking).
        Requests that arrive together are run as one batch.

        Args:
            inputs: a dict of name -> numpy array (columnar, batch first) or one array.

        Returns:
            The model's output: an array or a dict of arrays, batch first.

        Raises:
            BadRequest: inputs of the wrong names, dtypes or shapes (the message names
                the input and what would work). QueueFull, Unavailable: as `submit`.
        """
        raise NotImplementedError

    def metadata(self):
        """TF-Serving's metadata: `{"inputs": {name: {"dtype", "shape"}}, "outputs": {...}}`
        (None for an unknown dimension)."""
        raise NotImplementedError

    def health(self):
        """`(ok, reason)`: ok once every rank has loaded its shards and while they all
        run; the reason says why not."""
        raise NotImplementedError
