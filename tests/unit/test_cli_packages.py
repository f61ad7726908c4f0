"""`tokenwire serve` checks for the server's packages and the chosen engine's, not for every engine's."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from tokenwire import cli


def without(monkeypatch: pytest.MonkeyPatch, *missing: str) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name in missing else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_the_transformers_engine_starts_without_openvino(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU machine with PyTorch and no openvino-genai serves with --engine transformers (and auto, which then
    falls back to transformers)."""
    without(monkeypatch, "openvino_genai")
    cli._server_installed("transformers")
    cli._server_installed("auto")
    with pytest.raises(ModuleNotFoundError) as err:
        cli._server_installed("openvino")
    assert err.value.name == "openvino_genai"


def test_the_openvino_engine_starts_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    without(monkeypatch, "torch")
    cli._server_installed("openvino")
    with pytest.raises(ModuleNotFoundError) as err:
        cli._server_installed("transformers")
    assert err.value.name == "torch"


def test_a_missing_server_package_is_named_whatever_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    without(monkeypatch, "uvicorn")
    for engine in ("auto", "openvino", "transformers"):
        with pytest.raises(ModuleNotFoundError) as err:
            cli._server_installed(engine)
        assert err.value.name == "uvicorn"
