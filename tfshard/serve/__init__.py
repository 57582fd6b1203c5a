"""Serving a model over HTTP: the front (http.py), the engines (engine.py), `serve` (server.py).

`tfshard.serve(sharded, port=...)` serves a sharded model from every rank: rank 0 owns the
HTTP front (http.py: FastAPI, uvicorn, prometheus_client, the `serve` extra) and the
scheduler; every rank runs the engine's loop (engine.py). api.py is the contract between
front and engines. The package is callable -- `tfshard.serve(...)` is `server.serve` --
and importing it imports nothing else (the front and its tests run without TensorFlow):
`serve` and `build_engine` load on first use.
"""

import sys
import types

__all__ = ["build_engine", "serve"]


def __getattr__(name):
    if name in __all__:
        from tfshard.serve import server

        return getattr(server, name)
    raise AttributeError(f"module 'tfshard.serve' has no attribute {name!r}")


class _Package(types.ModuleType):
    """This package, callable: `tfshard.serve(sharded, ...)` runs `server.serve`."""

    def __call__(self, sharded, **kwargs):
        from tfshard.serve import server

        return server.serve(sharded, **kwargs)


sys.modules[__name__].__class__ = _Package
