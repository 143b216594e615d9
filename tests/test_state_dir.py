"""A service's own state (session store, resume secret) lives apart from the shared model files,
and every test gets a state directory of its own (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployments.settings import AppSettings
from deployments.state_dir import STATE_ENV, state_dir
from deployments.store import default_sqlite_url
from sinkcache.models.assets import cache_root

_SEEN: dict[str, tuple[Path, str]] = {}


def test_the_state_directory_defaults_to_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(STATE_ENV)
    monkeypatch.delenv("SINKSERVE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert state_dir() == tmp_path / ".cache" / "sinkserve"
    monkeypatch.setenv("SINKSERVE_CACHE", str(tmp_path / "cache"))
    assert state_dir() == tmp_path / "cache"
    monkeypatch.setenv(STATE_ENV, str(tmp_path / "state"))
    assert state_dir() == tmp_path / "state"
    assert cache_root() == tmp_path / "cache"  # the model files stay where they were
    assert default_sqlite_url() == f"sqlite://{tmp_path}/state/sessions.db"
    monkeypatch.delenv("SINKSERVE_RESUME_SECRET", raising=False)
    secret = AppSettings().resume_secret
    assert (tmp_path / "state" / "resume_secret").read_text() == secret
    assert not (tmp_path / "cache" / "resume_secret").exists()


@pytest.mark.parametrize("turn", ["first", "second"])
def test_every_test_has_a_state_directory_of_its_own(
    turn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SINKSERVE_RESUME_SECRET", raising=False)
    home_cache = (Path.home() / ".cache" / "sinkserve").resolve()
    assert home_cache not in state_dir().resolve().parents and state_dir() != home_cache
    assert not default_sqlite_url().startswith(f"sqlite://{home_cache}")
    _SEEN[turn] = (state_dir(), AppSettings().resume_secret)  # made up in this test's directory
    if turn == "second":
        assert _SEEN["first"][0] != _SEEN["second"][0]
        assert _SEEN["first"][1] != _SEEN["second"][1], "a resume secret shared between tests"
