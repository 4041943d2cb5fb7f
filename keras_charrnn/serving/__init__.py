"""Serving: the TF Serving-compatible model server and the gRPC sampling client.

``SamplingClient`` is importable without TensorFlow; the server (``server.py``) needs it.
"""

from __future__ import annotations


def __getattr__(name: str):
    if name in ("SamplingClient", "TLS", "ServerError", "VersionGoneError"):
        from keras_charrnn.serving import client

        return getattr(client, name)
    if name in ("ModelServer", "ServerOptions"):
        from keras_charrnn.serving import server

        return getattr(server, name)
    raise AttributeError(f"module 'keras_charrnn.serving' has no attribute {name!r}")
