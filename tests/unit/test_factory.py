"""--engine: which backend serves which settings, and why."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenwire.config import Settings
from tokenwire.engine import GenerationRequest, OutputKind
from tokenwire.engine.factory import build_engine, choose_engine
from tokenwire.engine.hf.engine import HFEngine
from tokenwire.engine.interface import SamplingParams
from tokenwire.engine.models import ModelNotFoundError, NotForOpenVINO
from tokenwire.engine.openvino.engine import OVEngine


def test_auto_runs_gguf_files_on_openvino_on_the_cpu(tiny_gguf: Path) -> None:
    assert choose_engine(Settings(model=str(tiny_gguf), device="cpu"))[0] == "openvino"
    assert choose_engine(Settings())[0] == "openvino"  # the default model is a GGUF file
    assert isinstance(build_engine(Settings(model=str(tiny_gguf), device="cpu")), OVEngine)


def test_auto_falls_back_to_transformers_and_says_why(tiny_model_dir: Path, tiny_gguf: Path, tmp_path: Path) -> None:
    import json
    import shutil

    assert choose_engine(Settings(model=str(tiny_model_dir)))[0] == "openvino"  # a llama folder: converted
    other = tmp_path / "gpt2-like"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    kind, why = choose_engine(Settings(model=str(other)))
    assert kind == "transformers" and "GPT2LMHeadModel" in why
    kind, why = choose_engine(Settings(model=str(tiny_gguf), device="cuda"))
    assert kind == "transformers" and "cuda" in why
    assert choose_engine(Settings(model=str(tiny_gguf), quantize="int8"))[0] == "openvino"  # int8 IR
    assert isinstance(build_engine(Settings(model=str(other), device="cpu")), HFEngine)


def test_a_forced_engine_is_used_or_refused_with_a_reason(
    tiny_model_dir: Path, tiny_gguf: Path, tmp_path: Path
) -> None:
    import json
    import shutil

    assert isinstance(build_engine(Settings(model=str(tiny_gguf), engine="transformers", device="cpu")), HFEngine)
    other = tmp_path / "gpt2-like"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="--engine transformers"):
        build_engine(Settings(model=str(other), engine="openvino"))
    with pytest.raises(ValueError, match="cannot get hub model"):  # offline and not cached: no engine can have it
        build_engine(Settings(model="HuggingFaceTB/SmolLM2-135M-Instruct", engine="openvino"))
    with pytest.raises(ValueError, match="quantize"):
        build_engine(Settings(model=str(tiny_gguf), engine="openvino", quantize="int2"))
    with pytest.raises(ValueError, match="unknown engine"):
        choose_engine(Settings(engine="vllm"))


def test_the_default_quantize_is_accepted_by_both_engines(tiny_model_dir: Path, tiny_gguf: Path) -> None:
    assert Settings().quantize == "auto"
    assert isinstance(build_engine(Settings(model=str(tiny_gguf), engine="openvino")), OVEngine)
    assert isinstance(build_engine(Settings(model=str(tiny_model_dir), engine="transformers")), HFEngine)


def test_prepare_fills_the_cache_and_a_partial_or_corrupt_cache_is_rebuilt(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tokenwire.cli import main
    from tokenwire.engine.openvino.model import MARKER, tokenizer_folder

    monkeypatch.setenv("TOKENWIRE_CACHE_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as done:
        main(["prepare", "--model", str(tiny_gguf)])
    assert done.value.code == 0 and "openvino" in capsys.readouterr().out
    folder = tokenizer_folder(tiny_gguf)
    assert folder.parent == tmp_path and (folder / MARKER).is_file()
    (folder / MARKER).unlink()  # a build that stopped half-way
    assert (tokenizer_folder(tiny_gguf) / MARKER).is_file()
    (folder / "tokenizer.json").write_text("{not json")  # a corrupt file
    rebuilt = tokenizer_folder(tiny_gguf)
    assert (rebuilt / "tokenizer.json").read_text().startswith("{\n") or "model" in (
        rebuilt / "tokenizer.json"
    ).read_text()


def test_a_hub_id_that_cannot_be_had_stops_the_start_in_words(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline (as the tests run) and not cached: neither engine could load it, so it is an error at once, not a
    fallback to the transformers engine that fails later."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as err:
        choose_engine(Settings(model="nobody-here/no-such-model"))
    message = str(err.value)
    assert "cannot get hub model 'nobody-here/no-such-model'" in message and "HF_HUB_OFFLINE is set" in message
    assert not isinstance(err.value, NotForOpenVINO)


async def test_a_hub_id_in_the_local_cache_is_converted_for_openvino(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub id whose snapshot is in the Hugging Face cache (offline here) runs on OpenVINO like its folder."""
    import shutil

    import huggingface_hub.constants

    from tokenwire.engine import models
    from tokenwire.engine.openvino.model import plan

    repo = tmp_path / "hub" / "models--tiny--llama"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / "0123abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    found = plan(models.resolve("tiny/llama"))
    assert found.convert and found.source == repo / "snapshots" / "0123abc"
    assert choose_engine(Settings(model="tiny/llama"))[0] == "openvino"
    monkeypatch.setenv("TOKENWIRE_CACHE_DIR", str(tmp_path / "cache"))
    engine = build_engine(Settings(model="tiny/llama", max_batch_size=4, kv_cache_tokens=4096))
    await engine.start()
    try:
        request = GenerationRequest("h", SamplingParams(max_tokens=5, ignore_eos=True), prompt="Hello")
        outputs = [out async for out in engine.generate(request)]
        assert outputs[-1].kind is OutputKind.FINISHED and outputs[-1].completion_tokens == 5
        assert engine.stats().backend == "openvino" and engine.model_name == "llama"
    finally:
        await engine.shutdown()


def test_a_model_no_engine_can_serve_stops_the_start_with_one_line_naming_it(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """An architecture neither the OpenVINO route writes nor transformers knows: one ValueError naming it and the
    families that work, before anything starts (it used to start the server, then fail with transformers' long
    message)."""
    import json
    import shutil

    other = tmp_path / "foo"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["FooForCausalLM"], "model_type": "foo"}))
    with pytest.raises(ValueError, match="no engine can serve") as err:
        choose_engine(Settings(model=str(other)))
    assert "FooForCausalLM" in str(err.value) and "Qwen2ForCausalLM" in str(err.value)
    assert "\n" not in str(err.value)


def header_only_gguf(path: Path, arch: str, keys: dict[str, int] | None = None) -> Path:
    """A GGUF file with metadata and no tensors: what choosing an engine reads."""
    import gguf as gg

    writer = gg.GGUFWriter(str(path), arch)
    writer.add_array("general.tags", ["text-generation", "a tag before the model's keys"])
    writer.add_block_count(2)
    for key, value in (keys or {}).items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_token_list(["a", "b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("arch", ["gemma2", "phi3"])
def test_a_gguf_file_openvino_cannot_build_goes_to_llama_cpp_or_transformers_saying_why(
    arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file of an architecture OpenVINO GenAI does not build and tokenwire does not rewrite (gemma2), or a phi3 file
    whose rotary embeddings cover part of each head (Phi-4-mini's 96 of 128), used to stop the start at its
    conversion ("Unsupported model architecture"). What decides is read from the header at once: auto serves it on
    llama.cpp where llama-cpp-python is installed, else on the transformers engine, saying why; forced onto OpenVINO
    it is refused naming the ways out."""
    import importlib.util

    from tokenwire.engine import models

    keys = {"embedding_length": 3072, "attention.head_count": 24, "rope.dimension_count": 96} if arch == "phi3" else {}
    path = header_only_gguf(tmp_path / f"{arch}.gguf", arch, keys)
    assert models.gguf_architecture(path) == arch
    assert models.gguf_header(path) == {
        "general.architecture": arch,
        f"{arch}.block_count": 2,
        **{f"{arch}.{k}": v for k, v in keys.items()},
    }  # past the tags, up to the vocabulary
    assert models.gguf_architecture(models.default_model_path()) == "llama"
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    assert models.gguf_architecture(tmp_path / "junk.gguf") is None
    named = "96 of each head's 128" if arch == "phi3" else "architecture gemma2"
    if importlib.util.find_spec("llama_cpp") is not None:
        kind, why = choose_engine(Settings(model=str(path)))
        assert kind == "llamacpp" and named in why and "llama.cpp reads it" in why
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real_find_spec(name, *a)
    )
    kind, why = choose_engine(Settings(model=str(path)))
    assert kind == "transformers" and named in why
    with pytest.raises(ValueError, match="--engine llamacpp or --engine transformers"):
        build_engine(Settings(model=str(path), engine="openvino"))


def test_a_gemma2_folder_goes_to_llama_cpp_in_its_own_layout_or_to_transformers_saying_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Gemma 2 folder, which OpenVINO's paged attention cannot serve (it soft-caps attention scores): auto writes it
    in llama.cpp's own layout where llama-cpp-python is installed and llama.cpp's gemma2 graph means what the folder
    does, else serves it on the transformers engine; the reasons in the log line either way (and how to get
    llama.cpp where it is not installed)."""
    import importlib.util
    import json

    from tests.tiny import save_tiny_family

    folder = save_tiny_family(tmp_path / "gemma2", "Gemma2ForCausalLM", tokenizer="sentencepiece")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "query_pre_attn_scalar": config["head_dim"]}))
    if importlib.util.find_spec("llama_cpp") is not None:
        kind, why = choose_engine(Settings(model=str(folder)))
        assert kind == "llamacpp" and "soft-caps" in why and "llama.cpp's own layout" in why
    (folder / "config.json").write_text(json.dumps(config))  # an attention scale llama.cpp's graph does not use
    kind, why = choose_engine(Settings(model=str(folder)))
    assert kind == "transformers" and "soft-caps" in why
    if importlib.util.find_spec("llama_cpp") is not None:
        assert "query_pre_attn_scalar" in why
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real_find_spec(name, *a)
    )
    (folder / "config.json").write_text(json.dumps({**config, "query_pre_attn_scalar": config["head_dim"]}))
    kind, why = choose_engine(Settings(model=str(folder)))
    assert kind == "transformers" and "soft-caps" in why and "pip install 'tokenwire[llamacpp]'" in why
    with pytest.raises(ValueError, match="--engine transformers"):
        build_engine(Settings(model=str(folder), engine="openvino"))


def test_the_llamacpp_engine_refuses_settings_it_cannot_honour_naming_them(
    tiny_gguf: Path, tiny_model_dir: Path
) -> None:
    """A GGUF file's weights are its own, a folder's matrices are written as Q8_0 or float16, and it runs on the CPU:
    --quantize int8 for a file, int4 for anything, or --device cuda is an error at start that names the flag, not a
    setting silently ignored."""
    with pytest.raises(ValueError, match="--quantize int8"):
        build_engine(Settings(model=str(tiny_gguf), engine="llamacpp", quantize="int8"))
    with pytest.raises(ValueError, match="--quantize int4"):
        build_engine(Settings(model=str(tiny_model_dir), engine="llamacpp", quantize="int4"))
    for quantize in ("auto", "none", "int8"):
        assert build_engine(Settings(model=str(tiny_model_dir), engine="llamacpp", quantize=quantize))
    assert build_engine(Settings(model=str(tiny_gguf), engine="llamacpp", quantize="none"))
    assert build_engine(Settings(model=str(tiny_gguf), engine="llamacpp", flash_attention="off"))
    with pytest.raises(ValueError, match="--flash-attention must be auto, on or off"):
        choose_engine(Settings(model=str(tiny_gguf), flash_attention="fast"))
    with pytest.raises(ValueError, match="--flash-attention is the llamacpp engine's"):
        build_engine(Settings(model=str(tiny_gguf), engine="openvino", flash_attention="off"))
    with pytest.raises(ValueError, match="--device cuda"):
        build_engine(Settings(model=str(tiny_gguf), engine="llamacpp", device="cuda"))


def test_auto_picks_between_openvino_and_llama_cpp_for_a_gguf_file_by_the_cpu_and_the_streams(
    tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where both engines read the file: llama.cpp for one stream at a time, OpenVINO on a CPU with int8
    dot-product units, and on an AVX2-only CPU llama.cpp for a large file, OpenVINO for a small one; the reason
    names what decided. An explicit --quantize is OpenVINO's (or transformers') flag: no switch then."""
    from tokenwire.engine import factory, gguf_choice

    avx2 = frozenset({"sse4_2", "avx", "avx2", "fma"})
    avx512 = avx2 | {"avx512f", "avx512bw", "avx512_vnni"}
    monkeypatch.setattr(factory, "llama_cpp_installed", lambda: True)
    monkeypatch.setattr(gguf_choice, "cpu_flags", lambda: avx512)
    kind, why = choose_engine(Settings(model=str(tiny_gguf)))
    assert kind == "openvino" and "avx512_vnni" in why
    kind, why = choose_engine(Settings(model=str(tiny_gguf), max_batch_size=1))
    assert kind == "llamacpp" and "--max-batch-size 1" in why
    monkeypatch.setattr(gguf_choice, "cpu_flags", lambda: avx2)
    kind, why = choose_engine(Settings(model=str(tiny_gguf)))
    assert kind == "openvino" and "AVX2" in why  # a small file: OpenVINO's batching
    monkeypatch.setattr(gguf_choice, "LARGE_FILE_BYTES", tiny_gguf.stat().st_size)
    kind, why = choose_engine(Settings(model=str(tiny_gguf)))
    assert kind == "llamacpp" and "AVX2" in why and "GB" in why
    assert choose_engine(Settings(model=str(tiny_gguf), quantize="int8"))[0] == "openvino"
    assert choose_engine(Settings(model=str(tiny_gguf), engine="openvino"))[0] == "openvino"
    monkeypatch.setattr(factory, "llama_cpp_installed", lambda: False)
    assert choose_engine(Settings(model=str(tiny_gguf)))[0] == "openvino"  # only one engine can: no rule


def test_the_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    from tokenwire.engine.gguf_choice import cpu_flags

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 avx512_vnni\n\nprocessor\t: 1\n")
    assert cpu_flags(info) == frozenset({"fpu", "sse2", "avx2", "avx512_vnni"})
    assert cpu_flags(tmp_path / "absent") == frozenset()
