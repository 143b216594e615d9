"""gRPC options shared by every sinkserve server and by the channels between them."""

from __future__ import annotations

# The largest client message a service takes (AppSettings.max_message_bytes; gRPC's own default).
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024

# Long-lived bidirectional streams: keepalives find dead peers, and one connection may carry
# thousands of concurrent session streams.
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.so_reuseport", 0),  # fail loudly instead of silently sharing a port
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_concurrent_streams", 100_000),
]


def server_options(
    reuse_port: bool = False, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> list[tuple[str, int]]:
    """SERVER_OPTIONS; `reuse_port` lets several processes share one port (the kernel spreads
    connections over them); a received message over `max_message_bytes` ends its call with
    RESOURCE_EXHAUSTED."""
    options = [option for option in SERVER_OPTIONS if option[0] != "grpc.so_reuseport"]
    return [
        *options,
        ("grpc.so_reuseport", int(reuse_port)),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
