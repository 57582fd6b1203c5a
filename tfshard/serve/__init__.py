"""Serving a model over HTTP: the front (http.py) and the engines it drives (api.py's contract).

Importing this package imports nothing else: `tfshard.serve.api` is what engines need (no
HTTP libraries), `tfshard.serve.http` is the front (FastAPI, uvicorn, prometheus_client:
the `serve` extra). Neither imports TensorFlow.
"""
