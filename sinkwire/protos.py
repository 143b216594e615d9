"""Where the installed .proto files are, for generic gRPC tools and generated clients.

A wheel carries them as sinkwire/protos/ (pyproject's force-include); a source checkout or an
editable install reads the repository's protos/ directly.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

PROTO_FILE = "sinkserve/v1/streaming_llm.proto"


def proto_root() -> Path:
    """The directory to pass to protoc as --proto_path (it holds sinkserve/v1/*.proto)."""
    packaged = Path(str(resources.files("sinkwire"))) / "protos"
    if (packaged / PROTO_FILE).is_file():
        return packaged
    checkout = Path(__file__).resolve().parent.parent / "protos"
    if (checkout / PROTO_FILE).is_file():
        return checkout
    raise FileNotFoundError("the sinkserve .proto files are not installed")
