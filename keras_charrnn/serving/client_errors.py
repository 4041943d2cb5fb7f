"""The errors a model server answers a client with: ``ServerError`` (a gRPC status), ``VersionGoneError``.

TensorFlow-free, as the client is; ``keras_charrnn.serving.client`` re-exports them.
"""

from __future__ import annotations

import grpc

from keras_charrnn.errors import ServingError

__all__ = ["RETRYABLE", "ServerError", "VersionGoneError", "version_gone"]

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)


class ServerError(ServingError):
    """An error status from a model server, as a ``ServingError`` whose ``code`` is the status's name.

    Args:
        status: the ``grpc.StatusCode`` the server answered (kept as ``status``).
        message: the server's details (kept as ``message`` and ``details``).
        target: the server (or servers) asked.

    Example:

    >>> error = ServerError(grpc.StatusCode.NOT_FOUND, "no model 'x'", "localhost:8500")
    >>> error.code, error.status == grpc.StatusCode.NOT_FOUND, str(error)
    ('NOT_FOUND', True, "localhost:8500: NOT_FOUND: no model 'x'")
    """

    def __init__(self, status: grpc.StatusCode, message: str, target: str):
        super().__init__(status.name, message)
        self.status = status
        self.details = message
        self.target = target

    def __str__(self) -> str:
        return f"{self.target}: {self.code}: {self.message}"


class VersionGoneError(ServerError):
    """The model version a session is pinned to is no longer served anywhere."""


def version_gone(error: ServerError, model: str, version: int | None) -> ServerError:
    """NOT_FOUND (from every replica) for a pinned version becomes ``VersionGoneError``.

    Args:
        error: the error the call ended with.
        model: the model's name.
        version: the version the call pinned (None: the newest).

    Returns:
        ``VersionGoneError`` for NOT_FOUND of a pinned version, else ``error``.
    """
    if version is None or error.status != grpc.StatusCode.NOT_FOUND:
        return error
    return VersionGoneError(
        error.status,
        f"version {version} of model {model!r}, which this session is pinned to, "
        f"is no longer served by any replica (its state belongs to those weights; start a new "
        f"session): {error.details}",
        error.target,
    )
