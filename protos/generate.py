"""Generate the Python code for the sinkserve gRPC contract (reproducibly).

    python protos/generate.py            # writes sinkserve/v1/streaming_llm_pb2{,_grpc}.py{,i}
    python protos/generate.py --out DIR  # elsewhere (the drift test compares the two)

The generator is grpcio-tools, pinned in pyproject.toml: the same version always writes the same
bytes, and the generated code then needs grpcio >= that version at run time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
PROTOS = ["sinkserve/v1/streaming_llm.proto"]


def generate(out: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) on our protos into `out`; returns the files written."""
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    for proto in PROTOS:
        args = [
            "grpc_tools.protoc",
            f"--proto_path={PROTO_ROOT}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            proto,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
    return sorted(p for p in (out / "sinkserve" / "v1").glob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO_ROOT)
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
