"""The llamacpp engine (llama.cpp's kernels under tokenwire's scheduler) on a tiny random GGUF model: batching gives
what llama.cpp computes for each sequence alone, prefixes are shared, paused requests keep their cells, failures
stay with their requests, and sequences and cells are given back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.pausing import check_pause_resumes_whole
from tests.unit.test_hf_engine import PROMPTS, SYSTEM, chat, run
from tokenwire.engine.interface import EngineError, EngineErrorCode
from tokenwire.engine.llamacpp.context import DecodeError, Entry
from tokenwire.engine.llamacpp.engine import LlamaCppEngine, LlamaCppEngineConfig
from tokenwire.engine.scheduler import SchedulerConfig

pytest.importorskip("llama_cpp", reason="pip install 'tokenwire[llamacpp]' (.ci/run installs it)")


async def make_engine(
    model: Path, max_prefill_tokens: int = 16, prefix_caching: bool = True, quantize: str = "auto", **kw: Any
) -> LlamaCppEngine:
    scheduler = SchedulerConfig(max_batch_size=8, max_prefill_tokens=max_prefill_tokens, prefix_caching=prefix_caching)
    eng = LlamaCppEngine(LlamaCppEngineConfig(model=str(model), scheduler=scheduler, quantize=quantize, **kw))
    await eng.start()
    return eng


@pytest.fixture
async def engine(tiny_gguf: Path) -> AsyncIterator[LlamaCppEngine]:
    eng = await make_engine(tiny_gguf)
    yield eng
    await eng.shutdown()


def alone(eng: LlamaCppEngine, ids: list[int], n: int, seq: int) -> list[int]:
    """llama.cpp's greedy tokens for ``ids``, one sequence alone, the prompt in batches as large as the context takes
    (no tokenwire)."""
    llama = eng.backend.llama
    assert llama is not None
    llama.trim(seq, 0)
    entries = [Entry(t, p, seq, p == len(ids) - 1) for p, t in enumerate(ids)]
    for start in range(0, len(entries), llama.n_batch):
        logits = llama.decode(entries[start : start + llama.n_batch])
    out = [int(logits[0].argmax())]
    for i in range(n - 1):
        out.append(int(llama.decode([Entry(out[-1], len(ids) + i, seq, True)])[0].argmax()))
    llama.trim(seq, 0)
    return out


def every_position(eng: LlamaCppEngine, ids: list[int]) -> Any:
    """llama.cpp's logits at every position of ``ids``, in a sequence id nobody holds (the model thread idle)."""
    import numpy as np

    llama = eng.backend.llama
    assert llama is not None
    entries = [Entry(t, p, llama.n_seq - 1, True) for p, t in enumerate(ids)]
    return np.concatenate([llama.decode(entries[i : i + llama.n_batch]) for i in range(0, len(ids), llama.n_batch)])


def apart_from(model: Any, ids: list[int], got: Any) -> float:
    """The largest difference in log-probability between ``got`` and transformers' forward pass of ``model``."""
    import torch

    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0]
    return float((torch.log_softmax(torch.from_numpy(got), -1) - torch.log_softmax(want, -1)).abs().max())


def prompt_ids(eng: LlamaCppEngine, prompt: str) -> list[int]:
    template = [{"role": "user", "content": prompt}]
    return list(
        eng.tokenizer.apply_chat_template(template, add_generation_prompt=True, tokenize=True, return_dict=False)
    )


async def test_concurrent_greedy_generations_equal_llama_cpps_own_for_each_alone(engine: LlamaCppEngine) -> None:
    """Five requests at once, prompts chunked by 16 and decoded in one batch with the others' chunks: each one's
    tokens are those llama.cpp gives its prompt alone."""
    results = await asyncio.gather(
        *(
            run(
                engine, f"r{i}", prompt=None, messages=chat(p, system=""), max_tokens=12, temperature=0, ignore_eos=True
            )
            for i, p in enumerate(PROMPTS)
        )
    )
    # compare after: the model thread is idle now, so a sequence id nobody holds can be used directly
    free = engine.backend.llama.n_seq - 1  # type: ignore[union-attr]
    for p, r in zip(PROMPTS, results, strict=True):
        template = [{"role": m.role, "content": m.content} for m in chat(p, system="")]
        ids = engine.tokenizer.apply_chat_template(
            template, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert r["ids"] == alone(engine, list(ids), 12, free), p
        assert r["reason"].value == "length" and r["completion"] == 12


async def test_a_shared_system_prompt_is_copied_not_computed_and_gives_the_same_text(tiny_gguf: Path) -> None:
    """The second conversation with the same system prompt reports the tokens it shared as cached_tokens (all of
    the system turn, not whole blocks only: llama.cpp copies cells), and gives the text it gives without sharing."""
    texts = {}
    for caching in (True, False):
        eng = await make_engine(tiny_gguf, prefix_caching=caching)
        try:
            first = await run(eng, "a", messages=chat("When is the first train?"), max_tokens=8, temperature=0)
            second = await run(eng, "b", messages=chat("How much is a day pass?"), max_tokens=8, temperature=0)
            system = [{"role": "system", "content": SYSTEM}]
            shared = len(eng.tokenizer.apply_chat_template(system, tokenize=True, return_dict=False))
            assert first["cached"] == 0
            assert (second["cached"] >= shared) if caching else second["cached"] == 0
            texts[caching] = second["text"]
        finally:
            await eng.shutdown()
    assert texts[True] == texts[False]


async def test_without_flash_attention_a_request_sharing_cells_computes_what_it_computes_alone(tiny_gguf: Path) -> None:
    """llama.cpp's flash attention sums in float16 on a CPU, so a sequence's results turn a little on where its cells
    lie: a second run of the same greedy request, whose prompt cells are the first run's (prefix reuse) and whose
    answer lies after the first answer's cells, left the first run's text at a near-tie (measured: token 92 of 300,
    where transformers' top two logits are 0.001 apart). With --flash-attention off both runs, and two at once, give
    the same tokens."""
    eng = await make_engine(tiny_gguf, max_prefill_tokens=32, flash_attention=0)
    try:
        kw = {"prompt": "Tell me a story about a lighthouse", "max_tokens": 300, "temperature": 0, "ignore_eos": True}
        first = await run(eng, "a", **kw)
        second = await run(eng, "b", **kw)
        both = await asyncio.gather(run(eng, "c", **kw), run(eng, "d", **kw))
    finally:
        await eng.shutdown()
    assert second["cached"] > 0  # its prompt's cells were the first run's
    assert second["ids"] == first["ids"] and all(r["ids"] == first["ids"] for r in both)


async def test_a_paused_request_resumes_with_the_text_of_an_uninterrupted_run(engine: LlamaCppEngine) -> None:
    """Paused mid-answer, a request makes no tokens and keeps its cells; continued, its text is that of a run that
    never paused."""
    await check_pause_resumes_whole(engine)


async def test_a_failed_batch_fails_its_requests_and_the_engine_goes_on(engine: LlamaCppEngine) -> None:
    """llama_decode refusing a batch (no KV slot, say) fails the requests in it with an error naming it; the next
    request is served, and their sequences were given back."""
    llama = engine.backend.llama
    assert llama is not None
    original = llama.decode
    calls = {"n": 0}

    def failing(entries: list[Entry]) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:  # mid-answer
            raise DecodeError("llama_decode returned 1 (no room in the KV cache for the batch)")
        return original(entries)

    llama.decode = failing  # type: ignore[method-assign]
    with pytest.raises(EngineError, match="no room in the KV cache") as failure:
        await run(engine, "doomed", prompt="Hello", max_tokens=8, temperature=0, ignore_eos=True)
    assert failure.value.code is EngineErrorCode.GENERATION_FAILED
    ok = await run(engine, "fine", prompt="Hello", max_tokens=8, temperature=0, ignore_eos=True)
    assert ok["completion"] == 8
    backend = engine.backend
    assert backend.ids.available + len(backend.kept) == llama.n_seq


async def test_sequences_and_cells_are_given_back_as_requests_end(tiny_gguf: Path) -> None:
    """More requests than there are sequence ids, one after another: ended ones keep their cells only while room
    and ids allow, so every request is served, and at the end every id is free or holds a kept sequence."""
    eng = await make_engine(tiny_gguf)
    try:
        backend = eng.backend
        llama = backend.llama
        assert llama is not None
        for i in range(llama.n_seq + 5):
            r = await run(eng, f"r{i}", prompt=f"question {i}", max_tokens=2, temperature=0, ignore_eos=True)
            assert r["completion"] == 2
        assert backend.ids.available + len(backend.kept) == llama.n_seq
        assert backend.kept.tokens > 0 and eng.stats().kv_cache_tokens_paused == 0  # ended ones' cells: not paused
    finally:
        await eng.shutdown()


def test_a_model_file_llama_cpp_cannot_read_is_refused_with_its_name(tmp_path: Path) -> None:
    from tokenwire.engine.llamacpp.context import LlamaContext

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ValueError, match=r"broken\.gguf"):
        LlamaContext(bad, 256, 64, 4, 1)


async def test_same_seed_same_text_other_seed_other_text_and_penalties_run(engine: LlamaCppEngine) -> None:
    """Sampling is tokenwire's own over llama.cpp's logits: a seed reproduces a sampled answer, another seed gives
    another, and the filters and penalties run."""
    kw: dict[str, Any] = {"prompt": "Hello", "max_tokens": 16, "temperature": 1.0, "ignore_eos": True}
    a = await run(engine, "a", seed=7, **kw)
    b = await run(engine, "b", seed=7, **kw)
    c = await run(engine, "c", seed=8, **kw)
    assert a["ids"] == b["ids"] != c["ids"]
    extra = {"top_p": 0.9, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.3, "presence_penalty": 0.5}
    d = await run(engine, "d", seed=7, **kw, **extra)
    assert d["completion"] == 16


async def test_a_gemma3_file_as_llama_cpp_writes_it_is_served_with_its_own_tokenizer(tmp_path: Path) -> None:
    """A family no other CPU engine reads as a file: a Gemma 3 GGUF in llama.cpp's own layout (architecture gemma3,
    SentencePiece vocabulary, a window on the five local layers, their rotary base, norms of 1 + weight). Its
    tokenizer is read from the file; at every position of the prompt llama.cpp's log-probabilities are within 0.1
    of transformers' forward pass of the folder it was written from (float32 weights in the file; llama.cpp's GELU
    and flash attention work in float16: measured 0.03-0.04, where a file without the window, with norms off by 0.5
    or the global rotary base on the local layer is 13 to 21 apart), and the 16 greedy tokens after it are the
    same."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from tests.tiny import save_gemma3_gguf_as_llama_cpp_writes_it, save_tiny_family

    folder = save_tiny_family(tmp_path / "gemma3", "Gemma3ForCausalLM", tokenizer="sentencepiece", layers=6)
    config = json.loads((folder / "config.json").read_text())
    config["query_pre_attn_scalar"] = config["head_dim"]  # llama.cpp scales by 1/sqrt(head size) below 27B
    (folder / "config.json").write_text(json.dumps(config))
    gguf = save_gemma3_gguf_as_llama_cpp_writes_it(folder, tmp_path / "gemma3.gguf")
    eng = await make_engine(gguf)
    try:
        prompt = "The quick brown fox jumps over the lazy dog. Streaming tokens over a WebSocket"
        ids = list(eng.tokenizer.encode(prompt, add_special_tokens=True))
        assert ids[0] == config["bos_token_id"]  # Gemma's BOS, as the file asks
        r = await run(eng, "g", prompt=prompt, max_tokens=16, temperature=0, ignore_eos=True, raw=True)
        assert r["prompt_tokens"] == len(ids) > 8  # longer than the window (8): the local layers' window matters
        got = every_position(eng, ids)
    finally:
        await eng.shutdown()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    apart = apart_from(model, ids, got)
    assert apart < 0.1, apart  # measured 0.03-0.04; a wrong window, norm or rotary base: 13 to 21
    out = list(ids)
    with torch.no_grad():
        for _ in range(16):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    assert r["ids"] == out[len(ids) :]


async def test_a_gemma2_folder_is_written_in_llama_cpps_own_layout_and_served_as_transformers_computes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gemma 2, which OpenVINO's paged attention cannot serve (it soft-caps attention scores), goes to llama.cpp as its
    own converter writes it (engine/llamacpp/layout.py): gemma2 layout, norms of 1 + weight, window and soft caps as
    keys, the SentencePiece vocabulary. The folder's tokenizer is served. At every position of a prompt longer than
    the window, llama.cpp's log-probabilities are within 0.1 of transformers' forward pass (eager attention: what
    Gemma 2 is made for) of the folder (measured 0.05, where the same model without its attention soft cap (5 here,
    to matter in a tiny model), without its window or with another attention scale is 9 to 21 apart), and 32 greedy
    tokens are the same. By default (--quantize auto) its matrices are written as Q8_0, byte for byte what llama.cpp's
    own quantizer makes of the float16 file. A folder llama.cpp's gemma2 graph would read otherwise is refused at
    once, naming why."""
    import ctypes
    import json

    import gguf as gg
    import llama_cpp
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from tests.tiny import save_tiny_family
    from tokenwire.engine.llamacpp import layout

    monkeypatch.setenv("TOKENWIRE_CACHE_DIR", str(tmp_path / "cache"))  # written here, not in the user's cache
    folder = save_tiny_family(tmp_path / "gemma2", "Gemma2ForCausalLM", tokenizer="sentencepiece")
    config = json.loads((folder / "config.json").read_text())
    config["query_pre_attn_scalar"] = 24  # llama.cpp's gemma2 scales by 1/sqrt(head size) below 27B
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="query_pre_attn_scalar"):
        LlamaCppEngine(LlamaCppEngineConfig(model=str(folder)))
    config |= {"query_pre_attn_scalar": config["head_dim"], "attn_logit_softcapping": 5.0}
    (folder / "config.json").write_text(json.dumps(config))
    eng = await make_engine(folder, quantize="none")
    try:
        prompt = "The quick brown fox jumps over the lazy dog. Streaming tokens over a WebSocket"
        ids = list(eng.tokenizer.encode(prompt, add_special_tokens=True))
        assert ids[0] == config["bos_token_id"]  # the folder's tokenizer
        r = await run(eng, "g", prompt=prompt, max_tokens=32, temperature=0, ignore_eos=True, raw=True)
        assert r["prompt_tokens"] == len(ids) > 3 * config["sliding_window"]
        got = every_position(eng, ids)
    finally:
        await eng.shutdown()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager")
    apart = apart_from(model, ids, got)
    assert apart < 0.1, apart  # measured 0.05
    for wrong in ({"attn_logit_softcapping": None}, {"sliding_window": 4096}, {"query_pre_attn_scalar": 256}):
        other = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, attn_implementation="eager", **wrong
        )
        assert apart_from(other, ids, got) > 5, wrong  # measured 20, 21 and 9: each of them is applied
    out = list(ids)
    with torch.no_grad():
        for _ in range(32):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    assert r["ids"] == out[len(ids) :]

    # --quantize auto: Q8_0 matrices, exactly what llama.cpp's own quantizer makes of the float16 file
    eng = await make_engine(folder)
    await eng.shutdown()
    f16, q8_0 = layout.converted(folder, "none"), layout.converted(folder, "int8")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, 2
    theirs = tmp_path / "llama-quantize-q8_0.gguf"
    assert llama_cpp.llama_model_quantize(str(f16).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    ours, want = gg.GGUFReader(str(q8_0)).tensors, {t.name: t for t in gg.GGUFReader(str(theirs)).tensors}
    assert {t.name for t in ours} == set(want) and sum(t.tensor_type == gg.GGMLQuantizationType.Q8_0 for t in ours) > 8
    for t in ours:
        assert t.tensor_type == want[t.name].tensor_type and np.array_equal(t.data, want[t.name].data), t.name
    (folder / "tokenizer.model").unlink()
    with pytest.raises(ValueError, match=r"tokenizer\.model"):
        LlamaCppEngine(LlamaCppEngineConfig(model=str(folder)))


async def test_a_file_of_an_architecture_transformers_does_not_know_is_served_with_its_own_vocabulary(
    tiny_gguf: Path, tmp_path: Path
) -> None:
    """llama.cpp reads more architectures than transformers' GGUF reader, which the tokenizer came from: a file of
    one transformers does not know (granite here: Llama's layers with scales that are 1 in this file) used to stop
    the start ("GGUF model with architecture granite is not supported yet"). Its vocabulary, chat template and
    context are read from its metadata as a Llama file's: the same prompt tokens and, the layers being the same, the
    same greedy tokens as the Llama file."""
    import gguf as gg
    import numpy as np

    from tokenwire.engine.openvino.ir import copy_metadata

    reader = gg.GGUFReader(str(tiny_gguf))
    granite = tmp_path / "granite.gguf"
    writer = copy_metadata(reader, granite, int(reader.fields["general.file_type"].contents()), "granite")
    writer.add_logit_scale(1.0)  # llama.cpp divides the logits by it (required for granite)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data).reshape(tuple(int(x) for x in reversed(t.shape))))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    from transformers import AutoTokenizer

    with pytest.raises(ValueError, match="granite"):
        AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=granite.name)
    results = []
    for model in (tiny_gguf, granite):
        eng = await make_engine(model)
        try:
            results.append(await run(eng, "g", prompt="Hello there, tell me a story", max_tokens=12, temperature=0))
            results[-1]["template"] = prompt_ids(eng, "Hi")
        finally:
            await eng.shutdown()
    llama, other = results
    assert other["ids"] == llama["ids"] and other["prompt_tokens"] == llama["prompt_tokens"]
    assert other["template"] == llama["template"]  # the file's chat template


async def test_a_folder_is_served_only_where_llama_cpp_reads_the_written_file_as_the_folder_means_it(
    tmp_path: Path,
) -> None:
    """A Hugging Face folder is written as a GGUF file for OpenVINO. llama.cpp reads that file as the folder means it
    for Llama, Qwen2 and Qwen3 layers with a byte-level vocabulary: a Qwen3 folder's log-probabilities within 0.1 of
    transformers' (measured 0.03). Anything else is refused at once, naming why: a SentencePiece vocabulary (written
    as bytes: llama.cpp aborted the whole process on it), a sliding window (llama.cpp ignored it: 14 apart past the
    window), Phi-3's and Gemma 3's forms (llama.cpp refused them at load)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from tests.tiny import save_tiny_family

    refused = {
        ("MistralForCausalLM", "sentencepiece", 0): "SentencePiece",
        ("MistralForCausalLM", "byte-level", 8): "sliding attention window",
        ("Phi3ForCausalLM", "byte-level", 0): "Phi3ForCausalLM",
        ("Gemma3ForCausalLM", "byte-level", 8): "Gemma3ForCausalLM",
    }
    for (arch, tokenizer, window), why in refused.items():
        folder = save_tiny_family(tmp_path / f"{arch}-{tokenizer}", arch, sliding_window=window, tokenizer=tokenizer)
        with pytest.raises(ValueError, match=why):
            LlamaCppEngine(LlamaCppEngineConfig(model=str(folder)))
    folder = save_tiny_family(tmp_path / "qwen3", "Qwen3ForCausalLM")
    eng = await make_engine(folder, quantize="none")  # float16 matrices (auto: Q8_0)
    try:
        ids = [int(i) for i in np.random.default_rng(0).integers(3, 400, 40)]
        got = every_position(eng, ids)
    finally:
        await eng.shutdown()
    apart = apart_from(AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32), ids, got)
    assert apart < 0.1, apart
