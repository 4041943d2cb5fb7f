"""TLS on the REST port: an ``ssl.SSLContext`` from the gRPC port's ``--ssl_config_file`` (TF Serving's SSLConfig).

The same file serves both ports: ``server_key`` and ``server_cert`` (PEM, inline, as
TF Serving takes them), and with ``client_verify: true`` the REST port, like the gRPC
one, requires a client certificate signed by ``custom_ca`` (mutual TLS). Each
connection's handshake runs in its own handler thread (``rest``), so a slow or
silent client never holds up the others.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path

from keras_charrnn.errors import ConfigError
from keras_charrnn.serving.settings import ssl_config

__all__ = ["rest_ssl_context"]


def rest_ssl_context(path: str | os.PathLike | None) -> ssl.SSLContext | None:
    """The REST port's server-side TLS context, from an ``SSLConfig`` text file.

    Args:
        path: the ``--ssl_config_file`` (None: plaintext).

    Returns:
        The context (TLS 1.2 or newer; client certificates required when the file sets
        ``client_verify``), or None.

    Raises:
        ConfigError: the file is invalid (see ``settings.ssl_config``), or its key and
            certificate do not load or do not match.
    """
    if not path:
        return None
    config = ssl_config(path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # load_cert_chain reads files only: the inline PEM texts go through a private temporary folder.
    with tempfile.TemporaryDirectory(prefix="charrnn-tls-") as folder:
        cert, key = Path(folder) / "cert.pem", Path(folder) / "key.pem"
        cert.write_text(config.server_cert)
        key.touch(mode=0o600)
        key.write_text(config.server_key)
        try:
            context.load_cert_chain(cert, key)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"{Path(path)}: server_key and server_cert do not load as a pair ({exc.reason})"
            ) from None
    if config.client_verify:
        try:
            context.load_verify_locations(cadata=config.custom_ca)
        except ssl.SSLError as exc:
            raise ConfigError(f"{Path(path)}: custom_ca does not load ({exc.reason})") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context
