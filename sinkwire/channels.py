"""Client channels to a sinkserve gateway, with its credentials: one factory for every client.

    credentials = Credentials(api_key="ssk_...", ca="ca.pem")   # or Credentials.from_env()
    channel = aio_channel("sinkserve.example.com:50051", credentials)

The API key travels as the gRPC metadata `authorization: Bearer <key>` on every call. With TLS
(a CA file, client certificates for mTLS, or `tls=True` for the system's roots) it is attached as
gRPC call credentials, which gRPC only ever sends over an encrypted channel; without TLS (a
loopback service, or TLS ended by a proxy in front) a client interceptor adds it, in the clear.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

# Environment variables a client reads when it is given no credentials.
ENV_API_KEY = "SINKSERVE_API_KEY"
ENV_CA = "SINKSERVE_CA"  # a PEM file of trusted roots: connect with TLS
ENV_CLIENT_CERT = "SINKSERVE_CLIENT_CERT"  # mTLS: the client's certificate chain (PEM file)
ENV_CLIENT_KEY = "SINKSERVE_CLIENT_KEY"  # mTLS: its private key (PEM file)
ENV_TLS = "SINKSERVE_TLS"  # "1": TLS with the system's roots

ChannelOptions = Sequence[tuple[str, Any]]


@dataclass(frozen=True)
class Credentials:
    """What a client presents: an API key, and how to reach the server over TLS."""

    api_key: str | None = None
    ca: str | None = None  # PEM file of roots to trust (TLS); None with tls=True: the system's
    cert: str | None = None  # PEM client certificate chain (mTLS)
    key: str | None = None  # PEM private key of `cert`
    tls: bool = False
    server_name: str | None = None  # the name to check in the server's certificate

    @classmethod
    def from_env(cls, **overrides: Any) -> Credentials:
        """Credentials from SINKSERVE_API_KEY, SINKSERVE_CA, SINKSERVE_CLIENT_CERT/KEY and
        SINKSERVE_TLS; `overrides` that are not None win (e.g. a CLI's options)."""
        values = {
            "api_key": os.environ.get(ENV_API_KEY) or None,
            "ca": os.environ.get(ENV_CA) or None,
            "cert": os.environ.get(ENV_CLIENT_CERT) or None,
            "key": os.environ.get(ENV_CLIENT_KEY) or None,
            "tls": os.environ.get(ENV_TLS, "").lower() in ("1", "true", "yes"),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def secure(self) -> bool:
        return bool(self.tls or self.ca or self.cert)

    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.api_key}")] if self.api_key else []

    def channel_credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs its key, and a key its certificate")
        tls = grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca),
            private_key=_read(self.key),
            certificate_chain=_read(self.cert),
        )
        if self.api_key:
            return grpc.composite_channel_credentials(
                tls, grpc.access_token_call_credentials(self.api_key)
            )
        return tls

    def options(self, options: ChannelOptions = ()) -> list[tuple[str, Any]]:
        options = list(options)
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return options


def aio_channel(
    target: str, credentials: Credentials | None = None, options: ChannelOptions = ()
) -> grpc.aio.Channel:
    """An asyncio channel to `target` (credentials from the environment when None)."""
    credentials = credentials if credentials is not None else Credentials.from_env()
    if credentials.secure:
        return grpc.aio.secure_channel(
            target, credentials.channel_credentials(), options=credentials.options(options)
        )
    interceptors = _aio_interceptors(credentials.metadata()) if credentials.api_key else None
    return grpc.aio.insecure_channel(target, options=list(options), interceptors=interceptors)


def sync_channel(
    target: str, credentials: Credentials | None = None, options: ChannelOptions = ()
) -> grpc.Channel:
    """A blocking channel to `target` (credentials from the environment when None)."""
    credentials = credentials if credentials is not None else Credentials.from_env()
    if credentials.secure:
        return grpc.secure_channel(
            target, credentials.channel_credentials(), options=credentials.options(options)
        )
    channel = grpc.insecure_channel(target, options=list(options))
    if credentials.api_key:
        channel = grpc.intercept_channel(channel, _SyncMetadata(credentials.metadata()))
    return channel


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


# -- adding metadata on a plaintext channel ----------------------------------------------------------
class _AioMetadata:
    def __init__(self, metadata: list[tuple[str, str]]) -> None:
        self._metadata = metadata

    def _details(self, details: Any) -> Any:  # grpc.aio.ClientCallDetails is a namedtuple
        return details._replace(metadata=[*(details.metadata or ()), *self._metadata])


class _AioUnaryUnary(_AioMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _AioUnaryStream(_AioMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _AioStreamUnary(_AioMetadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


class _AioStreamStream(_AioMetadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


def _aio_interceptors(metadata: list[tuple[str, str]]) -> list[grpc.aio.ClientInterceptor]:
    # grpc.aio files each interceptor under the first kind it is, so one object per kind.
    kinds = (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)
    return [kind(metadata) for kind in kinds]


class _SyncMetadata(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, metadata: list[tuple[str, str]]) -> None:
        self._metadata = metadata

    def _details(self, details: Any) -> Any:
        return _SyncCallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), *self._metadata],
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _SyncCallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression
