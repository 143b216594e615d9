"""The image recipe (k8s/Dockerfile) without a Docker daemon: its model step, run as the image's
user (uid 1000) in a tree laid out like the Ray image (root-owned system dirs, a home owned by the
user), fetches the default model; the cache dir the old recipe used fails there as it did in the
image. The build context leaves local environments out."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "k8s" / "Dockerfile"
IMAGE_UID, IMAGE_GID = 1000, 100  # rayproject/ray: user `ray`, group `users`
SYSTEM_PYTHON = Path("/usr/bin/python3")  # readable by any uid, unlike a Python under /root


def _env(name: str) -> str:
    match = re.search(rf"^ENV {name}=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert match, f"the Dockerfile sets no {name}"
    return match.group(1)


def _model_step() -> str:
    """The Python code of the RUN step that bakes the model in."""
    match = re.search(r'python -c "([^"]*default_model\(\)[^"]*)"', DOCKERFILE.read_text())
    assert match, "the Dockerfile has no model step"
    return match.group(1)


def test_the_recipe_runs_as_the_image_user_with_a_cache_in_its_home() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^USER ray$", text, re.MULTILINE)
    assert _env("SINKSERVE_CACHE").startswith("/home/ray/")
    # the step imports what the package ships (sinkcache.assets moved to sinkcache.models.assets)
    code = _model_step()
    module = re.search(r"from (\S+) import", code).group(1)
    assert (REPO / Path(*module.split("."))).with_suffix(".py").is_file()
    # a CPU image installs PyTorch's CPU wheel before the package, so pip keeps it
    assert "download.pytorch.org/whl/cpu" in text
    assert text.index("torch>=") < text.index("pip install --no-cache-dir /home/ray/sinkserve")


def test_the_build_context_leaves_local_state_out() -> None:
    ignored = {
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip()
    }
    assert {".git", ".venv", ".whl", "**/__pycache__"} <= ignored
    assert "README.md" not in ignored and "protos" not in ignored  # the wheel build needs them


def _run_as_image_user(code: str, home: Path, cache: Path, sandbox: Path):
    """`code` under the system Python as uid 1000, with this tree's sinkcache and filelock
    (copied where that uid can read them) and pip for the download."""
    site = sandbox / "site"
    shutil.copytree(REPO / "sinkcache", site / "sinkcache", ignore=shutil.ignore_patterns("*.pyc"))
    import filelock

    shutil.copytree(Path(filelock.__file__).parent, site / "filelock")
    for path in (sandbox, site):
        path.chmod(0o755)
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "SINKSERVE_CACHE": str(cache),
        "PYTHONPATH": str(site),
        # the registry this machine uses (index and mirrors come from pip's environment)
        **{k: v for k, v in os.environ.items() if k.startswith("PIP_")},
    }
    return subprocess.run(
        ["setpriv", f"--reuid={IMAGE_UID}", f"--regid={IMAGE_GID}", "--clear-groups",
         str(SYSTEM_PYTHON), "-c", code],
        env=env, capture_output=True, text=True, timeout=600, cwd=home,
    )  # fmt: skip


needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not SYSTEM_PYTHON.exists() or not shutil.which("setpriv"),
    reason="needs root (to switch to uid 1000), setpriv and /usr/bin/python3",
)


@pytest.fixture
def open_tmp():
    """A temporary dir that uid 1000 can reach (pytest's own are under a 0700 dir)."""
    path = Path(tempfile.mkdtemp(prefix="sinkserve-image-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
@needs_root
def test_the_model_step_works_as_uid_1000_and_the_old_cache_dir_did_not(open_tmp: Path) -> None:
    tmp_path = open_tmp
    probe = subprocess.run([str(SYSTEM_PYTHON), "-m", "pip", "--version"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("the system Python has no pip")
    root = tmp_path / "image"  # owned by root, mode 755: like / and /opt in the image
    home = root / "home" / "ray"
    home.mkdir(parents=True)
    (root / "opt").mkdir()
    for path in (tmp_path, root, root / "home", root / "opt"):
        path.chmod(0o755)
    os.chown(home, IMAGE_UID, IMAGE_GID)

    # The model half of the step (the tokenizer half needs transformers, which the system Python
    # lacks; it writes into the same cache root, whose permissions this proves).
    code = _model_step().split(";")[0] + "; print(default_model().path)"
    cache = root / _env("SINKSERVE_CACHE").lstrip("/")
    done = _run_as_image_user(code, home, cache, tmp_path / "fixed")
    assert done.returncode == 0, done.stderr
    gguf = Path(done.stdout.strip().splitlines()[-1])
    assert gguf.is_file() and gguf.stat().st_uid == IMAGE_UID
    assert gguf.read_bytes()[:4] == b"GGUF"

    old = _run_as_image_user(code, home, root / "opt" / "sinkserve-cache", tmp_path / "old")
    assert old.returncode != 0 and "PermissionError" in old.stderr
