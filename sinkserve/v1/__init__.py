"""Generated gRPC code for the sinkserve.v1 contract (see protos/generate.py)."""
