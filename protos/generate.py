"""Generate the Python code for the sinkserve gRPC contract (reproducibly).

    python protos/generate.py            # writes sinkwire/v1/streaming_llm_pb2{,_grpc}.py{,i}
    python protos/generate.py --out DIR  # elsewhere (the drift test compares the two)

The .proto stays at sinkserve/v1/ (its path is part of the contract: reflection serves it, and
clients generate from the copy shipped in the wheel), but its Python code lives in the torch-free
package `sinkwire`, which servers and clients both import. protoc names Python modules after the
.proto's path, so the generated imports and module names are rewritten from `sinkserve.v1` to
`sinkwire.v1`; the descriptors (package `sinkserve.v1`) are left as they are.

The generator is grpcio-tools, pinned in pyproject.toml: the same version always writes the same
bytes, and the generated code then needs grpcio >= that version at run time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
PROTOS = ["sinkserve/v1/streaming_llm.proto"]
PROTO_PACKAGE_DIR = Path("sinkserve/v1")
PYTHON_PACKAGE_DIR = Path("sinkwire/v1")
# What protoc writes for the .proto's path, and what it must say for the Python package.
_REWRITES = [
    ("from sinkserve.v1 import ", "from sinkwire.v1 import "),
    ("'sinkserve.v1.streaming_llm_pb2'", "'sinkwire.v1.streaming_llm_pb2'"),
    ("code in sinkserve/v1/", "code in sinkwire/v1/"),
]


def generate(out: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) on our protos, into `out`/sinkwire/v1; returns the files."""
    from grpc_tools import protoc

    target = out / PYTHON_PACKAGE_DIR
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as raw:
        for proto in PROTOS:
            args = [
                "grpc_tools.protoc",
                f"--proto_path={PROTO_ROOT}",
                f"--python_out={raw}",
                f"--pyi_out={raw}",
                f"--grpc_python_out={raw}",
                proto,
            ]
            if protoc.main(args) != 0:
                raise RuntimeError(f"protoc failed on {proto}")
        for source in sorted((Path(raw) / PROTO_PACKAGE_DIR).glob("*_pb2*.py*")):
            text = source.read_text()
            for old, new in _REWRITES:
                text = text.replace(old, new)
            (target / source.name).write_text(text)
    return sorted(target.glob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO_ROOT)
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
