"""The package's exceptions: one base, ``CharRNNError``, and three kinds under it.

Every problem a user can fix raises a ``CharRNNError`` whose message names
the problem and the parameter (``val_frac``, ``version``), never a CLI flag,
so it reads the same from Python and from ``charrnn``; where a message
reaches someone else (a server's answer to its callers), the command that
started the server adds its flag (``ServingError.setting``). The CLI catches
``CharRNNError`` alone: anything else is a bug and keeps its traceback.

- ``ConfigError``: a setting is wrong (a hyper-parameter, a server option, a config file).
- ``InputError``: data is wrong (a corpus, a checkpoint, a model folder, a request's tensors).
- ``ServingError``: a request cannot be served; ``code`` is a ``grpc.StatusCode`` name.
"""

from __future__ import annotations


class CharRNNError(Exception):
    """A problem the user can fix; its message names the problem."""


class ConfigError(CharRNNError):
    """A setting is invalid: a hyper-parameter, a server option, a config file.

    Example:

    >>> raise ConfigError("lr must be positive, got -1")  # doctest: +SKIP
    """


class InputError(CharRNNError):
    """Data is invalid: a corpus, a checkpoint, a model folder, a session record."""


class ServingError(CharRNNError):
    """A request that cannot be served.

    Args:
        code: a ``grpc.StatusCode`` name (``"INVALID_ARGUMENT"``, ``"NOT_FOUND"``, ...).
        message: what is wrong, for the caller; never a server path.
        setting: the server setting that refused the request (``"max_prime_chars"``), if one did:
            a server started by a command may add how that command sets it.
    """

    def __init__(self, code: str, message: str, setting: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.setting = setting


def graph_error_message(text: str) -> str:
    """The user-facing part of a TensorFlow error raised by a model's own input checks.

    ``tf.debugging`` assertions fail with a long "Graph execution error"
    report; the sentence the model wrote stands inside ``assertion failed: [...]``.
    """
    marker = "assertion failed: ["
    if marker in text:
        start = text.index(marker) + len(marker)
        line = text[start:].split("\n", 1)[0]
        end = line.find("] [")  # the message may hold "]" itself: "top_p must be in (0, 1]"
        return line[:end] if end >= 0 else line.removesuffix("]")
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Graph execution error", "Detected at node"))]
    return (useful or lines or ["model error"])[-1]
