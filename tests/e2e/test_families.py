"""Model families beyond Llama, as a user brings them (a Hugging Face folder): served by the OpenVINO engine."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import scaled
from tests.e2e.server import serve
from tests.tiny import save_tiny_family


@pytest.mark.parametrize(
    ("architecture", "tokenizer"),
    [
        ("Qwen2ForCausalLM", "byte-level"),
        ("Qwen3ForCausalLM", "byte-level"),
        ("MistralForCausalLM", "sentencepiece"),
        ("Gemma3ForCausalLM", "sentencepiece"),
        ("Gemma3ForConditionalGeneration", "sentencepiece"),  # Gemma 3 4B-27B: served as its language model
    ],
)
def test_a_qwen_mistral_or_gemma3_folder_is_served_by_the_openvino_engine(
    architecture: str, tokenizer: str, tmp_path: Path
) -> None:
    """``tokenwire serve --model DIR`` with engine auto: the folder is converted once and served on OpenVINO (not
    eager PyTorch, a fifth of the speed); a chat completion streams its tokens and ends. (Mistral and Gemma 3 here
    have a sliding window of 8, kept, and a SentencePiece tokenizer, as theirs.)"""
    folder = save_tiny_family(tmp_path / architecture, architecture, tokenizer=tokenizer)
    with serve("--model", str(folder), "--device", "cpu", startup_timeout=180) as server:
        assert server.get_json("/v1/stats")["engine"]["backend"] == "openvino"
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "ignore_eos": True}
        r = httpx.post(server.http + "/v1/chat/completions", json=body, timeout=scaled(60))
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8


def test_a_sentencepiece_folder_is_served_by_openvino_and_its_grammar_reads_the_right_bytes(tmp_path: Path) -> None:
    """A Llama with a SentencePiece tokenizer (Llama 2, Mistral, TinyLlama) used to fall back to eager PyTorch. On
    OpenVINO its vocabulary is written as bytes; a schema whose only answers are non-ASCII strings (byte pieces, a
    leading-space piece) gets exactly one of them, so the grammar backend read each token's bytes right."""
    import json

    from tests.tiny import save_tiny_sentencepiece_model

    folder = save_tiny_sentencepiece_model(tmp_path / "spm")
    choices = ["Wörld ünd", "日本 🦄", " naïve"]
    with serve("--model", str(folder), "--device", "cpu", startup_timeout=180) as server:
        assert server.get_json("/v1/stats")["engine"]["backend"] == "openvino"
        for seed in range(3):
            schema = {"type": "json_schema", "json_schema": {"name": "c", "schema": {"enum": choices}}}
            body = {"prompt": "Hello", "max_tokens": 40, "temperature": 1.0, "seed": seed, "response_format": schema}
            r = httpx.post(server.http + "/v1/completions", json=body, timeout=scaled(60))
            assert r.status_code == 200, r.text
            assert json.loads(r.json()["choices"][0]["text"]) in choices


@pytest.mark.parametrize("form", ["folder", "gguf"])
def test_a_phi3_folder_or_file_with_longrope_is_served_by_openvino_up_to_its_original_context(
    form: str, tmp_path: Path
) -> None:
    """Phi-3 (fused matrices, a sliding window, LongRoPE) on OpenVINO, from its folder or from the GGUF file
    llama.cpp's converter makes of it: a prompt longer than the window is answered; the context served is
    LongRoPE's original one (512 here; past it the model switches to its long factors), and a prompt past it is
    refused with an error naming the limit, while the server goes on."""
    from tests.tiny import save_phi3_gguf_as_llama_cpp_writes_it
    from tests.unit.test_ir import PHI3_LONGROPE

    folder = save_tiny_family(tmp_path / "phi3", "Phi3ForCausalLM", rope=PHI3_LONGROPE, tokenizer="sentencepiece")
    model = folder if form == "folder" else save_phi3_gguf_as_llama_cpp_writes_it(folder, tmp_path / "phi3.gguf")
    with serve("--model", str(model), "--device", "cpu", startup_timeout=180) as server:
        assert server.get_json("/v1/stats")["engine"]["backend"] == "openvino"
        body = {"prompt": "word " * 40, "max_tokens": 8, "ignore_eos": True}
        r = httpx.post(server.http + "/v1/completions", json=body, timeout=scaled(60))
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        r = httpx.post(server.http + "/v1/completions", json={**body, "prompt": "word " * 600}, timeout=scaled(60))
        assert r.status_code == 400 and "512" in r.text, r.text
        r = httpx.post(server.http + "/v1/completions", json=body, timeout=scaled(60))
        assert r.status_code == 200


def test_a_gemma3_gguf_file_as_llama_cpp_writes_it_is_served_by_the_openvino_engine(tmp_path: Path) -> None:
    """A Gemma 3 GGUF file from llama.cpp's converter (architecture gemma3, which OpenVINO GenAI does not build)
    used to stop the start; it is rewritten once as a file GenAI builds and served on OpenVINO."""
    from tests.tiny import save_gemma3_gguf_as_llama_cpp_writes_it

    folder = save_tiny_family(tmp_path / "gemma3", "Gemma3ForCausalLM", tokenizer="sentencepiece", layers=6)
    gguf = save_gemma3_gguf_as_llama_cpp_writes_it(folder, tmp_path / "gemma3.gguf", matrices="float16")
    with serve("--model", str(gguf), "--device", "cpu", startup_timeout=180) as server:
        assert server.get_json("/v1/stats")["engine"]["backend"] == "openvino"
        body = {"prompt": "Hello world", "max_tokens": 8, "ignore_eos": True}
        r = httpx.post(server.http + "/v1/completions", json=body, timeout=scaled(60))
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
