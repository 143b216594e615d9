import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from deployments.state_dir import STATE_ENV
from tests.seeds import BASE_SEED, SEED_ENV

# Triton kernels run in Triton's interpreter on CPU tensors; it must be on before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every test keeps a service's state (the SQLite session store, the made-up resume secret) in a
# directory of its own, never in the user's ~/.cache/sinkserve: no sessions or tokens leak between
# tests, runs, or into a developer's own service. The model files stay in the shared cache
# (SINKSERVE_CACHE), so nothing is downloaded or converted twice. Set in the environment, so the
# processes a test starts (Ray's workers, `sinkserve serve`) inherit it.
_STATE_ROOT = Path(tempfile.mkdtemp(prefix="sinkserve-test-state-"))
os.environ[STATE_ENV] = str(_STATE_ROOT / "collection")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before the test's fixtures: a module-scoped service started for its first test lives in
    that test's directory."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", item.nodeid)[-150:]
    path = _STATE_ROOT / name
    path.mkdir(parents=True, exist_ok=True)
    os.environ[STATE_ENV] = str(path)


def pytest_report_header(config: pytest.Config) -> str:
    return f"random test data: {SEED_ENV}={BASE_SEED} (tests/seeds.py)"


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_STATE_ROOT, ignore_errors=True)
