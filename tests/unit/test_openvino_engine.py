"""The OpenVINO engine on a tiny random GGUF model: the same tokens as the transformers engine, every sampling
parameter honoured, seeds, cancel, isolation of the worker process."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import scaled
from tests.pausing import check_pause_resumes_whole, paused_run
from tokenwire.engine import ChatMessage, EngineError, EngineErrorCode, FinishReason, GenerationRequest, OutputKind
from tokenwire.engine.hf.engine import HFEngine, HFEngineConfig
from tokenwire.engine.interface import SamplingParams
from tokenwire.engine.models import NotForOpenVINO
from tokenwire.engine.openvino.engine import OVEngine, OVEngineConfig
from tokenwire.engine.scheduler import SchedulerConfig


async def make_engine(model: Path, **kw: Any) -> OVEngine:
    # float32 inference: the CPU's default may be bf16, which would make the comparison with transformers inexact
    eng = OVEngine(OVEngineConfig(model=str(model), dtype="float32", max_batch_size=16, kv_cache_tokens=1 << 14, **kw))
    await eng.start()
    return eng


@pytest.fixture
async def engine(tiny_gguf: Path) -> AsyncIterator[OVEngine]:
    eng = await make_engine(tiny_gguf)
    yield eng
    await eng.shutdown()


async def run(eng: Any, rid: str, prompt: str = "Hello world!", **kw: Any) -> dict[str, Any]:
    params = SamplingParams(**kw)
    out: dict[str, Any] = {"text": "", "deltas": 0}
    async for item in eng.generate(GenerationRequest(rid, params, messages=(ChatMessage("user", prompt),))):
        if item.kind is OutputKind.STARTED:
            out["prompt_tokens"] = item.prompt_tokens
        out["text"] += item.text
        out["deltas"] += item.kind is OutputKind.DELTA
        if item.kind is OutputKind.FINISHED:
            out.update(reason=item.finish_reason, completion=item.completion_tokens)
    return out


PROMPTS = ["Hello world!", "What is the capital of France? " * 3, "日本語 😀", "a", "Streaming tokens" * 6]


async def test_greedy_text_and_prompt_tokens_equal_the_transformers_engine(tiny_gguf: Path) -> None:
    """Both engines read the same GGUF file: the same messages give the same prompt tokens, and greedy decoding
    (float32 on both) the same first 12 tokens, for requests running together on the OpenVINO engine. (Further
    on, the two engines' kernels round differently, and a random model's near-ties can flip: one prompt in five
    differed at token 22.)"""
    hf = HFEngine(HFEngineConfig(model=str(tiny_gguf), device="cpu", dtype="float32", scheduler=SchedulerConfig()))
    await hf.start()
    try:
        expected = [await run(hf, f"hf{i}", p, max_tokens=12, temperature=0) for i, p in enumerate(PROMPTS)]
        hf_prompts = [hf.prompts.build(_chat(f"x{i}", p)).token_ids for i, p in enumerate(PROMPTS)]  # type: ignore[union-attr]
    finally:
        await hf.shutdown()
    ov = await make_engine(tiny_gguf, quantize="none")  # the file's float16 weights, as transformers reads them
    try:
        got = await asyncio.gather(*(run(ov, f"ov{i}", p, max_tokens=12, temperature=0) for i, p in enumerate(PROMPTS)))
        ov_prompts = [ov.prompts.build(_chat(f"x{i}", p)).token_ids for i, p in enumerate(PROMPTS)]  # type: ignore[union-attr]
    finally:
        await ov.shutdown()
    assert ov_prompts == hf_prompts
    assert [g["text"] for g in got] == [e["text"] for e in expected]
    assert [g["completion"] for g in got] == [e["completion"] for e in expected]
    assert len({g["text"] for g in got}) > 1  # the prompts make different texts: the comparison means something


def _chat(rid: str, prompt: str) -> GenerationRequest:
    return GenerationRequest(rid, SamplingParams(), messages=(ChatMessage("user", prompt),))


async def test_a_seeded_request_alone_gives_the_same_text(engine: OVEngine) -> None:
    a = await run(engine, "a", max_tokens=30, temperature=1.0, seed=7, ignore_eos=True)
    b = await run(engine, "b", max_tokens=30, temperature=1.0, seed=7, ignore_eos=True)
    c = await run(engine, "c", max_tokens=30, temperature=1.0, seed=8, ignore_eos=True)
    assert a["text"] == b["text"]
    assert c["text"] != a["text"]


async def test_unseeded_requests_differ(engine: OVEngine) -> None:
    """The pipeline's default seed is the same for every request; the engine draws one per request instead."""
    texts = {(await run(engine, f"u{i}", max_tokens=30, temperature=1.0, ignore_eos=True))["text"] for i in range(3)}
    assert len(texts) == 3


@pytest.mark.parametrize(
    "param",
    [
        {"repetition_penalty": 5.0},
        {"presence_penalty": 2.0},
        {"frequency_penalty": 2.0},
        {"temperature": 1.5, "seed": 3, "top_k": 1},
        {"temperature": 1.5, "seed": 3, "top_p": 0.01},
        {"temperature": 1.5, "seed": 3, "min_p": 1.0},
    ],
)
async def test_every_sampling_parameter_changes_the_output(engine: OVEngine, param: dict[str, Any]) -> None:
    """Each parameter reaches the pipeline: the penalties change greedy text; top_k=1, a tiny top_p or min_p=1
    turn hot sampling back into greedy decoding."""
    prompt = "What is the capital of France? " * 3
    greedy = await run(engine, "g", prompt, max_tokens=40, temperature=0, ignore_eos=True)
    hot = await run(engine, "h", prompt, max_tokens=40, temperature=1.5, seed=3, ignore_eos=True)
    got = await run(engine, "p", prompt, max_tokens=40, ignore_eos=True, **({"temperature": 0} | param))
    assert hot["text"] != greedy["text"]
    if "temperature" in param:
        assert got["text"] == greedy["text"]
    else:
        assert got["text"] != greedy["text"]


async def test_stop_max_tokens_and_ignore_eos(engine: OVEngine) -> None:
    full = await run(engine, "f", max_tokens=40, temperature=0, ignore_eos=True)
    assert full["completion"] == 40 and full["reason"] is FinishReason.LENGTH
    stop = full["text"][10:13]
    cut = await run(engine, "s", max_tokens=40, temperature=0, ignore_eos=True, stop=(stop,))
    assert cut["reason"] is FinishReason.STOP
    assert cut["text"] == full["text"][: full["text"].index(stop)]


async def test_cancel_frees_the_request_and_others_go_on(engine: OVEngine) -> None:
    req = GenerationRequest("long", SamplingParams(max_tokens=3000, ignore_eos=True), prompt="Hello")
    stream = engine.generate(req)
    other = asyncio.create_task(run(engine, "other", max_tokens=50, temperature=0, ignore_eos=True))
    got = 0
    async for item in stream:
        got += item.kind is OutputKind.DELTA
        if got == 5:
            engine.abort("long")
        if item.kind is OutputKind.FINISHED:
            assert item.finish_reason is FinishReason.CANCELLED
    assert (await asyncio.wait_for(other, scaled(30)))["completion"] == 50
    for _ in range(100):
        if engine.stats().running == 0:
            break
        await asyncio.sleep(0.05)
    assert engine.stats().running == 0 and not engine.backend.has_work


async def test_a_closed_iterator_aborts(engine: OVEngine) -> None:
    stream = engine.generate(GenerationRequest("gone", SamplingParams(max_tokens=3000, ignore_eos=True), prompt="x"))
    async for item in stream:
        if item.kind is OutputKind.DELTA:
            break
    await stream.aclose()
    for _ in range(100):
        if not engine.backend.has_work:
            break
        await asyncio.sleep(0.05)
    assert not engine.backend.has_work
    assert (await run(engine, "next", max_tokens=5, temperature=0, ignore_eos=True))["completion"] == 5


async def test_a_dead_worker_is_restarted_its_requests_go_on_and_restarts_are_bounded(
    tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killing the worker restarts it and the request it ran goes on to its end (engine/recovery.py); past
    MAX_RESTARTS deaths in the window the engine stops, the request then running fails (generation_failed) and
    the engine is no longer ready (for the orchestrator)."""
    from tokenwire.engine.openvino import engine as ov_engine

    monkeypatch.setattr(ov_engine, "MAX_RESTARTS", 1)
    eng = await make_engine(tiny_gguf)
    try:
        for death in range(2):
            task = asyncio.create_task(run(eng, f"victim{death}", max_tokens=3000, ignore_eos=True))
            await asyncio.sleep(0.5)
            process = eng.backend._process
            assert process is not None and process.pid is not None and not task.done()
            os.kill(process.pid, signal.SIGKILL)
            if death == 0:  # restarted: it goes on, and new requests are served
                done = await asyncio.wait_for(task, scaled(60))
                assert done["completion"] == 3000 and eng.ready
                after = await asyncio.wait_for(run(eng, "after", max_tokens=5, ignore_eos=True), scaled(60))
                assert after["completion"] == 5
            else:
                with pytest.raises(EngineError) as err:
                    await asyncio.wait_for(task, scaled(10))
                assert err.value.code is EngineErrorCode.GENERATION_FAILED and "exited" in err.value.message
        for _ in range(100):
            if not eng.ready:
                break
            await asyncio.sleep(0.05)
        assert not eng.ready
    finally:
        await eng.shutdown()


def test_a_folder_it_cannot_convert_is_refused_with_the_reason_and_the_way_out(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    import json
    import shutil

    other = tmp_path / "gpt2-like"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(NotForOpenVINO, match=r"GPT2LMHeadModel.*--engine transformers"):
        OVEngine(OVEngineConfig(model=str(other)))


async def test_a_hugging_face_folder_is_converted_once_and_gives_the_transformers_text(
    tiny_long_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A llama-family folder is written as a float16 GGUF file in the cache, keyed by its content, and made into
    OpenVINO IR (float16 with --quantize none); the transformers engine reading that file gives the same greedy
    tokens; a partial or corrupt file is converted again; int8 and int4 weights load and answer."""
    from tokenwire.engine.openvino import convert, ir

    monkeypatch.setenv("TOKENWIRE_CACHE_DIR", str(tmp_path))
    eng = await make_engine(tiny_long_model_dir, quantize="none")
    try:
        got = [await run(eng, f"c{i}", p, max_tokens=12, temperature=0) for i, p in enumerate(PROMPTS)]
    finally:
        await eng.shutdown()
    gguf = convert.converted(tiny_long_model_dir)
    assert gguf.parent == tmp_path and eng.backend.source == str(ir.converted(gguf, "none"))
    hf = HFEngine(HFEngineConfig(model=str(gguf), device="cpu", dtype="float32", scheduler=SchedulerConfig()))
    await hf.start()
    try:
        expected = [await run(hf, f"h{i}", p, max_tokens=12, temperature=0) for i, p in enumerate(PROMPTS)]
    finally:
        await hf.shutdown()
    assert [g["text"] for g in got] == [e["text"] for e in expected]
    stamp = gguf.stat().st_mtime_ns
    assert convert.converted(tiny_long_model_dir).stat().st_mtime_ns == stamp  # cached
    with gguf.open("r+b") as f:  # a conversion cut short
        f.truncate(1000)
    assert convert.converted(tiny_long_model_dir).stat().st_size > 1000
    gguf.with_suffix(".json").unlink()  # no marker: never finished
    assert convert.converted(tiny_long_model_dir).stat().st_mtime_ns != stamp
    for fmt in ("int8", "int4"):
        eng = await make_engine(tiny_long_model_dir, quantize=fmt)
        try:
            assert (await run(eng, fmt, max_tokens=5, temperature=0, ignore_eos=True))["completion"] == 5
        finally:
            await eng.shutdown()


def test_settings_it_cannot_honour_are_refused(tiny_gguf: Path) -> None:
    with pytest.raises(ValueError, match="quantize"):
        OVEngine(OVEngineConfig(model=str(tiny_gguf), quantize="int2"))
    with pytest.raises(ValueError, match="cuda"):
        OVEngine(OVEngineConfig(model=str(tiny_gguf), device="cuda"))
    with pytest.raises(ValueError, match="dtype"):
        OVEngine(OVEngineConfig(model=str(tiny_gguf), dtype="int3"))


@pytest.mark.parametrize(
    "values",
    [
        {"temperature": 1e-3, "top_p": 1e-9, "top_k": 1, "min_p": 0.0},
        {"temperature": 10.0, "top_p": 1.0, "top_k": 10**9, "min_p": 1.0},
        {"repetition_penalty": 0.01, "presence_penalty": -2.0, "frequency_penalty": -2.0, "seed": 0},
        {"repetition_penalty": 10.0, "presence_penalty": 2.0, "frequency_penalty": 2.0, "seed": (1 << 63) - 1},
        {"temperature": 0.0, "repetition_penalty": 10.0, "ignore_eos": True},
    ],
)
def test_the_pipeline_accepts_every_value_the_protocol_allows(values: dict[str, Any]) -> None:
    """The protocol's ranges (SamplingParams) are checked before a request is accepted; the pipeline's own check
    must then never refuse one after ``started`` went out."""
    from tokenwire.engine.openvino.worker import generation_config

    generation_config(SamplingParams(**values), max_new_tokens=0).validate()


SYSTEM = "You are a careful assistant. " * 30  # well over a few 32-token blocks


async def chat_turn(eng: OVEngine, rid: str, turns: list[ChatMessage], **kw: Any) -> tuple[str, int]:
    text, cached = "", -1
    request = GenerationRequest(rid, SamplingParams(temperature=0, **kw), messages=tuple(turns))
    async for item in eng.generate(request):
        text += item.text
        if item.kind is OutputKind.FINISHED:
            cached = item.cached_tokens
    return text, cached


async def test_a_chats_next_turn_and_a_shared_system_prompt_come_from_the_prefix_cache(engine: OVEngine) -> None:
    first = [ChatMessage("system", SYSTEM), ChatMessage("user", "Hello world!")]
    answer, cached = await chat_turn(engine, "t1", first, max_tokens=20)
    assert cached == 0
    prompt_1 = engine.prompts.build(GenerationRequest("x", SamplingParams(), messages=tuple(first)))  # type: ignore[union-attr]
    second = [*first, ChatMessage("assistant", answer), ChatMessage("user", "And then?")]
    _, cached = await chat_turn(engine, "t2", second, max_tokens=20)
    assert cached >= len(prompt_1.token_ids) - 32  # the whole history, to the last whole block
    other = [ChatMessage("system", SYSTEM), ChatMessage("user", "Something else entirely")]
    _, cached = await chat_turn(engine, "t3", other, max_tokens=5)
    prompt_3 = engine.prompts.build(GenerationRequest("x", SamplingParams(), messages=tuple(other)))  # type: ignore[union-attr]
    shared = next(i for i, (a, b) in enumerate(zip(prompt_1.token_ids, prompt_3.token_ids, strict=False)) if a != b)
    assert shared > 600  # the system prompt
    assert cached == shared // 32 * 32  # every whole block of the shared system prompt, nothing after it


async def test_greedy_text_is_the_same_with_the_prefix_cache_on_and_off(tiny_gguf: Path) -> None:
    first = [ChatMessage("system", SYSTEM), ChatMessage("user", "Hello world!")]
    texts: dict[bool, list[str]] = {}
    for on in (True, False):
        eng = await make_engine(tiny_gguf, prefix_caching=on)
        try:
            answer, _ = await chat_turn(eng, "a", first, max_tokens=20)
            second = [*first, ChatMessage("assistant", answer), ChatMessage("user", "And then?")]
            follow, cached = await chat_turn(eng, "b", second, max_tokens=30)
            assert (cached > 0) is on
            texts[on] = [answer, follow]
        finally:
            await eng.shutdown()
    assert texts[True] == texts[False]


async def test_a_paused_request_resumes_with_the_text_of_an_uninterrupted_run(engine: OVEngine) -> None:
    """Paused mid-answer, a request makes no tokens; continued, it gives the text of a run that never paused."""
    await check_pause_resumes_whole(engine)


async def test_a_continued_request_finds_its_kv_in_the_prefix_cache(engine: OVEngine) -> None:
    """Paused, a request's KV blocks stay in the pipeline's prefix cache (until memory is needed): when it
    continues, the prompt plus the tokens it had generated are found there, not computed again (whole 32-token
    blocks)."""
    seen: list[dict[str, int]] = []
    step = engine.backend.step

    def spying_step() -> Any:
        out = step()
        if out.cached:
            seen.append(dict(out.cached))
        return out

    engine.backend.step = spying_step  # type: ignore[method-assign]
    prompt = "Tell me a story about a dragon. " * 4
    paused = await paused_run(engine, "kv", prompt, 120, pause_after=70, pause_s=0.3)
    assert paused["completion"] == 120
    reports = [c["kv"] for c in seen if "kv" in c]
    assert len(reports) >= 2, reports  # the first admission and the continuation
    assert reports[-1] >= reports[0] + 64, reports  # the generated tokens' blocks too


async def test_the_kv_cache_is_what_the_setting_asks_at_most_what_the_memory_budget_holds(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """OpenVINO GenAI allocates the whole KV cache at start and refuses to start when it does not fit in memory: the
    default 131,072 tokens of Phi-3-mini's shape would take 26 GiB (a 3.8B model that then did not start here). The
    cache is --kv-cache-tokens or what kv.KV_BYTES hold, whichever is fewer, never less than one context; the
    bytes a token takes come from the file's header (or a folder's config.json); the log says so."""
    import json

    from tokenwire.engine.openvino import kv

    shape = kv.shape_of(tiny_gguf)
    assert shape is not None and shape == kv.KVShape(layers=2, kv_heads=2, head_size=16)  # tiny_shape's
    assert shape.bytes_per_token("CPU") == 2 * 2 * 2 * (16 + 8) and shape.bytes_per_token("GPU") == 2 * 2 * 2 * 32
    phi3_mini = kv.KVShape(layers=32, kv_heads=32, head_size=96).bytes_per_token("CPU")
    assert kv.cache_tokens(1 << 17, phi3_mini, 8192) == kv.KV_BYTES // phi3_mini < 11000  # 2 GiB, not 26
    assert kv.cache_tokens(1 << 17, phi3_mini * 64, 8192) == 8192  # one context at least
    assert kv.cache_tokens(1000, phi3_mini, 8192) == 1000  # a smaller setting as it is
    assert kv.cache_tokens(1 << 17, None, 8192) == 1 << 17
    (tmp_path / "config.json").write_text(
        json.dumps({"text_config": {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 8}})
    )
    assert kv.shape_of(tmp_path) == kv.KVShape(layers=4, kv_heads=8, head_size=32)
    monkeypatch.setattr(kv, "KV_BYTES", 3000 * shape.bytes_per_token("CPU"))
    with caplog.at_level("INFO"):
        eng = await make_engine(tiny_gguf, max_model_len=1024)
    try:
        assert eng.stats().kv_cache_tokens_capacity == 3008  # 3,000 tokens in whole blocks of 32
        assert "KV cache: 3000 tokens" in caplog.text and "--kv-cache-tokens 16384" in caplog.text
        assert (await run(eng, "a", max_tokens=8))["completion"] == 8
    finally:
        await eng.shutdown()
