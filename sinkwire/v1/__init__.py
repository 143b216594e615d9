"""Generated code of the sinkserve.v1 contract (protos/generate.py writes it; do not edit)."""
