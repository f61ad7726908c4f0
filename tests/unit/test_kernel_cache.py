"""OpenVINO's compiled-model cache is kept to a bounded size, least recently used first to go."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tokenwire.engine.openvino import kernel_cache


def blob(where: Path, name: str, size: int, age_s: int) -> Path:
    path = where / name
    path.write_bytes(b"x" * size)
    t = 1_700_000_000 - age_s
    os.utime(path, (t, t))
    return path


def test_the_least_recently_used_blobs_beyond_the_bound_are_removed(tmp_path: Path) -> None:
    old = blob(tmp_path, "old.blob", 400, age_s=300)
    mid = blob(tmp_path, "mid.blob", 400, age_s=200)
    new = blob(tmp_path, "new.blob", 400, age_s=100)
    removed = kernel_cache.prune(tmp_path, keep_bytes=900)
    assert removed == [old] and not old.exists() and mid.exists() and new.exists()
    assert kernel_cache.prune(tmp_path, keep_bytes=900) == []


def test_the_newest_blob_stays_even_when_it_alone_is_over_the_bound(tmp_path: Path) -> None:
    new = blob(tmp_path, "new.blob", 1000, age_s=1)
    old = blob(tmp_path, "old.blob", 10, age_s=50)
    assert kernel_cache.prune(tmp_path, keep_bytes=100) == [old]
    assert new.exists()


def test_a_missing_folder_is_left_alone(tmp_path: Path) -> None:
    assert kernel_cache.prune(tmp_path / "none") == []


def test_the_folder_is_in_tokenwires_cache_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENWIRE_CACHE_DIR", str(tmp_path))
    assert kernel_cache.folder() == tmp_path / "openvino-kernels"
