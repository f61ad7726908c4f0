"""Settings come from defaults, TOKENWIRE_* variables and flags, in that order of precedence."""

from __future__ import annotations

from dataclasses import fields

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


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-batch-size", "0"], "--max-batch-size must be a number at least 1, not 0"),
        (["--threads", "-1"], "--threads must be a number at least 0, not -1"),
        (["--kv-cache-tokens", "10"], "--kv-cache-tokens must be a number at least 32, not 10"),
        (["--queue-timeout", "nan"], "--queue-timeout must be a number at least 0, not nan"),
        (["--journal-lease", "0"], "--journal-lease must be a number above 0, not 0.0"),
        (["--port", "70000"], "--port must be a port number, 0 to 65535, not 70000"),
    ],
)
def test_a_number_out_of_its_range_is_refused_naming_the_flag(flags: list[str], message: str) -> None:
    with pytest.raises(ValueError) as err:
        settings_from_args(["serve", *flags]).check()
    assert str(err.value) == message


def test_the_defaults_and_zero_for_off_pass_the_check() -> None:
    Settings().check()
    settings_from_args(["serve", "--max-connections", "0", "--resume-window", "0", "--threads", "0"]).check()


def test_every_setting_whose_help_gives_zero_a_meaning_accepts_zero() -> None:
    """A flag documented as "(0: off)" or "(0: no limit)" must not be refused at 0 (--max-unsent-tokens was)."""
    documented = [f.name for f in fields(Settings) if "(0:" in f.metadata.get("help", "")]
    assert "max_unsent_tokens" in documented and "max_connections" in documented
    for name in documented:
        Settings().replace(**{name: 0}).check()
    assert settings_from_args(["serve", "--max-unsent-tokens", "0"]).max_unsent_tokens == 0


def test_serve_with_a_number_out_of_range_exits_before_loading_anything() -> None:
    from tokenwire.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", "--max-batch-size", "0"])
    assert exc.value.code == "tokenwire: error: --max-batch-size must be a number at least 1, not 0"
