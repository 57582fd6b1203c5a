"""`tfshard.serve(sharded)`: a sharded model behind the HTTP front, every rank serving its shards.

Every rank calls `serve(sharded, ...)`. Rank 0 owns the HTTP port (the front, http.py,
in a thread of its own) and an engine's scheduler; every rank runs the engine's loop
(engine.py) from its main thread, following rank 0's commands (protocol.py) with its own
K/V heads and weights. SIGTERM or SIGINT on rank 0 drains: new requests get 503, accepted
ones finish, then every rank returns.
"""

import os
import signal
import sys
import time

from tfshard.serve.engine import BatchingEngine
from tfshard.serve.serial import SerialEngine
from tfshard.serve.tokenizer import PreprocessorTokenizer

#: Environment variable holding the API key when --api-key is not given.
API_KEY_ENV = "TFSHARD_API_KEY"

#: Seconds rank 0 keeps answering 503 after a rank is lost, before the job ends.
FAILED_LINGER_SECONDS = 2.0


def build_engine(sharded, name=None, slots=8, max_len=2048, max_tokens=None, max_waiting=64,
                 prefill_tokens=256, batching="auto"):
    """The engine for `sharded`: continuous batching where the decode step runs, else one
    request at a time.

    Args:
        sharded: the `ShardedModel` (every rank's own; every rank calls this alike).
        name: the model's name for clients (default: the source's file name, else the
            model's name).
        slots: KV-cache slots (requests generating at once).
        max_len: most positions per request (capped by the model's own limit).
        max_tokens: the most `max_tokens` a request may ask for (default: max_len).
        max_waiting: most requests waiting (429 past it).
        prefill_tokens: most prompt tokens per step.
        batching: "auto", "on" (fail when the decode step cannot run) or "off".

    Returns:
        The engine, and why it is not batching (None when it is).

    Raises:
        ValueError: bad arguments, or batching="on" where the decode step cannot run.
    """
    from tfshard import decode
    from tfshard import inputs as inputs_lib

    if batching not in ("auto", "on", "off"):
        raise ValueError(f"batching={batching!r}: use auto, on or off")
    if slots < 1 or max_len < 2 or max_waiting < 0:
        raise ValueError(f"slots={slots}, max_len={max_len}, max_waiting={max_waiting}: slots and "
                         "max_waiting must be >= 1 and >= 0, max_len >= 2")
    model = sharded.inner
    name = name or _default_name(sharded)
    limit = inputs_lib.sequence_limit(model)
    if limit is not None:
        max_len = min(max_len, limit[1])
    preprocessor = getattr(model, "preprocessor", None) or sharded.preprocessor
    tokenizer = None
    if preprocessor is not None and hasattr(preprocessor, "tokenizer"):
        tokenizer = PreprocessorTokenizer(preprocessor, getattr(sharded, "chat_template", None))
    common = dict(max_waiting=max_waiting)
    why = None
    if batching != "off" and tokenizer is not None:
        try:
            return BatchingEngine(sharded, name, tokenizer, slots=slots, max_len=max_len,
                                  max_tokens_cap=max_tokens, prefill_tokens=prefill_tokens,
                                  **common), None
        except decode.Unsupported as e:
            why = str(e)
    elif tokenizer is None:
        why = "the model has no tokenizer"
    else:
        why = "batching is off"
    if batching == "on":
        raise ValueError(f"tfshard serve --batching on: {why}")
    return SerialEngine(sharded, name, tokenizer, max_len=max_len, max_tokens_cap=max_tokens,
                        **common), why


def _default_name(sharded):
    source = getattr(sharded, "source", None)
    if source:
        base = os.path.basename(str(source).rstrip("/"))
        return base.split(".")[0] or base
    return sharded.inner.name


def serve(sharded, host="127.0.0.1", port=8000, api_key=None, ready=None, log=print, **kwargs):
    """Serves `sharded` until SIGTERM or SIGINT reaches rank 0 (every rank calls it).

    Args:
        sharded: the `ShardedModel`.
        host: the address rank 0 listens on (loopback unless asked).
        port: its port (0: a free one; `ready` is told which).
        api_key: a key every route but /health requires (default: $TFSHARD_API_KEY).
        ready: called on rank 0 with the port once the server listens.
        log: where rank 0 says what it serves.
        **kwargs: see `build_engine`.

    Raises:
        Whatever the engine raises (a lost rank: its name), after in-flight requests got
        an error.
    """
    from tfshard.serve.http import Server

    engine, why = build_engine(sharded, **kwargs)
    api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    # Which process is which rank, said once: a launcher's report of a lost process names
    # its pid and host.
    import socket

    ranks = sharded.world.comm.allgather_object([socket.gethostname(), os.getpid()])
    server = None
    previous = {}
    if engine.lead:
        server = Server(engine, host=host, port=port, api_key=api_key)
        server.start()
        kind = "continuous batching" if why is None else f"one request at a time ({why})"
        log(f"[tfshard] serving {engine.model_name!r} on http://{host}:{server.port} "
            f"({sharded.world.size} rank(s), {kind}); ranks: "
            + ", ".join(f"{r} pid {pid} on {h}" for r, (h, pid) in enumerate(ranks)), flush=True)
        if ready is not None:
            ready(server.port)

    def on_signal(signum, frame):
        if engine.lead:
            log(f"[tfshard] {signal.Signals(signum).name}: draining (new requests get 503)",
                flush=True)
            engine.drain()
            if server is not None:
                server.drain("the server is shutting down")
        # Other ranks keep following rank 0, which stops them once drained.

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, on_signal)
    try:
        engine.run()
    except Exception as e:  # a lost rank: the error names it
        import traceback

        if server is not None:
            # Every open request has its error event; /health answers 503 with the reason
            # for a moment, so a health check sees the failure before the port closes.
            time.sleep(FAILED_LINGER_SECONDS)
            server.stop(timeout=5)
        traceback.print_exc()
        print(f"[tfshard] rank {sharded.world.rank}: the server failed: {type(e).__name__}: "
              f"{e}", file=sys.stderr, flush=True)
        # The job ends as a whole, a stopped rank included (an exit would leave it waiting);
        # first the launcher's output copiers get a moment to pass the messages on.
        time.sleep(0.5)
        sharded.world.comm.abort(1)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if server is not None:
        server.stop()
    sys.stdout.flush()
