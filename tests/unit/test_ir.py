"""engine/openvino/ir.py: a GGUF file made into OpenVINO IR once, with weights tokenwire quantizes itself."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tokenwire.engine.openvino import ir, positions, weights

PROMPT_IDS = [5, 17, 42, 99, 7, 64, 3, 120, 33, 8, 250, 11]


def logits(folder: Path, ids: list[int]) -> Any:
    """The IR's logits for ``ids`` (one forward pass over the whole prompt, float32 inference)."""
    return ir.logits(folder, ids, {"INFERENCE_PRECISION_HINT": "f32"})


def transformers_logits(gguf: Path, ids: list[int]) -> Any:
    """What transformers computes from the same GGUF file (it decodes every block type exactly), in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def q4_1_gguf(f16: Path, target: Path, arch: str | None = None) -> Path:
    """``f16`` written again with its matrices in Q4_1 and its embeddings in Q8_0, as the default model stores
    them (``arch``: another architecture name)."""
    import gguf as gg

    reader = gg.GGUFReader(str(f16))
    writer = ir.copy_metadata(reader, target, gg.LlamaFileType.MOSTLY_Q4_1, arch)
    for t in reader.tensors:
        data = np.asarray(t.data).reshape(tuple(int(x) for x in reversed(t.shape))).astype(np.float32)
        if data.ndim == 2:
            q = gg.GGMLQuantizationType.Q8_0 if t.name == "token_embd.weight" else gg.GGMLQuantizationType.Q4_1
            writer.add_tensor(t.name, gg.quants.quantize(data, q), raw_dtype=q)
        else:
            writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


@pytest.fixture(scope="module")
def q4_gguf(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return q4_1_gguf(tiny_gguf, tmp_path_factory.mktemp("q4") / "tiny-q4.gguf")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TOKENWIRE_CACHE_DIR", str(tmp_path))
    return tmp_path


def relative_error(got: Any, want: Any) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_a_q4_1_file_keeps_its_weights_where_openvinos_own_reading_rounds_them(q4_gguf: Path, cache: Path) -> None:
    """The default model's case: Q4_1 blocks have a float minimum. Read by OpenVINO GenAI directly it becomes a
    rounded zero point and the logits move; tokenwire's float16 IR gives what transformers computes from the
    file, and its int8 IR stays close to that."""
    import openvino_genai as og

    want = transformers_logits(q4_gguf, PROMPT_IDS)
    ours = relative_error(logits(ir.converted(q4_gguf, "none"), PROMPT_IDS), want)
    int8 = relative_error(logits(ir.converted(q4_gguf, "int8"), PROMPT_IDS), want)
    direct = cache / "direct"
    direct.mkdir()
    shutil.copy(q4_gguf, direct / "model.gguf")
    og.LLMPipeline(str(direct / "model.gguf"), "CPU", enable_save_ov_model=True)  # GenAI's own graph, saved
    theirs = relative_error(logits(direct, PROMPT_IDS), want)
    assert ours < 5e-3, ours  # float16 rounding only
    assert int8 < 0.15, int8  # a random model's large activations: the default model's perplexity moves 0.2%
    assert theirs > 3 * int8, (theirs, ours, int8)


def test_a_file_genai_reads_is_built_from_itself_with_the_files_exact_weights(
    q4_gguf: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Q4_1 file (blocks GenAI reads, as it reads Q4_K_M's) is handed to GenAI as it is, with no float16 copy
    written (a 7B file's copy would not fit in memory), and every weight of its graph is replaced by the file's
    own, decoded exactly, with the query's and key's rows in the order GenAI gave them: the float16 IR computes
    what transformers computes from the file, and the int8 one is as near it as the int8 IR made through a float16
    copy (which quantized float16-rounded weights: a random model's large activations amplify either rounding)."""
    import gguf as gg

    want = transformers_logits(q4_gguf, PROMPT_IDS)
    float16 = cache / "f16" / "tiny.gguf"
    float16.parent.mkdir()
    ir.dequantize_gguf(q4_gguf, float16)
    through_a_copy = relative_error(logits(ir.converted(float16, "int8"), PROMPT_IDS), want)

    def no_copy(*args: Any) -> None:
        raise AssertionError("a float16 copy was written")

    monkeypatch.setattr(ir, "dequantize_gguf", no_copy)
    reader = gg.GGUFReader(str(q4_gguf))
    assert ir._genai_reads(reader) and not ir._unquantized(reader)
    assert relative_error(logits(ir.converted(q4_gguf, "none"), PROMPT_IDS), want) < 5e-3
    direct = relative_error(logits(ir.converted(q4_gguf, "int8"), PROMPT_IDS), want)
    assert direct < 0.15 and direct < 1.5 * through_a_copy, (direct, through_a_copy)


def test_weights_it_cannot_tell_apart_are_converted_through_a_float16_copy(
    q4_gguf: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Should GenAI's graph hold a weight that matches no one tensor of the file, the conversion says so and goes
    the float16-copy way, with the same result."""
    monkeypatch.setattr(weights, "_matching_tensor", lambda *args: None)
    with caplog.at_level("WARNING"):
        folder = ir.converted(q4_gguf, "none")
    assert "through a float16 copy" in caplog.text
    assert relative_error(logits(folder, PROMPT_IDS), transformers_logits(q4_gguf, PROMPT_IDS)) < 5e-3
    assert not list(cache.glob("tokenwire-ir-*"))


def test_the_formats_quantize_every_matrix_and_stay_near_the_float_weights(tiny_gguf: Path, cache: Path) -> None:
    """none keeps float16; int8 stores a byte per weight and int4 half a byte (its embedding matrix, which is
    also the output layer, in int8); int8 answers close to float16, and closer than int4."""
    import openvino as ov

    want = logits(ir.converted(tiny_gguf, "none"), PROMPT_IDS)
    errors = {}
    for fmt, kinds in (("int8", {ov.Type.u8}), ("int4", {ov.Type.i4, ov.Type.u8})):
        folder = ir.converted(tiny_gguf, fmt)
        model = ov.Core().read_model(str(folder / "openvino_model.xml"))
        weights = {
            op.get_element_type()
            for op in model.get_ops()
            if op.get_type_name() == "Constant"
            and min(op.get_output_shape(0), default=1) > 1  # matrices
            and op.get_element_type() in (ov.Type.u8, ov.Type.i4, ov.Type.f16, ov.Type.f32)
        }
        assert weights == kinds, (fmt, weights)  # no float16 matrix is left
        products = sum(op.get_type_name() == "MatMul" for op in model.get_ops())
        # per layer q+k+v, output, gate+up, down (7 products before fusing); the head; the rotary angles
        assert products == 2 * 4 + 1 + 1, products
        errors[fmt] = relative_error(logits(folder, PROMPT_IDS), want)
    # a random model with large weights amplifies rounding (the default model's perplexity: docs/benchmarks.md)
    assert errors["int8"] < 0.25 and errors["int8"] < errors["int4"] / 2, errors
    sizes = {fmt: (ir.converted(tiny_gguf, fmt) / "openvino_model.bin").stat().st_size for fmt in ir.FORMATS}
    assert sizes["int4"] < sizes["int8"] < sizes["none"], sizes


def test_a_conversion_is_made_once_and_a_partial_or_corrupt_one_again(tiny_gguf: Path, cache: Path) -> None:
    folder = ir.converted(tiny_gguf, "int8")
    assert folder.parent == cache and ir.whole(folder)
    stamp = (folder / "openvino_model.bin").stat().st_mtime_ns
    assert ir.converted(tiny_gguf, "int8") == folder  # cached
    assert (folder / "openvino_model.bin").stat().st_mtime_ns == stamp
    with (folder / "openvino_model.bin").open("r+b") as f:  # cut short
        f.truncate(100)
    assert not ir.whole(folder)
    assert ir.converted(tiny_gguf, "int8") == folder and ir.whole(folder)
    (folder / ir.MARKER).unlink()  # never finished
    assert ir.converted(tiny_gguf, "int8") == folder and ir.whole(folder)
    (folder / ir.MARKER).write_text("{not json")  # corrupt marker
    assert ir.converted(tiny_gguf, "int8") == folder and ir.whole(folder)
    assert not list(cache.glob("tokenwire-ir-*"))  # no work folder left behind
    with pytest.raises(ValueError, match=r"int3.*none, int8, int4"):
        ir.converted(tiny_gguf, "int3")


def test_two_processes_converting_at_once_both_get_the_one_conversion(tiny_gguf: Path, cache: Path) -> None:
    """Replicas started together on an empty cache each convert the model; the one that finishes second finds the
    first one's folder in place and uses it."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda _: ir.converted(tiny_gguf, "none"), range(2)))
    assert got[0] == got[1] and ir.whole(got[0])
    assert not list(cache.glob("tokenwire-ir-*"))


def test_a_file_openvino_cannot_build_is_refused_with_the_way_out(tiny_gguf: Path, cache: Path) -> None:
    from tokenwire.engine.models import NotForOpenVINO

    odd = q4_1_gguf(tiny_gguf, cache / "odd.gguf", arch="falcon-like")
    with pytest.raises(NotForOpenVINO, match=r"cannot read odd\.gguf.*--engine transformers"):
        ir.converted(odd, "int8")
    assert not list(cache.glob("*-ir")) and not list(cache.glob("tokenwire-ir-*"))  # nothing half made


def test_dequantizing_keeps_the_metadata_and_decodes_every_block_exactly(q4_gguf: Path, tmp_path: Path) -> None:
    import gguf as gg

    out = tmp_path / "f16.gguf"
    ir.dequantize_gguf(q4_gguf, out)
    src, dst = gg.GGUFReader(str(q4_gguf)), gg.GGUFReader(str(out))
    assert dst.fields["tokenizer.ggml.tokens"].contents() == src.fields["tokenizer.ggml.tokens"].contents()
    assert dst.fields["general.file_type"].contents() == int(gg.LlamaFileType.MOSTLY_F16)
    quantized = {t.name: t for t in src.tensors}
    for t in dst.tensors:
        s = quantized[t.name]
        assert t.tensor_type in (gg.GGMLQuantizationType.F16, gg.GGMLQuantizationType.F32)
        exact = gg.quants.dequantize(s.data, s.tensor_type).reshape(-1)
        assert np.allclose(np.asarray(t.data, dtype=np.float32).reshape(-1), exact, rtol=1e-3, atol=1e-4), t.name


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,  # short, so that the scaling shows within the prompt
}


def test_llama3_rope_scaling_of_a_folder_reaches_the_ir(tmp_path: Path, cache: Path) -> None:
    """transformers 5 writes Llama 3's rope scaling under rope_parameters; GenAI's GGUF reader builds plain RoPE and
    ignores rope_freqs. The folder converts with rope_freqs, and the IR's rotary frequencies are divided by them:
    the IR computes what transformers does (check_against_transformers' tolerance), where plain RoPE's argmax
    agreed at 3% of positions."""
    import json

    from tests.tiny import save_tiny_model
    from tokenwire.engine.openvino import convert

    folder = save_tiny_model(tmp_path / "llama3", max_positions=1024, rope=LLAMA3_ROPE)
    config = json.loads((folder / "config.json").read_text())
    assert positions.rope_type(config) == "llama3" and convert.unsupported(folder) is None
    ids, want = check_against_transformers(folder)
    (folder / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_type": "default"}}))
    plain = logits(ir.converted(convert.converted(folder), "none"), ids)  # the defect: scaling dropped
    assert (plain.argmax(-1) == want.argmax(-1)).mean() < 0.5


def test_llama3_rope_scaling_of_a_quantized_file_reaches_the_ir(tmp_path: Path, cache: Path) -> None:
    """A Llama 3.1 file as users download it (quantized blocks, its rope_freqs in float32): GenAI keeps the rotary
    frequencies of a graph it builds from quantized blocks in float32, not float16, and they are divided by
    rope_freqs there too. The Q4_1 file's IR computes what the IR of its weights decoded to a float16 copy computes
    (the float16 route, checked against transformers above): within 1e-3 at every position. (Before, the scaling
    was dropped: 14.8 apart.)"""
    from tests.tiny import save_tiny_model
    from tokenwire.engine.openvino import convert

    folder = save_tiny_model(tmp_path / "llama3", max_positions=1024, rope=LLAMA3_ROPE)
    q4 = q4_1_gguf(convert.converted(folder), tmp_path / "llama3-q4_1.gguf")
    float16 = tmp_path / "copy" / "llama3-decoded.gguf"
    float16.parent.mkdir()
    ir.dequantize_gguf(q4, float16)
    ids = [int(i) for i in np.random.default_rng(0).integers(3, 400, 300)]
    got, want = logits(ir.converted(q4, "none"), ids), logits(ir.converted(float16, "none"), ids)
    assert np.abs(log_softmax(got) - log_softmax(want)).max() < 1e-3


@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling"])
def test_a_rope_scaling_the_openvino_route_cannot_write_is_named(tmp_path: Path, key: str) -> None:
    import json

    from tests.tiny import save_tiny_model
    from tokenwire.engine.openvino import convert

    folder = save_tiny_model(tmp_path / "yarn")
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_parameters", None)
    (folder / "config.json").write_text(json.dumps({**config, key: {"rope_type": "yarn", "factor": 4.0}}))
    assert "yarn" in (convert.unsupported(folder) or "")
    (folder / "config.json").write_text(json.dumps({**config, key: {"type": "linear", "factor": 2.0}}))
    assert convert.unsupported(folder) is None


@pytest.mark.parametrize("architecture", ["Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"])
def test_a_qwen_or_mistral_folder_goes_to_openvino_and_computes_what_transformers_does(
    architecture: str, tmp_path: Path, cache: Path
) -> None:
    """Qwen2/2.5 (query, key and value biases), Qwen3 (query and key norms, heads wider than hidden / heads) and
    Mistral (without a sliding window: Llama's layers) folders are written as GGUF files OpenVINO GenAI builds,
    which compute what transformers' forward pass of the same float16-rounded weights does (every position's
    log-probabilities within 1e-3, 32 greedy tokens equal)."""

    from tests.tiny import save_tiny_family
    from tokenwire.engine.openvino import convert

    folder = save_tiny_family(tmp_path / architecture, architecture, sliding_window=0)
    assert convert.unsupported(folder) is None
    check_against_transformers(folder)


def greedy_through_the_pipeline(folder: Path, prompt: list[int], n: int = 32, gguf: Path | None = None) -> list[int]:
    """The folder's ``n`` greedy tokens after ``prompt`` from OpenVINO GenAI's continuous-batching pipeline (paged
    attention, as the engine runs it) over its IR (float16 weights, float32 inference)."""
    import openvino as ov
    import openvino_genai as og

    from tokenwire.engine.openvino import convert

    scheduler = og.SchedulerConfig()
    scheduler.num_kv_blocks, scheduler.max_num_batched_tokens = 64, 512
    irdir = ir.converted(gguf or convert.converted(folder), "none")  # the folder, or a GGUF file written from it
    properties = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}
    pipe = og.ContinuousBatchingPipeline(str(irdir), scheduler, "CPU", properties)
    config = og.GenerationConfig()
    config.max_new_tokens, config.ignore_eos = n, True
    result = pipe.generate([ov.Tensor(np.array([prompt], dtype=np.int64))], [config])[0]
    return [int(t) for t in result.m_generation_ids[0]]


def greedy_of_transformers(folder: Path, prompt: list[int], n: int = 32) -> list[int]:
    """The ``n`` greedy tokens after ``prompt`` by transformers' forward pass of the folder (float16-rounded weights,
    float32), the whole sequence each step: the model's definition. (Its ``generate()`` is not: with Phi-3's sliding
    window its cache leaves the forward pass's argmax here after 18 tokens.)"""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float16).float()
    out = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(prompt) :]


def check_against_transformers(folder: Path) -> tuple[list[int], Any]:
    """The folder's IR (float16 weights, float32 inference) against transformers' forward pass of its float16-rounded
    weights, on a prompt of 300 random ids. The stated tolerance: every position's next-token log-probabilities
    within 1e-3 of transformers' (measured: 2e-5 to 5e-5), so the argmax agrees at every position; and the 32
    greedy tokens after the prompt from the continuous-batching pipeline (paged attention, as the engine runs it)
    equal transformers'. Returns the ids and transformers' logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from tokenwire.engine.openvino import convert

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float16).float()
    ids = [
        int(i) for i in np.random.default_rng(0).integers(3, min(500, model.config.get_text_config().vocab_size), 300)
    ]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].double().numpy()
    got = logits(ir.converted(convert.converted(folder), "none"), ids)
    assert np.abs(log_softmax(got) - log_softmax(want)).max() < 1e-3
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert greedy_through_the_pipeline(folder, ids) == greedy_of_transformers(folder, ids)
    return ids, want


def log_softmax(x: Any) -> Any:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


PHI3_LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "short_factor": [1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0],  # one per rotary frequency (head_dim 16)
    "long_factor": [1.0, 2.0, 4.0, 8.0, 12.0, 16.0, 24.0, 32.0],
    "original_max_position_embeddings": 512,  # shorter than max_position_embeddings (1024): attention factor 1.06
}


@pytest.mark.parametrize(
    ("architecture", "rope"), [("MistralForCausalLM", None), ("Phi3ForCausalLM", None), ("Phi3ForCausalLM", "long")]
)
def test_a_folder_with_a_sliding_window_goes_to_openvino_with_its_window(
    architecture: str, rope: str | None, tmp_path: Path, cache: Path
) -> None:
    """Mistral v0.1 and Phi-3 attend to the last 8 positions here (a window far shorter than the 300-token prompt;
    real ones: 4096 and 2047). The window is built into every layer's mask: the IR agrees with transformers' forward
    pass (float16-rounded weights) at every position and within 1% of the largest logit; without the window it
    would not (the same weights, the window removed from the config, agree at under half the positions). Phi-3's
    fused matrices are split, and its LongRoPE (short factors, attention factor folded into query and key) computes
    what transformers does up to its original context, which is the context the route serves. Both with a
    SentencePiece tokenizer, as their real checkpoints have."""
    import json

    from tests.tiny import save_tiny_family
    from tokenwire.engine.openvino import convert

    rope_parameters = PHI3_LONGROPE if rope else None
    folder = save_tiny_family(tmp_path / architecture, architecture, rope=rope_parameters, tokenizer="sentencepiece")
    config = json.loads((folder / "config.json").read_text())
    assert convert.unsupported(folder) is None and positions.layer_windows(config, 2) == [8, 8]
    assert convert.served_context(config) == (512 if rope else 1024)
    ids, want = check_against_transformers(folder)
    (folder / "config.json").write_text(json.dumps({**config, "sliding_window": None}))
    unwindowed = logits(ir.converted(convert.converted(folder), "none"), ids)
    assert (unwindowed.argmax(-1) == want.argmax(-1)).mean() < 0.5


GEMMA3_ROPE = {  # the 4B-27B models': linear scaling on the global layers only
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
}


@pytest.mark.parametrize("architecture", ["Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"])
def test_a_gemma3_folder_goes_to_openvino_with_what_gemma_adds_to_qwen3s_layers(
    architecture: str, tmp_path: Path, cache: Path
) -> None:
    """Gemma 3 is Qwen3's layers (query and key norms) plus: norms that multiply by 1 + weight, a norm after
    attention and after the MLP, an embedding scaled by sqrt(hidden), tanh GELU, an attention scale of its own
    (query_pre_attn_scalar 24 here, not the head size 32), a window on the local layers (8 here) with their own
    rotary base (10,000 against 1,000,000, linearly scaled by 8), and a final logit soft cap (5 here, where the
    real models have none; the text-only class). With a SentencePiece tokenizer as Gemma's (GemmaTokenizer).
    Each is built into the IR: it computes what transformers does (every position within 1e-3, 32 greedy tokens
    through paged attention equal); without any one of them it does not (measured: 1.7 to 31 apart). The 4B-27B
    models' folders (``Gemma3ForConditionalGeneration``: text and images) are served as their language model."""
    import json

    from tests.tiny import save_tiny_family
    from tokenwire.engine.openvino import convert

    folder = save_tiny_family(tmp_path / "gemma3", architecture, rope=GEMMA3_ROPE, tokenizer="sentencepiece")
    whole = json.loads((folder / "config.json").read_text())
    if architecture == "Gemma3ForCausalLM":  # (transformers' text-and-image class applies no final soft cap)
        (folder / "config.json").write_text(json.dumps({**whole, "final_logit_softcapping": 5.0}))
    assert convert.unsupported(folder) is None
    assert positions.layer_windows(convert.text_config(whole), 2) == [8, 0]
    check_against_transformers(folder)


def check_file_against_folder(folder: Path, gguf: Path) -> tuple[Any, list[int]]:
    """A GGUF file in llama.cpp's layout, written from ``folder`` in float16, served by the OpenVINO route: every
    position within 1e-3 of transformers' forward pass of the folder on 300 random ids, and 32 greedy tokens
    through paged attention equal. Returns transformers' model and the ids."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float16).float()
    ids = [int(i) for i in np.random.default_rng(0).integers(3, 400, 300)]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].double().numpy()
    got = logits(ir.converted(gguf, "none"), ids)
    assert np.abs(log_softmax(got) - log_softmax(want)).max() < 1e-3
    assert greedy_through_the_pipeline(folder, ids, gguf=gguf) == greedy_of_transformers(folder, ids)
    return model, ids


def check_file_against_its_decode(model: Any, ids: list[int], quantized: Path, weight: Any) -> None:
    """The quantized file's IR within 1e-3 of ``model`` given the file's weights decoded exactly (``weight(name,
    value)``: the model's parameter for a tensor and its value there, or None to leave it), matrices rounded to
    float16 as the IR holds them."""
    import gguf as gg
    import torch

    with torch.no_grad():
        params = dict(model.named_parameters())
        for t in gg.GGUFReader(str(quantized)).tensors:
            if (found := weight(t.name, gg.quants.dequantize(t.data, t.tensor_type))) is not None:
                key, value = found
                value = np.array(value, np.float32).reshape(params[key].shape)
                if value.ndim == 2:  # the IR's float16 (norms stay float32)
                    value = value.astype(np.float16).astype(np.float32)
                params[key].copy_(torch.from_numpy(value))
        want = model(torch.tensor([ids])).logits[0].double().numpy()
    got = logits(ir.converted(quantized, "none"), ids)
    assert np.abs(log_softmax(got) - log_softmax(want)).max() < 1e-3


def test_a_gemma3_gguf_file_as_llama_cpp_writes_it_goes_to_openvino(tmp_path: Path, cache: Path) -> None:
    """A Gemma 3 file in llama.cpp's own layout (architecture gemma3, which GenAI does not build; a SentencePiece
    vocabulary) is written again as Qwen3's layers with tokenwire's Gemma keys and a byte-level vocabulary, its
    tensors as they are, and served on OpenVINO: float16, it computes what transformers' forward pass of the folder
    does (every position within 1e-3, 32 greedy tokens through paged attention equal); in Q4_1 (its blocks copied as
    they are, then taken exactly), what that model computes with the file's weights decoded exactly."""
    import json

    from tests.tiny import gemma3_llama_cpp_names, save_gemma3_gguf_as_llama_cpp_writes_it, save_tiny_family
    from tokenwire.engine import models
    from tokenwire.engine.openvino.model import plan

    folder = save_tiny_family(tmp_path / "gemma3", "Gemma3ForCausalLM", tokenizer="sentencepiece", layers=6)
    config = json.loads((folder / "config.json").read_text())
    config["query_pre_attn_scalar"] = config["head_dim"]  # llama.cpp's gemma3 scales by 1/sqrt(head size)
    (folder / "config.json").write_text(json.dumps(config))
    f16 = save_gemma3_gguf_as_llama_cpp_writes_it(folder, tmp_path / "gemma3-f16.gguf", matrices="float16")
    assert plan(models.resolve(str(f16))).source == f16  # not refused
    model, ids = check_file_against_folder(folder, f16)
    names = gemma3_llama_cpp_names(config["num_hidden_layers"])  # norms stored as 1 + weight

    def weight(name: str, value: Any) -> tuple[str, Any] | None:
        key, is_norm = names[name]
        return key, value - 1.0 if is_norm else value

    check_file_against_its_decode(model, ids, q4_1_gguf(f16, tmp_path / "gemma3-q4_1.gguf"), weight)


def test_a_phi3_gguf_file_as_llama_cpp_writes_it_goes_to_openvino(tmp_path: Path, cache: Path) -> None:
    """A Phi-3 file in llama.cpp's own layout (architecture phi3, which GenAI does not build: the query, key and value
    in one matrix, the gate and up in another, heads rotated in halves; a SentencePiece vocabulary; a window of 8
    here; LongRoPE's factors as tensors) is written again as Llama's layers, its fused matrices cut by rows, and
    served on OpenVINO up to LongRoPE's original context: float16, it computes what transformers' forward pass of
    the folder does (every position within 1e-3, 32 greedy tokens through paged attention equal); in Q4_1 (its
    blocks cut and reordered as they are, then taken exactly), what that model computes with the file's weights
    decoded exactly."""

    from tests.tiny import phi3_llama_cpp_names, save_phi3_gguf_as_llama_cpp_writes_it, save_tiny_family
    from tokenwire.engine import models
    from tokenwire.engine.openvino.model import plan, prepare

    folder = save_tiny_family(tmp_path / "phi3", "Phi3ForCausalLM", rope=PHI3_LONGROPE, tokenizer="sentencepiece")
    f16 = save_phi3_gguf_as_llama_cpp_writes_it(folder, tmp_path / "phi3-f16.gguf")
    found = plan(models.resolve(str(f16)))
    assert found.source == f16  # not refused
    model, ids = check_file_against_folder(folder, f16)
    assert prepare(found, 4096).max_context == PHI3_LONGROPE["original_max_position_embeddings"]
    names = phi3_llama_cpp_names(2)

    def weight(name: str, value: Any) -> tuple[str, Any] | None:
        return (names[name], value) if name in names else None  # (not LongRoPE's factors)

    check_file_against_its_decode(model, ids, q4_1_gguf(f16, tmp_path / "phi3-q4_1.gguf"), weight)


def test_windows_follow_the_layer_kinds_a_config_names() -> None:

    kinds = {"sliding_window": 16, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}
    assert positions.layer_windows(kinds, 3) == [16, 0, 16]
    qwen = {"architectures": ["Qwen2ForCausalLM"], "sliding_window": 16, "use_sliding_window": True}
    assert positions.layer_windows({**qwen, "max_window_layers": 2}, 3) == [0, 0, 16]
    assert positions.layer_windows({**qwen, "use_sliding_window": False}, 3) == [0, 0, 0]  # Qwen2.5 as shipped
    assert positions.layer_windows({"sliding_window": 4096, "max_position_embeddings": 4096}, 2) == [0, 0]
    gemma3_as_transformers4_saved_it = {"sliding_window": 512, "sliding_window_pattern": 6}
    assert positions.layer_windows(gemma3_as_transformers4_saved_it, 8) == [512] * 5 + [0] + [512] * 2
    assert positions.sliding_window({"sliding_window": 4096, "max_position_embeddings": 4096}) is None


def test_a_family_the_route_cannot_write_is_left_to_the_transformers_engine(tmp_path: Path) -> None:
    """Gemma 2 (soft-capped attention scores, which OpenVINO's paged attention cannot compute), a Gemma 3 given
    them, and a Phi model rotating part of each head (Phi-4-mini): refused by name, so the start falls back to the
    transformers engine saying why."""
    import json

    from tests.tiny import save_tiny_family
    from tokenwire.engine.openvino import convert

    folder = save_tiny_family(tmp_path / "gemma2", "Gemma2ForCausalLM")
    assert "Gemma2ForCausalLM" in (convert.unsupported(folder) or "")
    folder = save_tiny_family(tmp_path / "gemma3", "Gemma3ForCausalLM")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "attn_logit_softcapping": 50.0}))
    assert "attn_logit_softcapping" in (convert.unsupported(folder) or "")
    folder = save_tiny_family(tmp_path / "phi", "Phi3ForCausalLM")
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"]["partial_rotary_factor"] = 0.75
    (folder / "config.json").write_text(json.dumps(config))
    assert "partial_rotary_factor" in (convert.unsupported(folder) or "")


def test_a_sentencepiece_folder_goes_to_openvino_with_its_pieces_as_bytes(tmp_path: Path, cache: Path) -> None:
    """GenAI's GGUF reader takes byte-level vocabularies only: a SentencePiece one (Llama 2, Mistral, TinyLlama) is
    written as one, each piece as the bytes it stands for. The IR computes what transformers does, and the IR's
    detokenizer turns every piece, a byte piece included, into its text (what the grammar backend reads)."""
    import openvino as ov
    import openvino_tokenizers  # noqa: F401 - registers the tokenizer operations

    from tests.tiny import save_tiny_sentencepiece_model
    from tokenwire.engine.openvino import convert

    folder = save_tiny_sentencepiece_model(tmp_path / "spm")
    assert convert.unsupported(folder) is None
    check_against_transformers(folder)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    text = "Hello world! Wörld 日本 🦄"
    ids = tok.encode(text, add_special_tokens=False)
    assert any(tok.convert_ids_to_tokens(i).startswith("<0x") for i in ids)  # byte pieces are in play
    irdir = ir.converted(convert.converted(folder), "none")
    detokenizer = ov.Core().compile_model(str(irdir / "openvino_detokenizer.xml"))
    decoded = detokenizer(np.array([ids], dtype=np.int64))["string_output"][0]
    assert decoded.strip() == text
