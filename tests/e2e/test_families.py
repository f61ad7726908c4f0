"""Model families beyond Llama, as a user brings them (a Hugging Face folder): served by the OpenVINO engine."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import scaled
from tests.e2e.server import serve
from tests.tiny import save_tiny_family


@pytest.mark.parametrize("architecture", ["Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_a_qwen_folder_is_served_by_the_openvino_engine(architecture: str, tmp_path: Path) -> None:
    """``tokenwire serve --model DIR`` with engine auto: the folder is converted once and served on OpenVINO (not
    eager PyTorch, a fifth of the speed); a chat completion streams its tokens and ends."""
    folder = save_tiny_family(tmp_path / architecture, architecture)
    with serve("--model", str(folder), "--device", "cpu", startup_timeout=180) as server:
        assert server.get_json("/v1/stats")["engine"]["backend"] == "openvino"
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "ignore_eos": True}
        r = httpx.post(server.http + "/v1/chat/completions", json=body, timeout=scaled(60))
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
