"""API keys of the REST port: ``--api_key_file``, one key a line, reread when it changes, compared in constant time.

With a key file, every REST route but the model status route that probes use
(``GET /v1/models/NAME[/versions/N | /labels/L]``) needs ``Authorization: Bearer KEY``
(see ``rest``). The file is looked at (``os.stat``: its size, modification time and inode)
on each request and read again only when one of them changed, so rotating a key is
editing the file: no restart. Blank lines and lines starting with ``#`` are skipped.
A file that cannot be read any more keeps the keys last read (logged), so a file
being replaced never locks every caller out; an empty file lets no one in.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
from pathlib import Path

from keras_charrnn.errors import ConfigError

__all__ = ["REALM", "ApiKeys", "bearer_token"]

log = logging.getLogger("charrnn.serve")

REALM = "charrnn"  # the WWW-Authenticate realm of a 401
MAX_KEY_FILE_BYTES = 1 << 20  # a key file larger than this is refused (a wrong path, not a list of keys)


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header (None: no header, or another scheme).

    Args:
        header: the header's value.

    Returns:
        The token, or None.

    Example:

    >>> bearer_token("Bearer abc")
    'abc'
    """
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class ApiKeys:
    """The keys of an ``--api_key_file``, kept up to date with the file.

    Args:
        path: the file: one key a line.

    Raises:
        ConfigError: the file cannot be read at start, or is too large.

    Example:

    >>> keys = ApiKeys("serving/api_keys.txt")                # doctest: +SKIP
    >>> keys.allows("Bearer sk-local-1")                      # doctest: +SKIP
    True
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._keys: tuple[bytes, ...] = ()
        try:
            self._reload(os.stat(self.path))
        except OSError as exc:
            raise ConfigError(f"api_key_file: cannot read {self.path} ({exc.strerror})") from None
        if not self._keys:
            log.warning("api_key_file %s holds no key: every authenticated REST route will answer 401", self.path)

    def _reload(self, stat: os.stat_result) -> None:
        if stat.st_size > MAX_KEY_FILE_BYTES:
            raise ConfigError(f"api_key_file: {self.path} holds {stat.st_size} bytes, over {MAX_KEY_FILE_BYTES}")
        text = self.path.read_bytes().decode("utf-8", errors="replace")
        keys = tuple(
            line.strip().encode("utf-8") for line in text.splitlines() if line.strip() and not line.startswith("#")
        )
        self._keys, self._stamp = keys, (stat.st_size, stat.st_mtime_ns, stat.st_ino)

    def keys(self) -> tuple[bytes, ...]:
        """The keys now in force (the file is read again if it changed since the last look)."""
        try:
            stat = os.stat(self.path)
            if (stat.st_size, stat.st_mtime_ns, stat.st_ino) != self._stamp:
                with self._lock:
                    if (stat.st_size, stat.st_mtime_ns, stat.st_ino) != self._stamp:
                        self._reload(stat)
                        log.info("api_key_file %s reread: %d key(s)", self.path, len(self._keys))
        except (OSError, ConfigError) as exc:
            log.warning("api_key_file %s: cannot reread it (%s); keeping the %d key(s) read before", self.path, exc,
                        len(self._keys))  # fmt: skip
        return self._keys

    def allows(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header carries one of the keys.

        Every key is compared (``hmac.compare_digest``), so the time taken does not tell
        which key, or how much of one, matched.

        Args:
            authorization: the header's value (None: absent).

        Returns:
            True when the header is ``Bearer KEY`` with a key of the file.
        """
        token = bearer_token(authorization)
        given = (token or "").encode("utf-8")
        match = False
        for key in self.keys():
            match |= hmac.compare_digest(key, given)
        return match and token is not None
