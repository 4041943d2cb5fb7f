"""TLS for the client's gRPC channel: the PEM files of a CA (and a client certificate for mutual TLS) to credentials.

``SamplingClient(targets, tls=TLS(ca_cert="ca.pem"))`` checks the server's certificate; with
``client_cert`` and ``client_key`` it also presents its own, for a server that requires it
(``charrnn serve --ssl_config_file`` with ``client_verify: true``).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from keras_charrnn.errors import ConfigError


@dataclass
class TLS:
    """TLS settings for the channel.

    Args:
        ca_cert: PEM file of the certificate authority that signed the server's certificate.
        client_cert: PEM file of this client's certificate (mutual TLS).
        client_key: PEM file of this client's private key (mutual TLS).
        server_name: the name to check the server's certificate against, if not the target's host.
    """

    ca_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials these files make.

        Raises:
            ConfigError: a file cannot be read.
        """
        return grpc.ssl_channel_credentials(
            _read_pem(self.ca_cert, "ca_cert"),
            _read_pem(self.client_key, "client_key"),
            _read_pem(self.client_cert, "client_cert"),
        )


def _read_pem(path: str | None, parameter: str) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"{parameter}: cannot read {path} ({exc.strerror})") from None
