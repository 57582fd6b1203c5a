"""The front's state over one engine: model checks, draining, and events bridged to asyncio."""

import asyncio
import threading
import time

from tfshard.serve import api
from tfshard.serve import errors


class Front:
    """What every route of one app shares: the engine, the metrics, whether it drains.

    Args:
        engine: the `api.Engine` served.
        metrics: the app's `metrics.Metrics`.
    """

    def __init__(self, engine, metrics):
        self.engine = engine
        self.metrics = metrics
        self.draining = None  # the reason, once draining
        self.open = OpenStreams()  # the EventStreams not ended yet

    @property
    def model_name(self):
        """The name clients use for the model (`engine.model_name`)."""
        return self.engine.model_name

    def drain(self, reason="the server is shutting down"):
        """Takes no new work from now on: new generation and predict requests get 503
        and `/health` answers 503; requests already running go on to their end.

        Args:
            reason: what the 503s say.
        """
        self.draining = reason or "the server is shutting down"

    def check_model(self, name, param="model"):
        """Checks that a request names the served model.

        Args:
            name: the name the request gave (None: the served model).
            param: the request field that carries it.

        Raises:
            errors.ApiError: 404 naming the model this server serves.
        """
        if name is not None and name != self.model_name:
            raise errors.ApiError(
                404, f"The model `{name}` does not exist: this server serves "
                     f"`{self.model_name}` (GET /v1/models lists it).",
                param=param, code="model_not_found")

    def check_serving(self):
        """Raises `errors.ApiError` 503 when the server drains."""
        if self.draining:
            raise errors.ApiError(503, f"The server takes no new requests: {self.draining}.",
                                  code="draining")

    def stream(self, request_id, prompt_ids, params, disconnected=None):
        """Submits a generation request to the engine; its events arrive on this loop.

        Must be called from the app's event loop.

        Args:
            request_id: the request's id (e.g. "cmpl-...").
            prompt_ids: the prompt's token ids.
            params: its `api.SamplingParams`.
            disconnected: an async callable telling whether the client went away (e.g.
                Starlette's `request.is_disconnected`), asked every half second; or None.

        Returns:
            An `EventStream`, submitted.

        Raises:
            errors.ApiError: the engine refused it (429, 503 or 400, see
                `errors.from_engine`).
        """
        stream = EventStream(self.engine, self.metrics, request_id, prompt_ids, params,
                             asyncio.get_running_loop(), disconnected, streams=self.open)
        try:
            self.engine.submit(stream.request)
        except errors.ENGINE_ERRORS as exc:
            stream.finished = True
            raise errors.from_engine(exc) from None
        self.open.add(stream)
        return stream

    def abort_all(self, message):
        """Ends every open request at once: each is cancelled in the engine and its
        reader gets an "error" event saying `message` (thread-safe: each stream is
        ended on its loop).

        Args:
            message: why (e.g. "the server is stopping").

        Returns:
            How many requests were open.
        """
        streams = self.open.snapshot()
        for stream in streams:
            try:
                stream.loop.call_soon_threadsafe(stream.abort, message)
            except RuntimeError:
                pass  # its loop is closed already
        return len(streams)


class OpenStreams:
    """A thread-safe set of streams (added and removed on the loop, read by `stop()`)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._streams = set()

    def add(self, stream):
        with self._lock:
            self._streams.add(stream)

    def discard(self, stream):
        with self._lock:
            self._streams.discard(stream)

    def snapshot(self):
        """The streams open now, as a list."""
        with self._lock:
            return list(self._streams)

    def __len__(self):
        with self._lock:
            return len(self._streams)


class ClientGone(Exception):
    """The client of a request disconnected (the request was cancelled)."""


class EventStream:
    """One submitted request's events, from the engine's thread to the app's event loop.

    The engine calls `on_event` from its own thread; each event is handed to the loop
    with `call_soon_threadsafe`. Iterate `events()` to read them; `close()` cancels the
    request in the engine unless it already ended.

    Args:
        engine: the `api.Engine`.
        metrics: the `metrics.Metrics` that records the request when it ends.
        request_id, prompt_ids, params: the `api.Request`'s fields.
        loop: the app's event loop.
        disconnected: an async callable asked every `poll` seconds while the request
            runs, or None.
        poll: seconds between those questions.
        streams: an `OpenStreams` (or a set) the stream leaves when it ends.
    """

    def __init__(self, engine, metrics, request_id, prompt_ids, params, loop,
                 disconnected=None, poll=0.5, streams=None):
        self.engine = engine
        self.streams = streams if streams is not None else set()
        self.aborted = None  # the message of `abort`
        self.metrics = metrics
        self.loop = loop
        self.queue = asyncio.Queue()
        self.disconnected = disconnected
        self.poll = poll
        self.arrived = time.monotonic()
        self.next_check = self.arrived + poll
        self.token_times = []
        self.finished = False
        self.finish_reason = None
        self.usage = (len(prompt_ids), 0)
        self.request = api.Request(id=request_id, prompt_ids=list(prompt_ids), params=params,
                                   on_event=self.on_event)

    def on_event(self, event):
        """Hands an event to the loop (called from the engine's thread)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (time.monotonic(), event))
        except RuntimeError:
            pass  # the loop is closed (the server stopped): nobody listens any more

    async def next_event(self, wait=None):
        """The next event; asks `disconnected` every `poll` seconds meanwhile.

        Args:
            wait: seconds to wait at most (None: until an event comes).

        Returns:
            The next `api.Event`, or None when `wait` seconds passed without one.

        Raises:
            ClientGone: the client disconnected (the request is cancelled).
        """
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            timeout = self.poll
            if deadline is not None:
                timeout = max(0.0, min(timeout, deadline - time.monotonic()))
            try:
                when, event = await asyncio.wait_for(self.queue.get(), timeout)
            except asyncio.TimeoutError:
                when = event = None
            await self.check_client()
            if event is not None:
                break
            if deadline is not None and time.monotonic() >= deadline:
                return None
        if event.token_ids:
            self.token_times.append((when, len(event.token_ids)))
        if event.kind in ("done", "error"):
            self.finish(event)
        return event

    async def check_client(self):
        """Every `poll` seconds, asks `disconnected` whether the client went away.

        Raises:
            ClientGone: it did (the request is cancelled).
        """
        now = time.monotonic()
        if self.disconnected is None or now < self.next_check:
            return
        self.next_check = now + self.poll
        if await self.disconnected():
            self.close()
            raise ClientGone(self.request.id)

    async def events(self):
        """Yields the request's events up to and including its last ("done" or "error").

        Raises:
            ClientGone: the client disconnected (see `next_event`).
        """
        while not self.finished:
            yield await self.next_event()

    def finish(self, event):
        """Marks the request ended by its last event and records it in the metrics."""
        if self.finished:
            return
        self.finished = True
        self.streams.discard(self)
        self.finish_reason = "error" if event.kind == "error" else event.finish_reason
        completion = event.completion_tokens or sum(n for _, n in self.token_times)
        self.usage = (event.prompt_tokens or len(self.request.prompt_ids), completion)
        self.metrics.observe_generation(self.arrived, self.token_times, self.usage[0],
                                        self.usage[1], self.finish_reason)

    def abort(self, message):
        """Cancels the request in the engine and hands its reader an "error" event saying
        `message` (on the loop's thread; a no-op once the request ended)."""
        if self.finished or self.aborted:
            return
        self.aborted = message
        self.engine.cancel(self.request.id)
        self.queue.put_nowait((time.monotonic(), api.Event("error", error=message)))

    def close(self):
        """Cancels the request in the engine unless it already ended (idempotent)."""
        if self.finished:
            return
        self.finished = True
        self.streams.discard(self)
        self.finish_reason = "cancelled"
        self.metrics.observe_generation(self.arrived, self.token_times, self.usage[0],
                                        sum(n for _, n in self.token_times), "cancelled")
        if not self.aborted:
            self.engine.cancel(self.request.id)
