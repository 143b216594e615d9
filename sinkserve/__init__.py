"""sinkserve client, CLI and generated gRPC contract."""
