"""The CLI helps: every option has a help line and shows its default, --version, -v anywhere, the
random presets listed; `sinkserve serve --config FILE`: defaults < file < options, unknown names
refused with one line. No Ray is started here."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from deployments.settings import AppSettings
from sinkcache.config import PRESETS
from sinkserve.cli import build_parser
from sinkserve.preflight import resolve_settings
from tests.service import free_port, run_sinkserve

REPO = Path(__file__).resolve().parent.parent


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_every_option_has_help_and_shows_its_default(command: str) -> None:
    parser = _subcommands()[command]
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings[-1]
        assert action.help and action.help.strip(), f"{command} {name} has no help line"
        if action.default not in (None, False, argparse.SUPPRESS):
            assert f"(default: {action.default})" in text, f"{command} {name} hides its default"


def test_serve_options_default_to_the_settings_declared_defaults() -> None:
    """Options default to None so a config file is not overridden, yet the help shows the
    setting's own default."""
    serve = _subcommands()["serve"]
    text = " ".join(serve.format_help().split())
    assert "--window INT recent tokens each session keeps (a ring) (default: 1020)" in text
    assert "--port INT the gateway's public gRPC port (default: 50051)" in text
    args = serve.parse_args([])
    assert args.window is None and args.port is None


def test_model_help_lists_every_random_preset() -> None:
    (model,) = [a for a in _subcommands()["serve"]._actions if a.dest == "model"]
    for preset in PRESETS:
        assert preset in model.help


def test_version() -> None:
    done = run_sinkserve("--version")
    assert done.returncode == 0
    assert done.stdout.startswith("sinkserve ")


@pytest.mark.parametrize(
    "argv", [["-v", "chat"], ["chat", "-v"], ["--verbose", "stats"], ["stats", "--verbose"]]
)
def test_verbose_before_or_after_the_subcommand(argv: list[str]) -> None:
    assert build_parser().parse_args(argv).verbose is True
    assert getattr(build_parser().parse_args(["chat"]), "verbose", False) is False


def test_config_file_precedence_defaults_file_flags(tmp_path: Path) -> None:
    config = tmp_path / "sinkserve.yaml"
    config.write_text("window: 100\nslots: 8\nreplicas: 2\nmodel: tiny\n")
    settings = resolve_settings(str(config), {"window": 50})
    assert settings.engine.window == 50  # the option wins over the file
    assert settings.engine.slots == 8 and settings.replicas == 2  # the file wins over defaults
    assert settings.engine.sink == AppSettings().engine.sink  # the default where neither says
    assert settings.engine.model == "tiny"


def test_config_file_through_the_command(tmp_path: Path) -> None:
    config = tmp_path / "sinkserve.yaml"
    config.write_text("window: 100\nslots: 8\nmodel: tiny\nport: 50123\n")
    done = run_sinkserve("serve", "--config", str(config), "--window", "50", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "window: 50\n" in done.stdout and "slots: 8\n" in done.stdout
    assert "model: tiny\n" in done.stdout and "port: 50123\n" in done.stdout
    assert "resume_secret" not in done.stdout


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("windw: 100\n", "unknown setting(s) windw; known: model, sink, window"),
        ("window: [1, 2]\n", "must hold flat name: value pairs"),
        ("window: big\n", "setting window='big' is not a valid int"),
        ("window: 0\n", "window must be >= 1, got 0"),
        ("window: 100\n  slots: : 3\n", "is not YAML"),
    ],
)
def test_config_file_errors_are_one_line(tmp_path: Path, content: str, says: str) -> None:
    config = tmp_path / "sinkserve.yaml"
    config.write_text(content)
    done = run_sinkserve("serve", "--config", str(config), "--dry-run")
    assert done.returncode == 2
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("sinkserve: error: ") and says in line, line


def test_a_missing_config_file_is_one_line(tmp_path: Path) -> None:
    done = run_sinkserve("serve", "--config", str(tmp_path / "nope.yaml"))
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert "cannot read the config file" in line and "No such file" in line


def test_stats_table_fits_a_terminal() -> None:
    from rich.console import Console

    from sinkserve.stats import stats_table
    from sinkwire.v1 import streaming_llm_pb2 as pb

    replica = pb.ReplicaStats(
        replica_id="2tq8xj0b", sessions=2, slots_total=1100, slots_used=1000, model="tiny",
        device="cpu", generated_tokens=12_345_678, step_ms_p50=12.3, kv_bytes=300 << 20,
    )  # fmt: skip
    stats = pb.StatsResponse(sessions=2, slots_total=1100, slots_used=1000, replicas=[replica])
    console = Console(width=80, record=True)
    console.print(stats_table(stats, "localhost:50051"))
    text = console.export_text()
    for cell in ("2tq8xj0b", "1000/1100", "12,345,678", "12.3", "300", "tiny on cpu"):
        assert cell in text


def test_stats_against_nothing_is_one_line() -> None:
    port = free_port()
    done = run_sinkserve("stats", "--target", f"127.0.0.1:{port}", "--timeout", "2")
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"sinkserve: error: 127.0.0.1:{port} did not answer: UNAVAILABLE")


def test_chat_against_nothing_says_how_to_start_a_service() -> None:
    """Not gRPC's raw connection error: that nothing answers there, and what to do (issue 24)."""
    port = free_port()
    done = run_sinkserve("chat", "--target", f"localhost:{port}")
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"sinkserve: error: nothing answers at localhost:{port}: "), line
    assert "`sinkserve serve`" in line


def test_serve_help_shows_the_effective_session_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's default is resolved from the environment; the help shows what it resolves to,
    not an empty default (issue 24)."""
    monkeypatch.delenv("SINKSERVE_SESSION_STORE", raising=False)
    text = " ".join(_subcommands()["serve"].format_help().split())
    assert "else sqlite (default: sqlite)" in text
