"""The tree keeps its shape: light front ends, and imports that only run one way."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("sinkcache", "deployments", "sinkserve", "sinkwire")


@pytest.mark.parametrize(
    "modules",
    [
        # the public endpoint and the routing table: gRPC only
        ("deployments.gateway", "deployments.directory"),
        # the OpenAI-compatible HTTP door in the gateway process (uvicorn, Starlette)
        ("deployments.openai_front", "deployments.openai_wire", "deployments.openai_sessions"),
        # a replica's gRPC process, whose engine runs in a child process
        ("deployments.replica", "deployments.session_service", "sinkcache.host.start"),
        # what a client needs
        ("sinkserve.client", "sinkwire.v1.streaming_llm_pb2_grpc"),
    ],
)
def test_front_ends_load_no_torch(modules: tuple[str, ...]) -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + "heavy = sorted(m for m in ('torch', 'triton', 'transformers', 'sinkcache.core')"
        " if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "", f"importing {modules} loaded {out.stdout.strip()}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, known: set[str]) -> set[str]:
    """Project modules a file imports at run time (anywhere in it, not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only |= {id(n) for child in node.body for n in ast.walk(child)}
    package = _module_name(path).rsplit(".", 0 if path.name == "__init__.py" else 1)[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def test_no_import_circle_between_files() -> None:
    files = {_module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    known = set(files)
    graph = {
        name: {m for m in _imports(path, known) if m != name and not name.startswith(m + ".")}
        for name, path in files.items()
    }
    # A package's __init__ is imported on the way to its modules; ours hold docstrings only.
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)
