"""OpenAI's API: /v1/completions and /v1/chat/completions (streamed as SSE), /v1/models."""

import json
import time
import uuid

import fastapi
from fastapi.responses import JSONResponse, StreamingResponse

from tfshard.serve import api
from tfshard.serve import errors
from tfshard.serve import front as front_lib
from tfshard.serve import schemas

MAX_STOPS = 16
ROLES = ("system", "developer", "user", "assistant")
KEEPALIVE_SECONDS = 15.0
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def router(front):
    """The OpenAI-compatible routes over one `front.Front`.

    Args:
        front: the app's `front.Front`.

    Returns:
        A `fastapi.APIRouter` with `GET /v1/models`, `POST /v1/completions` and
        `POST /v1/chat/completions`.
    """
    routes = fastapi.APIRouter()

    @routes.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(front.engine)]}

    @routes.post("/v1/completions")
    async def completions(body: schemas.CompletionRequest, request: fastapi.Request):
        check_common(front, body)
        unsupported(body.echo, "echo", "the prompt is not echoed; drop `echo` or set it to "
                    "false")
        unsupported(body.logprobs, "logprobs", "log probabilities are not returned; drop "
                    "`logprobs`")
        unsupported(body.suffix, "suffix", "suffixes are not supported; drop `suffix`")
        if body.best_of not in (None, 1):
            raise errors.ApiError(400, f"best_of: {body.best_of} is not supported; this "
                                       "server makes one completion per request (best_of=1)",
                                  param="best_of", code="unsupported")
        prompt_ids = completion_prompt(body.prompt, front.engine.tokenizer)
        params = sampling_params(front.engine, body, prompt_ids, default_max=16,
                                 prompt_field="prompt")
        return await answer(front, request, "cmpl", "text_completion", body, prompt_ids,
                            params)

    @routes.post("/v1/chat/completions")
    async def chat_completions(body: schemas.ChatCompletionRequest, request: fastapi.Request):
        check_common(front, body)
        unsupported(body.logprobs, "logprobs", "log probabilities are not returned; drop "
                    "`logprobs`")
        unsupported(body.tools, "tools", "tool calls are not supported; drop `tools`")
        prompt_ids = chat_prompt(body.messages, front.engine.tokenizer)
        field = "max_completion_tokens" if body.max_completion_tokens is not None else \
            "max_tokens"
        params = sampling_params(front.engine, body, prompt_ids, default_max=None,
                                 prompt_field="messages", max_field=field,
                                 max_tokens=body.max_completion_tokens or body.max_tokens)
        return await answer(front, request, "chatcmpl", "chat.completion", body, prompt_ids,
                            params)

    return routes


def model_card(engine):
    """OpenAI's model object for the served model.

    Args:
        engine: the `api.Engine`.

    Returns:
        `{"id", "object": "model", "created", "owned_by", "max_model_len"}`.
    """
    return {"id": engine.model_name, "object": "model", "created": int(time.time()),
            "owned_by": "tfshard", "max_model_len": engine.max_model_len}


def unsupported(value, field, instead):
    """Raises a 400 naming `field` unless `value` is its neutral value (None, False, 0,
    empty)."""
    if value not in (None, False, 0, "", [], {}):
        raise errors.ApiError(400, f"{field}: not supported by this server: {instead}.",
                              param=field, code="unsupported")


def check_common(front, body):
    """The checks every generation request passes before its prompt is read.

    Raises:
        errors.ApiError: unknown model (404), draining (503), a model that does not
            generate text (400), `n` other than 1 or penalties (400).
    """
    front.check_model(body.model)
    front.check_serving()
    engine = front.engine
    if not engine.generates:
        raise errors.ApiError(
            400, f"The model `{engine.model_name}` does not generate text: send its inputs "
                 f"to POST /v1/models/{engine.model_name}:predict instead.",
            param="model", code="model_not_generative")
    if body.n not in (None, 1):
        raise errors.ApiError(400, f"n: {body.n} choices asked; this server makes one choice "
                                   "per request: send n=1 (or leave it out) and send several "
                                   "requests for several choices", param="n",
                              code="unsupported")
    for field in ("presence_penalty", "frequency_penalty"):
        if getattr(body, field) not in (None, 0):
            raise errors.ApiError(400, f"{field}: penalties are not supported; send 0 or "
                                       "leave it out", param=field, code="unsupported")
    if body.logit_bias:
        raise errors.ApiError(400, "logit_bias: not supported; send {} or leave it out",
                              param="logit_bias", code="unsupported")


def completion_prompt(prompt, tokenizer):
    """The token ids of a completion request's `prompt`.

    Args:
        prompt: a string, a list of one string, a list of token ids, or a list of one
            list of token ids.
        tokenizer: the engine's `api.Tokenizer`, or None.

    Returns:
        A non-empty list of token ids.

    Raises:
        errors.ApiError: 400 naming "prompt" (and the element at fault) and what would
            work.
    """
    def bad(message):
        return errors.ApiError(400, f"prompt: {message}", param="prompt")

    if prompt is None:
        raise bad("a required field is missing: send a string or a list of token ids")
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise bad(f"a list of {len(prompt)} strings is a batch of prompts; this server "
                      "takes one prompt per request: send one string")
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        if len(prompt) != 1:
            raise bad(f"a list of {len(prompt)} token lists is a batch of prompts; this "
                      "server takes one prompt per request: send one list of token ids")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return encode(tokenizer, prompt, "prompt")
    if not isinstance(prompt, list):
        raise bad(f"expected a string or a list of token ids, got {type(prompt).__name__}")
    return token_ids(prompt, tokenizer, "prompt")


def token_ids(ids, tokenizer, field):
    """Checks a list of token ids: integers (not booleans or floats), >= 0, below the
    tokenizer's `vocab_size` when it has one.

    Raises:
        errors.ApiError: 400 naming `field[i]`.
    """
    if not ids:
        raise errors.ApiError(400, f"{field}: empty; send at least one token id", param=field)
    vocab = getattr(tokenizer, "vocab_size", None)
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int):
            raise errors.ApiError(400, f"{field}[{i}]: token ids are integers, got {t!r}; send "
                                       "a string or a list of integers", param=field)
        if t < 0 or (isinstance(vocab, int) and vocab > 0 and t >= vocab):
            top = f" below {vocab}" if isinstance(vocab, int) and vocab > 0 else ""
            raise errors.ApiError(400, f"{field}[{i}]: token id {t} is out of range; ids are "
                                       f">= 0{top}", param=field)
    return list(ids)


def encode(tokenizer, text, field):
    """The token ids of `text`.

    Raises:
        errors.ApiError: 400 when the model has no tokenizer or the text gives no token.
    """
    if tokenizer is None:
        raise errors.ApiError(400, f"{field}: this model has no tokenizer: send a list of token "
                                   "ids instead of text", param=field)
    try:
        ids = list(tokenizer.encode(text))
    except api.BadRequest as exc:
        raise errors.ApiError(400, f"{field}: {exc}", param=field) from None
    if not ids:
        raise errors.ApiError(400, f"{field}: the text gives no token; send a non-empty "
                                   "prompt", param=field)
    return ids


def chat_prompt(messages, tokenizer):
    """The token ids of a chat request's `messages`, by the model's chat template.

    Raises:
        errors.ApiError: 400 naming "messages" (and the message at fault).
    """
    if tokenizer is None:
        raise errors.ApiError(400, "messages: this model has no tokenizer, so no chat "
                                   "template: use POST /v1/completions with token ids",
                              param="messages")
    plain = []
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise errors.ApiError(400, f"messages[{i}].role: {message.role!r} is not supported; "
                                       f"use one of {', '.join(ROLES)}", param="messages")
        plain.append({"role": message.role, "content": message.text()})
    try:
        text = tokenizer.apply_chat_template(plain)
    except api.BadRequest as exc:
        raise errors.ApiError(400, f"messages: {exc}", param=exc.field or "messages") from None
    return encode(tokenizer, text, "messages")


def sampling_params(engine, body, prompt_ids, default_max, prompt_field,
                    max_field="max_tokens", max_tokens=None):
    """The `api.SamplingParams` of a request, checked against the engine's limits.

    Args:
        engine: the `api.Engine`.
        body: the request (`schemas.Sampling`).
        prompt_ids: the prompt's token ids.
        default_max: `max_tokens` when the request gives none (None: what the context
            leaves, up to `engine.max_tokens_cap`).
        prompt_field: the field that carried the prompt ("prompt" or "messages").
        max_field: the field that carried `max_tokens`.
        max_tokens: the requested count (default: `body.max_tokens`).

    Returns:
        An `api.SamplingParams`.

    Raises:
        errors.ApiError: 400 naming the field: a prompt that fills the context,
            `max_tokens` above the cap or past the context, bad stop strings.
    """
    context, cap = engine.max_model_len, engine.max_tokens_cap
    n = len(prompt_ids)
    room = context - n if context else None
    if room is not None and room < 1:
        raise errors.ApiError(
            400, f"{prompt_field}: the prompt has {n} tokens and this model's context holds "
                 f"{context} positions, so no token can be generated: send at most "
                 f"{context - 1} prompt tokens", param=prompt_field, code="context_length_exceeded")
    asked = body.max_tokens if max_tokens is None else max_tokens
    if asked is None:
        limits = [v for v in (default_max, cap or None, room) if v]
        asked = min(limits) if limits else 16
    else:
        if cap and asked > cap:
            raise errors.ApiError(400, f"{max_field}: {asked} is above this server's cap of {cap} "
                                       f"tokens per request: ask for at most {cap}",
                                  param=max_field, code="max_tokens_exceeded")
        if room is not None and asked > room:
            raise errors.ApiError(
                400, f"{max_field}: the prompt has {n} tokens and {max_field} asks for {asked} "
                     f"more, past this model's context of {context} positions: ask for at "
                     f"most {room} (or shorten the {prompt_field})", param=max_field,
                code="context_length_exceeded")
    stop = body.stop
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stop) > MAX_STOPS or any(not s for s in stop):
        raise errors.ApiError(400, f"stop: send a string or a list of at most {MAX_STOPS} "
                                   "non-empty strings", param="stop")
    top_k = body.top_k if body.top_k is not None else 0
    return api.SamplingParams(
        max_tokens=asked,
        temperature=float(body.temperature) if body.temperature is not None else 1.0,
        top_p=float(body.top_p) if body.top_p is not None else 1.0,
        top_k=max(0, top_k), seed=body.seed, stop=stop)


async def answer(front, request, prefix, kind, body, prompt_ids, params):
    """Submits the request and answers it: one JSON response, or a stream of events.

    Args:
        front: the `front.Front`.
        request: the `fastapi.Request` (for disconnects).
        prefix: the id's prefix ("cmpl" or "chatcmpl").
        kind: "text_completion" or "chat.completion".
        body: the request body.
        prompt_ids, params: what to submit.

    Returns:
        A `JSONResponse` or a `StreamingResponse` of server-sent events.

    Raises:
        errors.ApiError: the engine refused the request, or (not streaming) it failed.
    """
    request_id = f"{prefix}-{uuid.uuid4().hex}"
    shape = Shape(request_id, kind, front.model_name)
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = front.stream(request_id, prompt_ids, params)
        return EventSourceResponse(sse(stream, shape, usage), on_close=stream.close,
                                   media_type="text/event-stream", headers=SSE_HEADERS)
    stream = front.stream(request_id, prompt_ids, params, disconnected=request.is_disconnected)
    text, reason, error = [], None, None
    try:
        async for event in stream.events():
            text.append(event.text)
            if event.kind == "error":
                error = event.error or "the engine failed"
            reason = event.finish_reason
    except front_lib.ClientGone:
        return JSONResponse(errors.error_body("the client disconnected"), status_code=499)
    finally:
        stream.close()
    if stream.aborted:
        raise errors.ApiError(503, f"The request was ended: {stream.aborted}", code="unavailable")
    if error is not None:
        raise errors.ApiError(500, f"The generation failed: {error}", code="engine_error")
    return shape.whole("".join(text), reason, stream.usage)


class EventSourceResponse(StreamingResponse):
    """A `StreamingResponse` that calls `on_close` however it ends: also when the client
    left before the first chunk, when the body's generator never ran (and so never
    reached its own `finally`).

    Args:
        content: the async iterator of the body's text.
        on_close: called once the response ended (e.g. `EventStream.close`).
        **kwargs: `StreamingResponse`'s.
    """

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class Shape:
    """OpenAI's response and chunk objects for one request.

    Args:
        request_id: the response's `id`.
        kind: "text_completion" or "chat.completion".
        model: the model's name.
    """

    def __init__(self, request_id, kind, model):
        self.id = request_id
        self.kind = kind
        self.model = model
        self.created = int(time.time())
        self.chat = kind == "chat.completion"

    def usage(self, usage):
        """`{"prompt_tokens", "completion_tokens", "total_tokens"}` of `(prompt, completion)`."""
        return {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                "total_tokens": usage[0] + usage[1]}

    def whole(self, text, finish_reason, usage):
        """The non-streamed response."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.model,
                "choices": [choice], "usage": self.usage(usage)}

    def chunk(self, text=None, finish_reason=None, role=False, with_usage=False):
        """One streamed chunk: new text, or the last one with its finish reason."""
        if self.chat:
            delta = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None,
                      "finish_reason": finish_reason}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None,
                      "finish_reason": finish_reason}
            kind = "text_completion"
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model,
               "choices": [choice]}
        if with_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, usage):
        """The last chunk of `stream_options.include_usage`: no choices, the usage."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": [], "usage": self.usage(usage)}


def data(obj):
    """One server-sent event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def sse(stream, shape, include_usage):
    """The server-sent events of a streamed request.

    Chunks as OpenAI sends them: for chat, a first chunk with `delta.role`, then
    `delta.content` chunks; a last chunk with the finish reason; with `include_usage`,
    every chunk has `"usage": null` and a chunk with the usage and no choices follows;
    then `data: [DONE]`. An engine error ends the stream with one event
    `data: {"error": {...}}` (OpenAI's error object; the `openai` client raises
    `APIError`) and no `[DONE]`: `[DONE]` marks only a complete answer. A comment line
    every `KEEPALIVE_SECONDS` without tokens keeps proxies (and disconnect checks) alive.

    Args:
        stream: the submitted `front.EventStream`.
        shape: the request's `Shape`.
        include_usage: `stream_options.include_usage`.

    Yields:
        The events' text.
    """
    try:
        if shape.chat:
            yield data(shape.chunk(text="", role=True, with_usage=include_usage))
        while not stream.finished:
            event = await stream.next_event(wait=KEEPALIVE_SECONDS)
            if event is None:
                yield ": keep-alive\n\n"
                continue
            if event.text:
                yield data(shape.chunk(text=event.text, with_usage=include_usage))
            if event.kind == "error":
                message = f"The generation failed: {event.error or 'the engine failed'}"
                code = "unavailable" if stream.aborted else "engine_error"
                yield data(errors.error_body(message, "server_error", None, code))
                return
            if event.kind == "done":
                yield data(shape.chunk(finish_reason=event.finish_reason,
                                       with_usage=include_usage))
                if include_usage:
                    yield data(shape.usage_chunk(stream.usage))
                yield "data: [DONE]\n\n"
    finally:
        stream.close()  # the client went away (the generator was closed) or it ended
