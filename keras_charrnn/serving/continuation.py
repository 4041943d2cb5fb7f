"""Continuation tokens of ``/v1/completions``: a choice's hidden state, signed, so a later call continues it.

With ``--continuation_key_file`` (a secret of at least 16 bytes, the same file on every
replica), each choice carries ``continuation``: an opaque token holding where the row
stopped (every state tensor, the text not fed yet, the position, the last characters
for stops across calls), its seed, and the model and version. A later call sends it back
(``"continuation": TOKEN``, with ``n`` 1 and one prompt: the text to feed first, or "") to
any replica and continues without re-feeding the prompt, exactly as the package's session
continues (``Session.generate`` again, or ``feed`` then ``generate``). The token is
``base64url(payload).base64url(HMAC-SHA256(key, payload))``: a token changed in any byte,
or signed with another key, is refused; so is one of another model, and its version is
pinned (the state belongs to those weights). Without the flag no token is offered.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from keras_charrnn.errors import ConfigError
from keras_charrnn.serving.openai_generation import Generation, Start
from keras_charrnn.serving.openai_schema import ApiError, CompletionRequest, parse_model_id

__all__ = ["MIN_KEY_BYTES", "Continuations"]

MIN_KEY_BYTES = 16
TOKEN_VERSION = 1


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _refused(why: str) -> ApiError:
    return ApiError(400, f"continuation token refused: {why}", "continuation", "invalid_continuation")


class Continuations:
    """Signs and checks continuation tokens with one secret key.

    Args:
        key: the secret (at least ``MIN_KEY_BYTES`` bytes).

    Example:

    >>> signer = Continuations(b"0123456789abcdef")
    >>> signer.verify(signer.sign({"model": "m"}))
    {'model': 'm'}
    """

    def __init__(self, key: bytes):
        if len(key) < MIN_KEY_BYTES:
            raise ConfigError(f"continuation_key_file: the key must hold at least {MIN_KEY_BYTES} bytes")
        self._key = key

    @classmethod
    def from_file(cls, path: str | os.PathLike | None) -> Continuations | None:
        """The signer of ``--continuation_key_file`` (its bytes, surrounding whitespace stripped); None without one.

        Raises:
            ConfigError: the file cannot be read or its key is too short.
        """
        if not path:
            return None
        try:
            key = Path(path).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"continuation_key_file: cannot read {path} ({exc.strerror})") from None
        return cls(key)

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()

    def sign(self, fields: dict[str, Any]) -> str:
        """The token of ``fields`` (JSON-ready)."""
        payload = json.dumps(fields, separators=(",", ":"), sort_keys=True).encode("utf-8")
        return f"{_b64(payload)}.{_b64(self._mac(payload))}"

    def verify(self, token: str) -> dict[str, Any]:
        """The fields of a token this key signed.

        Raises:
            ApiError: 400 for a malformed, tampered or foreign token.
        """
        head, dot, tail = token.partition(".")
        try:
            payload, mac = _unb64(head), _unb64(tail)
        except (ValueError, TypeError):
            raise _refused("not a continuation token") from None
        if not dot or not hmac.compare_digest(mac, self._mac(payload)):
            raise _refused("its signature does not match (changed, or made by another server's key)")
        fields = json.loads(payload)
        if not isinstance(fields, dict):
            raise _refused("not a continuation token")
        return fields

    def token(self, generation: Generation, row: int) -> str:
        """The token of one choice of a finished generation.

        Args:
            generation: the call's ``Generation`` (its inputs, and each row's carry after its last segment).
            row: the choice's row.

        Returns:
            The signed token.
        """
        carry = generation.carry[row] or {
            k: generation.inputs[k][row] for k in ("prime", "position", "stop_tail", *generation.facts.state_names)
        }
        loaded = generation.call.loaded
        return self.sign(
            {
                "v": TOKEN_VERSION,
                "model": loaded.name,
                "version": loaded.version,
                "seed": int(generation.inputs["seed"][row]),
                "pending": bytes(carry["prime"]).decode("utf-8"),
                "position": int(carry["position"]),
                "tail": bytes(carry["stop_tail"]).decode("utf-8"),
                "states": {
                    name: _b64(np.asarray(carry[name], "<f4").tobytes()) for name in generation.facts.state_names
                },
            }
        )

    def start(self, request: CompletionRequest) -> Start:
        """Where a call that sends a token starts (a ``Start``), its model pinned to the token's version.

        The request's seed, when given, replaces the token's; its prompt is fed after the token's
        pending text (a prompt given restarts stop matching, as ``Session.feed`` does).

        Args:
            request: the checked request (``n`` 1, one prompt).

        Returns:
            The ``Start``.

        Raises:
            ApiError: 400 for a refused token, another model's, or a request of several rows.
        """
        fields = self.verify(request.continuation or "")
        if fields.get("v") != TOKEN_VERSION:
            raise _refused("made by another release of this server")
        if request.rows != 1:
            raise bad_rows()
        name, version, label = parse_model_id(request.model)
        if name != fields["model"] or (version is not None and version != fields["version"]):
            raise _refused(f"it continues model {fields['model']}/{fields['version']}, not {request.model}")
        if label is not None:
            raise _refused("give the model as NAME or NAME/VERSION with a continuation (its version is pinned)")
        if not request.seeded:
            request.seed = int(fields["seed"])
        states = {k: np.frombuffer(_unb64(v), "<f4").astype(np.float32) for k, v in fields["states"].items()}
        tail = fields["tail"] if not request.prompts[0] else ""
        return Start(states, fields["pending"], int(fields["position"]), tail, f"{name}/{fields['version']}")


def bad_rows() -> ApiError:
    """The refusal of a continuation with several rows."""
    return ApiError(400, "a continuation continues one choice: give n 1 and one prompt", "n", "invalid_value")
