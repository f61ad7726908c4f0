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


@pytest.mark.parametrize(
    ("missing", "fine", "refused"),
    [("openvino_genai", ("transformers", "auto"), "openvino"), ("torch", ("openvino",), "transformers")],
)
def test_an_engine_starts_without_the_other_engines_package(
    monkeypatch: pytest.MonkeyPatch, missing: str, fine: tuple[str, ...], refused: str
) -> None:
    """A GPU machine with PyTorch and no openvino-genai serves with --engine transformers (and auto, which then
    falls back to transformers); the OpenVINO engine needs no torch."""
    without(monkeypatch, missing)
    for engine in fine:
        cli._server_installed(engine)
    with pytest.raises(ModuleNotFoundError) as err:
        cli._server_installed(refused)
    assert err.value.name == missing


def test_a_missing_server_package_is_named_whatever_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    without(monkeypatch, "uvicorn")
    for engine in ("auto", "openvino", "transformers"):
        with pytest.raises(ModuleNotFoundError) as err:
            cli._server_installed(engine)
        assert err.value.name == "uvicorn"
