"""The HTTP front: a FastAPI app over one engine (OpenAI, TF Serving, health, metrics), its server.

Threading. `Server` runs uvicorn in a thread of its own, with its own asyncio event loop,
so the caller's thread (rank 0's main thread) stays free to drive the engine. Every
route runs on that loop. A generation request is handed to `Engine.submit`, which returns
at once; the engine then calls the request's `on_event` from its own thread, and each
event crosses to the loop through `loop.call_soon_threadsafe` into the request's
`asyncio.Queue` (tfshard/serve/front.py). `:predict` calls the blocking `Engine.predict`
in the loop's thread pool. Nothing here imports TensorFlow.

Errors. Every error body is OpenAI's `{"error": {"message", "type", "param", "code"}}`,
`:predict`'s too; the message names the field and what would work:

- invalid JSON (a POST body is read as JSON whatever its Content-Type), wrong field
  types and values out of range (pydantic's checks, FastAPI's 422 turned into 400),
  and the routes' own checks (token ids, context length, `max_tokens` above the cap,
  row shapes for `:predict`) → 400 with `param` the field;
- an unknown model or version → 404 (`param` "model"); an unknown path → 404;
- `api.BadRequest` → 400 with its field; `api.QueueFull` → 429 with `Retry-After`;
  `api.Unavailable` and a draining server → 503;
- no or a wrong `Authorization: Bearer KEY` when a key is set → 401 (every route but
  `/health`); a body over `max_body_bytes` → 413;
- anything else → 500 (`server_error`), and the server keeps serving.

An engine "error" event answers 500 when not streaming; mid-stream it becomes one
server-sent event `data: {"error": {...}}` that ends the stream without `data: [DONE]`
(the `openai` client raises `APIError` on it); `Server.stop()` ends the streams still
open the same way ("the server is stopping", code "unavailable"). A client that
disconnects mid-stream has its request cancelled (`Engine.cancel`).
"""

import hmac
import json
import os
import socket
import threading
import time

import fastapi
import uvicorn
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from tfshard.serve import errors
from tfshard.serve import front as front_lib
from tfshard.serve import metrics as metrics_lib
from tfshard.serve import openai_api
from tfshard.serve import page as page_lib
from tfshard.serve import tf_serving

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
API_KEY_ENV = "TFSHARD_API_KEY"
OPEN_PATHS = ("/health",)  # served without the API key


def create_app(engine, api_key=None, max_body_bytes=DEFAULT_MAX_BODY_BYTES, page=True,
               metrics=None):
    """The FastAPI app that serves one engine.

    The engine receives the app's `Metrics` through its `metrics` attribute, set here
    (see `api.Engine.metrics`); the app's state holds the `front.Front`
    (`app.state.front`), whose `drain()` turns new work away.

    Args:
        engine: the `api.Engine` to serve.
        api_key: the key every route but `/health` asks for as `Authorization: Bearer KEY`;
            None: the environment's `TFSHARD_API_KEY`, else no key; "" : no key.
        max_body_bytes: the largest request body taken (413 past it).
        page: serve the page at `/` to try the model by hand.
        metrics: the `metrics.Metrics` to record in (default: the engine's `metrics`
            attribute when set, else a new one with a registry of its own).

    Returns:
        A `fastapi.FastAPI` app.
    """
    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV) or None
    metrics = metrics or getattr(engine, "metrics", None) or metrics_lib.Metrics()
    try:
        engine.metrics = metrics
    except AttributeError:
        pass  # an engine that takes no attributes records nothing of its own
    front = front_lib.Front(engine, metrics)
    app = fastapi.FastAPI(title=f"tfshard serve: {engine.model_name}", docs_url=None,
                          redoc_url=None, openapi_url=None)
    app.state.front = front
    routers = [openai_api.router(front), tf_serving.router(front)]
    if page:
        routers.append(page_lib.router(front))
    for routes in routers:
        app.include_router(routes)
    templates = [r.path for routes in routers for r in routes.routes if hasattr(r, "path")]

    @app.get("/health")
    async def health():
        ok, reason = front.engine.health()
        if front.draining:
            return JSONResponse({"status": "draining", "reason": front.draining},
                                status_code=503)
        if not ok:
            return JSONResponse({"status": "unavailable", "reason": reason or "not ready"},
                                status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    install_error_handlers(app)
    app.add_middleware(Guard, paths=templates + ["/health", "/metrics"], metrics=metrics,
                       api_key=api_key or None, max_body_bytes=max_body_bytes)
    return app


def install_error_handlers(app):
    """Makes every error of `app` answer OpenAI's error body (see the module's docstring).

    Args:
        app: the `fastapi.FastAPI` app.
    """
    @app.exception_handler(errors.ApiError)
    async def api_error(request, exc):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        message, param = errors.describe_validation(exc.errors())
        return JSONResponse(errors.error_body(message, param=param, code="invalid_value"),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        if exc.status_code == 404:
            message = (f"Unknown path {request.url.path}: this server answers /v1/completions, "
                       "/v1/chat/completions, /v1/models, /v1/models/NAME:predict, /health and "
                       "/metrics")
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return JSONResponse(errors.error_body(message, errors.default_type(exc.status_code),
                                              code=f"http_{exc.status_code}"),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def crashed(request, exc):
        return JSONResponse(errors.error_body(f"Internal error: {type(exc).__name__}: {exc}",
                                              "server_error", code="internal_error"),
                            status_code=500)


class Guard:
    """ASGI middleware around the whole app: metrics by route and status, the API key,
    the body-size cap. Plain ASGI (not Starlette's BaseHTTPMiddleware) so streams and
    disconnects pass through untouched.

    Args:
        app: the ASGI app it wraps.
        paths: the app's route templates (to label metrics by route, not by path).
        metrics: the `metrics.Metrics`.
        api_key: the key, or None for none.
        max_body_bytes: the body-size cap.
    """

    def __init__(self, app, paths, metrics, api_key, max_body_bytes):
        self.app = app
        self.paths = [(compile_path(p)[0], p) for p in paths]
        self.metrics = metrics
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    def endpoint(self, scope):
        """The route template of a request's path ("other" when none matches)."""
        path = scope["path"]
        return next((template for regex, template in self.paths if regex.match(path)), "other")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = self.endpoint(scope)
        status = [500]

        async def send_and_see(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        started = time.monotonic()
        self.metrics.http_in_flight.inc()
        try:
            await self.guarded(scope, receive, send_and_see)
        finally:
            self.metrics.http_in_flight.dec()
            self.metrics.requests.labels(endpoint=endpoint, status=str(status[0])).inc()
            if scope["method"] == "POST" and status[0] < 400:
                self.metrics.request_latency.labels(endpoint=endpoint).observe(
                    time.monotonic() - started)

    async def guarded(self, scope, receive, send):
        """The API key and the body cap, then the app."""
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    token.strip().encode(), self.api_key.encode()):
                what = "a wrong API key" if given else "no API key"
                await reply(send, 401, errors.error_body(
                    f"The request has {what}: send the header `Authorization: Bearer KEY` "
                    "with the server's key (--api-key or TFSHARD_API_KEY)",
                    "invalid_request_error", None, "invalid_api_key"),
                    headers={"WWW-Authenticate": "Bearer"})
                return
        if scope["method"] in ("POST", "PUT", "PATCH"):
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                await self.too_large(send, int(length))
                return
            chunks, size = [], 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > self.max_body_bytes:
                    await self.too_large(send, None)
                    return
                if not message.get("more_body", False):
                    break
            receive = replay(b"".join(chunks), receive)
            scope = as_json(scope)
        await self.app(scope, receive, send)

    async def too_large(self, send, length):
        """Answers 413 for a body over the cap."""
        size = f"{length} bytes" if length is not None else "over the cap"
        await reply(send, 413, errors.error_body(
            f"The request body is {size}; this server takes at most {self.max_body_bytes} "
            "bytes: send fewer rows or a shorter prompt per request",
            "invalid_request_error", None, "body_too_large"))


def as_json(scope):
    """The scope of a POST whose body is read as JSON whatever its Content-Type says.

    Every POST route here takes JSON, and TF Serving's own examples
    (`curl -d '{"instances": ...}' URL:predict`) send it as curl's default form type.
    """
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
    given = dict(scope["headers"]).get(b"content-type", b"")
    if b"json" in given.lower():
        return scope
    return {**scope, "headers": headers + [(b"content-type", b"application/json")]}


def replay(body, receive):
    """An ASGI `receive` that hands the app the body read already, then the real one."""
    sent = [False]

    async def receive_again():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again


async def reply(send, status, body, headers=None):
    """Sends a whole JSON response through a raw ASGI `send`."""
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


class Server:
    """The app served by uvicorn in a background thread with its own event loop.

    Example:

    ```python
    server = Server(engine, port=0)
    server.start()          # returns once listening
    print(server.url)       # http://127.0.0.1:PORT
    ...
    server.drain()          # new work gets 503, running requests finish
    server.stop()
    ```

    Args:
        engine: the `api.Engine` to serve.
        host: the address to listen on (127.0.0.1 unless told otherwise).
        port: the port; 0 picks a free one (`server.port` tells which).
        api_key, max_body_bytes, page, metrics: as `create_app`.
        graceful_seconds: on `stop()`, how long open connections may take to finish
            before they are cancelled.
        log_level: uvicorn's log level.
    """

    def __init__(self, engine, host="127.0.0.1", port=8000, api_key=None,
                 max_body_bytes=DEFAULT_MAX_BODY_BYTES, page=True, metrics=None,
                 graceful_seconds=5.0, log_level="warning"):
        self.engine = engine
        self.host = host
        self.app = create_app(engine, api_key=api_key, max_body_bytes=max_body_bytes,
                              page=page, metrics=metrics)
        self.metrics = self.app.state.front.metrics
        self._requested_port = port
        self._graceful = graceful_seconds
        self._log_level = log_level
        self._uvicorn = None
        self._thread = None
        self._socket = None
        self.port = None

    @property
    def url(self):
        """The server's base URL, e.g. "http://127.0.0.1:8000"."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout=30.0):
        """Binds the port and starts serving; returns once listening.

        Args:
            timeout: seconds to wait for uvicorn to start.

        Returns:
            self.

        Raises:
            OSError: the address cannot be bound (e.g. the port is in use).
            RuntimeError: the server did not start within `timeout` (its error).
        """
        if self._thread is not None:
            raise RuntimeError("the server is already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._socket = socket.create_server((self.host, self._requested_port), family=family,
                                            backlog=512)
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(self.app, lifespan="off", log_level=self._log_level,
                                access_log=False, loop="asyncio",
                                timeout_graceful_shutdown=self._graceful)
        self._uvicorn = uvicorn.Server(config)
        failure = []

        def run():
            try:
                self._uvicorn.run(sockets=[self._socket])
            except BaseException as exc:  # reported by start()
                failure.append(exc)

        self._thread = threading.Thread(target=run, name=f"tfshard-http-{self.port}",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop(timeout=1.0)
                why = f"{type(failure[0]).__name__}: {failure[0]}" if failure else "timed out"
                raise RuntimeError(f"the HTTP server on {self.url} did not start: {why}")
            time.sleep(0.01)
        return self

    def drain(self, reason="the server is shutting down"):
        """Marks the server draining: new generation and predict requests get 503 and
        `/health` answers 503; running requests go on (see `front.Front.drain`).

        Args:
            reason: what the 503s say.
        """
        self.app.state.front.drain(reason)

    @property
    def draining(self):
        """The reason given to `drain()`, or None."""
        return self.app.state.front.draining

    def stop(self, timeout=10.0):
        """Stops serving; returns once the thread ended.

        New requests are refused (as `drain`); requests still running are cancelled in
        the engine and their clients told so (a stream gets an error event saying "the
        server is stopping", a waiting request 503); then open connections get
        `graceful_seconds` to close before uvicorn cancels them. To let running requests
        finish first, `drain()`, wait for them (e.g. the engine's running count), then
        `stop()`.

        Args:
            timeout: seconds to wait for the thread after the graceful period.
        """
        front = self.app.state.front
        if not front.draining:
            front.drain("the server is stopping")
        front.abort_all("the server is stopping")
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(self._graceful + timeout)
            if self._thread.is_alive() and self._uvicorn is not None:
                self._uvicorn.force_exit = True
                self._thread.join(timeout)
        if self._socket is not None:
            self._socket.close()
        self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
