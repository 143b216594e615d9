"""bench/gpu_bundle.py without the network: Ray's repack, the RECORD check, the closure walk."""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.util
import io
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.version import Version

_PATH = Path(__file__).resolve().parents[1] / "bench" / "gpu_bundle.py"
_spec = importlib.util.spec_from_file_location("gpu_bundle", _PATH)
gpu_bundle = importlib.util.module_from_spec(_spec)
sys.modules["gpu_bundle"] = gpu_bundle  # dataclasses resolve their module by name
_spec.loader.exec_module(gpu_bundle)


def _hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(path: Path, files: dict[str, bytes], requires: list[str] = ()) -> Path:
    name, version = path.name.split("-")[:2]
    info = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    files = {
        **files,
        f"{info}/METADATA": metadata.encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\n",
    }
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for member, data in files.items():
            wheel.writestr(member, data)
            writer.writerow([member, _hash(data), len(data)])
        writer.writerow([f"{info}/RECORD", "", ""])
        wheel.writestr(f"{info}/RECORD", record.getvalue())
    return path


def test_repack_drops_java_and_source_maps_and_keeps_record_true(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(gpu_bundle, "LZMA_FROM_BYTES", 4096)
    binary = bytes(range(256)) * 64  # 16 KiB: recompressed with LZMA
    source = make_wheel(
        tmp_path / "ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl",
        {
            "ray/__init__.py": b"__version__ = '2.60.0'\n",
            "ray/_raylet.so": binary,
            "ray/jars/ray_dist.jar": b"java" * 100,
            "ray/dashboard/client/build/index.html": b"<html/>",
            "ray/dashboard/client/build/static/js/main.js": b"js()",
            "ray/dashboard/client/build/static/js/main.js.map": b"{}",
            "ray/dashboard/client/build/static/css/main.css.map": b"{}",
            "ray/_private/runtime_env/java_jars.py": b"# kept: not under ray/jars/\n",
        },
    )
    assert gpu_bundle.verify_wheel(source) == []
    assert not gpu_bundle.is_repacked(source, use_lzma=True)

    target = tmp_path / "out" / source.name
    target.parent.mkdir()
    assert gpu_bundle.repack_ray(source, target, use_lzma=True) == 3

    assert gpu_bundle.verify_wheel(target) == []
    assert gpu_bundle.is_repacked(target, use_lzma=True)
    assert not gpu_bundle.is_repacked(target, use_lzma=False)
    with zipfile.ZipFile(target) as wheel:
        names = set(wheel.namelist())
        record = wheel.read("ray-2.60.0.dist-info/RECORD").decode()
        assert wheel.getinfo("ray/_raylet.so").compress_type == zipfile.ZIP_LZMA
        assert wheel.read("ray/_raylet.so") == binary
    assert "ray/jars/ray_dist.jar" not in names and "ray/jars" not in record
    assert not any(n.endswith(".map") for n in names) and ".map" not in record
    assert {
        "ray/dashboard/client/build/index.html",
        "ray/_private/runtime_env/java_jars.py",
    } <= names


def test_verify_wheel_names_every_kind_of_damage(tmp_path) -> None:
    good = make_wheel(
        tmp_path / "good-1.0-py3-none-any.whl", {"good/a.py": b"a", "good/b.py": b"b"}
    )
    bad = tmp_path / "bad" / good.name
    bad.parent.mkdir()
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            if info.filename == "good/b.py":
                continue  # listed, absent
            data = src.read(info) + (b"!" if info.filename == "good/a.py" else b"")
            dst.writestr(info, data)
        dst.writestr("good/extra.py", b"unlisted")
    problems = "\n".join(gpu_bundle.verify_wheel(bad))
    assert "good/a.py hash differs" in problems
    assert "good/a.py size differs" in problems
    assert "RECORD lists good/b.py, which is not in the wheel" in problems
    assert "good/extra.py is not in RECORD" in problems


def test_closure_follows_extras_and_markers_and_names_what_is_missing(monkeypatch) -> None:
    monkeypatch.setattr(gpu_bundle, "SKIPPED", {"skipme": "not imported"})
    dists = {
        "app": gpu_bundle.Dist(
            Version("1.0"),
            [
                "lib>=2",
                'extra-only>=1; extra == "serve"',
                'old-python-only; python_version < "3.12"',
                "skipme",
                "image-pkg>=3",
                "image-known>=9",
            ],
            "bundle",
        ),
        "lib": gpu_bundle.Dist(Version("2.5"), ["missing-dep"], "bundle"),
        "extra-only": gpu_bundle.Dist(Version("0.5"), [], "bundle"),
        "image-pkg": gpu_bundle.Dist(None, None, "image"),
        "image-known": gpu_bundle.Dist(Version("8"), None, "image"),
    }
    closure = gpu_bundle.check_closure(["app[serve]==1.0"], dists.get)
    assert sorted(closure.failed) == [
        "UNRESOLVED missing-dep (from lib)",
        "VERSION extra-only>=1 (from app[serve]): bundle has 0.5",
        "VERSION image-known>=9 (from app[serve]): image has 8",
    ]
    assert closure.assumed == {"image-pkg": {">=3"}}
    assert closure.skipped == {"skipme": "not imported"}
    assert "old-python-only" not in closure.reached


@pytest.mark.parametrize(
    ("name", "needed"),
    [
        ("x-1-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", (2, 17)),
        ("x-1-cp312-cp312-manylinux1_x86_64.manylinux_2_28_x86_64.whl", (2, 5)),
        ("x-1-py3-none-any.whl", None),
    ],
)
def test_glibc_needed_is_the_oldest_tag(name, needed) -> None:
    assert gpu_bundle.glibc_needed(Path(name)) == needed


def test_every_pin_is_one_version_and_no_pin_is_skipped() -> None:
    pins = gpu_bundle.plan(image_grpc=False)
    assert pins["ray"] == gpu_bundle.RAY_VERSION
    assert not set(pins) & set(gpu_bundle.SKIPPED)
    assert {"grpcio", "protobuf"} - set(gpu_bundle.plan(image_grpc=True)) == {"grpcio", "protobuf"}
