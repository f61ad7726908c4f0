"""Settings come from defaults, TOKENWIRE_* variables and flags, in that order of precedence."""

from __future__ import annotations

import pytest

from tokenwire.cli import settings_from_args
from tokenwire.config import Settings, from_env


def test_defaults_serve_the_default_model_on_localhost_8765() -> None:
    s = Settings()
    assert (s.host, s.port, s.model, s.device, s.dtype) == ("127.0.0.1", 8765, None, "auto", "auto")


def test_environment_variables_set_fields_with_their_types() -> None:
    s = from_env({"TOKENWIRE_PORT": "9000", "TOKENWIRE_MODEL": "/models/x", "TOKENWIRE_HEARTBEAT_INTERVAL": "2.5"})
    assert s.port == 9000 and s.model == "/models/x" and s.heartbeat_interval == 2.5


def test_a_bad_number_in_the_environment_names_the_variable() -> None:
    with pytest.raises(ValueError, match="TOKENWIRE_PORT"):
        from_env({"TOKENWIRE_PORT": "eighty"})


def test_flags_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENWIRE_PORT", "9000")
    monkeypatch.setenv("TOKENWIRE_DEVICE", "cpu")
    s = settings_from_args(["serve", "--port", "9100", "--max-batch-size", "8"])
    assert s.port == 9100 and s.device == "cpu" and s.max_batch_size == 8


def test_every_setting_has_a_flag() -> None:
    s = settings_from_args(["serve", "--max-model-len", "1024", "--dtype", "bfloat16", "--host", "0.0.0.0"])
    assert (s.max_model_len, s.dtype, s.host) == (1024, "bfloat16", "0.0.0.0")
