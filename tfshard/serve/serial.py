"""`SerialEngine`: one request at a time through `ShardedModel.generate`, for any CausalLM.

For models tfshard's decode step does not run (other families, pipeline stages, a
tf.distribute strategy): rank 0 sends each request's prompt and sampling parameters to
every rank, every rank generates, rank 0 sends the text when it is done.
"""

import numpy as np

from tfshard.serve import api, batches, protocol
from tfshard.serve.engine import BaseEngine
from tfshard.serve.text import TextStream


class SerialEngine(BaseEngine):
    """One request at a time through `ShardedModel.generate` (any CausalLM; see the
    module docstring). Rank 0 sends each request's prompt and sampling parameters; every
    rank generates; rank 0 sends the text when done.

    Args:
        max_len: most positions per request.
        max_tokens_cap: the most `max_tokens` a request may ask for.
        **kwargs: see `BaseEngine`.
    """

    def __init__(self, sharded, name, tokenizer=None, max_len=1024, max_tokens_cap=None,
                 **kwargs):
        super().__init__(sharded, name, tokenizer, **kwargs)
        model = sharded.inner
        self.generates = hasattr(model, "generate_step") and tokenizer is not None
        self.max_model_len = int(max_len)
        self.max_tokens_cap = int(max_tokens_cap or max_len)
        self.stop_ids = tuple(getattr(tokenizer, "stop_ids", ()) or ())
        self._current = None

    def submit(self, request):
        if not self.generates:
            raise api.BadRequest(f"{self.model_name} does not generate text; use "
                                 f"/v1/models/{self.model_name}:predict", field="model")
        if not request.prompt_ids:
            raise api.BadRequest("the prompt is empty; give at least one token", field="prompt")
        if len(request.prompt_ids) + request.params.max_tokens > self.max_model_len:
            raise api.BadRequest(
                f"the prompt's {len(request.prompt_ids)} tokens plus max_tokens="
                f"{request.params.max_tokens} exceed this server's context of "
                f"{self.max_model_len} positions (--max-len)", field="max_tokens")
        with self._lock:
            self._check_open()
            if len(self._incoming) >= self.max_waiting:
                raise api.QueueFull(f"{self.max_waiting} requests are waiting", retry_after=2)
            self._incoming.append(request)
            self._lock.notify()

    def _lead(self):
        while True:
            with self._lock:
                cancels, self._cancels = set(self._cancels), set()
                for request in [r for r in self._incoming if r.id in cancels]:
                    self._incoming.remove(request)
                    request.on_event(api.Event("done", finish_reason="cancelled",
                                               prompt_tokens=len(request.prompt_ids)))
                request = self._incoming.popleft() if self._incoming else None
            if request is None and self._state != "running" and not self._predicts:
                break
            self._serve_predicts()
            if request is None:
                self._wait()
                continue
            self._current = request
            p = request.params
            spec = {"ids": list(map(int, request.prompt_ids)), "max_tokens": p.max_tokens,
                    "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p,
                    "seed": p.seed if p.seed is not None else int(self._seed.integers(2**31))}
            payload = batches.json_bytes(spec)
            self.channel.send(protocol.GENERATE, payload=payload)
            ids = self._generate(payload)
            self._current = None
            self._finish(request, ids)
        self._stop_followers()  # drained: every rank returns (after a failure, none can)

    def _follow_command(self, kind, a, b, ints, payload):
        if kind != protocol.GENERATE:
            super()._follow_command(kind, a, b, ints, payload)
        self._generate(payload)

    def _generate(self, payload):
        """Every rank: one request through `ShardedModel.generate`."""
        import json

        import keras_hub

        spec = json.loads(payload.decode())
        ids = spec["ids"]
        length = len(ids) + spec["max_tokens"]
        token_ids = np.zeros((1, length), np.int32)
        token_ids[0, :len(ids)] = ids
        mask = np.zeros((1, length), bool)
        mask[0, :len(ids)] = True
        if spec["temperature"] <= 0:
            sampler = "greedy"
        elif spec["top_k"]:
            sampler = keras_hub.samplers.TopKSampler(k=spec["top_k"], seed=spec["seed"],
                                                     temperature=spec["temperature"])
        elif spec["top_p"] < 1:
            sampler = keras_hub.samplers.TopPSampler(p=spec["top_p"], seed=spec["seed"],
                                                     temperature=spec["temperature"])
        else:
            sampler = keras_hub.samplers.RandomSampler(seed=spec["seed"],
                                                       temperature=spec["temperature"])
        out = self.sharded.generate({"token_ids": token_ids, "padding_mask": mask},
                                    stop_token_ids=self.stop_ids or None, sampler=sampler)
        got = np.asarray(out["token_ids"])[0][len(ids):]
        keep = np.asarray(out["padding_mask"])[0][len(ids):]
        return [int(t) for t, k in zip(got, keep) if k]

    def _finish(self, request, ids):
        reason = "length"
        text_ids = ids
        if ids and ids[-1] in self.stop_ids:
            reason, text_ids = "stop", ids[:-1]
        stream = TextStream(self.tokenizer.decode, request.params.stop)
        delta, stopped = stream.push(text_ids)
        text = delta if stopped else delta + stream.finish(text_ids)
        if stopped:
            reason = "stop"
        if text:
            request.on_event(api.Event("token", text=text, token_ids=tuple(ids)))
        request.on_event(api.Event("done", finish_reason=reason,
                                   prompt_tokens=len(request.prompt_ids),
                                   completion_tokens=len(ids)))

    def _fail_all(self, reason):
        if not self.lead:
            return
        with self._lock:
            pending = list(self._incoming) + ([self._current] if self._current else [])
            self._incoming.clear()
            for _, future in self._predicts:
                future.set_exception(api.Unavailable(f"the server failed: {reason}"))
            self._predicts.clear()
        for request in pending:
            request.on_event(api.Event("error", error=f"the server failed: {reason}"))
