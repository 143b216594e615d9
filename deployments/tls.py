"""TLS on the gateway port: a certificate and key from PEM files (a mounted Kubernetes Secret of
type kubernetes.io/tls works as is), and optionally a CA whose client certificates are required
(mTLS). The files are read again when they change (cert-manager renewals need no restart): gRPC
asks for the configuration on each new connection and gets the cached one unless a file moved.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

log = logging.getLogger(__name__)


class _Files:
    """The PEM files, and the configuration they make while they stay the same."""

    def __init__(self, cert: str, key: str, client_ca: str | None) -> None:
        self.paths = [Path(cert), Path(key), *([Path(client_ca)] if client_ca else [])]
        self.stamp = self._stamp()
        self.configuration = self._configuration()

    def _stamp(self) -> tuple:
        return tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in self.paths)

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        cert, key, *ca = (p.read_bytes() for p in self.paths)
        return grpc.ssl_server_certificate_configuration(
            [(key, cert)], root_certificates=ca[0] if ca else None
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's callback: a new configuration when the files changed, else None (keep)."""
        try:
            stamp = self._stamp()
            if stamp == self.stamp:
                return None
            configuration = self._configuration()
        except (OSError, ValueError, RuntimeError) as error:  # a half-written renewal: try later
            log.warning("keeping the TLS certificate as it was: %s", error)
            return None
        self.stamp, self.configuration = stamp, configuration
        log.info("TLS certificate re-read from %s", self.paths[0])
        return configuration


def server_credentials(cert: str, key: str, client_ca: str | None = None) -> grpc.ServerCredentials:
    """TLS credentials for a server; with `client_ca`, clients must present a certificate it
    signed. ValueError (one line) when a file cannot be read."""
    try:
        files = _Files(cert, key, client_ca)
    except OSError as error:
        raise ValueError(f"cannot read the TLS files: {error}") from None
    return grpc.dynamic_ssl_server_credentials(
        files.configuration, files.fetch, require_client_authentication=client_ca is not None
    )
